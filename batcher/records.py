"""Records shared by the stages: one request on its way out, one result on its way back."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# Output columns every result has, in order (the input's kept columns and `parsed` follow).
RESULT_FIELDS: tuple[str, ...] = (
    "id",
    "status",
    "content",
    "finish_reason",
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "attempts",
    "latency_s",
    "error",
    "model",
)

STATUS_OK = "ok"
STATUS_ERROR = "error"


@dataclass(frozen=True, slots=True)
class Request:
    """A chat request ready to send: the body is final, the cost is what admission charges."""

    row_id: str
    body: dict[str, Any]
    model: str  # the limiter key: the model named in the body
    cost: int  # estimated tokens the server charges at admission (prompt + max output)
    keep: dict[str, Any] = field(default_factory=dict)  # input columns copied to the output


@dataclass(frozen=True, slots=True)
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

    @property
    def ok(self) -> bool:
        return self.status == STATUS_OK

    def to_record(self) -> dict[str, Any]:
        """Flat dict for the journal and the Parquet output."""
        rec: dict[str, Any] = {name: getattr(self, name) for name in RESULT_FIELDS}
        if self.keep:
            rec["keep"] = self.keep
        if self.parsed is not None:
            rec["parsed"] = self.parsed
        return rec
