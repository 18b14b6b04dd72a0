"""Models quantized by another tool (onnxruntime quantize_dynamic: ConvInteger / MatMulInteger /
DynamicQuantizeLinear): detected; cleanup keeps them bit-exact; prune/quant refuse in one line naming what was found."""
import numpy as np
import onnx
import pytest

from edgec.core.onnx_io import ort_session, run_session
from edgec.passes.base import PassContext, get_pass, make_options
from edgec.passes.cleanup import quantized_ops

pytest.importorskip("torch")


@pytest.fixture(scope="module")
def qexport():
    from edgec.testing.real_exports import ort_quantized_export

    return ort_quantized_export("resnet18", hw=64)


def test_detects_ops_from_another_tool(qexport):
    found = quantized_ops(onnx.load(str(qexport.path)))
    assert found.get("ConvInteger", 0) >= 20 and found.get("DynamicQuantizeLinear", 0) >= 1


def test_cleanup_is_bit_exact_on_a_quantized_model(qexport):
    from edgec.pipeline.input_shapes import fix_input_shapes

    m = fix_input_shapes(onnx.load(str(qexport.path)), {"images": (1, 3, 64, 64)})
    spec = get_pass("cleanup")
    res = spec.fn(m, PassContext(calib_batches=lambda: iter(())), make_options(spec, {}))
    assert "already quantized" in res.stats["folding_skipped"]
    assert quantized_ops(res.model) == quantized_ops(m)  # nothing requantized, nothing folded away
    rng = np.random.default_rng(0)
    a, b = ort_session(m), ort_session(res.model)
    for _ in range(3):
        f = {"images": rng.standard_normal((1, 3, 64, 64)).astype(np.float32)}
        for x, y in zip(run_session(a, f), run_session(b, f)):
            np.testing.assert_array_equal(x, y)  # bit-identical: every quantizer sees the same fp32 input


def test_folding_in_front_of_a_dynamic_quantizer_flips_codes():
    """Why cleanup skips folding on such models: a last-bit fp32 change before DynamicQuantizeLinear moves its
    uint8 codes (the 'changed outputs by inf / by one quantization step' the reviewer saw)."""
    from onnx import TensorProto as T
    from onnx import helper

    g = helper.make_graph([helper.make_node("DynamicQuantizeLinear", ["x"], ["q", "s", "z"])], "g",
                          [helper.make_tensor_value_info("x", T.FLOAT, [1, 65536])],
                          [helper.make_tensor_value_info("q", T.UINT8, [1, 65536])])
    sess = ort_session(helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)]))
    x = np.random.default_rng(0).standard_normal((1, 65536)).astype(np.float32)
    drift = np.random.default_rng(1).standard_normal(x.shape).astype(np.float32) * np.float32(1e-5) * np.abs(x).max()
    drift[(x == x.max()) | (x == x.min())] = 0  # same range, so the same scale: only the rounding can differ
    x2 = x + drift  # 1e-5 relative: the drift a reordered fold produces in a deep model
    assert x2.max() == x.max() and x2.min() == x.min()
    assert (run_session(sess, {"x": x})[0] != run_session(sess, {"x": x2})[0]).any()


@pytest.mark.parametrize("recipe,pass_name", [("quant", "quant"), ("prune", "prune")])
def test_lossy_recipes_refuse_in_one_line(qexport, recipe, pass_name, tmp_path, capsys):
    from edgec.pipeline.cli import main

    rc = main(["compile", "--model", str(qexport.path), "--recipe", recipe, "--no-bench", "-q", "--out",
               str(tmp_path / "o"), "--calib-samples", "4", "--eval-samples", "4", *qexport.cli_args()])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert err[-1].startswith(f"edgec: error: pass '{pass_name}' refused: the model is already quantized (ConvInteger x")
    assert not (tmp_path / "o").exists()
