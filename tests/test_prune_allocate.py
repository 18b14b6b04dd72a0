"""Per-group ratio allocation (passes/prune/allocate.py) on synthetic cost models."""
import numpy as np
import pytest

from edgec.passes.prune import allocate as A

SIZES = {0: 64, 1: 128, 2: 32, 3: 96}
MACS_PER_CH = {0: 4.0, 1: 1.0, 2: 8.0, 3: 2.0}


def cost(keep):
    """Linear synthetic cost: (macs fraction, params fraction)."""
    tot = sum(SIZES[g] * MACS_PER_CH[g] for g in SIZES)
    m = sum(keep.get(g, SIZES[g]) * MACS_PER_CH[g] for g in SIZES)
    p = sum(keep.get(g, SIZES[g]) for g in SIZES) / sum(SIZES.values())
    return m / tot, p


@pytest.mark.parametrize("round_to", [1, 8])
def test_round_keep(round_to):
    for size in (3, 8, 12, 64, 100):
        for k in np.linspace(0, size + 3, 17):
            r = A.round_keep(k, size, round_to)
            assert 1 <= r <= size
            u = A.unit(size, round_to)
            assert r == size or r % u == 0
    assert A.round_keep(0.0, 64, 8) == 8
    assert A.round_keep(13, 64, 8, align=4) == 16
    assert A.round_keep(1, 6, 8, align=2) == 2  # group smaller than round_to: multiples of align


@pytest.mark.parametrize("target", [0.3, 0.5, 0.8])
def test_uniform_fits_budget(target):
    b = A.Budget("macs", target)
    a = A.uniform(SIZES, cost, b, round_to=8)
    assert a.cost[0] <= target + 1e-9
    assert a.cost[0] >= target - 0.1
    assert all(k % 8 == 0 for k in a.keep.values())


def test_global_threshold_prefers_high_scores():
    rng = np.random.default_rng(0)
    scores = {g: rng.uniform(size=n) + (10.0 if g == 1 else 0.0) for g, n in SIZES.items()}
    a = A.global_threshold(scores, cost, A.Budget("params", 0.5), round_to=1, normalize=False)
    assert a.cost[1] <= 0.5 + 1e-9
    assert a.keep[1] == SIZES[1]  # the high-score group survives intact
    b = A.global_threshold(scores, cost, A.Budget("params", 0.5), round_to=1, normalize=True)
    assert b.keep[1] < SIZES[1]  # normalised: comparable groups


def test_knee_and_adaptive():
    rng = np.random.default_rng(1)
    e = np.concatenate([rng.uniform(0, 0.02, 800), rng.uniform(0.5, 1.0, 200)])
    r, t = A.knee_ratio(e)
    assert 0.15 <= r <= 0.3
    elems = {g: rng.uniform(size=(n, 9)) * (1.0 if g != 2 else 0.0) for g, n in SIZES.items()}
    elems[2][:4] = 1.0  # group 2 has few effective kernels -> small knee ratio
    a = A.adaptive(elems, cost, A.Budget("macs", 0.6), round_to=1)
    assert a.cost[0] <= 0.6 + 1e-9
    assert a.keep[2] / SIZES[2] < a.keep[0] / SIZES[0]


def test_sensitivity_protects_sensitive_groups():
    curves = {g: {0.25: 0.9, 0.5: 0.5, 0.75: 0.2} if g == 3 else {0.25: 0.02, 0.5: 0.01, 0.75: 0.005}
              for g in SIZES}
    a = A.sensitivity(curves, SIZES, cost, A.Budget("macs", 0.6), round_to=8)
    assert a.cost[0] <= 0.6 + 1e-9
    assert a.keep[3] == SIZES[3]
    assert min(a.keep[g] / SIZES[g] for g in (0, 1, 2)) < 1.0


def test_ga_operators():
    rng = np.random.default_rng(2)
    lv = rng.integers(0, 16, size=7)
    np.testing.assert_array_equal(A.decode(A.encode(lv, 4), 4), lv)
    a, b = rng.integers(0, 2, 28).astype(np.uint8), rng.integers(0, 2, 28).astype(np.uint8)
    c, d = A.crossover(a, b, rng)
    assert ((c == a) | (c == b)).all() and ((c + d) == (a + b)).all()
    np.testing.assert_array_equal(A.mutate(a, 0.0, rng), a)
    assert (A.mutate(a, 1.0, rng) == 1 - a).all()
    picks = A.roulette(np.array([0.0, 0.0, 10.0]), 200, rng)
    assert (picks == 2).mean() > 0.9


def _fid(keep):
    # group 2 is sensitive: fidelity falls quickly when it loses channels
    return float(np.exp(-8.0 * (1 - keep[2] / SIZES[2]) - 0.5 * sum(1 - keep[g] / SIZES[g] for g in (0, 1, 3))))


def test_ga_deterministic_and_beats_uniform():
    b = A.Budget("macs", 0.6)
    r1 = A.ga(SIZES, cost, b, _fid, np.random.default_rng(3), population=10, generations=6, round_to=1)
    r2 = A.ga(SIZES, cost, b, _fid, np.random.default_rng(3), population=10, generations=6, round_to=1)
    assert r1.keep == r2.keep
    assert r1.cost[0] <= 0.6 + 1e-9
    u = A.uniform(SIZES, cost, b, round_to=1)
    assert _fid(r1.keep) > _fid(u.keep)
    assert len(r1.details["history"]) == 6


def test_budget_validation():
    with pytest.raises(ValueError):
        A.Budget("latency", 0.5)
    with pytest.raises(ValueError):
        A.Budget("macs", 0.0)


def test_top_up_spends_leftover_budget():
    keep = {g: 8 for g in SIZES}
    b = A.Budget("macs", 0.5)
    k2, c, added = A.top_up(keep, SIZES, cost, b, 8, None, gain=lambda g, k, k2: 10.0 if g == 2 else 1.0)
    assert c[0] <= 0.5 + 1e-9 and added > 0
    assert k2[2] == SIZES[2]  # the group with the largest gain per cost is filled first
    # nothing left to add: one more unit anywhere would break the budget
    for g in SIZES:
        if k2[g] < SIZES[g]:
            assert not b.ok(cost({**k2, g: k2[g] + 8}))


def test_ga_batched_fitness_is_the_same_search():
    """fidelity_many (one call per generation: an executor map) searches exactly as one call per individual."""
    b = A.Budget("macs", 0.6)
    calls = []

    def many(keeps):
        calls.append(len(keeps))
        return [_fid(k) for k in keeps]

    r1 = A.ga(SIZES, cost, b, _fid, np.random.default_rng(5), population=10, generations=6, round_to=1)
    r2 = A.ga(SIZES, cost, b, _fid, np.random.default_rng(5), population=10, generations=6, round_to=1,
              fidelity_many=many)
    assert r1.keep == r2.keep and r1.details["history"] == r2.details["history"]
    assert len(calls) == 6 and sum(calls) == r2.details["evaluated"]
