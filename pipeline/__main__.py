import sys

from edgec.pipeline.cli import main

sys.exit(main())
