"""Recovery without retraining (passes/prune/recover.py) and the registered `prune` pass on small graphs."""
import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from edgec.passes.prune import recover as R
from edgec.core.onnx_io import ort_session


def _conv_model(cin, cout, k, stride, pad, dil):
    rng = np.random.default_rng(0)
    W = rng.standard_normal((cout, cin, k, k)).astype(np.float32)
    node = helper.make_node("Conv", ["x", "W"], ["y"], kernel_shape=[k, k], strides=[stride] * 2, pads=[pad] * 4,
                            dilations=[dil] * 2)
    g = helper.make_graph([node], "c", [helper.make_tensor_value_info("x", 1, (1, cin, 9, 11))],
                          [helper.make_tensor_value_info("y", 1, None)], [numpy_helper.from_array(W, "W")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), W


@pytest.mark.parametrize("k,stride,pad,dil", [(1, 1, 0, 1), (3, 1, 1, 1), (3, 2, 1, 1), (3, 1, 2, 2), (5, 2, 2, 1)])
def test_conv_patches_reproduce_conv(k, stride, pad, dil):
    m, W = _conv_model(4, 5, k, stride, pad, dil)
    x = np.random.default_rng(1).standard_normal((1, 4, 9, 11)).astype(np.float32)
    y = ort_session(m).run(None, {"x": x})[0]
    P = R.conv_patches(x[0], (k, k), (stride, stride), (pad,) * 4, (dil, dil))
    np.testing.assert_allclose((P @ W.reshape(5, -1).T).T.reshape(y.shape), y, rtol=1e-4, atol=1e-4)
    pos = np.array([0, 3, 7])
    np.testing.assert_allclose(R.conv_patches(x[0], (k, k), (stride, stride), (pad,) * 4, (dil, dil), pos), P[pos])


@pytest.mark.parametrize("bias", [True, False])
def test_gram_solve_equals_lstsq(bias):
    rng = np.random.default_rng(2)
    X, T = rng.standard_normal((300, 7)), rng.standard_normal((300, 3))
    acc = R.GramAccumulator(7, 3, bias)
    for i in range(0, 300, 50):  # streamed in chunks
        acc.update(X[i:i + 50], T[i:i + 50])
    W, b, info = acc.solve(np.zeros((3, 7)), None, ridge=0.0)
    Xa = np.concatenate([X, np.ones((300, 1))], 1) if bias else X
    ref = np.linalg.lstsq(Xa, T, rcond=None)[0]
    np.testing.assert_allclose(W, ref[:7].T, rtol=1e-8, atol=1e-10)
    if bias:
        np.testing.assert_allclose(b, ref[7], rtol=1e-8, atol=1e-10)
    direct = float(((Xa @ ref - T) ** 2).sum() / (T ** 2).sum())
    assert info["err_after"] == pytest.approx(direct, rel=1e-6)
    # ridge pulls toward W0
    W0 = rng.standard_normal((3, 7))
    Wr, _, _ = acc.solve(W0, None, ridge=1e6)
    np.testing.assert_allclose(Wr, W0, atol=1e-3)


def _dup_chain(kind="conv"):
    """conv(3->6) relu, channel 5 an exact copy of channel 2; then a consumer (3x3 conv or GAP->Gemm)."""
    from edgec.testing.prune_models import GraphBuilder

    b = GraphBuilder(seed=3)
    x = b.act(b.conv("input", 3, 6), "relu")
    W = numpy_helper.to_array(b.inits[-2]).copy()
    B = numpy_helper.to_array(b.inits[-1]).copy()
    W[5], B[5] = W[2], B[2]
    b.inits[-2].CopyFrom(numpy_helper.from_array(W, b.inits[-2].name))
    b.inits[-1].CopyFrom(numpy_helper.from_array(B, b.inits[-1].name))
    if kind == "conv":
        x = b.act(b.conv(x, 6, 8), "relu")
        return b.build(b.head(x, 8))
    return b.build(b.head(x, 6))


def _feeds(n, seed=4):
    rng = np.random.default_rng(seed)
    return [{"input": rng.standard_normal((1, 3, 8, 8)).astype(np.float32)} for _ in range(n)]


def _max_rel(a, b, feeds):
    sa, sb = ort_session(a), ort_session(b)
    ya = np.concatenate([sa.run(None, f)[0] for f in feeds])
    yb = np.concatenate([sb.run(None, f)[0] for f in feeds])
    return float(np.abs(ya - yb).max() / np.abs(yb).max())


def _remove(m, drop):
    from edgec.passes.prune.apply import remove_channels
    from edgec.passes.prune.graph import analyze

    gs = analyze(m)
    g = next(g for g in gs if g.prunable and g.size == 6)
    keep = np.array([c for c in range(6) if c not in drop])
    return remove_channels(m, {g.id: keep}, gs)[0], g


@pytest.mark.parametrize("kind", ["conv", "gemm"])
def test_lstsq_recovers_duplicate_channel_exactly(kind):
    m = _dup_chain(kind)
    pruned, g = _remove(m, {5})
    feeds = _feeds(12)
    assert _max_rel(pruned, m, feeds) > 1e-2  # removal alone hurts
    from edgec.passes.prune.graph import consumer_layers

    layers = [L["node"] for L in consumer_layers(m, g)]
    fixed, st = R.lstsq_refit(pruned, m, layers, lambda: iter(feeds), samples=12, ridge=1e-9,
                              min_rows_factor=0.0 if kind == "gemm" else 2.0)
    assert all("skipped" not in v for v in st.values()), st
    assert _max_rel(fixed, m, _feeds(6, seed=9)) <= 1e-4  # exact on held-out inputs
    onnx.checker.check_model(fixed)


def test_lstsq_reduces_error_and_adds_bias():
    from edgec.testing.prune_models import chain

    m = chain(bias=False)
    from edgec.passes.prune.apply import remove_channels
    from edgec.passes.prune.graph import analyze, consumer_layers

    gs = analyze(m)
    g = next(g for g in gs if g.prunable and g.size == 12)
    pruned = remove_channels(m, {g.id: np.arange(0, 12, 2)}, gs)[0]
    feeds = _feeds(24)
    layers = [L["node"] for L in consumer_layers(m, g)]
    fixed, st = R.lstsq_refit(pruned, m, layers, lambda: iter(feeds), samples=24)
    v = st[layers[0]]
    assert v["bias"] and v["rel_err_after"] < v["rel_err_before"]
    node = next(n for n in fixed.graph.node if n.name == layers[0])
    assert len(node.input) == 3 and node.input[2]
    held = _feeds(8, seed=11)
    assert _max_rel(fixed, m, held) < _max_rel(pruned, m, held)


def test_fusion_folds_duplicate_exactly():
    plan = R.fusion_plan(np.array([[1.0, 0.0], [0.0, 1.0], [2.0, 0.0]]), np.array([0, 1]))
    assert [(i, j) for i, j, _ in plan] == [(2, 0)] and plan[0][2] == pytest.approx(2.0)
    Cn, db = R.fuse_columns(np.array([[1.0, 2.0, 3.0]]), plan, means=np.array([1.0, 0.0, 2.0]))
    np.testing.assert_allclose(Cn, [[7.0, 2.0, 3.0]])
    np.testing.assert_allclose(db, [0.0], atol=1e-9)


def test_truncated_keeps_only_needed_nodes():
    from edgec.testing.prune_models import chain

    m = chain()
    first = m.graph.node[0].output[0]
    t = R.truncated(m, [first])
    assert len(t.graph.node) == 1 and [o.name for o in t.graph.output] == [first]


# ----------------------------------------------------------------------------- the registered pass
def _ctx(n=16):
    from edgec.passes.base import PassContext

    feeds = _feeds(n)
    return PassContext(calib_batches=lambda: iter(feeds))


def _run(m, **opts):
    from edgec.passes.base import get_pass, make_options

    spec = get_pass("prune")
    return spec.fn(m, _ctx(), make_options(spec, opts))


@pytest.mark.parametrize("builder", ["chain", "depthwise", "residual", "concat", "split"])
@pytest.mark.parametrize("recovery", ["none", "lstsq"])
def test_pass_meets_budget_and_runs(builder, recovery):
    from edgec.testing import prune_models
    from edgec.passes.costs import count_costs

    m = getattr(prune_models, builder)()
    res = _run(m, target_macs=0.7, round_to=1, recovery=recovery, allocation="uniform", criterion="l1",
               protect_residual=False)
    c0, c1 = count_costs(m), count_costs(res.model)
    assert c1.macs <= 0.7 * c0.macs * 1.001
    assert res.stats["macs_ratio"] <= 0.701
    onnx.checker.check_model(res.model)
    y = ort_session(res.model).run(None, _feeds(1)[0])[0]
    assert y.shape == (1, 10) and np.isfinite(y).all()
    assert res.stats["groups"] and "allocation_details" in res.stats


@pytest.mark.parametrize("criterion", ["l1", "l2", "bn_scale", "apoz", "entropy", "kl", "actnorm", "recon", "random"])
def test_pass_every_criterion(criterion):
    from edgec.testing.prune_models import chain

    res = _run(chain(), target_params=0.6, round_to=2, criterion=criterion, allocation="global", recovery="lstsq")
    assert res.stats["params_ratio"] <= 0.6 + 1e-6
    assert res.stats["criterion"] == criterion


@pytest.mark.parametrize("allocation", ["adaptive", "sensitivity", "ga"])
def test_pass_allocations(allocation):
    from edgec.testing.prune_models import chain

    res = _run(chain(), target_macs=0.6, round_to=1, criterion="l1", allocation=allocation, recovery="fusion+lstsq",
               ga_population=4, ga_generations=2, fidelity_samples=2)
    assert res.stats["macs_ratio"] <= 0.6 + 1e-6
    assert res.stats["allocation"] == allocation


def test_options_validation():
    from edgec.passes.prune.prune_pass import PruneOptions

    with pytest.raises(ValueError, match="exactly one"):
        PruneOptions()
    with pytest.raises(ValueError, match="exactly one"):
        PruneOptions(target_macs=0.5, target_params=0.5)
    with pytest.raises(ValueError):
        PruneOptions(target_macs=1.5)
    with pytest.raises(ValueError):
        PruneOptions(target_macs=0.5, criterion="magic")
    with pytest.raises(ValueError):
        PruneOptions(target_macs=0.5, round_to=0)
    with pytest.raises(ValueError):
        PruneOptions(target_macs=0.5, recovery="pray")
    assert PruneOptions(target_macs=0.5, sensitivity_ratios=[0.5]).sensitivity_ratios == (0.5,)


def test_latency_budget_uses_probe():
    from edgec.passes.base import PassContext, get_pass, make_options
    from edgec.passes.costs import count_costs
    from edgec.testing.prune_models import chain

    m = chain()
    base = count_costs(m).macs
    feeds = _feeds(8)
    ctx = PassContext(calib_batches=lambda: iter(feeds), latency_probe=lambda mm: 10.0 * count_costs(mm).macs / base)
    spec = get_pass("prune")
    res = spec.fn(m, ctx, make_options(spec, {"target_latency_ms": 6.0, "round_to": 1, "allocation": "uniform",
                                              "criterion": "l1"}))
    assert 10.0 * count_costs(res.model).macs / base <= 6.0
    assert res.stats["latency_search"]["steps"]


def test_prune_recipe_runs_with_overrides():
    from edgec.pipeline.recipe import load_recipe
    from edgec.pipeline.runner import run_recipe
    from edgec.testing.prune_models import residual

    r = load_recipe("prune", ["prune.target_macs=null", "prune.target_params=0.7", "prune.criterion=l2",
                              "prune.allocation=global", "prune.round_to=1", "prune.recovery=fusion+lstsq"])
    assert [s.name for s in r.steps] == ["normalize", "cleanup", "prune"]
    res = run_recipe(residual(), r, _ctx())
    st = res.stages[-1]
    assert st.name == "prune" and st.stats["params_ratio"] <= 0.7 + 1e-6
    assert st.stats["criterion"] == "l2" and st.stats["recovery"] == "fusion+lstsq"


def test_lstsq_privatises_a_shared_bias():
    from edgec.testing.prune_models import GraphBuilder

    b = GraphBuilder(seed=5)
    x = b.act(b.conv("input", 3, 8), "relu")
    x = b.act(b.conv(x, 8, 8), "relu")
    m = b.build(b.head(x, 8))
    c1, c2 = [n for n in m.graph.node if n.op_type == "Conv"]
    c2.input[2] = c1.input[2]  # one bias initializer shared by both convs (as deduplicating cleanups produce)
    ref = onnx.ModelProto()
    ref.CopyFrom(m)
    feeds = _feeds(16)
    fixed, st = R.lstsq_refit(m, ref, [c2.name], lambda: iter(feeds), samples=16, ridge=1e-9)
    assert "skipped" not in st[c2.name], st
    n1 = next(n for n in fixed.graph.node if n.name == c1.name)
    n2 = next(n for n in fixed.graph.node if n.name == c2.name)
    assert n2.input[2] != n1.input[2] and n1.input[2] == c1.input[2]
    onnx.checker.check_model(fixed)
    assert _max_rel(fixed, ref, _feeds(4, seed=12)) <= 1e-4  # refitting an unpruned layer reproduces it
