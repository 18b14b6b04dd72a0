"""The fidelity policy through the command line: prune.target_latency_ms works (compile gives the pass the target's
latency probe); overlapping user splits are refused in one line; the report shows fit / validate / eval side by side;
a digits CNN trained here, given as ONNX with labelled data, compiled with `default`, loses <= 1 point of held-out
accuracy."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

import edgec.testing.prune_models as pm
from edgec.pipeline.cli import main
from edgec.pipeline.policy import PREPROCESS_KEY

SMALL = ["--no-bench", "--threads", "1", "-q", "--calib-samples", "8", "--validate-samples", "8", "--eval-samples", "8"]


def _one_line_error(err: str, needle: str):
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("edgec: error: ") and needle in lines[0], err


def test_prune_target_latency_through_cli(tmp_path):
    p = tmp_path / "chain.onnx"
    onnx.save(pm.chain(), p)
    out = tmp_path / "o"
    rc = main(["compile", "--model", str(p), "--recipe", "prune", "--set", "prune.target_macs=null",
               "--set", "prune.target_latency_ms=1000", "--data", "synthetic", "--out", str(out), *SMALL])
    assert rc == 0
    r = json.loads((out / "report.json").read_text())
    lat = [s for s in r["passes"] if s["name"] == "prune"][0]["stats"]["latency_search"]
    assert lat["base_ms"] > 0 and lat["target_ms"] == 1000 and lat["steps"] and lat["steps"][0]["ms"] > 0


def test_overlapping_splits_refused_through_cli(tmp_path, capsys):
    p = tmp_path / "chain.onnx"
    onnx.save(pm.chain(), p)
    r = np.random.default_rng(0)
    parts = {k: r.standard_normal((8, 3, 8, 8)).astype(np.float32) for k in ("fit", "validate", "eval")}
    parts["eval"][5] = parts["fit"][1]
    d = tmp_path / "d.npz"
    np.savez(d, **parts)
    out = tmp_path / "o"
    rc = main(["compile", "--model", str(p), "--recipe", "cleanup", "--data", str(d), "--out", str(out), *SMALL])
    assert rc == 2 and not out.exists()
    _one_line_error(capsys.readouterr().err, "of the eval split also appear in the fit split")


def test_report_has_three_splits_and_preprocessing(tmp_path):
    p = tmp_path / "chain.onnx"
    onnx.save(pm.chain(), p)
    out = tmp_path / "o"
    rc = main(["compile", "--model", str(p), "--recipe", "quant", "--out", str(out), *SMALL])
    assert rc == 0
    r = json.loads((out / "report.json").read_text())
    assert {k: v["samples"] for k, v in r["fidelity_splits"].items()} == {"fit": 8, "validate": 8, "eval": 8}
    assert r["data"]["disjointness"]["disjoint"] and "bundled photograph files" in r["data"]["disjointness"]["checked"]
    meta = {x.key: x.value for x in onnx.load(out / "model.onnx").metadata_props}
    pre = json.loads(meta[PREPROCESS_KEY])
    assert pre == r["preprocess"] and pre["layout"] == "NCHW" and len(pre["mean"]) == 3
    assert json.loads((out / "manifest.json").read_text())["preprocess"] == pre
    md = (out / "report.md").read_text()
    assert "| validate (decisions gated on it) | 8 |" in md and "verify set" not in md


def test_mean_std_mismatch_with_model_metadata_warns(tmp_path, capsys):
    m = pm.chain()
    m.metadata_props.add(key=PREPROCESS_KEY, value=json.dumps(
        {"applies": True, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "scale": 1 / 255, "layout": "NCHW"}))
    p = tmp_path / "m.onnx"
    onnx.save(m, p)
    rc = main(["compile", "--model", str(p), "--recipe", "cleanup", "--mean", "0.485,0.456,0.406",
               "--out", str(tmp_path / "o"), *SMALL])
    assert rc == 0
    warn = [ln for ln in capsys.readouterr().err.splitlines() if PREPROCESS_KEY in ln]
    assert len(warn) == 1 and "--mean 0.485,0.456,0.406 disagree" in warn[0]
    r = json.loads((tmp_path / "o" / "report.json").read_text())
    assert r["preprocess"]["std"] == [0.5, 0.5, 0.5]  # the rest of the metadata is read back


_DIGITS: dict = {}  # the compile runs once for both tests (a function-scoped fixture, so that conftest's logging
                   # restore wraps the in-process CLI run; a module-scoped one would run before it and leak its handler)


@pytest.fixture
def digits_report(tmp_path_factory):
    """A digits CNN trained here (seeded: initial weights and training), given as ONNX with labeled --data, compiled
    with `default`: the report."""
    if "report" not in _DIGITS:
        _DIGITS["report"] = _compile_digits(tmp_path_factory)
    return _DIGITS["report"]


def _compile_digits(tmp_path_factory):
    torch = pytest.importorskip("torch")
    from edgec.testing.digits import make_digits_data, train, vgg_net

    tmp_path = tmp_path_factory.mktemp("digits")
    xtr, ytr, xte, yte = make_digits_data(0)
    torch.manual_seed(0)  # the initial weights too: train(seed=) seeds only the training loop
    net = train(vgg_net(16), xtr, ytr, epochs=3, seed=0)
    p = tmp_path / "digits.onnx"
    torch.onnx.export(net, torch.zeros(1, 1, 32, 32), str(p), input_names=["input"], output_names=["logits"],
                      dynamo=False)
    d = tmp_path / "digits.npz"
    np.savez(d, fit=xtr[:256], fit_labels=ytr[:256], validate=xte[:150], validate_labels=yte[:150],
             eval=xte[150:], eval_labels=yte[150:])
    out = tmp_path / "o"
    rc = main(["compile", "--model", str(p), "--recipe", "default", "--data", str(d), "--out", str(out),
               "--no-bench", "--threads", "1", "-q", "--calib-samples", "128", "--validate-samples", "150",
               "--eval-samples", "400"])
    assert rc == 0
    return json.loads((out / "report.json").read_text()), len(xte)


@pytest.mark.slow
def test_digits_default_recipe_holds_accuracy_on_validate(digits_report):
    """What the policy guarantees: accuracy drop <= 1 point on the validate split, and something was compressed."""
    r, n_test = digits_report
    val = r["fidelity_splits"]["validate"]["summary"]
    assert val["reference_accuracy"] > 0.9
    assert 100 * (val["reference_accuracy"] - val["accuracy"]) <= 1.0
    assert r["fidelity_policy"]["met"]
    c0, c1 = r["costs"]["original"], r["costs"]["final"]  # int8 weights (the size) and/or fewer MACs
    assert c1["model_bytes"] < 0.5 * c0["model_bytes"] or c1["macs"] < 0.9 * c0["macs"]
    assert r["fidelity_splits"]["eval"]["samples"] == n_test - 150


@pytest.mark.slow
def test_digits_default_recipe_holds_accuracy_on_heldout(digits_report):
    """The issue's bar: held-out accuracy drop <= 1.0 point. Without the policy's sampling margin (standard_errors 0)
    the choice gated on 150 validate samples (drop 0.67 points there) lost 1.67 points on these 299 held-out ones."""
    s = digits_report[0]["fidelity_splits"]["eval"]["summary"]
    assert 100 * (s["reference_accuracy"] - s["accuracy"]) <= 1.0
