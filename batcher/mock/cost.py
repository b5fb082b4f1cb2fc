"""What the server charges a request at admission, and reports as `usage.prompt_tokens`.

Azure counts a request at admission: its prompt estimate plus the output ceiling. The prompt
rule (text, images, tool definitions) is batcher's own, imported from `batcher.tokens` and never
written again here: the bundled server must charge exactly what batcher's admission expects, so
a job at the limits stays free of 429s, and a test of one rule covers both sides.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from batcher.models import DEFAULT_ASSUMED_MAX_TOKENS
from batcher.tokens import count_prompt_tokens


def prompt_tokens(body: Mapping[str, Any], image_count_as: str = "billing") -> int:
    """Prompt tokens of a validated request, as `usage.prompt_tokens` reports them: messages,
    images (a remote URL, never fetched, at the worst case for its detail) and tools."""
    # ISSUE 13 CALL SITE (the one line to change): batcher.tokens' request counter with images
    # and tools is not committed yet; until it is, images and tools are charged nothing here.
    return count_prompt_tokens(body["messages"], body["model"])


def admission_cost(body: Mapping[str, Any], prompt_tokens: int) -> int:
    """What Azure charges at admission: the prompt estimate plus the output ceiling."""
    out = body.get("max_completion_tokens") or body.get("max_tokens") or DEFAULT_ASSUMED_MAX_TOKENS
    return prompt_tokens + out
