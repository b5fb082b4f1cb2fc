"""The workspace-wide limiter: each model's admission schedule lives in Redis.

Langdock's 500 RPM / 60k TPM per model belong to the whole workspace, so every `batcher run`
process of a workspace, on one machine or many, takes its admissions from one schedule with the
semantics of `batcher.limiter` (GCRA pacing with a tolerance, sliding-window caps, AIMD):

    batcher:<workspace>:<model>:pace   hash
        rtat, ttat      theoretical arrival times of the request and token pacing
        last            the latest slot handed out (slots never go back in time)
        m0, t0, tdec    shared AIMD state: m(t) = min(1, m0 + recovery·(t - t0)); last decrease
        sh0, sht        the quota share x-ratelimit-remaining-* revealed, recovering likewise
        pause           nobody is admitted before this time (429s, near-limit headers)
    batcher:<workspace>:<model>:log    sorted set: one "<seq>:<cost>:<running token total>"
                                       per slot, scored by its time; what the 60 s and 10 s
                                       window caps count
    all times in µs on the Redis server's clock (`TIME`), so machines with skewed clocks agree;
    both keys expire IDLE_TTL_S after the last slot or pause.

Admission is one round trip: the RESERVE script takes the earliest time the pacing, the pause
and every window allow, commits the pacing and the log entry for that slot, and returns the
wait; the process sleeps it off. Each process keeps at most one reservation per model
outstanding (local waiters queue FIFO on an asyncio.Lock), so reservations interleave across
processes instead of piling up into the future, and every process gets its turn.

The limits, headroom, tolerance and windows travel as script arguments, not as shared state:
each reservation is judged and committed by its own process's configuration. Processes
configured differently do not corrupt the state (each slot's pacing advance is the last
writer's `cost / rate`); the tightest configuration governs the slots it takes.

Answers go to the FEEDBACK script. With x-ratelimit-remaining-* headers, the workspace's usage
in its log plus what remains is the share of the quota others leave the workspace: it sets the
shared share (pacing and window caps, as in batcher.limiter); each process sends such an answer
at most every HEADER_FEEDBACK_INTERVAL_S, 429s and near-limit answers always. Without the
headers a 429 lowers the shared AIMD multiplier, at most once per cooldown whichever process saw
it. Any pause is shared. All processes slow down together.

Failure: Redis unreachable at `start()` raises LimiterError. Lost mid-run (connection error, or
no answer within the socket timeout), `on_failure="stop"` raises LimiterError so the engine
stops cleanly; `on_failure="local"` warns once and goes on, for the rest of the run, with an
in-process LocalLimiter at `local_share` of every limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
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

from batcher.errors import LimiterError
from batcher.limiter import (
    AIMD_BETA,
    AIMD_COOLDOWN_S,
    AIMD_M_MIN,
    AIMD_RECOVERY_PER_S,
    DEFAULT_HEADROOM,
    DEFAULT_TOLERANCE_S,
    DEFAULT_WINDOWS_S,
    FEEDBACK_SLACK_S,
    SHARE_SMOOTHING_S,
    WINDOW_MARGIN_S,
    FeedbackSignal,
    LocalLimiter,
    check_cost,
    read_feedback,
)

log = logging.getLogger("batcher")

# Every Redis call gives up after this long: a dead or unreachable Redis is noticed in seconds.
SOCKET_TIMEOUT_S = 2.0
# An idle model's state vanishes this long after its last scheduled slot, pause or log entry.
IDLE_TTL_S = 600
# Answers that only carry x-ratelimit-remaining-* (no 429, not near the limit) reach Redis at
# most this often per process and model: the share moves slowly, round trips cost.
HEADER_FEEDBACK_INTERVAL_S = 0.25

_US = 1_000_000

# Shared by both scripts. KEYS[1] the model's state hash, KEYS[2] its log of admissions: a
# sorted set, score = slot time, member = "<seq>:<cost>:<cum>" where cum is the running token
# total, so a window's token sum is two lookups, not a scan (O(log n) per reservation however
# high the limits). Times are whole µs of Redis TIME.
_PRELUDE = """
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local function fmt(x) return string.format('%.0f', x) end
local function us(seconds) return math.floor(seconds * 1000000 + 0.5) end
local function multiplier(m0, t0, recovery)
  if not m0 or not t0 then return 1 end
  return math.min(1, tonumber(m0) + recovery * math.max(0, now - tonumber(t0)) / 1000000)
end
local function windows(csv)
  local out = {}
  for w in string.gmatch(csv, '[^,]+') do out[#out + 1] = tonumber(w) end
  return out
end
-- The log entry at 0-based rank (oldest first): time, cost, running token total.
local function entry(rank)
  local r = redis.call('ZRANGE', KEYS[2], rank, rank, 'WITHSCORES')
  local _, cost, cum = string.match(r[1], '^(%d+):(%d+):(%d+)$')
  return tonumber(r[2]), tonumber(cost), tonumber(cum)
end
-- The entries after `since`: rank of the first, count, token total, running total before.
local function window(since)
  local card = redis.call('ZCARD', KEYS[2])
  local first = redis.call('ZCOUNT', KEYS[2], '-inf', fmt(since))
  if card == first then return first, 0, 0, 0 end
  local _, cost0, cum0 = entry(first)
  local _, _, cum_last = entry(card - 1)
  return first, card - first, cum_last - cum0 + cost0, cum0 - cost0
end
local function expire(horizon, keep_ms)
  local ttl = math.ceil((math.max(horizon, now) - now) / 1000) + keep_ms
  redis.call('PEXPIRE', KEYS[1], ttl)
  redis.call('PEXPIRE', KEYS[2], ttl)
end
"""

# ARGV: rpm, tpm, headroom, cost, adaptive (0/1), recovery/s, tolerance s, window margin s,
# windows s (csv), idle ttl ms. Returns {wait ms, now µs, multiplier, pause µs, admission µs}.
RESERVE_LUA = (
    _PRELUDE
    + """
local rpm, tpm, headroom = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local cost, adaptive, recovery = tonumber(ARGV[4]), ARGV[5] == '1', tonumber(ARGV[6])
local tol, margin = us(tonumber(ARGV[7])), tonumber(ARGV[8])
local wins = windows(ARGV[9])
local s = redis.call('HMGET', KEYS[1], 'rtat', 'ttat', 'm0', 't0', 'pause', 'last', 'cum',
                     'sh0', 'sht')
local rtat, ttat = tonumber(s[1]) or 0, tonumber(s[2]) or 0
local pause, last = tonumber(s[5]) or 0, tonumber(s[6]) or 0
local m, share = 1, 1
if adaptive then
  share = multiplier(s[8], s[9], recovery)
  m = math.min(multiplier(s[3], s[4], recovery), share)
  -- A revealed share is an estimate: the window caps keep a margin below it (as in
  -- batcher.limiter.ModelSchedule.share_of_windows).
  share = share - 2 * (1 - headroom) * (1 - share)
end
-- Pacing (GCRA with tolerance) and pause. Slots never go back in time, so every logged
-- admission lies at or before `base` and a window's content only shrinks as time moves on:
-- each window's earliest fit can be found on its own, and the latest of them fits all.
local base = math.ceil(math.max(now, rtat - tol, ttat - tol, pause, last))
local at = base
local longest = 0
for _, w in ipairs(wins) do longest = math.max(longest, us(w + margin)) end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', '(' .. fmt(now - longest))
for _, w in ipairs(wins) do
  local len = us(w + margin)
  local first, n, total, before = window(base - len)
  -- Requests: the k-th oldest entry must leave for one more to fit.
  local excess = n + 1 - rpm * w / 60 * share
  if n > 0 and excess > 0 then
    at = math.max(at, entry(first + math.min(n, math.ceil(excess)) - 1) + len)
  end
  -- Tokens: the oldest entries up to the first whose running total frees `excess` must
  -- leave (all of them if even that is not enough: a request bigger than the window's
  -- budget goes alone).
  excess = total + cost - tpm * w / 60 * share
  if total > 0 and excess > 0 then
    local lo, hi = first, first + n - 1
    while lo < hi do
      local mid = math.floor((lo + hi) / 2)
      local _, _, cum = entry(mid)
      if cum - before >= excess then hi = mid else lo = mid + 1 end
    end
    at = math.max(at, entry(lo) + len)
  end
end
rtat = math.max(rtat, at) + 60000000 / (rpm * headroom * m)
ttat = math.max(ttat, at) + cost * 60000000 / (tpm * headroom * m)
local cum = tonumber(s[7])
if not cum then  -- state hash lost but log kept: go on from the log's running total
  cum = 0
  if redis.call('ZCARD', KEYS[2]) > 0 then cum = select(3, entry(-1)) end
end
cum = cum + cost
local seq = redis.call('HINCRBY', KEYS[1], 'seq', 1)
redis.call('ZADD', KEYS[2], fmt(at), seq .. ':' .. cost .. ':' .. fmt(cum))
redis.call('HSET', KEYS[1], 'rtat', fmt(rtat), 'ttat', fmt(ttat), 'last', fmt(at), 'cum', fmt(cum))
expire(math.max(rtat, ttat, pause, at + longest), tonumber(ARGV[10]))
return {string.format('%.3f', (at - now) / 1000), fmt(now), string.format('%.6f', m),
        fmt(pause), fmt(at)}
"""
)

# ARGV: is 429 (0/1), near limit (0/1), by requests (0/1), by tokens (0/1), last cost,
# pause s, adaptive (0/1), beta, m_min, recovery/s, cooldown s, rpm, tpm, window margin s,
# windows s (csv), slack s, idle ttl ms, tolerance s, remaining requests, remaining tokens
# (-1: not sent), unused, headroom, share smoothing s.
# Returns {decreased (0/1), now µs, multiplier, pause µs}.
FEEDBACK_LUA = (
    _PRELUDE
    + """
local is_429, near = ARGV[1] == '1', ARGV[2] == '1'
local by_req, by_tok, last_cost = ARGV[3] == '1', ARGV[4] == '1', tonumber(ARGV[5])
local pause_s, adaptive = tonumber(ARGV[6]), ARGV[7] == '1'
local beta, m_min, recovery = tonumber(ARGV[8]), tonumber(ARGV[9]), tonumber(ARGV[10])
local cooldown = us(tonumber(ARGV[11]))
local rpm, tpm, margin = tonumber(ARGV[12]), tonumber(ARGV[13]), tonumber(ARGV[14])
local wins, slack = windows(ARGV[15]), tonumber(ARGV[16])
local tol = us(tonumber(ARGV[18]))
local left_req, left_tok = tonumber(ARGV[19]), tonumber(ARGV[20])
local smoothing = us(tonumber(ARGV[23]))
local s = redis.call('HMGET', KEYS[1], 'rtat', 'ttat', 'm0', 't0', 'tdec', 'pause', 'last',
                     'sh0', 'sht')
local pause = tonumber(s[6]) or 0
local share = multiplier(s[8], s[9], recovery)
local before = math.min(multiplier(s[3], s[4], recovery), share)
-- The share the remaining-* headers reveal (batcher.limiter.revealed_share): per resource the
-- largest (usage over the server's window + remaining) / budget, the smaller of the two.
local revealed = nil
if adaptive then
  for _, r in ipairs({{left_req, rpm, false}, {left_tok, tpm, true}}) do
    local left, limit, tokens = r[1], r[2], r[3]
    if left >= 0 then
      local best = nil
      for _, w in ipairs(wins) do
        local _, n, total = window(now - us(w))
        local est = ((tokens and total or n) + left) / (limit * w / 60)
        if not best or est > best then best = est end
      end
      if best and (not revealed or best < revealed) then revealed = math.min(1, best) end
    end
  end
  if revealed then
    -- Smoothed as batcher.limiter.Share: 4x faster downwards; the first as it is.
    revealed = math.max(m_min, revealed)
    local tau = smoothing
    if revealed < share then tau = smoothing / 4 end
    if s[9] and tau > 0 then
      revealed = share + (1 - math.exp(-math.max(0, now - tonumber(s[9])) / tau))
                 * (revealed - share)
    end
    share = revealed
    redis.call('HSET', KEYS[1], 'sh0', string.format('%.6f', share), 'sht', fmt(now))
  end
end
-- A near-limit answer the workspace's own sending (within its share) explains needs no pause.
local explained = false
if near and not is_429 then
  local cap = share - 2 * (1 - tonumber(ARGV[22])) * (1 - share)
  for _, w in ipairs(wins) do
    local _, n, total = window(now - us(w + margin + slack) - 1)
    if by_req and n + 1 > rpm * w / 60 * cap then explained = true end
    if by_tok and total + last_cost > tpm * w / 60 * cap then explained = true end
  end
end
local signal = is_429 or (near and not explained)
if signal and pause_s > 0 and now + us(pause_s) > pause then
  pause = now + us(pause_s)
  -- Resume at the paced rate: a pacing left in the past would let the tolerance's burst go at
  -- once when the pause ends (batcher.limiter.ModelSchedule.pause).
  local rtat = math.max(tonumber(s[1]) or 0, pause + tol)
  local ttat = math.max(tonumber(s[2]) or 0, pause + tol)
  s[1], s[2] = fmt(rtat), fmt(ttat)
  redis.call('HSET', KEYS[1], 'pause', fmt(pause), 'rtat', s[1], 'ttat', s[2])
end
-- A 429 (or, without the headers, an unexplained near-limit answer) means someone outside the
-- workspace's accounting uses the quota: AIMD, once per cooldown. With the headers it only
-- bites if 429s persist below the revealed share.
local m = multiplier(s[3], s[4], recovery)
local cooled = not s[5] or now - tonumber(s[5]) >= cooldown
if adaptive and (is_429 or (signal and not revealed)) and cooled then
  m = math.max(m_min, m * beta)
  redis.call('HSET', KEYS[1], 'm0', string.format('%.6f', m), 't0', fmt(now), 'tdec', fmt(now))
end
m = math.min(m, share)
if not adaptive then m = 1 end
local decreased = 0
if m < before - 1e-9 then decreased = 1 end
local horizon = math.max(tonumber(s[1]) or 0, tonumber(s[2]) or 0, tonumber(s[7]) or 0, pause)
expire(horizon, tonumber(ARGV[17]))
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
    """A `Limiter` whose per-model schedules are shared by every process of one workspace.

    `limits`, `headroom`, `adaptive`, `tolerance_s` and `windows_s` mean what they mean for
    LocalLimiter. `clock` (default time.monotonic) only measures the waits returned and turns
    the shared pause into seconds for `snapshot()`; the schedule itself runs on Redis's clock.
    `round_trips` counts every Redis round trip of this process, `last_reservation[model]` is
    the slot its last admission of `model` took.
    """

    backend = "redis"

    def __init__(
        self,
        url: str,
        workspace: str,
        limits: Callable[[str], tuple[int, int]],
        *,
        headroom: float = DEFAULT_HEADROOM,
        adaptive: bool = True,
        on_failure: Literal["stop", "local"] = "stop",
        local_share: float = 0.5,
        clock: Callable[[], float] | None = None,
        tolerance_s: float = DEFAULT_TOLERANCE_S,
        windows_s: tuple[float, ...] = DEFAULT_WINDOWS_S,
    ) -> None:
        if tolerance_s < 0:
            raise ValueError(f"tolerance_s must be >= 0, got {tolerance_s}")
        if not windows_s or any(w <= 0 for w in windows_s):
            raise ValueError(f"windows_s must be positive lengths, got {windows_s}")
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
        self._local_clock = clock  # LocalLimiter's own default (the loop's time) when None
        self.tolerance_s = tolerance_s
        self.windows_s = windows_s
        self._windows_csv = ",".join(repr(float(w)) for w in windows_s)
        self._last_cost: dict[str, int] = {}  # read_feedback judges token headers by it
        self._header_sent: dict[str, float] = {}  # when remaining-* headers last went to Redis
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
        if rpm <= 0 or tpm <= 0:
            raise ValueError(f"limits of {model!r} must be positive, got rpm={rpm} tpm={tpm}")
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
                    res = await self.reserve(model, cost)
                except _LOST as exc:
                    self._lost(exc)
                    break
                if res.wait_s > 0:
                    await asyncio.sleep(res.wait_s)
                # A pause this process learnt of while it slept (its own 429) voids the slot:
                # take a new one rather than send into a known rate limit.
                if self._seen[model]["pause_us"] <= res.admit_at_s * _US:
                    self._last_cost[model] = cost
                    return max(0.0, self._clock() - began)
        fallback = self._fallback
        assert fallback is not None
        await fallback.acquire(model, min(cost, self._local_limits(model)[1]))
        self._last_cost[model] = cost
        return max(0.0, self._clock() - began)

    async def reserve(self, model: str, cost: int) -> Reservation:
        """Take the next slot of the shared schedule, without waiting for it: one round trip.

        `acquire` is this plus the sleep, one reservation per model at a time; call it directly
        only to inspect the schedule. Raises redis-py's errors as they are.
        """
        rpm, tpm = self._limits(model)
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
            repr(self.tolerance_s),
            repr(WINDOW_MARGIN_S),
            self._windows_csv,
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
        prefix = f"batcher:{self.workspace}:{model}"
        keys = (f"{prefix}:pace", f"{prefix}:log")
        try:
            try:
                reply = await client.evalsha(sha, 2, *keys, *args)
            except NoScriptError:
                # Redis restarted or flushed its script cache since start(): load, run again.
                self.round_trips += 2
                self._model_round_trips[model] += 2
                await client.script_load(source)
                reply = await client.evalsha(sha, 2, *keys, *args)
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
        signal = read_feedback(status, headers, last_cost=self._last_cost.get(model, 0))
        if not (signal.is_429 or signal.near_limit):
            if signal.remaining_requests is None and signal.remaining_tokens is None:
                return
            now = self._clock()
            if now - self._header_sent.get(model, -math.inf) < HEADER_FEEDBACK_INTERVAL_S:
                return
            self._header_sent[model] = now
        task = asyncio.get_running_loop().create_task(
            self._send_feedback(model, signal, status, headers)
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
        signal: FeedbackSignal,
        status: int,
        headers: Mapping[str, str],
    ) -> None:
        rpm, tpm = self._limits(model)
        try:
            reply = await self._script(
                model,
                self._feedback_sha,
                FEEDBACK_LUA,
                int(signal.is_429),
                int(signal.near_limit),
                int("requests" in signal.limited_by),
                int("tokens" in signal.limited_by),
                self._last_cost.get(model, 0),
                repr(signal.pause_s),
                int(self.adaptive),
                repr(AIMD_BETA),
                repr(AIMD_M_MIN),
                repr(AIMD_RECOVERY_PER_S),
                repr(AIMD_COOLDOWN_S),
                rpm,
                tpm,
                repr(WINDOW_MARGIN_S),
                self._windows_csv,
                repr(FEEDBACK_SLACK_S),
                IDLE_TTL_S * 1000,
                repr(self.tolerance_s),
                -1 if signal.remaining_requests is None else signal.remaining_requests,
                -1 if signal.remaining_tokens is None else signal.remaining_tokens,
                "0",  # unused (was a share slack)
                repr(self.headroom),
                repr(SHARE_SMOOTHING_S),
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
                clock=self._local_clock,
                tolerance_s=self.tolerance_s,
                windows_s=self.windows_s,
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
    text = (str(exc) or type(exc).__name__).rstrip(". ")
    try:
        password = urlsplit(url).password
    except ValueError:
        password = None
    if password:
        text = text.replace(password, "***")
    return text if len(text) < 300 else text[:300] + "…"
