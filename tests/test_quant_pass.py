"""The `quant` pass end to end on small graphs: budgets, cache, Pareto PNG, fidelity floor, kernel check."""
from __future__ import annotations

import os

import numpy as np
import onnx
import pytest

import edgec.testing.prune_models as pm
from edgec.passes.base import PassContext, get_pass, make_options
from edgec.passes.quant.qdq import find_layers
from edgec.passes.quant.quant_pass import QuantOptions, quantize
from edgec.core.errors import EdgecError
from edgec.core.onnx_io import ort_session
from edgec.targets.ort_latency import OrtLatencyProbe


def _ctx(m, tmp_path, probe=None, n=24):
    r = np.random.default_rng(0)
    shape = [d.dim_value for d in m.graph.input[0].type.tensor_type.shape.dim]
    feeds = [{"input": r.standard_normal(shape).astype(np.float32)} for _ in range(n)]
    return PassContext(calib_batches=lambda: iter(feeds), reference_model=m, cache_dir=str(tmp_path / "cache"),
                       target_probe=probe)


def _agree(a, b, feeds):
    sa, sb = ort_session(a, optimize=True), ort_session(b, optimize=True)
    return np.mean([sa.run(None, f)[0].argmax() == sb.run(None, f)[0].argmax() for f in feeds])


def test_default_all_int8_with_kernel_check(tmp_path):
    m = pm.residual()
    probe = OrtLatencyProbe(1, str(tmp_path / "cache"), runs=5)
    r = quantize(m, _ctx(m, tmp_path, probe), calib_samples=16)
    st = r.stats
    assert set(st["bits"].values()) == {8}
    assert all(v.startswith("int8") for v in st["effective_precision"].values())
    assert st["op_counts"]["QuantizeLinear"] > 0


def test_bits_per_weight_budget_and_cache(tmp_path):
    m = pm.flatten_gemm()
    ctx = _ctx(m, tmp_path)
    r = quantize(m, ctx, target_bits_per_weight=5.0, calib_samples=16, sensitivity_samples=8, pareto_points=6)
    st = r.stats
    assert st["bits_per_weight"] <= 5.0 + 1e-9
    assert st["solution"]["cost"] <= st["solution"]["budget"] + 1e-6
    assert len(st["pareto"]) >= 2 and os.path.isfile(st["pareto_png"])
    sens_dir = tmp_path / "cache" / "quant_sensitivity"
    assert len(list(sens_dir.glob("*.json"))) == 1
    r2 = quantize(m, ctx, target_bits_per_weight=5.0, calib_samples=16, sensitivity_samples=8, pareto_points=6)
    assert r2.stats["bits"] == st["bits"] and r2.stats["sensitivities"] == st["sensitivities"]
    assert len(list(sens_dir.glob("*.json"))) == 1  # cache hit, nothing new
    # more bits allowed -> no worse predicted sensitivity
    r3 = quantize(m, ctx, target_bits_per_weight=8.5, calib_samples=16, sensitivity_samples=8, pareto_points=4)
    assert r3.stats["solution"]["objective"] <= st["solution"]["objective"] + 1e-12


def test_size_budget_in_bytes(tmp_path):
    m = pm.chain()
    total = sum(np.prod(i.dims) * 4 for i in m.graph.initializer)
    r = quantize(m, _ctx(m, tmp_path), target_size_bytes=int(total / 5), calib_samples=16, sensitivity_samples=8,
                 pareto_points=4)
    assert r.stats["solution"]["cost"] / 8 <= total / 5 + 1e-6


def test_latency_budget_without_probe_says_proxy(tmp_path):
    m = pm.chain()
    r = quantize(m, _ctx(m, tmp_path), target_speedup=1.5, calib_samples=16, sensitivity_samples=8, pareto_points=4)
    assert r.stats["latency_source"].startswith("mac_proxy")
    assert set(r.stats["bits"].values()) <= {8, 32}


def test_latency_budget_with_probe(tmp_path):
    m = pm.chain()
    probe = OrtLatencyProbe(1, str(tmp_path / "cache"), runs=5)
    r = quantize(m, _ctx(m, tmp_path, probe), target_speedup=1.2, calib_samples=16, sensitivity_samples=8,
                 pareto_points=4, latency_iterations=1)
    st = r.stats
    assert st["latency_source"] == "ort_measured"
    assert set(st["latency_model"]["table_ms"]) == set(st["bits"])
    assert list((tmp_path / "cache" / "ort_latency").glob("*.json"))


def test_fidelity_floor_never_violated(tmp_path):
    m = pm.depthwise()
    ctx = _ctx(m, tmp_path)
    r = quantize(m, ctx, target_bits_per_weight=2.5, calib_samples=16, sensitivity_samples=8,
                 min_top1_agreement=1.0, floor_samples=24, pareto_points=3)
    fl = r.stats["floor"]
    assert fl["met"]
    feeds = list(ctx.calib_batches())
    assert _agree(r.model, m, feeds) >= 1.0
    if fl["promotions"]:
        assert fl["budget_met"] is False and "cannot both be met" in fl["note"]


def test_options_validation_and_recipe():
    with pytest.raises(ValueError):
        QuantOptions(target_size_bytes=10, target_speedup=2.0)
    with pytest.raises(ValueError):
        QuantOptions(calibration="magic")
    spec = get_pass("quant")
    with pytest.raises(EdgecError):
        make_options(spec, {"target_bitz": 3})
    from edgec.pipeline.recipe import load_recipe

    rec = load_recipe("quant", ["quant.target_bits_per_weight=4.5", "quant.calibration=entropy"])
    opts = rec.steps[-1].options
    assert opts.target_bits_per_weight == 4.5 and opts.calibration == "entropy"
    assert [s.name for s in rec.steps] == ["normalize", "cleanup", "quant"]


def test_tensorrt_dialect_through_the_pass(tmp_path):
    """TensorRT dialect: fp16 / int8 / int4 (Gemm, MatMul only) under a size budget; rules hold on the result."""
    from dataclasses import replace

    from edgec.passes.quant.dialect import TENSORRT
    from tests.test_quant_qdq import trt_rule_violations

    m = pm.reshape_gemm()
    ctx = replace(_ctx(m, tmp_path), quant_dialect=TENSORRT)
    r = quantize(m, ctx, target_bits_per_weight=7.0, bits=(32, 16, 8, 4), calib_samples=16, sensitivity_samples=8,
                 pareto_points=4)
    st = r.stats
    assert st["dialect"] == "tensorrt" and st["bits_per_weight"] <= 7.0 + 1e-9
    conv = [k for k in st["bits"] if "conv" in k.lower()]
    assert conv and all(st["bits"][k] in (32, 16, 8) for k in conv)  # no int4 Conv on TensorRT
    assert trt_rule_violations(r.model) == []
    f = list(ctx.calib_batches())[:4]
    for a, b in zip([ort_session(r.model).run(None, x)[0] for x in f], [ort_session(m).run(None, x)[0] for x in f]):
        assert np.abs(a - b).max() / np.abs(b).max() < 0.5  # int4 on a random 128x12 MatMul costs ~0.3 alone


def test_layer_bits_and_keep_fp32(tmp_path):
    from edgec.passes.quant.qdq import find_layers

    m = pm.reshape_gemm()
    L = find_layers(m)
    r = quantize(m, _ctx(m, tmp_path), layer_bits={L[1].name: 4}, keep_fp32=(L[2].name,), calib_samples=8)
    assert r.stats["bits"] == {L[0].name: 8, L[1].name: 4, L[2].name: 32}
    with pytest.raises(ValueError):
        QuantOptions(layer_bits={"x": 5})
    with pytest.raises(EdgecError, match="unknown layer"):
        quantize(m, _ctx(m, tmp_path), layer_bits={"nope": 4}, calib_samples=8)


def test_unreachable_latency_target_keeps_the_measured_fastest(tmp_path):
    """Target unreachable -> the table's fastest mix is timed against uniform int8, interleaved; int8 wins only when
    more than 2% faster."""

    class SkewedProbe(OrtLatencyProbe):
        """Real timings, but the per-layer table claims the first layer is slower in int8 (so the mix keeps it fp32)."""

        def layer_latency_table(self, model, layers, bits):
            t = super().layer_latency_table(model, layers, bits)
            first = layers[0].name
            t[first] = {**t[first], 8: t[first][32] * 50 + 1.0}
            return t

    m = pm.chain()
    probe = SkewedProbe(1, str(tmp_path / "cache"), runs=5)
    r = quantize(m, _ctx(m, tmp_path, probe), target_speedup=1000.0, calib_samples=16, sensitivity_samples=8,
                 pareto_points=3, kernel_check=False)
    st = r.stats
    assert "below the smallest achievable" in st["budget_note"]
    fc = st["fastest_check"]
    faster = "all_int8" if fc["all_int8_ms"] < 0.98 * fc["table_mix_ms"] else "table_mix"
    assert fc["chosen"] == faster
    first = find_layers(m)[0].name
    if faster == "all_int8":
        assert set(st["bits"].values()) == {8}
    else:
        assert st["bits"][first] == 32
