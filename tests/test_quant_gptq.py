"""Error-compensated weight rounding (calib.gram, calib.rounding, quant option `rounding: gptq`)."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import edgec.testing.prune_models as pm
from edgec.calib.gram import GramSpec, collect_grams, input_vectors
from edgec.calib.rounding import GptqRounder, gptq_round, output_error
from edgec.core.onnx_io import ort_session
from edgec.passes.base import PassContext
from edgec.passes.quant.gptq import from_rows, gram_specs, to_rows
from edgec.passes.quant.qdq import find_layers, insert_qdq


def _conv_model(cin, cout, k, stride, pads, dil, group, spatial):
    r = np.random.default_rng(0)
    nd = len(spatial)
    w = r.standard_normal((cout, cin // group, *([k] * nd))).astype(np.float32)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, cin, *spatial])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    node = helper.make_node("Conv", ["x", "w"], ["y"], name="conv", group=group, strides=[stride] * nd,
                            pads=list(pads), dilations=[dil] * nd, kernel_shape=[k] * nd)
    g = helper.make_graph([node], "g", [x], [y], [numpy_helper.from_array(w, "w")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), w


@pytest.mark.parametrize("cin,cout,k,stride,pads,dil,group,spatial", [
    (3, 8, 3, 1, (1, 1, 1, 1), 1, 1, (9, 9)),
    (4, 6, 3, 2, (0, 1, 2, 1), 1, 2, (10, 11)),
    (6, 6, 5, 1, (2, 2, 2, 2), 1, 6, (8, 8)),      # depthwise
    (4, 4, 3, 1, (2, 2, 2, 2), 2, 1, (9, 7)),      # dilated
    (3, 5, 3, 2, (1, 1), 1, 1, (17,)),             # 1-D
])
def test_patches_reproduce_the_conv(cin, cout, k, stride, pads, dil, group, spatial):
    """W_rows @ patches equals ORT's Conv output (optimizations off) for strides, asymmetric pads, dilation, groups
    and 1-D: the Gram is built on exactly the vectors the weight multiplies."""
    m, w = _conv_model(cin, cout, k, stride, pads, dil, group, spatial)
    L = find_layers(m)[0]
    spec = gram_specs(m, [L])["conv"]
    x = np.random.default_rng(1).standard_normal((1, cin, *spatial)).astype(np.float32)
    y = ort_session(m, optimize=False).run(None, {"x": x})[0]
    v = input_vectors(x, spec)                                  # [g, d, n]
    got = np.matmul(to_rows(w, L), v).reshape(cout, -1)        # [g, r, n] -> [O, n]
    np.testing.assert_allclose(got, y.reshape(cout, -1), rtol=1e-5, atol=1e-4)
    assert np.array_equal(from_rows(to_rows(w, L), L, w.shape), w)


def test_gptq_lowers_output_error_and_is_nearest_on_white_inputs():
    """On correlated inputs GPTQ's output error (e^T H e) is below round-to-nearest's at every bit width; on white
    inputs (H = c I) it is round-to-nearest exactly; codes stay in [-qmax, qmax]."""
    r = np.random.default_rng(0)
    g, rows, d, n = 2, 16, 24, 400
    mix = r.standard_normal((g, d, d))
    x = np.matmul(mix, r.standard_normal((g, d, n)))           # correlated inputs
    h = np.matmul(x, x.transpose(0, 2, 1))
    w = r.standard_normal((g, rows, d))
    for qmax in (127, 7, 3):
        s = np.abs(w).max(-1) / qmax
        near = np.clip(np.round(w / s[..., None]), -qmax, qmax)
        q = gptq_round(w, s, h, qmax)
        assert np.abs(q).max() <= qmax
        e_near = output_error(w, near * s[..., None], h)
        e_gptq = output_error(w, q * s[..., None], h)
        assert e_gptq < 0.9 * e_near, (qmax, e_gptq, e_near)
        white = np.broadcast_to(np.eye(d) * 5.0, (g, d, d))
        assert np.array_equal(gptq_round(w, s, white, qmax, damp=0.0), near)


def test_rounder_memoises():
    r = np.random.default_rng(0)
    w, h = r.standard_normal((1, 4, 8)), np.eye(8)[None] * 2.0
    rd = GptqRounder({"L": h})
    s = np.abs(w).max(-1) / 127
    a = rd.round("L", w, s, 127)
    assert rd.round("L", w, s, 127) is a and "L" in rd and "M" not in rd
    assert rd.round("L", w, s, 7) is not a


def test_insert_qdq_gptq_weights_track_the_float_model_closer():
    """The chain test net (convs and a Gemm) with int4 weights only: rounding with the layers' input Grams (fit samples) gives outputs closer
    to the float model on those samples than round-to-nearest, with the same scales (only the integers differ)."""
    m = pm.chain()
    layers = find_layers(m)
    rng = np.random.default_rng(4)
    feeds = [{"input": rng.standard_normal((1, 3, 8, 8)).astype(np.float32)} for _ in range(32)]
    rounder = GptqRounder(collect_grams(m, gram_specs(m, layers), iter(feeds)))
    assert len(rounder) == len(layers)
    bits = {L.name: 4 for L in layers}
    ref = ort_session(m, optimize=False)
    errs = {}
    for name, rd in (("nearest", None), ("gptq", rounder)):
        qm, info = insert_qdq(m, bits, {}, weight_only=True, layers=layers, rounder=rd, bias_correction=False)
        onnx.checker.check_model(qm)
        assert {v["rounding"] for v in info["layers"].values()} == {name}
        s = ort_session(qm, optimize=False)
        errs[name] = float(np.mean([np.sum((s.run(None, f)[0] - ref.run(None, f)[0]) ** 2) for f in feeds]))
    assert errs["gptq"] < 0.8 * errs["nearest"], errs


def test_quant_pass_rounding_option(tmp_path):
    """`rounding: gptq` through the pass: stats name the method and the layers, the model runs and checks."""
    from edgec.passes.base import get_pass, make_options

    m = pm.chain()
    rng = np.random.default_rng(5)
    feeds = [{"input": rng.standard_normal((1, 3, 8, 8)).astype(np.float32)} for _ in range(16)]
    ctx = PassContext(calib_batches=lambda: iter(feeds), reference_model=m, cache_dir=str(tmp_path))
    spec = get_pass("quant")
    res = spec.fn(m, ctx, make_options(spec, {"rounding": "gptq", "rounding_samples": 8, "calib_samples": 16}))
    onnx.checker.check_model(res.model)
    assert res.stats["rounding"]["method"] == "gptq" and res.stats["rounding"]["samples"] == 8
    assert res.stats["rounding"]["layers"] == len(find_layers(m))
    from edgec.core.errors import EdgecError

    with pytest.raises(EdgecError, match="rounding must be nearest or gptq"):
        make_options(spec, {"rounding": "adaround"})


def test_gram_spec_rows_for_gemm():
    spec = GramSpec("x", "rows")
    x = np.arange(12, dtype=np.float32).reshape(1, 3, 4)
    v = input_vectors(x, spec)
    assert v.shape == (1, 4, 3) and np.array_equal(v[0], x[0].T)
