"""Kernel check: which precision each layer really runs at after ONNX Runtime's graph optimizations.

Rule: a layer whose quantized weight initializer W (int8 / int4) is consumed, in the ORT-optimized graph, by an
integer kernel (QLinearConv, ConvInteger, QGemm, MatMulInteger, QLinearMatMul, DynamicQuantizeMatMul,
MatMulIntegerToFloat, MatMulNBits, ...) runs integer; if W only reaches a DequantizeLinear (or was constant
folded into an fp32 initializer) the layer runs fp32 compute ("DequantizeLinear -> fp32 Conv"). Layers are
identified by the weight initializer names of the emitted Q/DQ graph, which ORT keeps for fused kernels.
`check_kernels` raises EdgecError when a layer the report calls int8 does not run an integer kernel.
"""
from __future__ import annotations

import logging
import os
import tempfile
from collections import defaultdict

import onnx

from edgec.core.errors import EdgecError
from edgec.core.graph import Graph, node_name
from edgec.core.onnx_io import ort_session

log = logging.getLogger(__name__)

INT8_KERNELS = frozenset({"QLinearConv", "ConvInteger", "QGemm", "MatMulInteger", "QLinearMatMul",
                          "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "QAttention", "DynamicQuantizeLSTM",
                          "NhwcQLinearConv", "QLinearConvTranspose"})
LOWBIT_KERNELS = frozenset({"MatMulNBits", "MatMulBnb4", "GatherBlockQuantized"})
LAYER_OPS = ("Conv", "Gemm", "MatMul")


def quantized_layers(model: onnx.ModelProto) -> dict[str, dict]:
    """Layers of a Q/DQ graph: {layer name: {"weight": quantized initializer, "dtype": int8|int4|fp16|fp32, "op"}}."""
    gi = Graph(model)
    inits, prod = gi.inits, gi.producer
    out = {}
    for i, n in enumerate(model.graph.node):
        if n.op_type not in LAYER_OPS or len(n.input) < 2:
            continue
        name = node_name(n, i)
        w = n.input[1]
        p = prod.get(w)
        if w in inits:
            out[name] = {"weight": w, "dtype": "fp32", "op": n.op_type}
        elif p is not None and p.op_type == "DequantizeLinear" and p.input[0] in inits:
            t = inits[p.input[0]].data_type
            dt = {onnx.TensorProto.INT8: "int8", onnx.TensorProto.UINT8: "uint8", onnx.TensorProto.INT4: "int4",
                  onnx.TensorProto.UINT4: "uint4"}.get(t, str(t))
            out[name] = {"weight": p.input[0], "dtype": dt, "op": n.op_type}
        elif p is not None and p.op_type == "Cast" and p.input[0] in inits:
            out[name] = {"weight": p.input[0], "dtype": "fp16", "op": n.op_type}
    return out


def optimized_graph(model: onnx.ModelProto, *, threads: int = 1, level: str = "all") -> onnx.ModelProto:
    with tempfile.TemporaryDirectory(prefix="edgec-kcheck-") as d:
        path = os.path.join(d, "opt.onnx")
        ort_session(model, threads=threads, optimize=True, level=level, optimized_path=path)
        return onnx.load(path)


def effective_precision(model: onnx.ModelProto, *, optimized: onnx.ModelProto | None = None,
                        threads: int = 1) -> dict[str, dict]:
    """{layer: {"claimed": dtype, "effective": int8|int4|fp32|fp16-storage, "kernel": op type}} after ORT optimization."""
    layers = quantized_layers(model)
    opt = optimized if optimized is not None else optimized_graph(model, threads=threads)
    consumers = defaultdict(list)
    for n in opt.graph.node:
        for i in n.input:
            consumers[i].append(n)
    res = {}
    for name, L in layers.items():
        cons = consumers.get(L["weight"], [])
        kern = next((c for c in cons if c.op_type in INT8_KERNELS | LOWBIT_KERNELS), None)
        if kern is not None:
            eff = "int8" if kern.op_type in INT8_KERNELS else "int4"
            res[name] = {"claimed": L["dtype"], "effective": eff, "kernel": kern.op_type}
            continue
        dq = next((c for c in cons if c.op_type == "DequantizeLinear"), None)
        if dq is not None:
            nxt = [c.op_type for c in consumers.get(dq.output[0], [])]
            res[name] = {"claimed": L["dtype"], "effective": "fp32", "kernel": f"DequantizeLinear->{'/'.join(nxt) or '?'}"}
        elif L["dtype"] == "fp32":
            res[name] = {"claimed": "fp32", "effective": "fp32", "kernel": L["op"]}
        else:
            # the quantized weight vanished: ORT constant-folded DequantizeLinear into an fp32 initializer
            res[name] = {"claimed": L["dtype"], "effective": "fp32", "kernel": f"{L['op']} (weights folded to fp32)"}
    return res


def check_kernels(model: onnx.ModelProto, claimed_bits: dict[str, int] | None = None, *,
                  optimized: onnx.ModelProto | None = None, threads: int = 1, int4_must_run: bool = False) -> dict[str, dict]:
    """Verify every layer claimed int8 runs an integer kernel; raise EdgecError naming the first offenders.

    claimed_bits: {layer: bits} as the report states it (default: what the weights' dtypes claim)."""
    eff = effective_precision(model, optimized=optimized, threads=threads)
    if claimed_bits is None:
        claimed_bits = {k: 8 for k, v in eff.items() if v["claimed"] in ("int8", "uint8")}
    bad = []
    for name, b in claimed_bits.items():
        e = eff.get(name)
        if b == 8 and (e is None or e["effective"] != "int8"):
            bad.append(f"{name} ({e['kernel'] if e else 'not found'})")
        if int4_must_run and b in (4, 3, 2) and (e is None or e["effective"] != "int4"):
            bad.append(f"{name} ({e['kernel'] if e else 'not found'})")
    if bad:
        raise EdgecError(f"kernel check: {len(bad)} layer(s) reported int8 run as fp32 after ORT optimization: "
                         + ", ".join(bad[:5]) + (" ..." if len(bad) > 5 else ""))
    for name, e in eff.items():
        e["bits"] = claimed_bits.get(name, e.get("bits"))
    return eff
