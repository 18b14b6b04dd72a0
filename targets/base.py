"""The target contract: each backend module (targets/ort.py, targets/tensorrt/, targets/jetson/) exports one
`TARGET = Target(...)`, and `get_target(name)` returns it. The pipeline reads only these fields (no getattr on
modules, no hasattr on probes):

  name        the --target name
  dialect     passes.quant.dialect.QuantDialect: the Q/DQ policy the quantizer follows for this backend
  build       (model, outdir, BuildContext) -> dict: writes the engine files into outdir, returns
              {artifacts, settings, ...}
  bench       (outdir, BuildContext) -> dict | None: measures on this host if it can, else a reason; None: the
              pipeline's generic ORT benchmark (targets/bench.py) times the emitted ONNX
  precheck    (model) -> dict, or None: the backend's rule check of the final ONNX before any engine is built
              (raises EdgecError on a model it would refuse)
  make_probe  (threads, cache_dir, input_shapes=) -> passes.base.TargetProbe, or None: measured costs for the
              passes (per-layer latency, kernel precision); None: the passes use counted costs
"""
from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx

from edgec.core.errors import EdgecError

_TARGETS = {"ort": "edgec.targets.ort", "tensorrt": "edgec.targets.tensorrt", "jetson": "edgec.targets.jetson"}


@dataclass
class BuildContext:
    model_name: str
    recipe: Any                      # pipeline.recipe.Recipe
    reference_model: onnx.ModelProto  # original FP32 graph (after export/import, before passes)
    eval_split: Any                  # calib.data.DataSplit (held-out)
    calib_split: Any = None
    threads: tuple[int, ...] = (1, 2)
    seed: int = 0
    warmup: int = 20
    runs: int = 200
    opt_level: str = "all"
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Target:
    """One backend, as the pipeline sees it (see the module docstring)."""

    name: str
    dialect: Any  # passes.quant.dialect.QuantDialect
    build: Callable[[onnx.ModelProto, Path, BuildContext], dict]
    bench: Callable[[Path, BuildContext], dict | None] | None = None
    precheck: Callable[[onnx.ModelProto], dict] | None = None
    make_probe: Callable[..., Any] | None = None  # -> passes.base.TargetProbe


def list_targets() -> list[str]:
    return sorted(_TARGETS)


def get_target(name: str) -> Target:
    if name not in _TARGETS:
        raise EdgecError(f"unknown target '{name}'; known targets: {', '.join(list_targets())}")
    try:
        return importlib.import_module(_TARGETS[name]).TARGET
    except ModuleNotFoundError as e:
        if e.name and e.name.startswith("targets."):
            raise EdgecError(f"target '{name}' is not available in this build") from None
        raise
