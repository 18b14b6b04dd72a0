#!/usr/bin/env python3
"""Build a TensorRT 10.x engine from an ONNX file (standalone: needs only tensorrt and numpy).

This file is copied verbatim into the Jetson bundle as build_engine.py, so it imports nothing from edgec
and runs on the Python 3.8+ that JetPack ships.

Network (GPU): strongly typed (NetworkDefinitionCreationFlag.STRONGLY_TYPED) whenever the graph holds Q/DQ
layers: precisions then come from the graph (explicit quantization), never from builder flags. A graph
without Q/DQ is rebuilt weakly typed with the FP16 flag, and says so in one log line.
Network (DLA): built the way trtexec builds for --useDLACore: weakly typed with FP16 and
PREFER_PRECISION_CONSTRAINTS, plus INT8 when the graph has Q/DQ (the int8 scales are the graph's Q/DQ scales),
GPU_FALLBACK unless disabled, static shapes only. The DLA on Orin runs FP16 or INT8 only, and a strongly typed
network rejects those builder flags, so a strongly typed DLA build cannot work (--typing strong is refused).
Config: WORKSPACE memory-pool limit, builder_optimization_level, a timing cache loaded from and saved to
<engine>.timing.cache (a cache from another TensorRT version or GPU is discarded and a fresh one started),
one optimization profile (min/opt/max) when an input has dynamic dimensions, and for DLA the layers that
cannot run on the DLA and fall back to the GPU (listed in <engine>.build.json).
Baseline: when baseline.onnx (the original FP32 graph) sits next to the model, the same run also builds
baseline.engine from it, weakly typed FP16 with the same shapes/DLA/workspace settings, so bench.py can time
the compiled engine against it in one run (--no-baseline skips it).
Versions: TensorRT >= 10 and < 11 only (11 removed the precision flags and calibrators).

    python3 build_engine.py --onnx model.onnx --engine model.engine [--dla-core 0] [--shape input=1x3x224x224]
"""
import argparse
import json
import logging
import os
import sys
import time

log = logging.getLogger("edgec.tensorrt.builder")

SUPPORTED = (10, 11)  # [min, max) major versions
DEFAULT_WORKSPACE_MB = 1024


class BuildError(RuntimeError):
    """A one-line reason the engine could not be built."""


class TensorRTUnavailable(BuildError):
    """tensorrt is not importable (or not a supported version) on this host."""


def check_version(version):
    """Refuse TensorRT outside [10, 11) with one clear line; return (major, minor)."""
    try:
        parts = [int(p) for p in str(version).split(".")[:2]]
        major, minor = parts[0], (parts[1] if len(parts) > 1 else 0)
    except (ValueError, IndexError):
        raise TensorRTUnavailable("cannot read the TensorRT version %r" % (version,))
    if major < SUPPORTED[0]:
        raise TensorRTUnavailable("TensorRT %s is too old: edgec needs TensorRT 10.x (JetPack 6 ships 10.3)" % version)
    if major >= SUPPORTED[1]:
        raise TensorRTUnavailable("TensorRT %s is not supported: edgec targets TensorRT 10.x "
                                  "(TensorRT 11 removed the precision flags and calibrators this builder relies on)" % version)
    return major, minor


def import_tensorrt():
    """Import tensorrt lazily and gate its version."""
    try:
        import tensorrt as trt
    except ImportError:
        raise TensorRTUnavailable("tensorrt not installed (pip install 'tensorrt>=10,<11', or use JetPack 6)")
    check_version(getattr(trt, "__version__", "0"))
    return trt


# ----------------------------------------------------------------------------- shapes

def parse_dims(text):
    """'1x3x224x224' -> (1, 3, 224, 224)."""
    try:
        dims = tuple(int(d) for d in text.lower().split("x"))
    except ValueError:
        raise BuildError("bad shape %r: expected dims joined by 'x', e.g. 1x3x224x224" % text)
    if not dims or any(d <= 0 for d in dims):
        raise BuildError("bad shape %r: dims must be positive" % text)
    return dims


def parse_shape_arg(arg):
    """'name=1x3x224x224' (static) or 'name=MIN,OPT,MAX' -> (name, (min, opt, max))."""
    if "=" not in arg:
        raise BuildError("--shape expects name=DIMS or name=MIN,OPT,MAX, got %r" % arg)
    name, spec = arg.rsplit("=", 1)
    parts = [parse_dims(p) for p in spec.split(",")]
    if len(parts) == 1:
        parts = parts * 3
    if len(parts) != 3:
        raise BuildError("--shape %s: give one shape or three (min,opt,max)" % name)
    if len({len(p) for p in parts}) != 1:
        raise BuildError("--shape %s: min/opt/max have different ranks" % name)
    mn, opt, mx = parts
    if any(not (a <= b <= c) for a, b, c in zip(mn, opt, mx)):
        raise BuildError("--shape %s: need min <= opt <= max in every dimension" % name)
    return name, (mn, opt, mx)


def resolve_profile(inputs, shapes):
    """inputs: [(name, dims with -1 for dynamic)]; shapes: {name: (min, opt, max)}.

    Returns {name: (min, opt, max)} for every input that needs a profile. A dynamic dimension without a
    given shape defaults to 1 only when it is the leading (batch) dimension; any other is an error.
    """
    profile = {}
    for name, dims in inputs:
        dims = tuple(int(d) for d in dims)
        if name in shapes:
            mn, opt, mx = shapes[name]
            if len(mn) != len(dims):
                raise BuildError("--shape %s has rank %d, the network input has rank %d" % (name, len(mn), len(dims)))
            for i, d in enumerate(dims):
                if d >= 0 and not (mn[i] == opt[i] == mx[i] == d):
                    raise BuildError("--shape %s: dimension %d is fixed to %d in the model" % (name, i, d))
            profile[name] = (tuple(mn), tuple(opt), tuple(mx))
        elif any(d < 0 for d in dims):
            if any(d < 0 for d in dims[1:]):
                raise BuildError("input %s has dynamic dims %s: give --shape %s=MIN,OPT,MAX" % (name, list(dims), name))
            static = (1,) + dims[1:]
            profile[name] = (static, static, static)
    return profile


def is_static_profile(profile):
    return all(mn == opt == mx for mn, opt, mx in profile.values())


def _err_field(err, attr):
    """A string field of IParserError (a method in the bindings; tolerate a property), '' when absent."""
    v = getattr(err, attr, None)
    try:
        v = v() if callable(v) else v
    except Exception:
        v = None
    return str(v) if v else ""


def format_parser_error(err, index=None):
    """One line per ONNX-parser error, naming the node (IParserError.node_name() exists since TensorRT 10.0)."""
    name = _err_field(err, "node_name")
    op = _err_field(err, "node_operator")
    node_idx = err.node() if callable(getattr(err, "node", None)) else -1
    where = "node '%s'" % name if name else ("node #%d" % node_idx if node_idx is not None and node_idx >= 0 else "graph")
    if op:
        where += " (%s)" % op
    code = err.code() if callable(getattr(err, "code", None)) else ""
    return "%s: %s [%s]" % (where, str(err.desc()).strip().splitlines()[0] if err.desc() else "error", str(code).split(".")[-1])


# ----------------------------------------------------------------------------- build

class BuildOptions:
    """Keyword-only build settings; validated on construction."""

    def __init__(self, *, onnx_path, engine_path, timing_cache=None, workspace_mb=DEFAULT_WORKSPACE_MB,
                 opt_level=3, dla_core=None, gpu_fallback=True, typing="auto", shapes=None, verbose=False):
        if typing not in ("auto", "strong", "weak-fp16"):
            raise BuildError("typing must be auto, strong or weak-fp16, got %r" % (typing,))
        if not 0 <= int(opt_level) <= 5:
            raise BuildError("builder optimization level must be 0..5, got %r" % (opt_level,))
        if int(workspace_mb) <= 0:
            raise BuildError("workspace must be positive (MiB)")
        if dla_core is not None and int(dla_core) < 0:
            raise BuildError("DLA core must be >= 0")
        if dla_core is not None and typing == "strong":
            raise BuildError("a DLA build cannot be strongly typed: the DLA runs FP16/INT8 only and a strongly "
                             "typed network rejects those builder flags (use --typing auto)")
        if dla_core is not None and any(tuple(mn) != tuple(mx) for mn, _, mx in (shapes or {}).values()):
            raise BuildError("DLA builds need static shapes: give --shape name=DIMS (one shape) for every input")
        self.onnx_path = str(onnx_path)
        self.engine_path = str(engine_path)
        self.timing_cache = str(timing_cache) if timing_cache else default_timing_cache(self.engine_path)
        self.workspace_mb = int(workspace_mb)
        self.opt_level = int(opt_level)
        self.dla_core = None if dla_core is None else int(dla_core)
        self.gpu_fallback = bool(gpu_fallback)
        self.typing = typing
        self.shapes = dict(shapes or {})
        self.verbose = bool(verbose)

    def as_dict(self):
        d = dict(self.__dict__)
        d["shapes"] = {k: [list(s) for s in v] for k, v in self.shapes.items()}
        return d


def default_timing_cache(engine_path):
    root, _ = os.path.splitext(str(engine_path))
    return root + ".timing.cache"


def _network_io(network):
    return [(network.get_input(i).name, tuple(network.get_input(i).shape)) for i in range(network.num_inputs)]


def _count_qdq(trt, network):
    kinds = (trt.LayerType.QUANTIZE, trt.LayerType.DEQUANTIZE)
    return sum(1 for i in range(network.num_layers) if network.get_layer(i).type in kinds)


def _parse(trt, builder, logger, onnx_path, strongly_typed):
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if strongly_typed else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    ok = parser.parse_from_file(onnx_path)
    if not ok or parser.num_errors:
        lines = [format_parser_error(parser.get_error(i), i) for i in range(parser.num_errors)]
        for ln in lines:
            log.error("ONNX parser: %s", ln)
        first = lines[0] if lines else "unknown parser failure"
        more = " (+%d more)" % (len(lines) - 1) if len(lines) > 1 else ""
        raise BuildError("TensorRT cannot parse %s: %s%s" % (os.path.basename(onnx_path), first, more))
    return network, parser


def _dla_fallbacks(config, network):
    out = []
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if not config.can_run_on_DLA(layer):
            out.append({"layer": layer.name, "type": str(layer.type).split(".")[-1]})
    return out


def _load_timing_cache(config, path):
    """Load <path> into the config; a cache TensorRT will not take (another version or GPU: create fails,
    returns None, or set reports a mismatch) is discarded for a fresh one. Returns (loaded bytes, note)."""
    data = b""
    if path and os.path.isfile(path):
        with open(path, "rb") as f:
            data = f.read()
    why = None
    try:
        cache = config.create_timing_cache(data)
        if cache is None:
            why = "TensorRT could not read it"
        elif not config.set_timing_cache(cache, ignore_mismatch=False):
            why = "it was made for another device or TensorRT version"
    except Exception as e:  # TensorRT raises on a corrupt or foreign cache
        why = "TensorRT could not read it (%s)" % str(e).strip().splitlines()[0][:160] if str(e).strip() else "TensorRT could not read it"
    if why is None:
        return len(data), None
    log.warning("timing cache %s discarded: %s; starting a fresh one", path, why)
    fresh = config.create_timing_cache(b"")
    if fresh is None or not config.set_timing_cache(fresh, ignore_mismatch=False):
        raise BuildError("TensorRT could not create an empty timing cache")
    return 0, "discarded: " + why


def _atomic_write_bytes(path, data):
    tmp = "%s.tmp-%d" % (path, os.getpid())
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _precision(trt, config, opts, strongly_typed, qdq):
    """Builder precision flags: none on a strongly typed network; FP16 (+INT8 for Q/DQ) otherwise; DLA as trtexec."""
    if strongly_typed:
        return "explicit Q/DQ (strongly typed)" if qdq else "graph types (strongly typed)"
    config.set_flag(trt.BuilderFlag.FP16)
    if qdq:
        config.set_flag(trt.BuilderFlag.INT8)  # weakly typed Q/DQ: int8 where the graph's Q/DQ scales say so
    if opts.dla_core is not None:
        config.set_flag(trt.BuilderFlag.PREFER_PRECISION_CONSTRAINTS)
        return "DLA fp16 + int8 from Q/DQ scales (weakly typed)" if qdq else "DLA fp16 (weakly typed)"
    return "fp16 + int8 from Q/DQ (weakly typed)" if qdq else "fp16 (weakly typed)"


def _setup_dla(trt, builder, config, network, opts, profile_shapes):
    if profile_shapes and not is_static_profile(profile_shapes):
        raise BuildError("DLA builds need static shapes: give --shape name=DIMS (one shape) for every input")
    n_dla = builder.num_DLA_cores
    if opts.dla_core >= n_dla:
        hint = ""
        if check_version(trt.__version__) > (10, 7):
            hint = " (TensorRT 10.7 was the last 10.x release with DLA support; JetPack 6 ships 10.3)"
        raise BuildError("DLA core %d requested, this device has %d DLA core(s)%s" % (opts.dla_core, n_dla, hint))
    config.default_device_type = trt.DeviceType.DLA
    config.DLA_core = opts.dla_core
    if opts.gpu_fallback:
        config.set_flag(trt.BuilderFlag.GPU_FALLBACK)
    fallbacks = _dla_fallbacks(config, network)
    if fallbacks and not opts.gpu_fallback:
        raise BuildError("%d layer(s) cannot run on the DLA (first: %s) and GPU fallback is off"
                         % (len(fallbacks), fallbacks[0]["layer"]))
    log.info("DLA core %d: %d of %d layers fall back to the GPU", opts.dla_core, len(fallbacks), network.num_layers)
    return {"core": opts.dla_core, "gpu_fallback": opts.gpu_fallback, "gpu_fallback_layers": fallbacks,
            "layers": network.num_layers}


def _make_builder(trt, logger):
    try:
        builder = trt.Builder(logger)
    except Exception as e:  # TensorRT raises when no CUDA device or driver is usable
        raise BuildError("TensorRT could not create a builder (no CUDA GPU or driver?): %s" % str(e).strip()[:200])
    if builder is None:
        raise BuildError("TensorRT could not create a builder (no CUDA GPU or driver?)")
    return builder


def build_engine(opts):
    """Build and serialize the engine; return a JSON-serializable summary (also written to <engine>.build.json)."""
    trt = import_tensorrt()
    if not os.path.isfile(opts.onnx_path):
        raise BuildError("ONNX file %s does not exist" % opts.onnx_path)
    logger = trt.Logger(trt.Logger.VERBOSE if opts.verbose else trt.Logger.WARNING)
    t0 = time.perf_counter()
    builder = _make_builder(trt, logger)
    strongly_typed = opts.typing == "strong" or (opts.typing == "auto" and opts.dla_core is None)
    network, parser = _parse(trt, builder, logger, opts.onnx_path, strongly_typed)
    qdq = _count_qdq(trt, network)
    if opts.typing == "auto" and strongly_typed and qdq == 0:
        log.info("no Q/DQ layers in %s: building weakly typed with FP16 enabled (not strongly typed)",
                 os.path.basename(opts.onnx_path))
        strongly_typed = False
        network, parser = _parse(trt, builder, logger, opts.onnx_path, False)
    elif opts.typing == "strong" and qdq == 0:
        log.info("strongly typed build of a graph without Q/DQ: precisions are the graph's (FP32 unless cast)")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, opts.workspace_mb << 20)
    config.builder_optimization_level = opts.opt_level
    precision = _precision(trt, config, opts, strongly_typed, qdq)
    profile_shapes = resolve_profile(_network_io(network), opts.shapes)
    if profile_shapes:
        profile = builder.create_optimization_profile()
        for name, (mn, opt, mx) in profile_shapes.items():
            profile.set_shape(name, mn, opt, mx)
        config.add_optimization_profile(profile)
    dla = _setup_dla(trt, builder, config, network, opts, profile_shapes) if opts.dla_core is not None else None

    cache_in, cache_note = _load_timing_cache(config, opts.timing_cache)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise BuildError("TensorRT failed to build the engine (see the TensorRT log above)")
    data = bytes(serialized)
    d = os.path.dirname(os.path.abspath(opts.engine_path))
    os.makedirs(d, exist_ok=True)
    _atomic_write_bytes(opts.engine_path, data)
    cache_out = bytes(config.get_timing_cache().serialize())
    _atomic_write_bytes(opts.timing_cache, cache_out)

    summary = {
        "tensorrt_version": trt.__version__, "engine": os.path.basename(opts.engine_path),
        "onnx": os.path.basename(opts.onnx_path), "engine_bytes": len(data),
        "build_seconds": round(time.perf_counter() - t0, 3), "strongly_typed": strongly_typed,
        "precision": precision, "qdq_layers": qdq, "network_layers": network.num_layers,
        "optimization_profile": {k: [list(s) for s in v] for k, v in profile_shapes.items()},
        "timing_cache": {"path": os.path.basename(opts.timing_cache), "loaded_bytes": cache_in,
                         "saved_bytes": len(cache_out), "note": cache_note},
        "dla": dla, "options": opts.as_dict(),
    }
    _atomic_write_bytes(os.path.splitext(opts.engine_path)[0] + ".build.json",
                        (json.dumps(summary, indent=2, sort_keys=True) + "\n").encode())
    log.info("built %s (%d bytes) in %.1fs", opts.engine_path, len(data), summary["build_seconds"])
    return summary


def baseline_options(opts, onnx_path, engine_path):
    """The baseline engine's options: the original graph, weakly typed FP16, same shapes/DLA/workspace/cache."""
    return BuildOptions(onnx_path=onnx_path, engine_path=engine_path, timing_cache=opts.timing_cache,
                        workspace_mb=opts.workspace_mb, opt_level=opts.opt_level, dla_core=opts.dla_core,
                        gpu_fallback=opts.gpu_fallback, typing="weak-fp16", shapes=opts.shapes, verbose=opts.verbose)


# ----------------------------------------------------------------------------- CLI

def make_parser():
    p = argparse.ArgumentParser(description="Build a TensorRT 10.x engine from an ONNX model (edgec).")
    p.add_argument("--onnx", default="model.onnx")
    p.add_argument("--engine", default="model.engine")
    p.add_argument("--timing-cache", default=None, help="default: <engine>.timing.cache")
    p.add_argument("--workspace-mb", type=int, default=DEFAULT_WORKSPACE_MB)
    p.add_argument("--opt-level", type=int, default=3, help="builder_optimization_level 0..5")
    p.add_argument("--dla-core", type=int, default=None, help="build for this DLA core (Jetson Orin)")
    p.add_argument("--no-gpu-fallback", action="store_true", help="DLA only: fail instead of falling back")
    p.add_argument("--typing", choices=("auto", "strong", "weak-fp16"), default="auto",
                   help="auto: strongly typed if the graph has Q/DQ, else weakly typed FP16")
    p.add_argument("--shape", action="append", default=[], metavar="NAME=DIMS[,OPT,MAX]")
    p.add_argument("--baseline-onnx", default=None,
                   help="original FP32 graph for the baseline engine (default: baseline.onnx next to --onnx, if there)")
    p.add_argument("--baseline-engine", default=None, help="default: baseline.engine next to --engine")
    p.add_argument("--no-baseline", action="store_true", help="do not build the FP16 baseline engine")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def options_from_args(args):
    shapes = dict(parse_shape_arg(s) for s in args.shape)
    return BuildOptions(onnx_path=args.onnx, engine_path=args.engine, timing_cache=args.timing_cache,
                        workspace_mb=args.workspace_mb, opt_level=args.opt_level, dla_core=args.dla_core,
                        gpu_fallback=not args.no_gpu_fallback, typing=args.typing, shapes=shapes, verbose=args.verbose)


def baseline_paths(args):
    """(baseline onnx, baseline engine) to build, or None."""
    if args.no_baseline:
        return None
    onnx_path = args.baseline_onnx or os.path.join(os.path.dirname(os.path.abspath(args.onnx)), "baseline.onnx")
    if not os.path.isfile(onnx_path):
        if args.baseline_onnx:
            raise BuildError("baseline ONNX %s does not exist" % onnx_path)
        return None
    engine = args.baseline_engine or os.path.join(os.path.dirname(os.path.abspath(args.engine)), "baseline.engine")
    return onnx_path, engine


def main(argv=None):
    args = make_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    keys = ("engine", "engine_bytes", "build_seconds", "precision", "tensorrt_version")
    try:
        opts = options_from_args(args)
        base = baseline_paths(args)
        summary = build_engine(opts)
        sys.stdout.write(json.dumps({k: summary[k] for k in keys}) + "\n")
        if base is not None:
            b = build_engine(baseline_options(opts, base[0], base[1]))
            sys.stdout.write(json.dumps(dict({k: b[k] for k in keys}, role="baseline")) + "\n")
    except BuildError as e:
        sys.stderr.write("build_engine: %s\n" % e)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
