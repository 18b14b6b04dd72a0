"""Streaming activation statistics through ONNX Runtime with bounded memory.

For each requested tensor t we keep a fixed-size `calib.ranges.Histogram` (exact min/max plus a signed
histogram whose support doubles as needed) and, optionally, per-channel running moments (axis 1).
Samples are pulled one at a time from `calib.activations.stream_activations`, reduced, and dropped, so peak
memory is O(one sample's activations + bins * tensors), independent of the number of samples.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import onnx

from edgec.calib.activations import RunningMoments, stream_activations
from edgec.calib.ranges import Histogram, estimate_range, range_mse

log = logging.getLogger(__name__)


@dataclass
class TensorStats:
    name: str
    hist: Histogram
    moments: RunningMoments | None = None
    shape: tuple[int, ...] | None = None

    def range(self, method: str = "minmax", *, symmetric: bool = False, percentile: float = 99.999):
        return estimate_range(self.hist, method, symmetric=symmetric, percentile=percentile)

    def best_range(self, methods: Iterable[str], *, symmetric: bool = False) -> tuple[str, tuple[float, float]]:
        """The estimator whose range gives the lowest expected quantization MSE on this tensor."""
        best = None
        for m in methods:
            r = self.range(m, symmetric=symmetric)
            e = range_mse(self.hist, *r, symmetric=symmetric)
            if best is None or e < best[0]:
                best = (e, m, r)
        return best[1], best[2]


@dataclass
class ActivationStats:
    tensors: dict[str, TensorStats] = field(default_factory=dict)
    samples: int = 0

    def __getitem__(self, name: str) -> TensorStats:
        return self.tensors[name]

    def __contains__(self, name: str) -> bool:
        return name in self.tensors


def collect_stats(model: onnx.ModelProto, names: list[str], feeds: Iterable[dict[str, np.ndarray]], *,
                  moments_for: Iterable[str] = (), bins: int = 2048, threads: int = 1,
                  limit: int | None = None) -> ActivationStats:
    """Stream `feeds` through `model` and reduce the activations `names` (and moments for `moments_for`)."""
    names = list(dict.fromkeys(names))
    mom = set(moments_for)
    want = list(dict.fromkeys(names + [m for m in mom if m not in names]))
    out = ActivationStats({n: TensorStats(n, Histogram(bins), RunningMoments() if n in mom else None) for n in want})
    if not want:
        return out

    def _limited():
        for i, f in enumerate(feeds):
            if limit is not None and i >= limit:
                return
            yield f

    for acts in stream_activations(model, want, _limited(), threads=threads):
        for n, a in acts.items():
            ts = out.tensors[n]
            if n in names:
                ts.hist.update(a)
            if ts.moments is not None:
                ts.moments.update(a)
            ts.shape = tuple(a.shape)
        out.samples += 1
    if out.samples == 0:
        raise ValueError("no calibration samples")
    return out
