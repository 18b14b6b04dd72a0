"""Compute accounting from the ONNX graph itself (same for every input kind).

MACs(Conv)          = prod(Y.shape) * (C_in / group) * prod(kernel)
MACs(ConvTranspose) = prod(X.shape) * (C_out / group) * prod(kernel)
MACs(Gemm/MatMul)   = prod(Y.shape) * K
params              = number of elements of all floating-point initializers (and Constant tensors)
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

_FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16}
_WEIGHT_TYPES = _FLOAT_TYPES | {onnx.TensorProto.INT8, onnx.TensorProto.UINT8, onnx.TensorProto.INT4,
                                onnx.TensorProto.UINT4}


@dataclass
class Costs:
    macs: int
    params: int
    per_node: dict[str, int]

    def as_dict(self):
        return {"macs": int(self.macs), "params": int(self.params)}


def with_input_shapes(model: onnx.ModelProto, input_shapes: dict | None) -> onnx.ModelProto:
    """`model`, or a copy whose symbolic graph-input dims take the concrete `input_shapes` (the compile shape of a
    model that keeps dynamic axes), with stale value_info dropped; for counting, never for emitting."""
    if not input_shapes:
        return model
    ins = [i for i in model.graph.input if i.name in input_shapes]
    if not any(d.HasField("dim_param") or not d.HasField("dim_value") for i in ins for d in i.type.tensor_type.shape.dim):
        return model
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for i in m.graph.input:
        if i.name in input_shapes and len(i.type.tensor_type.shape.dim) == len(input_shapes[i.name]):
            for d, v in zip(i.type.tensor_type.shape.dim, input_shapes[i.name]):
                d.Clear()
                d.dim_value = int(v)
    del m.graph.value_info[:]
    return m


def static_shapes(model: onnx.ModelProto, input_shapes: dict | None = None) -> dict[str, tuple]:
    """{tensor: dims} from ONNX shape inference with data propagation (-1 for unknown dims); `input_shapes` fixes
    symbolic input dims first (see with_input_shapes)."""
    model = with_input_shapes(model, input_shapes)
    try:
        inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception:
        inferred = model
    out = {}
    g = inferred.graph
    for vi in list(g.value_info) + list(g.input) + list(g.output):
        t = vi.type.tensor_type
        if t.HasField("shape"):
            dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim)
            out[vi.name] = dims
    for init in g.initializer:
        out[init.name] = tuple(init.dims)
    return out


def _prod(s) -> int:
    return int(np.prod([max(d, 1) for d in s])) if s else 1


def count_params(model: onnx.ModelProto) -> int:
    n = 0
    for init in model.graph.initializer:
        if init.data_type in _WEIGHT_TYPES and len(init.dims) >= 1:
            n += _prod(init.dims)
    for node in model.graph.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value" and a.t.data_type in _FLOAT_TYPES and len(a.t.dims) >= 1:
                    n += _prod(a.t.dims)
    return n


_MAC_OPS = ("Conv", "ConvInteger", "QLinearConv", "ConvTranspose", "Gemm", "MatMul", "MatMulInteger", "QGemm",
            "QLinearMatMul", "MatMulNBits")


def count_costs(model: onnx.ModelProto, input_shapes: dict | None = None, _folded: bool = False) -> Costs:
    """MACs and params; symbolic input dims take `input_shapes` (the compile shape) when given; if shape arithmetic
    hides static shapes (e.g. dynamic 'same' padding), count on a constant-folded copy (onnxslim), same MACs."""
    model = with_input_shapes(model, input_shapes)
    shapes = static_shapes(model)
    if not _folded and any(n.op_type in _MAC_OPS and not _static(shapes.get(n.output[0])) for n in model.graph.node):
        try:
            import onnxslim

            folded = onnxslim.slim(model)
        except Exception:
            folded = None
        if folded is not None:
            c = count_costs(folded, _folded=True)
            return Costs(macs=c.macs, params=count_params(model), per_node=c.per_node)
    return _count(model, shapes)


def _static(s) -> bool:
    return bool(s) and all(d > 0 for d in s)


def _count(model: onnx.ModelProto, shapes: dict) -> Costs:
    per = {}
    for i, node in enumerate(model.graph.node):
        name = node.name or f"{node.op_type}_{i}"
        op = node.op_type
        macs = 0
        if op in ("Conv", "ConvInteger", "QLinearConv"):
            w_idx = 3 if op == "QLinearConv" else 1
            w = shapes.get(node.input[w_idx])
            y = shapes.get(node.output[0])
            if w and y and -1 not in y:
                group = next((a.i for a in node.attribute if a.name == "group"), 1)
                macs = _prod(y) * (w[1]) * _prod(w[2:])
                del group  # C_in/group == w[1]
        elif op == "ConvTranspose":
            w = shapes.get(node.input[1])
            x = shapes.get(node.input[0])
            if w and x and -1 not in x:
                macs = _prod(x) * w[1] * _prod(w[2:])
        elif op in ("Gemm", "MatMul", "MatMulInteger", "QGemm", "QLinearMatMul", "MatMulNBits"):
            a_idx = 0
            a = shapes.get(node.input[a_idx])
            y = shapes.get(node.output[0])
            if a and y and -1 not in y and len(a) >= 1:
                trans_a = next((x.i for x in node.attribute if x.name == "transA"), 0)
                k = a[0] if (op == "Gemm" and trans_a) else a[-1]
                macs = _prod(y) * max(k, 1)
        if macs:
            per[name] = int(macs)
    return Costs(macs=sum(per.values()), params=count_params(model), per_node=per)
