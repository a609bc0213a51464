"""``python -m kelib ...``: the same command line as the ``kelib`` script."""

import sys

from kelib.cli import main

sys.exit(main())
