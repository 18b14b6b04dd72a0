import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture
def run_cli(tmp_path):
    """Run `python -m edgec ...` (the installed CLI) in a subprocess; returns CompletedProcess."""
    import subprocess

    def _run(*args, timeout=600, cwd=None):
        return subprocess.run([sys.executable, "-m", "edgec", *map(str, args)], capture_output=True, text=True,
                              cwd=cwd or ROOT, timeout=timeout)

    return _run
