"""The circuit breaker's decision, with the clock given: when an outage trips it, when not."""

from __future__ import annotations

from batcher.breaker import CircuitBreaker, RefusalStreak


def test_trips_after_k_same_failures_across_rows() -> None:
    cb = CircuitBreaker(failures=10, window_s=60)
    tripped = [cb.failure("5xx", f"r{i % 4}", now=i * 0.1) for i in range(10)]
    assert tripped == [False] * 9 + [True]
    assert cb.tripped == "unavailable"
    assert cb.failure("5xx", "r1", now=2.0) is False  # reports the trip once


def test_a_success_resets_the_streak() -> None:
    cb = CircuitBreaker(failures=3, window_s=60)
    cb.failure("429", "a", 0)
    cb.failure("429", "b", 0)
    cb.success()
    assert not cb.failure("429", "a", 0)
    assert not cb.failure("429", "b", 0)
    assert cb.failure("429", "c", 0)


def test_429s_and_503s_in_turn_are_an_overload() -> None:
    cb = CircuitBreaker(failures=4, window_s=60)
    kinds = ["429", "5xx", "429", "5xx"]
    assert [cb.failure(k, f"r{i}", i) for i, k in enumerate(kinds)] == [False] * 3 + [True]
    assert cb.tripped == "overloaded"


def test_an_outage_mixing_5xx_drops_and_timeouts_trips() -> None:
    cb = CircuitBreaker(failures=4, window_s=60)
    kinds = ["5xx", "connection", "timeout", "truncated"]
    assert [cb.failure(k, f"r{i}", i) for i, k in enumerate(kinds)] == [False] * 3 + [True]
    assert cb.tripped == "unavailable" and set(cb.kinds) == set(kinds)


def test_one_row_failing_alone_is_not_an_outage() -> None:
    """At concurrency 1 a poisoned row's own attempts must not stop the job."""
    cb = CircuitBreaker(failures=3, window_s=60)
    assert not any(cb.failure("5xx", "only", t) for t in range(8))
    assert cb.failure("5xx", "next", 9)


def test_failures_spread_wider_than_the_window_do_not_trip() -> None:
    cb = CircuitBreaker(failures=3, window_s=10)
    cb.failure("5xx", "a", 0)
    cb.failure("5xx", "b", 5)
    assert not cb.failure("5xx", "c", 11)  # the streak restarts at 11
    assert cb.tripped is None


def test_default_trips_before_a_row_spends_its_attempts_at_concurrency_4_to_64() -> None:
    """Round-robin failures over c rows: no row reaches 8 attempts before the trip."""
    for concurrency in (4, 8, 16, 64):
        cb = CircuitBreaker()
        attempts: dict[str, int] = {}
        i = 0
        while cb.tripped is None:
            row = f"r{i % concurrency}"
            attempts[row] = attempts.get(row, 0) + 1
            cb.failure("429", row, now=i * 0.01)
            i += 1
        assert max(attempts.values()) < 8, (concurrency, attempts)


def test_refusals_become_the_jobs_after_enough_different_rows_of_one_model() -> None:
    """Each refusal: its request's number, and how many had been sent when it came back."""
    streak = RefusalStreak()
    assert streak.watches(403) and streak.watches(404) and not streak.watches(400)
    assert not streak.refused(403, "m", "r1", sent=1, known=1)
    assert not streak.refused(403, "m", "r1", sent=2, known=2)  # the same row again: one row
    assert not streak.refused(403, "other", "r2", sent=3, known=3)  # another model's streak
    assert streak.refused(403, "m", "r3", sent=4, known=4)  # a second row of "m": the key
    assert not streak.refused(404, "m", "r1", sent=5, known=5)
    assert not streak.refused(404, "m", "r2", sent=6, known=6)
    assert streak.refused(404, "m", "r3", sent=7, known=7)  # 404 needs three rows
    assert streak.first_seq(404, "m") == 5 and streak.first_seq(404, "none") == 0


def test_refusals_of_requests_sent_together_are_one() -> None:
    """Requests sent before the first refusal came back reached the server around it, in any
    order: their refusals show nothing went on (two blocked prompts sent together). Only a
    refusal of a request sent after it came back does."""
    streak = RefusalStreak()
    assert not streak.refused(403, "m", "r36", sent=36, known=40)
    assert not streak.refused(403, "m", "r37", sent=37, known=40)  # sent before r36 came back
    assert not streak.refused(403, "m", "r38", sent=38, known=41)
    assert streak.refused(403, "m", "r41", sent=41, known=41)  # sent after r36 came back
    streak = RefusalStreak()
    assert not streak.refused(404, "m", "a", sent=10, known=14)
    assert not streak.refused(404, "m", "b", sent=15, known=16)
    assert not streak.refused(404, "m", "c", sent=11, known=17)  # before the first came back
    assert streak.refused(404, "m", "d", sent=16, known=18)


def test_only_an_answer_to_a_request_sent_after_a_refusal_came_back_clears_it() -> None:
    """An answer to a request sent before the refusal came back may have reached the server
    first (another connection), while the key or the deployment still worked: it proves
    nothing about the refusal."""
    streak = RefusalStreak()
    assert not streak.refused(403, "m", "r1", sent=10, known=12)
    streak.answered("m", seq=11)  # sent after r1's request, before its refusal came back
    streak.answered("m", seq=12)
    assert streak.refused(403, "m", "r2", sent=13, known=13)
    streak = RefusalStreak()
    assert not streak.refused(403, "m", "r1", sent=10, known=10)
    streak.answered("other", seq=11)  # another model answering says nothing of this one
    assert streak.refused(403, "m", "r2", sent=12, known=12)
    streak = RefusalStreak()
    assert not streak.refused(403, "m", "r1", sent=10, known=10, held="r1's error row")
    assert streak.answered("m", seq=11) == ["r1's error row"]  # sent after: r1's own
    assert not streak
    assert not streak.refused(403, "m", "r2", sent=12, known=12, held="r2")
    assert streak.refused(403, "m", "r3", sent=13, known=13, held="r3")
    assert sorted(streak.take_all()) == ["r2", "r3"] and not streak
