"""What goes wrong on purpose, decided by request number and seed, never by the clock (pure).

A test that asks for "the 2nd to 10th requests get 429" or "15 % of requests get a 5xx" gets the
same faults for the same sequence of requests on an idle laptop and on a loaded CI machine. (A
storm timed as "the first second after start" once missed every request of a slow-starting
client.) The n-th request's faults are a hash of (seed, n), so they do not depend on the order
in which concurrent answers finish their latency sleep either.

Per-row faults are asked for by markers in the last user message; `*-once` markers fire on the
first request of a given body only.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from batcher.mock.config import MockConfig

MARKER_FAIL_400 = "[[fail-400]]"
MARKER_FAIL_500 = "[[fail-500]]"
MARKER_FAIL_500_ONCE = "[[fail-500-once]]"
MARKER_DROP_ONCE = "[[drop-once]]"
MARKER_BROKEN_JSON = "[[broken-json]]"
MARKER_SLOW = "[[slow]]"

_5XX_STATUSES: tuple[int, ...] = (500, 502, 503)


@dataclass(frozen=True, slots=True)
class RequestFaults:
    """The random faults drawn for one admitted request."""

    extra_latency_s: float = 0.0  # the jitter on top of `latency_s`
    drop: bool = False  # close the connection without an answer
    status_5xx: int | None = None  # answer this 5xx instead of a completion


def _unit(seed: int, number: int, salt: str) -> float:
    """A uniform draw in [0, 1) that depends only on (seed, request number, salt)."""
    h = hashlib.blake2b(f"{seed}:{number}:{salt}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "big") / 2**64


def in_storm(config: MockConfig, number: int) -> bool:
    """Whether the `number`-th valid chat request (1-based) falls in the request-keyed storm."""
    storm = config.rate_limit_storm_requests
    return storm is not None and storm[0] <= number <= storm[1]


def draw_faults(config: MockConfig, number: int) -> RequestFaults:
    """The jitter, drop and 5xx of the `number`-th valid chat request; a drop wins over a 5xx."""
    jitter = config.latency_jitter_s * _unit(config.seed, number, "latency")
    if config.drop_rate and _unit(config.seed, number, "drop") < config.drop_rate:
        return RequestFaults(jitter, drop=True)
    if config.error_rate_5xx and _unit(config.seed, number, "5xx") < config.error_rate_5xx:
        pick = int(_unit(config.seed, number, "status") * len(_5XX_STATUSES))
        return RequestFaults(jitter, status_5xx=_5XX_STATUSES[pick])
    return RequestFaults(jitter)
