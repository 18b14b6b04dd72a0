"""Benchmark harness shared by all targets.

Latency: batch 1, fixed intra-op threads, >= 20 warm-ups and >= 200 timed runs per model, models timed
*interleaved* (run i of every model before run i+1 of any, order rotated each round) so drift and noise
hit all of them alike; report median, p90, p99, mean and throughput, and speedups as ratios of medians
measured in the same run.
Memory: peak RSS of a fresh process that loads the model and runs it, minus the same process running an
empty (Identity) model of the same input; plus model bytes on disk.
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from edgec.core.onnx_io import ort_session, run_session, save_onnx
from edgec.core.progress import track

log = logging.getLogger(__name__)
MIN_WARMUP, MIN_RUNS = 20, 200


def _summary(ts: list[float]) -> dict:
    a = np.asarray(ts) * 1e3
    return {"median_ms": float(np.median(a)), "p90_ms": float(np.percentile(a, 90)),
            "p99_ms": float(np.percentile(a, 99)), "mean_ms": float(a.mean()), "min_ms": float(a.min()),
            "runs": int(a.size), "throughput_per_s": float(1e3 / np.median(a))}


def latency_interleaved(models: dict[str, str | onnx.ModelProto], feeds: dict[str, np.ndarray], *, threads: int = 1,
                        warmup: int = MIN_WARMUP, runs: int = MIN_RUNS, opt_level: str = "all",
                        feeds_by_model: dict[str, dict] | None = None) -> dict[str, dict]:
    """Median/p90/p99 per model, timed interleaved in this process. The first model is the baseline."""
    if warmup < MIN_WARMUP or runs < MIN_RUNS:
        raise ValueError(f"benchmark needs >= {MIN_WARMUP} warm-ups and >= {MIN_RUNS} runs")
    sessions = {k: ort_session(m if isinstance(m, onnx.ModelProto) else str(m), threads=threads, level=opt_level)
                for k, m in models.items()}
    fmap = {k: (feeds_by_model or {}).get(k, feeds) for k in models}
    for k, s in sessions.items():
        for _ in range(warmup):
            run_session(s, fmap[k])
    times = {k: [] for k in sessions}
    keys = list(sessions)
    clock = time.perf_counter
    for r in track(range(runs), desc=f"timing, {threads} thread(s)", unit="round"):  # bar updates outside the clock
        order = keys[r % len(keys):] + keys[: r % len(keys)]
        for k in order:
            s, f = sessions[k], fmap[k]
            t0 = clock()
            s.run(None, f)
            times[k].append(clock() - t0)
    res = {k: _summary(v) for k, v in times.items()}
    for k in keys:
        res[k]["times_ms"] = [round(t * 1e3, 4) for t in times[k]]
    base = res[keys[0]]["median_ms"]
    for k in keys:
        res[k]["speedup_vs_" + keys[0]] = base / res[k]["median_ms"]
    return res


def _identity_like(model: onnx.ModelProto) -> onnx.ModelProto:
    inp = [i for i in model.graph.input if i.name not in {x.name for x in model.graph.initializer}]
    nodes = [helper.make_node("Identity", [i.name], [i.name + "_out"]) for i in inp]
    outs = [helper.make_value_info(i.name + "_out", i.type) for i in inp]
    g = helper.make_graph(nodes, "empty", list(inp), outs)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=model.ir_version)


def peak_rss(model_path: str | Path, feeds: dict[str, np.ndarray], *, threads: int = 1, runs: int = 10) -> dict:
    """Peak RSS (bytes) of a fresh process loading and running the model, minus an empty-model process."""
    model_path = Path(model_path)
    with tempfile.TemporaryDirectory() as td:
        fpath = Path(td) / "feeds.npz"
        np.savez(fpath, **feeds)
        empty = Path(td) / "empty.onnx"
        save_onnx(_identity_like(onnx.load(str(model_path), load_external_data=False)), empty)

        def probe(p):
            out = subprocess.run([sys.executable, "-m", "edgec.targets.memprobe", str(p), str(fpath), str(threads), str(runs)],
                                 capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)},
                                 cwd=Path(__file__).resolve().parent.parent, timeout=600)
            if out.returncode != 0:
                raise RuntimeError(f"memory probe failed: {out.stderr.strip().splitlines()[-1] if out.stderr.strip() else out.returncode}")
            return json.loads(out.stdout.strip().splitlines()[-1])["peak_rss_bytes"]

        base = probe(empty)
        peak = probe(model_path)
    size = model_path.stat().st_size
    data = model_path.parent / (model_path.name + ".data")
    if data.exists():
        size += data.stat().st_size
    return {"peak_rss_bytes": int(peak), "empty_process_rss_bytes": int(base), "peak_rss_delta_bytes": int(peak - base),
            "model_bytes": int(size)}


def plot_latency(latency: dict[str, dict[str, dict]], path: Path) -> None:
    """Empirical CDF of per-run latency for each model and thread count (one panel per thread count)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(latency), figsize=(5 * len(latency), 3.6), squeeze=False)
    for ax, (threads, models) in zip(axes[0], latency.items()):
        for name, r in models.items():
            t = np.sort(np.asarray(r.get("times_ms", [])))
            if t.size:
                ax.plot(t, np.arange(1, t.size + 1) / t.size, label=f"{name} (median {r['median_ms']:.2f} ms)")
        ax.set_title(f"{threads} thread(s), batch 1")
        ax.set_xlabel("latency (ms)")
        ax.set_ylabel("fraction of runs")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
