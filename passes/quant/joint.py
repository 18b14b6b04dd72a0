"""Joint channel removal + mixed bits under one budget, with a fidelity floor: a post-training form of adaptive
joint compression (layer-wise sparsity and bit widths together; Yao et al., Chinese Journal of Scientific Instrument
2023).

Budget: storage bits of the quantizable layers' weights, B = target_bits_per_weight x params(original) (or
target_size_bytes x 8). A candidate is (p, b): p = kept fraction of params given to the `prune` pass (structured
channel removal + recovery), b = bits per layer of the pruned model.
  alternating: for each p on the grid, prune, measure per-layer sensitivity S_{l,b} on the *pruned* model, and
               solve the knapsack min sum S_{l,b_l} s.t. sum bits_l(b_l) <= B exactly; then measure the candidate
               (top-1 agreement with the reference, accuracy drop with labels) and keep the best one that meets
               the floor.
  ga:          the pruning GA's operators (passes.prune.allocate: encode/crossover/mutate/roulette) over a
               chromosome [p gene | one 2-bit gene per layer in (8, 4, 3, 2)]; bits are repaired into the budget
               by promoting-free greedy demotion of the least sensitive layers; fitness = measured agreement
               minus a penalty when over budget. Seeded with the alternating search's best.
Dialect: the target's (ctx.quant_dialect, ORT CPU when none): a layer's candidate bits are BITS within the
dialect's allowed_bits, and below 8 only on the dialect's int4 ops (TensorRT: int8 everywhere, int4 only on
Gemm/MatMul weights; ORT CPU: also Conv and 3/2 bits).
Floor: `min_top1_agreement` / `max_accuracy_drop`; a model below it is never returned. When no candidate meets
both the budget and the floor, the best floor-meeting candidate over budget is returned and the stats say so;
when none meets the floor at all, the input model is returned unchanged.
"""
from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass

import numpy as np
import onnx

from edgec.passes.base import PassContext, PassResult, get_pass, make_options, register_pass
from edgec.passes.floor import FloorSpec, OutputFloor
from edgec.passes.quant import allocate
from edgec.passes.quant.dialect import ORT_CPU, QuantDialect
from edgec.passes.quant.qdq import find_layers, insert_qdq, weight_bits
from edgec.passes.quant.sensitivity import measure_sensitivity
from edgec.core.errors import EdgecError

log = logging.getLogger(__name__)
BITS = (8, 4, 3, 2)


@dataclass(frozen=True)
class JointOptions:
    target_bits_per_weight: float | None = None
    target_size_bytes: int | None = None
    keep_grid: tuple[float, ...] = (1.0, 0.85, 0.7, 0.55)
    search: str = "alternating"          # alternating | ga
    min_top1_agreement: float | None = None
    max_accuracy_drop: float | None = None
    prune_options: dict | None = None    # extra options for the prune pass (criterion, recovery, ...)
    sensitivity_samples: int = 16
    eval_samples: int = 64
    ga_population: int = 10
    ga_generations: int = 6

    def __post_init__(self):
        if (self.target_bits_per_weight is None) == (self.target_size_bytes is None):
            raise ValueError("give exactly one of target_bits_per_weight, target_size_bytes")
        if self.search not in ("alternating", "ga"):
            raise ValueError("search must be alternating or ga")
        g = tuple(float(x) for x in self.keep_grid)
        if not g or any(not 0 < x <= 1 for x in g):
            raise ValueError("keep_grid must hold fractions in (0, 1]")
        object.__setattr__(self, "keep_grid", g)


def _wbits(model: onnx.ModelProto, bits: dict[str, int]) -> float:
    return float(sum(weight_bits(find_layers(model), bits).values()))


def layer_bits(layer, dialect: QuantDialect) -> list[int]:
    """The bits joint_compress may give `layer` under `dialect` (descending; never empty: 8 is always allowed)."""
    low_ok = layer.op in dialect.int4_ops or (layer.op == "Conv" and dialect.int4_conv)
    return [b for b in BITS if b in dialect.allowed_bits and (b >= 8 or low_ok)] or [8]


def _score(m: dict) -> float:
    return m.get("accuracy", m["top1_agreement"] * 100) if "accuracy" in m else m["top1_agreement"]


@register_pass("joint_compress", options=JointOptions)
def joint_compress(model: onnx.ModelProto, ctx: PassContext, opts: JointOptions) -> PassResult:
    """min_{p, b} -fidelity s.t. sum_l bits_l(b_l; pruned at p) <= B and fidelity >= floor (alternating / GA)."""
    if opts.max_accuracy_drop is not None and ctx.calib_labels is None:
        raise EdgecError("max_accuracy_drop needs labelled calibration data")
    dialect = ctx.quant_dialect or ORT_CPU
    layers0 = find_layers(model)
    params0 = sum(L.params for L in layers0)
    budget = opts.target_bits_per_weight * params0 if opts.target_bits_per_weight is not None else opts.target_size_bytes * 8.0
    ref = ctx.reference_model if ctx.reference_model is not None else model
    ev = OutputFloor(ctx, FloorSpec(opts.min_top1_agreement, opts.max_accuracy_drop, samples=opts.eval_samples), ref,
                     always=True)
    sfeeds = list(itertools.islice(ctx.calib_batches(), opts.sensitivity_samples))
    spec = get_pass("prune")
    pruned_cache: dict[float, tuple] = {}

    def pruned(p: float):
        if p not in pruned_cache:
            if p >= 1.0:
                pm_ = model
            else:
                po = make_options(spec, {**(opts.prune_options or {}), "target_params": p})
                pm_ = spec.fn(model, ctx, po).model
            L = find_layers(pm_)
            cands = {l.name: layer_bits(l, dialect) for l in L}
            sens = measure_sensitivity(pm_, L, cands, {}, dialect, sfeeds, cache_dir=ctx.cache_dir, weight_only=True)
            pruned_cache[p] = (pm_, L, sens)
        return pruned_cache[p]

    def build(p: float, bits: dict[str, int]):
        pm_, L, _ = pruned(p)
        qm, _ = insert_qdq(pm_, bits, {}, dialect, weight_only=True, layers=L)
        return qm, _wbits(pm_, bits)

    history = []
    cands_out = []
    for p in opts.keep_grid:
        try:
            pm_, L, sens = pruned(p)
        except EdgecError as e:
            history.append({"keep": p, "error": str(e)})
            continue
        cost = {l.name: {b: weight_bits([l], {l.name: b})[l.name] for b in layer_bits(l, dialect)} for l in L}
        if allocate.min_cost(cost, sens) > budget:
            history.append({"keep": p, "skipped": "budget below the smallest achievable at this pruning"})
            cands_out.append((p, {l.name: min(layer_bits(l, dialect)) for l in L}))
            continue
        sol = allocate.solve(sens, cost, budget, what="bits")
        cands_out.append((p, sol.bits))
    results = []
    for p, bits in cands_out:
        qm, wb = build(p, bits)
        m = ev.measure(qm)
        results.append({"keep": p, "bits": bits, "weight_bits": wb, "within_budget": wb <= budget + 1e-6,
                        "compression": params0 * 32 / wb, **m})
        history.append({k: v for k, v in results[-1].items() if k != "bits"})

    if opts.search == "ga":
        results += _ga(opts, ctx, budget, params0, pruned, build, ev, results, dialect)

    ok_both = [r for r in results if r["within_budget"] and ev.ok(r)]
    stats: dict = {"budget_bits": budget, "search": opts.search, "history": history,
                   "floor": {"min_top1_agreement": opts.min_top1_agreement, "max_accuracy_drop": opts.max_accuracy_drop,
                             "measured_on": "calibration samples"}}
    if ok_both:
        best = max(ok_both, key=lambda r: (_score(r), r["compression"]))
    else:
        floor_ok = [r for r in results if ev.ok(r)]
        if not floor_ok:
            stats["floor"]["met"] = False
            stats["note"] = "no candidate meets the fidelity floor; returning the input model unchanged"
            return PassResult(model, False, stats)
        best = min(floor_ok, key=lambda r: r["weight_bits"])
        stats["note"] = (f"budget and floor cannot both be met: returning the smallest floor-meeting candidate "
                         f"({best['weight_bits']:.0f} bits > budget {budget:.0f})")
    qm, _ = build(best["keep"], best["bits"])
    stats.update({"chosen": {k: v for k, v in best.items()}, "budget_met": best["within_budget"],
                  "compression": best["compression"]})
    stats["floor"]["met"] = True
    return PassResult(qm, True, stats)


def _ga(opts, ctx, budget, params0, pruned, build, ev, seeds, dialect=ORT_CPU):
    """GA over [keep-ratio gene | 2-bit gene per layer], with the GA pruning-rate search's operators (binary
    genes, single-point crossover, bit-flip mutation, roulette selection; passes/prune/allocate.py)."""
    from edgec.passes.prune.allocate import crossover, mutate, roulette

    rng = ctx.rng("joint-ga")
    grid = list(opts.keep_grid)
    base_layers = [L.name for L in pruned(grid[0])[1]]
    n = len(base_layers)
    gbits = int(np.ceil(np.log2(max(len(grid), 2))))

    def decode(ch):
        pi = int("".join(map(str, ch[:gbits])), 2) % len(grid)
        genes = ch[gbits:].reshape(n, 2)
        return grid[pi], {base_layers[i]: BITS[int(g[0]) * 2 + int(g[1])] for i, g in enumerate(genes)}

    def repair(p, bits):
        pm_, L, sens = pruned(p)
        allowed = {l.name: layer_bits(l, dialect) for l in L}
        # a gene's bits, snapped to the nearest allowed width at or above it (8 is always allowed)
        bits = {l.name: min((b for b in allowed[l.name] if b >= bits.get(l.name, 8)), default=8) for l in L}
        wb = _wbits(pm_, bits)
        order = sorted(L, key=lambda l: sens[l.name].get(min(allowed[l.name]), 0.0))
        for l in itertools.cycle(order):
            if wb <= budget or all(bits[x.name] == min(allowed[x.name]) for x in L):
                break
            lower = [b for b in allowed[l.name] if b < bits[l.name]]
            if lower:
                bits[l.name] = max(lower)
                wb = _wbits(pm_, bits)
        return bits

    def encode(p, bits):
        pi = grid.index(p)
        head = [int(c) for c in format(pi, f"0{gbits}b")]
        body = []
        for name in base_layers:
            k = BITS.index(bits.get(name, 8))
            body += [k // 2, k % 2]
        return np.array(head + body, np.uint8)

    cache = {}
    out = []

    def fitness(ch):
        p, bits = decode(ch)
        try:
            bits = repair(p, bits)
        except EdgecError:
            return -10.0
        key = (p, tuple(sorted(bits.items())))
        if key not in cache:
            qm, wb = build(p, bits)
            m = ev.measure(qm)
            r = {"keep": p, "bits": bits, "weight_bits": wb, "within_budget": wb <= budget + 1e-6,
                 "compression": params0 * 32 / wb, "from": "ga", **m}
            out.append(r)
            cache[key] = _score(m) - (10.0 if not r["within_budget"] else 0.0)
        return cache[key]

    pop = [encode(s["keep"], s["bits"]) for s in seeds if s["keep"] in grid][: opts.ga_population]
    while len(pop) < opts.ga_population:
        pop.append(rng.integers(0, 2, size=gbits + 2 * n).astype(np.uint8))
    for _ in range(opts.ga_generations):
        fit = np.array([fitness(c) for c in pop])
        parents = [pop[i] for i in roulette(fit, len(pop), rng)]
        children = []
        for a, b in zip(parents[::2], parents[1::2]):
            a, b = crossover(a, b, rng) if rng.random() < 0.8 else (a, b)
            children += [mutate(a, 0.05, rng), mutate(b, 0.05, rng)]
        elite = pop[int(np.argmax(fit))]
        pop = [elite] + children[: len(pop) - 1]
    return out
