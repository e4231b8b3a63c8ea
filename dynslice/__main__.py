"""``python -m dynslice``: the command line."""

import sys

from dynslice.cli import main

sys.exit(main())
