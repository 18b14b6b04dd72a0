"""`python -m edgec` is the CLI (the same as the `edgec` command and `python -m pipeline` in a checkout)."""
import sys

from edgec.pipeline.cli import main

sys.exit(main())
