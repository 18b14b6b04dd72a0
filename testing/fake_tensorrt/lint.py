"""The trtexec.sh lint for tests: targets/jetson/trtexec_lint.py (which the bundle writer also runs)."""
from __future__ import annotations

from edgec.targets.jetson.trtexec_lint import lint_bundle as lint_trtexec  # noqa: F401
from edgec.targets.jetson.trtexec_lint import trtexec_commands  # noqa: F401
