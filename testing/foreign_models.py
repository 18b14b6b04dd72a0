"""ONNX files as another exporter would write them: unfused BatchNormalization, Constant nodes, dynamic H/W."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def _const(name, arr):
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.asarray(arr), name + "_v"))


def foreign_cnn(seed: int = 0, opset: int = 13, dynamic_hw: bool = True, classes: int = 10) -> onnx.ModelProto:
    """Conv -> BN -> Relu -> Conv(+bias) -> BN -> Clip(min,max as inputs) -> Identity -> GAP -> Reshape(Constant) -> Gemm."""
    rng = np.random.default_rng(seed)
    nodes, inits = [], []

    def init(name, arr):
        inits.append(numpy_helper.from_array(np.asarray(arr, np.float32), name))

    c1, c2 = 8, 16
    init("w1", rng.standard_normal((c1, 3, 3, 3)) * 0.3)
    init("w2", rng.standard_normal((c2, c1, 3, 3)) * 0.2)
    init("b2", rng.standard_normal(c2) * 0.1)
    for i, c in ((1, c1), (2, c2)):
        init(f"g{i}", rng.uniform(0.5, 1.5, c))
        init(f"be{i}", rng.standard_normal(c) * 0.1)
        init(f"m{i}", rng.standard_normal(c) * 0.1)
        init(f"v{i}", rng.uniform(0.5, 2.0, c))
    init("fcw", rng.standard_normal((classes, c2)) * 0.3)
    init("fcb", rng.standard_normal(classes) * 0.1)
    nodes += [
        helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("BatchNormalization", ["c1", "g1", "be1", "m1", "v1"], ["bn1"], epsilon=1e-5, name="bn1"),
        helper.make_node("Relu", ["bn1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1], strides=[2, 2], name="conv2"),
        helper.make_node("BatchNormalization", ["c2", "g2", "be2", "m2", "v2"], ["bn2"], epsilon=1e-5, name="bn2"),
        _const("clip_min", np.float32(0.0)), _const("clip_max", np.float32(6.0)),
        helper.make_node("Clip", ["bn2", "clip_min", "clip_max"], ["r2"], name="relu6"),
        helper.make_node("Identity", ["r2"], ["r2i"], name="ident"),
        helper.make_node("GlobalAveragePool", ["r2i"], ["gap"], name="gap"),
        _const("shape", np.array([-1, c2], np.int64)),
        helper.make_node("Reshape", ["gap", "shape"], ["flat"], name="reshape"),
        helper.make_node("Gemm", ["flat", "fcw", "fcb"], ["logits"], transB=1, name="fc"),
    ]
    dims = ["N", 3, "H", "W"] if dynamic_hw else [1, 3, 32, 32]
    g = helper.make_graph(nodes, "foreign", [helper.make_tensor_value_info("x", TensorProto.FLOAT, dims)],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N" if dynamic_hw else 1, classes])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)], producer_name="other-exporter")
    m.ir_version = 7
    onnx.checker.check_model(m)
    return m
