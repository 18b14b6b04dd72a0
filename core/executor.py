"""The executor seam: `map(fn, items) -> results`, in the items' order, whatever runs them.

Everything that evaluates many independent candidates (prune's sensitivity scan, GA fitness, quant's per-layer
sensitivity, floor bisection candidates, artifact builds, coverage benches) calls `executor.map` instead of a loop.
Results must not depend on how many workers there are or in which order they finish: `fn` is a pure function of
its item, and any randomness inside it is seeded from the item (never from a worker or a global generator).

Large shared inputs (a model, calibration arrays) go through `executor.put(obj)` once and are passed to `fn` as the
returned handle; `executor.get(handle)` inside `fn` returns the object. In process the handle is the object itself.

Two implementations:
  InProcess (IN_PROCESS, the default): a loop here.
  RayExecutor: the items run as Ray tasks (one CPU each) on a Ray cluster, chosen by `make_executor(spec)` from
    `--cluster` / EDGEC_CLUSTER:  auto (the cluster this host joined, RAY_ADDRESS) | ray://HOST:PORT (Ray Client) |
    HOST:PORT (a head's GCS address, as `ray start --address` uses) | local:N (start a private Ray with N workers).
    `fn` is shipped to the object store once per map, put() objects once per put; a worker deserializes a handle
    once and keeps the last few (so N tasks on one worker cost one copy). A task whose worker process crashed or
    whose node was lost is retried once (Ray max_retries=1); a second loss is reported as WorkerLost naming the
    item. When no live node can run the remaining tasks (every worker gone) for `lost_grace_s`, they are reported
    as WorkerLost instead of waiting forever. An exception raised by `fn` is not retried (it is deterministic): it
    propagates as itself (the lowest-index one when several items fail, as the serial loop would).
Ray is an optional extra (`pip install 'edgec[ray]'`), imported only when a cluster is asked for.

Numeric threads. OpenBLAS sums a large matrix product in a different order at a different thread count (measured:
a 512x2000 @ 2000x1024 product differs by 8e-14 between 1 and 2 threads), so a least-squares refit computed in a
process whose BLAS has 2 threads and in a Ray worker whose BLAS has 1 (Ray sets OMP_NUM_THREADS=1) gives models that
differ in their last bits. `blas_threads(n)` fixes numpy's BLAS pool for a block of work; the compile chooses one
count from the machine (never from the worker count), runs its passes under it, and hands it to the executor, which
runs every task under the same count (`make_executor(spec, blas_threads=n)`).
"""
from __future__ import annotations

import logging
import os
import re
import sys
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any, Protocol, TypeVar

from edgec.core.errors import EdgecError

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

ENV = "EDGEC_CLUSTER"
SPEC_HELP = "auto | ray://HOST:PORT | HOST:PORT | local:N"


class Executor(Protocol):
    name: str
    workers: int

    def map(self, fn: Callable[[T], R], items: Iterable[T], *, desc: str = "") -> list[R]: ...

    def put(self, obj: Any) -> Any: ...

    def get(self, handle: Any) -> Any: ...


def blas_threads(n: int | None):
    """Context manager: numpy's BLAS thread pool at exactly `n` threads inside the block (threadpoolctl); None: as
    is. See "Numeric threads" above."""
    import contextlib

    if n is None:
        return contextlib.nullcontext()
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=max(int(n), 1), user_api="blas")


class WorkerLost(EdgecError):
    """An item whose worker was lost (process crashed, node died) on its first run and on its retry."""

    exit_code = 1


# ----------------------------------------------------------------------------- handles

_MEMO: OrderedDict = OrderedDict()  # per process: the last few objects fetched from Ray's object store
_MEMO_SIZE = 4


def get_handle(handle: Any) -> Any:
    """The object behind a put() handle: a Ray ObjectRef is fetched (once per process, memoised); anything else
    is returned as is. Works in the driver, in Ray workers and without Ray installed."""
    ray = sys.modules.get("ray")
    if ray is None or not isinstance(handle, getattr(ray, "ObjectRef", ())):
        return handle
    key = handle.hex()
    if key in _MEMO:
        _MEMO.move_to_end(key)
        return _MEMO[key]
    obj = ray.get(handle)
    _MEMO[key] = obj
    while len(_MEMO) > _MEMO_SIZE:
        _MEMO.popitem(last=False)
    return obj


class InProcess:
    """The default: runs `fn` over the items here, one after another."""

    name = "in-process"
    workers = 1

    def map(self, fn: Callable[[T], R], items: Iterable[T], *, desc: str = "",
            return_exceptions: bool = False) -> list[R]:
        """return_exceptions: an item whose fn raised yields its exception in the list instead of raising."""
        if not return_exceptions:
            return [fn(it) for it in items]
        out = []
        for it in items:
            try:
                out.append(fn(it))
            except Exception as e:  # noqa: BLE001 - handed back to the caller, which reports it
                out.append(e)
        return out

    def put(self, obj: Any) -> Any:
        return obj

    def get(self, handle: Any) -> Any:
        return get_handle(handle)

    def close(self) -> None:
        pass


IN_PROCESS = InProcess()


# ----------------------------------------------------------------------------- factory

def import_ray():
    """Ray, or one EdgecError line saying how to get it."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    try:
        import ray
    except ImportError:
        raise EdgecError("--cluster needs Ray, which is not installed: pip install 'edgec[ray]'") from None
    return ray


def parse_cluster(spec: str) -> tuple[str, Any]:
    """('auto', None) | ('client', 'ray://H:P') | ('gcs', 'H:P') | ('local', N); EdgecError on anything else."""
    s = spec.strip()
    if s == "auto":
        return "auto", None
    m = re.fullmatch(r"local:(\d+)", s)
    if m:
        n = int(m.group(1))
        if not 1 <= n <= 256:
            raise EdgecError(f"--cluster local:N needs 1 <= N <= 256, got {n}")
        return "local", n
    m = re.fullmatch(r"(ray://)?([A-Za-z0-9_.\-]+|\[[0-9A-Fa-f:]+\]):(\d{1,5})", s)
    if m and 0 < int(m.group(3)) < 65536:
        return ("client", s) if m.group(1) else ("gcs", s)
    raise EdgecError(f"--cluster expects {SPEC_HELP}, got '{spec}'")


def cluster_spec(spec: str | None = None) -> str:
    """The cluster asked for: `spec` if given (also ''), else $EDGEC_CLUSTER, else '' (in process)."""
    s = os.environ.get(ENV, "") if spec is None else spec
    return (s or "").strip()


def make_executor(spec: str | None = None, *, blas_threads: int | None = None,
                  warm: tuple[str, ...] = ()) -> Executor:
    """IN_PROCESS unless a cluster is asked for (`spec`, else $EDGEC_CLUSTER); then a connected RayExecutor.

    'none', 'off' and '' mean in process. Call `.close()` when done (it stops a local:N Ray it started).
    blas_threads: the numpy BLAS thread count every task runs under (the caller's own count; see "Numeric
    threads" above); in process the caller's own limit already applies.
    warm: modules every worker imports now, in the background, so the first real task does not pay for them
    (onnxruntime and the passes take about a second to import in a fresh worker)."""
    s = cluster_spec(spec)
    if s in ("", "none", "off", "in-process"):
        return IN_PROCESS
    kind, val = parse_cluster(s)
    ex = _OPEN.get(s)
    if ex is None or not ex.ray.is_initialized():  # one connection per process: later calls share it
        ex = _OPEN[s] = RayExecutor(kind, val, spec=s)
    ex.blas_threads = blas_threads
    if warm:
        ex.warm(warm)
    return ex


_OPEN: dict[str, "RayExecutor"] = {}


# ----------------------------------------------------------------------------- Ray

def _run_item(fn, item, blas: int | None = None):
    """The Ray task body: fn (fetched once per worker from its object-store ref) applied to one item, with numpy's
    BLAS at the driver's thread count (`blas`, see "Numeric threads")."""
    with blas_threads(blas):
        return fn(item)


def _import_all(modules: tuple[str, ...]) -> int:
    import importlib

    for m in modules:
        importlib.import_module(m)
    time.sleep(0.2)  # hold this worker a moment so each worker gets one of the warm-up tasks
    return os.getpid()


def _in_worker():
    return IN_PROCESS


class RayExecutor:
    """`map` over Ray tasks; see the module docstring for retries, lost workers and handles."""

    name = "ray"

    def __init__(self, kind: str, value: Any = None, *, spec: str = "", retries: int = 1,
                 lost_grace_s: float | None = None, object_store_mb: int | None = None, poll_s: float = 1.0):
        self.ray = import_ray()
        self.kind, self.spec = kind, spec or f"{kind}:{value}"
        self.retries = int(retries)
        self.lost_grace_s = float(lost_grace_s if lost_grace_s is not None
                                  else os.environ.get("EDGEC_CLUSTER_LOST_GRACE_S", 60))
        self.poll_s = float(poll_s)
        self.stats = {"maps": 0, "tasks": 0, "lost": 0}
        self.blas_threads: int | None = None  # numpy BLAS threads per task (make_executor sets it)
        self._owns = False
        self._connect(kind, value, object_store_mb)
        self._task = self.ray.remote(num_cpus=1, max_retries=self.retries, retry_exceptions=False)(_run_item)

    def _connect(self, kind: str, value: Any, object_store_mb: int | None) -> None:
        ray = self.ray
        if ray.is_initialized():  # already connected in this process (another executor, a test): share it
            return
        kw = dict(logging_level=logging.WARNING, log_to_driver=False, include_dashboard=False)
        try:
            if kind == "local":
                mb = int(object_store_mb or os.environ.get("EDGEC_RAY_OBJECT_STORE_MB", 300))
                ray.init(num_cpus=int(value), object_store_memory=mb * 1024 * 1024, **kw)
            else:
                addr = {"auto": "auto", "client": value, "gcs": value}[kind]
                kw.pop("include_dashboard")
                if kind == "client":
                    kw.pop("log_to_driver")
                ray.init(address=addr, **kw)
            self._owns = True  # close() stops a local:N Ray, or disconnects from a cluster (which keeps running)
        except EdgecError:
            raise
        except Exception as e:  # ConnectionError, RuntimeError, ValueError from ray.init: one line
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise EdgecError(f"cannot use the Ray cluster '{self.spec}': {msg}") from None
        log.info("executor: Ray %s (%s), %d CPU worker slot(s)", ray.__version__, self.spec, self.workers)

    def __reduce__(self):  # captured in a task's closure: inside a worker, nested maps run in process
        return (_in_worker, ())

    @property
    def workers(self) -> int:
        return max(1, int(self.ray.cluster_resources().get("CPU", 0)))

    def put(self, obj: Any) -> Any:
        return self.ray.put(obj)

    def warm(self, modules: tuple[str, ...]) -> None:
        """Each worker slot imports `modules` in the background (not awaited: the driver goes on meanwhile)."""
        self._warming = [self._task.remote(_import_all, tuple(modules), None) for _ in range(self.workers)]

    def get(self, handle: Any) -> Any:
        return get_handle(handle)

    def close(self) -> None:
        if self._owns and self.ray.is_initialized():
            self.ray.shutdown()
        self._owns = False
        if _OPEN.get(self.spec) is self:
            del _OPEN[self.spec]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ------------------------------------------------------------------ map
    def map(self, fn: Callable[[T], R], items: Iterable[T], *, desc: str = "", return_exceptions: bool = False,
            resources: dict[str, float] | None = None) -> list[R]:
        """fn over items as Ray tasks, results in the items' order.

        resources: extra custom resources each task needs (e.g. {"jetson_orin_nano": 1}).
        return_exceptions: an item whose fn raised, or whose worker was lost twice, yields the exception."""
        items = list(items)
        if not items:
            return []
        label = desc or getattr(fn, "__qualname__", "task")
        task = self._task.options(resources=resources) if resources else self._task
        fn_ref = self.ray.put(fn)  # shipped once, not once per task
        refs = [task.options(name=f"{label}[{i}]").remote(fn_ref, it, self.blas_threads)
                for i, it in enumerate(items)]
        self.stats["maps"] += 1
        self.stats["tasks"] += len(refs)
        results: list[Any] = [None] * len(items)
        failed: dict[int, BaseException] = {}
        self._collect(refs, items, label, results, failed, {"CPU": 1.0, **(resources or {})})
        self.stats["lost"] += sum(isinstance(e, WorkerLost) for e in failed.values())
        if failed and not return_exceptions:
            raise failed[min(failed)]
        for i, e in failed.items():
            results[i] = e
        return results

    def _collect(self, refs, items, label, results, failed, need) -> None:
        ray = self.ray
        pending = {r: i for i, r in enumerate(refs)}
        no_room_since = None
        done = 0
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=self.poll_s)
            for r in ready:
                i = pending.pop(r)
                done += 1
                try:
                    results[i] = ray.get(r)
                except ray.exceptions.RayTaskError as e:  # fn raised: deterministic, not retried
                    cause = getattr(e, "cause", None)
                    failed[i] = cause if isinstance(cause, BaseException) else e
                except ray.exceptions.RayError as e:  # worker crashed / node lost, on the run and its retry
                    failed[i] = WorkerLost(f"{label}: item {i} ({_short(items[i])}) lost its worker twice "
                                           f"({type(e).__name__}: {_first_line(e)})")
                    log.warning("%s", failed[i])
                log.debug("%s: %d/%d done", label, done, len(refs))
            if ready or not pending:
                no_room_since = None
                continue
            if self._room(need):
                no_room_since = None
            elif no_room_since is None:
                no_room_since = time.monotonic()
            elif time.monotonic() - no_room_since > self.lost_grace_s:
                self._give_up(pending, items, label, failed, need)
                return

    def _room(self, need: dict[str, float]) -> bool:
        """Whether some live node could run a task needing `need` (its totals, not what is free now)."""
        try:
            nodes = [n for n in self.ray.nodes() if n.get("Alive")]
        except Exception:  # noqa: BLE001 - the GCS itself is gone: nothing can run
            return False
        return any(all(n.get("Resources", {}).get(k, 0) >= v for k, v in need.items()) for n in nodes)

    def _give_up(self, pending, items, label, failed, need) -> None:
        for r, i in pending.items():
            failed[i] = WorkerLost(f"{label}: item {i} ({_short(items[i])}) has no worker left to run on "
                                   f"(no live node with {need} for {self.lost_grace_s:.0f} s)")
            log.warning("%s", failed[i])
            try:
                self.ray.cancel(r, force=True)
            except Exception:  # noqa: BLE001 - best effort: the task is reported either way
                pass
        pending.clear()


def _short(item: Any) -> str:
    s = getattr(item, "name", None)
    s = s if isinstance(s, str) else repr(item)
    return s if len(s) <= 60 else s[:57] + "..."


def _first_line(e: BaseException) -> str:
    s = str(e).strip()
    return s.splitlines()[0][:200] if s else ""
