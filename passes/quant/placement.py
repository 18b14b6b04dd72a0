"""Q/DQ placement policy: which layers are quantizable and where activation Q/DQ pairs go.

* A **layer** is a Conv / Gemm / MatMul whose weight (input 1) is a float initializer and whose activation input
  is not; it is reported under the one naming rule (`edgec.core.graph.node_name`).
* A layer at 8 bits quantizes its activation input and its **output point**: the layer's output, or the output of
  a fusable Relu / Clip(min = 0) that is its only consumer (the min read from an initializer only).
* Graph outputs stay float unless the dialect quantizes them; classifier-shaped outputs ([N, C]) always stay float.
* Pass-through ops (Reshape, Flatten, Squeeze, Unsqueeze, Transpose, MaxPool) between quantized tensors share their
  input's parameters (`alias`); with `qdq_on_residual_add` every input of an Add with a quantized input is quantized.

The mechanism that emits the Q/DQ nodes for this plan is `passes.quant.qdq.insert_qdq`.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from edgec.core.graph import Graph, attr, node_name
from edgec.passes.quant.dialect import QuantDialect

LAYER_OPS = ("Conv", "Gemm", "MatMul")
PASSTHROUGH = ("Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose", "MaxPool")
FUSED_ACT = ("Relu", "Clip")


@dataclass(frozen=True)
class Layer:
    name: str
    op: str
    weight: str        # initializer name
    input: str         # activation input
    output: str
    bias: str | None
    w_shape: tuple[int, ...]
    channel_axis: int  # output-channel axis of the weight
    reduce_axis: int   # reduction axis of the weight (blocks for int4)
    group: int = 1

    @property
    def params(self) -> int:
        return int(np.prod(self.w_shape))

    @property
    def depthwise(self) -> bool:
        return self.op == "Conv" and self.group > 1 and self.w_shape[1] == 1


def find_layers(model: onnx.ModelProto, graph: Graph | None = None) -> list[Layer]:
    """Quantizable layers in graph order: Conv / Gemm / MatMul whose weight is a float initializer."""
    gi = graph if graph is not None else Graph(model)
    inits = gi.inits
    out = []
    for i, n in enumerate(gi.nodes):
        if n.op_type not in LAYER_OPS or len(n.input) < 2:
            continue
        w = inits.get(n.input[1])
        if w is None or w.data_type != TensorProto.FLOAT or n.input[0] in inits:
            continue
        shape = tuple(w.dims)
        bias = n.input[2] if len(n.input) > 2 and n.input[2] in inits else None
        if n.op_type == "Conv":
            if len(shape) < 3:
                continue
            ch, red, g = 0, 1, int(attr(n, "group", 1))
        elif n.op_type == "Gemm":
            if len(shape) != 2 or attr(n, "transA", 0):
                continue
            tb = int(attr(n, "transB", 0))
            ch, red, g = (0, 1, 1) if tb else (1, 0, 1)
            if bias is not None and tuple(inits[bias].dims) not in ((shape[ch],), (1, shape[ch])):
                bias = None
        else:
            if len(shape) != 2:
                continue
            ch, red, g = 1, 0, 1
        out.append(Layer(node_name(n, i), n.op_type, n.input[1], n.input[0], n.output[0], bias, shape, ch, red, g))
    return out


def output_point(model: onnx.ModelProto, layer: Layer, graph: Graph | None = None) -> str:
    """Where the layer's output is quantized: after a single-consumer Relu / Clip(min=0) if there is one."""
    gi = graph if graph is not None else Graph(model)
    cons = gi.consumer_nodes(layer.output)
    if len(cons) == 1 and layer.output not in gi.outputs and cons[0].op_type in FUSED_ACT:
        act = cons[0]
        if act.op_type == "Relu":
            return act.output[0]
        # the Clip's min is read from an initializer only (not a Constant node): a Constant-node min keeps the
        # output point on the layer, as it always has
        lo = gi.inits.get(act.input[1]) if len(act.input) > 1 and act.input[1] else None
        if lo is not None and float(np.asarray(numpy_helper.to_array(lo))) == 0.0:
            return act.output[0]
    return layer.output


def plan_activations(model: onnx.ModelProto, layers: list[Layer], bits: dict[str, int],
                     dialect: QuantDialect) -> tuple[list[str], dict[str, str]]:
    """(tensors that get Q/DQ, alias: tensor -> tensor whose qparams it shares)."""
    gi = Graph(model)
    inits = gi.inits
    graph_outs = set(gi.outputs)
    # classifier-shaped outputs ([N, C]) stay float: rounding logits decides near-ties, and their Gemm is small
    logits_outs = {o.name for o in model.graph.output if len(o.type.tensor_type.shape.dim) == 2}
    q: list[str] = []
    seen: set[str] = set()

    def add(t):
        if t and t not in seen and t not in inits:
            seen.add(t)
            q.append(t)

    for L in layers:
        if bits.get(L.name, 32) == 8:
            add(L.input)
            op = output_point(model, L, gi)
            if op not in graph_outs or (dialect.quantize_graph_outputs and op not in logits_outs):
                add(op)
    alias: dict[str, str] = {}
    changed = True
    while changed:
        changed = False
        for t in list(q):
            p = gi.producer.get(t)
            if p is not None and p.op_type in PASSTHROUGH and p.input[0] not in seen and p.input[0] not in inits:
                src = p.input[0]
                # share params only if the passthrough output is its only quantized view
                add(src)
                alias[src] = alias.get(t, t)
                changed = True
        if dialect.qdq_on_residual_add:
            for n in gi.nodes:
                if n.op_type == "Add" and any(i in seen for i in n.input):
                    for i in n.input:
                        if i not in seen and i not in inits:
                            add(i)
                            changed = True
    return q, alias
