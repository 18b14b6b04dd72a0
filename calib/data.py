"""Calibration, validation and held-out evaluation data: three disjoint splits.

  fit       what passes calibrate, score and refit on;
  validate  what every fidelity decision (floors, bisections, promotions, choices between candidates) is gated on;
  eval      held out, used only for the report.

Sources (`--data`):
  bundled (default)  the natural photographs that scikit-image, scikit-learn and matplotlib ship (objects, people,
                     animals, scenes), textures and microscopy a minority; each split has its own photographs
                     (checked by hashing the files). fit is widened by augmentation (scale, aspect ratio, flips,
                     colour jitter, mixing two photographs); validate and eval are plain crops.
  DIR                ImageFolder layout (DIR/<class>/<image>); labels enable an accuracy column.
                     Files are assigned to a split by a hash of their relative path; equal file bytes in two
                     splits are refused.
  FILE.npy / .npz    preprocessed arrays shaped like the model input without batch (N, C, H, W);
                     .npz may hold `fit`/`validate`/`eval` (`calib` = fit; `<split>_labels`) or `x`/`y`;
                     equal rows in two splits are refused.
  synthetic          seeded standard-normal tensors, for models whose inputs are not images.

Samples are produced on demand (one at a time; DataSplit caches at most cache_limit_bytes), so memory does not
grow with the sample count.
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

# Photographs per split (disjoint; a stereo pair stays in one split). Natural photographs (objects, people, animals,
# scenes) are the majority of fit and validate; textures / microscopy are a minority (weight 1 vs 3, see _schedule).
EVAL_PHOTOS = ("chelsea", "coffee", "rocket", "flower", "astronaut", "gravel", "moon")
FIT_PHOTOS = ("motorcycle_left", "motorcycle_right", "camera", "Minduka_Present_Blue_Pack", "brick", "grass", "coins",
              "cell")
VALIDATE_PHOTOS = ("china", "grace_hopper", "clock_motion", "hubble_deep_field", "ihc", "retina")
TEXTURES = frozenset({"brick", "grass", "coins", "cell", "ihc", "retina", "microaneurysms", "gravel", "moon",
                      "hubble_deep_field"})
CALIB_PHOTOS = FIT_PHOTOS  # the name before the three-way split
SPLITS = ("fit", "validate", "eval")
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
    # the source each sample was drawn from (a photograph: its crops are not independent samples), or None when
    # every sample is its own source; the fidelity floor's sampling margin uses it (passes/floor.py)
    groups: np.ndarray | None = None
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
def _photo_path(name: str) -> Path:
    if name in ("china", "flower"):
        import sklearn.datasets

        return Path(sklearn.datasets.__file__).parent / "images" / f"{name}.jpg"
    if name in ("grace_hopper", "Minduka_Present_Blue_Pack"):
        import matplotlib

        d = Path(matplotlib.get_data_path()) / "sample_data"
    else:
        import skimage.data

        d = Path(skimage.data.__file__).parent
    cands = [p for p in d.iterdir() if p.stem == name and p.suffix.lower() in IMAGE_EXTS]
    if not cands:
        raise EdgecError(f"bundled photo {name!r} not found (scikit-image / scikit-learn / matplotlib sample data)")
    return cands[0]


@lru_cache(maxsize=None)
def _photo(name: str) -> np.ndarray:
    """One bundled photograph as HxWx3 uint8."""
    from PIL import Image

    return np.asarray(Image.open(_photo_path(name)).convert("RGB"), dtype=np.uint8)


def _crop(photo: np.ndarray, rng: np.random.Generator, h: int, w: int, *, scale=(0.35, 1.0),
          aspect=(0.8, 1.25)) -> np.ndarray:
    """A random crop (side = scale x the short side, width/height = aspect), flipped with p=0.5, resized to (h, w)."""
    from PIL import Image

    H, W = photo.shape[:2]
    side = min(H, W)
    s = int(side * rng.uniform(*scale))
    a = rng.uniform(*aspect)
    ch, cw = min(H, max(8, int(s / np.sqrt(a)))), min(W, max(8, int(s * np.sqrt(a))))
    y = int(rng.integers(0, H - ch + 1))
    x = int(rng.integers(0, W - cw + 1))
    crop = photo[y:y + ch, x:x + cw]
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    return np.asarray(Image.fromarray(np.ascontiguousarray(crop)).resize((w, h), Image.BILINEAR))


def _jitter(rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Colour jitter: brightness, contrast and saturation each scaled by U(0.75, 1.25)."""
    x = rgb.astype(np.float32)
    x = x * rng.uniform(0.75, 1.25)
    m = x.mean()
    x = (x - m) * rng.uniform(0.75, 1.25) + m
    g = x.mean(axis=2, keepdims=True)
    x = (x - g) * rng.uniform(0.75, 1.25) + g
    return np.clip(x, 0, 255).astype(np.uint8)


def _schedule(photos: tuple[str, ...]) -> list[str]:
    """Natural photographs three times as often as textures / microscopy."""
    return [p for p in photos for _ in range(1 if p in TEXTURES else 3)]


def augmented_rgb(photos: tuple[str, ...], i: int, rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Fit-split sample i: a crop at scale U(0.25, 1) and aspect U(0.67, 1.5) with flips and colour jitter; one in
    four is mixed with a crop of another photograph of the split (x = (1 - a) x1 + a x2, a ~ U(0.2, 0.5))."""
    sched = _schedule(photos)
    rgb = _jitter(_crop(_photo(sched[i % len(sched)]), rng, h, w, scale=(0.25, 1.0), aspect=(0.67, 1.5)), rng)
    if rng.random() < 0.25:
        other = sched[int(rng.integers(len(sched)))]
        a = rng.uniform(0.2, 0.5)
        rgb2 = _crop(_photo(other), rng, h, w, scale=(0.25, 1.0), aspect=(0.67, 1.5))
        rgb = ((1 - a) * rgb.astype(np.float32) + a * rgb2.astype(np.float32)).astype(np.uint8)
    return rgb


def bundled_split(split: str, count: int, inp: InputInfo, pre: Preprocess, seed: int) -> DataSplit:
    """fit: augmented (augmented_rgb); validate and eval: plain crops (scale U(0.35, 1), aspect, flip), the way a
    deployed model sees photographs. Each split draws from its own photographs."""
    split = "fit" if split == "calib" else split
    photos = {"fit": FIT_PHOTOS, "validate": VALIDATE_PHOTOS, "eval": EVAL_PHOTOS}[split]
    sid = {"fit": 0, "eval": 1, "validate": 2}[split]

    def make(i: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([seed, sid, i])
        if split == "fit":
            rgb = augmented_rgb(photos, i, rng, pre.height, pre.width)
        elif split == "validate":
            sched = _schedule(photos)
            rgb = _crop(_photo(sched[i % len(sched)]), rng, pre.height, pre.width)
        else:
            rgb = _crop(_photo(photos[i % len(photos)]), rng, pre.height, pre.width)
        return {inp.name: pre.apply(rgb)[None]}

    kind = "augmented crops" if split == "fit" else "crops"
    sched = list(photos) if split == "eval" else _schedule(photos)
    groups = np.asarray([photos.index(sched[i % len(sched)]) for i in range(count)], np.int64)
    return DataSplit(split, count, make, description=f"bundled photos, {kind} of {len(photos)} photographs: "
                                                     f"{', '.join(photos)}", groups=groups)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def check_disjoint(hashes: dict[str, list[str]], what: str) -> dict:
    """Refuse splits that share a sample (same sha256). Returns the report's `disjoint` record."""
    names = list(hashes)
    for i, a in enumerate(names):
        for b in names[:i]:
            n = len(set(hashes[a]) & set(hashes[b]))
            if n:
                raise EdgecError(f"{what}: {n} sample(s) of the {a} split also appear in the {b} split "
                                 "(identical sha256); fit, validate and eval must be disjoint")
    return {"disjoint": True, "checked": f"sha256 of {what}", "samples_hashed": {k: len(v) for k, v in hashes.items()}}


# ----------------------------------------------------------------------------- image folder
def _stable_bucket(rel: str) -> int:
    return int(hashlib.sha256(rel.encode()).hexdigest()[:8], 16) % 5


def folder_splits(root: Path, n_fit: int, n_validate: int, n_eval: int, inp: InputInfo, pre: Preprocess):
    """DIR/<class>/<image>: files go to eval (bucket 0), validate (bucket 1) or fit (2-4) by a hash of their path;
    a picture stored twice (same bytes) in two splits is refused."""
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
    by = {"fit": [], "validate": [], "eval": []}
    for f in files:
        b = _stable_bucket(str(f[0].relative_to(root)))
        by["eval" if b == 0 else "validate" if b == 1 else "fit"].append(f)

    def mk(lst):
        def make(i):
            p, _ = lst[i]
            img = Image.open(p).convert("RGB")
            s = min(img.size)
            l, t = (img.size[0] - s) // 2, (img.size[1] - s) // 2
            img = img.crop((l, t, l + s, t + s)).resize((pre.width, pre.height), Image.BILINEAR)
            return {inp.name: pre.apply(np.asarray(img))[None]}
        return make

    by = {"fit": by["fit"][:n_fit], "validate": by["validate"][:n_validate], "eval": by["eval"][:n_eval]}
    if not all(by.values()):
        raise EdgecError(f"data directory {root} has too few images to make disjoint fit, validate and eval splits")
    dis = check_disjoint({s: [_sha(p.read_bytes()) for p, _ in v] for s, v in by.items()}, f"files in {root}")
    desc = f"image folder {root} ({len(classes)} classes)"
    return tuple(DataSplit(s, len(v), mk(v), np.array([c for _, c in v]), desc) for s, v in by.items()), dis


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


def _split_by_order(x, y, counts):
    """Consecutive parts fit | validate | eval; with too few samples, equal thirds."""
    n = len(x)
    if n < 3:
        raise EdgecError(f"{n} sample(s); need at least 3 (fit, validate, eval)")
    nf, nv, ne = counts
    if nf + nv + ne > n:
        nf = nv = max(n // 3, 1)
    bounds = {"fit": (0, nf), "validate": (nf, nf + nv), "eval": (nf + nv, min(n, nf + nv + ne))}
    parts = {s: x[a:b] for s, (a, b) in bounds.items()}
    labels = {} if y is None else {s: y[a:b] for s, (a, b) in bounds.items()}
    return parts, labels


def array_splits(path: Path, n_fit: int, n_validate: int, n_eval: int, inp: InputInfo):
    """.npy: one array, split by order. .npz: `fit`/`validate`/`eval` (or `calib` for fit; a missing validate is
    the second half of fit) with optional `<split>_labels`, or `x` (and `y`) split by order. Rows equal across
    splits are refused."""
    try:
        obj = np.load(path, allow_pickle=False)
    except Exception as e:
        raise EdgecError(f"cannot read data file {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    counts = (n_fit, n_validate, n_eval)
    if isinstance(obj, np.ndarray):
        parts, labels = _split_by_order(_check_array(obj, inp, f"data file {path.name}"), None, counts)
    else:
        keys = set(obj.files)
        fit_key = "fit" if "fit" in keys else "calib" if "calib" in keys else None
        if fit_key and "eval" in keys:
            parts = {"fit": _check_array(obj[fit_key], inp, f"{path.name}[{fit_key}]"),
                     "eval": _check_array(obj["eval"], inp, f"{path.name}[eval]")}
            labels = {s: obj[f"{k}_labels"].astype(np.int64) for s, k in (("fit", fit_key), ("eval", "eval"))
                      if f"{k}_labels" in keys}
            if "validate" in keys:
                parts["validate"] = _check_array(obj["validate"], inp, f"{path.name}[validate]")
                if "validate_labels" in keys:
                    labels["validate"] = obj["validate_labels"].astype(np.int64)
            else:
                h = len(parts["fit"]) // 2
                if h < 1:
                    raise EdgecError(f"{path.name}: {fit_key} has {len(parts['fit'])} sample(s); need 2 to carve a "
                                     "validate split (or give a 'validate' array)")
                parts["fit"], parts["validate"] = parts["fit"][:h], parts["fit"][h:]
                if "fit" in labels:
                    labels["fit"], labels["validate"] = labels["fit"][:h], labels["fit"][h:]
        elif "x" in keys:
            x = _check_array(obj["x"], inp, f"{path.name}[x]")
            parts, labels = _split_by_order(x, obj["y"].astype(np.int64) if "y" in keys else None, counts)
        else:
            raise EdgecError(f"{path.name} must hold arrays 'fit' (or 'calib'), 'validate' and 'eval', or 'x' "
                             "(and optionally 'y')")
    for s, n in zip(SPLITS, counts):
        if s in labels and len(labels[s]) != len(parts[s]):
            raise EdgecError(f"data file {path.name}: {len(labels[s])} {s} labels for {len(parts[s])} samples")
        parts[s] = parts[s][:n]
        if s in labels:
            labels[s] = labels[s][:n]
        if len(parts[s]) == 0:
            raise EdgecError(f"data file {path.name}: the {s} split is empty")
    dis = check_disjoint({s: [_sha(np.ascontiguousarray(r).tobytes()) for r in parts[s]] for s in SPLITS},
                         f"rows of {path.name}")

    def mk(a):
        return lambda i: {inp.name: a[i:i + 1]}

    return tuple(DataSplit(s, len(parts[s]), mk(parts[s]), labels.get(s), f"arrays from {path.name}")
                 for s in SPLITS), dis


def synthetic_splits(inputs: list[InputInfo], n_calib: int, n_eval: int, seed: int, n_validate: int | None = None):
    """Seeded N(0, 1) tensors (integers in [0, 8) for integer inputs); each split its own stream. Returns
    (fit, eval), or (fit, validate, eval) when n_validate is given."""
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

    d = "synthetic N(0,1) tensors"
    fit, ev = DataSplit("fit", n_calib, mk(0), description=d), DataSplit("eval", n_eval, mk(1), description=d)
    return (fit, ev) if n_validate is None else (fit, DataSplit("validate", n_validate, mk(2), description=d), ev)


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


@dataclass
class Splits:
    """fit (what passes calibrate, score and refit on), validate (what fidelity decisions are gated on), eval
    (held out, for the report only), and the record of how their disjointness was checked."""

    fit: DataSplit
    validate: DataSplit
    eval: DataSplit
    disjoint: dict = field(default_factory=dict)

    def items(self):
        return (("fit", self.fit), ("validate", self.validate), ("eval", self.eval))


def load_data(source: str | None, inputs: list[InputInfo], pre: Preprocess, *, n_fit: int = 64,
              n_validate: int = 64, n_eval: int = 128, seed: int = 0, values: dict[str, str] | None = None) -> Splits:
    """Resolve `--data` into disjoint fit / validate / eval splits for the model's inputs. Per-input-name data (a
    per-name .npz, --input-value constants, control inputs) is calib.inputs' (`values`: {input: --input-value})."""
    if min(n_fit, n_validate, n_eval) <= 0:
        raise EdgecError(f"fit, validate and eval counts must be positive (got {n_fit}, {n_validate}, {n_eval})")
    from edgec.calib.inputs import named_data

    named = named_data(source, inputs, pre, values, n_fit=n_fit, n_validate=n_validate, n_eval=n_eval, seed=seed)
    if named is not None:
        return named
    src = (source or "bundled").strip()
    if src == "synthetic" or (src == "bundled" and (len(inputs) != 1 or not is_image_input(inputs[0], pre))):
        if src == "bundled":
            log.info("model inputs are not a single image tensor; using synthetic data")
        f, v, e = synthetic_splits(inputs, n_fit, n_eval, seed, n_validate=n_validate)
        return Splits(f, v, e, {"disjoint": True, "checked": "independent seeded random streams per split"})
    if len(inputs) != 1:
        raise EdgecError(f"--data {src} feeds one input, but the model has {len(inputs)} inputs")
    inp = inputs[0]
    if is_image_input(inp, pre):
        pre = _fit_preprocess(pre, inp)
    if src == "bundled":
        photos = {"fit": FIT_PHOTOS, "validate": VALIDATE_PHOTOS, "eval": EVAL_PHOTOS}
        dis = check_disjoint({s: [_sha(_photo_path(p).read_bytes()) for p in ph] for s, ph in photos.items()},
                             "bundled photograph files")
        return Splits(*(bundled_split(s, n, inp, pre, seed) for s, n in zip(SPLITS, (n_fit, n_validate, n_eval))),
                      {**dis, "photographs": {s: list(v) for s, v in photos.items()}})
    p = Path(os.path.expanduser(src))
    if not p.exists():
        raise EdgecError(f"data source {src} does not exist")
    if p.is_dir():
        parts, dis = folder_splits(p, n_fit, n_validate, n_eval, inp, pre)
    elif p.suffix in (".npy", ".npz"):
        parts, dis = array_splits(p, n_fit, n_validate, n_eval, inp)
    else:
        raise EdgecError(f"unsupported data source {src}: expected 'bundled', 'synthetic', a directory, .npy or .npz")
    return Splits(*parts, dis)


def load_splits(source: str | None, inputs: list[InputInfo], pre: Preprocess, *, n_calib: int = 64,
                n_eval: int = 128, seed: int = 0, values: dict[str, str] | None = None) -> tuple[DataSplit, DataSplit]:
    """(fit, eval) of load_data, for callers that do not gate decisions on a validate split."""
    s = load_data(source, inputs, pre, n_fit=n_calib, n_validate=max(n_calib // 2, 1), n_eval=n_eval, seed=seed,
                  values=values)
    return s.fit, s.eval
