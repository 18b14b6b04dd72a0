"""Channel removal is exact when the removed channels contribute exactly nothing.

For each small graph: zero every consumer weight reading a chosen subset of each prunable group's channels
(or, for act(0) = 0 graphs, zero the producers' output rows and biases), remove those channels, and require
max|y_pruned - y_zeroed| / max|y_zeroed| <= 1e-5 in ONNX Runtime with graph optimizations off; the checker and
strict shape inference pass, op counts are unchanged and initializers shrink as predicted.
"""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgec.passes.costs import count_costs
from edgec.passes.prune.apply import remove_channels
from edgec.passes.prune.graph import CostModel, analyze, consumer_layers
from edgec.core.onnx_io import check_model
from edgec.testing import prune_models as pm

RTOL = 1e-5


def _choose_removed(g, rng) -> np.ndarray:
    """Channels to remove: about a third, at least one, equally many per alignment block, never all."""
    bs = g.size // g.align
    n_rm = max(1, bs // 3)
    rm = []
    for b in range(g.align):
        rm.extend(b * bs + rng.choice(bs, size=n_rm, replace=False))
    return np.sort(np.asarray(rm, np.int64))


def _prune_zeroed(model, rng, mode="consumer", only=None):
    groups = analyze(model)
    todo = [g for g in groups if g.prunable and (only is None or g.id in only)]
    zeroed = model
    keep = {}
    for g in todo:
        rm = _choose_removed(g, rng)
        if mode == "consumer":
            zeroed = pm.zero_consumer_inputs(zeroed, consumer_layers(zeroed, g), rm)
        keep[g.id] = np.setdiff1d(np.arange(g.size), rm)
    if mode == "producer":
        zeroed = _zero_producers(zeroed, groups, {gid: np.setdiff1d(np.arange(groups[gid].size), k)
                                                  for gid, k in keep.items()})
    pruned, stats = remove_channels(zeroed, keep, groups)
    return groups, zeroed, pruned, stats, keep


def _zero_producers(model, groups, removed):
    from edgec.passes.prune.graph import _analysis

    out = onnx.ModelProto()
    out.CopyFrom(model)
    an, _ = _analysis(out)
    arrs = pm.init_arrays(out)
    for gid, rm in removed.items():
        g = groups[gid]
        for r in g.producers + [o for o in g.others if o.role == "dw"]:
            n = next(n for n in out.graph.node if n.name == r.node)
            pos = an.positions(n.output[0], gid)[rm, 0]
            for k in (1, 2):
                if len(n.input) > k and n.input[k]:
                    A = arrs[n.input[k]].copy()
                    trans_b = any(a.name == "transB" and a.i for a in n.attribute)
                    out_axis_1 = n.op_type in ("ConvTranspose", "MatMul") or (n.op_type == "Gemm" and not trans_b)
                    if k == 1 and out_axis_1:
                        A[:, pos] = 0
                    else:
                        A[pos] = 0
                    arrs[n.input[k]] = A
                    pm.set_init(out, n.input[k], A)
    return out


def _check(model, zeroed, pruned, groups, keep, must_change=True) -> float:
    hw = model.graph.input[0].type.tensor_type.shape.dim[2].dim_value
    x = np.random.default_rng(1).standard_normal((1, 3, hw, hw)).astype(np.float32)
    y0 = pm.run(model, x)
    yz = pm.run(zeroed, x)
    yp = pm.run(pruned, x)
    # the zeroing did something (so this test can fail), and removal reproduces it exactly
    changed = pm.rel_diff(yz, y0)
    if must_change:
        assert changed > 1e-4
    err = pm.rel_diff(yp, yz)
    assert err <= RTOL, f"pruned vs zeroed relative error {err:.2e}"
    onnx.checker.check_model(pruned, full_check=True)
    check_model(pruned)
    assert pm.op_counts(pruned) == pm.op_counts(model)
    assert [o.name for o in pruned.graph.output] == [o.name for o in model.graph.output]
    assert {n.name for n in pruned.graph.node} == {n.name for n in model.graph.node}
    # weights shrank exactly as predicted, cost model agrees with count_costs
    arrs = pm.init_arrays(pruned)
    before = pm.init_arrays(zeroed)
    nodes = {n.name: n for n in pruned.graph.node}
    expect: dict[str, int] = {}
    for gid, k in keep.items():
        for r in groups[gid].producers:
            expect[r.node] = expect.get(r.node, 0) + groups[gid].size - len(k)
    for name, removed in expect.items():
        n = nodes[name]
        trans_b = any(a.name == "transB" and a.i for a in n.attribute)
        axis = 1 if n.op_type in ("ConvTranspose", "MatMul") or (n.op_type == "Gemm" and not trans_b) else 0
        assert arrs[n.input[1]].shape[axis] == before[n.input[1]].shape[axis] - removed, name
    cm = CostModel(zeroed, groups)
    macs, params = cm.costs({g: len(k) for g, k in keep.items()})
    real = count_costs(pruned)
    assert macs == real.macs and params == real.params
    assert real.macs < cm.base_macs
    return changed


@pytest.mark.parametrize("name", sorted(pm.GRAPHS))
def test_exact_consumer_zeroed(name):
    model = pm.GRAPHS[name]()
    groups, zeroed, pruned, stats, keep = _prune_zeroed(model, np.random.default_rng(0))
    assert keep, f"{name}: no prunable group"
    assert stats["groups_pruned"] == len(keep)
    _check(model, zeroed, pruned, groups, keep)


@pytest.mark.parametrize("name", ["chain", "chain_nobias", "residual", "concat", "silu", "split", "slice",
                                  "conv_transpose", "flatten_gemm"])
def test_exact_producer_zeroed(name):
    """act(0) = 0 graphs: zeroing producer rows and biases makes the channel identically 0."""
    model = pm.GRAPHS[name]()
    groups, zeroed, pruned, stats, keep = _prune_zeroed(model, np.random.default_rng(2), mode="producer")
    _check(model, zeroed, pruned, groups, keep)


@pytest.mark.parametrize("name", sorted(pm.GRAPHS))
def test_each_group_alone(name):
    """Pruning one group at a time is exact too (catches couplings hidden by pruning everything together)."""
    model = pm.GRAPHS[name]()
    changes = []
    for g in analyze(model):
        if not g.prunable:
            continue
        groups, zeroed, pruned, _, keep = _prune_zeroed(model, np.random.default_rng(g.id), only={g.id})
        changes.append(_check(model, zeroed, pruned, groups, keep, must_change=False))
    assert max(changes) > 1e-4  # a removed channel could be dead by chance, not all of them


# ----------------------------------------------------------------------------------------------- property test

BLOCKS = ["conv", "dw", "grouped", "residual", "concat", "split", "se", "silu", "hardswish", "bn", "convt",
          "resize", "slice", "nhwc_mlp", "pad", "lrn"]


def _random_model(blocks: list[str], widths: list[int], seed: int, flatten_head: bool = False) -> onnx.ModelProto:
    b = pm.GraphBuilder(seed=seed)
    c = 4
    x = b.act(b.conv("input", 3, c), "relu")
    for blk, w in zip(blocks, widths):
        if blk == "conv":
            x, c = b.act(b.conv(x, c, w), "relu"), w
        elif blk == "dw":
            e = b.act(b.conv(x, c, w, k=1), "relu6")
            e = b.act(b.conv(e, w, w, group=w), "relu6")
            x, c = b.conv(e, w, c, k=1), c
        elif blk == "grouped":
            w4 = 4 * max(1, w // 4)
            e = b.act(b.conv(x, c, w4, k=1), "relu")
            x, c = b.act(b.conv(e, w4, w4, group=4), "relu"), w4
        elif blk == "residual":
            y = b.act(b.conv(x, c, w), "relu")
            x = b.act(b.add(x, b.conv(y, w, c)), "relu")
        elif blk == "concat":
            y = b.act(b.conv(x, c, w, k=1), "relu")
            x, c = b.concat([x, y]), c + w
        elif blk == "split":
            s = max(1, c // 3)
            p, q = b.split(x, [s, c - s])
            x, c = b.concat([b.act(b.conv(p, s, w), "relu"), q]), w + c - s
        elif blk == "slice":
            s = max(1, c // 2)
            x, c = b.concat([b.slice(x, 0, s), b.act(b.conv(b.slice(x, s, c), c - s, w), "relu")]), s + w
        elif blk == "se":
            x = b.se(x, c, max(2, w // 2))
        elif blk in ("silu", "hardswish"):
            x, c = b.act(b.conv(x, c, w), blk), w
        elif blk == "bn":
            x, c = b.act(b.bn(b.conv(x, c, w, bias=False), w), "relu"), w
        elif blk == "convt":
            x, c = b.act(b.conv_t(x, c, w), "relu"), w
        elif blk == "resize":
            x = b.maxpool(b.resize(x))
        elif blk == "pad":
            x = b.node("AveragePool", [b.pad(x)], kernel_shape=[3, 3])[0]
        elif blk == "lrn":  # not understood: closes what it touches, the rest stays prunable
            x = b.node("LRN", [x], size=3)[0]
        elif blk == "nhwc_mlp":  # Transpose -> MatMul+bias -> GELU(erf) -> MatMul -> Transpose, residual
            t = b.node("Transpose", [x], perm=[0, 2, 3, 1])[0]
            h = b.node("Add", [b.node("MatMul", [t, b.const(b.w(c, w))])[0], b.const(b.w(w, scale=0.1))])[0]
            e = b.node("Erf", [b.node("Div", [h, b.const(np.array(1.4142135, np.float32))])[0]])[0]
            h = b.node("Mul", [h, b.node("Add", [e, b.const(np.array(1.0, np.float32))])[0]])[0]
            o = b.node("Transpose", [b.node("MatMul", [h, b.const(b.w(w, c))])[0]], perm=[0, 3, 1, 2])[0]
            x = b.add(x, o)
    if flatten_head:
        hw = b.hw
        return b.build(b.head(x, c, flatten_spatial=hw * hw))
    return b.build(b.head(x, c))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
@given(st.lists(st.sampled_from(BLOCKS), min_size=1, max_size=6), st.data())
def test_random_architectures_exact(blocks, data):
    widths = [data.draw(st.integers(3, 12)) for _ in blocks]
    seed = data.draw(st.integers(0, 1000))
    model = _random_model(blocks, widths, seed, flatten_head=data.draw(st.booleans()))
    rng = np.random.default_rng(seed)
    groups, zeroed, pruned, stats, keep = _prune_zeroed(model, rng)
    if not keep:  # everything closed (e.g. only LRN blocks): each closed group says why, nothing changes
        assert all(g.reason for g in groups) and "lrn" in blocks
        assert len(pruned.graph.node) == len(model.graph.node)
        return
    _check(model, zeroed, pruned, groups, keep)


@pytest.mark.parametrize("form", ["matmul", "cleaned"])
def test_exact_transformer_mlp_hidden_channels(form):
    """[B, S, D] MatMul attention block: the graph input seeds its sequence axis, which closes at the first MatMul
    (or, after cleanup turned MatMul + Add into Reshape -> Gemm -> Reshape, at the Gemm's row axis); the MLP hidden
    channels (linear -> Erf-GELU -> linear) still form a prunable group, and removing consumer-zeroed channels is
    exact on both outputs (hidden states and logits)."""
    import onnx.tools.update_model_dims as U

    from edgec.passes.base import PassContext, get_pass, make_options
    from edgec.core.onnx_io import ort_session
    from edgec.testing import realworld_models as rw

    model = U.update_inputs_outputs_dims(rw.attention_model(), {"tokens": [1, 16, 32]},
                                         {"hidden": [1, 16, 32], "logits": [1, 10]})
    model = onnx.shape_inference.infer_shapes(model)
    if form == "cleaned":
        spec = get_pass("cleanup")
        model = spec.fn(model, PassContext(calib_batches=lambda: iter(())), make_options(spec, {})).model
        assert pm.op_counts(model)["Gemm"] >= 4 and pm.op_counts(model)["MatMul"] == 2
    groups = analyze(model)
    mlp = [g for g in groups if g.prunable]
    assert [g.size for g in mlp] == [128] and len(mlp[0].producers) == 1 and len(mlp[0].consumers) == 1
    rm = np.arange(0, 128, 3)
    zeroed = pm.zero_consumer_inputs(model, consumer_layers(model, mlp[0]), rm)
    keep = {mlp[0].id: np.setdiff1d(np.arange(128), rm)}
    pruned, stats = remove_channels(zeroed, keep, groups)
    x = {"tokens": np.random.default_rng(1).standard_normal((1, 16, 32)).astype(np.float32)}
    y0, yz, yp = (ort_session(m, optimize=False).run(None, x) for m in (model, zeroed, pruned))
    for a0, az, ap in zip(y0, yz, yp):
        assert pm.rel_diff(az, a0) > 1e-4
        assert pm.rel_diff(ap, az) <= RTOL
    onnx.checker.check_model(pruned, full_check=True)
    assert pm.op_counts(pruned) == pm.op_counts(model)
    assert count_costs(pruned).macs < count_costs(model).macs
