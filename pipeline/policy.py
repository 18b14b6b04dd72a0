"""The compile-level fidelity policy and the preprocessing that travels with the model.

enforce_policy: the recipe's `fidelity:` policy holds for the compile as a whole, measured on the validate split
against the original. Each lossy pass already holds it; this is the last gate. When the recipe's result misses it,
the compile returns the output of the latest pass that meets it (the fastest model that does, down to the FP32
cleanup) and says so in one warning line. It never returns a model below the policy silently.

Preprocessing: the normalisation calibration assumed (x = (pixel * scale - mean) / std, layout, value range) is
written into the emitted model's metadata_props under PREPROCESS_KEY (JSON), into the report and the manifest; a
model that carries it is read back (compile / bench of a compiled model) and a --mean/--std that disagrees with it
is a one-line warning: a quantized model fed inputs normalised differently clips at its first layer.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import onnx

from edgec.calib.data import Preprocess, is_image_input
from edgec.passes.floor import OutputFloor

log = logging.getLogger(__name__)
PREPROCESS_KEY = "edgec.preprocess"


def _summary(meas: dict) -> str:
    parts = []
    if "top1_agreement" in meas:
        parts.append(f"top-1 agreement {meas['top1_agreement']:.3f}")
    if "accuracy_drop" in meas:
        parts.append(f"accuracy drop {meas['accuracy_drop']:.2f} pt")
    if meas.get("cosine"):
        o, c = min(meas["cosine"].items(), key=lambda kv: kv[1])
        parts.append(f"cosine({o}) {c:.4f}")
    return ", ".join(parts) or "no gated metric"


def enforce_policy(result, ctx, recipe) -> tuple[onnx.ModelProto, dict]:
    """(model to emit, the report's fidelity_policy record): the recipe's result if it meets the policy on the
    validate split, else the latest stage output that does (stages are tried from the last to the first); then
    the speed guard (prefer_faster) may return an earlier stage output that also meets it and runs faster."""
    spec = ctx.fidelity
    if spec is None or not spec.active:
        return result.model, {"policy": None, "note": "the recipe sets no fidelity policy"}
    floor = OutputFloor(ctx, spec, result.model)
    rec = {"policy": dict(recipe.fidelity), **floor.describe()} if floor.active else {"policy": dict(recipe.fidelity)}
    if not floor.active:
        rec = {**rec, "met": True, "note": "no output of this model is in the policy's scope"}
        return prefer_faster(result, ctx, result.model, rec, floor), rec
    names = [s.name for s in result.stages]
    models = list(result.models) or [result.model]
    tried = []
    for i in range(len(models) - 1, -1, -1):
        meas = floor.measure(models[i])
        ok = floor.ok(meas)
        stage = names[i] if i < len(names) else "recipe"
        tried.append({"stage": stage, "met": ok, **meas})
        if ok:
            break
    chosen = len(models) - len(tried)
    rec.update(met=tried[-1]["met"], measured=tried[0], returned=tried[-1]["stage"], tried=tried)
    if len(tried) > 1 or not tried[-1]["met"]:
        first = _summary(tried[0])
        if tried[-1]["met"]:
            note = (f"fidelity policy not met on the validate split by the recipe's result ({first}); returning the "
                    f"output of pass '{tried[-1]['stage']}', the fastest that meets it ({_summary(tried[-1])})")
        else:
            note = (f"fidelity policy not met on the validate split by any stage, not even '{tried[-1]['stage']}' "
                    f"({_summary(tried[-1])}); returning it")
        rec["note"] = note
        log.warning(note)
    known = {len(models) - 1 - k: t["met"] for k, t in enumerate(tried)}  # stage index -> measured verdict
    return prefer_faster(result, ctx, models[chosen], rec, floor, known), rec


def prefer_faster(result, ctx, model: onnx.ModelProto, rec: dict, floor: OutputFloor | None = None,
                  known: dict[int, bool] | None = None, *, margin: float = 0.03) -> onnx.ModelProto:
    """Speed is the objective: a compile never returns a model slower than a stage before it that also meets the
    policy (recipes with a `fidelity:` policy; one without returns what it asked for). The candidates are the chosen
    model, the output of the last exact stage (the FP32 cleanup: the original's function) and every lossy stage
    output in between; the target's probe times them interleaved (the same rounds, medians, cached by the models'
    bytes), and the fastest that meets the policy wins; within `margin` of it the recipe's result is preferred, then
    the exact stage. Measured without it: a quantized SqueezeNet 1.1 ran at 0.61x its FP32 original, a
    mixed-precision EfficientNet-B0 at 0.90x. Adds rec["speed_guard"]; without a probe (no device for the target
    here) the chosen model stays and the record says why. enforce_policy calls it with its `floor` and the verdicts
    it already measured (`known`: stage index -> met), so no stage is measured twice."""
    if ctx.fidelity is None or not ctx.fidelity.active:
        rec["speed_guard"] = {"checked": False,
                              "note": "the recipe sets no fidelity policy: it returns what it asked for"}
        return model
    probe = getattr(ctx, "target_probe", None)
    models, names = list(result.models), [s.name for s in result.stages]
    idx = next((i for i in range(len(models) - 1, -1, -1) if models[i] is model), None)
    if probe is None or idx is None or len(names) != len(models):
        rec["speed_guard"] = {"checked": False, "note": "no latency probe for this target here" if probe is None
                              else "the returned model is not a stage output"}
        return model
    last_exact = max((i for i in range(idx + 1) if result.stages[i].exact), default=None)
    cands = sorted({i for i in range(idx + 1) if not result.stages[i].exact or i == last_exact} | {idx})
    if len(cands) < 2:
        rec["speed_guard"] = {"checked": False, "note": "no earlier stage to compare with"}
        return model
    lat = dict(zip(cands, probe.compare_latency_ms([models[i] for i in cands])))
    floor = floor if floor is not None else OutputFloor(ctx, ctx.fidelity, model)
    memo: dict[int, bool] = dict(known or {})
    memo[idx] = True  # the model enforce_policy chose

    def meets(i: int) -> bool:
        if i not in memo:
            memo[i] = result.stages[i].exact or not floor.active or floor.ok(floor.measure(models[i]))
        return memo[i]

    best = next(i for i in sorted(cands, key=lambda i: (lat[i], -i)) if meets(i))
    near = [i for i in cands if lat[i] <= lat[best] * (1.0 + margin) and meets(i)]
    # within the margin of the fastest: the recipe's result, else the exact stage (the original's function), else it
    chosen = idx if idx in near else (last_exact if last_exact in near else best)
    guard = {"checked": True, "margin": margin, "latency_ms": {names[i]: round(lat[i], 4) for i in cands},
             "returned": names[chosen]}
    if chosen != idx:
        guard["note"] = (f"the output of '{names[idx]}' ran slower on the target ({lat[idx]:.3f} ms median) than "
                         f"that of '{names[chosen]}' ({lat[chosen]:.3f} ms), which also meets the policy; "
                         f"returning '{names[chosen]}'")
        log.warning(guard["note"])
        rec["returned"] = names[chosen]
    rec["speed_guard"] = guard
    return models[chosen]


def preprocess_record(pre: Preprocess, inputs, data_source: str | None = None) -> dict:
    """What calibration assumed about the input: mean, std, scale, layout and the resulting value range."""
    src = (data_source or "bundled").strip()
    image = len(inputs) == 1 and is_image_input(inputs[0], pre)
    if not image:
        return {"applies": False, "note": "model inputs are not a single image tensor; data fed as tensors"}
    mean, std = np.asarray(pre.mean, np.float64), np.asarray(pre.std, np.float64)
    lo, hi = (0.0 - mean) / std, (255.0 * pre.scale - mean) / std
    rec = {"applies": True, "input": inputs[0].name, "mean": [float(v) for v in pre.mean],
           "std": [float(v) for v in pre.std], "scale": float(pre.scale), "layout": pre.layout,
           "formula": "x = (pixel * scale - mean) / std, pixel in [0, 255], RGB",
           "value_range": [round(float(lo.min()), 6), round(float(hi.max()), 6)]}
    if src.endswith((".npy", ".npz")) or src == "synthetic":
        return {"applies": False, "note": f"data '{Path(src).name}' was given as tensors, already normalised by the "
                                          "user: edgec applied no normalisation"}
    return rec


def stamp_preprocess(model: onnx.ModelProto, record: dict) -> onnx.ModelProto:
    """Write the preprocessing record into model.metadata_props[PREPROCESS_KEY] (replacing an older one)."""
    if not record.get("applies"):
        return model
    keep = [p for p in model.metadata_props if p.key != PREPROCESS_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)
    model.metadata_props.add(key=PREPROCESS_KEY, value=json.dumps(record, sort_keys=True))
    return model


def read_preprocess(model: onnx.ModelProto) -> dict | None:
    for p in model.metadata_props:
        if p.key == PREPROCESS_KEY:
            try:
                return json.loads(p.value)
            except ValueError:
                return None
    return None


def reconcile_preprocess(model: onnx.ModelProto, pre: Preprocess, mean, std, layout) -> Preprocess:
    """A model carrying PREPROCESS_KEY: its normalisation is the default; --mean/--std that disagree keep the
    user's values with a one-line warning."""
    rec = read_preprocess(model)
    if not rec or not rec.get("applies"):
        return pre
    want = {"mean": tuple(rec["mean"]), "std": tuple(rec["std"])}
    given = {"mean": tuple(mean) if mean else None, "std": tuple(std) if std else None}
    bad = [k for k in ("mean", "std") if given[k] is not None and not np.allclose(given[k], want[k], atol=1e-6)]
    if bad:
        log.warning("--%s %s disagree(s) with the model's metadata (%s: mean %s, std %s): a quantized model fed "
                    "inputs normalised differently clips at its first layer", "/--".join(bad),
                    " ".join(",".join(f"{v:g}" for v in given[k]) for k in bad), PREPROCESS_KEY,
                    ",".join(f"{v:g}" for v in want["mean"]), ",".join(f"{v:g}" for v in want["std"]))
    try:
        return Preprocess(height=pre.height, width=pre.width, mean=given["mean"] or want["mean"],
                          std=given["std"] or want["std"], scale=float(rec.get("scale", pre.scale)),
                          layout=layout or rec.get("layout", pre.layout))
    except ValueError:
        return pre
