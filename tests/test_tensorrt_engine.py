"""Real TensorRT tests: build and benchmark engines. Skipped, with the reason, without tensorrt 10.x + a GPU.

The EfficientNet-Lite0 bundle is compiled in the TensorRT dialect (recipe `quant`: int8 symmetric Q/DQ),
its engine and the FP16 baseline engine are built by the bundle's own build_engine.py and timed interleaved
by the bundle's bench.py. The compiled engine must agree with the FP32 reference about as well as the host's
ONNX Runtime simulation of the same Q/DQ graph did (top-1 within 0.05 of it; ~0.91 on 2026-12-02), and the
FP16 baseline at top-1 >= 0.95. The same paths run on CPU through the strict fake (tests/test_trt_fake.py).
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgec.targets.tensorrt.runner import gpu_status

_OK, _WHY = gpu_status()
pytestmark = [pytest.mark.tensorrt, pytest.mark.skipif(not _OK, reason=f"TensorRT engine tests need tensorrt 10.x and a CUDA GPU: {_WHY}")]
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def lite0_bundle(tmp_path_factory):
    from edgec.pipeline.compile import CompileOptions, compile_model

    out = tmp_path_factory.mktemp("trt") / "efficientnet_lite0-jetson-quant"
    report = compile_model(CompileOptions(model="efficientnet_lite0", target="jetson", recipe="quant", out=str(out),
                                          calib_samples=64, eval_samples=64, bench=False))
    return out, report


@pytest.mark.slow
def test_lite0_bundle_builds_strongly_typed_engine_on_host(lite0_bundle):
    out, report = lite0_bundle
    tb = report["target_build"]
    assert tb["quantized"] and tb["deferred"] is False
    eng = tb["engine"]
    assert eng["strongly_typed"] and eng["qdq_layers"] > 0 and eng["engine_bytes"] == (out / "model.engine").stat().st_size
    assert (out / "model.timing.cache").stat().st_size > 0


@pytest.mark.slow
def test_bundle_scripts_build_and_bench_on_this_gpu(lite0_bundle, tmp_path):
    out, _ = lite0_bundle
    eng = tmp_path / "device.engine"
    r = subprocess.run([sys.executable, str(out / "build_engine.py"), "--onnx", str(out / "model.onnx"), "--engine", str(eng),
                        "--timing-cache", str(out / "model.timing.cache")], capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stderr[-2000:]
    summary = json.loads(eng.with_suffix(".build.json").read_text())
    assert summary["timing_cache"]["loaded_bytes"] > 0  # the host build's cache was reused
    assert (eng.parent / "baseline.engine").exists()  # baseline.onnx sits next to model.onnx
    rep_path = tmp_path / "report.json"
    r = subprocess.run([sys.executable, str(out / "bench.py"), "--engine", str(eng), "--out", str(rep_path),
                        "--baseline", str(eng.parent / "baseline.engine"), "--allow-unlocked"],
                       capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stderr[-2000:]
    rep = json.loads(rep_path.read_text())
    bench = rep["bench"]
    assert bench["device_run"] and bench["comparable"] is False  # not a clock-locked Jetson
    lat = bench["latency_ms"]
    assert lat["runs"] >= 200 and 0 < lat["median"] <= lat["p90"] <= lat["p99"]
    assert bench["memory"]["device_memory_bytes"] > 0 and bench["memory"]["engine_bytes"] == eng.stat().st_size
    fid = rep["fidelity"]["summary"]
    host = rep["fidelity_host_onnxruntime"]["summary"]
    assert fid["top1_agreement"] >= host["top1_agreement"] - 0.05, (fid, host)
    assert fid["cosine_min"] > 0.9
    assert bench["baseline"]["fidelity"]["summary"]["top1_agreement"] >= 0.95
    assert bench["speedup_vs_baseline_fp16"] > 0 and bench["baseline"]["latency_ms"]["runs"] >= 200
    from edgec.pipeline import report as R

    R.validate(rep)


@pytest.mark.slow
def test_tensorrt_target_bench_in_process(lite0_bundle):
    from edgec.pipeline.compile import CompileOptions, compile_model

    report = compile_model(CompileOptions(model="efficientnet_lite0", target="tensorrt", recipe="quant",
                                          out=str(lite0_bundle[0].parent / "trt"), calib_samples=64, eval_samples=64))
    b = report["bench"]
    assert "skipped" not in b, b
    assert b["latency_ms"]["runs"] >= 200 and b["baseline"]["latency_ms"]["runs"] >= 200
    assert b["baseline"]["fidelity"]["summary"]["top1_agreement"] >= 0.95 and b["speedup_vs_baseline_fp16"] > 0


def test_parser_errors_name_the_node(tmp_path):
    import onnx
    from onnx import TensorProto as T
    from onnx import helper

    from edgec.targets.tensorrt import builder as B

    g = helper.make_graph([helper.make_node("Relu", ["x"], ["a"], name="ok_relu"),
                           helper.make_node("NoSuchOp", ["a"], ["y"], name="mystery_node", domain="edgec.test")],
                          "bad", [helper.make_tensor_value_info("x", T.FLOAT, [1, 4])],
                          [helper.make_tensor_value_info("y", T.FLOAT, [1, 4])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("edgec.test", 1)])
    onnx.save(m, str(tmp_path / "bad.onnx"))
    with pytest.raises(B.BuildError, match="mystery_node"):
        B.build_engine(B.BuildOptions(onnx_path=str(tmp_path / "bad.onnx"), engine_path=str(tmp_path / "bad.engine")))


def test_runner_matches_numpy_on_a_gemm(tmp_path):
    import onnx
    from onnx import TensorProto as T
    from onnx import helper, numpy_helper

    from edgec.targets.tensorrt import builder as B
    from edgec.targets.tensorrt.runner import EngineRunner

    w = np.random.default_rng(0).standard_normal((16, 8)).astype(np.float32)
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "mm",
                          [helper.make_tensor_value_info("x", T.FLOAT, [4, 16])],
                          [helper.make_tensor_value_info("y", T.FLOAT, [4, 8])], initializer=[numpy_helper.from_array(w, "w")])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "mm.onnx"))
    B.build_engine(B.BuildOptions(onnx_path=str(tmp_path / "mm.onnx"), engine_path=str(tmp_path / "mm.engine"), typing="strong"))
    assert not (tmp_path / "baseline.engine").exists()
    x = np.random.default_rng(1).standard_normal((4, 16)).astype(np.float32)
    with EngineRunner(tmp_path / "mm.engine") as r:
        (y,) = r.infer({"x": x})
        t = r.time({"x": x}, warmup=5, runs=200)
    np.testing.assert_allclose(y, x @ w, rtol=1e-3, atol=1e-3)
    assert t["runs"] == 200 and t["median"] > 0
