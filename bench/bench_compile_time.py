"""Compile time per pass (issue 14, "one machine first").

Runs each case as a user would, in a fresh process, and prints one row per case from its report.json: the seconds
of every pass, the passes' sum, the whole compile's wall time, and the process's CPU time (user + system, children
included). On a shared or loaded machine wall time stretches with the load while CPU time (at --threads 1) stays
close to what an idle machine's wall time would be; the table prints both and the load average.

Cases (default: both):
  resnet50-prune0.5   --model torchvision:resnet50 --recipe prune --set prune.target_macs=0.5
  lite0-default       --model efficientnet_lite0 --recipe default  (what `make` compiles; quant included)
Compiles run with --no-bench (the benchmark is not compile time) and --threads 1.

Usage: python bench/bench_compile_time.py [--cases a,b] [--out out/compile_time] [--set KEY=VALUE ...]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CASES = {
    "resnet50-prune0.5": ["--model", "torchvision:resnet50", "--recipe", "prune", "--set", "prune.target_macs=0.5"],
    "lite0-default": ["--model", "efficientnet_lite0", "--recipe", "default"],
}
TARGETS = {"resnet50-prune0.5": 180.0, "lite0-default": 60.0}  # issue 14's bars, seconds of compile


def run_case(name: str, out: Path, extra: list[str]) -> dict:
    cmd = [sys.executable, "-m", "pipeline", "compile", *CASES[name], "--no-bench", "--threads", "1",
           "--out", str(out / name), *extra]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.time()
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.time() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    row = {"case": name, "exit": p.returncode, "wall_s": wall, "cpu_s": cpu, "load": os.getloadavg()[0]}
    if p.returncode != 0:
        row["error"] = (p.stderr.strip().splitlines() or ["?"])[-1][:200]
        return row
    rep = json.loads((out / name / "report.json").read_text())
    row["passes"] = {s["name"]: s.get("seconds") for s in rep["passes"]}
    row["compile_s"] = rep.get("seconds")
    costs = rep["costs"]
    row["macs_ratio"] = costs["final"]["macs"] / max(costs["original"]["macs"], 1)
    row["fidelity"] = (rep.get("fidelity") or {}).get("summary", {})
    return row


def table(rows: list[dict]) -> str:
    names = []
    for r in rows:
        for k in r.get("passes", {}):
            if k not in names:
                names.append(k)
    hdr = f"{'case':<20} " + " ".join(f"{n:>9}" for n in names) + \
        f" {'passes':>8} {'compile':>8} {'wall':>7} {'cpu':>7} {'load':>5} {'bar':>5}  MACs  top1/cos"
    lines = [hdr, "-" * len(hdr)]
    for r in rows:
        if "passes" not in r:
            lines.append(f"{r['case']:<20} failed (exit {r['exit']}): {r.get('error', '')}")
            continue
        ps = r["passes"]
        f = r["fidelity"]
        fid = f"{f.get('top1_agreement', float('nan')):.3f}/{f.get('cosine_min', float('nan')):.4f}"
        lines.append(f"{r['case']:<20} " + " ".join(f"{ps.get(n, 0) or 0:>9.1f}" for n in names) +
                     f" {sum(v or 0 for v in ps.values()):>8.1f} {r['compile_s']:>8.1f} {r['wall_s']:>7.1f}"
                     f" {r['cpu_s']:>7.1f} {r['load']:>5.1f} {TARGETS.get(r['case'], 0):>5.0f}"
                     f"  {r['macs_ratio']:.3f}  {fid}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--out", default="out/compile_time")
    ap.add_argument("--set", action="append", default=[], help="extra --set for every case")
    a = ap.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    extra = [x for s in a.set for x in ("--set", s)]
    rows = []
    for name in [c for c in a.cases.split(",") if c]:
        if name not in CASES:
            print(f"edgec: error: unknown case '{name}' (known: {', '.join(CASES)})", file=sys.stderr)
            return 2
        rows.append(run_case(name, out, extra))
        print(f"done {name}: {rows[-1].get('compile_s', rows[-1].get('error'))}", file=sys.stderr, flush=True)
    print("seconds per pass (report.json), compile = the report's total, wall/cpu = the process; "
          "bar = issue 14's target for the compile")
    print(table(rows))
    (out / "compile_time.json").write_text(json.dumps(rows, indent=1))
    return 0 if all(r["exit"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
