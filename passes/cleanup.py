"""Cleanup passes, delegated to well-kept libraries: onnxslim (constant folding, exact fusions such as Pad into
Conv), onnxscript's rewriter (BatchNorm folding, Dropout) and onnx_ir's common passes (Identity, dead nodes).

All are exact: outputs must match their input within 1e-4 relative (checked by the runner).
  fold_constants   f(consts) -> const: evaluate subgraphs whose inputs are all constant (onnxslim + onnxscript)
  fold_batchnorm   W' = W * gamma / sqrt(var + eps), b' = (b - mean) * gamma / sqrt(var + eps) + beta
  remove_identity  Identity(x) -> x; Dropout(x, training=False) -> x
  eliminate_dead   drop nodes whose outputs reach no graph output
  infer_shapes     annotate value_info with ONNX shape inference
  cleanup          all of the above, in that order; on an already-quantized model only the bit-exact steps
                   (Identity/Dropout removal, dead nodes): see `cleanup`
"""
from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass

import onnx

from edgec.core.graph import walk_nodes
from edgec.passes.base import PassContext, PassResult, register_pass

log = logging.getLogger(__name__)


def _ir():
    import onnx_ir as ir

    return ir


def _to_ir(model: onnx.ModelProto):
    return _ir().serde.deserialize_model(model)


def _to_proto(irm) -> onnx.ModelProto:
    return _ir().serde.serialize_model(irm)


def _ops(model: onnx.ModelProto) -> Counter:
    return Counter(n.op_type for n in model.graph.node)


def _delta(before: Counter, after: Counter) -> dict:
    return {op: after.get(op, 0) - before.get(op, 0) for op in sorted(set(before) | set(after))
            if after.get(op, 0) != before.get(op, 0)}


def _result(before: onnx.ModelProto, after: onnx.ModelProto, **extra) -> PassResult:
    b, a = _ops(before), _ops(after)
    stats = {"nodes_before": sum(b.values()), "nodes_after": sum(a.values()), "op_delta": _delta(b, a), **extra}
    return PassResult(after, modified=stats["nodes_before"] != stats["nodes_after"] or bool(stats["op_delta"]), stats=stats)


def _lift_and_fold(irm):
    from onnx_ir.passes.common import LiftConstantsToInitializersPass
    from onnxscript.optimizer import fold_constants

    LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(irm)
    fold_constants(irm, onnx_shape_inference=False, input_size_limit=1 << 22, output_size_limit=1 << 24)
    LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(irm)


def _dead(irm):
    from onnx_ir.passes.common import RemoveUnusedNodesPass, TopologicalSortPass

    RemoveUnusedNodesPass()(irm)
    TopologicalSortPass()(irm)


def _identity(irm):
    from onnx_ir.passes.common import IdentityEliminationPass
    from onnxscript.rewriter import rewrite
    from onnxscript.rewriter.rules.common import dropout_inference_rule, dropout_zero_rule

    rewrite(irm, [dropout_inference_rule, dropout_zero_rule])
    IdentityEliminationPass()(irm)


def _bn(irm):
    from onnxscript.rewriter import rewrite
    from onnxscript.rewriter.rules.common import (
        fuse_batchnorm_into_conv_rule,
        fuse_batchnorm_into_conv_transpose_rule,
        fuse_batchnorm_into_gemm_rule,
    )

    rewrite(irm, [fuse_batchnorm_into_conv_rule, fuse_batchnorm_into_conv_transpose_rule, fuse_batchnorm_into_gemm_rule])


def _slim(model: onnx.ModelProto) -> onnx.ModelProto:
    """onnxslim's constant folding and exact fusions (it folds shape arithmetic onnxscript leaves, e.g. ConstantOfShape)."""
    import onnxslim

    out = onnxslim.slim(model)
    return out if out is not None else model


def _apply(model: onnx.ModelProto, *steps) -> onnx.ModelProto:
    if _lift_and_fold in steps:
        model = _slim(model)
    irm = _to_ir(model)
    for s in steps:
        s(irm)
    out = _to_proto(irm)
    return out


def _bn_left(out: onnx.ModelProto, res: PassResult) -> None:
    left = sum(1 for n in out.graph.node if n.op_type == "BatchNormalization")
    res.stats["batchnorm_left"] = left
    if left:
        res.stats["batchnorm_left_reason"] = "not preceded by a single-consumer Conv/ConvTranspose/Gemm with constant weights"


def _step_pass(name: str, rule: str, steps: tuple, after=None) -> None:
    """Register a single-purpose exact pass that applies `steps` (the cleanup pass runs them all together)."""

    def fn(model: onnx.ModelProto, ctx: PassContext, opts) -> PassResult:
        out = _apply(model, *steps)
        res = _result(model, out)
        if after is not None:
            after(out, res)
        return res

    fn.__name__ = fn.__qualname__ = name
    fn.__doc__ = rule
    register_pass(name, exact=True)(fn)


for _name, _rule, _steps, _after in (
    ("fold_constants", "f(consts) -> const: evaluate constant subgraphs (onnxslim, then onnxscript); Constant nodes "
     "become initializers.", (_lift_and_fold, _dead), None),
    ("fold_batchnorm", "W' = W * gamma / sqrt(var + eps), b' = (b - mean) * gamma / sqrt(var + eps) + beta "
     "(onnxscript rules).", (_lift_and_fold, _bn, _dead), _bn_left),
    ("remove_identity", "Identity(x) -> x and Dropout(x, training=False) -> x.", (_identity, _dead), None),
    ("eliminate_dead", "Remove nodes none of whose outputs reach a graph output; topologically sort.", (_dead,), None),
):
    _step_pass(_name, _rule, _steps, _after)


@register_pass("infer_shapes", exact=True)
def infer_shapes(model: onnx.ModelProto, ctx: PassContext, opts) -> PassResult:
    """value_info := ONNX shape inference (data propagation on)."""
    del model.graph.value_info[:]
    out = onnx.shape_inference.infer_shapes(model, data_prop=True)
    return PassResult(out, modified=True, stats={"value_infos": len(out.graph.value_info)})


# Ops that mean the model was quantized by another tool (ORT quantize_dynamic/static, TF/TFLite converters, NNCF,
# PyTorch QAT export). Found anywhere, subgraphs included.
QUANTIZED_OPS = frozenset({
    "ConvInteger", "MatMulInteger", "DynamicQuantizeLinear", "QuantizeLinear", "DequantizeLinear",
    "QLinearConv", "QLinearMatMul", "QLinearAdd", "QLinearMul", "QLinearSigmoid", "QLinearLeakyRelu",
    "QLinearGlobalAveragePool", "QLinearAveragePool", "QLinearConcat", "QLinearSoftmax", "QLinearReduceMean",
    "QGemm", "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "DynamicQuantizeLSTM", "MatMulNBits", "QAttention",
})


def quantized_ops(model: onnx.ModelProto) -> dict[str, int]:
    """{op: count} of quantization ops anywhere in the model (main graph and subgraphs); empty for a float model."""
    found = Counter(n.op_type for n in walk_nodes(model.graph) if n.op_type in QUANTIZED_OPS)
    return dict(sorted(found.items()))


def describe_quantized(found: dict[str, int]) -> str:
    return ", ".join(f"{op} x{k}" for op, k in found.items())


@dataclass(frozen=True)
class CleanupOptions:
    fold_constants: bool = True
    fold_batchnorm: bool = True
    remove_identity: bool = True


@register_pass("cleanup", options=CleanupOptions, exact=True)
def cleanup(model: onnx.ModelProto, ctx: PassContext, opts: CleanupOptions) -> PassResult:
    """fold constants, fold BatchNorm (W' = W*gamma/sqrt(var+eps)), remove Identity/Dropout, drop dead nodes, infer shapes.

    An already-quantized model (see QUANTIZED_OPS) gets only the bit-exact steps (Identity/Dropout removal, dead
    nodes): folding reorders fp32 arithmetic, and the last-bit change in front of a DynamicQuantizeLinear or
    QuantizeLinear can flip a uint8 code -- one quantization step, far more than rounding noise (and a different
    argmax or decoded length downstream). Bit-identical inputs to every quantizer keep the model exact."""
    found = quantized_ops(model)
    if found:
        out = _apply(model, *([_identity] if opts.remove_identity else []), _dead)
        del out.graph.value_info[:]
        out = onnx.shape_inference.infer_shapes(out, data_prop=True)
        res = _result(model, out)
        res.stats["already_quantized"] = found
        res.stats["folding_skipped"] = ("already quantized by another tool (" + describe_quantized(found) + "): "
                                        "constant/BatchNorm folding skipped so every quantizer sees bit-identical inputs")
        return res
    steps = []
    if opts.fold_constants:
        steps.append(_lift_and_fold)
    if opts.fold_batchnorm:
        steps.append(_bn)
    if opts.remove_identity:
        steps.append(_identity)
    steps.append(_dead)
    if opts.fold_constants:
        steps += [_lift_and_fold, _dead]
    out = _apply(model, *steps)
    del out.graph.value_info[:]
    out = onnx.shape_inference.infer_shapes(out, data_prop=True)
    res = _result(model, out)
    res.stats["batchnorm_left"] = sum(1 for n in out.graph.node if n.op_type == "BatchNormalization")
    return res
