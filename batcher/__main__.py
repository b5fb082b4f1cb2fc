"""`python -m batcher` == the `batcher` command."""

from batcher.cli import entry

entry()
