"""Channel importance criteria (passes/prune/criteria.py): array-level math and streamed activation statistics."""
import numpy as np
import pytest

from edgec.passes.prune import criteria as C


def test_l1_l2_rank_by_magnitude_and_normalise_members():
    rng = np.random.default_rng(0)
    A = rng.standard_normal((6, 20))
    A[2] *= 0.01
    B = rng.standard_normal((6, 5)) * 1000.0  # a member of a very different scale
    B[2] *= 0.01
    for f in (C.l1_score, C.l2_score):
        s = f([A, B])
        assert np.argmin(s) == 2
        # member normalisation: scaling one member does not change the scores
        np.testing.assert_allclose(f([A, B * 7.0]), s, rtol=1e-12)


def test_apoz_and_entropy():
    np.testing.assert_allclose(C.apoz_score(np.array([0.0, 0.5, 1.0])), [1.0, 0.5, 0.0])
    rng = np.random.default_rng(1)
    pooled = np.stack([np.full(50, 3.0), rng.standard_normal(50), rng.uniform(size=50)], 1)
    e = C.entropy_score(pooled, bins=8)
    assert e[0] == 0.0 and e[1] > 0.5 and e[2] > 0.5
    assert e[2] <= np.log(8) + 1e-9


def test_kl_marks_duplicated_filters_as_redundant():
    rng = np.random.default_rng(2)
    P = rng.standard_normal((8, 64))
    P[5] = P[1] * 2.0 + 1e-3 * rng.standard_normal(64)  # 1 and 5 are near copies
    s = C.kl_score(P, tau=0.1)
    assert set(np.argsort(s)[:2]) == {1, 5}


def _lstsq_err(X, Y, cols):
    """Relative error of the best affine fit of Y from X[:, cols] (plus a ones column)."""
    Xa = np.concatenate([X[:, cols], np.ones((len(X), 1))], 1)
    A = np.linalg.lstsq(Xa, Y, rcond=None)[0]
    return float(((Xa @ A - Y) ** 2).sum() / (Y ** 2).sum())


def test_obs_order_matches_direct_least_squares():
    rng = np.random.default_rng(3)
    n, o, rows = 6, 4, 400
    X = rng.standard_normal((rows, n))
    X[:, 4] = 2.0 * X[:, 1] - X[:, 0]  # channel 4 is redundant given 0 and 1
    W = rng.standard_normal((o, n))
    b = rng.standard_normal(o)
    Y = X @ W.T + b
    Xa = np.concatenate([X, np.ones((rows, 1))], 1)
    G = Xa.T @ Xa
    A = np.concatenate([W, b[:, None]], 1)
    tt = float((Y ** 2).sum())
    order, cum = C.obs_order([(G, A, tt, np.arange(n)[:, None])], n, ridge=1e-9)
    assert sorted(order.tolist()) == list(range(n))
    assert order[0] in (0, 1, 4)  # a channel of the dependent triple goes first, at ~zero cost
    assert cum[0] < 1e-6
    # cumulative errors equal the error of refitting the survivors directly
    for k in range(1, n - 1):
        alive = sorted(set(range(n)) - set(order[:k + 1].tolist()))
        assert cum[k] == pytest.approx(_lstsq_err(X, Y, alive), rel=1e-3, abs=1e-6)
    assert np.all(np.diff(cum[np.isfinite(cum)]) >= -1e-9)


@pytest.mark.parametrize("batch", [0.125, 0.25])
def test_obs_batched_steps_end_at_the_exact_refit_error(batch):
    """batch > 0: the cumulative error after each joint step equals the error of refitting the survivors directly
    (the joint update is exact OBS), it never decreases, and the greedy order's first half is kept here."""
    rng = np.random.default_rng(7)
    n, o, rows = 24, 5, 600
    X = rng.standard_normal((rows, n)) * rng.gamma(1.0, 1.0, n)
    W, b = rng.standard_normal((o, n)), rng.standard_normal(o)
    Y = X @ W.T + b
    Xa = np.concatenate([X, np.ones((rows, 1))], 1)
    prob = [(Xa.T @ Xa, np.concatenate([W, b[:, None]], 1), float((Y ** 2).sum()), np.arange(n)[:, None])]
    order, cum = C.obs_order(prob, n, ridge=1e-9, batch=batch)
    assert sorted(order.tolist()) == list(range(n))
    ends, live = [], n
    while live > 1:  # the step sizes obs_order takes: max(1, floor(batch * live)), at most live - 1
        live -= min(max(1, int(batch * live)), live - 1)
        ends.append(n - live - 1)
    assert any(e2 - e1 > 1 for e1, e2 in zip([-1] + ends, ends))  # some step removed several channels
    for e in ends[:-1]:
        alive = sorted(set(range(n)) - set(order[:e + 1].tolist()))
        assert cum[e] == pytest.approx(_lstsq_err(X, Y, alive), rel=1e-3, abs=1e-6)
    assert np.all(np.diff(cum[np.isfinite(cum)]) >= -1e-9)
    greedy, _ = C.obs_order(prob, n, ridge=1e-9)
    assert len(set(order[:n // 2]) & set(greedy[:n // 2])) >= n // 2 - 1


def test_obs_block_channels_with_taps():
    rng = np.random.default_rng(4)
    n, taps, rows = 4, 3, 300
    X = rng.standard_normal((rows, n * taps))
    W = rng.standard_normal((2, n * taps))
    W[:, 6:9] *= 1e-4  # channel 2's taps barely matter
    Y = X @ W.T
    Xa = np.concatenate([X, np.ones((rows, 1))], 1)
    A = np.concatenate([W, np.zeros((2, 1))], 1)
    s = C.recon_scores([(Xa.T @ Xa, A, float((Y ** 2).sum()), np.arange(n * taps).reshape(n, taps))], n)
    assert np.argmin(s) == 2


def test_actnorm_and_random():
    s = C.actnorm_score(np.array([1.0, 2.0, 0.0]), [np.array([[3.0, 4.0], [1.0, 0.0], [5.0, 5.0]])])
    np.testing.assert_allclose(s, [5.0, 2.0, 0.0])
    r1 = C.random_score(10, np.random.default_rng(5))
    r2 = C.random_score(10, np.random.default_rng(5))
    np.testing.assert_array_equal(r1, r2)


def test_activation_stats_stream_matches_direct():
    from edgec.calib.activations import stream_activations
    from edgec.passes.prune.graph import analyze
    from edgec.testing.prune_models import chain

    m = chain()
    groups = [g for g in analyze(m) if g.prunable]
    rng = np.random.default_rng(6)
    feeds = [{"input": rng.standard_normal((1, 3, 8, 8)).astype(np.float32)} for _ in range(5)]
    st = C.activation_stats(m, groups, iter(feeds), samples=5)
    for g in groups:
        acts = np.concatenate([a[g.stat_tensor] for a in stream_activations(m, [g.stat_tensor], feeds)], 0)
        x = acts[:, g.stat_offset:g.stat_offset + g.size]
        np.testing.assert_allclose(st[g.id]["mean_abs"], np.abs(x).mean(axis=(0, 2, 3)), rtol=1e-6)
        np.testing.assert_allclose(st[g.id]["apoz"], (x <= 0).mean(axis=(0, 2, 3)), rtol=1e-6)
        assert st[g.id]["pooled"].shape == (5, g.size)


def test_taylor_scores_zero_for_dead_channel():
    import onnx
    from onnx import numpy_helper

    from edgec.passes.base import PassContext
    from edgec.passes.prune.graph import analyze
    from edgec.torchkit.prune_tools import taylor_scores
    from edgec.testing.prune_models import chain

    m = chain()
    g = next(g for g in analyze(m) if g.prunable and g.producers and g.producers[0].op == "Conv")
    node = next(n for n in m.graph.node if n.name == g.producers[0].node)
    for i, t in enumerate(m.graph.initializer):  # kill channel 1 of the producer (weights and bias)
        if t.name in node.input[1:3]:
            a = numpy_helper.to_array(t).copy()
            a[1] = 0
            m.graph.initializer[i].CopyFrom(numpy_helper.from_array(a, t.name))
    rng = np.random.default_rng(7)
    feeds = [{"input": rng.standard_normal((1, 3, 8, 8)).astype(np.float32)} for _ in range(4)]
    ctx = PassContext(calib_batches=lambda: iter(feeds))
    s = taylor_scores(m, [g], ctx, samples=4)[g.id]
    assert s.shape == (g.size,) and s[1] == 0.0 and (s >= 0).all() and s.sum() > 0
    assert isinstance(m, onnx.ModelProto)


def _obs_reference(problems, n, ridge=1e-3):
    """Greedy structured OBS written plainly: every candidate block inverted on its own, full-size updates."""
    state = []
    for G, W, tt, idx in problems:
        d = G.shape[0]
        Hinv = np.linalg.inv(G + ridge * max(np.trace(G) / d, 1e-12) * np.eye(d))
        state.append([Hinv, np.asarray(W, np.float64).copy(), max(tt, 1e-30), np.asarray(idx).reshape(n, -1)])
    alive, order, cum, total = np.ones(n, bool), [], [], 0.0
    for _ in range(n - 1):
        cand = np.flatnonzero(alive)
        err = np.zeros(len(cand))
        for Hinv, W, tt, idx in state:
            for t, c in enumerate(cand):
                B = idx[c]
                err[t] += float(np.einsum("ij,ij->", W[:, B] @ np.linalg.pinv(Hinv[np.ix_(B, B)]), W[:, B])) / tt
        c = int(cand[int(np.argmin(err))])
        total += float(err.min())
        order.append(c)
        cum.append(total)
        alive[c] = False
        for s in state:
            Hinv, W, _, idx = s
            B = idx[c]
            Hb = np.linalg.pinv(Hinv[np.ix_(B, B)])
            W -= (W[:, B] @ Hb) @ Hinv[B, :]
            Hinv -= Hinv[:, B] @ Hb @ Hinv[B, :]
            W[:, B] = 0.0
    return np.asarray(order), np.asarray(cum)


@pytest.mark.parametrize("n,taps,consumers", [(90, 1, 2), (24, 9, 1), (16, 4, 2)])
def test_obs_order_matches_plain_greedy(n, taps, consumers):
    """The batched candidate errors and the compaction to live features choose the plain greedy OBS order."""
    rng = np.random.default_rng(n)
    probs = []
    for _ in range(consumers):
        d = n * taps + 1
        X = rng.standard_normal((3 * d, d))
        G, W = X.T @ X, rng.standard_normal((20, d))
        probs.append((G, W, float(np.einsum("ij,ij->", W, W @ G)), np.arange(n * taps).reshape(n, taps)))
    o_ref, c_ref = _obs_reference(probs, n)
    order, cum = C.obs_order(probs, n)
    np.testing.assert_array_equal(order[:-1], o_ref)
    np.testing.assert_allclose(cum[:-1], c_ref, rtol=1e-9)
