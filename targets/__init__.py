"""Backends: one module per target. Each builds, runs and benchmarks, and supplies its quantization dialect."""
from edgec.targets.base import BuildContext, get_target, list_targets  # noqa: F401
