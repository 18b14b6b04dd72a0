"""Channel importance criteria. Each scores the channels of a dependency group (higher = more important),
aggregated over the group's members.

  l1          s_c = sum_m mean|W_m[c]|                       (producer rows and consumer columns, per member)
  l2          s_c = sum_m sqrt(mean W_m[c]^2)
  bn_scale    s_c = |gamma_c|            (network slimming; the scaling factors of ADMM sparse training, see allocate)
  taylor      s_c = E|a_c * dL/da_c|     (gradient-based importance of the adaptive-threshold method, Wang et al.,
                                          Computer Engineering 2022; see torchkit/prune_tools)
  apoz        s_c = 1 - P(a_c <= 0)      (APoZ, Network Trimming, Hu et al. 2016)
  entropy     s_c = H(hist_m(GAP(a_c)))  (entropy of pooled activations, entropy-based filter pruning, Luo & Wu 2017)
  kl          s_c = -KL(P_c || U),  P_c = softmax_j(cos(w_c, w_j)/tau)   (kernel-similarity relative entropy of the
                                          information-fusion method APBM, Qu et al., Computer Engineering and
                                          Applications 2022)
  actnorm     s_c = E|a_c| * |C[:, c]|                        (activation magnitude times consumer column norm)
  recon       s_c = |E_c| / |Y|^2, E_c the output error of the consumer after greedily removing (OBS, with
              least-squares refit of the rest) every channel up to and including c
  random      s_c ~ U(0, 1)                                   (control)

Magnitude criteria are member-normalised: each member's per-channel vector is divided by its mean, so members of
different scale contribute equally and scores are comparable across groups (global thresholds).
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

log = logging.getLogger(__name__)

CRITERIA = ("l1", "l2", "bn_scale", "taylor", "apoz", "entropy", "kl", "actnorm", "recon", "random")  # = SCORERS
ACTIVATION_CRITERIA = {"apoz", "entropy", "actnorm", "recon"}


@dataclass
class GroupEvidence:
    """What a criterion may read about one group: weights of its producers (rows) and consumers (columns), its
    activation statistics, its OBS problems (recon), torch-side Taylor scores, the BN scales, the run's rng."""

    size: int
    prod: list
    cons: list
    acts: dict | None = None
    problems: list | None = None
    taylor: np.ndarray | None = None
    bn_gamma: Callable[[], np.ndarray | None] = lambda: None
    rng: np.random.Generator | None = None
    ridge: float = 1e-3
    obs_batch: float = 0.0  # recon: channels per OBS step, as a fraction of the live ones (obs_order's batch)


def _by_bn(e: GroupEvidence):
    gamma = e.bn_gamma()
    if gamma is None:
        return (l2_score(e.prod) if e.prod else None,
                "no unfolded BatchNorm/scale: l2 of producer rows (which carry gamma after folding)")
    return bn_score(gamma), None


def _by_recon(e: GroupEvidence):
    if e.problems is not None:
        return recon_scores(e.problems, e.size, e.ridge, e.obs_batch), None
    if e.acts is not None:
        return actnorm_score(e.acts["mean_abs"], e.cons), "consumers not refittable or too wide for OBS: actnorm"
    return None, None


# criterion -> (evidence -> (scores or None, note or None)); None falls back to l1 (with a note) in the pass
SCORERS: dict[str, Callable[[GroupEvidence], tuple]] = {
    "l1": lambda e: (l1_score(e.prod + e.cons) if e.prod + e.cons else None, None),
    "l2": lambda e: (l2_score(e.prod + e.cons) if e.prod + e.cons else None, None),
    "bn_scale": _by_bn,
    "taylor": lambda e: (e.taylor, None),
    "apoz": lambda e: (apoz_score(e.acts["apoz"]) if e.acts is not None else None, None),
    "entropy": lambda e: (entropy_score(e.acts["pooled"]) if e.acts is not None else None, None),
    "kl": lambda e: (kl_score(np.concatenate(e.prod, 1)) if e.prod else None, None),
    "actnorm": lambda e: (actnorm_score(e.acts["mean_abs"], e.cons) if e.acts is not None else None, None),
    "recon": _by_recon,
    "random": lambda e: (random_score(e.size, e.rng), None),
}


# ----------------------------------------------------------------------------- array-level scores
def _norm(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, np.float64)
    m = float(np.mean(v))
    return v / m if m > 0 else v


def l1_score(mats: list[np.ndarray]) -> np.ndarray:
    """s_c = sum_m mean_k |W_m[c, k]| / mean_c(.)"""
    return sum(_norm(np.abs(np.asarray(m, np.float64)).mean(axis=1)) for m in mats)


def l2_score(mats: list[np.ndarray]) -> np.ndarray:
    """s_c = sum_m sqrt(mean_k W_m[c, k]^2) / mean_c(.)"""
    return sum(_norm(np.sqrt((np.asarray(m, np.float64) ** 2).mean(axis=1))) for m in mats)


def bn_score(gamma: np.ndarray) -> np.ndarray:
    """s_c = |gamma_c|"""
    return np.abs(np.asarray(gamma, np.float64))


def apoz_score(zero_fraction: np.ndarray) -> np.ndarray:
    """s_c = 1 - APoZ_c = 1 - P(a_c <= 0)"""
    return 1.0 - np.asarray(zero_fraction, np.float64)


def entropy_score(pooled: np.ndarray, bins: int = 16) -> np.ndarray:
    """s_c = -sum_b p_b log p_b over a `bins`-bin histogram of GAP(a_c) across samples (pooled: (N, C))."""
    pooled = np.asarray(pooled, np.float64)
    out = np.zeros(pooled.shape[1])
    for c in range(pooled.shape[1]):
        v = pooled[:, c]
        lo, hi = float(v.min()), float(v.max())
        if hi - lo <= 1e-12:
            continue
        h, _ = np.histogram(v, bins=bins, range=(lo, hi))
        p = h[h > 0] / h.sum()
        out[c] = float(-(p * np.log(p)).sum())
    return out


def kl_score(prod: np.ndarray, tau: float = 0.1) -> np.ndarray:
    """s_c = -KL(P_c || U) with P_c(j) = softmax_{j != c}(cos(w_c, w_j) / tau): a filter whose similarity mass
    concentrates on a few others is redundant (APBM's relative-entropy importance, Qu et al. 2022)."""
    P = np.asarray(prod, np.float64)
    n = P.shape[0]
    if n < 3:
        return np.ones(n)
    Pn = P / (np.linalg.norm(P, axis=1, keepdims=True) + 1e-12)
    cos = Pn @ Pn.T
    np.fill_diagonal(cos, -np.inf)
    z = cos / tau
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    p = e / e.sum(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        kl = np.where(p > 0, p * np.log(p * (n - 1)), 0.0).sum(axis=1)
    return -kl


def actnorm_score(mean_abs: np.ndarray, cons: list[np.ndarray]) -> np.ndarray:
    """s_c = E|a_c| * sqrt(sum_m |C_m[c]|^2)"""
    col = np.sqrt(sum((np.asarray(c, np.float64) ** 2).sum(axis=1) for c in cons)) if cons else 1.0
    return np.asarray(mean_abs, np.float64) * col


def random_score(n: int, rng: np.random.Generator) -> np.ndarray:
    """s_c ~ U(0, 1)"""
    return rng.random(n)


def obs_order(problems: list[tuple[np.ndarray, np.ndarray, float, np.ndarray]], n: int,
              ridge: float = 1e-3, batch: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Greedy structured OBS over channels 0..n-1 shared by several linear consumers.

    problems: per consumer (G, W, tt, idx): G (d, d) input Gram (bias column included if any), W (o, d) weights,
    tt = |Y|^2, idx (n, b) the feature indices of each channel (b = kernel taps). Removing channel c with optimal
    refit of the remaining features costs dE = tr(W_B Hinv_BB^-1 W_B^T) (Hinv = (G + lam I)^-1); W and Hinv are
    updated after each removal. Returns (order of removal, cumulative relative error sum_m E_m/tt_m at removal).

    batch > 0: each step removes the k = max(1, floor(batch * live)) channels of lowest error together, with one
    joint update (block B = their features): the same OBS algebra, rank k*b instead of k rank-b updates, which turns
    memory-bound rank-b updates of a d x d inverse into matrix products. The joint error of the step is exact; it is
    shared among its k channels in proportion to their single-channel errors. Greedy within the step is approximate;
    the last 1/batch channels go one at a time. batch = 0: plain greedy, one channel per step.
    """
    state = []
    for G, W, tt, idx in problems:
        d = G.shape[0]
        lam = ridge * max(np.trace(G) / d, 1e-12)
        Hinv = np.linalg.inv(G + lam * np.eye(d))
        state.append([Hinv, np.asarray(W, np.float64).copy(), max(tt, 1e-30), np.asarray(idx).reshape(n, -1), n])
    alive = np.ones(n, bool)
    order, cum = [], []
    total = 0.0
    for _ in range(n):
        cand = np.flatnonzero(alive)
        if len(cand) == 1:
            order.append(int(cand[0]))
            cum.append(np.inf)
            break
        err = np.zeros(len(cand))
        for Hinv, W, tt, idx, _ in state:
            if idx.shape[1] == 1:
                j = idx[cand, 0]
                err += (W[:, j] ** 2).sum(0) / np.maximum(np.diag(Hinv)[j], 1e-30) / tt
            else:  # all candidates at once: tr(W_B pinv(Hinv_BB) W_B^T) per candidate block B
                Bs = idx[cand]  # (m, b)
                Hb = Hinv[Bs[:, :, None], Bs[:, None, :]]  # (m, b, b)
                Wb = W[:, Bs].transpose(1, 0, 2)  # (m, o, b)
                try:  # Hinv_BB is SPD (a principal block of an SPD inverse): solve, pinv only if singular
                    Z = np.linalg.solve(Hb, Wb.transpose(0, 2, 1))  # (m, b, o)
                except np.linalg.LinAlgError:
                    Z = np.linalg.pinv(Hb) @ Wb.transpose(0, 2, 1)
                err += np.einsum("mob,mbo->m", Wb, Z) / tt
        k = min(max(1, int(batch * len(cand))), len(cand) - 1)
        sel = np.argpartition(err, k - 1)[:k] if k > 1 else np.asarray([int(np.argmin(err))])
        sel = sel[np.argsort(err[sel], kind="stable")]
        cs = cand[sel]
        joint = 0.0
        for s in state:
            Hinv, W, tt, idx, _ = s
            B = idx[cs].ravel()
            HbInv = np.linalg.pinv(Hinv[np.ix_(B, B)])
            WB = W[:, B]
            if k > 1:
                joint += float(np.einsum("ob,ob->", WB @ HbInv, WB)) / tt
            W -= (WB @ HbInv) @ Hinv[B, :]
            Hinv -= Hinv[:, B] @ HbInv @ Hinv[B, :]
            W[:, B] = 0.0
            s[0], s[1] = Hinv, W
        single = err[sel]
        share = single * (joint / single.sum()) if k > 1 and single.sum() > 0 else \
            (np.full(k, joint / k) if k > 1 else single)
        for c, e in zip(cs, share):
            total += float(e)
            order.append(int(c))
            cum.append(total)
        alive[cs] = False
        for s in state:
            if 3 * alive.sum() < 2 * s[4]:  # compact to the live features: same values, a smaller d^2 per step
                _compact(s, alive)
    return np.asarray(order), np.asarray(cum)


def _compact(s: list, alive: np.ndarray) -> None:
    """Drop the rows/columns of removed channels' features from one OBS state (entries of live features only ever
    combine live entries and the removed channel's, so the live values are unchanged)."""
    Hinv, W, tt, idx, _ = s
    dead = np.zeros(Hinv.shape[0], bool)
    gone = idx[~alive].ravel()
    dead[gone[gone >= 0]] = True
    keep = np.flatnonzero(~dead)
    remap = np.full(Hinv.shape[0], -1, np.int64)
    remap[keep] = np.arange(len(keep))
    s[0], s[1], s[4] = Hinv[np.ix_(keep, keep)].copy(), W[:, keep].copy(), int(alive.sum())
    s[3] = np.where(idx >= 0, remap[np.maximum(idx, 0)], -1)


def recon_scores(problems, n: int, ridge: float = 1e-3, batch: float = 0.0) -> np.ndarray:
    """s_c = cumulative relative error when c is removed by greedy OBS (larger = removed later = more important)."""
    order, cum = obs_order(problems, n, ridge, batch)
    s = np.empty(n)
    finite = cum[np.isfinite(cum)]
    top = (finite.max() if len(finite) else 1.0) * 2 + 1.0
    s[order] = np.where(np.isfinite(cum), cum, top)
    return s


# ----------------------------------------------------------------------------- model-level scoring
def _moveaxis(a: np.ndarray, axis: int) -> np.ndarray:
    return np.moveaxis(a, axis, 1) if axis != 1 else a


def activation_stats(model, groups, feeds, samples: int, threads: int = 1) -> dict[int, dict[str, np.ndarray]]:
    """Stream the groups' stat tensors once: per group mean|a|, zero fraction, and per-sample GAP vectors (N, C)."""
    from edgec.calib.activations import stream_activations

    want = {}
    for g in groups:
        if g.stat_tensor:
            want.setdefault(g.stat_tensor, []).append(g)
    names = sorted(want)
    acc = {g.id: {"abs": 0.0, "sum": 0.0, "zero": 0.0, "count": 0, "pooled": []} for g in groups if g.stat_tensor}
    if not names:
        return {}
    n = 0
    for acts in stream_activations(model, names, _take(feeds, samples), threads=threads):
        n += 1
        for t, gs in want.items():
            a = acts[t]
            for g in gs:
                x = _moveaxis(np.asarray(a, np.float64), getattr(g, "stat_axis", 1))
                x = x[:, g.stat_offset:g.stat_offset + g.size]
                flat = np.moveaxis(x, 1, 0).reshape(g.size, -1)
                s = acc[g.id]
                s["abs"] = s["abs"] + np.abs(flat).sum(1)
                s["sum"] = s["sum"] + flat.sum(1)
                s["zero"] = s["zero"] + (flat <= 0).sum(1)
                s["count"] += flat.shape[1]
                s["pooled"].append(x.reshape(x.shape[0], g.size, -1).mean(2))
    out = {}
    for gid, s in acc.items():
        c = max(s["count"], 1)
        out[gid] = {"mean_abs": np.asarray(s["abs"]) / c, "mean": np.asarray(s["sum"]) / c, "apoz": np.asarray(s["zero"]) / c,
                    "pooled": np.concatenate(s["pooled"], 0) if s["pooled"] else np.zeros((0, 0))}
    return out


def _take(it, n):
    for i, x in enumerate(it):
        if i >= n:
            break
        yield x


def recon_problems(model, groups, layers_of, feeds, samples: int, *, max_positions: int = 256,
                   max_dim: int = 2048, seed: int = 0, threads: int = 1):
    """Per group: the OBS problems [(G, W, tt, idx)] of its consumer layers, restricted to the group's features.

    layers_of[gid] -> consumer_layers(model, g) dicts. Grams are accumulated from the unpruned model's activations.
    Groups whose restricted feature count exceeds max_dim (or with unsupported consumers) get no problem."""
    from edgec.calib.activations import stream_activations
    from edgec.core.graph import Graph, attrs
    from edgec.passes.prune.recover import Layer, conv_patches

    gr = Graph(model)

    rng = np.random.default_rng([seed, 4242])
    plan = {}  # gid -> list of (layer, positions, taps, W restricted (o, d+1))
    for g in groups:
        items = []
        for L in layers_of.get(g.id, []):
            node = gr.node(L["node"])
            lay, why = Layer.from_node(model, node)
            if lay is None or (L["op"] == "Conv" and L.get("group", 1) != 1):
                items = None
                break
            pos = np.asarray(L["positions"]).reshape(g.size, -1)
            if pos.shape[1] != 1:
                items = None
                break
            pos = pos[:, 0]
            W = gr[lay.weight].astype(np.float64)
            if lay.op == "Conv":
                taps = int(np.prod(W.shape[2:]))
                Wg = W[:, pos].reshape(W.shape[0], -1)
            elif lay.op == "Gemm" and L.get("trans_b", 0):
                taps, Wg = 1, W[:, pos]
            else:
                taps, Wg = 1, W[pos].T
            if g.size * taps > max_dim:
                items = None
                break
            b = gr[lay.bias].astype(np.float64).reshape(-1) if lay.bias else np.zeros(Wg.shape[0])
            items.append({"layer": lay, "node": node, "pos": pos, "taps": taps,
                          "A": np.concatenate([Wg, b[:, None]], 1), "G": None})
        if items:
            plan[g.id] = items
    names = sorted({it["layer"].input for items in plan.values() for it in items})
    if not names:
        return {}
    for acts in stream_activations(model, names, _take(feeds, samples), threads=threads):
        for items in plan.values():
            for it in items:
                lay = it["layer"]
                x = acts[lay.input]
                if lay.op == "Conv":
                    a = attrs(it["node"])
                    kh_kw = tuple(gr[lay.weight].shape[2:])
                    xs = x[0][it["pos"]]
                    X = conv_patches(xs, kh_kw, tuple(a.get("strides", (1, 1))), tuple(a.get("pads", (0, 0, 0, 0))),
                                     tuple(a.get("dilations", (1, 1))))
                    if X.shape[0] > max_positions:
                        X = X[np.sort(rng.choice(X.shape[0], max_positions, replace=False))]
                else:
                    X = x.reshape(-1, x.shape[-1])[:, it["pos"]]
                    if X.shape[0] > max_positions:
                        X = X[np.sort(rng.choice(X.shape[0], max_positions, replace=False))]
                X = np.concatenate([np.asarray(X, np.float64), np.ones((X.shape[0], 1))], 1)
                it["G"] = X.T @ X if it["G"] is None else it["G"] + X.T @ X
    out = {}
    for gid, items in plan.items():
        probs = []
        for it in items:
            G, A = it["G"], it["A"]
            if G is None:
                continue
            tt = float(np.einsum("ij,ij->", A, A @ G))
            idx = np.arange(len(it["pos"]) * it["taps"]).reshape(len(it["pos"]), it["taps"])
            probs.append((G, A, tt, idx))
        if probs:
            out[gid] = probs
    return out


assert tuple(SCORERS) == CRITERIA
