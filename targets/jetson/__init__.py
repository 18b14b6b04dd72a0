"""Jetson target: a deploy bundle that builds and benchmarks the TensorRT engine on the device.

A TensorRT engine is tied to its GPU architecture and TensorRT version, so the honest artifact for a Jetson
is the compiled ONNX graph (TensorRT dialect) plus everything needed to build and measure it in place:
build_engine.py, bench.py, trtexec.sh, reference_outputs.npz, manifest.json, a README and baseline.onnx
(the original graph, from which the device builds the FP16 baseline engine that bench.py times against the
compiled one in the same run; see targets/jetson/bundle.py). The TensorRT rule checker runs first, judging
precisions for the Jetson Orin GPU (SM 8.7: no FP8; ctx.extra["device"] overrides), and stops the build
naming the node.
When this host has TensorRT 10.x and a CUDA GPU, the engine is built and benchmarked right away (numbers
marked not comparable to a clock-locked Jetson); otherwise one log line says the engine build is deferred
to the device and where the bundle is.

Reference outputs: the FP32 original (ctx.reference_model) in ONNX Runtime, graph optimizations off, on the
first `reference_samples` (default 64) held-out inputs; the inputs are stored too, so the device measures
fidelity (top-1 agreement, cosine) against exactly what the host computed.
"""
from __future__ import annotations

import logging
from pathlib import Path

import onnx

import edgec.targets.tensorrt as trt_target
from edgec.passes.quant.dialect import TENSORRT
from edgec.core.onnx_io import save_onnx
from edgec.targets.base import BuildContext, Target
from edgec.targets.jetson import bundle as B

log = logging.getLogger(__name__)

NAME = "jetson"
DEVICE = "orin"
DIALECT = TENSORRT


def _edgec_version() -> str:
    try:
        from edgec.core.provenance import EDGEC_VERSION

        return EDGEC_VERSION
    except ImportError:
        return "unknown"


def precheck(model: onnx.ModelProto) -> dict:
    """The rule checker on the imported model, before any pass runs, judged for Orin."""
    return trt_target.check_rules(model, device=DEVICE)


def final_dir(outdir: Path, ctx: BuildContext) -> Path:
    """Where the bundle ends up: ctx.extra['out'], else the staged directory's final name (see staged_dir)."""
    if (ctx.extra or {}).get("out"):
        return Path(ctx.extra["out"])
    name = outdir.name
    if name.startswith(".") and ".partial-" in name:
        return outdir.parent / name[1:].split(".partial-")[0]
    return outdir


def build(model: onnx.ModelProto, outdir: Path, ctx: BuildContext) -> dict:
    outdir = Path(outdir)
    rules = trt_target.check_rules(model, outdir, device=(ctx.extra or {}).get("device", DEVICE))  # first
    settings = trt_target.build_settings(ctx)
    if not (outdir / "model.onnx").exists():
        save_onnx(model, outdir / "model.onnx")
    quantized = B.is_quantized(model)
    files = ["model.onnx", "rules.json"]
    files += B.write_scripts(outdir)
    files.append(B.write_trtexec(outdir, settings, ctx, quantized=quantized, model=model))
    base = trt_target.write_baseline(outdir, ctx)
    files += [base] if base else []

    feeds, outs, names = trt_target.reference_samples(ctx)
    labels = None
    if getattr(ctx.eval_split, "labels", None) is not None:
        labels = [int(ctx.eval_split.labels[i]) for i in range(len(feeds))]
    B.write_npz(outdir / "reference_outputs.npz",
                B.reference_arrays(feeds, outs, names, labels, getattr(ctx.eval_split, "description", "")))
    files.append("reference_outputs.npz")
    files.append(B.write_readme(outdir, ctx, settings, samples=len(feeds), quantized=quantized,
                                edgec_version=_edgec_version()))

    fields = B.manifest_fields(ctx, settings, samples=len(feeds), quantized=quantized, rules=rules)
    base = {"edgec_version": _edgec_version(), "model": ctx.model_name, "target": NAME,
            "recipe": ctx.recipe.to_dict() if hasattr(ctx.recipe, "to_dict") else ctx.recipe, "seed": ctx.seed, **fields}

    result = {"rules": rules, "settings": trt_target._jsonable_settings(settings), "quantized": quantized,
              "reference_samples": len(feeds), "manifest": fields}
    ok, why = trt_target.host_status()
    if ok:
        result["engine"] = trt_target.engine_build(outdir, settings)
        result["deferred"] = False
        files += [trt_target.ENGINE, trt_target.TIMING_CACHE, "model.build.json"]
        if "baseline" in result["engine"]:
            files += [trt_target.BASELINE_ENGINE, "baseline.build.json"]
    else:
        result.update(engine=None, deferred=True, deferred_reason=why)
        log.warning("engine build deferred to the device (%s here); bundle: %s", why, final_dir(outdir, ctx))
    B.write_manifest(outdir, base)
    files.append("manifest.json")
    result["artifacts"] = files
    return result


def bench(outdir: Path, ctx: BuildContext) -> dict:
    """On a host with TensorRT and a GPU: the engine's latency/memory/fidelity (not comparable to a Jetson)."""
    res = trt_target.bench(outdir, ctx)
    if "skipped" in res:
        res["skipped"] += "; run bench.py on the Jetson (see README.md in the bundle)"
    else:
        res["target"] = NAME
        res["comparable_reason"] = "measured on the build host, not on a clock-locked Jetson"
    return res


TARGET = Target(name=NAME, dialect=DIALECT, build=build, bench=bench, precheck=precheck)
