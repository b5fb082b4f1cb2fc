"""The reference admission schedule of one model: pure Python, the contract `lua/*.lua` follows.

Both functions take the policy, the model's `State` and `now` (whole microseconds) and return a
`Reply`; nothing else reads a clock. The Lua scripts do the same steps in the same order with
the same float arithmetic, on a state hash and a log in Redis; tests replay random traces through
both and compare every reply and every state.

The schedule (server semantics in policy.py):

- **Pacing** (GCRA, virtual scheduling) of requests and tokens: the theoretical arrival times
  `rtat`, `ttat`; a request may go at `max(now, tat - tolerance)` and moves `tat` by
  `cost / rate`, rate = limit x headroom x multiplier. A fresh schedule starts at `now +
  tolerance`, as after a pause: no tolerance burst at the start of a run.
- **Window caps**: a log of admissions (time, running token total); a request goes only when
  every window (a little longer than the server's) has room for it, scaled by the revealed
  share. Slots never go back in time (`last`), so each window's earliest fit is found on its
  own and the latest of them fits all.
- **Look-ahead**: when the head of the queue must wait for a window's room, a smaller request
  among the next few waiting may take an earlier slot if the head's slot stays where it was
  (tried, checked, taken back otherwise). Strict FIFO leaves part of each short window unused
  whenever the head is larger than the room. When the token room at the head's slot is short
  (the head and the largest other do not both fit), the request that best fills it together
  with a second takes the slot (packing); the head is passed over at most
  `lookahead_passes` times.
- **Adaptive multiplier** (AIMD): 429s our accounting let through mean someone else uses the
  quota: x beta, once per cooldown, then linear recovery; a lone 429 (none within the last
  `aimd_strike_requests` admissions) only pauses. All the adaptation when answers carry
  no x-ratelimit-remaining-* headers.
- **Share**: what remaining-* headers reveal: our usage over the server's window plus what
  remains is what the window allows us. Which window the header describes is not documented,
  so each candidate length (10 and 60 s; while we ramp up, 1 s too) that could hold
  `remaining` gives an estimate and the largest is taken (a window longer than the header's
  reads low while we ramp up; one shorter cannot hold the remaining count; the 1 s reading is
  noisy at Langdock's limits, one request being half a second's tokens, so it only counts
  until the 10 s window has been filled). Smoothed, 4x faster downwards; it recovers like the
  multiplier only after `share_hold_s` without a reading. Without headers, a 429 naming its
  admission brackets the share: the window that refused held our usage over it and others',
  and had no room for the refused request; the share is set to the lower end (our usage
  without it). Which window it was is unknown, so the largest reading counts, and only if it
  is below the share. A 429 answering a probe (the share recovering after its hold, not yet
  whole) doubles the next hold, up to `2**share_hold_doublings` x: only 429s say whether
  others left, and each probe costs one.
- **Pauses**: a 429 or an unexplained near-limit header stops admission for its pause (capped),
  and the pacing resumes at the paced rate when it ends.
- **Failed admissions** (5xx): when the remaining-* of the answer, or of the next one, show the
  server did not charge it (counting it would put the window over its budget, leaving it out
  would not), its tokens and request no longer count in our windows.
"""

from __future__ import annotations

import math
from bisect import bisect_left, bisect_right
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from batcher.admission.feedback import Signal
from batcher.admission.policy import Policy, us

_EPS = 1e-9


class Entry(NamedTuple):
    """One admission in the log: its slot, the running token total including it, its number."""

    at: int
    cum: int
    seq: int
    cost: int


class Refund(NamedTuple):
    """A failed admission the server did not charge: no longer counted in the windows."""

    at: int
    seq: int
    cost: int
    req: int = 1  # 0: its tokens only (a 429: refused, its request may still count)


@dataclass(slots=True)
class State:
    """One model's schedule; None: never set. Redis keeps the same fields in a hash."""

    rtat: int | None = None  # theoretical arrival time of the next request (pacing)
    ttat: int | None = None  # ... of the next token
    last: int = 0  # the latest slot handed out
    start: int = 0  # the first slot since the log was last empty (ramp-up)
    pause: int = 0  # nothing is admitted before this time
    m0: float | None = None  # AIMD: m(t) = min(1, m0 + recovery (t - t0))
    t0: int | None = None
    tdec: int | None = None  # time of the last decrease (cooldown)
    s429: int | None = None  # admissions handed out (seq) at the last 429: strikes
    sh0: float | None = None  # revealed share, recovering likewise
    sht: int | None = None
    shn: int = 0  # refused probes in a row without headers: each doubles the share's hold
    cum: int = 0  # running token total of the log
    seq: int = 0  # admissions handed out
    dec429: int = 0  # AIMD decreases caused by 429s
    decnear: int = 0  # AIMD decreases caused by near-limit headers (no remaining counts)
    shdown: int = 0  # header readings that lowered the share (others' load)
    refunded: int = 0  # failed admissions given back
    sus: int = 0  # a failed admission (seq) waiting for headers to judge it, its slot, cost
    susat: int = 0
    suscost: int = 0
    log: list[Entry] = field(default_factory=list)
    refunds: list[Refund] = field(default_factory=list)


class Reply(NamedTuple):
    """What both scripts return: the slot (RESERVE) and the state a snapshot reports."""

    at: int  # the slot (0 for FEEDBACK)
    now: int
    seq: int  # the admission's number (0 for FEEDBACK)
    multiplier: float  # the pacing's fraction of the limits now
    share: float  # the revealed share now
    pause: int
    dec429: int
    decnear: int
    shdown: int
    refunded: int
    decreased: bool  # FEEDBACK: this answer lowered the multiplier
    waiter: int = 0  # RESERVE: whose slot (0: the head's; i: the i-th waiting cost's)


def _mult(p: Policy, v0: float | None, t0: int | None, now: int) -> float:
    if v0 is None or t0 is None:
        return 1.0
    return min(1.0, v0 + p.aimd_recovery_per_s * max(0, now - t0) / 1000000)


def _share(p: Policy, st: State, now: int) -> float:
    if not p.adaptive:
        return 1.0
    if st.sht is None:
        return _mult(p, st.sh0, None, now)
    return _mult(p, st.sh0, st.sht + (p.share_hold_us << min(st.shn, p.share_hold_doublings)), now)


def _multiplier(p: Policy, st: State, now: int, share: float | None = None) -> float:
    """The pacing's fraction of the limits; `share`: `_share(p, st, now)` if the caller has it."""
    if not p.adaptive:
        return 1.0
    return min(_mult(p, st.m0, st.t0, now), _share(p, st, now) if share is None else share)


def _cap(p: Policy, share: float) -> float:
    """The fraction of each window's budget we fill: a margin below an estimated share."""
    return share - p.share_margin_factor * (1 - p.headroom) * (1 - share)


def _window_cap(p: Policy, st: State, now: int, share: float | None = None) -> float:
    """The fraction of each window's budget we fill now (1 when not adaptive)."""
    if not p.adaptive:
        return 1.0
    return _cap(p, _share(p, st, now) if share is None else share)


def _wlen(p: Policy, w: float) -> int:
    return us(w * (1 + p.window_margin))


class _Window(NamedTuple):
    first: int  # index of the oldest entry after `since`
    n: int  # entries after `since`
    total: int  # their tokens
    before: int  # running total before the first
    n_refunded: int
    t_refunded: int


def _window(st: State, since: int) -> _Window:
    log = st.log
    first = bisect_right(log, since, key=lambda e: e.at)
    n = len(log) - first
    nref = tref = 0
    for r in st.refunds:
        if r.at > since:
            nref += r.req
            tref += r.cost
    if n == 0:
        return _Window(first, 0, 0, 0, nref, tref)
    e0, e1 = log[first], log[-1]
    return _Window(first, n, e1.cum - e0.cum + e0.cost, e0.cum - e0.cost, nref, tref)


def _expire(p: Policy, st: State, now: int) -> None:
    cutoff = now - p.longest_us  # entries strictly older go
    if st.log and st.log[0].at < cutoff:
        del st.log[: bisect_left(st.log, cutoff, key=lambda e: e.at)]
    if st.refunds:
        st.refunds = [r for r in st.refunds if r.at >= cutoff]


def _reply(
    p: Policy,
    st: State,
    now: int,
    at: int,
    seq: int,
    decreased: bool,
    waiter: int = 0,
    share: float | None = None,
    m: float | None = None,
) -> Reply:
    """`share`, `m`: `_share` and `_multiplier` at `now`, if the caller has them."""
    if share is None:
        share = _share(p, st, now)
    return Reply(
        at,
        now,
        seq,
        _multiplier(p, st, now, share) if m is None else m,
        share,
        st.pause,
        st.dec429,
        st.decnear,
        st.shdown,
        st.refunded,
        decreased,
        waiter,
    )


class _Slot(NamedTuple):
    at: int
    rtat: int  # the pacing before this admission
    ttat: int


def _slot(p: Policy, st: State, cost: int, now: int, share: float | None = None) -> _Slot:
    """The earliest slot pacing, pause and every window allow `cost`, after the latest one.
    `share`: `_share(p, st, now)` if the caller has it (the same value, computed once)."""
    cap = _window_cap(p, st, now, share)
    tol = p.tolerance_us
    rtat = now + tol if st.rtat is None else st.rtat
    ttat = now + tol if st.ttat is None else st.ttat
    at = max(now, rtat - tol, ttat - tol, st.pause, st.last)
    base = at
    log = st.log
    # Shortcut (no change to the result): when the whole log and this request fit the
    # smallest window budget, no window can push the slot. Far below the limits (a job's
    # limits above what it can send) every admission takes it.
    if not log or (
        len(log) + 1 <= p.least_requests * cap
        and log[-1].cum - log[0].cum + log[0].cost + cost <= p.least_tokens * cap
    ):
        return _Slot(at, rtat, ttat)
    for w in p.request_windows_s:
        length = _wlen(p, w)
        since = base - length
        win = _window(st, since)
        excess = win.n - win.n_refunded + 1 - p.rpm * w / 60 * cap
        if win.n > 0 and excess > 0:
            need = math.ceil(excess)
            i = win.first + min(win.n, need) - 1
            if win.n_refunded:  # given-back entries leave freeing nothing: step past them
                while (
                    i < win.first + win.n - 1
                    and i - win.first + 1 - _refunded_through(st, since, log[i].seq)[0] < need
                ):
                    i += 1
            at = max(at, log[i].at + length)
    for w in p.token_windows_s:
        length = _wlen(p, w)
        since = base - length
        win = _window(st, since)
        excess = win.total - win.t_refunded + cost - p.tpm * w / 60 * cap
        if win.total > 0 and excess > 0:
            lo, hi = win.first, win.first + win.n - 1
            while lo < hi:  # the first entry whose leaving frees `excess`
                mid = (lo + hi) // 2
                if log[mid].cum - win.before >= excess:
                    hi = mid
                else:
                    lo = mid + 1
            if win.t_refunded:  # ... counting what given-back entries free: nothing
                while (
                    lo < win.first + win.n - 1
                    and log[lo].cum - win.before - _refunded_through(st, since, log[lo].seq)[1]
                    < excess
                ):
                    lo += 1
            at = max(at, log[lo].at + length)
    return _Slot(at, rtat, ttat)


def _refunded_through(st: State, since: int, seq: int) -> tuple[int, int]:
    """Requests and tokens given back among the entries after `since` up to number `seq`."""
    n = t = 0
    for r in st.refunds:
        if r.at > since and r.seq <= seq:
            n += r.req
            t += r.cost
    return n, t


def _commit(p: Policy, st: State, cost: int, slot: _Slot, m: float) -> None:
    st.rtat = math.floor(max(slot.rtat, slot.at) + 60000000 / (p.rpm * p.headroom * m) + 0.5)
    st.ttat = math.floor(max(slot.ttat, slot.at) + cost * 60000000 / (p.tpm * p.headroom * m) + 0.5)
    if not st.log:
        st.start = slot.at
    st.cum += cost
    st.seq += 1
    st.log.append(Entry(slot.at, st.cum, st.seq, cost))
    st.last = slot.at


def _pack(p: Policy, st: State, cost: int, at: int, now: int, look: Sequence[int]) -> int:
    """Which of the head (0) and `look` (1-based) should take the head's slot `at`, so that the
    two going first fill the token windows' room at `at` best; 0 unless the room is short.

    FIFO takes the head whatever room it leaves: with requests of similar size the leftover is
    up to one request (half of one on average, ~3 % of a 10 s window at Langdock's limits). A
    pair is scored, not one request: the largest that fits alone can leave a room no other
    fits, where two smaller ones fill it. Only token room counts (what differs between
    costs); the choice is committed at its own exact slot, never later than the head's.
    """
    cap = _window_cap(p, st, now)
    room = math.inf
    for w in p.token_windows_s:
        win = _window(st, at - _wlen(p, w))
        room = min(room, p.tpm * w / 60 * cap - (win.total - win.t_refunded))
    if cost > room:
        return 0
    fits = [(0, cost)]
    fits += [(i, c) for i, c in enumerate(look, 1) if c <= room]
    if len(fits) == 1 or cost + max(c for _, c in fits[1:]) <= room:
        return 0  # the room is not short: the head and any other fit together
    best, pick = -1, 0
    for i, c in fits:
        second = 0
        for j, c2 in fits:
            if j != i and c2 > second and c + c2 <= room:
                second = c2
        if c + second > best:
            best, pick = c + second, i
    return pick


def reserve(
    p: Policy, st: State, cost: int, now: int, waiting: Sequence[int] = (), passed: int = 0
) -> Reply:
    """Take the earliest slot pacing, pause and every window allow, and commit it.

    `waiting`: the costs of the requests queued behind this one (in order). When this one must
    wait, the first of the next `p.lookahead` that can go before its slot without moving that
    slot (it fits the room the head would leave) takes the earlier slot instead. Otherwise,
    when the token room at the head's slot is short, the one (head or waiting) that best fills
    it with a second takes the slot (`_pack`), unless the head has already handed over
    `passed` >= `p.lookahead_passes` slots. The reply's `waiter` names whose slot it is
    (1-based; 0: the head's own).
    """
    _expire(p, st, now)
    if not waiting and st.m0 is None and st.sh0 is None:
        # Nothing ever lowered the pace (multiplier, share and window cap 1) and no one waits:
        # the head's own slot, as below, in fewer steps (a job far below its limits, where
        # this path's CPU shows, takes it at every admission).
        head = _slot(p, st, cost, now, 1.0)
        _commit(p, st, cost, head, 1.0)
        return _reply(p, st, now, head.at, st.seq, False, share=1.0, m=1.0)
    # Nothing below changes the share or the multiplier (only pacing, log and sequence).
    share = _share(p, st, now)
    m = _multiplier(p, st, now, share)
    head = _slot(p, st, cost, now, share)
    if head.at > now and waiting:
        look = waiting[: p.lookahead]
        for i, other in enumerate(look):
            if other >= cost:
                continue
            fill = _slot(p, st, other, now)
            if fill.at >= head.at:
                continue
            kept = (st.rtat, st.ttat, st.last, st.start, st.cum, st.seq)
            _commit(p, st, other, fill, m)
            if _slot(p, st, cost, now).at <= head.at:
                return _reply(p, st, now, fill.at, st.seq, False, i + 1)
            st.rtat, st.ttat, st.last, st.start, st.cum, st.seq = kept
            st.log.pop()
        if passed < p.lookahead_passes:
            i = _pack(p, st, cost, head.at, now, look)
            if i:
                fill = _slot(p, st, look[i - 1], now)
                if fill.at <= head.at:
                    _commit(p, st, look[i - 1], fill, m)
                    return _reply(p, st, now, fill.at, st.seq, False, i)
    _commit(p, st, cost, head, m)
    return _reply(p, st, now, head.at, st.seq, False, share=share, m=m)


def _estimates(
    p: Policy,
    st: State,
    left: int,
    limit: int,
    tokens: bool,
    now: int,
    end: int,
    without: Refund | None,
) -> float | None:
    """The largest (usage over w + remaining) / budget over the windows that can hold `left`;
    the windows end at `end`, what the server had seen of us when it answered."""
    best: float | None = None
    windows = p.header_windows_s
    if st.log and now - st.start < us(min(windows)):
        windows = windows + p.ramp_header_windows_s
    after = _window(st, end)  # sent after the answered request: not seen by the server
    for w in windows:
        budget = limit * w / 60
        if left > budget:
            continue  # the header cannot describe a window this small
        since = end - us(w)
        win = _window(st, since)
        if tokens:
            used = win.total - win.t_refunded - (after.total - after.t_refunded)
        else:
            used = win.n - win.n_refunded - (after.n - after.n_refunded)
        if without is not None and since < without.at <= end:
            used = used - (without.cost if tokens else 1)
        est = (used + left) / budget
        if best is None or est > best:
            best = est
    return best


def _end(sig: Signal, now: int) -> int:
    return sig.sent_at if 0 < sig.sent_at <= now else now


def _judge_failed(p: Policy, st: State, sig: Signal, now: int) -> None:
    """Give back the suspect failed admission if this answer's headers show it was not charged."""
    entry = Refund(st.susat, st.sus, st.suscost)
    st.sus = st.susat = st.suscost = 0
    if entry.at < now - p.longest_us:
        return  # out of every window already
    if sig.remaining_tokens is not None:
        left, limit, tokens = sig.remaining_tokens, p.tpm, True
    else:
        assert sig.remaining_requests is not None
        left, limit, tokens = sig.remaining_requests, p.rpm, False
    end = _end(sig, now)
    with_it = _estimates(p, st, left, limit, tokens, now, end, None)
    without = _estimates(p, st, left, limit, tokens, now, end, entry)
    if with_it is not None and without is not None and with_it > 1 >= without:
        st.refunds.append(Refund(entry.at, entry.seq, entry.cost))
        st.refunded += 1


def feedback(p: Policy, st: State, sig: Signal, now: int) -> Reply:
    """Apply one answer's signal: share, pause, AIMD, failed admissions."""
    _expire(p, st, now)
    share = _share(p, st, now)
    before = _multiplier(p, st, now)
    cooled = st.tdec is None or now - st.tdec >= us(p.aimd_cooldown_s)
    strike = sig.is_429 and (
        p.aimd_strike_requests == 0
        or (st.s429 is not None and st.seq - st.s429 <= p.aimd_strike_requests)
    )
    # The admission a 429 refused (its tokens were not charged).
    refused = Refund(sig.failed_at, sig.failed_seq, sig.failed_cost, 0)
    if sig.failed_seq and not sig.is_429:
        st.sus, st.susat, st.suscost = sig.failed_seq, sig.failed_at, sig.failed_cost
    if st.sus and sig.has_headers:
        _judge_failed(p, st, sig, now)
    revealed: float | None = None
    if p.adaptive:
        for left, limit, tokens in (
            (sig.remaining_requests, p.rpm, False),
            (sig.remaining_tokens, p.tpm, True),
        ):
            if left is None:
                continue
            best = _estimates(p, st, left, limit, tokens, now, _end(sig, now), None)
            if best is not None and (revealed is None or best < revealed):
                revealed = best
        from_headers = revealed is not None
        # Past its hold, a revealed share recovers: we probe above it, and a 429 there is the
        # answer to the probe, not jitter (waiting for a second one cost a 429 per probe).
        probing = st.sh0 is not None and st.sht is not None and share > st.sh0
        if (
            revealed is None
            and sig.bound
            and not sig.has_headers
            and (strike or (sig.is_429 and probing))
            and len(st.log) >= 10
        ):
            # A 429 without headers: the window that refused held our usage and others', and
            # had no room for the refused request. Our share lies between our usage over it
            # without that request (it fitted) and with it (it did not): the lower end is
            # taken, since at the upper one the next request like it is refused again (at
            # Langdock's limits one request is ~6 % of a 10 s window: 7-8 % of the answers
            # were 429s). Which window refused is not known: the largest reading bounds them
            # all. Only on a strike or a probe (a lone 429 is jitter) and from 10 admissions on
            # (a hiccup right at the start must not take the share away; the ramp's 1 s reading
            # covers the rest).
            without = None if refused in st.refunds else refused  # (reported twice: given back)
            upper: float | None = None
            lower: float | None = None
            for limit, tokens in ((p.rpm, False), (p.tpm, True)):
                hi = _estimates(p, st, 0, limit, tokens, now, _end(sig, now), None)
                lo = _estimates(p, st, 0, limit, tokens, now, _end(sig, now), without)
                if hi is not None and (upper is None or hi > upper):
                    upper = hi
                if lo is not None and (lower is None or lo > lower):
                    lower = lo
            # Our own pacing fills a window up to the headroom: a reading whose upper end is
            # that close to the share is a 429 of jitter at a full window's edge, not others'.
            # Unless it is a strike: the server refused what we believe fits twice within
            # `aimd_strike_requests` admissions. The share is then a little high (read from a
            # ramp-up window: 0.628 for a true 0.6 drew a 429 every 10 s at Langdock's limits,
            # each taken for jitter), less than a request: the middle of the bracket, as the
            # lower end would throttle by a whole request (0.877 of the quota, not 0.905).
            if upper is not None and lower is not None:
                if upper < share - p.share_margin_factor * (1 - p.headroom):
                    revealed = lower
                elif strike and lower < share:
                    revealed = min(share, (lower + upper) / 2)  # a 429 never raises it
        if revealed is not None:
            # A 429 answering a probe (the share recovering, not yet whole) doubles the next
            # hold; a header reading, or a 429 once the share had recovered whole, starts over.
            st.shn = st.shn + 1 if not from_headers and probing and share < 1.0 else 0
            revealed = max(p.aimd_min, min(1.0, revealed))
            tau = us(p.share_smoothing_s if revealed >= share else p.share_smoothing_down_s)
            if st.sht is not None and tau > 0:
                weight = 1 - math.exp(-max(0, now - st.sht) / tau)
                revealed = share + weight * (revealed - share)
            if revealed < share - 1e-3:
                st.shdown += 1
            st.sh0, st.sht, share = revealed, now, revealed
    # A 429 naming its admission: the server refused it and charged no tokens. Counted on,
    # they read as our usage in the next headers (~a request over the share for a window:
    # 429s again) and held a window's room for nothing.
    # Reported twice, it is given back once (a set in Redis).
    recent = refused.at >= now - p.longest_us
    if sig.is_429 and sig.failed_seq and recent and refused not in st.refunds:
        st.refunds.append(refused)
    # A near-limit answer our own sending (within the share) explains needs no pause: the
    # windows hold the next request back until it fits.
    explained = False
    if sig.near_limit and not sig.is_429:
        cap = _cap(p, share)
        slack = us(p.feedback_slack_s)
        if sig.by_requests:
            for w in p.request_windows_s:
                win = _window(st, now - _wlen(p, w) - slack)
                if win.n - win.n_refunded + 1 > p.rpm * w / 60 * cap:
                    explained = True
        if sig.by_tokens:
            for w in p.token_windows_s:
                win = _window(st, now - _wlen(p, w) - slack)
                if win.total - win.t_refunded + sig.last_cost > p.tpm * w / 60 * cap:
                    explained = True
    limited = sig.is_429 or (sig.near_limit and not explained)
    pause_s = min(sig.pause_s, p.max_pause_s)
    if limited and pause_s > 0 and now + us(pause_s) > st.pause:
        st.pause = now + us(pause_s)
        # Resume at the paced rate: a pacing left in the past would let the tolerance's burst
        # go at once when the pause ends, into a window that just freed one entry.
        tol = us(p.tolerance_s)
        st.rtat = max(st.rtat if st.rtat is not None else 0, st.pause + tol)
        st.ttat = max(st.ttat if st.ttat is not None else 0, st.pause + tol)
    m = _mult(p, st.m0, st.t0, now)
    if sig.is_429:
        st.s429 = st.seq
    if p.adaptive and (strike or (limited and not sig.is_429 and revealed is None)) and cooled:
        m = max(p.aimd_min, m * p.aimd_beta)
        st.m0, st.t0, st.tdec = m, now, now
        if sig.is_429:
            st.dec429 += 1
        else:
            st.decnear += 1
    after = _multiplier(p, st, now)
    return _reply(p, st, now, 0, 0, after < before - _EPS)


def check_cost(model: str, cost: int, tpm: int) -> None:
    """Refuse at once what can never be admitted (the engine records such rows as errors)."""
    if cost < 0:
        raise ValueError(f"negative token cost {cost} for model {model!r}")
    if cost > tpm:
        raise ValueError(
            f"a request to {model!r} costs {cost} tokens at admission, more than the whole "
            f"per-minute limit of {tpm}: it can never be sent. Shorten the prompt or lower "
            "max_tokens (or raise the model's tpm in the job file if the quota is larger)."
        )


def status(p: Policy, st: State, now: int) -> Reply:
    """The state a snapshot reports, at `now`; changes nothing."""
    return _reply(p, st, now, 0, 0, False)
