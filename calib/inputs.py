"""Calibration data per input name: multi-input models (token ids + attention mask, a streaming state, scalar
control inputs such as a sample rate or a threshold).

Sources, per input:
  --data x.npz          an .npz with one array per input name. For input shape S (batch first), an array may be
                          (N, *S[1:])   N samples of a batch-1 input (sample i is a[i:i+1]),
                          (N, *S)       N samples of the full input (sample i is a[i]),
                          S             one value used for every sample (a constant),
                          (N,)          for a scalar input (rank 0): N scalars;
                        samples are split in order: fit = the first N - 2*(N//4), validate and eval the next N//4 each
                        (at least 3 samples).
  --input-value k=v     a constant for input k: a number ("16000", "0.5") or comma-separated numbers filling the
                        input's shape; a scalar input stays a scalar, a 1-element value fills any shape.
  otherwise             a single image input gets the bundled photographs; other float inputs get seeded N(0,1)
                        (logged); a *control* input -- rank 0, at most one element, or integer/bool (token ids,
                        masks, sample rates) -- without data is refused in one line naming it (unless
                        `--data synthetic` asks for random values explicitly).
Checks per input: the dtype kind stays (an int64 input takes integers only, kept int64; a float input takes floats),
the shape matches one of the forms above, floats are finite.
"""
from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import numpy as np

from edgec.core.errors import EdgecError

log = logging.getLogger(__name__)


def parse_input_values(items: list[str] | None) -> dict[str, str]:
    """['sr=16000', 'thr=0.5'] -> {'sr': '16000', 'thr': '0.5'} (values are cast per input later)."""
    out: dict[str, str] = {}
    for it in items or []:
        name, sep, val = it.partition("=")
        if not sep or not name.strip() or not val.strip():
            raise EdgecError(f"bad --input-value '{it}': expected NAME=VALUE, e.g. sr=16000")
        out[name.strip()] = val.strip()
    return out


def is_control(inp) -> bool:
    """Rank 0, at most one element, or an integer/bool dtype: values that steer the model, not signal."""
    return len(inp.shape) == 0 or math.prod(inp.shape) <= 1 or not np.issubdtype(np.dtype(inp.dtype), np.floating)


def _kind_ok(a: np.ndarray, dtype) -> bool:
    want = np.dtype(dtype)
    if np.issubdtype(want, np.floating):
        return a.dtype.kind == "f"
    if want == np.bool_:
        return a.dtype.kind == "b" or (a.dtype.kind in "iu" and set(np.unique(a).tolist()) <= {0, 1})
    return a.dtype.kind in "iub"


def _cast(a: np.ndarray, inp, what: str) -> np.ndarray:
    want = np.dtype(inp.dtype)
    if not _kind_ok(a, want):
        raise EdgecError(f"{what}: input '{inp.name}' is {want.name} but the data is {a.dtype.name}")
    if a.dtype.kind == "f" and not np.isfinite(a).all():
        raise EdgecError(f"{what}: data for input '{inp.name}' contains NaN or Inf")
    if a.dtype.kind in "iu" and want.kind in "iu":
        info = np.iinfo(want)
        if a.size and (a.min() < info.min or a.max() > info.max):
            raise EdgecError(f"{what}: data for input '{inp.name}' does not fit {want.name}")
    return a.astype(want, copy=False)


def constant_value(text: str, inp) -> np.ndarray:
    """--input-value NAME=TEXT -> an array of exactly the input's shape and dtype."""
    what = f"--input-value {inp.name}"
    try:
        vals = [float(v) for v in text.split(",")]
    except ValueError:
        raise EdgecError(f"{what}={text}: expected a number or comma-separated numbers") from None
    want = np.dtype(inp.dtype)
    if want.kind in "iub" and any(v != int(v) for v in vals):
        raise EdgecError(f"{what}={text}: input '{inp.name}' is {want.name}, the value is not an integer")
    a = np.asarray([int(v) for v in vals] if want.kind in "iub" else vals)
    a = _cast(a, inp, what)
    shape = tuple(inp.shape)
    if a.size == 1:
        return np.full(shape, a.reshape(()), dtype=want)
    if a.size != math.prod(shape):
        raise EdgecError(f"{what}: {a.size} values, but input '{inp.name}' has shape {shape} ({math.prod(shape)} elements)")
    return a.reshape(shape)


def _per_sample(a: np.ndarray, inp, what: str):
    """(N or None for a constant, function i -> array of the input's shape)."""
    s = tuple(inp.shape)
    a = _cast(a, inp, what)
    if a.shape == s:
        return None, (lambda i: a)
    if len(s) == 0 and a.ndim == 1:
        return len(a), (lambda i: a[i])
    if a.ndim == len(s) + 1 and a.shape[1:] == s:
        return len(a), (lambda i: a[i])
    if len(s) >= 1 and s[0] == 1 and a.ndim == len(s) and a.shape[1:] == s[1:]:
        return len(a), (lambda i: a[i:i + 1])
    forms = [s, ("N", *s)] + ([("N", *s[1:])] if s and s[0] == 1 else []) + ([("N",)] if not s else [])
    raise EdgecError(f"{what} has shape {a.shape}, but input '{inp.name}' has shape {s}: expected one of "
                     f"{', '.join(str(tuple(f)) for f in forms)}")


def _load_named(path: Path, inputs: list) -> dict[str, np.ndarray] | None:
    try:
        obj = np.load(path, allow_pickle=False)
    except Exception as e:
        raise EdgecError(f"cannot read data file {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    if isinstance(obj, np.ndarray):
        return None
    names = {i.name for i in inputs}
    keys = set(obj.files)
    if not keys & names:
        return None  # the single-input layouts ('calib'/'eval', 'x'/'y') of calib.data
    extra = sorted(keys - names)
    if extra:
        raise EdgecError(f"{path.name} holds array(s) {', '.join(extra)} that are not model inputs; inputs: "
                         f"{', '.join(sorted(names))}")
    return {k: obj[k] for k in obj.files}


def named_data(source: str | None, inputs: list, pre, values: dict[str, str] | None, *, n_fit: int, n_validate: int,
               n_eval: int, seed: int):
    """calib.data.Splits built per input name, or None when calib.data's single-input rules apply unchanged."""
    values = dict(values or {})
    by_name = {i.name: i for i in inputs}
    unknown = sorted(set(values) - set(by_name))
    if unknown:
        raise EdgecError(f"--input-value names unknown input(s) {', '.join(unknown)}; inputs: {', '.join(by_name)}")
    src = (source or "bundled").strip()
    arrays = None
    if src.endswith(".npz") and Path(os.path.expanduser(src)).is_file():
        arrays = _load_named(Path(os.path.expanduser(src)), inputs)
    if arrays is None and not values:
        if src != "bundled" or not any(is_control(i) for i in inputs):
            return None
    elif arrays is None and src not in ("bundled", "synthetic"):
        raise EdgecError(f"--input-value goes with --data bundled, synthetic or a per-name .npz, not {src}")
    return _build(src, inputs, pre, values, arrays or {}, (n_fit, n_validate, n_eval), seed)


def _build(src: str, inputs: list, pre, values: dict, arrays: dict, counts: tuple[int, int, int], seed: int):
    from edgec.calib.data import DataSplit, Splits, _fit_preprocess, bundled_split, is_image_input

    makers, sizes, how = {}, [], {}
    for inp in inputs:
        if inp.name in values:
            c = constant_value(values[inp.name], inp)
            makers[inp.name] = lambda i, c=c: c
            how[inp.name] = "constant (--input-value)"
        elif inp.name in arrays:
            n, f = _per_sample(arrays[inp.name], inp, f"data[{inp.name}]")
            makers[inp.name] = f
            how[inp.name] = "constant (.npz)" if n is None else f"{n} samples (.npz)"
            if n is not None:
                sizes.append((inp.name, n))
    if len({n for _, n in sizes}) > 1:
        raise EdgecError("per-input data disagree on the sample count: " + ", ".join(f"{k}: {n}" for k, n in sizes))
    n_given = sizes[0][1] if sizes else None
    if n_given is not None and n_given < 3:
        raise EdgecError(f"per-input data hold {n_given} sample(s); need at least 3 (fit, validate, eval)")
    images = [i for i in inputs if i.name not in makers and is_image_input(i, pre)]
    rest = [i for i in inputs if i.name not in makers and i not in images]
    for inp in rest:
        if is_control(inp) and src != "synthetic":
            raise EdgecError(f"input '{inp.name}' ({np.dtype(inp.dtype).name}, shape {tuple(inp.shape)}) needs data: "
                             f"give --input-value {inp.name}=VALUE or --data x.npz with an array named '{inp.name}' "
                             f"(random values are not fed to control inputs)")
        how[inp.name] = "seeded N(0,1)" if np.issubdtype(np.dtype(inp.dtype), np.floating) else "seeded integers in [0, 8)"
        log.warning("input '%s' has no data: using %s", inp.name, how[inp.name])
    if len(images) > 1:
        raise EdgecError(f"inputs {', '.join(i.name for i in images)} look like images; give them per-name data (--data x.npz)")
    for inp in images:
        how[inp.name] = "bundled photographs"
    if n_given is not None:
        q = n_given // 4
        ranges = {"fit": (0, n_given - 2 * q), "validate": (n_given - 2 * q, n_given - q), "eval": (n_given - q, n_given)}
    else:
        ranges = {s: (0, n) for s, n in zip(("fit", "validate", "eval"), counts)}
    parts = []
    for sid, (split, cap) in enumerate(zip(("fit", "validate", "eval"), counts)):
        lo, hi = ranges[split]
        count = min(cap, hi - lo)
        img = {i.name: bundled_split(split, count, i, _fit_preprocess(pre, i), seed) for i in images}

        def make(k, lo=lo, img=img, sid=sid):
            rng = np.random.default_rng([seed, 17, sid, k])
            feed = {n: f(lo + k) for n, f in makers.items()}
            for n, sp in img.items():
                feed.update(sp.feeds(k))
            for inp in rest:
                feed[inp.name] = (rng.standard_normal(inp.shape) if np.issubdtype(np.dtype(inp.dtype), np.floating)
                                  else rng.integers(0, 8, size=inp.shape)).astype(inp.dtype)
            return {i.name: feed[i.name] for i in inputs}

        desc = "per-input data: " + "; ".join(f"{k}: {v}" for k, v in how.items())
        parts.append(DataSplit(split, count, make, description=desc))
    dis = {"disjoint": n_given is not None or bool(images),
           "checked": "consecutive index ranges of the per-input arrays" if n_given is not None
           else ("bundled photographs per split" if images else "constants and seeded streams only")}
    return Splits(*parts, dis)
