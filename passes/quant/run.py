"""The state one run of the `quant` pass shares across its steps (budget, floor, kernel check).

The model (pad-folded), its quantizable layers and their candidate bits, the calibration (clip ranges and input
means), and the Q/DQ builds: `build(bits)` memoises the last two, because the latency loop, the fastest check, the
floor's first measurement and the final model usually ask for the same bits in a row.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from edgec.calib.rounding import GptqRounder
from edgec.passes.base import PassContext
from edgec.passes.quant.dialect import QuantDialect
from edgec.passes.quant.qdq import Layer, insert_qdq
from edgec.passes.quant.sensitivity import measure_sensitivity


@dataclass
class QuantRun:
    m: onnx.ModelProto
    layers: list[Layer]
    cands: dict[str, list[int]]
    dialect: QuantDialect
    ctx: PassContext
    opts: Any  # passes.quant.quant_pass.QuantOptions
    stats: dict
    ranges: dict[str, tuple[float, float]]
    means: dict[str, np.ndarray]
    rounder: GptqRounder | None = None  # error-compensated rounding (calib.rounding); None: round to nearest
    recent: dict[tuple, tuple[onnx.ModelProto, dict]] = field(default_factory=dict)

    def build(self, bits: dict[str, int]) -> tuple[onnx.ModelProto, dict]:
        """The Q/DQ model for `bits` (fp32 entries dropped), memoised over the last two distinct requests."""
        key = tuple(sorted(bits.items()))
        if key not in self.recent:
            self.recent[key] = insert_qdq(self.m, {k: v for k, v in bits.items() if v != 32}, self.ranges,
                                          self.dialect, weight_method=self.opts.weight_method,
                                          input_means=self.means, bias_correction=self.opts.bias_correction,
                                          layers=self.layers, rounder=self.rounder)
            while len(self.recent) > 2:
                del self.recent[next(iter(self.recent))]
        return self.recent[key]

    def sensitivities(self) -> dict[str, dict[int, float]]:
        """{layer: {bits: S}} for every candidate: given (joint search) or measured on fit samples (cached)."""
        opts, ctx, cands, layers = self.opts, self.ctx, self.cands, self.layers
        if opts.sensitivities is not None:
            sens = {l: {int(b): float(v) for b, v in d.items()} for l, d in opts.sensitivities.items()}
        else:
            feeds = list(itertools.islice(ctx.calib_batches(), opts.sensitivity_samples))
            ctx.progress(f"quant: sensitivity of {len(layers)} layers x {sorted({b for c in cands.values() for b in c})} bits")
            bar = ctx.progress.bar(sum(len([b for b in c if b != 32]) for c in cands.values()), "quant: sensitivity",
                                   unit="trial", detail_every=20)
            sens = measure_sensitivity(self.m, layers, cands, self.ranges, self.dialect, feeds, metric=opts.metric,
                                       weight_method=opts.weight_method, input_means=self.means,
                                       bias_correction=opts.bias_correction, cache_dir=ctx.cache_dir,
                                       threads=ctx.threads, progress=bar.tick,
                                       cache_extra={"calibration": opts.calibration, "samples": opts.calib_samples},
                                       executor=getattr(ctx, "executor", None))
            bar.close()
        sens = {L.name: {b: sens.get(L.name, {}).get(b, 0.0 if b == 32 else np.inf) for b in cands[L.name]}
                for L in layers}
        for d in sens.values():
            for b in list(d):
                if not np.isfinite(d[b]):
                    d[b] = 1e6  # unmeasured: effectively forbidden
        return sens


def hist(bits: dict[str, int]) -> dict[str, int]:
    """{bits: layer count}, widest first (keys as strings, as the report writes them)."""
    h: dict[str, int] = {}
    for b in bits.values():
        h[str(b)] = h.get(str(b), 0) + 1
    return dict(sorted(h.items(), key=lambda kv: -int(kv[0])))
