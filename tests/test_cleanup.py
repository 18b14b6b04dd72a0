"""Cleanup passes: structure (op counts) and exact numerical equivalence, checked in ORT with optimizations off."""
from collections import Counter

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgec.passes.base import PassContext, get_pass, make_options
from edgec.core.errors import PassFailed
from edgec.core.onnx_io import ort_session
from edgec.pipeline.recipe import load_recipe
from edgec.pipeline.runner import EXACT_RTOL, run_recipe
from edgec.testing.foreign_models import foreign_cnn

RTOL = 1e-4  # the issue's bound for exact passes: max|y' - y| / max|y|


def _rel(a, b):
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))


def _run(model, x, name="x"):
    return ort_session(model, optimize=False).run(None, {name: x})[0]


def _cleanup(model):
    spec = get_pass("cleanup")
    return spec.fn(model, PassContext(calib_batches=lambda: iter(())), make_options(spec, {}))


def _ops(m):
    return Counter(n.op_type for n in m.graph.node)


@pytest.mark.slow
def test_resnet18_cleanup_folds_bn_and_matches_export():
    import torchvision

    from edgec.torchkit.export import export_torch

    model, info = export_torch(torchvision.models.resnet18(weights=None).eval(), (1, 3, 224, 224))
    assert info["max_rel_err_vs_torch"] <= 1e-4
    assert _ops(model)["BatchNormalization"] == 20
    res = _cleanup(model)
    ops = _ops(res.model)
    assert ops["BatchNormalization"] == 0 and ops["Identity"] == 0 and ops["Dropout"] == 0
    assert ops["Conv"] == 20 and ops["Gemm"] == 1
    onnx.checker.check_model(res.model, full_check=True)
    x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
    assert _rel(_run(res.model, x, "input"), _run(model, x, "input")) <= RTOL


@pytest.mark.parametrize("opset", [11, 13, 17])
@pytest.mark.parametrize("dynamic", [True, False])
def test_foreign_onnx_cleanup_exact(opset, dynamic):
    from edgec.pipeline.input_shapes import fix_input_shapes

    m = foreign_cnn(opset=opset, dynamic_hw=dynamic)
    m = fix_input_shapes(m, {"x": (1, 3, 32, 32)})
    res = _cleanup(m)
    ops = _ops(res.model)
    assert ops["BatchNormalization"] == 0, ops
    assert ops["Identity"] == 0 and ops["Constant"] == 0, ops
    assert ops["Conv"] == 2 and ops["Gemm"] == 1
    x = np.random.default_rng(1).standard_normal((1, 3, 32, 32)).astype(np.float32)
    assert _rel(_run(res.model, x), _run(m, x)) <= RTOL


def test_dropout_and_identity_removed():
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((4, 4)).astype(np.float32), "w")
    nodes = [helper.make_node("Identity", ["x"], ["a"]),
             helper.make_node("Dropout", ["a"], ["b"], name="drop"),
             helper.make_node("MatMul", ["b", "w"], ["c"]),
             helper.make_node("Identity", ["c"], ["y0"]),
             helper.make_node("Relu", ["y0"], ["y"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])], [w])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    res = _cleanup(m)
    assert _ops(res.model) == Counter({"MatMul": 1, "Relu": 1})
    x = rng.standard_normal((2, 4)).astype(np.float32)
    assert _rel(_run(res.model, x), _run(m, x)) <= RTOL


def test_exact_pass_that_changes_outputs_fails_naming_the_pass(monkeypatch):
    from dataclasses import replace

    import edgec.passes.base as pb

    m = foreign_cnn(dynamic_hw=False)

    def perturb(model, ctx, opts):
        out = onnx.ModelProto()
        out.CopyFrom(model)
        for init in out.graph.initializer:
            if init.name == "fcb":
                arr = numpy_helper.to_array(init) + 0.5
                init.CopyFrom(numpy_helper.from_array(arr.astype(np.float32), "fcb"))
        return pb.PassResult(out, True, {})

    spec = pb.get_pass("cleanup")
    monkeypatch.setitem(pb._REGISTRY, "cleanup", replace(spec, fn=perturb))
    recipe = load_recipe("cleanup")
    x = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)
    ctx = PassContext(calib_batches=lambda: iter([{"x": x}]))
    with pytest.raises(PassFailed) as e:
        run_recipe(m, recipe, ctx)
    assert "pass 'cleanup'" in str(e.value) and "declared exact" in str(e.value)
    assert EXACT_RTOL == 1e-4


def test_runner_records_error_and_costs_per_pass():
    m = foreign_cnn(dynamic_hw=False)
    x = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)
    res = run_recipe(m, load_recipe("cleanup"), PassContext(calib_batches=lambda: iter([{"x": x}])))
    assert [s.name for s in res.stages] == ["normalize", "cleanup"]
    st = res.stages[-1]
    assert st.exact and res.stages[0].exact
    assert st.error_vs_previous <= 1e-5
    assert st.costs["macs"] == 3 * 8 * 9 * 32 * 32 + 8 * 16 * 9 * 16 * 16 + 16 * 10
    assert st.stats["op_delta"]["BatchNormalization"] == -2
