"""bench-prune (issue 3, "Done when" items 4 and 5): channel removal on EfficientNet-Lite0, one table, one run.

Rows: every criterion x allocation method, without and with least-squares recovery (and, with --recoveries
lstsq,distill, least squares followed by distillation toward FP32 on the unlabeled fit crops), and Torch-Pruning 1.6 L1 group
pruning (MagnitudePruner, GroupMagnitudeImportance(p=1), round_to=8, classifier ignored, ratio bisected to the same
MACs target), at 0.9 / 0.8 / 0.7 x MACs. No training data is used anywhere (recovery only).
Columns: achieved MACs ratio, top-1 / top-5 agreement and mean logit cosine vs FP32 on the held-out eval split, top-1
agreement on the validate split (val_t1; fit, validate and eval use disjoint photographs; the summary's best edgec
configuration per target is chosen on validate and reported on eval), and latency speedup = median(FP32) / median(pruned), timed interleaved in this process at
1 thread (ORT_ENABLE_ALL, >= 20 warm-ups, >= 200 runs).
Speed check (item 4): EfficientNet-Lite0 and ResNet-50 at 0.5 x MACs (round_to=8), speedup at 1 thread.

Usage: python bench/bench_prune.py [--quick] [--targets 0.9,0.8,0.7] [--criteria ...] [--allocations ...]
                                   [--calib 64] [--validate 64] [--eval 128] [--runs 200] [--no-speed] [--out out/bench_prune]
Writes out/bench_prune/{report.json, report.md}.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import onnx


log = logging.getLogger("bench_prune")


def _cleanup(m):
    from edgec.passes.base import PassContext, get_pass, make_options

    spec = get_pass("cleanup")
    return spec.fn(m, PassContext(calib_batches=lambda: iter([])), make_options(spec, {})).model


def _export(module, shape):
    from edgec.torchkit.export import export_torch

    m, _ = export_torch(module, shape)
    return _cleanup(m)


def _fidelity(model, ref_out, feeds):
    from edgec.core.onnx_io import ort_session

    s = ort_session(model, optimize=True)
    top1 = top5 = 0
    cos = 0.0
    for f, r in zip(feeds, ref_out):
        y = s.run(None, f)[0].ravel().astype(np.float64)
        top1 += int(y.argmax() == r.argmax())
        top5 += int(r.argmax() in np.argsort(-y)[:5])
        cos += float(y @ r / (np.linalg.norm(y) * np.linalg.norm(r) + 1e-30))
    n = max(len(feeds), 1)
    return {"top1": top1 / n, "top5": top5 / n, "cosine": cos / n}


def _latency(base, model, feed, runs):
    from edgec.targets.bench import latency_interleaved

    res = latency_interleaved({"fp32": base, "pruned": model}, feed, threads=1, warmup=20, runs=runs)
    return {"speedup": res["pruned"]["speedup_vs_fp32"], "fp32_ms": res["fp32"]["median_ms"],
            "pruned_ms": res["pruned"]["median_ms"]}


def _macs(m):
    from edgec.passes.prune.graph import CostModel

    return CostModel(m).base_macs


# ----------------------------------------------------------------------------- Torch-Pruning peer
def torch_pruning_l1(module_fn, shape, target, round_to=8):
    """Bisect Torch-Pruning's global ratio so that MACs <= target x original; returns the pruned nn.Module."""
    import torch
    import torch_pruning as tp

    ex = torch.randn(*shape)
    base = module_fn()
    m0, _ = tp.utils.count_ops_and_params(base, ex)

    def make(ratio):
        m = copy.deepcopy(base)
        last = [mod for mod in m.modules() if isinstance(mod, torch.nn.Linear)][-1:]
        pr = tp.pruner.MagnitudePruner(m, ex, importance=tp.importance.GroupMagnitudeImportance(p=1),
                                       pruning_ratio=ratio, ignored_layers=last, round_to=round_to)
        pr.step()
        macs, _ = tp.utils.count_ops_and_params(m, ex)
        return m, macs / m0

    lo, hi, best = 0.0, 0.95, None
    for _ in range(12):
        mid = 0.5 * (lo + hi)
        m, r = make(mid)
        if r <= target:
            best, hi = (m, r), mid
        else:
            lo = mid
        if best is not None and target - best[1] < 0.01:
            break
    if best is None:
        best = make(hi)
    return best[0].eval(), best[1]


def run(args):
    from edgec.calib.data import InputInfo, load_data
    from edgec.core.onnx_io import ort_session
    from edgec.passes.base import PassContext
    from edgec.passes.prune import prune_pass as P
    from edgec.pipeline.sources import resolve

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    src = resolve("efficientnet_lite0")
    base = _export(src.module, src.input_shape)
    splits = load_data(None, [InputInfo("input", src.input_shape)], src.preprocess, n_fit=args.calib,
                       n_validate=args.validate, n_eval=args.eval)
    calib, val, ev = splits.fit, splits.validate, splits.eval
    ctx = PassContext(calib_batches=lambda: calib.iter_feeds(), seed=0)
    feeds = list(ev.iter_feeds())
    val_feeds = list(val.iter_feeds())
    ref_sess = ort_session(base, optimize=True)
    ref_out = [ref_sess.run(None, f)[0].ravel().astype(np.float64) for f in feeds]
    ref_val = [ref_sess.run(None, f)[0].ravel().astype(np.float64) for f in val_feeds]

    def fid(m):  # eval (reported) and validate (what the summary selects on)
        v = _fidelity(m, ref_val, val_feeds)
        return {**_fidelity(m, ref_out, feeds), "val_top1": v["top1"], "val_cosine": v["cosine"]}
    lat_feed = feeds[0]
    model, _ = P.fold_small_constants(base)
    rows = []

    def emit(row):
        rows.append(row)
        print(_fmt_row(row), flush=True)
        (out / "report.json").write_text(json.dumps({"rows": rows}, indent=1))

    print(_header(), flush=True)
    bm = _edgec_sweep(args, model, ctx, fid, base, lat_feed, emit)
    _peer_rows(args, src, base, bm, fid, lat_feed, emit)
    return _finish(args, out, rows, t_start, len(val_feeds), len(feeds))


def _edgec_sweep(args, model, ctx, fid, base, lat_feed, emit):
    """Every criterion x allocation x target: allocation, removal, then least-squares recovery (one row each)."""
    from edgec.passes.prune import prune_pass as P
    from edgec.passes.prune.apply import remove_channels
    from edgec.passes.prune.graph import CostModel, analyze
    from edgec.passes.prune.groups import memo_by_identity

    with memo_by_identity():
        groups = analyze(model)
        gbid = {g.id: g for g in groups}
        cm = CostModel(model, groups)
        bm, bp = cm.base_macs, cm.base_params

        def cost(keep):
            a, b = cm.costs(keep)
            return a / bm, b / bp

        for crit in args.criteria:
            opts0 = P.PruneOptions(target_macs=0.8, criterion=crit, allocation="uniform", recovery="lstsq",
                                   calib_samples=args.calib, score_samples=min(32, args.calib))
            t0 = time.time()
            try:
                scores, notes, acts = P.score_groups(model, [g for g in groups if g.prunable and g.size >= 2], crit,
                                                     ctx, opts0)
            except Exception as e:  # e.g. onnx2torch missing for taylor
                for alloc in args.allocations:
                    for tgt in args.targets:
                        emit({"method": f"edgec {crit}/{alloc}", "target": tgt, "error": f"{type(e).__name__}: {e}"})
                continue
            t_score = time.time() - t0
            sens_cache: dict = {}
            for alloc in args.allocations:
                for tgt in args.targets:
                    opts = P.PruneOptions(target_macs=tgt, criterion=crit, allocation=alloc, recovery="lstsq",
                                          calib_samples=args.calib, score_samples=min(32, args.calib),
                                          ga_population=args.ga_population, ga_generations=args.ga_generations)
                    t1 = time.time()
                    try:
                        cands = P._candidates(groups, opts)
                        from edgec.passes.prune import allocate as A

                        budget = A.Budget("macs", tgt)
                        floor = cost({g.id: A.round_keep(0, g.size, opts.round_to, g.align) for g in cands})
                        if not budget.ok(floor):
                            cands = [g for g in groups if g.prunable and g.size >= 2]
                        probe = P.FidelityProbe(model, ctx, opts.fidelity_samples) if alloc in ("sensitivity", "ga") else None
                        a = P._allocate(model, cands, groups, gbid, scores, budget, cost, ctx, opts, probe,
                                       cache=sens_cache)
                        keep_idx = P._select(gbid, scores, a.keep)
                        pruned, _ = remove_channels(model, keep_idx, groups)
                        t_alloc = time.time() - t1
                        f0 = fid(pruned)
                        lat = _latency(base, pruned, lat_feed, args.runs)
                        macs = _macs(pruned) / bm
                        emit({"method": f"edgec {crit}/{alloc}", "recovery": "none", "target": tgt, "macs": macs,
                              **f0, **lat, "seconds": round(t_score + t_alloc, 1)})
                        t2 = time.time()
                        st: dict = {}
                        rec = P._recover(pruned, model, groups, gbid, keep_idx, acts, ctx, opts, st)
                        f1 = fid(rec)
                        t_ls = time.time() - t2
                        emit({"method": f"edgec {crit}/{alloc}", "recovery": "lstsq", "target": tgt, "macs": macs,
                              **f1, **lat, "seconds": round(t_score + t_alloc + t_ls, 1)})
                        if "distill" in args.recoveries:
                            t3 = time.time()
                            dopts = dataclasses.replace(opts, recovery="distill",
                                                        distill_steps=args.distill_steps)
                            dis = P._distill(rec, model, ctx, dopts, st)
                            emit({"method": f"edgec {crit}/{alloc}", "recovery": "distill", "target": tgt,
                                  "macs": macs, **fid(dis), **lat,
                                  "seconds": round(t_score + t_alloc + t_ls + time.time() - t3, 1)})
                    except Exception as e:
                        log.exception("edgec %s/%s at %s failed", crit, alloc, tgt)
                        emit({"method": f"edgec {crit}/{alloc}", "target": tgt, "error": f"{type(e).__name__}: {e}"})
    return bm


def _peer_rows(args, src, base, bm, fid, lat_feed, emit):
    """Torch-Pruning L1 at each target (no recovery); MACs relative to the same base count as edgec's rows."""
    from edgec.pipeline.sources import efficientnet_lite0

    for tgt in args.targets:
        try:
            t0 = time.time()
            mod, r = torch_pruning_l1(efficientnet_lite0, src.input_shape, tgt)
            pm = _export(mod, src.input_shape)
            f = fid(pm)
            lat = _latency(base, pm, lat_feed, args.runs)
            emit({"method": "torch-pruning L1", "recovery": "none", "target": tgt, "macs": _macs(pm) / bm, **f, **lat,
                  "seconds": round(time.time() - t0, 1)})
        except Exception as e:
            log.exception("torch-pruning at %s failed", tgt)
            emit({"method": "torch-pruning L1", "target": tgt, "error": f"{type(e).__name__}: {e}"})


def _finish(args, out, rows, t_start, n_val, n_eval):
    """The 0.5x speed check, the validate-selected summary, report.json and report.md."""
    speed = speed_check(args) if args.speed else {}
    summary = _summary(rows, args.targets)
    report = {"rows": rows, "best_vs_peer": summary, "speed_0.5x": speed, "seconds": round(time.time() - t_start, 1),
              "calib": args.calib, "validate": args.validate, "eval": args.eval, "runs": args.runs,
              "selection": "best edgec configuration per target chosen by top-1 agreement on validate; eval reported"}
    (out / "report.json").write_text(json.dumps(report, indent=1))
    md = [_header()] + [_fmt_row(r) for r in rows] + [
        "", f"best edgec (selected on validate, {n_val} samples) vs Torch-Pruning L1, top-1 agreement on eval "
            f"({n_eval} held-out samples):"]
    for tgt, s in summary.items():
        md.append(f"  {tgt}: edgec {s['edgec_top1']:.3f} (validate {s['edgec_val_top1']:.3f}; {s['edgec_method']}) vs "
                  f"peer {s['peer_top1']:.3f} -> {'BEATS' if s['beats'] else 'does not beat'}")
    for k, v in speed.items():
        md.append(f"speed 0.5x MACs {k}: macs {v.get('macs', float('nan')):.3f}  speedup {v.get('speedup', float('nan')):.2f}x "
                  f"({v.get('fp32_ms', float('nan')):.2f} -> {v.get('pruned_ms', float('nan')):.2f} ms)  {v.get('error', '')}")
    (out / "report.md").write_text("\n".join(md) + "\n")
    print("\n".join(md[len(rows) + 1:]), flush=True)
    return report


def _summary(rows, targets):
    out = {}
    for tgt in targets:
        ours = [r for r in rows if r.get("target") == tgt and r["method"].startswith("edgec") and "top1" in r]
        peer = [r for r in rows if r.get("target") == tgt and r["method"].startswith("torch") and "top1" in r]
        if not ours:
            continue
        b = max(ours, key=lambda r: (r["val_top1"], r["val_cosine"]))  # select on validate, report eval
        p = peer[0] if peer else {"top1": float("nan"), "cosine": float("nan")}
        out[str(tgt)] = {"edgec_top1": b["top1"], "edgec_cosine": b["cosine"], "edgec_val_top1": b["val_top1"],
                         "edgec_method": f"{b['method']}+{b['recovery']}", "peer_top1": p["top1"],
                         "peer_cosine": p["cosine"], "beats": bool(peer) and b["top1"] > p["top1"]}
    return out


def speed_check(args):
    """EfficientNet-Lite0 and ResNet-50 at 0.5 x MACs, criterion l1, uniform, round_to 8; 1-thread speedup."""
    import torchvision

    from edgec.calib.data import InputInfo, load_splits
    from edgec.passes.base import PassContext, get_pass, make_options
    from edgec.pipeline.sources import efficientnet_lite0

    res = {}
    for name, fn in (("efficientnet_lite0", efficientnet_lite0),
                     ("resnet50", lambda: torchvision.models.resnet50(weights=None).eval())):
        try:
            base = _export(fn(), (1, 3, 224, 224))
            calib, _ = load_splits(None, [InputInfo("input", (1, 3, 224, 224))],
                                   __import__("edgec.calib.data", fromlist=["Preprocess"]).Preprocess(), n_calib=8, n_eval=1)
            ctx = PassContext(calib_batches=lambda: calib.iter_feeds())
            spec = get_pass("prune")
            r = spec.fn(base, ctx, make_options(spec, {"target_macs": 0.5, "criterion": "l1", "allocation": "uniform",
                                                       "recovery": "none", "round_to": 8}))
            feed = next(calib.iter_feeds())
            lat = _latency(base, r.model, feed, args.runs)
            res[name] = {"macs": r.stats["macs_ratio"], **lat, "meets_1.6x": lat["speedup"] >= 1.6}
        except Exception as e:
            log.exception("speed check %s failed", name)
            res[name] = {"error": f"{type(e).__name__}: {e}"}
        print(f"speed {name}: {res[name]}", flush=True)
    return res


def _header():
    return (f"{'method':34s} {'recovery':8s} {'target':>6s} {'macs':>6s} {'top1':>6s} {'top5':>6s} {'cosine':>7s} "
            f"{'val_t1':>6s} {'speedup':>7s} {'sec':>6s}")


def _fmt_row(r):
    if "error" in r:
        return f"{r['method']:34s} {'-':8s} {r['target']:6.2f} ERROR {r['error'][:80]}"
    return (f"{r['method']:34s} {r['recovery']:8s} {r['target']:6.2f} {r['macs']:6.3f} {r['top1']:6.3f} {r['top5']:6.3f} "
            f"{r['cosine']:7.4f} {r.get('val_top1', float('nan')):6.3f} {r['speedup']:7.2f} {r['seconds']:6.1f}")


def main(argv=None):
    from edgec.passes.prune.allocate import ALLOCATIONS
    from edgec.passes.prune.criteria import CRITERIA

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="3 criteria x 2 allocations at 0.8 x MACs, 100-sample eval")
    ap.add_argument("--targets", default="0.9,0.8,0.7")
    ap.add_argument("--criteria", default=",".join(CRITERIA))
    ap.add_argument("--allocations", default=",".join(ALLOCATIONS))
    ap.add_argument("--calib", type=int, default=64)
    ap.add_argument("--validate", type=int, default=64, help="validate split: the summary selects on it")
    ap.add_argument("--eval", type=int, default=128, help="eval split: held out, reported")
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--ga-population", type=int, default=8)
    ap.add_argument("--ga-generations", type=int, default=4)
    ap.add_argument("--recoveries", default="lstsq", help="lstsq (always) and optionally distill: lstsq,distill")
    ap.add_argument("--distill-steps", type=int, default=150, help="distillation steps per point (batch 8)")
    ap.add_argument("--no-speed", dest="speed", action="store_false")
    ap.add_argument("--out", default="out/bench_prune")
    args = ap.parse_args(argv)
    if args.quick:
        args.targets, args.criteria, args.allocations = "0.8", "l1,actnorm,recon", "uniform,sensitivity"
        args.eval = min(args.eval, 100)
    args.targets = [float(t) for t in str(args.targets).split(",")]
    args.criteria = [c for c in str(args.criteria).split(",") if c]
    args.allocations = [a for a in str(args.allocations).split(",") if a]
    args.recoveries = [r for r in str(args.recoveries).split(",") if r]
    bad = [c for c in args.criteria if c not in CRITERIA] + [a for a in args.allocations if a not in ALLOCATIONS]
    if bad:
        ap.error(f"unknown criteria/allocations: {bad}")
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    run(args)


if __name__ == "__main__":
    main()
