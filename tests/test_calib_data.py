"""Calibration/eval data: deterministic, disjoint photographs, shape/dtype validation."""
import numpy as np
import pytest

from edgec.calib.data import CALIB_PHOTOS, EVAL_PHOTOS, InputInfo, Preprocess, load_splits
from edgec.core.errors import EdgecError

INP = [InputInfo("input", (1, 3, 64, 64))]


def test_bundled_splits_are_deterministic_and_disjoint():
    assert not set(CALIB_PHOTOS) & set(EVAL_PHOTOS)
    c1, e1 = load_splits(None, INP, Preprocess(), n_calib=6, n_eval=5, seed=3)
    c2, e2 = load_splits(None, INP, Preprocess(), n_calib=6, n_eval=5, seed=3)
    c3, _ = load_splits(None, INP, Preprocess(), n_calib=6, n_eval=5, seed=4)
    assert len(c1) == 6 and len(e1) == 5
    a, b = c1.stacked()["input"], c2.stacked()["input"]
    assert a.shape == (6, 3, 64, 64) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(e1.stacked()["input"], e2.stacked()["input"])
    assert not np.array_equal(a, c3.stacked()["input"])
    # no eval sample equals any calib sample
    ev = e1.stacked()["input"]
    assert min(np.abs(ev[i] - a[j]).max() for i in range(5) for j in range(6)) > 0.1
    # ImageNet-normalised natural images: roughly zero-mean, unit-ish spread
    assert -1.5 < a.mean() < 1.5 and 0.3 < a.std() < 2.0


def test_nhwc_and_grayscale_inputs():
    c, _ = load_splits(None, [InputInfo("x", (1, 32, 32, 3))], Preprocess(layout="NHWC"), n_calib=2, n_eval=2)
    assert c.feeds(0)["x"].shape == (1, 32, 32, 3)
    c, _ = load_splits(None, [InputInfo("x", (1, 1, 28, 28))], Preprocess(), n_calib=2, n_eval=2)
    assert c.feeds(0)["x"].shape == (1, 1, 28, 28)


def test_npz_with_labels_and_errors(tmp_path):
    x = np.random.default_rng(0).standard_normal((20, 3, 8, 8)).astype(np.float32)
    y = np.arange(20) % 3
    p = tmp_path / "d.npz"
    np.savez(p, x=x, y=y)
    inp = [InputInfo("input", (1, 3, 8, 8))]
    c, e = load_splits(str(p), inp, Preprocess(), n_calib=8, n_eval=8)
    assert len(c) == 8 and len(e) == 8
    np.testing.assert_array_equal(e.feeds(0)["input"][0], x[8])
    np.testing.assert_array_equal(e.labels, y[8:16])
    bad = tmp_path / "nan.npy"
    x2 = x.copy()
    x2[3, 0, 0, 0] = np.nan
    np.save(bad, x2)
    with pytest.raises(EdgecError, match="NaN or Inf"):
        load_splits(str(bad), inp, Preprocess(), n_calib=4, n_eval=4)
    with pytest.raises(EdgecError, match="positive"):
        load_splits(None, inp, Preprocess(), n_calib=0, n_eval=4)


def test_image_folder_labels(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        for i in range(12):
            Image.fromarray(rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)).save(tmp_path / cls / f"{i}.png")
    c, e = load_splits(str(tmp_path), [InputInfo("input", (1, 3, 16, 16))], Preprocess(), n_calib=100, n_eval=100)
    assert len(c) + len(e) == 24 and len(e) > 0
    assert set(c.labels) <= {0, 1} and c.feeds(0)["input"].shape == (1, 3, 16, 16)
