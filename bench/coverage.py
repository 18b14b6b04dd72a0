"""Coverage benchmark for structured channel removal (issue 3, "Done when" item 2).

For each torchvision model: export (torchkit.export.export_torch), cleanup pass, analyze dependency groups,
choose one uniform ratio r for every prunable group by bisection on the analytic CostModel so that
MACs(pruned) / MACs(original) ~= 0.7 (kept = (1 - r) * size rounded to a multiple of 8 where the group is big
enough, never 0), keep the channels with the largest L1 norm of their producer weights, remove them, then check:
ONNX checker + strict shape inference, an ORT run with the original output shape, and |achieved - 0.7| <= 0.05
with achieved counted by passes.costs.count_costs on the pruned graph.

Usage: python bench/coverage.py [--target 0.7] [--models a,b,...]
"""
from __future__ import annotations

import argparse
import sys
import time
import traceback
from pathlib import Path

import numpy as np


MODELS = ["resnet18", "resnet50", "resnext50_32x4d", "wide_resnet50_2", "vgg16_bn", "mobilenet_v2",
          "mobilenet_v3_small", "mobilenet_v3_large", "efficientnet_b0", "regnet_x_400mf", "regnet_y_400mf",
          "shufflenet_v2_x1_0", "mnasnet1_0", "squeezenet1_1", "densenet121", "googlenet", "convnext_tiny"]
TOL = 0.05


def export_clean(name: str):
    import torch
    import torchvision

    from edgec.passes.base import PassContext
    from edgec.passes.cleanup import CleanupOptions, cleanup
    from edgec.torchkit.export import export_torch

    torch.manual_seed(0)
    kw = {"aux_logits": False, "init_weights": True} if name == "googlenet" else {}
    module = getattr(torchvision.models, name)(weights=None, **kw).eval()
    model, _ = export_torch(module, (1, 3, 224, 224))
    ctx = PassContext(calib_batches=lambda: iter([]))
    return cleanup(model, ctx, CleanupOptions()).model


def uniform_keep(groups, ratio: float, round_to: int = 8) -> dict[int, int]:
    from edgec.passes.prune.graph import round_keep

    return {g.id: round_keep(g, g.size * (1.0 - ratio), round_to) for g in groups if g.prunable}


def fit_ratio(cm, groups, target: float, round_to: int = 8) -> tuple[float, dict[int, int]]:
    """Bisection on the uniform ratio so that CostModel MACs / base MACs is closest to target."""
    lo, hi = 0.0, 0.97
    best = (float("inf"), 0.0, {})
    for _ in range(40):
        mid = (lo + hi) / 2
        keep = uniform_keep(groups, mid, round_to)
        frac = cm.costs(keep)[0] / cm.base_macs
        if abs(frac - target) < best[0]:
            best = (abs(frac - target), mid, keep)
        if frac > target:
            lo = mid
        else:
            hi = mid
    return best[1], best[2]


def l1_keep(model, groups, counts: dict[int, int]) -> dict[int, np.ndarray]:
    from edgec.passes.prune.graph import producer_weights, select_channels

    keep = {}
    for g in groups:
        if g.id not in counts or counts[g.id] >= g.size:
            continue
        ws = producer_weights(model, g)
        score = sum(np.abs(w).sum(1) for w in ws) if ws else np.zeros(g.size)
        keep[g.id] = select_channels(g, score, counts[g.id])
    return keep


def run_one(name: str, target: float) -> dict:
    from edgec.passes.costs import count_costs
    from edgec.passes.prune.apply import remove_channels
    from edgec.passes.prune.graph import CostModel, analyze
    from edgec.core.onnx_io import check_model, ort_session, run_session

    t0 = time.time()
    row = {"model": name, "ok": False, "ratio": float("nan"), "pruned": 0, "prunable": 0, "groups": 0,
           "shape_ok": False, "reason": ""}
    model = export_clean(name)
    groups = analyze(model)
    row["groups"] = len(groups)
    row["prunable"] = sum(g.prunable for g in groups)
    cm = CostModel(model, groups)
    _, counts = fit_ratio(cm, groups, target)
    keep = l1_keep(model, groups, counts)
    pruned, stats = remove_channels(model, keep, groups)
    row["pruned"] = stats["groups_pruned"]
    check_model(pruned)
    x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
    ref_shape = run_session(ort_session(model), {"input": x})[0].shape
    y = run_session(ort_session(pruned), {"input": x})[0]
    row["shape_ok"] = y.shape == ref_shape and bool(np.isfinite(y).all())
    real = count_costs(pruned)
    row["ratio"] = real.macs / cm.base_macs
    est = cm.costs({k: len(v) for k, v in keep.items()})[0]
    row["cost_model_err"] = abs(est - real.macs) / max(real.macs, 1)
    reasons = []
    if not row["shape_ok"]:
        reasons.append(f"output shape {y.shape} != {ref_shape}")
    if abs(row["ratio"] - target) > TOL:
        reasons.append(f"MACs ratio {row['ratio']:.3f} outside {target}±{TOL}")
    if row["cost_model_err"] > 0.01:
        reasons.append(f"CostModel off by {row['cost_model_err']:.1%}")
    row["ok"] = not reasons
    row["reason"] = "; ".join(reasons)
    row["seconds"] = time.time() - t0
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", type=float, default=0.7)
    ap.add_argument("--models", default=",".join(MODELS))
    a = ap.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    rows = []
    hdr = f"{'model':<20} {'result':<6} {'MACs ratio':>10} {'groups pruned/total':>20} {'shape':>6} {'sec':>6}  reason"
    print(hdr)
    print("-" * len(hdr))
    for name in [m for m in a.models.split(",") if m]:
        try:
            row = run_one(name, a.target)
        except Exception as e:  # a failure is reported, never hidden
            row = {"model": name, "ok": False, "ratio": float("nan"), "pruned": 0, "groups": 0, "prunable": 0,
                   "shape_ok": False, "seconds": 0.0,
                   "reason": f"{type(e).__name__}: {str(e).strip().splitlines()[0][:160] if str(e).strip() else ''}"}
            traceback.print_exc(file=sys.stderr)
        rows.append(row)
        print(f"{row['model']:<20} {'PASS' if row['ok'] else 'FAIL':<6} {row['ratio']:>10.3f} "
              f"{str(row['pruned']) + '/' + str(row['groups']):>20} {'ok' if row['shape_ok'] else 'BAD':>6} "
              f"{row.get('seconds', 0):>6.1f}  {row['reason']}", flush=True)
    n_ok = sum(r["ok"] for r in rows)
    print(f"\n{n_ok}/{len(rows)} models pass (target {a.target}x MACs, tolerance ±{TOL})")
    return 0 if n_ok >= len(rows) - 1 else 1


if __name__ == "__main__":
    sys.exit(main())
