"""Cheap fidelity of channel-removal candidates, for the prune pass's searches (sensitivity scan, GA).

Removing a set S of group g's channels and zeroing S at the input of every consumer of g give the same outputs:
the consumers (Conv/Gemm/MatMul, graph.py) are the only ops that mix g's channels with others (anything else that
does closes the group), and a zero input adds nothing to a linear layer. So with m_S = 0 on S's positions, else 1,

    f(prune(model, S))(x) = f(mask(model))(x, m_S)          (exact; ORT's float summation order aside)

where mask(model) multiplies each consumer input by a mask graph input. Every candidate of a group is then one run
of the *same* graph with a different mask, and only the graph from the group's first consumer on depends on it:

    fid(g, S) = probe(suffix_g(frontier_g(x), m_S))

frontier_g: the original model's tensors that the suffix reads, computed once per group by the prefix graph for the
probe's samples. One ORT session per group serves all its candidates (the sensitivity scan's ratios); the GA,
whose individuals change many groups at once, uses one whole-graph masked session for all of them. No candidate
model is built, serialised or optimised, and the part of the network before the group never runs again.

A group whose consumer inputs have no known rank, or a model with non-float32 consumer inputs, is not maskable:
the caller falls back to building the pruned model (`maskable` says which groups qualify).
"""
from __future__ import annotations

import logging

import numpy as np
import onnx
from onnx import helper

from edgec.core.graph import Graph

log = logging.getLogger(__name__)

__all__ = ["FidelityProbe", "MaskedEval", "maskable"]

_SUFFIX = "__edgec_masked"
_MASK = "__edgec_keep"


class FidelityProbe:
    """exp(-KL(softmax(y_ref) || softmax(y))) averaged over a few calibration samples (1.0 = identical); for
    non-classifier outputs, the mean cosine similarity; behind NMS / TopK, the cosine of the tensors entering it."""

    def __init__(self, model: onnx.ModelProto, ctx, samples: int):
        from edgec.passes.regions import find_postprocess, region_inputs

        self.feeds = [f for _, f in zip(range(samples), ctx.calib_batches())]
        self.threads = ctx.threads
        # outputs behind NMS / TopK are data-dependent (often empty): score the head tensors entering that region
        post = find_postprocess(model, input_shapes=ctx.input_shapes)
        self.taps = region_inputs(model, post) if post.selection else []
        self.ref = self._run(model)

    def names(self, model: onnx.ModelProto) -> list[str]:
        """The tensors the probe scores in `model`: its graph outputs, or the tensors entering NMS / TopK."""
        from edgec.passes.regions import tap_tensors

        return tap_tensors(model, self.taps) if self.taps else [o.name for o in model.graph.output]

    def _run(self, model: onnx.ModelProto) -> list[list[np.ndarray]]:
        from edgec.calib.activations import stream_activations
        from edgec.core.onnx_io import ort_session, run_session

        if not self.taps:
            sess = ort_session(model, threads=self.threads, optimize=True)
            return [run_session(sess, f) for f in self.feeds]
        names = self.names(model)
        return [[d[n] for n in names]
                for d in stream_activations(model, names, self.feeds, threads=self.threads, optimize=True)]

    def __call__(self, model: onnx.ModelProto) -> float:
        return self.score(self._run(model))

    def score(self, outs: list[list[np.ndarray]]) -> float:
        """The probe's figure for per-sample outputs (in `names` order) against the reference's."""
        vals = []
        for out, ref in zip(outs, self.ref):
            for a, r in zip(out, ref):
                logits = not self.taps and np.ndim(a) == 2 and np.shape(a)[1] >= 2  # [N, C]: classifier
                a = np.asarray(a, np.float64).reshape(np.shape(a)[0] if np.ndim(a) else 1, -1)
                r = np.asarray(r, np.float64).reshape(a.shape[0], -1)
                if logits:
                    pa = _log_softmax(a)
                    pr = _log_softmax(r)
                    kl = float((np.exp(pr) * (pr - pa)).sum(1).mean())
                    vals.append(np.exp(-max(kl, 0.0)))
                else:
                    na, nr = np.linalg.norm(a), np.linalg.norm(r)
                    vals.append(float(a.ravel() @ r.ravel() / (na * nr)) if na > 0 and nr > 0 else float(na == nr))
        return float(np.mean(vals)) if vals else 0.0


def _log_softmax(x):
    x = x - x.max(axis=1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=1, keepdims=True))


def _mask_specs(model, groups) -> dict[str, dict] | None:
    """{consumer input tensor: {axis, dim, rank, nodes, groups}} for the groups' consumers; None if not maskable."""
    from edgec.passes.prune import graph as G

    an, _ = G._analysis(model)
    specs: dict[str, dict] = {}
    for g in groups:
        for r in g.consumers:
            n = an.nodes[G._node_index(an, r.node)]
            t = n.input[0]
            lay, rank = an.layouts.get(t), an.rank(t)
            if lay is None or rank is None or an.dtypes.get(t, onnx.TensorProto.FLOAT) != onnx.TensorProto.FLOAT:
                return None
            sp = specs.setdefault(t, {"axis": lay.axis, "dim": len(lay.elems), "rank": rank, "nodes": set(),
                                      "pos": {}})
            sp["nodes"].add(r.node)
            sp["pos"][g.id] = an.positions(t, g.id)
    return specs


def maskable(model, groups) -> bool:
    return _mask_specs(model, groups) is not None


def _insert_masks(model: onnx.ModelProto, specs: dict) -> onnx.ModelProto:
    """A copy of `model` in which every listed consumer reads Mul(t, keep_t); keep_t is a new float graph input."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    nodes = list(m.graph.node)
    first_use: dict[str, int] = {}
    for i, n in enumerate(nodes):
        if n.name in {nm for sp in specs.values() for nm in sp["nodes"]}:
            for t in specs:
                if n.input and n.input[0] == t and n.name in specs[t]["nodes"]:
                    n.input[0] = t + _SUFFIX
                    first_use.setdefault(t, i)
    out = []
    at = {}
    for t, i in first_use.items():
        at.setdefault(i, []).append(t)
    for i, n in enumerate(nodes):
        for t in at.get(i, []):
            out.append(helper.make_node("Mul", [t, t + _MASK], [t + _SUFFIX], name=t + _SUFFIX))
        out.append(n)
    del m.graph.node[:]
    m.graph.node.extend(out)
    for t in first_use:
        sp = specs[t]
        shape = [1] * sp["rank"]
        shape[sp["axis"]] = sp["dim"]
        m.graph.input.append(helper.make_tensor_value_info(t + _MASK, onnx.TensorProto.FLOAT, shape))
    return m


def _needed(nodes, outputs: set[str]) -> list[int]:
    """Indices of the nodes the outputs depend on (backward reachability), in order."""
    need, keep = set(outputs), []
    for i in range(len(nodes) - 1, -1, -1):
        if any(o in need for o in nodes[i].output):
            keep.append(i)
            need.update(x for x in nodes[i].input if x)
    return keep[::-1]


def _sub_model(model, nodes, inputs: list[tuple[str, np.ndarray | onnx.ValueInfoProto]], outputs: list[str]):
    inits = Graph(model).inits
    used = {x for n in nodes for x in n.input if x}
    g = helper.make_graph(
        list(nodes), model.graph.name or "sub",
        [v if isinstance(v, onnx.ValueInfoProto) else
         helper.make_tensor_value_info(nm, helper.np_dtype_to_tensor_dtype(v.dtype), list(v.shape)) for nm, v in inputs],
        [onnx.ValueInfoProto(name=o) for o in outputs],
        initializer=[inits[u] for u in sorted(used) if u in inits])
    m = helper.make_model(g, opset_imports=model.opset_import, ir_version=model.ir_version)
    m.functions.extend(model.functions)
    return m


class MaskedEval:
    """probe-score of keep sets {gid: kept indices} over `groups`, by mask feeds to one session (see module doc).

    suffix=True cuts the graph at the groups' first consumer and caches the frontier for the probe's samples."""

    def __init__(self, model: onnx.ModelProto, groups, probe, *, threads: int = 1, suffix: bool = True):
        from edgec.core.onnx_io import ort_session

        specs = _mask_specs(model, groups)
        if specs is None:
            raise ValueError("groups are not maskable")
        self.specs, self.probe = specs, probe
        masked = _insert_masks(model, specs)
        nodes = list(masked.graph.node)
        names = probe.names(model)
        graph_in = {i.name: i for i in masked.graph.input}
        inits = {t.name for t in masked.graph.initializer}
        subgraphs = any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in nodes
                        for a in n.attribute)
        cut = 0
        if suffix and not subgraphs:
            cut = min(i for i, n in enumerate(nodes) if n.op_type == "Mul" and n.name.endswith(_SUFFIX))
        idx = list(range(len(nodes))) if subgraphs else _needed(nodes, set(names))
        suf = [nodes[i] for i in idx if i >= cut]
        produced = {o for n in suf for o in n.output}
        frontier = sorted({x for n in suf for x in n.input
                           if x and x not in produced and x not in inits and not x.endswith(_MASK)})
        inner = [t for t in frontier if t not in graph_in]
        self.frontier: list[dict[str, np.ndarray]] = []
        if inner:
            pre_idx = _needed(nodes[:cut], set(inner))
            pre_inputs = sorted({x for i in pre_idx for x in nodes[i].input if x in graph_in})
            pre = _sub_model(masked, [nodes[i] for i in pre_idx], [(x, graph_in[x]) for x in pre_inputs], inner)
            sess = ort_session(pre, threads=threads, optimize=True)
            for f in probe.feeds:
                res = sess.run(inner, {k: f[k] for k in pre_inputs})
                self.frontier.append({**{k: f[k] for k in frontier if k in graph_in}, **dict(zip(inner, res))})
        else:
            self.frontier = [{k: f[k] for k in frontier} for f in probe.feeds]
        ins = [(x, self.frontier[0][x]) if self.frontier else (x, graph_in[x]) for x in frontier]
        ins += [(t + _MASK, graph_in[t + _MASK]) for t in specs]
        self.names = names
        self.sess = ort_session(_sub_model(masked, suf, ins, names), threads=threads, optimize=True)
        self.runs = 0

    def masks(self, keep_idx: dict[int, np.ndarray]) -> dict[str, np.ndarray]:
        out = {}
        for t, sp in self.specs.items():
            m = np.ones(sp["dim"], np.float32)
            for gid, pos in sp["pos"].items():
                kept = keep_idx.get(gid)
                if kept is not None and len(kept) < len(pos):
                    drop = np.setdiff1d(np.arange(len(pos)), kept)
                    m[pos[drop].ravel()] = 0.0
            shape = [1] * sp["rank"]
            shape[sp["axis"]] = sp["dim"]
            out[t + _MASK] = m.reshape(shape)
        return out

    def __call__(self, keep_idx: dict[int, np.ndarray]) -> float:
        mk = self.masks(keep_idx)
        outs = [self.sess.run(self.names, {**fr, **mk}) for fr in self.frontier]
        self.runs += 1
        return self.probe.score(outs)


# ----------------------------------------------------------------------------- searches through the executor
_EVALS: dict = {}  # per process: (payload id, kind) -> MaskedEval, so the tasks of one search share a session


def _payload_eval(P: dict, key, groups):
    k = (id(P), key)
    if k not in _EVALS:
        if len(_EVALS) > 2:
            _EVALS.clear()
        if P["masked"] and maskable(P["model"], groups):
            _EVALS[k] = MaskedEval(P["model"], groups, P["probe"], threads=P["threads"], suffix=key != "all")
        else:
            _EVALS[k] = _Physical(P)
    return _EVALS[k]


class _Physical:
    """The fallback: build the pruned model and run the probe on it."""

    def __init__(self, P):
        self.P = P
        self.runs = 0

    def __call__(self, keep_idx):
        from edgec.passes.prune.apply import remove_channels

        self.runs += 1
        return self.P["probe"](remove_channels(self.P["model"], keep_idx, self.P["groups"])[0])


def _kept(g, scores, k: int) -> np.ndarray:
    from edgec.passes.prune import allocate as alloc
    from edgec.passes.prune.graph import select_channels

    if g.align > 1 and k % g.align:
        k = alloc.round_keep(k, g.size, 1, g.align)
    return select_channels(g, scores, int(k))


def scan_group(payload, gid: int) -> dict[float, float]:
    """One group's sensitivity curve {ratio: 1 - fid(g kept at ratio)} (a pure function of the payload and gid)."""
    from edgec.core.executor import get_handle
    from edgec.passes.prune import allocate as alloc

    P = get_handle(payload)
    g = next(x for x in P["groups"] if x.id == gid)
    cur, ev = {}, None
    try:
        for r in P["ratios"]:
            kk = alloc.round_keep(r * g.size, g.size, P["round_to"], g.align)
            if kk >= g.size:
                cur[r] = 0.0
                continue
            ev = ev or _payload_eval(P, gid, [g])
            cur[r] = 1.0 - ev({gid: _kept(g, P["scores"][gid], kk)})
    finally:
        _EVALS.pop((id(P), gid), None)
    return cur


def ga_fidelity(payload, keep: dict[int, int]) -> float:
    """probe fidelity of one GA individual (keep counts per group), on the shared whole-graph masked session."""
    from edgec.core.executor import get_handle

    P = get_handle(payload)
    by_id = {g.id: g for g in P["groups"]}
    idx = {gid: _kept(by_id[gid], P["scores"][gid], k) for gid, k in keep.items() if k < by_id[gid].size}
    return _payload_eval(P, "all", [by_id[gid] for gid in P["search"]])(idx)


def release(payload) -> None:
    """Drop this process's sessions for a finished search (in process; Ray workers drop theirs with the worker)."""
    for k in [k for k in _EVALS if k[0] == id(payload)]:
        del _EVALS[k]


def make_payload(model, groups, scores, probe, *, ratios=(), round_to=1, threads=1, search=(), masked=True) -> dict:
    """What every task of one search shares (put in the executor's object store once)."""
    return {"model": model, "groups": groups, "scores": scores, "probe": probe, "ratios": tuple(ratios),
            "round_to": round_to, "threads": threads, "search": tuple(search), "masked": masked}
