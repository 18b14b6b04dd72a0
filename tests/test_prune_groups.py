"""Dependency-group structure: which channels are coupled, which groups are closed and why, and the API helpers."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

from edgec.passes.costs import count_costs
from edgec.passes.prune.apply import remove_channels
from edgec.passes.prune.graph import (CostModel, analyze, bn_scales, consumer_layers, consumer_weights, producer_weights,
                                round_keep, select_channels)
from edgec.testing import prune_models as pm


def _by_producers(groups):
    return {tuple(sorted(r.node for r in g.producers)): g for g in groups}


def _prunable(groups):
    return [g for g in groups if g.prunable]


def test_chain_groups_and_weights():
    model = pm.chain()
    groups = analyze(model)
    pr = _prunable(groups)
    assert [g.size for g in pr] == [8, 12, 16]
    g = pr[0]
    assert [r.node for r in g.producers] == ["conv1"] and [r.node for r in g.consumers] == ["conv3"]
    assert g.producers[0].role == "out" and g.consumers[0].role == "in"
    assert g.stat_tensor == "relu2_out0" and g.stat_offset == 0 and g.stat_axis == 1
    assert [w.shape for w in producer_weights(model, g)] == [(8, 3 * 9)]
    assert [w.shape for w in consumer_weights(model, g)] == [(8, 12 * 9)]
    W = pm.init_arrays(model)[g.producers[0].weight]
    np.testing.assert_array_equal(producer_weights(model, g)[0][5], W[5].reshape(-1))
    assert bn_scales(model, g) is None
    # the graph input and the head output are closed
    closed = [g for g in groups if not g.prunable]
    assert any("graph input" in g.reason for g in closed) and any("graph output" in g.reason for g in closed)


def test_residual_couples_all_adds():
    groups = analyze(pm.residual())
    trunk = max(groups, key=lambda g: len(g.producers))
    assert sorted(r.node for r in trunk.producers) == ["conv1", "conv10", "conv5"]
    assert trunk.prunable and trunk.size == 8
    inner = [g for g in _prunable(groups) if g is not trunk]
    assert sorted(g.size for g in inner) == [6, 6]


def test_depthwise_moves_with_its_input():
    model = pm.depthwise()
    g = next(g for g in analyze(model) if any(r.role == "dw" for r in g.others))
    assert g.size == 12 and [r.node for r in g.producers] == ["conv1"]
    assert [w.shape for w in producer_weights(model, g)] == [(12, 3), (12, 9)]  # 1x1 expand + depthwise
    keep = np.arange(0, 12, 2)
    pruned, _ = remove_channels(model, {g.id: keep})
    dw = next(n for n in pruned.graph.node if n.name == "conv3")
    assert next(a.i for a in dw.attribute if a.name == "group") == 6


def test_grouped_conv_alignment():
    model = pm.grouped()
    groups = analyze(model)
    g = next(g for g in groups if g.prunable and g.align > 1 and g.size == 16)
    assert g.align == 4
    with pytest.raises(ValueError, match="equally many"):
        remove_channels(model, {g.id: np.arange(8)}, groups)  # blocks 0,1 kept whole, 2,3 emptied
    keep = select_channels(g, np.arange(16.0), 8)
    assert keep.tolist() == [2, 3, 6, 7, 10, 11, 14, 15]
    pruned, _ = remove_channels(model, {g.id: keep}, groups)
    onnx.checker.check_model(pruned, full_check=True)
    assert round_keep(g, 7.0) % 4 == 0 and round_keep(g, 0.2) == 4


def test_se_block_couples_trunk_and_expand():
    groups = analyze(pm.se_block())
    trunk = next(g for g in groups if any(r.node == "conv1" for r in g.producers))
    assert sorted(r.node for r in trunk.producers) == ["conv1", "conv7"]  # trunk conv + SE expand conv
    squeeze = next(g for g in groups if any(r.node == "conv5" for r in g.producers))
    assert squeeze.size == 4 and squeeze.prunable and squeeze is not trunk
    assert sorted(r.node for r in trunk.consumers) == ["conv10", "conv5"]  # SE squeeze conv + next conv


def test_concat_offsets():
    model = pm.concat()
    groups = analyze(model)
    layers = {}
    for g in _prunable(groups):
        for L in consumer_layers(model, g):
            if L["node"] == "conv8":
                layers[g.size] = L["channel_offset"]
    assert layers == {6: 0, 10: 6, 8: 16}


def test_split_makes_separate_groups_of_one_producer():
    groups = analyze(pm.split())
    parts = [g for g in groups if [r.node for r in g.producers] == ["conv1"]]
    assert sorted(g.size for g in parts) == [4, 8]
    assert all(any(r.role == "split" for r in g.others) for g in parts)


def test_flatten_gemm_rows_per_channel():
    model = pm.flatten_gemm()
    g = next(g for g in analyze(model) if any(r.node == "conv3" for r in g.producers))
    cw = consumer_weights(model, g)
    assert [w.shape for w in cw] == [(6, 16 * 12)]
    B = pm.init_arrays(model)[g.consumers[0].weight]
    np.testing.assert_array_equal(cw[0][2], B[32:48].reshape(-1))


def test_unfused_bn_scales():
    model = pm.unfused_bn()
    groups = analyze(model)
    g = next(g for g in groups if any(r.node == "conv1" for r in g.producers))
    s = bn_scales(model, g)
    arrs = pm.init_arrays(model)
    bn = next(n for n in model.graph.node if n.name == "batchnormalization2")
    ref = np.abs(arrs[bn.input[1]]) / np.sqrt(arrs[bn.input[4]] + 1e-5)
    np.testing.assert_allclose(s, ref, rtol=1e-6)
    assert sum(r.role == "bn" for r in g.others) == 2  # its own BN and the BN on the concatenation


def test_unsupported_op_closes_group_with_reason():
    b = pm.GraphBuilder()
    x = b.act(b.conv("input", 3, 8), "relu")
    y = b.node("LRN", [x], size=3)[0]
    y = b.act(b.conv(y, 8, 6), "relu")
    model = b.build(b.head(y, 6))
    groups = analyze(model)
    g = next(g for g in groups if any(r.node == "conv1" for r in g.producers))
    assert not g.prunable and "unsupported op" in g.reason and "LRN" in g.reason
    later = next(g for g in groups if any(r.node == "conv4" for r in g.producers))
    assert later.prunable
    with pytest.raises(ValueError, match="not prunable"):
        remove_channels(model, {g.id: np.arange(4)})


def test_channel_shuffle_reshape_is_closed():
    b = pm.GraphBuilder()
    x = b.act(b.conv("input", 3, 8), "relu")
    r = b.node("Reshape", [x, b.const(np.array([1, 2, 4, 8, 8], np.int64))])[0]
    t = b.node("Transpose", [r], perm=[0, 2, 1, 3, 4])[0]
    y = b.node("Reshape", [t, b.const(np.array([1, 8, 8, 8], np.int64))])[0]
    y = b.act(b.conv(y, 8, 6), "relu")
    model = b.build(b.head(y, 6))
    groups = analyze(model)
    g = next(g for g in groups if any(r.node == "conv1" for r in g.producers))
    assert not g.prunable and "splits the channel axis" in g.reason
    assert next(g for g in groups if any(r.node == "conv6" for r in g.producers)).prunable


def _nhwc_mlp_model():
    """ConvNeXt-style block: dw conv -> NHWC -> LayerNorm -> MatMul+bias -> GELU(erf) -> MatMul+bias -> NCHW -> Add."""
    b = pm.GraphBuilder()
    x = b.conv("input", 3, 8)
    y = b.conv(x, 8, 8, k=3, group=8)
    t = b.node("Transpose", [y], perm=[0, 2, 3, 1])[0]
    t = b.node("LayerNormalization", [t, b.const(np.ones(8, np.float32)), b.const(np.zeros(8, np.float32))],
               axis=-1)[0]
    h = b.node("Add", [b.node("MatMul", [t, b.const(b.w(8, 16))])[0], b.const(b.w(16, scale=0.1))])[0]
    e = b.node("Erf", [b.node("Div", [h, b.const(np.array(1.4142135, np.float32))])[0]])[0]
    h = b.node("Mul", [b.node("Mul", [h, b.node("Add", [e, b.const(np.array(1.0, np.float32))])[0]])[0],
                       b.const(np.array(0.5, np.float32))])[0]
    o = b.node("Add", [b.node("MatMul", [h, b.const(b.w(16, 8))])[0], b.const(b.w(8, scale=0.1))])[0]
    o = b.node("Transpose", [o], perm=[0, 3, 1, 2])[0]
    return b.build(b.head(b.add(x, o), 8))


def test_layernorm_over_channels_closed_but_mlp_prunable_and_exact():
    model = _nhwc_mlp_model()
    groups = analyze(model)
    trunk = next(g for g in groups if any(r.node == "conv1" for r in g.producers))
    assert not trunk.prunable and "LayerNormalization" in trunk.reason
    hidden = next(g for g in groups if g.prunable)
    assert hidden.size == 16 and hidden.stat_axis == 3
    rm = np.array([1, 5, 6, 11])
    zeroed = pm.zero_consumer_inputs(model, consumer_layers(model, hidden), rm)
    pruned, stats = remove_channels(zeroed, {hidden.id: np.setdiff1d(np.arange(16), rm)}, groups)
    x = np.random.default_rng(0).standard_normal((1, 3, 8, 8)).astype(np.float32)
    assert pm.rel_diff(pm.run(pruned, x), pm.run(zeroed, x)) <= 1e-5
    assert pm.rel_diff(pm.run(zeroed, x), pm.run(model, x)) > 1e-4
    assert stats["groups_pruned"] == 1
    cm = CostModel(model, groups)
    assert cm.costs({hidden.id: 12}) == (count_costs(pruned).macs, count_costs(pruned).params)


def test_shared_initializer_gets_cloned_and_cost_model_matches():
    b = pm.GraphBuilder()
    zero = b.const(np.zeros(8, np.float32), "shared_zero_bias")
    x = b.node("Relu", [b.node("Conv", ["input", b.const(b.w(8, 3, 3, 3)), zero], kernel_shape=[3, 3], pads=[1] * 4)[0]])[0]
    y = b.node("Relu", [b.node("Conv", [x, b.const(b.w(8, 8, 3, 3)), zero], kernel_shape=[3, 3], pads=[1] * 4)[0]])[0]
    model = b.build(b.head(y, 8))
    groups = analyze(model)
    pr = _prunable(groups)
    assert len(pr) == 2
    cm = CostModel(model, groups)
    for keep in ({pr[0].id: np.arange(5)}, {pr[0].id: np.arange(5), pr[1].id: np.arange(3)}):
        pruned, _ = remove_channels(model, keep, groups)
        onnx.checker.check_model(pruned, full_check=True)
        real = count_costs(pruned)
        assert cm.costs({k: len(v) for k, v in keep.items()}) == (real.macs, real.params)


def test_dynamic_shape_subgraph_is_folded():
    """ShuffleNet-style chunk: Slice bounds computed from Shape(x) must not close the groups after it."""
    b = pm.GraphBuilder()
    x = b.act(b.conv("input", 3, 8), "relu")
    s = b.node("Shape", [x])[0]
    c = b.node("Gather", [s, b.const(np.array(1, np.int64))], axis=0)[0]
    half = b.node("Div", [c, b.const(np.array(2, np.int64))])[0]
    half = b.node("Unsqueeze", [half, b.const(np.array([0], np.int64))])[0]
    p = b.node("Slice", [x, half, b.const(np.array([8], np.int64)), b.const(np.array([1], np.int64))])[0]
    y = b.act(b.conv(p, 4, 6), "relu")
    model = b.build(b.head(y, 6))
    groups = analyze(model)
    g1 = next(g for g in groups if any(r.node == "conv1" for r in g.producers))
    assert not g1.prunable and "Shape" in g1.reason  # its channel count is read at run time
    g2 = next(g for g in groups if any(r.node == "conv8" for r in g.producers))
    assert g2.prunable


def test_keep_validation():
    model = pm.chain()
    groups = analyze(model)
    g = _prunable(groups)[0]
    for bad in ([], [3, 1], [0, 0, 1], [0, 99]):
        with pytest.raises(ValueError):
            remove_channels(model, {g.id: np.asarray(bad, np.int64)}, groups)
    with pytest.raises(ValueError, match="do not belong"):
        remove_channels(model, {}, groups[:-1])
    same, stats = remove_channels(model, {g.id: np.arange(g.size)}, groups)
    assert stats["groups_pruned"] == 0 and count_costs(same).macs == count_costs(model).macs
    cm = CostModel(model, groups)
    assert cm.costs({}) == (cm.base_macs, cm.base_params) == (count_costs(model).macs, count_costs(model).params)


def test_stats_list_every_group():
    model = pm.unfused_bn()
    groups = analyze(model)
    g = _prunable(groups)[0]
    _, stats = remove_channels(model, {g.id: np.arange(g.size - 2)}, groups)
    assert len(stats["groups"]) == len(groups)
    row = stats["groups"][g.id]
    assert row["kept"] == g.size - 2 and row["size"] == g.size and row["members"]
    assert all(r["reason"] for r in stats["groups"] if not r["prunable"])


def test_unknown_custom_op_without_shapes_closes_but_never_crashes():
    b = pm.GraphBuilder()
    x = b.act(b.conv("input", 3, 8), "relu")
    y = b.node("Concat", [x, x], axis=1)[0]
    b.nodes.append(helper.make_node("FooOp", [y], ["foo_out"], name="foo", domain="com.example"))
    z = b.act(b.conv("foo_out", 16, 6), "relu")
    b.nodes.append(helper.make_node("Identity", [b.head(z, 6)], ["output"], name="oi"))
    g = helper.make_graph(b.nodes, "g", [helper.make_tensor_value_info("input", onnx.TensorProto.FLOAT, [1, 3, 8, 8])],
                          [helper.make_tensor_value_info("output", onnx.TensorProto.FLOAT, [1, 10])], b.inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)])
    groups = analyze(model)
    assert groups and not any(g.prunable for g in groups)
    assert all(g.reason for g in groups)
    assert any("unsupported op (FooOp node foo)" in g.reason for g in groups)
    same, stats = remove_channels(model, {}, groups)
    assert stats["groups_pruned"] == 0 and len(same.graph.node) == len(model.graph.node)


def test_weights_held_in_constant_nodes():
    """Weights as Constant nodes (not lifted to initializers) are sliced in place; costs still match."""
    model = pm.residual()
    inits = {i.name: i for i in model.graph.initializer}
    consts = [helper.make_node("Constant", [], [name], name=f"const_{name}", value=inits[name]) for name in inits]
    del model.graph.initializer[:]
    nodes = consts + list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    onnx.checker.check_model(model)
    groups = analyze(model)
    pr = _prunable(groups)
    assert len(pr) == 3
    keep = {g.id: np.arange(g.size - 2) for g in pr}
    pruned, _ = remove_channels(model, keep, groups)
    real = count_costs(pruned)
    assert CostModel(model, groups).costs({k: len(v) for k, v in keep.items()}) == (real.macs, real.params)
    x = np.random.default_rng(0).standard_normal((1, 3, 8, 8)).astype(np.float32)
    assert pm.run(pruned, x).shape == (1, 10)


def _with_op(make, opset=17):
    b = pm.GraphBuilder()
    x = b.act(b.conv("input", 3, 8), "relu")
    y, c = make(b, x)
    y = b.act(b.conv(y, c, 6), "relu")
    return b.build(b.head(y, 6), opset=opset)


CLOSING = {
    "softmax_over_channels": (lambda b, x: (b.node("Softmax", [x], axis=1)[0], 8), "normalizes over the channel axis"),
    "reduce_over_channels": (lambda b, x: (b.node("ReduceMean", [x], axes=[1])[0], 1), "reduces over the channel axis"),
    "pad_channels": (lambda b, x: (b.node("Pad", [x, b.const(np.array([0, 1, 0, 0, 0, 1, 0, 0], np.int64))])[0], 10),
                     "pads the channel axis"),
    "strided_slice": (lambda b, x: (b.node("Slice", [x, b.const(np.array([0], np.int64)), b.const(np.array([8], np.int64)),
                                                     b.const(np.array([1], np.int64)), b.const(np.array([2], np.int64))])[0], 4),
                      "strided slice"),
    "depth_to_space": (lambda b, x: (b.node("DepthToSpace", [x], blocksize=2)[0], 2), "unsupported op"),
    "groupnorm": (lambda b, x: (b.node("GroupNormalization", [x, b.const(np.ones(8, np.float32)),
                                                              b.const(np.zeros(8, np.float32))], num_groups=2)[0], 8),
                  "GroupNormalization"),
}


@pytest.mark.parametrize("case", sorted(CLOSING))
def test_ops_that_close_groups(case):
    make, why = CLOSING[case]
    model = _with_op(make, opset=21 if case == "groupnorm" else 17)
    groups = analyze(model)
    g = next(g for g in groups if any(r.node == "conv1" for r in g.producers))
    assert not g.prunable and why in g.reason
    nxt = next(g for g in groups if any(r.node == "conv4" for r in g.producers))
    if case != "groupnorm":  # onnx infers no shapes past GroupNormalization-21, so later groups close too
        assert nxt.prunable  # the closure stays local


def test_softmax_over_spatial_axis_passes_channels_through():
    model = _with_op(lambda b, x: (b.node("Softmax", [x], axis=3)[0], 8))
    groups = analyze(model)
    g = next(g for g in groups if any(r.node == "conv1" for r in g.producers))
    assert g.prunable and [r.node for r in g.consumers] == ["conv4"]
    rm = np.array([0, 3])
    zeroed = pm.zero_consumer_inputs(model, consumer_layers(model, g), rm)
    pruned, _ = remove_channels(zeroed, {g.id: np.setdiff1d(np.arange(8), rm)}, groups)
    x = np.random.default_rng(0).standard_normal((1, 3, 8, 8)).astype(np.float32)
    assert pm.rel_diff(pm.run(pruned, x), pm.run(zeroed, x)) <= 1e-5
