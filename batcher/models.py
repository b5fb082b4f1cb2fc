"""Facts about the models Langdock serves: names, encodings, o-series rules, context, prices."""

from __future__ import annotations

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
