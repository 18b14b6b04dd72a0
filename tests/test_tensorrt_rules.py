"""TensorRT explicit-quantization rule checker: every rule, passing and failing, on tiny inline graphs."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper, numpy_helper

from edgec.core.errors import EdgecError
from edgec.targets.tensorrt.rules import check_graph

rng = np.random.default_rng(0)


def _model(nodes, inits, *, x_shape=(1, 16, 8, 8), y_shape=None, x_type=T.FLOAT, opset=21, vis=()):
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", x_type, list(x_shape))],
                          [helper.make_tensor_value_info("y", T.FLOAT, y_shape)], initializer=inits, value_info=list(vis))
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    onnx.shape_inference.infer_shapes(m, check_type=True, strict_mode=True)  # the graph itself is valid ONNX
    return m


def _init(name, arr):
    return numpy_helper.from_array(np.asarray(arr), name)


def _conv_int8(*, act_zp=0, w_per_channel=True, act_per_channel=False, cout=16, cin=16, group=1,
               zp_dtype=np.int8, act_scale_const=True):
    """x -> Q/DQ (activation) -> Conv(DQ(W int8)) -> y."""
    wq = rng.integers(-127, 127, size=(cout, cin // group, 3, 3)).astype(np.int8)
    w_scale = (rng.random(cout) * 0.01 + 0.001).astype(np.float32) if w_per_channel else np.float32(0.01)
    a_scale = np.full(cin, 0.02, np.float32) if act_per_channel else np.float32(0.02)
    inits = [_init("wq", wq), _init("w_s", w_scale), _init("a_zp", np.asarray(act_zp, zp_dtype) if not act_per_channel
                                                                    else np.zeros(cin, zp_dtype))]
    nodes = []
    if act_scale_const:
        inits.append(_init("a_s", a_scale))
    else:
        nodes.append(helper.make_node("ReduceMax", ["x"], ["a_s"], name="dyn_scale", keepdims=0))
    if w_per_channel:
        inits.append(_init("w_zp", np.zeros(cout, np.int8)))
    else:
        inits.append(_init("w_zp", np.int8(0)))
    kw = {"axis": 1} if act_per_channel else {}
    nodes += [
        helper.make_node("QuantizeLinear", ["x", "a_s", "a_zp"], ["xq"], name="act_q", **kw),
        helper.make_node("DequantizeLinear", ["xq", "a_s", "a_zp"], ["xd"], name="act_dq", **kw),
        helper.make_node("DequantizeLinear", ["wq", "w_s", "w_zp"], ["w"], name="w_dq", axis=0),
        helper.make_node("Conv", ["xd", "w"], ["y"], name="conv", pads=[1, 1, 1, 1], group=group),
    ]
    return _model(nodes, inits, x_shape=(1, cin, 8, 8))


def _matmul_int4(*, consumer="MatMul", slot=1, activation=False, block=16, dtype=T.INT4):
    k, n = 32, 16
    wq = numpy_helper.from_array(np.zeros((k, n), np.int8), "wq")
    if dtype == T.INT4:
        wq = helper.make_tensor("wq", T.INT4, [k, n], rng.integers(-8, 7, size=k * n).tolist())
    scale = _init("s", (rng.random((k // block, n)) * 0.01 + 0.001).astype(np.float32))
    inits = [wq, scale]
    if activation:
        nodes = [helper.make_node("QuantizeLinear", ["x", "s"], ["xq"], name="act_q4", axis=0, block_size=block,
                                  output_dtype=T.INT4),
                 helper.make_node("DequantizeLinear", ["xq", "s"], ["xd"], name="act_dq4", axis=0, block_size=block),
                 helper.make_node("MatMul", ["xd", "w2"], ["y"], name="mm")]
        inits.append(_init("w2", rng.standard_normal((n, 8)).astype(np.float32)))
        return _model(nodes, inits, x_shape=(k, n))
    nodes = [helper.make_node("DequantizeLinear", ["wq", "s"], ["w"], name="w_dq4", axis=0, block_size=block)]
    if consumer == "MatMul":
        ins = ["x", "w"] if slot == 1 else ["w", "x"]
        nodes.append(helper.make_node("MatMul", ins, ["y"], name="mm"))
        return _model(nodes, inits, x_shape=(4, k) if slot == 1 else (n, 8))
    if consumer == "Gemm":
        nodes.append(helper.make_node("Gemm", ["x", "w"], ["y"], name="gemm"))
        return _model(nodes, inits, x_shape=(4, k))
    # Conv consuming an int4 weight (reshaped through nothing: shape k x n as [cout, cin, 1, 1] is 2-D, so Unsqueeze)
    inits.append(_init("axes", np.array([2, 3], np.int64)))
    nodes += [helper.make_node("Unsqueeze", ["w", "axes"], ["w4"], name="unsq"),
              helper.make_node("Conv", ["x", "w4"], ["y"], name="conv4")]
    return _model(nodes, inits, x_shape=(1, n, 4, 4))


def _rule_errors(m, rule):
    return [f for f in check_graph(m).errors if f.rule == rule]


# ---------------------------------------------------------------- qdq-zero-point

def test_zero_point_zero_passes():
    rep = check_graph(_conv_int8())
    assert rep.passed, rep.errors
    assert rep.checked["qdq-zero-point"] == 3


def test_nonzero_zero_point_fails_with_node_name():
    errs = _rule_errors(_conv_int8(act_zp=3), "qdq-zero-point")
    assert {e.node for e in errs} == {"act_q", "act_dq"}
    assert "must be 0" in errs[0].message


def test_uint8_qdq_fails():
    errs = _rule_errors(_conv_int8(act_zp=0, zp_dtype=np.uint8), "qdq-zero-point")
    assert errs and all("UINT8" in e.message for e in errs)


def test_int32_bias_dequantize_fails_with_hint():
    """ORT's QDQ pattern quantizes the bias to int32; TensorRT's DequantizeLinear takes int8/fp8/int4 only."""
    m = _conv_int8()
    s_b = np.full(16, 0.02 * 0.01, np.float32)
    m.graph.initializer.extend([_init("bq", np.arange(16, dtype=np.int32)), _init("b_s", s_b),
                                _init("b_zp", np.zeros(16, np.int32))])
    m.graph.node.insert(0, helper.make_node("DequantizeLinear", ["bq", "b_s", "b_zp"], ["b"], name="bias_dq", axis=0))
    conv = next(n for n in m.graph.node if n.op_type == "Conv")
    conv.input.append("b")
    errs = _rule_errors(m, "qdq-zero-point")
    assert [e.node for e in errs] == ["bias_dq"] and "keep the bias in float" in errs[0].message


def test_non_constant_scale_fails():
    errs = _rule_errors(_conv_int8(act_scale_const=False), "qdq-zero-point")
    assert any(e.node == "act_q" and "not a build-time constant" in e.message for e in errs)


def test_raise_for_errors_is_one_line_with_node():
    with pytest.raises(EdgecError) as ei:
        check_graph(_conv_int8(act_zp=5)).raise_for_errors()
    msg = str(ei.value)
    assert "\n" not in msg and "act_q" in msg and "qdq-zero-point" in msg and "+1 more" in msg


# ---------------------------------------------------------------- qdq-per-channel

def test_per_channel_weight_passes():
    assert not _rule_errors(_conv_int8(w_per_channel=True), "qdq-per-channel")
    assert not _rule_errors(_conv_int8(w_per_channel=False), "qdq-per-channel")


def test_per_channel_activation_fails():
    errs = _rule_errors(_conv_int8(act_per_channel=True), "qdq-per-channel")
    assert {e.node for e in errs} == {"act_q", "act_dq"}
    assert "activation 'x'" in errs[0].message


def test_q_then_dq_of_constant_weight_is_per_channel_ok():
    w = rng.standard_normal((16, 16, 1, 1)).astype(np.float32)
    inits = [_init("w", w), _init("s", np.full(16, 0.01, np.float32)), _init("zp", np.zeros(16, np.int8))]
    nodes = [helper.make_node("QuantizeLinear", ["w", "s", "zp"], ["wq"], name="wq", axis=0),
             helper.make_node("DequantizeLinear", ["wq", "s", "zp"], ["wd"], name="wdq", axis=0),
             helper.make_node("Conv", ["x", "wd"], ["y"], name="conv")]
    assert check_graph(_model(nodes, inits)).passed


# ---------------------------------------------------------------- int4-weight-only

@pytest.mark.parametrize("consumer", ["MatMul", "Gemm"])
def test_int4_weight_only_on_gemm_matmul_passes(consumer):
    rep = check_graph(_matmul_int4(consumer=consumer))
    assert rep.passed, rep.errors
    assert rep.checked["int4-weight-only"] == 1


def test_int4_on_conv_fails():
    errs = _rule_errors(_matmul_int4(consumer="Conv"), "int4-weight-only")
    assert errs and errs[0].node == "w_dq4" and "Unsqueeze" in errs[0].message


def test_int4_as_matmul_activation_input_fails():
    errs = _rule_errors(_matmul_int4(slot=0), "int4-weight-only")
    assert errs and "input 0" in errs[0].message


def test_int4_on_activation_fails():
    errs = _rule_errors(_matmul_int4(activation=True), "int4-weight-only")
    assert {"act_q4", "act_dq4"} <= {e.node for e in errs}


def test_block_wise_int8_fails():
    errs = _rule_errors(_matmul_int4(dtype=T.INT8), "int4-weight-only")
    assert errs and "only for int4" in errs[0].message


# ---------------------------------------------------------------- opset

@pytest.mark.parametrize("opset,ok,warn", [(17, True, False), (20, True, False), (21, True, True)])
def test_supported_opsets(opset, ok, warn):
    m = _model([helper.make_node("Relu", ["x"], ["y"], name="r")], [], opset=opset)
    rep = check_graph(m)
    assert rep.passed is ok
    assert any(f.rule == "opset" for f in rep.warnings) is warn


def test_old_opset_fails():
    m = _model([helper.make_node("Relu", ["x"], ["y"], name="r")], [], opset=8)
    assert _rule_errors(m, "opset")


# ---------------------------------------------------------------- dtype

def test_supported_dtypes_pass():
    m = _model([helper.make_node("Cast", ["x"], ["h"], name="c", to=T.FLOAT16),
                helper.make_node("Cast", ["h"], ["y"], name="c2", to=T.FLOAT)], [],
               vis=[helper.make_tensor_value_info("h", T.FLOAT16, None)])
    rep = check_graph(m)
    assert rep.passed and rep.checked["dtype"] >= 3


def test_unsupported_dtype_fails_with_producer_name():
    m = _model([helper.make_node("Cast", ["x"], ["h"], name="to_u16", to=T.UINT16),
                helper.make_node("Cast", ["h"], ["y"], name="back", to=T.FLOAT)], [],
               vis=[helper.make_tensor_value_info("h", T.UINT16, None)])
    errs = _rule_errors(m, "dtype")
    assert len(errs) == 1 and errs[0].node == "to_u16" and "UINT16" in errs[0].message


def test_double_warns():
    m = _model([helper.make_node("Cast", ["x"], ["y"], name="c", to=T.FLOAT)], [], x_type=T.DOUBLE)
    rep = check_graph(m)
    assert rep.passed and any(f.rule == "dtype" and f.node == "x" for f in rep.warnings)


# ---------------------------------------------------------------- channel-align (warning only)

def _warned_nodes(m):
    return {f.node for f in check_graph(m).warnings if f.rule == "channel-align"}


def test_aligned_channels_do_not_warn():
    assert not _warned_nodes(_conv_int8(cout=16, cin=16))


def test_unaligned_channels_warn_but_pass():
    m = _conv_int8(cout=12, cin=16)
    rep = check_graph(m)
    assert rep.passed
    assert [f.message for f in rep.warnings if f.rule == "channel-align"] == [
        "output channels 12 not a multiple of 8: misses int8/fp16 Tensor Core layouts (padded)"]


def test_depthwise_is_exempt():
    assert not _warned_nodes(_conv_int8(cout=12, cin=12, group=12))


def test_stem_input_channels_exempt_but_inner_not():
    w1 = rng.standard_normal((16, 3, 3, 3)).astype(np.float32)
    w2 = rng.standard_normal((16, 20, 1, 1)).astype(np.float32)
    w0 = rng.standard_normal((20, 16, 1, 1)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"], name="stem"),
             helper.make_node("Conv", ["a", "w0"], ["b"], name="mid"),
             helper.make_node("Conv", ["b", "w2"], ["y"], name="proj")]
    m = _model(nodes, [_init("w1", w1), _init("w0", w0), _init("w2", w2)], x_shape=(1, 3, 8, 8))
    assert _warned_nodes(m) == {"mid", "proj"}


def test_gemm_features_warn():
    w = rng.standard_normal((10, 16)).astype(np.float32)  # transB: out 10, in 16
    m = _model([helper.make_node("Gemm", ["x", "w"], ["y"], name="fc", transB=1)], [_init("w", w)], x_shape=(1, 16))
    msgs = [f.message for f in check_graph(m).warnings if f.rule == "channel-align"]
    assert len(msgs) == 1 and msgs[0].startswith("output features 10")


def test_report_is_json_serializable():
    import json

    d = check_graph(_conv_int8(act_zp=1)).as_dict()
    assert json.loads(json.dumps(d))["passed"] is False
