"""bench-frontier (issue 11, "Done when" item 4): eval top-1 agreement vs speedup on EfficientNet-Lite0.

Points: prune ratios {1.0, 0.9, 0.8, 0.7} x MACs (recon scores, sensitivity allocation, least squares; and, unless
--no-distill, least squares followed by distillation toward FP32 on the unlabeled fit crops) x {fp32, mixed int8}
(edgec's quant pass with the ORT probe's per-layer latency table toward 3x, no fidelity policy: the raw point), plus
ORT quantize_static (QDQ, per-channel, the calibrator with the best validate agreement). Every point is a fixed
budget (no fidelity floor), so the plot shows the trade-off the policy chooses from. Fidelity vs FP32 on the eval
split (held out; validate shown too); speedup = median(FP32) / median(point), all models timed interleaved in one
loop at 1 thread (>= 20 warm-ups, >= 200 runs).

Usage: python bench/bench_frontier.py [--ratios 1.0,0.9,0.8,0.7] [--no-distill] [--distill-steps 150]
                                      [--calib 64] [--validate 64] [--eval 128] [--runs 200] [--out out/bench_frontier]
Writes out/bench_frontier/{report.json, report.md, frontier.png}.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

log = logging.getLogger("bench_frontier")


def _pruned_variants(fp32, ratio, ctx, args) -> dict:
    """{recovery: (model, seconds)} at `ratio` x MACs: least squares, and least squares + distillation."""
    from edgec.passes.base import get_pass, make_options
    from edgec.passes.prune import prune_pass as P

    if ratio >= 1.0:
        return {"none": (fp32, 0.0)}
    spec = get_pass("prune")
    opts = make_options(spec, {"target_macs": ratio, "criterion": "recon", "allocation": "sensitivity",
                               "recovery": "lstsq", "round_to": 8, "calib_samples": args.calib})
    t0 = time.time()
    res = spec.fn(fp32, ctx, opts)
    out = {"lstsq": (res.model, time.time() - t0)}
    if args.distill:
        t1 = time.time()
        st: dict = {}
        d = P._distill(res.model, fp32, ctx, dataclasses.replace(opts, recovery="distill",
                                                                  distill_steps=args.distill_steps), st)
        out["distill"] = (d, out["lstsq"][1] + time.time() - t1)
    return out


def _points(fp32, calib, val, args, workdir):
    """{name: (model, meta)} for every frontier point and the ORT peer."""
    from bench_quant import _fidelity, _peer

    from edgec.core.onnx_io import ort_session, save_onnx
    from edgec.passes.base import PassContext
    from edgec.passes.quant.quant_pass import quantize
    from edgec.targets.ort_latency import OrtLatencyProbe

    ctx = PassContext(calib_batches=lambda: calib.iter_feeds(), reference_model=fp32, seed=0, threads=2)
    probe = OrtLatencyProbe(threads=1, cache_dir=str(workdir / "probe"), runs=30)
    pts = {}
    for r in args.ratios:
        for rec, (m, sec) in _pruned_variants(fp32, r, ctx, args).items():
            pts[f"p{r:.1f}-{rec}-fp32"] = (m, {"ratio": r, "recovery": rec, "precision": "fp32", "seconds": sec})
            t0 = time.time()
            qctx = PassContext(calib_batches=lambda: calib.iter_feeds(), reference_model=m, seed=0, threads=2,
                               target_probe=probe)
            q = quantize(m, qctx, target_speedup=3.0, calib_samples=args.calib).model
            pts[f"p{r:.1f}-{rec}-int8"] = (q, {"ratio": r, "recovery": rec, "precision": "mixed int8",
                                               "seconds": sec + time.time() - t0})
            log.info("ratio %.1f %s done", r, rec)
    save_onnx(fp32, workdir / "fp32.onnx")
    ref_val = [ort_session(fp32, threads=2).run(None, f)[0] for f in val.iter_feeds()]
    peers = {m: _peer(str(workdir / "fp32.onnx"), calib, m, workdir) for m in ("MinMax", "Percentile", "Entropy")}
    best = max(peers, key=lambda k: _fidelity(peers[k], ref_val, val)["top1_agreement"])
    pts[f"ort-quantize_static-{best.lower()}"] = (peers[best], {"ratio": 1.0, "recovery": "-", "precision": "ORT int8",
                                                               "seconds": 0.0})
    return pts


def _plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8.5, 5))
    style = {"fp32": "o", "mixed int8": "s", "ORT int8": "*"}
    color = {"none": "k", "lstsq": "tab:blue", "distill": "tab:green", "-": "tab:red"}
    for r in rows:
        ax.scatter(r["speedup"], r["eval_top1"], marker=style[r["precision"]], c=color[r["recovery"]], s=60)
        ax.annotate(f"{r['ratio']:.1f}", (r["speedup"], r["eval_top1"]), fontsize=7, xytext=(3, 3),
                    textcoords="offset points")
    for lab, c in color.items():
        ax.scatter([], [], c=c, label={"none": "unpruned", "-": "ORT quantize_static"}.get(lab, lab))
    for lab, mk in style.items():
        ax.scatter([], [], marker=mk, c="gray", label=lab)
    ax.axhline(0.95, ls="--", c="gray", lw=0.8)
    ax.set_xlabel("speedup vs FP32, 1 thread (median, interleaved)")
    ax.set_ylabel("top-1 agreement with FP32 (eval, held out)")
    ax.set_title("EfficientNet-Lite0: fidelity vs speed (labels: MACs ratio)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: points fill every corner
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ratios", default="1.0,0.9,0.8,0.7")
    ap.add_argument("--no-distill", dest="distill", action="store_false")
    ap.add_argument("--distill-steps", type=int, default=150)
    ap.add_argument("--calib", type=int, default=64)
    ap.add_argument("--validate", type=int, default=64)
    ap.add_argument("--eval", type=int, default=128)
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--out", default="out/bench_frontier")
    args = ap.parse_args(argv)
    args.ratios = [float(r) for r in args.ratios.split(",")]
    if args.runs < 200:
        ap.error("--runs must be >= 200")
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    log.setLevel(logging.INFO)
    from bench_quant import _fidelity, _setup, _time

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    fp32, calib, val, ev, ref_ev, ref_val = _setup(args.calib, args.validate, args.eval)
    with tempfile.TemporaryDirectory(prefix="edgec-frontier-") as d:
        pts = _points(fp32, calib, val, args, Path(d))
        timing = _time({"fp32": fp32, **{k: m for k, (m, _) in pts.items()}}, args.runs)
    rows = []
    for k, (m, meta) in pts.items():
        fe, fv = _fidelity(m, ref_ev, ev), _fidelity(m, ref_val, val)
        rows.append({"point": k, **meta, "eval_top1": fe["top1_agreement"], "eval_top5": fe["top5_agreement"],
                     "eval_cosine": fe["cosine_min"], "validate_top1": fv["top1_agreement"],
                     "speedup": timing[k]["speedup_vs_fp32"], "median_ms": timing[k]["median_ms"],
                     "p90_ms": timing[k]["p90_ms"], "p99_ms": timing[k]["p99_ms"]})
    _plot(rows, out / "frontier.png")
    md = [f"# Frontier: EfficientNet-Lite0, eval top-1 agreement vs 1-thread speedup (FP32 {timing['fp32']['median_ms']:.2f} "
          f"ms median)", "", f"fit {len(calib)} / validate {len(val)} / eval {len(ev)} crops (disjoint photographs); "
          f"{args.runs} interleaved runs; fixed budgets, no fidelity policy.", "",
          "| point | MACs ratio | recovery | precision | eval top-1 | eval top-5 | eval cosine | validate top-1 | speedup | "
          "median / p90 / p99 ms | build s |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: -r["speedup"]):
        md.append(f"| {r['point']} | {r['ratio']:.1f} | {r['recovery']} | {r['precision']} | {r['eval_top1']:.3f} | "
                  f"{r['eval_top5']:.3f} | {r['eval_cosine']:.4f} | {r['validate_top1']:.3f} | {r['speedup']:.2f}x | "
                  f"{r['median_ms']:.2f} / {r['p90_ms']:.2f} / {r['p99_ms']:.2f} | {r['seconds']:.0f} |")
    md += ["", "![frontier](frontier.png)", "", f"total {time.time() - t0:.0f} s"]
    (out / "report.md").write_text("\n".join(md) + "\n")
    (out / "report.json").write_text(json.dumps({"rows": rows, "fp32_ms": timing["fp32"]["median_ms"],
                                                 "runs": args.runs, "seconds": round(time.time() - t0, 1)}, indent=1))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
