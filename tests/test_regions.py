"""Decode / post-processing regions (passes/regions.py): recognised on detectors, absent elsewhere, left in float by
quant and never pruned by prune."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper, numpy_helper

import edgec.testing.prune_models as pm
from edgec.passes.base import PassContext, get_pass, make_options
from edgec.passes.regions import find_postprocess
from edgec.pipeline.input_shapes import fix_input_shapes
from edgec.testing import realworld_models as rw


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
    assert r.seeds == ["nms"] and r.nodes == {"nms", "col2", "sq", "pick"}  # sq: weightless, feeds only the region


def _ctx(m, rec, n=8):
    from edgec.calib.data import InputInfo, load_splits
    from edgec.pipeline.sources import resolve

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
    from edgec.passes.prune.graph import analyze, node_names

    names = node_names(m.graph.node)
    inside = {names[i] for i in region.indices}
    touched = [g for g in analyze(m) if any(r.node in inside for r in g.producers + g.consumers + g.others)]
    pruned_ids = {r["id"] for r in p.stats["groups"] if r.get("kept") is not None and r["kept"] < r["size"]}
    assert touched and pruned_ids and not pruned_ids & {g.id for g in touched}
    assert p.stats["macs_ratio"] < 0.95                                          # the backbone/neck still shrink


def _tap_cosines(m_ref, m_cand, taps, feeds):
    """Mean cosine of each tapped tensor, candidate vs reference, computed directly in ORT."""
    from edgec.calib.activations import with_outputs
    from edgec.passes.regions import tap_tensors
    from edgec.core.onnx_io import ort_session

    ref_t, cand_t = tap_tensors(m_ref, taps), tap_tensors(m_cand, taps)
    sr = ort_session(with_outputs(m_ref, ref_t), optimize=True)
    sc = ort_session(with_outputs(m_cand, cand_t), optimize=True)
    out = []
    for tr, tc in zip(ref_t, cand_t):
        cos = []
        for f in feeds:
            a = dict(zip([o.name for o in sc.get_outputs()], sc.run(None, f)))[tc].ravel().astype(np.float64)
            r = dict(zip([o.name for o in sr.get_outputs()], sr.run(None, f)))[tr].ravel().astype(np.float64)
            cos.append(a @ r / (np.linalg.norm(a) * np.linalg.norm(r)))
        out.append(float(np.mean(cos)))
    return out


def test_anchor_decode_region_gates_outputs_and_reports_head_tensors(tmp_path):
    """YOLO-style decode (fixed-shape output): the floor holds on output0 as the issue defines it, and the raw head
    tensors entering the region are reported next to it (the anchor-dominated output hides head error)."""
    from edgec.passes.regions import region_inputs

    m, rec = _static("ultralytics_detector", tmp_path)
    ctx = _ctx(m, rec)
    spec = get_pass("quant")
    q = spec.fn(m, ctx, make_options(spec, {"calib_samples": 8, "min_cosine": 0.5, "floor_samples": 8}))
    fl = q.stats["floor"]
    assert fl["decode_region"]["gated_on"] == "outputs" and list(fl["measured"]["cosine"]) == ["output0"]
    taps = region_inputs(m, find_postprocess(m))
    heads = fl["measured"]["decode_inputs_cosine"]
    assert list(heads) == [f"{k}:{i}" for k, i in taps] and len(taps) == 4   # box and class conv, per level
    direct = _tap_cosines(m, q.model, taps, list(ctx.calib_batches())[:8])
    assert np.allclose(direct, list(heads.values()), atol=1e-5)
    assert min(direct) < fl["measured"]["cosine"]["output0"]   # the output looks better than the heads


def _topk_detector() -> onnx.ModelProto:
    """Conv head (1, 5, 8, 8) -> flatten to (1, 5, 64) -> ReduceMax over classes -> TopK(8) scores and indices."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.standard_normal((5, 8, 1, 1)).astype(np.float32), "w2"),
             numpy_helper.from_array(np.array([1, 5, 64], np.int64), "shape"),
             numpy_helper.from_array(np.array([8], np.int64), "k")]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["f1"], kernel_shape=[3, 3], pads=[1, 1, 1, 1], name="c1"),
             helper.make_node("Relu", ["f1"], ["r1"], name="r1"),
             helper.make_node("Conv", ["r1", "w2"], ["head"], kernel_shape=[1, 1], name="c2"),
             helper.make_node("Reshape", ["head", "shape"], ["flat"], name="flatten"),
             helper.make_node("ReduceMax", ["flat"], ["best"], axes=[1], keepdims=0, name="best"),
             helper.make_node("TopK", ["best", "k"], ["scores", "idx"], axis=1, name="topk")]
    g = helper.make_graph(nodes, "topk_det", [helper.make_tensor_value_info("x", T.FLOAT, [1, 3, 8, 8])],
                          [helper.make_tensor_value_info("scores", T.FLOAT, [1, 8]),
                           helper.make_tensor_value_info("idx", T.INT64, [1, 8])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_selection_region_gates_the_head_tensors():
    """With TopK inside the region (data-dependent selection), the floor holds on the head tensor entering it."""
    from edgec.passes.regions import region_inputs

    m = _topk_detector()
    r = find_postprocess(m)
    assert r.selection and r.nodes == {"flatten", "best", "topk"}
    taps = region_inputs(m, r)
    assert taps == [("flatten", 0)]
    r_ = np.random.default_rng(1)
    feeds = [{"x": r_.standard_normal((1, 3, 8, 8)).astype(np.float32)} for _ in range(16)]
    ctx = PassContext(calib_batches=lambda: iter(feeds), reference_model=m)
    spec = get_pass("quant")
    q = spec.fn(m, ctx, make_options(spec, {"calib_samples": 16, "min_cosine": 0.999, "floor_samples": 16}))
    fl = q.stats["floor"]
    assert fl["decode_region"]["outputs_not_gated"] == ["scores", "idx"]
    assert list(fl["measured"]["cosine"]) == ["flatten:0"] and fl["met"]
    assert _tap_cosines(m, q.model, taps, feeds)[0] >= 0.999 - 1e-6


@pytest.mark.parametrize("gate,expect", [("auto", ["output0"]), ("outputs", ["output0"]), ("inputs", "taps")])
def test_region_gate_option(gate, expect, tmp_path):
    """region_gate picks where a decode region's cosine floor holds: auto (outputs for a fixed-shape decode),
    outputs, or inputs (the raw head tensors: stricter)."""
    from edgec.passes.regions import region_inputs

    m, rec = _static("ultralytics_detector", tmp_path)
    ctx = _ctx(m, rec)
    spec = get_pass("quant")
    q = spec.fn(m, ctx, make_options(spec, {"calib_samples": 8, "min_cosine": 0.5, "floor_samples": 8,
                                            "region_gate": gate}))
    gated = list(q.stats["floor"]["measured"]["cosine"])
    taps = [f"{k}:{i}" for k, i in region_inputs(m, find_postprocess(m))]
    assert gated == (taps if expect == "taps" else expect)
    with pytest.raises(Exception, match="region_gate"):
        make_options(spec, {"region_gate": "everywhere"})
