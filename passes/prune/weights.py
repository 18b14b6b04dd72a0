"""A group's weights, read from the model passed in (the analysis says where; the values are never cached): producer
and consumer weight slices per channel, BatchNorm / scale factors, and the consumer layers refits work on."""
from __future__ import annotations

import numpy as np
import onnx

from edgec.core.graph import Graph, attr
from edgec.passes.prune import groups as _groups
from edgec.passes.prune.analysis import _Analysis
from edgec.passes.prune.layout import Group


def _node_index(an: _Analysis, name: str) -> int:
    return an.names.index(name)


def _group_slices_of_weight(an: _Analysis, rd: Graph, gid: int, node_idx: int, inp: int, want: str):
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
    an, _ = _groups._analysis(model)
    rd = Graph(model)
    res = []
    for r in g.producers + [o for o in g.others if o.role == "dw"]:
        w = _group_slices_of_weight(an, rd, g.id, _node_index(an, r.node), 1, "out")
        if w is not None:
            res.append(w)
    return res


def consumer_weights(model: onnx.ModelProto, g: Group) -> list[np.ndarray]:
    """(g.size, k) input-channel slices of each consumer weight (grouped convs: that channel's block rows)."""
    an, _ = _groups._analysis(model)
    rd = Graph(model)
    res = []
    for r in g.consumers:
        w = _group_slices_of_weight(an, rd, g.id, _node_index(an, r.node), 1, "in")
        if w is not None:
            res.append(w)
    return res


def bn_scales(model: onnx.ModelProto, g: Group) -> np.ndarray | None:
    """|gamma| / sqrt(var + eps) of the first unfused BatchNormalization on the group, else |c| of a per-channel Mul."""
    an, _ = _groups._analysis(model)
    rd = Graph(model)
    for role in ("bn", "scale"):
        for r in g.others:
            if r.role != role or (role == "scale" and r.op != "Mul"):
                continue
            i = _node_index(an, r.node)
            n = an.nodes[i]
            t = n.output[0]
            pos = an.positions(t, g.id)[:, 0]
            if role == "bn":
                eps = float(attr(n, "epsilon", 1e-5))
                gamma, var = rd[n.input[1]], rd[n.input[4]]
                return (np.abs(gamma) / np.sqrt(var + eps))[pos].astype(np.float64)
            for s in an.slices:
                if s.node == i:
                    c = np.moveaxis(rd[n.input[s.inp]], s.axis, 0)
                    return np.abs(c[pos].reshape(len(pos), -1)).mean(1).astype(np.float64)
    return None


def consumer_layers(model: onnx.ModelProto, g: Group) -> list[dict]:
    """Conv/Gemm/MatMul layers consuming the group: node, op, input, output, weight, bias, channel_offset, positions."""
    an, _ = _groups._analysis(model)
    res = []
    for r in g.consumers:
        i = _node_index(an, r.node)
        n = an.nodes[i]
        bias = n.input[2] if len(n.input) > 2 and n.input[2] else None
        pos = an.positions(n.input[0], g.id)
        res.append({"node": r.node, "op": n.op_type, "input": n.input[0], "output": n.output[0],
                    "weight": n.input[1], "bias": bias, "channel_offset": int(pos.min()),
                    "positions": pos, "group": int(attr(n, "group", 1)),
                    "trans_b": int(attr(n, "transB", 0)) if n.op_type == "Gemm" else 0})
    return res
