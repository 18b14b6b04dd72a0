"""Streaming access to intermediate activations through ONNX Runtime.

`stream_activations(model, names, feeds)` exposes the requested tensors as extra graph outputs on a copy
of the model and yields one dict {name: array} per input sample. Callers reduce on the fly
(running sums, histograms), so memory is bounded by one sample's activations, never the whole set.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np
import onnx

from edgec.core.onnx_io import ort_session, run_session


def with_outputs(model: onnx.ModelProto, names: Iterable[str]) -> onnx.ModelProto:
    """A copy of `model` whose graph additionally outputs `names` (types left for ORT to infer)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    have = {o.name for o in m.graph.output}
    for n in names:
        if n not in have:
            m.graph.output.append(onnx.ValueInfoProto(name=n))
            have.add(n)
    return m


def stream_activations(model: onnx.ModelProto, names: list[str], feeds: Iterable[dict[str, np.ndarray]],
                       *, threads: int = 1, optimize: bool = False) -> Iterator[dict[str, np.ndarray]]:
    """{name: array} per feed for `names` (graph outputs or inner tensors); optimize: ORT graph optimizations on."""
    sess = ort_session(with_outputs(model, names), threads=threads, optimize=optimize)
    out_names = [o.name for o in sess.get_outputs()]
    idx = [out_names.index(n) for n in names]
    for f in feeds:
        res = run_session(sess, f)
        yield {n: res[i] for n, i in zip(names, idx)}


class RunningMoments:
    """Per-channel running mean / mean-abs / zero fraction along axis 1 (Welford-free: sums in float64)."""

    def __init__(self):
        self.n = 0
        self.sum = None
        self.abs_sum = None
        self.sq_sum = None
        self.zero = None
        self.count_per_channel = 0

    def update(self, a: np.ndarray) -> None:
        a = np.asarray(a, np.float64)
        if a.ndim == 1:
            a = a[None]
        c = a.shape[1]
        flat = np.moveaxis(a, 1, 0).reshape(c, -1)
        if self.sum is None:
            self.sum = np.zeros(c)
            self.abs_sum = np.zeros(c)
            self.sq_sum = np.zeros(c)
            self.zero = np.zeros(c)
        self.sum += flat.sum(1)
        self.abs_sum += np.abs(flat).sum(1)
        self.sq_sum += (flat * flat).sum(1)
        self.zero += (flat <= 0).sum(1)
        self.count_per_channel += flat.shape[1]
        self.n += 1

    @property
    def mean(self):
        return self.sum / max(self.count_per_channel, 1)

    @property
    def mean_abs(self):
        return self.abs_sum / max(self.count_per_channel, 1)

    @property
    def apoz(self):
        return self.zero / max(self.count_per_channel, 1)
