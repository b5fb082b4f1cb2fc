"""The in-process backend: the reference schedule per model, FIFO waiters, one timer each.

No algorithm here: `schedule.reserve` gives the slot, the head waiter (`lane.Lane`) sleeps
until it (one timer, no polling), or hands it to the waiter behind it the schedule chose
(look-ahead); a pause that arrived meanwhile (a 429) voids the slot and it takes another,
exactly as the Redis backend does.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from typing import Any

from batcher.admission import schedule
from batcher.admission.contract import Admission, ModelSnapshot, current_admission
from batcher.admission.feedback import read_answer, uneventful
from batcher.admission.lane import Lane
from batcher.admission.policy import Policy, us
from batcher.admission.schedule import State, check_cost


def policy_source(
    limits: Callable[[str], tuple[int, int]], knobs: Mapping[str, Any]
) -> Callable[[str], Policy]:
    """Per model: its limits and the shared knobs (Policy's fields), built once, checked now."""
    Policy(1, 1, **knobs)  # a bad knob fails at construction, not at the first request
    cache: dict[str, Policy] = {}

    def policy(model: str) -> Policy:
        p = cache.get(model)
        if p is None:
            rpm, tpm = limits(model)
            p = cache[model] = Policy(rpm, tpm, **knobs)
        return p

    return policy


class LocalLimiter:
    """A `Limiter` for this process alone. `knobs`: Policy fields (headroom, tolerance_s, ...)."""

    backend = "local"

    def __init__(
        self,
        limits: Callable[[str], tuple[int, int]],
        *,
        clock: Callable[[], float] | None = None,
        **knobs: Any,
    ) -> None:
        self.policy = policy_source(limits, knobs)
        self._clock = clock
        self._states: dict[str, State] = {}
        # Per model, what every acquire() needs: one lookup.
        self._models: dict[str, tuple[Policy, State, Lane]] = {}
        self._last_cost: dict[str, int] = {}

    def _now(self) -> float:
        if self._clock is not None:
            return self._clock()
        try:
            return loop_clock(asyncio.get_running_loop())()
        except RuntimeError:  # outside a loop: the clock the default loop uses
            return time.monotonic()

    def state(self, model: str) -> State:
        st = self._states.get(model)
        if st is None:
            st = self._states[model] = State()
        return st

    async def start(self) -> None:
        return None

    async def aclose(self) -> None:
        return None

    async def acquire(self, model: str, cost: int) -> Admission:
        """Wait for `model`'s next slot for `cost` tokens (FIFO, with the schedule's look-ahead);
        ValueError at once if never.

        Cancelled while it sleeps, the slot it took stays taken (as in Redis).
        """
        found = self._models.get(model)
        if found is None:
            found = self._models[model] = (self.policy(model), self.state(model), Lane())
        policy, st, lane = found
        check_cost(model, cost, policy.tpm)
        # The clock, looked up once per call (each asyncio.get_running_loop() is a getpid).
        clock = self._clock or loop_clock(asyncio.get_running_loop())
        began = clock()
        if lane.empty():
            # The line is empty: this call is the head at once. Nobody waits behind it, so the
            # schedule commits its own slot, and below the limits that slot is now: admitted
            # without entering the line or awaiting anything (most calls of a job whose limits
            # are above what it sends, the only jobs where this path's CPU shows).
            now = us(began)
            slot = schedule.reserve(policy, st, cost, now)
            if slot.at <= now:
                return self._admitted(model, cost, slot, 0.0)
            lane.take(cost)  # (still empty: nothing was awaited) the head, until its slot
            return await self._lead(model, cost, policy, st, lane, clock, began, slot)
        front = False
        while True:
            given = await lane.enter(cost, front=front)
            if given is None:  # the head now
                return await self._lead(model, cost, policy, st, lane, clock, began, None)
            # the head handed this call a slot before its own
            if await _sleep_until(clock, st, given.at):
                return self._admitted(model, cost, given, clock() - began)
            front = True  # a 429 paused the model meanwhile: back in line, near the head

    async def _lead(
        self,
        model: str,
        cost: int,
        policy: Policy,
        st: State,
        lane: Lane,
        clock: Clock,
        began: float,
        slot: schedule.Reply | None,
    ) -> Admission:
        """As the head of the line: take slots (`slot`: one already taken) until one holds,
        handing to the calls behind those the schedule gives them; then leave the line."""
        try:
            passed = 0  # slots this head handed over (packing passes it a bounded number)
            while True:
                if slot is None:
                    behind = lane.behind(policy.lookahead)
                    now = us(clock())
                    costs = [w.cost for w in behind]
                    slot = schedule.reserve(policy, st, cost, now, costs, passed)
                    if slot.waiter:
                        lane.hand(behind[slot.waiter - 1], slot)
                        passed += 1
                        slot = None
                        continue
                if await _sleep_until(clock, st, slot.at):
                    return self._admitted(model, cost, slot, clock() - began)
                slot = None  # a 429 paused the model meanwhile: take another
        finally:
            lane.leave()

    def _admitted(self, model: str, cost: int, slot: schedule.Reply, waited_s: float) -> Admission:
        self._last_cost[model] = cost
        adm = Admission(model, cost, slot.seq, slot.at, max(0.0, waited_s))
        current_admission.set(adm)
        return adm

    def feedback(
        self,
        model: str,
        *,
        status: int,
        headers: Mapping[str, str],
        admission: Admission | None = None,
    ) -> None:
        """Report an answer: 429s pause, remaining-* headers or AIMD set the pace."""
        if uneventful(status, headers):
            return
        policy = self.policy(model)
        signal = read_answer(
            policy, model, status, headers, self._last_cost.get(model, 0), admission
        )
        if signal.is_429 or signal.near_limit or signal.has_headers or signal.failed_seq:
            schedule.feedback(policy, self.state(model), signal, us(self._now()))

    def snapshot(self) -> dict[str, ModelSnapshot]:
        now = us(self._now())
        return {
            model: model_snapshot(
                self.policy(model), schedule.status(self.policy(model), st, now), "local"
            )
            for model, st in sorted(self._states.items())
        }


Clock = Callable[[], float]


async def _sleep_until(clock: Clock, st: State, at: int) -> bool:
    """Sleep until the slot; False if a pause that arrived meanwhile (a 429) voids it.

    On uvloop (`clock` is then the monotonic clock: `loop_clock`) timers fire up to a
    millisecond early (they count whole milliseconds): what is left is slept again, at least
    a millisecond (never early). An injected clock is the loop's business."""
    now = us(clock())
    if at > now:
        await asyncio.sleep((at - now) / 1_000_000)
        while clock is time.monotonic and at > (now := us(clock())):
            await asyncio.sleep(max(at - now, 1_000) / 1_000_000)
    return st.pause <= at


def loop_clock(loop: asyncio.AbstractEventLoop) -> Clock:
    """The schedule's clock on `loop`: its own time, except on uvloop, whose `loop.time()`
    reads whole milliseconds (MagicStack/uvloop#359; a request window's margin is 5 ms):
    there the monotonic clock it truncates (asyncio's loop reads that one too)."""
    return time.monotonic if type(loop).__module__.startswith("uvloop") else loop.time


def model_snapshot(
    policy: Policy, reply: schedule.Reply, backend: Any, **extra: Any
) -> ModelSnapshot:
    """A snapshot from the schedule's reply (either backend's)."""
    m = reply.multiplier
    return ModelSnapshot(
        rpm=policy.rpm,
        tpm=policy.tpm,
        effective_rpm=policy.rpm * policy.headroom * m,
        effective_tpm=policy.tpm * policy.headroom * m,
        multiplier=m,
        share=reply.share,
        paused_until_s=max(0.0, (reply.pause - reply.now) / 1_000_000),
        backend=backend,
        decreases_429=reply.dec429,
        decreases_near_limit=reply.decnear,
        share_reductions=reply.shdown,
        refunded=reply.refunded,
        **extra,
    )
