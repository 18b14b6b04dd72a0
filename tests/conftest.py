import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(autouse=True)
def _restore_logging_and_bars():
    """A test that runs the CLI in process (main([...])) turns on bars and installs a stderr log handler on the root
    logger; put both back so later tests see the library defaults (silent, no handler bound to a closed capture)."""
    import logging

    from edgec.core import progress

    root, edgec_log = logging.getLogger(), logging.getLogger("edgec")
    saved = (list(root.handlers), root.level, edgec_log.level, progress._BARS)
    yield
    root.handlers[:], root.level = saved[0], saved[1]
    edgec_log.setLevel(saved[2])
    progress._BARS = saved[3]


@pytest.fixture
def run_cli(tmp_path):
    """Run `python -m edgec ...` (the installed CLI) in a subprocess; returns CompletedProcess."""
    import subprocess

    def _run(*args, timeout=600, cwd=None):
        return subprocess.run([sys.executable, "-m", "edgec", *map(str, args)], capture_output=True, text=True,
                              cwd=cwd or ROOT, timeout=timeout)

    return _run
