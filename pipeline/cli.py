"""edgec command line. Thin: it maps arguments onto pipeline.compile.CompileOptions, the API tests call."""
from __future__ import annotations

import argparse
import logging
import sys
import time

from edgec.core.errors import EdgecError

EPILOG = """\
examples:
  python -m pipeline compile                                   # EfficientNet-Lite0 -> ORT CPU, recipe 'default'
  python -m pipeline compile --model torchvision:resnet18 --recipe cleanup --out out/r18
  python -m pipeline compile --model my.onnx --input-shape images:1x3x640x640 --recipe prune \\
                             --set prune.target_macs=0.7 --set prune.criterion=taylor
  python -m pipeline compile --model mypkg.models:build --weights w.pth --data imgs/ --target jetson
  python -m pipeline passes                                    # list passes with their options
  python -m pipeline recipes                                   # list shipped recipes

model specs:  efficientnet_lite0 | torchvision:<name> | package.module:factory | path/to/model.onnx
data:         bundled (sample photos, disjoint calib/eval photographs) | synthetic | DIR (ImageFolder) | x.npy | x.npz
outputs:      OUT/model.onnx (final graph), OUT/report.json (+ report.md, manifest.json, target files)
exit codes:   0 ok, 2 bad input, 3 a pass broke a check, 1 internal error (rerun with --debug)
"""


def _floats(s: str) -> tuple[float, ...]:
    return tuple(float(x) for x in s.split(","))


def _ints(s: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in s.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got '{s}'") from None


def _add_compile_args(p: argparse.ArgumentParser, *, bench_default: bool, runs_default: int):
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    p.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                   help="print only the summary table (and warnings/errors on stderr)")
    p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                   help="detail logs: per-group / per-layer measurements at full precision")
    g = p.add_argument_group("model")
    g.add_argument("--model", default="efficientnet_lite0", help="model spec (default: efficientnet_lite0)")
    g.add_argument("--weights", help="state-dict .pth for torchvision:/factory models (loaded with weights_only=True)")
    g.add_argument("--input-shape", action="append", default=[], metavar="NAME:1x3xHxW",
                   help="concrete input shape (repeatable); fixes symbolic dims of ONNX inputs")
    g.add_argument("--dynamic-batch", action="store_true", help="export torch models with a dynamic batch axis")
    g.add_argument("--dynamic", metavar="AXES", help="keep these ONNX input axes dynamic in the emitted model and verify it "
                   "at two shapes: batch,height,width | batch,sequence | axis numbers | the model's dim names")
    g.add_argument("--max-memory", metavar="SIZE", help="stop with an error before resident memory exceeds SIZE (e.g. 8G)")
    g = p.add_argument_group("compile")
    g.add_argument("--target", default="ort", help="ort | tensorrt | jetson (default: ort)")
    g.add_argument("--recipe", default="default", help="shipped recipe name, a .yaml path, or inline YAML (default: default)")
    g.add_argument("--set", dest="overrides", action="append", default=[], metavar="PASS.OPTION=VALUE",
                   help="override a recipe option, e.g. --set prune.target_macs=0.7 (repeatable)")
    g.add_argument("--target-opt", action="append", default=[], metavar="KEY=VALUE",
                   help="target option (repeatable), e.g. dla_core=0, workspace_mb=1024, builder_opt_level=3")
    g.add_argument("--out", help="output directory (default: out/<model>-<target>-<recipe>)")
    g.add_argument("--seed", type=int, default=0, help="the one seed every random choice flows from (default: 0)")
    g.add_argument("--cache-dir", help="where measurements that steer choices are cached (default: .cache/edgec)")
    g.add_argument("--cluster", metavar="SPEC", help="evaluate candidates on Ray: auto | ray://HOST:PORT | HOST:PORT | "
                   "local:N (default: $EDGEC_CLUSTER, else in process; needs edgec[ray]; docs/cluster.md)")
    g.add_argument("--compile-threads", type=int, metavar="N", help="threads for the compile's own model evaluations "
                   "(fidelity floors, sensitivity, least squares, the report); results do not depend on it. Default: "
                   "the cores (at most 4) shared among cluster workers. Latency is still timed at --threads")
    g.add_argument("--probe-device", metavar="RESOURCE", help="measure the target's latency costs on the cluster node "
                   "carrying this Ray resource, e.g. cpu_arm64 (needs --cluster)")
    g = p.add_argument_group("data")
    g.add_argument("--input-value", action="append", default=[], metavar="NAME=VALUE",
                   help="a constant for a fixed input (repeatable), e.g. --input-value sr=16000; per-input arrays: "
                   "--data x.npz with one array per input name")
    g.add_argument("--data", help="calibration/eval data: bundled | synthetic | DIR | .npy | .npz (default: bundled)")
    g.add_argument("--calib-samples", type=int, default=64, help="fit split: what passes calibrate and refit on")
    g.add_argument("--validate-samples", type=int, default=128,
                   help="validate split: what every fidelity decision is gated on (default: 128; the policy's "
                   "standard_errors margin shrinks as 1/sqrt(n))")
    g.add_argument("--eval-samples", type=int, default=256,
                   help="eval split: held out, for the report only (default: 256)")
    g.add_argument("--mean", type=_floats, help="preprocessing mean, e.g. 0.485,0.456,0.406")
    g.add_argument("--std", type=_floats, help="preprocessing std")
    g.add_argument("--layout", choices=["NCHW", "NHWC"])
    g = p.add_argument_group("benchmark")
    g.add_argument("--threads", type=_ints, default=(1, 2), help="intra-op threads to time, e.g. 1,2 (default)")
    g.add_argument("--warmup", type=int, default=20, help="warm-up runs per model (>= 20)")
    g.add_argument("--runs", type=int, default=runs_default, help=f"timed runs per model (>= 200, default {runs_default})")
    g.add_argument("--no-bench", dest="bench", action="store_false", default=bench_default, help="skip latency/memory")
    g.add_argument("--no-memory", dest="memory", action="store_false", help="skip the fresh-process peak-RSS probe")
    g.add_argument("--opt-level", default="all", choices=["disable", "basic", "extended", "all"],
                   help="ORT graph optimization level for the emitted engine and timing (default: all)")


def _target_opts(items: list[str]) -> dict:
    from edgec.pipeline.recipe import parse_value

    out = {}
    for it in items:
        if "=" not in it:
            raise EdgecError(f"--target-opt expects KEY=VALUE, got '{it}'")
        k, v = it.split("=", 1)
        out[k.strip()] = parse_value(v)
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipeline", description="edgec: compile a trained network for an edge target "
                                "(ONNX cleanup, structured channel removal, mixed-bit quantization; ORT / TensorRT / Jetson).",
                                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.add_argument("-q", "--quiet", action="store_true", help="print only the summary table (and warnings/errors on stderr)")
    p.add_argument("-v", "--verbose", action="store_true", help="detail logs: per-group / per-layer measurements")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    c = sub.add_parser("compile", help="compile a model for a target and write OUT/ with a report",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_compile_args(c, bench_default=True, runs_default=200)
    b = sub.add_parser("bench", help="compile (if needed) and benchmark against the original, interleaved",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_compile_args(b, bench_default=True, runs_default=500)
    sub.add_parser("passes", help="list passes, their rule and options")
    sub.add_parser("recipes", help="list shipped recipes")
    f = sub.add_parser("bench-farm", help="benchmark a compiled bundle on every cluster device carrying the resources")
    f.add_argument("bundle", help="a compiled output directory (model.onnx; a Jetson bundle runs its own bench.py)")
    f.add_argument("--cluster", metavar="SPEC", help="auto | ray://HOST:PORT | HOST:PORT (default: $EDGEC_CLUSTER)")
    f.add_argument("--devices", required=True, help="device resources, comma-separated, e.g. jetson_orin_nano,cpu_x86")
    f.add_argument("--threads", type=_ints, default=(1,), help="intra-op threads for ORT bundles (default: 1)")
    f.add_argument("--warmup", type=int, default=20)
    f.add_argument("--runs", type=int, default=200)
    f.add_argument("--out", help="where farm.json and farm.md go (default: the bundle directory)")
    return p


def _cmd_bench_farm(args) -> int:
    from edgec.pipeline.cluster import farm_markdown, run_bench_farm

    report, dest = run_bench_farm(args.cluster, args.bundle, args.devices, tuple(args.threads), args.runs, args.warmup,
                                  args.out)
    print(farm_markdown(report))
    print(f"  farm report: {dest}/farm.md  ({dest}/farm.json)")
    return 1 if report["failed"] else 0


def _setup_logging(quiet: bool, debug: bool, verbose: bool = False) -> None:
    """Logs and progress bars go to stderr (the report table to stdout): -q warnings only and no bars, default
    progress bars and one line per step, -v (or --debug) edgec's detail at DEBUG."""
    from edgec.core import progress

    progress.configure(bars=not quiet)
    t0 = time.perf_counter()

    class Fmt(logging.Formatter):
        def format(self, record):
            return f"[{time.perf_counter() - t0:7.1f}s] {record.getMessage()}"

    h = progress.LogHandler(sys.stderr)
    h.setFormatter(Fmt())
    root = logging.getLogger()
    root.handlers[:] = [h]
    root.setLevel(logging.WARNING if quiet else (logging.DEBUG if debug else logging.INFO))
    logging.getLogger("edgec").setLevel(logging.DEBUG if (verbose or debug) and not quiet else logging.NOTSET)
    for noisy in ("onnxscript", "onnx_ir", "matplotlib", "PIL", "torch", "onnx2torch"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _cmd_passes() -> int:
    import dataclasses

    from edgec.passes.base import list_passes

    for name, spec in list_passes().items():
        print(f"{name}{' (exact)' if spec.exact else ''}: {spec.doc}")
        for f in dataclasses.fields(spec.options):
            default = f.default if f.default is not dataclasses.MISSING else "(required)"
            print(f"    {name}.{f.name} = {default!r}")
    return 0


def _cmd_recipes() -> int:
    from edgec.pipeline.recipe import available, load_recipe

    for r in available():
        rec = load_recipe(r)
        print(f"{r}: {rec.description}\n    " + " -> ".join(s.name for s in rec.steps))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.quiet, args.debug, args.verbose)
    try:
        if args.cmd == "passes":
            return _cmd_passes()
        if args.cmd == "recipes":
            return _cmd_recipes()
        if args.cmd == "bench-farm":
            return _cmd_bench_farm(args)
        from edgec.pipeline.compile import CompileOptions, command_line, compile_model
        from edgec.pipeline.report import summary_table

        opts = CompileOptions(model=args.model, target=args.target, recipe=args.recipe, out=args.out,
                              overrides=args.overrides, input_shapes=args.input_shape, weights=args.weights,
                              input_values=args.input_value,
                              data=args.data, calib_samples=args.calib_samples, eval_samples=args.eval_samples,
                              validate_samples=args.validate_samples,
                              threads=tuple(args.threads), seed=args.seed, bench=args.bench, memory=args.memory,
                              warmup=args.warmup, runs=args.runs, opt_level=args.opt_level,
                              dynamic_batch=args.dynamic_batch, dynamic=args.dynamic, max_memory=args.max_memory,
                              mean=args.mean, std=args.std, layout=args.layout, cache_dir=args.cache_dir,
                              target_opts=_target_opts(args.target_opt), cluster=args.cluster,
                              probe_device=args.probe_device, compile_threads=args.compile_threads,
                              command=command_line())
        report = compile_model(opts)
        print(summary_table(report))
        print(f"  report: {report['out']}/report.md  ({report['out']}/report.json)")
        return 0
    except EdgecError as e:
        print(f"edgec: error: {e}", file=sys.stderr)
        if args.debug:
            raise
        return e.exit_code
    except OSError as e:  # disk full, unwritable output, I/O error: the environment, not a bug; outputs are staged
        if args.debug:
            raise
        print(f"edgec: error: cannot complete the run: {e.strerror or e} (any previous output is left intact)",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("edgec: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # an internal bug: still one line unless --debug
        if args.debug:
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        print(f"edgec: internal error: {type(e).__name__}: {msg} (rerun with --debug for a traceback)", file=sys.stderr)
        return 1
    finally:
        from edgec.core import progress

        progress.configure(bars=False)  # main() called in-process (tests) leaves the library silent


if __name__ == "__main__":
    sys.exit(main())
