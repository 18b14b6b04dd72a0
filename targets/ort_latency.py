"""Per-layer latency table measured in ONNX Runtime on this CPU (the target probe for latency budgets).

For each quantizable layer we build a one-layer model at the layer's real shapes (batch 1) and time it with
ORT's graph optimizations on, at a fixed thread count:
  fp32 (32, and the size-only precisions 16/4/3/2, which run fp32 compute on CPU):  x -> Layer [-> act] -> y
  int8 (8):  x_u8 -> DequantizeLinear -> Layer [-> act] -> QuantizeLinear -> y_u8, which ORT fuses into the
             integer kernel (QLinearConv / QGemm / QLinearMatMul), so the table holds the kernel's own time
             without boundary conversions.
Timing: 5 warm-up runs per variant, then `runs` rounds in which every variant of the layer is run once
(interleaved, so drift hits all variants alike); the median per variant is kept. Entries are cached as JSON
under cache_dir/ort_latency/ keyed by (op, attributes, shapes, bits, threads, ORT version, CPU).
`model_latency_ms(model)` is the median of `runs` timed runs of the whole model after warm-up.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgec.core.graph import Graph, attrs
from edgec.core.onnx_io import model_bytes, atomic_write, graph_input_names, ort_session

log = logging.getLogger(__name__)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _shapes(model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    inf = onnx.shape_inference.infer_shapes(model)
    out = {}
    for vi in list(inf.graph.value_info) + list(inf.graph.input) + list(inf.graph.output):
        t = vi.type.tensor_type
        if t.HasField("shape"):
            out[vi.name] = tuple(d.dim_value if d.HasField("dim_value") else 1 for d in t.shape.dim)
    return out


def _time_interleaved(sessions: list, feeds: list[dict], runs: int, warmup: int = 5) -> list[float]:
    for s, f in zip(sessions, feeds):
        for _ in range(warmup):
            s.run(None, f)
    ts = [[] for _ in sessions]
    for _ in range(runs):
        for i, (s, f) in enumerate(zip(sessions, feeds)):
            t = time.perf_counter()
            s.run(None, f)
            ts[i].append(time.perf_counter() - t)
    return [float(np.median(t) * 1e3) for t in ts]


class OrtLatencyProbe:
    """Target probe (passes.base.TargetProbe): per-layer latency tables and whole-model latency measured in ORT
    (CPU)."""

    source = "ort_measured"

    def __init__(self, threads: int = 1, cache_dir: str | None = None, runs: int = 30,
                 input_shapes: dict | None = None):
        """input_shapes: the compile shape; a model that keeps dynamic axes is timed at it (not at 1s)."""
        import onnxruntime as ort

        self.threads = int(threads)
        self.cache_dir = cache_dir
        self.runs = int(runs)
        self.input_shapes = {k: tuple(int(d) for d in v) for k, v in (input_shapes or {}).items()}
        self._tag = {"ort": ort.__version__, "cpu": _cpu_name(), "threads": self.threads}
        self.unknown_shape: list[str] = []

    def close(self) -> None:
        """Nothing to free: the probe measures in this process (passes.base.TargetProbe)."""

    def _at(self, model: onnx.ModelProto) -> onnx.ModelProto:
        from edgec.passes.costs import with_input_shapes

        return with_input_shapes(model, self.input_shapes)

    # ------------------------------------------------------------------ whole model
    def model_latency_ms(self, model: onnx.ModelProto, runs: int | None = None) -> float:
        return self.compare_latency_ms([model], runs)[0]

    def compare_latency_ms(self, models: list[onnx.ModelProto], runs: int | None = None) -> list[float]:
        """Medians of several models timed interleaved (same rounds), for ratios under noise.

        Cached on disk by the models' bytes (and ORT version, CPU, threads, runs), like the per-layer tables, so a
        decision taken on measured latency is reproducible: the same inputs give the same model on the same machine
        (delete the cache directory to measure again)."""
        n = runs or max(self.runs, 50)
        models = [self._at(m) for m in models]
        key = {**self._tag, "runs": n, "models": [hashlib.sha256(model_bytes(m)).hexdigest() for m in models]}
        cached = self._cache_get(key, 0, field="ms_list")
        if cached is not None and len(cached) == len(models):
            return [float(x) for x in cached]
        sess = [ort_session(m, threads=self.threads, optimize=True) for m in models]
        res = _time_interleaved(sess, [self._feed(m) for m in models], n)
        self._cache_put(key, 0, [float(x) for x in res], field="ms_list")
        return res

    @staticmethod
    def _feed(model: onnx.ModelProto) -> dict:
        rng = np.random.default_rng(0)
        feeds = {}
        names = set(graph_input_names(model))
        for i in model.graph.input:
            if i.name not in names:
                continue
            t = i.type.tensor_type
            shape = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else 1 for d in t.shape.dim]
            if t.elem_type == TensorProto.UINT8:
                feeds[i.name] = rng.integers(0, 255, shape).astype(np.uint8)
            elif t.elem_type == TensorProto.INT8:
                feeds[i.name] = rng.integers(-127, 127, shape).astype(np.int8)
            elif t.elem_type == TensorProto.INT64:
                feeds[i.name] = np.zeros(shape, np.int64)
            else:
                feeds[i.name] = rng.standard_normal(shape).astype(np.float32)
        return feeds

    # ------------------------------------------------------------------ per-layer table
    def layer_latency_table(self, model: onnx.ModelProto, layers, bits) -> dict[str, dict[int, float]]:
        """{layer name: {bits: ms}} for `layers` (passes.quant.qdq.Layer or names) at each of `bits`."""
        from edgec.passes.quant.qdq import find_layers, output_point

        model = self._at(model)
        all_layers = {L.name: L for L in find_layers(model)}
        layers = [all_layers[L] if isinstance(L, str) else L for L in layers]
        shapes = _shapes(model)
        gi = Graph(model)
        inits, prod = gi.inits, gi.producer
        table = {}
        self.unknown_shape = []
        for L in layers:
            node = gi.node(L.name)
            if not all(d > 0 for d in shapes.get(L.input, ())) or not shapes.get(L.input):
                # input shape not static even at the compile shape (computed by a decode head): no measurement;
                # equal times say "no saving", so the allocator keeps it fp32 unless the budget needs it
                self.unknown_shape.append(L.name)
                table[L.name] = {b: 0.0 for b in bits}
                continue
            op_out = output_point(model, L)
            act = prod[op_out] if op_out != L.output else None
            key_src = {"op": L.op, "attrs": [(k, str(v)) for k, v in attrs(node).items()],
                       "w": list(L.w_shape), "x": list(shapes.get(L.input, ())), "bias": L.bias is not None,
                       "act": act.op_type if act is not None else None, "v": 3, **self._tag}
            variants = sorted({8 if b == 8 else 32 for b in bits})
            cached = {b: self._cache_get(key_src, b) for b in variants}
            todo = [b for b in variants if cached[b] is None]
            if todo:
                models = [self._layer_model(L, node, act, inits, shapes, b) for b in todo]
                sess = [ort_session(m, threads=self.threads, optimize=True) for m in models]
                ms = _time_interleaved(sess, [self._feed(m) for m in models], self.runs)
                for b, v in zip(todo, ms):
                    cached[b] = v
                    self._cache_put(key_src, b, v)
            table[L.name] = {b: cached[8 if b == 8 else 32] for b in bits}
        return table

    def _layer_model(self, L, node, act, inits, shapes, b: int) -> onnx.ModelProto:
        xs = list(shapes.get(L.input) or ())
        if not xs:
            raise ValueError(f"no static shape for the input of layer {L.name}")
        nhwc = L.op == "Conv" and len(xs) == 4
        w = numpy_helper.to_array(inits[L.weight]).astype(np.float32)
        init = []
        nodes = []
        lin = [None, None] + ([L.bias] if L.bias else [])
        y_name = act.output[0] if act is not None else "y"
        if b == 8:
            s_w = np.maximum(np.abs(np.moveaxis(w, L.channel_axis, 0).reshape(w.shape[L.channel_axis], -1)).max(1) / 127, 1e-8)
            bshape = [1] * w.ndim
            bshape[L.channel_axis] = -1
            q = np.clip(np.round(w / s_w.reshape(bshape)), -127, 127).astype(np.int8)
            init += [numpy_helper.from_array(q, "wq"), numpy_helper.from_array(s_w.astype(np.float32), "ws"),
                     numpy_helper.from_array(np.zeros_like(s_w, np.int8), "wz"),
                     numpy_helper.from_array(np.array(0.05, np.float32), "xs"), numpy_helper.from_array(np.array(128, np.uint8), "xz"),
                     numpy_helper.from_array(np.array(0.02, np.float32), "ys"), numpy_helper.from_array(np.array(0, np.uint8), "yz")]
            nodes += [helper.make_node("DequantizeLinear", ["x", "xs", "xz"], ["xf"]),
                      helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["wf"], axis=L.channel_axis)]
            lin[0], lin[1] = "xf", "wf"
            if L.bias:
                bv = numpy_helper.to_array(inits[L.bias]).astype(np.float64).reshape(-1)
                bs = (0.05 * s_w).astype(np.float32)
                init += [numpy_helper.from_array(np.clip(np.round(bv / bs), -2**30, 2**30).astype(np.int32), "bq"),
                         numpy_helper.from_array(bs, "bs"), numpy_helper.from_array(np.zeros(len(bs), np.int32), "bz")]
                nodes.append(helper.make_node("DequantizeLinear", ["bq", "bs", "bz"], ["bf"], axis=0))
                lin[2] = "bf"
            x_in = helper.make_tensor_value_info("x", TensorProto.UINT8, xs)
            if nhwc:
                # feed NHWC and transpose to NCHW: ORT's layout transform of QLinearConv to NHWC then cancels
                # against these, so the model times the kernel alone, as inside a chain of int8 layers
                x_in = helper.make_tensor_value_info("x", TensorProto.UINT8, [xs[0], xs[2], xs[3], xs[1]])
                nodes.insert(0, helper.make_node("Transpose", ["x"], ["x_nchw"], perm=[0, 3, 1, 2]))
                nodes[1].input[0] = "x_nchw"
        else:
            init.append(numpy_helper.from_array(w, "w"))
            if L.bias:
                init.append(numpy_helper.from_array(numpy_helper.to_array(inits[L.bias]), "b"))
                lin[2] = "b"
            lin[0], lin[1] = "x", "w"
            x_in = helper.make_tensor_value_info("x", TensorProto.FLOAT, xs)
        lin_out = "yl" if (act is not None or b == 8) else "y"
        nodes.append(helper.make_node(node.op_type, lin, [lin_out], **attrs(node)))
        cur = lin_out
        if act is not None:
            extra = []
            for k, nm in enumerate(act.input[1:], 1):
                if nm and nm in inits:
                    init.append(onnx.TensorProto())
                    init[-1].CopyFrom(inits[nm])
                    init[-1].name = f"act{k}"
                    extra.append(f"act{k}")
                else:
                    extra.append("")
            out = "ya" if b == 8 else "y"
            nodes.append(helper.make_node(act.op_type, [cur] + extra, [out]))
            cur = out
        if b == 8 and nhwc:
            nodes.append(helper.make_node("QuantizeLinear", [cur, "ys", "yz"], ["y_nchw"]))
            nodes.append(helper.make_node("Transpose", ["y_nchw"], ["y"], perm=[0, 2, 3, 1]))
            y_out = helper.make_tensor_value_info("y", TensorProto.UINT8, None)
        elif b == 8:
            nodes.append(helper.make_node("QuantizeLinear", [cur, "ys", "yz"], ["y"]))
            y_out = helper.make_tensor_value_info("y", TensorProto.UINT8, None)
        else:
            y_out = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
        del y_name
        g = helper.make_graph(nodes, f"layer_{b}", [x_in], [y_out], init)
        return helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)

    def _cache_path(self, key_src: dict, b: int) -> Path | None:
        if not self.cache_dir:
            return None
        h = hashlib.sha256(json.dumps({**key_src, "bits": b}, sort_keys=True).encode()).hexdigest()[:32]
        return Path(self.cache_dir) / "ort_latency" / f"{h}.json"

    def _cache_get(self, key_src: dict, b: int, field: str = "ms"):
        p = self._cache_path(key_src, b)
        if p is not None and p.is_file():
            try:
                v = json.loads(p.read_text())[field]
                return v if isinstance(v, list) else float(v)
            except (ValueError, KeyError, TypeError):
                return None
        return None

    def _cache_put(self, key_src: dict, b: int, ms, field: str = "ms") -> None:
        p = self._cache_path(key_src, b)
        if p is None:
            return
        os.makedirs(p.parent, exist_ok=True)
        with atomic_write(p, "w") as f:
            json.dump({field: ms, "key": key_src, "bits": b}, f)

    # ------------------------------------------------------------------ kernel check (targets own it)
    def effective_precision(self, model: onnx.ModelProto) -> dict:
        """{layer: {claimed, effective, kernel}} after ORT graph optimization, without raising."""
        from edgec.targets.ort_kernels import effective_precision

        return effective_precision(model, threads=self.threads)

    def check_kernels(self, model: onnx.ModelProto, claimed_bits: dict[str, int]) -> dict:
        from edgec.targets.ort_kernels import check_kernels

        return check_kernels(model, claimed_bits, threads=self.threads)


def make_probe(threads: int = 1, cache_dir: str | None = None, input_shapes: dict | None = None) -> OrtLatencyProbe:
    return OrtLatencyProbe(threads=threads, cache_dir=cache_dir or str(Path(".cache") / "edgec"),
                           input_shapes=input_shapes)
