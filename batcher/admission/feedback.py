"""What an answer asks of the admission schedule: its status and headers, read once.

Pure: no clock, no state. `read_feedback` turns an answer into a `Signal`; both backends hand
the same `Signal` to the same schedule (`schedule.feedback` in Python, `feedback.lua` in Redis).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from multidict import CIMultiDict, CIMultiDictProxy

from batcher.admission.contract import Admission, answered
from batcher.admission.policy import Policy
from batcher.errors import parse_retry_after

_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ms|h|m|s)")


def parse_duration(value: str | None) -> float | None:
    """Seconds from an OpenAI-style duration ("1s", "6m0s", "120ms", "1h2m3.5s") or a number."""
    if value is None:
        return None
    text = value.strip().lower()
    try:
        seconds = float(text)
    except ValueError:
        pos, seconds = 0, 0.0
        for match in _DURATION_PART.finditer(text):
            if match.start() != pos:
                return None
            number, unit = float(match.group(1)), match.group(2)
            seconds += number * {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}[unit]
            pos = match.end()
        if pos == 0 or pos != len(text):
            return None
    return seconds if seconds >= 0 and math.isfinite(seconds) else None


def _parse_int(value: str | None) -> int | None:
    if value is None:
        return None
    try:
        number = float(value.strip())
    except ValueError:
        return None
    return max(0, math.floor(number)) if math.isfinite(number) else None


# Not frozen: every answer builds one, and a frozen dataclass builds itself through
# object.__setattr__ per field (1.8 us for these 13). A value all the same: never changed.
@dataclass(slots=True)
class Signal:
    """One answer, as the schedule reads it."""

    is_429: bool = False
    pause_s: float = 0.0  # pause admission this long from the answer (capped by the policy)
    near_limit: bool = False  # headers say the next request like the last would be refused
    by_requests: bool = False  # ... because of x-ratelimit-remaining-requests
    by_tokens: bool = False  # ... because of x-ratelimit-remaining-tokens
    last_cost: int = 0  # the token cost of the model's last admission (judges "near")
    remaining_requests: int | None = None  # x-ratelimit-remaining-*, when sent
    remaining_tokens: int | None = None
    # A 5xx: the admission (number, slot, cost) to give back if the remaining-* headers of
    # this or the next answer show the server did not charge it; a 429: the admission whose
    # tokens it refused (given back at once); seq 0 for none.
    failed_seq: int = 0
    failed_at: int = 0
    failed_cost: int = 0
    # The slot of the admission this answers (schedule clock, µs), 0 if unknown: the server
    # counted our sends up to about then, so the share is read over windows ending there.
    sent_at: int = 0
    # A 429 naming its admission (sent_at set): the server's windows had no room for it.
    bound: bool = False

    @property
    def has_headers(self) -> bool:
        return self.remaining_requests is not None or self.remaining_tokens is not None

    @property
    def urgent(self) -> bool:
        """Must reach the shared schedule now, not with the next reservation: a 429. (A
        near-limit answer was accepted; at saturation most answers are near the limit, and our
        own sending explains them: they ride along with the next reservation.)"""
        return self.is_429

    def encode(self) -> dict[str, Any]:
        """The Lua scripts' form: names as here, -1 for an absent count."""
        return {
            "is_429": self.is_429,
            "pause_s": self.pause_s,
            "near_limit": self.near_limit,
            "by_requests": self.by_requests,
            "by_tokens": self.by_tokens,
            "last_cost": self.last_cost,
            "remaining_requests": -1
            if self.remaining_requests is None
            else self.remaining_requests,
            "remaining_tokens": -1 if self.remaining_tokens is None else self.remaining_tokens,
            "failed_seq": self.failed_seq,
            "failed_at": self.failed_at,
            "failed_cost": self.failed_cost,
            "sent_at": self.sent_at,
            "bound": self.bound,
        }


def uneventful(status: int, headers: Mapping[str, str]) -> bool:
    """A 200 without x-ratelimit-remaining-* headers: nothing for the schedule (`read_feedback`
    would say so at ~1 us more an answer: every answer of a server that sends none). Any
    spelling of the names: aiohttp's headers look them up case-insensitively, others are
    read name by name."""
    if status != 200:
        return False
    if isinstance(headers, CIMultiDictProxy | CIMultiDict):
        return (
            "x-ratelimit-remaining-requests" not in headers
            and "x-ratelimit-remaining-tokens" not in headers
        )
    return not any(name.lower().startswith("x-ratelimit-remaining-") for name in headers)


def read_feedback(
    policy: Policy,
    status: int,
    headers: Mapping[str, str],
    *,
    last_cost: int = 1,
    failed: tuple[int, int, int] = (0, 0, 0),
    sent_at: int = 0,
) -> Signal:
    """Classify one answer. `last_cost`: the token cost of the model's last admission.

    A 429 pauses for `retry-after(-ms)`, else the policy's default pause. Any answer whose
    `x-ratelimit-remaining-requests` is 0, or whose `x-ratelimit-remaining-tokens` is below
    `last_cost`, is near the limit: pause until the matching `x-ratelimit-reset-*`. Every
    pause is capped at `policy.max_pause_s`. Remaining counts are passed on (on 429s too);
    absent headers mean no signal. `failed` (5xx, or status 0 for no answer): the admission's
    (seq, slot, cost). `sent_at`: the slot of the admission the answer belongs to.
    """
    lower = {k.lower(): v for k, v in headers.items()}
    left_req = _parse_int(lower.get("x-ratelimit-remaining-requests"))
    left_tok = _parse_int(lower.get("x-ratelimit-remaining-tokens"))
    # A 5xx, or no answer at all (status 0: dropped connection, timeout), may not be charged;
    # a 429's tokens were not.
    seq, at, cost = failed if status in (0, 429) or 500 <= status <= 599 else (0, 0, 0)
    if status == 429:
        retry = parse_retry_after(lower)
        pause = policy.default_pause_s if retry is None else retry
        return Signal(
            is_429=True,
            pause_s=min(policy.max_pause_s, pause),
            last_cost=last_cost,
            remaining_requests=left_req,
            remaining_tokens=left_tok,
            failed_seq=seq,
            failed_at=at,
            failed_cost=cost,
            sent_at=sent_at,
            bound=sent_at > 0 and seq > 0,
        )
    if left_req is None and left_tok is None:  # no remaining-* headers: nothing near
        return Signal(
            last_cost=last_cost, failed_seq=seq, failed_at=at, failed_cost=cost, sent_at=sent_at
        )
    near = {"requests": False, "tokens": False}
    pause = 0.0
    for resource, left, threshold in (
        ("requests", left_req, 1),
        ("tokens", left_tok, max(1, last_cost)),
    ):
        if left is None or left >= threshold:
            continue
        near[resource] = True
        reset = parse_duration(lower.get(f"x-ratelimit-reset-{resource}"))
        pause = max(pause, policy.default_pause_s if reset is None else reset)
    return Signal(
        pause_s=min(policy.max_pause_s, pause),
        near_limit=near["requests"] or near["tokens"],
        by_requests=near["requests"],
        by_tokens=near["tokens"],
        last_cost=last_cost,
        remaining_requests=left_req,
        remaining_tokens=left_tok,
        failed_seq=seq,
        failed_at=at,
        failed_cost=cost,
        sent_at=sent_at,
    )


def read_answer(
    policy: Policy,
    model: str,
    status: int,
    headers: Mapping[str, str],
    last_cost: int,
    admission: Admission | None,
) -> Signal:
    """`read_feedback` for an answer of `model`, anchored to the admission it answers (the one
    given, else this task's last): both backends read every answer through this."""
    adm = answered(model, admission)
    return read_feedback(
        policy,
        status,
        headers,
        last_cost=last_cost,
        failed=(adm.seq, adm.at_us, adm.cost) if adm else (0, 0, 0),
        sent_at=adm.at_us if adm else 0,
    )
