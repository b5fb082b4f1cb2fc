"""`MockConfig`: every knob of the bundled server (limits, windows, headers, faults, latency).

Frozen and checked when built, so a bad benchmark flag fails at start, not mid-run.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from batcher.models import DEFAULT_RPM, DEFAULT_TPM, MOCK_HEADER, SUPPORTED_MODELS

__all__ = ["MOCK_HEADER", "MockConfig"]


@dataclass(frozen=True)
class MockConfig:
    """Every knob of the mock server. Limits are per model; `None` means unlimited."""

    api_keys: frozenset[str] | None = None  # None: any non-empty Bearer key is accepted
    models: tuple[str, ...] | None = SUPPORTED_MODELS  # None: any model name is served
    rpm: int | None = DEFAULT_RPM
    tpm: int | None = DEFAULT_TPM
    model_limits: Mapping[str, tuple[int | None, int | None]] = field(default_factory=dict)
    windows_s: tuple[float, ...] = (60.0, 10.0)
    retry_after_headers: bool = True  # the real Langdock may not pass them through
    ratelimit_headers: bool = True  # x-ratelimit-*
    failed_requests_count: bool = False  # a 429'd request still counts as a request
    foreign_share: float = 0.0  # share of every limit used by invisible other users
    latency_s: float = 0.0
    latency_jitter_s: float = 0.0
    seed: int = 0
    error_rate_5xx: float = 0.0
    drop_rate: float = 0.0
    # 429 to the valid chat requests numbered first..last (1-based, counted from the start or
    # the last reset), whatever the quota says: a storm that a test can count on.
    rate_limit_storm_requests: tuple[int, int] | None = None
    storm_retry_after_s: float = 1.0  # the retry-after those 429s ask for
    # 429 to everything during the first N seconds after start: depends on when the client's
    # first request arrives, so only for demos; tests use rate_limit_storm_requests.
    rate_limit_storm_s: float = 0.0
    slow_marker_s: float = 2.0  # extra latency for [[slow]]
    # gpt-4o-mini images: charged at the "billing" figure (what its usage reports) or the
    # "context" one (gpt-4o's); batcher's `images.count_as` setting names the same choice.
    image_count_as: Literal["billing", "context"] = "billing"
    stats_bucket_s: float = 1.0  # resolution of the admitted-per-interval series
    # Sign answers with MOCK_HEADER. False: the server passes for a real API (its answers are
    # stored and resumed like the real API's): for tests and benchmarks of exactly that.
    marked: bool = True

    def __post_init__(self) -> None:
        # Normalise collections so callers may pass sets/lists/dicts and the config stays frozen.
        if self.api_keys is not None:
            keys = frozenset(self.api_keys)
            if not keys or not all(isinstance(k, str) and k for k in keys):
                raise ValueError("api_keys must be None or a non-empty set of non-empty strings")
            object.__setattr__(self, "api_keys", keys)
        if self.models is not None:
            models = tuple(self.models)
            if not models:
                raise ValueError("models must be None (accept any) or a non-empty list")
            object.__setattr__(self, "models", models)
        limits = {}
        for model, pair in dict(self.model_limits).items():
            rpm, tpm = pair
            limits[model] = (rpm, tpm)
            _check_limit(f"model_limits[{model!r}] rpm", rpm)
            _check_limit(f"model_limits[{model!r}] tpm", tpm)
        object.__setattr__(self, "model_limits", limits)
        _check_limit("rpm", self.rpm)
        _check_limit("tpm", self.tpm)
        windows = tuple(float(w) for w in self.windows_s)
        if not windows or min(windows) <= 0 or max(windows) != 60.0:
            raise ValueError("windows_s must be positive lengths in seconds, the longest 60")
        object.__setattr__(self, "windows_s", windows)
        if not 0.0 <= self.foreign_share < 1.0:
            raise ValueError("foreign_share must be in [0, 1)")
        for name in ("error_rate_5xx", "drop_rate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1]")
        if self.rate_limit_storm_requests is not None:
            first, last = self.rate_limit_storm_requests
            if not 1 <= first <= last:
                raise ValueError(
                    "rate_limit_storm_requests must be (first, last) with 1 <= first <= last"
                )
            object.__setattr__(self, "rate_limit_storm_requests", (int(first), int(last)))
        for name in (
            "latency_s",
            "latency_jitter_s",
            "rate_limit_storm_s",
            "storm_retry_after_s",
            "slow_marker_s",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")
        if self.image_count_as not in ("billing", "context"):
            raise ValueError("image_count_as must be 'billing' or 'context'")
        if self.stats_bucket_s <= 0:
            raise ValueError("stats_bucket_s must be > 0")

    def limits_for(self, model: str) -> tuple[int | None, int | None]:
        return self.model_limits.get(model, (self.rpm, self.tpm))


def _check_limit(name: str, value: int | None) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
        raise ValueError(f"{name} must be a positive integer or None (unlimited), got {value!r}")
