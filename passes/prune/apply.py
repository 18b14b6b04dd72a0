"""Physical channel removal: rewrite a model so that each group keeps only the given channels.

For every channel-carrying tensor t the kept mask is m(t)[p] = (channel at position p is kept). Then
  initializers   W' = compress(W, m(t), axis) along each channel axis recorded by the analysis
                 (grouped conv input axis: W'[rows of block b] = W[rows of block b][:, m(x)[block b]]);
  attributes     depthwise group' = sum m(y);
  shape consts   Split sizes' = per-piece sum m; Slice start' = sum m[:start], end' = start' + sum m[start:end];
                 Reshape/Resize channel entry' = sum m(y).
Node and tensor names stay; nodes that no longer reach an output are dropped. Groups touching graph inputs or
outputs are never prunable, so graph inputs and outputs keep their shapes.
"""
from __future__ import annotations

import logging

import numpy as np
import onnx
from edgec.core.graph import Graph, attr, del_attr, opset, set_attr
from edgec.passes.prune.graph import Group, _analysis, _check_groups

log = logging.getLogger(__name__)

__all__ = ["remove_channels"]


def _validate(g: Group, idx) -> np.ndarray:
    idx = np.asarray(idx, dtype=np.int64).reshape(-1)
    if idx.size == 0:
        raise ValueError(f"group {g.id}: cannot keep 0 channels")
    if idx.min() < 0 or idx.max() >= g.size or (np.diff(idx) <= 0).any():
        raise ValueError(f"group {g.id}: kept indices must be sorted, unique and in [0, {g.size})")
    if idx.size < g.size and not g.prunable:
        raise ValueError(f"group {g.id} is not prunable: {g.reason}")
    if g.align > 1 and idx.size < g.size:
        bs = g.size // g.align
        counts = np.bincount(idx // bs, minlength=g.align)
        if (counts != counts[0]).any():
            raise ValueError(f"group {g.id}: keep equally many channels in each of its {g.align} blocks "
                             f"of {bs} (grouped conv); got {counts.tolist()}")
    return idx


def _slice_array(arr: np.ndarray, axis: int, block: int, mask: np.ndarray) -> np.ndarray:
    if block > 1:  # grouped conv input axis: W (Cout, Cin/G, ...), mask over Cin
        G = block
        rows = arr.shape[0] // G
        cpg = arr.shape[1]
        parts = [arr[b * rows:(b + 1) * rows][:, mask[b * cpg:(b + 1) * cpg]] for b in range(G)]
        return np.concatenate(parts, axis=0)
    if arr.shape[axis] != mask.size:
        raise RuntimeError(f"internal: axis {axis} of shape {arr.shape} does not match {mask.size} channels")
    return np.compress(mask, arr, axis=axis)


def _drop_dead(model: onnx.ModelProto) -> int:
    g = model.graph
    needed = {o.name for o in g.output}
    keep = []
    for n in reversed(list(g.node)):
        if any(o in needed for o in n.output if o):
            keep.append(n)
            needed.update(x for x in n.input if x)
    keep.reverse()
    dropped = len(g.node) - len(keep)
    if dropped:
        nodes = [onnx.NodeProto() for _ in keep]
        for a, b in zip(nodes, keep):
            a.CopyFrom(b)
        del g.node[:]
        g.node.extend(nodes)
    unused = [i for i in g.initializer if i.name not in needed]
    for i in unused:
        g.initializer.remove(i)
    return dropped


def _self_check(model: onnx.ModelProto) -> onnx.ModelProto:
    """Checker + strict shape inference on the rewritten graph: a bug here must fail loudly, never ship a broken graph."""
    if model.ByteSize() >= 1_800_000_000:
        return model
    try:
        onnx.checker.check_model(model)
        strict = all(n.domain in ("", "ai.onnx") for n in model.graph.node)  # custom ops have no shape functions
        return onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=strict, data_prop=True)
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise RuntimeError(f"channel removal produced an invalid graph (please report): {first}") from None


def _slice_initializers(an, consts: Graph, nodes: list, mask) -> None:
    """W' = compress(W, m(t), axis) for every channel axis of every initializer."""
    # initializers: users slicing alike share one array; with several classes each changed class gets a copy
    for nm, classes in an.init_classes.items():
        classes = list(classes.values())
        for specs, uses in classes:
            if all(mask(t).all() for t in specs.values()):
                continue
            arr = consts[nm]
            for (axis, block), t in sorted(specs.items(), key=lambda kv: -kv[0][1]):
                arr = _slice_array(arr, axis, block, mask(t))
            if len(classes) == 1:
                consts.set_const(nm, arr)
                continue
            node = nodes[uses[0][0]]
            new = f"{nm}__{node.name or node.op_type}"
            while consts.taken(new):
                new += "_"
            consts.add_initializer(new, arr)
            for ni, k in uses:
                nodes[ni].input[k] = new


def _rewrite_shape_records(an, consts: Graph, nodes: list, mask, opset_v: int) -> None:
    """Depthwise group counts, Split sizes, Slice bounds and Reshape/Resize channel entries after removal."""
    for r in an.recs:
        m = mask(r.t)
        if m.all():
            continue
        node = nodes[r.node]
        if r.kind == "setgroup":
            set_attr(node, "group", int(m.sum()))
        elif r.kind == "split":
            sizes, off, new = r.data["sizes"], 0, []
            for s in sizes:
                new.append(int(m[off:off + s].sum()))
                off += s
            arr = np.asarray(new, np.int64)
            if attr(node, "split", None) is not None:
                set_attr(node, "split", new)
            elif len(node.input) > 1 and node.input[1]:
                consts.write_input(node, 1, arr)
            elif opset_v < 13:
                set_attr(node, "split", new)
            else:
                del_attr(node, "num_outputs")
                name = f"{node.name or 'split'}_sizes"
                while consts.taken(name):
                    name += "_"
                consts.add_initializer(name, arr)
                while len(node.input) < 2:
                    node.input.append("")
                node.input[1] = name
        elif r.kind == "slice":
            k, lo, hi = r.data["k"], r.data["lo"], r.data["hi"]
            nlo = int(m[:lo].sum())
            nhi = nlo + int(m[lo:hi].sum())
            for inp, v in ((1, nlo), (2, nhi)):
                arr = consts[node.input[inp]].copy()
                arr[k] = v
                consts.write_input(node, inp, arr)
        elif r.kind in ("reshape", "resize"):
            inp = 1 if r.kind == "reshape" else r.data["inp"]
            arr = consts[node.input[inp]].copy()
            arr[r.data["index"]] = int(m.sum())
            consts.write_input(node, inp, arr)


def remove_channels(model: onnx.ModelProto, keep: dict[int, np.ndarray],
                    groups: list[Group] | None = None) -> tuple[onnx.ModelProto, dict]:
    """Keep only channels keep[g] (sorted indices within group g) of each group; returns (new model, stats)."""
    an, gs = _analysis(model)
    if groups is not None:
        _check_groups(gs, groups)
    removed = np.zeros(an.ncomp, dtype=bool)
    kept_count = {}
    for gid, idx in keep.items():
        if not 0 <= int(gid) < len(gs):
            raise ValueError(f"unknown group id {gid}")
        g = gs[int(gid)]
        idx = _validate(g, idx)
        kept_count[g.id] = int(idx.size)
        if idx.size == g.size:
            continue
        m = np.ones(g.size, dtype=bool)
        m[idx] = False
        removed[an.group_comps[g.id][m]] = True

    out = onnx.ModelProto()
    out.CopyFrom(model)
    nodes = list(out.graph.node)
    consts = Graph(out)
    masks: dict[str, np.ndarray] = {}

    def mask(t: str) -> np.ndarray:
        if t not in masks:
            masks[t] = ~removed[an.t_comps[t]]
        return masks[t]

    _slice_initializers(an, consts, nodes, mask)
    _rewrite_shape_records(an, consts, nodes, mask, opset(out))

    dropped = _drop_dead(out)
    del out.graph.value_info[:]
    if removed.any():
        out = _self_check(out)
    rows = []
    for g in gs:
        k = kept_count.get(g.id, g.size)
        rows.append({"id": g.id, "size": g.size, "kept": k, "prunable": g.prunable, "reason": g.reason,
                     "members": [f"{r.node}:{r.role}" for r in g.producers + g.consumers + g.others]})
    stats = {"groups": rows,
             "groups_pruned": sum(1 for r in rows if r["kept"] < r["size"]),
             "groups_prunable": sum(1 for r in rows if r["prunable"]),
             "channels_removed": int(sum(r["size"] - r["kept"] for r in rows)),
             "nodes_dropped": dropped}
    return out, stats
