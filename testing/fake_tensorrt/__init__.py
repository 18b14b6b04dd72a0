"""A strict fake `tensorrt` module, one per TensorRT version, built from the real API's name tables.

The tables in api/ (10.3.json, 10.16.json) hold the classes, members (with keyword-argument names) and enum
values that NVIDIA's pybind11 sources expose (see api/README.md). `make_module("10.3")` returns a module
object that behaves like `import tensorrt` for everything edgec calls:

* strict: an attribute, method, property or enum value that the table does not list raises AttributeError
  (as the real module would); a keyword argument the table does not list, or too many positional arguments,
  raises TypeError (pybind11's "incompatible function arguments"); setting a read-only property raises.
  A listed name that this fake does not model raises NotImplementedError (never a silent success).
* the builder records its configuration (flags, memory pools, profiles, DLA, timing cache) in `module.fake.log`,
  and refuses what TensorRT refuses (api/README.md): precision flags on a strongly typed network, dynamic
  profiles or unset profiles, DLA without FP16/INT8, DLA core out of range, Q/DQ in a weakly typed network
  without INT8, a None timing cache.
* the "engine" reports the ONNX graph's IO tensors (names, TensorRT dtypes, shapes with -1 for dynamic dims)
  and carries the ONNX bytes; the execution context runs them in ONNX Runtime, reading inputs from and
  writing outputs to the simulated device memory (testing/fake_tensorrt/cuda.py) at the addresses the runner
  set, in the engine's IO dtypes, so dtype or pointer mistakes in the runner show up as wrong numbers.

Table gaps: the 10.16 extraction lists no members for Builder, OnnxParser, Runtime, Refitter and
OnnxParserRefitter and only `name`/`num_ranks` for ILayer (the extractor's regex misses those class
definitions in 10.16; TensorRT does not remove API within a major version). For those classes the 10.3
members are used and the module says so in `module.fake.gaps`. Nested enums are not in the tables either:
`Logger.Severity` (INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE, exported into Logger) is added here.
"""
from __future__ import annotations

import enum
import functools
import json
import types
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

API_DIR = Path(__file__).resolve().parent / "api"
VERSIONS = {"10.3": "10.3.0.30", "10.16": "10.16.0.72"}
TABLE_GAPS = {"10.16": ("Builder", "OnnxParser", "Runtime", "Refitter", "OnnxParserRefitter", "ILayer")}
SEVERITY = ("INTERNAL_ERROR", "ERROR", "WARNING", "INFO", "VERBOSE")
ENGINE_MAGIC = b"FAKETRT1"
CACHE_MAGIC = b"FAKETC1|"
ONNX_TO_TRT = {1: "FLOAT", 10: "HALF", 16: "BF16", 3: "INT8", 6: "INT32", 7: "INT64", 9: "BOOL", 2: "UINT8",
               17: "FP8", 22: "INT4"}
NP_OF = {"FLOAT": np.float32, "HALF": np.float16, "INT8": np.int8, "INT32": np.int32, "INT64": np.int64,
         "BOOL": np.bool_, "UINT8": np.uint8}
PRECISION_FLAGS = ("FP16", "BF16", "INT8", "FP8", "INT4", "FP4")
LAYER_OF = {"QuantizeLinear": "QUANTIZE", "DequantizeLinear": "DEQUANTIZE", "Conv": "CONVOLUTION",
            "ConvTranspose": "DECONVOLUTION", "Gemm": "MATRIX_MULTIPLY", "MatMul": "MATRIX_MULTIPLY",
            "Relu": "ACTIVATION", "Sigmoid": "ACTIVATION", "Clip": "ACTIVATION", "Tanh": "ACTIVATION",
            "HardSwish": "ACTIVATION", "LeakyRelu": "ACTIVATION", "MaxPool": "POOLING", "AveragePool": "POOLING",
            "GlobalAveragePool": "POOLING", "Add": "ELEMENTWISE", "Mul": "ELEMENTWISE", "Sub": "ELEMENTWISE",
            "Div": "ELEMENTWISE", "Concat": "CONCATENATION", "Softmax": "SOFTMAX", "Reshape": "SHUFFLE",
            "Flatten": "SHUFFLE", "Transpose": "SHUFFLE", "Cast": "CAST", "Identity": "IDENTITY",
            "Constant": "CONSTANT", "Resize": "RESIZE", "ReduceMean": "REDUCE", "Gather": "GATHER",
            "Slice": "SLICE", "Pad": "PADDING", "BatchNormalization": "SCALE"}
# Layer kinds the fake lets run on the DLA (a coarse stand-in for the DLA's supported-layer list).
DLA_LAYERS = {"CONVOLUTION", "DECONVOLUTION", "ACTIVATION", "POOLING", "ELEMENTWISE", "CONCATENATION", "SCALE",
              "QUANTIZE", "DEQUANTIZE", "RESIZE", "SHUFFLE", "SOFTMAX", "MATRIX_MULTIPLY"}


def load_api(version: str) -> tuple[dict, tuple[str, ...]]:
    """(table, classes filled from 10.3) for a version in VERSIONS."""
    if version not in VERSIONS:
        raise ValueError(f"no API table for TensorRT {version} (have {', '.join(VERSIONS)})")
    api = json.loads((API_DIR / f"{version}.json").read_text())
    gaps = TABLE_GAPS.get(version, ())
    if gaps:
        base = json.loads((API_DIR / "10.3.json").read_text())
        for c in gaps:
            api["classes"][c] = {**base["classes"][c], **api["classes"].get(c, {})}
    return api, gaps


@dataclass
class Behavior:
    """Knobs a test turns to make the fake act like a particular device or failure."""
    cuda_device: bool = True          # False: Builder() raises, as TensorRT does without a usable GPU
    num_dla_cores: int = 2            # Orin AGX/NX: 2, Orin Nano: 0
    bad_cache: str = "none"           # a cache from another version/GPU: "none" -> create returns None,
    #                                   "raise" -> create raises, "mismatch" -> set_timing_cache returns False
    device_id: str = "sm87"


@dataclass
class FakeState:
    version: str
    api: dict
    gaps: tuple
    behavior: Behavior = field(default_factory=Behavior)
    log: list = field(default_factory=list)        # ("event", details) in call order
    accessed: set = field(default_factory=set)     # (class, member) of every public attribute read
    device: object = None                          # testing.fake_tensorrt.cuda.SimDevice, for execution

    def record(self, event, **kw):
        self.log.append((event, kw))

    def events(self, name):
        return [kw for e, kw in self.log if e == name]


class _Enum(enum.IntEnum):
    def __str__(self):
        return f"{type(self).__name__}.{self.name}"

    __repr__ = __str__


def _make_enum(name, values):
    return _Enum(name, [(v, i) for i, v in enumerate(values)])


def _strict_call(fn, owner, name, argnames, version):
    """Check keywords and positional count against the table, as pybind11 would, then call."""
    @functools.wraps(fn)
    def call(*args, **kwargs):
        bad = [k for k in kwargs if k not in argnames]
        if bad or (argnames and len(args) > len(argnames)):
            raise TypeError(f"{name}(): incompatible function arguments (TensorRT {version} takes "
                            f"{list(argnames)}; got {len(args)} positional, keywords {sorted(kwargs)})")
        return fn(*args, **kwargs)
    return call


class Strict:
    """Base of every fake class: attribute access is limited to the table's members for `_TRT`."""
    _TRT = ""
    _state: FakeState = None

    def __getattribute__(self, name):
        if name.startswith("_"):
            return object.__getattribute__(self, name)
        cls = type(self)
        st = cls._state
        members = st.api["classes"].get(cls._TRT, {})
        if name not in members:
            raise AttributeError(f"'tensorrt.{cls._TRT}' object has no attribute '{name}' (TensorRT {st.version})")
        st.accessed.add((cls._TRT, name))
        try:
            value = object.__getattribute__(self, name)
        except AttributeError:
            raise NotImplementedError(f"fake tensorrt does not model {cls._TRT}.{name}") from None
        if members[name]["kind"] == "def" and callable(value):
            return _strict_call(value, cls._TRT, f"{cls._TRT}.{name}", members[name]["args"], st.version)
        return value

    def __setattr__(self, name, value):
        if name.startswith("_"):
            return object.__setattr__(self, name, value)
        cls = type(self)
        m = cls._state.api["classes"].get(cls._TRT, {}).get(name)
        if m is None:
            raise AttributeError(f"'tensorrt.{cls._TRT}' object has no attribute '{name}'")
        if m["kind"] not in ("def_property", "def_readwrite"):
            raise AttributeError(f"can't set attribute '{name}' of tensorrt.{cls._TRT} ({m['kind']})")
        cls._state.accessed.add((cls._TRT, name))
        setter = getattr(type(self), "_set_" + name, None)
        if setter is not None:
            setter(self, value)
        else:
            object.__setattr__(self, "_v_" + name, value)
        cls._state.record("set", cls=cls._TRT, name=name, value=value)


def make_module(version: str = "10.3", behavior: Behavior | None = None, device=None) -> types.ModuleType:
    """A fresh strict fake `tensorrt` module for `version` ("10.3" or "10.16")."""
    from edgec.testing.fake_tensorrt import _impl

    api, gaps = load_api(version)
    st = FakeState(version=version, api=api, gaps=gaps, behavior=behavior or Behavior(), device=device)
    mod = types.ModuleType("tensorrt")
    mod.__version__ = VERSIONS[version]
    mod.fake = st
    for name, values in api["enums"].items():
        setattr(mod, name, _make_enum(name, values))
    impls = _impl.IMPLS
    for cname in api["classes"]:
        base = impls.get(cname, _impl.Unmodelled)
        setattr(mod, cname, type(cname, (base,), {"_TRT": cname, "_state": st, "_mod": mod}))
    severity = _make_enum("Severity", SEVERITY)
    mod.Logger.Severity = severity
    for v in severity:
        setattr(mod.Logger, v.name, v)
    mod.nptype = _nptype(mod)
    mod.volume = lambda shape: int(np.prod(list(shape)))
    return mod


def _nptype(mod):
    def nptype(trt_type):
        """DataType -> numpy type; TypeError for BF16, FP8, INT4 (and newer), as the real helper."""
        name = getattr(trt_type, "name", None)
        if not isinstance(trt_type, mod.DataType) or name not in NP_OF:
            raise TypeError(f"Could not resolve TensorRT datatype to an equivalent numpy datatype: {trt_type}")
        return NP_OF[name]
    return nptype


def install(monkeypatch, version: str = "10.3", behavior: Behavior | None = None, device=None):
    """Put a fake `tensorrt` into sys.modules for the duration of a test (pytest monkeypatch)."""
    import sys

    mod = make_module(version, behavior, device)
    monkeypatch.setitem(sys.modules, "tensorrt", mod)
    return mod


def trtexec_flags() -> set[str]:
    """Every --flag trtexec 10.3 knows (api/trtexec-10.3-flags.txt)."""
    return {ln.strip() for ln in (API_DIR / "trtexec-10.3-flags.txt").read_text().splitlines() if ln.strip()}
