"""Runs a recipe's passes and checks the model after every one.

Each pass runs through its contract (passes/base.py run_pass): requires(model, ctx) before, a private copy when
it declares in_place, ensures(model) after; a broken contract stops the run with PassFailed like any pass error.

After each pass: the ONNX checker and strict shape inference pass; ONNX Runtime (graph optimizations off)
runs the model on calibration inputs; the error against the previous stage and against the original is
recorded. A pass declared exact must stay within tol = min(max(1e-4, 8 x noise), 1e-2) of its input
(max|y - y_prev| / max|y_prev|), where noise is this model's measured fp32 rounding drift (pipeline/exactness.py),
or the run stops with PassFailed naming the pass and those that ran before it. A lossy pass on a model already
quantized by another tool is refused (EdgecError, one line naming the ops found): edgec never quantizes twice.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np
import onnx

from edgec.passes.base import PassContext, get_pass, options_dict, run_pass
from edgec.passes.costs import count_costs
from edgec.core.errors import EdgecError, PassFailed
from edgec.core.executor import blas_threads
from edgec.core.fidelity import Comparator, max_rel
from edgec.core.onnx_io import check_model, ort_session, run_session
from edgec.core.progress import human, seconds
from edgec.pipeline.exactness import EXACT_RTOL, NOISE_K, exact_tolerance, noise_floor
from edgec.pipeline.recipe import Recipe

log = logging.getLogger(__name__)


@dataclass
class StageRecord:
    name: str
    exact: bool
    options: dict
    seconds: float
    modified: bool
    stats: dict
    error_vs_previous: float
    fidelity_vs_original: dict
    costs: dict
    nodes: int

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class RunResult:
    model: onnx.ModelProto
    stages: list[StageRecord] = field(default_factory=list)
    models: list[onnx.ModelProto] = field(default_factory=list)  # each stage's output (the compile's fidelity fallback)


def _outputs(model: onnx.ModelProto, feeds: list[dict]) -> list[list[np.ndarray]]:
    sess = ort_session(model, optimize=False)
    return [run_session(sess, f) for f in feeds]


def verify(model: onnx.ModelProto, feeds: list[dict], *, stage: str, ran: tuple[str, ...]) -> tuple[onnx.ModelProto, list]:
    """Checker + strict shape inference + an ORT run, as checks. Returns (the model as given, outputs per feed):
    the inferred copy is discarded, so value_info is never added behind a pass's back."""
    try:
        inferred = check_model(model)
        outs = _outputs(model, feeds)
    except EdgecError as e:
        raise PassFailed(stage, str(e), ran) from None
    for o in outs:
        for a in o:
            if np.issubdtype(a.dtype, np.floating) and not np.isfinite(a).all():
                raise PassFailed(stage, "model produces NaN/Inf on calibration inputs", ran)
    del inferred
    return model, outs


def run_recipe(model: onnx.ModelProto, recipe: Recipe, ctx: PassContext, *, verify_samples: int = 4) -> RunResult:
    feeds = []
    for i, f in enumerate(ctx.calib_batches()):
        if i >= verify_samples:
            break
        feeds.append(f)
    if not feeds:
        raise EdgecError("no calibration inputs available to verify passes")
    _, orig_outs = verify(model, feeds, stage="input", ran=())
    noise = noise_floor(model, feeds, orig_outs)
    tol = exact_tolerance(noise)
    log.info("exact passes: fp32 noise floor %.2e (ORT optimized vs not), tolerance %.2e", noise, tol)
    names = [o.name for o in model.graph.output]
    prev_outs = orig_outs
    result = RunResult(model)
    ran: list[str] = []
    if ctx.reference_model is None:
        ctx.reference_model = model
    only_exact = True  # while only exact passes ran, their output is the reference (same function, cleaned names)
    for step in recipe.steps:
        spec = get_pass(step.name)
        ctx.progress(f"pass {step.name} ...")
        if not spec.exact:
            _refuse_requantization(result.model, step.name)
        t0 = time.perf_counter()
        try:
            with blas_threads(ctx.blas_threads):  # one BLAS count for every pass (core.executor, "Numeric threads")
                res = run_pass(spec.impl, result.model, ctx, step.options)  # requires -> call -> ensures (passes/base.py)
        except EdgecError as e:
            raise PassFailed(step.name, str(e), tuple(ran)) from None
        except Exception as e:  # a bug or unsupported graph inside the pass
            log.debug("pass %s raised", step.name, exc_info=True)
            raise PassFailed(step.name, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", tuple(ran)) from None
        dt = time.perf_counter() - t0
        new_model, outs = verify(res.model, feeds, stage=step.name, ran=tuple(ran))
        err = max_rel(outs, prev_outs)
        if spec.exact and err > tol:
            raise PassFailed(step.name, f"declared exact but changed outputs by {err:.2e} relative (> {tol:.2g} = "
                             f"max({EXACT_RTOL:g}, {NOISE_K:g} x fp32 noise {noise:.1e}))", tuple(ran))
        _note_exactness_and_subgraphs(res.stats, spec.exact, tol, noise, res.model)
        comp = Comparator(names)
        for o, r in zip(outs, orig_outs):
            comp.update(o, r)
        costs = count_costs(new_model, ctx.input_shapes).as_dict()
        rec = StageRecord(step.name, spec.exact, options_dict(step.options), round(dt, 3), res.modified,
                          res.stats, err, comp.result()["summary"], costs, len(new_model.graph.node))
        result.stages.append(rec)
        log.info("pass %s done: %s, error vs previous %s, %s M MACs", step.name, seconds(dt), human(err),
                 human(round(costs["macs"] / 1e6, 1)))
        result.model = new_model
        result.models.append(new_model)
        prev_outs = outs
        ran.append(step.name)
        only_exact = only_exact and spec.exact
        if only_exact:
            ctx.reference_model = new_model
    return result


def _refuse_requantization(model: onnx.ModelProto, pass_name: str) -> None:
    """A model quantized by another tool is not pruned or quantized again (one line naming what was found)."""
    from edgec.passes.cleanup import describe_quantized, quantized_ops

    found = quantized_ops(model)
    if found:
        raise EdgecError(f"pass '{pass_name}' refused: the model is already quantized ({describe_quantized(found)}); "
                         f"edgec does not prune or quantize it again -- use --recipe cleanup, or give the float model")


def _note_exactness_and_subgraphs(stats: dict, exact: bool, tol: float, noise: float, model: onnx.ModelProto) -> None:
    """Record the exactness tolerance used, and, for a lossy pass, the layers inside If/Loop/Scan bodies it left
    float and unpruned (passes transform main-graph layers only)."""
    if exact:
        stats.setdefault("exact_tolerance", tol)
        stats.setdefault("fp32_noise_floor", noise)
        return
    layers = 0
    stack = [sg for n in model.graph.node for a in n.attribute for sg in ([a.g] if a.HasField("g") else []) + list(a.graphs)]
    while stack:
        g = stack.pop()
        for n in g.node:
            layers += n.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul")
            stack += [sg for a in n.attribute for sg in ([a.g] if a.HasField("g") else []) + list(a.graphs)]
    if layers:
        stats.setdefault("subgraph_layers_untouched", layers)
        stats.setdefault("subgraph_note", f"{layers} Conv/Gemm/MatMul layer(s) inside If/Loop/Scan bodies left float "
                                          f"and unpruned (only main-graph layers are transformed)")
