"""The segment walk (passes/prune/walk.py) gives the least-squares refit the values a run from the inputs gives.

For every small graph with prunable groups: prune every group, refit all their consumers (and, `downstream`-style,
every later linear layer) with walk_segments on and off; the refit weights agree to float32 rounding (relative
1e-5) and every node ran once per sample per walk (at most one session per requested layer). A walker also answers
requests for tensors a refit changed after they ran (a residual partner computed ahead of its own refit) with the
refit values.
"""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from edgec.passes.prune import recover as R
from edgec.passes.prune.apply import remove_channels
from edgec.passes.prune.graph import analyze, consumer_layers
from edgec.passes.prune.walk import Walker
from edgec.testing import prune_models as pm


def _feeds(model, n, seed=0):
    shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    rng = np.random.default_rng(seed)
    return [{model.graph.input[0].name: rng.standard_normal(shape).astype(np.float32)} for _ in range(n)]


def _pruned(model):
    gs = analyze(model)
    keep = {}
    for g in gs:
        if g.prunable and g.size >= 2:
            bs = g.size // g.align
            per = max(1, bs // 2)
            keep[g.id] = np.concatenate([b * bs + np.arange(per) for b in range(g.align)])
    # every linear layer; a pruned group's producer is refit on the reference channels it still produces
    outs, skip = {}, set()
    for g in gs:
        for r in g.producers + [o for o in g.others if o.role == "dw"]:
            if g.id in keep:
                outs.setdefault(r.node, []).append(keep[g.id] + r.offset)
    for node, parts in outs.items():
        if len(parts) > 1:
            skip.add(node)
    layers = [n.name for n in model.graph.node if n.op_type in ("Conv", "Gemm", "MatMul") and n.name not in skip]
    return remove_channels(model, keep, gs)[0], layers, {k: v[0] for k, v in outs.items() if k not in skip}


@pytest.mark.parametrize("name", sorted(pm.GRAPHS))
def test_walk_equals_prefix_runs(name):
    model = pm.GRAPHS[name]()
    pruned, layers, out_ch = _pruned(model)
    feeds = _feeds(model, 10)
    out = {}
    for walk in (True, False):
        out[walk] = R.lstsq_refit(pruned, model, layers, lambda: iter(feeds), samples=10, ridge=0.3,
                                  min_rows_factor=0.0, walk_segments=walk, out_channels=out_ch)
    (a, sa), (b, sb) = out[True], out[False]
    assert sa.keys() == sb.keys()
    refit = [k for k, v in sb.items() if "skipped" not in v]
    assert refit, f"{name}: nothing was refit"
    ia = {t.name: numpy_helper.to_array(t) for t in a.graph.initializer}
    ib = {t.name: numpy_helper.to_array(t) for t in b.graph.initializer}
    assert ia.keys() == ib.keys()
    changed = 0
    p0 = {t.name: numpy_helper.to_array(t) for t in pruned.graph.initializer}
    for k in ia:
        assert pm.rel_diff(ia[k], ib[k]) <= 1e-5, (name, k)
        changed += k not in p0 or not np.array_equal(ib[k], p0[k])
    assert changed  # the refit did something, so the comparison can fail


def test_walker_runs_each_node_once_and_restarts_after_a_change():
    model = pm.GRAPHS["residual"]()
    feeds = _feeds(model, 3)
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    w = Walker(model, feeds)
    ref = {}
    for n in convs:
        got = w.need([n.input[0]])
        sess_vals = [R.stream_pair(model, [n.input[0]], [f]) for f in feeds]
        for g, it in zip(got, sess_vals):
            assert pm.rel_diff(g[n.input[0]], next(it)[n.input[0]]) <= 1e-6
        ref[n.name] = got
    assert w.sessions <= len(convs)
    # change a conv that already ran: its later consumers must see the new weights
    first = convs[0]
    W = next(t for t in model.graph.initializer if t.name == first.input[1])
    W.CopyFrom(numpy_helper.from_array(2 * numpy_helper.to_array(W), W.name))
    w.changed(first.name)
    last = convs[-1].input[0]
    got = w.need([last])
    want = [next(R.stream_pair(model, [last], [f]))[last] for f in feeds]
    for g, v in zip(got, want):
        assert pm.rel_diff(g[last], v) <= 1e-6
    assert not np.allclose(got[0][last], ref[convs[-1].name][0][last])


def _late_downsample():
    """A bottleneck whose downsample conv comes after the main branch in node order (as torchvision exports it)."""
    b = pm.GraphBuilder()
    x = b.act(b.conv("input", 3, 8), "relu")
    y = b.act(b.conv(x, 8, 6, k=1), "relu")
    y = b.conv(y, 6, 12)
    d = b.conv(x, 8, 12, k=1)
    t = b.act(b.add(y, d), "relu")
    return b.build(b.head(t, 12))


def test_walk_with_a_partner_run_ahead_of_its_refit():
    """The residual partner (downsample) runs early for the branch's refit; its own refit then needs its input,
    which the state had dropped: the walk restarts and gives the prefix runs' values."""
    model = _late_downsample()
    layers = [n.name for n in model.graph.node if n.op_type in ("Conv", "Gemm")]
    feeds = _feeds(model, 8)
    a, sa = R.lstsq_refit(model, model, layers, lambda: iter(feeds), samples=8, min_rows_factor=0.0,
                          walk_segments=True)
    b, sb = R.lstsq_refit(model, model, layers, lambda: iter(feeds), samples=8, min_rows_factor=0.0,
                          walk_segments=False)
    assert [k for k, v in sb.items() if v.get("residual_target")], "no residual partner in the test graph"
    ia = {t.name: numpy_helper.to_array(t) for t in a.graph.initializer}
    for t in b.graph.initializer:
        assert pm.rel_diff(ia[t.name], numpy_helper.to_array(t)) <= 1e-5, t.name
