"""The vocabulary of the channel analysis (the idea: passes/prune/graph.py): the public records a group is made of
(ChannelRef, Group), the per-tensor layout and rewrite records the analysis collects, and the op tables."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx


@dataclass
class ChannelRef:
    """One place where a group's channels appear."""

    node: str
    op: str
    role: str  # 'out' | 'in' | 'dw' | 'bn' | 'scale' | 'norm' | 'concat' | 'split' | 'slice' | 'reshape' | 'resize'
    weight: str | None = None
    offset: int = 0


@dataclass
class Group:
    id: int
    size: int
    producers: list[ChannelRef]
    consumers: list[ChannelRef]
    others: list[ChannelRef]
    tensors: list[tuple[str, int]]
    stat_tensor: str | None
    stat_offset: int
    prunable: bool
    reason: str | None
    align: int = 1  # kept count must be a multiple; channels fall in `align` equal contiguous blocks, keep equally many per block
    stat_axis: int = 1  # channel axis of stat_tensor (3 for NHWC MatMul blocks such as ConvNeXt's MLP)

    def summary(self) -> dict:
        return {"id": self.id, "size": self.size, "prunable": self.prunable, "reason": self.reason,
                "align": self.align, "members": [f"{r.node}:{r.role}" for r in self.producers + self.consumers + self.others]}


# ----------------------------------------------------------------------------------------------- op tables

_UNARY = {
    "Relu", "LeakyRelu", "Sigmoid", "Tanh", "HardSigmoid", "HardSwish", "Clip", "Elu", "Selu", "Celu", "Gelu",
    "Erf", "Softplus", "Softsign", "Mish", "Neg", "Abs", "Exp", "Log", "Sqrt", "Reciprocal", "Floor", "Ceil",
    "Round", "Sign", "Sin", "Cos", "Not", "Identity", "Dropout", "Cast", "ThresholdedRelu", "Swish", "IsNaN",
    "IsInf", "Shrink",
}
_ELTWISE = {
    "Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean", "PRelu", "Where", "Equal", "Greater", "Less",
    "GreaterOrEqual", "LessOrEqual", "And", "Or", "Xor", "Mod", "BitShift",
}
_POOL = {"MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool"}
_REDUCE = {"ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceL1", "ReduceL2", "ReduceLogSum",
           "ReduceLogSumExp", "ReduceProd", "ReduceSumSquare"}
_SOFTMAX = {"Softmax", "LogSoftmax", "Hardmax"}
MAC_OPS = {"Conv", "ConvTranspose", "Gemm", "MatMul"}
_FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16}
_PARAM_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16,
                onnx.TensorProto.INT8, onnx.TensorProto.UINT8, onnx.TensorProto.INT4, onnx.TensorProto.UINT4}


# ----------------------------------------------------------------------------------------------- analysis records

@dataclass
class _Layout:
    axis: int
    elems: np.ndarray  # int64 element id per position along `axis`


@dataclass
class _Slice:
    """Slice initializer node.input[inp] along `axis` by the kept mask of tensor `t` (block>1: grouped-conv input)."""

    node: int
    inp: int
    axis: int
    t: str
    block: int = 1


@dataclass
class _Rec:
    """A non-initializer rewrite: kind in {'setgroup','split','slice','reshape','resize'}."""

    kind: str
    node: int
    t: str  # the tensor whose kept mask drives it
    data: dict = field(default_factory=dict)


@dataclass
class _Mac:
    node: int
    factors: list  # tensor names whose kept/total scale the MACs


class _Unsupported(Exception):
    pass


def _norm_axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis
