"""torch -> ONNX export (opset >= 17, named input/output, optional dynamic batch), verified numerically.

The export is accepted only if max|ort - torch| / max|torch| <= 1e-4 on every output.
"""
from __future__ import annotations

import io
import logging
import warnings

import numpy as np
import onnx

from edgec.core.errors import EdgecError
from edgec.core.fidelity import rel_err
from edgec.core.onnx_io import ort_session, run_session

log = logging.getLogger(__name__)

EXPORT_RTOL = 1e-4


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
