"""Benchmark harness: interleaved timing protocol and fresh-process memory."""
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgec.core.onnx_io import save_onnx
from edgec.targets.bench import latency_interleaved, peak_rss


def _matmul_model(n: int, seed=0):
    w = numpy_helper.from_array(np.random.default_rng(seed).standard_normal((n, n)).astype(np.float32), "w")
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "mm",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, n])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])], [w])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_interleaved_latency_ratio_reflects_work():
    small, big = _matmul_model(64), _matmul_model(1024)
    feeds_by = {"small": {"x": np.ones((1, 64), np.float32)}, "big": {"x": np.ones((1, 1024), np.float32)}}
    r = latency_interleaved({"big": big, "small": small}, {}, feeds_by_model=feeds_by, threads=1)
    assert r["big"]["runs"] == 200 and r["small"]["runs"] == 200
    assert r["big"]["p99_ms"] >= r["big"]["p90_ms"] >= r["big"]["median_ms"] > 0
    # 256x fewer MACs must time clearly faster
    assert r["small"]["speedup_vs_big"] > 3.0


def test_benchmark_refuses_too_few_runs():
    with pytest.raises(ValueError):
        latency_interleaved({"a": _matmul_model(8)}, {"x": np.ones((1, 8), np.float32)}, runs=50)


def test_peak_rss_sees_model_weights(tmp_path):
    p = tmp_path / "m.onnx"
    save_onnx(_matmul_model(4096), p)  # 64 MiB of weights
    r = peak_rss(p, {"x": np.ones((1, 4096), np.float32)}, runs=2)
    assert r["model_bytes"] > 64 * 2**20
    assert r["peak_rss_delta_bytes"] > 48 * 2**20, r


def test_bench_realworld_reports_each_output(tmp_path):
    """bench/bench_realworld.py end to end on the tiny external-data model: a row with per-output fidelity, the
    interleaved speedup and a PASS/FAIL verdict that matches the targets."""
    import json
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import bench_realworld as br

    br.main(["--size", "tiny", "--models", "external_data", "--recipe", "cleanup", "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "results.json").read_text())
    assert [r["model"] for r in rows] == ["external_data"] and rows[0]["rc"] == 0
    r = rows[0]
    assert set(r["per_output"]) == {"logits"} and r["per_output"]["logits"]["cosine"] > 0.9999
    assert r["ok"] == (r["speedup"] >= br.SPEED_TARGET)  # cleanup is exact: only the speed target can fail
    assert "| external_data |" in (tmp_path / "report.md").read_text()
