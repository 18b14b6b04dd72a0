"""Devices on a Ray cluster: the target's cost probe measured on the device, and benchmark fan-out (bench-farm).

A device joins the cluster as a Ray node carrying a custom resource named after it, e.g.
`ray start --address HEAD:6379 --resources '{"jetson_orin_nano": 1}'` (docs/cluster.md). The resource count is 1,
so a device runs one edgec measurement at a time: whatever holds it (a probe actor, a benchmark task) has the
device to itself.

Remote probe (`RemoteProbe`, compile's `--probe-device RESOURCE`): the target's own probe (`make_probe` of the target
module, e.g. targets.ort_latency.OrtLatencyProbe) is constructed inside a Ray actor pinned to a node with that
resource; the quantizer's per-layer latency tables and whole-model latencies are then measured on the device, and
cached there (the cache key names the device's CPU and runtime versions). Every call has a timeout; a node that is
missing or lost is one EdgecError line, never a wait.

Bench fan-out (`bench_farm`, `python -m pipeline bench-farm`): the compiled bundle (an OUT directory) goes to the
object store once; on every live node carrying each requested device resource, one task (that resource: 1, pinned
to the node) unpacks it in a temporary directory and benchmarks it: a Jetson bundle with its own bench.py
(`python3 bench.py --build`, TensorRT on the device), anything else as ONNX Runtime on the device's CPU (model.onnx,
batch 1, interleaved, >= 20 warm-ups and >= 200 runs per thread count). The results are merged into one report,
farm.json + farm.md, with one table per device.
"""
from __future__ import annotations

import io
import json
import logging
import os
import socket
import tarfile
from pathlib import Path
from typing import Any

from edgec.core.errors import EdgecError
from edgec.core.executor import RayExecutor, make_executor

log = logging.getLogger(__name__)

CALL_TIMEOUT_S = float(os.environ.get("EDGEC_PROBE_TIMEOUT_S", 1800))


def _ray_executor(executor) -> RayExecutor:
    if not isinstance(executor, RayExecutor):
        raise EdgecError("device measurements need a Ray cluster: give --cluster (or set EDGEC_CLUSTER)")
    return executor


def device_nodes(executor, resource: str) -> list[dict]:
    """Live nodes carrying `resource`, sorted by node id: [{node_id, host, resources}]."""
    ray = _ray_executor(executor).ray
    out = [{"node_id": n["NodeID"], "host": n.get("NodeManagerHostname") or n.get("NodeManagerAddress", ""),
            "resources": dict(n.get("Resources", {}))}
           for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get(resource, 0) >= 1]
    return sorted(out, key=lambda d: d["node_id"])


def wait_for(ray, ref, timeout_s: float):
    """ray.get with a deadline, polling once a second (so the caller stays interruptible); GetTimeoutError after."""
    import time

    deadline = time.monotonic() + timeout_s
    while True:
        ready, _ = ray.wait([ref], timeout=min(1.0, max(0.0, deadline - time.monotonic())))
        if ready:
            return ray.get(ready[0])
        if time.monotonic() >= deadline:
            raise ray.exceptions.GetTimeoutError(f"no result within {timeout_s:.0f} s")


def _where() -> dict:
    import platform

    import ray

    from edgec.targets.ort_latency import _cpu_name

    return {"node_id": ray.get_runtime_context().get_node_id(), "hostname": socket.gethostname(),
            "cpu": _cpu_name(), "machine": platform.machine(), "pid": os.getpid()}


# ----------------------------------------------------------------------------- remote probe

class _ProbeHost:
    """Lives on the device (a Ray actor): the target's probe, built there, answering calls by method name."""

    def __init__(self, target: str, threads: int, cache_dir: str | None, input_shapes: dict | None):
        from edgec.targets.base import get_target

        make = get_target(target).make_probe
        if make is None:
            raise EdgecError(f"target '{target}' has no cost probe to run on a device")
        self.probe = make(threads, cache_dir, input_shapes=input_shapes)

    def where(self) -> dict:
        return _where()

    def call(self, method: str, *args) -> tuple[Any, list]:
        res = getattr(self.probe, method)(*args)
        return res, list(self.probe.unknown_shape)


class RemoteProbe:
    """The target's cost probe as a Ray actor on a node with `resource` (same methods as the local probe)."""

    def __init__(self, executor, target: str, resource: str, threads: int = 1, cache_dir: str | None = None,
                 input_shapes: dict | None = None, timeout_s: float = CALL_TIMEOUT_S):
        from edgec.targets.base import get_target

        ex = _ray_executor(executor)
        self.ray, self.resource, self.timeout_s = ex.ray, resource, float(timeout_s)
        if get_target(target).make_probe is None:
            raise EdgecError(f"target '{target}' has no cost probe to run on a device (--probe-device applies to "
                             "targets that measure latency costs, today: ort)")
        nodes = device_nodes(ex, resource)
        if not nodes:
            raise EdgecError(f"no live node in the cluster carries the resource '{resource}' "
                             f"(start the device with: ray start --address HEAD:PORT --resources '{{\"{resource}\": 1}}')")
        actor_cls = self.ray.remote(num_cpus=0, resources={resource: 1}, max_restarts=1, max_task_retries=1)(_ProbeHost)
        self._actor = actor_cls.remote(target, int(threads), cache_dir, dict(input_shapes or {}) or None)
        self.where = self._get(self._actor.where.remote(), "start")
        self.source = f"remote:{resource}"
        self.unknown_shape: list = []
        log.info("cost probe for '%s' runs on %s (node %s, %s)", target, self.where["hostname"],
                 self.where["node_id"][:12], self.where["cpu"])

    def _get(self, ref, what: str):
        ray = self.ray
        try:
            return wait_for(ray, ref, self.timeout_s)
        except ray.exceptions.GetTimeoutError:
            raise EdgecError(f"the probe on '{self.resource}' did not answer '{what}' within {self.timeout_s:.0f} s "
                             "(is the device busy or gone?)") from None
        except ray.exceptions.RayTaskError as e:
            cause = getattr(e, "cause", None)
            if isinstance(cause, EdgecError):
                raise cause from None
            raise EdgecError(f"the probe on '{self.resource}' failed in '{what}': {str(e).strip().splitlines()[-1]}") from None
        except ray.exceptions.RayError as e:
            raise EdgecError(f"the probe on '{self.resource}' was lost in '{what}' ({type(e).__name__})") from None

    def _call(self, method: str, *args):
        res, self.unknown_shape = self._get(self._actor.call.remote(method, *args), method)
        return res

    def layer_latency_table(self, model, layers, bits):
        names = [L if isinstance(L, str) else L.name for L in layers]
        return self._call("layer_latency_table", model, names, list(bits))

    def model_latency_ms(self, model, runs: int | None = None) -> float:
        return self._call("model_latency_ms", model, runs)

    def compare_latency_ms(self, models, runs: int | None = None) -> list[float]:
        return self._call("compare_latency_ms", list(models), runs)

    def effective_precision(self, model) -> dict:
        return self._call("effective_precision", model)

    def check_kernels(self, model, claimed_bits) -> dict:
        return self._call("check_kernels", model, claimed_bits)

    def close(self) -> None:
        """Stop the actor, which frees the device (compile calls this when its passes are done)."""
        actor, self._actor = getattr(self, "_actor", None), None
        if actor is not None:
            try:
                self.ray.kill(actor)
            except Exception:  # noqa: BLE001 - already gone
                pass

    def __del__(self):
        self.close()


def make_compile_probe(executor, target: str, resource: str | None, threads: int, cache_dir: str | None,
                       input_shapes: dict | None):
    """compile's probe: remote on `resource` when given (needs a cluster), else the target's local probe."""
    if resource:
        return RemoteProbe(executor, target, resource, threads, cache_dir, input_shapes)
    from edgec.targets.base import get_target

    make = get_target(target).make_probe
    return make(threads, cache_dir, input_shapes=input_shapes) if make else None


# ----------------------------------------------------------------------------- bench fan-out

def _pack(bundle: Path) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        tf.add(str(bundle), arcname="bundle")
    return buf.getvalue()


def _bench_here(packed: bytes, device: str, threads: tuple[int, ...], runs: int, warmup: int) -> dict:
    """Runs on the device: unpack the bundle, benchmark it, say where it ran."""
    import subprocess
    import sys
    import tempfile

    with tempfile.TemporaryDirectory(prefix="edgec-farm-") as tmp:
        with tarfile.open(fileobj=io.BytesIO(packed), mode="r:gz") as tf:
            tf.extractall(tmp, filter="data")
        b = Path(tmp) / "bundle"
        if (b / "bench.py").is_file() and (b / "build_engine.py").is_file():  # a Jetson bundle: TensorRT on device
            p = subprocess.run([sys.executable, "bench.py", "--build", "--out", str(b / "farm.json"), "--runs", str(runs),
                                "--warmup", str(warmup)], cwd=b, capture_output=True, text=True, timeout=CALL_TIMEOUT_S)
            if p.returncode != 0:
                tail = (p.stderr or p.stdout).strip().splitlines()[-1:] or [""]
                return {"device": device, **_where(), "ok": False, "error": f"bench.py exit {p.returncode}: {tail[0]}"}
            rep = json.loads((b / "farm.json").read_text())
            return {"device": device, **_where(), "ok": True, "kind": "tensorrt", "bench": rep.get("bench", rep)}
        return {"device": device, **_where(), "ok": True, "kind": "ort_cpu",
                "bench": _ort_bench(b / "model.onnx", threads, runs, warmup)}


def _ort_bench(model_path: Path, threads: tuple[int, ...], runs: int, warmup: int) -> dict:
    import onnx

    from edgec.targets.bench import latency_interleaved
    from edgec.targets.ort_latency import OrtLatencyProbe

    if not model_path.is_file():
        raise EdgecError("the bundle has no model.onnx")
    feeds = OrtLatencyProbe._feed(onnx.load(str(model_path), load_external_data=False))
    out = {}
    for t in threads:
        r = latency_interleaved({"compiled": str(model_path)}, feeds, threads=t, warmup=warmup, runs=runs)["compiled"]
        out[f"threads_{t}"] = {k: v for k, v in r.items() if k != "times_ms" and not k.startswith("speedup")}
    return out


def bench_farm(executor, bundle: str | Path, devices: list[str], *, threads: tuple[int, ...] = (1,),
               runs: int = 200, warmup: int = 20, timeout_s: float = CALL_TIMEOUT_S) -> dict:
    """One benchmark per live node per device resource; the merged report {devices: {device: [node results]}}."""
    ex = _ray_executor(executor)
    ray = ex.ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    bundle = Path(bundle)
    if not (bundle / "model.onnx").is_file():
        raise EdgecError(f"{bundle} is not a compiled bundle (no model.onnx); run `python -m pipeline compile` first")
    if warmup < 20 or runs < 200:
        raise EdgecError("benchmarks need at least 20 warm-up and 200 timed runs")
    plan = {d: device_nodes(ex, d) for d in devices}
    missing = [d for d, nodes in plan.items() if not nodes]
    if missing:
        raise EdgecError(f"no live node carries the device resource(s) {', '.join(missing)}")
    packed = ray.put(_pack(bundle))  # once, whatever the number of devices
    task = ray.remote(num_cpus=0, max_retries=1)(_bench_here)
    refs = {(d, n["node_id"]): task.options(resources={d: 1}, scheduling_strategy=NodeAffinitySchedulingStrategy(
                n["node_id"], soft=False)).remote(packed, d, tuple(threads), int(runs), int(warmup))
            for d, nodes in plan.items() for n in nodes}
    report: dict = {"bundle": str(bundle), "threads": list(threads), "runs": runs, "warmup": warmup,
                    "devices": {d: [] for d in devices}}
    for (d, node), ref in refs.items():
        try:
            r = wait_for(ray, ref, timeout_s)
        except ray.exceptions.GetTimeoutError:  # the device stayed busy (another measurement holds it) or hangs
            ray.cancel(ref, force=True)
            r = {"device": d, "node_id": node, "ok": False, "error": f"no result within {timeout_s:.0f} s"}
        except ray.exceptions.RayError as e:  # task error, lost node: reported per node
            r = {"device": d, "node_id": node, "ok": False, "error": f"{type(e).__name__}: {str(e).strip()[:200]}"}
        report["devices"][d].append(r)
    report["failed"] = sum(not r.get("ok") for rs in report["devices"].values() for r in rs)
    return report


def farm_markdown(report: dict) -> str:
    L = [f"# bench-farm: {report['bundle']}", "",
         f"batch 1, {report['warmup']} warm-up + {report['runs']} timed runs per thread count, on each device", ""]
    for dev, rows in report["devices"].items():
        L += [f"## {dev}", "", "| node | host | cpu | threads | median ms | p90 ms | p99 ms | per s |",
              "|---|---|---|---|---|---|---|---|"]
        for r in rows:
            if not r.get("ok"):
                L.append(f"| {r.get('node_id', '?')[:12]} | {r.get('hostname', '-')} | - | - | FAILED: {r.get('error', '')} | | | |")
                continue
            for t, b in sorted(r["bench"].items()):
                if not isinstance(b, dict) or "median_ms" not in b:
                    continue
                L.append(f"| {r['node_id'][:12]} | {r['hostname']} | {r['cpu']} | {t.replace('threads_', '')} | "
                         f"{b['median_ms']:.3f} | {b.get('p90_ms', float('nan')):.3f} | {b.get('p99_ms', float('nan')):.3f} | "
                         f"{b.get('throughput_per_s', float('nan')):.1f} |")
        L.append("")
    return "\n".join(L)


def run_bench_farm(cluster: str | None, bundle: str, devices: str, threads: tuple[int, ...], runs: int, warmup: int,
                   out: str | None = None) -> tuple[dict, Path]:
    """The bench-farm command: fan out, merge, write OUT/farm.json and OUT/farm.md (OUT defaults to the bundle)."""
    names = [d.strip() for d in (devices or "").split(",") if d.strip()]
    if not names:
        raise EdgecError("--devices needs at least one device resource, e.g. jetson_orin_nano,cpu_x86")
    ex = make_executor(cluster)
    try:
        report = bench_farm(ex, bundle, names, threads=threads, runs=runs, warmup=warmup)
    finally:
        getattr(ex, "close", lambda: None)()
    dest = Path(out or bundle)
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "farm.json").write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    (dest / "farm.md").write_text(farm_markdown(report))
    return report, dest
