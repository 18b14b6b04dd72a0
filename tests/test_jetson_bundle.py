"""Jetson deploy bundle: contents, reproducibility, and the non-TensorRT logic of bench.py / build_engine.py.

bench.py and build_engine.py are loaded from a generated bundle (the files that ship), not from the sources.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import py_compile
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper, numpy_helper

from edgec.calib.data import DataSplit
from edgec.core.errors import EdgecError
from edgec.core.fidelity import Comparator
from edgec.pipeline.recipe import Recipe
from edgec.targets.base import BuildContext

ROOT = Path(__file__).resolve().parent.parent
HAS_TRT = importlib.util.find_spec("tensorrt") is not None


def tiny_classifier(*, quantized=False, zero_point=0, seed=0):
    """x[1,3,16,16] -> Conv(16) -> Relu -> GAP -> Flatten -> Gemm(10); optionally int8 Q/DQ on the Conv."""
    r = np.random.default_rng(seed)
    w = r.standard_normal((16, 3, 3, 3)).astype(np.float32) * 0.3
    fc = r.standard_normal((10, 16)).astype(np.float32)
    inits = [numpy_helper.from_array(fc, "fc"), numpy_helper.from_array(np.zeros(10, np.float32), "fcb")]
    nodes = []
    if quantized:
        s = (np.abs(w).reshape(16, -1).max(1) / 127).astype(np.float32)
        wq = np.clip(np.round(w / s[:, None, None, None]), -127, 127).astype(np.int8)
        inits += [numpy_helper.from_array(wq, "wq"), numpy_helper.from_array(s, "ws"),
                  numpy_helper.from_array(np.zeros(16, np.int8), "wzp"),
                  numpy_helper.from_array(np.float32(0.05), "as"), numpy_helper.from_array(np.int8(zero_point), "azp")]
        nodes += [helper.make_node("QuantizeLinear", ["x", "as", "azp"], ["xq"], name="x_q"),
                  helper.make_node("DequantizeLinear", ["xq", "as", "azp"], ["xd"], name="x_dq"),
                  helper.make_node("DequantizeLinear", ["wq", "ws", "wzp"], ["w"], name="w_dq", axis=0)]
        conv_in = "xd"
    else:
        inits.append(numpy_helper.from_array(w, "w"))
        conv_in = "x"
    nodes += [helper.make_node("Conv", [conv_in, "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
              helper.make_node("Relu", ["c"], ["r"], name="relu"),
              helper.make_node("GlobalAveragePool", ["r"], ["p"], name="gap"),
              helper.make_node("Flatten", ["p"], ["f"], name="flat"),
              helper.make_node("Gemm", ["f", "fc", "fcb"], ["logits"], name="fc", transB=1)]
    g = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("x", T.FLOAT, [1, 3, 16, 16])],
                          [helper.make_tensor_value_info("logits", T.FLOAT, [1, 10])], initializer=inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])


def eval_split(n=6, seed=1):
    def make(i):
        return {"x": np.random.default_rng([seed, i]).standard_normal((1, 3, 16, 16)).astype(np.float32)}

    return DataSplit("eval", n, make, description="synthetic test split")


def make_ctx(extra=None, n=6):
    return BuildContext(model_name="tiny", recipe=Recipe("test", "no passes", []), reference_model=tiny_classifier(),
                        eval_split=eval_split(n), extra=dict(extra or {}))


def build_bundle(tmp_path, name="b", *, quantized=True, extra=None, model=None):
    """A bundle for the tiny classifier; every bundle is linted (trtexec.sh against trtexec 10.3)."""
    from edgec.targets import jetson
    from edgec.testing.fake_tensorrt.lint import lint_trtexec

    out = tmp_path / name
    out.mkdir()
    res = jetson.build(model if model is not None else tiny_classifier(quantized=quantized), out, make_ctx(extra))
    assert lint_trtexec(out) == []
    return out, res


def load_module(path: Path, name: str):
    old, sys.dont_write_bytecode = sys.dont_write_bytecode, True  # keep the bundle free of __pycache__
    try:
        spec = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    finally:
        sys.dont_write_bytecode = old
    return mod


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    out, res = build_bundle(tmp_path_factory.mktemp("jetson"))
    return out, res


@pytest.fixture(scope="module")
def bench_mod(bundle):
    return load_module(bundle[0] / "bench.py", "edgec_bundle_bench")


@pytest.fixture(scope="module")
def builder_mod(bundle):
    return load_module(bundle[0] / "build_engine.py", "edgec_bundle_build_engine")


# ----------------------------------------------------------------------------- contents

EXPECTED = {"model.onnx", "baseline.onnx", "build_engine.py", "bench.py", "trtexec.sh", "reference_outputs.npz",
            "manifest.json", "README.md", "rules.json"}


def test_bundle_contents(bundle):
    out, res = bundle
    assert EXPECTED <= {p.name for p in out.iterdir() if p.is_file()}
    assert set(res["artifacts"]) >= EXPECTED
    if not HAS_TRT:
        assert res["deferred"] is True and "tensorrt not installed" in res["deferred_reason"]
        assert not (out / "model.engine").exists()
    assert res["quantized"] is True and res["rules"]["passed"]


def test_scripts_compile_and_build_engine_is_the_builder(bundle):
    out, _ = bundle
    for f in ("bench.py", "build_engine.py"):
        py_compile.compile(str(out / f), cfile=str(out / ".pyc" / (f + "c")), doraise=True)
    assert (out / "build_engine.py").read_text() == (ROOT / "targets/tensorrt/builder.py").read_text()
    src = (out / "bench.py").read_text()
    import re

    imports = re.findall(r"^\s*(?:from|import) +([\w.]+)", src, re.M)
    assert "__future__" not in imports
    assert not {m.split(".")[0] for m in imports} & {"pipeline", "passes", "targets", "calib", "onnx", "onnxruntime"}
    assert (ROOT / "targets/tensorrt/runner.py").read_text().strip() in src


@pytest.mark.parametrize("name", ["bench.py", "build_engine.py"])
def test_scripts_parse_as_python_38(bundle, name):
    """JetPack 5/6 ship Python 3.8/3.10: the device scripts must not need newer syntax."""
    import ast

    ast.parse((bundle[0] / name).read_text(), feature_version=(3, 8))


def test_manifest_hashes_every_file(bundle):
    out, _ = bundle
    man = json.loads((out / "manifest.json").read_text())
    assert man["target"] == "jetson" and man["recipe"]["name"] == "test"
    assert man["targets"]["tensorrt"] == ">=10.3,<11" and "6.1" in man["targets"]["jetpack"]
    assert man["targets"]["cuda_python"] == ">=12,<13"  # cuda-python 13 needs a CUDA 13 driver; JetPack 6 has 12.6
    assert set(man["files"]) == {p.name for p in out.iterdir() if p.is_file()} - {"manifest.json"}
    for name, h in man["files"].items():
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == h, name
    assert man["device_commands"][2] == "sudo python3 bench.py"


def test_bundle_is_byte_reproducible(tmp_path):
    a, _ = build_bundle(tmp_path, "a")
    b, _ = build_bundle(tmp_path, "b")
    for p in sorted(a.iterdir()):
        assert p.read_bytes() == (b / p.name).read_bytes(), p.name


def _trtexec_lines(out):
    from edgec.testing.fake_tensorrt.lint import trtexec_commands

    return trtexec_commands((out / "trtexec.sh").read_text())


def test_trtexec_strongly_typed_for_qdq(bundle):
    text = (bundle[0] / "trtexec.sh").read_text()
    for flag in ("--onnx=model.onnx", "--stronglyTyped", "--saveEngine=", "--timingCacheFile=model.timing.cache",
                 "--iterations=200", "--warmUp=", "--percentile=50,90,99", "--exportTimes="):
        assert flag in text, flag
    build, base, load = _trtexec_lines(bundle[0])
    assert "--stronglyTyped" in build and "--fp16" not in build and not any("DLA" in a for a in build)
    assert "--onnx=baseline.onnx" in base and "--fp16" in base and "--stronglyTyped" not in base
    assert not any(a.startswith("--shapes") for a in build + base + load)  # static model: trtexec refuses shapes


def test_trtexec_fp16_and_dla_static_has_no_shapes(tmp_path):
    """Bug 2: a static model gets no --shapes family flag, even when the user gave its (static) shape."""
    out, res = build_bundle(tmp_path, quantized=False, extra={"dla_core": 0, "shapes": {"x": "1x3x16x16"}})
    build, base, load = _trtexec_lines(out)
    assert "--fp16" in build and "--stronglyTyped" not in build
    assert "--useDLACore=0" in build and "--allowGPUFallback" in build and "--useDLACore=0" in load
    assert not any(a.split("=")[0] in ("--shapes", "--minShapes", "--optShapes", "--maxShapes") for a in build + load)
    readme = (out / "README.md").read_text()
    assert "python3 build_engine.py --dla-core 0 --shape x=1x3x16x16" in readme
    assert "nvpmodel" in readme and "jetson_clocks" in readme and "bench.py" in readme


def test_trtexec_quantized_dla_is_fp16_int8_not_strongly_typed(tmp_path):
    """Bug 1: --stronglyTyped with --useDLACore cannot build (trtexec sets FP16 for DLA)."""
    out, res = build_bundle(tmp_path, quantized=True, extra={"dla_core": 1})
    build = _trtexec_lines(out)[0]
    assert "--stronglyTyped" not in build and {"--fp16", "--int8", "--useDLACore=1", "--allowGPUFallback"} <= set(build)
    man = json.loads((out / "manifest.json").read_text())
    assert man["precision"] == "dla-fp16-int8-from-qdq" and man["build_argv"] == ["--dla-core", "1"]


def _dynamic_classifier():
    m = tiny_classifier(quantized=True)
    for vi in (m.graph.input[0], m.graph.output[0]):
        vi.type.tensor_type.shape.dim[0].dim_param = "N"
    return m


def test_trtexec_dynamic_model_gets_min_opt_max(tmp_path):
    out, res = build_bundle(tmp_path, extra={"shapes": {"x": "1x3x16x16,4x3x16x16,8x3x16x16"}},
                            model=_dynamic_classifier())
    build, base, load = _trtexec_lines(out)
    for line in (build, base):
        assert {"--minShapes=x:1x3x16x16", "--optShapes=x:4x3x16x16", "--maxShapes=x:8x3x16x16"} <= set(line)
    assert "--shapes=x:4x3x16x16" in load
    out2, _ = build_bundle(tmp_path, "default", model=_dynamic_classifier())  # no shapes: batch 1, as build_engine.py
    assert "--minShapes=x:1x3x16x16" in _trtexec_lines(out2)[0]


def test_trtexec_lint_catches_each_broken_line(tmp_path):
    from edgec.testing.fake_tensorrt.lint import lint_trtexec

    out, _ = build_bundle(tmp_path)
    good = (out / "trtexec.sh").read_text()
    for bad, why in (("--stronglyTyped", "--stronglyTyped --useDLACore=0"), ("--percentile", "--percentiles"),
                     ("--saveEngine=model.trtexec.engine", "--saveEngine=model.trtexec.engine --shapes=x:1x3x16x16")):
        (out / "trtexec.sh").write_text(good.replace(bad, why, 1))
        assert lint_trtexec(out), why
    (out / "trtexec.sh").write_text(good)
    assert lint_trtexec(out) == []


def test_reference_outputs_match_the_fp32_model(bundle, bench_mod):
    from edgec.core.onnx_io import ort_session

    feeds, refs, names, labels, meta = bench_mod.load_reference(str(bundle[0] / "reference_outputs.npz"))
    assert names == ["logits"] and meta["samples"] == 6 and labels is None
    sess = ort_session(tiny_classifier(), optimize=False)
    for f, r, i in zip(feeds, refs, range(6)):
        np.testing.assert_array_equal(f["x"], eval_split().feeds(i)["x"])
        np.testing.assert_allclose(sess.run(None, f)[0], r[0], rtol=0, atol=0)


def test_rule_violation_stops_the_bundle_naming_the_node(tmp_path):
    from edgec.targets import jetson

    out = tmp_path / "bad"
    out.mkdir()
    with pytest.raises(EdgecError, match="x_q"):
        jetson.build(tiny_classifier(quantized=True, zero_point=4), out, make_ctx())
    assert not (out / "bench.py").exists() and not (out / "reference_outputs.npz").exists()


@pytest.mark.skipif(HAS_TRT, reason="tensorrt is installed: the engine is built, not deferred")
def test_deferred_is_one_log_line(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="edgec.targets.jetson"):
        build_bundle(tmp_path)
    lines = [r.getMessage() for r in caplog.records if "deferred" in r.getMessage()]
    assert len(lines) == 1 and "tensorrt not installed" in lines[0] and "bundle:" in lines[0]


def test_bench_without_tensorrt_says_so(bundle):
    from edgec.targets import jetson

    if HAS_TRT:
        pytest.skip("tensorrt installed")
    res = jetson.bench(bundle[0], make_ctx())
    assert set(res) == {"skipped"} and "tensorrt not installed" in res["skipped"]


# ----------------------------------------------------------------------------- bench.py logic

CLOCKS_LOCKED = """SOC family:tegra234  Machine:NVIDIA Jetson AGX Orin Developer Kit
Online CPUs: 0-11
cpu0: Online=1 Governor=schedutil MinFreq=2201600 MaxFreq=2201600 CurrentFreq=2201600 IdleStates: WFI=0 c7=0
cpu1: Online=1 Governor=schedutil MinFreq=2201600 MaxFreq=2201600 CurrentFreq=2201600 IdleStates: WFI=0 c7=0
GPU MinFreq=1300500000 MaxFreq=1300500000 CurrentFreq=1300500000
EMC MinFreq=204000000 MaxFreq=3199000000 CurrentFreq=3199000000 FreqOverride=1
DLA0_CORE: Online=1 MinFreq=0 MaxFreq=1600000000 CurrentFreq=1600000000
FAN Dynamic Speed control=active hwmon4_pwm=255
NV Power Mode: MAXN
"""
CLOCKS_DEFAULT = CLOCKS_LOCKED.replace("MinFreq=2201600 MaxFreq=2201600 CurrentFreq=2201600",
                                       "MinFreq=729600 MaxFreq=2201600 CurrentFreq=1190400").replace(
    "GPU MinFreq=1300500000 MaxFreq=1300500000 CurrentFreq=1300500000", "GPU MinFreq=306000000 MaxFreq=1300500000 CurrentFreq=306000000")


def test_parse_and_check_clocks(bench_mod):
    p = bench_mod.parse_jetson_clocks(CLOCKS_LOCKED)
    assert p["power_mode"] == "MAXN" and set(p["cpus"]) == {"cpu0", "cpu1"} and p["emc"]["override"] is True
    assert bench_mod.clocks_locked(p) == (True, [])
    locked, why = bench_mod.clocks_locked(bench_mod.parse_jetson_clocks(CLOCKS_DEFAULT))
    assert not locked and any("GPU clock not fixed" in w for w in why) and any("cpu0" in w for w in why)
    emc_low = CLOCKS_LOCKED.replace("CurrentFreq=3199000000", "CurrentFreq=2133000000")
    assert not bench_mod.clocks_locked(bench_mod.parse_jetson_clocks(emc_low))[0]
    assert bench_mod.clocks_locked(None) == (False, ["jetson_clocks not available: clocks unknown"])


def test_parse_nvpmodel_and_tegrastats(bench_mod):
    assert bench_mod.parse_nvpmodel("NV Power Mode: 15W\n2\n") == {"mode": "15W", "id": 2}
    assert bench_mod.parse_nvpmodel("") is None
    line = "11-22-2026 19:00:01 RAM 2448/7620MB (lfb 2x4MB) SWAP 0/3810MB (cached 0MB) CPU [1%@729,...] GR3D_FREQ 0%"
    assert bench_mod.parse_tegrastats_ram(line) == (2448, 7620)
    assert bench_mod.parse_tegrastats_ram("no ram here") is None


def test_comparability_decision(bench_mod):
    assert bench_mod.decide_comparable(True, [], False) == (True, True, "clocks locked (jetson_clocks)")
    assert bench_mod.decide_comparable(False, ["GPU clock not fixed"], False)[:2] == (False, False)
    go, comparable, why = bench_mod.decide_comparable(False, ["GPU clock not fixed"], True)
    assert go and not comparable and why.startswith("NOT comparable")


def test_bench_refuses_unlocked_clocks(bench_mod, tmp_path, capsys):
    env = {"jetson_clocks": {"raw": CLOCKS_DEFAULT, "rc": 0, "parsed": bench_mod.parse_jetson_clocks(CLOCKS_DEFAULT)}}
    out = tmp_path / "report.json"
    assert bench_mod.main(["--out", str(out)], env=env) == bench_mod.EXIT_UNLOCKED
    assert "refusing to measure" in capsys.readouterr().err and not out.exists()
    env_none = {"jetson_clocks": None}
    assert bench_mod.main(["--out", str(out)], env=env_none) == bench_mod.EXIT_UNLOCKED


@pytest.mark.skipif(HAS_TRT, reason="tensorrt is installed")
def test_bench_allow_unlocked_without_tensorrt_says_so(bench_mod, tmp_path, capsys):
    out = tmp_path / "report.json"
    assert bench_mod.main(["--out", str(out), "--allow-unlocked"], env={"jetson_clocks": None}) == bench_mod.EXIT_ERROR
    assert "tensorrt not installed" in capsys.readouterr().err and not out.exists()


@pytest.mark.parametrize("rows", [1, 3])
def test_bench_fidelity_matches_edgec_comparator(bench_mod, rows):
    r = np.random.default_rng(rows)
    ref = [[r.standard_normal((rows, 20)).astype(np.float32), r.standard_normal((rows, 4, 5))] for _ in range(9)]
    cand = [[a + r.standard_normal(a.shape).astype(np.float32) * 0.7, b * 1.1] for a, b in ref]
    labels = [r.integers(0, 20, rows) for _ in ref]
    got = bench_mod.fidelity(cand, ref, ["logits", "feat"], labels)
    comp = Comparator(["logits", "feat"])
    for c, f, lab in zip(cand, ref, labels):
        comp.update(c, f, lab)
    want = comp.result()
    assert got["summary"].keys() == want["summary"].keys()
    for k, v in want["summary"].items():
        assert got["summary"][k] == pytest.approx(v, rel=1e-12, abs=1e-12), k
    assert 0 < got["summary"]["top1_agreement"] < 1  # the noise flips some argmaxes: the check can fail


def test_latency_summary(bench_mod):
    s = bench_mod.summarize_ms(list(range(1, 201)))
    assert s["runs"] == 200 and s["median"] == pytest.approx(100.5) and s["p90"] == pytest.approx(180.1)
    assert s["p99"] == pytest.approx(198.01) and s["min"] == 1 and s["max"] == 200


def test_device_report_keeps_edgec_schema(bench_mod, tmp_path):
    from edgec.pipeline import report as rep

    host = {"schema_version": rep.SCHEMA_VERSION, "versions": {"edgec": "x", "onnx": "1", "onnxruntime": "1"},
            "model": {"name": "tiny", "source": "t", "inputs": {}, "outputs": ["logits"]}, "target": "jetson",
            "recipe": {"name": "r", "passes": [], "yaml": ""}, "seed": 0,
            "data": {"calib_samples": 1, "eval_samples": 1, "description": "d", "disjoint": True}, "passes": [],
            "costs": {"original": {"macs": 1, "params": 1, "model_bytes": 1}, "final": {"macs": 1, "params": 1, "model_bytes": 1}},
            "bench": {"skipped": "deferred"}, "fidelity": {"summary": {"cosine_min": 1.0}, "per_output": {}},
            "target_build": {"deferred": True}, "artifacts": [], "command": "edgec compile"}
    fid = bench_mod.fidelity([[np.eye(3)[:1]]], [[np.eye(3)[:1]]], ["logits"])
    bench = {"device_run": True, "latency_ms": bench_mod.summarize_ms([1.0] * 200), "comparable": False}
    out = bench_mod.device_report(host, bench, fid, {"engine": "model.engine"})
    rep.validate(out)
    assert out["fidelity_host_onnxruntime"] == host["fidelity"] and out["fidelity"] == fid
    assert out["bench"]["device_run"] and out["target_build"] == {"deferred": False, "engine": {"engine": "model.engine"}}
    bench_mod.write_json(str(tmp_path / "r.json"), out)
    assert json.loads((tmp_path / "r.json").read_text())["fidelity"]["summary"]["top1_agreement"] == 1.0


# ----------------------------------------------------------------------------- build_engine.py logic

@pytest.mark.parametrize("version,ok", [("8.6.1", False), ("9.3.0", False), ("10.0.1", True), ("10.3.0.30", True),
                                        ("10.13.2", True), ("11.0.0", False), ("11.4.0.106", False), ("garbage", False)])
def test_version_gate(builder_mod, version, ok):
    if ok:
        assert builder_mod.check_version(version)[0] == 10
    else:
        with pytest.raises(builder_mod.TensorRTUnavailable) as ei:
            builder_mod.check_version(version)
        assert "\n" not in str(ei.value)
        if version.startswith("11"):
            assert "TensorRT 11 removed the precision flags" in str(ei.value)


def test_shapes_and_profiles(builder_mod):
    B = builder_mod
    assert B.parse_shape_arg("x=1x3x224x224") == ("x", ((1, 3, 224, 224),) * 3)
    assert B.parse_shape_arg("x=1x3x8x8,4x3x8x8,8x3x8x8")[1][2] == (8, 3, 8, 8)
    for bad in ("x", "x=1x0", "x=2x3,1x3,4x3", "x=1x3,1x3x4,1x3"):
        with pytest.raises(B.BuildError):
            B.parse_shape_arg(bad)
    prof = B.resolve_profile([("x", (-1, 3, 8, 8)), ("y", (1, 4))], {})
    assert prof == {"x": ((1, 3, 8, 8),) * 3}
    with pytest.raises(B.BuildError, match="dynamic dims"):
        B.resolve_profile([("x", (1, -1, 8, 8))], {})
    with pytest.raises(B.BuildError, match="fixed to 3"):
        B.resolve_profile([("x", (-1, 3, 8, 8))], {"x": ((1, 4, 8, 8),) * 3})
    assert B.is_static_profile(prof)
    assert not B.is_static_profile(B.resolve_profile([("x", (-1, 3))], {"x": ((1, 3), (2, 3), (4, 3))}))


def test_parser_error_lines_name_the_node(builder_mod):
    class Err:  # the IParserError methods build_engine.py reads
        def __init__(self, name):
            self._n = name

        def node_name(self):
            return self._n

        def node_operator(self):
            return "NonMaxSuppression"

        def node(self):
            return 7

        def desc(self):
            return "no importer registered\nsecond line"

        def code(self):
            return "ErrorCode.UNSUPPORTED_NODE"

    assert builder_mod.format_parser_error(Err("nms_1")) == \
        "node 'nms_1' (NonMaxSuppression): no importer registered [UNSUPPORTED_NODE]"
    assert builder_mod.format_parser_error(Err("")).startswith("node #7 (NonMaxSuppression)")


def test_build_options_validate(builder_mod):
    B = builder_mod
    o = B.BuildOptions(onnx_path="m.onnx", engine_path="out/m.engine")
    assert o.timing_cache == "out/m.timing.cache" and o.typing == "auto"
    for kw in ({"opt_level": 6}, {"workspace_mb": 0}, {"dla_core": -1}, {"typing": "fp8"}):
        with pytest.raises(B.BuildError):
            B.BuildOptions(onnx_path="m.onnx", engine_path="m.engine", **kw)


@pytest.mark.skipif(HAS_TRT, reason="tensorrt is installed")
def test_build_engine_cli_without_tensorrt(builder_mod, bundle, capsys):
    rc = builder_mod.main(["--onnx", str(bundle[0] / "model.onnx"), "--engine", str(bundle[0] / "x.engine")])
    assert rc == 2 and "tensorrt not installed" in capsys.readouterr().err
    assert not (bundle[0] / "x.engine").exists()


def test_bad_build_option_is_user_error(tmp_path):
    with pytest.raises(EdgecError, match="optimization level"):
        build_bundle(tmp_path, extra={"builder_opt_level": 9})


# ----------------------------------------------------------------------------- target module: tensorrt

def test_tensorrt_target_checks_rules_and_writes_trtexec(tmp_path):
    from edgec.targets import get_target

    trt = get_target("tensorrt")
    assert trt.name == "tensorrt" and trt.dialect.name == "tensorrt" and trt.precheck is not None
    assert trt.dialect.activation_dtype == "int8" and trt.dialect.activation_symmetric
    res = trt.build(tiny_classifier(quantized=True), tmp_path, make_ctx())
    assert {"model.onnx", "rules.json", "trtexec.sh"} <= {p.name for p in tmp_path.iterdir()}
    assert "--stronglyTyped" in (tmp_path / "trtexec.sh").read_text()
    assert json.loads((tmp_path / "rules.json").read_text())["passed"] is True
    if not HAS_TRT:
        assert res["deferred"] and res["engine"] is None and "tensorrt not installed" in res["deferred_reason"]
        assert trt.bench(tmp_path, make_ctx()) == {"skipped": "TensorRT benchmark not run: tensorrt not installed"}
    bad = tmp_path / "bad"
    bad.mkdir()
    with pytest.raises(EdgecError, match=r"\[qdq-zero-point\] node 'x_q'"):
        trt.build(tiny_classifier(quantized=True, zero_point=1), bad, make_ctx())
    assert not any(bad.iterdir())


def test_environment_probe_and_tegrastats_absent(bench_mod):
    env = bench_mod.environment()  # on a host without Jetson tools every probe is None, nothing raises
    assert {"python", "l4t_release", "tensorrt", "jetpack", "nvpmodel", "jetson_clocks"} <= set(env)
    if bench_mod.shutil.which("jetson_clocks") is None:
        assert env["jetson_clocks"] is None and bench_mod.clock_state(env)[0] is False
    if bench_mod.shutil.which("tegrastats") is None:
        t = bench_mod.TegraStats()
        assert t.start() is False and t.result() is None
    failed = {"jetson_clocks": {"raw": "must be root", "rc": 1, "parsed": None}}
    locked, why = bench_mod.clock_state(failed)
    assert not locked and "sudo" in why[0]


def test_host_report_is_kept_aside_once(bundle, tmp_path):
    import shutil

    shutil.copy(bundle[0] / "bench.py", tmp_path / "bench.py")
    mod = load_module(tmp_path / "bench.py", "edgec_bundle_bench_copy")
    assert mod._host_report() is None
    (tmp_path / "report.json").write_text(json.dumps({"bench": {"skipped": "deferred"}, "model": {"name": "tiny"}}))
    assert mod._host_report()["model"] == {"name": "tiny"}
    assert (tmp_path / "report.host.json").exists()
    (tmp_path / "report.json").write_text(json.dumps({"bench": {"device_run": True}}))
    assert mod._host_report()["bench"] == {"skipped": "deferred"}  # the device report never becomes the base


@pytest.mark.slow
def test_cli_compile_target_jetson_writes_the_bundle(tmp_path, run_cli):
    """`make target=jetson` end to end on a small ONNX model, through the CLI that the Makefile calls."""
    model = tmp_path / "tiny.onnx"
    onnx.save(tiny_classifier(), str(model))
    out = tmp_path / "tiny-jetson-default"
    r = run_cli("compile", "--model", model, "--target", "jetson", "--recipe", "default", "--no-bench",
                "--calib-samples", 4, "--eval-samples", 8, "--out", out)
    assert r.returncode == 0, r.stderr[-2000:]
    assert EXPECTED <= {p.name for p in out.iterdir()}
    log = r.stdout + r.stderr
    assert "TensorRT rule check: 0 error(s)" in log
    if not HAS_TRT:
        assert log.count("engine build deferred to the device") == 1 and f"bundle: {out}" in log
    report = json.loads((out / "report.json").read_text())
    assert report["target"] == "jetson" and report["target_build"]["reference_samples"] == 8


def test_bundle_writer_lints_trtexec_with_trtexec_10_3_flags():
    """The flag list the writer lints with is trtexec 10.3's (the copy next to the API tables)."""
    from edgec.targets.jetson.trtexec_lint import FLAGS_FILE, lint_text
    from edgec.testing.fake_tensorrt import API_DIR

    assert FLAGS_FILE.read_text() == (API_DIR / "trtexec-10.3-flags.txt").read_text()
    assert lint_text('"$TRTEXEC" --onnx=m.onnx --stronglyTyped --useDLACore=0\n', static=True)
    assert lint_text('"$TRTEXEC" --onnx=m.onnx --fp16 --useDLACore=0 --allowGPUFallback\n', static=True) == []


def test_bundle_writer_refuses_a_trtexec_line_trtexec_would_refuse(tmp_path, monkeypatch):
    from edgec.targets.jetson import bundle as B

    monkeypatch.setattr(B, "trtexec_precision", lambda settings, quantized: ("--stronglyTyped", "old bug 1"))
    with pytest.raises(RuntimeError, match="--stronglyTyped with --useDLACore"):
        build_bundle(tmp_path, extra={"dla_core": 0})
