"""Mixed-bit quantization: per-layer bits b_l = argmin sum_l S_{l,b_l} s.t. one budget, then Q/DQ by dialect.

Steps: fold zero Pads into Conv (exact) -> stream activation statistics (bounded memory) and pick clip ranges
(minmax | percentile | entropy | mse | auto = lowest expected quantization MSE per tensor) -> if a budget is given,
measure per-layer sensitivity S_{l,b} one layer at a time (cached) and solve the multiple-choice knapsack exactly
(passes.quant.allocate) under target_size_bytes | target_bits_per_weight | target_latency_ms | target_speedup;
latency costs come from ctx.target_probe.layer_latency_table (measured on the target) or, without a probe,
from a MAC proxy (int8 = 0.5x fp32 per MAC), which the stats say -> emit Q/DQ (passes.quant.qdq) with bias
correction -> with a probe, re-measure the whole model and tighten the latency budget until it is met ->
fidelity floor (the recipe's fidelity policy, or the pass's own floor options without one; measured on the validate
split, passes/floor.py): promote layers (with a budget: the most sensitivity removed per unit of budget spent;
without: the most sensitive, measured for this) until the floor holds; never return a model below it -> kernel
check through the probe.
"""
from __future__ import annotations

import dataclasses
import itertools
import logging
import os
from dataclasses import dataclass, field

import numpy as np
import onnx

from edgec.calib.ranges import ESTIMATORS
from edgec.calib.stats import collect_stats
from edgec.core.graph import node_name
from edgec.passes.base import PassContext, PassResult, register_pass
from edgec.passes.costs import count_costs
from edgec.passes.floor import FloorSpec, OutputFloor
from edgec.passes.regions import find_postprocess
from edgec.passes.quant import allocate
from edgec.passes.quant.dialect import ORT_CPU, QuantDialect
from edgec.passes.quant.qdq import Layer, find_layers, fold_pads, insert_qdq, op_counts, plan_activations, weight_bits
from edgec.passes.quant.sensitivity import measure_sensitivity
from edgec.core.errors import EdgecError

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
        for nm in ("calib_samples", "sensitivity_samples", "floor_samples"):
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


def _layer_macs(model: onnx.ModelProto, layers: list[Layer], input_shapes: dict | None = None) -> dict[str, int]:
    """MACs per layer (both keyed by the one naming rule); a layer count_costs does not know counts its params."""
    per = count_costs(model, input_shapes).per_node
    return {L.name: max(int(per.get(L.name, L.params)), 1) for L in layers}


def _other_weight_bits(model: onnx.ModelProto, layers: list[Layer]) -> float:
    from onnx import numpy_helper

    qw = {L.weight for L in layers}
    return float(sum(numpy_helper.to_array(i).nbytes * 8 for i in model.graph.initializer if i.name not in qw))


@register_pass("quant", options=QuantOptions)
def quant(model: onnx.ModelProto, ctx: PassContext, opts: QuantOptions) -> PassResult:
    """Mixed-bit Q/DQ: b = argmin sum_l S_{l,b_l} s.t. sum_l C_{l,b_l} <= budget (exact MCKP), per-dialect Q/DQ."""
    dialect: QuantDialect = ctx.quant_dialect or ORT_CPU
    if opts.quantize_outputs:
        dialect = dataclasses.replace(dialect, quantize_graph_outputs=True)
    stats: dict = {"dialect": dialect.name}
    m = model
    if opts.fold_pads:
        m, folded = fold_pads(model)
        stats["pads_folded"] = folded
    layers = find_layers(m)
    if not layers:
        return PassResult(model, False, {**stats, "reason": "no quantizable layers (Conv/Gemm/MatMul with constant weights)"})
    names = {L.name for L in layers}
    post = find_postprocess(m, input_shapes=ctx.input_shapes)
    if post.nodes:
        # decode / post-processing region (passes/regions.py): its layers (e.g. a YOLO DFL conv) stay fp32
        # the region's nodes by position, under the one naming rule the layers are named by
        in_region = {node_name(m.graph.node[i], i) for i in post.indices}
        fixed32 = sorted(L.name for L in layers if L.name in in_region)
        stats["postprocess"] = {**post.summary(m), "layers_fp32": fixed32}
        if fixed32:
            opts = dataclasses.replace(opts, keep_fp32=tuple(opts.keep_fp32) + tuple(fixed32))
    unknown = sorted((set(opts.layer_bits or {}) | set(opts.keep_fp32)) - names)
    if unknown:
        raise EdgecError(f"unknown layer(s) in layer_bits/keep_fp32: {', '.join(unknown[:5])}; "
                         f"layers are: {', '.join(sorted(names)[:8])}{' ...' if len(names) > 8 else ''}")
    cands = candidate_bits(layers, dialect, opts)
    sym = dialect.activation_symmetric

    # ---- calibration (streamed, bounded memory)
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

    recent: dict[tuple, tuple[onnx.ModelProto, dict]] = {}  # the last two builds: the latency loop, the fastest
    # check, the floor's first measurement and the final model usually ask for the same bits in a row

    def build(bits: dict[str, int]) -> tuple[onnx.ModelProto, dict]:
        key = tuple(sorted(bits.items()))
        if key not in recent:
            recent[key] = insert_qdq(m, {k: v for k, v in bits.items() if v != 32}, ranges, dialect,
                                     weight_method=opts.weight_method, input_means=means,
                                     bias_correction=opts.bias_correction, layers=layers)
            while len(recent) > 2:
                del recent[next(iter(recent))]
        return recent[key]

    kind = opts.budget_kind
    probe = ctx.target_probe
    sens: dict[str, dict[int, float]] = {}
    cost: dict[str, dict[int, float]] | None = None  # the budget's per-layer costs (None without a budget)
    solution = None
    if kind is None:
        bits = {L.name: cands[L.name][0] for L in layers}
    else:
        # ---- sensitivity
        sens = _sensitivities(m, layers, cands, ranges, dialect, means, ctx, opts)
        # ---- costs
        fixed = 0.0
        if kind in ("size", "bits_per_weight"):
            cost = {L.name: {b: weight_bits([L], {L.name: b}, block_size=dialect.int4_block_size)[L.name] for b in cands[L.name]}
                    for L in layers}
            if kind == "size":
                fixed = _other_weight_bits(m, layers)
                budget = float(opts.target_size_bytes) * 8
                unit, xlabel = 1 / 8, "model weight bytes"
            else:
                budget = float(opts.target_bits_per_weight) * sum(L.params for L in layers)
                unit, xlabel = 1 / sum(L.params for L in layers), "bits per weight"
            stats["cost_source"] = "weight storage bits (elements x bits + one fp32 scale per channel/block)"
        else:
            if probe is not None and hasattr(probe, "layer_latency_table"):
                ctx.progress("quant: measuring the per-layer latency table on the target")
                # only layers with a choice are timed; fixed ones (keep_fp32, decode region) cost nothing to choose
                free = [L for L in layers if len(cands[L.name]) > 1]
                table = probe.layer_latency_table(m, free, sorted({b for c in cands.values() for b in c}))
                table.update({L.name: {b: 0.0 for b in cands[L.name]} for L in layers if L.name not in table})
                if getattr(probe, "unknown_shape", None):
                    stats["latency_unmeasured"] = list(probe.unknown_shape)
                # Anchor the table on two whole-model measurements (timed interleaved): all fp32 (T32) and every
                # int8-capable layer int8 (T8). T(b) = T8 + k * sum_{l not int8} (t32_l - t8_l), with
                # k = (T32 - T8) / sum_l (t32_l - t8_l), so both ends are exact and per-call overhead cancels.
                all8, _ = build({L.name: 8 for L in layers if 8 in cands[L.name]})
                t32_all, t8_all = probe.compare_latency_ms([m, all8]) if hasattr(probe, "compare_latency_ms") else \
                    (probe.model_latency_ms(m), probe.model_latency_ms(all8))
                saving = {L.name: (table[L.name][32] - table[L.name][8]) if 8 in cands[L.name] else 0.0 for L in layers}
                tot = sum(saving.values())
                if tot <= 0 or t32_all <= t8_all:
                    macs = _layer_macs(m, layers, ctx.input_shapes)
                    saving = {L.name: float(macs[L.name]) if 8 in cands[L.name] else 0.0 for L in layers}
                    tot = sum(saving.values()) or 1.0
                    stats["latency_note"] = "per-layer table predicts no int8 saving; distributing the measured saving by MACs"
                k = max(t32_all - t8_all, 0.0) / tot
                cost = {L.name: {b: (0.0 if b == 8 else k * saving[L.name]) for b in cands[L.name]} for L in layers}
                fixed = float(t8_all)
                fp32_ms = float(t32_all)
                stats["latency_model"] = {"fp32_ms": t32_all, "int8_ms": t8_all, "k": k,
                                          "table_ms": {l: {str(b): v for b, v in d.items()} for l, d in table.items()}}
                stats["latency_source"] = getattr(probe, "source", "target_probe")
                stats["fp32_latency_ms"] = fp32_ms
            else:
                macs = _layer_macs(m, layers, ctx.input_shapes)
                ms_fn = ctx.latency_probe
                fp32_ms = float(ms_fn(m)) if ms_fn is not None else None
                per_mac = (fp32_ms / sum(macs.values())) if fp32_ms else 1e-6
                cost = {L.name: {b: macs[L.name] * per_mac * (0.5 if b == 8 else 1.0) for b in cands[L.name]} for L in layers}
                stats["latency_source"] = "mac_proxy (no target probe: int8 = 0.5x fp32 per MAC" + \
                    ("" if fp32_ms else "; units are MACs x 1e-6, not ms") + ")"
                stats["fp32_latency_ms"] = fp32_ms
                if fp32_ms is None and opts.target_latency_ms is not None:
                    stats["warning"] = "target_latency_ms without a target probe or latency probe is in proxy units"
                fp32_ms = fp32_ms or sum(c[32] if 32 in c else max(c.values()) for c in cost.values())
            budget = float(opts.target_latency_ms) if opts.target_latency_ms is not None else fp32_ms / float(opts.target_speedup)
            unit, xlabel = 1.0, "latency ms (per-layer table" + (", measured" if probe is not None else ", proxy") + ")"
        stats["budget"] = {"kind": kind, "value": budget * unit}
        lo = allocate.min_cost(cost, sens) + fixed
        clamped = False
        if budget < lo:
            stats["budget_note"] = f"budget {budget * unit:.6g} below the smallest achievable {lo * unit:.6g}; using the smallest"
            budget = lo
            clamped = True
        solution = allocate.solve(sens, cost, budget, fixed_cost=fixed, what=kind)
        bits = dict(solution.bits)
        # ---- Pareto curve + plot
        front = allocate.pareto(sens, cost, fixed_cost=fixed, points=opts.pareto_points)
        stats["pareto"] = [{"cost": p.cost * unit, "sensitivity": p.objective,
                            "bits_histogram": _hist(p.bits)} for p in front]
        png = opts.pareto_plot or (os.path.join(ctx.cache_dir, "quant_pareto.png") if ctx.cache_dir else None)
        png = os.path.abspath(png) if png else None
        if png:
            os.makedirs(os.path.dirname(os.path.abspath(png)), exist_ok=True)
            scaled = [allocate.Solution(p.bits, p.objective, p.cost * unit, p.budget * unit) for p in front]
            ch = allocate.Solution(solution.bits, solution.objective, solution.cost * unit, solution.budget * unit)
            stats["pareto_png"] = allocate.plot_pareto(scaled, png, xlabel=xlabel, chosen=ch,
                                                       title=f"edgec mixed-bit ({dialect.name}, {kind} budget)")
        # ---- measured latency loop: time the candidate interleaved with the FP32 model (ratios survive machine
        # load), shrink the budget when over target, grow it into measured headroom; keep the best candidate
        # (lowest total sensitivity) that measures within target
        if kind == "latency" and probe is not None and hasattr(probe, "model_latency_ms"):
            target = budget
            hi = sum(max(c.values()) for c in cost.values()) + fixed
            hist, best = [], None
            for _ in range(max(opts.latency_iterations, 1)):
                qm, _ = build(bits)
                if hasattr(probe, "compare_latency_ms"):
                    t_fp, t_q = probe.compare_latency_ms([m, qm])
                    meas = t_q * fp32_ms / t_fp  # normalised to the FP32 time the budget was set against
                else:
                    meas = float(probe.model_latency_ms(qm))
                hist.append({"budget_ms": budget, "measured_ms": meas, "fp32_layers": sum(1 for b in bits.values() if b == 32),
                             "objective": solution.objective})
                if meas <= target * 1.02:
                    if best is None or solution.objective < best.objective:
                        best = solution
                    if meas >= 0.97 * target or clamped:
                        break  # on target; or the target was unreachable: the fastest mix, no headroom to spend
                new_budget = min(max(budget * target / meas, lo), hi)
                sol = allocate.solve(sens, cost, new_budget, fixed_cost=fixed, what=kind)
                if sol.bits == bits:
                    break
                budget, solution, bits = new_budget, sol, dict(sol.bits)
            if best is not None:
                solution, bits = best, dict(best.bits)
            stats["latency_iterations"] = hist
            stats["latency_met"] = best is not None
            if clamped and hasattr(probe, "compare_latency_ms"):
                # the per-layer table prices layers in isolation; Q/DQ and layout boundaries between int8 and fp32
                # runs cost extra, so when the target is unreachable also time the uniform int8 model and keep the
                # faster of the two (measured together, interleaved)
                all8 = {l: (8 if 8 in cands[l] else b) for l, b in bits.items()}
                if all8 != bits:
                    t_fp, t_mix, t_8 = probe.compare_latency_ms([m, build(bits)[0], build(all8)[0]])
                    win = t_8 < 0.98 * t_mix  # uniform int8 is less accurate: it must win by more than noise
                    stats["fastest_check"] = {"fp32_ms": t_fp, "table_mix_ms": t_mix, "all_int8_ms": t_8,
                                              "chosen": "all_int8" if win else "table_mix"}
                    if win:
                        bits = all8
                        solution = allocate.Solution(
                            all8, float(sum(sens.get(l, {}).get(b, 0.0) for l, b in all8.items())),
                            float(sum(cost[l][b] for l, b in all8.items()) + fixed), budget)
    qm, info = build(bits)

    # ---- fidelity floor: promote the most sensitive quantized layers (one step up their candidate list at a
    # time, greedily by sensitivity) until the floor holds; the promotion sequence is fixed by the sensitivities,
    # so bisect over its length instead of re-measuring after every step
    floor = OutputFloor(ctx, opts.floor_spec, m)
    if floor.active:
        if not sens and not floor.ok(floor.measure(qm)):
            # no budget, so no sensitivities yet: measure them (on fit samples) so promotions go by sensitivity
            sens = _sensitivities(m, layers, cands, ranges, dialect, means, ctx, opts)
        seq = [dict(bits)]
        while any(b != 32 for b in seq[-1].values()):
            cur = dict(seq[-1])
            l = max((l for l in cur if cur[l] != 32), key=lambda l: _promotion_priority(l, cur[l], cands, sens, cost))
            up = [b for b in sorted(cands[l]) if b > cur[l]] or [32]
            cur[l] = up[0] if up[0] in cands[l] else 32
            seq.append(cur)
        measured: dict[int, dict] = {}

        def at(k: int) -> dict:
            if k not in measured:
                measured[k] = floor.measure(build(seq[k])[0])
            return measured[k]

        steps = 0
        if not floor.ok(at(0)):
            lo, hi = 0, len(seq) - 1           # seq[lo] fails; seq[hi] (all fp32) is the reference itself
            while hi - lo > 1:
                mid = (lo + hi) // 2
                ctx.progress(f"quant: floor not met; trying {mid} promotion(s)")
                lo, hi = (mid, hi) if not floor.ok(at(mid)) else (lo, mid)
            steps = hi
        bits = dict(seq[steps])
        meas = at(steps)
        qm, info = build(bits)
        stats["floor"] = {**floor.describe(), "measured": meas, "promotions": steps, "met": floor.ok(meas),
                          "evaluations": len(measured)}
        if not floor.ok(meas) or (steps and all(b == 32 for b in bits.values())):
            stats["floor"]["note"] = ("the floor is met only with every layer fp32 on these samples; returning the "
                                      "unquantized model")
            return PassResult(model, False, stats)
        if steps and solution is not None:
            stats["floor"]["budget_met"] = False
            stats["floor"]["note"] = (f"the budget and the floor cannot both be met: {steps} layer(s) promoted above the "
                                      "budget's allocation to keep the floor")
    # ---- kernel check (the target knows its kernels)
    if opts.kernel_check and probe is not None and hasattr(probe, "effective_precision"):
        # a layer the target cannot run as an integer kernel (e.g. a Conv whose output leaves the graph, so no
        # QuantizeLinear follows it) stays fp32 rather than being reported int8 while it runs DequantizeLinear -> fp32
        eff = probe.effective_precision(qm)
        demote = sorted(l for l, b in bits.items() if b == 8 and eff.get(l, {}).get("effective") != "int8")
        if demote:
            for l in demote:
                bits[l] = 32
            qm, info = build(bits)
            stats["kept_fp32_no_int8_kernel"] = demote
    if opts.kernel_check and probe is not None and hasattr(probe, "check_kernels"):
        eff = probe.check_kernels(qm, {l: b for l, b in bits.items() if b == 8})
        stats["effective_precision"] = {l: e["effective"] + f" ({e['kernel']})" for l, e in eff.items()}
    lb = weight_bits(layers, bits, block_size=dialect.int4_block_size)
    fp = sum(L.params for L in layers) * 32
    stats.update({
        "bits": {L.name: bits.get(L.name, 32) for L in layers},
        "bits_histogram": _hist(bits),
        "weight_bits_total": float(sum(lb.values())),
        "weight_compression": fp / max(sum(lb.values()), 1.0),
        "bits_per_weight": float(sum(lb.values())) / max(sum(L.params for L in layers), 1),
        "sensitivities": {l: {str(b): v for b, v in d.items()} for l, d in sens.items()},
        "solution": None if solution is None else {"objective": solution.objective, "cost": solution.cost, "budget": solution.budget},
        "op_counts": op_counts(qm),
        "bias_corrected_layers": sum(1 for v in info["layers"].values() if v.get("bias_corrected")),
    })
    return PassResult(qm, True, stats)


def _promotion_priority(layer: str, bits: int, cands, sens, cost) -> tuple:
    """Which quantized layer the floor promotes next: without a budget the most sensitive; with one, the most
    sensitivity removed per unit of budget spent, S_{l,b} / (C_{l,up} - C_{l,b}) (a free promotion first)."""
    s = sens.get(layer, {}).get(bits, 0.0)
    if cost is None or layer not in cost:
        return (s, 0.0, layer)
    up = next((b for b in sorted(cands[layer]) if b > bits), 32)
    d = cost[layer].get(up, cost[layer].get(32, 0.0)) - cost[layer].get(bits, 0.0)
    return (s / d if d > 1e-12 else (np.inf if s > 0 else 0.0), s, layer)


def _sensitivities(m, layers, cands, ranges, dialect, means, ctx, opts) -> dict[str, dict[int, float]]:
    """{layer: {bits: S}} for every candidate: given (joint search) or measured on fit samples (cached)."""
    if opts.sensitivities is not None:
        sens = {l: {int(b): float(v) for b, v in d.items()} for l, d in opts.sensitivities.items()}
    else:
        feeds = list(itertools.islice(ctx.calib_batches(), opts.sensitivity_samples))
        ctx.progress(f"quant: sensitivity of {len(layers)} layers x {sorted({b for c in cands.values() for b in c})} bits")
        bar = ctx.progress.bar(sum(len([b for b in c if b != 32]) for c in cands.values()), "quant: sensitivity",
                               unit="trial", detail_every=20)
        sens = measure_sensitivity(m, layers, cands, ranges, dialect, feeds, metric=opts.metric,
                                   weight_method=opts.weight_method, input_means=means,
                                   bias_correction=opts.bias_correction, cache_dir=ctx.cache_dir,
                                   threads=ctx.threads, progress=bar.tick,
                                   cache_extra={"calibration": opts.calibration, "samples": opts.calib_samples})
        bar.close()
    sens = {L.name: {b: sens.get(L.name, {}).get(b, 0.0 if b == 32 else np.inf) for b in cands[L.name]} for L in layers}
    for d in sens.values():
        for b in list(d):
            if not np.isfinite(d[b]):
                d[b] = 1e6  # unmeasured: effectively forbidden
    return sens


def _hist(bits: dict[str, int]) -> dict[str, int]:
    h: dict[str, int] = {}
    for b in bits.values():
        h[str(b)] = h.get(str(b), 0) + 1
    return dict(sorted(h.items(), key=lambda kv: -int(kv[0])))


def quantize(model: onnx.ModelProto, ctx: PassContext, **options) -> PassResult:
    """Library entry point (tests, joint search): quant(model, ctx, QuantOptions(**options))."""
    return quant(model, ctx, QuantOptions(**options))
