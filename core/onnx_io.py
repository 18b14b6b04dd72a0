"""The edges of the IR: loading, saving and running ONNX models, and atomic writes.

There is no loader here: a model a user gives is read by the importer (edgec.pipeline.importer.load_onnx_file /
load_onnx_bytes), which refuses anything it cannot trust. Every file written goes through `atomic_write`.
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import onnx

from edgec.core.errors import EdgecError

log = logging.getLogger(__name__)

_NP_FROM_ONNX = {
    onnx.TensorProto.FLOAT: np.float32,
    onnx.TensorProto.FLOAT16: np.float16,
    onnx.TensorProto.DOUBLE: np.float64,
    onnx.TensorProto.INT64: np.int64,
    onnx.TensorProto.INT32: np.int32,
    onnx.TensorProto.INT8: np.int8,
    onnx.TensorProto.UINT8: np.uint8,
    onnx.TensorProto.BOOL: np.bool_,
}


def np_dtype(elem_type: int):
    return _NP_FROM_ONNX.get(elem_type, np.float32)


def model_bytes(model: onnx.ModelProto) -> bytes:
    """Deterministic serialization (stable field order) so identical models give identical bytes."""
    return model.SerializeToString(deterministic=True)


def save_onnx(model: onnx.ModelProto, path: str | os.PathLike) -> int:
    """Write a model atomically; models over ~1.8 GB go to external data beside it. Returns bytes written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if model.ByteSize() > 1_800_000_000:
        tmp = path.with_name(path.name + ".tmp")
        onnx.save_model(model, str(tmp), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + ".data", size_threshold=1024)
        os.replace(tmp, path)
        return path.stat().st_size + (path.parent / (path.name + ".data")).stat().st_size
    data = model_bytes(model)
    with atomic_write(path) as f:
        f.write(data)
    return len(data)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb"):
    """Write to a temporary file in the same directory, fsync, then rename over `path`."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix="." + path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def staged_dir(final: str | os.PathLike):
    """Build a directory under a temporary name beside `final`, and swap it in only when complete.

    On failure the temporary directory is removed and any previous `final` is left intact.
    """
    final = Path(final)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix="." + final.name + ".partial-"))
    except OSError as e:
        raise EdgecError(f"cannot write output directory {final}: {e.strerror or e}") from None
    try:
        yield tmp
        old = None
        if final.exists():
            old = final.with_name("." + final.name + ".old-" + tmp.name.rsplit("-", 1)[-1])
            os.replace(final, old)
        os.replace(tmp, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def check_model(model: onnx.ModelProto, *, full: bool = True) -> onnx.ModelProto:
    """ONNX checker plus strict shape inference; returns the shape-inferred model."""
    try:
        if model.ByteSize() < 1_800_000_000:
            onnx.checker.check_model(model, full_check=False)
            return onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=full, data_prop=True)
        onnx.checker.check_model(model)
        return model
    except Exception as e:  # onnx raises several unrelated types
        raise EdgecError(f"invalid ONNX model: {_first_line(e)}") from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[0][:400] if lines else type(e).__name__


def ort_session(model: onnx.ModelProto | str, *, threads: int = 1, optimize: bool = False,
                optimized_path: str | None = None, level: str | None = None):
    """An ORT CPU session. optimize=False disables all graph optimizations (for equivalence checks)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3
    levels = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }
    so.graph_optimization_level = levels[level or ("all" if optimize else "disable")]
    if optimized_path:
        so.optimized_model_filepath = str(optimized_path)
    src = model if isinstance(model, str) else model_bytes(model)
    try:
        return ort.InferenceSession(src, sess_options=so, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise EdgecError(f"ONNX Runtime cannot load the model: {_first_line(e)}") from None


def run_session(sess, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    try:
        return sess.run(None, feeds)
    except Exception as e:
        raise EdgecError(f"ONNX Runtime failed to run the model: {_first_line(e)}") from None


def graph_input_names(model: onnx.ModelProto) -> list[str]:
    inits = {i.name for i in model.graph.initializer}
    return [i.name for i in model.graph.input if i.name not in inits]
