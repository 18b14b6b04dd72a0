"""Shape metadata from exporters: annotations are hints, not facts (see sanitize_shape_metadata)."""
from __future__ import annotations

import logging
from collections.abc import Iterator

import onnx

log = logging.getLogger(__name__)


def _graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    inits = {i.name for i in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


# Symbolic dim names exporters write: torch (batch_size, s0, unk__0), Paddle2ONNX (p2o.DynamicDimension.0), tf2onnx
# (unk__12), '?' (Paddle), 'batch', 'N'. None of them carry meaning beyond "unknown"; edgec treats them all alike.
_NOISY_PARAMS = ("?", "-1", "None", "unk")


def _subgraphs(g: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    for n in g.node:
        for a in n.attribute:
            for sg in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                yield sg
                yield from _subgraphs(sg)


def _clear_bad_dims(vi: onnx.ValueInfoProto) -> int:
    """dim_value <= 0 (-1 means 'unknown' in several exporters, 0 is never a real activation size) becomes unknown."""
    if vi.type.WhichOneof("value") != "tensor_type" or not vi.type.tensor_type.HasField("shape"):
        return 0
    bad = 0
    for d in vi.type.tensor_type.shape.dim:
        if d.HasField("dim_value") and d.dim_value <= 0:
            d.Clear()
            bad += 1
        elif d.HasField("dim_param") and d.dim_param.strip() in _NOISY_PARAMS:
            d.Clear()
    return bad


def sanitize_shape_metadata(model: onnx.ModelProto) -> dict:
    """Exporter shape annotations are hints, not facts: drop them and let ONNX shape inference decide.

    - value_info of the main graph and of every subgraph is deleted (stale entries from another batch or size,
      -1 dims, dims that disagree with the fixed input shape) and re-inferred by later checks;
    - graph-output dims <= 0 and meaningless symbols ('?', '-1', 'unk') become unknown;
    - a graph output whose declared fixed dim contradicts what inference derives from the (fixed) inputs takes the
      inferred dim. Returns counts for the log. Never raises: the strict check runs later on the cleaned model.
    """
    stats = {"value_info_dropped": len(model.graph.value_info), "bad_dims_cleared": 0, "output_dims_replaced": 0}
    del model.graph.value_info[:]
    for sg in _subgraphs(model.graph):
        stats["value_info_dropped"] += len(sg.value_info)
        del sg.value_info[:]
        for vi in list(sg.output):
            stats["bad_dims_cleared"] += _clear_bad_dims(vi)
    for vi in list(model.graph.output) + list(_graph_inputs(model)):
        stats["bad_dims_cleared"] += _clear_bad_dims(vi)
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    for o in probe.graph.output:
        if o.type.WhichOneof("value") == "tensor_type":
            o.type.tensor_type.ClearField("shape")
    try:
        inferred = onnx.shape_inference.infer_shapes(probe, strict_mode=False, data_prop=True)
    except Exception:  # inference itself failed: keep the cleaned declarations; the strict check reports it
        return stats
    got = {o.name: o for o in inferred.graph.output}
    for o in model.graph.output:
        io = got.get(o.name)
        if io is None or o.type.WhichOneof("value") != "tensor_type" or not io.type.tensor_type.HasField("shape"):
            continue
        decl, inf = o.type.tensor_type.shape.dim, io.type.tensor_type.shape.dim
        if not o.type.tensor_type.HasField("shape") or len(decl) != len(inf):
            o.type.tensor_type.shape.CopyFrom(io.type.tensor_type.shape)
            stats["output_dims_replaced"] += 1
            continue
        for d, e in zip(decl, inf):
            if d.HasField("dim_value") and e.HasField("dim_value") and d.dim_value != e.dim_value:
                d.dim_value = e.dim_value
                stats["output_dims_replaced"] += 1
            elif not d.HasField("dim_value") and not d.dim_param and e.HasField("dim_value"):
                d.dim_value = e.dim_value  # an unknown (cleared) dim takes the inferred value
    if any(stats.values()):
        log.info("shape metadata: %s", ", ".join(f"{k}={v}" for k, v in stats.items() if v))
    return stats
