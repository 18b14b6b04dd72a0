"""torch -> ONNX export (opset >= 17, named input/output, optional dynamic batch), verified numerically.

The export is accepted only if max|ort - torch| / max|torch| <= 1e-4 on every output.
"""
from __future__ import annotations

import io
import logging
import warnings

import numpy as np
import onnx

from pipeline.errors import EdgecError
from pipeline.onnx_io import ort_session, run_session

log = logging.getLogger(__name__)

EXPORT_RTOL = 1e-4


def rel_err(a: np.ndarray, ref: np.ndarray) -> float:
    """max|a - ref| / max(max|ref|, 1e-12)."""
    a = np.asarray(a, np.float64)
    ref = np.asarray(ref, np.float64)
    if a.shape != ref.shape:
        return float("inf")
    denom = max(float(np.abs(ref).max()) if ref.size else 0.0, 1e-12)
    return float(np.abs(a - ref).max() / denom) if ref.size else 0.0


def export_torch(module, input_shape: tuple[int, ...], *, opset: int = 17, input_name: str = "input",
                 output_name: str = "output", dynamic_batch: bool = False, seed: int = 0,
                 sample: np.ndarray | None = None) -> tuple[onnx.ModelProto, dict]:
    import torch

    if opset < 17:
        raise EdgecError(f"export opset must be >= 17 (got {opset})")
    module = module.eval()
    gen = torch.Generator().manual_seed(seed)
    x = torch.from_numpy(sample) if sample is not None else torch.randn(*input_shape, generator=gen)
    buf = io.BytesIO()
    dyn = {input_name: {0: "batch"}, output_name: {0: "batch"}} if dynamic_batch else None
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(module, (x,), buf, opset_version=opset, input_names=[input_name],
                              output_names=[output_name], dynamic_axes=dyn, do_constant_folding=False,
                              dynamo=False)
        except Exception as e:
            raise EdgecError(f"torch.onnx.export failed: {str(e).strip().splitlines()[0][:300]}") from None
        ref = module(x)
    model = onnx.load_from_string(buf.getvalue())
    refs = [ref] if isinstance(ref, torch.Tensor) else list(ref)
    refs = [r.detach().numpy() for r in refs]
    outs = run_session(ort_session(model, optimize=False), {input_name: x.numpy()})
    errs = {o.name: rel_err(a, r) for o, a, r in zip(model.graph.output, outs, refs)}
    worst = max(errs, key=errs.get)
    if errs[worst] > EXPORT_RTOL:
        raise EdgecError(f"export does not match torch: output '{worst}' relative error {errs[worst]:.2e} > {EXPORT_RTOL:g}")
    log.info("exported to ONNX opset %d; worst relative error vs torch %.2e", opset, errs[worst])
    return model, {"opset": opset, "max_rel_err_vs_torch": errs[worst], "per_output_rel_err": errs}
