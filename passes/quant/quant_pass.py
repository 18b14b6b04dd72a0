"""Mixed-bit quantization: per-layer bits b_l = argmin sum_l S_{l,b_l} s.t. one budget, then Q/DQ by dialect.

Steps: fold zero Pads into Conv (exact) -> stream activation statistics (bounded memory) and pick clip ranges
(minmax | percentile | entropy | mse | auto = lowest expected quantization MSE per tensor) -> if a budget is given,
measure per-layer sensitivity S_{l,b} one layer at a time (cached) and solve the multiple-choice knapsack exactly
(passes.quant.allocate) under target_size_bytes | target_bits_per_weight | target_latency_ms | target_speedup;
latency costs come from ctx.target_probe.layer_latency_table (measured on the target) or, without a probe,
from a MAC proxy (int8 = 0.5x fp32 per MAC), which the stats say -> emit Q/DQ (passes.quant.qdq) with bias
correction; integer weights round to nearest, or with `rounding: gptq` by error compensation against each layer's
input second moment H = sum x x^T on fit samples (calib.gram, calib.rounding: minimises ||(W_q - W) X||^2 with the
scales unchanged; sensitivity trials keep round-to-nearest) -> with a probe, re-measure the whole model and tighten
the latency budget until it is met ->
fidelity floor (the recipe's fidelity policy, or the pass's own floor options without one; measured on the validate
split, passes/floor.py): promote layers (with a budget: the most sensitivity removed per unit of budget spent;
without: the most sensitive, measured for this) until the floor holds; never return a model below it -> kernel
check through the probe.

Modules: budget costs, the solve with its Pareto curve and the latency loop in passes.quant.budget; the state the
steps share (calibration, memoised Q/DQ builds, sensitivities) in passes.quant.run.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field

import numpy as np
import onnx

from edgec.calib.gram import collect_grams
from edgec.calib.ranges import ESTIMATORS
from edgec.calib.rounding import GptqRounder
from edgec.calib.stats import collect_stats
from edgec.core.errors import EdgecError
from edgec.core.graph import node_name
from edgec.passes.base import PassContext, PassResult, register_pass
from edgec.passes.floor import FloorSpec, OutputFloor
from edgec.passes.regions import find_postprocess
from edgec.passes.quant import allocate
from edgec.passes.quant.budget import budget_costs, meet_latency, solve_budget
from edgec.passes.quant.dialect import ORT_CPU, QuantDialect
from edgec.passes.quant.gptq import gram_specs
from edgec.passes.quant.qdq import Layer, find_layers, fold_pads, op_counts, plan_activations, weight_bits
from edgec.passes.quant.run import QuantRun, hist

log = logging.getLogger(__name__)

CALIBRATIONS = ESTIMATORS + ("auto",)


@dataclass(frozen=True)
class QuantOptions:
    bits: tuple[int, ...] | None = None          # candidate bitwidths (default: by budget kind and dialect)
    target_size_bytes: int | None = None         # weights of quantizable layers + other initializers
    target_bits_per_weight: float | None = None  # over quantizable layers' weights, scales included
    target_latency_ms: float | None = None       # batch-1 latency on the target
    target_speedup: float | None = None          # latency budget = fp32 latency / speedup
    calibration: str = "mse"
    percentile: float = 99.999
    weight_method: str = "minmax"                # minmax | mse (per-channel clip)
    rounding: str = "nearest"                    # nearest | gptq (error-compensated, calib.rounding)
    rounding_samples: int = 32                   # fit samples for gptq's input second moments
    metric: str = "kl"                           # kl | mse
    calib_samples: int = 64
    sensitivity_samples: int = 16
    bias_correction: bool = True
    fold_pads: bool = True
    default_bits: int = 8                        # all layers at this precision when no budget is given
    keep_fp32: tuple[str, ...] = ()
    layer_bits: dict | None = field(default=None, compare=False)  # {layer: bits} forced (e.g. from --set or a recipe)
    min_top1_agreement: float | None = None
    max_accuracy_drop: float | None = None       # in points of accuracy (0-100), needs calibration labels
    min_cosine: float | None = None              # per-output cosine floor vs the original (passes/floor.py)
    cosine_scope: str = "all"                    # all | dense_models (see passes/floor.py)
    region_gate: str = "auto"                    # auto | inputs | outputs: decode-region floors (passes/floor.py)
    floor_samples: int = 64
    kernel_check: bool = True
    quantize_outputs: bool = False               # Q/DQ on graph outputs so their producing layers can run int8
    latency_iterations: int = 4
    pareto_points: int = 12
    pareto_plot: str | None = None
    sensitivities: dict | None = field(default=None, compare=False)  # precomputed {layer: {bits: S}} (joint search)

    def __post_init__(self):
        budgets = [x for x in (self.target_size_bytes, self.target_bits_per_weight, self.target_latency_ms,
                               self.target_speedup) if x is not None]
        if len(budgets) > 1:
            raise ValueError("give at most one of target_size_bytes, target_bits_per_weight, target_latency_ms, target_speedup")
        if any(b is not None and b <= 0 for b in budgets):
            raise ValueError("budgets must be positive")
        if self.calibration not in CALIBRATIONS:
            raise ValueError(f"calibration must be one of {', '.join(CALIBRATIONS)}")
        if self.weight_method not in ("minmax", "mse"):
            raise ValueError("weight_method must be minmax or mse")
        if self.rounding not in ("nearest", "gptq"):
            raise ValueError("rounding must be nearest or gptq")
        if self.metric not in ("kl", "mse"):
            raise ValueError("metric must be kl or mse")
        if self.bits is not None:
            object.__setattr__(self, "bits", tuple(int(b) for b in self.bits))
            if any(b not in (32, 16, 8, 4, 3, 2) for b in self.bits):
                raise ValueError("bits must be among 32, 16, 8, 4, 3, 2")
        object.__setattr__(self, "keep_fp32", tuple(self.keep_fp32 or ()))
        if self.layer_bits is not None:
            if not isinstance(self.layer_bits, dict) or any(int(b) not in (32, 16, 8, 4, 3, 2) for b in self.layer_bits.values()):
                raise ValueError("layer_bits must map layer names to bits among 32, 16, 8, 4, 3, 2")
        if self.default_bits not in (32, 16, 8, 4, 3, 2):
            raise ValueError("default_bits must be among 32, 16, 8, 4, 3, 2")
        if self.min_top1_agreement is not None and not 0 <= self.min_top1_agreement <= 1:
            raise ValueError("min_top1_agreement is a fraction in [0, 1]")
        self.floor_spec  # validates the floor options
        for nm in ("calib_samples", "sensitivity_samples", "floor_samples", "rounding_samples"):
            if not isinstance(getattr(self, nm), int) or getattr(self, nm) <= 0:
                raise ValueError(f"{nm} must be a positive integer, got {getattr(self, nm)!r}")

    @property
    def floor_spec(self) -> FloorSpec:
        return FloorSpec(self.min_top1_agreement, self.max_accuracy_drop, self.min_cosine, self.cosine_scope,
                         self.floor_samples, self.region_gate)

    @property
    def budget_kind(self) -> str | None:
        if self.target_size_bytes is not None:
            return "size"
        if self.target_bits_per_weight is not None:
            return "bits_per_weight"
        if self.target_latency_ms is not None or self.target_speedup is not None:
            return "latency"
        return None


def candidate_bits(layers: list[Layer], dialect: QuantDialect, opts: QuantOptions) -> dict[str, list[int]]:
    kind = opts.budget_kind
    if opts.bits is not None:
        base = opts.bits
    elif kind == "latency":
        base = (32, 8)  # on CPU only int8 buys time; low-bit weights run fp32 compute
    elif kind in ("size", "bits_per_weight"):
        base = (32, 8, 4, 3, 2)
    else:
        base = (opts.default_bits,)
    out = {}
    for L in layers:
        c = []
        for b in base:
            if b != 32 and b not in dialect.allowed_bits:
                continue
            if b < 8 and L.op == "Conv" and not dialect.int4_conv:
                continue
            if b < 8 and L.op not in dialect.int4_ops and not (L.op == "Conv" and dialect.int4_conv):
                continue
            c.append(b)
        if L.name in opts.keep_fp32 or not c:
            c = [32]
        if opts.layer_bits and L.name in opts.layer_bits:
            c = [int(opts.layer_bits[L.name])]
        if kind is not None and 32 not in c and opts.bits is None and not (opts.layer_bits and L.name in opts.layer_bits):
            c.append(32)
        out[L.name] = sorted(set(c), reverse=True)
    return out


@register_pass("quant", options=QuantOptions)
def quant(model: onnx.ModelProto, ctx: PassContext, opts: QuantOptions) -> PassResult:
    """Mixed-bit Q/DQ: b = argmin sum_l S_{l,b_l} s.t. sum_l C_{l,b_l} <= budget (exact MCKP), per-dialect Q/DQ."""
    dialect: QuantDialect = ctx.quant_dialect or ORT_CPU
    if opts.quantize_outputs:
        dialect = dataclasses.replace(dialect, quantize_graph_outputs=True)
    stats: dict = {"dialect": dialect.name}
    if dialect.weight_reduce_range:
        stats["weight_range"] = "7-bit int8 weights: an x86 CPU without VNNI saturates u8 x s8 pairs (QuantDialect)"
    m = model
    if opts.fold_pads:
        m, folded = fold_pads(model)
        stats["pads_folded"] = folded
    layers = find_layers(m)
    if not layers:
        return PassResult(model, False, {**stats, "reason": "no quantizable layers (Conv/Gemm/MatMul with constant weights)"})
    opts = _keep_postprocess_fp32(m, layers, ctx, opts, stats)
    _check_layer_names(layers, opts)
    cands = candidate_bits(layers, dialect, opts)
    ranges, means = _calibrate(m, layers, cands, dialect, ctx, opts, stats)
    run = QuantRun(m, layers, cands, dialect, ctx, opts, stats, ranges, means,
                   _rounder(m, layers, ctx, opts, stats))
    sens: dict[str, dict[int, float]] = {}
    cost: dict[str, dict[int, float]] | None = None  # the budget's per-layer costs (None without a budget)
    solution = None
    if opts.budget_kind is None:
        bits = {L.name: cands[L.name][0] for L in layers}
    else:
        sens = run.sensitivities()
        B = budget_costs(run)
        cost = B.cost
        solution, lo, clamped = solve_budget(run, B, sens)
        probe = ctx.target_probe
        if B.kind == "latency" and probe is not None:
            solution = meet_latency(run, B, sens, solution, lo, clamped)
        bits = dict(solution.bits)
    qm, info = run.build(bits)
    floor = OutputFloor(ctx, opts.floor_spec, m)
    if floor.active:
        held = _hold_floor(run, floor, bits, qm, sens, cost, solution)
        if held is None:
            return PassResult(model, False, stats)
        bits, qm, info, sens = held
    bits, qm, info = _kernel_check(run, bits, qm, info)
    stats.update(_summary(layers, bits, dialect, sens, solution, qm, info))
    return PassResult(qm, True, stats)


def _rounder(m: onnx.ModelProto, layers: list[Layer], ctx: PassContext, opts: QuantOptions,
             stats: dict) -> GptqRounder | None:
    """Input second moments for error-compensated rounding (rounding: gptq), on fit samples; None: nearest."""
    if opts.rounding != "gptq":
        return None
    specs = gram_specs(m, layers)
    ctx.progress(f"quant: input second moments of {len(specs)} layers on {opts.rounding_samples} samples (gptq)")
    grams = collect_grams(m, specs, ctx.calib_batches(), limit=opts.rounding_samples, threads=ctx.threads)
    stats["rounding"] = {"method": "gptq", "samples": opts.rounding_samples, "layers": len(grams),
                         "nearest": sorted(L.name for L in layers if L.name not in grams)}
    return GptqRounder(grams)


def _keep_postprocess_fp32(m: onnx.ModelProto, layers: list[Layer], ctx: PassContext, opts: QuantOptions,
                           stats: dict) -> QuantOptions:
    """Layers in the decode / post-processing region (passes/regions.py, e.g. a YOLO DFL conv) stay fp32."""
    post = find_postprocess(m, input_shapes=ctx.input_shapes)
    if not post.nodes:
        return opts
    # the region's nodes by position, under the one naming rule the layers are named by
    in_region = {node_name(m.graph.node[i], i) for i in post.indices}
    fixed32 = sorted(L.name for L in layers if L.name in in_region)
    stats["postprocess"] = {**post.summary(m), "layers_fp32": fixed32}
    if fixed32:
        opts = dataclasses.replace(opts, keep_fp32=tuple(opts.keep_fp32) + tuple(fixed32))
    return opts


def _check_layer_names(layers: list[Layer], opts: QuantOptions) -> None:
    names = {L.name for L in layers}
    unknown = sorted((set(opts.layer_bits or {}) | set(opts.keep_fp32)) - names)
    if unknown:
        raise EdgecError(f"unknown layer(s) in layer_bits/keep_fp32: {', '.join(unknown[:5])}; "
                         f"layers are: {', '.join(sorted(names)[:8])}{' ...' if len(names) > 8 else ''}")


def _calibrate(m: onnx.ModelProto, layers: list[Layer], cands: dict[str, list[int]], dialect: QuantDialect,
               ctx: PassContext, opts: QuantOptions, stats: dict) -> tuple[dict, dict]:
    """Clip ranges of every tensor any int8 choice could quantize, and each layer's input mean (streamed, bounded
    memory). Returns (ranges, means)."""
    sym = dialect.activation_symmetric
    superset = {L.name: 8 for L in layers if 8 in cands[L.name]}
    q_tensors, _ = plan_activations(m, layers, {k: 8 for k in superset}, dialect)
    ctx.progress(f"quant: calibrating {len(q_tensors)} activation tensors on {opts.calib_samples} samples")
    st = collect_stats(m, q_tensors, ctx.calib_batches(), moments_for=[L.input for L in layers],
                       limit=opts.calib_samples, threads=ctx.threads)
    ranges, chosen_est = {}, {}
    for t in q_tensors:
        if opts.calibration == "auto":
            chosen_est[t], ranges[t] = st[t].best_range(ESTIMATORS, symmetric=sym)
        else:
            ranges[t] = st[t].range(opts.calibration, symmetric=sym, percentile=opts.percentile)
    means = {L.input: st[L.input].moments.mean for L in layers if st[L.input].moments is not None}
    stats["calibration"] = {"method": opts.calibration, "samples": st.samples, "tensors": len(q_tensors)}
    if chosen_est:
        stats["calibration"]["estimators_chosen"] = {e: sum(1 for v in chosen_est.values() if v == e) for e in ESTIMATORS}
    return ranges, means


def _hold_floor(run: QuantRun, floor: OutputFloor, bits: dict[str, int], qm: onnx.ModelProto, sens: dict,
                cost: dict | None, solution: allocate.Solution | None) -> tuple[dict, onnx.ModelProto, dict, dict] | None:
    """Fidelity floor: promote the most sensitive quantized layers (one step up their candidate list at a time,
    greedily by sensitivity) until the floor holds; the promotion sequence is fixed by the sensitivities, so bisect
    over its length instead of re-measuring after every step. Returns (bits, model, info, sensitivities), or None
    when only the all-fp32 model holds the floor (the pass then returns its input)."""
    cands, stats = run.cands, run.stats
    if not sens and not floor.ok(floor.measure(qm)):
        # no budget, so no sensitivities yet: measure them (on fit samples) so promotions go by sensitivity
        sens = run.sensitivities()
    seq = _promotions(bits, cands, sens, cost)
    measured: dict[int, dict] = {}

    def at(k: int) -> dict:
        if k not in measured:
            measured[k] = floor.measure(run.build(seq[k])[0])
        return measured[k]

    steps = 0
    if not floor.ok(at(0)):
        lo, hi = 0, len(seq) - 1           # seq[lo] fails; seq[hi] (all fp32) is the reference itself
        while hi - lo > 1:
            mid = (lo + hi) // 2
            run.ctx.progress(f"quant: floor not met; trying {mid} promotion(s)")
            lo, hi = (mid, hi) if not floor.ok(at(mid)) else (lo, mid)
        steps = hi
    bits = dict(seq[steps])
    meas = at(steps)
    qm, info = run.build(bits)
    stats["floor"] = {**floor.describe(), "measured": meas, "promotions": steps, "met": floor.ok(meas),
                      "evaluations": len(measured)}
    if not floor.ok(meas) or (steps and all(b == 32 for b in bits.values())):
        stats["floor"]["note"] = ("the floor is met only with every layer fp32 on these samples; returning the "
                                  "unquantized model")
        return None
    if steps and solution is not None:
        stats["floor"]["budget_met"] = False
        stats["floor"]["note"] = (f"the budget and the floor cannot both be met: {steps} layer(s) promoted above the "
                                  "budget's allocation to keep the floor")
    if steps and run.ctx.target_probe is not None:
        bits, qm, info = _fill_islands(run, floor, bits, qm, info)
    return bits, qm, info, sens


def islands_filled(bits: dict[str, int], order: list[str], max_len: int) -> dict[str, int]:
    """`bits` with every run of at most `max_len` quantized layers (in graph order) that lies between two fp32
    layers set to fp32."""
    out, i = dict(bits), 0
    while i < len(order):
        if bits[order[i]] == 32:
            i += 1
            continue
        j = i
        while j < len(order) and bits[order[j]] != 32:
            j += 1
        if i > 0 and j < len(order) and j - i <= max_len:
            out.update({order[k]: 32 for k in range(i, j)})
        i = j
    return out


def _fill_islands(run: QuantRun, floor: OutputFloor, bits: dict[str, int], qm: onnx.ModelProto,
                  info: dict, max_lens: tuple[int, ...] = (1, 2), margin: float = 0.02) -> tuple:
    """Promotions scatter fp32 layers through the integer network; a run of one or two int8 layers between fp32
    layers pays a quantize, a dequantize and the target's layout conversions for one or two integer kernels, which
    often costs more than it saves (measured on EfficientNet-Lite0 under the default policy: 25 promotions 1.07x,
    with the one-layer islands promoted too 1.20x, same validate agreement). Build those variants, keep each that
    still holds the floor on the validate split, time them with the target's probe (interleaved medians) and
    return the fastest; within `margin` of the floor's own result that result stays."""
    order = [L.name for L in run.layers if L.name in bits]
    cands = [(bits, qm, info, None)]
    for n in max_lens:
        b = islands_filled(bits, order, n)
        if b == cands[-1][0] or all(v == 32 for v in b.values()):
            continue
        m, inf = run.build(b)
        meas = floor.measure(m)
        if floor.ok(meas):
            cands.append((b, m, inf, meas))
    if len(cands) == 1:
        return bits, qm, info
    lat = run.ctx.target_probe.compare_latency_ms([c[1] for c in cands])
    best = min(range(len(cands)), key=lambda i: lat[i])
    if lat[best] >= lat[0] * (1.0 - margin):
        best = 0
    run.stats["floor"]["islands"] = {"latency_ms": [round(x, 4) for x in lat], "variants": len(cands) - 1,
                                     "chosen": best, "fp32_added": sum(v == 32 for v in cands[best][0].values())
                                     - sum(v == 32 for v in bits.values())}
    if best:
        run.stats["floor"]["measured"] = cands[best][3]
    return cands[best][0], cands[best][1], cands[best][2]


def _promotions(bits: dict[str, int], cands: dict[str, list[int]], sens: dict, cost: dict | None) -> list[dict]:
    """bits, then after each promotion (the layer `_promotion_priority` ranks first goes one candidate up), until
    every layer is fp32."""
    seq = [dict(bits)]
    while any(b != 32 for b in seq[-1].values()):
        cur = dict(seq[-1])
        l = max((l for l in cur if cur[l] != 32), key=lambda l: _promotion_priority(l, cur[l], cands, sens, cost))
        up = [b for b in sorted(cands[l]) if b > cur[l]] or [32]
        cur[l] = up[0] if up[0] in cands[l] else 32
        seq.append(cur)
    return seq


def _promotion_priority(layer: str, bits: int, cands, sens, cost) -> tuple:
    """Which quantized layer the floor promotes next: without a budget the most sensitive; with one, the most
    sensitivity removed per unit of budget spent, S_{l,b} / (C_{l,up} - C_{l,b}) (a free promotion first)."""
    s = sens.get(layer, {}).get(bits, 0.0)
    if cost is None or layer not in cost:
        return (s, 0.0, layer)
    up = next((b for b in sorted(cands[layer]) if b > bits), 32)
    d = cost[layer].get(up, cost[layer].get(32, 0.0)) - cost[layer].get(bits, 0.0)
    return (s / d if d > 1e-12 else (np.inf if s > 0 else 0.0), s, layer)


def _kernel_check(run: QuantRun, bits: dict[str, int], qm: onnx.ModelProto,
                  info: dict) -> tuple[dict[str, int], onnx.ModelProto, dict]:
    """The target knows its kernels: a layer it cannot run as an integer kernel (e.g. a Conv whose output leaves
    the graph, so no QuantizeLinear follows it) stays fp32 rather than being reported int8 while it runs
    DequantizeLinear -> fp32; the effective precision of every int8 layer goes into the stats."""
    probe = run.ctx.target_probe
    if run.opts.kernel_check and probe is not None:
        eff = probe.effective_precision(qm)
        demote = sorted(l for l, b in bits.items() if b == 8 and eff.get(l, {}).get("effective") != "int8")
        if demote:
            for l in demote:
                bits[l] = 32
            qm, info = run.build(bits)
            run.stats["kept_fp32_no_int8_kernel"] = demote
    if run.opts.kernel_check and probe is not None:
        eff = probe.check_kernels(qm, {l: b for l, b in bits.items() if b == 8})
        run.stats["effective_precision"] = {l: e["effective"] + f" ({e['kernel']})" for l, e in eff.items()}
    return bits, qm, info


def _summary(layers: list[Layer], bits: dict[str, int], dialect: QuantDialect, sens: dict,
             solution: allocate.Solution | None, qm: onnx.ModelProto, info: dict) -> dict:
    lb = weight_bits(layers, bits, block_size=dialect.int4_block_size)
    fp = sum(L.params for L in layers) * 32
    return {
        "bits": {L.name: bits.get(L.name, 32) for L in layers},
        "bits_histogram": hist(bits),
        "weight_bits_total": float(sum(lb.values())),
        "weight_compression": fp / max(sum(lb.values()), 1.0),
        "bits_per_weight": float(sum(lb.values())) / max(sum(L.params for L in layers), 1),
        "sensitivities": {l: {str(b): v for b, v in d.items()} for l, d in sens.items()},
        "solution": None if solution is None else {"objective": solution.objective, "cost": solution.cost, "budget": solution.budget},
        "op_counts": op_counts(qm),
        "bias_corrected_layers": sum(1 for v in info["layers"].values() if v.get("bias_corrected")),
    }


def quantize(model: onnx.ModelProto, ctx: PassContext, **options) -> PassResult:
    """Library entry point (tests, joint search): quant(model, ctx, QuantOptions(**options))."""
    return quant(model, ctx, QuantOptions(**options))
