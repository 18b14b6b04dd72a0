"""Per-group keep counts under a budget (fractions of the original MACs or params).

  uniform      keep_g = round(r * n_g), one r for all groups, the largest r that fits the budget
  global       keep_g = round(#{c : s_gc >= t}), s member-normalised, the lowest threshold t that fits
  adaptive     gradient-based adaptive threshold (Wang et al., Computer Engineering 2022): per group, grid-search
               element-importance thresholds t, R_g(t) = fraction of weights
               above t; the knee t* = argmax curvature |R''| / (1 + R'^2)^1.5 sets r_g = R_g(t*);
               keep_g = round(min(1, a * r_g) * n_g) with the largest a that fits
  sensitivity  per-layer pruning sensitivity (Li et al., Pruning Filters for Efficient ConvNets, ICLR 2017):
               d_g(r) = fidelity loss with group g alone kept at ratio r; choose r_g minimising
               sum_g d_g(r_g) + mu * cost_g(r_g), mu bisected to the budget
  ga           genetic-algorithm pruning-rate search (the ADMM + GA pruning patent, "an efficient pruning method
               for deep CNNs", CN 2021): per-group keep ratios binary-encoded (`bits` bits each), single-point
               crossover, bit-flip
               mutation, roulette selection on fitness f = fid + theta * (2 - macs/macs0 - params/params0);
               every decoded individual is scaled into the budget first. Deterministic for a given rng.

Rounding: a group's alignment is the least common multiple of every constraint on it, u = lcm(round_to, align)
(align: the grouped-conv block structure from the dependency analysis, graph.py). Kept counts are multiples of u,
never 0, at most n_g (n_g itself is always valid). When a grouped-conv group's u leaves no count below n_g, the
target's round_to yields and u = align (the nearest feasible counts); a group with no valid count below n_g is kept
whole (`alignment_note` says why).
"""
from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

log = logging.getLogger(__name__)

ALLOCATIONS = ("uniform", "global", "adaptive", "sensitivity", "ga")
CostFn = Callable[[dict[int, int]], tuple[float, float]]  # keep counts -> (macs fraction, params fraction)


@dataclass
class Budget:
    """`kind` in {'macs', 'params'}: the fraction of the original to stay under."""

    kind: str
    target: float

    def __post_init__(self):
        if self.kind not in ("macs", "params"):
            raise ValueError(f"budget kind must be macs or params, got {self.kind}")
        if not 0.0 < self.target <= 1.0:
            raise ValueError(f"budget target must be in (0, 1], got {self.target}")

    def value(self, cost: tuple[float, float]) -> float:
        return cost[0] if self.kind == "macs" else cost[1]

    def ok(self, cost: tuple[float, float]) -> bool:
        return self.value(cost) <= self.target + 1e-9


@dataclass
class Allocation:
    keep: dict[int, int]
    cost: tuple[float, float]
    details: dict = field(default_factory=dict)


def unit(size: int, round_to: int, align: int = 1) -> int:
    """The step of valid kept counts: lcm(round_to, align) when it fits in the group, else align. A grouped-conv
    group (align > 1) whose lcm grid has no count below its size takes multiples of align instead."""
    a = max(int(align), 1)
    u = math.lcm(max(int(round_to), 1), a)
    return u if u < size or (u == size and a == 1) else a


def alignment_note(size: int, round_to: int, align: int = 1) -> str | None:
    """Why a group's kept counts leave the lcm(round_to, align) grid or cannot go below its size; None otherwise."""
    a = max(int(align), 1)
    u = math.lcm(max(int(round_to), 1), a)
    if u < size:
        return None
    what = f"alignment lcm(round_to={round_to}, grouped-conv blocks={a}) = {u}"
    if a >= size or (u == size and a == 1):
        return f"{what} leaves no pruned count below its {size} channels: kept whole"
    return f"{what} leaves no pruned count below its {size} channels: kept counts are multiples of {a} " \
           f"(round_to relaxed)"


def round_keep(k: float, size: int, round_to: int = 8, align: int = 1) -> int:
    """Nearest multiple of the unit, clamped to [unit, size]; `size` itself is always allowed."""
    u = unit(size, round_to, align)
    if k >= size:
        return size
    r = int(np.floor(k / u + 0.5)) * u
    if r >= size:
        return size
    return max(r, min(u, size))


def _bisect(make: Callable[[float], dict[int, int]], cost: CostFn, budget: Budget, lo: float, hi: float,
            iters: int = 40) -> tuple[dict[int, int], tuple[float, float], float]:
    """Largest a in [lo, hi] with make(a) inside the budget (make must be monotone non-decreasing in a)."""
    best = make(lo)
    best_cost = cost(best)
    best_a = lo
    if not budget.ok(best_cost):
        return best, best_cost, lo
    k_hi = make(hi)
    c_hi = cost(k_hi)
    if budget.ok(c_hi):
        return k_hi, c_hi, hi
    a, b = lo, hi
    for _ in range(iters):
        mid = 0.5 * (a + b)
        k = make(mid)
        c = cost(k)
        if budget.ok(c):
            a, best, best_cost, best_a = mid, k, c, mid
        else:
            b = mid
        if b - a < 1e-6:
            break
    return best, best_cost, best_a


# ----------------------------------------------------------------------------- methods
def uniform(sizes: dict[int, int], cost: CostFn, budget: Budget, round_to: int = 8,
            aligns: dict[int, int] | None = None) -> Allocation:
    """keep_g = round(r * n_g) with the largest r in the budget."""
    aligns = aligns or {}

    def make(r):
        return {g: round_keep(r * n, n, round_to, aligns.get(g, 1)) for g, n in sizes.items()}

    keep, c, r = _bisect(make, cost, budget, 0.0, 1.0)
    return Allocation(keep, c, {"ratio": round(r, 4)})


def global_threshold(scores: dict[int, np.ndarray], cost: CostFn, budget: Budget, round_to: int = 8,
                     aligns: dict[int, int] | None = None, normalize: bool = True) -> Allocation:
    """keep_g = round(#{s_gc >= t}) with scores normalised by each group's mean (unless already comparable, e.g.
    relative reconstruction errors); lowest t in the budget."""
    aligns = aligns or {}
    norm = {g: _mean_norm(s) if normalize else np.asarray(s, np.float64) for g, s in scores.items()}
    allv = np.sort(np.concatenate(list(norm.values())))

    def make(a):  # a = fraction of all channels above the threshold
        if a >= 1.0:
            t = -np.inf
        else:
            t = allv[min(int((1.0 - a) * len(allv)), len(allv) - 1)]
        return {g: round_keep(float((s >= t).sum()), len(s), round_to, aligns.get(g, 1)) for g, s in norm.items()}

    keep, c, a = _bisect(make, cost, budget, 0.0, 1.0)
    return Allocation(keep, c, {"fraction_above_threshold": round(a, 4)})


def _mean_norm(s: np.ndarray) -> np.ndarray:
    s = np.asarray(s, np.float64)
    s = s - min(float(s.min()), 0.0)
    m = float(s.mean())
    return s / m if m > 0 else s


def knee_ratio(elem: np.ndarray, grid: int = 64) -> tuple[float, float]:
    """Adaptive threshold (Wang et al. 2022): R(t) = fraction of |elem| above t on a grid of t in [0, max];
    returns (R(t*), t*/max) at the
    maximum curvature |R''| / (1 + R'^2)^1.5 (t and R both on [0, 1])."""
    e = np.abs(np.asarray(elem, np.float64)).ravel()
    mx = float(e.max()) if e.size else 0.0
    if mx <= 0:
        return 1.0, 0.0
    t = np.linspace(0.0, 1.0, grid)
    R = np.array([(e > ti * mx).mean() for ti in t])
    d1 = np.gradient(R, t)
    d2 = np.gradient(d1, t)
    kappa = np.abs(d2) / (1.0 + d1 ** 2) ** 1.5
    kappa[0] = kappa[-1] = 0.0
    i = int(np.argmax(kappa))
    return float(max(R[i], 1e-3)), float(t[i])


def adaptive(elems: dict[int, np.ndarray], cost: CostFn, budget: Budget, round_to: int = 8,
             aligns: dict[int, int] | None = None, grid: int = 64) -> Allocation:
    """Per-group knee ratios r_g, then keep_g = round(min(1, a r_g) n_g) with the largest a in the budget."""
    aligns = aligns or {}
    ratios, trel = {}, {}
    for g, e in elems.items():
        ratios[g], trel[g] = knee_ratio(e, grid)
    sizes = {g: e.shape[0] for g, e in elems.items()}
    hi = 1.0 / max(min(ratios.values()), 1e-3) if ratios else 1.0

    def make(a):
        return {g: round_keep(min(1.0, a * ratios[g]) * n, n, round_to, aligns.get(g, 1)) for g, n in sizes.items()}

    keep, c, a = _bisect(make, cost, budget, 0.0, hi)
    return Allocation(keep, c, {"scale": round(a, 4), "knee_ratio": {str(g): round(r, 4) for g, r in ratios.items()},
                                "knee_threshold": {str(g): round(t, 4) for g, t in trel.items()}})


def sensitivity(curves: dict[int, dict[float, float]], sizes: dict[int, int], cost: CostFn, budget: Budget,
                round_to: int = 8, aligns: dict[int, int] | None = None) -> Allocation:
    """curves[g][r] = fidelity loss with only g kept at ratio r (r = 1 -> 0). Minimise sum loss + mu * cost."""
    aligns = aligns or {}
    opts: dict[int, list[tuple[int, float, float]]] = {}
    base = cost({})
    for g, cur in curves.items():
        n = sizes[g]
        pts = sorted(set(cur) | {1.0})
        rows = []
        for r in pts:
            k = round_keep(r * n, n, round_to, aligns.get(g, 1))
            loss = 0.0 if r >= 1.0 else max(float(cur[r]), 0.0)
            saved = budget.value(base) - budget.value(cost({g: k}))
            rows.append((k, loss, saved))
        opts[g] = rows

    def make(mu_inv):  # larger mu_inv -> cost matters less -> keep more; invert for monotonicity
        mu = 1.0 / max(mu_inv, 1e-12) - 1.0
        keep = {}
        for g, rows in opts.items():
            best = min(rows, key=lambda x: (x[1] - mu * x[2], -x[0]))
            keep[g] = best[0]
        return keep

    keep, c, a = _bisect(make, cost, budget, 1e-9, 1.0, iters=60)

    def loss_at(g, k):
        cur = curves[g]
        xs = sorted(set(cur) | {1.0})
        ys = [0.0 if x >= 1.0 else max(float(cur[x]), 0.0) for x in xs]
        return float(np.interp(k / sizes[g], xs, ys))

    keep, c, added = top_up(keep, sizes, cost, budget, round_to, aligns,
                            gain=lambda g, k, k2: loss_at(g, k) - loss_at(g, k2))
    return Allocation(keep, c, {"mu": round(1.0 / max(a, 1e-12) - 1.0, 6), "topped_up_channels": added,
                                "curves": {str(g): {str(r): round(v, 5) for r, v in cur.items()} for g, cur in curves.items()}})


def top_up(keep: dict[int, int], sizes: dict[int, int], cost: CostFn, budget: Budget, round_to: int,
           aligns: dict[int, int] | None, gain: Callable[[int, int, int], float]):
    """Spend leftover budget: repeatedly give one rounding unit back to the group with the largest gain(g, k, k+u)
    per unit of budget, while the budget holds. Returns (keep, cost, channels added)."""
    aligns = aligns or {}
    keep = dict(keep)
    c = cost(keep)
    added = 0
    base = budget.value(c)
    for _ in range(10000):
        best = None
        for g, k in keep.items():
            u = unit(sizes[g], round_to, aligns.get(g, 1))
            k2 = min(k + u, sizes[g])
            if k2 <= k:
                continue
            trial = dict(keep)
            trial[g] = k2
            c2 = cost(trial)
            if not budget.ok(c2):
                continue
            d = max(budget.value(c2) - base, 1e-12)
            score = gain(g, k, k2) / d
            if best is None or score > best[0]:
                best = (score, g, k2, c2)
        if best is None:
            break
        _, g, k2, c2 = best
        added += k2 - keep[g]
        keep[g] = k2
        c = c2
        base = budget.value(c2)
    return keep, c, added


# ------------------------------------------------------------ genetic algorithm (ADMM + GA pruning patent, CN 2021)
def encode(levels: np.ndarray, bits: int) -> np.ndarray:
    """Integer levels (n,) -> bit string (n * bits,), most significant bit first."""
    levels = np.asarray(levels, np.int64)
    return ((levels[:, None] >> np.arange(bits - 1, -1, -1)[None]) & 1).astype(np.uint8).ravel()


def decode(code: np.ndarray, bits: int) -> np.ndarray:
    c = np.asarray(code, np.int64).reshape(-1, bits)
    return (c << np.arange(bits - 1, -1, -1)[None]).sum(axis=1)


def crossover(a: np.ndarray, b: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Single-point crossover of two bit strings."""
    if len(a) < 2:
        return a.copy(), b.copy()
    p = int(rng.integers(1, len(a)))
    return np.concatenate([a[:p], b[p:]]), np.concatenate([b[:p], a[p:]])


def mutate(a: np.ndarray, rate: float, rng: np.random.Generator) -> np.ndarray:
    flip = rng.random(len(a)) < rate
    out = a.copy()
    out[flip] ^= 1
    return out


def roulette(fitness: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k indices drawn with probability proportional to fitness (shifted to be positive)."""
    f = np.asarray(fitness, np.float64)
    f = f - f.min() + 1e-6
    return rng.choice(len(f), size=k, replace=True, p=f / f.sum())


def ga(sizes: dict[int, int], cost: CostFn, budget: Budget, fidelity: Callable[[dict[int, int]], float],
       rng: np.random.Generator, *, population: int = 12, generations: int = 8, bits: int = 4,
       min_ratio: float = 0.1, crossover_rate: float = 0.8, mutation_rate: float = 0.05, theta: float = 0.05,
       round_to: int = 8, aligns: dict[int, int] | None = None, seeds: list[dict[int, int]] | None = None,
       fidelity_many: Callable[[list[dict[int, int]]], list[float]] | None = None) -> Allocation:
    """Search per-group keep ratios. `fidelity(keep)` in [0, 1] measures a candidate (higher is better);
    `fidelity_many(keeps)`, when given, measures each generation's new candidates in one call (an executor map;
    the same values, so the same search)."""
    aligns = aligns or {}
    gids = sorted(sizes)
    L = (1 << bits) - 1

    def ratios_of(code):
        return min_ratio + (1.0 - min_ratio) * decode(code, bits) / L

    def project(r):  # scale ratios into the budget (largest scale that fits)
        def make(a):
            return {g: round_keep(min(1.0, a * ri) * sizes[g], sizes[g], round_to, aligns.get(g, 1))
                    for g, ri in zip(gids, r)}
        keep, c, _ = _bisect(make, cost, budget, 0.0, 1.0 / max(float(np.min(r)), 1e-3), iters=24)
        return keep, c

    cache: dict[tuple, tuple[float, dict, tuple]] = {}

    def evaluate(code, fid=None):
        keep, c = project(ratios_of(code))
        key = tuple(keep[g] for g in gids)
        if key not in cache:
            fid = float(fidelity(keep)) if fid is None else fid
            f = fid + theta * (2.0 - c[0] - c[1]) - (10.0 if not budget.ok(c) else 0.0)
            cache[key] = (f, keep, c, fid)
        return cache[key]

    def evaluate_all(codes):
        if fidelity_many is not None:  # the new candidates of this generation in one call, first occurrence order
            new = {}
            for code in codes:
                keep, _ = project(ratios_of(code))
                key = tuple(keep[g] for g in gids)
                if key not in cache and key not in new:
                    new[key] = (code, keep)
            for (code, _), fid in zip(new.values(), fidelity_many([k for _, k in new.values()])):
                evaluate(code, float(fid))
        return [evaluate(code) for code in codes]

    pop = [encode(np.full(len(gids), L), bits)]  # all-ones: uniform after projection
    for s in seeds or []:
        lv = np.array([round((s[g] / sizes[g] - min_ratio) / (1 - min_ratio) * L) for g in gids]).clip(0, L)
        pop.append(encode(lv, bits))
    while len(pop) < population:
        pop.append(rng.integers(0, 2, size=len(gids) * bits).astype(np.uint8))
    pop = pop[:population]
    history = []
    best = None
    for gen in range(generations):
        children = []
        order = rng.permutation(len(pop))
        for i in range(0, len(order) - 1, 2):
            a, b = pop[order[i]], pop[order[i + 1]]
            if rng.random() < crossover_rate:
                a, b = crossover(a, b, rng)
            children += [mutate(a, mutation_rate, rng), mutate(b, mutation_rate, rng)]
        allc = pop + children
        res = evaluate_all(allc)
        fit = np.array([r[0] for r in res])
        ib = int(np.argmax(fit))
        if best is None or fit[ib] > best[1][0]:
            best = (allc[ib].copy(), res[ib])
        history.append({"generation": gen, "best_fitness": round(float(fit.max()), 5),
                        "mean_fitness": round(float(fit.mean()), 5), "best_fidelity": round(best[1][3], 5)})
        sel = roulette(fit, population - 1, rng)
        pop = [best[0].copy()] + [allc[i].copy() for i in sel]  # elitism + roulette
    _, (f, keep, c, fid) = best
    return Allocation(keep, c, {"fitness": round(f, 5), "fidelity": round(fid, 5), "evaluated": len(cache),
                                "history": history, "bits": bits, "population": population,
                                "generations": generations})
