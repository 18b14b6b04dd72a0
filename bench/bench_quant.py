"""bench-quant (issue 4, "Done when" item 2): FP32 vs ORT quantize_static vs edgec mixed-bit, one run, 1 thread.

Model: EfficientNet-Lite0 (ImageNet weights) exported and cleaned by edgec. Data: the bundled fit / validate / eval
splits (disjoint photographs): every quantizer calibrates on fit, every choice is made on validate, and the table
reports eval (held out) fidelity.
  FP32            the cleaned model
  ORT             onnxruntime.quantization.quantize_static, QDQ, per-channel, QUInt8 activations / QInt8 weights,
                  after ORT's recommended quant_pre_process; MinMax, Percentile and Entropy; the calibrator with the
                  best top-1 agreement on validate is the peer
  edgec           the `quant` pass (ORT CPU dialect) with target_latency_ms = margin x the peer's latency, so it
                  may spend any latency headroom keeping the most sensitive layers fp32, under the default recipe's
                  fidelity policy (top-1 agreement >= --min-top1 on validate)
Latency: all models in one process, 1 thread, ORT_ENABLE_ALL, batch 1, >= 20 warm-ups, then `runs` rounds in
which every model runs once (interleaved); median / p90 / p99 and speedup = median(FP32) / median(model).
Writes out/bench_quant/{report.json, report.md, quant_pareto.png}.

Usage: python bench/bench_quant.py [--calib 64] [--validate 64] [--eval 256] [--runs 200] [--margin 0.97]
                                   [--min-top1 0.95] [--out out/bench_quant]
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx



def _export():
    from edgec.passes.base import PassContext, get_pass, make_options
    from edgec.torchkit.export import export_torch
    from edgec.pipeline.sources import resolve

    src = resolve("efficientnet_lite0")
    m, _ = export_torch(src.module, src.input_shape)
    spec = get_pass("cleanup")
    return spec.fn(m, PassContext(calib_batches=lambda: iter([])), make_options(spec, {})).model, src.preprocess


def _setup(n_fit: int, n_validate: int, n_eval: int):
    """EfficientNet-Lite0 after cleanup, its fit / validate / eval splits of the bundled photographs, and the FP32
    reference outputs on eval and validate: (fp32, calib, val, evals, ref_eval, ref_val)."""
    from edgec.calib.data import InputInfo, load_data
    from edgec.core.onnx_io import ort_session

    fp32, pre = _export()
    inp = InputInfo(fp32.graph.input[0].name, (1, 3, 224, 224))
    splits = load_data("bundled", [inp], pre, n_fit=n_fit, n_validate=n_validate, n_eval=n_eval, seed=0)
    calib, val, evals = splits.fit, splits.validate, splits.eval
    ref_s = ort_session(fp32, threads=2, optimize=True)
    return (fp32, calib, val, evals, [ref_s.run(None, f)[0] for f in evals.iter_feeds()],
            [ref_s.run(None, f)[0] for f in val.iter_feeds()])


def _peer(model_path: str, calib, method: str, workdir: Path) -> onnx.ModelProto:
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = workdir / "peer_pre.onnx"
    if not pre.exists():
        quant_pre_process(model_path, str(pre), skip_symbolic_shape=True)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = calib.iter_feeds()

        def get_next(self):
            return next(self.it, None)

    out = workdir / f"peer_{method}.onnx"
    quantize_static(str(pre), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=getattr(CalibrationMethod, method))
    return onnx.load(str(out))


def _fidelity(model, ref_outs, evals) -> dict:
    """Summary vs FP32 on a split (ref_outs: FP32 first output per sample)."""
    from edgec.core.fidelity import Comparator
    from edgec.core.onnx_io import ort_session

    s = ort_session(model, threads=2, optimize=True)
    comp = Comparator([o.name for o in model.graph.output][:1])
    for f, r in zip(evals.iter_feeds(), ref_outs):
        comp.update([s.run(None, f)[0]], [r])
    return comp.result()["summary"]


def _time(models: dict[str, onnx.ModelProto], runs: int, warmup: int = 20) -> dict:
    from edgec.core.onnx_io import ort_session

    names = list(models)
    sess = {n: ort_session(models[n], threads=1, optimize=True) for n in names}
    x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
    feed = {models[names[0]].graph.input[0].name: x}
    for n in names:
        for _ in range(warmup):
            sess[n].run(None, feed)
    ts = {n: [] for n in names}
    for _ in range(runs):
        for n in names:
            t = time.perf_counter()
            sess[n].run(None, feed)
            ts[n].append((time.perf_counter() - t) * 1e3)
    base = float(np.median(ts[names[0]]))
    return {n: {"median_ms": float(np.median(v)), "p90_ms": float(np.percentile(v, 90)),
                "p99_ms": float(np.percentile(v, 99)), "speedup_vs_fp32": base / float(np.median(v))}
            for n, v in ts.items()}


def _parse(argv):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calib", type=int, default=64)
    ap.add_argument("--validate", type=int, default=64)
    ap.add_argument("--eval", type=int, default=256)
    ap.add_argument("--min-top1", type=float, default=0.95, help="edgec's fidelity policy on validate")
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--margin", type=float, default=0.97, help="edgec latency budget = margin x peer latency")
    ap.add_argument("--methods", default="MinMax,Percentile,Entropy")
    ap.add_argument("--out", default="out/bench_quant")
    ap.add_argument("--cache", default=".cache/edgec")
    return ap.parse_args(argv)


def _write_report(out: Path, results: dict, st: dict, best: str, counts: tuple, t0: float) -> None:
    """Verdict, report.json and report.md (printed) from the measured rows."""
    n_fit, n_val, n_eval = counts
    e, p = results["models"]["edgec_mixed"], results["models"][best]
    results["peer"] = best
    results["edgec_stats"] = {k: st.get(k) for k in ("bits_histogram", "budget", "solution", "latency_iterations",
                                                    "calibration", "pareto_png", "pads_folded", "latency_source",
                                                    "floor")}
    results["edgec_stats"]["bits"] = st.get("bits")
    results["verdict"] = {"edgec_latency_le_peer": e["median_ms"] <= p["median_ms"],
                          "edgec_agreement_gt_peer": e["top1_agreement"] > p["top1_agreement"],
                          "note": "latency medians from one interleaved run in one process; other load on the machine "
                                  "shifts all models alike, ratios are the robust figure"}
    results["seconds"] = round(time.time() - t0, 1)
    (out / "report.json").write_text(json.dumps(results, indent=2, default=float))
    lines = [f"fit {n_fit} / validate {n_val} / eval {n_eval} samples (disjoint photographs); "
             "choices on validate, figures on eval", "",
             "| model | median ms | p90 | p99 | speedup vs FP32 | top-1 agr (eval) | top-1 agr (validate) | top-5 agr | "
             "cosine min |", "|---|---|---|---|---|---|---|---|---|"]
    for n, r in results["models"].items():
        if "median_ms" in r:
            lines.append(f"| {n} | {r['median_ms']:.2f} | {r['p90_ms']:.2f} | {r['p99_ms']:.2f} | {r['speedup_vs_fp32']:.2f}x | "
                         f"{r.get('top1_agreement', float('nan')):.3f} | {r.get('validate_top1_agreement', float('nan')):.3f} | "
                         f"{r.get('top5_agreement', float('nan')):.3f} | {r.get('cosine_min', float('nan')):.4f} |")
    md = "\n".join(lines) + f"\n\npeer = {best}; verdict: {results['verdict']}\nPareto: {st.get('pareto_png')}\n"
    (out / "report.md").write_text(md)
    print(md)


def main(argv=None) -> int:
    a = _parse(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    log = logging.getLogger("bench_quant")
    log.setLevel(logging.INFO)
    from edgec.passes.base import PassContext
    from edgec.passes.floor import FloorSpec
    from edgec.passes.quant.quant_pass import quantize
    from edgec.core.onnx_io import save_onnx
    from edgec.targets.ort_kernels import effective_precision
    from edgec.targets.ort_latency import OrtLatencyProbe

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    fp32, calib, val, evals, ref_outs, ref_val = _setup(a.calib, a.validate, a.eval)
    results: dict = {"models": {}, "setup": {"calib_samples": len(calib), "validate_samples": len(val),
                                              "eval_samples": len(evals), "threads": 1, "runs": a.runs,
                                              "data": calib.description, "validate_data": val.description,
                                              "eval_data": evals.description, "edgec_policy_min_top1": a.min_top1,
                                              "selection": "peer calibrator and edgec promotions chosen on validate; "
                                                           "figures on eval"}}
    with tempfile.TemporaryDirectory(prefix="edgec-bq-") as d:
        wd = Path(d)
        save_onnx(fp32, wd / "fp32.onnx")
        peers = {}
        for meth in a.methods.split(","):
            log.info("ORT quantize_static %s ...", meth)
            peers[f"ort_{meth.lower()}"] = _peer(str(wd / "fp32.onnx"), calib, meth, wd)
        fid = {n: _fidelity(m, ref_outs, evals) for n, m in peers.items()}
        fid_val = {n: _fidelity(m, ref_val, val) for n, m in peers.items()}
        pre_t = _time({"fp32": fp32, **peers}, max(a.runs // 4, 30))
        best = max(peers, key=lambda n: (fid_val[n]["top1_agreement"], -pre_t[n]["median_ms"]))
        peer_speedup = pre_t[best]["speedup_vs_fp32"]
        log.info("peer %s: top-1 %.3f at %.2fx", best, fid[best]["top1_agreement"], peer_speedup)
        # edgec: latency budget = margin x the peer's latency, from the probe's own FP32 measurement
        probe = OrtLatencyProbe(threads=1, cache_dir=a.cache, runs=30)
        ctx = PassContext(calib_batches=lambda: calib.iter_feeds(), reference_model=fp32, cache_dir=str(out),
                          target_probe=probe, validate_batches=lambda: val.iter_feeds(),
                          fidelity=FloorSpec(min_top1_agreement=a.min_top1, samples=len(val)))
        res = quantize(fp32, ctx, target_speedup=peer_speedup / a.margin, calib_samples=a.calib,
                       pareto_plot=str(out / "quant_pareto.png"))
        edgec = res.model
        allint8 = quantize(fp32, PassContext(calib_batches=lambda: calib.iter_feeds(), reference_model=fp32),
                           calib_samples=a.calib).model
        models = {"fp32": fp32, best: peers[best], "edgec_mixed": edgec, "edgec_all_int8": allint8}
        timing = _time(models, a.runs)
        for n, m in models.items():
            f = fid.get(n) or _fidelity(m, ref_outs, evals)
            eff = effective_precision(m) if n != "fp32" else {}
            fv = fid_val.get(n) or _fidelity(m, ref_val, val)
            results["models"][n] = {**timing[n], **f, "validate_top1_agreement": fv["top1_agreement"],
                                    "int8_layers_effective": sum(1 for e in eff.values() if e["effective"] == "int8"),
                                    "layers": len(eff)}
        for n in peers:
            if n != best:
                results["models"][n] = {"top1_agreement": fid[n]["top1_agreement"],
                                        "validate_top1_agreement": fid_val[n]["top1_agreement"],
                                        "speedup_vs_fp32_pretiming": pre_t[n]["speedup_vs_fp32"]}
        save_onnx(edgec, out / "edgec_mixed.onnx")
    _write_report(out, results, res.stats, best, (len(calib), len(val), len(evals)), t0)
    return 0 if results["verdict"]["edgec_latency_le_peer"] and results["verdict"]["edgec_agreement_gt_peer"] else 1


if __name__ == "__main__":
    sys.exit(main())
