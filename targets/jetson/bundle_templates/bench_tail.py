# ============================================================================ bench.py (device side)
# edgec appends this to targets/tensorrt/runner.py to make the bundle's bench.py: the names it uses
# (EngineRunner, run_engine, run_engines, fidelity, summarize_ms, gpu_status, write_json, make_report, CudaError)
# come from runner.py above. Standalone: tensorrt and numpy (JetPack 6 provides them) and cuda-python, which
# JetPack does not install: pip3 install 'cuda-python>=12,<13' (JetPack 6 ships CUDA 12.6).
#
#   python3 bench.py [--allow-unlocked] [--runs 200] [--warmup 20] [--build] [--no-baseline]
#
# Times baseline.engine (FP16 from the original graph) and model.engine interleaved in one run and reports
# the ratio of their medians; fidelity of both against reference_outputs.npz. Writes report.json: the
# host's edgec report (kept as report.host.json) with "bench" and "fidelity" replaced by this device's
# measurement of the compiled engine ("bench.baseline" holds the baseline's), and "fidelity_host_onnxruntime"
# keeping the host's ONNX Runtime figure. Clocks: records `nvpmodel -q` and `jetson_clocks --show` and a
# summary of the run's power mode and clocks; refuses to run (exit 3) when the clocks are not locked, unless
# --allow-unlocked, which marks the numbers "comparable": false. RAM: samples `tegrastats` when it exists.
import argparse
import re
import shutil
import subprocess
import sys
import threading

HERE = os.path.dirname(os.path.abspath(__file__))
EXIT_UNLOCKED = 3
EXIT_ERROR = 2


def run_cmd(argv, timeout=15):
    """(returncode, output) of a command, or None when the program is not on PATH."""
    exe = shutil.which(argv[0])
    if exe is None:
        return None
    try:
        p = subprocess.run([exe] + list(argv[1:]), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           timeout=timeout, universal_newlines=True)
        return p.returncode, p.stdout
    except (OSError, subprocess.TimeoutExpired) as e:
        return -1, str(e)


def parse_nvpmodel(text):
    """`nvpmodel -q` -> {"mode": "MAXN", "id": 0} (id None when absent)."""
    m = re.search(r"NV Power Mode:\s*(\S+)", text or "")
    if not m:
        return None
    ident = None
    rest = text[m.end():].split()
    if rest and rest[0].isdigit():
        ident = int(rest[0])
    return {"mode": m.group(1), "id": ident}


_FREQ = re.compile(r"(MinFreq|MaxFreq|CurrentFreq)=(\d+)")


def parse_jetson_clocks(text):
    """`jetson_clocks --show` -> {"cpus": {cpu0: {...}}, "gpu": {...}, "emc": {...}, "power_mode": str}."""
    out = {"cpus": {}, "gpu": None, "emc": None, "power_mode": None}
    for line in (text or "").splitlines():
        s = line.strip()
        freqs = {k: int(v) for k, v in _FREQ.findall(s)}
        if s.startswith("NV Power Mode:"):
            out["power_mode"] = s.split(":", 1)[1].strip()
        elif re.match(r"cpu\d+:", s) and freqs:
            online = re.search(r"Online=(\d)", s)
            out["cpus"][s.split(":", 1)[0]] = dict(freqs, online=(online is None or online.group(1) == "1"))
        elif s.startswith("GPU") and freqs:
            out["gpu"] = freqs
        elif s.startswith("EMC") and freqs:
            fo = re.search(r"FreqOverride=(\d)", s)
            out["emc"] = dict(freqs, override=(fo.group(1) == "1") if fo else None)
    return out


def clocks_locked(parsed):
    """(locked, reasons): GPU and every online CPU at min == max == current; EMC at its maximum."""
    if parsed is None:
        return False, ["jetson_clocks not available: clocks unknown"]
    reasons = []
    gpu = parsed.get("gpu")
    if not gpu:
        reasons.append("no GPU clock line in jetson_clocks --show")
    elif not (gpu.get("MinFreq") == gpu.get("MaxFreq") == gpu.get("CurrentFreq")):
        reasons.append("GPU clock not fixed (min %s, max %s, current %s)" % (gpu.get("MinFreq"), gpu.get("MaxFreq"), gpu.get("CurrentFreq")))
    emc = parsed.get("emc")
    if emc and emc.get("CurrentFreq") != emc.get("MaxFreq"):
        reasons.append("EMC (memory) clock %s below max %s" % (emc.get("CurrentFreq"), emc.get("MaxFreq")))
    cpus = parsed.get("cpus") or {}
    if not cpus:
        reasons.append("no CPU clock lines in jetson_clocks --show")
    for name, c in sorted(cpus.items()):
        if c.get("online") and not (c.get("MinFreq") == c.get("MaxFreq") == c.get("CurrentFreq")):
            reasons.append("%s clock not fixed (min %s, max %s, current %s)" % (name, c.get("MinFreq"), c.get("MaxFreq"), c.get("CurrentFreq")))
            break
    return not reasons, reasons


_RAM = re.compile(r"RAM (\d+)/(\d+)MB")


def parse_tegrastats_ram(line):
    """'RAM 2448/7620MB (lfb ...) ...' -> (used_mb, total_mb), or None."""
    m = _RAM.search(line or "")
    return (int(m.group(1)), int(m.group(2))) if m else None


class TegraStats:
    """Samples `tegrastats --interval MS` in a thread; keeps the first and the peak RAM use (MB)."""

    def __init__(self, interval_ms=100):
        self.interval_ms = interval_ms
        self.proc = None
        self.samples = []
        self.total_mb = None
        self._thread = None

    def start(self):
        exe = shutil.which("tegrastats")
        if exe is None:
            return False
        try:
            self.proc = subprocess.Popen([exe, "--interval", str(self.interval_ms)], stdout=subprocess.PIPE,
                                         stderr=subprocess.DEVNULL, universal_newlines=True)
        except OSError:
            self.proc = None
            return False
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()
        return True

    def _read(self):
        for line in self.proc.stdout:
            r = parse_tegrastats_ram(line)
            if r:
                self.samples.append(r[0])
                self.total_mb = r[1]

    def stop(self):
        if self.proc is None:
            return None
        self.proc.terminate()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        if self._thread is not None:
            self._thread.join(timeout=2)
        return self.result()

    def result(self):
        if not self.samples:
            return None
        return {"ram_first_mb": self.samples[0], "ram_peak_mb": max(self.samples),
                "ram_peak_minus_first_mb": max(self.samples) - self.samples[0], "ram_total_mb": self.total_mb,
                "samples": len(self.samples), "interval_ms": self.interval_ms, "source": "tegrastats"}


def read_file(path):
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def environment():
    """What this device is and how it is clocked (each probe None when unavailable)."""
    env = {"python": sys.version.split()[0], "l4t_release": read_file("/etc/nv_tegra_release"),
           "model": (read_file("/proc/device-tree/model") or "").rstrip("\x00") or None}
    try:
        import tensorrt as trt
        env["tensorrt"] = trt.__version__
    except ImportError:
        env["tensorrt"] = None
    jp = run_cmd(["dpkg-query", "-W", "-f=${Version}", "nvidia-jetpack"])
    env["jetpack"] = jp[1].strip() if jp and jp[0] == 0 else None
    nv = run_cmd(["nvpmodel", "-q"])
    env["nvpmodel"] = {"raw": nv[1], "parsed": parse_nvpmodel(nv[1])} if nv else None
    jc = run_cmd(["jetson_clocks", "--show"])
    env["jetson_clocks"] = None if jc is None else {
        "raw": jc[1], "rc": jc[0], "parsed": parse_jetson_clocks(jc[1]) if jc[0] == 0 else None}
    return env


def clock_state(env):
    """(locked, reasons) from an environment() dict."""
    jc = env.get("jetson_clocks")
    if jc is not None and jc.get("parsed") is None:
        return False, ["`jetson_clocks --show` failed (rc %s; run bench.py with sudo?)" % jc.get("rc")]
    return clocks_locked(jc["parsed"] if jc else None)


def decide_comparable(locked, reasons, allow_unlocked):
    """(proceed, comparable, reason)."""
    if locked:
        return True, True, "clocks locked (jetson_clocks)"
    why = "; ".join(reasons) or "clocks not locked"
    if allow_unlocked:
        return True, False, "NOT comparable: " + why + " (run with --allow-unlocked)"
    return False, False, why


def load_reference(path):
    """reference_outputs.npz -> (feeds per sample, outputs per sample, output names, labels or None, meta)."""
    with np.load(path, allow_pickle=False) as z:
        meta = json.loads(str(z["__meta__"][()]))
        ins = {n: z["input." + n] for n in meta["inputs"]}
        outs = {n: z["output." + n] for n in meta["outputs"]}
        labels = z["labels"] if "labels" in z.files else None
    n = meta["samples"]
    feeds = [{k: np.ascontiguousarray(v[i:i + 1]).astype(meta["input_dtypes"][k]) for k, v in ins.items()} for i in range(n)]
    refs = [[outs[k][i:i + 1] for k in meta["outputs"]] for i in range(n)]
    labs = None if labels is None else [labels[i:i + 1] for i in range(n)]
    return feeds, refs, list(meta["outputs"]), labs, meta


def device_report(host_report, bench_section, fidelity_result, build_summary=None):
    """The edgec report for this device: the host report with bench/fidelity replaced by device numbers."""
    rep = dict(host_report or {})
    if "fidelity" in rep:
        rep["fidelity_host_onnxruntime"] = rep["fidelity"]
    rep["fidelity"] = fidelity_result
    rep["bench"] = bench_section
    tb = dict(rep.get("target_build") or {})
    if build_summary is not None:
        tb["engine"] = build_summary
    tb["deferred"] = False
    rep["target_build"] = tb
    rep.setdefault("target", "jetson")
    return rep


def _host_report():
    """The host's report: report.host.json (once kept) or the report.json compile wrote, kept aside first."""
    host = os.path.join(HERE, "report.host.json")
    cur = os.path.join(HERE, "report.json")
    if not os.path.exists(host) and os.path.exists(cur):
        with open(cur) as f:
            rep = json.load(f)
        if not (rep.get("bench") or {}).get("device_run"):
            shutil.copyfile(cur, host)
    if os.path.exists(host):
        with open(host) as f:
            return json.load(f)
    return None


def _manifest():
    p = os.path.join(HERE, "manifest.json")
    if os.path.exists(p):
        with open(p) as f:
            return json.load(f)
    return {}


def make_arg_parser():
    p = argparse.ArgumentParser(description="Benchmark the edgec TensorRT engine on this Jetson and write report.json.")
    p.add_argument("--engine", default=os.path.join(HERE, "model.engine"))
    p.add_argument("--reference", default=os.path.join(HERE, "reference_outputs.npz"))
    p.add_argument("--out", default=os.path.join(HERE, "report.json"))
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--runs", type=int, default=MIN_TIMED_RUNS)
    p.add_argument("--allow-unlocked", action="store_true",
                   help="measure even when clocks are not locked; numbers are marked not comparable")
    p.add_argument("--baseline", default=os.path.join(HERE, "baseline.engine"),
                   help="the FP16 baseline engine timed against --engine in the same run")
    p.add_argument("--no-baseline", action="store_true", help="time the compiled engine alone (no speedup)")
    p.add_argument("--build", action="store_true",
                   help="run build_engine.py (with the bundle's build arguments) when an engine is missing")
    return p


def clock_summary(env, locked):
    """The power mode and clocks this run measured under (from environment())."""
    nv = (env.get("nvpmodel") or {}).get("parsed") or {}
    jc = (env.get("jetson_clocks") or {}).get("parsed") or {}
    cpus = jc.get("cpus") or {}
    return {"power_mode": nv.get("mode") or jc.get("power_mode"), "power_mode_id": nv.get("id"),
            "gpu_hz": (jc.get("gpu") or {}).get("CurrentFreq"), "emc_hz": (jc.get("emc") or {}).get("CurrentFreq"),
            "cpu_hz": sorted({c.get("CurrentFreq") for c in cpus.values() if c.get("online")} - {None}),
            "locked": bool(locked), "model": env.get("model")}


def load_build_engine():
    """The bundle's build_engine.py, loaded by path (never a same-named module from elsewhere on sys.path)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("edgec_bundle_build_engine", os.path.join(HERE, "build_engine.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def build_missing(args):
    """Build the engines with the arguments edgec wrote into manifest.json (DLA core, shapes, typing, ...)."""
    argv = ["--onnx", os.path.join(HERE, "model.onnx"), "--engine", args.engine,
            "--baseline-engine", args.baseline] + list(_manifest().get("build_argv") or [])
    if args.no_baseline:
        argv.append("--no-baseline")
    return load_build_engine().main(argv)


def _build_summary(engine):
    path = os.path.splitext(engine)[0] + ".build.json"
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    return None


def measure(args, comparable, reason, env, locked):
    """Run the engines (baseline first, interleaved); return (bench section, compiled engine's fidelity)."""
    feeds, refs, names, labels, meta = load_reference(args.reference)
    engines = {"compiled": args.engine}
    if not args.no_baseline and os.path.exists(args.baseline):
        engines = {"baseline_fp16": args.baseline, "compiled": args.engine}
    tegra = TegraStats()
    sampling = tegra.start()
    try:
        res = run_engines(engines, feeds, ref_outputs=refs, output_names=names, labels=labels,
                          warmup=args.warmup, runs=args.runs)
    finally:
        ram = tegra.stop() if sampling else None
    comp = res["engines"]["compiled"]
    memory = dict(comp["memory"])
    memory["tegrastats"] = ram
    section = {
        "device_run": True, "target": "jetson", "device": res["device"],
        "latency_ms": comp["latency_ms"], "memory": memory,
        "comparable": comparable, "comparable_reason": reason, "clocks": clock_summary(env, locked),
        "latency_protocol": "batch 1, TensorRT execute_async_v3, CUDA events, %d warm-up + %d timed runs per engine, "
                            "engines interleaved in alternating blocks" % (args.warmup, args.runs),
        "environment": env, "reference_samples": meta["samples"],
    }
    if "baseline_fp16" in res["engines"]:
        b = res["engines"]["baseline_fp16"]
        section["baseline"] = {"engine": os.path.basename(args.baseline), "latency_ms": b["latency_ms"],
                               "memory": b["memory"], "fidelity": b["fidelity"],
                               "build": _build_summary(args.baseline)}
        section["speedup_vs_baseline_fp16"] = comp["latency_ms"]["speedup_vs_baseline_fp16"]
    else:
        section["baseline"] = {"skipped": "no baseline engine %s (run build_engine.py, or bench.py --build)"
                                          % os.path.basename(args.baseline) if not args.no_baseline else "--no-baseline"}
    return section, comp["fidelity"]


def main(argv=None, env=None):
    args = make_arg_parser().parse_args(argv)
    if args.runs < MIN_TIMED_RUNS or args.warmup < 1:
        sys.stderr.write("bench: need --runs >= %d and --warmup >= 1\n" % MIN_TIMED_RUNS)
        return EXIT_ERROR
    env = environment() if env is None else env
    locked, reasons = clock_state(env)
    proceed, comparable, reason = decide_comparable(locked, reasons, args.allow_unlocked)
    if not proceed:
        sys.stderr.write("bench: refusing to measure: clocks are not locked (%s). Lock them with "
                         "`sudo nvpmodel -m <mode> && sudo jetson_clocks`, or pass --allow-unlocked to get numbers "
                         "marked not comparable.\n" % reason)
        return EXIT_UNLOCKED
    ok, why = gpu_status()
    if not ok:
        sys.stderr.write("bench: cannot run the engine here: %s\n" % why)
        return EXIT_ERROR
    missing = not os.path.exists(args.engine) or (not args.no_baseline and not os.path.exists(args.baseline)
                                                   and os.path.exists(os.path.join(HERE, "baseline.onnx")))
    if missing and args.build:
        rc = build_missing(args)
        if rc != 0:
            return rc
    if not os.path.exists(args.engine):
        sys.stderr.write("bench: %s not found: run `python3 build_engine.py` first (or pass --build)\n" % args.engine)
        return EXIT_ERROR
    section, fid = measure(args, comparable, reason, env, locked)
    host = _host_report()
    if host is None:
        man = _manifest()
        host = make_report(model=man.get("model", "unknown"), target="jetson")
        host["recipe"] = man.get("recipe")
    report = device_report(host, section, fid, _build_summary(args.engine))
    write_json(args.out, report)
    s, lat = fid["summary"], section["latency_ms"]
    speed = section.get("speedup_vs_baseline_fp16")
    sys.stdout.write("bench: median %.3f ms, p90 %.3f, p99 %.3f; %s; top-1 agreement %s, cosine %.4f; %s -> %s\n" % (
        lat["median"], lat["p90"], lat["p99"],
        "%.2fx vs the FP16 baseline" % speed if speed else "no baseline", s.get("top1_agreement", "n/a"),
        s["cosine_min"], "comparable" if comparable else "NOT comparable", args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
