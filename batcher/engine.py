"""Wires the stages of `batcher run`: scan -> journal -> prepare -> admit -> send -> persist.

    reader ──► prepare (body + cost) ──► queue ──► workers ──► limiter.acquire ──► client
       (thread, batches)                (bounded)     │                              │
                                                      ◄──── retry policy (tenacity) ◄┘
                                                      └──► journal.add (fsync) ──► stats
    end: journal ──► Parquet (atomic)

A worker hands its result to the journal's next group commit and takes the next row; past
`concurrency` rows waiting for their commit (a slow disk) it waits for it. So at any moment
at most `concurrency` requests are in flight and `concurrency` answers wait for the disk: the
most a crash can make us pay twice (answers in the response store are not paid again).

The engine returns a `RunOutcome` (data: why it stopped, counts, the error) and never prints
a summary: the CLI and the Python API render it. Every stop (a signal, a rejected key, a full
disk, an outage the circuit breaker saw) goes the same way: nothing new is admitted, requests
in flight finish and are journaled within the grace period, then the run ends (`stopping.py`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import signal
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from batcher.admission import Limiter, make_limiter
from batcher.answers import result_from_answer
from batcher.breaker import CircuitBreaker, RefusalStreak
from batcher.budget import Spending
from batcher.cache import CacheEntry, CacheKey, ResponseStore, resolve_store_path
from batcher.client import Answer, ChatClient
from batcher.collector import run_collector
from batcher.errors import (
    AnswerTooLarge,
    APIConnectionError,
    APIError,
    AuthenticationError,
    BadRequest,
    BatcherError,
    BudgetReached,
    EndpointMoved,
    InputDataError,
    JobSpecError,
    RateLimited,
    RetryableAPIError,
    StorageError,
    TruncatedAnswer,
    WebPageAnswer,
    failure_kind,
    refusal_message,
)
from batcher.journal import (
    BAD_ROW_HASH,
    DoneRows,
    JobLock,
    Journal,
    JournalState,
    end_record,
    journal_path,
    key_hash,
    open_journal,
    read_state,
)
from batcher.models import MOCK_HEADER
from batcher.monitoring import RunMonitoring
from batcher.outcome import RunOutcome, StopReason
from batcher.prepare import Built, Prepared, Preparer
from batcher.progress import ProgressMode
from batcher.readers import InputReader, Row, input_digest, open_input, resolve_keep
from batcher.records import SOURCE_CACHE, SOURCE_DEDUPE, STATUS_ERROR, Request, Result
from batcher.repair import repair_request
from batcher.requests import RequestBuilder
from batcher.retrying import retry_policy
from batcher.reuse import Reuse
from batcher.scan import scan_input
from batcher.secrets import resolve_api_key
from batcher.sharding import shard_of, shard_output, stable_hash
from batcher.spec import Job, request_fingerprint
from batcher.stats import RunStats
from batcher.stopping import RunStop
from batcher.storage import publish, with_name
from batcher.structured import StructuredOutput
from batcher.tokens import encoding_for_model
from batcher.writer import write_batch_output_ordered, write_output_ordered

log = logging.getLogger("batcher")

READ_BATCH = 512
# A batch's message text, in characters, up to which its tokens are counted on the loop (~5 ms
# of encoding; 512 prompts of 200 words took 21 ms, of 20,000 words 1.8 s: in the thread).
COUNT_ON_LOOP_CHARS = 200_000
# An input whose rows take up to this much memory is read once and kept for the send and the
# output (`InputReader.hold`); a larger one is read afresh each time, so memory stays flat.
HOLD_INPUT_BYTES = 32 << 20
PROBE_FAILURES_FATAL = 3  # the first N requests all failing means the setup is wrong


@dataclass(frozen=True, slots=True)
class RunOptions:
    restart: bool = False
    retry_errors: bool = False
    shard: tuple[int, int] | None = None  # (K, N), 1-based
    progress: ProgressMode = "auto"
    base_url: str | None = None  # overrides the job's endpoint (used by --mock)
    api_key: str | None = None  # overrides the key variable (used by --mock)
    fsync: bool = True  # False only for the benchmark that measures what durability costs
    # SIGINT/SIGTERM stop the run gracefully. Off where the loop is not ours (Jupyter's, a
    # thread's): the Python API stops the run by cancelling it instead.
    handle_signals: bool = True
    read_cache: bool = True  # False: --no-cache, ask afresh (answers are still stored)
    mock: bool = False  # the bundled server answers: its own response store, never the user's
    max_cost_usd: float | None = None  # --max-cost: overrides the job's max_cost_usd
    sample: int | None = None  # --sample N: only N rows chosen by a hash of the id


def _rows_own_fault(result: Result) -> bool:
    """An error the row alone causes (too long for the model), whatever the setup."""
    return "context_length_exceeded" in (result.error or "")


class _Abandoned(Exception):
    """A row whose attempts a stop cut short: it stays undone (a rerun sends it), no error row."""


class _Held(Exception):
    """A row refused with a 403 or a 404 that may be the row's own or the whole job's: held in
    the `RefusalStreak` (not journaled) until its model answers a request sent after it (then
    it is an error row) or more rows are refused alike (then the job stops and the row stays
    undone). Its worker goes on to the next row."""


def _billed(exc: BaseException) -> bool:
    """Whether the server may bill an attempt that ended in `exc` (the budget then books its
    worst case, so the cap holds across runs)."""
    if isinstance(exc, WebPageAnswer):  # a proxy's or a login page: not the API's answer
        return False
    if isinstance(exc, TruncatedAnswer):  # a 2xx we could not read
        return True
    if isinstance(exc, AnswerTooLarge):  # a 2xx too large to keep; an error body is not billed
        return 200 <= (exc.status or 0) < 300
    # Cancelled after it was sent (grace period over, a second Ctrl-C): it may be billed.
    return isinstance(exc, asyncio.CancelledError)


class Engine:
    """One `batcher run`. Build it, then `await run()`; it never raises for row-level trouble."""

    def __init__(self, job: Job, options: RunOptions, limiter: Limiter | None = None) -> None:
        self.reader: InputReader = open_input(job)
        self.job = job = resolve_keep(job, self.reader)  # keep_columns: all -> the columns
        self.options = options
        self.output = shard_output(job.output, *options.shard) if options.shard else job.output
        # The job's --sample output and journal, beside its own: one budget covers both.
        sample_output = self.output.with_name(f"{self.output.stem}.sample{self.output.suffix}")
        self._sibling = self.output  # the other one of the two
        if options.sample is not None:
            self.output = sample_output
        else:
            self._sibling = sample_output
        self._demo_seen = False  # an answer signed by the bundled server came back
        self.limiter = limiter or make_limiter(job)
        self.stats = RunStats()
        self.structured = self._structured()
        self.builder = RequestBuilder(job, batch_format=self.reader.format == "batch")
        self.preparer = Preparer(job, self.builder)
        needed = {*self.builder.template_columns, *job.keep_columns}
        if job.id_column:
            needed.add(job.id_column)
        if self.builder.templates is None:
            needed.add("messages")
        self.reader.select(needed)
        self.reader.hold(HOLD_INPUT_BYTES)
        self._queue: asyncio.Queue[Request | None] = asyncio.Queue(maxsize=job.concurrency * 2)
        self._journal: Journal | None = None
        self._client: ChatClient | None = None
        # the journaled rows and the key hash of each one's request: rows to leave out
        self._done = DoneRows.empty()
        self._input_digest = ""  # the input's identity when the run began
        self._sample_max: int | None = None  # the largest id hash --sample takes
        cap = options.max_cost_usd if options.max_cost_usd is not None else job.max_cost_usd
        self.spending = Spending(job.prices, cap, self.stats)
        self.budget = self.spending.budget
        self.reuse: Reuse | None = None  # opened with the journal
        self._monitor: RunMonitoring | None = None
        self._halt = RunStop(job.grace_period_s)  # every early stop goes through it
        self._opened = asyncio.Event()  # set by the first 2xx answer: the setup works
        self._probe_lock = asyncio.Lock()
        self._policy = retry_policy(job.retry)
        # While probing the setup: fewer, shorter retries before saying it is wrong.
        self._probe_policy = retry_policy(
            job.retry.model_copy(
                update={
                    "max_attempts": min(job.retry.max_attempts, 3),
                    "max_wait_s": min(job.retry.max_wait_s, 5.0),
                }
            )
        )
        self._probe_failures = 0
        self._warned_default_max = False
        cb = job.circuit_breaker
        # A timeout reports its failure timeout_s after the send: two of them must fit.
        self._breaker = CircuitBreaker(
            cb.failures, max(cb.window_s, 2.0 * job.endpoint.timeout_s + 1.0)
        )
        self._refusals = RefusalStreak()
        self._sent_seq = 0  # attempts sent so far: the order the refusal streak compares
        self._in_flight_seqs: set[int] = set()  # the attempts sent and not yet answered
        self._suspect = False  # refusals wait for a decision: one request at a time
        self._suspect_since = 0  # ... until a request sent after this one is answered

    def _structured(self) -> StructuredOutput | None:
        try:
            return StructuredOutput.from_params(self.job.params)
        except ValueError as exc:
            said = str(exc)  # most name their key already
            where = "" if said.startswith("params.") else "params.response_format: "
            raise JobSpecError(f"{where}{said}") from None

    # ---- before sending: everything that can be wrong with the input is found here ----

    def _in_shard(self, row_id: str) -> bool:
        """This run's rows: its shard (--shard K/N), and the sample (--sample N)."""
        if self.options.shard is not None:
            k, n = self.options.shard
            if shard_of(row_id, n) != k:
                return False
        return self._sample_max is None or stable_hash(row_id) <= self._sample_max

    def _done_row(self, row_id: str, key: CacheKey | None) -> bool:
        """Does the journal hold this row's answer to this very request? (A row whose request
        changed since, e.g. an edited template or input text, is asked again; a bad row that
        was fixed too.)"""
        held = self._done.held(row_id)
        if held is None:
            return False
        if key is None:  # bad now: done if it was bad before (or from before keys were kept)
            return held in (0, BAD_ROW_HASH)
        if held == 0:  # a record from before keys were kept: its answer stands
            return True
        return held == key_hash(key.key)

    def scan(self) -> int:
        """Read the whole input once (batcher/scan.py); this run's row count."""
        found = scan_input(
            self.job,
            self.reader,
            self.builder,
            selected=self._in_shard,
            sample=self.options.sample,
        )
        self._sample_max = found.sample_max
        # An entry no request uses is a typo; with no request at all (no rows, or only bad
        # ones) there is nothing to compare the limits: with (the job's model was checked).
        if found.models:
            self.job.check_limit_models(set(found.models))
        self.spending.check_priced(found.models)
        return found.rows

    # ---- producing requests ----

    def _prepare(
        self, it: Iterator[list[Row]]
    ) -> tuple[Built | Prepared, list[Result], list[int], int] | None:
        """Runs in a worker thread: next input batch -> (its requests built, answers served
        from the store and their store entries, rows the journal already answers).

        The requests' tokens are counted on the loop (`_use`): tiktoken releases the GIL for
        every text it encodes, and in a thread beside a busy loop each release handed the GIL
        over and back, two context switches a row. Counted here: a batch of long texts (over
        COUNT_ON_LOOP_CHARS: encoding them would hold the loop, and a long text's encoding
        outweighs its hand-off), and a job that fetches remote image sizes (network I/O)."""
        batch = next(it, None)
        if batch is None:
            return None
        in_shard = self._in_shard
        built = self.preparer.build([r for r in batch if in_shard(r.id)])
        skipped = built.drop(self._done_row) if len(self._done) else 0
        served: list[Result] = []
        entries: list[int] = []
        if self.reuse is not None:
            served, entries = self.preparer.serve(built, self.reuse)
        if self.job.images.fetch_sizes or built.text_chars() > COUNT_ON_LOOP_CHARS:
            return self.preparer.count(built), served, entries, skipped
        for model in built.by_model:
            encoding_for_model(model)  # its vocabulary loads here (~0.2 s once), not on the loop
        return built, served, entries, skipped

    async def _produce(self) -> None:
        it = iter(self.reader.iter_batches(READ_BATCH))
        # One batch ahead: the next is prepared in its thread while this one's rows wait for
        # the journal (fsync) and the queue. Never more than one: `it` is not thread-safe.
        ahead: asyncio.Future[Any] | None = asyncio.ensure_future(
            asyncio.to_thread(self._prepare, it)
        )
        try:
            while not self._halt.stopping and ahead is not None:
                # shielded: a stop cancels this task, not the batch being prepared, so that
                # `finally` below can wait for its thread (it reads the input, the store)
                step = await asyncio.shield(ahead)
                ahead = None
                if step is None:
                    break
                ahead = asyncio.ensure_future(asyncio.to_thread(self._prepare, it))
                await self._use(*step)
        finally:
            if ahead is not None:  # a stop: that batch is dropped (nothing of it went out)
                with contextlib.suppress(Exception):
                    await ahead  # its thread uses the input and the store: let it end first
        for _ in self._halt.workers:
            await self._queue.put(None)

    async def _use(
        self, built: Built | Prepared, served: list[Result], entries: list[int], skipped: int
    ) -> None:
        """One prepared batch: its tokens counted, its error rows and store answers journaled
        (and counted as the store's hits), its requests queued for the workers (or joined to
        an identical one in flight)."""
        prepared = built if isinstance(built, Prepared) else self.preparer.count(built)
        self.stats.done_before += skipped
        if prepared.default_max_tokens and self.budget.cap_usd is not None:
            raise JobSpecError(
                "max_cost_usd needs params.max_tokens (or max_completion_tokens in every "
                "request): without it an answer may cost more than the budget reserves "
                f"for it ({self.job.assumed_max_tokens} tokens, assumed_max_tokens)"
            )
        if prepared.default_max_tokens and not self._warned_default_max:
            self._warned_default_max = True
            log.warning(
                "requests set no max_tokens: each is charged %d tokens at admission "
                "(assumed_max_tokens), as the server does; set params.max_tokens to "
                "send faster",
                self.job.assumed_max_tokens,
            )
        for req in prepared.requests:  # here, not in the thread: displays read stats
            if req.model not in self.stats.limits:
                limit = self.job.limit_for(req.model)
                self.stats.limits[req.model] = (limit.rpm, limit.tpm)
        if prepared.errors or served:
            await self._finish_many([*prepared.errors, *served])
        if self.reuse is not None:
            self.reuse.used(entries)
        # Rows an identical request just answered are journaled together (a commit per row
        # waited out the journal's commit gap row after row), and before the queue makes the
        # producer wait.
        shared: list[Result] = []
        for req in prepared.requests:
            claim = True if self.reuse is None else self.reuse.claim(req)
            if isinstance(claim, Result):  # an identical request was just answered
                shared.append(claim)
            elif claim:
                if shared and self._queue.full():
                    await self._finish_many(shared)
                    shared = []
                await self._queue.put(req)
        if shared:
            await self._finish_many(shared)
        if self.reuse is not None:
            await self._flush_store(self.reuse.take_pending())

    # ---- sending ----

    async def _worker(self) -> None:
        me = asyncio.current_task()
        assert me is not None
        while not self._halt.stopping:
            req = await self._queue.get()
            if req is None or self._halt.stopping:
                return
            try:
                result, answer = await self._process(req)
            except _Held:  # the streak decides later whose fault it was
                continue
            except _Abandoned:
                if self.reuse is not None:
                    self.reuse.abandoned(req)
                return
            except BatcherError as exc:
                if self.reuse is not None:
                    self.reuse.abandoned(req)
                reason = StopReason.BUDGET if isinstance(exc, BudgetReached) else StopReason.FATAL
                self._halt.stop(reason, exc)  # no other worker sends another request
                return
            shared = [] if self.reuse is None else self.reuse.answered(req, result, answer)
            try:  # one commit for the row and the rows that waited for its answer
                await self._finish_many([result, *shared])
            except BatcherError as exc:  # the journal cannot take it (disk full, replaced)
                self._halt.stop(StopReason.FATAL, exc)
                return
            finally:
                # Busy from its first send (`_attempt`) through any repairs until the journal
                # has the answers: a stop waits for a paid answer, not for an idle worker.
                self._halt.busy.discard(me)

    async def _process(self, req: Request) -> tuple[Result, Answer | None]:
        """Until the server has answered once (any 2xx), requests go one at a time, so a wrong
        key, URL or model costs one request, not a wave of `concurrency` requests."""
        if not self._opened.is_set():
            async with self._probe_lock:
                if not self._opened.is_set():
                    return await self._repair(req, *await self._probe(req))
        if self._suspect:  # refusals wait for a decision: one request at a time
            async with self._probe_lock:
                sent = await self._send(req)
        else:
            sent = await self._send(req)
        if self.structured is None:  # nothing to repair (one coroutine less per row)
            return sent
        return await self._repair(req, *sent)

    async def _repair(
        self, req: Request, result: Result, answer: Answer | None
    ) -> tuple[Result, Answer | None]:
        """A structured answer that does not validate is asked again with the validator's
        message as a follow-up turn; one cut off by max_tokens, with twice the max_tokens (up
        to structured.max_tokens_ceiling). Each repair is a request like any other: paced,
        retried, counted, paid. A row that still fails keeps the last answer."""
        cfg = self.job.structured
        repairs, attempts, cost, current = 0, result.attempts, result.cost_usd, req
        while repairs < cfg.max_repairs and not result.ok and self.structured is not None:
            following = repair_request(current, result, self.job, cfg.max_tokens_ceiling)
            if following is None:
                break
            try:
                repaired, repaired_answer = await self._send(following, repairing=True)
            except _Abandoned:  # a stop: the row keeps the answer it has (paid for)
                break
            except BatcherError as exc:  # the budget, a rejected key: stop, keep the answer
                reason = StopReason.BUDGET if isinstance(exc, BudgetReached) else StopReason.FATAL
                self._halt.stop(reason, exc)
                break
            repairs += 1
            current, result, answer = following, repaired, repaired_answer
            attempts += result.attempts
            cost = None if cost is None or result.cost_usd is None else cost + result.cost_usd
        if not repairs:
            return result, answer
        self.stats.repairs += repairs
        error = result.error if result.ok else f"{result.error} (after {repairs} repairs)"
        key = None if req.key is None else req.key.key
        final = dataclasses.replace(
            result, keep=req.keep, attempts=attempts, cost_usd=cost, error=error, key=key
        )
        return final, answer

    async def _probe(self, req: Request) -> tuple[Result, Answer | None]:
        where = "check endpoint.region / endpoint.base_url and model"
        try:
            result, answer = await self._send(req, probing=True)
        except (BadRequest, EndpointMoved) as exc:  # a 404 or a 3xx: the route is wrong
            raise JobSpecError(f"the first request failed: {exc}; {where}") from None
        except APIConnectionError as exc:  # a typo in the URL, or the network is down tonight
            raise APIError(
                f"the first request failed: {exc}. Nothing else was sent; {where}, and the "
                "network, then run the same command again"
            ) from None
        except WebPageAnswer as exc:  # a login page or a website: not the API
            raise JobSpecError(
                f"the first request was answered with a web page, not a chat completion "
                f"({exc}); endpoint.base_url seems to point at a website or a login page, not "
                f"the API. Nothing else was sent; {where}"
            ) from None
        except RetryableAPIError as exc:  # 5xx / timeouts / 429s to the end: not our setup
            raise APIError(
                f"the service did not answer the first request: {exc}. It seems down or "
                "overloaded; nothing else was sent, run the same command again later."
            ) from None
        if not self._opened.is_set() and not _rows_own_fault(result):
            self._probe_failures += 1
            if self._probe_failures >= PROBE_FAILURES_FATAL:
                raise JobSpecError(
                    f"the first {PROBE_FAILURES_FATAL} requests all failed, the last with: "
                    f"{result.error}; {where}, and params"
                )
        return result, answer

    async def _send(
        self, req: Request, *, probing: bool = False, repairing: bool = False
    ) -> tuple[Result, Answer | None]:
        """All attempts for one row; row-level trouble becomes an error Result.

        While probing, a 404 or an unreachable server is raised instead (the setup is wrong,
        the row is not to blame) after fewer attempts. A stop during the attempts abandons
        the row (`_Abandoned`): it is not an error, a rerun sends it.
        """
        policy = self._probe_policy if probing else self._policy
        attempts = 0
        reserved = 0.0
        try:
            while True:
                if self._halt.stopping:
                    raise _Abandoned
                attempts += 1
                try:
                    answer, reserved = await self._attempt(req, attempts)
                    break
                except RetryableAPIError as exc:
                    if self._halt.stopping:
                        raise _Abandoned from None
                    if not policy.should_retry(exc, attempts) or (
                        probing and isinstance(exc, WebPageAnswer)  # the setup: say so now
                    ):
                        raise
                    await asyncio.sleep(policy.wait_s(exc, attempts))
        except AuthenticationError as exc:
            source = "--mock" if self.options.api_key else f"${self.job.endpoint.api_key_env}"
            exc.args = (f"{exc} (the key came from {source})",)
            if self._refusals.watches(exc.status):  # a 403: the key, or a firewall?
                return self._refuse(req, attempts, exc, repairing)
            raise
        except RetryableAPIError as exc:
            if probing:
                raise
            tries = "1 attempt" if attempts == 1 else f"{attempts} attempts"
            return self._error_row(req, attempts, f"gave up after {tries}: {exc}")
        except AnswerTooLarge as exc:
            return self._error_row(req, attempts, str(exc))
        except BadRequest as exc:
            if probing and exc.status == 404:
                raise
            if self._refusals.watches(exc.status):  # a 404: this row's model, or every model?
                return self._refuse(req, attempts, exc, repairing)
            return self._error_row(req, attempts, str(exc))

        def settle(prompt: int | None, completion: int | None) -> float | None:
            return self.spending.settle(req, reserved, prompt, completion)

        return result_from_answer(req, answer, attempts, self.structured, cost=settle), answer

    def _refuse(
        self, req: Request, attempts: int, exc: APIError, repairing: bool
    ) -> tuple[Result, None]:
        """A 403 or 404. The row is held (`_Held`) until its model answers a request sent
        after this refusal came back (then it was the row's own error) or the streak decides
        (`breaker.RefusalStreak`); raises `exc` (or a 404's stop) when this refusal makes it
        the job's. A repair's refusal is the row's own at once (the row keeps its answer)."""
        status = exc.status or 0
        if repairing:
            return self._error_row(req, attempts, refusal_message(exc))
        held = (req, self._error_row(req, attempts, refusal_message(exc))[0], exc)
        known = self._sent_seq  # requests numbered higher were sent after this came back
        enough = self._refusals.refused(status, req.model, req.row_id, exc.sent_seq, known, held)
        first = self._refusals.first_seq(status, req.model)
        # Not yet the job's, or requests sent after the first refusal came back are still out
        # (an answer among them makes the refusals the rows' own: a firewall). Until an answer
        # or enough refusals decide, one request at a time: a revoked key costs the wave in
        # flight and a request or two, not a second wave.
        if not enough or any(seq > first for seq in self._in_flight_seqs):
            self._suspect, self._suspect_since = True, known
            raise _Held
        rows = self._refusals.rows_needed[status]
        if isinstance(exc, AuthenticationError):
            exc.args = (f"{exc} ({rows} different rows refused in a row)",)
            raise exc
        raise BadRequest(
            f"{rows} different rows in a row were refused with {status} and {req.model} "
            f"answered none between them: {exc}. The deployment or the model seems gone; "
            "check endpoint and model, then run the same command again (these rows are not "
            "recorded as errors)",
            status=status,
            headers=exc.headers,
        )

    def _release(self, model: str | None, seq: int = 0) -> None:
        """`model` answered the request numbered `seq`: the refusals that came back before it
        was sent were their rows' own (None: every one, at the end). Error rows, journaled
        now (with the rows that waited for an identical request)."""
        if model is not None and self._halt.stopping:  # a stop: held rows stay undone
            return
        cleared = (
            self._refusals.take_all() if model is None else self._refusals.answered(model, seq)
        )
        if not self._refusals:
            self._suspect = False
        rows: list[Result] = []
        for req, result, _ in cleared:
            rows.append(result)
            if self.reuse is not None:
                rows.extend(self.reuse.answered(req, result, None))
        if rows and self._journal is not None:
            # A failed journal raises here and for the answering worker's own row, which
            # stops the run; these rows then stay undone (a rerun sends them).
            with contextlib.suppress(BatcherError):
                self._journal.add(rows, self._count_many, backlog=sys.maxsize)

    def _settle_held(self) -> None:
        """At the end of sending. A completed run whose endpoint answered: the rows still held
        were their own fault. A run that answered nothing: the refusals were the key's. A
        stop: they stay undone."""
        if not self._refusals:
            return
        if self._halt.reason is None and self._opened.is_set():
            self._release(None)
            return
        held = self._refusals.take_all()
        if self._halt.reason is None:
            ids = ", ".join(repr(req.row_id) for req, _, _ in held[:5])
            error = held[-1][2]
            self._halt.failed(
                type(error)(
                    f"{error} Nothing was answered in this run: the refused rows ({ids}"
                    f"{', ...' if len(held) > 5 else ''}) are not recorded.",
                    status=error.status,
                    headers=error.headers,
                )
            )
        for req, _, _ in held:
            if self.reuse is not None:
                self.reuse.abandoned(req)

    def _error_row(self, req: Request, attempts: int, error: str) -> tuple[Result, None]:
        key = None if req.key is None else req.key.key
        row = Result(
            req.row_id,
            STATUS_ERROR,
            attempts=attempts,
            error=error,
            keep=req.keep,
            cost_usd=0.0,
            key=key,
        )
        return row, None

    async def _attempt(self, req: Request, attempt: int) -> tuple[Answer, float]:
        """One attempt: (the answer, the worst case reserved for it in the budget)."""
        assert self._client is not None
        worst = self.spending.reserve(req)
        try:
            await self.limiter.acquire(req.model, req.cost)
        except BaseException:
            self.spending.release(worst)
            raise
        if self._halt.stopping:  # a stop came while we waited for our slot: send nothing
            self.spending.release(worst)
            raise _Abandoned
        if attempt > 1:
            self.stats.retries += 1
        self.stats.record_sent(req.cost, req.model)
        self.stats.in_flight += 1
        me = asyncio.current_task()
        assert me is not None
        self._halt.busy.add(me)
        self._sent_seq += 1
        seq = self._sent_seq
        in_flight = self._in_flight_seqs
        in_flight.add(seq)
        try:
            answer = await self._client.complete(req.body)
        except RetryableAPIError as exc:
            self._halt.busy.discard(me)
            self.stats.count_response(exc.status or failure_kind(exc))
            self.spending.release(worst, billed=_billed(exc))
            self._failed(req, exc)
            raise
        except BaseException as exc:
            self._halt.busy.discard(me)
            self.spending.release(worst, billed=_billed(exc))
            if isinstance(exc, APIError):  # 401, 400, ...: answered, final
                self.stats.count_response(exc.status or failure_kind(exc))
                exc.sent_seq = seq
            raise
        finally:
            self.stats.in_flight -= 1
            in_flight.discard(seq)
        self.stats.count_response(200)
        self.limiter.feedback(req.model, status=200, headers=answer.headers)
        self._breaker.success()
        if self._refusals:  # refusals back before this was sent were their rows' own
            self._release(req.model, seq)
            if seq > self._suspect_since:  # the key works (another model's refusals may wait)
                self._suspect = False
        self._opened.set()  # the endpoint, key and model work: let the others go
        if MOCK_HEADER in answer.headers and not self._demo_seen:
            self._demo_server()
        return answer, worst

    def _failed(self, req: Request, exc: RetryableAPIError) -> None:
        """Count one failed attempt, tell the limiter, and let the breaker judge the streak."""
        kind = failure_kind(exc)
        if isinstance(exc, RateLimited):
            self.stats.rate_limited += 1
            self.limiter.feedback(req.model, status=429, headers=exc.headers)
        else:
            self.stats.server_errors += 1
            if kind != "truncated":  # (a truncated 2xx was charged: it keeps its slot)
                # A 5xx, or no answer (status 0): its headers may show the server did not
                # charge it, and the slot is given back.
                self.limiter.feedback(req.model, status=exc.status or 0, headers=exc.headers)
            if kind == "truncated":  # a 200 the server billed but we could not read
                self.stats.truncated += 1
                self.stats.truncated_tokens += req.cost
        if self._breaker.failure(kind, req.row_id, asyncio.get_running_loop().time()):
            self._halt.stop(
                StopReason.OUTAGE,
                APIError(
                    f"the service failed the last {self._breaker.failures} requests "
                    f"({', '.join(f'{n} x {k}' for k, n in self._breaker.kinds.items())}), "
                    f"the last with: {str(exc).rstrip('.')}. The service looks "
                    f"{self._breaker.tripped}; the "
                    "rows it hit are not recorded as errors"
                ),
            )

    async def _finish_many(self, results: list[Result]) -> None:
        """Finished rows to the journal's next group commit, counted once on disk. The caller
        goes on at once (waiting out every commit cost ~2.5 ms and an fsync a row: 13 % of
        the throughput at 4,000 rows a second), unless more than `concurrency` rows wait for
        their commit (a slow disk); a stop's drain writes what is handed over."""
        assert self._journal is not None
        wait = self._journal.add(results, self._count_many, backlog=self.job.concurrency)
        if wait is not None:
            await wait

    def _count_many(self, results: Sequence[Result]) -> None:
        for result in results:
            self._count(result)

    def _count(self, result: Result) -> None:
        """A durable result, in the run's statistics."""
        if result.source == SOURCE_CACHE:
            self.stats.cache_hits += 1
            self.stats.saved_usd += self.spending.value(
                result.model, result.prompt_tokens, result.completion_tokens
            )
        elif result.source == SOURCE_DEDUPE:
            self.stats.dedupe_hits += 1
            self.stats.saved_usd += self.spending.value(
                result.model, result.prompt_tokens, result.completion_tokens
            )
        else:  # tokens this run used: reused answers used none
            self.stats.prompt_tokens += result.prompt_tokens or 0
            self.stats.completion_tokens += result.completion_tokens or 0
        if self._monitor is not None and result.latency_s is not None:
            self._monitor.observe_latency(result.latency_s)
        if result.ok:
            self.stats.ok += 1
        else:
            self.stats.error += 1
            log.debug("row %s: %s", result.id, result.error)

    async def _flush_store(self, batch: list[CacheEntry]) -> None:
        if not batch or self.reuse is None:
            return
        stored = await asyncio.to_thread(self.reuse.store.put_many, batch)
        if stored:  # 0: the store is off or busy, the answers stay in memory
            self.reuse.stored(batch)

    def request_stop(self, signum: int = signal.SIGINT) -> None:
        """As that signal would (for embedders and benchmarks): SIGINT finishes what is in
        flight within the grace period; a second call stops at once."""
        self._halt.on_signal(signum)

    async def _refresh_effective(self) -> None:
        while True:
            self.stats.effective = self.limiter.snapshot()
            await asyncio.sleep(1.0)

    # ---- the whole run ----

    async def run(self) -> RunOutcome:
        job, opts = self.job, self.options
        api_key = opts.api_key or resolve_api_key(job)
        lock = JobLock(self.output)
        lock.acquire()
        try:
            with run_collector():
                return await self._run_locked(api_key)
        finally:
            lock.release()

    async def _run_locked(self, api_key: str) -> RunOutcome:
        job, opts = self.job, self.options
        # Before the scan: the rows it reads may be held and sent without another reading, and
        # a change after this point must fail the final check (`_write_output`).
        self._input_digest = await asyncio.to_thread(input_digest, job.input)
        total = await asyncio.to_thread(self.scan)
        if total == 0:
            log.warning("%s has no rows: nothing to send", job.input)
        self._clean_leftovers()
        fingerprint = request_fingerprint(job, self._input_digest)
        journal, state = await asyncio.to_thread(
            open_journal,
            self.output,
            fingerprint,
            restart=opts.restart,
            retry_errors=opts.retry_errors,
            fsync=opts.fsync,
            mock=opts.mock,
        )
        self._journal = journal
        # A commit that fails (disk full) stops the run at once: its rows' workers went on.
        journal.on_failure = lambda exc: self._halt.stop(StopReason.FATAL, exc)
        self.reuse = await asyncio.to_thread(self._open_reuse)
        try:
            if state.ok_count:
                # This job already had answers: the endpoint, key and model work. The rows
                # left (--retry-errors especially) may fail for their own reasons.
                self._opened.set()
            await asyncio.to_thread(self._remember_done, state, opts.retry_errors)
            self.budget.spent_usd = state.spent_usd + await asyncio.to_thread(self._sibling_spent)
            if self.budget.cap_usd is not None:
                from batcher.estimate import estimate_job

                left_to_ask = await asyncio.to_thread(
                    estimate_job,
                    self.job,
                    selected=self._in_shard,
                    done=self._done_row if len(self._done) else None,
                )
                warning = self.spending.over_budget_warning(left_to_ask)
                if warning:
                    log.warning("%s", warning)
            return await self._run_journaled(journal, total, api_key)
        finally:
            journal.close()
            await asyncio.to_thread(self.reuse.store.close)

    def _open_reuse(self) -> Reuse:
        cfg, opts = self.job.cache, self.options
        if not cfg.enabled:
            store = ResponseStore.disabled("cache: enabled: false")
        else:
            try:
                path = resolve_store_path(cfg.path, self.job.job_dir, mock=opts.mock)
            except StorageError as exc:  # no home directory to resolve the path in
                hint = " (or give the job a cache.path)" if cfg.path is None else ""
                log.warning("the response store is off: %s%s", exc, hint)
                store = ResponseStore.disabled(str(exc))
            else:
                store = ResponseStore.open(path)
        return Reuse(
            store,
            read=opts.read_cache,
            dedupe=self.job.dedupe,
            structured=self.structured,
            mock_store=opts.mock,
        )

    def _remember_done(self, state: JournalState, retry_errors: bool) -> None:
        """The rows the journal answers (all of them, or the ok ones with --retry-errors), with
        the request each was answered for: a row whose request changed is asked again. (In a
        thread: a million ids take a second to hash and sort.)"""
        ids, keys = state.ids, state.key_hashes
        if retry_errors:
            ids, keys = pc.filter(ids, state.ok), pc.filter(keys, state.ok)
        self._done = DoneRows(ids, keys)
        if len(self._done):
            log.info(
                "resuming: the journal (%s) holds answers for %d rows; rows whose request "
                "changed since are asked again",
                journal_path(self.output).name,
                len(self._done),
            )

    async def _run_journaled(self, journal: Journal, total: int, api_key: str) -> RunOutcome:
        """The run, watched: history, /metrics; at its end textfile, report and webhook."""
        self.stats.total_rows = total
        self.stats.cap_usd = self.budget.cap_usd
        self.stats.spent_before_usd = self.budget.spent_usd
        async with RunMonitoring(
            self.job,
            self.stats,
            self.output,
            restart=self.options.restart,
            rows_done_before=len(self._done),  # the journal's count; the end record's is exact
        ) as monitor:
            self._monitor = monitor
            outcome = await self._run_sending(journal, total, api_key)
            await monitor.finish(outcome)
        return outcome

    async def _run_sending(self, journal: Journal, total: int, api_key: str) -> RunOutcome:
        job, opts = self.job, self.options
        from batcher.progress import Progress

        loop = asyncio.get_running_loop()
        signals = (signal.SIGINT, signal.SIGTERM) if opts.handle_signals else ()
        for sig in signals:
            loop.add_signal_handler(sig, self._halt.on_signal, sig)
        ticker = asyncio.create_task(self._refresh_effective())
        try:
            await self.limiter.start()
            base_url = opts.base_url or job.endpoint.url
            async with (
                ChatClient(
                    base_url,
                    api_key,
                    concurrency=job.concurrency,
                    timeout_s=job.endpoint.timeout_s,
                    connect_timeout_s=job.endpoint.connect_timeout_s,
                    max_answer_mb=job.endpoint.max_answer_mb,
                ) as client,
                Progress(self.stats, mode=opts.progress, interval_s=job.progress_interval_s),
            ):
                self._client = client
                self._halt.workers = [
                    asyncio.create_task(self._worker()) for _ in range(job.concurrency)
                ]
                self._halt.producer = asyncio.create_task(self._produce())
                held = len(self._done)  # answered before (a row whose request changed is not)
                log.info(
                    "sending %s to %s (the first request goes alone)",
                    f"the rows without an answer (the journal holds {held:,} of {total:,})"
                    if held
                    else f"{total:,} row{'' if total == 1 else 's'}",
                    base_url,
                )
                try:
                    await self._halt.drive()
                except BatcherError as exc:  # limiter.start, client setup
                    self._halt.stop(StopReason.FATAL, exc)
        except BatcherError as exc:
            self._halt.failed(exc)
        finally:
            for sig in signals:
                loop.remove_signal_handler(sig)
            ticker.cancel()
            self.stats.effective = self.limiter.snapshot()
            self.stats.finished = self.stats.clock()
            self._settle_held()
            if self.reuse is not None:
                await self._flush_store(self.reuse.take_pending(at_least=1))
            try:
                await journal.drain()  # every finished row is on disk before we report
            except BatcherError as exc:
                self._halt.failed(exc)
            await self.limiter.aclose()

        if self._halt.reason is not None:
            with contextlib.suppress(BatcherError):
                journal.write_meta(end_record(False, **self._end_counts()))
            return self._outcome(self._halt.reason)

        written = await asyncio.to_thread(self._write_output, total)
        journal.write_meta(end_record(True, **self._end_counts()))
        if written is None:  # the input had no rows: an earlier run's output was kept
            return dataclasses.replace(self._outcome(StopReason.COMPLETED), output_kept=True)
        rows, errors = written
        return self._outcome(StopReason.COMPLETED, rows_written=rows, error_rows=errors)

    def _outcome(
        self, reason: StopReason, *, rows_written: int = 0, error_rows: int = 0
    ) -> RunOutcome:
        url = self.job.output_url
        return RunOutcome(
            exit_code=self._halt.exit_code(reason, error_rows),
            reason=reason,
            stats=self.stats,
            output=self.output,
            journal=journal_path(self.output),
            rows_written=rows_written,
            error_rows=error_rows,
            error=self._halt.error,
            published_to=with_name(url, self.output.name)
            if url is not None and reason is StopReason.COMPLETED
            else None,
        )

    def _clean_leftovers(self) -> None:
        """We hold the job lock: temp files of a crashed final write are ours to remove. (An
        earlier output stays, even after --restart, until this run's replaces it: a restart
        that is stopped leaves the last complete output in place.)"""
        for tmp in self.output.parent.glob(f".{self.output.name}.tmp-*"):
            tmp.unlink(missing_ok=True)

    def _sibling_spent(self) -> float:
        """What the job's --sample run spent (or, for a sample, the job's runs): the budget
        covers both. Demo spending counts only toward demo runs."""
        path = journal_path(self._sibling)
        if not path.exists():
            return 0.0
        try:
            other = read_state(path)
        except BatcherError:
            return 0.0  # unreadable: its own run will say so
        return other.spent_usd if other.mock == self.options.mock else 0.0

    def _demo_server(self) -> None:
        """The server signs its answers as batcher's bundled server (serve-mock): say so once,
        and mark the journal so that a run against the API asks for these rows again."""
        self._demo_seen = True
        if self.options.mock:
            return
        log.warning(
            "the server is batcher's bundled mock server: its answers are demo answers. They "
            "stay out of your response store, and a run against the API asks for them again"
        )
        if self._journal is not None:
            with contextlib.suppress(BatcherError):
                self._journal.write_meta({"t": "mock"})

    def _end_counts(self) -> dict[str, Any]:
        return {
            "ok": self.stats.ok,
            "error": self.stats.error,
            "sent": self.stats.requests_sent,
            # billed but in no row's cost_usd (truncated answers): the budget counts it
            "unrecorded_usd": round(self.stats.unrecorded_usd, 9),
        }

    def _input_rows(self) -> Iterator[list[Row]]:
        """This run's input rows in input order, read afresh (for the output's order)."""
        in_shard = self._in_shard
        for batch in self.reader.iter_batches(4096):
            yield [r for r in batch if in_shard(r.id)]

    def _write_output(self, expected_rows: int) -> tuple[int, int] | None:
        """(rows written, error rows); None when an earlier run's output is kept."""
        if expected_rows == 0 and self.output.exists():
            # An input emptied by a failed upstream step must not wipe last night's answers.
            log.warning(
                "the output %s of an earlier run is left as it was (the input has no rows); "
                "delete it if an empty output is what you want",
                self.output,
            )
            return None
        if input_digest(self.job.input) != self._input_digest:
            raise InputDataError(
                f"{self.job.input} changed while the job ran, so the output cannot be written "
                "for it yet. Every answer is in the journal: run the same command again (rows "
                "whose request changed are asked again, then the output is written)"
            )
        if self.job.output_format == "batch":
            counts = write_batch_output_ordered(
                journal_path(self.output),
                self.output,
                self._input_rows,
                order=self.job.output_order,
                expected_rows=expected_rows,
            )
        else:
            counts = self._write_parquet(expected_rows)
        if self.job.output_url is not None:  # complete and durable locally: now publish it
            publish(self.output, with_name(self.job.output_url, self.output.name))
        return counts

    def _write_parquet(self, expected_rows: int) -> tuple[int, int]:
        keep_types = None
        if self.job.keep_columns and self.reader.format == "parquet":
            schema = self.reader.arrow_schema()
            keep_types = pa.schema([schema.field(c) for c in self.job.keep_columns])
        return write_output_ordered(
            journal_path(self.output),
            self.output,
            self._input_rows,
            order=self.job.output_order,
            keep_names=list(self.job.keep_columns),
            keep_types=keep_types,
            parsed_type=self.structured.arrow_type if self.structured else None,
            expected_rows=expected_rows,
        )
