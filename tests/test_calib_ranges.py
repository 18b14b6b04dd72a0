"""Range estimators, streaming histogram, activation qparams and weight quantization (half-LSB bound)."""
from __future__ import annotations

import numpy as np
import pytest

from edgec.calib.ranges import (ESTIMATORS, Histogram, estimate_range, expand_scales, fake_quant_weight, qparams,
                          quantize_weight, range_mse)

rng = np.random.default_rng(0)


def _hist(x, chunks=8, bins=2048):
    h = Histogram(bins)
    for c in np.array_split(x, chunks):
        h.update(c)
    return h


def test_histogram_growth_preserves_mass_and_extremes():
    x = np.concatenate([rng.standard_normal(1000) * 0.1, rng.standard_normal(1000) * 10.0])  # range grows 2^k
    h = _hist(x)
    assert h.counts.sum() == x.size
    assert h.min == pytest.approx(x.min()) and h.max == pytest.approx(x.max())
    assert h.R >= np.abs(x).max()
    # the histogram's mean (bin centres) agrees with the data to within one bin width
    mean_h = float((h.counts * h.centers).sum() / h.counts.sum())
    assert abs(mean_h - x.mean()) <= 2 * h.R / h.bins


def test_minmax_is_exact_and_includes_zero():
    x = rng.uniform(1.0, 3.0, 5000)
    assert estimate_range(_hist(x), "minmax") == pytest.approx((0.0, x.max()))


@pytest.mark.parametrize("method", ESTIMATORS)
def test_estimators_clip_outliers_not_bulk(method):
    x = np.concatenate([rng.standard_normal(200_000), [60.0, -55.0]])  # two outliers
    lo, hi = estimate_range(_hist(x), method)
    assert lo <= 0.0 <= hi
    if method == "minmax":
        assert (lo, hi) == pytest.approx((-55.0, 60.0))
    elif method == "mse":  # clips only as far as the expected squared error says (the outliers cost too)
        assert hi < 60.0 and lo > -55.0
        h = _hist(x)
        assert range_mse(h, lo, hi) < range_mse(h, -55.0, 60.0)
    else:
        assert 3.0 < hi < 30.0 and -30.0 < lo < -3.0, (method, lo, hi)


def test_nonnegative_tensors_stay_one_sided():
    x = np.maximum(rng.standard_normal(100_000), 0)
    for m in ESTIMATORS:
        lo, hi = estimate_range(_hist(x), m)
        assert lo == 0.0 and hi > 1.5, (m, hi)


def test_mse_range_has_lowest_expected_error():
    x = rng.laplace(size=200_000)
    h = _hist(x)
    errs = {m: range_mse(h, *estimate_range(h, m)) for m in ESTIMATORS}
    assert errs["mse"] <= min(errs.values()) * 1.0001


def test_symmetric_ranges():
    h = _hist(rng.standard_normal(10_000) + 0.5)
    lo, hi = estimate_range(h, "minmax", symmetric=True)
    assert lo == -hi


def test_qparams_uint8_and_int8():
    p = qparams(-1.0, 3.0, "uint8")
    assert p.zero_point == round(1.0 / (4.0 / 255)) and p.scale == pytest.approx(4.0 / 255)
    assert (0 - p.zero_point) * p.scale <= -1.0 + p.scale and (255 - p.zero_point) * p.scale >= 3.0 - p.scale
    s = qparams(-1.0, 3.0, "int8", symmetric=True)
    assert s.zero_point == 0 and s.scale == pytest.approx(3.0 / 127)
    with pytest.raises(ValueError):
        qparams(0, 1, "int16")


@pytest.mark.parametrize("bits", [8, 4, 3, 2])
@pytest.mark.parametrize("shape,axis", [((16, 8, 3, 3), 0), ((32, 1, 3, 3), 0), ((64, 10), 1), ((10, 64), 0)])
def test_per_channel_roundtrip_within_half_lsb(bits, shape, axis):
    w = (rng.standard_normal(shape) * rng.uniform(0.01, 2.0, shape[axis]).reshape(
        [-1 if i == axis else 1 for i in range(len(shape))])).astype(np.float32)
    q, s = quantize_weight(w, bits, axis=axis)
    qm = 2 ** (bits - 1) - 1
    assert q.min() >= -qm and q.max() <= qm
    full = expand_scales(s, w.shape, axis=axis, block=None)
    err = np.abs(q * full - w)
    assert (err <= full / 2 * (1 + 1e-5) + 1e-12).all()
    # per channel: the largest magnitude is representable exactly (scale = max|w| / qmax)
    wm = np.moveaxis(w, axis, 0).reshape(shape[axis], -1)
    assert np.allclose(s, np.abs(wm).max(1) / qm, rtol=1e-6)


@pytest.mark.parametrize("block", [16, 32])
def test_per_block_roundtrip_within_half_lsb(block):
    w = rng.standard_normal((70, 24)).astype(np.float32)  # K=70 not a multiple of the block: last block padded
    q, s = quantize_weight(w, 4, axis=0, block=block)
    assert s.shape == (int(np.ceil(70 / block)), 24)
    full = expand_scales(s, w.shape, axis=0, block=block)
    assert (np.abs(q * full - w) <= full / 2 * (1 + 1e-5)).all()
    # block-wise error is no worse than per-channel error
    e_blk = np.abs(fake_quant_weight(w, 4, axis=0, block=block) - w).mean()
    e_ch = np.abs(fake_quant_weight(w, 4, axis=1) - w).mean()
    assert e_blk <= e_ch


def test_mse_weight_clip_lowers_error():
    w = rng.laplace(size=(32, 256)).astype(np.float32)
    e_mm = ((fake_quant_weight(w, 4, axis=0) - w) ** 2).sum()
    e_mse = ((fake_quant_weight(w, 4, axis=0, method="mse") - w) ** 2).sum()
    assert e_mse < e_mm


def test_histogram_all_zero_then_data_and_non_finite_batches():
    """An all-zero first batch (a dead channel map) gets a tiny non-zero range, counts stay finite, and a batch
    with only NaN/Inf is skipped; later data grows the range as usual."""
    h = Histogram(64)
    with np.errstate(all="raise"):
        h.update(np.zeros(100))
        h.update(np.array([np.nan, np.inf]))
        assert h.R > 0 and h.counts.sum() == 100 and h.counts[32] == 100  # all in the bin at 0
        h.update(np.array([-3.0, 5.0]))
    assert h.R >= 5.0 and h.counts.sum() == 102 and h.min == -3.0 and h.max == 5.0
