"""What the server charges a request at admission, and reports as `usage.prompt_tokens`.

Azure counts a request at admission: its prompt estimate plus the output ceiling. The prompt
rule (text, images, tool definitions) is batcher's own, imported from `batcher.tokens` and never
written again here: the bundled server must charge exactly what batcher's admission expects, so
a job at the limits stays free of 429s, and a test of one rule covers both sides.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from batcher.models import DEFAULT_ASSUMED_MAX_TOKENS
from batcher.spec import Images
from batcher.tokens import count_request_tokens

ImageCountAs = Literal["billing", "context"]


# The server never fetches a remote image: it charges the worst case for the detail level, as
# batcher does by default (`images.fetch_sizes: false`).
_IMAGES = {count_as: Images(count_as=count_as) for count_as in ("billing", "context")}


def prompt_tokens(body: Mapping[str, Any], image_count_as: ImageCountAs = "billing") -> int:
    """Prompt tokens of a validated request, as `usage.prompt_tokens` reports them: messages
    (text and images by the model's image rule) plus tool definitions and tool_choice."""
    return count_request_tokens(body, body["model"], _IMAGES[image_count_as])


def admission_cost(body: Mapping[str, Any], prompt_tokens: int) -> int:
    """What Azure charges at admission: the prompt estimate plus the output ceiling."""
    out = body.get("max_completion_tokens") or body.get("max_tokens") or DEFAULT_ASSUMED_MAX_TOKENS
    return prompt_tokens + out
