"""Per-op layout handlers of the channel analysis: how each op passes, couples, cuts or closes the channel layouts of
its inputs (passes/prune/graph.py explains the idea). A handler raises _Unsupported to close what the node touches."""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from edgec.core.graph import attr
from edgec.passes.prune.layout import ChannelRef, _Mac, _norm_axis, _Rec, _Slice, _Unsupported

if TYPE_CHECKING:
    from edgec.passes.prune.analysis import _Analysis


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


def _conv_operands(an: _Analysis, n):
    """(x, w, W, layout of x) of a Conv/ConvTranspose whose weight is constant and whose channels are on axis 1."""
    x, w = n.input[0], n.input[1]
    W = an.const(w)
    if W is None:
        raise _Unsupported("non-constant weight")
    lay = an.layouts.get(x)
    if lay is None or lay.axis != 1:
        raise _Unsupported("channels not on axis 1")
    return x, w, W, lay


def _h_conv(an: _Analysis, i, n):
    x, w, W, lay = _conv_operands(an, n)
    G = int(attr(n, "group", 1))
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
    x, w, W, lay = _conv_operands(an, n)
    if int(attr(n, "group", 1)) != 1:
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
    if int(attr(n, "transA", 0)):
        raise _Unsupported("transposed A")
    name, out = an.names[i], n.output[0]
    # tracked elements on the row axis (e.g. the sequence axis of a [S, D] token matrix that a MatMul + Add became
    # after cleanup): they stop here, but the output columns are still this layer's own channels
    on_rows = lay.axis != 1
    if on_rows:
        an.close(a, f"channels on the Gemm row axis (Gemm node {name})")
    tb = int(attr(n, "transB", 0))
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
    a = _norm_axis(int(attr(n, "axis", -1)), r)
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
    axes = attr(n, "axes", None)
    if axes is None and len(n.input) > 1 and n.input[1]:
        if n.input[1] not in an.consts:
            raise _Unsupported("non-constant axes")
        axes = an.consts[n.input[1]].tolist()
    if not axes:
        if int(attr(n, "noop_with_empty_axes", 0)):
            an.set_layout(n.output[0], lay.axis, lay.elems)
            return
        raise _Unsupported("reduces over the channel axis")
    axes = sorted(_norm_axis(int(a), r) for a in axes)
    if lay.axis in axes:
        raise _Unsupported("reduces over the channel axis")
    keep = int(attr(n, "keepdims", 1))
    ax = lay.axis if keep else lay.axis - sum(1 for a in axes if a < lay.axis)
    an.set_layout(n.output[0], ax, lay.elems)


def _h_softmax(an: _Analysis, i, n):
    x = n.input[0]
    lay = an.layouts[x]
    r = an.rank(x)
    if _norm_axis(int(attr(n, "axis", -1)), r) == lay.axis:
        raise _Unsupported("normalizes over the channel axis")
    an.set_layout(n.output[0], lay.axis, lay.elems)


def _h_shape(an: _Analysis, i, n):
    """Shape of a tracked tensor: fine when only non-channel dims are read (Gather with constant indices)."""
    lay = an.layouts[n.input[0]]
    r = an.rank(n.input[0])
    lo = _norm_axis(int(attr(n, "start", 0)), r)
    hi = attr(n, "end", None)
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
    perm = attr(n, "perm", None) or list(range(r))[::-1]
    an.set_layout(n.output[0], list(perm).index(lay.axis), lay.elems)


def _axes_input(an, n, k=1):
    axes = attr(n, "axes", None)
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
    a = _norm_axis(int(attr(n, "axis", 1)), len(s))
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
    ax = _norm_axis(int(attr(n, "axis", 0)), R)
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
    sp = attr(n, "split", None)
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
    ax = _norm_axis(int(attr(n, "axis", 0)), r)
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
    if attr(n, "axes", None) is not None:
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
    pads = attr(n, "pads", None)
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
