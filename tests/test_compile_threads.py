"""--compile-threads: the compile's own evaluations run at any thread count with the same outputs (ORT's CPU kernels
partition by output), so the emitted model does not depend on it; latency keeps --threads."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

import edgec.testing.prune_models as pm
from edgec.core.onnx_io import ort_session
from edgec.pipeline.cli import main
from edgec.pipeline.compile import eval_threads


@pytest.mark.parametrize("build", [pm.chain, pm.residual, pm.depthwise], ids=["chain", "residual", "depthwise"])
def test_ort_outputs_are_bitwise_equal_across_thread_counts(build):
    m = build()
    x = np.random.default_rng(0).standard_normal([d.dim_value or 1 for d in
                                                  m.graph.input[0].type.tensor_type.shape.dim]).astype(np.float32)
    outs = [ort_session(m, threads=t, optimize=True).run(None, {m.graph.input[0].name: x})[0] for t in (1, 2, 3)]
    for o in outs[1:]:
        assert np.array_equal(o, outs[0])


def test_eval_threads_default_shares_cores_among_workers(monkeypatch):
    import os

    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    assert eval_threads(None, 1) == 4 and eval_threads(None, 4) == 2 and eval_threads(None, 16) == 1
    assert eval_threads(3, 16) == 3


def test_compile_threads_do_not_change_the_model(tmp_path, capsys):
    p = tmp_path / "chain.onnx"
    onnx.save(pm.chain(), p)
    models = []
    for t in (1, 2):
        out = tmp_path / f"o{t}"
        rc = main(["compile", "--model", str(p), "--recipe", "default", "--data", "synthetic", "--out", str(out),
                   "--no-bench", "--threads", "1", "-q", "--calib-samples", "8", "--validate-samples", "8",
                   "--eval-samples", "8", "--compile-threads", str(t)])
        assert rc == 0
        assert json.loads((out / "report.json").read_text())["compile_threads"] == t
        models.append((out / "model.onnx").read_bytes())
    assert models[0] == models[1]
    capsys.readouterr()
    assert main(["compile", "--model", str(p), "--compile-threads", "0", "--no-bench", "--out", str(tmp_path / "bad")]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert err == ["edgec: error: --compile-threads must be a positive integer"]
    assert not (tmp_path / "bad").exists()
