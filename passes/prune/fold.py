"""Constant evaluation for pruning: the analysis's static shapes (shape sub-graphs evaluated on a light copy; the
model itself is not changed) and the prune pass's exact pre-step, folding small constant sub-graphs."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from edgec.core.graph import attr


_SHAPE_OPS = {"Shape", "Size", "Gather", "Unsqueeze", "Squeeze", "Concat", "Add", "Sub", "Mul", "Div", "Cast",
              "Slice", "Reshape", "Equal", "Where", "ReduceProd", "Floor", "Ceil", "Range", "ConstantOfShape",
              "Identity", "Max", "Min", "Abs", "Neg", "Mod", "Less", "Greater", "Not", "And", "Or", "Sqrt"}


def _read_shapes(m: onnx.ModelProto) -> tuple[dict[str, tuple], dict[str, int]]:
    shapes, dtypes = {}, {}
    for vi in list(m.graph.value_info) + list(m.graph.input) + list(m.graph.output):
        t = vi.type.tensor_type
        dtypes[vi.name] = t.elem_type
        if t.HasField("shape"):
            shapes[vi.name] = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim)
    for init in m.graph.initializer:
        shapes[init.name] = tuple(init.dims)
        dtypes[init.name] = init.data_type
    return shapes, dtypes


def _infer(m: onnx.ModelProto) -> onnx.ModelProto:
    try:
        return onnx.shape_inference.infer_shapes(m, data_prop=True)
    except Exception:
        return m


def _light(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy for shape inference only: large initializers become typed graph inputs (no weight bytes copied)."""
    m = onnx.ModelProto()
    m.ir_version = model.ir_version
    m.opset_import.extend(model.opset_import)
    g = model.graph
    m.graph.name = g.name
    m.graph.node.extend(g.node)
    m.graph.input.extend(g.input)
    m.graph.output.extend(g.output)
    names = {i.name for i in g.input}
    for i in g.initializer:
        if int(np.prod(i.dims)) <= 64:
            m.graph.initializer.append(i)
        elif i.name not in names:
            m.graph.input.append(onnx.helper.make_tensor_value_info(i.name, i.data_type, list(i.dims)))
    return m


def _infer_shapes(model: onnx.ModelProto, consts: dict[str, np.ndarray]):
    """Static shapes and dtypes, after evaluating shape sub-graphs (Shape -> Gather -> ... -> Slice bounds) whose
    inputs are static. Returns (shapes, dtypes, derived constants); the model itself is not changed."""
    light = _light(model)
    m = _infer(light)
    derived: dict[str, np.ndarray] = {}
    for _ in range(4):
        shapes, dtypes = _read_shapes(m)
        new = _fold_once(model, shapes, {**consts, **derived})
        if not new:
            break
        derived.update(new)
        tmp = onnx.ModelProto()
        tmp.CopyFrom(light)
        keep = [n for n in tmp.graph.node if not all(o in derived or not o for o in n.output)]
        del tmp.graph.node[:]
        tmp.graph.node.extend(keep)
        tmp.graph.initializer.extend(numpy_helper.from_array(np.asarray(v), k) for k, v in derived.items())
        m = _infer(tmp)
    shapes, dtypes = _read_shapes(m)
    return shapes, dtypes, derived


def _fold_once(model, shapes, known) -> dict[str, np.ndarray]:
    new = {}
    for n in model.graph.node:
        if n.op_type not in _SHAPE_OPS or all(o in known for o in n.output if o):
            continue
        try:
            if n.op_type in ("Shape", "Size"):
                s = shapes.get(n.input[0])
                if s is None or any(d <= 0 for d in s):
                    continue
                if n.op_type == "Size":
                    new[n.output[0]] = np.asarray(int(np.prod(s)), np.int64)
                    continue
                lo, hi = int(attr(n, "start", 0)), attr(n, "end", None)
                new[n.output[0]] = np.asarray(s[slice(lo, None if hi is None else int(hi))], np.int64)
                continue
            ins = [x for x in n.input if x]
            if not ins or not all(x in known or x in new for x in ins):
                continue
            vals = {x: (new[x] if x in new else known[x]) for x in ins}
            if any(v.size > 64 for v in vals.values()):
                continue
            from onnx.reference import ReferenceEvaluator

            g = onnx.helper.make_graph(
                [n], "fold", [onnx.helper.make_tensor_value_info(x, onnx.helper.np_dtype_to_tensor_dtype(vals[x].dtype), None) for x in vals],
                [onnx.helper.make_tensor_value_info(o, onnx.TensorProto.UNDEFINED, None) for o in n.output if o])
            mm = onnx.helper.make_model(g, opset_imports=list(model.opset_import))
            outs = ReferenceEvaluator(mm).run(None, vals)
            for o, v in zip([o for o in n.output if o], outs):
                v = np.asarray(v)
                if v.size <= 64:
                    new[o] = v
        except Exception:  # not foldable: stays dynamic
            continue
    return new


# ----------------------------------------------------------------------------- exact pre-step of the prune pass
_NONDET = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli"}


def fold_small_constants(model: onnx.ModelProto, max_elems: int = 1 << 16) -> tuple[onnx.ModelProto, int]:
    """f(consts) -> const for nodes whose inputs are all initializers and whose outputs are small (exact)."""
    from onnx.reference import ReferenceEvaluator

    m = onnx.ModelProto()
    m.CopyFrom(model)
    inits = {t.name: t for t in m.graph.initializer}
    vals: dict[str, np.ndarray] = {}
    kept, folded = [], 0
    for node in m.graph.node:
        ins = [i for i in node.input if i]
        if node.op_type in _NONDET or node.domain not in ("", "ai.onnx") or not all(i in inits for i in ins) \
                or (not ins and node.op_type != "Constant") or any(a.type == onnx.AttributeProto.GRAPH for a in node.attribute):
            kept.append(node)
            continue
        try:
            feeds = {}
            for i in ins:
                if i not in vals:
                    vals[i] = numpy_helper.to_array(inits[i])
                feeds[i] = vals[i]
            if any(v.size > max_elems for v in feeds.values()):
                raise ValueError("large input")
            g = helper.make_graph(
                [node], "fold",
                [helper.make_tensor_value_info(i, helper.np_dtype_to_tensor_dtype(feeds[i].dtype), feeds[i].shape) for i in ins],
                [helper.make_tensor_value_info(o, 0, None) for o in node.output])
            outs = ReferenceEvaluator(helper.make_model(g, opset_imports=m.opset_import)).run(None, feeds)
            outs = [np.asarray(o) for o in outs]
            if any(o.size > max_elems or o.dtype == object for o in outs):
                raise ValueError("large output")
        except Exception:
            kept.append(node)
            continue
        for o, v in zip(node.output, outs):
            vals[o] = v
            t = numpy_helper.from_array(v, o)
            inits[o] = t
            m.graph.initializer.append(t)
        folded += 1
    if not folded:
        return model, 0
    del m.graph.node[:]
    m.graph.node.extend(kept)
    used = {i for n in m.graph.node for i in n.input} | {o.name for o in m.graph.output}
    keep_inits = [t for t in m.graph.initializer if t.name in used]
    del m.graph.initializer[:]
    m.graph.initializer.extend(keep_inits)
    gi = [i for i in m.graph.input if i.name not in inits or i.name in used]
    del m.graph.input[:]
    m.graph.input.extend(gi)
    return m, folded
