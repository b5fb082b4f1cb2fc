"""Records shared by the stages: one request on its way out, one result on its way back."""

from __future__ import annotations

from dataclasses import dataclass, field
from operator import attrgetter
from typing import TYPE_CHECKING, Any

# The output columns every result has, in order, with their Arrow types: batcher/schema.py.
from batcher.schema import RESULT_FIELDS

if TYPE_CHECKING:
    from batcher.cache import CacheKey

__all__ = [
    "RESULT_FIELDS",
    "SOURCE_API",
    "SOURCE_CACHE",
    "SOURCE_DEDUPE",
    "STATUS_ERROR",
    "STATUS_OK",
    "Request",
    "Result",
    "ToolCall",
]

# One entry of `Result.tool_calls`: {"id": ..., "name": ..., "arguments": ...}, strings or None.
ToolCall = dict[str, str | None]

STATUS_OK = "ok"
STATUS_ERROR = "error"
SOURCE_API = "api"  # answered by the server in this job
SOURCE_CACHE = "cache"  # served from the response store: no request, no quota, no cost
SOURCE_DEDUPE = "dedupe"  # shared the answer of an identical request in the same run


# Not frozen: a frozen dataclass builds itself through object.__setattr__ per field, ~10x
# slower (8 us for a Result), and every row builds at least one of each. Treat them as values:
# change one with dataclasses.replace, never in place.
@dataclass(slots=True)
class Request:
    """A chat request ready to send: the body is final, the cost is what admission charges."""

    row_id: str
    body: dict[str, Any]
    model: str  # the limiter key: the model named in the body
    cost: int  # estimated tokens the server charges at admission (prompt + max output)
    keep: dict[str, Any] = field(default_factory=dict)  # input columns copied to the output
    key: CacheKey | None = None  # the request's identity: response store, dedupe, reruns
    max_output: int = 0  # of `cost`, the output tokens reserved (the budget's worst case)


@dataclass(slots=True)
class Result:
    """The outcome of one row; what the journal stores and the output holds."""

    id: str
    status: str  # STATUS_OK | STATUS_ERROR
    content: str | None = None
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    total_tokens: int | None = None
    attempts: int = 0
    latency_s: float | None = None
    error: str | None = None
    model: str | None = None  # the model the server says answered (a dated name)
    keep: dict[str, Any] = field(default_factory=dict)
    parsed: dict[str, Any] | None = None  # structured output, when response_format has a schema
    tool_calls: list[ToolCall] | None = None  # the functions the model called, if any
    source: str | None = SOURCE_API  # SOURCE_*; None: refused before any request
    cost_usd: float | None = None  # what this row's attempts cost at the job's prices
    key: str | None = None  # the request key (journal only): a rerun re-asks a changed row

    @property
    def ok(self) -> bool:
        return self.status == STATUS_OK

    def to_record(self, head: dict[str, Any] | None = None) -> dict[str, Any]:
        """Flat dict for the journal and the Parquet output; `head`: entries to put first (the
        journal's record type), filled in place."""
        rec: dict[str, Any] = {} if head is None else head
        rec.update(zip(RESULT_FIELDS, _result_values(self), strict=True))
        if self.tool_calls is None:
            del rec["tool_calls"]  # most answers have none: keep the journal's lines short
        if self.keep:
            rec["keep"] = self.keep
        if self.parsed is not None:
            rec["parsed"] = self.parsed
        if self.key is not None:
            rec["key"] = self.key
        return rec


_result_values = attrgetter(*RESULT_FIELDS)  # one call per row for every column, in order
