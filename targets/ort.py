"""ONNX Runtime on CPU.

Emits model.onnx (portable), model.ort.onnx (graph optimized by ORT at the chosen level, for this CPU) and
session.json (the SessionOptions used). Dialect: u8 asymmetric activations, s8 symmetric per-channel weights
(about 2x faster than s8 activations on x86 with VNNI).
"""
from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path

import onnx

from edgec.passes.quant.dialect import ORT_CPU
from edgec.core.onnx_io import atomic_write, ort_session
from edgec.targets.base import BuildContext, Target

log = logging.getLogger(__name__)

NAME = "ort"


def cpu_needs_reduce_range(flags: set[str] | None = None, machine: str | None = None) -> bool:
    """True on an x86 CPU without VNNI (AVX-512 VNNI, AVX-VNNI or AMX): there ORT's u8 x s8 kernels add pairs of
    products in int16 and saturate unless weights use 7 bits (QuantDialect.weight_reduce_range). ARM and VNNI
    CPUs accumulate in int32 and keep the full 8-bit range."""
    import platform

    machine = (machine or platform.machine()).lower()
    if machine not in ("x86_64", "amd64", "i686", "x86"):
        return False
    if flags is None:
        try:
            with open("/proc/cpuinfo") as f:
                flags = next((set(line.split(":", 1)[1].split()) for line in f if line.startswith("flags")), set())
        except OSError:
            return False  # unknown CPU: keep the full range (the fidelity gate still measures what ORT runs)
    return not (flags & {"avx512_vnni", "avx_vnni", "amx_int8"})


DIALECT = replace(ORT_CPU, weight_reduce_range=True) if cpu_needs_reduce_range() else ORT_CPU


def session_settings(threads: int, opt_level: str) -> dict:
    import onnxruntime as ort

    return {"providers": ["CPUExecutionProvider"], "intra_op_num_threads": threads, "inter_op_num_threads": 1,
            "execution_mode": "ORT_SEQUENTIAL", "graph_optimization_level": opt_level,
            "onnxruntime_version": ort.__version__}


def make_probe(threads: int = 1, cache_dir: str | None = None, input_shapes: dict | None = None):
    """Measured costs for the quantizer: per-layer latency tables timed in ORT on this CPU (cached), at the compile
    shape (`input_shapes`) when the model keeps dynamic axes."""
    from edgec.targets.ort_latency import make_probe as _make

    return _make(threads, cache_dir, input_shapes)


def build(model: onnx.ModelProto, outdir: Path, ctx: BuildContext) -> dict:
    """Write the ORT-optimized graph and the session settings next to model.onnx; check int8 layers run int8 kernels."""
    from edgec.targets.ort_kernels import check_kernels

    opt_path = outdir / "model.ort.onnx"
    ort_session(str(outdir / "model.onnx"), threads=ctx.threads[0], level=ctx.opt_level, optimized_path=str(opt_path))
    kernels = check_kernels(model, None, optimized=onnx.load(str(opt_path)) if ctx.opt_level == "all" else None,
                            threads=ctx.threads[0])
    settings = {f"threads_{t}": session_settings(t, ctx.opt_level) for t in ctx.threads}
    with atomic_write(outdir / "session.json", "w") as f:
        json.dump(settings, f, indent=2, sort_keys=True)
    return {"artifacts": ["model.onnx", "model.ort.onnx", "session.json"], "settings": settings,
            "optimized_model": opt_path.name,
            "kernels": {k: {"claimed": v["claimed"], "effective": v["effective"], "kernel": v["kernel"]} for k, v in kernels.items()}}


TARGET = Target(name=NAME, dialect=DIALECT, build=build, make_probe=make_probe)
