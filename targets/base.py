"""Target protocol.

A target module exposes:
  NAME: str
  DIALECT: passes.quant.dialect.QuantDialect   (the Q/DQ policy the quantizer follows)
  build(model, outdir, ctx: BuildContext) -> dict   writes engine files into outdir, returns {artifacts, settings, ...}
  bench(outdir, ctx: BuildContext) -> dict | None   measures on this host if it can, else None with a reason
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
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


def list_targets() -> list[str]:
    return sorted(_TARGETS)


def get_target(name: str):
    if name not in _TARGETS:
        raise EdgecError(f"unknown target '{name}'; known targets: {', '.join(list_targets())}")
    try:
        return importlib.import_module(_TARGETS[name])
    except ModuleNotFoundError as e:
        if e.name and e.name.startswith("targets."):
            raise EdgecError(f"target '{name}' is not available in this build") from None
        raise
