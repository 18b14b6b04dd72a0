"""Small ONNX graph builders shared by the channel-removal tests (plain onnx.helper, opset 17, float32).

Every builder returns a model with input 'input' (1, 3, H, W) and one output 'output' (1, 10) from a
GlobalAveragePool -> Flatten -> Gemm head, unless stated otherwise.
"""
from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17


class GraphBuilder:
    def __init__(self, c_in: int = 3, hw: int = 8, seed: int = 0):
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.hw = hw
        self.c_in = c_in
        self.n = 0
        self.nc = 0

    def _name(self, op: str) -> str:
        self.n += 1
        return f"{op.lower()}{self.n}"

    def const(self, arr: np.ndarray, name: str | None = None) -> str:
        self.nc += 1
        name = name or f"c{self.nc}"
        self.inits.append(numpy_helper.from_array(np.asarray(arr), name))
        return name

    def w(self, *shape, scale: float | None = None) -> np.ndarray:
        fan = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        s = scale if scale is not None else 1.0 / np.sqrt(max(fan, 1))
        return (self.rng.standard_normal(shape) * s).astype(np.float32)

    def node(self, op: str, inputs: list[str], n_out: int = 1, **attrs) -> list[str]:
        name = self._name(op)
        outs = [f"{name}_out{k}" for k in range(n_out)]
        self.nodes.append(helper.make_node(op, inputs, outs, name=name, **attrs))
        return outs

    # ---- layers
    def conv(self, x: str, cin: int, cout: int, k: int = 3, group: int = 1, bias: bool = True, stride: int = 1) -> str:
        W = self.const(self.w(cout, cin // group, k, k))
        ins = [x, W] + ([self.const(self.w(cout, scale=0.1))] if bias else [])
        return self.node("Conv", ins, kernel_shape=[k, k], pads=[k // 2] * 4, group=group, strides=[stride, stride])[0]

    def conv_t(self, x: str, cin: int, cout: int, k: int = 3, bias: bool = True) -> str:
        W = self.const(self.w(cin, cout, k, k))
        ins = [x, W] + ([self.const(self.w(cout, scale=0.1))] if bias else [])
        return self.node("ConvTranspose", ins, kernel_shape=[k, k], pads=[k // 2] * 4)[0]

    def bn(self, x: str, c: int) -> str:
        g = self.const((1 + 0.2 * self.rng.standard_normal(c)).astype(np.float32))
        b = self.const((0.1 * self.rng.standard_normal(c)).astype(np.float32))
        m = self.const((0.1 * self.rng.standard_normal(c)).astype(np.float32))
        v = self.const((0.5 + self.rng.random(c)).astype(np.float32))
        return self.node("BatchNormalization", [x, g, b, m, v], epsilon=1e-5)[0]

    def act(self, x: str, kind: str = "relu") -> str:
        if kind == "relu":
            return self.node("Relu", [x])[0]
        if kind == "silu":
            s = self.node("Sigmoid", [x])[0]
            return self.node("Mul", [x, s])[0]
        if kind == "hardswish":
            return self.node("HardSwish", [x])[0]
        if kind == "relu6":
            lo = self.const(np.array(0.0, np.float32))
            hi = self.const(np.array(6.0, np.float32))
            return self.node("Clip", [x, lo, hi])[0]
        if kind == "leaky":
            return self.node("LeakyRelu", [x], alpha=0.1)[0]
        if kind == "hardsigmoid_mul":
            s = self.node("HardSigmoid", [x], alpha=1 / 6, beta=0.5)[0]
            return self.node("Mul", [x, s])[0]
        raise ValueError(kind)

    def add(self, a: str, b: str) -> str:
        return self.node("Add", [a, b])[0]

    def concat(self, xs: list[str]) -> str:
        return self.node("Concat", xs, axis=1)[0]

    def split(self, x: str, sizes: list[int]) -> list[str]:
        return self.node("Split", [x, self.const(np.array(sizes, np.int64))], n_out=len(sizes), axis=1)

    def slice(self, x: str, lo: int, hi: int) -> str:
        return self.node("Slice", [x, self.const(np.array([lo], np.int64)), self.const(np.array([hi], np.int64)),
                                   self.const(np.array([1], np.int64))])[0]

    def se(self, x: str, c: int, cs: int, gate: str = "sigmoid") -> str:
        p = self.node("GlobalAveragePool", [x])[0]
        s = self.act(self.conv(p, c, cs, k=1), "relu")
        e = self.conv(s, cs, c, k=1)
        g = self.node("Sigmoid", [e])[0] if gate == "sigmoid" else self.node("HardSigmoid", [e], alpha=1 / 6, beta=0.5)[0]
        return self.node("Mul", [x, g])[0]

    def resize(self, x: str, scale: float = 2.0) -> str:
        sc = self.const(np.array([1, 1, scale, scale], np.float32))
        return self.node("Resize", [x, "", sc], mode="nearest")[0]

    def maxpool(self, x: str) -> str:
        return self.node("MaxPool", [x], kernel_shape=[2, 2], strides=[2, 2])[0]

    def pad(self, x: str) -> str:
        return self.node("Pad", [x, self.const(np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64))], mode="constant")[0]

    def channel_scale(self, x: str, c: int) -> str:
        return self.node("Mul", [x, self.const((1 + 0.3 * self.rng.standard_normal((c, 1, 1))).astype(np.float32))])[0]

    def head(self, x: str, c: int, classes: int = 10, flatten_spatial: int = 0) -> str:
        if flatten_spatial:
            f = self.node("Flatten", [x], axis=1)[0]
            k = c * flatten_spatial
        else:
            f = self.node("Flatten", [self.node("GlobalAveragePool", [x])[0]], axis=1)[0]
            k = c
        B = self.const(self.w(classes, k))
        C = self.const(self.w(classes, scale=0.1))
        return self.node("Gemm", [f, B, C], transB=1)[0]

    def build(self, out: str, out_shape=(1, 10), opset: int = OPSET) -> onnx.ModelProto:
        self.nodes.append(helper.make_node("Identity", [out], ["output"], name="out_identity"))
        g = helper.make_graph(
            self.nodes, "prune_test",
            [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, self.c_in, self.hw, self.hw])],
            [helper.make_tensor_value_info("output", TensorProto.FLOAT, list(out_shape))], self.inits)
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
        m.ir_version = 10 if opset >= 21 else 8
        onnx.checker.check_model(m)
        return m


# ----------------------------------------------------------------------------------------------- graphs

def noisy_copy(m: onnx.ModelProto, scale: float, seed: int = 0) -> onnx.ModelProto:
    """A copy of `m` with Gaussian noise (relative `scale`: times each tensor's std) on every float initializer of
    rank >= 2: a stand-in for a lossy pass whose damage a test controls."""
    out = onnx.ModelProto()
    out.CopyFrom(m)
    r = np.random.default_rng(seed)
    for t in out.graph.initializer:
        a = numpy_helper.to_array(t)
        if a.dtype == np.float32 and a.ndim >= 2:
            t.CopyFrom(numpy_helper.from_array((a + scale * a.std() * r.standard_normal(a.shape)).astype(np.float32),
                                               t.name))
    return out


def chain(bias: bool = True, act: str = "relu") -> onnx.ModelProto:
    b = GraphBuilder()
    x = b.act(b.conv("input", 3, 8, bias=bias), act)
    x = b.act(b.conv(x, 8, 12, bias=bias), act)
    x = b.act(b.conv(x, 12, 16, bias=bias), act)
    return b.build(b.head(x, 16))


def depthwise() -> onnx.ModelProto:
    b = GraphBuilder()
    x = b.act(b.conv("input", 3, 12, k=1), "relu6")
    x = b.act(b.conv(x, 12, 12, group=12), "relu6")
    x = b.conv(x, 12, 8, k=1)
    return b.build(b.head(x, 8))


def grouped() -> onnx.ModelProto:
    b = GraphBuilder()
    x = b.act(b.conv("input", 3, 16, k=1), "relu")
    x = b.act(b.conv(x, 16, 16, group=4), "relu")
    x = b.act(b.conv(x, 16, 8, k=1), "relu")
    return b.build(b.head(x, 8))


def residual() -> onnx.ModelProto:
    b = GraphBuilder()
    t = b.act(b.conv("input", 3, 8), "relu")
    y = b.act(b.conv(t, 8, 6), "relu")
    y = b.conv(y, 6, 8)
    t = b.act(b.add(t, y), "relu")
    y = b.act(b.conv(t, 8, 6), "relu")
    t = b.act(b.add(t, b.conv(y, 6, 8)), "relu")
    return b.build(b.head(t, 8))


def concat() -> onnx.ModelProto:
    b = GraphBuilder()
    x = b.act(b.conv("input", 3, 8), "relu")
    a = b.act(b.conv(x, 8, 6), "relu")
    c = b.act(b.conv(x, 8, 10, k=1), "relu")
    y = b.concat([a, c, x])
    y = b.act(b.conv(y, 24, 8), "relu")
    return b.build(b.head(y, 8))


def split() -> onnx.ModelProto:
    b = GraphBuilder()
    x = b.act(b.conv("input", 3, 12), "relu")
    p, q = b.split(x, [4, 8])
    p = b.act(b.conv(p, 4, 6), "relu")
    q = b.act(b.conv(q, 8, 6), "relu")
    y = b.act(b.conv(b.concat([p, q]), 12, 8), "relu")
    return b.build(b.head(y, 8))


def slice_() -> onnx.ModelProto:
    b = GraphBuilder()
    x = b.act(b.conv("input", 3, 12), "relu")
    p = b.slice(x, 0, 5)
    q = b.slice(x, 5, 12)
    y = b.act(b.conv(b.concat([b.act(b.conv(p, 5, 6), "relu"), q]), 13, 8), "relu")
    return b.build(b.head(y, 8))


def se_block(gate: str = "sigmoid") -> onnx.ModelProto:
    b = GraphBuilder()
    x = b.act(b.conv("input", 3, 12), "silu")
    x = b.se(x, 12, 4, gate=gate)
    x = b.act(b.conv(x, 12, 8, k=1), "relu")
    return b.build(b.head(x, 8))


def flatten_gemm() -> onnx.ModelProto:
    b = GraphBuilder(hw=4)
    x = b.act(b.conv("input", 3, 8), "relu")
    x = b.act(b.conv(x, 8, 6), "relu")
    f = b.node("Flatten", [x], axis=1)[0]
    h = b.act(b.node("Gemm", [f, b.const(b.w(6 * 16, 12)), b.const(b.w(12, scale=0.1))])[0], "relu")
    o = b.node("Gemm", [h, b.const(b.w(10, 12)), b.const(b.w(10, scale=0.1))], transB=1)[0]
    return b.build(o)


def reshape_gemm() -> onnx.ModelProto:
    b = GraphBuilder(hw=4)
    x = b.act(b.conv("input", 3, 8), "relu")
    r = b.node("Reshape", [x, b.const(np.array([1, 8 * 16], np.int64))])[0]
    h = b.act(b.node("MatMul", [r, b.const(b.w(8 * 16, 12))])[0], "relu")
    h = b.node("Add", [h, b.const(b.w(12, scale=0.1))])[0]
    o = b.node("Gemm", [h, b.const(b.w(10, 12)), b.const(b.w(10, scale=0.1))], transB=1)[0]
    return b.build(o)


def conv_transpose() -> onnx.ModelProto:
    b = GraphBuilder()
    x = b.act(b.conv("input", 3, 8), "relu")
    x = b.act(b.conv_t(x, 8, 10), "relu")
    x = b.act(b.conv(x, 10, 8), "relu")
    return b.build(b.head(x, 8))


def resize() -> onnx.ModelProto:
    b = GraphBuilder()
    x = b.act(b.conv("input", 3, 8), "relu")
    x = b.resize(x)
    x = b.act(b.conv(x, 8, 6), "relu")
    x = b.maxpool(b.pad(x))
    return b.build(b.head(x, 6))


def silu() -> onnx.ModelProto:
    return chain(act="silu")


def hardswish() -> onnx.ModelProto:
    b = GraphBuilder()
    x = b.act(b.conv("input", 3, 8), "hardswish")
    x = b.act(b.conv(x, 8, 12), "hardswish")
    x = b.se(x, 12, 4, gate="hardsigmoid")
    x = b.act(b.conv(x, 12, 8), "hardswish")
    return b.build(b.head(x, 8))


def unfused_bn() -> onnx.ModelProto:
    b = GraphBuilder()
    x = b.act(b.bn(b.conv("input", 3, 8, bias=False), 8), "relu")
    y = b.act(b.bn(b.conv(x, 8, 8, bias=False), 8), "relu")
    z = b.concat([x, y])  # DenseNet-style: BN on a concatenation
    z = b.act(b.bn(z, 16), "relu")
    z = b.act(b.conv(z, 16, 8), "leaky")
    z = b.channel_scale(z, 8)
    return b.build(b.head(z, 8))


def split_even_opset18() -> onnx.ModelProto:
    """Split with num_outputs (opset 18) and no sizes: removal must add explicit sizes."""
    b = GraphBuilder()
    x = b.act(b.conv("input", 3, 12), "relu")
    p, q = b.node("Split", [x], n_out=2, axis=1, num_outputs=2)
    y = b.act(b.conv(b.concat([b.act(b.conv(p, 6, 4), "relu"), q]), 10, 8), "relu")
    return b.build(b.head(y, 8), opset=18)


def instnorm_prelu() -> onnx.ModelProto:
    b = GraphBuilder()
    x = b.conv("input", 3, 8)
    x = b.node("InstanceNormalization", [x, b.const((1 + 0.2 * b.rng.standard_normal(8)).astype(np.float32)),
                                         b.const((0.1 * b.rng.standard_normal(8)).astype(np.float32))])[0]
    x = b.node("PRelu", [x, b.const((0.1 + 0.1 * b.rng.random((8, 1, 1))).astype(np.float32))])[0]
    x = b.node("Sub", [b.conv(x, 8, 6), b.const((0.1 * b.rng.standard_normal((1, 6, 1, 1))).astype(np.float32))])[0]
    x = b.node("Div", [b.act(x, "relu"), b.const((1 + b.rng.random((6, 1, 1))).astype(np.float32))])[0]
    return b.build(b.head(x, 6))


GRAPHS = {
    "chain": chain, "chain_nobias": lambda: chain(bias=False), "depthwise": depthwise, "grouped": grouped,
    "residual": residual, "concat": concat, "split": split, "slice": slice_, "se": se_block,
    "flatten_gemm": flatten_gemm, "reshape_matmul": reshape_gemm, "conv_transpose": conv_transpose,
    "resize_pad_pool": resize, "silu": silu, "hardswish": hardswish, "unfused_bn": unfused_bn,
    "split_opset18": split_even_opset18, "instnorm_prelu_sub_div": instnorm_prelu,
}


# ----------------------------------------------------------------------------------------------- helpers

def op_counts(model: onnx.ModelProto) -> Counter:
    return Counter(n.op_type for n in model.graph.node)


def init_arrays(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}


def set_init(model: onnx.ModelProto, name: str, arr: np.ndarray) -> None:
    for i in model.graph.initializer:
        if i.name == name:
            i.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(arr), name))
            return
    raise KeyError(name)


def zero_consumer_inputs(model: onnx.ModelProto, layers: list[dict], channels: np.ndarray) -> onnx.ModelProto:
    """Zero every consumer weight that reads the given group channels (so they contribute exactly nothing)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    arrs = init_arrays(out)
    for L in layers:
        W = arrs[L["weight"]].copy()
        pos = np.asarray(L["positions"])[channels].reshape(-1)
        if L["op"] == "Conv":
            G = L["group"]
            cpg = W.shape[1]
            rows = W.shape[0] // G
            for p in pos:
                blk, j = divmod(int(p), cpg)
                W[blk * rows:(blk + 1) * rows, j] = 0
        elif L["op"] == "ConvTranspose":
            W[pos] = 0
        elif L["op"] == "Gemm" and L["trans_b"]:
            W[:, pos] = 0
        else:  # Gemm (K, N) or MatMul (K, N)
            W[pos] = 0
        arrs[L["weight"]] = W
        set_init(out, L["weight"], W)
    return out


def run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    from edgec.core.onnx_io import ort_session

    return ort_session(model, optimize=False).run(None, {"input": x})[0]


def rel_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))
