"""Small ONNX files that reproduce what third-party exporters emit (issue 6, first paragraph).

Each generator writes a model into a directory and returns a `RealWorld` record describing how to compile it
(`--input-shape`), which axes are dynamic, and a second shape to run it at. All weights come from a seeded rng,
so every file is byte-identical across runs. Models are tiny (tens of KB) so a compile takes seconds.

  paddle_style        Paddle2ONNX at opset 11/12: hundreds of Constant nodes (BN params, scalars, pads, slice
                      bounds), unfused BatchNormalization, HardSigmoid and HardSwish as x*HardSigmoid(x), Clip with
                      min/max inputs (one with an empty min), Pad/Slice/Resize in input form, Split/Squeeze/Unsqueeze/
                      ReduceMean in attribute form, a weight shared by two Convs, dims `p2o.DynamicDimension.N` and `?`.
  ultralytics_style   YOLOv8-like detector at opset 17: SiLU as Sigmoid*Mul, C2f Split/Concat blocks, an upsampling
                      neck, and a decode head (DFL softmax-conv, anchors from Shape/Gather/Range/Expand, dist2bbox).
  external_data       a CNN whose weights live in an external data file beside the model.
  attention           a transformer block: LayerNormalization, MatMul QKV, multi-head Reshape/Transpose, scaled
                      MatMul-Softmax-MatMul, Erf-GELU MLP, dynamic batch and sequence.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto as T
from onnx import helper, numpy_helper

INT64_MAX = np.iinfo(np.int64).max


@dataclass
class RealWorld:
    name: str
    path: Path
    traits: tuple[str, ...]
    input_shapes: dict[str, tuple[int, ...]]          # the shape to compile at (--input-shape)
    second_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # another valid shape (dynamic models)
    dynamic: tuple[str, ...] = ()                      # --dynamic axes names
    data: str | None = None                            # --data (None: bundled photos / synthetic)

    @property
    def shape_args(self) -> list[str]:
        return [f"{k}:{'x'.join(map(str, v))}" for k, v in self.input_shapes.items()]


class Builder:
    """A tiny graph builder: seeded weights, unique names, Constant-node or initializer constants."""

    def __init__(self, seed: int, const_nodes: bool = False):
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.const_nodes = const_nodes
        self._n = 0

    def name(self, base: str) -> str:
        self._n += 1
        return f"{base}_{self._n}"

    def init(self, arr, base: str = "w") -> str:
        n = self.name(base)
        self.inits.append(numpy_helper.from_array(np.asarray(arr), n))
        return n

    def const(self, arr, base: str = "c", node: bool | None = None) -> str:
        """A constant as a Constant node (Paddle style) or as an initializer."""
        if not (self.const_nodes if node is None else node):
            return self.init(arr, base)
        n = self.name(base)
        self.nodes.append(helper.make_node("Constant", [], [n], name=n + "_const",
                                           value=numpy_helper.from_array(np.asarray(arr), n + "_value")))
        return n

    def op(self, op_type: str, inputs: list[str], n_out: int = 1, base: str | None = None, **attrs):
        outs = [self.name(base or op_type.lower()) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=self.name("n_" + op_type), **attrs))
        return outs[0] if n_out == 1 else outs

    def weight(self, *shape, scale: float | None = None) -> np.ndarray:
        fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else shape[0]
        s = scale if scale is not None else 1.0 / np.sqrt(fan_in)
        return (self.rng.standard_normal(shape) * s).astype(np.float32)

    def conv(self, x, cin, cout, k=3, s=1, group=1, bias=True, pads=None, w_name: str | None = None):
        w = w_name or self.init(self.weight(cout, cin // group, k, k) * 1.6, "conv_w")
        ins = [x, w]
        if bias:
            ins.append(self.init((self.rng.standard_normal(cout) * 0.1).astype(np.float32), "conv_b"))
        p = (k // 2,) * 4 if pads is None else pads
        return self.op("Conv", ins, kernel_shape=[k, k], strides=[s, s], pads=list(p), group=group)

    def bn(self, x, c):
        """Unfused BatchNormalization whose parameters are Constants (Paddle) or initializers."""
        g = self.const(self.rng.uniform(0.6, 1.4, c).astype(np.float32), "bn_scale")
        b = self.const((self.rng.standard_normal(c) * 0.1).astype(np.float32), "bn_bias")
        m = self.const((self.rng.standard_normal(c) * 0.1).astype(np.float32), "bn_mean")
        v = self.const(self.rng.uniform(0.5, 1.5, c).astype(np.float32), "bn_var")
        return self.op("BatchNormalization", [x, g, b, m, v], epsilon=1e-5, momentum=0.9)

    def model(self, inputs, outputs, opset: int, ir_version: int, producer: str, doc: str = "") -> onnx.ModelProto:
        g = helper.make_graph(self.nodes, producer.replace(" ", "_"), inputs, outputs, self.inits, doc_string=doc)
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)], producer_name=producer,
                              producer_version="1.0")
        m.ir_version = ir_version
        return m


def _vi(name, shape, dtype=T.FLOAT):
    return helper.make_tensor_value_info(name, dtype, shape)


# ----------------------------------------------------------------------------------------------- Paddle
def paddle_model(opset: int = 11, blocks: int = 24, seed: int = 0, init_as_inputs: bool = False,
                 c: int = 8) -> onnx.ModelProto:
    assert opset in (11, 12)
    b = Builder(seed, const_nodes=True)

    def scale(x):  # paddle.scale -> Mul + Add with Constant scalars
        return b.op("Add", [b.op("Mul", [x, b.const(np.float32(1.0), "scale")]), b.const(np.float32(0.0), "shift")])

    def hardswish(x):  # Paddle at opset < 14: x * HardSigmoid(x, 1/6, 0.5)
        return b.op("Mul", [x, b.op("HardSigmoid", [x], alpha=1.0 / 6, beta=0.5)])

    def relu6(x, empty_min=False):
        mn = "" if empty_min else b.const(np.float32(0.0), "clip_min")
        return b.op("Clip", [x, mn, b.const(np.float32(6.0), "clip_max")])

    # stem: Conv(s2) + BN + hardswish
    y = hardswish(b.bn(b.conv("x", 3, c, 3, 2, bias=False), c))
    skip = y
    shared = b.init(b.weight(c, c, 1, 1) * 1.6, "shared_w")  # one weight tensor used by two Convs
    for i in range(blocks):
        kind = i % 4
        if kind == 0:  # explicit Pad (pads as a Constant input) then a valid 3x3 conv
            p = b.op("Pad", [y, b.const(np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64), "pads"),
                             b.const(np.float32(0.0), "pad_value")], mode="constant")
            z = relu6(b.bn(b.conv(p, c, c, 3, 1, bias=False, pads=(0, 0, 0, 0)), c))
        elif kind == 1:  # depthwise + BN + hardswish, then SE with ReduceMean(axes attr) and HardSigmoid gate
            z = hardswish(b.bn(b.conv(y, c, c, 3, 1, group=c, bias=False), c))
            s = b.op("ReduceMean", [z], axes=[2, 3], keepdims=1)
            s = b.op("Relu", [b.conv(s, c, c // 2, 1)])
            s = b.op("HardSigmoid", [b.conv(s, c // 2, c, 1)], alpha=0.2, beta=0.5)
            z = b.op("Mul", [z, s])
        elif kind == 2:  # Split (attribute) -> two 1x1 branches (one on the shared weight) -> Concat
            h1, h2 = b.op("Split", [y], n_out=2, axis=1, split=[c // 2, c // 2])
            w1 = b.init(b.weight(c // 2, c // 2, 1, 1) * 1.6, "split_w")
            a1 = relu6(b.conv(h1, c // 2, c // 2, 1, w_name=w1), empty_min=(i % 8 == 2))
            a2 = relu6(b.conv(h2, c // 2, c // 2, 1, w_name=w1))  # the same weight again
            z = b.op("Concat", [a1, a2], axis=1)
            z = b.op("Relu", [b.op("Conv", [z, shared], kernel_shape=[1, 1])])
        else:  # Slice all channels (ends=INT64_MAX, Constant inputs) + scale + shared 1x1 conv + BN
            sl = b.op("Slice", [y, b.const(np.array([0], np.int64), "starts"),
                                b.const(np.array([INT64_MAX], np.int64), "ends"),
                                b.const(np.array([1], np.int64), "axes")])
            z = b.bn(b.op("Conv", [scale(sl), shared], kernel_shape=[1, 1]), c)
            z = relu6(z)
        y = b.op("Add", [y, scale(z)])
    # neck: upsample back to the stem's input resolution with Resize(X, roi, scales) and a skip connection
    up = b.op("Resize", [y, b.const(np.array([], np.float32), "roi"),
                         b.const(np.array([1, 1, 2, 2], np.float32), "scales")], mode="nearest",
              coordinate_transformation_mode="asymmetric", nearest_mode="floor")
    seg = b.conv(up, c, 2, 3)
    # classifier: GAP -> Squeeze(axes attr) -> Gemm -> Unsqueeze(axes attr) -> Squeeze -> Softmax
    gap = b.op("GlobalAveragePool", [b.op("Add", [b.conv(skip, c, c, 1), y])])
    flat = b.op("Squeeze", [gap], axes=[2, 3])
    fc = b.op("Gemm", [flat, b.init(b.weight(10, c) * 2, "fc_w"), b.init(b.weight(10), "fc_b")], transB=1)
    fc = b.op("Squeeze", [b.op("Unsqueeze", [fc], axes=[1])], axes=[1])
    probs = b.op("Softmax", [fc], axis=1)
    b.nodes.append(helper.make_node("Identity", [probs], ["probs"], name="out_probs"))
    b.nodes.append(helper.make_node("Identity", [seg], ["seg_map"], name="out_seg"))
    n, h, w = "p2o.DynamicDimension.0", "?", "p2o.DynamicDimension.1"
    m = b.model([_vi("x", [n, 3, h, w])], [_vi("probs", [n, 10]), _vi("seg_map", [n, 2, "?", "?"])],
                opset, 6 if opset == 11 else 7, "PaddlePaddle", "paddle2onnx-style export")
    if init_as_inputs:  # older exporters list every initializer as a graph input too
        m.graph.input.extend(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in m.graph.initializer)
    return m


# ----------------------------------------------------------------------------------------------- Ultralytics
def ultralytics_model(seed: int = 0, nc: int = 4, reg_max: int = 8, width: int = 8) -> onnx.ModelProto:
    """`width` is the stem's channels (YOLOv8n: 16); the stages double it."""
    b = Builder(seed)
    w1, w2, w3, wh = width, 2 * width, 4 * width, 2 * width

    def silu(x):
        return b.op("Mul", [x, b.op("Sigmoid", [x])])

    def cbs(x, cin, cout, k=3, s=1):
        return silu(b.conv(x, cin, cout, k, s))

    def c2f(x, cin, cout, n=1):
        hid = cout // 2
        y = cbs(x, cin, 2 * hid, 1)
        y0, y1 = b.op("Split", [y, b.init(np.array([hid, hid], np.int64), "split")], n_out=2, axis=1)
        parts = [y0, y1]
        for _ in range(n):
            t = cbs(cbs(parts[-1], hid, hid, 3), hid, hid, 3)
            parts.append(b.op("Add", [parts[-1], t]))
        return cbs(b.op("Concat", parts, axis=1), (2 + n) * hid, cout, 1)

    p1 = cbs("images", 3, w1, 3, 2)            # /2
    p2 = c2f(cbs(p1, w1, w2, 3, 2), w2, w2)    # /4
    p3 = c2f(cbs(p2, w2, w3, 3, 2), w3, w3)    # /8
    up = b.op("Resize", [p3, "", b.init(np.array([1, 1, 2, 2], np.float32), "scales")], mode="nearest")
    n3 = c2f(b.op("Concat", [up, p2], axis=1), w3 + w2, w2)     # neck, /4
    levels = [(n3, w2, 4.0), (p3, w3, 8.0)]
    no = 4 * reg_max + nc
    flat, anchors, strides = [], [], []
    for feat, ch, stride in levels:
        box = b.conv(cbs(feat, ch, wh, 3), wh, 4 * reg_max, 1)
        cls = b.conv(cbs(feat, ch, wh, 3), wh, nc, 1)
        y = b.op("Concat", [box, cls], axis=1)
        shp = b.op("Shape", [y])
        bsz = b.op("Gather", [shp, b.init(np.array(0, np.int64), "i0")], axis=0)
        hh = b.op("Gather", [shp, b.init(np.array(2, np.int64), "i2")], axis=0)
        ww = b.op("Gather", [shp, b.init(np.array(3, np.int64), "i3")], axis=0)
        ax0 = b.init(np.array([0], np.int64), "ax0")
        shape3 = b.op("Concat", [b.op("Unsqueeze", [bsz, ax0]), b.init(np.array([no, -1], np.int64), "nominus1")], axis=0)
        flat.append(b.op("Reshape", [y, shape3]))
        # anchors: (x + 0.5, y + 0.5) over the h x w grid, built from Range/Expand like a traced make_anchors()
        zero, one = b.init(np.array(0, np.int64), "zero"), b.init(np.array(1, np.int64), "one")
        sx = b.op("Add", [b.op("Cast", [b.op("Range", [zero, ww, one])], to=T.FLOAT), b.init(np.float32(0.5), "half")])
        sy = b.op("Add", [b.op("Cast", [b.op("Range", [zero, hh, one])], to=T.FLOAT), b.init(np.float32(0.5), "half")])
        hw = b.op("Concat", [b.op("Unsqueeze", [hh, ax0]), b.op("Unsqueeze", [ww, ax0])], axis=0)
        gx = b.op("Expand", [b.op("Unsqueeze", [sx, ax0]), hw])
        gy = b.op("Expand", [b.op("Unsqueeze", [sy, b.init(np.array([1], np.int64), "ax1")]), hw])
        m1 = b.init(np.array([-1, 1], np.int64), "col")
        anchors.append(b.op("Concat", [b.op("Reshape", [gx, m1]), b.op("Reshape", [gy, m1])], axis=1))
        n_anchor = b.op("Mul", [b.op("Unsqueeze", [hh, ax0]), b.op("Unsqueeze", [ww, ax0])])
        strides.append(b.op("Expand", [b.init(np.array([[stride]], np.float32), "stride"),
                                       b.op("Concat", [n_anchor, b.init(np.array([1], np.int64), "one1")], axis=0)]))
    x = b.op("Concat", flat, axis=2)                                   # [B, no, A]
    anc = b.op("Transpose", [b.op("Concat", anchors, axis=0)], perm=[1, 0])   # [2, A]
    strd = b.op("Transpose", [b.op("Concat", strides, axis=0)], perm=[1, 0])  # [1, A]
    box, cls = b.op("Split", [x, b.init(np.array([4 * reg_max, nc], np.int64), "split_head")], n_out=2, axis=1)
    # DFL: softmax over reg_max bins, then a fixed 1x1 conv with weights 0..reg_max-1
    shp = b.op("Shape", [box])
    bsz = b.op("Gather", [shp, b.init(np.array([0], np.int64), "i0v")], axis=0)
    na = b.op("Gather", [shp, b.init(np.array([2], np.int64), "i2v")], axis=0)
    d = b.op("Reshape", [box, b.op("Concat", [bsz, b.init(np.array([4, reg_max], np.int64), "4r"), na], axis=0)])
    d = b.op("Softmax", [b.op("Transpose", [d], perm=[0, 2, 1, 3])], axis=1)
    dfl_w = b.init(np.arange(reg_max, dtype=np.float32).reshape(1, reg_max, 1, 1), "dfl_w")
    d = b.op("Conv", [d, dfl_w], kernel_shape=[1, 1])
    d = b.op("Reshape", [d, b.op("Concat", [bsz, b.init(np.array([4], np.int64), "four"), na], axis=0)])
    lt, rb = b.op("Slice", [d, b.init(np.array([0], np.int64), "s0"), b.init(np.array([2], np.int64), "s2"),
                            b.init(np.array([1], np.int64), "a1")]), \
        b.op("Slice", [d, b.init(np.array([2], np.int64), "s2b"), b.init(np.array([4], np.int64), "s4"),
                       b.init(np.array([1], np.int64), "a1b")])
    x1y1 = b.op("Sub", [anc, lt])
    x2y2 = b.op("Add", [anc, rb])
    cxy = b.op("Div", [b.op("Add", [x1y1, x2y2]), b.init(np.float32(2.0), "two")])
    wh = b.op("Sub", [x2y2, x1y1])
    dbox = b.op("Mul", [b.op("Concat", [cxy, wh], axis=1), strd])
    b.nodes.append(helper.make_node("Concat", [dbox, b.op("Sigmoid", [cls])], ["output0"], axis=1, name="out"))
    return b.model([_vi("images", ["batch", 3, "height", "width"])], [_vi("output0", ["batch", 4 + nc, "anchors"])],
                   17, 8, "pytorch", "ultralytics-style YOLOv8 export (dynamic=True)")


# ----------------------------------------------------------------------------------------------- external data
def external_cnn(seed: int = 0, widths: tuple[int, ...] = (16, 32), hw: int = 32) -> onnx.ModelProto:
    """Stride-2 3x3 Conv+Relu per entry of `widths`, then a stride-1 one at the same width (when more than two)."""
    b = Builder(seed)
    y, cin = "input", 3
    for i, w in enumerate(widths):
        y = b.op("Relu", [b.conv(y, cin, w, 3, 2)])
        if len(widths) > 2:
            y = b.op("Relu", [b.conv(y, w, w, 3, 1)])
        cin = w
    y = b.op("Flatten", [b.op("GlobalAveragePool", [y])], axis=1)
    b.nodes.append(helper.make_node("Gemm", [y, b.init(b.weight(10, cin) * 2, "fc_w"), b.init(b.weight(10), "fc_b")],
                                    ["logits"], transB=1, name="fc"))
    return b.model([_vi("input", [1, 3, hw, hw])], [_vi("logits", [1, 10])], 17, 8, "pytorch")


# ----------------------------------------------------------------------------------------------- attention
def attention_model(seed: int = 0, d: int = 32, heads: int = 4, classes: int = 10) -> onnx.ModelProto:
    b = Builder(seed)
    hd = d // heads

    def ln(x):
        return b.op("LayerNormalization", [x, b.init(b.rng.uniform(0.8, 1.2, d).astype(np.float32), "ln_g"),
                                           b.init((b.rng.standard_normal(d) * 0.05).astype(np.float32), "ln_b")],
                    axis=-1, epsilon=1e-5)

    def linear(x, cin, cout):
        return b.op("Add", [b.op("MatMul", [x, b.init(b.weight(cout, cin).T.copy(), "lin_w")]),
                            b.init((b.rng.standard_normal(cout) * 0.02).astype(np.float32), "lin_b")])

    x = "tokens"
    h = ln(x)
    qkv = linear(h, d, 3 * d)
    q, k, v = b.op("Split", [qkv, b.init(np.array([d, d, d], np.int64), "qkv_split")], n_out=3, axis=2)
    heads_shape = b.init(np.array([0, 0, heads, hd], np.int64), "heads_shape")
    q = b.op("Transpose", [b.op("Reshape", [q, heads_shape])], perm=[0, 2, 1, 3])
    k = b.op("Transpose", [b.op("Reshape", [k, heads_shape])], perm=[0, 2, 3, 1])
    v = b.op("Transpose", [b.op("Reshape", [v, heads_shape])], perm=[0, 2, 1, 3])
    att = b.op("Mul", [b.op("MatMul", [q, k]), b.init(np.float32(1.0 / np.sqrt(hd)), "att_scale")])
    att = b.op("Softmax", [att], axis=-1)
    o = b.op("Transpose", [b.op("MatMul", [att, v])], perm=[0, 2, 1, 3])
    o = b.op("Reshape", [o, b.init(np.array([0, 0, d], np.int64), "merge_shape")])
    x = b.op("Add", [x, linear(o, d, d)])
    h = linear(ln(x), d, 4 * d)
    gelu = b.op("Mul", [b.op("Mul", [h, b.init(np.float32(0.5), "half")]),
                        b.op("Add", [b.op("Erf", [b.op("Div", [h, b.init(np.float32(np.sqrt(2.0)), "sqrt2")])]),
                                     b.init(np.float32(1.0), "one")])])
    x = b.op("Add", [x, linear(gelu, 4 * d, d)])
    b.nodes.append(helper.make_node("Identity", [x], ["hidden"], name="out_hidden"))
    pooled = b.op("ReduceMean", [x], axes=[1], keepdims=0)
    b.nodes.append(helper.make_node("Gemm", [pooled, b.init(b.weight(classes, d) * 2, "cls_w"),
                                             b.init(b.weight(classes), "cls_b")], ["logits"], transB=1, name="cls"))
    return b.model([_vi("tokens", ["batch", "sequence", d])],
                   [_vi("hidden", ["batch", "sequence", d]), _vi("logits", ["batch", classes])], 17, 8, "pytorch")


# ----------------------------------------------------------------------------------------------- writers
def _save(model: onnx.ModelProto, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.checker.check_model(model)
    path.write_bytes(model.SerializeToString(deterministic=True))
    return path


# Two sizes of every trait model: "tiny" (tests: seconds to compile) and "real" (bench/bench_realworld.py: the
# widths and input sizes of the small production models these traits come from, where int8 kernels and channel
# removal decide latency instead of per-op overhead).
SIZES = {
    "tiny": dict(paddle=dict(c=8, blocks=24), paddle_shape=(32, 32), paddle_second=(48, 40),
                 yolo=dict(width=8), yolo_shape=(64, 64), yolo_second=(96, 64),
                 ext=dict(widths=(16, 32), hw=32),
                 attn=dict(d=32, heads=4), attn_seq=(16, 24)),
    "real": dict(paddle=dict(c=32, blocks=12), paddle_shape=(160, 160), paddle_second=(192, 128),
                 yolo=dict(width=32), yolo_shape=(320, 320), yolo_second=(256, 384),
                 ext=dict(widths=(32, 64, 128), hw=128),
                 attn=dict(d=256, heads=8), attn_seq=(128, 96)),
}


def write_paddle(d: Path, opset: int = 11, init_as_inputs: bool = False, size: str = "tiny") -> RealWorld:
    z = SIZES[size]
    m = paddle_model(opset, init_as_inputs=init_as_inputs, **z["paddle"])
    return RealWorld(f"paddle_opset{opset}", _save(m, d / f"paddle{opset}.onnx"),
                     ("opset 11/12", "hundreds of Constant nodes", "unfused BatchNormalization", "HardSigmoid/HardSwish",
                      "Clip with inputs", "p2o.DynamicDimension.N and ? dims", "shared weights"),
                     {"x": (1, 3, *z["paddle_shape"])}, {"x": (2, 3, *z["paddle_second"])},
                     ("batch", "height", "width"))


def write_ultralytics(d: Path, size: str = "tiny") -> RealWorld:
    z = SIZES[size]
    return RealWorld("ultralytics_detector", _save(ultralytics_model(**z["yolo"]), d / "yolo.onnx"),
                     ("SiLU as Sigmoid*Mul", "C2f Split/Concat", "decode head Shape/Gather/Reshape/Range/Expand"),
                     {"images": (1, 3, *z["yolo_shape"])}, {"images": (2, 3, *z["yolo_second"])},
                     ("batch", "height", "width"))


def write_external(d: Path, size: str = "tiny") -> RealWorld:
    z = SIZES[size]
    path = d / "ext" / "model.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(external_cnn(**z["ext"]), str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="model.onnx.data", size_threshold=0)
    hw = z["ext"]["hw"]
    return RealWorld("external_data", path, ("external data file",), {"input": (1, 3, hw, hw)})


def write_attention(d: Path, size: str = "tiny") -> RealWorld:
    z = SIZES[size]
    dim, (seq, seq2) = z["attn"]["d"], z["attn_seq"]
    return RealWorld("matmul_attention", _save(attention_model(**z["attn"]), d / "attention.onnx"),
                     ("MatMul attention", "LayerNormalization", "Erf GELU"),
                     {"tokens": (1, seq, dim)}, {"tokens": (3, seq2, dim)}, ("batch", "sequence"), data="synthetic")


WRITERS = {
    "paddle_opset11": lambda d, size="tiny": write_paddle(d, 11, init_as_inputs=True, size=size),
    "paddle_opset12": lambda d, size="tiny": write_paddle(d, 12, size=size),
    "ultralytics_detector": write_ultralytics,
    "external_data": write_external,
    "matmul_attention": write_attention,
}


def count_ops(model: onnx.ModelProto) -> dict[str, int]:
    out: dict[str, int] = {}
    for n in model.graph.node:
        out[n.op_type] = out.get(n.op_type, 0) + 1
    return out
