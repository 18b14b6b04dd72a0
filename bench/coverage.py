"""Coverage benchmark: the shipped `prune` recipe on 17 torchvision classifiers (issue 15).

For each model, what a user runs, in a fresh process:

    python -m pipeline compile --model torchvision:NAME --recipe prune --set prune.target_macs=0.7 \\
        [--set prune.criterion=l1] --no-bench --threads 1 --out OUT/NAME

and, from its report.json: the achieved MACs (final / original, counted on the graph), the output check (the
compile verified the pruned model runs and kept its outputs' names and shapes; fidelity measured with no shape
mismatch), the fidelity against the unpruned model on the held-out eval split (top-1 agreement, minimum output
cosine), and the prune pass's wall time (plus the whole compile's). A model passes when it runs and its MACs are
within 0.7 +- 0.05; a model the compiler refuses (exit 2, one `edgec: error:` line) is listed with that line.
torchvision weights are random (no model hub here): fidelity figures measure the pruning, not accuracy.

Models run through the executor seam (`--cluster`, edgec.core.executor): in process by default, one compile at a
time. Each finished row is appended to OUT/coverage.jsonl as it lands, so a run stopped early keeps its rows.

Usage: python bench/coverage.py [--target 0.7] [--criterion l1] [--models a,b] [--timeout 3600] [--out DIR]
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

MODELS = ["resnet18", "resnet50", "resnext50_32x4d", "wide_resnet50_2", "vgg16_bn", "mobilenet_v2",
          "mobilenet_v3_small", "mobilenet_v3_large", "efficientnet_b0", "regnet_x_400mf", "regnet_y_400mf",
          "shufflenet_v2_x1_0", "mnasnet1_0", "squeezenet1_1", "densenet121", "googlenet", "convnext_tiny"]
TOL = 0.05
ROOT = Path(__file__).resolve().parents[1]


def compile_cmd(name: str, target: float, criterion: str | None, out: Path,
                compile_threads: int | None = None) -> list[str]:
    cmd = [sys.executable, "-m", "pipeline", "compile", "--model", f"torchvision:{name}", "--recipe", "prune",
           "--set", f"prune.target_macs={target}", "--no-bench", "--threads", "1", "--out", str(out)]
    if compile_threads:  # concurrent compiles share the cores (the bytes do not depend on it: pipeline/compile.py)
        cmd += ["--compile-threads", str(compile_threads)]
    if criterion:
        cmd += ["--set", f"prune.criterion={criterion}"]
    return cmd


def row_from_report(name: str, rep: dict, target: float) -> dict:
    costs = rep["costs"]
    ratio = costs["final"]["macs"] / max(costs["original"]["macs"], 1)
    prune = next((p for p in rep["passes"] if p["name"] == "prune"), {})
    fid = rep.get("fidelity") or {}
    summ = fid.get("summary", {})
    mism = any(p.get("shape_mismatches") for p in (fid.get("per_output") or {}).values())
    reasons = []
    if mism:
        reasons.append("output shape mismatch vs the unpruned model")
    if abs(ratio - target) > TOL:
        reasons.append(f"MACs ratio {ratio:.3f} outside {target}+-{TOL}")
    st = prune.get("stats", {})
    return {"model": name, "ok": not reasons, "ratio": ratio, "output_ok": not mism,
            "top1_agreement": summ.get("top1_agreement"), "cosine_min": summ.get("cosine_min"),
            "prune_seconds": prune.get("seconds"), "groups_pruned": st.get("groups_pruned"),
            "criterion": st.get("criterion"), "alignment_notes": len(st.get("alignment_notes", {}) or {}),
            "reason": "; ".join(reasons)}


def run_one(name: str, target: float, criterion: str | None, out_root: str, timeout: float,
            compile_threads: int | None = None) -> dict:
    """One model in a fresh compile process; a pure function of its arguments (the seam's item)."""
    out = Path(out_root) / name
    t0 = time.time()
    try:
        p = subprocess.run(compile_cmd(name, target, criterion, out, compile_threads), cwd=ROOT, capture_output=True,
                           text=True, timeout=timeout, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    except subprocess.TimeoutExpired:
        return {"model": name, "ok": False, "refused": False, "wall_seconds": time.time() - t0,
                "reason": f"not finished within {timeout:.0f} s"}
    wall = time.time() - t0
    if p.returncode != 0:
        err = [ln for ln in p.stderr.splitlines() if ln.startswith("edgec:")] or p.stderr.strip().splitlines()[-1:]
        return {"model": name, "ok": False, "refused": p.returncode == 2, "wall_seconds": wall,
                "reason": f"exit {p.returncode}: {(err[-1] if err else '')[:200]}"}
    row = row_from_report(name, json.loads((out / "report.json").read_text()), target)
    row.update(refused=False, wall_seconds=wall)
    return row


def fmt(r: dict) -> str:
    def f(v, spec):
        return format(v, spec) if isinstance(v, (int, float)) else "-"
    res = "PASS" if r["ok"] else ("REFUSED" if r.get("refused") else "FAIL")
    return (f"{r['model']:<20} {res:<7} {f(r.get('ratio'), '.3f'):>6} {'ok' if r.get('output_ok') else '-':>6} "
            f"{f(r.get('top1_agreement'), '.3f'):>6} {f(r.get('cosine_min'), '.4f'):>8} "
            f"{f(r.get('prune_seconds'), '.0f'):>8} {f(r.get('wall_seconds'), '.0f'):>7}  {r.get('reason', '')}")


HEADER = (f"{'model':<20} {'result':<7} {'MACs':>6} {'output':>6} {'top1':>6} {'cos_min':>8} {'prune_s':>8} "
          f"{'wall_s':>7}  reason")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", type=float, default=0.7)
    ap.add_argument("--criterion", default=None, help="override the recipe's criterion (e.g. l1)")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds per model")
    ap.add_argument("--out", default="out/coverage")
    ap.add_argument("--cluster", default=None, help="executor: auto | ray://H:P | H:P | local:N (default in process)")
    a = ap.parse_args(argv)
    from edgec.core.executor import make_executor
    from edgec.pipeline.compile import eval_threads

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "coverage.jsonl"
    names = [m for m in a.models.split(",") if m]
    print(f"shipped recipe 'prune' at {a.target}x MACs{', criterion ' + a.criterion if a.criterion else ''}; "
          f"fidelity vs the unpruned model on the eval split (random torchvision weights)")
    print(HEADER)
    print("-" * len(HEADER), flush=True)
    ex = make_executor(a.cluster)
    # on a cluster, each worker's compile gets its share of its machine's cores (one task per CPU slot)
    cthreads = eval_threads(None, ex.workers) if ex.workers > 1 else None
    fn = functools.partial(_logged, str(log), a.target, a.criterion, str(out.resolve()), a.timeout, cthreads)
    t0 = time.time()
    try:
        rows = ex.map(fn, names, desc="coverage")
    finally:
        getattr(ex, "close", lambda: None)()
    n_ok = sum(r["ok"] for r in rows)
    n_ref = sum(bool(r.get("refused")) for r in rows)
    print(f"\n{n_ok}/{len(rows)} models pass (target {a.target}x MACs, tolerance +-{TOL}); {n_ref} refused; "
          f"{time.time() - t0:.0f} s")
    return 0 if n_ok + min(n_ref, 1) >= len(rows) else 1


def _logged(log: str, target, criterion, out_root, timeout, compile_threads, name: str) -> dict:
    r = run_one(name, target, criterion, out_root, timeout, compile_threads)
    print(fmt(r), flush=True)
    with open(log, "a") as fh:
        fh.write(json.dumps(r) + "\n")
    return r


if __name__ == "__main__":
    sys.exit(main())
