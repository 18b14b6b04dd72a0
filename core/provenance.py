"""Provenance: the edgec version, tool versions and file hashes recorded in reports, manifests and bundles."""
from __future__ import annotations

import hashlib
import platform
from pathlib import Path

EDGEC_VERSION = "0.1.0"


def tool_versions() -> dict:
    import numpy
    import onnx
    import onnxruntime

    v = {"edgec": EDGEC_VERSION, "python": platform.python_version(), "onnx": onnx.__version__,
         "onnxruntime": onnxruntime.__version__, "numpy": numpy.__version__}
    try:
        import torch

        v["torch"] = torch.__version__
    except ImportError:
        pass
    try:
        import onnxscript

        v["onnxscript"] = onnxscript.__version__
    except ImportError:
        pass
    return v


def sha256_file(p: Path) -> str:
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
