"""Q/DQ insertion by dialect: each quantizable layer (Conv, Gemm, MatMul with a constant weight) gets a precision.

  32  keep fp32
  16  weight stored fp16, Cast back to fp32 before the layer (size only on CPU)
   8  w8a8: weight int8 symmetric per-channel (q = clip(round(w / s_c), -127, 127), s_c = t_c / 127) through
      DequantizeLinear(axis = output channel); the layer's activation input and its output point (after a
      fusable Relu / Clip(0, .) with a single consumer) get QuantizeLinear -> DequantizeLinear with the dialect's
      activation type (ORT CPU: uint8 asymmetric; TensorRT: int8 symmetric, zero-point 0, per-tensor);
      bias as int32 with scale s_x * s_c and zero-point 0. This is the pattern ORT's QDQ fusions turn into
      QLinearConv / QGemm / QLinearMatMul (and QLinearAdd / QLinearGlobalAveragePool between quantized tensors).
   4, 3, 2  weight-only: q in [-(2^(b-1)-1), 2^(b-1)-1] stored as INT4 (opset 21) with DequantizeLinear;
      block-wise along the reduction axis for Gemm/MatMul (block = dialect.int4_block_size), per output channel
      for Conv (only when the dialect allows int4 Conv; on ORT CPU this is size-only compression).

Pass-through ops (Reshape, Flatten, Squeeze, Unsqueeze, Transpose, MaxPool) between quantized tensors share
their input's quantization parameters, so ORT drops DQ -> op -> Q. With the TensorRT dialect every input of a
residual Add whose other input is quantized also gets Q/DQ.

Optional bias correction: b' = b - (W_q - W) . E[x] (per output channel, E[x] per input channel from
calibration), which removes the mean output shift that weight rounding causes.

Pre-step `fold_pads`: Pad(mode=constant, value 0, constant pads on spatial axes only) -> Conv pads (exact).
"""
from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgec.calib.ranges import QParams, expand_scales, qparams, quantize_weight
from edgec.passes.quant.dialect import ORT_CPU, QuantDialect

log = logging.getLogger(__name__)

LAYER_OPS = ("Conv", "Gemm", "MatMul")
PASSTHROUGH = ("Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose", "MaxPool")
FUSED_ACT = ("Relu", "Clip")
VALID_BITS = (32, 16, 8, 4, 3, 2)


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


def _gs():
    import onnx_graphsurgeon as gs

    return gs


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def layer_name(node: onnx.NodeProto, index: int) -> str:
    return node.name or (node.output[0] if node.output else f"{node.op_type}_{index}")


def find_layers(model: onnx.ModelProto) -> list[Layer]:
    """Quantizable layers in graph order: Conv / Gemm / MatMul whose weight is a float initializer."""
    inits = {i.name: i for i in model.graph.initializer}
    out = []
    for i, n in enumerate(model.graph.node):
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
            ch, red, g = 0, 1, int(_attr(n, "group", 1))
        elif n.op_type == "Gemm":
            if len(shape) != 2 or _attr(n, "transA", 0):
                continue
            tb = int(_attr(n, "transB", 0))
            ch, red, g = (0, 1, 1) if tb else (1, 0, 1)
            if bias is not None and tuple(inits[bias].dims) not in ((shape[ch],), (1, shape[ch])):
                bias = None
        else:
            if len(shape) != 2:
                continue
            ch, red, g = 1, 0, 1
        out.append(Layer(layer_name(n, i), n.op_type, n.input[1], n.input[0], n.output[0], bias, shape, ch, red, g))
    return out


# ----------------------------------------------------------------------------- pre-step: Pad -> Conv pads
def fold_pads(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """Fold constant zero Pad nodes into the Conv that consumes them (exact). Returns (model, folded count)."""
    gs = _gs()
    g = gs.import_onnx(model)
    try:
        g.fold_constants()
    except Exception as e:  # folding is an optimisation; never fatal
        log.debug("fold_constants failed: %s", e)
    g.cleanup()
    folded = 0
    for pad in list(g.nodes):
        if pad.op != "Pad" or pad.attrs.get("mode", "constant") not in ("constant", b"constant"):
            continue
        if len(pad.inputs) < 2 or not isinstance(pad.inputs[1], gs.Constant):
            continue
        if len(pad.inputs) > 3 and pad.inputs[3] is not None and getattr(pad.inputs[3], "name", ""):
            continue  # explicit axes: leave alone
        if len(pad.inputs) > 2 and getattr(pad.inputs[2], "name", ""):
            v = pad.inputs[2]
            if not isinstance(v, gs.Constant) or np.any(np.asarray(v.values) != 0):
                continue
        out = pad.outputs[0]
        if len(out.outputs) != 1 or out in g.outputs:
            continue
        conv = out.outputs[0]
        if conv.op != "Conv" or conv.inputs[0] is not out or conv.attrs.get("auto_pad", "NOTSET") not in ("NOTSET", b"NOTSET"):
            continue
        p = np.asarray(pad.inputs[1].values).astype(np.int64).ravel()
        r = len(p) // 2
        if r < 3 or np.any(p[[0, 1, r, r + 1]] != 0) or np.any(p < 0):
            continue
        sp = r - 2
        cp = list(conv.attrs.get("pads", [0] * (2 * sp)))
        newp = [cp[i] + int(p[2 + i]) for i in range(sp)] + [cp[sp + i] + int(p[r + 2 + i]) for i in range(sp)]
        conv.attrs["pads"] = newp
        conv.inputs[0] = pad.inputs[0]
        pad.outputs.clear()
        folded += 1
    g.cleanup().toposort()
    m = gs.export_onnx(g)
    m.ir_version = model.ir_version
    del m.opset_import[:]
    m.opset_import.extend(model.opset_import)
    return m, folded


# ----------------------------------------------------------------------------- placement plan
def _consumers(model: onnx.ModelProto) -> dict[str, list[onnx.NodeProto]]:
    c = defaultdict(list)
    for n in model.graph.node:
        for i in n.input:
            if i:
                c[i].append(n)
    return c


def _producers(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {o: n for n in model.graph.node for o in n.output}


def _const_value(model: onnx.ModelProto, name: str):
    for i in model.graph.initializer:
        if i.name == name:
            return numpy_helper.to_array(i)
    return None


def output_point(model: onnx.ModelProto, layer: Layer, consumers=None) -> str:
    """Where the layer's output is quantized: after a single-consumer Relu / Clip(min=0) if there is one."""
    consumers = consumers if consumers is not None else _consumers(model)
    cons = consumers.get(layer.output, [])
    graph_outs = {o.name for o in model.graph.output}
    if len(cons) == 1 and layer.output not in graph_outs and cons[0].op_type in FUSED_ACT:
        act = cons[0]
        if act.op_type == "Relu":
            return act.output[0]
        lo = _const_value(model, act.input[1]) if len(act.input) > 1 and act.input[1] else None
        if lo is not None and float(np.asarray(lo)) == 0.0:
            return act.output[0]
    return layer.output


def plan_activations(model: onnx.ModelProto, layers: list[Layer], bits: dict[str, int],
                     dialect: QuantDialect) -> tuple[list[str], dict[str, str]]:
    """(tensors that get Q/DQ, alias: tensor -> tensor whose qparams it shares)."""
    consumers = _consumers(model)
    producers = _producers(model)
    inits = {i.name for i in model.graph.initializer}
    graph_outs = {o.name for o in model.graph.output}
    # classifier-shaped outputs ([N, C]) stay float: rounding logits decides near-ties, and their Gemm is small
    logits_outs = {o.name for o in model.graph.output if len(o.type.tensor_type.shape.dim) == 2}
    q: list[str] = []
    seen = set()

    def add(t):
        if t and t not in seen and t not in inits:
            seen.add(t)
            q.append(t)

    for L in layers:
        if bits.get(L.name, 32) == 8:
            add(L.input)
            op = output_point(model, L, consumers)
            if op not in graph_outs or (dialect.quantize_graph_outputs and op not in logits_outs):
                add(op)
    alias: dict[str, str] = {}
    changed = True
    while changed:
        changed = False
        for t in list(q):
            p = producers.get(t)
            if p is not None and p.op_type in PASSTHROUGH and p.input[0] not in seen and p.input[0] not in inits:
                src = p.input[0]
                # share params only if the passthrough output is its only quantized view
                add(src)
                alias[src] = alias.get(t, t)
                changed = True
        if dialect.qdq_on_residual_add:
            for n in model.graph.node:
                if n.op_type == "Add" and any(i in seen for i in n.input):
                    for i in n.input:
                        if i not in seen and i not in inits:
                            add(i)
                            changed = True
    return q, alias


# ----------------------------------------------------------------------------- insertion
def _model_names(model: onnx.ModelProto) -> set[str]:
    """Every node and tensor name in the model and all its subgraphs (If/Loop/Scan bodies): a name a pass creates
    must collide with none of them (ONNX requires node names unique, and a subgraph may read outer tensors)."""
    names: set[str] = set()

    def walk(g: onnx.GraphProto) -> None:
        names.update(i.name for i in g.initializer)
        names.update(i.name for i in g.input)
        names.update(o.name for o in g.output)
        for n in g.node:
            names.add(n.name)
            names.update(n.output)
            for a in n.attribute:
                for sg in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                    walk(sg)

    walk(model.graph)
    names.discard("")
    return names


def _np_dtype(name: str):
    return {"uint8": np.uint8, "int8": np.int8}[name]


def insert_qdq(model: onnx.ModelProto, bits: dict[str, int], act_ranges: dict[str, tuple[float, float]],
               dialect: QuantDialect = ORT_CPU, *, weight_method: str = "minmax",
               input_means: dict[str, np.ndarray] | None = None, bias_correction: bool = True,
               layers: list[Layer] | None = None, weight_only: bool = False,
               bias_shift: dict[str, np.ndarray] | None = None) -> tuple[onnx.ModelProto, dict]:
    """Emit the Q/DQ graph for per-layer `bits` ({layer name: bits}, missing = 32).

    weight_only=True: 8-bit layers get int8 weights only (no activation Q/DQ, float bias): size-only compression.
    bias_shift: {layer: per-output-channel vector} added to the layer's bias (empirical bias correction).

    act_ranges must cover every tensor `plan_activations` returns (clip ranges [lo, hi]). Returns (model, info)
    with info = {"layers": {name: {...}}, "activations": {tensor: {scale, zero_point}}}.
    """
    layers = layers if layers is not None else find_layers(model)
    by_name = {L.name: L for L in layers}
    for name, b in bits.items():
        if name not in by_name:
            raise ValueError(f"unknown layer {name!r}")
        if b not in VALID_BITS:
            raise ValueError(f"layer {name}: bits {b} not in {VALID_BITS}")
        if b not in dialect.allowed_bits and b not in (32,):
            raise ValueError(f"layer {name}: {b} bits not allowed by dialect {dialect.name} ({dialect.allowed_bits})")
        L = by_name[name]
        if b < 8 and L.op == "Conv" and not dialect.int4_conv:
            raise ValueError(f"layer {name}: dialect {dialect.name} allows low-bit weights only on {', '.join(dialect.int4_ops)}")
    low_bit = any(b < 8 for b in bits.values())
    m = onnx.ModelProto()
    m.CopyFrom(model)
    opset = next((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), 0)
    need = dialect.opset if low_bit else max(13, min(opset, dialect.opset))
    if opset < need:
        m = onnx.version_converter.convert_version(m, need)
    q_tensors, alias = plan_activations(m, layers, {} if weight_only else bits, dialect)
    int32_bias = dialect.int32_bias and not weight_only
    missing = [t for t in q_tensors if alias.get(t, t) not in act_ranges and t not in act_ranges]
    if missing:
        raise ValueError(f"no calibration range for {len(missing)} tensor(s), e.g. {missing[0]}")
    act_dtype = dialect.activation_dtype
    qp: dict[str, QParams] = {}
    for t in q_tensors:
        src = t if t in act_ranges and t not in alias else alias.get(t, t)
        qp[t] = qparams(*act_ranges[src], act_dtype, dialect.activation_symmetric)

    g = m.graph
    new_inits: list[onnx.TensorProto] = []
    new_nodes_after: dict[str, list[onnx.NodeProto]] = defaultdict(list)  # tensor -> nodes to insert after producer
    rename: dict[tuple[int, int], str] = {}  # (node idx, input idx) -> new input name
    info_layers: dict[str, dict] = {}
    init_map = {i.name: i for i in g.initializer}
    consumers_idx = defaultdict(list)
    for ni, n in enumerate(g.node):
        for ii, name in enumerate(n.input):
            consumers_idx[name].append((ni, ii))
    node_index = {}
    for ni, n in enumerate(g.node):
        if n.op_type in LAYER_OPS and len(n.input) > 1 and n.input[1] in init_map:
            node_index[layer_name(n, ni)] = ni
    used_names = _model_names(m)  # unique across the whole model, subgraphs included (node and tensor names)

    def uniq(base: str) -> str:
        name, k = base, 1
        while name in used_names:
            name, k = f"{base}_{k}", k + 1
        used_names.add(name)
        return name

    # activations
    act_info = {}
    graph_outs = {o.name for o in g.output}
    producer_of = {o: n for n in g.node for o in n.output}
    out_rename: dict[str, str] = {}
    channels = _channels(m, q_tensors)
    for t in q_tensors:
        p = qp[t]
        s_name, z_name = uniq(f"{t}_scale"), uniq(f"{t}_zero_point")
        new_inits.append(numpy_helper.from_array(np.array(p.scale, np.float32), s_name))
        new_inits.append(numpy_helper.from_array(np.array(p.zero_point, _np_dtype(p.dtype)), z_name))
        tq, tdq = uniq(f"{t}_QuantizeLinear"), uniq(f"{t}_DequantizeLinear")
        src = t
        if t in graph_outs and t in producer_of:
            # a graph output keeps its name on the DequantizeLinear; the layer now writes `<t>_float`
            src = uniq(f"{t}_float")
            out_rename[t] = src
            tdq = t
        qn = helper.make_node("QuantizeLinear", [src, s_name, z_name], [tq], name=uniq(f"{t}_Q"))
        dqn = helper.make_node("DequantizeLinear", [tq, s_name, z_name], [tdq], name=uniq(f"{t}_DQ"))
        new_nodes_after[src] += [qn, dqn]
        pc_dq = None
        for ni, ii in consumers_idx.get(t, []):
            cn = g.node[ni]
            lname = layer_name(cn, ni)
            if (dialect.guard_fp32_layers and ii == 0 and lname in by_name and bits.get(lname, 32) != 8
                    and channels.get(t, 0) > 1):
                # A non-int8 layer must not read a per-tensor DQ: ORT's WeightBiasQuantization would silently
                # quantize its float weights per-tensor. A per-channel DQ (equal scales) keeps it fp32, same values.
                if pc_dq is None:
                    c = channels[t]
                    ps_name, pz_name = uniq(f"{t}_scale_pc"), uniq(f"{t}_zero_point_pc")
                    new_inits.append(numpy_helper.from_array(np.full(c, p.scale, np.float32), ps_name))
                    new_inits.append(numpy_helper.from_array(np.full(c, p.zero_point, _np_dtype(p.dtype)), pz_name))
                    pc_dq = uniq(f"{t}_DequantizeLinear_pc")
                    new_nodes_after[t].append(helper.make_node("DequantizeLinear", [tq, ps_name, pz_name], [pc_dq],
                                                               axis=1, name=uniq(f"{t}_DQ_pc")))
                rename[(ni, ii)] = pc_dq
            else:
                rename[(ni, ii)] = tdq
        act_info[t] = {"scale": p.scale, "zero_point": p.zero_point, "dtype": p.dtype}

    # weights
    for L in layers:
        b = bits.get(L.name, 32)
        if b == 32:
            continue
        ni = node_index[L.name]
        node = g.node[ni]
        w = numpy_helper.to_array(init_map[L.weight]).astype(np.float32)
        entry = {"op": L.op, "bits": b, "params": L.params}
        if b == 16:
            wn = uniq(f"{L.weight}_fp16")
            new_inits.append(numpy_helper.from_array(w.astype(np.float16), wn))
            cn = uniq(f"{L.weight}_cast")
            g_nodes_pre = helper.make_node("Cast", [wn], [cn], to=TensorProto.FLOAT, name=uniq(f"{L.name}_w_cast"))
            new_nodes_after[""].append(g_nodes_pre)
            rename[(ni, 1)] = cn
            entry["weight_dtype"] = "float16"
            info_layers[L.name] = entry
            continue
        block = None
        axis = L.channel_axis
        if b < 8 and L.op in ("Gemm", "MatMul") and L.w_shape[L.reduce_axis] > dialect.int4_block_size:
            block, axis = dialect.int4_block_size, L.reduce_axis
        q, s = quantize_weight(w, b, axis=axis, block=block, method=weight_method)
        wq_name, ws_name = uniq(f"{L.weight}_quantized"), uniq(f"{L.weight}_scale")
        dq_out = uniq(f"{L.weight}_DequantizeLinear")
        qi = len(new_inits)  # index of the quantized weight; its scale is appended last
        if b == 8:
            new_inits.append(numpy_helper.from_array(q, wq_name))
            wz_name = uniq(f"{L.weight}_zero_point")
            new_inits.append(numpy_helper.from_array(np.zeros(s.shape, np.int8), wz_name))
            dq_inputs = [wq_name, ws_name, wz_name]
        else:
            new_inits.append(helper.make_tensor(wq_name, TensorProto.INT4, q.shape, q.ravel().astype(np.int64).tolist()))
            dq_inputs = [wq_name, ws_name]
        new_inits.append(numpy_helper.from_array(s.astype(np.float32), ws_name))
        kw = {"axis": axis}
        if block is not None:
            kw["block_size"] = block
        new_nodes_after[""].append(helper.make_node("DequantizeLinear", dq_inputs, [dq_out], name=uniq(f"{L.name}_w_DQ"), **kw))
        rename[(ni, 1)] = dq_out
        wq = (q.astype(np.float32) * expand_scales(s, w.shape, axis=axis, block=block)).astype(np.float32)
        entry.update(weight_dtype="int8" if b == 8 else "int4", scheme="per-block" if block else "per-channel",
                     block_size=block, axis=axis, weight_rel_err=float(np.linalg.norm(wq - w) / max(np.linalg.norm(w), 1e-12)))
        # bias (correction, and int32 for w8a8)
        if L.op == "MatMul":  # no bias input to carry a correction
            info_layers[L.name] = entry
            continue
        bias0 = numpy_helper.to_array(init_map[L.bias]).astype(np.float64).reshape(-1) if L.bias else None
        n_out = w.shape[L.channel_axis]
        mean = None if input_means is None else input_means.get(L.input)
        for _attempt in range(2):
            bias = bias0
            if bias_correction and mean is not None:
                delta = _output_shift(L, wq - w, np.asarray(mean, np.float64))
                if delta is not None:
                    bias = (np.zeros(n_out) if bias0 is None else bias0) - delta
                    entry["bias_corrected"] = True
            if bias_shift is not None and L.name in bias_shift:
                bias = (np.zeros(n_out) if bias is None else bias) + np.asarray(bias_shift[L.name], np.float64).reshape(-1)
                entry["bias_shifted"] = True
            if b != 8 or bias is None or not int32_bias:
                break
            # int32 bias must fit: raise the weight scale of channels whose s_x * s_w is too small
            need = np.abs(bias) / (qp[L.input].scale * float(2 ** 30))
            bad = s < need
            if not bad.any():
                break
            s = np.where(bad, need, s).astype(np.float32)
            full = expand_scales(s, w.shape, axis=axis, block=None)
            q = np.clip(np.round(w / full), -127, 127).astype(np.int8)
            wq = (q.astype(np.float32) * full).astype(np.float32)
            new_inits[qi] = numpy_helper.from_array(q, wq_name)
            new_inits[qi + 2] = numpy_helper.from_array(s, ws_name)
            entry["bias_overflow_channels"] = int(bad.sum())
        if bias is not None:
            bias_slot = 2
            if b == 8 and int32_bias:
                s_x = qp[L.input].scale
                s_w = s if block is None else None
                bscale = (s_x * s_w).astype(np.float32)
                bq = np.clip(np.round(bias / bscale.astype(np.float64)), -2**31, 2**31 - 1).astype(np.int32)
                bq_name, bs_name, bz_name = uniq(f"{L.name}_bias_quantized"), uniq(f"{L.name}_bias_scale"), uniq(f"{L.name}_bias_zero_point")
                new_inits += [numpy_helper.from_array(bq, bq_name), numpy_helper.from_array(bscale, bs_name),
                              numpy_helper.from_array(np.zeros(n_out, np.int32), bz_name)]
                b_out = uniq(f"{L.name}_bias_DequantizeLinear")
                new_nodes_after[""].append(helper.make_node("DequantizeLinear", [bq_name, bs_name, bz_name], [b_out],
                                                            axis=0, name=uniq(f"{L.name}_b_DQ")))
                bname = b_out
            else:
                bname = uniq(f"{L.name}_bias_corrected")
                shape = (1, n_out) if (L.bias and len(init_map[L.bias].dims) == 2) else (n_out,)
                new_inits.append(numpy_helper.from_array(bias.reshape(shape).astype(np.float32), bname))
            if len(node.input) > bias_slot:
                rename[(ni, bias_slot)] = bname
            else:
                node.input.append(bname)
        info_layers[L.name] = entry

    for (ni, ii), new in rename.items():
        g.node[ni].input[ii] = new
    for t, src in out_rename.items():
        outs = producer_of[t].output
        outs[list(outs).index(t)] = src
    # rebuild the node list with inserted nodes right after their producers
    producers = _producers(m)
    order: list[onnx.NodeProto] = list(new_nodes_after.get("", []))
    graph_inputs = {i.name for i in g.input}
    for t in list(new_nodes_after):
        if t and t in graph_inputs:
            order += new_nodes_after[t]
    for n in g.node:
        order.append(n)
        for o in n.output:
            order += new_nodes_after.get(o, [])
    del producers
    del g.node[:]
    g.node.extend(order)
    g.initializer.extend(new_inits)
    _drop_unused_initializers(m)
    return m, {"layers": info_layers, "activations": act_info}


def _channels(m: onnx.ModelProto, names: list[str]) -> dict[str, int]:
    """Size of axis 1 of each tensor (0 when unknown), from ONNX shape inference."""
    try:
        inf = onnx.shape_inference.infer_shapes(m)
    except Exception:
        inf = m
    out = {}
    want = set(names)
    for vi in list(inf.graph.value_info) + list(inf.graph.input) + list(inf.graph.output):
        if vi.name in want:
            d = vi.type.tensor_type.shape.dim
            out[vi.name] = d[1].dim_value if len(d) > 1 and d[1].HasField("dim_value") else 0
    return out


def _output_shift(L: Layer, dw: np.ndarray, mean: np.ndarray) -> np.ndarray | None:
    """E[(W_q - W) x] per output channel, given E[x] per input channel."""
    if L.op == "Conv":
        cout, cin_g = dw.shape[0], dw.shape[1]
        if mean.shape[0] != cin_g * L.group:
            return None
        per = dw.reshape(cout, cin_g, -1).sum(-1)  # (cout, cin_g)
        opg = cout // L.group
        m_idx = (np.arange(cout) // opg)[:, None] * cin_g + np.arange(cin_g)[None, :]
        return (per * mean[m_idx]).sum(1)
    if L.op == "Gemm":
        W = dw if L.channel_axis == 0 else dw.T  # (N, K)
        return W @ mean if mean.shape[0] == W.shape[1] else None
    if L.op == "MatMul":
        return mean @ dw if mean.shape[0] == dw.shape[0] else None
    return None


def _drop_unused_initializers(m: onnx.ModelProto) -> None:
    used = {i for n in m.graph.node for i in n.input} | {o.name for o in m.graph.output}
    keep = [i for i in m.graph.initializer if i.name in used]
    if len(keep) != len(m.graph.initializer):
        del m.graph.initializer[:]
        m.graph.initializer.extend(keep)
        gi = [i for i in m.graph.input if i.name in used or i.name not in {x.name for x in keep}]
        del m.graph.input[:]
        m.graph.input.extend(gi)


def op_counts(model: onnx.ModelProto) -> dict[str, int]:
    c: dict[str, int] = defaultdict(int)
    for n in model.graph.node:
        c[n.op_type] += 1
    return dict(c)


# ----------------------------------------------------------------------------- size accounting
def weight_bits(layers: list[Layer], bits: dict[str, int], *, block_size: int = 32,
                keep: dict[str, float] | None = None) -> dict[str, float]:
    """Storage bits per layer weight: elements * b plus one fp32 scale per channel / block (fp16: 16 b/elt).

    keep: optional fraction of weights kept per layer (pruning); pruned weights cost nothing."""
    out = {}
    for L in layers:
        b = bits.get(L.name, 32)
        n = L.params * (keep.get(L.name, 1.0) if keep else 1.0)
        if b >= 16:
            out[L.name] = float(n * b)
            continue
        if b < 8 and L.op in ("Gemm", "MatMul") and L.w_shape[L.reduce_axis] > block_size:
            nscales = int(np.ceil(L.w_shape[L.reduce_axis] / block_size)) * (L.params // L.w_shape[L.reduce_axis])
        else:
            nscales = L.w_shape[L.channel_axis]
        out[L.name] = float(n * b + nscales * 32)
    return out

