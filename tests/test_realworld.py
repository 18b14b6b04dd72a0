"""Real-world ONNX (issue 6): every exporter trait in tests/realworld_models.py goes through `compile`.

For each model and recipe: compile succeeds, the emitted model passes the full ONNX checker, the report has a
per-output fidelity entry (cosine, relative L2, max abs) for every original output at or above the recipe's
cosine floor, and dynamic models run at two different input shapes with the same outputs as the original.
The `default` recipe's floors (passes/floor.py) decide what it promises: cosine >= 0.99 on every output of a model with
a non-classifier output; top-1 agreement >= 0.30 for a pure classifier (the tiny external-data model). The
production-size run of the same traits is bench/bench_realworld.py (`make bench-realworld`).
"""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from edgec.pipeline.compile import CompileOptions, compile_model
from edgec.pipeline.importer import load_onnx_file
from edgec.pipeline.input_shapes import finish_dynamic, verify_at_shapes
from edgec.testing import realworld_models as rw

# recipe -> minimum per-output cosine vs the original (issue 6 target for `default`: >= 0.99).
RECIPES = {"cleanup": 0.9999, "[normalize, cleanup]": 0.9999, "quant": 0.99, "default": 0.99}
DYNAMIC_RECIPE = "[normalize, cleanup]"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("realworld")
    return {name: w(d) for name, w in rw.WRITERS.items()}


def _options(rec: rw.RealWorld, recipe: str, out, **kw) -> CompileOptions:
    return CompileOptions(model=str(rec.path), recipe=recipe, out=str(out), input_shapes=rec.shape_args, data=rec.data,
                          calib_samples=4, eval_samples=8, bench=False, threads=(1,), seed=0, **kw)


def _pass_names(report) -> list[str]:
    return [p["name"] for p in report["recipe"]["passes"]]


def _check_traits(name: str, model: onnx.ModelProto, original: onnx.ModelProto, passes: list[str]) -> None:
    ops = rw.count_ops(model)
    if name.startswith("paddle"):
        assert rw.count_ops(original)["Constant"] >= 200 and original.opset_import[0].version in (11, 12)
        assert "BatchNormalization" not in ops, "unfused BatchNormalization survived"
        assert ops.get("HardSigmoid", 0) + ops.get("HardSwish", 0) >= 1
        assert ops.get("Clip", 0) >= 1
        if "normalize" in passes:
            assert model.opset_import[0].version >= 17
            assert "Constant" not in ops
            inits = {t.name for t in model.graph.initializer}
            assert not [i.name for i in model.graph.input if i.name in inits], "initializers left as graph inputs"
    elif name == "ultralytics_detector":
        assert rw.count_ops(original)["Range"] == 4 and ops.get("Sigmoid", 0) >= 1 and ops.get("Split", 0) >= 1
        assert ops.get("Concat", 0) >= 3
    elif name == "external_data":
        assert all(t.data_location != onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
    elif name == "matmul_attention":
        assert ops.get("Softmax", 0) == 1 and ops.get("MatMul", 0) + ops.get("Gemm", 0) >= 5
    if "normalize" in passes:
        assert "Constant" not in ops


@pytest.mark.parametrize("recipe", list(RECIPES))
@pytest.mark.parametrize("name", list(rw.WRITERS))
def test_realworld_compiles_with_per_output_fidelity(name, recipe, models, tmp_path):
    rec = models[name]
    out = tmp_path / "out"
    report = compile_model(_options(rec, recipe, out))
    model = onnx.load(str(out / "model.onnx"))
    onnx.checker.check_model(model, full_check=True)
    original = onnx.load(str(rec.path))
    _check_traits(name, model, original, _pass_names(report))
    per = report["fidelity"]["per_output"]
    assert set(per) == {o.name for o in original.graph.output}
    classifier_only = all("top1_agreement" in f for f in per.values())
    for oname, f in per.items():
        assert f["samples"] == 8
        if recipe == "default" and classifier_only:  # judged by decisions: the agreement floor, cosine sanity only
            assert f["top1_agreement"] >= 0.30 and f["cosine"] >= 0.95, (oname, f)
            continue
        assert f["cosine"] >= RECIPES[recipe], (oname, f)
        assert f["rel_l2"] <= (1e-3 if RECIPES[recipe] > 0.999 else 0.2), (oname, f)
        assert np.isfinite(f["rel_l2"]) and np.isfinite(f["max_abs"])
    md = (out / "report.md").read_text()
    stats = {p["name"]: p.get("stats") or {} for p in report["passes"]}
    if name == "ultralytics_detector" and "quant" in stats:  # the DFL conv is in the decode region: fp32
        post = stats["quant"]["postprocess"]
        assert len(post["layers_fp32"]) == 1 and post["ops"].get("Softmax") == 1
        assert stats["quant"]["bits"][post["layers_fp32"][0]] == 32
        if recipe == "quant":  # all-int8 recipe: everything else is int8
            assert sum(1 for b in stats["quant"]["bits"].values() if b == 8) == len(stats["quant"]["bits"]) - 1
        assert "Decode / post-processing region" in md
    for oname in per:
        assert f"| {oname} |" in md, "per-output fidelity table missing from report.md"
    assert json.loads((out / "report.json").read_text())["fidelity"]["per_output"] == json.loads(json.dumps(per))


DYNAMIC = [n for n in rw.WRITERS if n != "external_data"]


def _compile_dynamic(rec: rw.RealWorld, recipe: str, tmp_path) -> onnx.ModelProto:
    """The compiled model with its dynamic axes kept (compile --dynamic verifies it at two shapes itself)."""
    out = tmp_path / "dyn"
    report = compile_model(_options(rec, recipe, out, dynamic=",".join(rec.dynamic)))
    assert len(report["dynamic"]["verified_at"]) == 2
    assert report["dynamic"]["verified_at"][0] != report["dynamic"]["verified_at"][1]
    return onnx.load(str(out / "model.onnx"))


@pytest.mark.parametrize("name", DYNAMIC)
def test_dynamic_model_runs_at_two_shapes(name, models, tmp_path):
    recipe = DYNAMIC_RECIPE
    rec = models[name]
    final = _compile_dynamic(rec, recipe, tmp_path)
    onnx.checker.check_model(final, full_check=True)
    for inp in final.graph.input:
        if inp.name in rec.input_shapes:
            assert any(d.dim_param for d in inp.type.tensor_type.shape.dim), "dynamic axes were not kept"
    original = onnx.load(str(rec.path))
    assert rec.input_shapes != rec.second_shapes
    res = verify_at_shapes(final, original, [rec.input_shapes, rec.second_shapes], seed=3)
    for r in res:
        for oname, f in r["per_output"].items():
            assert f["cosine"] >= RECIPES[recipe] and f["max_rel"] < 1e-3, (r["shape"], oname, f)


def test_static_compile_bakes_shapes_so_dynamic_needs_the_flag(models, tmp_path):
    """Why --dynamic exists: a static compile folds the decode head for one size; at another size it must fail
    loudly (EdgecError from verify_at_shapes), never give silently wrong boxes."""
    from edgec.core.errors import EdgecError
    from edgec.pipeline.input_shapes import dynamic_axes, restore_dynamic_axes

    rec = models["ultralytics_detector"]
    out = tmp_path / "static"
    compile_model(_options(rec, "cleanup", out))
    static = onnx.load(str(out / "model.onnx"))
    assert rw.count_ops(static).get("Range", 0) == 0  # the anchor grid was folded to a constant
    original = onnx.load(str(rec.path))
    axes = dynamic_axes(original, list(rec.dynamic))
    with pytest.raises(EdgecError):
        relaxed = restore_dynamic_axes(static, original, axes)
        verify_at_shapes(relaxed, original, [rec.second_shapes])


def test_normalize_pass_on_paddle_graph():
    """normalize alone: opset 11 -> 17, 200+ Constants -> initializers, initializer-inputs dropped, shared weights
    untied, and outputs unchanged (checked by the runner's exactness check at 1e-4)."""
    from edgec.calib.data import InputInfo, synthetic_splits
    from edgec.passes.base import PassContext
    from edgec.pipeline.recipe import load_recipe
    from edgec.pipeline.runner import run_recipe

    m = rw.paddle_model(11, init_as_inputs=True)
    from edgec.pipeline.input_shapes import fix_input_shapes

    m = fix_input_shapes(m, {"x": (1, 3, 16, 16)})
    calib, _ = synthetic_splits([InputInfo("x", (1, 3, 16, 16))], 2, 1, 0)
    res = run_recipe(m, load_recipe("[normalize]"), PassContext(calib_batches=lambda: calib.iter_feeds()))
    st = res.stages[0].stats
    assert st["opset_before"] == 11 and st["opset_after"] == 17
    assert st["constants_lifted"] >= 200 and st["constants_kept"] == 0
    assert st["initializer_inputs_removed"] == len(m.graph.initializer)
    assert st["shared_weights_untied"] >= 10
    assert res.stages[0].error_vs_previous <= 1e-5
    out = res.model
    ops = rw.count_ops(out)
    assert "Constant" not in ops and ops["Split"] == 6
    # Split/Squeeze/Unsqueeze now take their sizes/axes as inputs (opset 13 form)
    for n in out.graph.node:
        if n.op_type in ("Split", "Squeeze", "Unsqueeze"):
            assert not [a for a in n.attribute if a.name in ("split", "axes")] and len(n.input) == 2, n
    uses = {}
    for n in out.graph.node:
        if n.op_type == "Conv":
            uses[n.input[1]] = uses.get(n.input[1], 0) + 1
    assert max(uses.values()) == 1, "a Conv weight is still shared"
    assert len({n.name for n in out.graph.node}) == len(out.graph.node)


def test_dynamic_batch_on_a_fixed_batch_model(models):
    """--dynamic batch on a model exported with batch 1: relaxed in both the compiled model and the reference."""
    from edgec.pipeline.input_shapes import dynamic_axes

    rec = models["external_data"]
    original = load_onnx_file(rec.path)
    axes = dynamic_axes(original, "batch")
    assert axes == {"input": {0: "input_batch"}}
    final, section = finish_dynamic(onnx.ModelProto.FromString(original.SerializeToString()), original, axes,
                                    {"input": (1, 3, 32, 32)})
    assert section["verified_at"] == [{"input": [1, 3, 32, 32]}, {"input": [2, 3, 32, 32]}]
    assert final.graph.output[0].type.tensor_type.shape.dim[0].dim_param  # the batch of the output follows


def test_dynamic_axis_the_original_fixes_internally_is_refused():
    from onnx import TensorProto as T
    from onnx import helper, numpy_helper

    from edgec.core.errors import EdgecError
    from edgec.pipeline.input_shapes import dynamic_axes

    g = helper.make_graph([helper.make_node("Reshape", ["x", "s"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", T.FLOAT, [1, 4])],
                          [helper.make_tensor_value_info("y", T.FLOAT, [1, 2, 2])],
                          [numpy_helper.from_array(np.array([1, 2, 2], np.int64), "s")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(EdgecError, match=r"the original model does not run at input shape 2x4 .*leave that axis out"):
        finish_dynamic(onnx.ModelProto.FromString(m.SerializeToString()), m, dynamic_axes(m, "batch"), {"x": (1, 4)})
    with pytest.raises(EdgecError, match=r"--dynamic: unknown axis 'depth'"):
        dynamic_axes(m, "batch,depth")


def test_cli_dynamic_flag_keeps_axes_and_reports_two_shapes(models, tmp_path, capsys):
    from edgec.pipeline.cli import main

    rec = models["ultralytics_detector"]
    out = tmp_path / "cli"
    rc = main(["compile", "--model", str(rec.path), "--input-shape", rec.shape_args[0], "--dynamic", "batch,height,width",
               "--recipe", DYNAMIC_RECIPE, "--out", str(out), "--no-bench", "--calib-samples", "2", "--eval-samples", "2",
               "-q"])
    assert rc == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    shapes = report["dynamic"]["verified_at"]
    assert shapes[0] == {"images": [1, 3, 64, 64]} and shapes[1] != shapes[0]
    assert all(r["summary"]["cosine_min"] > 0.9999 for r in report["dynamic"]["per_shape"])
    dims = onnx.load(str(out / "model.onnx")).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in dims] == ["batch", 3, "height", "width"]


@pytest.mark.parametrize("name", DYNAMIC)
def test_default_recipe_with_dynamic_axes(name, models, tmp_path):
    """Channel removal and quantization on a model that keeps its dynamic axes: passes count MACs and time layers at
    the compile shape (not at symbolic dims), the decode head stays computed from Shape, and the emitted model runs
    at both verification shapes."""
    rec = models[name]
    out = tmp_path / "dyn_default"
    # What is under test is the mechanism (MACs and layer timing at the compile shape with symbolic inputs). On
    # validate, the random-weight attention model (near-tied logits) keeps neither cosine 0.99 nor top-1 0.95 once
    # any channel goes, so under the default policy prune rightly backs off; a looser policy lets it remove channels.
    report = compile_model(_options(rec, "default", out, dynamic=",".join(rec.dynamic),
                                    overrides=["fidelity.min_cosine=0.95", "fidelity.min_top1_agreement=0.5"]))
    macs = {p["name"]: p["costs"]["macs"] for p in report["passes"]}
    assert all(v > 0 for v in macs.values()), macs
    assert macs["prune"] < macs["cleanup"], "no channel removed with dynamic axes"
    final = onnx.load(str(out / "model.onnx"))
    assert any(d.dim_param for i in final.graph.input for d in i.type.tensor_type.shape.dim)
    res = verify_at_shapes(final, onnx.load(str(rec.path)), [rec.input_shapes, rec.second_shapes], seed=3)
    for r in res:
        for oname, f in r["per_output"].items():
            assert f["cosine"] >= 0.95, (r["shape"], oname, f)
    if name == "ultralytics_detector":
        assert rw.count_ops(final).get("Range", 0) == 4, "the decode head must stay computed from the input shape"
