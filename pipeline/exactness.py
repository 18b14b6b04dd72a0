"""What "exact" means for a pass, given that fp32 arithmetic is not associative.

A pass declared exact (normalize, cleanup: BatchNorm and constant folding) computes the same function as its input,
but in a different order: W*gamma/sqrt(var+eps) is rounded once instead of at run time, and a deep network carries
those last-bit differences through ~100 layers. How far they can grow depends on the model, so the runner measures
it per model, on the unmodified input and the verification samples:

  noise = max_rel(ORT with every graph optimization on, ORT with all off)

ORT's optimizer does the same kind of rewrites (BatchNorm into Conv, constant folding, fused activations, NCHWc
layouts that reorder the accumulation), so `noise` is the rounding drift a correct fold produces on this model.
An exact pass fails when it changes outputs by more than

  tol = min(max(EXACT_RTOL, NOISE_K * noise), EXACT_CAP)        EXACT_RTOL = 1e-4, NOISE_K = 8, EXACT_CAP = 1e-2

k = 8 leaves room for the fold landing on the other side of the same rounding boundaries (the measured drift of a
correct fold on the deep models we tried stayed within 1-3 x noise); the cap keeps a model whose optimized run
differs a lot (e.g. rounding flips in an already-quantized graph) from disabling the check. A wrong fold (a lost
epsilon, a mean not subtracted, a transposed weight) changes outputs by 1e-3..1, far above tol on any model we tried.
"""
from __future__ import annotations

import logging

import numpy as np
import onnx

from edgec.core.errors import EdgecError
from edgec.core.fidelity import max_rel
from edgec.core.onnx_io import ort_session, run_session

log = logging.getLogger(__name__)

EXACT_RTOL = 1e-4
NOISE_K = 8.0
EXACT_CAP = 1e-2


def noise_floor(model: onnx.ModelProto, feeds: list[dict], reference: list[list[np.ndarray]]) -> float:
    """max_rel of the unmodified model under ORT 'all' optimizations vs `reference` (its unoptimized outputs).

    Returns 0.0 when the optimized session cannot be built or run (the gate then stays at EXACT_RTOL)."""
    try:
        sess = ort_session(model, optimize=True)
        outs = [run_session(sess, f) for f in feeds]
    except EdgecError as e:
        log.debug("noise floor not measured: %s", e)
        return 0.0
    noise = max_rel(outs, reference)
    return float(noise) if np.isfinite(noise) else EXACT_CAP


def exact_tolerance(noise: float) -> float:
    """tol = min(max(EXACT_RTOL, NOISE_K * noise), EXACT_CAP)."""
    return float(min(max(EXACT_RTOL, NOISE_K * noise), EXACT_CAP))
