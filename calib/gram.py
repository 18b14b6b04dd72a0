"""Input second moments of weighted layers, streamed: H = sum_x x x^T over every input vector a layer's weight
multiplies (every im2col patch of a Conv, every row of a Gemm / MatMul input), per group of a grouped Conv.

H is what error-compensated weight rounding (`calib.rounding.gptq_round`) minimises against: the layer's output
error on these inputs is ||(W_q - W) X||_F^2 = sum_rows (w_q - w)^T H (w_q - w). Memory is one d x d matrix per
group and layer (d = inputs per output: C/g * kh * kw), independent of the sample count: samples stream through
ONNX Runtime one at a time (`calib.activations.stream_activations`) and are reduced and dropped.
"""
from __future__ import annotations

import itertools
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import onnx

from edgec.calib.activations import stream_activations


@dataclass(frozen=True)
class GramSpec:
    """How a layer reads its input: kind "conv" (NCHW or NCW input, weight [O, C/group, *kernel]) or "rows"
    (Gemm / MatMul: the last input axis is the reduction)."""

    input: str
    kind: str
    group: int = 1
    kernel: tuple[int, ...] = ()
    strides: tuple[int, ...] = ()
    pads: tuple[int, ...] = ()       # ONNX order: begins then ends
    dilations: tuple[int, ...] = ()


def conv_patches(x: np.ndarray, spec: GramSpec) -> np.ndarray:
    """im2col of one sample: x [1, C, *spatial] -> [group, C/group * prod(kernel), positions], columns ordered
    (c, k0, k1) like a Conv weight [O, C/group, k0, k1] flattened."""
    x = np.asarray(x, np.float32)
    if x.ndim == 3:  # 1-D conv: add a unit spatial axis
        x = x[:, :, None, :]
        kernel, strides, dil = (1, *spec.kernel), (1, *spec.strides), (1, *spec.dilations)
        pads = (0, spec.pads[0], 0, spec.pads[1])
    else:
        kernel, strides, dil, pads = spec.kernel, spec.strides, spec.dilations, spec.pads
    c = x.shape[1]
    xp = np.pad(x[0], ((0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    kh, kw = kernel
    ho = (xp.shape[1] - dil[0] * (kh - 1) - 1) // strides[0] + 1
    wo = (xp.shape[2] - dil[1] * (kw - 1) - 1) // strides[1] + 1
    cols = np.empty((c, kh, kw, ho, wo), np.float32)
    for i in range(kh):
        for j in range(kw):
            r0, c0 = i * dil[0], j * dil[1]
            cols[:, i, j] = xp[:, r0:r0 + strides[0] * (ho - 1) + 1:strides[0],
                               c0:c0 + strides[1] * (wo - 1) + 1:strides[1]]
    return cols.reshape(spec.group, (c // spec.group) * kh * kw, ho * wo)


def input_vectors(x: np.ndarray, spec: GramSpec) -> np.ndarray:
    """[group, d, n]: the n input vectors of one sample that each output row's weights multiply."""
    if spec.kind == "conv":
        return conv_patches(x, spec)
    x = np.asarray(x, np.float32)
    return x.reshape(-1, x.shape[-1]).T[None]


def collect_grams(model: onnx.ModelProto, specs: dict[str, GramSpec], feeds: Iterable[dict[str, np.ndarray]], *,
                  limit: int | None = None, threads: int = 1) -> dict[str, np.ndarray]:
    """{layer: H [group, d, d] (float64)} over the first `limit` feeds, streamed."""
    inputs = list(dict.fromkeys(s.input for s in specs.values()))
    out: dict[str, np.ndarray] = {}
    for acts in stream_activations(model, inputs, itertools.islice(feeds, limit), threads=threads):
        for name, spec in specs.items():
            v = input_vectors(acts[spec.input], spec)
            h = np.matmul(v, v.transpose(0, 2, 1)).astype(np.float64)
            out[name] = h if name not in out else out[name] + h
    return out
