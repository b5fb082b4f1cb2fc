"""Facts about the models Langdock serves: names, encodings, o-series rules, context, prices."""

from __future__ import annotations

from dataclasses import dataclass

# The models Langdock's API serves (langdock-api.md). Own-key workspaces may have others:
# the job file's `allow_any_model: true` lifts this check.
SUPPORTED_MODELS: tuple[str, ...] = (
    "gpt-4o",
    "gpt-4o-mini",
    "o1-preview",
    "o3-mini",
    "gpt-4",
    "gpt-35-turbo",
)

# Body fields Langdock does not support; rejected before anything is sent.
UNSUPPORTED_PARAMS: tuple[str, ...] = ("n", "service_tier", "parallel_tool_calls", "stream_options")

# Fields the o-series reasoning models refuse (they accept only the default temperature).
O_SERIES_REFUSED_PARAMS: tuple[str, ...] = (
    "top_p",
    "presence_penalty",
    "frequency_penalty",
    "logprobs",
    "top_logprobs",
    "logit_bias",
)

# The response header batcher's bundled server (--mock, serve-mock) signs its answers with:
# they are demo answers, kept out of the user's response store and never resumed by a run
# against the API.
MOCK_HEADER = "x-batcher-mock"

# Default per-model limits: Langdock's workspace quota.
DEFAULT_RPM = 500
DEFAULT_TPM = 60_000

# Charged at admission for a request without max_tokens / max_completion_tokens. Azure charges
# "a large default"; 4,096 is the output ceiling of most of these models, so we never undercount.
DEFAULT_ASSUMED_MAX_TOKENS = 4096

_EXACT_ENCODING = {
    "gpt-4o": "o200k_base",
    "gpt-4o-mini": "o200k_base",
    "o1-preview": "o200k_base",
    "o3-mini": "o200k_base",
    "o1": "o200k_base",
    "o3": "o200k_base",
    "gpt-4": "cl100k_base",
    "gpt-35-turbo": "cl100k_base",
    "gpt-3.5-turbo": "cl100k_base",
}
# Longest prefixes first, so "gpt-4o-" wins over "gpt-4-".
_PREFIX_ENCODING = (
    ("gpt-4o-", "o200k_base"),
    ("o1-", "o200k_base"),
    ("o3-", "o200k_base"),
    ("o4-", "o200k_base"),
    ("gpt-4-", "cl100k_base"),
    ("gpt-35-turbo-", "cl100k_base"),
    ("gpt-3.5-turbo-", "cl100k_base"),
)
FALLBACK_ENCODING = "o200k_base"

# Context windows (prompt + completion), for `batcher estimate`.
CONTEXT_WINDOWS: dict[str, int] = {
    "gpt-4o": 128_000,
    "gpt-4o-mini": 128_000,
    "o1-preview": 128_000,
    "o3-mini": 200_000,
    "gpt-4": 8_192,
    "gpt-35-turbo": 16_385,
}
DEFAULT_CONTEXT_WINDOW = 128_000


def encoding_name_for(model: str) -> str:
    """tiktoken encoding for a model or deployment name; unknown names get o200k_base."""
    name = model.lower()
    if name in _EXACT_ENCODING:
        return _EXACT_ENCODING[name]
    for prefix, enc in _PREFIX_ENCODING:
        if name.startswith(prefix):
            return enc
    return FALLBACK_ENCODING


def is_o_series(model: str) -> bool:
    """Reasoning models: take max_completion_tokens and only the default temperature."""
    name = model.lower()
    return name in ("o1", "o3", "o4") or name.startswith(("o1-", "o3-", "o4-"))


def context_window(model: str) -> int:
    return CONTEXT_WINDOWS.get(model, DEFAULT_CONTEXT_WINDOW)


# ---- images ----
# OpenAI's documented vision rule (platform.openai.com/docs/guides/vision, "Calculating costs"):
# `detail: low` costs the base figure; `high` scales the image to fit 2048x2048, then its
# shortest side down to 768 px, and costs `base + tile * (512-px tiles)`. `auto` lets the model
# choose, so admission charges it as `high` (the larger figure; never an undercount).
IMAGE_FIT_PX = 2048
IMAGE_SHORT_SIDE_PX = 768
IMAGE_TILE_PX = 512


@dataclass(frozen=True, slots=True)
class ImageRule:
    """Tokens of one image: `base` alone at detail low, `base + tile * tiles` at high."""

    base: int
    tile: int


# gpt-4o, gpt-4, unknown deployments: OpenAI's published gpt-4o rule.
IMAGE_RULE_DEFAULT = ImageRule(base=85, tile=170)
# o1 / o3 (vision-capable reasoning models) publish their own, smaller figures.
IMAGE_RULE_O_SERIES = ImageRule(base=75, tile=150)
# gpt-4o-mini *bills* an image as many tokens as cost the same money on gpt-4o; the model itself
# sees (and its context window holds) the gpt-4o figure.
IMAGE_RULE_MINI_BILLING = ImageRule(base=2833, tile=5667)


def image_rule(model: str, count_as: str = "billing") -> ImageRule:
    """The image rule of a model; `count_as` (job setting `images.count_as`) picks, for
    gpt-4o-mini only, between its billing figure and the figure its context holds.

    Which of the two Azure's per-minute limiter charges is not documented. We default to
    "billing" because it is the figure the answers' `usage.prompt_tokens` report for
    gpt-4o-mini, and quota is accounted in the tokens usage reports; if the limiter charges
    less, we only send slower than we could (never a 429), and the adaptive rate, which reads
    `x-ratelimit-remaining-tokens`, sees the unused quota. A job whose answers show
    `prompt_tokens` near the 85/170 figure should set `images.count_as: context` and send
    images 33x faster. A context-window check wants "context": billing tokens do not fill it.
    """
    name = model.lower()
    if name == "gpt-4o-mini" or name.startswith("gpt-4o-mini-"):
        return IMAGE_RULE_MINI_BILLING if count_as == "billing" else IMAGE_RULE_DEFAULT
    if is_o_series(name):
        return IMAGE_RULE_O_SERIES
    return IMAGE_RULE_DEFAULT
