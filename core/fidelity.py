"""One comparator for fidelity, used by every pass check and every backend.

For each output tensor (candidate a vs reference r, over samples):
  cosine      = <a, r> / (|a| |r|), averaged over samples
  rel_l2      = |a - r| / |r|
  max_abs     = max |a - r|
For classifier-like outputs (2-D, >= 2 classes) also top-1 / top-5 agreement with the reference argmax,
and accuracy when labels exist (with the paired counts: broken = samples the reference got right and the candidate
wrong, fixed = the other way round). cosine_sem is the standard error of the mean cosine. A sample whose output shape differs from the reference (a data-dependent detection
count) is counted in shape_mismatches and not compared. Results are JSON-serializable.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


def _is_logits(shape: tuple[int, ...]) -> bool:
    return len(shape) == 2 and shape[1] >= 2


@dataclass
class OutputAccumulator:
    name: str
    n: int = 0
    cos_sum: float = 0.0
    cos_sq: float = 0.0
    err_sq: float = 0.0
    ref_sq: float = 0.0
    max_abs: float = 0.0
    max_ref: float = 0.0
    top1: int = 0
    top5: int = 0
    correct: int = 0
    ref_correct: int = 0
    broken: int = 0  # labelled samples the reference got right and the candidate wrong
    fixed: int = 0   # ... and the other way round
    labelled: int = 0
    classifier: bool = False
    shape_mismatches: int = 0

    def update(self, a: np.ndarray, r: np.ndarray, label: int | None = None):
        a = np.asarray(a, np.float64)
        r = np.asarray(r, np.float64)
        if a.shape != r.shape:  # data-dependent outputs (detections after NMS): counted, not compared
            self.shape_mismatches += 1
            return
        for i in range(a.shape[0] if a.ndim else 1):
            ai, ri = (a[i], r[i]) if a.ndim else (a, r)
            d = ai - ri
            na, nr = np.linalg.norm(ai), np.linalg.norm(ri)
            c = float(ai.ravel() @ ri.ravel() / (na * nr)) if na > 0 and nr > 0 else float(na == nr)
            self.cos_sum += c
            self.cos_sq += c * c
            self.err_sq += float((d * d).sum())
            self.ref_sq += float((ri * ri).sum())
            self.max_abs = max(self.max_abs, float(np.abs(d).max()) if d.size else 0.0)
            self.max_ref = max(self.max_ref, float(np.abs(ri).max()) if ri.size else 0.0)
            self.n += 1
        if _is_logits(a.shape):
            self.classifier = True
            ref_top = r.argmax(1)
            self.top1 += int((a.argmax(1) == ref_top).sum())
            k = min(5, a.shape[1])
            top5 = np.argsort(-a, axis=1)[:, :k]
            self.top5 += int((top5 == ref_top[:, None]).any(1).sum())
            if label is not None:
                self.labelled += a.shape[0]
                ok, rok = a.argmax(1) == label, ref_top == label
                self.correct += int(ok.sum())
                self.ref_correct += int(rok.sum())
                self.broken += int((rok & ~ok).sum())
                self.fixed += int((ok & ~rok).sum())

    def result(self) -> dict:
        out = {
            "samples": self.n,
            "cosine": self.cos_sum / max(self.n, 1),
            "cosine_sem": self.cosine_sem(),
            "rel_l2": float(np.sqrt(self.err_sq / self.ref_sq)) if self.ref_sq > 0 else float(self.err_sq > 0),
            "max_abs": self.max_abs,
            "max_rel": self.max_abs / self.max_ref if self.max_ref > 0 else float(self.max_abs > 0),
        }
        if self.shape_mismatches:
            out["shape_mismatches"] = self.shape_mismatches
        if self.classifier:
            out["top1_agreement"] = self.top1 / max(self.n, 1)
            out["top5_agreement"] = self.top5 / max(self.n, 1)
        if self.labelled:
            out["accuracy"] = self.correct / self.labelled
            out["reference_accuracy"] = self.ref_correct / self.labelled
            out["broken"], out["fixed"] = self.broken, self.fixed
        return out

    def cosine_sem(self) -> float:
        """Standard error of the mean per-sample cosine (0 for fewer than 2 samples)."""
        if self.n < 2:
            return 0.0
        mean = self.cos_sum / self.n
        var = max(self.cos_sq / self.n - mean * mean, 0.0) * self.n / (self.n - 1)
        return float(np.sqrt(var / self.n))


@dataclass
class Comparator:
    """Accumulates candidate-vs-reference outputs sample by sample (bounded memory)."""

    names: list[str]
    accs: dict[str, OutputAccumulator] = field(default_factory=dict)

    def __post_init__(self):
        self.accs = {n: OutputAccumulator(n) for n in self.names}

    def update(self, cand: list[np.ndarray], ref: list[np.ndarray], label: int | None = None):
        for n, a, r in zip(self.names, cand, ref):
            self.accs[n].update(a, r, label)

    def result(self) -> dict:
        per = {n: acc.result() for n, acc in self.accs.items()}
        first = per[self.names[0]]
        summary = {k: first[k] for k in ("top1_agreement", "top5_agreement", "accuracy", "reference_accuracy") if k in first}
        summary["cosine_min"] = min(p["cosine"] for p in per.values())
        summary["max_rel"] = max(p["max_rel"] for p in per.values())
        summary["rel_l2_max"] = max(p["rel_l2"] for p in per.values())
        return {"summary": summary, "per_output": per}


def rel_err(a: np.ndarray, ref: np.ndarray) -> float:
    """max|a - ref| / max(max|ref|, 1e-12)."""
    a = np.asarray(a, np.float64)
    ref = np.asarray(ref, np.float64)
    if a.shape != ref.shape:
        return float("inf")
    denom = max(float(np.abs(ref).max()) if ref.size else 0.0, 1e-12)
    return float(np.abs(a - ref).max() / denom) if ref.size else 0.0


def max_rel(outs_a: list[list[np.ndarray]], outs_b: list[list[np.ndarray]]) -> float:
    worst = 0.0
    for oa, ob in zip(outs_a, outs_b):
        for a, b in zip(oa, ob):
            if np.issubdtype(np.asarray(b).dtype, np.floating):
                worst = max(worst, rel_err(a, b))
            elif not np.array_equal(a, b):
                worst = max(worst, float("inf") if np.shape(a) != np.shape(b) else 1.0)
    return worst
