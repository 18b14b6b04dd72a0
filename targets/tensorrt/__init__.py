"""TensorRT 10.x target: rule check on CPU, then (where tensorrt and a CUDA GPU exist) a strongly typed engine.

build(): runs the explicit-quantization rule checker (targets/tensorrt/rules.py) first and stops on the first
broken rule, naming the node; writes model.onnx, baseline.onnx (the original FP32 graph), rules.json and
trtexec.sh; then builds model.engine and the baseline engine (FP16 from baseline.onnx, same settings) with
targets/tensorrt/builder.py when this host has TensorRT 10.x and a GPU, else records in one log line that
the engine build is deferred (an engine is tied to its GPU and TensorRT version; see target `jetson`).
bench(): runs both engines (targets/tensorrt/runner.py run_engines): fidelity of each against the FP32
reference on the held-out split, then CUDA-event latency (median/p90/p99 over >= 200 runs after warm-up)
timed interleaved in one run, the speedup as the ratio of medians, device memory + engine bytes.
Without tensorrt or a GPU it returns {"skipped": reason}; nothing is estimated or simulated.

Options come from BuildContext.extra: dla_core (int), gpu_fallback (bool), workspace_mb (int),
builder_opt_level (0..5), typing ("auto" | "strong" | "weak-fp16"), shapes ({input: "1x3x224x224" or
"MIN,OPT,MAX"}), reference_samples (int, default 64), device (rule checker's device: "orin", "sm_89", ...;
default: any GPU).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import onnx

from edgec.passes.quant.dialect import TENSORRT
from edgec.core.errors import EdgecError
from edgec.core.onnx_io import atomic_write, graph_input_names, ort_session, run_session, save_onnx
from edgec.targets.base import BuildContext, Target

log = logging.getLogger(__name__)

NAME = "tensorrt"
DIALECT = TENSORRT
ENGINE = "model.engine"
BASELINE_ONNX = "baseline.onnx"
BASELINE_ENGINE = "baseline.engine"
TIMING_CACHE = "model.timing.cache"
DEFAULT_REFERENCE_SAMPLES = 64


def _opt(ctx: BuildContext, key: str, default=None):
    return (ctx.extra or {}).get(key, default)


def build_settings(ctx: BuildContext) -> dict:
    """Engine-build settings from ctx.extra, validated (bad values are the user's error)."""
    from edgec.targets.tensorrt import builder as B

    shapes = {}
    for name, spec in (_opt(ctx, "shapes") or {}).items():
        try:
            shapes[name] = B.parse_shape_arg(f"{name}={spec}")[1]
        except B.BuildError as e:
            raise EdgecError(str(e)) from None
    s = {"workspace_mb": int(_opt(ctx, "workspace_mb", B.DEFAULT_WORKSPACE_MB)),
         "opt_level": int(_opt(ctx, "builder_opt_level", 3)),
         "dla_core": _opt(ctx, "dla_core"), "gpu_fallback": bool(_opt(ctx, "gpu_fallback", True)),
         "typing": str(_opt(ctx, "typing", "auto")), "shapes": shapes}
    try:
        B.BuildOptions(onnx_path="model.onnx", engine_path=ENGINE, **s)
    except B.BuildError as e:
        raise EdgecError(f"tensorrt build option: {e}") from None
    return s


def shape_args(settings: dict) -> list[str]:
    """--shape arguments for build_engine.py (and the trtexec equivalents) from settings['shapes']."""
    out = []
    for name, (mn, opt, mx) in sorted(settings["shapes"].items()):
        fmt = lambda d: "x".join(str(x) for x in d)  # noqa: E731
        out.append(f"{name}={fmt(mn)}" if mn == opt == mx else f"{name}={fmt(mn)},{fmt(opt)},{fmt(mx)}")
    return out


def host_status() -> tuple[bool, str]:
    """(can build and run engines here, reason)."""
    from edgec.targets.tensorrt.runner import gpu_status

    return gpu_status()


def check_rules(model: onnx.ModelProto, outdir: Path | None = None, device: str | None = None) -> dict:
    """The rule checker, first: raises EdgecError naming the node on any broken rule; writes rules.json."""
    from edgec.targets.tensorrt.rules import check_graph

    rep = check_graph(model, device=device)
    log.info("TensorRT rule check: %d error(s), %d warning(s)", len(rep.errors), len(rep.warnings))
    for f in rep.warnings[:10]:
        log.warning("TensorRT rule warning: %s", f.line())
    rep.raise_for_errors()
    if outdir is not None:
        with atomic_write(Path(outdir) / "rules.json", "w") as f:
            json.dump(rep.as_dict(), f, indent=2, sort_keys=True)
            f.write("\n")
    return {"passed": rep.passed, "errors": len(rep.errors), "warnings": len(rep.warnings)}


def precheck(model: onnx.ModelProto) -> dict:
    """The rule checker on the imported model, before any pass runs (compile calls this first when present)."""
    return check_rules(model)


def engine_build(outdir: Path, settings: dict) -> dict:
    """Build outdir/model.engine from outdir/model.onnx, and outdir/baseline.engine from baseline.onnx when
    it is there (FP16, same settings); needs tensorrt + GPU. Returns the compiled engine's summary, with the
    baseline's under "baseline"."""
    from edgec.targets.tensorrt import builder as B

    opts = B.BuildOptions(onnx_path=str(outdir / "model.onnx"), engine_path=str(outdir / ENGINE),
                          timing_cache=str(outdir / TIMING_CACHE), **settings)
    try:
        summary = B.build_engine(opts)
        if (outdir / BASELINE_ONNX).exists():
            summary["baseline"] = B.build_engine(B.baseline_options(opts, str(outdir / BASELINE_ONNX),
                                                                    str(outdir / BASELINE_ENGINE)))
        return summary
    except B.BuildError as e:
        raise EdgecError(str(e)) from None


def write_baseline(outdir: Path, ctx: BuildContext) -> str | None:
    """baseline.onnx: the original FP32 graph (ctx.reference_model), the source of the FP16 baseline engine."""
    if ctx.reference_model is None:
        return None
    save_onnx(ctx.reference_model, Path(outdir) / BASELINE_ONNX)
    return BASELINE_ONNX


def build(model: onnx.ModelProto, outdir: Path, ctx: BuildContext) -> dict:
    outdir = Path(outdir)
    rules = check_rules(model, outdir, device=_opt(ctx, "device"))
    settings = build_settings(ctx)
    if not (outdir / "model.onnx").exists():
        save_onnx(model, outdir / "model.onnx")
    from edgec.targets.jetson.bundle import write_trtexec

    write_trtexec(outdir, settings, ctx, model=model)
    artifacts = ["model.onnx", "rules.json", "trtexec.sh"]
    base = write_baseline(outdir, ctx)
    artifacts += [base] if base else []
    ok, why = host_status()
    result = {"rules": rules, "settings": _jsonable_settings(settings), "host": why}
    if ok:
        summary = engine_build(outdir, settings)
        artifacts += [ENGINE, TIMING_CACHE, "model.build.json"]
        if "baseline" in summary:
            artifacts += [BASELINE_ENGINE, "baseline.build.json"]
        result.update(engine=summary, deferred=False)
    else:
        log.info("TensorRT engine build skipped on this host (%s); model.onnx and trtexec.sh are in %s", why, outdir)
        result.update(engine=None, deferred=True, deferred_reason=why)
    result["artifacts"] = artifacts
    return result


def _jsonable_settings(s: dict) -> dict:
    d = dict(s)
    d["shapes"] = shape_args(s)
    return d


# ----------------------------------------------------------------------------- reference + bench

def reference_samples(ctx: BuildContext, limit: int | None = None) -> tuple[list[dict], list[list[np.ndarray]], list[str]]:
    """(feeds, FP32 reference outputs, output names) on the held-out split, from ctx.reference_model in ORT."""
    n = min(int(limit or _opt(ctx, "reference_samples", DEFAULT_REFERENCE_SAMPLES)), len(ctx.eval_split))
    if n < 1:
        raise EdgecError("the held-out split is empty: no reference outputs for fidelity")
    ref = ctx.reference_model
    names_in = graph_input_names(ref)
    sess = ort_session(ref, threads=1, optimize=False)
    feeds, outs = [], []
    for f in ctx.eval_split.iter_feeds(n):
        f = {k: np.ascontiguousarray(f[k]) for k in names_in}
        feeds.append(f)
        outs.append(run_session(sess, f))
    return feeds, outs, [o.name for o in ref.graph.output]


def gpu_clocks() -> dict | None:
    """The host GPU's clocks and power state for the report (nvidia-smi), or None where nvidia-smi is absent."""
    import shutil
    import subprocess

    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    fields = "name,clocks.sm,clocks.mem,clocks.max.sm,clocks.max.mem,pstate,power.limit"
    try:
        out = subprocess.run([exe, f"--query-gpu={fields}", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=15).stdout.strip().splitlines()
    except (OSError, subprocess.TimeoutExpired) as e:
        return {"error": str(e)}
    return {"query": fields, "gpus": [[v.strip() for v in line.split(",")] for line in out]}


def bench(outdir: Path, ctx: BuildContext) -> dict:
    """Baseline (FP16 original) and compiled engine, interleaved in one run; fidelity of both."""
    outdir = Path(outdir)
    ok, why = host_status()
    if not ok:
        return {"skipped": f"TensorRT benchmark not run: {why}"}
    engine = outdir / ENGINE
    if not engine.exists():
        return {"skipped": f"no {ENGINE} in {outdir} (engine build deferred)"}
    from edgec.targets.tensorrt.runner import make_report, run_engines

    feeds, refs, names = reference_samples(ctx)
    labels = None
    if ctx.eval_split.labels is not None:
        labels = [np.asarray([ctx.eval_split.labels[i]]) for i in range(len(feeds))]
    engines = {"compiled": str(engine)}
    if (outdir / BASELINE_ENGINE).exists():
        engines = {"baseline_fp16": str(outdir / BASELINE_ENGINE), **engines}
    clocks_before = gpu_clocks()
    res = run_engines(engines, feeds, ref_outputs=refs, output_names=names, labels=labels,
                      warmup=max(ctx.warmup, 20), runs=max(ctx.runs, 200))
    clocks = {"before": clocks_before, "after": gpu_clocks()}
    comp = res["engines"]["compiled"]
    extra = {}
    if "baseline_fp16" in res["engines"]:
        b = res["engines"]["baseline_fp16"]
        extra = {"baseline": {"engine": BASELINE_ENGINE, "latency_ms": b["latency_ms"], "memory": b["memory"],
                              "fidelity": b["fidelity"]},
                 "speedup_vs_baseline_fp16": comp["latency_ms"]["speedup_vs_baseline_fp16"]}
    else:
        extra = {"baseline": {"skipped": f"no {BASELINE_ENGINE} in {outdir}"}}
    return make_report(model=ctx.model_name, target=NAME, latency_ms=comp["latency_ms"], memory=comp["memory"],
                       fidelity_result=comp["fidelity"],
                       environment={"device": res["device"], "host": why, "clocks": clocks},
                       comparable=False, comparable_reason="host GPU; clocks not locked or checked by edgec",
                       extra=extra)


TARGET = Target(name=NAME, dialect=DIALECT, build=build, bench=bench, precheck=precheck)
