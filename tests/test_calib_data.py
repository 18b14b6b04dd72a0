"""Calibration data: three disjoint splits (fit / validate / eval), deterministic, hash-checked disjointness of user
splits, shape/dtype validation, natural photographs the majority of fit and validate."""
import numpy as np
import pytest

from edgec.calib.data import (EVAL_PHOTOS, FIT_PHOTOS, TEXTURES, VALIDATE_PHOTOS, InputInfo, Preprocess, _schedule,
                              load_data, load_splits)
from edgec.core.errors import EdgecError

INP = [InputInfo("input", (1, 3, 64, 64))]


def test_bundled_splits_are_deterministic_and_disjoint():
    assert not set(FIT_PHOTOS) & set(EVAL_PHOTOS) and not set(VALIDATE_PHOTOS) & set(EVAL_PHOTOS)
    assert not set(FIT_PHOTOS) & set(VALIDATE_PHOTOS)
    s1 = load_data(None, INP, Preprocess(), n_fit=6, n_validate=4, n_eval=5, seed=3)
    s2 = load_data(None, INP, Preprocess(), n_fit=6, n_validate=4, n_eval=5, seed=3)
    s3 = load_data(None, INP, Preprocess(), n_fit=6, n_validate=4, n_eval=5, seed=4)
    assert s1.disjoint["disjoint"] and "sha256" in s1.disjoint["checked"]
    assert (len(s1.fit), len(s1.validate), len(s1.eval)) == (6, 4, 5)
    a, b = s1.fit.stacked()["input"], s2.fit.stacked()["input"]
    assert a.shape == (6, 3, 64, 64) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(s1.eval.stacked()["input"], s2.eval.stacked()["input"])
    np.testing.assert_array_equal(s1.validate.stacked()["input"], s2.validate.stacked()["input"])
    assert not np.array_equal(a, s3.fit.stacked()["input"])
    splits = [s1.fit.stacked()["input"], s1.validate.stacked()["input"], s1.eval.stacked()["input"]]
    for i in range(3):
        for j in range(i):
            x, y = splits[i], splits[j]
            assert min(np.abs(x[p] - y[q]).max() for p in range(len(x)) for q in range(len(y))) > 0.1
    # ImageNet-normalised natural images: roughly zero-mean, unit-ish spread
    assert -1.5 < a.mean() < 1.5 and 0.3 < a.std() < 2.0


@pytest.mark.parametrize("photos", [FIT_PHOTOS, VALIDATE_PHOTOS])
def test_natural_photographs_are_the_majority(photos):
    sched = _schedule(photos)
    textures = sum(p in TEXTURES for p in sched)
    assert 0 < textures < 0.35 * len(sched)


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
    s = load_data(str(p), inp, Preprocess(), n_fit=8, n_validate=4, n_eval=8)
    assert (len(s.fit), len(s.validate), len(s.eval)) == (8, 4, 8)
    np.testing.assert_array_equal(s.validate.feeds(0)["input"][0], x[8])
    np.testing.assert_array_equal(s.eval.feeds(0)["input"][0], x[12])
    np.testing.assert_array_equal(s.eval.labels, y[12:20])
    bad = tmp_path / "nan.npy"
    x2 = x.copy()
    x2[3, 0, 0, 0] = np.nan
    np.save(bad, x2)
    with pytest.raises(EdgecError, match="NaN or Inf"):
        load_splits(str(bad), inp, Preprocess(), n_calib=4, n_eval=4)
    with pytest.raises(EdgecError, match="positive"):
        load_splits(None, inp, Preprocess(), n_calib=0, n_eval=4)


@pytest.mark.parametrize("dup", [("fit", "eval"), ("validate", "eval"), ("fit", "validate")])
def test_overlapping_user_splits_are_refused(tmp_path, dup):
    r = np.random.default_rng(1)
    parts = {k: r.standard_normal((6, 3, 8, 8)).astype(np.float32) for k in ("fit", "validate", "eval")}
    parts[dup[1]][2] = parts[dup[0]][4]  # one sample stored in two splits
    p = tmp_path / "d.npz"
    np.savez(p, **parts)
    with pytest.raises(EdgecError, match=f"1 sample.* of the {dup[1]} split also appear in the {dup[0]} split"):
        load_data(str(p), [InputInfo("input", (1, 3, 8, 8))], Preprocess(), n_fit=6, n_validate=6, n_eval=6)
    parts[dup[1]][2] += 1e-3  # a different sample: accepted
    np.savez(p, **parts)
    s = load_data(str(p), [InputInfo("input", (1, 3, 8, 8))], Preprocess(), n_fit=6, n_validate=6, n_eval=6)
    assert s.disjoint["samples_hashed"] == {"fit": 6, "validate": 6, "eval": 6}


def test_image_folder_labels_and_duplicate_files(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        for i in range(15):
            Image.fromarray(rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)).save(tmp_path / cls / f"{i}.png")
    s = load_data(str(tmp_path), [InputInfo("input", (1, 3, 16, 16))], Preprocess(), n_fit=100, n_validate=100,
                  n_eval=100)
    assert len(s.fit) + len(s.validate) + len(s.eval) == 30 and len(s.eval) > 0 and len(s.validate) > 0
    assert set(s.fit.labels) <= {0, 1} and s.fit.feeds(0)["input"].shape == (1, 3, 16, 16)
    # the same picture saved under a second name that lands in another split is refused
    from edgec.calib.data import _stable_bucket

    src = next(p for p in sorted((tmp_path / "cat").iterdir()) if _stable_bucket(f"cat/{p.name}") == 0)
    for k in range(100):
        if _stable_bucket(f"dog/copy{k}.png") >= 2:
            (tmp_path / "dog" / f"copy{k}.png").write_bytes(src.read_bytes())
            break
    with pytest.raises(EdgecError, match="also appear in the"):
        load_data(str(tmp_path), [InputInfo("input", (1, 3, 16, 16))], Preprocess(), n_fit=100, n_validate=100,
                  n_eval=100)


@pytest.mark.parametrize("split", ["fit", "validate", "eval"])
def test_bundled_split_groups_name_each_samples_photograph(split, monkeypatch):
    """groups[i] indexes the photograph sample i was cropped from (natural photographs scheduled three times as
    often as textures), so the floor's margin can treat crops of one photograph as one source."""
    from edgec.calib import data as D

    photos = {"fit": D.FIT_PHOTOS, "validate": D.VALIDATE_PHOTOS, "eval": D.EVAL_PHOTOS}[split]
    inp = D.InputInfo("x", (1, 3, 32, 32))
    sp = D.bundled_split(split, 40, inp, D.Preprocess(height=32, width=32), seed=0)
    assert sp.groups is not None and len(sp.groups) == 40
    assert set(sp.groups.tolist()) == set(range(len(photos)))
    # which photograph each sample is really cropped from: record the first _photo call that makes it
    calls: list[str] = []
    real = D._photo
    monkeypatch.setattr(D, "_photo", lambda name: (calls.append(name), real(name))[1])
    firsts = []
    for i in range(40):
        calls.clear()
        sp.make(i)
        firsts.append(calls[0])
    assert [photos[g] for g in sp.groups] == firsts
