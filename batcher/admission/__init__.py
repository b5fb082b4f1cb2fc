"""Admission: when may the next request of a model go, so that the server never refuses it.

One contract, two backends:

    policy.py         Policy: every limit and constant, frozen; encodes itself for the Lua
    feedback.py       an answer's status and headers -> Signal
    schedule.py       the reference schedule (pure, µs): reserve() and feedback() on a State
    lua/*.lua         the same schedule as Redis scripts (prelude + reserve / feedback)
    local_backend.py  LocalLimiter: this process alone (FIFO waiters over schedule.py)
    redis_backend.py  RedisLimiter: the workspace's processes share the schedule in Redis
    contract.py       Limiter protocol, Admission, ModelSnapshot (what progress and stats read)

tests/test_admission_equivalence.py replays random traces through schedule.py and the Lua and
compares every reply and state.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from batcher.admission.contract import Admission, Limiter, LimiterSnapshot, ModelSnapshot
from batcher.admission.local_backend import LocalLimiter
from batcher.admission.policy import Policy

if TYPE_CHECKING:
    from batcher.spec import Job

__all__ = [
    "Admission",
    "Limiter",
    "LimiterSnapshot",
    "LocalLimiter",
    "ModelSnapshot",
    "Policy",
    "make_limiter",
]


def make_limiter(job: Job) -> Limiter:
    """The limiter a job file asks for. Knobs the job leaves unset keep Policy's defaults."""

    def limits(model: str) -> tuple[int, int]:
        lim = job.limit_for(model)
        return lim.rpm, lim.tpm

    cfg = job.limiter
    knobs: dict[str, Any] = {"adaptive": cfg.adaptive}
    for knob in ("headroom", "max_pause_s"):
        if knob in cfg.model_fields_set:
            knobs[knob] = getattr(cfg, knob)
    if cfg.backend == "redis":
        from batcher.admission.redis_backend import RedisLimiter

        return RedisLimiter(
            cfg.url,
            cfg.workspace,
            limits,
            on_failure=cfg.on_limiter_failure,
            local_share=cfg.local_share,
            **knobs,
        )
    return LocalLimiter(limits, **knobs)
