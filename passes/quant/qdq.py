"""Q/DQ insertion by dialect: each quantizable layer (Conv, Gemm, MatMul with a constant weight) gets a precision.

Where Q/DQ go (which layers, output points, pass-through aliases, residual Adds) is the placement policy in
`passes.quant.placement`; this module is the mechanism that emits them, plus weight-storage accounting.

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
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgec.calib.ranges import QParams, expand_scales, qmax, qparams, quantize_weight
from edgec.calib.rounding import GptqRounder
from edgec.core.graph import Graph, node_name, opset, subgraphs
from edgec.passes.quant import gptq
from edgec.passes.quant.dialect import ORT_CPU, QuantDialect
# the placement policy; Layer, find_layers, output_point and plan_activations stay importable from here
from edgec.passes.quant.placement import LAYER_OPS, Layer, find_layers, output_point, plan_activations  # noqa: F401

log = logging.getLogger(__name__)

VALID_BITS = (32, 16, 8, 4, 3, 2)


def _gs():
    import onnx_graphsurgeon as gs

    return gs


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


# ----------------------------------------------------------------------------- insertion
@dataclass
class _Emit:
    """What `insert_qdq` adds to its model copy: new initializers (in order), nodes to insert after a tensor's
    producer ("" = at the top), input rewrites {(node index, input index): new name}, and the names already taken."""
    used: set[str]
    inits: list[onnx.TensorProto] = field(default_factory=list)
    after: dict[str, list[onnx.NodeProto]] = field(default_factory=lambda: defaultdict(list))
    rename: dict[tuple[int, int], str] = field(default_factory=dict)

    def uniq(self, base: str) -> str:
        name, k = base, 1
        while name in self.used:
            name, k = f"{base}_{k}", k + 1
        self.used.add(name)
        return name


@dataclass
class _QWeight:
    """A layer's emitted integer weight: values, scales, the dequantized weight, and where its tensors sit."""
    q: np.ndarray
    s: np.ndarray
    wq: np.ndarray
    block: int | None
    axis: int
    q_name: str
    s_name: str
    index: int  # position of the quantized weight in _Emit.inits; its scale sits at index + 2 for 8 bits
    qmax: int = 127  # largest code: 127, or 63 under the dialect's weight_reduce_range
    gptq: bool = False  # rounded with error compensation (calib.rounding) rather than to nearest


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
            for sg in subgraphs(n):
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
               bias_shift: dict[str, np.ndarray] | None = None,
               rounder: GptqRounder | None = None) -> tuple[onnx.ModelProto, dict]:
    """Emit the Q/DQ graph for per-layer `bits` ({layer name: bits}, missing = 32).

    weight_only=True: 8-bit layers get int8 weights only (no activation Q/DQ, float bias): size-only compression.
    bias_shift: {layer: per-output-channel vector} added to the layer's bias (empirical bias correction).
    rounder: input second moments per layer (`calib.gram`, `calib.rounding.GptqRounder`): those layers' per-channel
        integer weights are rounded with error compensation (GPTQ) instead of to nearest; same scales.

    act_ranges must cover every tensor `plan_activations` returns (clip ranges [lo, hi]). Returns (model, info)
    with info = {"layers": {name: {...}}, "activations": {tensor: {scale, zero_point}}}.
    """
    layers = layers if layers is not None else find_layers(model)
    by_name = {L.name: L for L in layers}
    _check_bits(bits, by_name, dialect)
    m = _working_copy(model, bits, dialect)
    q_tensors, alias = plan_activations(m, layers, {} if weight_only else bits, dialect)
    int32_bias = dialect.int32_bias and not weight_only
    qp = _activation_qparams(q_tensors, alias, act_ranges, dialect)
    gi = Graph(m)
    em = _Emit(_model_names(m))  # unique across the whole model, subgraphs included (node and tensor names)
    act_info, out_rename = _emit_activations(m, gi, em, q_tensors, qp, bits, by_name, dialect)
    info_layers = _emit_weights(gi, em, layers, bits, qp, dialect, weight_method=weight_method,
                                input_means=input_means, bias_correction=bias_correction, bias_shift=bias_shift,
                                int32_bias=int32_bias, rounder=rounder)
    _splice(m, gi, em, out_rename)
    return m, {"layers": info_layers, "activations": act_info}


def _check_bits(bits: dict[str, int], by_name: dict[str, Layer], dialect: QuantDialect) -> None:
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


def _working_copy(model: onnx.ModelProto, bits: dict[str, int], dialect: QuantDialect) -> onnx.ModelProto:
    """A copy of `model` at an opset that has the Q/DQ forms needed (INT4 / blocked DQ for low-bit weights)."""
    low_bit = any(b < 8 for b in bits.values())
    m = onnx.ModelProto()
    m.CopyFrom(model)
    have = opset(m, 0)
    need = dialect.opset if low_bit else max(13, min(have, dialect.opset))
    if have < need:
        m = onnx.version_converter.convert_version(m, need)
    return m


def _activation_qparams(q_tensors: list[str], alias: dict[str, str], act_ranges: dict[str, tuple[float, float]],
                        dialect: QuantDialect) -> dict[str, QParams]:
    missing = [t for t in q_tensors if alias.get(t, t) not in act_ranges and t not in act_ranges]
    if missing:
        raise ValueError(f"no calibration range for {len(missing)} tensor(s), e.g. {missing[0]}")
    act_dtype = dialect.activation_dtype
    qp: dict[str, QParams] = {}
    for t in q_tensors:
        src = t if t in act_ranges and t not in alias else alias.get(t, t)
        qp[t] = qparams(*act_ranges[src], act_dtype, dialect.activation_symmetric)
    return qp


# ----------------------------------------------------------------------------- activations
def _emit_activations(m: onnx.ModelProto, gi: Graph, em: _Emit, q_tensors: list[str], qp: dict[str, QParams],
                      bits: dict[str, int], by_name: dict[str, Layer],
                      dialect: QuantDialect) -> tuple[dict[str, dict], dict[str, str]]:
    """A Q -> DQ pair after each tensor of `q_tensors`; its consumers read the DQ. Returns (activation info,
    {graph output: the name its producer writes now})."""
    act_info: dict[str, dict] = {}
    out_rename: dict[str, str] = {}
    channels = _channels(m, q_tensors)
    index = {id(n): i for i, n in enumerate(gi.nodes)}  # gi.consumers holds the very objects of gi.nodes
    for t in q_tensors:
        p = qp[t]
        tq, tdq = _emit_pair(gi, em, t, p, out_rename)
        pc_dq = None
        for cn, ii in gi.consumers.get(t, []):
            ni = index[id(cn)]
            lname = node_name(cn, ni)
            if (dialect.guard_fp32_layers and ii == 0 and lname in by_name and bits.get(lname, 32) != 8
                    and channels.get(t, 0) > 1):
                # A non-int8 layer must not read a per-tensor DQ: ORT's WeightBiasQuantization would silently
                # quantize its float weights per-tensor. A per-channel DQ (equal scales) keeps it fp32, same values.
                if pc_dq is None:
                    pc_dq = _emit_per_channel_dq(em, t, tq, p, channels[t])
                em.rename[(ni, ii)] = pc_dq
            else:
                em.rename[(ni, ii)] = tdq
        act_info[t] = {"scale": p.scale, "zero_point": p.zero_point, "dtype": p.dtype}
    return act_info, out_rename


def _emit_pair(gi: Graph, em: _Emit, t: str, p: QParams, out_rename: dict[str, str]) -> tuple[str, str]:
    """QuantizeLinear -> DequantizeLinear after `t`; returns (Q output, DQ output)."""
    s_name, z_name = em.uniq(f"{t}_scale"), em.uniq(f"{t}_zero_point")
    em.inits.append(numpy_helper.from_array(np.array(p.scale, np.float32), s_name))
    em.inits.append(numpy_helper.from_array(np.array(p.zero_point, _np_dtype(p.dtype)), z_name))
    tq, tdq = em.uniq(f"{t}_QuantizeLinear"), em.uniq(f"{t}_DequantizeLinear")
    src = t
    if t in gi.outputs and t in gi.producer:
        # a graph output keeps its name on the DequantizeLinear; the layer now writes `<t>_float`
        src = em.uniq(f"{t}_float")
        out_rename[t] = src
        tdq = t
    qn = helper.make_node("QuantizeLinear", [src, s_name, z_name], [tq], name=em.uniq(f"{t}_Q"))
    dqn = helper.make_node("DequantizeLinear", [tq, s_name, z_name], [tdq], name=em.uniq(f"{t}_DQ"))
    em.after[src] += [qn, dqn]
    return tq, tdq


def _emit_per_channel_dq(em: _Emit, t: str, tq: str, p: QParams, c: int) -> str:
    """A second DequantizeLinear of `tq` with `c` equal per-channel scales (axis 1); returns its output."""
    ps_name, pz_name = em.uniq(f"{t}_scale_pc"), em.uniq(f"{t}_zero_point_pc")
    em.inits.append(numpy_helper.from_array(np.full(c, p.scale, np.float32), ps_name))
    em.inits.append(numpy_helper.from_array(np.full(c, p.zero_point, _np_dtype(p.dtype)), pz_name))
    pc_dq = em.uniq(f"{t}_DequantizeLinear_pc")
    em.after[t].append(helper.make_node("DequantizeLinear", [tq, ps_name, pz_name], [pc_dq],
                                        axis=1, name=em.uniq(f"{t}_DQ_pc")))
    return pc_dq


# ----------------------------------------------------------------------------- weights and biases
def _emit_weights(gi: Graph, em: _Emit, layers: list[Layer], bits: dict[str, int], qp: dict[str, QParams],
                  dialect: QuantDialect, *, weight_method: str, input_means: dict | None, bias_correction: bool,
                  bias_shift: dict | None, int32_bias: bool, rounder: GptqRounder | None = None) -> dict[str, dict]:
    """Each non-fp32 layer's weight (fp16 + Cast, or int8 / int4 + DequantizeLinear) and bias; returns layer info."""
    node_index = {node_name(n, ni): ni for ni, n in enumerate(gi.nodes)
                  if n.op_type in LAYER_OPS and len(n.input) > 1 and n.input[1] in gi.inits}
    info_layers: dict[str, dict] = {}
    for L in layers:
        b = bits.get(L.name, 32)
        if b == 32:
            continue
        ni = node_index[L.name]
        w = numpy_helper.to_array(gi.inits[L.weight]).astype(np.float32)
        entry = {"op": L.op, "bits": b, "params": L.params}
        info_layers[L.name] = entry
        if b == 16:
            _emit_fp16_weight(em, L, ni, w)
            entry["weight_dtype"] = "float16"
            continue
        qw = _emit_int_weight(em, L, ni, w, b, dialect, weight_method,
                              rounder if rounder is not None and L.name in rounder else None)
        entry.update(weight_dtype="int8" if b == 8 else "int4", scheme="per-block" if qw.block else "per-channel",
                     block_size=qw.block, axis=qw.axis, rounding="gptq" if qw.gptq else "nearest",
                     weight_rel_err=float(np.linalg.norm(qw.wq - w) / max(np.linalg.norm(w), 1e-12)))
        if L.op == "MatMul":  # no bias input to carry a correction
            continue
        mean = None if input_means is None else input_means.get(L.input)
        bias = _fit_bias(gi, em, L, w, b, qw, entry, qp, mean=mean, bias_correction=bias_correction,
                         bias_shift=bias_shift, int32_bias=int32_bias)
        if bias is not None:
            _emit_bias(gi, em, L, ni, bias, w.shape[L.channel_axis], qw, qp, int32=b == 8 and int32_bias)
    return info_layers


def _emit_fp16_weight(em: _Emit, L: Layer, ni: int, w: np.ndarray) -> None:
    wn = em.uniq(f"{L.weight}_fp16")
    em.inits.append(numpy_helper.from_array(w.astype(np.float16), wn))
    cn = em.uniq(f"{L.weight}_cast")
    em.after[""].append(helper.make_node("Cast", [wn], [cn], to=TensorProto.FLOAT, name=em.uniq(f"{L.name}_w_cast")))
    em.rename[(ni, 1)] = cn


def _emit_int_weight(em: _Emit, L: Layer, ni: int, w: np.ndarray, b: int, dialect: QuantDialect,
                     weight_method: str, rounder: GptqRounder | None = None) -> _QWeight:
    """int8 per-channel, or int4 per-channel / per-block (Gemm/MatMul reductions over the block size), through a
    DequantizeLinear the layer reads as its weight; per-channel weights are rounded by `rounder` (GPTQ) if given."""
    block = None
    axis = L.channel_axis
    if b < 8 and L.op in ("Gemm", "MatMul") and L.w_shape[L.reduce_axis] > dialect.int4_block_size:
        block, axis = dialect.int4_block_size, L.reduce_axis
    qbits = 7 if b == 8 and dialect.weight_reduce_range else b  # 8-bit storage, 7-bit range (see the dialect)
    q, s = quantize_weight(w, qbits, axis=axis, block=block, method=weight_method)
    use_gram = rounder is not None and block is None
    if use_gram:
        rows = gptq.to_rows(w, L)
        q = gptq.from_rows(rounder.round(L.name, rows, s.reshape(rows.shape[:2]), qmax(qbits)), L, w.shape)
        q = q.astype(np.int8)
    wq_name, ws_name = em.uniq(f"{L.weight}_quantized"), em.uniq(f"{L.weight}_scale")
    dq_out = em.uniq(f"{L.weight}_DequantizeLinear")
    qi = len(em.inits)  # index of the quantized weight; its scale is appended last
    if b == 8:
        em.inits.append(numpy_helper.from_array(q, wq_name))
        wz_name = em.uniq(f"{L.weight}_zero_point")
        em.inits.append(numpy_helper.from_array(np.zeros(s.shape, np.int8), wz_name))
        dq_inputs = [wq_name, ws_name, wz_name]
    else:
        em.inits.append(helper.make_tensor(wq_name, TensorProto.INT4, q.shape, q.ravel().astype(np.int64).tolist()))
        dq_inputs = [wq_name, ws_name]
    em.inits.append(numpy_helper.from_array(s.astype(np.float32), ws_name))
    kw = {"axis": axis}
    if block is not None:
        kw["block_size"] = block
    em.after[""].append(helper.make_node("DequantizeLinear", dq_inputs, [dq_out], name=em.uniq(f"{L.name}_w_DQ"), **kw))
    em.rename[(ni, 1)] = dq_out
    wq = (q.astype(np.float32) * expand_scales(s, w.shape, axis=axis, block=block)).astype(np.float32)
    return _QWeight(q, s, wq, block, axis, wq_name, ws_name, qi, qmax(qbits), use_gram)


def _fit_bias(gi: Graph, em: _Emit, L: Layer, w: np.ndarray, b: int, qw: _QWeight, entry: dict,
              qp: dict[str, QParams], *, mean, bias_correction: bool, bias_shift: dict | None,
              int32_bias: bool) -> np.ndarray | None:
    """The bias to emit (None: none): corrected by -(W_q - W) . E[x], shifted by `bias_shift`; for an int32 bias,
    channels whose s_x * s_w cannot hold it get a larger weight scale (`qw` and its initializers are rewritten)."""
    bias0 = numpy_helper.to_array(gi.inits[L.bias]).astype(np.float64).reshape(-1) if L.bias else None
    n_out = w.shape[L.channel_axis]
    for _attempt in range(2):
        bias = bias0
        if bias_correction and mean is not None:
            delta = _output_shift(L, qw.wq - w, np.asarray(mean, np.float64))
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
        bad = qw.s < need
        if not bad.any():
            break
        qw.s = np.where(bad, need, qw.s).astype(np.float32)
        full = expand_scales(qw.s, w.shape, axis=qw.axis, block=None)
        qw.q = np.clip(np.round(w / full), -qw.qmax, qw.qmax).astype(np.int8)  # new scales: round to nearest
        qw.gptq = False
        qw.wq = (qw.q.astype(np.float32) * full).astype(np.float32)
        em.inits[qw.index] = numpy_helper.from_array(qw.q, qw.q_name)
        em.inits[qw.index + 2] = numpy_helper.from_array(qw.s, qw.s_name)
        entry["bias_overflow_channels"] = int(bad.sum())
    return bias


def _emit_bias(gi: Graph, em: _Emit, L: Layer, ni: int, bias: np.ndarray, n_out: int, qw: _QWeight,
               qp: dict[str, QParams], *, int32: bool) -> None:
    """The layer's new bias: int32 with scale s_x * s_w through a DequantizeLinear (w8a8), else float."""
    bias_slot = 2
    if int32:
        s_x = qp[L.input].scale
        s_w = qw.s if qw.block is None else None
        bscale = (s_x * s_w).astype(np.float32)
        bq = np.clip(np.round(bias / bscale.astype(np.float64)), -2**31, 2**31 - 1).astype(np.int32)
        bq_name, bs_name, bz_name = em.uniq(f"{L.name}_bias_quantized"), em.uniq(f"{L.name}_bias_scale"), em.uniq(f"{L.name}_bias_zero_point")
        em.inits += [numpy_helper.from_array(bq, bq_name), numpy_helper.from_array(bscale, bs_name),
                     numpy_helper.from_array(np.zeros(n_out, np.int32), bz_name)]
        b_out = em.uniq(f"{L.name}_bias_DequantizeLinear")
        em.after[""].append(helper.make_node("DequantizeLinear", [bq_name, bs_name, bz_name], [b_out],
                                             axis=0, name=em.uniq(f"{L.name}_b_DQ")))
        bname = b_out
    else:
        bname = em.uniq(f"{L.name}_bias_corrected")
        shape = (1, n_out) if (L.bias and len(gi.inits[L.bias].dims) == 2) else (n_out,)
        em.inits.append(numpy_helper.from_array(bias.reshape(shape).astype(np.float32), bname))
    node = gi.nodes[ni]
    if len(node.input) > bias_slot:
        em.rename[(ni, bias_slot)] = bname
    else:
        node.input.append(bname)


# ----------------------------------------------------------------------------- splice
def _splice(m: onnx.ModelProto, gi: Graph, em: _Emit, out_rename: dict[str, str]) -> None:
    """Apply the input rewrites, rename the producers of quantized graph outputs, insert the new nodes right
    after their producers (graph-input and top-level ones first) and the new initializers; drop unused ones."""
    g = m.graph
    for (ni, ii), new in em.rename.items():
        g.node[ni].input[ii] = new
    for t, src in out_rename.items():
        outs = gi.producer[t].output
        outs[list(outs).index(t)] = src
    order: list[onnx.NodeProto] = list(em.after.get("", []))
    graph_inputs = {i.name for i in g.input}
    for t in list(em.after):
        if t and t in graph_inputs:
            order += em.after[t]
    for n in g.node:
        order.append(n)
        for o in n.output:
            order += em.after.get(o, [])
    del g.node[:]
    g.node.extend(order)
    g.initializer.extend(em.inits)
    _drop_unused_initializers(m)


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
    used = Graph(m).uses  # every tensor a node reads, and the graph outputs
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

