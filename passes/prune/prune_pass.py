"""The `prune` pass: score channel groups, allocate per-group keep counts under a budget, remove, recover.

    keep_g  = allocation(scores, budget)          budget: MACs or params fraction of the input model, or latency
    kept_g  = top-keep_g channels of g by score   (equal per alignment block)
    model'  = remove_channels(model, kept)        (passes/prune/apply.py)
    model'' = recovery(model', model)             fusion: C[:, j] += lambda C[:, i];  lstsq: min |W x_p + b - y_o|^2

Before analysis, small constant subgraphs (e.g. exported static-padding arithmetic) are folded exactly, so the
dependency analysis sees constant Pad/Reshape/Slice operands (passes/prune/fold.py). The allocation and the
fidelity-floor / latency searches around one budget are in passes/prune/search.py.
"""
from __future__ import annotations

import functools
import itertools
import logging
import time
from dataclasses import dataclass

import numpy as np
import onnx

from edgec.core.executor import blas_threads
from edgec.passes.base import PassContext, PassResult, register_pass
from edgec.passes.floor import FloorSpec, OutputFloor
from edgec.passes.prune import allocate as alloc
from edgec.passes.prune import criteria as crit
from edgec.passes.prune.fold import fold_small_constants
from edgec.passes.prune.groups import memo_by_identity
from edgec.passes.prune.search import _allocate, _floor_search, _latency_search, _select
from edgec.core.errors import EdgecError
from edgec.core.graph import Graph, attr

log = logging.getLogger(__name__)

RECOVERIES = ("none", "fusion", "lstsq", "fusion+lstsq", "distill")


@dataclass(frozen=True)
class PruneOptions:
    # the budget: exactly one of
    target_macs: float | None = None
    target_params: float | None = None
    target_latency_ms: float | None = None
    strict_budget: bool = True  # False: an unreachable budget prunes to the closest reachable point (and says so)
    # which channels: criteria.py
    criterion: str = "recon"
    score_samples: int = 32
    taylor_temperature: float = 0.5
    # how many per group: allocate.py (+ the sensitivity scan, evaluate.py)
    allocation: str = "sensitivity"
    round_to: int = 8
    min_keep_ratio: float = 0.0
    protect_residual: bool = True
    fidelity_samples: int = 8
    sensitivity_ratios: tuple = (0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875)
    sensitivity_refit: bool = False
    candidate_eval: str = "masked"  # masked: mask feeds to one session per group (evaluate.py) | rebuild: build each

    ga_population: int = 12
    ga_generations: int = 8
    ga_bits: int = 4
    latency_iters: int = 4
    # recon criterion: fraction of the live channels the greedy OBS removes per joint step (criteria.obs_order;
    # 0: one channel per step, the plain greedy order)
    obs_batch: float = 0.03125
    # recovery after removal: recover.py (least squares, fusion), torchkit (fine-tuning)
    recovery: str = "lstsq"
    calib_samples: int = 64
    ridge: float = 0.3
    max_positions: int = 256
    residual_target: bool = True
    refit_scope: str = "consumers"
    lstsq_walk: bool = True  # least squares reads activations from a segment walk (walk.py); False: prefix runs

    # recovery "distill": least squares, then distillation toward the unpruned model on the fit inputs
    # (torchkit.prune_tools.distill_onnx; needs torch + onnx2torch): distill_steps Adam steps of distill_batch samples
    distill_steps: int = 150
    distill_batch: int = 8
    distill_lr: float = 1e-4
    finetune_epochs: int = 0
    finetune_lr: float = 1e-3
    # fidelity floor (passes/floor.py) vs the original on calibration samples: when the budget's model is below it,
    # bisect the budget toward 1.0 (floor_steps times) and keep the most pruned model that holds it
    min_top1_agreement: float | None = None
    min_cosine: float | None = None
    cosine_scope: str = "all"
    region_gate: str = "auto"  # auto | inputs | outputs (passes/floor.py)
    floor_samples: int = 16
    floor_steps: int = 4
    # under a recipe's fidelity policy (PassContext.fidelity) prune holds it on the validate split, keeping this
    # fraction of the allowed loss (1 - min_top1_agreement, 1 - min_cosine, max_accuracy_drop) for later passes
    fidelity_reserve: float = 0.5

    @property
    def floor_spec(self) -> FloorSpec:
        return FloorSpec(self.min_top1_agreement, None, self.min_cosine, self.cosine_scope, self.floor_samples,
                         self.region_gate, self.fidelity_reserve)

    def __post_init__(self):
        budgets = [b for b in (self.target_macs, self.target_params, self.target_latency_ms) if b is not None]
        if len(budgets) != 1:
            raise ValueError("exactly one of target_macs, target_params, target_latency_ms is required "
                             "(set the others to null, e.g. --set prune.target_macs=null)")
        for nm in ("target_macs", "target_params"):
            v = getattr(self, nm)
            if v is not None and not (isinstance(v, (int, float)) and 0.0 < float(v) <= 1.0):
                raise ValueError(f"{nm} must be a fraction in (0, 1], got {v!r}")
        if self.target_latency_ms is not None and not float(self.target_latency_ms) > 0:
            raise ValueError("target_latency_ms must be positive")
        if self.criterion not in crit.CRITERIA:
            raise ValueError(f"criterion must be one of {', '.join(crit.CRITERIA)}, got {self.criterion!r}")
        if self.allocation not in alloc.ALLOCATIONS:
            raise ValueError(f"allocation must be one of {', '.join(alloc.ALLOCATIONS)}, got {self.allocation!r}")
        if self.candidate_eval not in ("masked", "rebuild"):
            raise ValueError(f"candidate_eval must be masked or rebuild, got {self.candidate_eval!r}")
        if self.refit_scope not in ("consumers", "downstream"):
            raise ValueError(f"refit_scope must be consumers or downstream, got {self.refit_scope!r}")
        if self.recovery not in RECOVERIES:
            raise ValueError(f"recovery must be one of {', '.join(RECOVERIES)}, got {self.recovery!r}")
        if not isinstance(self.round_to, int) or self.round_to < 1:
            raise ValueError(f"round_to must be an integer >= 1, got {self.round_to!r}")
        self.floor_spec  # validates the floor options
        for nm in ("calib_samples", "score_samples", "fidelity_samples", "ga_population", "ga_generations", "ga_bits",
                   "max_positions", "latency_iters", "floor_steps", "distill_steps", "distill_batch"):
            if not isinstance(getattr(self, nm), int) or getattr(self, nm) < 1:
                raise ValueError(f"{nm} must be a positive integer, got {getattr(self, nm)!r}")
        if not isinstance(self.finetune_epochs, int) or self.finetune_epochs < 0:
            raise ValueError("finetune_epochs must be a non-negative integer")
        if self.ga_population < 2:
            raise ValueError("ga_population must be >= 2")
        if not 0.0 <= self.min_keep_ratio < 1.0:
            raise ValueError("min_keep_ratio must be in [0, 1)")
        if self.ridge < 0:
            raise ValueError("ridge must be >= 0")
        if not (isinstance(self.obs_batch, (int, float)) and 0.0 <= self.obs_batch <= 0.5):
            raise ValueError(f"obs_batch must be a fraction in [0, 0.5], got {self.obs_batch!r}")
        r = tuple(float(x) for x in self.sensitivity_ratios)
        if not r or any(not 0.0 < x < 1.0 for x in r):
            raise ValueError("sensitivity_ratios must be fractions in (0, 1)")
        object.__setattr__(self, "sensitivity_ratios", r)


def _blas_threads(ctx: PassContext):
    """numpy's BLAS at the compile's count while the pass runs (ctx.blas_threads: the same in every worker, see
    core.executor "Numeric threads"; else the evaluation budget ctx.threads): the pass's matrices are small, and
    a BLAS pool larger than the budget spins on a busy machine (2-4x the CPU time)."""
    return blas_threads(ctx.blas_threads or ctx.threads)


# ----------------------------------------------------------------------------- scoring
def score_groups(model, groups, criterion: str, ctx: PassContext, opts: PruneOptions) -> tuple[dict, dict, dict]:
    """({gid: scores (size,)}, {gid: note} (fallbacks), {gid: activation stats} (reused by fusion recovery))."""
    from edgec.passes.prune import graph as G

    notes: dict[int, str] = {}
    scores: dict[int, np.ndarray] = {}
    rng = ctx.rng("prune.random")
    need_acts = criterion in crit.ACTIVATION_CRITERIA or opts.recovery in ("fusion", "fusion+lstsq")
    acts = crit.activation_stats(model, groups, ctx.calib_batches(), opts.score_samples, ctx.threads) if need_acts else {}
    problems = {}
    if criterion == "recon":
        layers = {g.id: G.consumer_layers(model, g) for g in groups}
        problems = crit.recon_problems(model, groups, layers, ctx.calib_batches(), opts.score_samples,
                                       max_positions=opts.max_positions, seed=ctx.seed, threads=ctx.threads)
    taylor = {}
    if criterion == "taylor":
        from edgec.torchkit import prune_tools as torch_tools

        taylor = torch_tools.taylor_scores(model, groups, ctx, samples=opts.score_samples,
                                           temperature=opts.taylor_temperature)
    scorer = crit.SCORERS[criterion]
    for g in groups:
        prod = G.producer_weights(model, g)
        cons = G.consumer_weights(model, g)
        mats = prod + cons
        ev = crit.GroupEvidence(g.size, prod, cons, acts.get(g.id), problems.get(g.id), taylor.get(g.id),
                                functools.partial(G.bn_scales, model, g), rng, opts.ridge, opts.obs_batch)
        s, note = scorer(ev)
        if note:
            notes[g.id] = note
        if s is None:
            notes.setdefault(g.id, f"{criterion} unavailable for this group: l1")
            s = crit.l1_score(mats) if mats else np.ones(g.size)
        scores[g.id] = np.nan_to_num(np.asarray(s, np.float64), nan=0.0, posinf=1e30, neginf=-1e30)
    return scores, notes, acts


# ----------------------------------------------------------------------------- fidelity probe
from edgec.passes.prune.evaluate import FidelityProbe  # noqa: E402  (re-exported: tests and bench use it here)


# ----------------------------------------------------------------------------- the pass
def _candidates(groups, opts):
    """Prunable groups; with protect_residual, groups coupled by residual adds (several producers) are kept whole."""
    return [g for g in groups if g.prunable and g.size >= 2 and not (opts.protect_residual and len(g.producers) > 1)]


def _recover(model_pruned, model_ref, groups, groups_by_id, keep_idx, acts, ctx, opts, stats):
    from edgec.passes.prune import graph as G
    from edgec.passes.prune import recover as R

    layers = set()
    for gid in keep_idx:
        for L in G.consumer_layers(model_ref, groups_by_id[gid]):
            layers.add(L["node"])
    if opts.refit_scope == "downstream" and layers:
        # every linear layer from the first refit consumer on: later layers also absorb the accumulated error
        names = [n.name for n in model_ref.graph.node]
        first = min(names.index(nm) for nm in layers if nm in names)
        pruned_names = {n.name for n in model_pruned.graph.node}
        for n in model_ref.graph.node[first:]:
            if n.op_type in ("Conv", "Gemm", "MatMul") and n.name in pruned_names:
                layers.add(n.name)
    # which reference output channels each refit layer still produces
    outs: dict[str, list] = {}
    for g in groups:
        for r in g.producers + [o for o in g.others if o.role == "dw"]:
            outs.setdefault(r.node, []).append((g.id, r.offset, g.size))
    out_channels = {}
    ref = Graph(model_ref)
    for name in list(layers):
        parts = sorted(outs.get(name, []), key=lambda x: x[1])
        node = ref.node(name)
        w = ref.const(node.input[1]) if node is not None and len(node.input) > 1 else None
        n_out = None
        if w is not None:
            n_out = w.shape[0] if node.op_type == "Conv" or (node.op_type == "Gemm" and attr(node, "transB", 0)) \
                else w.shape[-1]
        if not parts or n_out is None or sum(p[2] for p in parts) != n_out:
            if any(p[0] in keep_idx for p in parts):
                layers.discard(name)
                stats.setdefault("lstsq_skipped", {})[name] = "output channels span untracked groups"
            continue
        if any(p[0] in keep_idx for p in parts):
            idx = [np.asarray(keep_idx.get(gid, np.arange(size))) + off for gid, off, size in parts]
            out_channels[name] = np.concatenate(idx)
    m = model_pruned
    if opts.recovery in ("lstsq", "fusion+lstsq", "distill") and layers:
        t0 = time.perf_counter()
        bar = ctx.progress.bar(len(layers), "prune: least-squares refit", unit="layer")
        m, st = R.lstsq_refit(m, model_ref, sorted(layers), ctx.calib_batches, samples=opts.calib_samples,
                              ridge=opts.ridge, max_positions=opts.max_positions,
                              residual_target=opts.residual_target, seed=ctx.seed, threads=ctx.threads,
                              out_channels=out_channels, progress=bar.tick, walk_segments=opts.lstsq_walk,
                              validate_feeds=ctx.validate_batches)  # ridge cross-validated on validate
        bar.close()
        stats["lstsq"] = {"seconds": round(time.perf_counter() - t0, 2), "layers": st}
    if opts.recovery == "distill":
        m = _distill(m, model_ref, ctx, opts, stats)
    return m


def _distill(m, model_ref, ctx, opts, stats):
    """Distillation of the pruned model toward the pass's input model on the fit samples (torchkit)."""
    try:
        from edgec.torchkit import prune_tools as torch_tools
    except ImportError as e:  # pragma: no cover - torch is an optional extra
        raise EdgecError(f"prune recovery 'distill' needs torch and onnx2torch: {e}") from None
    feeds = list(itertools.islice(ctx.calib_batches(), opts.calib_samples))
    bar = ctx.progress.bar(opts.distill_steps, "prune: distillation", unit="step")
    m, st = torch_tools.distill_onnx(m, model_ref, feeds, steps=opts.distill_steps, batch=opts.distill_batch,
                                     lr=opts.distill_lr, seed=ctx.seed, threads=ctx.threads, progress=bar.tick)
    bar.close()
    stats["distill"] = st
    return m


def _fuse(model, groups_by_id, keep_idx, acts, stats):
    """Seed-002 information fusion on the unpruned model's consumer columns (before removal)."""
    from edgec.passes.prune import graph as G
    from edgec.passes.prune import recover as R

    m = onnx.ModelProto()
    m.CopyFrom(model)
    fused = {}
    for gid, keep in keep_idx.items():
        g = groups_by_id[gid]
        prod = G.producer_weights(model, g)
        if not prod:
            fused[gid] = "no producer weights"
            continue
        plan = R.fusion_plan(np.concatenate(prod, 1), keep)
        means = acts[gid]["mean"] if gid in acts else None
        done = 0
        for L in G.consumer_layers(model, g):
            gm = Graph(m)
            lay, why = R.Layer.from_node(m, gm.node(L["node"]))
            pos = np.asarray(L["positions"]).reshape(g.size, -1)
            if lay is None or pos.shape[1] != 1 or (L["op"] == "Conv" and L.get("group", 1) != 1):
                continue
            pos = pos[:, 0]
            W = gm[lay.weight].copy()
            if lay.op == "Conv":
                C = W[:, pos].reshape(W.shape[0], len(pos), -1)  # (o, n, taps)
                C2 = C.transpose(0, 2, 1).reshape(-1, len(pos))
                C2n, _ = R.fuse_columns(C2, plan, None)
                _, db = R.fuse_columns(C.sum(2), plan, means)
                W[:, pos] = C2n.reshape(W.shape[0], -1, len(pos)).transpose(0, 2, 1).reshape(W[:, pos].shape)
            elif lay.op == "Gemm" and L.get("trans_b", 0):
                W[:, pos], db = R.fuse_columns(W[:, pos], plan, means)
            else:
                Wt, db = R.fuse_columns(W[pos].T, plan, means)
                W[pos] = Wt.T
            b = lay.bias_vector(m, W.shape[0]) if lay.bias else None
            if means is not None and (b is not None or lay.can_add_bias()):
                b = (np.zeros(len(db)) if b is None else b) + db
            Ws = [W.reshape(W.shape[0], -1)] if lay.op == "Conv" else [W.T if not (lay.op == "Gemm" and L.get("trans_b", 0)) else W]
            lay.write(m, Ws if lay.op != "Conv" else [W], b if means is not None else None)
            done += 1
        fused[gid] = {"pairs": len(plan), "consumers": done}
    stats["fusion"] = fused
    return m


def _prune_once(model, groups, ctx, opts, budget: alloc.Budget, scores, notes, acts, probe, cache=None):
    from edgec.passes.prune.graph import CostModel

    groups_by_id = {g.id: g for g in groups}
    prunable = _candidates(groups, opts)
    cm = CostModel(model, groups, ctx.input_shapes)
    bm, bp = max(cm.base_macs, 1), max(cm.base_params, 1)

    def cost(keep):
        m_, p_ = cm.costs(keep)
        return m_ / bm, p_ / bp

    def floor_cost(cands):
        return cost({g.id: alloc.round_keep(0, g.size, opts.round_to, g.align) for g in cands})

    unprotected = False
    if opts.protect_residual and not budget.ok(floor_cost(prunable)):
        # the budget cannot be met with residual-coupled groups intact: let them be pruned too
        prunable = [g for g in groups if g.prunable and g.size >= 2]
        unprotected = True
    if not prunable:
        raise EdgecError("no prunable channel groups in this model (see the analysis reasons)")
    relaxed = None
    if not budget.ok(floor_cost(prunable)) and not opts.strict_budget:
        reach = min(1.0, budget.value(floor_cost(prunable)) + 1e-6)
        relaxed = f"{budget.kind} budget {budget.target:g} unreachable; pruned to the closest reachable point {reach:.3f}"
        ctx.progress("prune: " + relaxed)
        budget = alloc.Budget(budget.kind, reach)
    if not budget.ok(floor_cost(prunable)):
        raise EdgecError(f"{budget.kind} budget {budget.target:g} is unreachable: pruning every prunable group to "
                         f"its minimum leaves {budget.value(floor_cost(prunable)):.3f} of the original")
    t0 = time.perf_counter()
    a = _allocate(model, prunable, groups, groups_by_id, scores, budget, cost, ctx, opts, probe, cache)
    t_alloc = time.perf_counter() - t0
    keep_idx = _select(groups_by_id, scores, a.keep)
    stats: dict = {"allocation_seconds": round(t_alloc, 2), "residual_groups_pruned": unprotected}
    if relaxed:
        stats["budget_relaxed"] = relaxed
    src = model
    if opts.recovery in ("fusion", "fusion+lstsq") and keep_idx:
        src = _fuse(model, groups_by_id, keep_idx, acts, stats)
    from edgec.passes.prune.apply import remove_channels

    pruned, rstats = remove_channels(src, keep_idx, groups)
    pruned = _recover(pruned, model, groups, groups_by_id, keep_idx, acts, ctx, opts, stats)
    return pruned, a, keep_idx, rstats, stats, (bm, bp)


def _close_postprocess(model, groups, input_shapes=None) -> dict | None:
    """Groups with a member in the decode / post-processing region (passes/regions.py) are not pruned."""
    from edgec.passes.prune.graph import node_names
    from edgec.passes.regions import find_postprocess

    post = find_postprocess(model, input_shapes=input_shapes)
    if not post.nodes:
        return None
    names = node_names(model.graph.node)
    inside = {names[i] for i in post.indices}
    closed = []
    for g in groups:
        if g.prunable and any(r.node in inside for r in g.producers + g.consumers + g.others):
            g.prunable, g.reason = False, "member of the decode / post-processing region"
            closed.append(g.id)
    return {**post.summary(model), "groups_closed": closed}


@register_pass("prune", options=PruneOptions)
def prune(model: onnx.ModelProto, ctx: PassContext, opts: PruneOptions) -> PassResult:
    """keep_g = allocation(score(g), budget); remove the rest; refit consumers: min |W x_pruned + b - y_original|^2."""
    from edgec.passes.prune.graph import analyze

    t_start = time.perf_counter()
    model, folded = fold_small_constants(model)
    with memo_by_identity(), _blas_threads(ctx):
        groups = analyze(model)
        post = _close_postprocess(model, groups, ctx.input_shapes)
        prunable = _candidates(groups, opts)
        if not prunable and not opts.strict_budget:
            reasons = sorted({g.reason for g in groups if not g.prunable and g.reason})[:5]
            return PassResult(model, folded > 0 if isinstance(folded, int) else bool(folded),
                              {"skipped": "no prunable channel groups", "reasons": reasons, "groups": len(groups),
                               **({"postprocess": post} if post else {})})
        ctx.progress(f"prune: {len(prunable)}/{len(groups)} prunable groups; scoring by {opts.criterion}")
        scores, notes, acts = score_groups(model, [g for g in groups if g.prunable and g.size >= 2], opts.criterion,
                                           ctx, opts)
        probe = FidelityProbe(model, ctx, opts.fidelity_samples) if opts.allocation in ("sensitivity", "ga") else None
        lat = {}
        if opts.target_latency_ms is not None:
            pruned, a, keep_idx, rstats, stats, base = _latency_search(_prune_once, model, groups, ctx, opts, scores,
                                                                        notes, acts, probe, lat)
        else:
            budget = alloc.Budget("macs", float(opts.target_macs)) if opts.target_macs is not None \
                else alloc.Budget("params", float(opts.target_params))
            cache: dict = {}
            pruned, a, keep_idx, rstats, stats, base = _prune_once(model, groups, ctx, opts, budget, scores, notes,
                                                                   acts, probe, cache)
            floor = OutputFloor(ctx, opts.floor_spec, model) if keep_idx else None  # nothing removed: nothing to hold
            if floor is not None and floor.active:
                res, info = _floor_search(_prune_once, model, groups, ctx, opts, budget, scores, notes, acts, probe,
                                          cache, floor, (pruned, a, keep_idx, rstats, stats, base))
                if res is None:
                    return PassResult(model, False, {"skipped": "no pruned model holds the fidelity floor",
                                                     "floor": info})
                pruned, a, keep_idx, rstats, stats, base = res
                stats["floor"] = info
    if opts.finetune_epochs > 0:
        from edgec.torchkit import prune_tools as torch_tools

        pruned, ft = torch_tools.finetune_onnx(pruned, model, ctx, epochs=opts.finetune_epochs, lr=opts.finetune_lr)
        stats["finetune"] = ft
    out_stats = _pass_stats(pruned, groups, ctx, opts, (a, keep_idx, rstats, stats, base), scores, notes, folded,
                            t_start)
    if lat:
        out_stats["latency_search"] = lat
    if post:
        out_stats["postprocess"] = post
    return PassResult(pruned, modified=bool(keep_idx), stats=out_stats)


def _pass_stats(pruned, groups, ctx, opts, res, scores, notes, folded, t_start) -> dict:
    """The pass's stats: per-group rows (with score summaries), what was skipped and why, the pruned model's MACs and
    params ratios, the allocation and the stats of the prune run. res = (allocation, keep_idx, rstats, stats, base)."""
    from edgec.passes.costs import count_costs

    a, keep_idx, rstats, stats, (bm, bp) = res
    after = count_costs(pruned, ctx.input_shapes)
    rows = []
    for r in rstats["groups"]:
        s = scores.get(r["id"])
        row = dict(r)
        if s is not None:
            kept = keep_idx.get(r["id"])
            row["score"] = {"min": float(np.min(s)), "median": float(np.median(s)), "max": float(np.max(s)),
                            "kept_min": float(np.min(s[kept])) if kept is not None else float(np.min(s))}
        if r["id"] in notes:
            row["score_note"] = notes[r["id"]]
        rows.append(row)
    out_stats = {
        "criterion": opts.criterion, "allocation": opts.allocation, "recovery": opts.recovery,
        "round_to": opts.round_to, "constants_folded": folded,
        "groups": rows, "groups_pruned": rstats["groups_pruned"], "groups_prunable": rstats["groups_prunable"],
        "channels_removed": rstats["channels_removed"],
        "skipped": {**{str(r["id"]): r["reason"] for r in rstats["groups"] if not r["prunable"]},
                    **{str(g.id): "protected: coupled across a residual add (protect_residual)" for g in groups
                       if g.prunable and opts.protect_residual and len(g.producers) > 1}},
        "macs_ratio": round(after.macs / bm, 4) if after.macs else round(a.cost[0], 4),
        "params_ratio": round(after.params / bp, 4),
        "model_macs_ratio": round(a.cost[0], 4), "model_params_ratio": round(a.cost[1], 4),
        "allocation_details": a.details, "keep": {str(k): int(v) for k, v in a.keep.items()},
        "seconds": round(time.perf_counter() - t_start, 2), **stats,
    }
    notes_al = {str(g.id): n for g in _candidates(groups, opts)
                if (n := alloc.alignment_note(g.size, opts.round_to, g.align))}
    if notes_al:
        out_stats["alignment_notes"] = notes_al
    return out_stats
