"""The fake tensorrt classes (see __init__.py): builder side, then engine / runtime / execution context.

Every public method takes exactly the keyword names that the real API table lists (Strict checks calls
against the table; these signatures only have to agree with it). Internal state lives in `_`-attributes,
which Strict leaves alone.
"""
from __future__ import annotations

import json

import numpy as np
import onnx

from edgec.testing.fake_tensorrt import (CACHE_MAGIC, DLA_LAYERS, ENGINE_MAGIC, LAYER_OF, NP_OF, ONNX_TO_TRT,
                                         PRECISION_FLAGS, Strict)


class Unmodelled(Strict):
    """A class the real module has and this fake does not model: constructing it says so."""

    def __init__(self, *a, **k):
        raise NotImplementedError(f"fake tensorrt does not model tensorrt.{type(self)._TRT}")


def _enum_arg(self, enum_name, value, what):
    e = getattr(type(self)._mod, enum_name)
    if not isinstance(value, e):
        raise TypeError(f"{what}(): incompatible function arguments: expected tensorrt.{enum_name}, got {value!r}")
    return value


class Logger(Strict):
    def __init__(self, min_severity=None):
        self._v_min_severity = min_severity
        self._messages = []

    @property
    def min_severity(self):
        return self._v_min_severity

    def log(self, severity, msg):
        self._messages.append((str(severity), str(msg)))


class IHostMemory(Strict):
    def __init__(self, data: bytes):
        self._data = bytes(data)

    def __bytes__(self):
        return self._data

    def __len__(self):
        return len(self._data)

    @property
    def nbytes(self):
        return len(self._data)


def _ro(field: str) -> property:
    """A read-only property over a private field (TensorRT's getters; a write raises as in the real bindings)."""
    return property(lambda self: getattr(self, field))


class ITensor(Strict):
    def __init__(self, name, shape, dtype):
        self._v_name, self._shape, self._dtype = name, tuple(shape), dtype

    name, shape, dtype = _ro("_v_name"), _ro("_shape"), _ro("_dtype")


class ILayer(Strict):
    def __init__(self, name, ltype, op):
        self._v_name, self._type, self._op = name, ltype, op

    name, type = _ro("_v_name"), _ro("_type")


class INetworkDefinition(Strict):
    def __init__(self, flags):
        self._flags = int(flags)
        self._inputs, self._outputs, self._layers = [], [], []
        self._onnx = None

    num_inputs = property(lambda self: len(self._inputs))
    num_outputs = property(lambda self: len(self._outputs))
    num_layers = property(lambda self: len(self._layers))

    def get_input(self, index):
        return self._inputs[index]

    def get_output(self, index):
        return self._outputs[index]

    def get_layer(self, index):
        return self._layers[index]

    def get_flag(self, flag):
        _enum_arg(self, "NetworkDefinitionCreationFlag", flag, "get_flag")
        return bool(self._flags & (1 << int(flag)))

    def _strongly_typed(self):
        return bool(self._flags & (1 << int(type(self)._mod.NetworkDefinitionCreationFlag.STRONGLY_TYPED)))


class ParserError(Strict):
    def __init__(self, mod, node_index, node_name, op, desc, code):
        self._f = (node_index, node_name, op, desc, getattr(mod.ErrorCode, code))

    def node(self):
        return self._f[0]

    def node_name(self):
        return self._f[1]

    def node_operator(self):
        return self._f[2]

    def desc(self):
        return self._f[3]

    def code(self):
        return self._f[4]


def _dims(vi):
    t = vi.type.tensor_type
    return tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else -1 for d in t.shape.dim)


def _axis0(m) -> bool:
    """Set axis=0 on every per-channel Q/DQ that has no axis attribute, as TensorRT's ONNX parser reads it."""
    sizes = {t.name: int(np.prod(t.dims)) for t in m.graph.initializer}
    changed = False
    for n in m.graph.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear") and sizes.get(n.input[1], 1) > 1 \
                and not any(a.name in ("axis", "block_size") for a in n.attribute):
            n.attribute.append(onnx.helper.make_attribute("axis", 0))
            changed = True
    return changed


class OnnxParser(Strict):
    def __init__(self, network, logger):
        if not isinstance(network, INetworkDefinition):
            raise TypeError("OnnxParser(): incompatible constructor arguments")
        self._network, self._logger, self._errors = network, logger, []

    @property
    def num_errors(self):
        return len(self._errors)

    def get_error(self, index):
        return self._errors[index]

    def parse_from_file(self, model):
        with open(model, "rb") as f:
            return self._parse_bytes(f.read())

    def parse(self, model, path=None):
        return self._parse_bytes(bytes(model))

    def _err(self, i, n, desc, code="UNSUPPORTED_NODE"):
        self._errors.append(type(self)._mod.ParserError(type(self)._mod, i, n.name, n.op_type, desc, code))

    def _parse_bytes(self, data):
        mod, net = type(self)._mod, self._network
        m = onnx.load_from_string(data)
        if _axis0(m):  # the real parser reads a per-channel Q/DQ without `axis` as axis 0 (ONNX: axis 1)
            type(self)._state.record("parser_axis0")
            data = m.SerializeToString()
        inf = onnx.shape_inference.infer_shapes(m)
        types = {vi.name: vi.type.tensor_type.elem_type for vi in list(inf.graph.value_info) + list(inf.graph.input)
                 + list(inf.graph.output)}
        types.update({t.name: t.data_type for t in m.graph.initializer})
        opset = next((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), 0)
        for i, n in enumerate(m.graph.node):
            if n.domain not in ("", "ai.onnx"):
                self._err(i, n, f"No importer registered for op: {n.op_type}")
            elif n.op_type == "QuantizeLinear" and net._strongly_typed() and opset >= 19 \
                    and types.get(n.input[0]) != types.get(n.input[1]):
                self._err(i, n, "QuantizeLinear: scale dtype differs from the input dtype in a strongly typed network",
                          "INVALID_NODE")
        inits = {t.name for t in m.graph.initializer}
        for vi in m.graph.input:
            if vi.name in inits:
                continue
            dt = ONNX_TO_TRT.get(vi.type.tensor_type.elem_type)
            if dt is None:
                self._errors.append(mod.ParserError(mod, -1, vi.name, "", "unsupported input type", "UNSUPPORTED_GRAPH"))
                continue
            net._inputs.append(mod.ITensor(vi.name, _dims(vi), getattr(mod.DataType, dt)))
        for vi in m.graph.output:
            net._outputs.append(mod.ITensor(vi.name, _dims(vi), getattr(mod.DataType, ONNX_TO_TRT[vi.type.tensor_type.elem_type])))
        for i, n in enumerate(m.graph.node):
            lt = getattr(mod.LayerType, LAYER_OF.get(n.op_type, "PLUGIN_V2"))
            net._layers.append(mod.ILayer(n.name or f"{n.op_type}_{i}", lt, n.op_type))
        net._onnx = data
        type(self)._state.record("parse", strongly_typed=net._strongly_typed(), errors=len(self._errors))
        return not self._errors


class IOptimizationProfile(Strict):
    def __init__(self):
        self._shapes = {}

    def set_shape(self, input, min, opt, max):  # noqa: A002 (the real keyword names)
        self._shapes[str(input)] = tuple(tuple(int(d) for d in s) for s in (min, opt, max))


class ITimingCache(Strict):
    def __init__(self, entries, device):
        self._entries, self._device = int(entries), device

    def serialize(self):
        st = type(self)._state
        body = json.dumps({"version": st.version, "device": self._device, "entries": self._entries}).encode()
        return type(self)._mod.IHostMemory(CACHE_MAGIC + body)


class IBuilderConfig(Strict):
    def __init__(self):
        mod = type(self)._mod
        self._flags, self._pools, self._profiles, self._cache = set(), {}, [], None
        self._v_builder_optimization_level = 3
        self._v_default_device_type = mod.DeviceType.GPU
        self._v_DLA_core = -1

    builder_optimization_level = property(lambda self: self._v_builder_optimization_level)
    default_device_type = property(lambda self: self._v_default_device_type)
    DLA_core = property(lambda self: self._v_DLA_core)

    def _set_builder_optimization_level(self, v):
        if not 0 <= int(v) <= 5:
            raise ValueError("builder_optimization_level must be 0..5")
        self._v_builder_optimization_level = int(v)

    def _set_default_device_type(self, v):
        self._v_default_device_type = _enum_arg(self, "DeviceType", v, "default_device_type")

    def _set_DLA_core(self, v):
        self._v_DLA_core = int(v)

    def set_memory_pool_limit(self, pool, pool_size):
        self._pools[_enum_arg(self, "MemoryPoolType", pool, "set_memory_pool_limit").name] = int(pool_size)

    def set_flag(self, flag):
        self._flags.add(_enum_arg(self, "BuilderFlag", flag, "set_flag").name)

    def clear_flag(self, flag):
        self._flags.discard(_enum_arg(self, "BuilderFlag", flag, "clear_flag").name)

    def get_flag(self, flag):
        return _enum_arg(self, "BuilderFlag", flag, "get_flag").name in self._flags

    def add_optimization_profile(self, profile):
        if not isinstance(profile, IOptimizationProfile):
            raise TypeError("add_optimization_profile(): incompatible function arguments")
        self._profiles.append(dict(profile._shapes))
        return len(self._profiles) - 1

    def can_run_on_DLA(self, layer):
        return layer._type.name in DLA_LAYERS and bool(self._flags & {"FP16", "INT8"})

    def create_timing_cache(self, serialized_timing_cache):
        st = type(self)._state
        data = bytes(serialized_timing_cache)
        if not data:
            return type(self)._mod.ITimingCache(0, st.behavior.device_id)
        ok = data.startswith(CACHE_MAGIC)
        meta = json.loads(data[len(CACHE_MAGIC):]) if ok else {}
        if ok and meta.get("version") == st.version and meta.get("device") == st.behavior.device_id:
            return type(self)._mod.ITimingCache(meta["entries"], meta["device"])
        st.record("timing_cache_rejected", mode=st.behavior.bad_cache)
        if st.behavior.bad_cache == "raise":
            raise RuntimeError("Error Code 1: Serialized timing cache is corrupted or from another version")
        if st.behavior.bad_cache == "mismatch":
            return type(self)._mod.ITimingCache(meta.get("entries", 0), meta.get("device", "other-gpu"))
        return None

    def set_timing_cache(self, cache, ignore_mismatch):
        if not isinstance(cache, ITimingCache):  # pybind11 takes a reference: None is not accepted
            raise TypeError("set_timing_cache(): incompatible function arguments: cache must be tensorrt.ITimingCache")
        st = type(self)._state
        if cache._device != st.behavior.device_id and not ignore_mismatch:
            return False
        self._cache = cache
        return True

    def get_timing_cache(self):
        return self._cache


class Builder(Strict):
    def __init__(self, logger):
        if not type(self)._state.behavior.cuda_device:
            raise TypeError("pybind11::init(): factory function returned nullptr (no CUDA device)")
        self._logger = logger

    num_DLA_cores = property(lambda self: type(self)._state.behavior.num_dla_cores)
    platform_has_fast_fp16 = property(lambda self: True)
    platform_has_fast_int8 = property(lambda self: True)

    def create_network(self, flags=0):
        return type(self)._mod.INetworkDefinition(flags)

    def create_builder_config(self):
        return type(self)._mod.IBuilderConfig()

    def create_optimization_profile(self):
        return type(self)._mod.IOptimizationProfile()

    def build_serialized_network(self, network, config):
        from edgec.testing.fake_tensorrt._engine import build_checks, serialize_engine

        st = type(self)._state
        errors = build_checks(network, config)
        rec = {"strongly_typed": network._strongly_typed(), "flags": sorted(config._flags),
               "pools": dict(config._pools), "opt_level": config._v_builder_optimization_level,
               "profiles": list(config._profiles), "device_type": config._v_default_device_type.name,
               "dla_core": config._v_DLA_core, "timing_cache": config._cache is not None, "errors": errors}
        st.record("build", **rec)
        if errors:
            for e in errors:
                self._logger._messages.append(("Severity.ERROR", e))
            return None
        if config._cache is not None:
            config._cache._entries += len(network._layers)
        return type(self)._mod.IHostMemory(serialize_engine(network, config, st))


IMPLS = {c.__name__: c for c in (Logger, IHostMemory, ITensor, ILayer, INetworkDefinition, ParserError, OnnxParser,
                                  IOptimizationProfile, ITimingCache, IBuilderConfig, Builder)}
_ = (NP_OF, PRECISION_FLAGS)


def _register_engine():
    from edgec.testing.fake_tensorrt import _engine

    IMPLS.update(_engine.IMPLS)


_register_engine()
