"""The channel analysis of one model (passes/prune/graph.py explains the idea): layouts propagated node by node
through the op handlers (passes/prune/handlers.py), element couplings, closures, and the groups they form."""
from __future__ import annotations

import logging

import numpy as np
import onnx

from edgec.core.graph import Graph, attr, node_names
from edgec.passes.prune.fold import _infer_shapes
from edgec.passes.prune.handlers import _HANDLERS, _h_eltwise, _h_pool, _h_reduce, _h_softmax, _h_unary
from edgec.passes.prune.layout import (_ELTWISE, _POOL, _REDUCE, _SOFTMAX, _UNARY, ChannelRef, _Layout, _Mac, _Rec,
                                       _Slice, _Unsupported)

log = logging.getLogger(__name__)


class _Analysis:
    """Layouts, couplings and closures of one model. Internal; built by `_analysis(model)`."""

    def __init__(self, model: onnx.ModelProto):
        self.model = model
        gi = Graph(model)
        self.nodes = [_copy_node(n) for n in gi.nodes]
        self.names = node_names(self.nodes)
        self.consts: dict[str, np.ndarray] = {name: gi[name] for name in [*gi.inits, *gi.cnodes]}
        self.shapes, self.dtypes, self.derived = _infer_shapes(model, self.consts)
        self.real_consts = set(self.consts)
        self.consts.update(self.derived)
        self.layouts: dict[str, _Layout] = {}
        self.order: list[str] = []  # tensors in creation order
        self._roots: list[tuple[int, int]] = []  # (start, size)
        self.n_elems = 0
        self._ua: list[np.ndarray] = []
        self._ub: list[np.ndarray] = []
        self.closures: list[tuple[np.ndarray, str]] = []
        self.slices: list[_Slice] = []
        self.recs: list[_Rec] = []
        self.macs: list[_Mac] = []
        self.refs: list[tuple[str, ChannelRef]] = []  # (tensor, ref): the group(s) present in tensor get ref
        self.blocks: list[tuple[str, int, str]] = []  # (tensor, G, node name): grouped conv block constraint
        self.producer_of: dict[str, int] = dict(gi.producer_index)
        index = {id(n): i for i, n in enumerate(gi.nodes)}
        self.users: dict[str, list[tuple[int, int]]] = {x: [(index[id(n)], k) for n, k in uses]
                                                         for x, uses in gi.consumers.items()}
        self._propagate()
        self._components()
        # keep only what later queries need: small constants, no reference to the model or its weights
        self.model = None
        self.consts = {k: v for k, v in self.consts.items() if v.size <= 64}

    # ---------------------------------------------------------------- element bookkeeping
    def new_root(self, size: int, reason: str | None = None) -> np.ndarray:
        e = np.arange(self.n_elems, self.n_elems + size, dtype=np.int64)
        self._roots.append((self.n_elems, size))
        self.n_elems += size
        if reason:
            self.closures.append((e, reason))
        return e

    def unify(self, a: np.ndarray, b: np.ndarray) -> None:
        assert a.shape == b.shape
        self._ua.append(a)
        self._ub.append(b)

    def close(self, t_or_elems, reason: str) -> None:
        if isinstance(t_or_elems, str):
            lay = self.layouts.get(t_or_elems)
            if lay is None:
                return
            t_or_elems = lay.elems
        self.closures.append((np.asarray(t_or_elems, np.int64), reason))

    def set_layout(self, t: str, axis: int, elems: np.ndarray) -> None:
        if not t:
            return
        self.layouts[t] = _Layout(int(axis), np.asarray(elems, np.int64))
        self.order.append(t)

    def shape(self, t: str):
        return self.shapes.get(t)

    def rank(self, t: str) -> int | None:
        s = self.shapes.get(t)
        if s is None and t in self.consts:
            return self.consts[t].ndim
        return None if s is None else len(s)

    def const(self, t: str):
        return self.consts.get(t) if t else None

    def fresh_outputs(self, i: int, reason: str) -> None:
        """Outputs of an op we do not understand: fresh, closed channels where a shape is known (on the axis of
        a same-rank tracked input, else axis 1)."""
        n = self.nodes[i]
        for o in n.output:
            s = self.shapes.get(o)
            if not (o and s and self.elem_float(o)):
                continue
            ax = next((self.layouts[x].axis for x in n.input if x in self.layouts and self.shapes.get(x) == s), 1)
            if len(s) >= 2 and s[ax] > 0:
                self.set_layout(o, ax, self.new_root(int(s[ax]), reason))

    def elem_float(self, t: str) -> bool:
        return self.dtypes.get(t, onnx.TensorProto.FLOAT) in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16,
                                                              onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16)

    def unsupported(self, i: int, why: str) -> None:
        n = self.nodes[i]
        reason = f"{why} ({n.op_type} node {self.names[i]})"
        for x in n.input:
            if x in self.layouts:
                self.close(x, reason)
        self.fresh_outputs(i, reason)

    # ---------------------------------------------------------------- propagation
    def _propagate(self) -> None:
        g = self.model.graph
        inits = {i.name for i in g.initializer}
        for inp in g.input:
            if inp.name in inits:
                continue
            s = self.shapes.get(inp.name)
            if s and len(s) >= 2 and s[1] > 0:
                self.set_layout(inp.name, 1, self.new_root(int(s[1]), f"graph input '{inp.name}'"))
            elif s and len(s) == 1 and s[0] > 0:
                self.set_layout(inp.name, 0, self.new_root(int(s[0]), f"graph input '{inp.name}'"))
        for i, n in enumerate(self.nodes):
            if n.op_type == "Constant":
                continue
            if not any(x in self.layouts for x in n.input):
                if all((not x) or x in self.consts for x in n.input) or n.op_type in ("Shape", "Size"):
                    continue  # constant / shape computations: untracked
                # a producer on an untracked input still owns its output channels
                s0 = self.shapes.get(n.input[0]) if n.input else None
                W = self.consts.get(n.input[1]) if len(n.input) > 1 else None
                why = f"untracked input of {self.names[i]}"
                if n.op_type == "Conv" and W is not None and W.ndim >= 3:
                    self.set_layout(n.input[0], 1, self.new_root(int(W.shape[1]) * int(attr(n, "group", 1)), why))
                elif n.op_type == "ConvTranspose" and W is not None and W.ndim >= 3:
                    self.set_layout(n.input[0], 1, self.new_root(int(W.shape[0]), why))
                elif n.op_type == "Gemm" and W is not None and W.ndim == 2 and not attr(n, "transA", 0):
                    self.set_layout(n.input[0], 1, self.new_root(int(W.shape[1] if attr(n, "transB", 0) else W.shape[0]), why))
                elif n.op_type == "MatMul" and W is not None and W.ndim == 2 and s0 and len(s0) >= 2:
                    self.set_layout(n.input[0], len(s0) - 1, self.new_root(int(W.shape[0]), why))
                else:
                    self.fresh_outputs(i, f"produced from untracked inputs ({n.op_type} node {self.names[i]})")
                    continue
            h = _HANDLERS.get(n.op_type)
            if n.op_type in _UNARY:
                h = _h_unary
            elif n.op_type in _ELTWISE:
                h = _h_eltwise
            elif n.op_type in _POOL:
                h = _h_pool
            elif n.op_type in _REDUCE:
                h = _h_reduce
            elif n.op_type in _SOFTMAX:
                h = _h_softmax
            if h is None:
                self.unsupported(i, "consumed by unsupported op")
                continue
            try:
                h(self, i, n)
            except _Unsupported as e:
                self.unsupported(i, str(e))
            except Exception as e:  # never let an odd graph crash the analysis: close what it touches
                log.debug("channel analysis of node %s failed", self.names[i], exc_info=True)
                for o in n.output:
                    self.layouts.pop(o, None)
                self.unsupported(i, f"not analysable ({type(e).__name__})")
        for o in g.output:
            if o.name in self.layouts:
                self.close(o.name, f"reaches graph output '{o.name}'")

    # ---------------------------------------------------------------- components and groups
    def _components(self) -> None:
        from scipy.sparse import coo_matrix
        from scipy.sparse.csgraph import connected_components

        n = self.n_elems
        if self._ua:
            a = np.concatenate(self._ua)
            b = np.concatenate(self._ub)
        else:
            a = b = np.zeros(0, np.int64)
        m = coo_matrix((np.ones(len(a), np.int8), (a, b)), shape=(n, n))
        ncomp, comp = connected_components(m, directed=False)
        # renumber components by their smallest element (topological, deterministic)
        first = np.full(ncomp, n, np.int64)
        np.minimum.at(first, comp, np.arange(n))
        order = np.argsort(first, kind="stable")
        rank = np.empty(ncomp, np.int64)
        rank[order] = np.arange(ncomp)
        self.comp = rank[comp]
        self.ncomp = ncomp
        # closure reason per component (first one wins)
        reason = [None] * ncomp
        for elems, why in self.closures:
            for c in np.unique(self.comp[elems]):
                if reason[c] is None:
                    reason[c] = why
        # element -> root index; a component holding two elements of one root is coupled to itself
        root_of = np.zeros(n, np.int64)
        for r, (s, sz) in enumerate(self._roots):
            root_of[s:s + sz] = r
        pairs = np.unique(np.stack([self.comp, root_of], 1), axis=0) if n else np.zeros((0, 2), np.int64)
        per_comp_roots = np.bincount(pairs[:, 0], minlength=ncomp) if n else np.zeros(0, np.int64)
        per_comp_elems = np.bincount(self.comp, minlength=ncomp) if n else np.zeros(0, np.int64)
        for c in np.nonzero(per_comp_elems != per_comp_roots)[0]:
            if reason[c] is None:
                reason[c] = "a channel is coupled to another channel of the same tensor"
        # occurrence signature per component over all tracked tensors
        rng = np.random.default_rng(12345)
        sig = np.zeros((ncomp, 2), np.uint64)
        self.t_comps: dict[str, np.ndarray] = {}
        for t in self.order:
            cs = self.comp[self.layouts[t].elems]
            self.t_comps[t] = cs
            u, cnt = np.unique(cs, return_counts=True)
            h = rng.integers(1, 2**63, size=2, dtype=np.uint64)
            with np.errstate(over="ignore"):
                sig[u] += cnt.astype(np.uint64)[:, None] * h[None, :]
        keys = {}
        self.group_of_comp = np.zeros(ncomp, np.int64)
        for c in range(ncomp):
            k = (int(sig[c, 0]), int(sig[c, 1]), reason[c] is not None)
            gid = keys.get(k)
            if gid is None:
                gid = keys[k] = len(keys)
            self.group_of_comp[c] = gid
        self.ngroups = len(keys)
        self.group_comps = [[] for _ in range(self.ngroups)]
        for c in range(ncomp):
            self.group_comps[self.group_of_comp[c]].append(c)
        self.group_comps = [np.asarray(x, np.int64) for x in self.group_comps]
        self.cidx = np.zeros(ncomp, np.int64)  # canonical index of a component inside its group
        for cs in self.group_comps:
            self.cidx[cs] = np.arange(len(cs))
        self.group_reason = [reason[cs[0]] for cs in self.group_comps]

    # ---------------------------------------------------------------- per-tensor queries
    def t_groups(self, t: str) -> np.ndarray:
        return self.group_of_comp[self.t_comps[t]]

    def positions(self, t: str, gid: int) -> np.ndarray:
        """(size, r) positions of group gid along t's channel axis, rows in canonical channel order."""
        cs = self.t_comps[t]
        p = np.nonzero(self.group_of_comp[cs] == gid)[0]
        c = self.cidx[cs[p]]
        o = np.lexsort((p, c))
        size = len(self.group_comps[gid])
        return p[o].reshape(size, -1)

    def counts(self, t: str) -> dict[int, int]:
        """group id -> r(t, g): positions per channel of g in t."""
        gs, cnt = np.unique(self.t_groups(t), return_counts=True)
        return {int(g): int(c) // len(self.group_comps[g]) for g, c in zip(gs, cnt)}


def _copy_node(n: onnx.NodeProto) -> onnx.NodeProto:
    c = onnx.NodeProto()
    c.CopyFrom(n)
    return c
