"""joint_compress follows the target's dialect: compiled for target=jetson, the result passes the TensorRT rules.

With the ORT dialect the joint pass puts int4 (and 3/2-bit) weights on Conv, which TensorRT forbids; with the
TensorRT dialect a Conv may only get int8 and int4 stays on Gemm/MatMul weights.
"""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper, numpy_helper

from edgec.passes.quant.dialect import ORT_CPU, TENSORRT
from edgec.passes.quant.joint import BITS, layer_bits
from edgec.passes.quant.qdq import find_layers
from edgec.targets.tensorrt.rules import check_graph


def conv_mlp(seed=0):
    """x[1,3,16,16] -> Conv(32) -> Relu -> GAP -> Flatten -> Gemm(64) -> Relu -> Gemm(10)."""
    r = np.random.default_rng(seed)
    inits = [numpy_helper.from_array((r.standard_normal((32, 3, 3, 3)) * 0.3).astype(np.float32), "w"),
             numpy_helper.from_array((r.standard_normal((64, 32)) * 0.2).astype(np.float32), "fc1"),
             numpy_helper.from_array(np.zeros(64, np.float32), "b1"),
             numpy_helper.from_array((r.standard_normal((10, 64)) * 0.2).astype(np.float32), "fc2"),
             numpy_helper.from_array(np.zeros(10, np.float32), "b2")]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("GlobalAveragePool", ["r"], ["p"], name="gap"),
             helper.make_node("Flatten", ["p"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "fc1", "b1"], ["h"], name="fc1", transB=1),
             helper.make_node("Relu", ["h"], ["hr"], name="relu2"),
             helper.make_node("Gemm", ["hr", "fc2", "b2"], ["logits"], name="fc2", transB=1)]
    g = helper.make_graph(nodes, "convmlp", [helper.make_tensor_value_info("x", T.FLOAT, [1, 3, 16, 16])],
                          [helper.make_tensor_value_info("logits", T.FLOAT, [1, 10])], initializer=inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])


def test_layer_bits_per_dialect():
    layers = {L.op: L for L in find_layers(conv_mlp())}
    assert layer_bits(layers["Conv"], TENSORRT) == [8]
    assert layer_bits(layers["Gemm"], TENSORRT) == [8, 4]
    assert layer_bits(layers["Conv"], ORT_CPU) == list(BITS)


@pytest.mark.slow
def test_joint_recipe_for_jetson_passes_the_rule_checker(tmp_path):
    from edgec.pipeline.compile import CompileOptions, compile_model

    model = tmp_path / "convmlp.onnx"
    onnx.save(conv_mlp(), str(model))
    recipe = json.dumps({"name": "joint", "passes": [
        {"name": "joint_compress", "options": {"target_bits_per_weight": 4.5, "keep_grid": [1.0],
                                               "sensitivity_samples": 4, "eval_samples": 8}}]})
    out = tmp_path / "out"
    compile_model(CompileOptions(model=str(model), target="jetson", recipe=recipe, out=str(out), data="synthetic",
                                 calib_samples=8, validate_samples=8, eval_samples=8, bench=False, threads=(1,)))
    m = onnx.load(str(out / "model.onnx"))
    dq = {n.output[0]: n for n in m.graph.node if n.op_type == "DequantizeLinear"}
    consumers = {n.op_type: n for n in m.graph.node if n.op_type in ("Conv", "Gemm")}
    assert dq, "the joint pass quantized nothing"
    init_types = {t.name: t.data_type for t in m.graph.initializer}
    conv_w = dq[consumers["Conv"].input[1]]
    assert init_types[conv_w.input[0]] == T.INT8  # never int4 on Conv for TensorRT
    rep = check_graph(m, device="orin")
    assert rep.passed, [f.line() for f in rep.errors]
    assert json.loads((out / "rules.json").read_text())["passed"]
