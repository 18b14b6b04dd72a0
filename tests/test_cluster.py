"""A real Ray cluster on this machine (no mocks): a head and workers started with `ray start` on 127.0.0.1.

Topology: the head carries no CPU (it only schedules), worker A carries one CPU and the custom resource
{"jetson_orin_nano": 1} (a device), worker B (added later) one CPU. The tests show:
- the executor seam gives identical results with 1 and 2 workers, and the 2-worker run used both nodes;
- prune's sensitivity scan and its GA compile the same model.onnx in process, on 1 worker and on 2 workers;
- artifact builds (a reduced spec: a small ONNX model x ort, jetson) write the same manifests, tarball entries and
  unpacked build directories serially and on the cluster (the timing reports inside the tarballs aside);
- a remote probe pinned to the custom resource runs on worker A (checked by node id), quant's latency-driven bits
  use its table, bench-farm runs there too;
- a worker process that crashes is retried once, then reported; workers killed mid-build are reported and the
  build exits non-zero, within a bounded time.
Every test has a timeout; the module's fixture stops every process it started (by pid) in its teardown.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import onnx
import pytest

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'edgec[ray]')")
psutil = pytest.importorskip("psutil")

from edgec.core import executor as X  # noqa: E402
from edgec.core.errors import EdgecError  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import this test module

ROOT = Path(__file__).resolve().parent.parent
RAY = str(Path(sys.executable).with_name("ray"))
DEVICE = "jetson_orin_nano"
# fast node-death detection on the test cluster (Ray system config through the environment of `ray start`)
ENV = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_health_check_period_ms": "500",
       "RAY_health_check_failure_threshold": "4", "RAY_health_check_initial_delay_ms": "1000",
       "EDGEC_CLUSTER_LOST_GRACE_S": "5",
       # token authentication with this cluster's own token (not ~/.ray/auth_token, which other clusters may share)
       "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": uuid.uuid4().hex}
ENV.pop("RAY_AUTH_TOKEN_PATH", None)
ENV.pop("EDGEC_CLUSTER", None)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalCluster:
    """`ray start --block` processes we own: each node is one process group we started, stopped by pid."""

    def __init__(self):
        self.tmp = tempfile.mkdtemp(prefix="edgec-ray-", dir="/tmp")  # short: Ray's socket paths must stay < 108
        self.port = _free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.nodes: dict[str, subprocess.Popen] = {}
        self.node_ids: dict[str, str] = {}
        self.work = Path(self.tmp) / "work"  # the workers' TMPDIR: where a running build's directory shows
        self.work.mkdir()
        self.env = {**ENV, "TMPDIR": str(self.work)}

    def _start(self, name: str, args: list[str]) -> None:
        ports = ["--node-manager-port", "--object-manager-port", "--dashboard-agent-listen-port",
                 "--dashboard-agent-grpc-port", "--metrics-export-port", "--runtime-env-agent-port"]
        port_args = [a for p in ports for a in (p, str(_free_port()))]
        log = open(Path(self.tmp) / f"{name}.log", "w")
        p = subprocess.Popen([RAY, "start", "--block", "--node-ip-address", "127.0.0.1", "--object-store-memory",
                              str(80 * 1024 * 1024), "--disable-usage-stats", *port_args, *args],
                             stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True, cwd=str(ROOT))
        self.nodes[name] = p
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            text = (Path(self.tmp) / f"{name}.log").read_text()
            if "Ray runtime started" in text:
                return
            if p.poll() is not None:
                raise RuntimeError(f"ray start {name} exited {p.returncode}:\n{text[-2000:]}")
            time.sleep(0.3)
        raise RuntimeError(f"ray start {name} did not come up in 60 s")

    def start_head(self) -> None:
        self._start("head", ["--head", "--port", str(self.port), "--num-cpus", "0", "--include-dashboard", "false",
                             "--ray-client-server-port", str(_free_port()), "--temp-dir", self.tmp])

    def add_worker(self, name: str, resources: dict | None = None) -> str:
        before = {n["NodeID"] for n in ray.nodes() if n["Alive"]} if ray.is_initialized() else set()
        self._start(name, ["--address", self.address, "--num-cpus", "1",
                           *(["--resources", json.dumps(resources)] if resources else [])])
        if ray.is_initialized():
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                new = {n["NodeID"] for n in ray.nodes() if n["Alive"]} - before
                if new:
                    self.node_ids[name] = new.pop()
                    break
                time.sleep(0.3)
        return self.node_ids.get(name, "")

    def kill(self, name: str, sig=signal.SIGKILL) -> None:
        """The node's `ray start`, raylet and every worker process under it, by pid."""
        p = self.nodes.pop(name, None)
        if p is None:
            return
        try:
            procs = [psutil.Process(p.pid), *psutil.Process(p.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            procs = []
        for q in procs:
            try:
                q.send_signal(sig)
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(procs, timeout=15)
        p.wait(timeout=15)

    def stop(self) -> None:
        for name in [n for n in self.nodes if n != "head"] + (["head"] if "head" in self.nodes else []):
            p = self.nodes[name]
            try:
                procs = [psutil.Process(p.pid), *psutil.Process(p.pid).children(recursive=True)]
            except psutil.NoSuchProcess:
                procs = []
            p.send_signal(signal.SIGTERM)  # `ray start --block` stops its node's processes
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                pass
            self.kill(name)  # whatever is left, by pid
            for q in procs:
                try:
                    q.kill()
                except psutil.NoSuchProcess:
                    pass
        shutil.rmtree(self.tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster():
    saved = {k: os.environ.get(k) for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")}
    if ray.is_initialized():  # another module's Ray in this process
        ray.shutdown()
    os.environ.update({k: ENV[k] for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")})
    os.environ.pop("RAY_AUTH_TOKEN_PATH", None)
    _reload_auth()
    c = LocalCluster()
    try:
        c.start_head()
        ex = X.make_executor(c.address)
        c.add_worker("a", {DEVICE: 1})
        yield c, ex
    finally:
        try:
            for e in list(X._OPEN.values()):
                e.close()
            if ray.is_initialized():
                ray.shutdown()
        finally:
            c.stop()
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
            _reload_auth()


def _reload_auth() -> None:
    """Ray reads RAY_AUTH_* once per process: make this process see the values just set (as Ray's own tests do)."""
    from ray._raylet import AuthenticationTokenLoader, Config

    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


# ----------------------------------------------------------------------------- prune through the seam
# (first, while the cluster has one worker; the 2-worker runs come after the seam test has added worker B)

def _compile_residual(tmp: Path, recipe: str, tag: str, cluster: str | None, overrides: list[str]) -> bytes:
    """model.onnx bytes of the residual test model compiled with `recipe` (own output and cache dir per tag)."""
    from edgec.pipeline.compile import CompileOptions, compile_model
    from edgec.testing.prune_models import residual

    src = tmp / "residual.onnx"
    if not src.exists():
        onnx.save(residual(), str(src))
    out = tmp / f"{recipe}-{tag}"
    compile_model(CompileOptions(model=str(src), recipe=recipe, out=str(out), data="synthetic", calib_samples=8,
                                 validate_samples=8, eval_samples=8, bench=False, memory=False, cluster=cluster,
                                 cache_dir=str(tmp / f"cache-{recipe}-{tag}"), overrides=overrides))
    return (out / "model.onnx").read_bytes()


def _prune_compile(tmp: Path, tag: str, allocation: str, cluster: str | None) -> bytes:
    return _compile_residual(tmp, "prune", f"{tag}-{allocation}", cluster,
                             [f"prune.allocation={allocation}", "prune.target_macs=0.6"])


_PRUNE: dict = {}  # allocation -> model.onnx bytes compiled in process


def _prune_on_cluster(c, ex, tmp_path, allocation, tag) -> bytes:
    before = ex.stats["tasks"]
    out = _prune_compile(tmp_path, tag, allocation, cluster=c.address)
    assert ex.stats["tasks"] > before, f"prune's {allocation} search did not go through the executor"
    return out


@pytest.mark.parametrize("allocation", ["sensitivity", "ga"])
def test_prune_search_one_worker_same_as_in_process(cluster, tmp_path, allocation):
    c, ex = cluster
    if "b" in c.nodes:
        pytest.skip("worker B has joined already (test selection): the 1-worker run needs the module's order")
    _wait_workers(1)
    _PRUNE[allocation] = _prune_compile(tmp_path, "here", allocation, cluster="")
    assert _prune_on_cluster(c, ex, tmp_path, allocation, "one") == _PRUNE[allocation]


# ----------------------------------------------------------------------------- the seam

def _keyed(item: int) -> tuple:
    """A pure function of its item: randomness keyed by the item, never by the worker."""
    import ray as _ray

    time.sleep(0.3)  # long enough that a second worker takes a share
    rng = np.random.default_rng([7, item])
    w = rng.standard_normal((32, 32))
    return item, float(np.linalg.norm(np.linalg.matrix_power(w / 8.0, 3))), _ray.get_runtime_context().get_node_id()


def _wait_workers(n: int, c: LocalCluster | None = None, timeout: float = 30) -> None:
    """n CPU workers in the cluster (worker B is started when a test needs two and it is not there yet)."""
    if c is not None and n == 2 and "b" not in c.nodes:
        c.add_worker("b")
    deadline = time.monotonic() + timeout
    while ray.cluster_resources().get("CPU", 0) < n and time.monotonic() < deadline:
        time.sleep(0.3)
    assert ray.cluster_resources().get("CPU", 0) == n


def test_seam_same_results_with_one_and_two_workers(cluster):
    c, ex = cluster
    _wait_workers(1)
    one = ex.map(_keyed, range(16), desc="scan")
    _wait_workers(2, c)
    two = ex.map(_keyed, range(16), desc="scan")
    here = X.IN_PROCESS.map(lambda i: _keyed(i)[:2], range(16))
    assert [r[:2] for r in one] == [r[:2] for r in two] == here
    assert len({r[2] for r in one}) == 1 and len({r[2] for r in two}) == 2  # the second run used both workers
    assert ex.workers == 2


def test_put_handle_fetched_in_workers(cluster):
    _, ex = cluster
    big = np.arange(200_000, dtype=np.float64)
    h = ex.put(big)
    sums = ex.map(lambda i: float(X.get_handle(h)[i::7].sum()), range(7), desc="handle")
    assert sums == [float(big[i::7].sum()) for i in range(7)]
    assert ex.get(h) is not big and np.array_equal(ex.get(h), big)


def _blas_product(i):
    """(numpy's BLAS thread count in this process, the bytes of a product whose rounding depends on it)."""
    import hashlib

    from threadpoolctl import threadpool_info

    rng = np.random.default_rng(i)
    a, b = rng.standard_normal((512, 2000)), rng.standard_normal((2000, 1024))
    n = sorted({p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"})  # numpy's, torch's if loaded
    return n, hashlib.sha256((a @ b).tobytes()).hexdigest()


def test_tasks_run_at_the_drivers_blas_thread_count(cluster):
    """OpenBLAS rounds a large product differently at 1 and 2 threads, and Ray starts workers with one: every task
    runs at the executor's blas_threads, so a worker computes the same bytes as the driver (core.executor)."""
    _, ex = cluster
    with X.blas_threads(1):
        one = _blas_product(0)
    with X.blas_threads(2):
        two = _blas_product(0)
    assert one[0] == [1] and two[0] == [2]  # every BLAS library loaded (numpy, torch) is limited
    if one[1] == two[1]:
        pytest.skip("this CPU's OpenBLAS rounds this product the same at 1 and 2 threads")
    saved = ex.blas_threads
    try:
        ex.blas_threads = 2
        assert ex.map(_blas_product, [0, 0, 0, 0], desc="blas") == [two] * 4
        ex.blas_threads = 1
        assert ex.map(_blas_product, [0, 0], desc="blas") == [one] * 2
    finally:
        ex.blas_threads = saved


def _crash_first(arg):
    """Kills its own worker process on the item's first attempt (a marker file says it ran before)."""
    marker, item = arg
    if item == 1 and not os.path.exists(marker):
        Path(marker).write_text("crashed once")
        os.kill(os.getpid(), signal.SIGKILL)
    return item * 10


def _crash_always(item):
    if item == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    return item


def test_crashed_worker_retried_once_then_reported(cluster, tmp_path):
    _, ex = cluster
    marker = str(tmp_path / "crashed")
    assert ex.map(_crash_first, [(marker, i) for i in range(3)], desc="crash-once") == [0, 10, 20]
    assert Path(marker).read_text() == "crashed once"
    t0 = time.monotonic()
    res = ex.map(_crash_always, range(4), desc="crash-always", return_exceptions=True)
    assert res[:2] == [0, 1] and res[3] == 3
    assert isinstance(res[2], X.WorkerLost) and "item 2" in str(res[2]) and "twice" in str(res[2])
    with pytest.raises(X.WorkerLost):
        ex.map(_crash_always, range(3), desc="crash-always")
    assert time.monotonic() - t0 < 60


def test_fn_errors_propagate_as_themselves(cluster):
    _, ex = cluster

    def f(i):
        if i in (3, 5):
            raise EdgecError(f"bad item {i}")
        return i

    with pytest.raises(EdgecError, match="bad item 3"):  # the lowest failing index, as the serial loop
        ex.map(f, range(6))


@pytest.mark.parametrize("allocation", ["sensitivity", "ga"])
def test_prune_search_two_workers_same_as_in_process(cluster, tmp_path, allocation):
    c, ex = cluster
    _wait_workers(2, c)
    here = _PRUNE.get(allocation) or _prune_compile(tmp_path, "here", allocation, cluster="")
    assert _prune_on_cluster(c, ex, tmp_path, allocation, "two") == here


def _quant_compile(tmp: Path, tag: str, cluster: str | None) -> bytes:
    return _compile_residual(tmp, "quant", tag, cluster, ["quant.target_bits_per_weight=6.0"])  # a budget: sensitivities


def test_quant_sensitivity_two_workers_same_as_in_process(cluster, tmp_path):
    """quant's per-layer sensitivity trials go through the executor; the model is the same byte for byte."""
    c, ex = cluster
    _wait_workers(2, c)
    here = _quant_compile(tmp_path, "here", cluster="")
    before = ex.stats["tasks"]
    assert _quant_compile(tmp_path, "two", cluster=c.address) == here
    assert ex.stats["tasks"] > before, "quant's sensitivity trials did not go through the executor"


# ----------------------------------------------------------------------------- artifacts

def _tiny(path: Path) -> Path:
    sys.path.insert(0, str(ROOT / "tests"))
    from test_artifacts import tiny_onnx

    return tiny_onnx(path)


def _members(tar: Path) -> dict:
    import tarfile

    with tarfile.open(tar) as tf:
        return {m.name: (m.mtime, m.uid, m.mode, tf.extractfile(m).read() if m.isfile() else None)
                for m in tf.getmembers()}


def test_artifacts_same_serially_and_on_the_cluster(cluster, tmp_path):
    from edgec.pipeline import artifacts as A

    c, ex = cluster
    _wait_workers(2, c)
    combos, _ = A.parse_spec({"defaults": {"recipe": "quant", "seed": 0, "calib_samples": 4, "eval_samples": 4,
                                           "data": "synthetic"},
                              "models": [str(_tiny(tmp_path / "tiny.onnx"))], "targets": ["ort", "jetson"]})
    serial = A.build_all(combos, tmp_path / "serial")
    before = ex.stats["tasks"]
    on = A.build_all(combos, tmp_path / "cluster", executor=ex)
    assert ex.stats["tasks"] == before + 2
    assert all(o.ok for o in serial + on), [o.error for o in serial + on]
    print(A.summary_table(on))
    a = json.loads((tmp_path / "serial" / "artifacts.json").read_text())["artifacts"]
    b = json.loads((tmp_path / "cluster" / "artifacts.json").read_text())["artifacts"]
    assert len(a) == 2 and [{k: v for k, v in x.items() if k not in ("seconds", "tar_sha256")} for x in a] == \
        [{k: v for k, v in x.items() if k not in ("seconds", "tar_sha256")} for x in b]
    for x in a:
        name = x["name"]
        assert (tmp_path / "serial" / f"{name}.manifest.json").read_bytes() == \
            (tmp_path / "cluster" / f"{name}.manifest.json").read_bytes()
        m1, m2 = _members(tmp_path / "serial" / x["tarball"]), _members(tmp_path / "cluster" / x["tarball"])
        assert list(m1) == list(m2)
        for entry in m1:  # every entry byte for byte; the timing reports differ only in their seconds
            if Path(entry).name not in A.MEASUREMENT_FILES:
                assert m1[entry] == m2[entry], entry
        assert (tmp_path / "cluster" / "build" / name / "model.onnx").read_bytes() == \
            (tmp_path / "serial" / "build" / name / "model.onnx").read_bytes()


# ----------------------------------------------------------------------------- devices

def test_remote_probe_runs_on_the_device_node(cluster, tmp_path):
    from edgec.passes.quant.qdq import find_layers
    from edgec.pipeline.cluster import RemoteProbe
    from edgec.testing.prune_models import chain

    c, ex = cluster
    m = chain()
    probe = RemoteProbe(ex, "ort", DEVICE, threads=1, cache_dir=str(tmp_path / "cache"), timeout_s=60)
    try:
        assert probe.where["node_id"] == c.node_ids["a"]
        layers = [L.name for L in find_layers(m)]
        table = probe.layer_latency_table(m, layers, [8, 32])
        assert set(table) == set(layers) and all(v[8] > 0 and v[32] > 0 for v in table.values())
        assert probe.model_latency_ms(m, 50) > 0
    finally:
        probe.close()
    with pytest.raises(EdgecError, match="no live node .* 'cpu_arm64'"):
        RemoteProbe(ex, "ort", "cpu_arm64", timeout_s=10)


def test_quant_uses_latency_measured_on_the_device(cluster, tmp_path):
    from edgec.pipeline.compile import CompileOptions, compile_model

    c, ex = cluster
    rep = compile_model(CompileOptions(model=str(_tiny(tmp_path / "tiny.onnx")), recipe="quant", out=str(tmp_path / "q"),
                                       data="synthetic", calib_samples=4, validate_samples=4, eval_samples=4,
                                       bench=False, memory=False, cluster=c.address, probe_device=DEVICE,
                                       cache_dir=str(tmp_path / "cache"), overrides=["quant.target_speedup=1.5", "quant.sensitivity_samples=2",
                                                                          "quant.calib_samples=4"]))
    quant = next(s for s in rep["passes"] if s["name"] == "quant")
    assert quant["stats"]["latency_source"] == f"remote:{DEVICE}"
    with pytest.raises(EdgecError, match="no cost probe"):
        compile_model(CompileOptions(model=str(tmp_path / "tiny.onnx"), target="jetson", recipe="quant",
                                     out=str(tmp_path / "j"), data="synthetic", calib_samples=4, validate_samples=4,
                                     eval_samples=4, bench=False, memory=False, cluster=c.address,
                                     probe_device=DEVICE))


def test_bench_farm_runs_on_every_device(cluster, tmp_path):
    from edgec.pipeline.cluster import bench_farm, farm_markdown

    c, ex = cluster
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    onnx.save(onnx.load(str(_tiny(tmp_path / "tiny.onnx"))), str(bundle / "model.onnx"))
    rep = bench_farm(ex, bundle, [DEVICE], threads=(1,), runs=200, warmup=20, timeout_s=60)
    rows = rep["devices"][DEVICE]
    assert rep["failed"] == 0 and [r["node_id"] for r in rows] == [c.node_ids["a"]]
    assert rows[0]["bench"]["threads_1"]["runs"] == 200 and rows[0]["bench"]["threads_1"]["median_ms"] > 0
    assert f"## {DEVICE}" in farm_markdown(rep)


# ----------------------------------------------------------------------------- lost workers (last: kills them)

def test_workers_killed_mid_build_reported_and_exit_non_zero(cluster, tmp_path):
    c, _ = cluster
    _wait_workers(2, c)
    spec = tmp_path / "spec.yaml"
    tiny = str(_tiny(tmp_path / "tiny.onnx"))
    spec.write_text(json.dumps({"defaults": {"recipe": "quant", "seed": 0, "calib_samples": 4, "eval_samples": 4,
                                             "data": "synthetic"},
                                "models": [tiny], "targets": ["ort", "jetson"]}))
    t0 = time.monotonic()
    p = subprocess.Popen([sys.executable, "-m", "edgec.pipeline.artifacts", str(spec), "--out", str(tmp_path / "o"),
                          "--cluster", c.address], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         cwd=str(ROOT), env=ENV)
    try:
        deadline = time.monotonic() + 40  # wait until both combinations are compiling, one on each worker
        while len(list(c.work.glob("edgec-artifact-*"))) < 2 and time.monotonic() < deadline and p.poll() is None:
            time.sleep(0.1)
        assert len(list(c.work.glob("edgec-artifact-*"))) == 2, "the builds did not start on both workers"
        c.kill("a")
        c.kill("b")
        out, err = p.communicate(timeout=80)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 1, err[-2000:]
    assert time.monotonic() - t0 < 90
    summary = json.loads((tmp_path / "o" / "artifacts.json").read_text())
    assert summary["failed"] == 2
    assert all(("worker" in a["error"]) and not a["ok"] for a in summary["artifacts"]), summary
    assert "FAILED" in out and "0 of 2 built, 2 failed" in out
    assert not list((tmp_path / "o").glob("*.tar.gz"))
