"""Recovery without retraining after channel removal.

Information fusion (APBM, Qu et al., Computer Engineering and Applications 2022): a removed channel i is folded
into its most similar kept channel j of the same
group. With producer filters w_i, w_j: lambda = <w_i, w_j> / |w_j|^2 and the consumer column is updated
    C[:, j] += lambda * C[:, i]
and, when activation means are known, the residual mean goes into the consumer bias:
    b += C[:, i] * (E[a_i] - lambda * E[a_j]).

Least-squares reconstruction (ThiNet / He et al. 2017, closed form): for every consumer layer y = W x + b whose input
lost channels, refit on calibration activations of the *pruned* network (x_p), against the *original* network's
output (y_o), sequentially in topological order so that each refit also absorbs the error of those before it:
    [W b] = argmin sum |W x_p + b - t|^2 + lam |W - W0|^2,   t = y_o   (or t = z_o - s_p when y feeds z = y + s)
    (X^T X + lam I) [W b]^T = X^T T + lam [W0 0]^T,   lam = ridge * trace(X^T X) / d
X^T X and X^T T are accumulated sample by sample in float64 (bounded memory: d^2 + d*o numbers); convolutions use
im2col rows at a random subset of output positions (at most `max_positions` per sample).
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from edgec.core.graph import Graph, attrs
from edgec.passes.prune.walk import Walker

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- model helpers
def _put(g: Graph, name: str, value: np.ndarray) -> None:
    """Overwrite initializer `name` (keeping its dtype), or add it."""
    if name in g.inits:
        g.set_const(name, value.astype(numpy_helper.to_array(g.inits[name]).dtype))
    else:
        g.add_initializer(name, value)


def truncated(model: onnx.ModelProto, outputs: list[str]) -> onnx.ModelProto:
    """A copy of `model` whose only outputs are `outputs`, keeping just the nodes they depend on."""
    producer = Graph(model).producer
    need, stack = set(), list(outputs)
    keep_nodes = set()
    while stack:
        t = stack.pop()
        if t in need:
            continue
        need.add(t)
        n = producer.get(t)
        if n is not None and id(n) not in keep_nodes:
            keep_nodes.add(id(n))
            stack.extend(i for i in n.input if i)
    m = onnx.ModelProto()
    m.CopyFrom(model)
    del m.graph.node[:]
    m.graph.node.extend([n for n in model.graph.node if id(n) in keep_nodes])
    used = {i for n in m.graph.node for i in n.input} | set(outputs)
    kept_inits = [t for t in model.graph.initializer if t.name in used]
    del m.graph.initializer[:]
    m.graph.initializer.extend(kept_inits)
    del m.graph.output[:]
    for o in outputs:
        m.graph.output.append(onnx.ValueInfoProto(name=o))
    del m.graph.value_info[:]
    return m


def stream_pair(model: onnx.ModelProto, names: list[str], feeds: Iterable[dict], threads: int = 1):
    """Yield {name: array} for `names`, running only the subgraph they need (ORT, graph optimizations on)."""
    from edgec.core.onnx_io import ort_session, run_session

    m = truncated(model, names)
    sess = ort_session(m, threads=threads, optimize=True)
    inputs = {i.name for i in sess.get_inputs()}
    for f in feeds:
        res = run_session(sess, {k: v for k, v in f.items() if k in inputs})
        yield dict(zip(names, res))


# ----------------------------------------------------------------------------- im2col and accumulation
def conv_patches(x: np.ndarray, kernel: tuple[int, int], strides=(1, 1), pads=(0, 0, 0, 0), dilations=(1, 1),
                 positions: np.ndarray | None = None) -> np.ndarray:
    """x (C, H, W) -> rows (P, C*kh*kw) in the (C, kh, kw) order of a Conv weight, at output `positions` (flat)."""
    c, h, w = x.shape
    kh, kw = kernel
    dh, dw = dilations
    xp = np.pad(x, ((0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    ekh, ekw = (kh - 1) * dh + 1, (kw - 1) * dw + 1
    win = np.lib.stride_tricks.sliding_window_view(xp, (ekh, ekw), axis=(1, 2))  # (C, H', W', ekh, ekw)
    win = win[:, ::strides[0], ::strides[1], ::dh, ::dw]  # (C, OH, OW, kh, kw)
    oh, ow = win.shape[1], win.shape[2]
    win = win.reshape(c, oh * ow, kh, kw)
    if positions is not None:
        win = win[:, positions]
    return np.ascontiguousarray(win.transpose(1, 0, 2, 3)).reshape(win.shape[1], c * kh * kw)


class GramAccumulator:
    """Accumulates G = X^T X, H = X^T T, with a ones column appended to X when fitting a bias."""

    def __init__(self, d: int, o: int, bias: bool):
        self.bias = bias
        self.d = d + (1 if bias else 0)
        self.G = np.zeros((self.d, self.d))
        self.H = np.zeros((self.d, o))
        self.tt = 0.0
        self.rows = 0

    def update(self, X: np.ndarray, T: np.ndarray) -> None:
        X = np.asarray(X, np.float64)
        if self.bias:
            X = np.concatenate([X, np.ones((X.shape[0], 1))], axis=1)
        T = np.asarray(T, np.float64)
        self.G += X.T @ X
        self.H += X.T @ T
        self.tt += float((T * T).sum())
        self.rows += X.shape[0]

    def solve(self, W0: np.ndarray, b0: np.ndarray | None, ridge: float) -> tuple[np.ndarray, np.ndarray | None, dict]:
        """W0 (o, d): weights to regularize toward. Returns (W, b, {'err_before','err_after'} relative)."""
        d0 = W0.shape[1]
        G = self.G
        lam = ridge * max(np.trace(G[:d0, :d0]) / max(d0, 1), 1e-12)
        reg = np.zeros(self.d)
        reg[:d0] = lam
        A0 = W0.T if not self.bias else np.concatenate([W0.T, (b0 if b0 is not None else np.zeros(W0.shape[0]))[None]], 0)
        rhs = self.H + reg[:, None] * A0
        try:
            A = np.linalg.solve(G + np.diag(reg), rhs)
        except np.linalg.LinAlgError:
            A = np.linalg.lstsq(G + np.diag(reg), rhs, rcond=None)[0]

        info = {"err_before": self.rel_err(A0), "err_after": self.rel_err(A), "rows": self.rows}
        W = A[:d0].T
        b = A[d0] if self.bias else None
        return W, b, info

    def rel_err(self, M: np.ndarray) -> float:
        """|X M - T|^2 / |T|^2 over the accumulated rows, from the Gram matrices (M: (d, o), bias row last)."""
        e = np.einsum("ij,ij->", M, self.G @ M) - 2 * np.einsum("ij,ij->", M, self.H) + self.tt
        return float(max(e, 0.0) / max(self.tt, 1e-30))


def _stack(W: np.ndarray, b: np.ndarray | None, bias: bool) -> np.ndarray:
    return W.T if not bias else np.concatenate([W.T, (b if b is not None else np.zeros(W.shape[0]))[None]], 0)


# ----------------------------------------------------------------------------- consumer layer adapters
@dataclass
class Layer:
    """A linear consumer y = W x + b that can be refit: Conv (any group, NOTSET padding) or Gemm/MatMul."""

    node: str
    op: str
    input: str
    output: str
    weight: str
    bias: str | None
    attrs: dict  # the node's attributes, read once (rows() runs per sample and must not rescan the model)
    wshape: tuple[int, ...]

    @classmethod
    def from_node(cls, model: onnx.ModelProto, node: onnx.NodeProto) -> tuple["Layer | None", str]:
        g = Graph(model)
        inits = g.inits
        if node.op_type not in ("Conv", "Gemm", "MatMul"):
            return None, f"{node.op_type} is not refittable"
        if len(node.input) < 2 or node.input[1] not in inits:
            return None, "weight is not an initializer"
        if g.uses.get(node.input[1], 0) > 1:
            return None, "weight initializer is shared"
        bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
        if bias is not None and bias not in inits:
            return None, "bias is not an initializer"
        a = attrs(node)
        if node.op_type == "Conv":
            if a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
                return None, "auto_pad is not NOTSET"
            if len(inits[node.input[1]].dims) != 4:
                return None, "only 2-D convolutions are refit"
        if node.op_type == "Gemm" and (a.get("transA", 0) or float(a.get("alpha", 1.0)) != 1.0
                                       or (bias and float(a.get("beta", 1.0)) != 1.0)):
            return None, "Gemm with transA/alpha/beta"
        if node.op_type == "MatMul" and len(inits[node.input[1]].dims) != 2:
            return None, "MatMul weight is not 2-D"
        return cls(node.name, node.op_type, node.input[0], node.output[0], node.input[1], bias, a,
                   tuple(inits[node.input[1]].dims)), ""

    # rows of X (features) and T (targets) for one sample
    def rows(self, model: onnx.ModelProto, x: np.ndarray, t: np.ndarray, rng: np.random.Generator,
             max_positions: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per weight group g: (X_g (P, d_g), T_g (P, o_g))."""
        if self.op == "Conv":
            a = self.attrs
            o, cg, kh, kw = self.wshape
            groups = int(a.get("group", 1))
            strides = tuple(a.get("strides", (1, 1)))
            pads = tuple(a.get("pads", (0, 0, 0, 0)))
            dil = tuple(a.get("dilations", (1, 1)))
            out = []
            for b in range(x.shape[0]):
                tb = t[b].reshape(t.shape[1], -1)  # (O, P)
                p = tb.shape[1]
                pos = None
                if p > max_positions:
                    pos = np.sort(rng.choice(p, max_positions, replace=False))
                    tb = tb[:, pos]
                og = o // groups
                for g in range(groups):
                    X = conv_patches(x[b, g * cg:(g + 1) * cg], (kh, kw), strides, pads, dil, pos)
                    out.append((g, X, tb[g * og:(g + 1) * og].T))
            return out
        xs = x.reshape(-1, x.shape[-1])
        ts = t.reshape(-1, t.shape[-1])
        if xs.shape[0] > max_positions:
            sel = np.sort(rng.choice(xs.shape[0], max_positions, replace=False))
            xs, ts = xs[sel], ts[sel]
        return [(0, xs, ts)]

    def weight_matrices(self, model: onnx.ModelProto) -> list[np.ndarray]:
        """Per group: W_g as (o_g, d_g) matching `rows`."""
        W = Graph(model)[self.weight].astype(np.float64)
        if self.op == "Conv":
            groups = int(self.attrs.get("group", 1))
            o = W.shape[0]
            og = o // groups
            return [W[g * og:(g + 1) * og].reshape(og, -1) for g in range(groups)]
        if self.op == "Gemm" and self.attrs.get("transB", 0):
            return [W]
        return [W.T]

    def bias_vector(self, model: onnx.ModelProto, o: int) -> np.ndarray | None:
        return Graph(model)[self.bias].astype(np.float64).reshape(-1) if self.bias else None

    def can_add_bias(self) -> bool:
        return self.op in ("Conv", "Gemm")

    def write(self, model: onnx.ModelProto, Ws: list[np.ndarray], b: np.ndarray | None) -> None:
        g = Graph(model)
        node = g.node(self.node)
        W0 = g[self.weight]
        if self.op == "Conv":
            W = np.concatenate(Ws, 0).reshape(W0.shape)
        elif self.op == "Gemm" and self.attrs.get("transB", 0):
            W = Ws[0]
        else:
            W = Ws[0].T
        _put(g, self.weight, W.astype(W0.dtype))
        if b is None:
            return
        if self.bias is None:
            name = g.unique_name(self.weight + "_bias")
            while len(node.input) < 2:
                node.input.append("")
            if len(node.input) == 2:
                node.input.append(name)
            else:
                node.input[2] = name
            self.bias = name
            _put(g, name, b.astype(W0.dtype))
            return
        b0 = g[self.bias]
        if g.uses.get(self.bias, 0) > 1:  # shared (e.g. deduplicated zeros): give this node its own copy
            name = g.unique_name(f"{self.weight}_bias")
            node.input[2] = name
            self.bias = name
            g.add_initializer(name, b.reshape(b0.shape).astype(b0.dtype))
        else:
            _put(g, self.bias, b.reshape(b0.shape).astype(b0.dtype))


def residual_partner(model: onnx.ModelProto, out: str) -> tuple[str, str] | None:
    """If `out` feeds exactly one node, an Add(out, s), return (add_output, s)."""
    users = [n for n in model.graph.node if out in n.input]
    if len(users) != 1 or users[0].op_type != "Add" or len(users[0].input) != 2:
        return None
    add = users[0]
    other = add.input[1] if add.input[0] == out else add.input[0]
    if other == out or other in {t.name for t in model.graph.initializer}:
        return None
    outs = {o.name for o in model.graph.output}
    if out in outs:
        return None
    return add.output[0], other


# ----------------------------------------------------------------------------- least squares
CV_RIDGES = (1e-3, 1e-2, 1e-1, 1.0, 10.0)


def _refit_target(model, name, ref_tensors, max_dim, residual_target):
    """(layer, weight matrices, residual partner, "") for a refittable node, else (None, None, None, why)."""
    layer, why = Layer.from_node(model, Graph(model).node(name))
    if layer is None:
        return None, None, None, why
    if layer.output not in ref_tensors:
        return None, None, None, "output tensor not in the reference model"
    Ws = layer.weight_matrices(model)
    d = Ws[0].shape[1]
    if d > max_dim:
        return None, None, None, f"{d} input features > max_dim {max_dim}"
    part = residual_partner(model, layer.output) if residual_target else None
    if part is not None and part[0] not in ref_tensors:
        part = None
    return layer, Ws, part, ""


def _gather(model, reference, layer, src, walkers, part, keep_out, rng, bias, *, samples, max_positions, threads):
    """Gram accumulators per weight group: pruned-model inputs X against reference targets T (minus the pruned
    residual partner when the layer feeds a residual Add)."""
    pruned_names = [layer.input] + ([part[1]] if part else [])
    ref_names = [part[0] if part else layer.output]
    accs: dict[int, GramAccumulator] = {}
    w = walkers(src)
    if w is not None:
        it_p, it_r = w[0].need(pruned_names), w[1].need(ref_names)
    else:
        it_p = stream_pair(model, pruned_names, _limit(src(), samples), threads)
        it_r = stream_pair(reference, ref_names, _limit(src(), samples), threads)
    for ap, ar in zip(it_p, it_r):
        t = ar[ref_names[0]]
        if keep_out is not None:
            t = np.take(t, keep_out, axis=1 if layer.op == "Conv" else -1)
        if part:
            t = t - ap[part[1]]
        for g, X, T in layer.rows(model, ap[layer.input], t, rng, max_positions):
            if g not in accs:
                accs[g] = GramAccumulator(X.shape[1], T.shape[1], bias)
            accs[g].update(X, T)
    return accs


def lstsq_refit(model: onnx.ModelProto, reference: onnx.ModelProto, layer_nodes: list[str],
                feeds: Callable[[], Iterable[dict]], *, samples: int = 64, ridge: float = 1e-3,
                max_positions: int = 256, residual_target: bool = True, fit_bias: bool = True,
                max_dim: int = 4608, seed: int = 0, threads: int = 1,
                out_channels: dict[str, np.ndarray | None] | None = None, min_rows_factor: float = 2.0,
                progress: Callable[[str], None] | None = None,
                validate_feeds: Callable[[], Iterable[dict]] | None = None,
                ridges: tuple[float, ...] = CV_RIDGES, walk_segments: bool = True) -> tuple[onnx.ModelProto, dict]:
    """Refit the named consumer nodes in topological order against `reference` (the unpruned model).

    With `validate_feeds` (samples disjoint from `feeds`) the ridge is cross-validated per layer: each of `ridges`
    is solved on the fit rows and the one with the lowest reconstruction error on the validate rows is kept, and
    the unrefit weights (ridge -> inf) are kept when they reconstruct the validate rows better still.

    walk_segments: activations come from a walk.Walker per model (each node runs once per sample over the whole
    refit, on the weights it has when it runs: the values a run from the inputs gives); False: each layer runs both
    models from their inputs (the former path, O(layers x model)).

    `model` and `reference` must share tensor names for each layer's output (and residual Add output).
    out_channels[node]: indices of the reference output channels that the pruned layer still produces (absent or
    None: all). Returns (model, {node: stats}).
    """
    model = _copy(model)
    order = {n.name: i for i, n in enumerate(model.graph.node)}
    layer_nodes = sorted({n for n in layer_nodes if n in order}, key=order.get)
    ref_tensors = {o for n in reference.graph.node for o in n.output}
    stats: dict[str, dict] = {}
    rng = np.random.default_rng([seed, 2017])
    walks: dict[int, tuple[Walker, Walker]] = {}  # per sample source: each node runs once per sample (walk.py)

    def walkers(src):
        if not walk_segments or not (Walker.supports(model) and Walker.supports(reference)):
            return None
        if id(src) not in walks:
            fl = list(_limit(src(), samples))
            walks[id(src)] = (Walker(model, fl, threads), Walker(reference, fl, threads))
        return walks[id(src)]

    for k, name in enumerate(layer_nodes):
        layer, Ws, part, why = _refit_target(model, name, ref_tensors, max_dim, residual_target)
        if layer is None:
            stats[name] = {"skipped": why}
            continue
        d = Ws[0].shape[1]
        bias = fit_bias and (layer.bias is not None or layer.can_add_bias())
        keep_out = (out_channels or {}).get(name)

        def gather(src):
            return _gather(model, reference, layer, src, walkers, part, keep_out, rng, bias,
                           samples=samples, max_positions=max_positions, threads=threads)

        accs = gather(feeds)
        if not accs:
            stats[name] = {"skipped": "no calibration samples"}
            continue
        if accs[0].rows < min_rows_factor * accs[0].d:
            stats[name] = {"skipped": f"{accs[0].rows} calibration rows < {min_rows_factor} x {accs[0].d} features"}
            continue
        o_total = sum(W.shape[0] for W in Ws)
        b0 = layer.bias_vector(model, o_total)
        vaccs = gather(validate_feeds) if validate_feeds is not None else None
        cv = vaccs is not None and all(g in vaccs for g in range(len(Ws)))
        newW, newb, eb, ea, chosen = _solve_groups(Ws, b0, accs, vaccs if cv else None, ridge, ridges, bias)
        layer.write(model, newW, np.concatenate(newb) if bias else None)
        for w in walks.values():
            w[0].changed(name)
        stats[name] = {"rel_err_before": round(eb, 5), "rel_err_after": round(ea, 5), "features": d,
                       "rows": accs[0].rows, "residual_target": bool(part), "bias": bool(bias)}
        if cv:
            stats[name]["ridge_cv"] = {"chosen": chosen[0] if len(set(map(str, chosen))) == 1 else chosen,
                                       "validate_rows": vaccs[0].rows}
        if progress:
            progress(f"lstsq {k + 1}/{len(layer_nodes)} {name}: rel err {eb:.4f} -> {ea:.4f}")
    return model, stats


def _solve_groups(Ws, b0, accs, vaccs, ridge, ridges, bias):
    """Per group: the ridge solve; with validate accumulators, the candidate ridge (or the unrefit weights, "none")
    with the lowest validate reconstruction error. Returns (weights, biases, mean err before, after, choices)."""
    newW, newb, eb, ea, chosen = [], [], 0.0, 0.0, []
    off = 0
    for g, W0 in enumerate(Ws):
        og = W0.shape[0]
        bg = None if b0 is None else b0[off:off + og]
        if vaccs is not None:
            cands = [(r, *accs[g].solve(W0, bg, r)) for r in ridges]
            best = min(cands, key=lambda c: vaccs[g].rel_err(_stack(c[1], c[2], bias)))
            if vaccs[g].rel_err(_stack(W0, bg if bias else None, bias)) <= vaccs[g].rel_err(_stack(best[1], best[2], bias)):
                best = ("none", W0, (bg if bg is not None else np.zeros(og)) if bias else None,
                        {**best[3], "err_after": best[3]["err_before"]})
            r, W, b, info = best
            chosen.append(r)
        else:
            W, b, info = accs[g].solve(W0, bg, ridge)
        newW.append(W)
        newb.append(b)
        eb += info["err_before"] / len(Ws)
        ea += info["err_after"] / len(Ws)
        off += og
    return newW, newb, eb, ea, chosen


def _limit(it: Iterable, n: int):
    for i, x in enumerate(it):
        if i >= n:
            break
        yield x


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    return m


# ----------------------------------------------------------------------------- information fusion
def fusion_plan(prod: np.ndarray, keep: np.ndarray) -> list[tuple[int, int, float]]:
    """prod (n, k): producer filters per channel. For each removed i: (i, j*, lambda) with j* the kept filter of
    highest |cosine| and lambda = <w_i, w_j> / |w_j|^2."""
    n = prod.shape[0]
    kept = np.asarray(sorted(set(int(k) for k in keep)))
    removed = np.setdiff1d(np.arange(n), kept)
    if len(removed) == 0 or len(kept) == 0:
        return []
    P = prod.astype(np.float64)
    nrm = np.linalg.norm(P, axis=1) + 1e-12
    cos = (P[removed] @ P[kept].T) / (nrm[removed, None] * nrm[None, kept])
    jbest = np.argmax(np.abs(cos), axis=1)
    plan = []
    for r, jb in zip(removed, jbest):
        j = kept[jb]
        lam = float(P[r] @ P[j] / (nrm[j] ** 2))
        # only positive scalings commute with ReLU-like activations
        plan.append((int(r), int(j), max(lam, 0.0)))
    return plan


def fuse_columns(C: np.ndarray, plan: list[tuple[int, int, float]], means: np.ndarray | None = None
                 ) -> tuple[np.ndarray, np.ndarray]:
    """C (o, n) consumer columns per channel. Returns (C', bias_delta (o,))."""
    C = C.astype(np.float64).copy()
    db = np.zeros(C.shape[0])
    for i, j, lam in plan:
        C[:, j] += lam * C[:, i]
        if means is not None:
            db += C[:, i] * (means[i] - lam * means[j])
    return C, db
