"""Run and time a serialized TensorRT 10.x engine (standalone: needs only tensorrt, numpy and cuda-python).

This file is copied verbatim into the Jetson bundle's bench.py, so it imports nothing from edgec, has no
`from __future__` line and no main block, and runs on Python 3.8+.

Latency: deserialize, set every I/O tensor address, then `execute_async_v3` on a CUDA stream; each timed run
is bracketed by two CUDA events (cudaEventElapsedTime) after `warmup` untimed runs, over `runs` >= 200 runs;
reported as median / p90 / p99 (linear-interpolated percentiles) in milliseconds. Inputs stay resident on
the GPU, so the times exclude host<->device copies.
Baseline: `run_engines` runs a baseline engine (FP16 from the original ONNX) and the compiled engine in one
process: fidelity of both against the same reference outputs, then timing interleaved in blocks of runs whose
order alternates (A B, B A, ...), so clock or thermal drift hits both alike; the speedup is the ratio of
the medians, with the median of the per-block ratios next to it.
Memory: the execution context's device memory (`device_memory_size_v2`, or `device_memory_size` before
TensorRT 10.1) plus the serialized engine bytes and the I/O buffers.
Fidelity: the same formulas as edgec's comparator (pipeline/fidelity.py): per sample,
cosine = <a, r> / (|a| |r|) averaged over samples; rel_l2 = |a - r| / |r| over all samples; max_abs; and for
2-D logits, top-1 / top-5 agreement with the reference argmax.
"""
import json
import logging
import os
import time

import numpy as np

log = logging.getLogger("edgec.tensorrt.runner")

MIN_TIMED_RUNS = 200
REPORT_SCHEMA = "edgec.report/1"


class CudaError(RuntimeError):
    """A CUDA runtime call failed (or no CUDA device / cuda-python)."""


def load_cudart():
    """cuda-python's runtime module: cuda.bindings.runtime (cuda-python >= 12.6) or cuda.cudart (older)."""
    try:
        from cuda.bindings import runtime as cudart
        return cudart
    except ImportError:
        pass
    try:
        from cuda import cudart
        return cudart
    except ImportError:
        raise CudaError("cuda-python not installed (pip install cuda-python)")


class Cuda:
    """The few CUDA runtime calls the runner needs, with errors raised as CudaError."""

    def __init__(self, cudart=None):
        self.rt = cudart or load_cudart()

    def _ck(self, ret):
        if not isinstance(ret, tuple):
            ret = (ret,)
        err = ret[0]
        if int(err) != 0:
            name = getattr(err, "name", str(err))
            raise CudaError("CUDA error %s" % name)
        if len(ret) == 1:
            return None
        return ret[1] if len(ret) == 2 else ret[1:]

    def device_count(self):
        return int(self._ck(self.rt.cudaGetDeviceCount()))

    def device_name(self, dev=0):
        props = self._ck(self.rt.cudaGetDeviceProperties(dev))
        name = props.name
        if isinstance(name, bytes):
            name = name.split(b"\0", 1)[0].decode(errors="replace")
        return str(name)

    def mem_info(self):
        free, total = self._ck(self.rt.cudaMemGetInfo())
        return int(free), int(total)

    def malloc(self, nbytes):
        return int(self._ck(self.rt.cudaMalloc(max(int(nbytes), 1))))

    def free(self, ptr):
        self._ck(self.rt.cudaFree(ptr))

    def h2d(self, dst, arr):
        arr = np.ascontiguousarray(arr)
        self._ck(self.rt.cudaMemcpy(dst, arr.ctypes.data, arr.nbytes, self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice))

    def d2h(self, arr, src):
        assert arr.flags["C_CONTIGUOUS"]
        self._ck(self.rt.cudaMemcpy(arr.ctypes.data, src, arr.nbytes, self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost))

    def d2d(self, dst, src, nbytes):
        self._ck(self.rt.cudaMemcpy(dst, src, nbytes, self.rt.cudaMemcpyKind.cudaMemcpyDeviceToDevice))

    def d2d_async(self, dst, src, nbytes, stream):
        self._ck(self.rt.cudaMemcpyAsync(dst, src, nbytes, self.rt.cudaMemcpyKind.cudaMemcpyDeviceToDevice, stream))

    def stream(self):
        return self._ck(self.rt.cudaStreamCreate())

    def stream_sync(self, stream):
        self._ck(self.rt.cudaStreamSynchronize(stream))

    def stream_destroy(self, stream):
        self._ck(self.rt.cudaStreamDestroy(stream))

    def event(self):
        return self._ck(self.rt.cudaEventCreate())

    def record(self, event, stream):
        self._ck(self.rt.cudaEventRecord(event, stream))

    def elapsed_ms(self, start, end):
        self._ck(self.rt.cudaEventSynchronize(end))
        return float(self._ck(self.rt.cudaEventElapsedTime(start, end)))

    def event_destroy(self, event):
        self._ck(self.rt.cudaEventDestroy(event))


def stream_handle(stream):
    """The integer handle TensorRT's execute_async_v3 takes."""
    try:
        return int(stream)
    except TypeError:
        return int(stream.getPtr())


def gpu_status():
    """(available, reason): whether tensorrt (10.x) and a CUDA GPU are usable on this host."""
    try:
        import tensorrt as trt
    except ImportError:
        return False, "tensorrt not installed"
    v = getattr(trt, "__version__", "0")
    try:
        major = int(str(v).split(".")[0])
    except ValueError:
        major = 0
    if not 10 <= major < 11:
        return False, "TensorRT %s is not supported (need 10.x)" % v
    try:
        n = Cuda().device_count()
    except CudaError as e:
        return False, "no usable CUDA GPU (%s)" % e
    if n < 1:
        return False, "no CUDA GPU"
    return True, "TensorRT %s, %d CUDA device(s)" % (v, n)


def summarize_ms(times):
    """Latency summary of per-run milliseconds: median, p90, p99 (linear interpolation), mean, min, max."""
    t = np.asarray(times, dtype=np.float64)
    if t.size == 0:
        raise ValueError("no timings")
    p50, p90, p99 = np.percentile(t, [50, 90, 99])
    return {"median": float(p50), "p90": float(p90), "p99": float(p99), "mean": float(t.mean()),
            "min": float(t.min()), "max": float(t.max()), "std": float(t.std()), "runs": int(t.size)}


# ----------------------------------------------------------------------------- fidelity

def fidelity(cand, ref, names, labels=None):
    """cand/ref: per sample, a list of output arrays (same order as names). Same schema as core.fidelity."""
    per = {}
    for j, name in enumerate(names):
        n = 0
        cos_sum = err_sq = ref_sq = max_abs = max_ref = 0.0
        top1 = top5 = correct = labelled = ref_correct = 0
        classifier = False
        for s, (co, ro) in enumerate(zip(cand, ref)):
            a = np.asarray(co[j], np.float64)
            r = np.asarray(ro[j], np.float64)
            if a.shape != r.shape:
                raise ValueError("output '%s' shape %s != reference %s" % (name, a.shape, r.shape))
            rows = a.shape[0] if a.ndim else 1
            for i in range(rows):
                ai, ri = (a[i], r[i]) if a.ndim else (a, r)
                na, nr = np.linalg.norm(ai), np.linalg.norm(ri)
                cos_sum += float(ai.ravel() @ ri.ravel() / (na * nr)) if na > 0 and nr > 0 else float(na == nr)
                d = ai - ri
                err_sq += float((d * d).sum())
                ref_sq += float((ri * ri).sum())
                max_abs = max(max_abs, float(np.abs(d).max()) if d.size else 0.0)
                max_ref = max(max_ref, float(np.abs(ri).max()) if ri.size else 0.0)
                n += 1
            if a.ndim == 2 and a.shape[1] >= 2:
                classifier = True
                rt = r.argmax(1)
                top1 += int((a.argmax(1) == rt).sum())
                k = min(5, a.shape[1])
                top5 += int((np.argsort(-a, axis=1)[:, :k] == rt[:, None]).any(1).sum())
                if labels is not None:
                    lab = np.asarray(labels[s]).reshape(-1)
                    labelled += a.shape[0]
                    correct += int((a.argmax(1) == lab).sum())
                    ref_correct += int((rt == lab).sum())
        out = {"samples": n, "cosine": cos_sum / max(n, 1),
               "rel_l2": float(np.sqrt(err_sq / ref_sq)) if ref_sq > 0 else float(err_sq > 0),
               "max_abs": max_abs, "max_rel": max_abs / max_ref if max_ref > 0 else float(max_abs > 0)}
        if classifier:
            out["top1_agreement"] = top1 / max(n, 1)
            out["top5_agreement"] = top5 / max(n, 1)
        if labelled:
            out["accuracy"] = correct / labelled
            out["reference_accuracy"] = ref_correct / labelled
        per[name] = out
    first = per[names[0]]
    summary = {k: first[k] for k in ("top1_agreement", "top5_agreement", "accuracy", "reference_accuracy") if k in first}
    summary["cosine_min"] = min(p["cosine"] for p in per.values())
    summary["max_rel"] = max(p["max_rel"] for p in per.values())
    summary["rel_l2_max"] = max(p["rel_l2"] for p in per.values())
    return {"summary": summary, "per_output": per}


# ----------------------------------------------------------------------------- engine

class EngineRunner:
    """Deserialized engine + execution context + device buffers; use as a context manager."""

    def __init__(self, engine_path, cuda=None):
        import tensorrt as trt

        self.trt = trt
        self.cuda = cuda or Cuda()
        self.engine_path = str(engine_path)
        with open(self.engine_path, "rb") as f:
            self.engine_bytes = f.read()
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(self.engine_bytes)
        if self.engine is None:
            raise RuntimeError("TensorRT could not deserialize %s (built for another GPU or TensorRT version?)"
                               % os.path.basename(self.engine_path))
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self.dtypes = {n: np.dtype(trt.nptype(self.engine.get_tensor_dtype(n))) for n in names}
        self.buffers = {}
        self.shapes = {}
        self.stream = self.cuda.stream()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        for ptr in self.buffers.values():
            try:
                self.cuda.free(ptr)
            except CudaError:
                pass
        self.buffers = {}
        if self.stream is not None:
            self.cuda.stream_destroy(self.stream)
            self.stream = None

    def device_memory_bytes(self):
        size = getattr(self.engine, "device_memory_size_v2", None)
        if size is None:
            size = self.engine.device_memory_size
        return int(size)

    def _alloc(self, name, shape):
        nbytes = int(np.prod(shape)) * self.dtypes[name].itemsize
        if name in self.buffers and self.shapes.get(name, (None, 0))[1] >= nbytes:
            self.shapes[name] = (tuple(shape), self.shapes[name][1])
            return
        if name in self.buffers:
            self.cuda.free(self.buffers[name])
        self.buffers[name] = self.cuda.malloc(nbytes)
        self.shapes[name] = (tuple(shape), nbytes)
        self.context.set_tensor_address(name, self.buffers[name])

    def set_inputs(self, feeds):
        missing = [n for n in self.inputs if n not in feeds]
        if missing:
            raise KeyError("missing engine input(s): %s" % ", ".join(missing))
        for n in self.inputs:
            a = np.ascontiguousarray(feeds[n], dtype=self.dtypes[n])
            if not self.context.set_input_shape(n, tuple(a.shape)):
                raise ValueError("input %s: shape %s is outside the engine's optimization profile" % (n, a.shape))
            self._alloc(n, a.shape)
            self.cuda.h2d(self.buffers[n], a)
        for n in self.outputs:
            shape = tuple(self.context.get_tensor_shape(n))
            if any(d < 0 for d in shape):
                raise ValueError("output %s has unresolved shape %s" % (n, shape))
            self._alloc(n, shape)

    def execute(self):
        if not self.context.execute_async_v3(stream_handle(self.stream)):
            raise RuntimeError("execute_async_v3 failed")

    def infer(self, feeds):
        self.set_inputs(feeds)
        self.execute()
        self.cuda.stream_sync(self.stream)
        outs = []
        for n in self.outputs:
            arr = np.empty(self.shapes[n][0], dtype=self.dtypes[n])
            self.cuda.d2h(arr, self.buffers[n])
            outs.append(arr)
        return outs

    def warm(self, feeds, warmup):
        self.set_inputs(feeds)
        for _ in range(max(warmup, 0)):
            self.execute()
        self.cuda.stream_sync(self.stream)

    def timed_runs(self, n, start, end, wall=None):
        """n executions, each bracketed by CUDA events on this runner's stream; per-run milliseconds."""
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            self.cuda.record(start, self.stream)
            self.execute()
            self.cuda.record(end, self.stream)
            times.append(self.cuda.elapsed_ms(start, end))
            if wall is not None:
                wall.append((time.perf_counter() - t0) * 1e3)
        return times

    def time(self, feeds, warmup=20, runs=MIN_TIMED_RUNS):
        """CUDA-event time of each of `runs` executions after `warmup` untimed ones; inputs stay on the GPU."""
        if runs < MIN_TIMED_RUNS:
            raise ValueError("need at least %d timed runs, got %d" % (MIN_TIMED_RUNS, runs))
        self.warm(feeds, warmup)
        start, end = self.cuda.event(), self.cuda.event()
        wall = []
        try:
            times = self.timed_runs(runs, start, end, wall)
        finally:
            self.cuda.event_destroy(start)
            self.cuda.event_destroy(end)
        out = summarize_ms(times)
        out["warmup"] = int(warmup)
        out["timer"] = "cuda-events around execute_async_v3 (inputs resident on GPU)"
        out["host_wall_median"] = float(np.median(wall))
        return out

    def memory(self):
        return {"device_memory_bytes": self.device_memory_bytes(), "engine_bytes": len(self.engine_bytes),
                "io_bytes": int(sum(s[1] for s in self.shapes.values())),
                "source": "device_memory_size_v2" if hasattr(self.engine, "device_memory_size_v2") else "device_memory_size"}


def run_engine(engine_path, samples, ref_outputs=None, output_names=None, labels=None, warmup=20,
               runs=MIN_TIMED_RUNS):
    """Run every sample once (for fidelity), then time the first sample. Returns latency/memory/fidelity."""
    with EngineRunner(engine_path) as r:
        outs = [r.infer(s) for s in samples]
        lat = r.time(samples[0], warmup=warmup, runs=runs)
        mem = r.memory()
        result = {"latency_ms": lat, "memory": mem, "engine_inputs": r.inputs, "engine_outputs": r.outputs}
        if ref_outputs is not None:
            names = list(output_names or r.outputs)
            order = [r.outputs.index(n) for n in names]
            cand = [[o[i] for i in order] for o in outs]
            result["fidelity"] = fidelity(cand, ref_outputs, names, labels)
        result["outputs"] = outs
        try:
            result["device"] = r.cuda.device_name()
        except CudaError:
            result["device"] = "unknown"
        return result


def time_interleaved(runners, feeds, warmup=20, runs=MIN_TIMED_RUNS, block=10):
    """Time several engines in one run: blocks of `block` runs each, the order alternating every round.

    runners: {role: EngineRunner} (the first role is the baseline). Returns {role: latency summary} with
    "speedup_vs_<baseline>" (ratio of medians) and "block_ratio_median" (median of per-round ratios).
    """
    if runs < MIN_TIMED_RUNS:
        raise ValueError("need at least %d timed runs, got %d" % (MIN_TIMED_RUNS, runs))
    roles = list(runners)
    for r in roles:
        runners[r].warm(feeds, warmup)
    cuda = runners[roles[0]].cuda
    start, end = cuda.event(), cuda.event()
    times = {r: [] for r in roles}
    block_medians = {r: [] for r in roles}
    try:
        for i in range((runs + block - 1) // block):
            n = min(block, runs - i * block)
            for r in (roles if i % 2 == 0 else roles[::-1]):
                t = runners[r].timed_runs(n, start, end)
                times[r] += t
                block_medians[r].append(float(np.median(t)))
    finally:
        cuda.event_destroy(start)
        cuda.event_destroy(end)
    base = roles[0]
    out = {}
    for r in roles:
        out[r] = summarize_ms(times[r])
        out[r]["warmup"] = int(warmup)
        out[r]["timer"] = "cuda-events around execute_async_v3, interleaved blocks of %d (inputs resident on GPU)" % block
        if r != base:
            out[r]["speedup_vs_" + base] = out[base]["median"] / out[r]["median"]
            ratios = [b / c for b, c in zip(block_medians[base], block_medians[r]) if c > 0]
            out[r]["block_ratio_median"] = float(np.median(ratios)) if ratios else None
    return out


def run_engines(engines, samples, ref_outputs=None, output_names=None, labels=None, warmup=20,
                runs=MIN_TIMED_RUNS, block=10):
    """engines: {role: path}, baseline first. Fidelity of each engine on every sample, then interleaved timing.

    Returns {"engines": {role: {"latency_ms", "memory", "fidelity", "engine_inputs", "engine_outputs"}},
    "device": name, "roles": [...]}.
    """
    cuda = Cuda()
    runners = {}
    try:
        for role, path in engines.items():
            runners[role] = EngineRunner(path, cuda=cuda)
        res = {}
        for role, r in runners.items():
            outs = [r.infer(s) for s in samples]
            res[role] = {"engine_inputs": r.inputs, "engine_outputs": r.outputs}
            if ref_outputs is not None:
                names = list(output_names or r.outputs)
                cand = [[o[r.outputs.index(n)] for n in names] for o in outs]
                res[role]["fidelity"] = fidelity(cand, ref_outputs, names, labels)
        lat = time_interleaved(runners, samples[0], warmup=warmup, runs=runs, block=block)
        for role, r in runners.items():
            res[role]["latency_ms"] = lat[role]
            res[role]["memory"] = r.memory()
        try:
            device = cuda.device_name()
        except CudaError:
            device = "unknown"
        return {"engines": res, "device": device, "roles": list(engines)}
    finally:
        for r in runners.values():
            r.close()


def make_report(*, model, target, latency_ms=None, memory=None, fidelity_result=None, environment=None,
                comparable=False, comparable_reason="", build=None, extra=None):
    """The edgec report dict (JSON-serializable). Keys absent from a measurement are left out, never invented."""
    rep = {"schema": REPORT_SCHEMA, "model": model, "target": target, "batch": 1,
           "comparable": bool(comparable), "comparable_reason": comparable_reason}
    if latency_ms is not None:
        rep["latency_ms"] = latency_ms
    if memory is not None:
        rep["memory"] = memory
    if fidelity_result is not None:
        rep["fidelity"] = fidelity_result
    if environment is not None:
        rep["environment"] = environment
    if build is not None:
        rep["build"] = build
    if extra:
        rep.update(extra)
    return rep


def write_json(path, obj):
    """Atomic JSON write (sorted keys, trailing newline)."""
    path = str(path)
    tmp = "%s.tmp-%d" % (path, os.getpid())
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=_json_default)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError("not JSON-serializable: %s" % type(o).__name__)
