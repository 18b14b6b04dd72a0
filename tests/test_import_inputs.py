"""Multi-input models with per-input-name data: a per-name .npz, --input-value constants, per-input shape and dtype
checks (int64 stays int64, a scalar stays a scalar), control inputs without data refused naming the input."""
import numpy as np
import pytest

from edgec.calib.data import InputInfo, Preprocess, load_data
from edgec.calib.inputs import constant_value, parse_input_values
from edgec.core.errors import EdgecError

TOKENS = [InputInfo("input_ids", (1, 8), np.int64), InputInfo("attention_mask", (1, 8), np.int64)]
CONTROL = [InputInfo("wave", (1, 1, 64), np.float32), InputInfo("state", (1, 4), np.float32), InputInfo("sr", (), np.int64)]


def _load(src, inputs, values=None):
    return load_data(src, inputs, Preprocess(), n_fit=8, n_validate=4, n_eval=4, seed=0, values=values)


def test_token_npz_per_name(tmp_path):
    ids = np.arange(12 * 8, dtype=np.int64).reshape(12, 8)
    mask = (np.arange(8)[None] < np.arange(12)[:, None] % 8 + 1).astype(np.int64)
    np.savez(tmp_path / "d.npz", input_ids=ids, attention_mask=mask)
    s = _load(str(tmp_path / "d.npz"), TOKENS)
    assert (len(s.fit), len(s.validate), len(s.eval)) == (6, 3, 3)
    f = s.eval.feeds(0)
    assert f["input_ids"].dtype == np.int64 and f["input_ids"].shape == (1, 8)
    np.testing.assert_array_equal(f["input_ids"], ids[9:10])  # eval takes the last quarter, in order
    np.testing.assert_array_equal(s.fit.feeds(2)["attention_mask"], mask[2:3])


def test_scalar_control_input_stays_scalar(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", wave=rng.standard_normal((10, 1, 64)).astype(np.float32),
             state=np.zeros((1, 4), np.float32))  # state given once: a constant
    s = _load(str(tmp_path / "d.npz"), CONTROL, values={"sr": "16000"})
    f = s.fit.feeds(1)
    assert f["sr"].shape == () and f["sr"].dtype == np.int64 and int(f["sr"]) == 16000
    assert f["state"].shape == (1, 4) and not f["state"].any()
    assert f["wave"].shape == (1, 1, 64) and f["wave"].dtype == np.float32


@pytest.mark.parametrize("src", ["bundled", None])
def test_control_input_without_data_is_refused_naming_it(src):
    with pytest.raises(EdgecError, match=r"input 'sr' \(int64, shape \(\)\) needs data: give --input-value sr=VALUE"):
        _load(src, CONTROL)


def test_token_inputs_without_data_are_refused():
    with pytest.raises(EdgecError, match="input 'input_ids'"):
        _load(None, TOKENS)


def test_synthetic_is_an_explicit_choice():
    s = _load("synthetic", TOKENS)
    assert s.fit.feeds(0)["input_ids"].dtype == np.int64


@pytest.mark.parametrize("arrays,msg", [
    ({"input_ids": np.zeros((6, 8), np.float32), "attention_mask": np.ones((6, 8), np.int64)}, "is int64 but the data is float32"),
    ({"input_ids": np.zeros((6, 9), np.int64), "attention_mask": np.ones((6, 8), np.int64)}, "has shape \\(6, 9\\)"),
    ({"input_ids": np.zeros((6, 8), np.int64), "attention_mask": np.ones((5, 8), np.int64)}, "disagree on the sample count"),
    ({"input_ids": np.zeros((6, 8), np.int64), "attention_mask": np.ones((6, 8), np.int64), "typo": np.ones(3)}, "not model inputs"),
    ({"input_ids": np.zeros((6, 8), np.int64)}, "input 'attention_mask'"),
])
def test_bad_per_name_data(tmp_path, arrays, msg):
    np.savez(tmp_path / "d.npz", **arrays)
    with pytest.raises(EdgecError, match=msg):
        _load(str(tmp_path / "d.npz"), TOKENS)


def test_input_value_parsing_and_checks():
    assert parse_input_values(["sr=16000", "thr = 0.5"]) == {"sr": "16000", "thr": "0.5"}
    for bad in ("sr", "=3", "sr="):
        with pytest.raises(EdgecError, match="bad --input-value"):
            parse_input_values([bad])
    with pytest.raises(EdgecError, match="not an integer"):
        constant_value("0.5", InputInfo("sr", (), np.int64))
    with pytest.raises(EdgecError, match="3 values"):
        constant_value("1,2,3", InputInfo("s", (1, 4), np.float32))
    assert constant_value("2", InputInfo("s", (1, 4), np.float32)).tolist() == [[2.0] * 4]
    with pytest.raises(EdgecError, match="unknown input"):
        _load("synthetic", TOKENS, values={"nope": "1"})


def test_single_image_model_is_unchanged():
    s = _load(None, [InputInfo("x", (1, 3, 32, 32), np.float32)])
    assert "bundled photos" in s.fit.description
