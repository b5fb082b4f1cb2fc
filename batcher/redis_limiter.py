"""The workspace-wide limiter: the pacing schedule of each model lives in Redis.

Langdock's 500 RPM / 60k TPM per model belong to the whole workspace, so every `batcher run`
process of a workspace, on one machine or many, takes its admissions from one schedule:

    Redis hash  batcher:<workspace>:<model>:pace
        rtat, ttat   theoretical arrival times of the request and token schedules (µs)
        m0, t0, tdec shared AIMD state: m(t) = min(1, m0 + recovery·(t - t0)); last decrease
        pause        nobody is admitted before this time (µs), set by 429s and near-limit headers
    all times on the Redis server's clock (`TIME`), so machines with skewed clocks agree.

Admission is one round trip: the RESERVE script computes the admission time
`at = max(now, rtat, ttat, pause)` (GCRA with tolerance 0, as in `batcher.limiter`), commits
`rtat = at + 1/r_req`, `ttat = at + cost/r_tok` with `r = limit/60 · headroom · m(now)`, and
returns the wait; the process sleeps it off. Each process keeps at most one reservation per
model outstanding (local waiters queue on an asyncio.Lock), so reservations interleave across
processes instead of piling up into the future, and every process gets its turn.

The limits and headroom travel as script arguments: each reservation advances the shared
schedule by its own process's `cost / rate`. Processes configured differently therefore do not
corrupt the state; each paces its own admissions by its own view of the limit (the last writer
of a tat wins), so the tightest configuration effectively governs the slots it takes.

A 429 runs the FEEDBACK script: multiplicative decrease of the shared multiplier (at most once
per cooldown, whichever process saw it) and a shared pause until now + retry-after. All
processes slow down together; the multiplier recovers linearly as a pure function of time.

Failure: Redis unreachable at `start()` raises LimiterError. Lost mid-run (connection error or
a call that takes longer than the socket timeout), `on_failure="stop"` raises LimiterError so the
engine stops cleanly; `on_failure="local"` warns once and goes on with an in-process
LocalLimiter at `local_share` of every limit, for the rest of the run.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ConstantBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from batcher.errors import LimiterError, parse_retry_after

try:
    from batcher.limiter import (  # type: ignore[attr-defined]
        AIMD_BETA,
        AIMD_COOLDOWN_S,
        AIMD_M_MIN,
        AIMD_RECOVERY_PER_S,
        LocalLimiter,
        check_cost,
        read_feedback,
    )
except ImportError:  # TRANSITIONAL until batcher.limiter lands
    AIMD_BETA = 0.85
    AIMD_COOLDOWN_S = 2.0
    AIMD_M_MIN = 0.05
    AIMD_RECOVERY_PER_S = 0.01
    LocalLimiter = None  # type: ignore[assignment,misc]

    def check_cost(model: str, cost: int, tpm: int) -> None:
        if cost < 0 or cost > tpm:
            raise ValueError(f"cost {cost} of {model} outside [0, {tpm}]")

    @dataclass(frozen=True)
    class _Signal:
        is_429: bool
        pause_s: float
        near_limit: bool

    def read_feedback(status: int, headers: Mapping[str, str]) -> _Signal:  # type: ignore[misc]
        if status == 429:
            ra = parse_retry_after(headers)
            return _Signal(True, 1.0 if ra is None else ra, False)
        return _Signal(False, 0.0, False)


log = logging.getLogger("batcher")

# Every Redis call gives up after this long: a dead or unreachable Redis is noticed in seconds.
SOCKET_TIMEOUT_S = 2.0
# An idle model's state vanishes this long after its last scheduled slot or pause.
IDLE_TTL_S = 600

_US = 1_000_000

# Shared by both scripts: read the server clock, allow writes after TIME on Redis < 5.
_PRELUDE = """
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local function fmt(x) return string.format('%.0f', x) end
local function expire(rtat, ttat, pause, idle_ms)
  local horizon = math.max(rtat, ttat, pause, now)
  redis.call('PEXPIRE', KEYS[1], math.ceil((horizon - now) / 1000) + idle_ms)
end
"""

# KEYS[1] pace hash; ARGV rpm, tpm, headroom, cost, adaptive (0/1), recovery/s, idle ttl ms.
# Returns {wait ms, server now µs, multiplier, pause µs, admission µs} as strings.
RESERVE_LUA = (
    _PRELUDE
    + """
local rpm, tpm, headroom = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local cost, adaptive, recovery = tonumber(ARGV[4]), ARGV[5] == '1', tonumber(ARGV[6])
local s = redis.call('HMGET', KEYS[1], 'rtat', 'ttat', 'm0', 't0', 'pause')
local rtat, ttat, pause = tonumber(s[1]) or 0, tonumber(s[2]) or 0, tonumber(s[5]) or 0
local m = 1
if adaptive and s[3] and s[4] then
  m = math.min(1, tonumber(s[3]) + recovery * (now - tonumber(s[4])) / 1000000)
end
local at = math.max(now, rtat, ttat, pause)
rtat = at + 60000000 / (rpm * headroom * m)
if cost > 0 then ttat = at + cost * 60000000 / (tpm * headroom * m) end
redis.call('HSET', KEYS[1], 'rtat', fmt(rtat), 'ttat', fmt(ttat))
expire(rtat, ttat, pause, tonumber(ARGV[7]))
return {string.format('%.3f', (at - now) / 1000), fmt(now), string.format('%.6f', m),
        fmt(pause), fmt(at)}
"""
)

# KEYS[1] pace hash; ARGV decrease (0/1), pause s, beta, m_min, recovery/s, cooldown s, idle ms.
# Returns {decreased (0/1), server now µs, multiplier, pause µs} as strings.
FEEDBACK_LUA = (
    _PRELUDE
    + """
local decrease, pause_s = ARGV[1] == '1', tonumber(ARGV[2])
local beta, m_min = tonumber(ARGV[3]), tonumber(ARGV[4])
local recovery, cooldown = tonumber(ARGV[5]), tonumber(ARGV[6]) * 1000000
local s = redis.call('HMGET', KEYS[1], 'rtat', 'ttat', 'm0', 't0', 'tdec', 'pause')
local rtat, ttat, pause = tonumber(s[1]) or 0, tonumber(s[2]) or 0, tonumber(s[6]) or 0
local m = 1
if s[3] and s[4] then
  m = math.min(1, tonumber(s[3]) + recovery * (now - tonumber(s[4])) / 1000000)
end
local decreased = 0
if decrease and (not s[5] or now - tonumber(s[5]) >= cooldown) then
  m = math.max(m_min, m * beta)
  redis.call('HSET', KEYS[1], 'm0', string.format('%.6f', m), 't0', fmt(now), 'tdec', fmt(now))
  decreased = 1
end
if pause_s > 0 and now + pause_s * 1000000 > pause then
  pause = now + pause_s * 1000000
  redis.call('HSET', KEYS[1], 'pause', fmt(pause))
end
expire(rtat, ttat, pause, tonumber(ARGV[7]))
return {tostring(decreased), fmt(now), string.format('%.6f', m), fmt(pause)}
"""
)

# What counts as "Redis is gone" (as opposed to Redis refusing something it should not).
_LOST = (RedisConnectionError, RedisTimeoutError, OSError, asyncio.TimeoutError)


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


@dataclass(frozen=True, slots=True)
class Reservation:
    """One admission slot the RESERVE script handed out; times on the Redis server's clock."""

    wait_s: float  # how long to sleep before sending
    admit_at_s: float  # the slot: server time (s since epoch) when the request may go
    server_now_s: float  # server time when the slot was taken
    multiplier: float  # shared AIMD multiplier at that time
    paused_until_s: float  # shared pause (server time), 0 if never paused


class RedisLimiter:
    """A `Limiter` whose per-model schedules are shared by every process of one workspace."""

    backend = "redis"

    def __init__(
        self,
        url: str,
        workspace: str,
        limits: Callable[[str], tuple[int, int]],
        *,
        headroom: float = 0.985,
        adaptive: bool = True,
        on_failure: Literal["stop", "local"] = "stop",
        local_share: float = 0.5,
        clock: Callable[[], float] | None = None,
    ) -> None:
        if not 0 < headroom <= 1:
            raise ValueError(f"headroom must be in (0, 1], got {headroom}")
        if not 0 < local_share <= 1:
            raise ValueError(f"local_share must be in (0, 1], got {local_share}")
        if on_failure not in ("stop", "local"):
            raise ValueError(f"on_failure must be 'stop' or 'local', got {on_failure!r}")
        self.url = url
        self.workspace = workspace
        self._limits = limits
        self.headroom = headroom
        self.adaptive = adaptive
        self.on_failure = on_failure
        self.local_share = local_share
        self._clock = clock or time.monotonic
        self._redis: aioredis.Redis | None = None
        self._reserve_sha = ""
        self._feedback_sha = ""
        self._locks: dict[str, asyncio.Lock] = {}
        # Feedback scripts in flight, per model: kept referenced, awaited by the next acquire.
        self._pending: dict[str, set[asyncio.Task[None]]] = {}
        self._failure: LimiterError | None = None  # a feedback task lost Redis under "stop"
        self._fallback: LocalLimiter | None = None
        # Last shared state seen per model, and server clock minus our clock, for snapshot().
        self._seen: dict[str, dict[str, float]] = {}
        self._offset_s = 0.0
        self.round_trips = 0  # all Redis round trips, including start()'s
        self._model_round_trips: dict[str, int] = {}
        self.last_reservation: dict[str, Reservation] = {}

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
        reserve = client.register_script(RESERVE_LUA)
        feedback = client.register_script(FEEDBACK_LUA)
        try:
            self.round_trips += 3
            await client.ping()
            self._reserve_sha = await client.script_load(reserve.script)
            self._feedback_sha = await client.script_load(feedback.script)
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

    async def acquire(self, model: str, cost: int) -> float:
        """Wait for the shared schedule to admit one request of `cost` tokens; seconds waited.

        Cancelled while it sleeps, the slot it reserved stays taken (Redis cannot know the
        request was not sent): at most one slot per process and model is lost that way.
        """
        rpm, tpm = self._limits(model)
        check_cost(model, cost, tpm)
        if self._failure is not None:
            raise self._failure
        if self._redis is None and self._fallback is None:
            await self.start()
        began = self._clock()
        lock = self._locks.setdefault(model, asyncio.Lock())
        async with lock:
            # A 429 this process reported must shape its next slot, as it would locally.
            await self.drain_feedback(model)
            if self._failure is not None:
                raise self._failure
            while self._fallback is None:
                try:
                    res = await self._reserve(model, cost, rpm, tpm)
                except _LOST as exc:
                    self._lost(exc)
                    break
                if res.wait_s > 0:
                    await asyncio.sleep(res.wait_s)
                # A pause this process learnt of while it slept (its own 429) voids the slot:
                # take a new one rather than send into a known rate limit.
                if self._seen[model]["pause_us"] <= res.admit_at_s * _US:
                    return max(0.0, self._clock() - began)
        fallback = self._fallback
        assert fallback is not None
        await fallback.acquire(model, min(cost, self._local_limits(model)[1]))
        return max(0.0, self._clock() - began)

    async def _reserve(self, model: str, cost: int, rpm: int, tpm: int) -> Reservation:
        reply = await self._script(
            model,
            self._reserve_sha,
            RESERVE_LUA,
            rpm,
            tpm,
            repr(self.headroom),
            cost,
            int(self.adaptive),
            repr(AIMD_RECOVERY_PER_S),
            IDLE_TTL_S * 1000,
        )
        wait_ms, now_us, m, pause_us, at_us = (float(x) for x in reply)
        self._observe(model, now_us, m, pause_us)
        res = Reservation(
            wait_s=wait_ms / 1000,
            admit_at_s=at_us / _US,
            server_now_s=now_us / _US,
            multiplier=m,
            paused_until_s=pause_us / _US,
        )
        self.last_reservation[model] = res
        return res

    async def _script(self, model: str, sha: str, source: str, *args: Any) -> list[str]:
        client = self._redis
        if client is None:
            raise RedisConnectionError("the limiter is closed")
        self.round_trips += 1
        self._model_round_trips[model] = self._model_round_trips.get(model, 0) + 1
        key = f"batcher:{self.workspace}:{model}:pace"
        try:
            reply = await client.evalsha(sha, 1, key, *args)
        except NoScriptError:
            # Redis restarted or flushed its script cache since start(): load and run again.
            self.round_trips += 2
            self._model_round_trips[model] += 2
            await client.script_load(source)
            reply = await client.evalsha(sha, 1, key, *args)
        return list(reply)

    def _observe(self, model: str, now_us: float, m: float, pause_us: float) -> None:
        self._offset_s = now_us / _US - self._clock()
        seen = self._seen.setdefault(model, {"pause_us": 0.0})
        seen["multiplier"] = m if self.adaptive else 1.0
        seen["pause_us"] = max(seen["pause_us"], pause_us)

    # -- feedback --------------------------------------------------------------------------

    def feedback(self, model: str, *, status: int, headers: Mapping[str, str]) -> None:
        """Report an answer; a 429 or near-limit headers slow every process of the workspace."""
        if self._fallback is not None:
            self._fallback.feedback(model, status=status, headers=headers)
            return
        signal = read_feedback(status, headers)
        if not signal.is_429 and signal.pause_s <= 0:
            return
        decrease = self.adaptive and signal.is_429
        task = asyncio.get_running_loop().create_task(
            self._send_feedback(model, decrease, signal.pause_s, status, headers)
        )
        pending = self._pending.setdefault(model, set())
        pending.add(task)
        task.add_done_callback(pending.discard)

    async def drain_feedback(self, model: str | None = None) -> None:
        """Wait until the feedback reported so far (for `model`, or all) has reached Redis."""
        models = [model] if model is not None else list(self._pending)
        tasks = [t for m in models for t in self._pending.get(m, ())]
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _send_feedback(
        self,
        model: str,
        decrease: bool,
        pause_s: float,
        status: int,
        headers: Mapping[str, str],
    ) -> None:
        try:
            reply = await self._script(
                model,
                self._feedback_sha,
                FEEDBACK_LUA,
                int(decrease),
                repr(pause_s),
                repr(AIMD_BETA),
                repr(AIMD_M_MIN),
                repr(AIMD_RECOVERY_PER_S),
                repr(AIMD_COOLDOWN_S),
                IDLE_TTL_S * 1000,
            )
        except _LOST as exc:
            try:
                self._lost(exc)
            except LimiterError as err:
                self._failure = err  # raised by the next acquire(): feedback() cannot raise
                return
            assert self._fallback is not None
            self._fallback.feedback(model, status=status, headers=headers)
            return
        _, now_us, m, pause_us = (float(x) for x in reply)
        self._observe(model, now_us, m, pause_us)

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
                self._local_limits,
                headroom=self.headroom,
                adaptive=self.adaptive,
                clock=self._clock,
            )

    def _local_limits(self, model: str) -> tuple[int, int]:
        rpm, tpm = self._limits(model)
        return max(1, int(rpm * self.local_share)), max(1, int(tpm * self.local_share))

    # -- reporting -------------------------------------------------------------------------

    def snapshot(self) -> dict[str, dict[str, Any]]:
        """Per model: configured and effective limits, shared multiplier and pause, round trips.

        The shared values are those Redis returned on this process's last round trip; no Redis
        call is made here.
        """
        local = self._fallback.snapshot() if self._fallback is not None else {}
        out: dict[str, dict[str, Any]] = {}
        server_now = self._clock() + self._offset_s
        for model in sorted(set(self._model_round_trips) | set(local)):
            rpm, tpm = self._limits(model)
            seen = self._seen.get(model, {"pause_us": 0.0})
            m = seen.get("multiplier", 1.0)
            row: dict[str, Any] = {
                "rpm": rpm,
                "tpm": tpm,
                "effective_rpm": rpm * self.headroom * m,
                "effective_tpm": tpm * self.headroom * m,
                "multiplier": m,
                "paused_until_s": max(0.0, seen["pause_us"] / _US - server_now),
            }
            if model in local:
                row.update(local[model])  # what actually paces this process now
                row["rpm"], row["tpm"] = rpm, tpm
            row["backend"] = self.backend
            row["fallback"] = "local" if self._fallback is not None else None
            row["workspace"] = self.workspace
            row["redis_round_trips"] = self._model_round_trips.get(model, 0)
            out[model] = row
        return out


def _describe(exc: BaseException, url: str) -> str:
    """The error's text, short, and never with the URL's password in it."""
    text = str(exc) or type(exc).__name__
    try:
        password = urlsplit(url).password
    except ValueError:
        password = None
    if password:
        text = text.replace(password, "***")
    return text if len(text) < 300 else text[:300] + "…"
