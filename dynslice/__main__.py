"""``python -m dynslice``: the command line."""

from dynslice.cli import entry

entry()
