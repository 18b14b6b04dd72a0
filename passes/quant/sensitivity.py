"""Per-layer quantization sensitivity, measured one layer at a time.

For layer l and bitwidth b, Q_{l,b} is the model with only l quantized at b (through the same Q/DQ insertion as
the final model, so activation Q/DQ around l is included for w8a8). On S calibration samples x_s,
  kl : S_{l,b} = mean_s KL(softmax(f(x_s)) || softmax(Q_{l,b}(x_s)))   (classifier outputs, 2-D)
  mse: S_{l,b} = mean_s |Q_{l,b}(x_s) - f(x_s)|^2 / mean_s |f(x_s)|^2
summed over outputs (mse is used for non-classifier outputs either way). Sessions run with ORT's graph
optimizations ON, so the numerics are those of the integer kernels that will run. Results are cached as JSON
under cache_dir/quant_sensitivity/<sha256(model bytes, options)>.json.

With an executor of several workers (core.executor, `--cluster`), the (layer, bits) trials are its items: the model,
ranges, feeds and reference outputs go to the object store once, and every trial is the same pure function of them,
so the result does not depend on the number of workers or their order.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from edgec.passes.quant.dialect import QuantDialect
from edgec.passes.quant.qdq import Layer, insert_qdq
from edgec.core.onnx_io import atomic_write, model_bytes, ort_session, run_session

log = logging.getLogger(__name__)


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def output_distance(outs: list[np.ndarray], refs: list[np.ndarray], metric: str = "kl") -> float:
    d = 0.0
    for a, r in zip(outs, refs):
        a = np.asarray(a, np.float64)
        r = np.asarray(r, np.float64)
        if metric == "kl" and a.ndim == 2 and a.shape[1] >= 2:
            p, q = _softmax(r), _softmax(a)
            d += float(np.sum(p * (np.log(p + 1e-12) - np.log(q + 1e-12))) / a.shape[0])
        else:
            d += float(np.mean((a - r) ** 2) / max(np.mean(r ** 2), 1e-12))
    return d


def cache_key(model: onnx.ModelProto, **opts) -> str:
    h = hashlib.sha256(model_bytes(model))
    h.update(json.dumps(opts, sort_keys=True, default=str).encode())
    return h.hexdigest()[:32]


@dataclass
class _Trials:
    """Everything a trial needs (sent once per executor)."""

    model: onnx.ModelProto
    layers: list
    act_ranges: dict
    dialect: QuantDialect
    feeds: list
    refs: list
    metric: str
    weight_method: str
    input_means: dict | None
    bias_correction: bool
    weight_only: bool
    threads: int


def _trial(payload, item: tuple[str, int]) -> float:
    """S_{l,b}: mean output distance of the model with only layer l quantized at b bits (module docstring)."""
    from edgec.core.executor import get_handle

    t: _Trials = get_handle(payload)
    name, b = item
    qm, _ = insert_qdq(t.model, {name: b}, t.act_ranges, t.dialect, weight_method=t.weight_method,
                       input_means=t.input_means, bias_correction=t.bias_correction, layers=t.layers,
                       weight_only=t.weight_only)
    sess = ort_session(qm, threads=t.threads, optimize=True)
    return float(np.mean([output_distance(run_session(sess, f), r, t.metric) for f, r in zip(t.feeds, t.refs)]))


def measure_sensitivity(model: onnx.ModelProto, layers: list[Layer], candidates: dict[str, list[int]],
                        act_ranges: dict, dialect: QuantDialect, feeds: list[dict[str, np.ndarray]], *,
                        metric: str = "kl", weight_method: str = "minmax", input_means: dict | None = None,
                        bias_correction: bool = True, cache_dir: str | None = None, threads: int = 1,
                        progress: Callable[[str], None] | None = None, cache_extra: dict | None = None,
                        weight_only: bool = False, executor=None) -> dict:
    """{layer: {bits: sensitivity}} (bits as str keys in the cache, int here); 32 bits -> 0."""
    key = None
    path = None
    if cache_dir:
        key = cache_key(model, dialect=dialect.name, graph_outputs=dialect.quantize_graph_outputs, candidates=candidates,
                        metric=metric, weight_method=weight_method,
                        bias_correction=bias_correction, samples=len(feeds), weight_only=weight_only,
                        ranges={k: [round(float(v[0]), 7), round(float(v[1]), 7)] for k, v in sorted(act_ranges.items())},
                        extra=cache_extra or {})
        path = Path(cache_dir) / "quant_sensitivity" / f"{key}.json"
        if path.is_file():
            try:
                data = json.loads(path.read_text())
                log.info("sensitivity cache hit %s", path)
                return {l: {int(b): float(v) for b, v in d.items()} for l, d in data["sensitivity"].items()}
            except (ValueError, KeyError):
                pass
    ref_sess = ort_session(model, threads=threads, optimize=True)
    refs = [run_session(ref_sess, f) for f in feeds]
    workers = getattr(executor, "workers", 1) if executor is not None else 1
    trials = _Trials(model, layers, act_ranges, dialect, feeds, refs, metric, weight_method, input_means,
                     bias_correction, weight_only, max(1, threads // workers))  # cores shared among the workers
    items = [(L.name, b) for L in layers for b in candidates.get(L.name, []) if b != 32]
    total = len(items)
    if workers > 1:
        vals = executor.map(functools.partial(_trial, executor.put(trials)), items, desc="quant sensitivity")
        if progress:
            for k in range(total):
                progress(f"sensitivity {k + 1}/{total}")
    else:
        vals = []
        for k, it in enumerate(items):
            vals.append(_trial(trials, it))
            if progress:  # once per trial (a progress bar's tick); its -v detail line is the caller's choice
                progress(f"sensitivity {k + 1}/{total}")
    got = dict(zip(items, vals))
    out: dict[str, dict[int, float]] = {}
    for L in layers:
        out[L.name] = {b: (0.0 if b == 32 else got[(L.name, b)]) for b in candidates.get(L.name, [])}
    if path is not None:
        os.makedirs(path.parent, exist_ok=True)
        with atomic_write(path, "w") as f:
            json.dump({"sensitivity": {l: {str(b): v for b, v in d.items()} for l, d in out.items()}}, f)
    return out
