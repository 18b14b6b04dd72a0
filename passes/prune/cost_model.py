"""The analytic cost model of removing channels: (MACs, params) as a function of the kept count per group, exact and
linear per factor (passes/prune/graph.py derives it)."""
from __future__ import annotations

import numpy as np
import onnx

from edgec.passes.prune import groups as _groups
from edgec.passes.prune.layout import _FLOAT_TYPES, _PARAM_TYPES, Group


class CostModel:
    """(MACs, params) as a function of kept channels per group; exact against passes.costs.count_costs."""

    def __init__(self, model: onnx.ModelProto, groups: list[Group] | None = None, input_shapes: dict | None = None):
        from edgec.passes.costs import count_costs

        an, gs = _groups._analysis(model)
        if groups is not None:
            _check_groups(gs, groups)
        self.sizes = {g.id: g.size for g in gs}
        base = count_costs(model, input_shapes)
        self.base_macs = int(base.macs)
        self.base_params = int(base.params)
        self._tensors: dict[str, tuple[int, dict[int, int]]] = {}

        def lin(t):
            if t not in self._tensors:
                self._tensors[t] = (len(an.layouts[t].elems), an.counts(t))
            return t

        self._mac_terms = []
        for m in an.macs:
            name = an.names[m.node]
            b = base.per_node.get(name, 0)
            if b:
                self._mac_terms.append((b, [lin(t) for t in m.factors if t in an.layouts]))
        init_size = {i.name: int(np.prod(i.dims)) for i in model.graph.initializer
                     if i.data_type in _PARAM_TYPES and len(i.dims) >= 1}
        for n in model.graph.node:  # Constant nodes count as params too (passes.costs.count_params)
            if n.op_type == "Constant":
                for a in n.attribute:
                    if a.name == "value" and a.t.data_type in _FLOAT_TYPES and len(a.t.dims) >= 1:
                        init_size[n.output[0]] = int(np.prod(a.t.dims))
        # per initializer: its size and, per class of users, the tensors driving each sliced axis
        self._param_terms = []
        for nm, classes in an.init_classes.items():
            if nm in init_size:
                cls = [[lin(t) for t in specs.values()] for specs, _ in classes.values()]
                self._param_terms.append((init_size[nm], cls))

    def _kept(self, t: str, keep: dict[int, int]) -> float:
        total, counts = self._tensors[t]
        return sum(r * keep.get(g, self.sizes[g]) for g, r in counts.items()) / total

    def costs(self, keep: dict[int, int]) -> tuple[int, int]:
        """(macs, params) when group g keeps keep[g] channels (groups not in keep keep all)."""
        cache: dict[str, float] = {}

        def f(t):
            if t not in cache:
                cache[t] = self._kept(t, keep)
            return cache[t]

        macs = self.base_macs
        for b, ts in self._mac_terms:
            p = 1.0
            for t in ts:
                p *= f(t)
            macs += b * p - b
        params = self.base_params
        for size, cls in self._param_terms:
            if len(cls) == 1:
                p = 1.0
                for t in cls[0]:
                    p *= f(t)
                params += size * p - size
                continue
            # shared initializer: each changed class gets its own copy; the original stays if any class is unchanged
            orig, extra = False, 0.0
            for ts in cls:
                p = 1.0
                for t in ts:
                    p *= f(t)
                if p >= 1.0:
                    orig = True
                else:
                    extra += size * p
            params += extra - (0 if orig else size)
        return int(round(macs)), int(round(params))


def _check_groups(ours: list[Group], theirs: list[Group]) -> None:
    if len(ours) != len(theirs) or any(a.id != b.id or a.size != b.size for a, b in zip(ours, theirs)):
        raise ValueError("groups do not belong to this model (re-run analyze on it)")
