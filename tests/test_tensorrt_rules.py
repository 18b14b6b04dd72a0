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


# ---------------------------------------------------------------- issue 13 rules: each passes and fails

def _w_dq(*, axis="keep", scale_n=16, opset=21, w_shape=(16, 16, 1, 1), cast_scale=False):
    """x -> Conv(DQ(int8 W, per-channel scale)) -> y, with the DQ's axis / scale count / opset varied."""
    inits = [_init("wq", rng.integers(-127, 127, size=w_shape).astype(np.int8)),
             _init("w_s", np.full(scale_n, 0.01, np.float32))]
    nodes = []
    s_name = "w_s"
    if cast_scale:  # the scale computed through Constant -> Cast: still a build-time constant
        inits = inits[:1]
        nodes.append(helper.make_node("Constant", [], ["s16"], name="s_const",
                                      value=numpy_helper.from_array(np.full(scale_n, 0.01, np.float16))))
        nodes.append(helper.make_node("Cast", ["s16"], ["s32"], name="s_cast", to=T.FLOAT))
        s_name = "s32"
    kw = {} if axis is None else {"axis": 0 if axis == "keep" else axis}
    nodes += [helper.make_node("DequantizeLinear", ["wq", s_name], ["w"], name="w_dq", **kw),
              helper.make_node("Conv", ["x", "w"], ["y"], name="conv")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", T.FLOAT, [1, 16, 8, 8])],
                          [helper.make_tensor_value_info("y", T.FLOAT, None)], initializer=inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])


def test_qdq_axis_explicit_passes_missing_fails():
    assert not _rule_errors(_w_dq(), "qdq-axis")
    errs = _rule_errors(_w_dq(axis=None, w_shape=(16, 16, 1, 1)), "qdq-axis")
    assert [e.node for e in errs] == ["w_dq"] and "parser assumes axis 0" in errs[0].message


def test_qdq_scale_count_matches_axis_size():
    assert not _rule_errors(_w_dq(), "qdq-scale-count")
    errs = _rule_errors(_w_dq(scale_n=8, w_shape=(16, 8, 1, 1)), "qdq-scale-count")  # 8 scales, axis 0 has 16
    assert [e.node for e in errs] == ["w_dq"] and "8 scales for axis 0" in errs[0].message


def test_qdq_opset_per_channel_needs_13():
    assert not _rule_errors(_w_dq(opset=13), "qdq-opset")
    errs = _rule_errors(_w_dq(opset=12), "qdq-opset")
    assert errs and "opset >= 13" in errs[0].message


def test_block_wise_needs_opset_21():
    assert not _rule_errors(_matmul_int4(), "qdq-opset")
    m = _matmul_int4()
    m.opset_import[0].version = 20
    assert any("opset >= 21" in e.message for e in _rule_errors(m, "qdq-opset"))


def test_constant_cast_scale_is_a_constant():
    """Constant -> Cast is folded by TensorRT: the scale is a build-time constant (it was flagged before)."""
    rep = check_graph(_w_dq(cast_scale=True))
    assert rep.passed, rep.errors
    assert rep.checked["qdq-zero-point"] == 1


def _q_fp16(scale_dtype, dq_scale_dtype=None, opset=21):
    sd = np.float16 if scale_dtype == T.FLOAT16 else np.float32
    dd = np.float16 if (dq_scale_dtype or scale_dtype) == T.FLOAT16 else np.float32
    inits = [_init("s", np.asarray(0.02, sd)), _init("s2", np.asarray(0.02, dd)), _init("zp", np.int8(0))]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["xq"], name="q"),
             helper.make_node("DequantizeLinear", ["xq", "s2", "zp"], ["y"], name="dq")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", T.FLOAT16, [1, 4])],
                          [helper.make_tensor_value_info("y", T.FLOAT16 if dd == np.float16 else T.FLOAT, [1, 4])],
                          initializer=inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])


def test_qdq_scale_dtype_matches_input():
    assert not _rule_errors(_q_fp16(T.FLOAT16), "qdq-scale-dtype")
    errs = _rule_errors(_q_fp16(T.FLOAT, T.FLOAT16), "qdq-scale-dtype")
    assert [e.node for e in errs] == ["q"] and "FLOAT, input 'x' is FLOAT16" in errs[0].message
    errs = _rule_errors(_q_fp16(T.FLOAT16, T.FLOAT), "qdq-scale-dtype")
    assert [e.node for e in errs] == ["dq"]


def test_int4_weight_needs_even_last_dim():
    assert not _rule_errors(_matmul_int4(), "int4-shape")
    k, n = 32, 15
    wq = helper.make_tensor("wq", T.INT4, [k, n], rng.integers(-8, 7, size=k * n).tolist())
    s = _init("s", np.full((k // 16, n), 0.01, np.float32))
    nodes = [helper.make_node("DequantizeLinear", ["wq", "s"], ["w"], name="w_dq4", axis=0, block_size=16),
             helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")]
    errs = _rule_errors(_model(nodes, [wq, s], x_shape=(4, k)), "int4-shape")
    assert [e.node for e in errs] == ["w_dq4"] and "[32, 15]" in errs[0].message


def test_uint8_only_at_network_io():
    ok = _model([helper.make_node("Cast", ["x"], ["y"], name="c", to=T.FLOAT)], [], x_type=T.UINT8, x_shape=(1, 4))
    assert not _rule_errors(ok, "uint8-io")
    bad = _model([helper.make_node("Cast", ["x"], ["u"], name="to_u8", to=T.UINT8),
                  helper.make_node("Cast", ["u"], ["y"], name="back", to=T.FLOAT)], [], x_shape=(1, 4),
                 vis=[helper.make_tensor_value_info("u", T.UINT8, None)])
    errs = _rule_errors(bad, "uint8-io")
    assert [e.node for e in errs] == ["to_u8"]


def _fp8_model():
    inits = [_init("s", np.float32(0.02)), numpy_helper.from_array(np.zeros((), np.float32), "zpf")]
    zp = helper.make_tensor("zp8", T.FLOAT8E4M3FN, [], [0.0])
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "zp8"], ["xq"], name="q8"),
             helper.make_node("DequantizeLinear", ["xq", "s", "zp8"], ["y"], name="dq8")]
    return _model(nodes, inits[:1] + [zp], x_shape=(1, 4), y_shape=[1, 4])


@pytest.mark.parametrize("device,level", [("orin", "error"), ("sm_87", "error"), ("ada", None), ("sm_90", None),
                                          (None, "warning")])
def test_fp8_judged_per_device(device, level):
    """Jetson Orin (SM 8.7) has no FP8: an error there; fine on Ada/Hopper; a warning when no device is named."""
    rep = check_graph(_fp8_model(), device=device)
    got = {f.severity for f in rep.findings if f.rule == "device-precision"}
    assert got == ({level} if level else set())
    if level == "error":
        assert "SM >= 8.9" in [f for f in rep.errors if f.rule == "device-precision"][0].message


def test_bf16_needs_ampere():
    m = _model([helper.make_node("Cast", ["x"], ["h"], name="to_bf16", to=T.BFLOAT16),
                helper.make_node("Cast", ["h"], ["y"], name="back", to=T.FLOAT)], [],
               vis=[helper.make_tensor_value_info("h", T.BFLOAT16, None)])
    assert not _rule_errors(m, "device-precision") and check_graph(m, device="orin").passed
    assert [e.node for e in check_graph(m, device="xavier").errors] == ["to_bf16"]


def test_unknown_device_is_a_user_error():
    with pytest.raises(EdgecError, match="unknown TensorRT device"):
        check_graph(_conv_int8(), device="tpu")
