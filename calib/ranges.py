"""Range estimators for quantization: pick the clipping range [lo, hi] that a tensor is quantized over.

Activations are per-tensor and are summarised by a streaming `Histogram` (signed, symmetric support
[-R, R], N bins; when a value exceeds R the support doubles and pairs of bins merge, so memory is O(N)):

  minmax      [min x, max x]
  percentile  [q_(1-p), q_p] of the histogram (one-sided for non-negative tensors)
  entropy     TensorRT-style: fold to |x|, for each candidate threshold T (bin edge i >= levels) take
              P = hist[:i] with the tail added to the last bin, Q = P merged into `levels` buckets and
              expanded back over P's non-empty bins; T* = argmin KL(P || Q)
  mse         T* = argmin_T sum_b count_b * (fq_T(c_b) - c_b)^2 over bin centres c_b, where fq_T is the
              fake-quantizer on the range scaled by T (expected squared quantization error)

All ranges include 0 (so zero is exactly representable). `qparams(lo, hi, dtype, symmetric)` gives
  asymmetric uint8: s = (hi - lo) / 255, zp = round(-lo / s)
  symmetric  int8 : s = max(|lo|, |hi|) / 127, zp = 0

Weights are per-channel (axis 0 for Conv / the output axis for Gemm) or per-block (int4 and below, blocks of
`block` consecutive elements along the reduction axis); all symmetric, s = t / (2^(b-1) - 1) where the clip
t is max|w| (minmax) or the per-channel MSE-optimal clip (mse). Quantize q = clip(round(w / s), -(2^(b-1)-1), 2^(b-1)-1) (narrow, symmetric)
so |w - s q| <= s / 2 for unclipped w (half an LSB).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ESTIMATORS = ("minmax", "percentile", "entropy", "mse")


# ----------------------------------------------------------------------------- streaming histogram
class Histogram:
    """Signed histogram on [-R, R] with `bins` bins (multiple of 4) plus exact running min / max."""

    def __init__(self, bins: int = 2048):
        if bins % 4 or bins < 8:
            raise ValueError("bins must be a multiple of 4 and >= 8")
        self.bins = bins
        self.counts = np.zeros(bins, np.float64)
        self.R = 0.0
        self.min = np.inf
        self.max = -np.inf
        self.n = 0

    def _grow(self, need: float) -> None:
        if self.R == 0.0:
            self.R = float(need) if need > 0 else 1e-8
            return
        while self.R < need:
            n, h = self.bins, self.bins // 2
            merged = self.counts.reshape(-1, 2).sum(1)  # n/2 bins covering [-R, R] at double width
            new = np.zeros(n)
            new[h // 2: h // 2 + h] = merged
            self.counts = new
            self.R *= 2.0

    def update(self, x: np.ndarray) -> None:
        x = np.asarray(x, np.float64).ravel()
        if not x.size:
            return
        x = x[np.isfinite(x)]
        if not x.size:
            return
        lo, hi = float(x.min()), float(x.max())
        self.min, self.max = min(self.min, lo), max(self.max, hi)
        self.n += x.size
        amax = max(abs(lo), abs(hi))
        if amax > self.R or self.R == 0.0:  # an all-zero first batch still needs a non-zero range
            self._grow(amax)
        idx = np.clip(((x + self.R) / (2 * self.R) * self.bins).astype(np.int64), 0, self.bins - 1)
        self.counts += np.bincount(idx, minlength=self.bins)

    @property
    def edges(self) -> np.ndarray:
        return np.linspace(-self.R, self.R, self.bins + 1)

    @property
    def centers(self) -> np.ndarray:
        e = self.edges
        return 0.5 * (e[1:] + e[:-1])

    @property
    def nonnegative(self) -> bool:
        return self.min >= 0.0

    def abs_counts(self) -> tuple[np.ndarray, float]:
        """|x| histogram with bins/2 bins on [0, R]."""
        h = self.bins // 2
        return self.counts[h:] + self.counts[:h][::-1], self.R


# ----------------------------------------------------------------------------- estimators
def _with_zero(lo: float, hi: float) -> tuple[float, float]:
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    if hi - lo < 1e-12:
        hi = lo + 1e-8
    return lo, hi


def minmax_range(h: Histogram) -> tuple[float, float]:
    return _with_zero(h.min, h.max)


def percentile_range(h: Histogram, p: float = 99.999) -> tuple[float, float]:
    if not 50.0 < p <= 100.0:
        raise ValueError("percentile must be in (50, 100]")
    cdf = np.cumsum(h.counts)
    total = cdf[-1]
    if total <= 0:
        return _with_zero(0.0, 0.0)
    e = h.edges
    hi = float(e[1:][np.searchsorted(cdf, total * p / 100.0)])
    lo = float(e[:-1][np.searchsorted(cdf, total * (1 - p / 100.0))]) if not h.nonnegative else 0.0
    return _with_zero(max(lo, h.min), min(hi, h.max))


def _kl_threshold(hist: np.ndarray, levels: int) -> int:
    """TensorRT's entropy calibration on a one-sided histogram; returns the bin count i* of the threshold."""
    n = len(hist)
    if n <= levels:
        return n
    best_i, best_kl = n, np.inf
    total = hist.sum()
    for i in range(levels, n + 1, max(1, (n - levels) // 256)):
        p = hist[:i].astype(np.float64).copy()
        p[-1] += hist[i:].sum()
        nz = p > 0
        # merge into `levels` buckets
        idx = (np.arange(i) * levels) // i
        qsum = np.bincount(idx, weights=hist[:i], minlength=levels)
        qcnt = np.bincount(idx, weights=(hist[:i] > 0).astype(np.float64), minlength=levels)
        q = np.where(hist[:i] > 0, qsum[idx] / np.maximum(qcnt[idx], 1), 0.0)
        ps, qs = p.sum(), q.sum()
        if ps <= 0 or qs <= 0:
            continue
        pn, qn = p / ps, q / qs
        m = nz & (qn > 0)
        if (nz & ~(qn > 0)).any():
            # P has mass where Q has none (only in the folded tail bin): smooth
            qn = np.where(nz & ~(qn > 0), 1e-12, qn)
            m = nz
        kl = float(np.sum(pn[m] * np.log(pn[m] / qn[m])))
        if kl < best_kl:
            best_kl, best_i = kl, i
    del total
    return best_i


def entropy_range(h: Histogram, levels: int | None = None) -> tuple[float, float]:
    a, R = h.abs_counts()
    if a.sum() <= 0:
        return _with_zero(0.0, 0.0)
    lv = levels or (256 if h.nonnegative else 128)
    # restrict to the occupied part so bins are not wasted on empty support
    occ = int(np.nonzero(a)[0].max()) + 1
    a = a.copy()
    a[0] = 0.0  # the exact-zero spike (ReLU) is representable at any threshold; it only masks the tail in KL
    if a.sum() <= 0:
        return minmax_range(h)
    i = _kl_threshold(a[:occ], min(lv, occ))
    t = R * i / len(a)
    if h.nonnegative:
        return _with_zero(0.0, min(t, h.max))
    return _with_zero(max(-t, h.min), min(t, h.max))


def _fq(x: np.ndarray, lo: float, hi: float, levels: int) -> np.ndarray:
    s = (hi - lo) / (levels - 1)
    zp = np.round(-lo / s)
    q = np.clip(np.round(x / s) + zp, 0, levels - 1)
    return (q - zp) * s


def mse_range(h: Histogram, *, symmetric: bool = False, levels: int = 256, steps: int = 100) -> tuple[float, float]:
    c, w = h.centers, h.counts
    m = w > 0
    c, w = c[m], w[m]
    lo0, hi0 = minmax_range(h)
    if symmetric:
        t = max(-lo0, hi0)
        lo0, hi0 = -t, t
    best, best_err = (lo0, hi0), np.inf
    for a in np.linspace(0.05, 1.0, steps):
        lo, hi = _with_zero(lo0 * a, hi0 * a)
        err = float(np.sum(w * (_fq(c, lo, hi, levels) - c) ** 2))
        if err < best_err:
            best_err, best = err, (lo, hi)
    return best


def estimate_range(h: Histogram, method: str = "minmax", *, percentile: float = 99.999,
                   symmetric: bool = False) -> tuple[float, float]:
    if h.n == 0:
        raise ValueError("empty histogram")
    if method == "minmax":
        lo, hi = minmax_range(h)
    elif method == "percentile":
        lo, hi = percentile_range(h, percentile)
    elif method == "entropy":
        lo, hi = entropy_range(h, 128 if symmetric else None)
    elif method == "mse":
        lo, hi = mse_range(h, symmetric=symmetric, levels=255 if symmetric else 256)
    else:
        raise ValueError(f"unknown range estimator {method!r}; choose from {', '.join(ESTIMATORS)}")
    if symmetric:
        t = max(-lo, hi)
        return -t, t
    return lo, hi


def range_mse(h: Histogram, lo: float, hi: float, *, symmetric: bool = False) -> float:
    """Expected squared quantization error of the histogram's values under range [lo, hi] (per element)."""
    c, w = h.centers, h.counts
    levels = 255 if symmetric else 256
    return float(np.sum(w * (_fq(c, lo, hi, levels) - c) ** 2) / max(w.sum(), 1))


# ----------------------------------------------------------------------------- activation qparams
@dataclass(frozen=True)
class QParams:
    scale: float
    zero_point: int
    dtype: str  # "uint8" | "int8"


def qparams(lo: float, hi: float, dtype: str = "uint8", symmetric: bool = False) -> QParams:
    lo, hi = _with_zero(lo, hi)
    if dtype == "uint8" and not symmetric:
        s = (hi - lo) / 255.0
        zp = int(np.clip(np.round(-lo / s), 0, 255))
        return QParams(float(s), zp, "uint8")
    if dtype == "int8" and symmetric:
        t = max(-lo, hi)
        return QParams(float(t / 127.0), 0, "int8")
    if dtype == "int8":
        s = (hi - lo) / 255.0
        zp = int(np.clip(np.round(-128 - lo / s), -128, 127))
        return QParams(float(s), zp, "int8")
    raise ValueError(f"unsupported activation dtype/symmetry {dtype}/{symmetric}")


# ----------------------------------------------------------------------------- weights
def qmax(bits: int) -> int:
    return 2 ** (bits - 1) - 1


def _mse_clip(w2: np.ndarray, bits: int, steps: int = 40) -> np.ndarray:
    """Per-row MSE-optimal symmetric clip t over candidates a * max|w|, a in [0.5, 1]."""
    amax = np.abs(w2).max(1)
    amax = np.where(amax > 0, amax, 1.0)
    qm = qmax(bits)
    best_t = amax.copy()
    best_e = np.full(len(amax), np.inf)
    for a in np.linspace(0.5, 1.0, steps):
        t = amax * a
        s = (t / qm)[:, None]
        e = ((np.clip(np.round(w2 / s), -qm, qm) * s - w2) ** 2).sum(1)
        better = e < best_e
        best_e = np.where(better, e, best_e)
        best_t = np.where(better, t, best_t)
    return best_t


def weight_scales(w: np.ndarray, bits: int, *, axis: int = 0, block: int | None = None,
                  method: str = "minmax") -> np.ndarray:
    """Symmetric scales: per channel along `axis` (shape (C,)) or per block of `block` elements along `axis`
    (shape like w with that axis divided by block, ceil)."""
    if bits < 2 or bits > 8:
        raise ValueError("weight bits must be in [2, 8]")
    w = np.asarray(w, np.float32)
    qm = qmax(bits)
    if block is None:
        w2 = np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)
        t = _mse_clip(w2, bits) if method == "mse" else np.abs(w2).max(1)
        s = t / qm
        return np.where(s > 0, s, 1.0).astype(np.float32)
    wb, _ = _blocks(w, axis, block)
    t = _mse_clip(wb.reshape(-1, block), bits).reshape(wb.shape[:-1]) if method == "mse" else np.abs(wb).max(-1)
    s = t / qm
    s = np.where(s > 0, s, 1.0).astype(np.float32)
    return np.moveaxis(s, -1, axis) if s.ndim > 1 else s


def _blocks(w: np.ndarray, axis: int, block: int) -> tuple[np.ndarray, int]:
    """w with `axis` moved last and split into (..., nblocks, block), zero padded; returns (view, pad)."""
    wm = np.moveaxis(w, axis, -1)
    n = wm.shape[-1]
    nb = -(-n // block)
    pad = nb * block - n
    if pad:
        wm = np.concatenate([wm, np.zeros(wm.shape[:-1] + (pad,), wm.dtype)], -1)
    return wm.reshape(wm.shape[:-1] + (nb, block)), pad


def expand_scales(s: np.ndarray, shape: tuple[int, ...], *, axis: int, block: int | None) -> np.ndarray:
    """Broadcast per-channel / per-block scales to the weight's full shape."""
    if block is None:
        bshape = [1] * len(shape)
        bshape[axis] = shape[axis]
        return np.broadcast_to(s.reshape(bshape), shape)
    return np.repeat(s, block, axis=axis).take(np.arange(shape[axis]), axis=axis)


def quantize_weight(w: np.ndarray, bits: int, *, axis: int = 0, block: int | None = None,
                    method: str = "minmax") -> tuple[np.ndarray, np.ndarray]:
    """(q int8 array holding values in [-(2^(b-1)-1), 2^(b-1)-1], scales)."""
    s = weight_scales(w, bits, axis=axis, block=block, method=method)
    full = expand_scales(s, w.shape, axis=axis, block=block)
    qm = qmax(bits)
    q = np.clip(np.round(w / full), -qm, qm).astype(np.int8)
    return q, s


def fake_quant_weight(w: np.ndarray, bits: int, *, axis: int = 0, block: int | None = None,
                      method: str = "minmax") -> np.ndarray:
    q, s = quantize_weight(w, bits, axis=axis, block=block, method=method)
    return (q.astype(np.float32) * expand_scales(s, w.shape, axis=axis, block=block)).astype(np.float32)
