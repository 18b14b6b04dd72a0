"""Error-compensated weight rounding (GPTQ: Frantar et al. 2022, after Optimal Brain Quantization).

Rounding every weight to its nearest grid point minimises ||W_q - W|| but not the layer's output error
||(W_q - W) X||^2 = sum_rows e^T H e with H = X X^T (`calib.gram`). GPTQ quantizes the inputs (columns) of W one at a
time and spreads each column's rounding error over the columns not yet quantized, along the direction that H says
cancels it best:

    for column i:  q_i = clip(round(w_i / s), -qmax, qmax);  e = (w_i - s q_i) / U_ii;  w_{j>i} -= e U_ij

where U is the upper Cholesky factor of (H + lambda I)^-1 (lambda = damp x mean diag H). Scales s (per output row)
are fixed before rounding, so the integer grid, the ranges and the Q/DQ layout are those of plain rounding; only
which integer each weight takes changes. Inputs never seen (diag H = 0) carry no information: their weights round
to nearest.
"""
from __future__ import annotations

import hashlib

import numpy as np


def gptq_round(w: np.ndarray, scales: np.ndarray, h: np.ndarray, qmax: int, *, damp: float = 0.01) -> np.ndarray:
    """w [g, r, d] (g groups of r output rows over d inputs), scales [g, r], h [g, d, d] -> q [g, r, d] (int)."""
    w = np.asarray(w, np.float64).copy()
    s = np.asarray(scales, np.float64)[..., None]
    h = np.array(h, np.float64)
    g, r, d = w.shape
    diag = np.einsum("gii->gi", h)
    dead = diag <= 0
    idx = np.arange(d)
    h[:, idx, idx] += damp * np.maximum(diag.mean(1, keepdims=True), 1e-12) + dead
    u = np.linalg.cholesky(np.linalg.inv(h)).transpose(0, 2, 1)  # upper: h^-1 = u^T u
    q = np.empty((g, r, d), np.int32)
    for i in range(d):
        col = w[:, :, i]
        qi = np.clip(np.round(col / s[..., 0]), -qmax, qmax)
        q[:, :, i] = qi
        err = (col - qi * s[..., 0]) / u[:, i, i][:, None]
        err = np.where(dead[:, i][:, None], 0.0, err)
        if i + 1 < d:
            w[:, :, i + 1:] -= err[:, :, None] * u[:, None, i, i + 1:]
    return q


def output_error(w: np.ndarray, wq: np.ndarray, h: np.ndarray) -> float:
    """sum over groups and rows of (wq - w)^T H (wq - w): the squared output error on the Gram's inputs."""
    e = np.asarray(wq, np.float64) - np.asarray(w, np.float64)
    return float(np.einsum("grd,gde,gre->", e, h, e))


class GptqRounder:
    """Layers' second moments {layer: H [g, d, d]} and their rounded weights, memoised: a search that rebuilds the
    Q/DQ model for many bit assignments rounds each (layer, weight, scales, grid) once."""

    def __init__(self, grams: dict[str, np.ndarray], damp: float = 0.01):
        self.grams, self.damp = grams, damp
        self._memo: dict[tuple, np.ndarray] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.grams

    def __len__(self) -> int:
        return len(self.grams)

    def round(self, name: str, w: np.ndarray, scales: np.ndarray, qmax: int) -> np.ndarray:
        key = (name, int(qmax), hashlib.sha1(np.ascontiguousarray(w, np.float32).tobytes()).hexdigest(),
               hashlib.sha1(np.ascontiguousarray(scales, np.float32).tobytes()).hexdigest())
        if key not in self._memo:
            self._memo[key] = gptq_round(w, scales, self.grams[name], qmax, damp=self.damp)
        return self._memo[key]
