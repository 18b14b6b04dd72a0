"""The quant pass's budget: per-layer costs C_{l,b}, the exact allocation with its Pareto curve, the latency loop.

Costs by budget kind:
* size / bits_per_weight: weight storage bits (elements x bits + one fp32 scale per channel / block); a size
  budget also counts every other initializer as a fixed cost.
* latency, with a target probe: the probe's per-layer table (ms) anchored on two whole-model measurements, all fp32
  (T32) and every int8-capable layer int8 (T8): T(b) = T8 + k * sum_{l not int8} (t32_l - t8_l),
  k = (T32 - T8) / sum_l (t32_l - t8_l).
* latency, without one: a MAC proxy (int8 = 0.5x fp32 per MAC), scaled to ms by the latency probe when there is one.
With a probe that times whole models, the latency loop re-measures the chosen mix and moves the budget until the
measurement is on target (passes.quant.allocate solves every step exactly).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import onnx
from onnx import numpy_helper

from edgec.passes.costs import count_costs
from edgec.passes.quant import allocate
from edgec.passes.quant.qdq import Layer, weight_bits
from edgec.passes.quant.run import QuantRun, hist


@dataclass
class Budget:
    """One budget in the solver's units: C_{l,b} (`cost`), the cost no choice changes (`fixed`), the budget
    (`value`), `unit` (solver unit -> reported unit) and the plot's `xlabel`; `fp32_ms` for latency budgets."""
    kind: str
    cost: dict[str, dict[int, float]]
    fixed: float
    value: float
    unit: float
    xlabel: str
    fp32_ms: float | None = None


def layer_macs(model: onnx.ModelProto, layers: list[Layer], input_shapes: dict | None = None) -> dict[str, int]:
    """MACs per layer (both keyed by the one naming rule); a layer count_costs does not know counts its params."""
    per = count_costs(model, input_shapes).per_node
    return {L.name: max(int(per.get(L.name, L.params)), 1) for L in layers}


def other_weight_bits(model: onnx.ModelProto, layers: list[Layer]) -> float:
    """Storage bits of every initializer that is not a quantizable layer's weight."""
    qw = {L.weight for L in layers}
    return float(sum(numpy_helper.to_array(i).nbytes * 8 for i in model.graph.initializer if i.name not in qw))


def budget_costs(run: QuantRun) -> Budget:
    """The budget of `run.opts` and its per-layer costs (notes on their source go into run.stats)."""
    if run.opts.budget_kind in ("size", "bits_per_weight"):
        return _storage_budget(run)
    return _latency_budget(run)


def _storage_budget(run: QuantRun) -> Budget:
    layers, opts = run.layers, run.opts
    cost = {L.name: {b: weight_bits([L], {L.name: b}, block_size=run.dialect.int4_block_size)[L.name]
                     for b in run.cands[L.name]} for L in layers}
    fixed = 0.0
    if opts.budget_kind == "size":
        fixed = other_weight_bits(run.m, layers)
        budget = float(opts.target_size_bytes) * 8
        unit, xlabel = 1 / 8, "model weight bytes"
    else:
        budget = float(opts.target_bits_per_weight) * sum(L.params for L in layers)
        unit, xlabel = 1 / sum(L.params for L in layers), "bits per weight"
    run.stats["cost_source"] = "weight storage bits (elements x bits + one fp32 scale per channel/block)"
    return Budget(opts.budget_kind, cost, fixed, budget, unit, xlabel)


def _latency_budget(run: QuantRun) -> Budget:
    probe, opts = run.ctx.target_probe, run.opts
    if probe is not None:
        cost, fixed, fp32_ms = _table_costs(run, probe)
    else:
        cost, fixed, fp32_ms = _proxy_costs(run)
    budget = float(opts.target_latency_ms) if opts.target_latency_ms is not None else fp32_ms / float(opts.target_speedup)
    xlabel = "latency ms (per-layer table" + (", measured" if probe is not None else ", proxy") + ")"
    return Budget("latency", cost, fixed, budget, 1.0, xlabel, fp32_ms)


def _table_costs(run: QuantRun, probe) -> tuple[dict, float, float]:
    """Costs from the target's per-layer latency table, anchored on the measured all-fp32 and all-int8 models."""
    m, layers, cands, stats = run.m, run.layers, run.cands, run.stats
    run.ctx.progress("quant: measuring the per-layer latency table on the target")
    # only layers with a choice are timed; fixed ones (keep_fp32, decode region) cost nothing to choose
    free = [L for L in layers if len(cands[L.name]) > 1]
    table = probe.layer_latency_table(m, free, sorted({b for c in cands.values() for b in c}))
    table.update({L.name: {b: 0.0 for b in cands[L.name]} for L in layers if L.name not in table})
    if getattr(probe, "unknown_shape", None):
        stats["latency_unmeasured"] = list(probe.unknown_shape)
    # Anchor the table on two whole-model measurements (timed interleaved): all fp32 (T32) and every
    # int8-capable layer int8 (T8). T(b) = T8 + k * sum_{l not int8} (t32_l - t8_l), with
    # k = (T32 - T8) / sum_l (t32_l - t8_l), so both ends are exact and per-call overhead cancels.
    all8, _ = run.build({L.name: 8 for L in layers if 8 in cands[L.name]})
    t32_all, t8_all = probe.compare_latency_ms([m, all8])
    saving = {L.name: (table[L.name][32] - table[L.name][8]) if 8 in cands[L.name] else 0.0 for L in layers}
    tot = sum(saving.values())
    if tot <= 0 or t32_all <= t8_all:
        macs = layer_macs(m, layers, run.ctx.input_shapes)
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
    return cost, fixed, fp32_ms


def _proxy_costs(run: QuantRun) -> tuple[dict, float, float]:
    """Costs from MACs (int8 = 0.5x fp32), in ms when a latency probe times the fp32 model, else MACs x 1e-6."""
    m, layers, cands, stats = run.m, run.layers, run.cands, run.stats
    macs = layer_macs(m, layers, run.ctx.input_shapes)
    ms_fn = run.ctx.latency_probe
    fp32_ms = float(ms_fn(m)) if ms_fn is not None else None
    per_mac = (fp32_ms / sum(macs.values())) if fp32_ms else 1e-6
    cost = {L.name: {b: macs[L.name] * per_mac * (0.5 if b == 8 else 1.0) for b in cands[L.name]} for L in layers}
    stats["latency_source"] = "mac_proxy (no target probe: int8 = 0.5x fp32 per MAC" + \
        ("" if fp32_ms else "; units are MACs x 1e-6, not ms") + ")"
    stats["fp32_latency_ms"] = fp32_ms
    if fp32_ms is None and run.opts.target_latency_ms is not None:
        stats["warning"] = "target_latency_ms without a target probe or latency probe is in proxy units"
    fp32_ms = fp32_ms or sum(c[32] if 32 in c else max(c.values()) for c in cost.values())
    return cost, 0.0, fp32_ms


def solve_budget(run: QuantRun, B: Budget, sens: dict) -> tuple[allocate.Solution, float, bool]:
    """The exact allocation under B (a budget below the smallest achievable cost is raised to it), with the Pareto
    curve in run.stats (and its plot). Returns (solution, smallest achievable cost, whether the budget was raised)."""
    stats, opts, ctx = run.stats, run.opts, run.ctx
    stats["budget"] = {"kind": B.kind, "value": B.value * B.unit}
    lo = allocate.min_cost(B.cost, sens) + B.fixed
    clamped = False
    if B.value < lo:
        stats["budget_note"] = f"budget {B.value * B.unit:.6g} below the smallest achievable {lo * B.unit:.6g}; using the smallest"
        B.value = lo
        clamped = True
    solution = allocate.solve(sens, B.cost, B.value, fixed_cost=B.fixed, what=B.kind)
    front = allocate.pareto(sens, B.cost, fixed_cost=B.fixed, points=opts.pareto_points)
    stats["pareto"] = [{"cost": p.cost * B.unit, "sensitivity": p.objective,
                        "bits_histogram": hist(p.bits)} for p in front]
    png = opts.pareto_plot or (os.path.join(ctx.cache_dir, "quant_pareto.png") if ctx.cache_dir else None)
    png = os.path.abspath(png) if png else None
    if png:
        os.makedirs(os.path.dirname(os.path.abspath(png)), exist_ok=True)
        scaled = [allocate.Solution(p.bits, p.objective, p.cost * B.unit, p.budget * B.unit) for p in front]
        ch = allocate.Solution(solution.bits, solution.objective, solution.cost * B.unit, solution.budget * B.unit)
        stats["pareto_png"] = allocate.plot_pareto(scaled, png, xlabel=B.xlabel, chosen=ch,
                                                   title=f"edgec mixed-bit ({run.dialect.name}, {B.kind} budget)")
    return solution, lo, clamped


def meet_latency(run: QuantRun, B: Budget, sens: dict, solution: allocate.Solution, lo: float,
                 clamped: bool) -> allocate.Solution:
    """Measured latency loop: time the candidate interleaved with the FP32 model (ratios survive machine load),
    shrink the budget when over target, grow it into measured headroom; keep the best candidate (lowest total
    sensitivity) that measures within target. Then, when the target was unreachable, the fastest check."""
    probe, stats = run.ctx.target_probe, run.stats
    budget = B.value
    bits = dict(solution.bits)
    target = budget
    hi = sum(max(c.values()) for c in B.cost.values()) + B.fixed
    history, best = [], None
    for _ in range(max(run.opts.latency_iterations, 1)):
        qm, _ = run.build(bits)
        t_fp, t_q = probe.compare_latency_ms([run.m, qm])
        meas = t_q * B.fp32_ms / t_fp  # normalised to the FP32 time the budget was set against
        history.append({"budget_ms": budget, "measured_ms": meas, "fp32_layers": sum(1 for b in bits.values() if b == 32),
                        "objective": solution.objective})
        if meas <= target * 1.02:
            if best is None or solution.objective < best.objective:
                best = solution
            if meas >= 0.97 * target or clamped:
                break  # on target; or the target was unreachable: the fastest mix, no headroom to spend
        new_budget = min(max(budget * target / meas, lo), hi)
        sol = allocate.solve(sens, B.cost, new_budget, fixed_cost=B.fixed, what=B.kind)
        if sol.bits == bits:
            break
        budget, solution, bits = new_budget, sol, dict(sol.bits)
    if best is not None:
        solution, bits = best, dict(best.bits)
    stats["latency_iterations"] = history
    stats["latency_met"] = best is not None
    if clamped:
        solution = _fastest_check(run, B, sens, solution, bits, budget)
    return solution


def _fastest_check(run: QuantRun, B: Budget, sens: dict, solution: allocate.Solution, bits: dict[str, int],
                   budget: float) -> allocate.Solution:
    """The per-layer table prices layers in isolation; Q/DQ and layout boundaries between int8 and fp32 runs cost
    extra, so when the target is unreachable also time the uniform int8 model and keep the faster of the two
    (measured together, interleaved)."""
    all8 = {l: (8 if 8 in run.cands[l] else b) for l, b in bits.items()}
    if all8 == bits:
        return solution
    t_fp, t_mix, t_8 = run.ctx.target_probe.compare_latency_ms([run.m, run.build(bits)[0], run.build(all8)[0]])
    win = t_8 < 0.98 * t_mix  # uniform int8 is less accurate: it must win by more than noise
    run.stats["fastest_check"] = {"fp32_ms": t_fp, "table_mix_ms": t_mix, "all_int8_ms": t_8,
                                  "chosen": "all_int8" if win else "table_mix"}
    if not win:
        return solution
    return allocate.Solution(all8, float(sum(sens.get(l, {}).get(b, 0.0) for l, b in all8.items())),
                             float(sum(B.cost[l][b] for l, b in all8.items()) + B.fixed), budget)
