"""If/Loop models: cleanup compiles them (subgraphs included); names passes create are unique across the whole model
(the reviewer's 'two nodes with same node name (/model/stft/Conv_w_DQ)'); lossy passes leave subgraph layers float."""
import json
from collections import Counter

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper, numpy_helper

from edgec.core.graph import walk_nodes
from edgec.passes.normalize import name_nodes


def _branch(name, w, extra_name):
    """A branch whose Conv has the same node name as the main graph's, plus a node already named like the DQ
    edgec would create for that Conv."""
    nodes = [helper.make_node("Conv", ["h", w], [f"{name}_c"], name="/model/stft/Conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", [f"{name}_c"], [f"{name}_o"], name=extra_name)]
    return helper.make_graph(nodes, name, [], [helper.make_tensor_value_info(f"{name}_o", T.FLOAT, [1, 8, 16, 16])])


def _model(path):
    rng = np.random.default_rng(0)
    w0 = numpy_helper.from_array((rng.standard_normal((8, 3, 3, 3)) * 0.3).astype(np.float32), "w0")
    w1 = numpy_helper.from_array((rng.standard_normal((8, 8, 3, 3)) * 0.2).astype(np.float32), "w1")
    w2 = numpy_helper.from_array((rng.standard_normal((8, 8, 3, 3)) * 0.2).astype(np.float32), "w2")
    w3 = numpy_helper.from_array((rng.standard_normal((4, 8, 1, 1)) * 0.3).astype(np.float32), "w3")
    nodes = [helper.make_node("Conv", ["x", "w0"], ["c0"], name="/model/stft/Conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c0"], ["h"], name="/model/relu"),
             helper.make_node("If", ["use_a"], ["b"], name="/model/if",
                              then_branch=_branch("then", "w1", "/model/stft/Conv_w_DQ"),
                              else_branch=_branch("else", "w2", "/model/stft/Conv_w_DQ_1")),
             helper.make_node("Conv", ["b", "w3"], ["y"], name="/model/head/Conv")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", T.FLOAT, [1, 3, 16, 16]),
                                       helper.make_tensor_value_info("use_a", T.BOOL, [])],
                          [helper.make_tensor_value_info("y", T.FLOAT, [1, 4, 16, 16])], [w0, w1, w2, w3])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    onnx.save(m, str(path))
    return m


def _names(g):
    return (n.name for n in walk_nodes(g))


def test_normalize_names_unique_across_subgraphs(tmp_path):
    m = _model(tmp_path / "m.onnx")
    assert Counter(_names(m.graph))["/model/stft/Conv"] == 3
    assert name_nodes(m) == 2
    names = list(_names(m.graph))
    assert len(names) == len(set(names)) and "/model/stft/Conv" in names


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["cleanup", "quant"])
def test_if_model_compiles(recipe, tmp_path):
    from edgec.pipeline.cli import main

    _model(tmp_path / "m.onnx")
    out = tmp_path / "o"
    rc = main(["compile", "--model", str(tmp_path / "m.onnx"), "--recipe", recipe, "--no-bench", "-q", "--out", str(out),
               "--data", "synthetic", "--input-value", "use_a=1", "--calib-samples", "8", "--eval-samples", "4",
               *(["--set", "quant.bits=[8]", "--set", "quant.quantize_outputs=true"] if recipe == "quant" else [])])
    assert rc == 0
    m = onnx.load(str(out / "model.onnx"))
    onnx.checker.check_model(m, full_check=True)
    names = [n for n in _names(m.graph) if n]
    assert len(names) == len(set(names))
    ifs = [n for n in m.graph.node if n.op_type == "If"]
    assert len(ifs) == 1 and all(Counter(x.op_type for x in a.g.node)["Conv"] == 1 for a in ifs[0].attribute)
    rep = json.loads((out / "report.json").read_text())
    if recipe == "quant":
        q = [s for s in rep["passes"] if s["name"] == "quant"][0]
        assert q["stats"]["subgraph_layers_untouched"] == 2
        assert Counter(n.op_type for n in m.graph.node)["DequantizeLinear"] >= 1  # main-graph layers quantized
    assert rep["fidelity"]["summary"]["cosine_min"] >= (0.99 if recipe == "quant" else 0.99999)
