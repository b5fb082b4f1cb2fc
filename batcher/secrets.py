"""The API key: read from the variable the job file names, checked, and never shown.

A key with a line break inside (pasted over two lines, read from a file with a trailing
comment) or another control character used to reach the HTTP layer and end the run with a
traceback that could print the header. It is refused here with a message that says what is
wrong and where the key came from, never the key or any part of it.
"""

from __future__ import annotations

import os
import unicodedata

from batcher.errors import JobSpecError
from batcher.spec import Job


def resolve_api_key(job: Job) -> str:
    """The key from `endpoint.api_key_env`, checked (`check_api_key`)."""
    name = job.endpoint.api_key_env
    key = os.environ.get(name)
    if key is None or not key.strip():
        state = "is not set" if key is None else "is set but empty"
        raise JobSpecError(
            f"the environment variable {name} {state}; export it with your Langdock API "
            "key (or name another variable in endpoint.api_key_env)"
        )
    return check_api_key(key, source=f"the environment variable {name}")


def check_api_key(key: str, *, source: str) -> str:
    """The key without surrounding whitespace (a trailing newline from `$(cat keyfile)` is
    common and harmless), or a JobSpecError naming what is wrong with it, never its text."""
    key = key.strip()
    problem = key_problem(key)
    if problem is not None:
        raise JobSpecError(
            f"the API key in {source} {problem}. The key is not shown; set it again to the "
            "key alone, on one line"
        )
    return key


def key_problem(key: str) -> str | None:
    """What makes `key` unusable in an Authorization header, in words, or None."""
    if not key:
        return "is empty"
    if key.lower().startswith("bearer "):
        return "starts with 'Bearer ': batcher adds that itself"
    for ch in key:
        if ch in "\r\n":
            return "contains a line break (was it pasted over two lines?)"
        if unicodedata.category(ch).startswith("C"):
            return f"contains a control character (U+{ord(ch):04X})"
        if ch.isspace():
            return "contains a space or another blank; keys have none"
        if not ch.isascii():
            return (
                "contains a non-ASCII character (copied from a formatted document? a "
                "typographic quote or dash is a common culprit)"
            )
    return None
