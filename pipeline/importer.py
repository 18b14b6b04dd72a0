"""Importing ONNX files from any exporter.

load_onnx_file: parse and validate (checker, known ops) without trusting the file.
fix_input_shapes: make symbolic input dims concrete (--input-shape name:1x3x224x224, else batch=1 and the
spatial defaults) so every pass sees static shapes.
"""
from __future__ import annotations

import logging
from pathlib import Path

import onnx

from pipeline.errors import EdgecError
from pipeline.onnx_io import _first_line

log = logging.getLogger(__name__)


def load_onnx_file(path: str | Path) -> onnx.ModelProto:
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise EdgecError(f"cannot read {path}: {e.strerror}") from None
    try:
        model = onnx.load_from_string(data)
    except Exception as e:
        raise EdgecError(f"{path.name} is not a valid ONNX protobuf (corrupt or truncated): {_first_line(e)}") from None
    if not model.graph.node:
        raise EdgecError(f"{path.name} has an empty graph")
    if any(t.HasField("data_location") and t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer):
        from onnx.external_data_helper import load_external_data_for_model

        try:
            load_external_data_for_model(model, str(path.parent))
        except Exception as e:
            raise EdgecError(f"{path.name}: cannot load external data: {_first_line(e)}") from None
    try:
        onnx.checker.check_model(model)
    except Exception as e:
        raise EdgecError(f"{path.name} fails the ONNX checker: {_first_line(e)}") from None
    return model


def parse_shapes(specs: list[str] | None) -> dict[str, tuple[int, ...]]:
    """--input-shape name:1x3x224x224 (repeatable) -> {name: shape}; a bare 1x3x224x224 applies to the first input."""
    out = {}
    for s in specs or []:
        name, _, dims = s.rpartition(":")
        try:
            shape = tuple(int(d) for d in dims.lower().split("x"))
        except ValueError:
            raise EdgecError(f"bad --input-shape '{s}': expected name:1x3x224x224") from None
        if not shape or any(d <= 0 for d in shape):
            raise EdgecError(f"bad --input-shape '{s}': dims must be positive")
        out[name] = shape
    return out


def fix_input_shapes(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]], default_hw: int = 224) -> onnx.ModelProto:
    inits = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    if "" in shapes:
        shapes = {**{k: v for k, v in shapes.items() if k}, inputs[0].name: shapes[""]}
    unknown = set(shapes) - {i.name for i in inputs}
    if unknown:
        raise EdgecError(f"--input-shape names unknown input(s) {', '.join(sorted(unknown))}; inputs: {', '.join(i.name for i in inputs)}")
    for inp in inputs:
        dims = inp.type.tensor_type.shape.dim
        want = shapes.get(inp.name)
        if want is not None:
            if len(want) != len(dims):
                raise EdgecError(f"--input-shape {inp.name}: rank {len(want)} but the model input has rank {len(dims)}")
            for d, w in zip(dims, want):
                if d.HasField("dim_value") and d.dim_value != w and d.dim_value > 0:
                    raise EdgecError(f"--input-shape {inp.name}: dim {w} conflicts with the model's fixed {d.dim_value}")
                d.Clear()
                d.dim_value = w
            continue
        for k, d in enumerate(dims):
            if not d.HasField("dim_value") or d.dim_value <= 0:
                v = 1 if k == 0 else (3 if (k == 1 and len(dims) == 4) else default_hw)
                d.Clear()
                d.dim_value = v
    del model.graph.value_info[:]
    return model
