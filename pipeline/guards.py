"""Resource and numeric guards.

Memory (`--max-memory 4G`): `MemoryGuard(limit)` watches the resident set size of this process and its children
from a daemon thread every `interval` s. When RSS passes the limit it interrupts the main thread, which turns into
`MemoryLimitExceeded` (an EdgecError: one line, exit 2) at the next Python bytecode; if the main thread is stuck
in native code and RSS keeps growing past `hard_factor` x limit, the process prints the same one line and exits
(os._exit) before the machine runs out. Optionally (`address_space=True`) RLIMIT_DATA is set as a kernel backstop.

Numbers: `check_finite_weights(model)` refuses NaN anywhere in float constants, and +-Inf in constants that feed
compute weights (Conv/Gemm/MatMul/normalization parameters) -- an Inf used as a mask value (Where/Add/Min/Max)
is legitimate and allowed. `check_finite_array(a, what)` is the same check for data arrays.
"""
from __future__ import annotations

import _thread
import logging
import os
import re
import sys
import threading
import time

import numpy as np
import onnx
from onnx import numpy_helper

from edgec.core.errors import EdgecError
from edgec.core.procfs import status_bytes

log = logging.getLogger(__name__)

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mb": 1 << 20, "mib": 1 << 20,
          "g": 1 << 30, "gb": 1 << 30, "gib": 1 << 30, "t": 1 << 40, "tb": 1 << 40, "tib": 1 << 40}


class MemoryLimitExceeded(EdgecError):
    exit_code = 2


def parse_memory(text: str | int | None) -> int | None:
    """'4G', '512M', '2.5GiB', '1073741824' -> bytes; None/'' -> None."""
    if text is None or text == "":
        return None
    if isinstance(text, int):
        if text <= 0:
            raise EdgecError("--max-memory must be positive")
        return text
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise EdgecError(f"bad --max-memory '{text}': expected e.g. 4G, 512M or a byte count")
    v = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if v <= 0:
        raise EdgecError("--max-memory must be positive")
    return v


def _fmt(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def current_rss(include_children: bool = True) -> int:
    import psutil

    p = psutil.Process()
    total = p.memory_info().rss
    if include_children:
        for c in p.children(recursive=True):
            try:
                total += c.memory_info().rss
            except psutil.Error:
                pass
    return total


class MemoryGuard:
    """Context manager: `with MemoryGuard(limit, stage=...)` raises MemoryLimitExceeded when RSS > limit.

    limit None disables it. `stage` names the step for the message and can be updated via `guard.stage = ...`.
    """

    def __init__(self, limit: int | None, *, interval: float = 0.05, hard_factor: float = 1.25,
                 grace_s: float = 5.0, stage: str = "compile", address_space: bool = False, children: bool = True):
        self.limit = limit
        self.interval = interval
        self.hard_factor = hard_factor
        self.grace_s = grace_s
        self.stage = stage
        self.address_space = address_space
        self.children = children
        self.peak = 0
        self.tripped = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._old_rlimit = None
        self._tripped_at = 0.0

    def message(self, rss: int | None = None) -> str:
        rss = self.peak if rss is None else rss
        return (f"memory limit exceeded during {self.stage}: resident memory reached {_fmt(rss)}, over --max-memory "
                f"{_fmt(self.limit)}; lower --calib-samples / the input shape, or raise --max-memory")

    def _watch(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                rss = current_rss(self.children)
            except Exception:  # psutil race with exiting children
                continue
            self.peak = max(self.peak, rss)
            if rss > self.limit and not self.tripped:
                self.tripped = True
                self._tripped_at = time.monotonic()
                log.debug("memory guard: %d > %d, interrupting", rss, self.limit)
                _thread.interrupt_main()
            elif self.tripped and (rss > self.limit * self.hard_factor
                                   or time.monotonic() - self._tripped_at > self.grace_s and rss > self.limit):
                # The main thread did not come back to Python in time: stop before the machine runs out.
                try:
                    sys.stderr.write(f"edgec: error: {self.message(rss)}\n")
                    sys.stderr.flush()
                finally:
                    os._exit(MemoryLimitExceeded.exit_code)

    def __enter__(self) -> MemoryGuard:
        if self.limit is None:
            return self
        rss = current_rss(self.children)
        self.peak = rss
        if rss > self.limit:
            raise MemoryLimitExceeded(f"--max-memory {_fmt(self.limit)} is below what edgec already uses ({_fmt(rss)})")
        if self.address_space:
            import resource

            self._old_rlimit = resource.getrlimit(resource.RLIMIT_DATA)
            hard = self._old_rlimit[1]
            want = int(self.limit * self.hard_factor)
            resource.setrlimit(resource.RLIMIT_DATA, (want if hard == resource.RLIM_INFINITY else min(want, hard), hard))
        self._thread = threading.Thread(target=self._watch, name="edgec-memory-guard", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, et, ev, tb) -> bool:
        if self.limit is None:
            return False
        self._stop.set()
        try:
            if self._thread is not None:
                self._thread.join()
            if self.tripped:
                time.sleep(0.01)  # a pending interrupt from the watchdog surfaces here, not after we return
        except KeyboardInterrupt:
            if not self.tripped:
                raise
            et = et or KeyboardInterrupt
        if self._old_rlimit is not None:
            import resource

            resource.setrlimit(resource.RLIMIT_DATA, self._old_rlimit)
        if et is not None and self.tripped and issubclass(et, (KeyboardInterrupt, MemoryError)):
            raise MemoryLimitExceeded(self.message()) from None
        if et is not None and issubclass(et, MemoryError):
            raise MemoryLimitExceeded(f"out of memory during {self.stage} (limit {_fmt(self.limit)})") from None
        if et is None and self.tripped:
            raise MemoryLimitExceeded(self.message())
        return False


# ----------------------------------------------------------------------------------------------- NaN / Inf
WEIGHT_OPS = {"Conv": (1, 2), "ConvTranspose": (1, 2), "Gemm": (1, 2), "MatMul": (0, 1), "BatchNormalization": (1, 2, 3, 4),
              "LayerNormalization": (1, 2), "InstanceNormalization": (1, 2), "GroupNormalization": (1, 2),
              "PRelu": (1,), "Mul": (0, 1), "Div": (0, 1), "Sub": (0, 1), "MatMulInteger": (1,), "QLinearConv": (3,),
              "DequantizeLinear": (0, 1), "QuantizeLinear": (1,)}


def _float_tensors(model: onnx.ModelProto):
    """(tensor name, array) for every float initializer and Constant value in the main graph."""
    floats = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16}
    for t in model.graph.initializer:
        if t.data_type in floats and t.data_location != onnx.TensorProto.EXTERNAL:
            yield t.name, t
    for n in model.graph.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value" and a.t.data_type in floats:
                    yield (n.output[0] if n.output else a.t.name), a.t


def check_finite_weights(model: onnx.ModelProto, name: str = "model") -> None:
    """NaN in any float constant, or +-Inf in a constant feeding a compute weight, is an error."""
    weight_use: dict[str, str] = {}
    for n in model.graph.node:
        for k in WEIGHT_OPS.get(n.op_type, ()):
            if k < len(n.input) and n.input[k]:
                weight_use.setdefault(n.input[k], f"{n.op_type} '{n.name or n.output[0]}'")
    for tname, t in _float_tensors(model):
        try:
            a = numpy_helper.to_array(t)
        except Exception as e:
            raise EdgecError(f"{name}: tensor '{tname}' cannot be decoded: {e}") from None
        if not np.issubdtype(a.dtype, np.floating) or a.size == 0:
            continue
        a = a.astype(np.float32, copy=False) if a.dtype.itemsize < 4 else a
        nan = int(np.isnan(a).sum())
        if nan:
            raise EdgecError(f"{name}: weight '{tname}' contains {nan} NaN value(s)")
        if tname in weight_use:
            inf = int(np.isinf(a).sum())
            if inf:
                raise EdgecError(f"{name}: weight '{tname}' (used by {weight_use[tname]}) contains {inf} Inf value(s)")


def check_finite_array(a: np.ndarray, what: str) -> None:
    if np.issubdtype(a.dtype, np.floating) and not np.isfinite(a).all():
        bad = int((~np.isfinite(a)).sum())
        raise EdgecError(f"{what} contains {bad} NaN/Inf value(s)")


def activation_bytes(model: onnx.ModelProto) -> int:
    """Sum of the statically known sizes of every intermediate tensor (after shape inference); a lower bound
    on what running the model allocates without memory reuse -- used to refuse absurd shapes before running."""
    from edgec.core.onnx_io import np_dtype

    try:
        inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception:
        return 0
    total = 0
    for vi in list(inferred.graph.value_info) + list(inferred.graph.output):
        tt = vi.type.tensor_type
        if not tt.HasField("shape"):
            continue
        dims = [d.dim_value for d in tt.shape.dim]
        if any(d <= 0 for d in dims):
            continue
        n = 1
        for d in dims:
            n *= d
        total += n * np.dtype(np_dtype(tt.elem_type)).itemsize
    return total


def check_activation_budget(model: onnx.ModelProto, limit: int | None) -> None:
    if limit is None:
        return
    need = activation_bytes(model)
    if need > limit:
        raise MemoryLimitExceeded(f"running the model needs at least {_fmt(need)} for activations at this input shape, "
                                  f"more than --max-memory {_fmt(limit)}")


def _vm_data() -> int:
    return status_bytes("VmData") or 0


class data_limit:
    """Context manager: cap this process's data segment (RLIMIT_DATA) at its current size + `extra` bytes, so an
    allocation beyond it fails at once (MemoryError / bad_alloc -> an error) instead of exhausting the machine."""

    def __init__(self, extra: int):
        self.extra = extra
        self.old = None

    def __enter__(self):
        try:
            import resource
        except ImportError:  # not POSIX
            return self
        self.old = resource.getrlimit(resource.RLIMIT_DATA)
        want = _vm_data() + self.extra
        hard = self.old[1]
        if hard != resource.RLIM_INFINITY:
            want = min(want, hard)
        resource.setrlimit(resource.RLIMIT_DATA, (want, hard))
        return self

    def __exit__(self, *exc):
        if self.old is not None:
            import resource

            resource.setrlimit(resource.RLIMIT_DATA, self.old)
        return False


def check_finite_state_dict(state: dict, what: str) -> None:
    """NaN/Inf in any floating tensor of a torch state dict (weights and buffers) is an error, found before export."""
    for k, t in state.items():
        if not hasattr(t, "is_floating_point") or not t.is_floating_point() or t.numel() == 0:
            continue
        import torch

        t = t.detach()
        if not bool(torch.isfinite(t).all()):
            nan, inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
            raise EdgecError(f"{what}: weight '{k}' contains {nan} NaN and {inf} Inf value(s)")
