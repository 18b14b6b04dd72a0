"""Fake engine side: build checks, the serialized engine, Runtime, ICudaEngine and IExecutionContext.

The serialized engine is ENGINE_MAGIC + a JSON header (TensorRT version, device, IO tensors with TensorRT
dtypes and shapes, the profile, the build record) + the ONNX bytes. The execution context runs the ONNX in
ONNX Runtime (graph optimizations off) on inputs read from simulated device memory at the addresses the
caller set, and writes the outputs back there in the engine's dtypes.
"""
from __future__ import annotations

import json

import numpy as np
import onnx

from edgec.testing.fake_tensorrt import ENGINE_MAGIC, NP_OF, PRECISION_FLAGS, Strict


def _qdq_count(network):
    return sum(1 for layer in network._layers if layer._type.name in ("QUANTIZE", "DEQUANTIZE"))


def _profile_errors(network, config):
    errors = []
    dynamic = [t for t in network._inputs if any(d < 0 for d in t._shape)]
    prof = config._profiles[0] if config._profiles else {}
    for t in dynamic:
        if t._v_name not in prof:
            errors.append(f"Network has dynamic or shape inputs, but no optimization profile has been defined "
                          f"for input '{t._v_name}'")
    for t in network._inputs:
        if t._v_name not in prof:
            continue
        mn, opt, mx = prof[t._v_name]
        if not len(mn) == len(opt) == len(mx) == len(t._shape):
            errors.append(f"profile for '{t._v_name}' has the wrong rank")
            continue
        for i, d in enumerate(t._shape):
            if d >= 0 and not mn[i] == opt[i] == mx[i] == d:
                errors.append(f"profile for '{t._v_name}': dimension {i} must be {d}")
            if not mn[i] <= opt[i] <= mx[i]:
                errors.append(f"profile for '{t._v_name}': need min <= opt <= max")
    for name in prof:
        if name not in {t._v_name for t in network._inputs}:
            errors.append(f"profile names '{name}', which is not a network input")
    return errors


def build_checks(network, config):
    """The refusals TensorRT makes at build time (api/README.md), as a list of error lines."""
    errors = []
    st = type(network)._state
    strong = network._strongly_typed()
    prec = sorted(config._flags & set(PRECISION_FLAGS))
    if strong and prec:
        errors.append(f"BuilderFlag {', '.join(prec)} cannot be set on a strongly typed network")
    if not strong and _qdq_count(network) and "INT8" not in config._flags:
        errors.append("network has Q/DQ layers (explicit quantization) but BuilderFlag INT8 is not set")
    if network._onnx is None:
        errors.append("empty network: nothing was parsed")
    errors += _profile_errors(network, config)
    if config._v_default_device_type.name == "DLA":
        n = st.behavior.num_dla_cores
        if not 0 <= config._v_DLA_core < n:
            errors.append(f"DLA core {config._v_DLA_core} requested, the device has {n}")
        prof = config._profiles[0] if config._profiles else {}
        if any(not (s[0] == s[1] == s[2]) for s in prof.values()) or \
                any(any(d < 0 for d in t._shape) and t._v_name not in prof for t in network._inputs):
            errors.append("DLA requires static shapes (min == opt == max)")
        off = [lay for lay in network._layers if not config.can_run_on_DLA(lay)]
        if off and "GPU_FALLBACK" not in config._flags:
            errors.append(f"{len(off)} layer(s) cannot run on the DLA and GPU fallback is off "
                          f"(first: {off[0]._v_name})")
    return errors


def serialize_engine(network, config, st):
    io = [{"name": t._v_name, "mode": "INPUT", "dtype": t._dtype.name, "shape": list(t._shape)}
          for t in network._inputs]
    io += [{"name": t._v_name, "mode": "OUTPUT", "dtype": t._dtype.name, "shape": list(t._shape)}
           for t in network._outputs]
    head = {"version": st.version, "device": st.behavior.device_id, "io": io,
            "profile": {k: [list(s) for s in v] for k, v in (config._profiles[0] if config._profiles else {}).items()},
            "strongly_typed": network._strongly_typed(), "flags": sorted(config._flags),
            "device_type": config._v_default_device_type.name, "layers": len(network._layers)}
    h = json.dumps(head, sort_keys=True).encode()
    return ENGINE_MAGIC + len(h).to_bytes(8, "little") + h + network._onnx


class Runtime(Strict):
    def __init__(self, logger):
        self._logger = logger

    def deserialize_cuda_engine(self, serialized_engine):
        st = type(self)._state
        data = bytes(serialized_engine)
        if not data.startswith(ENGINE_MAGIC):
            self._logger._messages.append(("Severity.ERROR", "engine plan file is corrupted"))
            return None
        n = int.from_bytes(data[8:16], "little")
        head = json.loads(data[16:16 + n])
        if head["version"] != st.version or head["device"] != st.behavior.device_id:
            self._logger._messages.append(("Severity.ERROR", "engine was built by another TensorRT version or GPU"))
            return None
        return type(self)._mod.ICudaEngine(head, data[16 + n:])


class ICudaEngine(Strict):
    def __init__(self, head, onnx_bytes):
        self._head, self._onnx, self._sess = head, onnx_bytes, None
        self._io = {t["name"]: t for t in head["io"]}
        self._names = [t["name"] for t in head["io"]]

    @property
    def num_io_tensors(self):
        return len(self._names)

    @property
    def num_layers(self):
        return self._head["layers"]

    @property
    def device_memory_size_v2(self):
        return 1 << 20

    @property
    def device_memory_size(self):
        return 1 << 20

    def get_tensor_name(self, index):
        return self._names[index]

    def get_tensor_mode(self, name):
        return getattr(type(self)._mod.TensorIOMode, self._io[name]["mode"]) if name in self._io \
            else type(self)._mod.TensorIOMode.NONE

    def get_tensor_dtype(self, name):
        return getattr(type(self)._mod.DataType, self._io[name]["dtype"])

    def get_tensor_shape(self, name):
        return tuple(self._io[name]["shape"])

    def create_execution_context(self):
        return type(self)._mod.IExecutionContext(self)

    def _session(self):
        if self._sess is None:
            from edgec.core.onnx_io import ort_session

            self._sess = ort_session(onnx.load_from_string(self._onnx), threads=1, optimize=False)
        return self._sess


class IExecutionContext(Strict):
    def __init__(self, engine):
        self._engine, self._shapes, self._addr, self._out_shapes = engine, {}, {}, {}

    def set_input_shape(self, name, shape):
        io = self._engine._io.get(name)
        shape = tuple(int(d) for d in shape)
        if io is None or io["mode"] != "INPUT" or len(shape) != len(io["shape"]):
            return False
        prof = self._engine._head["profile"].get(name)
        for i, d in enumerate(shape):
            if io["shape"][i] >= 0 and d != io["shape"][i]:
                return False
            if prof and not prof[0][i] <= d <= prof[2][i]:
                return False
        self._shapes[name] = shape
        return True

    def _input_shape(self, name):
        s = self._shapes.get(name, tuple(self._engine._io[name]["shape"]))
        if any(d < 0 for d in s):
            raise RuntimeError(f"input '{name}' shape not set (set_input_shape)")
        return s

    def get_tensor_shape(self, name):
        io = self._engine._io[name]
        if io["mode"] == "INPUT":
            return self._shapes.get(name, tuple(io["shape"]))
        key = tuple(sorted((n, self._input_shape(n)) for n, t in self._engine._io.items() if t["mode"] == "INPUT"))
        if key not in self._out_shapes:
            feeds = {n: np.zeros(s, NP_OF[self._engine._io[n]["dtype"]]) for n, s in key}
            outs = self._engine._session().run(None, feeds)
            names = [o.name for o in self._engine._session().get_outputs()]
            self._out_shapes[key] = {n: tuple(o.shape) for n, o in zip(names, outs)}
        return self._out_shapes[key][name]

    def set_tensor_address(self, name, memory):
        if not isinstance(memory, int) or name not in self._engine._io:
            return False
        self._addr[name] = memory
        return True

    def execute_async_v3(self, stream_handle):
        if not isinstance(stream_handle, int):
            raise TypeError("execute_async_v3(): incompatible function arguments: stream_handle must be int")
        st = type(self)._state
        dev = st.device
        eng = self._engine
        missing = [n for n in eng._names if n not in self._addr]
        if missing or dev is None:
            return False
        feeds = {}
        for n, t in eng._io.items():
            if t["mode"] == "INPUT":
                shape, dt = self._input_shape(n), np.dtype(NP_OF[t["dtype"]])
                raw = dev.read(self._addr[n], int(np.prod(shape)) * dt.itemsize)
                feeds[n] = np.frombuffer(raw, dt).reshape(shape)
        sess = eng._session()
        outs = sess.run(None, feeds)
        for o, arr in zip(sess.get_outputs(), outs):
            t = eng._io[o.name]
            arr = np.ascontiguousarray(arr, NP_OF[t["dtype"]])
            dev.write(self._addr[o.name], arr.tobytes())
        st.record("execute", inputs={n: (a.shape, str(a.dtype)) for n, a in feeds.items()})
        return True


IMPLS = {c.__name__: c for c in (Runtime, ICudaEngine, IExecutionContext)}
