"""Distillation recovery (prune `recovery: distill`, torchkit.prune_tools.distill_onnx): least squares, then
fine-tuning the pruned ONNX model toward the unpruned one on unlabeled fit inputs, written back into the ONNX
initializers. Checked independently in ORT (optimizations off): the distillation objective on the fit samples goes
down against least squares alone, and the graph (ops, shapes) is the one least squares returned."""
from __future__ import annotations

import numpy as np
import onnx
import pytest

import edgec.testing.prune_models as pm
from edgec.core.onnx_io import ort_session
from edgec.passes.base import PassContext, get_pass, make_options

pytest.importorskip("onnx2torch")


def _kl(ref: onnx.ModelProto, cand: onnx.ModelProto, feeds, T: float = 2.0) -> float:
    """Mean over samples of KL(softmax(r/T) || softmax(c/T))."""
    sr, sc = ort_session(ref, optimize=False), ort_session(cand, optimize=False)
    vals = []
    for f in feeds:
        r = sr.run(None, f)[0].astype(np.float64).ravel() / T
        c = sc.run(None, f)[0].astype(np.float64).ravel() / T
        p = np.exp(r - r.max()); p /= p.sum()
        lq = c - c.max() - np.log(np.exp(c - c.max()).sum())
        vals.append(float((p * (np.log(p) - lq)).sum()))
    return float(np.mean(vals))


def _prune(m, feeds, recovery, **extra):
    spec = get_pass("prune")
    ctx = PassContext(calib_batches=lambda: iter(feeds), reference_model=m, seed=0)
    opts = dict(target_macs=0.5, criterion="l1", allocation="uniform", round_to=1, recovery=recovery,
                calib_samples=len(feeds), **extra)
    return spec.fn(m, ctx, make_options(spec, opts))


@pytest.mark.parametrize("build", [pm.chain, pm.residual], ids=["chain", "residual"])
def test_distill_lowers_the_distillation_loss_after_least_squares(build):
    m = build()
    r = np.random.default_rng(0)
    shape = [d.dim_value or 1 for d in m.graph.input[0].type.tensor_type.shape.dim]
    feeds = [{m.graph.input[0].name: r.standard_normal(shape).astype(np.float32)} for _ in range(32)]
    ls = _prune(m, feeds, "lstsq")
    ds = _prune(m, feeds, "distill", distill_steps=60, distill_batch=4, distill_lr=3e-3)
    st = ds.stats["distill"]
    assert st["parameters_written"] > 0 and st["steps"] == 60
    assert st["loss_last"] < st["loss_first"]
    assert pm.op_counts(ds.model) == pm.op_counts(ls.model)  # same graph: only weights moved
    k_ls, k_ds = _kl(m, ls.model, feeds), _kl(m, ds.model, feeds)
    assert k_ds < 0.9 * k_ls, (k_ls, k_ds)
    onnx.checker.check_model(ds.model)


def test_distill_options_are_checked():
    spec = get_pass("prune")
    from edgec.core.errors import EdgecError

    with pytest.raises(EdgecError, match="distill_steps"):
        make_options(spec, dict(target_macs=0.5, recovery="distill", distill_steps=0))
