"""Row -> the request `batcher run` sends and what admission charges for it; shared by `estimate`.

One batch of rows goes through two steps, split so `estimate` can overlap them:

    build   row + template -> body, grouped by model      (Python: holds the GIL)
    count   prompt tokens + reserved output -> cost        (tiktoken's Rust encoder: releases it)

and comes out as a `Prepared`: the requests to send, and the rows that become error rows
without a request (a bad row under `on_bad_row: skip`, a row longer than its model's context
window, a row that costs more than a whole minute's TPM). `run` journals those errors and
`estimate` counts them, so the two always agree on what will be sent and what it costs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from batcher.cache import CacheKey, KeyFrame, cache_key
from batcher.errors import InputDataError
from batcher.journal import BAD_ROW_KEY
from batcher.models import CONTEXT_WINDOWS
from batcher.pricing import base_model_name
from batcher.readers import Row
from batcher.records import STATUS_ERROR, Request, Result
from batcher.requests import RequestBuilder
from batcher.spec import Job
from batcher.tokens import count_request_tokens, count_request_tokens_batch, max_output_tokens

if TYPE_CHECKING:
    from batcher.reuse import Reuse

RejectKind = Literal["bad_row", "over_context", "over_tpm"]


@dataclass(frozen=True, slots=True)
class Rejection:
    """A row that gets no request, and why (estimate lists these; run journals the Result)."""

    row_id: str
    kind: RejectKind
    model: str | None = None
    tokens: int = 0  # admission tokens the row would need
    limit: int = 0  # the context window or the TPM limit it exceeds


@dataclass(slots=True)
class Built:
    """One batch after `build`: bodies by model, and rows refused while building."""

    # model -> (rows, bodies, request keys), parallel lists
    by_model: dict[str, tuple[list[Row], list[dict[str, Any]], list[CacheKey | None]]] = field(
        default_factory=dict
    )
    errors: list[Result] = field(default_factory=list)
    rejections: list[Rejection] = field(default_factory=list)

    def text_chars(self) -> int:
        """The characters of the messages' text (what token counting encodes), roughly: text
        contents and text parts."""
        chars = 0
        for _, bodies, _ in self.by_model.values():
            for body in bodies:
                messages = body.get("messages")
                if not isinstance(messages, list):
                    continue
                for message in messages:
                    content = message.get("content") if isinstance(message, dict) else None
                    if isinstance(content, str):
                        chars += len(content)
                    elif isinstance(content, list):
                        chars += sum(
                            len(part["text"])
                            for part in content
                            if isinstance(part, dict) and isinstance(part.get("text"), str)
                        )
        return chars

    def drop(self, done: Callable[[str, CacheKey | None], bool]) -> int:
        """Leave out the rows `done(id, key)` says already have their answer (a resume, or a
        rerun whose row kept its request); how many."""
        before = len(self.errors) + sum(len(g[0]) for g in self.by_model.values())
        self.errors = [r for r in self.errors if not done(r.id, None)]
        self.rejections = [r for r in self.rejections if not done(r.row_id, None)]
        for model, (rows, bodies, keys) in list(self.by_model.items()):
            kept = [
                i
                for i, (row, key) in enumerate(zip(rows, keys, strict=True))
                if not done(row.id, key)
            ]
            if len(kept) == len(rows):
                continue
            if not kept:
                del self.by_model[model]
                continue
            self.by_model[model] = (
                [rows[i] for i in kept],
                [bodies[i] for i in kept],
                [keys[i] for i in kept],
            )
        return before - len(self.errors) - sum(len(g[0]) for g in self.by_model.values())


@dataclass(slots=True)
class Prepared:
    """One batch ready to send. `prompt_tokens` / `reserved_tokens` run parallel to `requests`."""

    requests: list[Request] = field(default_factory=list)
    prompt_tokens: list[int] = field(default_factory=list)
    reserved_tokens: list[int] = field(default_factory=list)
    errors: list[Result] = field(default_factory=list)
    rejections: list[Rejection] = field(default_factory=list)
    # model -> requests charged assumed_max_tokens (they set no max_tokens)
    default_max_tokens: dict[str, int] = field(default_factory=dict)


def _key(
    body: dict[str, Any], key_of: Callable[[dict[str, Any]], CacheKey] = cache_key
) -> CacheKey | None:
    """The request's identity; None for a body JSON cannot write (it is neither cached nor
    deduplicated: the server will refuse it anyway)."""
    try:
        return key_of(body)
    except (TypeError, ValueError):
        return None


class Preparer:
    """The one place a row becomes a request with its admission cost."""

    def __init__(self, job: Job, builder: RequestBuilder, *, fail_on_bad_row: bool = False) -> None:
        self.job = job
        self.builder = builder
        # estimate raises at the first bad row under on_bad_row: fail; run's scan already has.
        self.fail_on_bad_row = fail_on_bad_row and job.on_bad_row == "fail"
        self._keep = bool(job.keep_columns)
        # A messages template: keys are cut around the filled-in contents (KeyFrame), once
        # the first row has built. None: not (yet) cut; `_slots` None: not a template job.
        self._frame: KeyFrame | None = None
        self._slots: list[int] | None = None
        if builder.templates is not None and not builder.batch_format:
            self._slots = [i for i, (_, t) in enumerate(builder.templates) if t.columns]

    def _key(self, body: dict[str, Any]) -> CacheKey | None:
        frame = self._frame
        if frame is None and self._slots is not None:
            frame = self._frame = KeyFrame.around(body, self._slots)
            if frame is None:
                self._slots = None  # cannot be cut exactly: whole keys from now on
        return _key(body, cache_key if frame is None else frame.key)

    def build(self, rows: list[Row]) -> Built:
        built = Built()
        for row in rows:
            if row.error is not None:
                self._reject_bad(built, row, row.error)
                continue
            try:
                body = self.builder.build_body(row)
            except InputDataError as exc:
                if self.fail_on_bad_row:
                    raise
                self._reject_bad(built, row, str(exc))
                continue
            group = built.by_model.get(body["model"])
            if group is None:
                group = built.by_model[body["model"]] = ([], [], [])
            group[0].append(row)
            group[1].append(body)
            group[2].append(self._key(body))
        return built

    def _reject_bad(self, built: Built, row: Row, message: str) -> None:
        keep = self.builder.keep(row) if self._keep and row.error is None else {}
        built.errors.append(
            Result(row.id, STATUS_ERROR, error=message, keep=keep, source=None, key=BAD_ROW_KEY)
        )
        built.rejections.append(Rejection(row.id, "bad_row"))

    def serve(self, built: Built, reuse: Reuse) -> tuple[list[Result], list[int]]:
        """Rows the response store answers leave `built` before `count`: an answer that costs
        no quota needs no token count (a rerun answered from the store spent a tenth of its
        CPU counting). Only rows with a stored answer get a (zero-cost) Request. Returns their
        results and the store entries they came from (`Reuse.used` once journaled)."""
        found = reuse.lookup(k for g in built.by_model.values() for k in g[2] if k is not None)
        if not found:
            return [], []
        served: list[Result] = []
        entries: list[int] = []
        for model, (rows, bodies, keys) in built.by_model.items():
            for row, body, key in zip(rows, bodies, keys, strict=True):
                hit = found.get(key.key) if key is not None else None
                if hit is None:
                    continue
                keep = self.builder.keep(row) if self._keep else {}
                result = reuse.serve(Request(row.id, body, model, 0, keep, key), hit)
                if result is not None:
                    served.append(result)
                    entries.append(hit.entry)
        if served:
            answered = {r.id for r in served}
            built.drop(lambda row_id, key: key is not None and row_id in answered)
        return served, entries

    def count(self, built: Built, *, num_threads: int = 1) -> Prepared:
        out = Prepared(errors=built.errors, rejections=built.rejections)
        assumed = self.job.assumed_max_tokens
        for model, (rows, bodies, keys) in built.by_model.items():
            prompts = count_request_tokens_batch(bodies, model, self.job.images, num_threads)
            tpm = self.job.limit_for(model).tpm
            window = CONTEXT_WINDOWS.get(base_model_name(model))
            defaults = 0
            for row, body, key, prompt in zip(rows, bodies, keys, prompts, strict=True):
                reserved, default = max_output_tokens(body, assumed)
                cost = prompt + reserved
                keep = self.builder.keep(row) if self._keep else {}
                if window is not None and cost > window and self._fills(body, model) > window:
                    self._reject(out, row, keep, key, "over_context", model, cost, window)
                    continue
                if cost > tpm:
                    self._reject(out, row, keep, key, "over_tpm", model, cost, tpm)
                    continue
                defaults += default
                out.requests.append(Request(row.id, body, model, cost, keep, key, reserved))
                out.prompt_tokens.append(prompt)
                out.reserved_tokens.append(reserved)
            if defaults:
                out.default_max_tokens[model] = defaults
        return out

    def _fills(self, body: dict[str, Any], model: str) -> int:
        """What the request fills of the context window: images as the model sees them
        (gpt-4o-mini's billing figure, what admission charges by default, does not fill it).
        Only rows over the window get here, so one body at a time is fine."""
        as_seen = self.job.images.model_copy(update={"count_as": "context"})
        reserved = max_output_tokens(body, self.job.assumed_max_tokens)[0]
        return count_request_tokens(body, model, as_seen) + reserved

    def prepare(self, rows: list[Row]) -> Prepared:
        return self.count(self.build(rows))

    def _reject(
        self,
        out: Prepared,
        row: Row,
        keep: dict[str, Any],
        key: CacheKey | None,
        kind: RejectKind,
        model: str,
        cost: int,
        limit: int,
    ) -> None:
        if kind == "over_context":
            why = (
                f"the request needs {cost:,} tokens (prompt + max output), more than the "
                f"{limit:,}-token context window of {model}: the server would refuse it. "
                "Shorten the prompt or lower max_tokens"
            )
        else:
            why = (
                f"the request needs {cost:,} tokens at admission (prompt + max output), more "
                f"than the {limit:,} TPM limit of {model}: it can never be sent. Lower "
                "max_tokens or shorten the prompt"
            )
        out.errors.append(
            Result(
                row.id,
                STATUS_ERROR,
                error=why,
                keep=keep,
                source=None,
                key=None if key is None else key.key,
            )
        )
        out.rejections.append(Rejection(row.id, kind, model, cost, limit))
