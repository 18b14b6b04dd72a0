"""One fidelity policy, gated on the validate split: a pass that meets it on the samples it fitted to but not on
validate must back off; quant without a budget promotes by measured sensitivity; the compile's last gate returns the
latest stage that meets the policy and says so; recipes carry the policy in one `fidelity:` block."""
from __future__ import annotations

import logging

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgec.core.errors import EdgecError
from edgec.core.onnx_io import ort_session
from edgec.passes.base import PassContext, get_pass, make_options
from edgec.passes.floor import FloorSpec, OutputFloor


def mlp(names=("l1", "l2", "l3"), hot: str | None = None, seed: int = 0) -> onnx.ModelProto:
    """x (1, 16) -> Gemm 32 -> Relu -> Gemm 32 -> Relu -> Gemm 10 (logits). `hot` (not the first layer): its input
    channel 0 is dead (the previous bias -100 before the Relu) and carries weights of 50 in every output channel, so
    int8 per-channel ranges round its live weights away: the sensitive layer."""
    r = np.random.default_rng(seed)
    dims = [16, 32, 32, 10]
    nodes, inits, x = [], [], "x"
    ws = [(r.standard_normal((dims[i], dims[i + 1])) / np.sqrt(dims[i])).astype(np.float32) for i in range(3)]
    bs = [(0.1 * r.standard_normal(dims[i + 1])).astype(np.float32) for i in range(3)]
    if hot is not None:
        k = names.index(hot)
        ws[k][0, :], bs[k - 1][0] = 50.0, -100.0
    for i, nm in enumerate(names):
        inits += [numpy_helper.from_array(ws[i], f"{nm}_w"), numpy_helper.from_array(bs[i], f"{nm}_b")]
        y = "logits" if i == len(names) - 1 else f"{nm}_y"
        nodes.append(helper.make_node("Gemm", [x, f"{nm}_w", f"{nm}_b"], [y], name=nm))
        if i < len(names) - 1:
            nodes.append(helper.make_node("Relu", [y], [f"{nm}_r"], name=f"{nm}_relu"))
            x = f"{nm}_r"
    g = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 10])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(m)
    return m


def _feeds(n, seed):
    r = np.random.default_rng(seed)
    return [{"x": r.standard_normal((1, 16)).astype(np.float32)} for _ in range(n)]


def _near_ties(m, n, seed) -> list[dict]:
    """Inputs on the decision boundary of the FP32 model (bisection between two inputs with different top-1, to a
    relative logit margin ~1e-6): any rounding flips about half of them."""
    s = ort_session(m, optimize=False)
    top = lambda x: int(s.run(None, {"x": x})[0].argmax())  # noqa: E731
    r = np.random.default_rng(seed)
    out = []
    while len(out) < n:
        a, b = (r.standard_normal((1, 16)).astype(np.float64) for _ in range(2))
        if top(a.astype(np.float32)) == top(b.astype(np.float32)):
            continue
        lo, hi = 0.0, 1.0
        for _ in range(40):
            mid = 0.5 * (lo + hi)
            x = ((1 - mid) * a + mid * b).astype(np.float32)
            lo, hi = (mid, hi) if top(x) == top(a.astype(np.float32)) else (lo, mid)
        out.append({"x": ((1 - lo) * a + lo * b).astype(np.float32)})
    return out


def _agreement(a, b, feeds) -> float:
    sa, sb = ort_session(a, optimize=True), ort_session(b, optimize=True)
    return float(np.mean([sa.run(None, f)[0].argmax() == sb.run(None, f)[0].argmax() for f in feeds]))


def _quant(m, ctx, **opts):
    spec = get_pass("quant")
    return spec.fn(m, ctx, make_options(spec, {"calib_samples": 32, "sensitivity_samples": 8, **opts}))


def test_pass_backs_off_when_fit_passes_but_validate_fails():
    m = mlp()
    fit, val = _feeds(48, 1), _near_ties(m, 24, 2)
    policy = FloorSpec(min_top1_agreement=0.9, samples=24)
    # gated on the samples it calibrated on, int8 everywhere holds the policy
    fit_only = _quant(m, PassContext(calib_batches=lambda: iter(fit), reference_model=m, fidelity=policy))
    assert fit_only.modified and fit_only.stats["floor"]["promotions"] == 0
    assert fit_only.stats["floor"]["measured_on"].startswith("fit")
    assert _agreement(fit_only.model, m, fit) >= 0.9
    assert _agreement(fit_only.model, m, val) < 0.9  # ...but not on data it never saw
    # gated on validate: the pass backs off (promotes layers) until the policy holds there
    ctx = PassContext(calib_batches=lambda: iter(fit), reference_model=m, fidelity=policy,
                      validate_batches=lambda: iter(val))
    held = _quant(m, ctx)
    fl = held.stats["floor"]
    assert fl["measured_on"] == "validate split" and fl["samples"] == 24 and fl["promotions"] > 0
    assert _agreement(held.model, m, val) >= 0.9  # independent check in ORT


def test_quant_without_budget_promotes_by_sensitivity():
    # names sorted the other way round from sensitivity: the old reverse-name order would promote z_out first
    m = mlp(names=("a_in", "m_hot", "z_out"), hot="m_hot")
    fit, val = _feeds(48, 1), _feeds(32, 5)
    ctx = PassContext(calib_batches=lambda: iter(fit), reference_model=m, validate_batches=lambda: iter(val),
                      fidelity=FloorSpec(min_cosine=0.99, cosine_scope="all", samples=32))
    r = _quant(m, ctx)
    sens = {l: d["8"] for l, d in r.stats["sensitivities"].items()}
    assert max(sens, key=sens.get) == "m_hot"
    assert r.stats["floor"]["promotions"] == 1 and r.stats["floor"]["met"]
    assert r.stats["bits"] == {"a_in": 8, "m_hot": 32, "z_out": 8}


class _Stage:
    def __init__(self, name):
        self.name = name


class _Result:
    def __init__(self, stages, models):
        self.stages, self.models, self.model = [_Stage(s) for s in stages], models, models[-1]


class _Recipe:
    fidelity = {"min_top1_agreement": 0.95}


@pytest.mark.parametrize("noise,expect", [(0.8, "cleanup"), (1e-4, "quant")])
def test_compile_returns_latest_stage_that_meets_policy(noise, expect, caplog):
    from edgec.pipeline.policy import enforce_policy

    m = mlp()
    lossy = onnx.ModelProto()
    lossy.CopyFrom(m)
    w = [i for i in lossy.graph.initializer if i.name == "l3_w"][0]
    a = numpy_helper.to_array(w)
    a = a + noise * np.abs(a).max() * np.random.default_rng(0).standard_normal(a.shape).astype(np.float32)
    w.CopyFrom(numpy_helper.from_array(a.astype(np.float32), "l3_w"))
    val = _feeds(64, 9)
    ctx = PassContext(calib_batches=lambda: iter(_feeds(8, 1)), reference_model=m, validate_batches=lambda: iter(val),
                      fidelity=FloorSpec(min_top1_agreement=0.95, samples=64))
    with caplog.at_level(logging.WARNING):
        out, rec = enforce_policy(_Result(["normalize", "cleanup", "quant"], [m, m, lossy]), ctx, _Recipe())
    assert rec["returned"] == expect and rec["met"]
    assert out is (m if expect == "cleanup" else lossy)
    assert _agreement(out, m, val) >= 0.95
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    if expect == "cleanup":
        assert len(warnings) == 1 and "\n" not in warnings[0] and "returning the output of pass 'cleanup'" in warnings[0]
        assert rec["tried"][0]["stage"] == "quant" and not rec["tried"][0]["met"]
    else:
        assert not warnings and "note" not in rec


def test_recipe_fidelity_block():
    from edgec.pipeline.recipe import load_recipe

    d = load_recipe("default")
    assert d.fidelity["min_top1_agreement"] >= 0.95 and d.fidelity["min_cosine"] >= 0.99
    assert load_recipe("fast").fidelity["min_top1_agreement"] < d.fidelity["min_top1_agreement"]
    spec = load_recipe("default", ["fidelity.min_top1_agreement=0.97"]).floor_spec(50)
    assert spec.min_top1_agreement == 0.97 and spec.samples == 50
    with pytest.raises(EdgecError, match="unknown fidelity key"):
        load_recipe("default", ["fidelity.min_top5=0.9"])
    with pytest.raises(EdgecError, match="bad fidelity policy"):
        load_recipe("default", ["fidelity.min_cosine=1.5"])
    with pytest.raises(EdgecError, match="belong in the recipe's fidelity"):
        load_recipe("default", ["quant.min_top1_agreement=0.5"])
    assert load_recipe("cleanup").floor_spec(10) is None


def test_prune_reserve_tightens_policy_for_earlier_passes():
    from edgec.passes.floor import policy_spec

    ctx = PassContext(calib_batches=lambda: iter([]), fidelity=FloorSpec(0.95, 1.0, {"a": 0.99, "b": 0.9}))
    s = policy_spec(ctx, FloorSpec(reserve=0.5))
    assert s.min_top1_agreement == pytest.approx(0.975) and s.max_accuracy_drop == pytest.approx(0.5)
    assert s.min_cosine == pytest.approx({"a": 0.995, "b": 0.95})
    assert policy_spec(ctx, FloorSpec()).min_top1_agreement == 0.95


def test_floor_reads_policy_and_validate_split():
    m = mlp()
    fit, val = _feeds(8, 1), _feeds(12, 2)
    ctx = PassContext(calib_batches=lambda: iter(fit), reference_model=m, validate_batches=lambda: iter(val),
                      fidelity=FloorSpec(min_top1_agreement=0.9, samples=100))
    fl = OutputFloor(ctx, FloorSpec(min_top1_agreement=0.1, samples=4), m)  # the pass's own knob is overridden
    assert fl.spec.min_top1_agreement == 0.9 and len(fl.feeds) == 12
    for a, b in zip(fl.feeds, val):
        np.testing.assert_array_equal(a["x"], b["x"])


def test_lstsq_ridge_cross_validated_on_validate():
    """Fit rows from a narrow subspace; the ridge chosen on validate reconstructs the validate split at least as
    well as any fixed candidate ridge, measured independently in ORT."""
    from edgec.passes.prune.recover import lstsq_refit

    ref = mlp()
    pruned = onnx.ModelProto()
    pruned.CopyFrom(ref)
    w = [i for i in pruned.graph.initializer if i.name == "l2_w"][0]
    a = numpy_helper.to_array(w).copy()
    a[:8] = 0.0  # as if 8 input channels were removed
    w.CopyFrom(numpy_helper.from_array(a, "l2_w"))
    r = np.random.default_rng(4)
    basis = r.standard_normal((3, 16)).astype(np.float32)
    fit = [{"x": (r.standard_normal((1, 3)).astype(np.float32) @ basis)} for _ in range(96)]
    val = _feeds(64, 8)

    def tap(m):  # expose l2's output
        m2 = onnx.ModelProto()
        m2.CopyFrom(m)
        m2.graph.output.append(helper.make_tensor_value_info("l2_y", TensorProto.FLOAT, [1, 32]))
        return m2

    def err(m):  # squared L2 of l2's output vs the reference on validate
        sm, sr = ort_session(tap(m), optimize=False), ort_session(tap(ref), optimize=False)
        e = [np.sum((sm.run(["l2_y"], f)[0] - sr.run(["l2_y"], f)[0]) ** 2) for f in val]
        return float(np.sum(e))

    fixed, _ = lstsq_refit(pruned, ref, ["l2"], lambda: iter(fit), samples=96, ridge=1e-3)
    cv, st = lstsq_refit(pruned, ref, ["l2"], lambda: iter(fit), samples=96, ridge=1e-3,
                         validate_feeds=lambda: iter(val))
    assert st["l2"]["ridge_cv"]["validate_rows"] == 64
    assert st["l2"]["ridge_cv"]["chosen"] in (1e-3, 1e-2, 1e-1, 1.0, 10.0, "none")
    assert err(cv) <= err(fixed) * (1 + 1e-6)  # the default ridge is one of the candidates
    for r_ in (10.0, 1.0):  # and so are these: none reconstructs validate better than the chosen one
        forced, _ = lstsq_refit(pruned, ref, ["l2"], lambda: iter(fit), samples=96, ridge=r_)
        assert err(cv) <= err(forced) * (1 + 1e-6)
