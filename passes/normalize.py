"""normalize: bring a third-party graph into edgec's canonical form without changing what it computes.

Rules, in order (each is exact; the runner checks outputs within 1e-4):
  1. initializers listed as graph inputs (old exporters, keep_initializers_as_inputs) are constants, not inputs;
  2. default-domain opset < target_opset (17): onnx.version_converter up to the target (and an opset newer than
     the installed onnxruntime implements -- `ort_max_opset()` -- down to that one). This also rewrites the
     attribute forms that later opsets take as inputs -- Split(split) -> Split(x, split), Squeeze/Unsqueeze(axes)
     -> inputs, ReduceSum(axes) -> input, Clip(min, max attrs) -> inputs, Pad(pads attr) -> input,
     Upsample -> Resize, Slice attrs -> inputs. If conversion fails or yields an invalid model, the model is kept
     at its opset and the reason is reported (never a broken graph);
  3. Constant nodes (value / value_float(s) / value_int(s)) -> initializers, so every weight, pad, axis, scale and
     shape is an initializer that passes can read (a Constant feeding a graph output directly is kept);
  4. optional inputs given as "" at the end of a node's inputs are dropped (Clip(x, "", max) keeps its "");
  5. a weight initializer shared by several Conv/ConvTranspose/Gemm/MatMul nodes is duplicated per consumer
     (w' = w), so BatchNorm folding, channel removal and per-layer quantization can treat each layer on its own
     (bounded by untie_max_bytes of extra weights; beyond that, sharing is kept and reported);
  6. nodes get unique, deterministic names (empty or duplicate names -> <op>_<index>), unique across the whole
     model, subgraphs included;
  7. value_info (main graph and subgraphs) is dropped: exporters leave stale entries (-1 dims, another batch); the
     runner's checks re-infer shapes.
"""
from __future__ import annotations

import functools
import logging
from collections import Counter
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from edgec.passes.base import PassContext, PassResult, register_pass

log = logging.getLogger(__name__)

WEIGHT_SLOTS = {"Conv": (1, 2), "ConvTranspose": (1, 2), "Gemm": (1, 2), "MatMul": (1,)}


@dataclass(frozen=True)
class NormalizeOptions:
    target_opset: int = 17
    lift_constants: bool = True
    untie_shared_weights: bool = True
    untie_max_bytes: int = 64 << 20

    def __post_init__(self):
        if not 13 <= self.target_opset <= onnx.defs.onnx_opset_version():
            raise ValueError(f"target_opset must be in 13..{onnx.defs.onnx_opset_version()}")
        if self.untie_max_bytes < 0:
            raise ValueError("untie_max_bytes must be >= 0")


def default_opset(model: onnx.ModelProto) -> int:
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx"):
            return o.version
    return 0


def drop_initializer_inputs(model: onnx.ModelProto) -> int:
    inits = {t.name for t in model.graph.initializer}
    keep = [i for i in model.graph.input if i.name not in inits]
    n = len(model.graph.input) - len(keep)
    if n:
        del model.graph.input[:]
        model.graph.input.extend(keep)
        model.ir_version = max(model.ir_version, 4)  # IR < 4 requires every initializer to be a graph input
    return n


@functools.lru_cache(maxsize=1)
def ort_max_opset() -> int:
    """The newest default-domain opset at which this onnxruntime implements the ops passes insert
    (Cast, Reshape, QuantizeLinear, DequantizeLinear): probed once with a tiny model per opset, newest first."""
    import onnxruntime as ort
    from onnx import helper

    so = ort.SessionOptions()
    so.log_severity_level = 4
    for v in range(onnx.defs.onnx_opset_version(), 12, -1):
        nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
                 helper.make_node("DequantizeLinear", ["q", "s", "z"], ["d"]),
                 helper.make_node("Cast", ["d"], ["c"], to=onnx.TensorProto.FLOAT),
                 helper.make_node("Reshape", ["c", "shape"], ["y"])]
        g = helper.make_graph(nodes, "probe", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [4])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 2])],
                              [numpy_helper.from_array(np.float32(0.1), "s"), numpy_helper.from_array(np.uint8(128), "z"),
                               numpy_helper.from_array(np.array([2, 2], np.int64), "shape")])
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", v)])
        m.ir_version = 8
        try:
            ort.InferenceSession(m.SerializeToString(), sess_options=so, providers=["CPUExecutionProvider"])
            return v
        except Exception:
            continue
    return 13


def convert_opset(model: onnx.ModelProto, target: int, ceiling: int | None = None) -> tuple[onnx.ModelProto, str]:
    """(model at >= target opset and <= ceiling, how). On failure returns the input model and the reason."""
    cur = default_opset(model)
    if ceiling is not None and cur > ceiling:
        target = ceiling  # newer than onnxruntime here runs: down-convert so inserted Q/DQ/Cast nodes have kernels
    elif cur >= target:
        return model, f"kept opset {cur}"
    from onnx import version_converter

    try:
        out = version_converter.convert_version(model, target)
        out.ir_version = max(out.ir_version, 8)
        onnx.checker.check_model(out, full_check=False)
        onnx.shape_inference.infer_shapes(out, check_type=True, strict_mode=True)
    except Exception as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        log.warning("normalize: cannot convert opset %d -> %d (%s); keeping opset %d", cur, target, reason, cur)
        return model, f"kept opset {cur}: conversion to {target} failed: {reason}"
    return out, f"converted opset {cur} -> {target}"


def _constant_value(n: onnx.NodeProto) -> np.ndarray | None:
    if len(n.attribute) != 1:
        return None
    a = n.attribute[0]
    if a.name == "value":
        return numpy_helper.to_array(a.t)
    if a.name == "value_float":
        return np.asarray(a.f, np.float32)
    if a.name == "value_floats":
        return np.asarray(list(a.floats), np.float32)
    if a.name == "value_int":
        return np.asarray(a.i, np.int64)
    if a.name == "value_ints":
        return np.asarray(list(a.ints), np.int64)
    return None  # sparse_value / strings: left as they are


def lift_constants(model: onnx.ModelProto) -> tuple[int, int]:
    """Constant nodes of the main graph -> initializers. Returns (lifted, kept)."""
    g = model.graph
    outputs = {o.name for o in g.output}
    taken = {t.name for t in g.initializer}
    keep_nodes, new_inits, kept = [], [], 0
    for n in g.node:
        if n.op_type == "Constant" and n.domain in ("", "ai.onnx") and len(n.output) == 1:
            name = n.output[0]
            val = None if (name in outputs or name in taken) else _constant_value(n)
            if val is not None:
                t = numpy_helper.from_array(val, name)
                if n.attribute[0].name == "value":  # keep the exact dtype/bytes of the original tensor
                    t = onnx.TensorProto()
                    t.CopyFrom(n.attribute[0].t)
                    t.name = name
                new_inits.append(t)
                taken.add(name)
                continue
            kept += 1
        keep_nodes.append(n)
    if new_inits:
        del g.node[:]
        g.node.extend(keep_nodes)
        g.initializer.extend(new_inits)
    return len(new_inits), kept


def drop_trailing_empty_inputs(model: onnx.ModelProto) -> int:
    n_fixed = 0
    for n in model.graph.node:
        k = len(n.input)
        while k and n.input[k - 1] == "":
            k -= 1
        if k != len(n.input):
            kept = list(n.input[:k])
            del n.input[:]
            n.input.extend(kept)
            n_fixed += 1
    return n_fixed


def untie_shared_weights(model: onnx.ModelProto, max_bytes: int) -> tuple[int, int, list[str]]:
    """Give every extra weight-consuming node its own copy. Returns (copies made, bytes added, still shared)."""
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    uses: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for n in g.node:
        for k in WEIGHT_SLOTS.get(n.op_type, ()):
            if k < len(n.input) and n.input[k] in inits:
                uses.setdefault(n.input[k], []).append((n, k))
    all_uses = Counter(i for n in g.node for i in n.input)
    copies, added, still = 0, 0, []
    names = set(inits) | {o for n in g.node for o in n.output} | {i.name for i in g.input}
    for w in sorted(uses):
        consumers = uses[w]
        if all_uses[w] < 2 or len(consumers) < 1:
            continue
        # the first weight-consumer keeps the original when no other node reads it; otherwise all get copies
        others = all_uses[w] - len(consumers)
        to_copy = consumers if others else consumers[1:]
        size = len(inits[w].raw_data) or inits[w].ByteSize()
        if added + size * len(to_copy) > max_bytes:
            still.append(w)
            continue
        for j, (n, k) in enumerate(to_copy, start=1):
            new = f"{w}__{j}"
            while new in names:
                new += "_"
            names.add(new)
            t = onnx.TensorProto()
            t.CopyFrom(inits[w])
            t.name = new
            g.initializer.append(t)
            n.input[k] = new
            copies += 1
            added += size
    return copies, added, still


def _all_graphs(g: onnx.GraphProto):
    yield g
    for n in g.node:
        for a in n.attribute:
            for sg in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                yield from _all_graphs(sg)


def name_nodes(model: onnx.ModelProto) -> int:
    """Node names unique across the whole model, subgraphs (If/Loop/Scan bodies) included: passes derive new names
    from node names, and ONNX requires them unique. Empty or repeated names -> <op>_<index> (<op>_<graph>_<index>
    inside the k-th subgraph)."""
    seen, renamed = set(), 0
    for gi, g in enumerate(_all_graphs(model.graph)):
        for i, n in enumerate(g.node):
            if not n.name or n.name in seen:
                base = f"{n.op_type}_{i}" if gi == 0 else f"{n.op_type}_g{gi}_{i}"
                nm = base
                while nm in seen:
                    nm += "_"
                n.name = nm
                renamed += 1
            seen.add(n.name)
    return renamed


def drop_value_info(model: onnx.ModelProto) -> int:
    """Exporter value_info (main graph and subgraphs) is a hint that can be stale; it is re-inferred by the checks."""
    k = 0
    for g in _all_graphs(model.graph):
        k += len(g.value_info)
        del g.value_info[:]
    return k


@register_pass("normalize", options=NormalizeOptions, exact=True)
def normalize(model: onnx.ModelProto, ctx: PassContext, opts: NormalizeOptions) -> PassResult:
    """Canonical form: opset >= 17 (version converter), Constant -> initializer, input forms, untied shared weights."""
    before = Counter(n.op_type for n in model.graph.node)
    m = onnx.ModelProto()
    m.CopyFrom(model)
    stats: dict = {"opset_before": default_opset(m)}
    stats["initializer_inputs_removed"] = drop_initializer_inputs(m)
    m, stats["opset"] = convert_opset(m, opts.target_opset, ceiling=ort_max_opset())
    stats["opset_after"] = default_opset(m)
    if opts.lift_constants:
        stats["constants_lifted"], stats["constants_kept"] = lift_constants(m)
    stats["empty_trailing_inputs_dropped"] = drop_trailing_empty_inputs(m)
    if opts.untie_shared_weights:
        c, b, still = untie_shared_weights(m, opts.untie_max_bytes)
        stats["shared_weights_untied"] = c
        stats["untie_bytes_added"] = b
        if still:
            stats["shared_weights_kept"] = still
            stats["shared_weights_kept_reason"] = f"copies would exceed untie_max_bytes={opts.untie_max_bytes}"
    stats["value_info_dropped"] = drop_value_info(m)
    stats["nodes_renamed"] = name_nodes(m)
    after = Counter(n.op_type for n in m.graph.node)
    stats["op_delta"] = {k: after.get(k, 0) - before.get(k, 0) for k in sorted(set(before) | set(after))
                         if after.get(k, 0) != before.get(k, 0)}
    stats["nodes_before"], stats["nodes_after"] = sum(before.values()), sum(after.values())
    modified = m.SerializeToString(deterministic=True) != model.SerializeToString(deterministic=True)
    return PassResult(m, modified=modified, stats=stats)
