"""Decode / post-processing regions (passes/regions.py): recognised on detectors, absent elsewhere, left in float by
quant and never pruned by prune."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper, numpy_helper

import tests.prune_models as pm
from passes.base import PassContext, get_pass, make_options
from passes.regions import find_postprocess
from pipeline.importer import fix_input_shapes
from tests import realworld_models as rw


def _static(name: str, tmp: Path) -> tuple[onnx.ModelProto, rw.RealWorld]:
    rec = rw.WRITERS[name](tmp / name)
    return fix_input_shapes(onnx.load(str(rec.path)), dict(rec.input_shapes)), rec


def test_detector_decode_region(tmp_path):
    m, _ = _static("ultralytics_detector", tmp_path)
    r = find_postprocess(m)
    by_key = {(n.name or n.output[0]): n for n in m.graph.node}
    inside = [by_key[k] for k in r.nodes]
    ops = {n.op_type for n in inside}
    # the DFL (Softmax -> fixed 1x1 Conv), anchor arithmetic and the score Sigmoid are inside ...
    assert {"Softmax", "Conv", "Sub", "Sigmoid", "Split"} <= ops
    assert [n for n in inside if n.op_type == "Conv"] and r.weights == 8  # DFL conv: 1 x reg_max x 1 x 1
    assert len(r.seeds) == 2 and all(by_key[s].op_type == "Reshape" for s in r.seeds)  # one flatten per level
    # ... every other Conv (backbone, neck, head) is outside
    convs = [n for n in m.graph.node if n.op_type == "Conv"]
    assert sum(1 for n in convs if (n.name or n.output[0]) in r.nodes) == 1 and len(convs) > 20
    assert any(o.name == "output0" for o in m.graph.output) and any("output0" in n.output for n in inside)


@pytest.mark.parametrize("name", ["paddle_opset12", "external_data", "matmul_attention"])
def test_no_region_without_a_decode_head(name, tmp_path):
    m, _ = _static(name, tmp_path)
    assert not find_postprocess(m).nodes


@pytest.mark.parametrize("builder", ["chain", "residual", "concat", "flatten_gemm"])
def test_no_region_on_classifiers(builder):
    assert not find_postprocess(getattr(pm, builder)()).nodes


def _flatten_then(k: int) -> onnx.ModelProto:
    """Conv (1,8,4,4) -> Reshape (1,8,16) -> Transpose (1,16,8) -> MatMul [8, k] (k = 0: Mul by a constant) -> y:
    a flatten whose closure holds 8 * k learned weights against the conv's 216."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(np.array([1, 8, 16], np.int64), "shape"),
             numpy_helper.from_array(rng.standard_normal((8, max(k, 1))).astype(np.float32) if k else
                                     np.float32(0.5), "proj")]
    nodes = [helper.make_node("Conv", ["x", "w"], ["f"], kernel_shape=[3, 3], pads=[1, 1, 1, 1], name="conv"),
             helper.make_node("Reshape", ["f", "shape"], ["flat"], name="flatten"),
             helper.make_node("Transpose", ["flat"], ["tok"], perm=[0, 2, 1], name="tr"),
             helper.make_node("MatMul" if k else "Mul", ["tok", "proj"], ["y"], name="proj")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", T.FLOAT, [1, 3, 4, 4])],
                          [helper.make_tensor_value_info("y", T.FLOAT, [1, 16, k or 8])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_flatten_followed_by_learned_layers_is_not_decode():
    assert not find_postprocess(_flatten_then(64)).nodes     # 512 learned weights after the flatten: a model body
    assert not find_postprocess(_flatten_then(1)).nodes      # 8 > 1% of 224
    assert find_postprocess(_flatten_then(0)).nodes == {"flatten", "tr", "proj"}  # arithmetic only: decode


def test_nms_region():
    """Boxes/scores -> NonMaxSuppression -> Gather of the selected boxes: NMS and everything after it."""
    nodes = [helper.make_node("NonMaxSuppression", ["boxes", "scores", "maxk"], ["sel"], name="nms"),
             helper.make_node("Gather", ["sel", "col"], ["idx"], axis=1, name="col2"),
             helper.make_node("Squeeze", ["boxes", "ax0"], ["b2"], name="sq"),
             helper.make_node("Gather", ["b2", "idx"], ["picked"], axis=0, name="pick")]
    inits = [numpy_helper.from_array(np.array([10], np.int64), "maxk"),
             numpy_helper.from_array(np.array(2, np.int64), "col"),
             numpy_helper.from_array(np.array([0], np.int64), "ax0")]
    g = helper.make_graph(nodes, "nms", [helper.make_tensor_value_info("boxes", T.FLOAT, [1, 20, 4]),
                                         helper.make_tensor_value_info("scores", T.FLOAT, [1, 1, 20])],
                          [helper.make_tensor_value_info("picked", T.FLOAT, None)], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    r = find_postprocess(m)
    assert r.seeds == ["nms"] and r.nodes == {"nms", "col2", "pick"}


def _ctx(m, rec, n=8):
    from calib.data import InputInfo, load_splits
    from pipeline.sources import resolve

    inputs = [InputInfo(k, v, np.float32) for k, v in rec.input_shapes.items()]
    calib, _ = load_splits(rec.data, inputs, resolve(str(rec.path)).preprocess, n_calib=n, n_eval=2, seed=0)
    return PassContext(calib_batches=lambda: calib.iter_feeds(), reference_model=m, seed=0)


def test_quant_and_prune_leave_the_region_alone(tmp_path):
    m, rec = _static("ultralytics_detector", tmp_path)
    region = find_postprocess(m)
    ctx = _ctx(m, rec)
    spec = get_pass("quant")
    q = spec.fn(m, ctx, make_options(spec, {"calib_samples": 8}))
    post = q.stats["postprocess"]
    assert len(post["layers_fp32"]) == 1 and q.stats["bits"][post["layers_fp32"][0]] == 32
    assert sum(1 for b in q.stats["bits"].values() if b == 8) >= 20           # the rest is int8
    spec = get_pass("prune")
    p = spec.fn(m, ctx, make_options(spec, {"target_macs": 0.8, "criterion": "l1", "allocation": "uniform",
                                            "recovery": "none", "strict_budget": False}))
    from passes.prune.graph import analyze, node_names

    names = node_names(m.graph.node)
    inside = {names[i] for i in region.indices}
    touched = [g for g in analyze(m) if any(r.node in inside for r in g.producers + g.consumers + g.others)]
    pruned_ids = {r["id"] for r in p.stats["groups"] if r.get("kept") is not None and r["kept"] < r["size"]}
    assert touched and pruned_ids and not pruned_ids & {g.id for g in touched}
    assert p.stats["macs_ratio"] < 0.95                                          # the backbone/neck still shrink
