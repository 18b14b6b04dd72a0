"""Input shapes of a compile: --input-shape parsing, concrete shapes for the passes, and --dynamic axes.

fix_input_shapes: make symbolic input dims concrete (--input-shape name:1x3x224x224, else batch=1 and the
spatial defaults) so every pass sees static shapes.

--dynamic batch,height,width: `plan_input_shapes` keeps the chosen axes symbolic in the model the passes see (so
shape computations are not folded for one size) and returns concrete shapes for the data; `finish_dynamic`
restores the axes in the compiled model and verifies it against the original at two shapes (`verify_at_shapes`),
failing with EdgecError if it does not run or differs.

Loading and validating the (untrusted) model itself is edgec.pipeline.importer's.
"""
from __future__ import annotations

import math

import numpy as np
import onnx

from edgec.core.errors import EdgecError
from edgec.core.onnx_io import _first_line
from edgec.pipeline.shape_meta import sanitize_shape_metadata

MAX_INPUT_ELEMENTS = 1 << 28          # one input tensor of more elements is refused (1 GiB of float32)


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
        if math.prod(shape) > MAX_INPUT_ELEMENTS:
            raise EdgecError(f"bad --input-shape '{s}': {math.prod(shape)} elements is more than edgec accepts "
                             f"({MAX_INPUT_ELEMENTS})")
        out[name] = shape
    return out


def _graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    inits = {i.name for i in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


def fix_input_shapes(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]], default_hw: int = 224,
                     keep: dict[str, dict[int, str]] | None = None) -> onnx.ModelProto:
    """Make symbolic input dims concrete. `keep` {input: {axis: dim_param}} leaves those axes symbolic."""
    inputs = _graph_inputs(model)
    if "" in shapes:
        if not inputs:
            raise EdgecError("the model has no graph inputs")
        shapes = {**{k: v for k, v in shapes.items() if k}, inputs[0].name: shapes[""]}
    unknown = set(shapes) - {i.name for i in inputs}
    if unknown:
        raise EdgecError(f"--input-shape names unknown input(s) {', '.join(sorted(unknown))}; inputs: {', '.join(i.name for i in inputs)}")
    keep = keep or {}
    for inp in inputs:
        if inp.type.WhichOneof("value") != "tensor_type":
            raise EdgecError(f"input '{inp.name}' is not a tensor (sequence/map/optional inputs are not supported)")
        if not inp.type.tensor_type.HasField("shape"):
            raise EdgecError(f"input '{inp.name}' has no shape; give one with --input-shape {inp.name}:1x3x224x224")
        dims = inp.type.tensor_type.shape.dim
        kept = keep.get(inp.name, {})
        want = shapes.get(inp.name)
        if want is not None:
            if len(want) != len(dims):
                raise EdgecError(f"--input-shape {inp.name}: rank {len(want)} but the model input has rank {len(dims)}")
            for k, (d, w) in enumerate(zip(dims, want)):
                if d.HasField("dim_value") and d.dim_value != w and d.dim_value > 0:
                    raise EdgecError(f"--input-shape {inp.name}: dim {w} conflicts with the model's fixed {d.dim_value}")
                if k in kept:
                    continue
                d.Clear()
                d.dim_value = w
            continue
        for k, d in enumerate(dims):
            if k in kept:
                continue
            if not d.HasField("dim_value") or d.dim_value <= 0:
                v = 1 if k == 0 else (3 if (k == 1 and len(dims) == 4) else default_hw)
                d.Clear()
                d.dim_value = v
        n = math.prod(d.dim_value for d in dims if d.HasField("dim_value"))
        if n > MAX_INPUT_ELEMENTS:
            raise EdgecError(f"input '{inp.name}' has {n} elements, more than edgec accepts ({MAX_INPUT_ELEMENTS})")
    sanitize_shape_metadata(model)
    return model


_AXIS_WORDS = {"batch": 0, "n": 0, "channels": 1, "c": 1}


def dynamic_axes(model: onnx.ModelProto, axes: list[str] | str | None, layout: str = "NCHW") -> dict[str, dict[int, str]]:
    """--dynamic batch,height,width -> {input: {axis: dim_param}} for the model's inputs.

    Words: batch (axis 0), height/width (axes 2/3 for rank-4 NCHW inputs, 1/2 for NHWC), sequence (axis 1 of
    rank-2/3 inputs), an integer axis, or the name of a symbolic dim in the original model
    (e.g. `p2o.DynamicDimension.0`). The dim keeps the original's symbol when it had one.
    """
    if isinstance(axes, str):
        axes = [a for a in axes.split(",") if a.strip()]
    out: dict[str, dict[int, str]] = {}
    if not axes:
        return out
    for inp in _graph_inputs(model):
        dims = inp.type.tensor_type.shape.dim
        r = len(dims)
        sel: dict[int, str] = {}
        for word in (a.strip() for a in axes):
            w = word.lower()
            if w in _AXIS_WORDS:
                k = _AXIS_WORDS[w]
            elif w in ("height", "h"):
                k = 2 if (r == 4 and layout == "NCHW") else (1 if r == 4 else None)
            elif w in ("width", "w"):
                k = 3 if (r == 4 and layout == "NCHW") else (2 if r == 4 else None)
            elif w in ("sequence", "seq", "tokens"):
                k = 1 if r in (2, 3) else None
            elif w.lstrip("-").isdigit():
                k = int(w) % r if r else None
            else:
                hits = [j for j, d in enumerate(dims) if d.dim_param == word]
                k = hits[0] if hits else None
                if k is None and not any(word == d.dim_param for i2 in _graph_inputs(model) for d in i2.type.tensor_type.shape.dim):
                    raise EdgecError(f"--dynamic: unknown axis '{word}'; use batch, height, width, sequence, an axis "
                                     f"number or a symbolic dim name of the model")
            if k is None or k >= r:
                continue
            d = dims[k]
            if d.HasField("dim_value") and d.dim_value > 0 and not w.lstrip("-").isdigit() and w not in _AXIS_WORDS:
                continue  # a fixed dim in the original stays fixed (e.g. a model with fixed H/W)
            sym = d.dim_param if d.dim_param and d.dim_param != "?" else f"{inp.name}_{word}"
            sel[k] = sym
        if sel:
            out[inp.name] = sel
    if not out:
        raise EdgecError(f"--dynamic {','.join(axes)}: no input has such an axis")
    return out


def restore_dynamic_axes(model: onnx.ModelProto, original: onnx.ModelProto,
                         axes: dict[str, dict[int, str]]) -> onnx.ModelProto:
    """Mark the chosen input axes symbolic again in the compiled model; output dims that were symbolic in the
    original become symbolic (their original name), and stale value_info is dropped and re-inferred."""
    for inp in _graph_inputs(model):
        for k, sym in axes.get(inp.name, {}).items():
            d = inp.type.tensor_type.shape.dim[k]
            d.Clear()
            d.dim_param = sym
    orig_out = {o.name: o for o in original.graph.output}
    for o in model.graph.output:
        if not o.type.tensor_type.HasField("shape"):
            continue
        ref = orig_out.get(o.name)
        rdims = ref.type.tensor_type.shape.dim if ref is not None else []
        for j, d in enumerate(o.type.tensor_type.shape.dim):
            # every output dim becomes symbolic (the original's name where it had one); shape inference below
            # makes the ones that do not depend on the dynamic axes concrete again
            sym = rdims[j].dim_param if j < len(rdims) and rdims[j].dim_param not in ("", "?") else f"{o.name}_d{j}"
            d.Clear()
            d.dim_param = sym
    del model.graph.value_info[:]
    try:
        model = onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception as e:
        raise EdgecError(f"the compiled model is not valid with dynamic axes: {_first_line(e)}") from None
    return model


def shapes_with(base: dict[str, tuple[int, ...]], axes: dict[str, dict[int, str]], bump: int) -> dict[str, tuple[int, ...]]:
    """A second valid shape: every dynamic axis changed (batch +1, spatial/sequence + bump)."""
    out = {}
    for name, shp in base.items():
        s = list(shp)
        for k in axes.get(name, {}):
            s[k] = s[k] + (1 if k == 0 else bump)
        out[name] = tuple(s)
    return out


def verify_at_shapes(model: onnx.ModelProto, reference: onnx.ModelProto, shapes: list[dict[str, tuple[int, ...]]],
                     *, seed: int = 0, cosine_min: float = 0.0) -> list[dict]:
    """Run the compiled model and the reference at each input shape on the same seeded inputs; returns per-shape
    per-output fidelity. Raises EdgecError when the compiled model fails to run or its output shapes differ."""
    from edgec.core.fidelity import Comparator
    from edgec.core.onnx_io import np_dtype, ort_session, run_session

    cand = ort_session(model, optimize=False)
    ref = ort_session(reference, optimize=False)
    names = [o.name for o in reference.graph.output]
    types = {i.name: np_dtype(i.type.tensor_type.elem_type) for i in _graph_inputs(reference)}
    results = []
    for k, shp in enumerate(shapes):
        rng = np.random.default_rng([seed, 11, k])
        feeds = {}
        for n, s in shp.items():
            dt = types.get(n, np.float32)
            feeds[n] = (rng.integers(0, 8, size=s) if np.issubdtype(dt, np.integer) else rng.standard_normal(s)).astype(dt)
        label = "x".join(str(v) for s in shp.values() for v in s)
        try:
            r = run_session(ref, feeds)
        except EdgecError:
            raise EdgecError(f"the original model does not run at input shape {label} (it fixes that axis "
                             f"internally); leave that axis out of --dynamic") from None
        try:
            a = run_session(cand, feeds)
        except EdgecError as e:
            raise EdgecError(f"the compiled model does not run at input shape {label}: {e}") from None
        for n, x, y in zip(names, a, r):
            if x.shape != y.shape:
                raise EdgecError(f"at input shape {label}, output '{n}' has shape {x.shape}, the original {y.shape}")
        comp = Comparator(names)
        comp.update(a, r)
        res = comp.result()
        res["shape"] = {n: list(s) for n, s in shp.items()}
        if res["summary"]["cosine_min"] < cosine_min:
            raise EdgecError(f"at input shape {label}, output cosine {res['summary']['cosine_min']:.4f} < {cosine_min}")
        results.append(res)
    return results


def plan_input_shapes(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]], dynamic: list[str] | str | None = None,
                      *, layout: str = "NCHW", default_hw: int = 224
                      ) -> tuple[onnx.ModelProto, dict[str, tuple[int, ...]], dict[str, dict[int, str]]]:
    """Shapes for a compile: (model for the passes, concrete input shapes for data, dynamic axes kept).

    Without `dynamic` this is fix_input_shapes (every dim concrete). With it, the chosen axes stay symbolic in the
    model the passes see -- so shape computations (Shape/Gather/Range/Expand decode heads, Reshape targets) are not
    folded into constants for one size -- while calibration data uses the concrete shapes.
    """
    axes = dynamic_axes(model, dynamic, layout) if dynamic else {}
    static = onnx.ModelProto()
    static.CopyFrom(model)
    static = fix_input_shapes(static, shapes, default_hw)
    concrete = {i.name: tuple(d.dim_value for d in i.type.tensor_type.shape.dim) for i in _graph_inputs(static)}
    if not axes:
        return static, concrete, axes
    return fix_input_shapes(model, shapes, default_hw, keep=axes), concrete, axes


def finish_dynamic(final: onnx.ModelProto, original: onnx.ModelProto, axes: dict[str, dict[int, str]],
                   concrete: dict[str, tuple[int, ...]], *, seed: int = 0, bump: int = 32,
                   second: dict[str, tuple[int, ...]] | None = None) -> tuple[onnx.ModelProto, dict]:
    """Restore the dynamic axes in the compiled model and verify it against the original at two shapes
    (the compile shape, and every dynamic axis grown: batch +1, others +bump). Returns (model, report section)."""
    out = restore_dynamic_axes(final, original, axes)
    ref = onnx.ModelProto()
    ref.CopyFrom(original)
    ref = restore_dynamic_axes(ref, original, axes)  # an axis fixed in the original is relaxed there too
    shapes = [dict(concrete), second or shapes_with(concrete, axes, bump)]
    per_shape = verify_at_shapes(out, ref, shapes, seed=seed)
    return out, {"axes": {n: {str(k): v for k, v in a.items()} for n, a in axes.items()},
                 "verified_at": [r["shape"] for r in per_shape],
                 "per_shape": per_shape}
