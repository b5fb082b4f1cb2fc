"""The workspace-wide backend: each model's schedule lives in Redis, shared by every process.

Langdock's limits belong to the whole workspace, so every `batcher run` of a workspace, on one
machine or many, takes its admissions from one schedule: the reference schedule
(`schedule.py`) as Lua scripts (`lua/*.lua`, loaded once), on the Redis server's clock so that
machines with skewed clocks agree. Keys `batcher:<workspace>:<model>:{pace,log,refunds}`
expire `policy.idle_ttl_s` after the last slot or pause.

Round trips: admission is one RESERVE (take the slot, sleep it off); each process keeps at most
one reservation per model outstanding for its head waiter (local waiters queue FIFO; the
script may give the slot to one of the costs queued behind it, `lane.Lane`), so processes
interleave.
Answers that carry x-ratelimit-* headers (near the limit or not) and failed attempts ride
along with the next RESERVE (no round trip of their own); 429s go at once in a FEEDBACK script
(they pause every process), and the next acquire waits for them.

Each call carries its process's policy (JSON): processes configured differently do not corrupt
the state; the tightest configuration governs the slots it takes.

Failure: Redis unreachable at `start()` raises LimiterError. Lost mid-run (connection error, or
no answer within the socket timeout), `on_failure="stop"` raises LimiterError so the engine
stops cleanly; `on_failure="local"` warns once and goes on, for the rest of the run, with the
local backend at `local_share` of every limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from importlib import resources
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ConstantBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from batcher.admission.contract import Admission, ModelSnapshot, current_admission
from batcher.admission.feedback import Signal, read_answer, uneventful
from batcher.admission.lane import Lane
from batcher.admission.local_backend import LocalLimiter, model_snapshot, policy_source
from batcher.admission.schedule import Reply, check_cost
from batcher.errors import LimiterError

log = logging.getLogger("batcher")

# Every Redis call gives up after this long: a dead or unreachable Redis is noticed in seconds.
SOCKET_TIMEOUT_S = 2.0


def _script(name: str) -> str:
    lua = resources.files("batcher.admission").joinpath("lua")
    return lua.joinpath("prelude.lua").read_text() + lua.joinpath(f"{name}.lua").read_text()


RESERVE_LUA = _script("reserve")
FEEDBACK_LUA = _script("feedback")

# What counts as "Redis is gone" (as opposed to Redis refusing something it should not).
_LOST = (RedisConnectionError, RedisTimeoutError, OSError, asyncio.TimeoutError)


def keys(workspace: str, model: str) -> list[str]:
    prefix = f"batcher:{workspace}:{model}"
    return [f"{prefix}:pace", f"{prefix}:log", f"{prefix}:refunds"]


def parse_reply(reply: list[Any]) -> Reply:
    at, now, seq, m, share, pause, dec429, decnear, shdown, refunded, decreased, waiter = reply
    return Reply(
        int(at),
        int(now),
        int(seq),
        float(m),
        float(share),
        int(pause),
        int(dec429),
        int(decnear),
        int(shdown),
        int(refunded),
        decreased == "1",
        int(waiter),
    )


def redact_url(url: str) -> str:
    """The URL without its password (`redis://:secret@host` -> `redis://:***@host`)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable Redis URL>"
    if parts.password is None and "@" not in parts.netloc:
        return url
    user = parts.username or ""
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


class RedisLimiter:
    """A `Limiter` whose per-model schedules are shared by every process of one workspace.

    `limits` and `knobs` (Policy fields) mean what they mean for LocalLimiter. `clock` (default
    time.monotonic) only measures the waits returned and turns the shared pause into seconds
    for `snapshot()`; the schedule runs on Redis's clock. `round_trips` counts every Redis round
    trip of this process; `last_reply[model]` is what its last script returned.
    """

    backend = "redis"

    def __init__(
        self,
        url: str,
        workspace: str,
        limits: Callable[[str], tuple[int, int]],
        *,
        on_failure: Literal["stop", "local"] = "stop",
        local_share: float = 0.5,
        clock: Callable[[], float] | None = None,
        **knobs: Any,
    ) -> None:
        if not 0 < local_share <= 1:
            raise ValueError(f"local_share must be in (0, 1], got {local_share}")
        if on_failure not in ("stop", "local"):
            raise ValueError(f"on_failure must be 'stop' or 'local', got {on_failure!r}")
        self.url = url
        self.workspace = workspace
        self.policy = policy_source(limits, knobs)
        self._limits = limits
        self._knobs = knobs
        self.on_failure = on_failure
        self.local_share = local_share
        self._clock = clock or time.monotonic
        self._local_clock = clock  # LocalLimiter's own default (`loop_clock`) when None
        self._last_cost: dict[str, int] = {}  # read_feedback judges token headers by it
        self._redis: aioredis.Redis | None = None
        self._reserve_sha = ""
        self._feedback_sha = ""
        self._lanes: dict[str, Lane] = {}
        # Urgent feedback scripts in flight, per model: kept referenced, awaited by the next
        # acquire. Non-urgent signals wait for the next RESERVE of the model.
        self._pending: dict[str, set[asyncio.Task[None]]] = {}
        self._queued: dict[str, list[Signal]] = {}
        self._failure: LimiterError | None = None  # a feedback task lost Redis under "stop"
        self._fallback: LocalLimiter | None = None
        self.last_reply: dict[str, Reply] = {}
        self._offset_s = 0.0  # server clock minus ours, for snapshot()
        self.round_trips = 0  # all Redis round trips, including start()'s
        self._model_round_trips: dict[str, int] = {}

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Connect, check Redis answers and load both scripts; LimiterError if it cannot."""
        if self._redis is not None:
            return
        where = redact_url(self.url)
        try:
            client = aioredis.Redis.from_url(
                self.url,
                socket_timeout=SOCKET_TIMEOUT_S,
                socket_connect_timeout=SOCKET_TIMEOUT_S,
                # One quick retry rides out a dropped idle connection, not a dead server.
                retry=Retry(ConstantBackoff(0.05), 1),
                decode_responses=True,
            )
        except ValueError as exc:
            raise LimiterError(
                f"limiter.url {where!r} is not a Redis URL ({exc}); "
                "write it as redis://[:password@]host:port/db"
            ) from exc
        try:
            self.round_trips += 3
            await client.ping()
            self._reserve_sha = await client.script_load(RESERVE_LUA)
            self._feedback_sha = await client.script_load(FEEDBACK_LUA)
        except RedisError as exc:
            with contextlib.suppress(*_LOST):
                await client.aclose()
            raise LimiterError(
                f"cannot reach the shared limiter's Redis at {where}: {_describe(exc, self.url)}. "
                "Start Redis or fix limiter.url (and its password), or set "
                "limiter.backend: local to pace this process alone."
            ) from exc
        self._redis = client

    async def aclose(self) -> None:
        """Wait for pending feedback, then close the connection pool."""
        await self.drain_feedback()
        if self._fallback is not None:
            await self._fallback.aclose()
        if self._redis is not None:
            client, self._redis = self._redis, None
            with contextlib.suppress(*_LOST):  # already gone: nothing left to release
                await client.aclose()

    # -- admission -------------------------------------------------------------------------

    async def acquire(self, model: str, cost: int) -> Admission:
        """Wait for the shared schedule to admit one request of `cost` tokens.

        Cancelled while it sleeps, the slot it reserved stays taken (Redis cannot know the
        request was not sent): at most one slot per process and model is lost that way.
        """
        policy = self.policy(model)
        check_cost(model, cost, policy.tpm)
        if self._failure is not None:
            raise self._failure
        if self._redis is None and self._fallback is None:
            await self.start()
        began = self._clock()
        lane = self._lanes.setdefault(model, Lane())
        front = False
        while self._fallback is None:
            given = await lane.enter(cost, front=front)
            if given is not None:  # the head handed this call a slot before its own
                if await self._sleep_until(model, given):
                    return self._admitted(model, cost, given, began)
                front = True  # its own 429 paused the model meanwhile: back in line
                continue
            try:
                # A 429 this process reported must shape its next slot, as it would locally.
                await self.drain_feedback(model)
                if self._failure is not None:
                    raise self._failure
                passed = 0  # slots this head handed over (packing passes it a bounded number)
                while self._fallback is None:
                    behind = lane.behind(policy.lookahead)
                    costs = [w.cost for w in behind]
                    try:
                        res = await self.reserve(model, cost, waiting=costs, passed=passed)
                    except _LOST as exc:
                        self._lost(exc)
                        break
                    if res.waiter:
                        lane.hand(behind[res.waiter - 1], res)
                        passed += 1
                        continue
                    if await self._sleep_until(model, res):
                        return self._admitted(model, cost, res, began)
            finally:
                lane.leave()
        fallback = self._fallback
        assert fallback is not None
        local = await fallback.acquire(model, min(cost, fallback.policy(model).tpm))
        self._last_cost[model] = cost
        adm = Admission(model, cost, local.seq, local.at_us, max(0.0, self._clock() - began))
        current_admission.set(adm)
        return adm

    async def _sleep_until(self, model: str, res: Reply) -> bool:
        """Sleep off the slot; False if a pause this process learnt of meanwhile (its own
        429) voids it: take a new one rather than send into a known rate limit."""
        wait_s = (res.at - res.now) / 1_000_000
        if wait_s > 0:
            until = time.monotonic() + wait_s
            await asyncio.sleep(wait_s)
            # uvloop's timers fire up to a millisecond early: never send before the slot
            while (left := until - time.monotonic()) > 0:
                await asyncio.sleep(max(left, 0.001))
        return self.last_reply[model].pause <= res.at

    def _admitted(self, model: str, cost: int, res: Reply, began: float) -> Admission:
        self._last_cost[model] = cost
        adm = Admission(model, cost, res.seq, res.at, max(0.0, self._clock() - began))
        current_admission.set(adm)
        return adm

    async def reserve(
        self,
        model: str,
        cost: int,
        *,
        now_us: int | None = None,
        waiting: Sequence[int] = (),
        passed: int = 0,
    ) -> Reply:
        """Take the next slot of the shared schedule, without waiting for it: one round trip.

        `waiting`: the costs queued behind this call (look-ahead; the reply's `waiter` says
        whose slot it is), `passed`: the slots this call handed over already. Carries the
        model's queued non-urgent feedback. `now_us` replaces the Redis clock (tests only).
        Raises redis-py's errors as they are.
        """
        queued = self._queued.pop(model, [])
        request: dict[str, Any] = {"cost": cost, "feedback": [s.encode() for s in queued]}
        if waiting:
            request["waiting"] = list(waiting)
        if passed:
            request["passed"] = passed
        if now_us is not None:
            request["now"] = now_us
        try:
            reply = await self._run(model, self._reserve_sha, RESERVE_LUA, request)
        except BaseException:
            self._queued.setdefault(model, [])[:0] = queued
            raise
        return reply

    async def send_feedback(
        self, model: str, signal: Signal, *, now_us: int | None = None
    ) -> Reply:
        """Apply one signal in Redis now: one round trip (tests call it with `now_us`)."""
        request: dict[str, Any] = {"signal": signal.encode()}
        if now_us is not None:
            request["now"] = now_us
        return await self._run(model, self._feedback_sha, FEEDBACK_LUA, request)

    async def _run(self, model: str, sha: str, source: str, request: dict[str, Any]) -> Reply:
        client = self._redis
        if client is None:
            raise RedisConnectionError("the limiter is closed")
        self.round_trips += 1
        self._model_round_trips[model] = self._model_round_trips.get(model, 0) + 1
        args = (self.policy(model).encode(), json.dumps(request, separators=(",", ":")))
        names = keys(self.workspace, model)
        try:
            try:
                raw = await client.evalsha(sha, len(names), *names, *args)
            except NoScriptError:
                # Redis restarted or flushed its script cache since start(): load, run again.
                self.round_trips += 2
                self._model_round_trips[model] += 2
                await client.script_load(source)
                raw = await client.evalsha(sha, len(names), *names, *args)
        except _LOST:
            raise
        except RedisError as exc:
            # Redis answers but refuses (out of memory, read-only replica, ...): no fallback
            # hides that; the operator must fix Redis.
            raise LimiterError(
                f"the shared limiter's Redis at {redact_url(self.url)} refused the limiter's "
                f"script: {_describe(exc, self.url)}. Fix that Redis (memory, replica role, "
                "permissions) or set limiter.backend: local."
            ) from exc
        reply = parse_reply(list(raw))
        self._offset_s = reply.now / 1_000_000 - self._clock()
        self.last_reply[model] = reply
        return reply

    # -- feedback --------------------------------------------------------------------------

    def feedback(
        self,
        model: str,
        *,
        status: int,
        headers: Mapping[str, str],
        admission: Admission | None = None,
    ) -> None:
        """Report an answer; a 429 or near-limit headers slow every process of the workspace."""
        if self._fallback is not None:
            self._fallback.feedback(model, status=status, headers=headers)
            return
        if uneventful(status, headers):
            return
        policy = self.policy(model)
        signal = read_answer(
            policy, model, status, headers, self._last_cost.get(model, 0), admission
        )
        if not signal.urgent:
            if signal.failed_seq or signal.has_headers or signal.near_limit:
                queued = self._queued.setdefault(model, [])
                # Only the latest plain headers matter (the share is smoothed over time); a
                # failed admission waits for its verdict, a near-limit answer may pause.
                if queued and not (queued[-1].failed_seq or queued[-1].near_limit):
                    queued.pop()
                queued.append(signal)
                if len(queued) > 64:  # an idle process: keep what counts, not every answer
                    del queued[:-64]
            return
        task = asyncio.get_running_loop().create_task(
            self._send_urgent(model, signal, status, headers)
        )
        pending = self._pending.setdefault(model, set())
        pending.add(task)
        task.add_done_callback(pending.discard)

    async def drain_feedback(self, model: str | None = None) -> None:
        """Wait until the urgent feedback reported so far (for `model`, or all) reached Redis."""
        models = [model] if model is not None else list(self._pending)
        tasks = [t for m in models for t in self._pending.get(m, ())]
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _send_urgent(
        self, model: str, signal: Signal, status: int, headers: Mapping[str, str]
    ) -> None:
        try:
            await self.send_feedback(model, signal)
        except _LOST as exc:
            try:
                self._lost(exc)
            except LimiterError as err:
                self._failure = err  # raised by the next acquire(): feedback() cannot raise
                return
            assert self._fallback is not None
            self._fallback.feedback(model, status=status, headers=headers)

    # -- failure ---------------------------------------------------------------------------

    def _lost(self, exc: BaseException) -> None:
        """Redis went away mid-run: raise (stop) or switch to the local fallback (local)."""
        where = redact_url(self.url)
        if self.on_failure == "stop":
            raise LimiterError(
                f"lost the shared limiter's Redis at {where} mid-run: {_describe(exc, self.url)}. "
                "The run stops; every answer received so far is kept. Bring Redis back and "
                "run the job again to resume, or set limiter.on_limiter_failure: local to go "
                f"on at {self.local_share:.0%} of the limits when Redis fails."
            ) from exc
        if self._fallback is None:
            log.warning(
                "LOST the shared limiter's Redis at %s (%s): going on with a local limiter at "
                "%.0f%% of each limit for the rest of this run. Other processes of workspace "
                "%r no longer coordinate with this one.",
                where,
                _describe(exc, self.url),
                self.local_share * 100,
                self.workspace,
            )
            self._fallback = LocalLimiter(
                self._local_limits, clock=self._local_clock, **self._knobs
            )

    def _local_limits(self, model: str) -> tuple[int, int]:
        p = self.policy(model).scaled(self.local_share)
        return p.rpm, p.tpm

    # -- reporting -------------------------------------------------------------------------

    def snapshot(self) -> dict[str, ModelSnapshot]:
        """Per model: the shared state Redis returned on this process's last round trip (no
        Redis call here); with the local fallback, what paces this process now."""
        local = self._fallback.snapshot() if self._fallback is not None else {}
        server_now = round((self._clock() + self._offset_s) * 1_000_000)
        out: dict[str, ModelSnapshot] = {}
        for model in sorted(set(self._model_round_trips) | set(local)):
            policy = self.policy(model)
            extra: dict[str, Any] = {
                "fallback": "local" if self._fallback is not None else None,
                "workspace": self.workspace,
                "redis_round_trips": self._model_round_trips.get(model, 0),
            }
            if model in local:  # the local fallback paces this process at its reduced limits
                out[model] = replace(
                    local[model], rpm=policy.rpm, tpm=policy.tpm, backend="redis", **extra
                )
                continue
            seen = self.last_reply.get(model)  # None: its first script failed
            reply = (seen or Reply(0, 0, 0, 1.0, 1.0, 0, 0, 0, 0, 0, False))._replace(
                now=server_now
            )
            out[model] = model_snapshot(policy, reply, "redis", **extra)
        return out


def _describe(exc: BaseException, url: str) -> str:
    """The error's text, short, and never with the URL's password in it."""
    text = (str(exc) or type(exc).__name__).rstrip(". ")
    try:
        password = urlsplit(url).password
    except ValueError:
        password = None
    if password:
        text = text.replace(password, "***")
    return text if len(text) < 300 else text[:300] + "…"
