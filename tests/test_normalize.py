"""The normalize pass: canonical form for third-party graphs, exact (checked by the runner at 1e-4)."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper, numpy_helper

from edgec.calib.data import InputInfo, synthetic_splits
from edgec.passes.base import PassContext, get_pass, make_options
from edgec.passes.normalize import NormalizeOptions
from edgec.pipeline.recipe import load_recipe
from edgec.pipeline.runner import run_recipe
from edgec.testing.realworld_models import count_ops


def _run(model, recipe="[normalize]", shape=(1, 4, 8, 8)):
    calib, _ = synthetic_splits([InputInfo("x", shape)], 2, 1, 0)
    return run_recipe(model, load_recipe(recipe), PassContext(calib_batches=lambda: calib.iter_feeds()))


def _opset9_model() -> onnx.ModelProto:
    """Attribute forms that later opsets take as inputs: Clip/Pad/Slice/Squeeze/Unsqueeze/Split, and Upsample."""
    nodes = [
        helper.make_node("Clip", ["x"], ["c"], min=0.0, max=6.0),
        helper.make_node("Pad", ["c"], ["p"], pads=[0, 0, 1, 1, 0, 0, 1, 1], mode="constant", value=0.0),
        helper.make_node("Slice", ["p"], ["s"], starts=[1, 1], ends=[9, 9], axes=[2, 3]),
        helper.make_node("Upsample", ["s", "scales"], ["u"], mode="nearest"),
        helper.make_node("ReduceMean", ["u"], ["r"], axes=[2, 3], keepdims=1),
        helper.make_node("Squeeze", ["r"], ["q"], axes=[2, 3]),
        helper.make_node("Unsqueeze", ["q"], ["uq"], axes=[2]),
        helper.make_node("Split", ["uq"], ["a", "b"], axis=1, split=[1, 3]),
        helper.make_node("Concat", ["b", "a"], ["y"], axis=1),
    ]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", T.FLOAT, [1, 4, 8, 8])],
                          [helper.make_tensor_value_info("y", T.FLOAT, [1, 4, 1])],
                          [numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 9)])
    m.ir_version = 4
    onnx.checker.check_model(m)
    return m


def test_opset9_attribute_forms_become_input_forms():
    res = _run(_opset9_model())
    st, out = res.stages[0].stats, res.model
    assert st["opset_before"] == 9 and st["opset_after"] == 17 and out.ir_version >= 8
    assert res.stages[0].error_vs_previous == 0.0
    ops = count_ops(out)
    assert "Upsample" not in ops and ops["Resize"] == 1 and "Constant" not in ops
    inits = {t.name for t in out.graph.initializer}
    form = {"Clip": ("min", "max"), "Pad": ("pads",), "Slice": ("starts", "ends", "axes"), "Squeeze": ("axes",),
            "Unsqueeze": ("axes",), "Split": ("split",)}
    for n in out.graph.node:
        if n.op_type in form:
            assert not {a.name for a in n.attribute} & set(form[n.op_type]), n
            assert all(i in inits for i in n.input[1:] if i), n  # every size/axis is now an initializer input


def test_failed_conversion_is_reported_and_graph_left_untouched(monkeypatch):
    import onnx.version_converter as vc

    def boom(model, target):
        raise RuntimeError("no adapter for MyOp")

    monkeypatch.setattr(vc, "convert_version", boom)
    m = _opset9_model()
    res = _run(m)
    st = res.stages[0].stats
    assert st["opset_after"] == 9 and "conversion to 17 failed: no adapter for MyOp" in st["opset"]
    assert count_ops(res.model) == count_ops(m)
    onnx.checker.check_model(res.model, full_check=True)


def _shared_model(extra_user: bool = False) -> onnx.ModelProto:
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((4, 4, 1, 1)).astype(np.float32), "w")
    nodes = [helper.make_node("Conv", ["x", "w"], ["a"]), helper.make_node("Conv", ["a", "w"], ["b"]),
             helper.make_node("Conv", ["b", "w"], ["y0"])]
    if extra_user:  # the weight is also read by a non-weight consumer
        nodes += [helper.make_node("ReduceMean", ["w"], ["wm"], axes=[0], keepdims=1),  # [1, 4, 1, 1]
                  helper.make_node("Add", ["y0", "wm"], ["y1"])]
    nodes.append(helper.make_node("Constant", [], ["k"], value=numpy_helper.from_array(np.float32(2.0), "kv")))
    nodes.append(helper.make_node("Mul", ["y1" if extra_user else "y0", "k"], ["y"]))
    nodes.append(helper.make_node("Constant", [], ["const_out"], value_floats=[1.0, 2.0]))
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", T.FLOAT, [1, 4, 8, 8])],
                          [helper.make_tensor_value_info("y", T.FLOAT, [1, 4, 8, 8]),
                           helper.make_tensor_value_info("const_out", T.FLOAT, [2])], [w])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("extra_user", [False, True])
def test_shared_weights_are_untied(extra_user):
    res = _run(_shared_model(extra_user))
    st, out = res.stages[0].stats, res.model
    assert st["shared_weights_untied"] == (3 if extra_user else 2)
    convs = [n for n in out.graph.node if n.op_type == "Conv"]
    assert len({n.input[1] for n in convs}) == 3
    assert res.stages[0].error_vs_previous == 0.0
    # a Constant that is itself a graph output stays a node; the other becomes an initializer
    assert st["constants_lifted"] == 1 and st["constants_kept"] == 1
    assert [n.output[0] for n in out.graph.node if n.op_type == "Constant"] == ["const_out"]


def test_untie_budget_keeps_sharing_and_reports_it():
    spec = get_pass("normalize")
    res = spec.fn(_shared_model(), None, make_options(spec, {"untie_max_bytes": 0}))
    assert res.stats["shared_weights_untied"] == 0 and res.stats["shared_weights_kept"] == ["w"]
    assert "untie_max_bytes" in res.stats["shared_weights_kept_reason"]


def test_normalize_is_idempotent():
    spec = get_pass("normalize")
    once = spec.fn(_opset9_model(), None, NormalizeOptions()).model
    twice = spec.fn(once, None, NormalizeOptions())
    assert not twice.modified
    assert twice.model.SerializeToString(deterministic=True) == once.SerializeToString(deterministic=True)


def test_unnamed_nodes_get_deterministic_unique_names():
    spec = get_pass("normalize")
    out = spec.fn(_shared_model(), None, NormalizeOptions()).model
    names = [n.name for n in out.graph.node]
    assert all(names) and len(set(names)) == len(names)
    assert names == [n.name for n in spec.fn(_shared_model(), None, NormalizeOptions()).model.graph.node]


def test_bad_options_rejected():
    from edgec.core.errors import EdgecError

    with pytest.raises(EdgecError, match="target_opset"):
        make_options(get_pass("normalize"), {"target_opset": 9})


def test_opset_newer_than_onnxruntime_is_down_converted():
    """A model stamped with the newest ONNX opset (which passes would copy onto inserted Q/DQ nodes) is brought down
    to the newest opset this onnxruntime implements."""
    from edgec.passes.normalize import ort_max_opset

    newest = onnx.defs.onnx_opset_version()
    if ort_max_opset() >= newest:
        pytest.skip(f"onnxruntime here implements opset {newest}, the newest onnx knows")
    m = _shared_model()
    m.opset_import[0].version = newest
    m.ir_version = 10
    res = _run(m)
    st = res.stages[0].stats
    assert st["opset_before"] == newest and st["opset_after"] == ort_max_opset() < newest
    assert res.stages[0].error_vs_previous == 0.0
