"""Which layers error-compensated rounding (`calib.rounding.gptq_round`) applies to, and how their weights map to
the [groups, output rows, inputs] layout it works in.

A layer gets it when its input second moment H (`calib.gram`) is small enough to hold: d = C/group x prod(kernel)
inputs per output row, d <= max_dim (d x d float64 per group). 1-D and 2-D Conv (explicit pads or auto_pad
VALID), Gemm and MatMul; anything else keeps round-to-nearest, and the pass reports which layers did.
"""
from __future__ import annotations

import numpy as np
import onnx

from edgec.calib.gram import GramSpec
from edgec.core.graph import Graph, attr, node_name
from edgec.passes.quant.placement import Layer


def gram_specs(model: onnx.ModelProto, layers: list[Layer], *, max_dim: int = 2048) -> dict[str, GramSpec]:
    """{layer: GramSpec} for the layers whose inputs error-compensated rounding can use."""
    nodes = {node_name(n, i): n for i, n in enumerate(Graph(model).nodes)}
    out = {}
    for L in layers:
        n = nodes.get(L.name)
        d = int(np.prod(L.w_shape[1:])) if L.op == "Conv" else L.w_shape[L.reduce_axis]
        if n is None or d > max_dim:
            continue
        if L.op != "Conv":
            out[L.name] = GramSpec(L.input, "rows")
            continue
        k = tuple(int(v) for v in L.w_shape[2:])
        if len(k) not in (1, 2) or attr(n, "auto_pad", b"NOTSET") not in (b"NOTSET", b"VALID"):
            continue
        nd = len(k)
        pads = tuple(int(v) for v in (attr(n, "pads", None) or [0] * 2 * nd))
        out[L.name] = GramSpec(L.input, "conv", group=L.group, kernel=k,
                               strides=tuple(int(v) for v in (attr(n, "strides", None) or [1] * nd)), pads=pads,
                               dilations=tuple(int(v) for v in (attr(n, "dilations", None) or [1] * nd)))
    return out


def to_rows(w: np.ndarray, L: Layer) -> np.ndarray:
    """Weight -> [groups, output rows per group, inputs per row]."""
    if L.op == "Conv":
        return w.reshape(L.group, w.shape[0] // L.group, -1)
    return (w.T if L.channel_axis == 1 else w)[None]


def from_rows(q: np.ndarray, L: Layer, shape: tuple[int, ...]) -> np.ndarray:
    """Inverse of `to_rows`."""
    if L.op == "Conv":
        return q.reshape(shape)
    return q[0].T if L.channel_axis == 1 else q[0]
