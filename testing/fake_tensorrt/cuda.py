"""A simulated CUDA runtime for the fake tensorrt, checked call by call against the real cuda-python.

`SimCudart(device, real)` offers the cudart functions edgec's runner calls. Each call is first bound to the
*real* function's signature (`inspect.signature(real.cudaX).bind(...)`: wrong arity or keyword -> TypeError,
as the real binding raises), and returns a tuple shaped like the real one: (cudaError_t, *values), with as
many values as the real docstring's "Returns" section lists. Handles are the real types (cudaStream_t,
cudaEvent_t, cudaError_t, cudaMemcpyKind) when cuda-python is importable. Device memory is host memory
(`SimDevice`), addressed by integers like device pointers, so memcpy reads/writes the caller's real host
pointers: a wrong size or pointer is caught here or shows up as wrong numbers.
"""
from __future__ import annotations

import ctypes
import inspect
import re
import time


def load_real_cudart():
    """The installed cuda-python runtime module, or None."""
    try:
        from cuda.bindings import runtime
        return runtime
    except ImportError:
        try:
            from cuda import cudart
            return cudart
        except ImportError:
            return None


_RETURNS = re.compile(r"\n\s*Returns\n\s*-+\n(.*?)(?:\n\s*(?:See Also|Notes)\n\s*-+\n|\Z)", re.S)


def return_arity(fn) -> int:
    """How many values the real binding returns after the error code (from its numpydoc 'Returns' section)."""
    m = _RETURNS.search(fn.__doc__ or "")
    if not m:
        raise ValueError(f"{fn.__name__}: no Returns section in its docstring")
    lines = m.group(1).splitlines()
    indent = min(len(ln) - len(ln.lstrip()) for ln in lines if ln.strip())
    entries = [ln for ln in lines if ln.strip() and len(ln) - len(ln.lstrip()) == indent]
    if not entries or not entries[0].strip().startswith("cudaError_t"):
        raise ValueError(f"{fn.__name__}: first return is not cudaError_t: {entries[:1]}")
    return len(entries) - 1


class SimDevice:
    """Device memory as host bytearrays keyed by fake device addresses."""

    def __init__(self, total=8 << 30):
        self.allocs: dict[int, bytearray] = {}
        self.next = 0x7F0000000000
        self.total = total

    def malloc(self, n):
        ptr = self.next
        self.allocs[ptr] = bytearray(n)
        self.next += (n + 255) // 256 * 256 + 256
        return ptr

    def free(self, ptr):
        if ptr not in self.allocs:
            raise KeyError(f"cudaFree of unknown pointer {ptr:#x}")
        del self.allocs[ptr]

    def _find(self, ptr, n):
        for base, buf in self.allocs.items():
            if base <= ptr and ptr + n <= base + len(buf):
                return buf, ptr - base
        raise IndexError(f"device access {ptr:#x}+{n} is outside every allocation")

    def read(self, ptr, n):
        buf, off = self._find(ptr, n)
        return bytes(buf[off:off + n])

    def write(self, ptr, data):
        buf, off = self._find(ptr, len(data))
        buf[off:off + len(data)] = data

    def is_device(self, ptr):
        try:
            self._find(ptr, 1)
            return True
        except IndexError:
            return False


class SimCudart:
    """cudart functions over SimDevice, each checked against the real binding's signature and return arity."""

    def __init__(self, device: SimDevice, real=None, device_count=1, name=b"Orin (fake)"):
        self.dev, self.real = device, real
        self.count, self.name = device_count, name
        self.calls: list[str] = []
        self._events: dict[int, float] = {}
        self._handles = 0x1000
        if real is not None:
            self.cudaMemcpyKind = real.cudaMemcpyKind
            self.cudaError_t = real.cudaError_t
        else:
            import enum

            self.cudaMemcpyKind = enum.IntEnum("cudaMemcpyKind", ["cudaMemcpyHostToHost", "cudaMemcpyHostToDevice",
                                                                   "cudaMemcpyDeviceToHost", "cudaMemcpyDeviceToDevice"], start=0)
            self.cudaError_t = enum.IntEnum("cudaError_t", ["cudaSuccess", "cudaErrorNoDevice"], start=0)

    def _call(self, name, args, values=()):
        self.calls.append(name)
        if self.real is not None:
            fn = getattr(self.real, name)
            inspect.signature(fn).bind(*args)
            n = return_arity(fn)
            if n != len(values):
                raise AssertionError(f"sim {name} returns {len(values)} values, the real one {n}")
        return (self.cudaError_t.cudaSuccess,) + tuple(values)

    def _handle(self, kind):
        self._handles += 16
        if self.real is not None:
            return getattr(self.real, kind)(init_value=self._handles)
        return self._handles

    def cudaGetDeviceCount(self, *a):
        return self._call("cudaGetDeviceCount", a, (self.count,))

    def cudaGetDeviceProperties(self, *a):
        props = type("cudaDeviceProp", (), {"name": self.name + b"\0" * 8})()
        return self._call("cudaGetDeviceProperties", a, (props,))

    def cudaMemGetInfo(self, *a):
        used = sum(len(b) for b in self.dev.allocs.values())
        return self._call("cudaMemGetInfo", a, (self.dev.total - used, self.dev.total))

    def cudaMalloc(self, *a):
        r = self._call("cudaMalloc", a, (0,))
        return r[:1] + (self.dev.malloc(int(a[0])),)

    def cudaFree(self, *a):
        r = self._call("cudaFree", a)
        self.dev.free(int(a[0]))
        return r

    def _copy(self, dst, src, count, kind):
        dst, src, count = int(dst), int(src), int(count)
        k = self.cudaMemcpyKind
        if kind == k.cudaMemcpyHostToDevice:
            self.dev.write(dst, ctypes.string_at(src, count))
        elif kind == k.cudaMemcpyDeviceToHost:
            if self.dev.is_device(dst):
                raise ValueError("DeviceToHost copy into a device pointer")
            ctypes.memmove(dst, self.dev.read(src, count), count)
        elif kind == k.cudaMemcpyDeviceToDevice:
            self.dev.write(dst, self.dev.read(src, count))
        else:
            raise ValueError(f"memcpy kind {kind!r} not simulated")

    def cudaMemcpy(self, *a):
        r = self._call("cudaMemcpy", a)
        self._copy(*a)
        return r

    def cudaMemcpyAsync(self, *a):
        r = self._call("cudaMemcpyAsync", a)
        self._copy(*a[:4])
        return r

    def cudaStreamCreate(self, *a):
        return self._call("cudaStreamCreate", a, (self._handle("cudaStream_t"),))

    def cudaStreamSynchronize(self, *a):
        return self._call("cudaStreamSynchronize", a)

    def cudaStreamDestroy(self, *a):
        return self._call("cudaStreamDestroy", a)

    def cudaEventCreate(self, *a):
        return self._call("cudaEventCreate", a, (self._handle("cudaEvent_t"),))

    def cudaEventRecord(self, *a):
        r = self._call("cudaEventRecord", a)
        self._events[int(a[0])] = time.perf_counter()
        return r

    def cudaEventSynchronize(self, *a):
        return self._call("cudaEventSynchronize", a)

    def cudaEventElapsedTime(self, *a):
        start, end = self._events[int(a[0])], self._events[int(a[1])]
        return self._call("cudaEventElapsedTime", a, ((end - start) * 1e3,))

    def cudaEventDestroy(self, *a):
        r = self._call("cudaEventDestroy", a)
        self._events.pop(int(a[0]), None)
        return r


RUNNER_CALLS = ("cudaGetDeviceCount", "cudaGetDeviceProperties", "cudaMemGetInfo", "cudaMalloc", "cudaFree",
                "cudaMemcpy", "cudaMemcpyAsync", "cudaStreamCreate", "cudaStreamSynchronize", "cudaStreamDestroy",
                "cudaEventCreate", "cudaEventRecord", "cudaEventSynchronize", "cudaEventElapsedTime",
                "cudaEventDestroy")


def exercise_runner_cuda(cuda_cls, real) -> dict:
    """Drive every method of the runner's Cuda wrapper over SimCudart bound to `real` (a cudart module):
    each call is checked against the real signature and return arity. Returns {"calls": [...], "version": ...}."""
    import numpy as np

    sim = SimCudart(SimDevice(), real)
    c = cuda_cls(sim)
    assert c.device_count() == 1 and c.device_name() == "Orin (fake)"
    free, total = c.mem_info()
    assert 0 < free <= total
    a = np.arange(12, dtype=np.float32)
    p, q = c.malloc(a.nbytes), c.malloc(a.nbytes)
    c.h2d(p, a)
    s = c.stream()
    c.d2d(q, p, a.nbytes)
    c.d2d_async(p, q, a.nbytes, s)
    b = np.empty_like(a)
    c.d2h(b, p)
    assert np.array_equal(a, b)
    e1, e2 = c.event(), c.event()
    c.record(e1, s)
    c.record(e2, s)
    assert c.elapsed_ms(e1, e2) >= 0
    c.stream_sync(s)
    for e in (e1, e2):
        c.event_destroy(e)
    c.stream_destroy(s)
    c.free(p)
    c.free(q)
    missing = set(RUNNER_CALLS) - set(sim.calls)
    assert not missing, missing
    import cuda.bindings

    return {"calls": sorted(set(sim.calls)), "version": getattr(cuda.bindings, "__version__", "?")}
