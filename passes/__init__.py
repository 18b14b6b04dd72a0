"""ONNX -> ONNX transforms. Each pass returns PassResult(model, stats) and knows nothing about targets."""
from edgec.passes.base import PassContext, PassResult, get_pass, list_passes, register_pass  # noqa: F401
