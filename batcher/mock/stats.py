"""The counters behind `/_mock/stats`: what was asked, refused, admitted and answered."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class MockStats:
    """What /_mock/stats reports.

    Memory grows only with distinct answered bodies (one 16-byte digest each, about 90 MB per
    million) and with run time (one series entry per bucket).
    """

    def __init__(self, clock: Callable[[], float], t0: float, bucket_s: float) -> None:
        self.clock = clock
        self.t0 = t0
        self.bucket_s = bucket_s
        self.reset()

    def reset(self) -> None:
        self.requests = 0
        self.by_status: dict[str, int] = {}
        self.dropped = 0
        self.rate_limited = 0
        self.admitted: dict[str, list[int]] = {}  # model -> [requests, tokens] charged
        self.accepted: dict[str, list[int]] = {}  # model -> [requests, tokens] answered 200
        self.duplicates = 0
        self.answered: set[bytes] = set()
        self.first_accepted: float | None = None
        self.last_accepted: float | None = None
        self.series: dict[int, list[int]] = {}  # bucket -> [requests, tokens] admitted

    def answer(self, status: int) -> None:
        self.requests += 1
        self.by_status[str(status)] = self.by_status.get(str(status), 0) + 1
        if status == 429:
            self.rate_limited += 1

    def drop(self) -> None:
        self.requests += 1
        self.dropped += 1

    def admit(self, model: str, tokens: int) -> None:
        now = self.clock() - self.t0
        row = self.admitted.setdefault(model, [0, 0])
        row[0] += 1
        row[1] += tokens
        bucket = self.series.setdefault(int(now // self.bucket_s), [0, 0])
        bucket[0] += 1
        bucket[1] += tokens

    def accept(self, model: str, tokens: int, digest: bytes) -> None:
        now = self.clock() - self.t0
        row = self.accepted.setdefault(model, [0, 0])
        row[0] += 1
        row[1] += tokens
        if digest in self.answered:
            self.duplicates += 1
        else:
            self.answered.add(digest)
        if self.first_accepted is None:
            self.first_accepted = now
        self.last_accepted = now

    def as_dict(self) -> dict[str, Any]:
        def per_model(rows: dict[str, list[int]]) -> dict[str, dict[str, int]]:
            return {m: {"requests": r, "tokens": t} for m, (r, t) in sorted(rows.items())}

        return {
            "uptime_s": self.clock() - self.t0,
            "requests": self.requests,
            "by_status": dict(sorted(self.by_status.items())),
            "dropped": self.dropped,
            "rate_limited": self.rate_limited,
            "accepted": sum(r for r, _ in self.accepted.values()),
            "accepted_tokens": sum(t for _, t in self.accepted.values()),
            "accepted_by_model": per_model(self.accepted),
            "admitted": sum(r for r, _ in self.admitted.values()),
            "admitted_tokens": sum(t for _, t in self.admitted.values()),
            "admitted_by_model": per_model(self.admitted),
            "duplicates": self.duplicates,
            "first_accepted_s": self.first_accepted,
            "last_accepted_s": self.last_accepted,
            "bucket_s": self.bucket_s,
            # [start of bucket in s since start, requests admitted, tokens admitted]
            "admitted_series": [
                [k * self.bucket_s, r, t] for k, (r, t) in sorted(self.series.items())
            ],
        }
