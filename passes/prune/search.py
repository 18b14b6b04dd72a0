"""The prune pass's searches: per-group keep counts under one budget (_allocate: uniform, global, adaptive,
sensitivity curves, GA through the executor) and, around the single-budget prune, the fidelity-floor bisection and
the latency search. Channel selection by score (_select) lives here too: allocation and the pass share it."""
from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass

import numpy as np

from edgec.core.errors import EdgecError
from edgec.passes.prune import allocate as alloc
from edgec.passes.prune import criteria as crit
from edgec.passes.prune import evaluate as EV


def _select(groups_by_id, scores, keep_counts):
    from edgec.passes.prune.graph import select_channels

    out = {}
    for gid, k in keep_counts.items():
        g = groups_by_id[gid]
        if k >= g.size:
            continue
        if g.align > 1 and k % g.align:  # never fail on alignment: the nearest valid count (allocate.unit)
            k = alloc.round_keep(k, g.size, 1, g.align)
            if k >= g.size:
                continue
        out[gid] = select_channels(g, scores[gid], int(k))
    return out


def _apply(model, groups, groups_by_id, scores, keep_counts):
    from edgec.passes.prune.apply import remove_channels

    idx = _select(groups_by_id, scores, keep_counts)
    return remove_channels(model, idx, groups)


def _executor(ctx):
    from edgec.core.executor import IN_PROCESS

    return getattr(ctx, "executor", None) or IN_PROCESS


def _sensitivity_curves(model, prunable, groups, groups_by_id, scores, ctx, opts, probe, cache) -> dict:
    """{gid: {ratio: fidelity loss with g alone kept at ratio}}; cached per group across budgets. Each group is one
    executor item (passes/prune/evaluate.py: masked suffix runs, no candidate model built); with sensitivity_refit,
    the loss after refitting the group's consumers on the built candidate."""
    def key(g):
        return ("sensitivity", g.id, opts.sensitivity_ratios, opts.sensitivity_refit, opts.round_to)

    todo = [g for g in prunable if key(g) not in cache]
    bar = ctx.progress.track(todo, desc="prune: sensitivity", unit="group")
    if opts.sensitivity_refit and opts.recovery in ("lstsq", "fusion+lstsq"):
        new = [_refit_curve(model, g, groups, groups_by_id, scores, ctx, opts, probe) for g in bar]
    else:
        payload = _executor(ctx).put(EV.make_payload(model, groups, scores, probe, ratios=opts.sensitivity_ratios,
                                                     round_to=opts.round_to, threads=ctx.task_threads,
                                                     masked=opts.candidate_eval == "masked"))
        new = _executor(ctx).map(functools.partial(EV.scan_group, payload), (g.id for g in bar),
                                 desc="prune: sensitivity")
    for g, cur in zip(todo, new):
        cache[key(g)] = cur
        ctx.progress.detail(f"sensitivity group {g.id}: {cur}")
    return {g.id: cache[key(g)] for g in prunable}


def _refit_curve(model, g, groups, groups_by_id, scores, ctx, opts, probe) -> dict:
    """Recovery-aware: the loss after refitting this group's consumers alone, on the built candidate."""
    from edgec.passes.prune import graph as G
    from edgec.passes.prune import recover as R

    cur = {}
    for r in opts.sensitivity_ratios:
        kk = alloc.round_keep(r * g.size, g.size, opts.round_to, g.align)
        if kk >= g.size:
            cur[r] = 0.0
            continue
        m, _ = _apply(model, groups, groups_by_id, scores, {g.id: kk})
        skip = opts.fidelity_samples  # refit on samples the probe does not score (no in-sample bias)

        def refit_feeds(skip=skip):
            return itertools.islice(ctx.calib_batches(), skip, None)

        m, _ = R.lstsq_refit(m, model, [L["node"] for L in G.consumer_layers(model, g)],
                             refit_feeds, samples=max(8, opts.calib_samples // 2),
                             ridge=opts.ridge, max_positions=opts.max_positions,
                             residual_target=opts.residual_target, seed=ctx.seed, threads=ctx.threads,
                             min_rows_factor=1.0)
        cur[r] = 1.0 - probe(m)
    return cur


@dataclass
class _AllocRequest:
    """What every allocation strategy may use: the candidate groups, their scores, the budget and its cost."""

    model: object
    prunable: list
    groups: list
    groups_by_id: dict
    scores: dict
    budget: alloc.Budget
    cost_f: object  # keep -> (macs ratio, params ratio), with the min_keep_ratio floor applied
    floor_keep: object
    ctx: object
    opts: object
    probe: object
    cache: dict
    sizes: dict
    aligns: dict


def _by_uniform(r: _AllocRequest):
    return alloc.uniform(r.sizes, r.cost_f, r.budget, r.opts.round_to, r.aligns)


def _by_global(r: _AllocRequest):
    return alloc.global_threshold({g: r.scores[g] for g in r.sizes}, r.cost_f, r.budget, r.opts.round_to, r.aligns,
                                  normalize=r.opts.criterion != "recon")


def _by_adaptive(r: _AllocRequest):
    from edgec.passes.prune import graph as G

    elems = {}
    for g in r.prunable:
        prod = G.producer_weights(r.model, g)
        e = np.concatenate([np.abs(p).reshape(g.size, -1) for p in prod], 1) if prod else None
        if e is None:
            e = np.repeat(np.abs(r.scores[g.id])[:, None], 2, 1)
        # weight-level importance scaled by the channel criterion (so the knee follows the chosen criterion)
        s = crit._norm(np.abs(r.scores[g.id]) + 1e-12)
        elems[g.id] = e * s[:, None]
    return alloc.adaptive(elems, r.cost_f, r.budget, r.opts.round_to, r.aligns)


def _by_sensitivity(r: _AllocRequest):
    curves = _sensitivity_curves(r.model, r.prunable, r.groups, r.groups_by_id, r.scores, r.ctx, r.opts, r.probe,
                                 r.cache)
    return alloc.sensitivity(curves, r.sizes, r.cost_f, r.budget, r.opts.round_to, r.aligns)


def _by_ga(r: _AllocRequest):
    opts, ctx = r.opts, r.ctx
    base = alloc.uniform(r.sizes, r.cost_f, r.budget, opts.round_to, r.aligns)
    payload = _executor(ctx).put(EV.make_payload(r.model, r.groups, r.scores, r.probe, threads=ctx.task_threads,
                                                 search=sorted(r.sizes), masked=opts.candidate_eval == "masked"))

    def fid(keeps):  # one generation's new individuals, through the executor
        return _executor(ctx).map(functools.partial(EV.ga_fidelity, payload), [r.floor_keep(k) for k in keeps],
                                  desc="prune: GA fitness")

    a = alloc.ga(r.sizes, r.cost_f, r.budget, lambda k: fid([k])[0], ctx.rng("prune.ga"),
                 population=opts.ga_population, generations=opts.ga_generations, bits=opts.ga_bits,
                 round_to=opts.round_to, aligns=r.aligns, seeds=[base.keep], fidelity_many=fid)
    EV.release(payload)
    return a


ALLOCATORS = {"uniform": _by_uniform, "global": _by_global, "adaptive": _by_adaptive,
              "sensitivity": _by_sensitivity, "ga": _by_ga}
assert tuple(ALLOCATORS) == alloc.ALLOCATIONS


def _allocate(model, prunable, groups, groups_by_id, scores, budget: alloc.Budget, cost, ctx, opts, probe,
              cache: dict | None = None):
    """Keep counts per group by opts.allocation (ALLOCATORS). `cache` (optional, per model and scores) reuses
    sensitivity curves across budgets."""
    sizes = {g.id: g.size for g in prunable}
    aligns = {g.id: g.align for g in prunable}

    def floor_keep(keep):  # min_keep_ratio floor
        if opts.min_keep_ratio <= 0:
            return keep
        return {gid: max(k, alloc.round_keep(opts.min_keep_ratio * sizes[gid], sizes[gid], opts.round_to,
                                             aligns[gid])) for gid, k in keep.items()}

    def cost_f(keep):
        return cost(floor_keep(keep))

    req = _AllocRequest(model, prunable, groups, groups_by_id, scores, budget, cost_f, floor_keep, ctx, opts, probe,
                        cache if cache is not None else {}, sizes, aligns)
    a = ALLOCATORS[opts.allocation](req)
    a.keep = floor_keep(a.keep)
    a.cost = cost(a.keep)
    return a


# ----------------------------------------------------------------------------- budget searches
def _floor_search(prune_once, model, groups, ctx, opts, budget, scores, notes, acts, probe, cache, floor, first):
    """(result, floor stats): the budget's result, or, if it is below the floor, the most pruned of `floor_steps`
    bisection points between the budget and 1.0 (the unpruned model) that holds it; None when none does.

    Before bisecting, the least aggressive point the bisection can reach, f_max = t + (1 - t)(1 - 2^-steps), is
    tried: when even it misses the floor, no bisection point holds it (fidelity falls as more is pruned), and the
    search stops after one prune instead of `floor_steps`. Otherwise the bisection runs as before (f_max's result is
    reused if the bisection reaches it), so it returns the same point. `prune_once` is prune_pass._prune_once."""
    meas = floor.measure(first[0])
    hist = [{"target": round(budget.target, 4), "ok": floor.ok(meas), **meas}]
    best, best_meas = (first, meas) if floor.ok(meas) else (None, None)
    lo, hi = budget.target, 1.0
    tried: dict[float, tuple] = {}

    def attempt(f):
        if f not in tried:
            ctx.progress(f"prune: below the fidelity floor; trying {budget.kind} {f:.3f}")
            res = prune_once(model, groups, ctx, opts, alloc.Budget(budget.kind, f), scores, notes, acts, probe,
                             cache)
            m = floor.measure(res[0])
            hist.append({"target": round(f, 4), "ok": floor.ok(m), **m})
            tried[f] = (res, m)
        return tried[f]

    steps = opts.floor_steps if best is None else 0
    if steps:
        f_max = budget.target
        for _ in range(steps):  # the point an all-failing bisection ends on (the same floats, so its result is reused)
            f_max = 0.5 * (f_max + 1.0)
        res, meas = attempt(f_max)
        if not floor.ok(meas):
            steps = 0
            hist[-1]["note"] = "the least aggressive bisection point misses the floor: no point holds it"
    for _ in range(steps):
        f = 0.5 * (lo + hi)
        res, meas = attempt(f)
        if floor.ok(meas):
            best, best_meas, hi = res, meas, f
        else:
            lo = f
    info = {**floor.describe(), "measured": best_meas or meas, "history": hist, "met": best is not None}
    if best is not None and best is not first:
        info["note"] = f"{budget.kind} budget {budget.target:g} is below the floor; relaxed to {hi:.3f}"
    return best, info


def _latency_search(prune_once, model, groups, ctx, opts, scores, notes, acts, probe, lat):
    """Find the largest MACs fraction f with latency_probe(prune(f)) <= target_latency_ms: a proportional first
    guess f = target / base, then bisection between the best feasible and the smallest infeasible f. `prune_once` is
    prune_pass._prune_once."""
    if ctx.latency_probe is None:
        raise EdgecError("target_latency_ms needs a latency probe from the target (none given)")
    target = float(opts.target_latency_ms)
    base_ms = float(ctx.latency_probe(model))
    lat.update({"base_ms": round(base_ms, 3), "target_ms": target, "steps": []})
    lo, hi = 0.0, 1.0
    f = min(1.0, max(target / base_ms, 0.05))
    best = None
    for _ in range(opts.latency_iters):
        res = prune_once(model, groups, ctx, opts, alloc.Budget("macs", f), scores, notes, acts, probe)
        ms = float(ctx.latency_probe(res[0]))
        lat["steps"].append({"macs_fraction": round(f, 4), "ms": round(ms, 3)})
        if ms <= target:
            best, lo = res, f
            if ms >= 0.97 * target or f >= 1.0:
                break
        else:
            hi = f
        f = 0.5 * (lo + hi) if best is not None else max(0.02, min(0.5 * (lo + hi), f * target / ms))
    if best is None:
        raise EdgecError(f"could not reach {target} ms in {opts.latency_iters} steps "
                         f"(best {min(s['ms'] for s in lat['steps']):.3f} ms; base {base_ms:.3f} ms)")
    return best
