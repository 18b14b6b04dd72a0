"""Same outputs before and after a refactor: compile a model matrix through the CLI and compare with a record.

    python bench/renovation_check.py record  bench/renovation_baseline.json   # on the old tree
    python bench/renovation_check.py check   bench/renovation_baseline.json   # on the new tree

For every model x recipe it compiles with `python -m pipeline compile --no-bench` (the CLI exists under the same
name in every layout), runs the emitted model.onnx in ONNX Runtime with graph optimizations OFF on fixed seeded
inputs, and records a SHA-256 of every output's bytes plus the op counts. `check` recompiles and fails (exit 1)
unless every output is bit-identical (max abs diff 0) and every op count is equal. The latency cache is a fixed
directory (`--cache-dir`), so latency-driven bit choices replay the same measurements in both runs.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RECIPES = ("cleanup", "prune", "quant", "default")
TRAITS = ("paddle_opset11", "ultralytics_detector", "external_data", "matmul_attention")


def _writers():
    try:
        from edgec.testing import realworld_models as rw  # after the renovation
    except ImportError:
        from tests import realworld_models as rw  # before it
    return rw.WRITERS


def models(work: Path, quick: bool) -> list[tuple[str, str, list[str]]]:
    out = [("efficientnet_lite0", "efficientnet_lite0", []), ("resnet18", "torchvision:resnet18", [])]
    if quick:
        out = out[1:]
    writers = _writers()
    for name in TRAITS:
        rw = writers[name](work / "traits")
        args = [a for s in rw.shape_args for a in ("--input-shape", s)]
        if rw.data:
            args += ["--data", rw.data]
        out.append((name, str(rw.path), args))
    return out


def _feeds(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1234)
    init = {i.name for i in model.graph.initializer}
    feeds = {}
    for i in model.graph.input:
        if i.name in init:
            continue
        t = i.type.tensor_type
        shape = [d.dim_value if d.dim_value > 0 else 1 for d in t.shape.dim]
        feeds[i.name] = rng.standard_normal(shape).astype(onnx.helper.tensor_dtype_to_np_dtype(t.elem_type))
    return feeds


def fingerprint(path: Path) -> dict:
    m = onnx.load(str(path))
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    outs = sess.run(None, _feeds(m))
    ops: dict[str, int] = {}
    for n in m.graph.node:
        ops[n.op_type] = ops.get(n.op_type, 0) + 1
    return {"outputs": [hashlib.sha256(np.ascontiguousarray(o).tobytes()).hexdigest() for o in outs],
            "ops": dict(sorted(ops.items()))}


def compile_one(spec: str, recipe: str, args: list[str], out: Path, cache: Path) -> dict:
    cmd = [sys.executable, "-m", "pipeline", "compile", "--model", spec, "--recipe", recipe, "--out", str(out),
           "--no-bench", "--no-memory", "--threads", "1", "--cache-dir", str(cache), "-q", *args]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONHASHSEED": "0"})
    if r.returncode:
        return {"error": (r.stderr.strip().splitlines() or ["?"])[-1]}
    return fingerprint(out / "model.onnx")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("mode", choices=["record", "check"])
    ap.add_argument("baseline", type=Path)
    ap.add_argument("--quick", action="store_true", help="skip EfficientNet-Lite0")
    ap.add_argument("--recipes", default=",".join(RECIPES))
    ap.add_argument("--cache-dir", type=Path, default=ROOT / ".cache" / "renovation")
    a = ap.parse_args()
    old = json.loads(a.baseline.read_text()) if a.mode == "check" else {}
    got, bad = {}, []
    with tempfile.TemporaryDirectory() as td:
        for name, spec, args in models(Path(td), a.quick):
            for recipe in a.recipes.split(","):
                key = f"{name}/{recipe}"
                if a.mode == "check" and key not in old:
                    continue
                got[key] = compile_one(spec, recipe, args, Path(td) / "out" / key, a.cache_dir)
                same = a.mode == "record" or got[key] == old[key]
                print(f"{key:40s} {'ok' if same else 'DIFFERENT'} {got[key].get('error', '')}", flush=True)
                if not same:
                    bad.append(key)
    if a.mode == "record":
        a.baseline.write_text(json.dumps(got, indent=1, sort_keys=True) + "\n")
    print(f"{len(got) - len(bad)} same, {len(bad)} different" + (f": {', '.join(bad)}" if bad else ""))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
