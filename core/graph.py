"""The graph IR every pass and target shares: one index over a ModelProto's top-level graph.

A pass keeps working on `onnx.ModelProto` (conversion happens at the edges: importer in, report/targets out); what
it needs to *read* a graph -- who produces a tensor, who consumes it, what constant a name holds, a node's
attributes, the name it is reported under -- comes from here, so every pass reads a graph the same way.

Rules fixed here, once:
* **Naming.** A node is reported as `node.name`, or `<op_type>_<index>` (its index in `graph.node`) when unnamed.
  `passes/normalize.py` gives every node a unique name first, so after it both are the same.
* **Constants.** A constant is an initializer or the output of a `Constant` node (`value` or `value_float(s)` /
  `value_int(s)`); with `fold_casts=True`, a `Cast`/`Identity` of a constant is one too (TensorRT and ORT fold it).
* **In place or not.** `Graph` reads the proto it is given and never copies it. The writers (`set_const`,
  `write_input`, `add_initializer`) edit that proto in place: a pass that uses them must either own a copy
  (`Pass.in_place = True`: `run_pass` copied it) or copy first.
"""
from __future__ import annotations

from collections import defaultdict

import numpy as np
import onnx
from onnx import numpy_helper


# ------------------------------------------------------------------------------------------------ node helpers
def attr(node: onnx.NodeProto, name: str, default=None):
    """The value of attribute `name` of `node` (python types, as onnx.helper decodes them), else `default`."""
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def attrs(node: onnx.NodeProto) -> dict:
    """Every attribute of `node` as {name: value}."""
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def set_attr(node: onnx.NodeProto, name: str, value) -> None:
    """Set (replace or add) attribute `name`."""
    del_attr(node, name)
    node.attribute.append(onnx.helper.make_attribute(name, value))


def del_attr(node: onnx.NodeProto, name: str) -> None:
    for k, a in enumerate(node.attribute):
        if a.name == name:
            del node.attribute[k]
            return


def node_name(node: onnx.NodeProto, index: int) -> str:
    """The one naming rule: the node's name, or <op_type>_<index> for an unnamed node."""
    return node.name or f"{node.op_type}_{index}"


def node_names(nodes) -> list[str]:
    return [node_name(n, i) for i, n in enumerate(nodes)]


def subgraphs(node: onnx.NodeProto):
    """The graphs held by `node`'s attributes (If branches, Loop/Scan bodies)."""
    for a in node.attribute:
        yield from ([a.g] if a.HasField("g") else []) + list(a.graphs)


def walk_nodes(graph: onnx.GraphProto):
    """Every node of `graph` and of its subgraphs, depth first, in graph order."""
    for n in graph.node:
        yield n
        for sg in subgraphs(n):
            yield from walk_nodes(sg)


def opset(model: onnx.ModelProto, default: int = 17) -> int:
    """The default-domain opset of `model`."""
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default)


def constant_tensor(node: onnx.NodeProto) -> onnx.TensorProto | None:
    """The tensor a `Constant` node holds (value or value_float(s)/value_int(s)), None for other forms."""
    for a in node.attribute:
        if a.name == "value" and a.type == onnx.AttributeProto.TENSOR:
            return a.t
        if a.name in ("value_float", "value_floats", "value_int", "value_ints"):
            v = onnx.helper.get_attribute_value(a)
            dt = np.float32 if a.name.startswith("value_float") else np.int64
            return numpy_helper.from_array(np.asarray(v, dt), node.output[0] if node.output else "")
    return None


def _fold_cast(node: onnx.NodeProto, t: onnx.TensorProto) -> onnx.TensorProto | None:
    if node.op_type == "Identity":
        return t
    try:
        arr = numpy_helper.to_array(t).astype(onnx.helper.tensor_dtype_to_np_dtype(attr(node, "to")))
        return numpy_helper.from_array(arr, node.output[0])
    except (TypeError, ValueError, KeyError):
        return None


# ------------------------------------------------------------------------------------------------ the index
class Graph:
    """Producers, consumers, constants and names of one model's top-level graph, built once, read many times.

    The index reflects the proto as it was when built, except through this class's own writers; after a pass edits
    the node list, build a new `Graph`.
    """

    def __init__(self, model: onnx.ModelProto, *, fold_casts: bool = False):
        self.model = model
        g = model.graph
        self.nodes = list(g.node)
        self.inits: dict[str, onnx.TensorProto] = {t.name: t for t in g.initializer}
        self.cnodes: dict[str, onnx.NodeProto] = {}
        self._derived: dict[str, onnx.TensorProto] = {}
        self.producer: dict[str, onnx.NodeProto] = {}
        self.producer_index: dict[str, int] = {}
        self.consumers: dict[str, list[tuple[onnx.NodeProto, int]]] = defaultdict(list)
        self.uses: dict[str, int] = defaultdict(int)
        self._by_name: dict[str, onnx.NodeProto] = {}
        for i, n in enumerate(self.nodes):
            if n.op_type == "Constant" and n.output and constant_tensor(n) is not None:
                self.cnodes[n.output[0]] = n
            elif fold_casts and n.op_type in ("Cast", "Identity") and n.input and n.output:
                t = self.const_tensor(n.input[0])
                t = _fold_cast(n, t) if t is not None else None
                if t is not None:
                    self._derived[n.output[0]] = t
            for o in n.output:
                self.producer[o] = n
                self.producer_index[o] = i
            for k, x in enumerate(n.input):
                if x:
                    self.consumers[x].append((n, k))
                    self.uses[x] += 1
            self._by_name.setdefault(node_name(n, i), n)
        for o in g.output:
            self.uses[o.name] += 1
        self.outputs = [o.name for o in g.output]
        self.opset = opset(model)
        self.inputs = [i.name for i in g.input if i.name not in self.inits]

    # -------------------------------------------------------------------- reading
    def node(self, name: str) -> onnx.NodeProto | None:
        """The node reported under `name` (see `node_name`)."""
        return self._by_name.get(name)

    def consumer_nodes(self, tensor: str) -> list[onnx.NodeProto]:
        return [n for n, _ in self.consumers.get(tensor, ())]

    def is_const(self, name: str) -> bool:
        return name in self.inits or name in self.cnodes or name in self._derived

    def const_tensor(self, name: str) -> onnx.TensorProto | None:
        if name in self.inits:
            return self.inits[name]
        if name in self.cnodes:
            return constant_tensor(self.cnodes[name])
        return self._derived.get(name)

    def const(self, name: str) -> np.ndarray | None:
        """The value of constant `name` as an array, None when the name is not a constant."""
        t = self.const_tensor(name)
        return None if t is None else numpy_helper.to_array(t)

    def __getitem__(self, name: str) -> np.ndarray:
        v = self.const(name)
        if v is None:
            raise KeyError(name)
        return v

    def names(self) -> set[str]:
        """Every tensor name in use: initializers, graph inputs, node outputs."""
        return set(self.inits) | {i.name for i in self.model.graph.input} | set(self.producer)

    def unique_name(self, base: str, taken: set[str] | None = None) -> str:
        taken = self.names() if taken is None else taken
        name, k = base, 0
        while name in taken:
            k += 1
            name = f"{base}_{k}"
        return name

    # -------------------------------------------------------------------- writing (in place)
    def set_const(self, name: str, arr: np.ndarray) -> None:
        """Overwrite constant `name` in place (every user sees the new value)."""
        t = numpy_helper.from_array(np.ascontiguousarray(arr), name)
        if name in self.inits:
            self.inits[name].CopyFrom(t)
        else:
            a = next(a for a in self.cnodes[name].attribute if a.name == "value")
            a.t.CopyFrom(t)

    def add_initializer(self, name: str, arr: np.ndarray) -> str:
        self.model.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(arr), name))
        self.inits[name] = self.model.graph.initializer[-1]
        self.uses[name] += 0
        return name

    def taken(self, name: str) -> bool:
        """Whether `name` is already an initializer or read anywhere (a new tensor must not use it)."""
        return name in self.inits or name in self.uses

    def write_input(self, node: onnx.NodeProto, k: int, arr: np.ndarray) -> None:
        """Make node.input[k] hold `arr`: overwrite the constant when this node is its only reader, else give the
        node its own copy, named <name>__<node name or op> (+ _<n> on a clash)."""
        name = node.input[k]
        if self.uses.get(name, 0) <= 1:
            self.set_const(name, arr)
            return
        self.uses[name] -= 1
        new, n = f"{name}__{node.name or node.op_type}", 0
        while self.taken(new):
            n += 1
            new = f"{name}__{node.name or node.op_type}_{n}"
        self.add_initializer(new, arr)
        self.uses[new] = 1
        node.input[k] = new
