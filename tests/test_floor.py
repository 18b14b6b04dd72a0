"""Fidelity floors (passes/floor.py) in the prune and quant passes: per-output cosine on dense models, scope rules,
and the guarantee that a pass never returns a model below its floor (checked with an independent cosine in ORT)."""
from __future__ import annotations

import numpy as np
import onnx
import pytest

import edgec.testing.prune_models as pm
from edgec.passes.base import PassContext, get_pass, make_options
from edgec.passes.floor import FloorSpec, OutputFloor
from edgec.core.errors import EdgecError
from edgec.core.onnx_io import ort_session


def dense_model(seed: int = 0) -> onnx.ModelProto:
    """Conv chain whose output is a feature map (1, 16, 8, 8): no classifier head."""
    b = pm.GraphBuilder(seed=seed)
    x = b.act(b.conv("input", 3, 16), "relu")
    x = b.act(b.conv(x, 16, 24), "relu")
    x = b.act(b.conv(x, 24, 24), "relu")
    m = b.build(b.conv(x, 24, 16), out_shape=(1, 16, 8, 8))
    ident = m.graph.node[-1]  # the builder's final Identity: let the last Conv write the graph output (as cleanup does)
    assert ident.op_type == "Identity"
    m.graph.node[-2].output[0] = ident.output[0]
    m.graph.node.remove(ident)
    onnx.checker.check_model(m)
    return m


def _feeds(n: int, seed: int = 3) -> list[dict]:
    r = np.random.default_rng(seed)
    return [{"input": r.standard_normal((1, 3, 8, 8)).astype(np.float32)} for _ in range(n)]


def _ctx(m, n=16):
    feeds = _feeds(n)
    return PassContext(calib_batches=lambda: iter(feeds), reference_model=m)


def _cosine(a: onnx.ModelProto, b: onnx.ModelProto, feeds) -> float:
    """Mean over samples of <ya, yb> / (|ya| |yb|), both run with ORT graph optimizations off."""
    sa, sb = ort_session(a, optimize=False), ort_session(b, optimize=False)
    vals = []
    for f in feeds:
        x, y = sa.run(None, f)[0].ravel().astype(np.float64), sb.run(None, f)[0].ravel().astype(np.float64)
        vals.append(x @ y / (np.linalg.norm(x) * np.linalg.norm(y)))
    return float(np.mean(vals))


def _run(name, m, ctx, **opts):
    spec = get_pass(name)
    return spec.fn(m, ctx, make_options(spec, opts))


@pytest.mark.parametrize("scope,model,expect", [
    ("dense_models", "classifier", []), ("all", "classifier", ["output"]),
    ("dense_models", "dense", ["output"]), ("all", "dense", ["output"])])
def test_cosine_scope(scope, model, expect):
    m = pm.chain() if model == "classifier" else dense_model()
    fl = OutputFloor(_ctx(m), FloorSpec(min_cosine=0.99, cosine_scope=scope, samples=4), m)
    assert fl.cosine_outputs == expect
    assert fl.active == bool(expect)
    meas = fl.measure(m)
    assert all(abs(c - 1.0) < 1e-6 for c in meas.get("cosine", {}).values())
    assert fl.ok(meas)


def test_agreement_floor_needs_a_classifier_output():
    m = dense_model()
    with pytest.raises(EdgecError, match="classifier output"):
        OutputFloor(_ctx(m), FloorSpec(min_top1_agreement=0.5, samples=4), m)
    with pytest.raises(ValueError, match="cosine_scope"):
        FloorSpec(min_cosine=0.9, cosine_scope="some")


def test_prune_relaxes_budget_to_hold_cosine_floor():
    m = dense_model()
    ctx = _ctx(m)
    common = dict(target_macs=0.3, criterion="l1", allocation="uniform", recovery="none", round_to=1,
                  protect_residual=False)
    free = _run("prune", m, ctx, **common)
    held = _run("prune", m, ctx, **common, min_cosine=0.98, floor_samples=8, floor_steps=5)
    feeds = _feeds(8)
    assert _cosine(free.model, m, feeds) < 0.98        # the budget alone breaks the floor ...
    fl = held.stats["floor"]
    assert fl["met"] and not fl["history"][0]["ok"] and "relaxed" in fl["note"]
    f_max = 0.3
    for _ in range(5):
        f_max = 0.5 * (f_max + 1.0)
    assert fl["history"][1]["target"] == round(f_max, 4) and fl["history"][1]["ok"]  # probed first, then bisected
    assert len(fl["history"]) <= 1 + 1 + 5
    assert _cosine(held.model, m, feeds) >= 0.98 - 1e-6  # ... the floor holds (same samples, optimizations off)
    assert free.stats["macs_ratio"] < held.stats["macs_ratio"] < 1.0  # and it still removes channels


def test_prune_floor_unreachable_returns_input():
    m = dense_model()
    res = _run("prune", m, _ctx(m), target_macs=0.3, criterion="l1", allocation="uniform", recovery="none",
               round_to=1, min_cosine=1.0, floor_samples=4, floor_steps=2)
    assert not res.modified and res.model is m and res.stats["floor"]["met"] is False
    # one prune at the least aggressive bisection point (0.3 -> 0.65 -> 0.825) decides it: no full bisection
    hist = res.stats["floor"]["history"]
    assert [h["target"] for h in hist] == [0.3, 0.825] and "no point holds it" in hist[-1]["note"]


def test_quant_cosine_floor_bisects_promotions(tmp_path):
    m = dense_model()
    ctx = _ctx(m, n=24)
    ctx.cache_dir = str(tmp_path)
    common = dict(target_bits_per_weight=2.5, calib_samples=16, sensitivity_samples=8, pareto_points=3)
    free = _run("quant", m, ctx, **common)
    held = _run("quant", m, ctx, **common, min_cosine=0.999, floor_samples=24)
    feeds = _feeds(24)
    assert _cosine(free.model, m, feeds) < 0.999
    fl = held.stats["floor"]
    assert fl["met"] and fl["promotions"] >= 1 and fl["cosine_outputs"] == ["output"]
    # bisection over the promotion sequence: about log2(steps) evaluations, never one per promotion
    n_layers = len(held.stats["bits"])
    assert fl["evaluations"] <= int(np.ceil(np.log2(3 * n_layers + 1))) + 2
    assert _cosine(held.model, m, feeds) >= 0.999 - 1e-6
    assert any(b != 32 for b in held.stats["bits"].values())


@pytest.mark.parametrize("quantize_outputs", [False, True])
def test_quantize_outputs_lets_the_output_layer_run_int8(tmp_path, quantize_outputs):
    """A Conv writing a graph output has no int8 kernel unless the output gets Q/DQ (the DQ keeps its name)."""
    from edgec.targets.ort_latency import OrtLatencyProbe

    m = dense_model()
    ctx = _ctx(m, n=16)
    ctx.cache_dir = str(tmp_path)
    ctx.target_probe = OrtLatencyProbe(1, str(tmp_path), runs=3)
    r = _run("quant", m, ctx, calib_samples=16, quantize_outputs=quantize_outputs)
    last = [n for n in m.graph.node if n.op_type == "Conv"][-1]
    last_layer = next(l for l in r.stats["bits"] if l in (last.name, last.output[0]))
    assert [o.name for o in r.model.graph.output] == ["output"]
    producer = next(n for n in r.model.graph.node if "output" in n.output)
    if quantize_outputs:
        assert r.stats["bits"][last_layer] == 8 and producer.op_type == "DequantizeLinear"
        assert r.stats["effective_precision"][last_layer].startswith("int8")
        assert "kept_fp32_no_int8_kernel" not in r.stats
    else:
        assert r.stats["bits"][last_layer] == 32 and producer.op_type == "Conv"
        assert r.stats["kept_fp32_no_int8_kernel"] == [last_layer]
    assert _cosine(r.model, m, _feeds(16)) >= 0.999
    assert sum(1 for n in r.model.graph.node if n.op_type == "QuantizeLinear") == 4 + int(quantize_outputs)


def test_quantize_outputs_leaves_classifier_logits_float(tmp_path):
    """[N, C] outputs are exempt: the Gemm writing the logits stays fp32 even with quantize_outputs."""
    m = pm.chain()
    ident = m.graph.node[-1]
    m.graph.node[-2].output[0] = ident.output[0]
    m.graph.node.remove(ident)
    ctx = _ctx(m)
    ctx.cache_dir = str(tmp_path)
    r = _run("quant", m, ctx, calib_samples=16, quantize_outputs=True, kernel_check=False)
    r0 = _run("quant", m, ctx, calib_samples=16, quantize_outputs=False, kernel_check=False)
    producer = next(n for n in r.model.graph.node if "output" in n.output)
    assert producer.op_type == "Gemm"
    assert pm.op_counts(r.model) == pm.op_counts(r0.model)


def test_prune_fidelity_probe_uses_cosine_on_dense_outputs():
    """The allocation probe scores a dense output by cosine (not a softmax over the flattened map)."""
    from edgec.passes.prune.prune_pass import FidelityProbe

    m = dense_model()
    ctx = _ctx(m, n=8)
    probe = FidelityProbe(m, ctx, 8)
    assert abs(probe(m) - 1.0) < 1e-9
    other = dense_model(seed=1)
    assert abs(probe(other) - _cosine(other, m, _feeds(8))) < 1e-5


def test_prune_fidelity_probe_reads_the_head_behind_topk():
    from edgec.passes.prune.prune_pass import FidelityProbe
    from edgec.calib.activations import with_outputs
    from edgec.passes.regions import tap_tensors
    from tests.test_regions import _topk_detector

    m = _topk_detector()
    r = np.random.default_rng(1)
    feeds = [{"x": r.standard_normal((1, 3, 8, 8)).astype(np.float32)} for _ in range(8)]
    ctx = PassContext(calib_batches=lambda: iter(feeds), reference_model=m)
    probe = FidelityProbe(m, ctx, 8)
    assert probe.taps == [("flatten", 0)] and abs(probe(m) - 1.0) < 1e-9
    w = next(t for t in m.graph.initializer if t.name == "w2")
    cand = onnx.ModelProto()
    cand.CopyFrom(m)
    arr = onnx.numpy_helper.to_array(w).copy()
    arr[0] = 0  # one head channel gone
    next(t for t in cand.graph.initializer if t.name == "w2").CopyFrom(onnx.numpy_helper.from_array(arr, "w2"))
    sa, sr = (ort_session(with_outputs(x, tap_tensors(x, probe.taps)), optimize=False) for x in (cand, m))
    direct = np.mean([
        (lambda a, b: a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))(
            sa.run(["head"], f)[0].ravel().astype(np.float64), sr.run(["head"], f)[0].ravel().astype(np.float64))
        for f in feeds])
    assert abs(probe(cand) - direct) < 1e-5 and direct < 0.999


@pytest.mark.parametrize("z", [0.0, 1.0, 2.0])
def test_standard_error_margin_on_agreement_accuracy_and_cosine(z):
    """The gate compares a - z sqrt(a(1-a)/n), the paired drop 100((b-f) + z sqrt(b+f))/n and mean cosine - z sem
    with the thresholds: recomputed here from ORT outputs (optimizations off) of the reference and a noisy copy."""
    m = pm.chain()
    n = 48
    feeds = _feeds(n, seed=5)
    ref_s = ort_session(m, optimize=False)
    ref = np.concatenate([ref_s.run(None, f)[0] for f in feeds])
    labels = ref.argmax(1).copy()
    labels[::3] = (labels[::3] + 1) % ref.shape[1]  # the reference is right on 2/3 of the samples
    cand = next(c for c in (pm.noisy_copy(m, s) for s in (0.05, 0.1, 0.2, 0.4, 0.8))
                if 0.6 < (np.concatenate([ort_session(c, optimize=False).run(None, f)[0] for f in feeds]).argmax(1)
                          == ref.argmax(1)).mean() < 1.0)
    out = np.concatenate([ort_session(cand, optimize=False).run(None, f)[0] for f in feeds])
    a = float((out.argmax(1) == ref.argmax(1)).mean())
    ok, rok = out.argmax(1) == labels, ref.argmax(1) == labels
    b, f = int((rok & ~ok).sum()), int((ok & ~rok).sum())
    cos = (out * ref).sum(1) / (np.linalg.norm(out, axis=1) * np.linalg.norm(ref, axis=1))
    assert 0 < a < 1 and b + f > 0  # the thresholds below then lie strictly between estimate and bound

    ctx = PassContext(calib_batches=lambda: iter(feeds), validate_batches=lambda: iter(feeds), validate_labels=labels,
                      reference_model=m)
    spec = FloorSpec(min_top1_agreement=0.5, max_accuracy_drop=100.0, min_cosine=-1.0, cosine_scope="all",
                     samples=n, standard_errors=z)
    fl = OutputFloor(ctx, spec, m)
    meas = fl.measure(cand)
    assert meas["top1_agreement"] == pytest.approx(a, abs=1e-12)
    bound_a = a - z * np.sqrt(a * (1 - a) / n)
    bound_d = 100 * ((b - f) + z * np.sqrt(b + f)) / n
    bound_c = cos.mean() - z * cos.std(ddof=1) / np.sqrt(n)
    if z:
        assert meas["top1_agreement_bound"] == pytest.approx(bound_a, abs=1e-6)
        assert meas["accuracy_drop_bound"] == pytest.approx(bound_d, abs=1e-6)
        assert meas["cosine_bound"]["output"] == pytest.approx(bound_c, abs=1e-5)
    else:
        assert "top1_agreement_bound" not in meas and "accuracy_drop_bound" not in meas
    # a threshold between the bound and the estimate separates z = 0 from z > 0; the unchanged model passes at any z
    for key, thr in (("min_top1_agreement", a - 0.5 * np.sqrt(a * (1 - a) / n)),
                     ("max_accuracy_drop", 100 * ((b - f) + 0.5 * np.sqrt(b + f)) / n),
                     ("min_cosine", cos.mean() - 0.5 * cos.std(ddof=1) / np.sqrt(n))):
        probe = {"min_top1_agreement": 0.0, "max_accuracy_drop": 100.0, "min_cosine": -1.0, key: float(thr)}
        fl2 = OutputFloor(ctx, FloorSpec(**probe, cosine_scope="all", samples=n, standard_errors=z), m)
        assert fl2.ok(fl2.measure(cand)) == (z == 0.0), key
        assert fl2.ok(fl2.measure(m)), key


def test_cluster_robust_margin_formula():
    """cluster_se: 0 without groups; for flips concentrated in one of 6 groups, the CR1 formula (checked by hand)
    and well above the i.i.d. standard error; for flips spread one per group, below it."""
    from edgec.passes.floor import cluster_se

    n, G = 120, 6
    groups = np.arange(n) % G
    x = np.ones(n)
    conc = x.copy()
    conc[np.flatnonzero(groups == 0)[:8]] = 0.0
    spread = x.copy()
    spread[[np.flatnonzero(groups == g)[0] for g in range(G)] + [np.flatnonzero(groups == 0)[1],
                                                                 np.flatnonzero(groups == 1)[1]]] = 0.0
    assert cluster_se(conc, None) == 0.0 and cluster_se(conc, np.zeros(n)) == 0.0
    for v in (conc, spread):
        a = v.mean()
        r = v - a
        by_hand = np.sqrt(G / (G - 1) * sum(r[groups == g].sum() ** 2 for g in range(G))) / n
        assert cluster_se(v, groups) == pytest.approx(by_hand, rel=1e-12)
    iid = np.sqrt(conc.mean() * (1 - conc.mean()) / n)
    assert cluster_se(conc, groups) > 1.5 * iid
    assert cluster_se(spread, groups) < iid


@pytest.mark.parametrize("concentrated", [True, False])
def test_floor_margin_uses_validate_groups(concentrated):
    """The floor's agreement bound is a - z max(iid se, cluster se) over ctx.validate_groups: the same flips give a
    lower bound when they share one group than when each group has its own."""
    from edgec.passes.floor import cluster_se

    m = pm.chain()
    n = 48
    feeds = _feeds(n, seed=5)
    ref_s = ort_session(m, optimize=False)
    ref = np.concatenate([ref_s.run(None, f)[0] for f in feeds])
    cand = next(c for c in (pm.noisy_copy(m, s) for s in (0.05, 0.1, 0.2, 0.4, 0.8))
                if 0.6 < (np.concatenate([ort_session(c, optimize=False).run(None, f)[0] for f in feeds]).argmax(1)
                          == ref.argmax(1)).mean() < 1.0)
    out = np.concatenate([ort_session(cand, optimize=False).run(None, f)[0] for f in feeds])
    kept = (out.argmax(1) == ref.argmax(1)).astype(float)
    flips = np.flatnonzero(kept == 0)
    groups = np.arange(n) % 4 + 1
    if concentrated:
        groups[flips] = 0  # every flip from one source
    else:
        groups[flips] = np.arange(len(flips)) % 4 + 1
    ctx = PassContext(calib_batches=lambda: iter(feeds), validate_batches=lambda: iter(feeds), reference_model=m,
                      validate_groups=groups)
    fl = OutputFloor(ctx, FloorSpec(min_top1_agreement=0.5, cosine_scope="all", samples=n, standard_errors=1.0), m)
    meas = fl.measure(cand)
    a = kept.mean()
    se = max(np.sqrt(a * (1 - a) / n), cluster_se(kept, groups))
    assert meas["top1_agreement_bound"] == pytest.approx(a - se, abs=1e-6)
    assert meas["groups"] == len(np.unique(groups))
    if concentrated:
        assert cluster_se(kept, groups) > np.sqrt(a * (1 - a) / n)


@pytest.mark.parametrize("clause", ["top1", "cosine"])
def test_fit_veto_refuses_what_misses_the_floor_on_fitted_samples(clause):
    """Validate samples on which a noisy copy keeps every prediction (or its cosine), fit samples on which it does
    not: without the veto the floor holds; with fit_veto the plain fit figure (recomputed here from ORT outputs,
    optimizations off) is below the threshold and the floor refuses; the unchanged model passes either way."""
    m = pm.chain() if clause == "top1" else dense_model()
    pool = _feeds(160, seed=11)
    ref_s = ort_session(m, optimize=False)
    ref = [ref_s.run(None, f)[0] for f in pool]

    def scores(c):
        sess = ort_session(c, optimize=False)
        out = [sess.run(None, f)[0] for f in pool]
        if clause == "top1":
            return np.array([float(o.argmax() == r.argmax()) for o, r in zip(out, ref)])
        return np.array([float(o.ravel() @ r.ravel() / np.linalg.norm(o) / np.linalg.norm(r)) for o, r in zip(out, ref)])

    cand, score = next((c, sc) for c in (pm.noisy_copy(m, s) for s in (0.05, 0.1, 0.2, 0.4, 0.5, 0.6, 0.7))
                       for sc in [scores(c)] if (12 <= sc.sum() <= len(pool) - 12 if clause == "top1" else
                                                   np.sort(sc)[:12].mean() < np.sort(sc)[-12:].min() - 0.005))
    order = np.argsort(-score)
    val = [pool[i] for i in order[:12]]
    fit = [pool[i] for i in order[-12:]]
    fit_score = float(score[order[-12:]].mean())
    thr = float(score[order[:12]].min()) - 1e-3  # validate holds it on every sample
    assert fit_score < thr
    ctx = PassContext(calib_batches=lambda: iter(fit), validate_batches=lambda: iter(val), reference_model=m)
    kw = {"min_top1_agreement": thr} if clause == "top1" else {"min_cosine": thr}
    for veto in (False, True):
        fl = OutputFloor(ctx, FloorSpec(**kw, cosine_scope="all", samples=12, fit_veto=veto), m)
        meas = fl.measure(cand)
        assert fl.ok(meas) == (not veto)
        assert fl.ok(fl.measure(m))
        if veto:
            got = meas["fit"]["top1_agreement"] if clause == "top1" else meas["fit"]["cosine"]["output"]
            assert got == pytest.approx(fit_score, abs=1e-5) and meas["fit"]["samples"] == 12
        else:
            assert "fit" not in meas


def test_fit_veto_is_a_policy_key():
    """`fit_veto` is read from a recipe's fidelity block (and --set fidelity.fit_veto), rejected when not a bool."""
    from edgec.pipeline.recipe import load_recipe

    rec = load_recipe("default")
    assert rec.floor_spec(64).fit_veto is True
    with pytest.raises(ValueError):
        FloorSpec(min_top1_agreement=0.9, fit_veto="yes")
