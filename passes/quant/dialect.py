"""The quantization dialect a target hands to the quantizer (policy); the Q/DQ pass is the mechanism.

ORT_CPU:  activations uint8 asymmetric per-tensor; weights int8 symmetric per-channel (zero-point 0).
          Layers kept fp32 read a per-channel DequantizeLinear so ORT cannot re-quantize them per-tensor.
TENSORRT: activations int8 symmetric per-tensor (zero-point 0); weights int8 symmetric per-channel;
          Q/DQ on residual Add inputs so TensorRT can fuse; int4 weight-only (block-wise) on Gemm/MatMul only.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class QuantDialect:
    name: str
    activation_dtype: str = "uint8"          # "uint8" | "int8"
    activation_symmetric: bool = False
    weight_dtype: str = "int8"
    weight_per_channel: bool = True
    weight_symmetric: bool = True
    int4_ops: tuple[str, ...] = ("Gemm", "MatMul")  # ops allowed int4 weight-only
    int4_block_size: int = 32
    int4_conv: bool = False                   # int4 weight-only on Conv (size only on ORT CPU)
    qdq_on_residual_add: bool = False
    allowed_bits: tuple[int, ...] = (32, 16, 8, 4)
    opset: int = 21
    channel_align: int = 8
    # ORT CPU's WeightBiasQuantization quantizes the float weights of any Conv/Gemm fed by a per-tensor
    # DequantizeLinear (per-tensor, silently). Layers kept fp32 then read a per-channel DQ (equal scales) instead.
    guard_fp32_layers: bool = False
    int32_bias: bool = True                   # w8a8 bias as int32 DequantizeLinear (ORT); float bias for TensorRT
    # Q/DQ on a graph output written by an int8 layer (the DQ keeps the output's name) so the layer itself runs
    # as an integer kernel (QLinearConv -> DequantizeLinear) instead of staying fp32; costs one 8-bit rounding
    # of that output. Set per run by the quant pass option `quantize_outputs`. Rank-2 ([N, C]) outputs are exempt.
    quantize_graph_outputs: bool = False
    # 8-bit weights on 7 bits ([-63, 63], scale max|w| / 63): x86 CPUs without VNNI multiply u8 activations by s8
    # weights with vpmaddubsw, which adds pairs of products in int16 and saturates (255 * 127 * 2 > 32767); ORT's
    # int8 kernels then drift from the Q/DQ math (measured: a segmentation output's cosine 0.97 vs 0.9995 for the
    # same Q/DQ model unoptimized). With 7-bit weights a pair fits (255 * 63 * 2 < 32767). The ORT target sets it
    # from the CPU it builds for (targets/ort.py).
    weight_reduce_range: bool = False

    def __post_init__(self):
        if self.activation_dtype not in ("uint8", "int8"):
            raise ValueError(f"activation_dtype must be uint8 or int8, got {self.activation_dtype}")
        if self.activation_dtype == "uint8" and self.activation_symmetric:
            raise ValueError("uint8 activations are asymmetric")
        if self.int4_block_size <= 0 or self.int4_block_size % 2:
            raise ValueError("int4_block_size must be a positive even number")


ORT_CPU = QuantDialect(name="ort_cpu", activation_dtype="uint8", activation_symmetric=False,
                       int4_conv=True, allowed_bits=(32, 8, 4, 3, 2), opset=21, channel_align=8,
                       guard_fp32_layers=True)
TENSORRT = QuantDialect(name="tensorrt", activation_dtype="int8", activation_symmetric=True,
                        int4_conv=False, qdq_on_residual_add=True, allowed_bits=(32, 16, 8, 4), int32_bias=False,
                        opset=21, channel_align=8)
