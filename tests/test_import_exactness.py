"""Exactness that knows fp32 rounding: the gate is min(max(1e-4, 8 x noise), 1e-2), noise measured per model.

A deep real export whose BatchNorm folding drifts ~3e-4 relative (over the old fixed 1e-4) passes; a wrong fold
(the BatchNorm mean not subtracted) still fails naming the pass."""
from dataclasses import replace

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import edgec.passes.base as pb
from edgec.core.errors import PassFailed
from edgec.core.onnx_io import ort_session, run_session
from edgec.pipeline.exactness import EXACT_CAP, EXACT_RTOL, NOISE_K, exact_tolerance, noise_floor
from edgec.pipeline.recipe import load_recipe
from edgec.pipeline.runner import run_recipe

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def deep():
    from edgec.testing.real_exports import deep_bn_export

    m = onnx.load(str(deep_bn_export().path))
    feeds = [{"x": np.random.default_rng(i).standard_normal((1, 3, 32, 32)).astype(np.float32)} for i in range(4)]
    return m, feeds


def test_tolerance_formula():
    assert exact_tolerance(0.0) == EXACT_RTOL == 1e-4
    assert exact_tolerance(1e-6) == 1e-4
    assert exact_tolerance(1e-4) == pytest.approx(NOISE_K * 1e-4)
    assert exact_tolerance(1.0) == EXACT_CAP


def test_deep_bn_fold_drift_is_rounding_and_passes(deep):
    m, feeds = deep
    ref = [run_session(ort_session(m), f) for f in feeds]
    noise = noise_floor(m, feeds, ref)
    assert noise > 1e-5  # a deep model: ORT's own rewrites drift measurably
    res = run_recipe(m, load_recipe("cleanup"), pb.PassContext(calib_batches=lambda: iter(feeds)))
    st = res.stages[-1]
    assert st.name == "cleanup" and st.stats["batchnorm_left"] == 0
    assert st.error_vs_previous > EXACT_RTOL  # the old fixed gate would have called this correct fold broken
    assert st.error_vs_previous <= st.stats["exact_tolerance"] == pytest.approx(exact_tolerance(noise))


def _wrong_fold(model, ctx, opts):
    """Fold the first Conv -> BatchNormalization pair, forgetting to subtract the running mean."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    inits = {t.name: t for t in g.initializer}
    arr = lambda n: numpy_helper.to_array(inits[n]).astype(np.float64)  # noqa: E731
    prod = {o: n for n in g.node for o in n.output}
    for bn in g.node:
        conv = prod.get(bn.input[0])
        if bn.op_type == "BatchNormalization" and conv is not None and conv.op_type == "Conv" and len(conv.input) > 2:
            gamma, beta, mean, var = (arr(bn.input[k]) for k in range(1, 5))
            s = gamma / np.sqrt(var + 1e-5)
            w, b = arr(conv.input[1]), arr(conv.input[2])
            inits[conv.input[1]].CopyFrom(numpy_helper.from_array((w * s[:, None, None, None]).astype(np.float32), conv.input[1]))
            inits[conv.input[2]].CopyFrom(numpy_helper.from_array((b * s + beta).astype(np.float32), conv.input[2]))  # no - mean*s
            for n in g.node:
                for k, i in enumerate(n.input):
                    if i == bn.output[0]:
                        n.input[k] = conv.output[0]
            g.node.remove(bn)
            return pb.PassResult(out, True, {})
    raise AssertionError("no Conv -> BatchNormalization pair")


def test_wrong_fold_still_fails_naming_the_pass(deep, monkeypatch):
    m, feeds = deep
    spec = pb.get_pass("cleanup")
    monkeypatch.setitem(pb._REGISTRY, "cleanup", replace(spec, fn=_wrong_fold))
    with pytest.raises(PassFailed) as e:
        run_recipe(m, load_recipe("cleanup"), pb.PassContext(calib_batches=lambda: iter(feeds)))
    msg = str(e.value)
    assert "pass 'cleanup'" in msg and "declared exact" in msg and "fp32 noise" in msg
