"""Resource bounds: the --max-memory guard stops with one clear line before the machine runs out; NaN/Inf helpers."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from edgec.core.errors import EdgecError
from edgec.pipeline.guards import (MemoryGuard, MemoryLimitExceeded, check_activation_budget, check_finite_array,
                             current_rss, data_limit, parse_memory)

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("text,want", [("4G", 4 << 30), ("512M", 512 << 20), ("1.5GiB", int(1.5 * (1 << 30))),
                                       ("1048576", 1 << 20), (None, None), ("", None)])
def test_parse_memory(text, want):
    assert parse_memory(text) == want


@pytest.mark.parametrize("text", ["lots", "4X", "-1G", "0"])
def test_parse_memory_rejects(text):
    with pytest.raises(EdgecError, match="max-memory"):
        parse_memory(text)


def _run_isolated(code: str) -> subprocess.CompletedProcess:
    """Guards that trip are run in a child: a watchdog's hard stop (os._exit) must never take pytest down with it,
    whatever else the machine is doing while the test runs."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, cwd=ROOT,
                          timeout=120)


def test_guard_stops_python_allocation_loop_with_one_line():
    r = _run_isolated("""
        import json, numpy as np
        from edgec.pipeline.guards import MemoryGuard, MemoryLimitExceeded, current_rss
        hog = []
        try:
            with MemoryGuard(current_rss() + (150 << 20), stage="calibration"):
                for _ in range(400):  # would reach 4 GB
                    hog.append(np.ones(10 << 20, np.uint8))
            print(json.dumps({"raised": False}))
        except MemoryLimitExceeded as e:
            hog.clear()
            print(json.dumps({"raised": True, "msg": str(e), "exit_code": e.exit_code}))
    """)
    # Either stop is the guard working: the soft one (MemoryLimitExceeded in the main thread) or, when the loaded
    # machine schedules the main thread too late and RSS passes 1.25x the limit first, the watchdog's hard stop.
    # Both give exit code 2 and the same one line.
    if r.returncode == 2:  # hard stop
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("edgec: error: memory limit exceeded during calibration"), lines
        assert "--max-memory" in lines[0] and "Traceback" not in r.stderr
        return
    assert r.returncode == 0, r.stderr[-2000:]
    import json

    out = json.loads(r.stdout.strip().splitlines()[-1])
    msg = out.get("msg", "")
    assert out["raised"] and out["exit_code"] == 2
    assert "\n" not in msg and "memory limit exceeded during calibration" in msg and "--max-memory" in msg


def test_guard_quiet_when_under_limit():
    r = _run_isolated("""
        import numpy as np
        from edgec.pipeline.guards import MemoryGuard, current_rss
        with MemoryGuard(current_rss(False) + (1 << 30), children=False) as g:
            x = np.ones(1 << 20)
        print(g.tripped, g.peak > 0, int(x.sum()))
    """)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["False", "True", str(1 << 20)]


def test_guard_refuses_limit_below_current_use():
    with pytest.raises(MemoryLimitExceeded, match="below what edgec already uses"):
        with MemoryGuard(1 << 20):
            pass


def test_guard_hard_stop_when_native_code_does_not_return():
    """A single native call that keeps allocating (here: one huge np.ones) never returns to Python in time; the
    watchdog prints the one line and exits the process with code 2 before it can exhaust the machine."""
    code = textwrap.dedent("""
        import numpy as np, time
        from edgec.pipeline.guards import MemoryGuard, current_rss
        with MemoryGuard(current_rss() + (100 << 20), grace_s=0.5, stage="activation statistics"):
            a = np.ones(1_200_000_000, np.uint8)   # 1.2 GB in one C call
            time.sleep(5)                          # still over the limit: the guard must have ended us by now
        print("survived")
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and "survived" not in r.stdout, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr or "MemoryLimitExceeded" in r.stderr
    assert any("memory limit exceeded during activation statistics" in ln for ln in lines), r.stderr


def test_data_limit_turns_huge_allocation_into_memory_error():
    with data_limit(256 << 20):
        with pytest.raises(MemoryError):
            np.ones(2 << 30, np.uint8)
    np.ones(300 << 20, np.uint8)  # the limit is lifted again


def test_activation_budget_refuses_absurd_shapes():
    from onnx import TensorProto as T
    from onnx import helper

    g = helper.make_graph([helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Relu", ["r"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", T.FLOAT, [64, 3, 4096, 4096])],
                          [helper.make_tensor_value_info("y", T.FLOAT, [64, 3, 4096, 4096])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(MemoryLimitExceeded, match=r"needs at least .* GiB for activations"):
        check_activation_budget(m, 1 << 30)
    check_activation_budget(m, None)


def test_check_finite_array():
    check_finite_array(np.ones(3, np.float32), "x")
    check_finite_array(np.arange(3), "ints are always finite")
    with pytest.raises(EdgecError, match=r"calibration batch 3 contains 2 NaN/Inf"):
        check_finite_array(np.array([1, np.nan, np.inf], np.float32), "calibration batch 3")


def test_cli_max_memory_one_line(tmp_path, capsys):
    from edgec.pipeline.cli import main
    from edgec.testing import realworld_models as rw

    rec = rw.write_attention(tmp_path)
    out = tmp_path / "out"
    rc = main(["compile", "--model", str(rec.path), "--data", "synthetic", "--recipe", "cleanup", "--no-bench",
               "--max-memory", "20M", "--out", str(out), "-q"])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2 and len(lines) == 1, err
    assert lines[0].startswith("edgec: error: --max-memory 20 MiB is below what edgec already uses"), err
    assert not out.exists()


def test_cli_max_memory_refuses_absurd_input_shape_before_running(tmp_path, capsys):
    from edgec.pipeline.cli import main
    from edgec.testing import realworld_models as rw

    rec = rw.write_ultralytics(tmp_path)
    out = tmp_path / "out"
    rc = main(["compile", "--model", str(rec.path), "--input-shape", "images:8x3x2048x2048", "--recipe", "cleanup",
               "--no-bench", "--max-memory", "2G", "--out", str(out), "-q"])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2 and len(lines) == 1, err
    assert re.match(r"edgec: error: running the model needs at least [0-9.]+ GiB for activations at this input shape, "
                    r"more than --max-memory 2.00 GiB", lines[0]), err
    assert not out.exists()
