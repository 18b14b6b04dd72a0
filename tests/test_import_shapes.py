"""Shape metadata from exporters is a hint: stale / contradictory value_info and output dims are dropped and
re-inferred, never failing strict shape inference; exporter symbolic dim names are handled alike."""
import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper, numpy_helper

from edgec.core.onnx_io import check_model, ort_session
from edgec.pipeline.input_shapes import fix_input_shapes
from edgec.pipeline.shape_meta import sanitize_shape_metadata


def _model(batch_sym: str, out_dims, vi_dims, sub_vi=False):
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w")
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("Identity", ["r"], ["y"])]
    vis = [helper.make_tensor_value_info("c", T.FLOAT, vi_dims), helper.make_tensor_value_info("r", T.FLOAT, vi_dims)]
    if sub_vi:  # an If whose branch carries stale value_info too
        then = helper.make_graph([helper.make_node("Identity", ["r"], ["t"])], "then", [],
                                 [helper.make_tensor_value_info("t", T.FLOAT, [-1, 4, 8, 8])],
                                 value_info=[helper.make_tensor_value_info("r", T.FLOAT, [7, 4, 8, 8])])
        other = helper.make_graph([helper.make_node("Neg", ["r"], ["e"])], "else", [],
                                  [helper.make_tensor_value_info("e", T.FLOAT, [-1, 4, 8, 8])])
        nodes[-1] = helper.make_node("If", ["cond"], ["y"], then_branch=then, else_branch=other)
        cond = [numpy_helper.from_array(np.array(True), "cond")]
    else:
        cond = []
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", T.FLOAT, [batch_sym, 3, "?", "?"])],
                          [helper.make_tensor_value_info("y", T.FLOAT, out_dims)], [w, *cond], value_info=vis)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    return m


@pytest.mark.parametrize("batch_sym", ["p2o.DynamicDimension.0", "batch", "?", "unk__12", "DynamicDimension.0"])
@pytest.mark.parametrize("out_dims,vi_dims", [
    ([-1, 4, 8, 8], [-1, 4, 8, 8]),          # Paddle: -1 for "unknown"
    ([4, 4, 8, 8], [4, 4, 8, 8]),            # shapes from another batch
    ([1, 4, 16, 16], [1, 4, 16, 16]),        # another spatial size than the fixed input shape
    (["N", 4, "?", "?"], [0, 4, -1, -1]),    # zero / negative dims in value_info
])
def test_stale_shape_metadata_is_reinferred(batch_sym, out_dims, vi_dims):
    m = _model(batch_sym, out_dims, vi_dims)
    with pytest.raises(Exception):  # strict inference refuses the file as exported (the reviewer's failure)
        onnx.shape_inference.infer_shapes(fix_no_sanitize(m), strict_mode=True, check_type=True)
    fixed = fix_input_shapes(m, {"x": (1, 3, 8, 8)})
    inferred = check_model(fixed)  # strict: must not raise
    y = inferred.graph.output[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in y] == [1, 4, 8, 8]
    x = np.random.default_rng(1).standard_normal((1, 3, 8, 8)).astype(np.float32)
    assert ort_session(fixed).run(None, {"x": x})[0].shape == (1, 4, 8, 8)


def fix_no_sanitize(m):
    c = onnx.ModelProto()
    c.CopyFrom(m)
    for d in c.graph.input[0].type.tensor_type.shape.dim:
        if not d.dim_value:
            d.Clear()
    c.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1
    c.graph.input[0].type.tensor_type.shape.dim[2].dim_value = 8
    c.graph.input[0].type.tensor_type.shape.dim[3].dim_value = 8
    return c


def test_subgraph_value_info_is_dropped_too():
    m = _model("p2o.DynamicDimension.0", [-1, 4, 8, 8], [3, 4, 8, 8], sub_vi=True)
    fixed = fix_input_shapes(m, {"x": (1, 3, 8, 8)})
    check_model(fixed)
    if_node = [n for n in fixed.graph.node if n.op_type == "If"][0]
    assert all(len(a.g.value_info) == 0 for a in if_node.attribute)


def test_sanitize_reports_what_it_changed():
    m = _model("batch", [4, 4, 8, 8], [4, 4, 8, 8])
    m.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1
    for k in (2, 3):
        m.graph.input[0].type.tensor_type.shape.dim[k].dim_value = 8
    st = sanitize_shape_metadata(m)
    assert st["value_info_dropped"] == 2 and st["output_dims_replaced"] == 1
    assert not m.graph.value_info
