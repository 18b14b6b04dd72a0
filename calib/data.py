"""Calibration and held-out evaluation data.

Sources (`--data`):
  bundled (default)  deterministic crops/scales/flips of the sample photographs that scikit-image and
                     scikit-learn ship. Calibration and evaluation use *disjoint photographs*, so no pixel
                     of an evaluation sample was ever seen during calibration.
  DIR                ImageFolder layout (DIR/<class>/<image>); labels enable an accuracy column.
                     Files are assigned to calib/eval by a hash of their relative path.
  FILE.npy / .npz    preprocessed arrays shaped like the model input without batch (N, C, H, W);
                     .npz may hold `calib`/`eval` (and `calib_labels`/`eval_labels`) or `x`/`y`.
  synthetic          seeded standard-normal tensors, for models whose inputs are not images.

Samples are produced on demand (one at a time), so memory does not grow with the sample count.
"""
from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np

from edgec.core.errors import EdgecError

log = logging.getLogger(__name__)

# Photographs per split. Stereo pairs (motorcycle_left/right) stay in one split.
EVAL_PHOTOS = ("chelsea", "coffee", "rocket", "flower", "astronaut", "gravel", "moon")
CALIB_PHOTOS = ("china", "motorcycle_left", "motorcycle_right", "camera", "brick", "grass", "coins",
                "cell", "hubble_deep_field", "ihc", "retina", "microaneurysms")
IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}


@dataclass(frozen=True)
class Preprocess:
    """x = (pixel * scale - mean) / std, resized to (height, width), in `layout`."""

    height: int = 224
    width: int = 224
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)
    scale: float = 1.0 / 255.0
    layout: str = "NCHW"
    channels: int = 3

    def __post_init__(self):
        if self.layout not in ("NCHW", "NHWC"):
            raise ValueError(f"layout must be NCHW or NHWC, got {self.layout}")
        if self.height <= 0 or self.width <= 0:
            raise ValueError("height and width must be positive")
        if len(self.mean) not in (1, self.channels) or len(self.std) not in (1, self.channels):
            raise ValueError("mean/std must have 1 or `channels` entries")
        if any(s == 0 for s in self.std):
            raise ValueError("std must be non-zero")

    def apply(self, rgb: np.ndarray) -> np.ndarray:
        """rgb: HxWx3 uint8 already at (height, width) -> one sample without batch axis."""
        x = rgb.astype(np.float32) * np.float32(self.scale)
        if self.channels == 1:
            x = x.mean(axis=2, keepdims=True)
        x = (x - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return np.ascontiguousarray(x.transpose(2, 0, 1) if self.layout == "NCHW" else x).astype(np.float32)


@dataclass
class DataSplit:
    """A split of samples produced on demand: `feeds(i)` -> {input_name: array with batch axis 1}."""

    name: str
    count: int
    make: Callable[[int], dict[str, np.ndarray]]
    labels: np.ndarray | None = None
    description: str = ""
    _cache: dict[int, dict[str, np.ndarray]] = field(default_factory=dict, repr=False)
    cache_limit_bytes: int = 256 << 20
    _cached_bytes: int = 0

    def __len__(self) -> int:
        return self.count

    def feeds(self, i: int) -> dict[str, np.ndarray]:
        if i in self._cache:
            return self._cache[i]
        f = self.make(i)
        size = sum(a.nbytes for a in f.values())
        if self._cached_bytes + size <= self.cache_limit_bytes:
            self._cache[i] = f
            self._cached_bytes += size
        return f

    def iter_feeds(self, limit: int | None = None) -> Iterator[dict[str, np.ndarray]]:
        n = self.count if limit is None else min(limit, self.count)
        for i in range(n):
            yield self.feeds(i)

    def stacked(self, limit: int | None = None) -> dict[str, np.ndarray]:
        """All samples concatenated on the batch axis (only for small splits)."""
        items = list(self.iter_feeds(limit))
        return {k: np.concatenate([it[k] for it in items], axis=0) for k in items[0]}


@dataclass(frozen=True)
class InputInfo:
    name: str
    shape: tuple[int, ...]  # batch first; concrete
    dtype: type = np.float32


# ----------------------------------------------------------------------------- bundled photos
@lru_cache(maxsize=None)
def _photo(name: str) -> np.ndarray:
    """One bundled photograph as HxWx3 uint8."""
    from PIL import Image

    if name in ("china", "flower"):
        import sklearn.datasets

        path = Path(sklearn.datasets.__file__).parent / "images" / f"{name}.jpg"
    else:
        import skimage.data

        d = Path(skimage.data.__file__).parent
        cands = [p for p in d.iterdir() if p.stem == name and p.suffix.lower() in IMAGE_EXTS]
        alias = {"ihc": "ihc"}
        if not cands:
            raise EdgecError(f"bundled photo {alias.get(name, name)!r} not found in scikit-image")
        path = cands[0]
    img = Image.open(path)
    img = img.convert("RGB")
    return np.asarray(img, dtype=np.uint8)


def _crop(photo: np.ndarray, rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    from PIL import Image

    H, W = photo.shape[:2]
    side = min(H, W)
    s = int(side * rng.uniform(0.35, 1.0))
    aspect = rng.uniform(0.8, 1.25)
    ch, cw = min(H, max(8, int(s / np.sqrt(aspect)))), min(W, max(8, int(s * np.sqrt(aspect))))
    y = int(rng.integers(0, H - ch + 1))
    x = int(rng.integers(0, W - cw + 1))
    crop = photo[y:y + ch, x:x + cw]
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    return np.asarray(Image.fromarray(np.ascontiguousarray(crop)).resize((w, h), Image.BILINEAR))


def bundled_split(split: str, count: int, inp: InputInfo, pre: Preprocess, seed: int) -> DataSplit:
    photos = EVAL_PHOTOS if split == "eval" else CALIB_PHOTOS

    def make(i: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([seed, 0 if split == "calib" else 1, i])
        rgb = _crop(_photo(photos[i % len(photos)]), rng, pre.height, pre.width)
        return {inp.name: pre.apply(rgb)[None]}

    return DataSplit(split, count, make, description=f"bundled photos ({len(photos)} photographs: {', '.join(photos)})")


# ----------------------------------------------------------------------------- image folder
def _stable_bucket(rel: str) -> int:
    return int(hashlib.sha256(rel.encode()).hexdigest()[:8], 16) % 5


def folder_splits(root: Path, n_calib: int, n_eval: int, inp: InputInfo, pre: Preprocess):
    from PIL import Image

    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise EdgecError(f"data directory {root} has no class sub-directories (expected DIR/<class>/<image>)")
    files = []
    for ci, c in enumerate(classes):
        for p in sorted((root / c).rglob("*")):
            if p.suffix.lower() in IMAGE_EXTS:
                files.append((p, ci))
    if not files:
        raise EdgecError(f"data directory {root} contains no images")
    ev = [f for f in files if _stable_bucket(str(f[0].relative_to(root))) == 0]
    ca = [f for f in files if _stable_bucket(str(f[0].relative_to(root))) != 0]

    def mk(lst):
        def make(i):
            p, _ = lst[i]
            img = Image.open(p).convert("RGB")
            s = min(img.size)
            l, t = (img.size[0] - s) // 2, (img.size[1] - s) // 2
            img = img.crop((l, t, l + s, t + s)).resize((pre.width, pre.height), Image.BILINEAR)
            return {inp.name: pre.apply(np.asarray(img))[None]}
        return make

    ca, ev = ca[:n_calib], ev[:n_eval]
    if not ca or not ev:
        raise EdgecError(f"data directory {root} has too few images to make disjoint calib and eval splits")
    desc = f"image folder {root} ({len(classes)} classes)"
    return (DataSplit("calib", len(ca), mk(ca), np.array([c for _, c in ca]), desc),
            DataSplit("eval", len(ev), mk(ev), np.array([c for _, c in ev]), desc))


# ----------------------------------------------------------------------------- arrays
def _check_array(a: np.ndarray, inp: InputInfo, what: str) -> np.ndarray:
    want = tuple(inp.shape[1:])
    if a.ndim != len(inp.shape) or tuple(a.shape[1:]) != want:
        raise EdgecError(f"{what} has shape {tuple(a.shape)}, but input '{inp.name}' needs (N, {', '.join(map(str, want))})")
    if not np.issubdtype(a.dtype, np.number) or a.dtype.kind == "c":
        raise EdgecError(f"{what} has dtype {a.dtype}, expected a real numeric array")
    if a.dtype.kind == "f" and not np.isfinite(a).all():
        raise EdgecError(f"{what} contains NaN or Inf")
    return a.astype(inp.dtype, copy=False)


def array_splits(path: Path, n_calib: int, n_eval: int, inp: InputInfo):
    try:
        obj = np.load(path, allow_pickle=False)
    except Exception as e:
        raise EdgecError(f"cannot read data file {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    labels = {}
    if isinstance(obj, np.ndarray):
        x = _check_array(obj, inp, f"data file {path.name}")
        if len(x) < 2:
            raise EdgecError(f"data file {path.name} has {len(x)} samples; need at least 2 (calib + eval)")
        k = min(n_calib, len(x) // 2) if n_eval else min(n_calib, len(x))
        parts = {"calib": x[:k], "eval": x[k:k + n_eval]}
    else:
        keys = set(obj.files)
        if {"calib", "eval"} <= keys:
            parts = {s: _check_array(obj[s], inp, f"{path.name}[{s}]") for s in ("calib", "eval")}
            for s in ("calib", "eval"):
                if f"{s}_labels" in keys:
                    labels[s] = obj[f"{s}_labels"].astype(np.int64)
        elif "x" in keys:
            x = _check_array(obj["x"], inp, f"{path.name}[x]")
            y = obj["y"].astype(np.int64) if "y" in keys else None
            k = min(n_calib, len(x) // 2)
            parts = {"calib": x[:k], "eval": x[k:k + n_eval]}
            if y is not None:
                labels = {"calib": y[:k], "eval": y[k:k + n_eval]}
        else:
            raise EdgecError(f"{path.name} must hold arrays 'calib' and 'eval', or 'x' (and optionally 'y')")
        parts["calib"] = parts["calib"][:n_calib]
        parts["eval"] = parts["eval"][:n_eval]
        labels = {s: v[: len(parts[s])] for s, v in labels.items()}
    for s, a in parts.items():
        if len(a) == 0:
            raise EdgecError(f"data file {path.name}: the {s} split is empty")
        if s in labels and len(labels[s]) != len(a):
            raise EdgecError(f"data file {path.name}: {len(labels[s])} {s} labels for {len(a)} samples")

    def mk(a):
        return lambda i: {inp.name: a[i:i + 1]}

    return tuple(DataSplit(s, len(parts[s]), mk(parts[s]), labels.get(s), f"arrays from {path.name}")
                 for s in ("calib", "eval"))


def synthetic_splits(inputs: list[InputInfo], n_calib: int, n_eval: int, seed: int):
    def mk(split_id):
        def make(i):
            rng = np.random.default_rng([seed, 7, split_id, i])
            out = {}
            for inp in inputs:
                if np.issubdtype(inp.dtype, np.integer):
                    out[inp.name] = rng.integers(0, 8, size=inp.shape).astype(inp.dtype)
                else:
                    out[inp.name] = rng.standard_normal(inp.shape).astype(inp.dtype)
            return out
        return make

    return (DataSplit("calib", n_calib, mk(0), description="synthetic N(0,1) tensors"),
            DataSplit("eval", n_eval, mk(1), description="synthetic N(0,1) tensors"))


def is_image_input(inp: InputInfo, pre: Preprocess) -> bool:
    s = inp.shape
    if len(s) != 4 or not np.issubdtype(inp.dtype, np.floating):
        return False
    c = s[1] if pre.layout == "NCHW" else s[3]
    return c in (1, 3)


def _fit_preprocess(pre: Preprocess, inp: InputInfo) -> Preprocess:
    """The preprocessing resized to the model's actual input (H, W, channels)."""
    c = inp.shape[1] if pre.layout == "NCHW" else inp.shape[3]
    h, w = (inp.shape[2], inp.shape[3]) if pre.layout == "NCHW" else (inp.shape[1], inp.shape[2])
    return Preprocess(height=h, width=w, mean=pre.mean if c == 3 else pre.mean[:1],
                      std=pre.std if c == 3 else pre.std[:1], scale=pre.scale, layout=pre.layout, channels=c)


def load_splits(source: str | None, inputs: list[InputInfo], pre: Preprocess, *, n_calib: int = 64,
                n_eval: int = 128, seed: int = 0) -> tuple[DataSplit, DataSplit]:
    """Resolve `--data` into disjoint (calib, eval) splits for the model's inputs."""
    if n_calib <= 0 or n_eval <= 0:
        raise EdgecError(f"calibration and evaluation counts must be positive (got {n_calib} and {n_eval})")
    src = (source or "bundled").strip()
    if src == "synthetic" or (src == "bundled" and (len(inputs) != 1 or not is_image_input(inputs[0], pre))):
        if src == "bundled":
            log.info("model inputs are not a single image tensor; using synthetic data")
        return synthetic_splits(inputs, n_calib, n_eval, seed)
    if len(inputs) != 1:
        raise EdgecError(f"--data {src} feeds one input, but the model has {len(inputs)} inputs")
    inp = inputs[0]
    if is_image_input(inp, pre):
        pre = _fit_preprocess(pre, inp)
    if src == "bundled":
        return bundled_split("calib", n_calib, inp, pre, seed), bundled_split("eval", n_eval, inp, pre, seed)
    p = Path(os.path.expanduser(src))
    if not p.exists():
        raise EdgecError(f"data source {src} does not exist")
    if p.is_dir():
        return folder_splits(p, n_calib, n_eval, inp, pre)
    if p.suffix in (".npy", ".npz"):
        return array_splits(p, n_calib, n_eval, inp)
    raise EdgecError(f"unsupported data source {src}: expected 'bundled', 'synthetic', a directory, .npy or .npz")
