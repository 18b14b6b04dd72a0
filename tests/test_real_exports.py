"""Exports made by exporters edgec does not write (testing/real_exports.py: torch.onnx TorchScript and dynamo,
onnxslim, onnxruntime quantization), cached under .cache/real_exports and regenerated when missing.

Every small export compiles with `cleanup` within the exactness gate; node names stay unique across the whole model
(subgraphs included); the If model with a scalar control input compiles with per-name data and refuses without it;
a lossy pass leaves subgraph layers alone and says so."""
import json
from collections import Counter

import onnx
import pytest

from edgec.core.graph import walk_nodes
from edgec.pipeline.exactness import EXACT_CAP

pytest.importorskip("torch")
rx = pytest.importorskip("edgec.testing.real_exports")


def _compile(rec, tmp_path, recipe="cleanup", extra=()):
    from edgec.pipeline.cli import main

    out = tmp_path / f"{rec.name}-{recipe}"
    rc = main(["compile", "--model", str(rec.path), "--recipe", recipe, "--no-bench", "-q", "--out", str(out),
               "--calib-samples", "6", "--eval-samples", "4", "--seed", "0", *rec.cli_args(), *extra])
    return rc, out


def _all_node_names(g):
    return (n.name for n in walk_nodes(g))


@pytest.mark.slow
@pytest.mark.parametrize("name", [k for k in rx.small_corpus() if k != "resnet18-dynamo18-64"])
def test_small_export_compiles_with_cleanup_exactly(name, tmp_path):
    rec = rx.get(name)
    rc, out = _compile(rec, tmp_path)
    assert rc == 0, name
    rep = json.loads((out / "report.json").read_text())
    for st in rep["passes"]:
        assert st["exact"] and st["error_vs_previous"] <= st["stats"]["exact_tolerance"] <= EXACT_CAP, st["name"]
    assert rep["fidelity"]["summary"]["cosine_min"] > 0.9999
    m = onnx.load(str(out / "model.onnx"))
    names = [n for n in _all_node_names(m.graph) if n]
    assert len(names) == len(set(names))


@pytest.mark.slow
def test_dynamo_export_compiles_with_cleanup(tmp_path):
    rec = rx.get("resnet18-dynamo18-64")
    rc, out = _compile(rec, tmp_path)
    assert rc == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["fidelity"]["summary"]["cosine_min"] > 0.9999


def test_control_input_without_value_is_refused_in_one_line(tmp_path, capsys):
    rec = rx.get("control-ts17")
    rec.values = {}
    rc, out = _compile(rec, tmp_path)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1
    assert err[0].startswith("edgec: error: input 'sr' (int64, shape ()) needs data")
    assert not out.exists()


@pytest.mark.slow
def test_if_model_quant_leaves_subgraph_layers_and_says_so(tmp_path):
    rec = rx.get("control-ts17")
    src = onnx.load(str(rec.path))
    assert Counter(n.op_type for n in src.graph.node)["If"] == 1
    rc, out = _compile(rec, tmp_path, recipe="quant")
    assert rc == 0
    m = onnx.load(str(out / "model.onnx"))
    names = [n for n in _all_node_names(m.graph) if n]
    assert len(names) == len(set(names))
    if_node = [n for n in m.graph.node if n.op_type == "If"][0]
    sub_ops = Counter(x.op_type for a in if_node.attribute for x in a.g.node)
    assert sub_ops["Conv"] == 2 and not sub_ops["QuantizeLinear"] and not sub_ops["DequantizeLinear"]
    rep = json.loads((out / "report.json").read_text())
    q = [s for s in rep["passes"] if s["name"] == "quant"][0]
    assert q["stats"]["subgraph_layers_untouched"] == 2 and "If/Loop/Scan" in q["stats"]["subgraph_note"]
    assert rep["fidelity"]["summary"]["cosine_min"] >= 0.99
