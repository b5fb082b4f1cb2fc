"""`python -m batcher` == the `batcher` command."""

from batcher.command import entry

entry()
