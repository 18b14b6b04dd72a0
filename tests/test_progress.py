"""The progress/log contract: bars only under the CLI (not in tests or libraries), human-rounded numbers, -q prints
only the summary table, -v the full-precision detail, logs on stderr and the table on stdout."""
import logging
import re

import onnx
import pytest

from edgec.core import progress as P
from edgec.passes.base import PassContext
from edgec.pipeline.cli import main
from edgec.testing.foreign_models import foreign_cnn

LONG_FLOAT = re.compile(r"\d\.\d{7,}")


@pytest.mark.parametrize("x, want", [(0.2980151782370515, "0.298"), (1234.5678, "1.23e+03"), (0.0, "0"),
                                     (3, "3"), (385187552, "385,187,552"), (2.5e-7, "2.50e-07"),
                                     (float("nan"), "nan"), ("prune", "prune")])
def test_human_rounds_to_three_significant_digits(x, want):
    assert P.human(x) == want


def test_silent_by_default_one_summary_log_line(capsys, caplog):
    caplog.set_level(logging.INFO, logger="edgec.progress")
    bar = P.track(range(5), desc="unit: work", unit="item")
    assert [i for i in bar] == list(range(5))
    assert capsys.readouterr().err == ""  # no bar outside the CLI
    msgs = [r.getMessage() for r in caplog.records if r.name == "edgec.progress"]
    assert len(msgs) == 1 and msgs[0].startswith("unit: work: 5/5 item in "), msgs


def test_bar_on_a_non_terminal_prints_lines_with_total_and_rounded_notes(capsys, monkeypatch):
    monkeypatch.setattr(P, "_BARS", True)
    monkeypatch.setattr(P, "LOG_INTERVAL_S", 0.0)
    bar = P.Progress().bar(3, "unit: bar", unit="layer", detail_every=2)
    import time

    time.sleep(1.1)  # past the bar's display delay
    for _ in range(3):
        bar.tick("detail line")
        bar.note(loss=0.2980151782370515)
    bar.close()
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = err.strip().splitlines()
    assert lines and "unit: bar" in lines[-1] and "3/3" in lines[-1] and "loss=0.298" in lines[-1], err
    assert not LONG_FLOAT.search(err), err


def test_pass_context_wraps_a_plain_callable():
    seen = []
    ctx = PassContext(calib_batches=lambda: iter(()), progress=seen.append)
    assert isinstance(ctx.progress, P.Progress)
    ctx.progress("hello")
    assert seen == ["hello"]
    assert sum(1 for _ in ctx.progress.track([1, 2], desc="x")) == 2


@pytest.fixture
def foreign_onnx(tmp_path):
    p = tmp_path / "foreign.onnx"
    onnx.save(foreign_cnn(dynamic_hw=True), p)
    return p


ARGS = ["--recipe", "cleanup", "--input-shape", "x:1x3x32x32", "--no-bench", "--calib-samples", "4",
        "--eval-samples", "8"]


@pytest.mark.parametrize("flag", ["-q", None, "-v"])
def test_cli_output_levels(flag, tmp_path, foreign_onnx, capsys):
    rc = main(["compile", "--model", str(foreign_onnx), *ARGS, "--out", str(tmp_path / "o"), *([flag] if flag else [])])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "MACs" in out and "report:" in out  # the summary table goes to stdout
    assert "pass cleanup" not in out  # logs never go to stdout
    if flag == "-q":
        assert err.strip() == "", err
    else:
        assert "pass cleanup done" in err, err
    if flag is None:
        assert not LONG_FLOAT.search(err) and "{" not in err, err
    assert not P.bars_enabled()  # main() leaves the library silent again


def test_non_terminal_lines_do_not_repeat_the_final_count():
    import io

    buf = io.StringIO()
    lines = P._Lines(buf)
    for s in ["\rx:  50%|#  | 1/2 [00:01<00:01, 1.0s/it]", "\rx: 100%|## | 2/2 [00:02<00:00, 1.0s/it]",
              "\rx: 100%|## | 2/2 [00:02<00:00, 0.9s/it]", "\r" + " " * 20 + "\r"]:
        lines.write(s)
    got = [ln.split("] ", 1) for ln in buf.getvalue().splitlines()]  # "[  12.3s] " prefix, then the bar
    assert all(re.fullmatch(r"\[ *\d+\.\ds", t) for t, _ in got), got
    assert [b for _, b in got] == ["x:  50%|#  | 1/2 [00:01<00:01, 1.0s/it]", "x: 100%|## | 2/2 [00:02<00:00, 1.0s/it]"]
