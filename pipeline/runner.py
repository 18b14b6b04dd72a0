"""Runs a recipe's passes and checks the model after every one.

After each pass: the ONNX checker and strict shape inference pass; ONNX Runtime (graph optimizations off)
runs the model on calibration inputs; the error against the previous stage and against the original is
recorded. A pass declared exact must stay within EXACT_RTOL = 1e-4 (max|y - y_prev| / max|y_prev|) or the
run stops with PassFailed naming the pass and those that ran before it.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np
import onnx

from edgec.passes.base import PassContext, get_pass, options_dict
from edgec.passes.costs import count_costs
from edgec.core.errors import EdgecError, PassFailed
from edgec.core.fidelity import Comparator, max_rel
from edgec.core.onnx_io import check_model, ort_session, run_session
from edgec.pipeline.recipe import Recipe

log = logging.getLogger(__name__)
EXACT_RTOL = 1e-4


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


def _outputs(model: onnx.ModelProto, feeds: list[dict]) -> list[list[np.ndarray]]:
    sess = ort_session(model, optimize=False)
    return [run_session(sess, f) for f in feeds]


def verify(model: onnx.ModelProto, feeds: list[dict], *, stage: str, ran: tuple[str, ...]) -> tuple[onnx.ModelProto, list]:
    """Checker + shape inference + an ORT run. Returns (shape-inferred model, outputs per feed)."""
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
        t0 = time.perf_counter()
        try:
            res = spec.fn(result.model, ctx, step.options)
        except EdgecError as e:
            raise PassFailed(step.name, str(e), tuple(ran)) from None
        except Exception as e:  # a bug or unsupported graph inside the pass
            log.debug("pass %s raised", step.name, exc_info=True)
            raise PassFailed(step.name, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", tuple(ran)) from None
        dt = time.perf_counter() - t0
        new_model, outs = verify(res.model, feeds, stage=step.name, ran=tuple(ran))
        err = max_rel(outs, prev_outs)
        if spec.exact and err > EXACT_RTOL:
            raise PassFailed(step.name, f"declared exact but changed outputs by {err:.2e} relative (> {EXACT_RTOL:g})", tuple(ran))
        comp = Comparator(names)
        for o, r in zip(outs, orig_outs):
            comp.update(o, r)
        costs = count_costs(new_model, ctx.input_shapes).as_dict()
        rec = StageRecord(step.name, spec.exact, options_dict(step.options), round(dt, 3), res.modified,
                          res.stats, err, comp.result()["summary"], costs, len(new_model.graph.node))
        result.stages.append(rec)
        log.info("pass %-16s %6.2fs  err_vs_prev=%.2e  macs=%d", step.name, dt, err, costs["macs"])
        result.model = new_model
        prev_outs = outs
        ran.append(step.name)
        only_exact = only_exact and spec.exact
        if only_exact:
            ctx.reference_model = new_model
    return result
