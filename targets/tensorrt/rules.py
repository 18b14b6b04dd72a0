"""CPU rule checker for TensorRT explicit quantization (no TensorRT needed).

A graph passes when every rule below holds; each finding names the node (or tensor) that breaks it.

  qdq-zero-point   Q/DQ zero-point absent or all 0 (TensorRT quantization is symmetric), scale a positive
                   build-time constant, quantized dtype int8 / int4 / fp8 (uint8 Q/DQ is not supported)
  qdq-per-channel  a scale with more than one element (per-channel or block-wise) only on a constant weight:
                   DQ(initializer) or Q(initializer) -> DQ; activations are per-tensor
  int4-weight-only int4 (and block-wise `block_size`) only as DQ(constant int4 weight) feeding the weight
                   input (B, input 1) of Gemm/MatMul; never on activations, never on Conv
  opset            default-domain opset in [9, 24]; above 20 warns (TensorRT 10.0-10.3 document 9..20)
  dtype            every tensor's element type is one TensorRT parses (no double, uint16/32/64, int16,
                   complex, string); double warns (the parser casts it down to float)
  channel-align    (warning) Conv/Gemm/MatMul input and output channel counts that are not multiples of 8
                   miss the int8/fp16 Tensor Core layouts (depthwise Conv and image-stem input channels exempt)
  qdq-axis         a per-channel Q/DQ states its `axis`: without it ONNX means axis 1, while TensorRT's ONNX
                   parser assumes axis 0 (the two disagree silently)
  qdq-scale-count  a per-channel scale has exactly as many elements as the input's size along `axis`
  qdq-scale-dtype  at opset >= 19, a QuantizeLinear's scale has its input's float type (and a Q -> DQ pair's
                   DQ scale the same type); a mismatch fails in a strongly typed network
  qdq-opset        per-channel Q/DQ (`axis`) needs opset >= 13; block-wise (`block_size`) opset >= 21
  int4-shape       an int4 weight has an even last dimension (two int4 values per byte)
  uint8-io         uint8 tensors only at network inputs and outputs (TensorRT has no uint8 compute)
  device-precision precisions the target GPU has: FP8 needs SM >= 8.9 (Jetson Orin is SM 8.7: none), BF16
                   needs SM >= 8.0; without a device, FP8 warns

Constants: initializers, Constant nodes, and Constant/initializer -> Cast/Identity chains (TensorRT folds them).

`check_graph(model)` returns a `RuleReport`; `report.raise_for_errors()` raises one EdgecError line naming
the first failing rule and node.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto

from edgec.core.graph import Graph, attr, node_name, opset

log = logging.getLogger(__name__)

OPSET_MIN, OPSET_MAX, OPSET_DOCUMENTED_10_3 = 9, 24, 20
ALIGN = 8
QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
WEIGHT_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
INT4_OPS = ("Gemm", "MatMul")

_T = TensorProto
SUPPORTED_DTYPES = {_T.FLOAT, _T.FLOAT16, _T.BFLOAT16, _T.INT32, _T.INT64, _T.INT8, _T.UINT8, _T.BOOL,
                    _T.INT4, _T.FLOAT8E4M3FN}
WARN_DTYPES = {_T.DOUBLE}
QUANT_DTYPES = {_T.INT8, _T.INT4, _T.FLOAT8E4M3FN}
RULES = ("qdq-zero-point", "qdq-per-channel", "int4-weight-only", "opset", "dtype", "channel-align", "qdq-axis",
         "qdq-scale-count", "qdq-scale-dtype", "qdq-opset", "int4-shape", "uint8-io", "device-precision")
# Compute capability of the devices the checker knows by name ("sm_89" style names work too).
DEVICES = {"orin": (8, 7), "xavier": (7, 2), "ampere": (8, 0), "ada": (8, 9), "hopper": (9, 0)}
FP8_MIN_SM, BF16_MIN_SM = (8, 9), (8, 0)


def _dtype_name(t: int) -> str:
    return TensorProto.DataType.Name(t) if t in TensorProto.DataType.values() else str(t)


@dataclass(frozen=True)
class Finding:
    rule: str
    severity: str          # "error" | "warning"
    node: str              # node name (or tensor name for graph-level findings)
    message: str

    def line(self) -> str:
        return f"[{self.rule}] node '{self.node}': {self.message}"


@dataclass
class RuleReport:
    findings: list[Finding] = field(default_factory=list)
    checked: dict[str, int] = field(default_factory=lambda: {r: 0 for r in RULES})

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "error"]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "warning"]

    @property
    def passed(self) -> bool:
        return not self.errors

    def failed_rules(self) -> set[str]:
        return {f.rule for f in self.errors}

    def as_dict(self) -> dict:
        return {"passed": self.passed, "errors": len(self.errors), "warnings": len(self.warnings),
                "checked": dict(self.checked),
                "findings": [f.__dict__ for f in self.findings]}

    def raise_for_errors(self) -> None:
        if self.errors:
            from edgec.core.errors import EdgecError

            first = self.errors[0]
            more = f" (+{len(self.errors) - 1} more)" if len(self.errors) > 1 else ""
            raise EdgecError(f"TensorRT rule check failed: {first.line()}{more}")


class _Graph(Graph):
    """core.graph.Graph (a Cast/Identity of a constant is a constant: TensorRT folds it) plus element types and
    static shapes of every tensor."""

    def __init__(self, model: onnx.ModelProto):
        super().__init__(model, fold_casts=True)
        g = model.graph
        self.opset = opset(model, 0)
        self.graph_inputs = {i.name for i in g.input if not self.is_const(i.name)}
        self.types: dict[str, int] = {}
        self.shapes: dict[str, tuple] = {}
        try:
            vis = onnx.shape_inference.infer_shapes(model).graph
        except Exception:  # noqa: BLE001 -- shapes are a help here, not a requirement
            vis = g
        for vi in list(g.input) + list(g.output) + list(g.value_info) + list(vis.value_info):
            if vi.type.HasField("tensor_type"):
                self.types.setdefault(vi.name, vi.type.tensor_type.elem_type)
                if vi.type.tensor_type.HasField("shape"):
                    self.shapes.setdefault(vi.name, tuple(d.dim_value if d.HasField("dim_value") else None
                                                          for d in vi.type.tensor_type.shape.dim))
        self.io = {i.name for i in g.input} | {o.name for o in g.output}
        for name in list(self.inits) + list(self.cnodes) + list(self._derived):
            t = self.const_tensor(name)
            if t is not None:
                self.types[name] = t.data_type


def _qdq_dtype(g: _Graph, n: onnx.NodeProto) -> int | None:
    """The quantized element type of a Q (its output) or DQ (its input)."""
    if len(n.input) > 2 and n.input[2] and n.input[2] in g.types:
        return g.types[n.input[2]]
    if n.op_type == "QuantizeLinear":
        od = attr(n, "output_dtype", 0)
        if od:
            return od
        return g.types.get(n.output[0], TensorProto.UINT8 if len(n.input) < 3 or not n.input[2] else None)
    return g.types.get(n.input[0])


def _check_opset(model: onnx.ModelProto, rep: RuleReport) -> None:
    rep.checked["opset"] += 1
    ver = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if ver is None:
        rep.findings.append(Finding("opset", "error", "<model>", "no default-domain opset import"))
    elif not OPSET_MIN <= ver <= OPSET_MAX:
        rep.findings.append(Finding("opset", "error", "<model>",
                                    f"opset {ver} outside the range TensorRT 10.x parses ({OPSET_MIN}..{OPSET_MAX})"))
    elif ver > OPSET_DOCUMENTED_10_3:
        rep.findings.append(Finding("opset", "warning", "<model>",
                                    f"opset {ver}: TensorRT 10.0-10.3 (JetPack 6) document opsets {OPSET_MIN}..{OPSET_DOCUMENTED_10_3}; "
                                    "the parser accepts newer opsets with a warning"))
    for o in model.opset_import:
        if o.domain not in ("", "ai.onnx", "ai.onnx.ml", "com.microsoft", "trt", "trt.plugins"):
            rep.findings.append(Finding("opset", "warning", "<model>", f"custom domain '{o.domain}' needs a TensorRT plugin"))


def _check_dtypes(g: _Graph, rep: RuleReport) -> None:
    for name, t in sorted(g.types.items()):
        rep.checked["dtype"] += 1
        if t in WARN_DTYPES:
            rep.findings.append(Finding("dtype", "warning", name, "DOUBLE is cast down to FLOAT by the TensorRT parser"))
        elif t not in SUPPORTED_DTYPES and t != TensorProto.UNDEFINED:
            who = g.producer.get(name)
            rep.findings.append(Finding("dtype", "error", who.name if who is not None and who.name else name,
                                        f"tensor '{name}' has element type {_dtype_name(t)}, which TensorRT does not support"))


def _check_qdq(g: _Graph, idx: int, n: onnx.NodeProto, rep: RuleReport) -> None:
    name = node_name(n, idx)
    # --- zero-point, scale and quantized dtype ---
    rep.checked["qdq-zero-point"] += 1
    if not g.is_const(n.input[1]):
        rep.findings.append(Finding("qdq-zero-point", "error", name, f"scale '{n.input[1]}' is not a build-time constant"))
    else:
        s = g.const(n.input[1]).astype(np.float64)
        if s.size == 0 or not np.all(np.isfinite(s)) or np.any(s <= 0):
            rep.findings.append(Finding("qdq-zero-point", "error", name, "scale must be finite and > 0"))
    qd = _qdq_dtype(g, n)
    if qd is not None and qd not in QUANT_DTYPES:
        hint = ("; keep the bias in float for TensorRT (no int32 bias DequantizeLinear)"
                if qd == TensorProto.INT32 else "")
        rep.findings.append(Finding("qdq-zero-point", "error", name,
                                    f"quantized type {_dtype_name(qd)}: TensorRT supports only signed int8, int4 and fp8 Q/DQ{hint}"))
    if len(n.input) > 2 and n.input[2]:
        zp = g.const(n.input[2])
        if zp is None:
            rep.findings.append(Finding("qdq-zero-point", "error", name, f"zero-point '{n.input[2]}' is not a constant"))
        elif np.any(zp.astype(np.float64) != 0):
            nz = zp.ravel()[np.flatnonzero(zp.ravel())[0]]
            rep.findings.append(Finding("qdq-zero-point", "error", name,
                                        f"zero-point is {nz!r}, must be 0 (TensorRT quantization is symmetric)"))
    # --- per-channel only on constant weights ---
    rep.checked["qdq-per-channel"] += 1
    s = g.const(n.input[1])
    per_channel = s is not None and s.size > 1
    blocked = bool(attr(n, "block_size", 0))
    if per_channel or blocked:
        x = n.input[0]
        weight = g.is_const(x)
        if n.op_type == "DequantizeLinear" and not weight:
            p = g.producer.get(x)
            # Q(W) -> DQ: the pair quantizes a constant weight.
            weight = p is not None and p.op_type == "QuantizeLinear" and g.is_const(p.input[0])
        if not weight:
            kind = "block-wise" if blocked else f"per-channel ({s.size} scales)"
            rep.findings.append(Finding("qdq-per-channel", "error", name,
                                        f"{kind} quantization of activation '{x}': only constant weights may be per-channel"))
    # --- int4 weight-only on Gemm/MatMul ---
    if qd == TensorProto.INT4 and g.is_const(n.input[0]):
        rep.checked["int4-shape"] += 1
        dims = tuple(g.const_tensor(n.input[0]).dims)
        if dims and dims[-1] % 2:
            rep.findings.append(Finding("int4-shape", "error", name,
                                        f"int4 weight '{n.input[0]}' has shape {list(dims)}: the last dimension must be even"))
    if qd == TensorProto.INT4 or blocked:
        rep.checked["int4-weight-only"] += 1
        if qd != TensorProto.INT4:
            rep.findings.append(Finding("int4-weight-only", "error", name,
                                        f"block-wise quantization with {_dtype_name(qd) if qd else 'unknown'} type: TensorRT supports block_size only for int4 weights"))
        if n.op_type == "QuantizeLinear":
            if not g.is_const(n.input[0]):
                rep.findings.append(Finding("int4-weight-only", "error", name,
                                            f"int4 quantization of activation '{n.input[0]}': int4 is weight-only"))
            return
        if not g.is_const(n.input[0]) and not (
                (p := g.producer.get(n.input[0])) is not None and p.op_type == "QuantizeLinear" and g.is_const(p.input[0])):
            rep.findings.append(Finding("int4-weight-only", "error", name,
                                        f"int4 dequantization of activation '{n.input[0]}': int4 is weight-only"))
        for c, slot in g.consumers.get(n.output[0], []):
            if c.op_type not in INT4_OPS:
                rep.findings.append(Finding("int4-weight-only", "error", name,
                                            f"int4 weight feeds {c.op_type} '{c.name}': int4 is allowed only on Gemm/MatMul"))
            elif slot != 1:
                rep.findings.append(Finding("int4-weight-only", "error", name,
                                            f"int4 tensor is input {slot} of {c.op_type} '{c.name}': only the weight (input 1) may be int4"))


def _check_qdq_axis(g: _Graph, idx: int, n: onnx.NodeProto, rep: RuleReport) -> None:
    """qdq-axis, qdq-scale-count, qdq-opset and qdq-scale-dtype for one Q/DQ node."""
    name = node_name(n, idx)
    s = g.const(n.input[1])
    blocked = bool(attr(n, "block_size", 0))
    per_channel = s is not None and s.size > 1 and not blocked
    if per_channel or blocked:
        rep.checked["qdq-opset"] += 1
        need = 21 if blocked else 13
        if g.opset < need:
            rep.findings.append(Finding("qdq-opset", "error", name,
                                        f"{'block-wise' if blocked else 'per-channel'} Q/DQ needs opset >= {need}, the model has {g.opset}"))
    if per_channel:
        rep.checked["qdq-axis"] += 1
        axis = attr(n, "axis", None)
        if axis is None:
            rep.findings.append(Finding("qdq-axis", "error", name,
                                        f"per-channel scale ({s.size} values) without an `axis` attribute: ONNX means "
                                        "axis 1, TensorRT's parser assumes axis 0; set axis explicitly"))
        x = n.input[0]
        shape = tuple(g.const_tensor(x).dims) if g.is_const(x) else g.shapes.get(x)
        rep.checked["qdq-scale-count"] += 1
        a = 1 if axis is None else int(axis)
        if shape and -len(shape) <= a < len(shape) and shape[a] is not None and shape[a] > 0 and shape[a] != s.size:
            rep.findings.append(Finding("qdq-scale-count", "error", name,
                                        f"{s.size} scales for axis {a} of '{x}', which has size {shape[a]}"))
    if g.opset >= 19 and n.op_type == "QuantizeLinear":
        rep.checked["qdq-scale-dtype"] += 1
        tx, ts = g.types.get(n.input[0]), g.types.get(n.input[1])
        if tx and ts and tx != ts:
            rep.findings.append(Finding("qdq-scale-dtype", "error", name,
                                        f"scale is {_dtype_name(ts)}, input '{n.input[0]}' is {_dtype_name(tx)}: "
                                        "a strongly typed network needs them equal"))
        for c, _ in g.consumers.get(n.output[0], []):
            tc = g.types.get(c.input[1]) if c.op_type == "DequantizeLinear" and len(c.input) > 1 else None
            if tx and tc and tc != tx:
                rep.findings.append(Finding("qdq-scale-dtype", "error", node_name(c, -1),
                                            f"DequantizeLinear scale is {_dtype_name(tc)}, its QuantizeLinear input "
                                            f"'{n.input[0]}' is {_dtype_name(tx)}: a strongly typed network needs them equal"))


def _check_uint8(g: _Graph, rep: RuleReport) -> None:
    for name, t in sorted(g.types.items()):
        if t != TensorProto.UINT8:
            continue
        rep.checked["uint8-io"] += 1
        if name not in g.io:
            who = g.producer.get(name)
            rep.findings.append(Finding("uint8-io", "error", who.name if who is not None and who.name else name,
                                        f"tensor '{name}' is uint8 inside the network: TensorRT allows uint8 only "
                                        "at network inputs and outputs"))


def device_sm(device: str | None) -> tuple[int, int] | None:
    """'orin' -> (8, 7); 'sm_89' / 'sm89' -> (8, 9); None -> None."""
    if device is None:
        return None
    d = str(device).lower()
    if d in DEVICES:
        return DEVICES[d]
    digits = d.replace("sm_", "").replace("sm", "").replace(".", "")
    if digits.isdigit() and len(digits) >= 2:
        return int(digits[:-1]), int(digits[-1])
    from edgec.core.errors import EdgecError

    raise EdgecError(f"unknown TensorRT device '{device}' (known: {', '.join(sorted(DEVICES))}, or sm_XY)")


def _check_device(g: _Graph, rep: RuleReport, device: str | None) -> None:
    sm = device_sm(device)
    where = f"{device} (SM {sm[0]}.{sm[1]})" if sm else "any GPU"
    for name, t in sorted(g.types.items()):
        need = FP8_MIN_SM if t in (TensorProto.FLOAT8E4M3FN, TensorProto.FLOAT8E5M2) else (
            BF16_MIN_SM if t == TensorProto.BFLOAT16 else None)
        if need is None:
            continue
        rep.checked["device-precision"] += 1
        who = g.producer.get(name)
        node = who.name if who is not None and who.name else name
        msg = f"tensor '{name}' is {_dtype_name(t)}, which needs SM >= {need[0]}.{need[1]}; target: {where}"
        if sm is None:
            if need == FP8_MIN_SM:
                rep.findings.append(Finding("device-precision", "warning", node, msg + " (Jetson Orin has no FP8)"))
        elif sm < need:
            rep.findings.append(Finding("device-precision", "error", node, msg))


def _weight_source(g: _Graph, name: str) -> str | None:
    """Follow DQ / Transpose / Cast / Identity back to a constant weight; return its name."""
    seen = 0
    while name and seen < 6:
        if g.is_const(name):
            return name
        p = g.producer.get(name)
        if p is None or p.op_type not in ("DequantizeLinear", "QuantizeLinear", "Transpose", "Cast", "Identity", "Reshape"):
            return None
        name = p.input[0]
        seen += 1
    return None


def _fed_by_input(g: _Graph, name: str) -> bool:
    """Whether a tensor comes from a graph input through layout/precision ops only (image stem)."""
    for _ in range(6):
        if name in g.graph_inputs:
            return True
        p = g.producer.get(name)
        if p is None or p.op_type not in ("QuantizeLinear", "DequantizeLinear", "Cast", "Identity", "Transpose"):
            return False
        name = p.input[0]
    return False


def _check_channels(g: _Graph, idx: int, n: onnx.NodeProto, rep: RuleReport) -> None:
    if n.op_type not in WEIGHT_OPS or len(n.input) < 2:
        return
    wname = _weight_source(g, n.input[1])
    if wname is None:
        return
    shape = tuple(g.const_tensor(wname).dims)
    rep.checked["channel-align"] += 1
    name = node_name(n, idx)
    if n.op_type in ("Conv", "ConvTranspose"):
        if len(shape) < 3:
            return
        group = int(attr(n, "group", 1))
        if n.op_type == "Conv":
            cout, cin = shape[0], shape[1] * group
        else:
            cin, cout = shape[0], shape[1] * group
        if group > 1 and group == cin:
            return  # depthwise: no Tensor Core GEMM channel layout
        dims = [("output channels", cout)]
        if not _fed_by_input(g, n.input[0]):
            dims.append(("input channels", cin))
    else:
        if len(shape) != 2:
            return
        trans_b = n.op_type == "Gemm" and int(attr(n, "transB", 0))
        k, m = (shape[1], shape[0]) if trans_b else (shape[0], shape[1])
        dims = [("output features", m), ("input features", k)]
    for what, c in dims:
        if c % ALIGN:
            rep.findings.append(Finding("channel-align", "warning", name,
                                        f"{what} {c} not a multiple of {ALIGN}: misses int8/fp16 Tensor Core layouts (padded)"))


def check_graph(model: onnx.ModelProto, device: str | None = None) -> RuleReport:
    """Check every TensorRT explicit-quantization rule (precisions judged for `device`, e.g. "orin");
    never raises for a rule violation (an unknown device name is the user's error)."""
    rep = RuleReport()
    g = _Graph(model)
    _check_opset(model, rep)
    _check_dtypes(g, rep)
    _check_uint8(g, rep)
    _check_device(g, rep, device)
    for i, n in enumerate(model.graph.node):
        if n.op_type in QDQ_OPS and n.domain in ("", "ai.onnx"):
            _check_qdq(g, i, n, rep)
            _check_qdq_axis(g, i, n, rep)
        _check_channels(g, i, n, rep)
    for f in rep.findings:
        log.debug("tensorrt rules: %s %s", f.severity, f.line())
    return rep


def main(argv=None) -> int:
    """python -m targets.tensorrt.rules model.onnx [--json]: exit 1 when a rule is broken."""
    import argparse
    import json

    ap = argparse.ArgumentParser(description="Check an ONNX graph against the TensorRT explicit-quantization rules.")
    ap.add_argument("model")
    ap.add_argument("--json", action="store_true", help="print the full report as JSON")
    ap.add_argument("--device", default=None, help="judge precisions for this GPU: orin, ada, sm_89, ...")
    a = ap.parse_args(argv)
    rep = check_graph(onnx.load(a.model, load_external_data=False), device=a.device)
    if a.json:
        print(json.dumps(rep.as_dict(), indent=2))
    else:
        for f in rep.findings:
            print(f"{f.severity}: {f.line()}")
        print(f"{'PASS' if rep.passed else 'FAIL'}: {len(rep.errors)} error(s), {len(rep.warnings)} warning(s)")
    return 0 if rep.passed else 1


if __name__ == "__main__":
    raise SystemExit(main())
