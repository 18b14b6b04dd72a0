"""Channel dependency groups on an ONNX graph, and the analytic cost model of removing channels.

Every channel-carrying activation tensor t gets a *layout*: its channel axis and, for each position along that
axis, an element id. Producers (Conv/ConvTranspose/Gemm/MatMul with constant weights) create fresh element ids
for their output channels; shape-preserving ops pass layouts through (Transpose/Squeeze move the axis, Concat
concatenates, Split/Slice cut, Flatten/Reshape repeat each element over the merged trailing positions);
elementwise ops with several channel-carrying inputs couple the inputs position by position (union), and a
depthwise conv couples its output channel i with its input channel i. A *channel* of a group is a connected
component of elements; a *group* is the set of channels with the same occurrence count in every tensor, so
every tensor holds either all of a group or none of it, and removing k of a group's channels shrinks each
tensor t by r(t, g) * k positions (r > 1 after Flatten). Hence the cost model is exact and linear per factor:

    MACs(node; keep) = MACs_0(node) * prod_{t in node's tracked in/out} kept(t) / C(t),  kept(t) = sum_g r(t,g) k_g
    params(keep)     = params_0 + sum_init size_0(init) * (prod_axes kept(t_axis) / C(t_axis) - 1)

Anything not understood (an unsupported op, a non-constant weight, a Reshape that splits the channel axis,
a normalization over channels, a graph input/output) closes every channel it touches as unprunable, with a reason.

Contract for callers (criteria, allocation, recovery):
  * Group channel i is the same channel in every tensor/weight of the group ("canonical order" = the order in
    its first producer's output). `remove_channels(model, {g.id: kept_indices})` takes indices in that order.
  * align > 1 (grouped convs): the group splits into `align` equal contiguous blocks, and a valid keep has
    equally many channels in every block; `select_channels(g, scores, k)` picks such a set, `round_keep` a count.
  * stat_tensor[:, stat_offset:stat_offset+size] along stat_axis (1 for NCHW, 3 for NHWC MatMul blocks) holds
    the group's channels contiguously, in canonical order, after the nonlinearity that feeds the next layer.
  * producer_weights also returns the depthwise convs moving with the group (role 'dw'); consumer_layers gives
    each consumer's 'positions' (size, r): the input positions of every channel (r > 1 after Flatten).
  * The analysis is cached by graph structure; weight values are always read from the model passed in.
"""
from __future__ import annotations

import copy
import hashlib
import logging
import math
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

log = logging.getLogger(__name__)

__all__ = ["ChannelRef", "Group", "analyze", "producer_weights", "consumer_weights", "bn_scales",
           "consumer_layers", "CostModel", "select_channels", "round_keep"]


@dataclass
class ChannelRef:
    """One place where a group's channels appear."""

    node: str
    op: str
    role: str  # 'out' | 'in' | 'dw' | 'bn' | 'scale' | 'norm' | 'concat' | 'split' | 'slice' | 'reshape' | 'resize'
    weight: str | None = None
    offset: int = 0


@dataclass
class Group:
    id: int
    size: int
    producers: list[ChannelRef]
    consumers: list[ChannelRef]
    others: list[ChannelRef]
    tensors: list[tuple[str, int]]
    stat_tensor: str | None
    stat_offset: int
    prunable: bool
    reason: str | None
    align: int = 1  # kept count must be a multiple; channels fall in `align` equal contiguous blocks, keep equally many per block
    stat_axis: int = 1  # channel axis of stat_tensor (3 for NHWC MatMul blocks such as ConvNeXt's MLP)

    def summary(self) -> dict:
        return {"id": self.id, "size": self.size, "prunable": self.prunable, "reason": self.reason,
                "align": self.align, "members": [f"{r.node}:{r.role}" for r in self.producers + self.consumers + self.others]}


# ----------------------------------------------------------------------------------------------- op tables

_UNARY = {
    "Relu", "LeakyRelu", "Sigmoid", "Tanh", "HardSigmoid", "HardSwish", "Clip", "Elu", "Selu", "Celu", "Gelu",
    "Erf", "Softplus", "Softsign", "Mish", "Neg", "Abs", "Exp", "Log", "Sqrt", "Reciprocal", "Floor", "Ceil",
    "Round", "Sign", "Sin", "Cos", "Not", "Identity", "Dropout", "Cast", "ThresholdedRelu", "Swish", "IsNaN",
    "IsInf", "Shrink",
}
_ELTWISE = {
    "Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean", "PRelu", "Where", "Equal", "Greater", "Less",
    "GreaterOrEqual", "LessOrEqual", "And", "Or", "Xor", "Mod", "BitShift",
}
_POOL = {"MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool"}
_REDUCE = {"ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceL1", "ReduceL2", "ReduceLogSum",
           "ReduceLogSumExp", "ReduceProd", "ReduceSumSquare"}
_SOFTMAX = {"Softmax", "LogSoftmax", "Hardmax"}
MAC_OPS = {"Conv", "ConvTranspose", "Gemm", "MatMul"}


# ----------------------------------------------------------------------------------------------- analysis

@dataclass
class _Layout:
    axis: int
    elems: np.ndarray  # int64 element id per position along `axis`


@dataclass
class _Slice:
    """Slice initializer node.input[inp] along `axis` by the kept mask of tensor `t` (block>1: grouped-conv input)."""

    node: int
    inp: int
    axis: int
    t: str
    block: int = 1


@dataclass
class _Rec:
    """A non-initializer rewrite: kind in {'setgroup','split','slice','reshape','resize'}."""

    kind: str
    node: int
    t: str  # the tensor whose kept mask drives it
    data: dict = field(default_factory=dict)


@dataclass
class _Mac:
    node: int
    factors: list  # tensor names whose kept/total scale the MACs


class _Analysis:
    """Layouts, couplings and closures of one model. Internal; built by `_analysis(model)`."""

    def __init__(self, model: onnx.ModelProto):
        self.model = model
        g = model.graph
        self.nodes = [_copy_node(n) for n in g.node]
        self.names = node_names(self.nodes)
        self.consts: dict[str, np.ndarray] = {}
        for init in g.initializer:
            self.consts[init.name] = numpy_helper.to_array(init)
        for n in self.nodes:
            if n.op_type == "Constant":
                for a in n.attribute:
                    if a.name == "value":
                        self.consts[n.output[0]] = numpy_helper.to_array(a.t)
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
        self.producer_of: dict[str, int] = {}
        self.users: dict[str, list[tuple[int, int]]] = {}
        for i, n in enumerate(self.nodes):
            for o in n.output:
                self.producer_of[o] = i
            for k, x in enumerate(n.input):
                if x:
                    self.users.setdefault(x, []).append((i, k))
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
                    self.set_layout(n.input[0], 1, self.new_root(int(W.shape[1]) * int(_attr(n, "group", 1)), why))
                elif n.op_type == "ConvTranspose" and W is not None and W.ndim >= 3:
                    self.set_layout(n.input[0], 1, self.new_root(int(W.shape[0]), why))
                elif n.op_type == "Gemm" and W is not None and W.ndim == 2 and not _attr(n, "transA", 0):
                    self.set_layout(n.input[0], 1, self.new_root(int(W.shape[1] if _attr(n, "transB", 0) else W.shape[0]), why))
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


class _Unsupported(Exception):
    pass


def _copy_node(n: onnx.NodeProto) -> onnx.NodeProto:
    c = onnx.NodeProto()
    c.CopyFrom(n)
    return c


_SHAPE_OPS = {"Shape", "Size", "Gather", "Unsqueeze", "Squeeze", "Concat", "Add", "Sub", "Mul", "Div", "Cast",
              "Slice", "Reshape", "Equal", "Where", "ReduceProd", "Floor", "Ceil", "Range", "ConstantOfShape",
              "Identity", "Max", "Min", "Abs", "Neg", "Mod", "Less", "Greater", "Not", "And", "Or", "Sqrt"}


def _read_shapes(m: onnx.ModelProto) -> tuple[dict[str, tuple], dict[str, int]]:
    shapes, dtypes = {}, {}
    for vi in list(m.graph.value_info) + list(m.graph.input) + list(m.graph.output):
        t = vi.type.tensor_type
        dtypes[vi.name] = t.elem_type
        if t.HasField("shape"):
            shapes[vi.name] = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim)
    for init in m.graph.initializer:
        shapes[init.name] = tuple(init.dims)
        dtypes[init.name] = init.data_type
    return shapes, dtypes


def _infer(m: onnx.ModelProto) -> onnx.ModelProto:
    try:
        return onnx.shape_inference.infer_shapes(m, data_prop=True)
    except Exception:
        return m


def _light(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy for shape inference only: large initializers become typed graph inputs (no weight bytes copied)."""
    m = onnx.ModelProto()
    m.ir_version = model.ir_version
    m.opset_import.extend(model.opset_import)
    g = model.graph
    m.graph.name = g.name
    m.graph.node.extend(g.node)
    m.graph.input.extend(g.input)
    m.graph.output.extend(g.output)
    names = {i.name for i in g.input}
    for i in g.initializer:
        if int(np.prod(i.dims)) <= 64:
            m.graph.initializer.append(i)
        elif i.name not in names:
            m.graph.input.append(onnx.helper.make_tensor_value_info(i.name, i.data_type, list(i.dims)))
    return m


def _infer_shapes(model: onnx.ModelProto, consts: dict[str, np.ndarray]):
    """Static shapes and dtypes, after evaluating shape sub-graphs (Shape -> Gather -> ... -> Slice bounds) whose
    inputs are static. Returns (shapes, dtypes, derived constants); the model itself is not changed."""
    light = _light(model)
    m = _infer(light)
    derived: dict[str, np.ndarray] = {}
    for _ in range(4):
        shapes, dtypes = _read_shapes(m)
        new = _fold_once(model, shapes, {**consts, **derived})
        if not new:
            break
        derived.update(new)
        tmp = onnx.ModelProto()
        tmp.CopyFrom(light)
        keep = [n for n in tmp.graph.node if not all(o in derived or not o for o in n.output)]
        del tmp.graph.node[:]
        tmp.graph.node.extend(keep)
        tmp.graph.initializer.extend(numpy_helper.from_array(np.asarray(v), k) for k, v in derived.items())
        m = _infer(tmp)
    shapes, dtypes = _read_shapes(m)
    return shapes, dtypes, derived


def _fold_once(model, shapes, known) -> dict[str, np.ndarray]:
    new = {}
    for n in model.graph.node:
        if n.op_type not in _SHAPE_OPS or all(o in known for o in n.output if o):
            continue
        try:
            if n.op_type in ("Shape", "Size"):
                s = shapes.get(n.input[0])
                if s is None or any(d <= 0 for d in s):
                    continue
                if n.op_type == "Size":
                    new[n.output[0]] = np.asarray(int(np.prod(s)), np.int64)
                    continue
                lo, hi = int(_attr(n, "start", 0)), _attr(n, "end", None)
                new[n.output[0]] = np.asarray(s[slice(lo, None if hi is None else int(hi))], np.int64)
                continue
            ins = [x for x in n.input if x]
            if not ins or not all(x in known or x in new for x in ins):
                continue
            vals = {x: (new[x] if x in new else known[x]) for x in ins}
            if any(v.size > 64 for v in vals.values()):
                continue
            from onnx.reference import ReferenceEvaluator

            g = onnx.helper.make_graph(
                [n], "fold", [onnx.helper.make_tensor_value_info(x, onnx.helper.np_dtype_to_tensor_dtype(vals[x].dtype), None) for x in vals],
                [onnx.helper.make_tensor_value_info(o, onnx.TensorProto.UNDEFINED, None) for o in n.output if o])
            mm = onnx.helper.make_model(g, opset_imports=list(model.opset_import))
            outs = ReferenceEvaluator(mm).run(None, vals)
            for o, v in zip([o for o in n.output if o], outs):
                v = np.asarray(v)
                if v.size <= 64:
                    new[o] = v
        except Exception:  # not foldable: stays dynamic
            continue
    return new


def _attr(node, name, default=None):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def node_names(nodes) -> list[str]:
    """How groups name nodes: the node's name, or op_type_index for unnamed nodes."""
    return [n.name or f"{n.op_type}_{i}" for i, n in enumerate(nodes)]


def _norm_axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


# ----------------------------------------------------------------------------------------------- handlers

def _h_unary(an: _Analysis, i, n):
    lay = an.layouts[n.input[0]] if n.input[0] in an.layouts else None
    if lay is None:
        raise _Unsupported("channel-carrying tensor in a non-data input")
    for x in n.input[1:]:
        if x and x not in an.consts:
            raise _Unsupported("non-constant parameter input")
    an.set_layout(n.output[0], lay.axis, lay.elems)
    for o in n.output[1:]:  # Dropout mask: same layout, unused in inference graphs
        if o:
            an.set_layout(o, lay.axis, lay.elems)


def _h_eltwise(an: _Analysis, i, n):
    out = n.output[0]
    R = an.rank(out)
    if R is None:
        R = max((an.rank(x) or 0) for x in n.input if x)
    oshape = an.shape(out)
    tracked = [(k, x) for k, x in enumerate(n.input) if x in an.layouts]
    axes = {an.layouts[x].axis + R - an.rank(x) for _, x in tracked}
    if len(axes) != 1 or any(an.rank(x) is None for _, x in tracked):
        raise _Unsupported("inputs carry channels on different axes")
    ax = axes.pop()
    C = oshape[ax] if oshape and oshape[ax] > 0 else max(len(an.layouts[x].elems) for _, x in tracked)
    full = [(k, x) for k, x in tracked if len(an.layouts[x].elems) == C]
    if not full:
        raise _Unsupported("no input carries the full channel axis")
    base = an.layouts[full[0][1]].elems
    for k, x in tracked:
        e = an.layouts[x].elems
        if len(e) == C:
            an.unify(base, e)
        else:  # broadcast across channels (a 1-channel map)
            an.close(x, f"broadcast across channels ({n.op_type} node {an.names[i]})")
    for k, x in enumerate(n.input):
        if not x or x in an.layouts:
            continue
        s = an.shape(x) if x not in an.consts else an.consts[x].shape
        r = len(s) if s is not None else None
        if r is None:
            raise _Unsupported("input of unknown shape")
        cax = ax - (R - r)
        if cax < 0 or s[cax] == 1:
            continue
        if x in an.real_consts and s[cax] == C:
            an.slices.append(_Slice(i, k, cax, out))
            an.refs.append((out, ChannelRef(an.names[i], n.op_type, "scale", x)))
        else:
            raise _Unsupported("untracked non-constant input varies along the channel axis")
    an.set_layout(out, ax, base)


def _h_conv(an: _Analysis, i, n):
    x, w = n.input[0], n.input[1]
    W = an.const(w)
    if W is None:
        raise _Unsupported("non-constant weight")
    lay = an.layouts.get(x)
    if lay is None or lay.axis != 1:
        raise _Unsupported("channels not on axis 1")
    G = int(_attr(n, "group", 1))
    cout, cpg = W.shape[0], W.shape[1]
    cin = cpg * G
    name, out = an.names[i], n.output[0]
    has_b = len(n.input) > 2 and n.input[2]
    if has_b and n.input[2] not in an.consts:
        raise _Unsupported("non-constant bias")
    if G > 1 and cpg == 1 and cout == cin:  # depthwise: channel i in -> channel i out
        an.set_layout(out, 1, lay.elems)
        an.slices.append(_Slice(i, 1, 0, out))
        if has_b:
            an.slices.append(_Slice(i, 2, 0, out))
        an.recs.append(_Rec("setgroup", i, out))
        an.refs.append((out, ChannelRef(name, n.op_type, "dw", w)))
        an.macs.append(_Mac(i, [out]))
        return
    if G > 1 and cpg == 1:
        raise _Unsupported("depthwise conv with channel multiplier")
    an.set_layout(out, 1, an.new_root(cout))
    an.slices.append(_Slice(i, 1, 1, x, block=G))
    an.slices.append(_Slice(i, 1, 0, out))
    if has_b:
        an.slices.append(_Slice(i, 2, 0, out))
    an.refs.append((x, ChannelRef(name, n.op_type, "in", w)))
    an.refs.append((out, ChannelRef(name, n.op_type, "out", w)))
    if G > 1:
        an.blocks.append((x, G, name))
        an.blocks.append((out, G, name))
    an.macs.append(_Mac(i, [out, x]))


def _h_convtranspose(an: _Analysis, i, n):
    x, w = n.input[0], n.input[1]
    W = an.const(w)
    if W is None:
        raise _Unsupported("non-constant weight")
    lay = an.layouts.get(x)
    if lay is None or lay.axis != 1:
        raise _Unsupported("channels not on axis 1")
    if int(_attr(n, "group", 1)) != 1:
        raise _Unsupported("grouped ConvTranspose")
    if len(n.input) > 2 and n.input[2] and n.input[2] not in an.consts:
        raise _Unsupported("non-constant bias")
    name, out = an.names[i], n.output[0]
    an.set_layout(out, 1, an.new_root(W.shape[1]))
    an.slices.append(_Slice(i, 1, 0, x))
    an.slices.append(_Slice(i, 1, 1, out))
    if len(n.input) > 2 and n.input[2]:
        an.slices.append(_Slice(i, 2, 0, out))
    an.refs.append((x, ChannelRef(name, n.op_type, "in", w)))
    an.refs.append((out, ChannelRef(name, n.op_type, "out", w)))
    an.macs.append(_Mac(i, [out, x]))


def _h_gemm(an: _Analysis, i, n):
    a, b = n.input[0], n.input[1]
    B = an.const(b)
    lay = an.layouts.get(a)
    if B is None or B.ndim != 2 or lay is None:
        raise _Unsupported("Gemm needs a tracked A and a constant 2-D B")
    if int(_attr(n, "transA", 0)):
        raise _Unsupported("transposed A")
    name, out = an.names[i], n.output[0]
    # tracked elements on the row axis (e.g. the sequence axis of a [S, D] token matrix that a MatMul + Add became
    # after cleanup): they stop here, but the output columns are still this layer's own channels
    on_rows = lay.axis != 1
    if on_rows:
        an.close(a, f"channels on the Gemm row axis (Gemm node {name})")
    tb = int(_attr(n, "transB", 0))
    N = B.shape[0] if tb else B.shape[1]
    an.set_layout(out, 1, an.new_root(N))
    if not on_rows:
        an.slices.append(_Slice(i, 1, 1 if tb else 0, a))
    an.slices.append(_Slice(i, 1, 0 if tb else 1, out))
    if len(n.input) > 2 and n.input[2]:
        C = an.const(n.input[2])
        if C is None:
            raise _Unsupported("non-constant C")
        if C.ndim >= 1 and C.shape[-1] == N and N > 1:
            an.slices.append(_Slice(i, 2, C.ndim - 1, out))
        if C.ndim == 2 and C.shape[0] > 1:
            raise _Unsupported("C varies along rows")
    if not on_rows:
        an.refs.append((a, ChannelRef(name, n.op_type, "in", b)))
    an.refs.append((out, ChannelRef(name, n.op_type, "out", b)))
    an.macs.append(_Mac(i, [out] if on_rows else [out, a]))


def _h_matmul(an: _Analysis, i, n):
    a, b = n.input[0], n.input[1]
    B = an.const(b)
    lay = an.layouts.get(a)
    if lay is None or b in an.layouts:
        raise _Unsupported("MatMul of two activations")
    if B is None or B.ndim != 2:
        raise _Unsupported("MatMul needs a constant 2-D B")
    r = an.rank(a)
    name, out = an.names[i], n.output[0]
    if r is None or r < 2:
        raise _Unsupported("MatMul input of unknown rank")
    if lay.axis == r - 1:
        an.set_layout(out, r - 1, an.new_root(B.shape[1]))
        an.slices.append(_Slice(i, 1, 0, a))
        an.slices.append(_Slice(i, 1, 1, out))
        an.refs.append((a, ChannelRef(name, n.op_type, "in", b)))
        an.refs.append((out, ChannelRef(name, n.op_type, "out", b)))
        an.macs.append(_Mac(i, [out, a]))
    elif lay.axis < r - 2:  # channels on a batch-like axis: passed through
        an.set_layout(out, lay.axis, lay.elems)
        an.macs.append(_Mac(i, [out]))
    else:
        # the tracked axis is the row axis (e.g. the sequence axis of a [B, S, D] graph input seeded as axis 1):
        # those elements stop here, but the last axis of the output is still this layer's own output channels
        an.close(a, f"channels on the MatMul row axis (MatMul node {name})")
        an.set_layout(out, r - 1, an.new_root(B.shape[1]))
        an.slices.append(_Slice(i, 1, 1, out))
        an.refs.append((out, ChannelRef(name, n.op_type, "out", b)))
        an.macs.append(_Mac(i, [out]))


def _h_bn(an: _Analysis, i, n):
    x, out = n.input[0], n.output[0]
    lay = an.layouts[x]
    if lay.axis != 1:
        raise _Unsupported("channels not on axis 1")
    for k in range(1, 5):
        if n.input[k] not in an.consts:
            raise _Unsupported("non-constant BatchNormalization parameters")
    if any(o for o in n.output[1:]):
        raise _Unsupported("training-mode BatchNormalization")
    an.set_layout(out, 1, lay.elems)
    for k in range(1, 5):
        an.slices.append(_Slice(i, k, 0, out))
    an.refs.append((out, ChannelRef(an.names[i], n.op_type, "bn", n.input[1])))


def _h_instnorm(an: _Analysis, i, n):
    x, out = n.input[0], n.output[0]
    lay = an.layouts[x]
    if lay.axis != 1 or any(n.input[k] not in an.consts for k in (1, 2)):
        raise _Unsupported("channels not on axis 1 or non-constant parameters")
    an.set_layout(out, 1, lay.elems)
    an.slices.append(_Slice(i, 1, 0, out))
    an.slices.append(_Slice(i, 2, 0, out))
    an.refs.append((out, ChannelRef(an.names[i], n.op_type, "norm", n.input[1])))


def _h_layernorm(an: _Analysis, i, n):
    x = n.input[0]
    lay = an.layouts[x]
    r = an.rank(x)
    a = _norm_axis(int(_attr(n, "axis", -1)), r)
    if lay.axis >= a:
        raise _Unsupported("normalizes over the channel axis (its statistics would change)")
    for k in (1, 2):
        if len(n.input) > k and n.input[k] and n.input[k] in an.layouts:
            raise _Unsupported("tracked scale")
    an.set_layout(n.output[0], lay.axis, lay.elems)
    for o in n.output[1:]:
        if o and an.users.get(o):
            raise _Unsupported("uses mean/inv-std outputs")


def _h_groupnorm(an: _Analysis, i, n):
    raise _Unsupported("GroupNormalization couples channels inside each norm group")


def _h_pool(an: _Analysis, i, n):
    lay = an.layouts[n.input[0]]
    if lay.axis != 1:
        raise _Unsupported("channels not on axis 1")
    if len(n.output) > 1 and n.output[1] and an.users.get(n.output[1]):
        raise _Unsupported("MaxPool indices encode channel positions")
    an.set_layout(n.output[0], 1, lay.elems)


def _h_reduce(an: _Analysis, i, n):
    x = n.input[0]
    lay = an.layouts[x]
    r = an.rank(x)
    axes = _attr(n, "axes", None)
    if axes is None and len(n.input) > 1 and n.input[1]:
        if n.input[1] not in an.consts:
            raise _Unsupported("non-constant axes")
        axes = an.consts[n.input[1]].tolist()
    if not axes:
        if int(_attr(n, "noop_with_empty_axes", 0)):
            an.set_layout(n.output[0], lay.axis, lay.elems)
            return
        raise _Unsupported("reduces over the channel axis")
    axes = sorted(_norm_axis(int(a), r) for a in axes)
    if lay.axis in axes:
        raise _Unsupported("reduces over the channel axis")
    keep = int(_attr(n, "keepdims", 1))
    ax = lay.axis if keep else lay.axis - sum(1 for a in axes if a < lay.axis)
    an.set_layout(n.output[0], ax, lay.elems)


def _h_softmax(an: _Analysis, i, n):
    x = n.input[0]
    lay = an.layouts[x]
    r = an.rank(x)
    if _norm_axis(int(_attr(n, "axis", -1)), r) == lay.axis:
        raise _Unsupported("normalizes over the channel axis")
    an.set_layout(n.output[0], lay.axis, lay.elems)


def _h_shape(an: _Analysis, i, n):
    """Shape of a tracked tensor: fine when only non-channel dims are read (Gather with constant indices)."""
    lay = an.layouts[n.input[0]]
    r = an.rank(n.input[0])
    lo = _norm_axis(int(_attr(n, "start", 0)), r)
    hi = _attr(n, "end", None)
    hi = r if hi is None else min(_norm_axis(int(hi), r), r)
    if not lo <= lay.axis < hi:
        return
    for u, k in an.users.get(n.output[0], []):
        un = an.nodes[u]
        if un.op_type != "Gather" or k != 0 or un.input[1] not in an.real_consts:
            raise _Unsupported("reads the channel count")
        idx = np.asarray(an.consts[un.input[1]]).reshape(-1)
        if any(_norm_axis(int(v), r) - lo == lay.axis - lo for v in idx):
            raise _Unsupported("reads the channel count")


def _h_transpose(an: _Analysis, i, n):
    lay = an.layouts[n.input[0]]
    r = an.rank(n.input[0])
    perm = _attr(n, "perm", None) or list(range(r))[::-1]
    an.set_layout(n.output[0], list(perm).index(lay.axis), lay.elems)


def _axes_input(an, n, k=1):
    axes = _attr(n, "axes", None)
    if axes is None and len(n.input) > k and n.input[k]:
        if n.input[k] not in an.consts:
            raise _Unsupported("non-constant axes")
        axes = an.consts[n.input[k]].tolist()
    return axes


def _h_squeeze(an: _Analysis, i, n):
    x = n.input[0]
    lay = an.layouts[x]
    r = an.rank(x)
    axes = _axes_input(an, n)
    if axes is None:
        s = an.shape(x)
        if s is None or -1 in s:
            raise _Unsupported("unknown shape")
        axes = [k for k, d in enumerate(s) if d == 1]
    axes = [_norm_axis(int(a), r) for a in axes]
    if lay.axis in axes:
        raise _Unsupported("squeezes the channel axis")
    an.set_layout(n.output[0], lay.axis - sum(1 for a in axes if a < lay.axis), lay.elems)


def _h_unsqueeze(an: _Analysis, i, n):
    x = n.input[0]
    lay = an.layouts[x]
    r = an.rank(x)
    axes = _axes_input(an, n)
    ro = r + len(axes)
    axes = sorted(_norm_axis(int(a), ro) for a in axes)
    kept = [k for k in range(ro) if k not in axes]
    an.set_layout(n.output[0], kept[lay.axis], lay.elems)


def _h_flatten(an: _Analysis, i, n):
    x = n.input[0]
    lay = an.layouts[x]
    s = an.shape(x)
    if s is None or any(d <= 0 for d in s[1:]):
        raise _Unsupported("unknown shape")
    a = _norm_axis(int(_attr(n, "axis", 1)), len(s))
    if lay.axis < a:
        raise _Unsupported("channel axis flattened into the row axis")
    inner = int(np.prod(s[lay.axis + 1:])) if lay.axis + 1 < len(s) else 1
    outer = int(np.prod(s[a:lay.axis])) if lay.axis > a else 1
    an.set_layout(n.output[0], 1, np.tile(np.repeat(lay.elems, inner), outer))


def _h_reshape(an: _Analysis, i, n):
    x, sh, out = n.input[0], n.input[1], n.output[0]
    lay = an.layouts[x]
    S = an.shape(x)
    T = an.shape(out)
    if sh not in an.consts or S is None or T is None or any(d <= 0 for d in S) or any(d <= 0 for d in T):
        raise _Unsupported("shape not static")
    spec = an.consts[sh].tolist()
    ax = lay.axis
    lead = int(np.prod(S[:ax]))
    j = next((k for k in range(len(T) + 1) if int(np.prod(T[:k])) == lead), None)
    if j is None or j >= len(T):
        raise _Unsupported("reshape splits the channel axis")
    m = next((m for m in range(len(S) - ax) if int(np.prod(S[:ax + 1 + m])) == int(np.prod(T[:j + 1]))), None)
    if m is None:
        raise _Unsupported("reshape splits the channel axis")
    # dims before j must not depend on the channel count; dims after j neither
    if spec[j] == 0 and not (j == ax and m == 0):
        raise _Unsupported("reshape copies a dim across the channel axis")
    if any(v == -1 for k, v in enumerate(spec) if k != j) and spec[j] == -1:
        raise _Unsupported("ambiguous reshape")
    inner = int(np.prod(S[ax + 1:ax + 1 + m])) if m else 1
    an.set_layout(out, j, np.repeat(lay.elems, inner))
    if spec[j] not in (-1, 0):
        if sh not in an.real_consts:
            raise _Unsupported("computed reshape target")
        an.recs.append(_Rec("reshape", i, out, {"index": j}))
    an.refs.append((out, ChannelRef(an.names[i], n.op_type, "reshape", sh)))


def _h_concat(an: _Analysis, i, n):
    out = n.output[0]
    R = an.rank(out)
    ax = _norm_axis(int(_attr(n, "axis", 0)), R)
    tracked = [x for x in n.input if x in an.layouts]
    laxes = {an.layouts[x].axis for x in tracked}
    if len(laxes) != 1:
        raise _Unsupported("inputs carry channels on different axes")
    lax = laxes.pop()
    if lax == ax:
        parts = []
        for x in n.input:
            if x in an.layouts:
                parts.append(an.layouts[x].elems)
            else:
                s = an.shape(x) if x not in an.consts else an.consts[x].shape
                if s is None or s[ax] <= 0:
                    raise _Unsupported("input of unknown size")
                parts.append(an.new_root(int(s[ax]), f"concatenated with an untracked tensor ({an.names[i]})"))
        an.set_layout(out, ax, np.concatenate(parts))
        an.refs.append((out, ChannelRef(an.names[i], n.op_type, "concat")))
    else:
        if len(tracked) != len([x for x in n.input if x]):
            raise _Unsupported("concatenation with an untracked tensor along another axis")
        base = an.layouts[tracked[0]].elems
        for x in tracked[1:]:
            an.unify(base, an.layouts[x].elems)
        an.set_layout(out, lax, base)


def _split_sizes(an: _Analysis, n, dim: int) -> list[int]:
    sp = _attr(n, "split", None)
    if sp is None and len(n.input) > 1 and n.input[1]:
        if n.input[1] not in an.consts:
            raise _Unsupported("non-constant split sizes")
        sp = an.consts[n.input[1]].tolist()
    if sp is None:
        k = len(n.output)
        q = -(-dim // k)
        sp = [q] * (k - 1) + [dim - q * (k - 1)]
    return [int(v) for v in sp]


def _h_split(an: _Analysis, i, n):
    x = n.input[0]
    lay = an.layouts[x]
    r = an.rank(x)
    ax = _norm_axis(int(_attr(n, "axis", 0)), r)
    if ax != lay.axis:
        for o in n.output:
            an.set_layout(o, lay.axis, lay.elems)
        return
    sizes = _split_sizes(an, n, len(lay.elems))
    off = 0
    for o, s in zip(n.output, sizes):
        an.set_layout(o, ax, lay.elems[off:off + s])
        off += s
    if len(n.input) > 1 and n.input[1] and n.input[1] not in an.real_consts:
        raise _Unsupported("computed split sizes")
    an.recs.append(_Rec("split", i, x, {"sizes": sizes}))
    an.refs.append((x, ChannelRef(an.names[i], n.op_type, "split")))


def _h_slice(an: _Analysis, i, n):
    x = n.input[0]
    lay = an.layouts[x]
    r = an.rank(x)
    if len(n.input) < 3:
        raise _Unsupported("attribute-form Slice")
    for k in range(1, len(n.input)):
        if n.input[k] and n.input[k] not in an.consts:
            raise _Unsupported("non-constant slice bounds")
    starts = an.consts[n.input[1]].tolist()
    ends = an.consts[n.input[2]].tolist()
    axes = an.consts[n.input[3]].tolist() if len(n.input) > 3 and n.input[3] else list(range(len(starts)))
    steps = an.consts[n.input[4]].tolist() if len(n.input) > 4 and n.input[4] else [1] * len(starts)
    elems = lay.elems
    for k, a in enumerate(axes):
        if _norm_axis(int(a), r) != lay.axis:
            continue
        if steps[k] != 1:
            raise _Unsupported("strided slice of the channel axis")
        if n.input[1] not in an.real_consts or n.input[2] not in an.real_consts:
            raise _Unsupported("computed slice bounds on the channel axis")
        lo, hi, _ = slice(int(starts[k]), int(ends[k]), 1).indices(len(elems))
        hi = max(hi, lo)
        an.recs.append(_Rec("slice", i, x, {"k": k, "lo": lo, "hi": hi}))
        an.refs.append((x, ChannelRef(an.names[i], n.op_type, "slice", None, lo)))
        elems = elems[lo:hi]
    an.set_layout(n.output[0], lay.axis, elems)


def _h_resize(an: _Analysis, i, n):
    x = n.input[0]
    lay = an.layouts[x]
    sc_idx, sz_idx = (1, None) if n.op_type == "Upsample" else (2, 3)
    for k in range(1, len(n.input)):
        if n.input[k] and n.input[k] not in an.consts:
            raise _Unsupported("non-constant resize parameters")
    if len(n.input) > sc_idx and n.input[sc_idx] and an.consts[n.input[sc_idx]].size:
        if float(an.consts[n.input[sc_idx]][lay.axis]) != 1.0:
            raise _Unsupported("resizes the channel axis")
    if _attr(n, "axes", None) is not None:
        raise _Unsupported("Resize with axes")
    an.set_layout(n.output[0], lay.axis, lay.elems)
    if sz_idx and len(n.input) > sz_idx and n.input[sz_idx] and an.consts[n.input[sz_idx]].size:
        if n.input[sz_idx] not in an.real_consts:
            raise _Unsupported("computed resize sizes")
        an.recs.append(_Rec("resize", i, n.output[0], {"index": lay.axis, "inp": sz_idx}))
        an.refs.append((x, ChannelRef(an.names[i], n.op_type, "resize")))


def _h_pad(an: _Analysis, i, n):
    x = n.input[0]
    lay = an.layouts[x]
    r = an.rank(x)
    pads = _attr(n, "pads", None)
    if pads is None:
        if n.input[1] not in an.consts:
            raise _Unsupported("non-constant pads")
        pads = an.consts[n.input[1]].tolist()
    axes = list(range(r))
    if len(n.input) > 3 and n.input[3]:
        if n.input[3] not in an.consts:
            raise _Unsupported("non-constant axes")
        axes = [_norm_axis(int(a), r) for a in an.consts[n.input[3]].tolist()]
    h = len(pads) // 2
    for k, a in enumerate(axes):
        if a == lay.axis and (pads[k] != 0 or pads[k + h] != 0):
            raise _Unsupported("pads the channel axis")
    if len(n.input) > 2 and n.input[2] and n.input[2] in an.layouts:
        raise _Unsupported("tracked pad value")
    an.set_layout(n.output[0], lay.axis, lay.elems)


_HANDLERS = {
    "Conv": _h_conv, "ConvTranspose": _h_convtranspose, "Gemm": _h_gemm, "MatMul": _h_matmul,
    "BatchNormalization": _h_bn, "InstanceNormalization": _h_instnorm, "LayerNormalization": _h_layernorm,
    "GroupNormalization": _h_groupnorm, "Transpose": _h_transpose, "Squeeze": _h_squeeze,
    "Unsqueeze": _h_unsqueeze, "Flatten": _h_flatten, "Reshape": _h_reshape, "Concat": _h_concat,
    "Split": _h_split, "Slice": _h_slice, "Shape": _h_shape, "Resize": _h_resize, "Upsample": _h_resize, "Pad": _h_pad,
}


# ----------------------------------------------------------------------------------------------- groups

_CACHE: "OrderedDict[bytes, tuple[_Analysis, list[Group]]]" = OrderedDict()
_CACHE_SIZE = 6


def _fingerprint(model: onnx.ModelProto) -> bytes:
    """Structure of the model: nodes, initializer names/dims/types, small integer constants, graph I/O."""
    h = hashlib.blake2b(digest_size=20)
    g = model.graph
    for n in g.node:
        h.update(n.SerializeToString())
    for i in g.initializer:
        h.update(f"{i.name}|{tuple(i.dims)}|{i.data_type};".encode())
        if i.data_type not in _PARAM_TYPES and int(np.prod(i.dims)) <= 64:
            h.update(i.SerializeToString())
    for vi in list(g.input) + list(g.output):
        h.update(vi.SerializeToString())
    return h.digest()


def _analysis(model: onnx.ModelProto) -> tuple[_Analysis, list[Group]]:
    """The analysis of the model's structure (cached by structure; weight values are always read from `model`)."""
    key = _fingerprint(model)
    hit = _CACHE.get(key)
    if hit is None:
        hit = _CACHE[key] = _build_analysis(model)
        while len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
    else:
        _CACHE.move_to_end(key)
    return hit[0], copy.deepcopy(hit[1])


def _build_analysis(model: onnx.ModelProto) -> tuple[_Analysis, list[Group]]:
    an = _Analysis(model)
    extra_reason: dict[int, str] = {}
    # grouped conv: the group must fill the whole blocked tensor in canonical order
    align = np.ones(an.ngroups, np.int64)
    for t, G, name in an.blocks:
        gs = np.unique(an.t_groups(t))
        ok = len(gs) == 1
        if ok:
            pos = an.positions(t, int(gs[0]))
            ok = pos.shape[1] == 1 and np.array_equal(pos[:, 0], np.arange(len(pos))) and len(pos) % G == 0
        for g in gs:
            g = int(g)
            if not ok:
                extra_reason.setdefault(g, f"grouped conv {name} (group={G}) mixes channel groups")
            else:
                align[g] = math.lcm(int(align[g]), G)
    # users of one initializer that slice it alike form a class; apply gives every changed class its own copy
    per_use: dict[tuple[int, int], dict] = {}
    for s_ in an.slices:
        per_use.setdefault((s_.node, s_.inp), {})[(s_.axis, s_.block)] = s_.t
    an.init_classes = {}
    for (node, inp), specs in per_use.items():
        nm = an.nodes[node].input[inp]
        key = frozenset((ax, bl, an.t_comps[t].tobytes()) for (ax, bl), t in specs.items())
        classes = an.init_classes.setdefault(nm, {})
        classes.setdefault(key, (specs, []))[1].append((node, inp))
    for nm, classes in an.init_classes.items():
        sliced = {u for _, uses in classes.values() for u in uses}
        rest = [u for u in an.users.get(nm, []) if u not in sliced]
        if rest:
            classes[frozenset()] = ({}, rest)
    groups = []
    refs_by_group: dict[int, list[tuple[str, ChannelRef]]] = {}
    for t, ref in an.refs:
        for g in np.unique(an.t_groups(t)):
            refs_by_group.setdefault(int(g), []).append((t, ref))
    tensors_by_group: dict[int, list[tuple[str, int]]] = {}
    for t in an.order:
        tg = an.t_groups(t)
        for g in np.unique(tg):
            tensors_by_group.setdefault(int(g), []).append((t, int(np.argmax(tg == g))))
    for gid in range(an.ngroups):
        size = len(an.group_comps[gid])
        reason = an.group_reason[gid] or extra_reason.get(gid)
        if reason is None and size < 2:
            reason = "only 1 channel"
        if reason is None and size % int(align[gid]):
            reason = f"size {size} is not a multiple of the grouped-conv alignment {int(align[gid])}"
        prods, cons, others = [], [], []
        for t, ref in refs_by_group.get(gid, []):
            pos = an.positions(t, gid)
            r = ChannelRef(ref.node, ref.op, ref.role, ref.weight, int(pos.min()))
            (prods if r.role == "out" else cons if r.role == "in" else others).append(r)
        st, so, sa = _stat_tensor(an, gid, cons, prods)
        groups.append(Group(id=gid, size=size, producers=prods, consumers=cons, others=others,
                            tensors=tensors_by_group.get(gid, []), stat_tensor=st, stat_offset=so,
                            prunable=reason is None, reason=reason, align=int(align[gid]), stat_axis=sa))
    an.groups = groups
    return an, groups


_WALK_BACK = {"GlobalAveragePool", "GlobalMaxPool", "Flatten", "Reshape", "Squeeze", "Unsqueeze", "MaxPool",
              "AveragePool", "Pad", "Resize", "Identity", "Dropout", "Concat", "Split", "Slice"}


def _contig(an: _Analysis, t: str, gid: int):
    if t not in an.layouts:
        return None
    tg = an.t_groups(t)
    if not (tg == gid).any():
        return None
    pos = an.positions(t, gid)
    if pos.shape[1] != 1 or not np.array_equal(pos[:, 0], np.arange(len(pos)) + pos[0, 0]):
        return None
    return int(pos[0, 0])


def _stat_tensor(an: _Analysis, gid: int, cons, prods):
    name_to_idx = {nm: k for k, nm in enumerate(an.names)}
    cands = []
    for r in cons:
        cands.append(an.nodes[name_to_idx[r.node]].input[0])
    for r in prods:
        cands.append(an.nodes[name_to_idx[r.node]].output[0])
    cands += [t for t in an.order]
    for t in cands:
        off = _contig(an, t, gid)
        if off is None:
            continue
        # walk back through pooling/flatten to the (spatial) post-activation tensor
        for _ in range(8):
            p = an.producer_of.get(t)
            if p is None or an.nodes[p].op_type not in _WALK_BACK or (an.rank(t) or 0) >= 3:
                break
            src = an.nodes[p].input[0]
            o2 = _contig(an, src, gid)
            if o2 is None:
                break
            t, off = src, o2
        return t, off, an.layouts[t].axis
    return None, 0, 1


def analyze(model: onnx.ModelProto) -> list[Group]:
    """Dependency groups of channels that must shrink together (see the module docstring)."""
    return _analysis(model)[1]


# ----------------------------------------------------------------------------------------------- weights

def _node_index(an: _Analysis, name: str) -> int:
    return an.names.index(name)


class _Reader:
    """Current values of a model's constants (initializers and Constant nodes), converted on demand."""

    def __init__(self, model: onnx.ModelProto):
        self.inits = {i.name: i for i in model.graph.initializer}
        self.cnodes = {n.output[0]: n for n in model.graph.node if n.op_type == "Constant"}

    def __getitem__(self, name: str) -> np.ndarray:
        if name in self.inits:
            return numpy_helper.to_array(self.inits[name])
        return numpy_helper.to_array(next(a.t for a in self.cnodes[name].attribute if a.name == "value"))


def _group_slices_of_weight(an: _Analysis, rd: _Reader, gid: int, node_idx: int, inp: int, want: str):
    """Per-channel slices (size, k) of node.input[inp] along the axis driven by the group (want='out'|'in')."""
    W = rd[an.nodes[node_idx].input[inp]]
    for s in an.slices:
        if s.node != node_idx or s.inp != inp or not (an.t_groups(s.t) == gid).any():
            continue
        n = an.nodes[node_idx]
        if s.t != (n.output[0] if want == "out" else n.input[0]):
            continue
        pos = an.positions(s.t, gid)
        if s.block > 1:
            G = s.block
            rows = W.shape[0] // G
            cpg = W.shape[1]
            out = []
            for p in pos[:, 0]:
                b, j = divmod(int(p), cpg)
                out.append(W[b * rows:(b + 1) * rows, j].reshape(-1))
            return np.stack(out)
        Wm = np.moveaxis(W, s.axis, 0)
        return Wm[pos.reshape(-1)].reshape(pos.shape[0], -1)
    return None


def producer_weights(model: onnx.ModelProto, g: Group) -> list[np.ndarray]:
    """(g.size, k) out-channel slices of each producer weight (conv axis 0, Gemm output rows), depthwise convs included."""
    an, _ = _analysis(model)
    rd = _Reader(model)
    res = []
    for r in g.producers + [o for o in g.others if o.role == "dw"]:
        w = _group_slices_of_weight(an, rd, g.id, _node_index(an, r.node), 1, "out")
        if w is not None:
            res.append(w)
    return res


def consumer_weights(model: onnx.ModelProto, g: Group) -> list[np.ndarray]:
    """(g.size, k) input-channel slices of each consumer weight (grouped convs: that channel's block rows)."""
    an, _ = _analysis(model)
    rd = _Reader(model)
    res = []
    for r in g.consumers:
        w = _group_slices_of_weight(an, rd, g.id, _node_index(an, r.node), 1, "in")
        if w is not None:
            res.append(w)
    return res


def bn_scales(model: onnx.ModelProto, g: Group) -> np.ndarray | None:
    """|gamma| / sqrt(var + eps) of the first unfused BatchNormalization on the group, else |c| of a per-channel Mul."""
    an, _ = _analysis(model)
    rd = _Reader(model)
    for role in ("bn", "scale"):
        for r in g.others:
            if r.role != role or (role == "scale" and r.op != "Mul"):
                continue
            i = _node_index(an, r.node)
            n = an.nodes[i]
            t = n.output[0]
            pos = an.positions(t, g.id)[:, 0]
            if role == "bn":
                eps = float(_attr(n, "epsilon", 1e-5))
                gamma, var = rd[n.input[1]], rd[n.input[4]]
                return (np.abs(gamma) / np.sqrt(var + eps))[pos].astype(np.float64)
            for s in an.slices:
                if s.node == i:
                    c = np.moveaxis(rd[n.input[s.inp]], s.axis, 0)
                    return np.abs(c[pos].reshape(len(pos), -1)).mean(1).astype(np.float64)
    return None


def consumer_layers(model: onnx.ModelProto, g: Group) -> list[dict]:
    """Conv/Gemm/MatMul layers consuming the group: node, op, input, output, weight, bias, channel_offset, positions."""
    an, _ = _analysis(model)
    res = []
    for r in g.consumers:
        i = _node_index(an, r.node)
        n = an.nodes[i]
        bias = n.input[2] if len(n.input) > 2 and n.input[2] else None
        pos = an.positions(n.input[0], g.id)
        res.append({"node": r.node, "op": n.op_type, "input": n.input[0], "output": n.output[0],
                    "weight": n.input[1], "bias": bias, "channel_offset": int(pos.min()),
                    "positions": pos, "group": int(_attr(n, "group", 1)),
                    "trans_b": int(_attr(n, "transB", 0)) if n.op_type == "Gemm" else 0})
    return res


# ----------------------------------------------------------------------------------------------- helpers

def round_keep(g: Group, n: float, round_to: int = 1) -> int:
    """A valid kept count near n on the group's grid: multiples of lcm(round_to, align), or of align when that lcm
    exceeds the group (allocate.unit); the group's size is always valid."""
    from edgec.passes.prune.allocate import round_keep as _round

    return _round(n, g.size, round_to, g.align)


def select_channels(g: Group, scores: np.ndarray, n_keep: int) -> np.ndarray:
    """Sorted indices of the n_keep highest-scoring channels, equally many per alignment block."""
    scores = np.asarray(scores, np.float64)
    a = max(1, g.align)
    if n_keep % a:
        raise ValueError(f"group {g.id}: kept count {n_keep} is not a multiple of its alignment {a}")
    bs = g.size // a
    per = n_keep // a
    keep = []
    for b in range(a):
        sl = scores[b * bs:(b + 1) * bs]
        top = np.argsort(-sl, kind="stable")[:per]
        keep.append(np.sort(top) + b * bs)
    return np.concatenate(keep).astype(np.int64)


# ----------------------------------------------------------------------------------------------- costs

class CostModel:
    """(MACs, params) as a function of kept channels per group; exact against passes.costs.count_costs."""

    def __init__(self, model: onnx.ModelProto, groups: list[Group] | None = None, input_shapes: dict | None = None):
        from edgec.passes.costs import count_costs

        an, gs = _analysis(model)
        if groups is not None:
            _check_groups(gs, groups)
        self.sizes = {g.id: g.size for g in gs}
        base = count_costs(model, input_shapes)
        self.base_macs = int(base.macs)
        self.base_params = int(base.params)
        self._tensors: dict[str, tuple[int, dict[int, int]]] = {}

        def lin(t):
            if t not in self._tensors:
                self._tensors[t] = (len(an.layouts[t].elems), an.counts(t))
            return t

        self._mac_terms = []
        for m in an.macs:
            name = an.names[m.node]
            b = base.per_node.get(name, 0)
            if b:
                self._mac_terms.append((b, [lin(t) for t in m.factors if t in an.layouts]))
        init_size = {i.name: int(np.prod(i.dims)) for i in model.graph.initializer
                     if i.data_type in _PARAM_TYPES and len(i.dims) >= 1}
        for n in model.graph.node:  # Constant nodes count as params too (passes.costs.count_params)
            if n.op_type == "Constant":
                for a in n.attribute:
                    if a.name == "value" and a.t.data_type in _FLOAT_TYPES and len(a.t.dims) >= 1:
                        init_size[n.output[0]] = int(np.prod(a.t.dims))
        # per initializer: its size and, per class of users, the tensors driving each sliced axis
        self._param_terms = []
        for nm, classes in an.init_classes.items():
            if nm in init_size:
                cls = [[lin(t) for t in specs.values()] for specs, _ in classes.values()]
                self._param_terms.append((init_size[nm], cls))

    def _kept(self, t: str, keep: dict[int, int]) -> float:
        total, counts = self._tensors[t]
        return sum(r * keep.get(g, self.sizes[g]) for g, r in counts.items()) / total

    def costs(self, keep: dict[int, int]) -> tuple[int, int]:
        """(macs, params) when group g keeps keep[g] channels (groups not in keep keep all)."""
        cache: dict[str, float] = {}

        def f(t):
            if t not in cache:
                cache[t] = self._kept(t, keep)
            return cache[t]

        macs = self.base_macs
        for b, ts in self._mac_terms:
            p = 1.0
            for t in ts:
                p *= f(t)
            macs += b * p - b
        params = self.base_params
        for size, cls in self._param_terms:
            if len(cls) == 1:
                p = 1.0
                for t in cls[0]:
                    p *= f(t)
                params += size * p - size
                continue
            # shared initializer: each changed class gets its own copy; the original stays if any class is unchanged
            orig, extra = False, 0.0
            for ts in cls:
                p = 1.0
                for t in ts:
                    p *= f(t)
                if p >= 1.0:
                    orig = True
                else:
                    extra += size * p
            params += extra - (0 if orig else size)
        return int(round(macs)), int(round(params))


_FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16}
_PARAM_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16,
                onnx.TensorProto.INT8, onnx.TensorProto.UINT8, onnx.TensorProto.INT4, onnx.TensorProto.UINT4}


def _check_groups(ours: list[Group], theirs: list[Group]) -> None:
    if len(ours) != len(theirs) or any(a.id != b.id or a.size != b.size for a, b in zip(ours, theirs)):
        raise ValueError("groups do not belong to this model (re-run analyze on it)")
