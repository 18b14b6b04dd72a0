"""Real-world trait models through a recipe at production sizes (issue 6, "Done when" item 1).

For every trait model in tests/realworld_models.py (Paddle opset 11/12, Ultralytics-style detector, external data,
MatMul attention) at the "real" size, run `python -m pipeline compile --recipe R --threads 1` and collect from its
report: per-output cosine / relative L2 / max abs vs the original on held-out samples, MACs ratio, and the 1-thread
median latency of original and compiled (measured interleaved in that compile's own process, >= 20 warm-up and
>= 200 timed runs). Writes out/bench_realworld/{report.md, results.json}. The target for `default`: every output's
cosine >= 0.99 and speedup >= 1.3x.

Usage: python bench/bench_realworld.py [--recipe default] [--size real|tiny] [--models a,b] [--set k=v ...] [--dynamic]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


COS_TARGET, SPEED_TARGET = 0.99, 1.3


def run_one(key: str, writer, size: str, recipe: str, out: Path, sets: list[str], seed: int,
            dynamic: bool = False) -> dict:
    from edgec.pipeline.cli import main

    rec = writer(out / "models" / key, size=size)
    dest = out / key
    args = ["compile", "--model", str(rec.path), "--recipe", recipe, "--threads", "1", "--seed", str(seed),
            "--out", str(dest), "-q"]
    for s in rec.shape_args:
        args += ["--input-shape", s]
    if rec.data:
        args += ["--data", rec.data]
    for s in sets:
        args += ["--set", s]
    if dynamic and rec.dynamic:
        args += ["--dynamic", ",".join(rec.dynamic)]
    t0 = time.perf_counter()
    rc = main(args)
    row = {"model": key, "rc": rc, "compile_s": round(time.perf_counter() - t0, 1), "traits": list(rec.traits)}
    if rc:
        return row
    r = json.loads((dest / "report.json").read_text())
    lat = r["bench"]["latency"]["1"]
    c0, c1 = r["costs"]["original"]["macs"], r["costs"]["final"]["macs"]
    row.update(
        original_ms=lat["original"]["median_ms"], compiled_ms=lat["compiled"]["median_ms"],
        speedup=lat["compiled"]["speedup_vs_original"], macs_ratio=c1 / max(c0, 1), macs=c0,
        per_output={k: {m: v[m] for m in ("cosine", "rel_l2", "max_abs")} for k, v in r["fidelity"]["per_output"].items()},
    )
    if "dynamic" in r:
        row["dynamic"] = [{"shape": p["shape"], "cosine_min": p["summary"]["cosine_min"]} for p in r["dynamic"]["per_shape"]]
    row["ok"] = row["speedup"] >= SPEED_TARGET and all(v["cosine"] >= COS_TARGET for v in row["per_output"].values())
    return row


def write_report(rows: list[dict], out: Path, recipe: str, size: str) -> str:
    lines = [f"# Real-world trait models, recipe `{recipe}`, size `{size}`, 1 thread", "",
             f"Target: every output cosine >= {COS_TARGET} and speedup >= {SPEED_TARGET}x (medians, interleaved).", "",
             "| model | MACs (M) | MACs ratio | original ms | compiled ms | speedup | output: cosine / rel L2 / max abs | "
             "target |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["rc"]:
            lines.append(f"| {r['model']} | compile failed (exit {r['rc']}) | | | | | | FAIL |")
            continue
        outs = "<br>".join(f"{k}: {v['cosine']:.4f} / {v['rel_l2']:.4f} / {v['max_abs']:.3g}"
                           for k, v in r["per_output"].items())
        if r.get("dynamic"):
            outs += "<br>dynamic, verified at " + ", ".join(
                f"{'x'.join(map(str, next(iter(d['shape'].values()))))} (cos {d['cosine_min']:.4f})" for d in r["dynamic"])
        lines.append(f"| {r['model']} | {r['macs'] / 1e6:.1f} | {r['macs_ratio']:.3f} | {r['original_ms']:.3f} | "
                     f"{r['compiled_ms']:.3f} | {r['speedup']:.2f}x | {outs} | {'PASS' if r['ok'] else 'FAIL'} |")
    text = "\n".join(lines) + "\n"
    (out / "report.md").write_text(text)
    (out / "results.json").write_text(json.dumps(rows, indent=1))
    return text


def main(argv=None) -> int:
    from edgec.testing import realworld_models as rw

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--recipe", default="default")
    ap.add_argument("--size", default="real", choices=sorted(rw.SIZES))
    ap.add_argument("--models", default=",".join(rw.WRITERS), help="comma-separated subset of " + ",".join(rw.WRITERS))
    ap.add_argument("--set", action="append", default=[], help="recipe override passed to compile (PASS.OPTION=VALUE)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dynamic", action="store_true",
                    help="keep each model's dynamic axes (--dynamic) and verify it at two input shapes")
    ap.add_argument("--out", default="out/bench_realworld")
    a = ap.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for key in a.models.split(","):
        if key not in rw.WRITERS:
            ap.error(f"unknown model {key!r}; choose from {', '.join(rw.WRITERS)}")
        print(f"[bench_realworld] {key} ({a.size}, recipe {a.recipe}) ...", flush=True)
        rows.append(run_one(key, rw.WRITERS[key], a.size, a.recipe, out, a.set, a.seed, a.dynamic))
        print(write_report(rows, out, a.recipe, a.size).splitlines()[-1], flush=True)
    print(write_report(rows, out, a.recipe, a.size))
    return 0 if all(r.get("ok") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
