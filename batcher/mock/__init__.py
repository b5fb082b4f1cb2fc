"""The bundled Langdock-compatible local server: the README demo's default and the tests' backbone.

It behaves like Langdock in front of Azure OpenAI (see langdock-api.md), not like a convenient
double: same routes (regions, /api/public), Bearer auth, the same refusals (unsupported params,
o-series rules, unknown models, malformed images and tools), Azure's admission-time token
charging over sliding windows (images and tool definitions counted by batcher's own rule),
429s with `retry-after(-ms)`, answers shaped like the real ones with dated model names, tool
calls when tools are offered.

Modules, from pure to I/O:
- `quota`: `SlidingWindowQuota`, one model's RPM/TPM limits over sliding windows; clock injected.
- `config`: `MockConfig`, every knob, frozen and validated.
- `validation`: `validate_request` raises `Refusal` for what Langdock/Azure refuse.
- `cost`: prompt tokens and admission cost, by `batcher.tokens`' rule.
- `schema`, `answers`: deterministic completions, JSON-schema instances, tool calls.
- `faults`: storms, 5xx and drops keyed to request numbers (never to time); per-row markers.
- `stats`: the counters behind `/_mock/stats`.
- `app`: `MockServer`, the aiohttp app on the caller's loop.
- `runner`: `ThreadedMockServer` (a background thread), `serve_forever` / `main_serve`
  (`batcher serve-mock`).
"""

from batcher.mock.answers import DATED_MODEL_NAMES, LABELS, build_completion, canonical_digest
from batcher.mock.app import REGIONS, MockServer
from batcher.mock.config import MockConfig
from batcher.mock.cost import admission_cost, prompt_tokens
from batcher.mock.faults import (
    MARKER_BROKEN_JSON,
    MARKER_DROP_ONCE,
    MARKER_FAIL_400,
    MARKER_FAIL_500,
    MARKER_FAIL_500_ONCE,
    MARKER_SLOW,
)
from batcher.mock.quota import QuotaDecision, QuotaState, SlidingWindowQuota, format_reset
from batcher.mock.runner import ThreadedMockServer, main_serve, serve_forever
from batcher.mock.schema import schema_instance
from batcher.mock.stats import MockStats
from batcher.mock.validation import Refusal, validate_request

__all__ = [
    "DATED_MODEL_NAMES",
    "LABELS",
    "MARKER_BROKEN_JSON",
    "MARKER_DROP_ONCE",
    "MARKER_FAIL_400",
    "MARKER_FAIL_500",
    "MARKER_FAIL_500_ONCE",
    "MARKER_SLOW",
    "REGIONS",
    "MockConfig",
    "MockServer",
    "MockStats",
    "QuotaDecision",
    "QuotaState",
    "Refusal",
    "SlidingWindowQuota",
    "ThreadedMockServer",
    "admission_cost",
    "build_completion",
    "canonical_digest",
    "format_reset",
    "main_serve",
    "prompt_tokens",
    "schema_instance",
    "serve_forever",
    "validate_request",
]
