"""Serial vs a Ray cluster, in one run: the same results byte for byte, and the wall-time ratio (issue 14, item 1).

Two workloads, each run serially and then with `--cluster SPEC` (default local:2, a private Ray with 2 workers
started by the run itself, its start-up time included), each in a fresh process with its own empty cache
directory so neither run reads measurements the other made:

  prune   `python -m pipeline compile --model efficientnet_lite0 --recipe prune --set prune.allocation=sensitivity
          --no-bench`: the prune pass's seconds (report.json) and the compile's wall time; model.onnx and
          manifest.json compared byte for byte (the manifest's recorded command line aside, which names --cluster).
  coverage `python bench/coverage.py --models M1,M2,...`: one compile per model, the models fanned out as tasks;
          every row compared (timings aside) and the wall time.

Speedup = serial seconds / cluster seconds (> 1: the cluster is faster). On a shared, loaded 2-core machine the
figures are disturbed by whatever else runs; the report prints the load average before and after.

Usage: python bench/bench_cluster.py [--cluster local:2] [--models squeezenet1_1,mobilenet_v3_small]
                                     [--skip-prune] [--skip-coverage] [--out out/bench_cluster]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TIMING_KEYS = {"prune_seconds", "wall_seconds", "seconds", "compile_seconds"}


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "-"


def _run(cmd: list[str], timeout: float) -> tuple[float, subprocess.CompletedProcess]:
    env = {k: v for k, v in os.environ.items() if k != "EDGEC_CLUSTER"}  # serial means serial
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    return time.perf_counter() - t0, p


def _prune_seconds(out: Path) -> tuple[float, float]:
    """(the prune pass's seconds, its sensitivity scan's seconds: the part that runs as executor tasks)."""
    rep = json.loads((out / "report.json").read_text())
    ps = [s for s in rep.get("passes", []) if s.get("name") == "prune"]
    return (sum(float(s.get("seconds", 0)) for s in ps),
            sum(float(s.get("stats", {}).get("allocation_seconds", 0)) for s in ps))


def _manifest_sans_command(out: Path) -> str:
    man = json.loads((out / "manifest.json").read_text())
    man.pop("command", None)
    return hashlib.sha256(json.dumps(man, sort_keys=True).encode()).hexdigest()


def bench_prune(root: Path, cluster: str, timeout: float) -> dict:
    res = {}
    for mode in ("serial", "cluster"):
        out = root / f"prune-{mode}"
        shutil.rmtree(out, ignore_errors=True)
        cmd = [sys.executable, "-m", "edgec", "compile", "--model", "efficientnet_lite0", "--recipe", "prune",
               "--set", "prune.allocation=sensitivity", "--no-bench", "--no-memory", "--threads", "1",
               "--out", str(out), "--cache-dir", str(root / f"cache-prune-{mode}"), "-q"]
        if mode == "cluster":
            cmd += ["--cluster", cluster]
        wall, p = _run(cmd, timeout)
        if p.returncode != 0:
            raise SystemExit(f"prune {mode} failed (exit {p.returncode}): {p.stderr.strip()[-600:]}")
        prune_s, scan_s = _prune_seconds(out)
        res[mode] = {"wall_s": wall, "prune_s": prune_s, "scan_s": scan_s, "model_sha256": _sha(out / "model.onnx"),
                     "manifest": _manifest_sans_command(out)}
        print(f"  prune {mode:<8} wall {wall:7.1f} s   prune pass {prune_s:7.1f} s   scan {scan_s:6.1f} s   "
              f"model {res[mode]['model_sha256'][:16]}", flush=True)
    s, c = res["serial"], res["cluster"]
    res["same_model"] = s["model_sha256"] == c["model_sha256"]
    res["same_manifest"] = s["manifest"] == c["manifest"]
    res["speedup_prune_pass"] = s["prune_s"] / max(c["prune_s"], 1e-9)
    res["speedup_scan"] = s["scan_s"] / max(c["scan_s"], 1e-9)
    res["speedup_wall"] = s["wall_s"] / max(c["wall_s"], 1e-9)
    return res


def _rows(out: Path) -> list[dict]:
    p = out / "coverage.jsonl"
    rows = [json.loads(x) for x in p.read_text().splitlines() if x.strip()] if p.is_file() else []
    return sorted(({k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows), key=lambda r: r["model"])


def bench_coverage(root: Path, cluster: str, models: str, timeout: float) -> dict:
    res = {}
    for mode in ("serial", "cluster"):
        out = root / f"coverage-{mode}"
        shutil.rmtree(out, ignore_errors=True)
        cmd = [sys.executable, "bench/coverage.py", "--models", models, "--out", str(out)]
        if mode == "cluster":
            cmd += ["--cluster", cluster]
        wall, p = _run(cmd, timeout)
        rows = _rows(out)
        res[mode] = {"wall_s": wall, "exit": p.returncode, "rows": rows,
                     "models_sha256": {r["model"]: _sha(out / r["model"] / "model.onnx") for r in rows}}
        print(f"  coverage {mode:<8} wall {wall:7.1f} s   {sum(r.get('ok', False) for r in rows)}/{len(rows)} pass   "
              f"exit {p.returncode}", flush=True)
    s, c = res["serial"], res["cluster"]
    res["same_rows"] = s["rows"] == c["rows"] and len(s["rows"]) == len([m for m in models.split(",") if m])
    res["same_models"] = s["models_sha256"] == c["models_sha256"]
    res["speedup_wall"] = s["wall_s"] / max(c["wall_s"], 1e-9)
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cluster", default="local:2")
    ap.add_argument("--models", default="squeezenet1_1,mobilenet_v3_small,shufflenet_v2_x1_0,mnasnet1_0",
                    help="coverage models (torchvision names)")
    ap.add_argument("--skip-prune", action="store_true")
    ap.add_argument("--skip-coverage", action="store_true")
    ap.add_argument("--timeout", type=float, default=3600.0)
    ap.add_argument("--out", default="out/bench_cluster")
    a = ap.parse_args(argv)
    root = Path(a.out).resolve()
    root.mkdir(parents=True, exist_ok=True)
    summary = {"cluster": a.cluster, "cpus": os.cpu_count(), "load_before": os.getloadavg()}
    print(f"serial vs --cluster {a.cluster} on {os.cpu_count()} CPUs (load average {summary['load_before'][0]:.1f})")
    if not a.skip_prune:
        summary["prune"] = bench_prune(root, a.cluster, a.timeout)
    if not a.skip_coverage:
        summary["coverage"] = bench_coverage(root, a.cluster, a.models, a.timeout)
    summary["load_after"] = os.getloadavg()
    for k in ("prune", "coverage"):
        for m in ("serial", "cluster"):
            summary.get(k, {}).get(m, {}).pop("rows", None)
    (root / "bench_cluster.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    print("\nworkload          serial s  cluster s  speedup  same result")
    ok = True
    for key, label, what, same_keys, timing in (
            ("prune", "prune pass (L0)", "model.onnx, manifest", ("same_model", "same_manifest"),
             ("prune_s", "speedup_prune_pass")),
            ("coverage", "coverage", "rows, model.onnx", ("same_rows", "same_models"), ("wall_s", "speedup_wall"))):
        if key not in summary:
            continue
        r = summary[key]
        same = all(r[k] for k in same_keys)
        ok &= same
        t, sp = timing
        print(f"{label:<17} {r['serial'][t]:8.1f}  {r['cluster'][t]:9.1f}  {r[sp]:6.2f}x  {'yes' if same else 'NO'} "
              f"({what})")
        if key == "prune":
            print(f"  sensitivity scan {r['serial']['scan_s']:7.1f}  {r['cluster']['scan_s']:9.1f}  "
                  f"{r['speedup_scan']:6.2f}x  (the executor's tasks: one per group)")
            print(f"prune compile     {r['serial']['wall_s']:8.1f}  {r['cluster']['wall_s']:9.1f}  "
                  f"{r['speedup_wall']:6.2f}x")
    print(f"load average {summary['load_before'][0]:.1f} -> {summary['load_after'][0]:.1f} "
          f"(a shared machine: ratios, not absolute times)   {root}/bench_cluster.json")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
