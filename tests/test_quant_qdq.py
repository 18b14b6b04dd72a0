"""Q/DQ insertion: structure per dialect, ORT equivalence (optimizations OFF), TensorRT rules, kernel check."""
from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import edgec.testing.prune_models as pm
from edgec.calib.ranges import fake_quant_weight
from edgec.calib.stats import collect_stats
from edgec.passes.quant.dialect import ORT_CPU, TENSORRT
from edgec.passes.quant.qdq import find_layers, fold_pads, insert_qdq, plan_activations
from edgec.core.errors import EdgecError
from edgec.core.onnx_io import ort_session
from edgec.targets.ort_kernels import check_kernels, effective_precision

RTOL = 1e-5
GRAPHS = {"chain": pm.chain, "chain_nobias": lambda: pm.chain(bias=False), "depthwise": pm.depthwise,
          "grouped": pm.grouped, "residual": pm.residual, "concat": pm.concat, "flatten_gemm": pm.flatten_gemm,
          "reshape_gemm": pm.reshape_gemm}


def _feeds(model, n=4, seed=0):
    r = np.random.default_rng(seed)
    shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    return [{model.graph.input[0].name: r.standard_normal(shape).astype(np.float32)} for _ in range(n)]


def _run(model, feeds, optimize=False):
    s = ort_session(model, optimize=optimize)
    return [s.run(None, f)[0] for f in feeds]


def _rel(a, b):
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))


def _quantize(model, bits, dialect=ORT_CPU, method="minmax", **kw):
    layers = find_layers(model)
    qt, _ = plan_activations(model, layers, {k: 8 for k in bits if bits[k] == 8}, dialect)
    st = collect_stats(model, qt, _feeds(model, 8, seed=1), moments_for=[L.input for L in layers])
    ranges = {t: st[t].range(method, symmetric=dialect.activation_symmetric) for t in qt}
    means = {L.input: st[L.input].moments.mean for L in layers}
    return insert_qdq(model, bits, ranges, dialect, input_means=means, **kw)


# ------------------------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("name", sorted(GRAPHS))
def test_all_fp32_is_identity(name):
    m = GRAPHS[name]()
    qm, info = _quantize(m, {})
    assert Counter(n.op_type for n in qm.graph.node) == Counter(n.op_type for n in m.graph.node)
    f = _feeds(m)
    for a, b in zip(_run(qm, f), _run(m, f)):
        assert _rel(a, b) == 0.0


@pytest.mark.parametrize("bits", [4, 3, 2])
@pytest.mark.parametrize("name", ["chain", "depthwise", "grouped", "reshape_gemm", "flatten_gemm"])
def test_weight_dequantize_equals_numpy_fake_quant(name, bits):
    """ORT (optimizations off) running DQ(int4 container) weights == the float model with numpy fake-quant weights."""
    m = GRAPHS[name]()
    layers = find_layers(m)
    sel = {L.name: bits for L in layers}
    qm, info = insert_qdq(m, sel, {}, ORT_CPU, bias_correction=False)
    ref = onnx.ModelProto()
    ref.CopyFrom(m)
    for init in ref.graph.initializer:
        for L in layers:
            if init.name == L.weight and L.name in sel:
                w = numpy_helper.to_array(init)
                blk = ORT_CPU.int4_block_size if (L.op != "Conv" and w.shape[L.reduce_axis] > ORT_CPU.int4_block_size) else None
                fq = fake_quant_weight(w, bits, axis=L.reduce_axis if blk else L.channel_axis, block=blk)
                init.CopyFrom(numpy_helper.from_array(fq, init.name))
    f = _feeds(m)
    for a, b in zip(_run(qm, f), _run(ref, f)):
        assert _rel(a, b) <= RTOL
    assert all(v["weight_dtype"] == "int4" for v in info["layers"].values())


@pytest.mark.parametrize("name", ["chain", "depthwise", "residual", "reshape_gemm"])
def test_w8_weights_match_fake_quant(name):
    """The int8 weight tensors dequantize to exactly the numpy fake-quant values (per channel, half-LSB)."""
    m = GRAPHS[name]()
    layers = find_layers(m)
    qm, info = _quantize(m, {L.name: 8 for L in layers}, bias_correction=False)
    inits = {i.name: numpy_helper.to_array(i) for i in qm.graph.initializer}
    for L in layers:
        q, s = inits[f"{L.weight}_quantized"], inits[f"{L.weight}_scale"]
        assert q.dtype == np.int8 and s.shape == (L.w_shape[L.channel_axis],)
        w = numpy_helper.to_array(next(i for i in m.graph.initializer if i.name == L.weight))
        shape = [1] * w.ndim
        shape[L.channel_axis] = -1
        deq = q.astype(np.float32) * s.reshape(shape)
        assert np.array_equal(deq, fake_quant_weight(w, 8, axis=L.channel_axis))
        assert (np.abs(deq - w) <= s.reshape(shape) / 2 * (1 + 1e-6)).all()


@pytest.mark.parametrize("name", ["chain", "depthwise", "residual", "reshape_gemm", "concat"])
def test_w8a8_ort_matches_reference_evaluator(name):
    """ORT with optimizations OFF equals ONNX's reference evaluator on the emitted Q/DQ graph."""
    from onnx.reference import ReferenceEvaluator

    m = onnx.version_converter.convert_version(GRAPHS[name](), 21)  # the reference evaluator's DQ needs >= 19
    qm, _ = _quantize(m, {L.name: 8 for L in find_layers(m)})
    onnx.checker.check_model(qm, full_check=True)
    ref = ReferenceEvaluator(qm)
    for f in _feeds(m, 2):
        a = ort_session(qm, optimize=False).run(None, f)[0]
        b = ref.run(None, f)[0]
        assert _rel(a, b) <= 1e-4


@pytest.mark.parametrize("name", sorted(GRAPHS))
def test_w8a8_close_to_float(name):
    m = GRAPHS[name]()
    qm, _ = _quantize(m, {L.name: 8 for L in find_layers(m)})
    f = _feeds(m, 4, seed=1)  # calibration samples: inside the calibrated ranges
    for a, b in zip(_run(qm, f), _run(m, f)):
        assert _rel(a, b) < 0.08


def test_pad_folding_is_exact():
    b = pm.GraphBuilder()
    pads = b.const(np.array([0, 0, 1, 2, 0, 0, 2, 1], np.int64))
    p = b.node("Pad", ["input", pads], mode="constant")[0]
    W = b.const(b.w(8, 3, 3, 3))
    y = b.node("Conv", [p, W], kernel_shape=[3, 3], pads=[0, 0, 0, 0])[0]
    m = b.build(b.head(b.act(y, "relu"), 8))
    fm, n = fold_pads(m)
    assert n == 1 and "Pad" not in {x.op_type for x in fm.graph.node}
    f = _feeds(m)
    for a, c in zip(_run(fm, f), _run(m, f)):
        assert _rel(a, c) <= RTOL


def test_nonzero_pad_value_is_not_folded():
    b = pm.GraphBuilder()
    p = b.node("Pad", ["input", b.const(np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64)), b.const(np.array(1.0, np.float32))])[0]
    y = b.node("Conv", [p, b.const(b.w(8, 3, 3, 3))], kernel_shape=[3, 3])[0]
    m = b.build(b.head(y, 8))
    _, n = fold_pads(m)
    assert n == 0


# ------------------------------------------------------------------------------------------- structure
def test_op_counts_ort_cpu_residual():
    m = pm.residual()
    layers = find_layers(m)
    qm, info = _quantize(m, {L.name: 8 for L in layers})
    ops = Counter(n.op_type for n in qm.graph.node)
    q_tensors, _ = plan_activations(m, layers, {L.name: 8 for L in layers}, ORT_CPU)
    assert ops["QuantizeLinear"] == len(q_tensors)
    n_bias = sum(1 for L in layers if L.bias)
    assert ops["DequantizeLinear"] == len(q_tensors) + len(layers) + n_bias
    acts = [i for i in qm.graph.initializer if i.name.endswith("_zero_point") and i.data_type == TensorProto.UINT8]
    assert len(acts) == len(q_tensors)  # u8 activations
    # after ORT optimization: every layer an integer kernel, the residual Adds QLinearAdd
    opt = effective_precision(qm)
    assert {v["effective"] for v in opt.values()} == {"int8"}


def test_op_counts_tensorrt_residual_and_rules():
    m = pm.residual()
    layers = find_layers(m)
    qm, _ = _quantize(m, {L.name: 8 for L in layers}, dialect=TENSORRT)
    assert trt_rule_violations(qm) == []
    # every residual Add input is dequantized (TensorRT fuses Q/DQ into the Add)
    prod = {o: n for n in qm.graph.node for o in n.output}
    adds = [n for n in qm.graph.node if n.op_type == "Add"]
    assert adds and all(prod[i].op_type == "DequantizeLinear" for n in adds for i in n.input)
    # ORT CPU dialect does not add them on the skip branch
    qo, _ = _quantize(m, {L.name: 8 for L in layers}, dialect=ORT_CPU)
    assert Counter(n.op_type for n in qm.graph.node)["QuantizeLinear"] >= Counter(n.op_type for n in qo.graph.node)["QuantizeLinear"]


def test_tensorrt_int4_only_on_gemm_matmul():
    m = pm.reshape_gemm()
    layers = find_layers(m)
    conv = [L for L in layers if L.op == "Conv"][0]
    with pytest.raises(ValueError, match="low-bit"):
        _quantize(m, {conv.name: 4}, dialect=TENSORRT)
    bits = {L.name: (4 if L.op in ("Gemm", "MatMul") else 8) for L in layers}
    qm, info = _quantize(m, bits, dialect=TENSORRT)
    assert trt_rule_violations(qm) == []
    int4 = [i.name for i in qm.graph.initializer if i.data_type == TensorProto.INT4]
    assert len(int4) == 2
    try:
        from edgec.targets.tensorrt.rules import check_graph
    except ImportError:
        return
    assert not check_graph(qm).errors


def test_rule_checker_catches_violations():
    """The helper itself can fail: an ORT-dialect graph (u8, zp != 0) breaks TensorRT rules."""
    m = pm.residual()
    qm, _ = _quantize(m, {L.name: 8 for L in find_layers(m)}, dialect=ORT_CPU)
    v = trt_rule_violations(qm)
    assert any("zero-point" in x for x in v) and any("uint8" in x for x in v)
    m2 = pm.chain()
    qc, _ = _quantize(m2, {find_layers(m2)[0].name: 4}, dialect=ORT_CPU)  # int4 Conv: allowed on ORT, not TRT
    assert any("int4" in x for x in trt_rule_violations(qc))


def trt_rule_violations(model: onnx.ModelProto) -> list[str]:
    """TensorRT explicit-quantization rules (small CPU helper): symmetric int8, zero-point 0, per-tensor
    activations, per-channel weights, int4 only feeding Gemm/MatMul."""
    inits = {i.name: i for i in model.graph.initializer}
    cons: dict[str, list] = {}
    for n in model.graph.node:
        for i in n.input:
            cons.setdefault(i, []).append(n)
    out = []
    for n in model.graph.node:
        if n.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        x_is_weight = n.op_type == "DequantizeLinear" and n.input[0] in inits
        scale = numpy_helper.to_array(inits[n.input[1]]) if n.input[1] in inits else None
        zp = inits.get(n.input[2]) if len(n.input) > 2 and n.input[2] else None
        if zp is not None:
            if numpy_helper.to_array(zp).astype(np.int64).any():
                out.append(f"{n.name}: non-zero zero-point")
            if zp.data_type == TensorProto.UINT8:
                out.append(f"{n.name}: uint8 quantization")
        if x_is_weight:
            dt = inits[n.input[0]].data_type
            if dt == TensorProto.INT4:
                users = {c.op_type for c in cons.get(n.output[0], [])}
                if not users <= {"Gemm", "MatMul"}:
                    out.append(f"{n.name}: int4 weights feed {sorted(users)}")
            elif dt == TensorProto.UINT8:
                out.append(f"{n.name}: uint8 weights")
        elif scale is not None and scale.size != 1:
            out.append(f"{n.name}: per-channel activation scale")
    return out


# ------------------------------------------------------------------------------------------- ORT specifics
def test_fp32_layer_between_int8_layers_stays_fp32():
    """ORT would silently quantize a float Conv fed by a per-tensor DQ (WeightBiasQuantization); the guard
    (per-channel DQ with equal scales) keeps it float, with identical values when optimizations are off."""
    m = pm.depthwise()
    layers = find_layers(m)
    mid = [L for L in layers if L.depthwise][0]
    bits = {L.name: 8 for L in layers if L.name != mid.name}
    qm, _ = _quantize(m, bits)
    eff = effective_precision(qm)
    assert eff[mid.name]["effective"] == "fp32" and eff[mid.name]["kernel"] in ("Conv", "FusedConv")
    assert all(eff[L]["effective"] == "int8" for L in bits)
    # Without the guard, ORT's optimizer may quantize the float layer behind our back (WeightBiasQuantization, per
    # tensor). Whether it does, and how far optimized int8 kernels drift from the unoptimized Q/DQ math, depends on
    # the ORT build and the CPU (an AVX2 machine without VNNI: it did not, and the u8s8 kernels of the other layers
    # drift by 7%), so the contract is checked on the graph the optimizer leaves: with the guard the layer is fp32
    # above, on every machine; here, the guard changes no value when optimizations are off.
    from dataclasses import replace
    unguarded, _ = _quantize(m, bits, dialect=replace(ORT_CPU, guard_fp32_layers=False))
    f = _feeds(m, 2, seed=1)
    g = max(_rel(a, b) for a, b in zip(_run(qm, f, False), _run(unguarded, f, False)))
    assert g <= RTOL  # same math when optimizations are off


def test_kernel_check_passes_and_fires_on_fallback():
    m = pm.chain()
    layers = find_layers(m)
    bits = {L.name: 8 for L in layers}
    qm, _ = _quantize(m, bits)
    eff = check_kernels(qm, bits)
    assert all(e["effective"] == "int8" and e["kernel"] in ("QLinearConv", "QGemm") for e in eff.values())
    # break one layer: feed its Conv the float activation (no Q/DQ) -> ORT cannot form QLinearConv
    bad = onnx.ModelProto()
    bad.CopyFrom(qm)
    prod = {o: n for n in bad.graph.node for o in n.output}
    victim = next(n for n in bad.graph.node if n.op_type == "Conv" and n.name == layers[1].name)
    dq = prod[victim.input[0]]
    q = prod[dq.input[0]]
    victim.input[0] = q.input[0]
    with pytest.raises(EdgecError, match=layers[1].name):
        check_kernels(bad, bits)
    # a layer claimed int8 whose weights are plain float is also caught
    with pytest.raises(EdgecError, match="kernel check"):
        check_kernels(m, bits)


def test_int4_gemm_weight_only_runs_in_ort():
    m = pm.flatten_gemm()
    layers = find_layers(m)
    bits = {L.name: 4 for L in layers if L.op == "Gemm"}
    qm, info = _quantize(m, bits)
    blk = [n for n in qm.graph.node if n.op_type == "DequantizeLinear" and any(a.name == "block_size" for a in n.attribute)]
    assert len(blk) == 1  # the 96x12 Gemm (K=96 > 32) is block-wise; the 12-wide one is per-channel
    f = _feeds(m)
    for a, b in zip(_run(qm, f, True), _run(qm, f, False)):
        assert _rel(a, b) <= 1e-4
    eff = effective_precision(qm)
    assert all(eff[L]["claimed"] == "int4" for L in bits)


def test_bad_bits_rejected():
    m = pm.chain()
    L = find_layers(m)[0]
    with pytest.raises(ValueError):
        insert_qdq(m, {L.name: 5}, {}, ORT_CPU)
    with pytest.raises(ValueError):
        insert_qdq(m, {"nope": 8}, {}, ORT_CPU)
    with pytest.raises(ValueError, match="calibration range"):
        insert_qdq(m, {L.name: 8}, {}, ORT_CPU)


def _weight_codes(qm) -> list[np.ndarray]:
    inits = {t.name: t for t in qm.graph.initializer}
    return [numpy_helper.to_array(inits[n.input[0]]) for n in qm.graph.node
            if n.op_type == "DequantizeLinear" and n.input[0] in inits and inits[n.input[0]].data_type == TensorProto.INT8
            and len(inits[n.input[0]].dims) >= 2]


@pytest.mark.parametrize("make", [pm.chain, pm.depthwise, pm.residual])
def test_reduce_range_weights_keep_int8_kernels_exact(make):
    """x86 without VNNI: 8-bit weights on 7 bits, so ORT's u8 x s8 pair sums cannot saturate int16 and its int8
    kernels compute the Q/DQ math (on every CPU: the bound holds whatever instructions run)."""
    from dataclasses import replace

    m = make()
    bits = {L.name: 8 for L in find_layers(m)}
    full, _ = _quantize(m, bits)
    reduced, _ = _quantize(m, bits, dialect=replace(ORT_CPU, weight_reduce_range=True))
    assert max(int(np.abs(q).max()) for q in _weight_codes(full)) == 127
    codes = _weight_codes(reduced)
    assert codes and max(int(np.abs(q).max()) for q in codes) == 63  # every channel scaled to max|w| / 63
    f = _feeds(m, 3, seed=2)
    assert max(_rel(a, b) for a, b in zip(_run(reduced, f, True), _run(reduced, f, False))) <= 1e-3
    assert all(e["effective"] == "int8" for e in effective_precision(reduced).values())


@pytest.mark.parametrize("flags, machine, expected", [
    ({"avx2", "fma"}, "x86_64", True),                 # AVX2 only (e.g. Zen 2/3): pairs saturate
    ({"avx2", "avx512f", "avx512_vnni"}, "x86_64", False),
    ({"avx2", "avx_vnni"}, "x86_64", False),
    ({"asimd", "asimddp"}, "aarch64", False),          # ARM accumulates in int32
])
def test_ort_target_picks_the_weight_range_from_the_cpu(flags, machine, expected):
    from edgec.targets.ort import cpu_needs_reduce_range

    assert cpu_needs_reduce_range(flags, machine) is expected
