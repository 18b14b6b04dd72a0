"""edgec: the edge deployment compiler.

One installed package whose subpackages keep the repository's top-level folders (mapped by `package_dir` in
pyproject.toml), layered bottom to top:

    edgec.core      errors, ONNX I/O + ORT sessions, the one fidelity comparator, provenance
    edgec.calib     data splits, streaming activations, range estimators          (imports core)
    edgec.passes    ONNX -> ONNX transforms                                        (imports core, calib)
    edgec.torchkit  optional torch side: export, torch-side scores, fine-tuning, QAT (imports core, calib, passes)
    edgec.targets   backends: ORT, TensorRT, Jetson                                (imports core, calib, passes)
    edgec.pipeline  sources, recipes, runner, compile, reports, CLI               (on top)
"""
from edgec.core.provenance import EDGEC_VERSION as __version__  # noqa: F401
