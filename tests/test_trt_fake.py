"""Every TensorRT build and run path, driven through the strict fake tensorrt for 10.3 and 10.16.

The fake (edgec.testing.fake_tensorrt) exposes exactly the names of the real module's API tables: a renamed
call or a wrong keyword raises. The engine runs the ONNX in ONNX Runtime over simulated device memory
whose cudart calls are bound to the installed cuda-python's real signatures.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper, numpy_helper

from edgec.core.onnx_io import ort_session
from edgec.testing import fake_tensorrt as F
from edgec.testing.fake_tensorrt.cuda import SimCudart, SimDevice, load_real_cudart

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_jetson_bundle import build_bundle, load_module, make_ctx, tiny_classifier  # noqa: E402

VERSIONS = ["10.3", "10.16"]
REAL_CUDART = load_real_cudart()


@pytest.fixture(params=VERSIONS)
def fake(request, monkeypatch):
    """A fake tensorrt of one version in sys.modules, and the runner's CUDA on simulated memory."""
    from edgec.targets.tensorrt import runner

    dev = SimDevice()
    mod = F.install(monkeypatch, request.param, device=dev)
    sim = SimCudart(dev, REAL_CUDART)
    monkeypatch.setattr(runner, "load_cudart", lambda: sim)
    mod.sim = sim
    return mod


def _build(tmp_path, model, **kw):
    from edgec.targets.tensorrt import builder as B

    onnx.save(model, str(tmp_path / "m.onnx"))
    return B.build_engine(B.BuildOptions(onnx_path=str(tmp_path / "m.onnx"), engine_path=str(tmp_path / "m.engine"), **kw))


def _x(n=1, seed=0):
    return np.random.default_rng(seed).standard_normal((n, 3, 16, 16)).astype(np.float32)


# ----------------------------------------------------------------------------- builder paths

def test_strongly_typed_qdq_build(fake, tmp_path):
    s = _build(tmp_path, tiny_classifier(quantized=True))
    b = fake.fake.events("build")[-1]
    assert s["strongly_typed"] and s["qdq_layers"] == 3 and b["strongly_typed"] and b["flags"] == []
    assert b["pools"] == {"WORKSPACE": 1024 << 20} and b["opt_level"] == 3 and b["timing_cache"]
    assert s["tensorrt_version"] == F.VERSIONS[fake.fake.version]


def test_weakly_typed_fp16_build(fake, tmp_path):
    s = _build(tmp_path, tiny_classifier(quantized=False))
    b = fake.fake.events("build")[-1]
    assert not s["strongly_typed"] and s["precision"] == "fp16 (weakly typed)" and b["flags"] == ["FP16"]
    s = _build(tmp_path, tiny_classifier(quantized=True), typing="weak-fp16")
    assert fake.fake.events("build")[-1]["flags"] == ["FP16", "INT8"]


@pytest.mark.parametrize("quantized", [True, False])
def test_dla_build_like_trtexec(fake, tmp_path, quantized):
    s = _build(tmp_path, tiny_classifier(quantized=quantized), dla_core=1)
    b = fake.fake.events("build")[-1]
    want = {"FP16", "GPU_FALLBACK", "PREFER_PRECISION_CONSTRAINTS"} | ({"INT8"} if quantized else set())
    assert set(b["flags"]) == want and not b["strongly_typed"] and b["device_type"] == "DLA" and b["dla_core"] == 1
    assert s["dla"]["gpu_fallback_layers"] == [] and s["dla"]["layers"] == (8 if quantized else 5)


def test_dla_refusals(fake, tmp_path):
    from edgec.targets.tensorrt import builder as B

    with pytest.raises(B.BuildError, match="cannot be strongly typed"):
        _build(tmp_path, tiny_classifier(quantized=True), dla_core=0, typing="strong")
    with pytest.raises(B.BuildError, match="this device has 2 DLA"):
        _build(tmp_path, tiny_classifier(quantized=True), dla_core=2)


def _dynamic(model):
    for vi in (model.graph.input[0], model.graph.output[0]):
        vi.type.tensor_type.shape.dim[0].dim_param = "N"
    return model


def test_dynamic_shapes_get_a_profile(fake, tmp_path):
    s = _build(tmp_path, _dynamic(tiny_classifier(quantized=True)), shapes={"x": ((1, 3, 16, 16), (2, 3, 16, 16), (4, 3, 16, 16))})
    assert fake.fake.events("build")[-1]["profiles"] == [{"x": ((1, 3, 16, 16), (2, 3, 16, 16), (4, 3, 16, 16))}]
    assert s["optimization_profile"]["x"][2] == [4, 3, 16, 16]


@pytest.mark.parametrize("mode", ["none", "raise", "mismatch"])
def test_timing_cache_from_another_gpu_is_replaced(fake, tmp_path, mode):
    """Bug 5: create_timing_cache failing / returning None / mismatching starts a fresh cache, no traceback."""
    (tmp_path / "m.timing.cache").write_bytes(F.CACHE_MAGIC + json.dumps({"version": "9.9", "device": "sm90",
                                                                          "entries": 7}).encode())
    fake.fake.behavior.bad_cache = mode
    s = _build(tmp_path, tiny_classifier(quantized=True))
    assert s["timing_cache"]["loaded_bytes"] == 0 and s["timing_cache"]["note"].startswith("discarded")
    assert fake.fake.events("timing_cache_rejected") == [{"mode": mode}]
    s2 = _build(tmp_path, tiny_classifier(quantized=True))  # the fresh cache it saved is taken next time
    assert s2["timing_cache"]["loaded_bytes"] > 0 and s2["timing_cache"]["note"] is None


def test_no_gpu_builder_is_a_build_error(fake, tmp_path):
    from edgec.targets.tensorrt import builder as B

    fake.fake.behavior.cuda_device = False
    with pytest.raises(B.BuildError, match="no CUDA GPU"):
        _build(tmp_path, tiny_classifier(quantized=True))


# ----------------------------------------------------------------------------- strictness: a renamed call fails

@pytest.mark.parametrize("version", VERSIONS)
def test_fake_is_strict(version):
    trt = F.make_module(version)
    cfg = trt.Builder(trt.Logger(trt.Logger.WARNING)).create_builder_config()
    with pytest.raises(AttributeError):
        cfg.set_timing_cach  # noqa: B018
    with pytest.raises(TypeError, match="incompatible function arguments"):
        cfg.set_timing_cache(cfg.create_timing_cache(b""), ignore_mismatched=False)
    with pytest.raises(AttributeError):
        trt.BuilderFlag.FP16X  # noqa: B018
    with pytest.raises(AttributeError, match="can't set"):
        cfg.get_timing_cache = None
    assert set(trt.fake.gaps) == set(F.TABLE_GAPS.get(version, ()))


def test_table_gaps_are_exactly_the_classes_that_lost_members():
    """The 10.16 classes filled from 10.3 are those whose 10.16 extraction lost members (no real removal)."""
    a = json.loads((F.API_DIR / "10.3.json").read_text())["classes"]
    b = json.loads((F.API_DIR / "10.16.json").read_text())["classes"]
    lost = {c for c in a if c in b and set(a[c]) - set(b[c])}
    assert lost == set(F.TABLE_GAPS["10.16"])


@pytest.mark.parametrize("target,attr,new", [
    ("IBuilderConfig", "set_timing_cache", "set_timing_cache_v2"),
    ("Builder", "build_serialized_network", "build_serialized_network2"),
    ("IExecutionContext", "execute_async_v3", "execute_async_v2"),
])
def test_renaming_one_tensorrt_call_fails(fake, tmp_path, monkeypatch, target, attr, new):
    """Drop one name from the fake's table (as if edgec called a name TensorRT lacks): the build/run fails."""
    from edgec.targets.tensorrt import runner

    s = _build(tmp_path, tiny_classifier(quantized=True))
    assert s["engine_bytes"] > 0
    table = fake.fake.api["classes"][target]
    monkeypatch.setitem(fake.fake.api["classes"], target, {(new if k == attr else k): v for k, v in table.items()})
    with pytest.raises(AttributeError, match=f"has no attribute '{attr}'"):
        _build(tmp_path, tiny_classifier(quantized=True))
        runner.run_engine(str(tmp_path / "m.engine"), [{"x": _x()}], runs=200, warmup=1)


def test_a_wrong_keyword_fails(fake, tmp_path, monkeypatch):
    """Rename the keyword edgec passes (ignore_mismatch) in the table: the timing-cache call must fail."""
    members = dict(fake.fake.api["classes"]["IBuilderConfig"])
    members["set_timing_cache"] = {"kind": "def", "args": ["cache", "ignore_mismatched"]}
    monkeypatch.setitem(fake.fake.api["classes"], "IBuilderConfig", members)
    with pytest.raises(TypeError, match="set_timing_cache"):
        _build(tmp_path, tiny_classifier(quantized=True))


# ----------------------------------------------------------------------------- runner

def _typed_model(dtype):
    """y = x + x (dtype-preserving) and z = Cast(x -> float) * 2: IO of the given ONNX type, dynamic batch."""
    g = helper.make_graph([helper.make_node("Add" if dtype != T.BOOL else "Or", ["x", "x"], ["y"], name="op"),
                           helper.make_node("Cast", ["x"], ["xf"], name="cast", to=T.FLOAT),
                           helper.make_node("Mul", ["xf", "two"], ["z"], name="mul")],
                          "typed", [helper.make_tensor_value_info("x", dtype, ["N", 5])],
                          [helper.make_tensor_value_info("y", dtype, ["N", 5]), helper.make_tensor_value_info("z", T.FLOAT, ["N", 5])],
                          initializer=[numpy_helper.from_array(np.float32(2.0), "two")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("dtype,np_dtype", [(T.FLOAT, np.float32), (T.FLOAT16, np.float16), (T.INT8, np.int8),
                                            (T.INT32, np.int32), (T.INT64, np.int64), (T.BOOL, np.bool_)])
def test_runner_io_dtypes_and_dynamic_shapes(fake, tmp_path, dtype, np_dtype):
    from edgec.targets.tensorrt.runner import EngineRunner

    m = _typed_model(dtype)
    _build(tmp_path, m, typing="strong", shapes={"x": ((1, 5), (2, 5), (4, 5))})
    sess = ort_session(m, optimize=False)
    with EngineRunner(tmp_path / "m.engine") as r:
        assert r.dtypes == {"x": np.dtype(np_dtype), "y": np.dtype(np_dtype), "z": np.dtype(np.float32)}
        for n in (1, 3, 4, 2):  # grow and shrink: buffers are reallocated or reused
            x = (np.random.default_rng(n).standard_normal((n, 5)) * 20).astype(np_dtype)
            y, z = r.infer({"x": x})
            want_y, want_z = sess.run(None, {"x": x})
            assert y.dtype == np_dtype and y.shape == (n, 5)
            np.testing.assert_array_equal(y, want_y)
            np.testing.assert_array_equal(z, want_z)
        with pytest.raises(ValueError, match="optimization profile"):
            r.infer({"x": np.zeros((5, 5), np_dtype)})
    assert "cudaMemcpy" in fake.sim.calls and "cudaFree" in fake.sim.calls


def test_run_engines_interleaves_and_measures_both(fake, tmp_path):
    from edgec.targets.tensorrt.runner import run_engines

    base = tiny_classifier(quantized=False)
    onnx.save(base, str(tmp_path / "baseline.onnx"))
    _build(tmp_path, tiny_classifier(quantized=True))
    from edgec.targets.tensorrt import builder as B

    B.build_engine(B.BuildOptions(onnx_path=str(tmp_path / "baseline.onnx"), engine_path=str(tmp_path / "b.engine"),
                                  typing="weak-fp16"))
    feeds = [{"x": _x(1, i)} for i in range(4)]
    sess = ort_session(base, optimize=False)
    refs = [sess.run(None, f) for f in feeds]
    n_exec = len(fake.fake.events("execute"))
    res = run_engines({"baseline_fp16": str(tmp_path / "b.engine"), "compiled": str(tmp_path / "m.engine")}, feeds,
                      ref_outputs=refs, output_names=["logits"], runs=200, warmup=3, block=10)
    b, c = res["engines"]["baseline_fp16"], res["engines"]["compiled"]
    assert b["fidelity"]["summary"]["cosine_min"] == pytest.approx(1.0, abs=1e-6)  # the baseline *is* the reference
    qsess = ort_session(tiny_classifier(quantized=True), optimize=False)
    want = float(np.mean([np.dot(qsess.run(None, f)[0][0], r[0][0]) / np.linalg.norm(qsess.run(None, f)[0][0])
                          / np.linalg.norm(r[0][0]) for f, r in zip(feeds, refs)]))
    assert c["fidelity"]["summary"]["cosine_min"] == pytest.approx(want, rel=1e-6)
    assert b["latency_ms"]["runs"] == c["latency_ms"]["runs"] == 200
    assert c["latency_ms"]["speedup_vs_baseline_fp16"] == pytest.approx(b["latency_ms"]["median"] / c["latency_ms"]["median"])
    assert len(fake.fake.events("execute")) - n_exec == 2 * (4 + 3 + 200)


# ----------------------------------------------------------------------------- targets and the bundle scripts

def test_tensorrt_target_builds_and_benches_both_engines(fake, tmp_path):
    from edgec.targets import tensorrt as trt_target

    res = trt_target.build(tiny_classifier(quantized=True), tmp_path, make_ctx())
    assert not res["deferred"] and res["engine"]["baseline"]["precision"] == "fp16 (weakly typed)"
    assert {"model.engine", "baseline.engine", "baseline.onnx"} <= {p.name for p in tmp_path.iterdir()}
    ctx = make_ctx()
    rep = trt_target.bench(tmp_path, ctx)
    assert rep["latency_ms"]["runs"] >= 200 and rep["baseline"]["latency_ms"]["runs"] >= 200
    assert rep["speedup_vs_baseline_fp16"] == pytest.approx(rep["baseline"]["latency_ms"]["median"] / rep["latency_ms"]["median"])
    assert rep["baseline"]["fidelity"]["summary"]["cosine_min"] == pytest.approx(1.0, abs=1e-6)
    assert 0.9 < rep["fidelity"]["summary"]["cosine_min"] < 1.0  # the int8 graph, not the reference
    assert set(rep["environment"]["clocks"]) == {"before", "after"}  # nvidia-smi's clocks, None without it


@pytest.mark.parametrize("extra", [{}, {"dla_core": 0}], ids=["gpu", "dla"])
def test_bundle_build_engine_and_bench_build(fake, tmp_path, monkeypatch, capsys, extra):
    """bench.py --build builds both engines with the manifest's arguments (bug 6), then times them interleaved."""
    out, _ = build_bundle(tmp_path, extra=extra)
    bench = load_module(out / "bench.py", "edgec_bundle_bench_fake_" + fake.fake.version.replace(".", "_"))
    monkeypatch.setattr(bench, "load_cudart", lambda: fake.sim)
    rc = bench.main(["--build", "--allow-unlocked", "--runs", "200", "--warmup", "2"], env={"jetson_clocks": None})
    assert rc == 0, capsys.readouterr().err
    builds = fake.fake.events("build")
    assert len(builds) == 2 and builds[1]["flags"][0] == "FP16"
    if extra:
        assert all(b["device_type"] == "DLA" and b["dla_core"] == 0 and not b["strongly_typed"] for b in builds)
    else:
        assert builds[0]["strongly_typed"] and builds[0]["flags"] == []
    rep = json.loads((out / "report.json").read_text())
    bench_sec = rep["bench"]
    assert bench_sec["speedup_vs_baseline_fp16"] > 0 and bench_sec["baseline"]["latency_ms"]["runs"] == 200
    assert bench_sec["clocks"]["locked"] is False and bench_sec["comparable"] is False
    assert bench_sec["baseline"]["fidelity"]["summary"]["cosine_min"] == pytest.approx(1.0, abs=1e-6)
    assert "vs the FP16 baseline" in capsys.readouterr().out
    man = json.loads((out / "manifest.json").read_text())
    be = load_module(out / "build_engine.py", "edgec_bundle_be_" + fake.fake.version.replace(".", "_"))
    assert be.main(["--onnx", str(out / "model.onnx"), "--engine", str(out / "again.engine"), "--no-baseline"]
                   + man["build_argv"]) == 0


def test_no_gpu_is_reported_in_one_line_with_real_cuda_python(monkeypatch):
    """The installed cuda-python on this GPU-less host: gpu_status says why in one line, nothing raises."""
    if REAL_CUDART is None:
        pytest.skip("cuda-python not installed")
    from edgec.targets.tensorrt import runner

    F.install(monkeypatch, "10.3")
    ok, why = runner.gpu_status()
    if ok:
        pytest.skip(f"this host has a GPU: {why}")
    assert why.startswith("no usable CUDA GPU (CUDA error cuda") and "\n" not in why


CUDA12 = Path(__file__).resolve().parent.parent / ".venv" / "cuda12"
_CUDA12_SCRIPT = """
import json, sys
from edgec.testing.fake_tensorrt.cuda import exercise_runner_cuda, load_real_cudart
from edgec.testing import fake_tensorrt as F
from edgec.targets.tensorrt import runner
rt = load_real_cudart()
res = exercise_runner_cuda(runner.Cuda, rt)
sys.modules["tensorrt"] = F.make_module("10.3")
res["gpu_status"] = runner.gpu_status()
print(json.dumps(res))
"""


def test_cuda_calls_match_installed_cuda_python():
    """Arity and return tuples of every CUDA call of the runner, against the cuda-python in this venv."""
    if REAL_CUDART is None:
        pytest.skip("cuda-python not installed")
    from edgec.targets.tensorrt import runner
    from edgec.testing.fake_tensorrt.cuda import RUNNER_CALLS, exercise_runner_cuda

    assert exercise_runner_cuda(runner.Cuda, REAL_CUDART)["calls"] == sorted(RUNNER_CALLS)


def test_cuda_calls_match_cuda_python_12():
    """The same against cuda-python 12.x, what a JetPack 6 user installs (pip install 'cuda-python>=12,<13').

    It lives in .venv/cuda12 (pip install --target .venv/cuda12 'cuda-python>=12,<13'), apart from the venv's
    cuda-bindings 13, which torch requires: the two cannot share one environment."""
    import os
    import subprocess

    if not (CUDA12 / "cuda" / "bindings").is_dir():
        pytest.skip(f"cuda-python 12 not installed at {CUDA12} (pip install --target {CUDA12} 'cuda-python>=12,<13')")
    env = dict(os.environ, PYTHONPATH=str(CUDA12))
    r = subprocess.run([sys.executable, "-c", _CUDA12_SCRIPT], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["version"].startswith("12.")
    ok, why = res["gpu_status"]
    assert ok or (why.startswith("no usable CUDA GPU (CUDA error cuda") and "\n" not in why)


def test_parser_errors_name_the_node(fake, tmp_path):
    from edgec.targets.tensorrt import builder as B

    g = helper.make_graph([helper.make_node("Relu", ["x"], ["a"], name="ok_relu"),
                           helper.make_node("NoSuchOp", ["a"], ["y"], name="mystery_node", domain="edgec.test")],
                          "bad", [helper.make_tensor_value_info("x", T.FLOAT, [1, 4])],
                          [helper.make_tensor_value_info("y", T.FLOAT, [1, 4])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("edgec.test", 1)])
    with pytest.raises(B.BuildError, match=r"node 'mystery_node' \(NoSuchOp\): No importer registered.*\[UNSUPPORTED_NODE\]"):
        _build(tmp_path, m)


def test_jetson_target_on_a_host_with_tensorrt_builds_and_benches(fake, tmp_path):
    from edgec.targets import jetson

    res = jetson.build(tiny_classifier(quantized=True), tmp_path, make_ctx())
    assert res["deferred"] is False and {"model.engine", "baseline.engine"} <= set(res["artifacts"])
    rep = jetson.bench(tmp_path, make_ctx())
    assert rep["target"] == "jetson" and rep["speedup_vs_baseline_fp16"] > 0
    assert rep["comparable_reason"] == "measured on the build host, not on a clock-locked Jetson"


def _full_flow(tmp_path):
    """Every build and run path edgec has: strong, weak FP16, DLA, dynamic profile, foreign cache, run."""
    from edgec.targets.tensorrt.runner import run_engine

    (tmp_path / "m.timing.cache").write_bytes(b"not a cache")
    _build(tmp_path, tiny_classifier(quantized=False))
    _build(tmp_path, tiny_classifier(quantized=True), dla_core=0)
    _build(tmp_path, _dynamic(tiny_classifier(quantized=True)), shapes={"x": ((1, 3, 16, 16), (2, 3, 16, 16), (2, 3, 16, 16))})
    run_engine(str(tmp_path / "m.engine"), [{"x": _x(2)}], runs=200, warmup=1)


@pytest.mark.slow
def test_every_tensorrt_name_edgec_uses_is_checked(fake, tmp_path, monkeypatch):
    """Remove any one name edgec touches from the table (= edgec calling a name TensorRT lacks): the flow fails.

    The one exception is device_memory_size_v2, which the runner reads with a fallback to device_memory_size
    (TensorRT < 10.1) by design."""
    _full_flow(tmp_path)
    used = sorted(fake.fake.accessed)
    assert ("IBuilderConfig", "set_timing_cache") in used and ("IExecutionContext", "execute_async_v3") in used
    tolerant = {("ICudaEngine", "device_memory_size_v2")}
    survived = []
    for cls, name in used:
        table = fake.fake.api["classes"]
        saved = table[cls]
        table[cls] = {k: v for k, v in saved.items() if k != name}
        try:
            _full_flow(tmp_path)
            survived.append((cls, name))
        except Exception:  # noqa: BLE001 -- any failure shows the name is load-bearing
            pass
        finally:
            table[cls] = saved
    assert set(survived) == tolerant & set(used), survived


def test_missing_axis_means_axis_0_in_tensorrt(fake, tmp_path):
    """Why the qdq-axis rule exists: a per-channel DQ without `axis` computes differently in TensorRT's parser
    (axis 0) than in ONNX Runtime (axis 1); the fake engine follows the parser, and the rule checker flags it."""
    from edgec.targets.tensorrt.rules import check_graph
    from edgec.targets.tensorrt.runner import EngineRunner

    r = np.random.default_rng(0)
    wq = r.integers(-127, 127, size=(8, 8)).astype(np.int8)
    s = np.linspace(0.01, 0.08, 8).astype(np.float32)

    def model(axis):
        kw = {} if axis is None else {"axis": axis}
        g = helper.make_graph([helper.make_node("DequantizeLinear", ["wq", "s"], ["w"], name="w_dq", **kw),
                               helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
                              [helper.make_tensor_value_info("x", T.FLOAT, [1, 8])],
                              [helper.make_tensor_value_info("y", T.FLOAT, [1, 8])],
                              initializer=[numpy_helper.from_array(wq, "wq"), numpy_helper.from_array(s, "s")])
        return helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])

    assert [f.rule for f in check_graph(model(None)).errors] == ["qdq-axis"]
    _build(tmp_path, model(None), typing="strong")
    assert fake.fake.events("parser_axis0") == [{}]
    x = r.standard_normal((1, 8)).astype(np.float32)
    with EngineRunner(tmp_path / "m.engine") as er:
        (y,) = er.infer({"x": x})
    np.testing.assert_allclose(y, ort_session(model(0), optimize=False).run(None, {"x": x})[0], rtol=1e-6)
    assert not np.allclose(y, ort_session(model(None), optimize=False).run(None, {"x": x})[0], rtol=1e-3)
