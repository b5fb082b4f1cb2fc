"""Answers reused instead of paid for: the response store and in-run deduplication.

A request is served without being sent when
- the response store holds an answer for its key (any earlier run or job of the user asked
  exactly this): `source = "cache"`; no request, no quota, no cost. Served whatever the
  temperature: that is what makes reruns free (`--no-cache` asks afresh).
- an identical request of this run is in flight or was answered, and deduplication is on
  for it (`dedupe: true`, or by default when `temperature` is 0): it waits for that answer
  and shares it, `source = "dedupe"`. With deduplication off, each row gets its own request
  in the run, so the store's answers to *this* run's requests are not served to it either.
  Under `--no-cache` the store still serves this run's own answers to its duplicates (only
  earlier runs' answers are asked afresh), however far apart the duplicates are.

Only answers that became `ok` rows enter the store; they are written in batches off the event
loop (`flush`), and kept in memory until written so a duplicate in between still finds them.
The bundled server's answers (signed with MOCK_HEADER) are demo answers: they enter only the
mock store of a `--mock` run, never the user's.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from typing import Any

from batcher.answers import result_from_answer
from batcher.cache import CachedAnswer, CacheEntry, CacheKey, ResponseStore
from batcher.client import Answer
from batcher.models import MOCK_HEADER
from batcher.records import SOURCE_CACHE, SOURCE_DEDUPE, Request, Result
from batcher.structured import StructuredOutput

log = logging.getLogger("batcher")

# Answers kept in memory for duplicates while (or when no store is) writing them: a bound on
# memory for runs with the store off.
RECENT_MAX = 20_000
FLUSH_AT = 256  # answers per store transaction


_NO_HEADERS: dict[str, str] = {}


def _free(prompt: int | None, completion: int | None) -> float:
    """A reused answer's cost: nothing was paid for it in this run."""
    return 0.0


def deterministic(body: Mapping[str, Any], dedupe: bool | None) -> bool:
    """Whether identical requests of one run may share an answer."""
    if dedupe is not None:
        return dedupe
    return body.get("temperature") == 0


class Reuse:
    def __init__(
        self,
        store: ResponseStore,
        *,
        read: bool,
        dedupe: bool | None,
        structured: StructuredOutput | None,
        mock_store: bool = False,
    ) -> None:
        self.store = store
        self.mock_store = mock_store  # the store of --mock runs: demo answers may enter it
        self.read = read and store.enabled  # --no-cache: ask afresh (answers are still stored)
        # ... but this run's own answers still serve its duplicates, from the store
        self.own_only = not read and store.enabled
        self.dedupe = dedupe
        self.structured = structured
        self.started = time.time()  # store entries from this run or later are "this run's"
        self._leaders: dict[str, list[Request]] = {}  # key -> rows waiting for its answer
        self._recent: OrderedDict[str, Result] = OrderedDict()  # answered, maybe not stored
        self._pending: list[CacheEntry] = []
        self._stored_last: list[CacheEntry] = []  # in the store, still held (see `stored`)

    # ---- in the preparing thread ----

    def lookup(self, keys: Iterable[CacheKey]) -> dict[str, CachedAnswer]:
        """The store's answers among `keys`, by key (none when the store is not read); `serve`
        says which of them a request may have."""
        if not (self.read or self.own_only):
            return {}
        return self.store.get_many(keys, count_hits=False)  # `used` counts those served

    def serve(self, req: Request, hit: CachedAnswer) -> Result | None:
        """`req`'s row answered by `hit`, or None when it must be asked."""
        ours = hit.created >= self.started  # answered earlier in this very run
        if ours and not deterministic(req.body, self.dedupe):
            return None  # dedupe off: this row gets its own request
        if not ours and self.own_only:
            return None  # --no-cache: an earlier run's answer is asked afresh
        result = result_from_answer(
            req,
            Answer(hit.body, _NO_HEADERS, 0.0),
            0,
            self.structured,
            cost=_free,
            source=SOURCE_DEDUPE if ours else SOURCE_CACHE,
        )
        # not ok: e.g. the schema check is stricter now: ask again
        return result if result.ok else None

    # ---- on the event loop ----

    def used(self, entries: list[int]) -> None:
        """The store entries (`CachedAnswer.entry`) whose answers rows were given (journaled):
        their hits, for the statistics and LRU pruning. Found and not served (`--no-cache`,
        an answer that no longer validates) or dropped by a stop, an answer is no hit."""
        if entries:
            self.store.note_hits(entries)

    def claim(self, req: Request) -> Result | bool | None:
        """Before queueing `req`: a Result to journal now (an identical request was just
        answered), False when it waits for an identical request in flight, True to send it."""
        if req.key is None or not deterministic(req.body, self.dedupe):
            return True
        key = req.key.key
        waiting = self._leaders.get(key)
        if waiting is not None:
            waiting.append(req)
            return False
        done = self._recent.get(key)
        if done is not None:
            return self._share(done, req)
        self._leaders[key] = []
        return True

    def answered(self, req: Request, result: Result, answer: Answer | None) -> list[Result]:
        """`req` (sent) has its result: store an ok answer; the rows waiting get theirs."""
        if req.key is None:
            return []
        key = req.key.key
        if result.ok and answer is not None:
            if self.mock_store or MOCK_HEADER not in answer.headers:  # not a demo answer
                self._pending.append(
                    CacheEntry(
                        req.key,
                        answer.body,
                        model=result.model,
                        prompt_tokens=result.prompt_tokens,
                        completion_tokens=result.completion_tokens,
                    )
                )
            self._recent[key] = result
            self._recent.move_to_end(key)
            while len(self._recent) > RECENT_MAX:
                self._recent.popitem(last=False)
        return [self._share(result, other) for other in self._leaders.pop(key, [])]

    def abandoned(self, req: Request) -> None:
        """`req` was not answered (a stop): the rows waiting for it stay unanswered too."""
        if req.key is not None:
            self._leaders.pop(req.key.key, None)

    @staticmethod
    def _share(result: Result, req: Request) -> Result:
        return dataclasses.replace(
            result,
            id=req.row_id,
            keep=req.keep,
            source=SOURCE_DEDUPE,
            attempts=0,
            latency_s=None,
            cost_usd=0.0,
        )

    def take_pending(self, at_least: int = FLUSH_AT) -> list[CacheEntry]:
        if len(self._pending) < at_least:
            return []
        batch, self._pending = self._pending, []
        return batch

    def stored(self, batch: list[CacheEntry]) -> None:
        """`batch` is in the store (`ResponseStore.put_many`, called off the loop): a duplicate
        prepared from now on finds it there. It is still held in memory until the next batch
        is stored: the engine prepares one batch ahead, and that batch's store lookup may
        have run just before this write (its duplicates then find the answers here)."""
        if self.store.enabled:
            for entry in self._stored_last:
                self._recent.pop(entry.key.key, None)
            self._stored_last = batch
