"""Post-processing (decode) regions: the part of a detector after its feature maps are flattened into anchors.

Rule: region = forward closure (toward the graph outputs) of
  * every NonMaxSuppression / TopK / NonZero node, and
  * every "anchor flatten": a Reshape taking a rank-4 feature map with a spatial grid (H*W >= 2) to rank 3,
    kept only if its closure holds almost no learned weights (<= 1% of the model's Conv/Gemm/MatMul weights:
    a YOLO DFL 1x1 conv qualifies, a transformer after a patch flatten does not) and reaches a graph output;
plus its weightless tail: nodes without learned weights whose results are consumed only inside the region (class
softmax, box decoding, a head Concat), up to the last learned layers.
Nodes in the region are left in float and never pruned: box arithmetic against anchor grids and strides, score
selection and NMS lose more from 8-bit rounding and channel surgery than they cost in time.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx

from edgec.core.graph import Graph, node_name
from edgec.passes.costs import static_shapes

SELECT_OPS = {"NonMaxSuppression", "TopK", "NonZero"}
LAYER_OPS = {"Conv", "ConvTranspose", "Gemm", "MatMul"}
VIEW_OPS = {"Gather", "Slice", "Squeeze", "Unsqueeze", "Reshape", "Transpose", "Flatten", "Identity"}


@dataclass
class Region:
    nodes: set[str] = field(default_factory=set)       # node names (or output[0] for unnamed nodes)
    indices: set[int] = field(default_factory=set)     # positions in model.graph.node
    seeds: list[str] = field(default_factory=list)     # the flatten / selection nodes it starts from
    weights: int = 0                                   # learned weights inside (e.g. the DFL conv)
    selection: bool = False                            # holds NMS / TopK / NonZero: outputs are data-dependent

    def summary(self, model: onnx.ModelProto) -> dict:
        ops: dict[str, int] = {}
        for i, n in enumerate(model.graph.node):
            if node_name(n, i) in self.nodes:
                ops[n.op_type] = ops.get(n.op_type, 0) + 1
        return {"nodes": len(self.nodes), "seeds": self.seeds, "weights": self.weights, "selection": self.selection,
                "ops": dict(sorted(ops.items()))}


def find_postprocess(model: onnx.ModelProto, max_weight_fraction: float = 0.01,
                     input_shapes: dict | None = None) -> Region:
    """The decode region of `model` (empty for classifiers, segmenters, transformers); `input_shapes` gives
    symbolic (dynamic) input dims their compile-time values for the shape tests."""
    g = model.graph
    nodes = list(g.node)
    consumers: dict[str, list[int]] = {}
    for i, n in enumerate(nodes):
        for x in n.input:
            if x:
                consumers.setdefault(x, []).append(i)
    inits = {t.name: t for t in g.initializer}
    outs = {o.name for o in g.output}

    def weight_count(n: onnx.NodeProto) -> int:
        if n.op_type in LAYER_OPS and len(n.input) > 1 and n.input[1] in inits:
            return int(np.prod(inits[n.input[1]].dims))
        return 0

    total = sum(weight_count(n) for n in nodes)

    def closure(start: int) -> set[int]:
        seen, stack = set(), [start]
        while stack:
            i = stack.pop()
            if i in seen:
                continue
            seen.add(i)
            for o in nodes[i].output:
                stack.extend(consumers.get(o, []))
        return seen

    def reaches_output(idx: set[int]) -> bool:
        return any(o in outs for i in idx for o in nodes[i].output)

    shapes = static_shapes(model, input_shapes)
    region, seeds = set(), []
    for i, n in enumerate(nodes):
        c = None
        if n.op_type in SELECT_OPS:
            c = closure(i)
        elif n.op_type == "Reshape":
            si, so = shapes.get(n.input[0]), shapes.get(n.output[0])
            if si and so and len(si) == 4 and len(so) == 3 and all(d > 0 for d in si) and si[2] * si[3] >= 2:
                c = closure(i)
                w = sum(weight_count(nodes[k]) for k in c)
                if w > max_weight_fraction * total or not reaches_output(c):
                    c = None
        if c is not None and i not in region:
            seeds.append(node_name(n, i))
            region |= c
    # the weightless tail: a node without learned weights whose every result is consumed inside the region (class
    # softmax, box decoding against anchors, the head Concat) is post-processing too; grow upward to the last
    # learned layers, so the region's inputs are the raw head outputs
    made_by = {o: i for i, n in enumerate(nodes) for o in n.output}
    grew = bool(region)
    while grew:
        grew = False
        for i in sorted(region):
            for x in nodes[i].input:
                j = made_by.get(x)
                if j is None or j in region or nodes[j].op_type in LAYER_OPS:
                    continue
                if any(o in outs for o in nodes[j].output):
                    continue
                if all(c in region for o in nodes[j].output for c in consumers.get(o, [])):
                    region.add(j)
                    grew = True
    weights = sum(weight_count(nodes[k]) for k in region)
    selection = any(nodes[k].op_type in SELECT_OPS for k in region)
    return Region({node_name(nodes[k], k) for k in region}, set(region), seeds, weights, selection)


def region_inputs(model: onnx.ModelProto, region: Region) -> list[tuple[str, int]]:
    """The float tensors entering the region from outside it, as (consuming node's key, input slot): the raw head
    outputs a decode region turns into boxes and scores. Shape-only uses (a Shape node reading a feature map) and
    constants are not inputs. Keys survive passes (they name nodes), so the same taps can be read in the original
    and in a compressed model."""
    g = model.graph
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {vi.name: vi.type.tensor_type.elem_type for vi in list(inferred.graph.value_info) + list(g.input)
             + list(g.output)}
    gi = Graph(model)
    consts = set(gi.inits) | set(gi.cnodes) | {i.name for i in g.input}
    made_inside = {o for i in region.indices for o in g.node[i].output}
    # tensors whose values depend on a graph input's values (a Shape output depends on its shape only: anchor
    # grids and stride maps built from Shape/Range are not network outputs)
    live = {i.name for i in g.input} - {t.name for t in g.initializer}
    for n in g.node:
        if n.op_type not in ("Shape", "Size") and any(x in live for x in n.input):
            live.update(n.output)
    producer = gi.producer
    index = {id(n): i for i, n in enumerate(g.node)}

    def source(n: onnx.NodeProto, k: int) -> tuple[onnx.NodeProto, int]:
        """Walk up constant-parameter views (per-class Gather/Slice of one score tensor, Reshape, ...) so that many
        slices of one head tensor become one tap on the tensor itself."""
        while True:
            p = producer.get(n.input[k])
            if p is None or p.op_type not in VIEW_OPS or not p.input or p.input[0] not in live \
                    or any(x and x not in consts for x in p.input[1:]):
                return n, k
            n, k = p, 0

    taps, seen = [], set()
    for i in sorted(region.indices):
        n = g.node[i]
        if n.op_type == "Shape":
            continue
        for k, x in enumerate(n.input):
            if not x or x in consts or x in made_inside or x not in live:
                continue
            sn, sk = source(n, k)
            t = sn.input[sk]
            if t in seen or types.get(t) != onnx.TensorProto.FLOAT:
                continue
            seen.add(t)
            taps.append((node_name(sn, index[id(sn)]), sk))
    return sorted(taps)


def tap_tensors(model: onnx.ModelProto, taps: list[tuple[str, int]]) -> list[str] | None:
    """The tensor each tap reads in `model` (None if a tapped node is missing)."""
    by_key = {node_name(n, i): n for i, n in enumerate(model.graph.node)}
    out = []
    for key, k in taps:
        n = by_key.get(key)
        if n is None or k >= len(n.input):
            return None
        out.append(n.input[k])
    return out
