"""The public compile API: source -> ONNX -> recipe passes (verified) -> target build -> bench -> report.

Everything is written into a temporary directory beside `out` and renamed into place only when complete,
so a failed run never leaves something that looks like a finished artifact (and a previous artifact survives).
"""
from __future__ import annotations

import hashlib
import logging
import os
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from edgec.calib.inputs import parse_input_values
from edgec.calib.data import InputInfo, Preprocess, load_data
from edgec.passes.base import PassContext
from edgec.passes.costs import count_costs
from edgec.pipeline import report as rep
from edgec.core.errors import EdgecError
from edgec.core.executor import make_executor
from edgec.core.fidelity import Comparator
from edgec.pipeline.guards import MemoryGuard, check_activation_budget, check_finite_state_dict, parse_memory
from edgec.pipeline.importer import load_onnx_file
from edgec.pipeline.input_shapes import finish_dynamic, fix_input_shapes, parse_shapes, plan_input_shapes
from edgec.core.onnx_io import graph_input_names, model_bytes, np_dtype, ort_session, save_onnx, staged_dir
from edgec.pipeline.policy import enforce_policy, preprocess_record, reconcile_preprocess, stamp_preprocess
from edgec.pipeline.recipe import load_recipe
from edgec.pipeline.cluster import make_compile_probe
from edgec.pipeline.runner import run_recipe, verify
from edgec.pipeline.sources import OnnxSource, TorchSource, resolve
from edgec.targets.base import BuildContext, Target, get_target

log = logging.getLogger(__name__)


@dataclass
class CompileOptions:
    model: str = "efficientnet_lite0"
    target: str = "ort"
    recipe: str = "default"
    out: str | None = None
    overrides: list[str] = field(default_factory=list)
    input_shapes: list[str] = field(default_factory=list)
    input_values: list[str] = field(default_factory=list)  # --input-value sr=16000: constants for fixed inputs
    weights: str | None = None
    data: str | None = None
    calib_samples: int = 64     # fit split
    validate_samples: int = 128  # validate split: fidelity decisions
    eval_samples: int = 256     # eval split: the report
    threads: tuple[int, ...] = (1, 2)
    compile_threads: int | None = None  # ORT/BLAS threads for the compile's own evaluations; None: auto (see below)
    seed: int = 0
    bench: bool = True
    memory: bool = True
    warmup: int = 20
    runs: int = 200
    opt_level: str = "all"
    dynamic_batch: bool = False
    dynamic: str | None = None  # --dynamic batch,height,width: keep these ONNX input axes dynamic in model.onnx
    max_memory: str | None = None  # --max-memory 8G
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    layout: str | None = None
    cache_dir: str | None = None
    target_opts: dict = field(default_factory=dict)
    cluster: str | None = None  # --cluster: where candidate evaluations run (core.executor); None: $EDGEC_CLUSTER, else here
    probe_device: str | None = None  # --probe-device: measure the target's costs on the cluster node with this resource
    command: str = ""

    def __post_init__(self):
        if not self.threads or any(t < 1 for t in self.threads):
            raise EdgecError("--threads must list positive integers, e.g. 1,2")
        if self.compile_threads is not None and self.compile_threads < 1:
            raise EdgecError("--compile-threads must be a positive integer")
        if self.warmup < 20 or self.runs < 200:
            raise EdgecError("benchmarks need at least 20 warm-up and 200 timed runs")
        if self.calib_samples < 1 or self.eval_samples < 1 or self.validate_samples < 1:
            raise EdgecError("--calib-samples, --validate-samples and --eval-samples must be >= 1")


def default_out(opts: CompileOptions, model_name: str) -> Path:
    rname = Path(opts.recipe).stem if opts.recipe.endswith((".yaml", ".yml")) else (opts.recipe if opts.recipe.isidentifier() else "inline")
    return Path("out") / f"{model_name}-{opts.target}-{rname}"


def _inputs(model: onnx.ModelProto, concrete: dict | None = None) -> list[InputInfo]:
    names = set(graph_input_names(model))
    out = []
    for i in model.graph.input:
        if i.name in names:
            t = i.type.tensor_type
            shape = (concrete or {}).get(i.name) or tuple(d.dim_value for d in t.shape.dim)
            out.append(InputInfo(i.name, tuple(shape), np_dtype(t.elem_type)))
    return out


def _progress(msg: str) -> None:
    log.info(msg)


def load_source(opts: CompileOptions):
    """Resolve --model into (name, onnx model, torch module or None, preprocess, description, export info)."""
    shapes = parse_shapes(opts.input_shapes)
    pre_kw = {}
    src = resolve(opts.model, weights=opts.weights, seed=opts.seed, input_shape=next(iter(shapes.values()), None) if shapes and isinstance(opts.model, str) and not opts.model.endswith(".onnx") else None)
    pre = src.preprocess
    if opts.mean or opts.std or opts.layout:
        pre_kw = dict(height=pre.height, width=pre.width, mean=tuple(opts.mean or pre.mean), std=tuple(opts.std or pre.std),
                      scale=pre.scale, layout=opts.layout or pre.layout)
        try:
            pre = Preprocess(**pre_kw)
        except ValueError as e:
            raise EdgecError(f"bad preprocessing: {e}") from None
    if isinstance(src, TorchSource):
        from edgec.torchkit.export import export_torch

        if opts.dynamic:
            raise EdgecError("--dynamic applies to ONNX models; for torch models use --dynamic-batch")

        check_finite_state_dict(src.module.state_dict(), src.name)
        _progress(f"exporting {src.name} to ONNX")
        model, info = export_torch(src.module, src.input_shape, dynamic_batch=opts.dynamic_batch, seed=opts.seed)
        if opts.dynamic_batch:
            model = fix_input_shapes(model, {"input": src.input_shape})
        digest = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in src.module.state_dict().values()
                                         if hasattr(p, "numpy"))).hexdigest()
        return src.name, model, src.module, pre, src.description, {"export": info, "input_sha256": digest}
    assert isinstance(src, OnnxSource)
    model = load_onnx_file(src.path, max_bytes=parse_memory(opts.max_memory))
    pre = reconcile_preprocess(model, pre, opts.mean, opts.std, opts.layout)  # a compiled model says how it was fed
    original = onnx.ModelProto()
    original.CopyFrom(model)
    model, concrete, axes = plan_input_shapes(model, shapes, opts.dynamic, layout=opts.layout or pre.layout)
    return src.name, model, None, pre, src.description, {"input_sha256": rep.sha256_file(src.path),
                                                          "_shape_plan": (original, concrete, axes)}


def compile_model(opts: CompileOptions) -> dict:
    with MemoryGuard(parse_memory(opts.max_memory)):
        return _compile_model(opts)


def _compile_model(opts: CompileOptions) -> dict:
    t_start = time.perf_counter()
    target = get_target(opts.target)
    recipe = load_recipe(opts.recipe, opts.overrides)  # validate before any heavy work
    name, model, torch_module, pre, desc, src_info = load_source(opts)
    if target.precheck is not None:  # e.g. TensorRT's rule checker: fail before any pass runs
        target.precheck(model)
    out = Path(opts.out) if opts.out else default_out(opts, name)
    original, concrete, axes = src_info.pop("_shape_plan", (None, None, {}))
    check_activation_budget(model, parse_memory(opts.max_memory))  # refuse absurd input shapes before running
    inputs = _inputs(model, concrete)
    if not inputs:
        raise EdgecError("the model has no graph inputs")
    splits = load_data(opts.data, inputs, pre, n_fit=opts.calib_samples, n_validate=opts.validate_samples,
                       n_eval=opts.eval_samples, seed=opts.seed, values=parse_input_values(opts.input_values))
    calib, evals = splits.fit, splits.eval
    # The original graph must itself be valid and runnable.
    verify(model, [calib.feeds(0)], stage="import", ran=())
    reference = onnx.ModelProto()
    reference.CopyFrom(model)
    ctx, tprobe, cthreads = _run_context(opts, recipe, splits, reference, torch_module, target, concrete)
    _progress(f"running recipe '{recipe.name}': {' -> '.join(s.name for s in recipe.steps) or '(no passes)'}")
    try:
        result = run_recipe(model, recipe, ctx)
        # the policy, then the speed guard: never slower than an earlier stage that meets it (pipeline/policy.py)
        final, policy = enforce_policy(result, ctx, recipe)
    finally:
        if tprobe is not None:
            tprobe.close()  # a remote probe frees its device as soon as the passes are done
    pre_rec = preprocess_record(pre, inputs, opts.data)
    final = stamp_preprocess(final, pre_rec)
    dynamic = None
    if axes:
        _progress("restoring dynamic axes and verifying the compiled model at two input shapes")
        final, dynamic = finish_dynamic(final, original, axes, concrete, seed=opts.seed)
    bctx = BuildContext(model_name=name, recipe=recipe, reference_model=reference, eval_split=evals, calib_split=calib,
                        threads=tuple(opts.threads), seed=opts.seed, warmup=opts.warmup, runs=opts.runs, opt_level=opts.opt_level,
                        extra={"out": str(out), **opts.target_opts})
    with staged_dir(out) as tmp:
        final_bytes = save_onnx(final, tmp / "model.onnx")
        _collect_plots(result.stages, tmp)
        ref_bytes = len(model_bytes(reference))
        build = target.build(final, tmp, bctx)
        _progress("measuring fidelity on the fit, validate and held-out eval splits")
        by_split = {k: measure_fidelity(tmp / "model.onnx", reference, d, opt_level=opts.opt_level,
                                        threads=cthreads) for k, d in splits.items()}
        bench = run_bench(target, tmp, reference, bctx, opts) if opts.bench else {"skipped": "benchmark disabled (--no-bench)"}
        report = {
            "schema_version": rep.SCHEMA_VERSION,
            "versions": rep.tool_versions(),
            "model": {"name": name, "source": desc, "spec": opts.model,
                      "inputs": {i.name: list(i.shape) for i in inputs},
                      "outputs": [o.name for o in final.graph.output], **src_info},
            "target": opts.target,
            "recipe": {**recipe.to_dict(), "yaml": recipe.to_yaml()},
            "seed": opts.seed,
            "compile_threads": cthreads,
            "data": data_record(splits),
            "preprocess": pre_rec,
            "fidelity_policy": policy,
            "fidelity_splits": {k: {"samples": len(d), "summary": by_split[k]["summary"]} for k, d in splits.items()},
            "passes": [s.as_dict() for s in result.stages],
            # at the compile shape: symbolic (--dynamic) input dims take their compile-time values
            "costs": {"original": {**count_costs(reference, concrete).as_dict(), "model_bytes": ref_bytes},
                      "final": {**count_costs(final, concrete).as_dict(), "model_bytes": final_bytes}},
            "bench": bench,
            "fidelity": by_split["eval"],
            "target_build": {k: v for k, v in build.items() if k != "artifacts"},
            "artifacts": sorted(set(build.get("artifacts", [])) | {"model.onnx", "report.json", "report.md", "manifest.json"}),
            "command": opts.command or "edgec compile",
            **({"dynamic": dynamic} if dynamic else {}),
            "seconds": round(time.perf_counter() - t_start, 2),
        }
        _write_reports(tmp, report, recipe, opts, src_info, build)
    report["out"] = str(out)
    return report


def _write_reports(tmp: Path, report: dict, recipe, opts: CompileOptions, src_info: dict, build: dict) -> None:
    """Validate the report and write report.json, report.recipe.yaml, report.md, then manifest.json (the hashes
    of every other file in the staged directory) into `tmp`."""
    rep.validate(report)
    rep.write_json(tmp / "report.json", report)
    (tmp / "report.recipe.yaml").write_text(recipe.to_yaml())
    md = rep.render_markdown(report)
    (tmp / "report.md").write_text(md)
    manifest = {"edgec_version": rep.EDGEC_VERSION, "model": opts.model, "target": opts.target,
                "recipe": recipe.to_dict(), "seed": opts.seed, "input_sha256": src_info.get("input_sha256"),
                "versions": rep.tool_versions(), "command": opts.command,
                "files": {p.name: rep.sha256_file(p) for p in sorted(tmp.iterdir())
                          if p.is_file() and p.name not in ("manifest.json", "report.json", "report.md")}}
    manifest["preprocess"] = report["preprocess"]
    manifest.update(build.get("manifest", {}))
    rep.write_json(tmp / "manifest.json", manifest)


def _run_context(opts, recipe, splits, reference, torch_module, target, concrete):
    """(PassContext, the target's compile probe or None, the compile's ORT threads).

    numpy's BLAS runs at one count from the machine alone (not --compile-threads, not the worker count), here and in
    every worker: the compiled bytes never depend on them (core.executor, "Numeric threads"). ORT's own evaluations
    use --compile-threads here; an executor task gets them shared among the workers (PassContext.task_threads);
    ORT's outputs do not depend on its thread count (tests/test_compile_threads.py)."""
    cache_dir = opts.cache_dir or str(Path(".cache") / "edgec")
    blas = eval_threads(None)
    executor = make_executor(opts.cluster, blas_threads=blas, warm=WORKER_MODULES)
    cthreads = eval_threads(opts.compile_threads)
    tprobe = make_compile_probe(executor, opts.target, opts.probe_device, opts.threads[0], cache_dir, concrete)
    ctx = _pass_context(opts, recipe, splits, reference, torch_module, target.dialect, cache_dir, tprobe, executor,
                        concrete, cthreads)
    ctx.blas_threads = blas
    return ctx, tprobe, cthreads


def _pass_context(opts, recipe, splits, reference, torch_module, dialect, cache_dir, tprobe, executor, concrete,
                  threads: int):
    """Passes fit on the fit split, gate every fidelity decision on the validate split under the recipe's policy,
    and time candidates with the target's probe (latency_probe: prune.target_latency_ms)."""
    fit, val = splits.fit, splits.validate
    return PassContext(calib_batches=lambda: fit.iter_feeds(), calib_labels=fit.labels, reference_model=reference,
                       torch_model=torch_module, quant_dialect=dialect, seed=opts.seed, cache_dir=cache_dir,
                       threads=threads, progress=_progress, target_probe=tprobe,
                       latency_probe=tprobe.model_latency_ms if tprobe is not None else None,
                       input_shapes=dict(concrete) if concrete else None,
                       validate_batches=lambda: val.iter_feeds(), validate_labels=val.labels,
                       validate_groups=val.groups,
                       fidelity=recipe.floor_spec(len(val)), executor=executor)


def data_record(splits) -> dict:
    """The report's `data`: sample counts and sources of fit (calib_*), validate and eval, and how their
    disjointness was checked."""
    fit, val, ev = splits.fit, splits.validate, splits.eval
    return {"calib_samples": len(fit), "validate_samples": len(val), "eval_samples": len(ev),
            "description": fit.description, "validate_description": val.description,
            "eval_description": ev.description, "disjoint": bool(splits.disjoint.get("disjoint")),
            "disjointness": splits.disjoint, "labels": fit.labels is not None}


def _collect_plots(stages, outdir: Path) -> None:
    """Copy plots a pass wrote (stats key ending in '_png') into the artifact and point the stats at the copy."""
    import shutil

    for st in stages:
        for k, v in list(st.stats.items()):
            if k.endswith("_png") and isinstance(v, str) and Path(v).is_file():
                name = f"{st.name}_{Path(v).name}" if not Path(v).name.startswith(st.name) else Path(v).name
                shutil.copyfile(v, outdir / name)
                st.stats[k] = name


# what a worker imports while the driver exports and cleans up (make_executor's warm-up)
WORKER_MODULES = ("numpy", "onnx", "onnxruntime", "edgec.passes.prune.evaluate", "edgec.passes.quant.sensitivity",
                  "edgec.passes.floor")


def eval_threads(requested: int | None, workers: int = 1) -> int:
    """Intra-op threads for the compile's own model evaluations (floors, activations, sensitivity, least squares,
    the fidelity report): `--compile-threads`, else the machine's cores shared among `workers` concurrent
    processes (at most 4, at least 1). Latency probes and the benchmark keep `--threads`: those numbers are about the
    deployment.
    ORT's CPU kernels partition work by output, so outputs are bitwise the same at any thread count (checked in
    tests/test_compile_threads.py); choices do not depend on it."""
    if requested is not None:
        return int(requested)
    return max(1, min(4, (os.cpu_count() or 1) // max(int(workers), 1)))


def measure_fidelity(model_path: Path, reference: onnx.ModelProto, evals, *, opt_level: str = "all",
                     threads: int = 2) -> dict:
    cand = ort_session(str(model_path), threads=threads, level=opt_level)
    ref = ort_session(reference, threads=threads, level="all")
    names = [o.name for o in reference.graph.output]
    comp = Comparator(names)
    for i, f in enumerate(evals.iter_feeds()):
        lab = None if evals.labels is None else np.asarray([evals.labels[i]])
        comp.update(cand.run(None, f), ref.run(None, f), lab)
    return comp.result()


def run_bench(target: Target, outdir: Path, reference: onnx.ModelProto, bctx: BuildContext, opts: CompileOptions) -> dict:
    if target.bench is not None:
        return target.bench(outdir, bctx)
    from edgec.targets.bench import latency_interleaved, peak_rss

    feeds = bctx.eval_split.feeds(0)
    lat = {}
    for t in opts.threads:
        _progress(f"timing original vs compiled, {t} thread(s): {opts.warmup} warm-up + {opts.runs} runs each, interleaved")
        lat[str(t)] = latency_interleaved({"original": reference, "compiled": str(outdir / "model.onnx")}, feeds,
                                          threads=t, warmup=opts.warmup, runs=opts.runs, opt_level=opts.opt_level)
    from edgec.targets.bench import plot_latency

    plot_latency(lat, outdir / "latency.png")
    for d in lat.values():  # raw samples live in the plot, not in the report
        for r in d.values():
            r.pop("times_ms", None)
    mem = {}
    if opts.memory:
        _progress("measuring peak RSS in fresh processes")
        ref_path = outdir / ".reference.onnx"
        save_onnx(reference, ref_path)
        try:
            mem["original"] = peak_rss(ref_path, feeds, threads=opts.threads[0])
            mem["compiled"] = peak_rss(outdir / "model.onnx", feeds, threads=opts.threads[0])
        finally:
            ref_path.unlink(missing_ok=True)
    return {"latency": lat, "memory": mem, "plot": "latency.png",
            "latency_protocol": f"batch 1, ORT CPU, graph optimization '{opts.opt_level}', {opts.warmup} warm-up + "
                                f"{opts.runs} timed runs per model, original and compiled interleaved in one process",
            "host": _host()}


def _host() -> dict:
    import os
    import platform

    return {"machine": platform.machine(), "processor": platform.processor(), "cpus": os.cpu_count()}


def command_line() -> str:
    return " ".join(shlex.quote(a) for a in ["python", "-m", "pipeline", *sys.argv[1:]])
