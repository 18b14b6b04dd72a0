"""The public command-line contract: outputs, report schema, and one-line errors for bad input."""
import json

import numpy as np
import onnx
import pytest

from edgec.pipeline.cli import main
from edgec.pipeline.report import validate
from edgec.testing.foreign_models import foreign_cnn

FAST = ["--no-bench", "--calib-samples", "4", "--eval-samples", "8", "-q"]


@pytest.fixture
def foreign_onnx(tmp_path):
    p = tmp_path / "foreign.onnx"
    onnx.save(foreign_cnn(dynamic_hw=True), p)
    return p


def _one_line_error(err: str, *needles):
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("edgec: error: "), err
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], (n, lines[0])


def test_compile_foreign_onnx_writes_model_and_valid_report(tmp_path, foreign_onnx, capsys):
    out = tmp_path / "o"
    rc = main(["compile", "--model", str(foreign_onnx), "--recipe", "cleanup", "--input-shape", "x:1x3x32x32",
               "--out", str(out), *FAST])
    assert rc == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    validate(report)
    m = onnx.load(out / "model.onnx")
    onnx.checker.check_model(m, full_check=True)
    assert not any(n.op_type in ("BatchNormalization", "Identity", "Constant") for n in m.graph.node)
    assert report["data"]["calib_samples"] == 4 and report["data"]["eval_samples"] == 8
    assert report["fidelity"]["summary"]["top1_agreement"] == 1.0
    assert [p["name"] for p in report["recipe"]["passes"]] == ["normalize", "cleanup"] and "cleanup" in report["recipe"]["yaml"]
    assert (out / "manifest.json").exists() and (out / "report.md").exists() and (out / "model.ort.onnx").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".o.")], "temporary dirs left behind"


def test_compile_with_bench_reports_latency_memory_and_ratio(tmp_path, foreign_onnx, capsys):
    out = tmp_path / "b"
    rc = main(["compile", "--model", str(foreign_onnx), "--recipe", "cleanup", "--out", str(out), "--threads", "1",
               "--input-shape", "x:1x3x32x32", "--calib-samples", "2", "--eval-samples", "4", "-q"])
    assert rc == 0
    r = json.loads((out / "report.json").read_text())
    lat = r["bench"]["latency"]["1"]
    assert lat["original"]["runs"] == 200 and lat["compiled"]["runs"] == 200
    for k in ("median_ms", "p90_ms", "p99_ms", "mean_ms", "throughput_per_s"):
        assert lat["compiled"][k] > 0
    assert lat["compiled"]["speedup_vs_original"] == pytest.approx(lat["original"]["median_ms"] / lat["compiled"]["median_ms"])
    mem = r["bench"]["memory"]["compiled"]
    assert mem["peak_rss_bytes"] > mem["empty_process_rss_bytes"] > 0
    assert "latency 1 thr" in capsys.readouterr().out


@pytest.mark.parametrize("case", ["missing", "corrupt", "unknown_model", "unknown_option", "unknown_recipe_key",
                                  "bad_calib_shape", "bad_calib_dtype", "unwritable_out", "unknown_pass", "bad_target"])
def test_bad_input_one_line_error_no_artifact(case, tmp_path, foreign_onnx, capsys):
    out = tmp_path / "out"
    args = ["compile", "--model", str(foreign_onnx), "--recipe", "cleanup", "--input-shape", "x:1x3x32x32",
            "--out", str(out), *FAST]
    needle = ""
    if case == "missing":
        args[2] = str(tmp_path / "nope.onnx")
        needle = "does not exist"
    elif case == "corrupt":
        bad = tmp_path / "bad.onnx"
        bad.write_bytes(foreign_onnx.read_bytes()[:57] + b"\xff\xff\x00garbage")
        args[2] = str(bad)
        needle = "bad.onnx"
    elif case == "unknown_model":
        args[2] = "torchvision:not_a_net"
        needle = "unknown torchvision model"
    elif case == "unknown_option":
        args += ["--set", "cleanup.fold_everything=1"]
        needle = "unknown option(s) fold_everything for pass 'cleanup'"
    elif case == "unknown_recipe_key":
        r = tmp_path / "r.yaml"
        r.write_text("name: r\npasses: [cleanup]\nextra_key: 1\n")
        args[4] = str(r)
        needle = "unknown recipe key(s): extra_key"
    elif case == "unknown_pass":
        args[4] = "passes: [cleanup, frobnicate]"
        needle = "unknown pass 'frobnicate'"
    elif case == "bad_calib_shape":
        npy = tmp_path / "d.npy"
        np.save(npy, np.zeros((10, 3, 16, 16), np.float32))
        args += ["--data", str(npy)]
        needle = "shape (10, 3, 16, 16)"
    elif case == "bad_calib_dtype":
        npy = tmp_path / "d.npy"
        np.save(npy, np.zeros((10, 3, 32, 32), np.complex64))
        args += ["--data", str(npy)]
        needle = "dtype complex64"
    elif case == "unwritable_out":
        blocker = tmp_path / "file"
        blocker.write_text("x")
        out = blocker / "sub"
        args[args.index("--out") + 1] = str(out)
        needle = "cannot write output directory"
    elif case == "bad_target":
        args += ["--target", "fpga"]
        needle = "unknown target 'fpga'"
    rc = main(args)
    err = capsys.readouterr().err
    assert rc == 2, err
    _one_line_error(err, needle)
    assert not out.exists()
    assert not [p for p in tmp_path.rglob(".out.partial-*")]


def test_failed_run_keeps_previous_artifact(tmp_path, foreign_onnx, capsys):
    out = tmp_path / "keep"
    assert main(["compile", "--model", str(foreign_onnx), "--recipe", "cleanup", "--out", str(out),
                 "--input-shape", "x:1x3x32x32", *FAST]) == 0
    before = (out / "model.onnx").read_bytes()
    npy = tmp_path / "d.npy"
    np.save(npy, np.zeros((4, 3, 8, 8), np.float32))
    rc = main(["compile", "--model", str(foreign_onnx), "--recipe", "cleanup", "--out", str(out),
               "--input-shape", "x:1x3x32x32", "--data", str(npy), *FAST])
    assert rc == 2
    assert (out / "model.onnx").read_bytes() == before and (out / "report.json").exists()


def test_subprocess_exit_code_and_help(run_cli, tmp_path):
    r = run_cli("compile", "--model", tmp_path / "missing.onnx")
    assert r.returncode == 2
    _one_line_error(r.stderr, "does not exist")
    h = run_cli("compile", "--help")
    assert h.returncode == 0 and "--set PASS.OPTION=VALUE" in h.stdout and "examples:" in h.stdout
