"""Channel groups of a model: the analysis (passes/prune/analysis.py) turned into Groups, with each group's statistics
tensor, cached by graph structure (weight values are never cached: they are always read from the model passed in)."""
from __future__ import annotations

import contextlib
import copy
import hashlib
import math
from collections import OrderedDict

import numpy as np
import onnx

from edgec.passes.prune.analysis import _Analysis
from edgec.passes.prune.layout import _PARAM_TYPES, ChannelRef, Group

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


_MEMO: dict | None = None  # id(model) -> (model, result) while `memo_by_identity` is active


@contextlib.contextmanager
def memo_by_identity():
    """While one pass runs, the analysis of a model object is computed once (the pass asks for it many times on the
    same, unchanged model); outside, every call re-reads the model (through the structural cache below)."""
    global _MEMO
    outer, _MEMO = _MEMO, ({} if _MEMO is None else _MEMO)
    try:
        yield
    finally:
        _MEMO = outer


def _analysis(model: onnx.ModelProto) -> tuple[_Analysis, list[Group]]:
    """The analysis of the model's structure (cached by structure; weight values are always read from `model`)."""
    if _MEMO is not None:
        hit = _MEMO.get(id(model))
        if hit is not None and hit[0] is model:
            return hit[1]
    key = _fingerprint(model)
    hit = _CACHE.get(key)
    if hit is None:
        hit = _CACHE[key] = _build_analysis(model)
        while len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
    else:
        _CACHE.move_to_end(key)
    res = hit[0], copy.deepcopy(hit[1])
    if _MEMO is not None:
        _MEMO[id(model)] = (model, res)
    return res


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
