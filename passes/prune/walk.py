"""Activations of a model advanced segment by segment, each node run once per sample.

The sequential least-squares refit (recover.lstsq_refit) needs, for layer k in topological order, the pruned
model's input to k (after layers 1..k-1 were refit) and the original model's output of k. Running each model from
its inputs for every layer costs O(layers x model) per sample. A walker instead keeps, per sample, the live tensors
(produced by nodes already run and read by nodes not yet run) and runs only the nodes the next request needs:

    state_k  = {t : producer(t) ran, some consumer of t has not}          (plus the graph inputs)
    need(N)  = run the nodes that N depends on and that have not run, fed from state_k; return N

so every node runs once per sample over the whole refit, on the weights it has when it runs. A node runs only when
a request depends on it, so a refit layer normally runs after its refit; if a refit changes a node that already ran
(a residual partner computed ahead of its own refit), `changed(node)` drops the state and the walk restarts from
the inputs, which gives the values a from-scratch run would give; so does a request for a tensor the state dropped
because every node reading it ran ahead of its turn (a downsample conv run early as a residual partner). Graphs with subgraph attributes (If/Loop) are not
walked (outer-scope names are not tracked): `Walker.supports(model)` is False and callers run whole prefixes.
"""
from __future__ import annotations

import logging

import numpy as np
import onnx
from onnx import helper

log = logging.getLogger(__name__)

__all__ = ["Walker"]


class Walker:
    def __init__(self, model: onnx.ModelProto, feeds: list[dict[str, np.ndarray]], threads: int = 1):
        self.model, self.feeds, self.threads = model, feeds, threads
        self.nodes = list(model.graph.node)
        self.producer = {o: i for i, n in enumerate(self.nodes) for o in n.output if o}
        self.consumers: dict[str, list[int]] = {}
        for i, n in enumerate(self.nodes):
            for x in n.input:
                if x:
                    self.consumers.setdefault(x, []).append(i)
        self.sessions = 0
        self.reset()

    @staticmethod
    def supports(model: onnx.ModelProto) -> bool:
        return not any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
                       for n in model.graph.node for a in n.attribute)

    @property
    def inits(self) -> set[str]:  # read each time: a refit may add an initializer (a new bias)
        return {t.name for t in self.model.graph.initializer}

    def reset(self) -> None:
        inputs = {i.name for i in self.model.graph.input} - self.inits
        self.state = [{k: v for k, v in f.items() if k in inputs} for f in self.feeds]
        self.done: set[int] = set()

    def changed(self, node_name: str) -> None:
        """A node's weights changed: if it already ran, restart the walk (its outputs in the state are stale)."""
        if any(self.nodes[i].name == node_name for i in self.done):
            self.reset()

    def need(self, names: list[str]) -> list[dict[str, np.ndarray]]:
        """Per sample {name: value} for `names`, running only the nodes not yet run that they depend on."""
        have = set(self.state[0]) if self.state else set()
        inits = self.inits
        todo, stack, seen = set(), [n for n in names if n not in have], set()
        while stack:
            t = stack.pop()
            if t in seen or t in have or t in inits:
                continue
            seen.add(t)
            i = self.producer.get(t)
            if i is None:
                raise KeyError(f"tensor {t!r} has no producer and is not an input")
            if i in self.done:  # its consumers all ran (one ahead of its turn, e.g. a residual partner): restart
                self.reset()
                return self.need(names)
            if i not in todo:
                todo.add(i)
                stack.extend(x for x in self.nodes[i].input if x)
        if todo:
            self._run(sorted(todo), names)
        return [{n: s[n] for n in names} for s in self.state]

    def _run(self, idx: list[int], names: list[str]) -> None:
        from edgec.core.onnx_io import ort_session

        nodes = [self.nodes[i] for i in idx]
        produced = {o for n in nodes for o in n.output if o}
        inits = {t.name: t for t in self.model.graph.initializer}
        ins = sorted({x for n in nodes for x in n.input if x and x not in produced and x not in inits})
        done = self.done | set(idx)
        live = sorted(o for o in produced
                      if o in names or any(c not in done for c in self.consumers.get(o, ())))
        used = {x for n in nodes for x in n.input if x in inits}
        s0 = self.state[0]
        g = helper.make_graph(
            nodes, "walk",
            [helper.make_tensor_value_info(x, helper.np_dtype_to_tensor_dtype(s0[x].dtype), list(s0[x].shape))
             for x in ins],
            [onnx.ValueInfoProto(name=o) for o in live], initializer=[inits[u] for u in sorted(used)])
        m = helper.make_model(g, opset_imports=self.model.opset_import, ir_version=self.model.ir_version)
        m.functions.extend(self.model.functions)
        sess = ort_session(m, threads=self.threads, optimize=True)
        self.sessions += 1
        for s in self.state:
            s.update(zip(live, sess.run(live, {x: s[x] for x in ins})))
        self.done = done
        keep = set(names)
        for s in self.state:  # drop what no node left to run reads
            for t in [t for t in s if t not in keep and all(c in done for c in self.consumers.get(t, ()))]:
                del s[t]
