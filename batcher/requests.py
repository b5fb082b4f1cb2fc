"""Row + job -> the chat-completion body that will be sent, checked before anything is sent.

Templates use `{column}` placeholders (identifiers only, so JSON braces in a prompt stay
literal); `{{` and `}}` are escapes for literal braces.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from batcher.errors import InputDataError, JobSpecError
from batcher.models import is_o_series
from batcher.readers import Row
from batcher.spec import Job, check_model, check_o_series_params, check_params, role_problem

_TOKEN = re.compile(r"\{\{|\}\}|\{([A-Za-z_][A-Za-z0-9_]*)\}")


@dataclass(frozen=True, slots=True)
class Template:
    """A compiled content string: literal text alternating with column names."""

    parts: tuple[str, ...]  # even indexes: literal text; odd indexes: column names

    @classmethod
    def compile(cls, text: str) -> Template:
        parts: list[str] = []
        literal: list[str] = []
        pos = 0
        for m in _TOKEN.finditer(text):
            literal.append(text[pos : m.start()])
            tok = m.group(0)
            if tok in ("{{", "}}"):
                literal.append(tok[0])
            else:
                parts.extend(("".join(literal), m.group(1)))
                literal = []
            pos = m.end()
        literal.append(text[pos:])
        parts.append("".join(literal))
        return cls(tuple(parts))

    @property
    def columns(self) -> tuple[str, ...]:
        return self.parts[1::2]

    def render(self, data: dict[str, Any]) -> str:
        parts = self.parts
        if len(parts) == 1:
            return parts[0]
        out = [parts[0]]
        for i in range(1, len(parts), 2):
            value = data[parts[i]]  # KeyError: the caller names the column and row
            if type(value) is not str:
                if value is None:
                    raise ValueError(f"column {parts[i]!r} is null")
                value = value if isinstance(value, str) else _to_text(value)
            out.append(value)
            out.append(parts[i + 1])
        return "".join(out)


def _to_text(value: Any) -> str:
    if isinstance(value, (dict, list)):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


class RequestBuilder:
    """Builds each row's body; raises InputDataError naming the row for a bad one."""

    def __init__(self, job: Job, *, batch_format: bool = False) -> None:
        self.job = job
        self.batch_format = batch_format
        self.templates: list[tuple[dict[str, Any], Template]] | None = None
        if job.messages:
            self.templates = [
                (m.model_dump(exclude_none=True, exclude={"content"}), Template.compile(m.content))
                for m in job.messages
            ]
        self._checked_columns: list[str] | None = None  # model_of: one row has built
        if not batch_format and job.model is None:
            raise JobSpecError("job file: model is required (e.g. model: gpt-4o-mini)")
        if job.model and is_o_series(job.model):
            try:
                _check_o1_roles(job.model, [m.role for m in job.messages or []], "messages")
            except ValueError as exc:
                raise JobSpecError(f"job file: {exc}") from None

    @property
    def template_columns(self) -> set[str]:
        return {c for _, t in self.templates or [] for c in t.columns}

    def check_columns(self, columns: Iterable[str]) -> None:
        """With a known schema (Parquet), a missing column is an error before any row is read."""
        have = set(columns)
        missing = sorted(self.template_columns - have)
        if missing:
            raise InputDataError(
                f"{self.job.input}: the messages template uses {{{missing[0]}}} but the input "
                f"has no column {missing[0]!r} (columns: {', '.join(sorted(have))})"
            )
        if self.templates is None and not self.batch_format and "messages" not in have:
            raise InputDataError(
                f"{self.job.input}: the job has no messages template and the input has no "
                "'messages' column; add messages: to the job file"
            )
        for col in self.job.keep_columns:
            if col not in have:
                raise InputDataError(
                    f"{self.job.input}: keep_columns names {col!r}, "
                    f"which is not a column of the input"
                )

    def model_of(self, row: Row) -> str:
        """The model of the row's request; InputDataError exactly when `build_body` raises.

        For the scan, which reads every row before anything is sent. With a messages template
        everything but the filled-in columns is the job's own, the same for every row: once
        one row has built, a row whose template columns all hold text builds too, so only
        that is checked (a tenth of a build); any other row is built, to say what is wrong."""
        columns = self._checked_columns
        if columns is not None:
            data = row.data
            for col in columns:
                if type(data.get(col)) is not str:
                    break
            else:
                return self.job.model or ""
        model: str = self.build_body(row)["model"]
        if self.templates is not None and not self.batch_format:
            self._checked_columns = [c for _, t in self.templates for c in t.columns]
        return model

    def build_body(self, row: Row) -> dict[str, Any]:
        try:
            body = self._body(row)
        except InputDataError:
            raise
        except (KeyError, ValueError, TypeError) as exc:
            msg = exc.args[0] if exc.args else str(exc)
            if isinstance(exc, KeyError):
                msg = (
                    f"the messages template uses {{{msg}}} but the row has no column {msg!r} "
                    f"(its columns: {_names(row.data)})"
                )
            raise InputDataError(f"{self.job.input}:{row.line} (id {row.id}): {msg}") from None
        return body

    def _body(self, row: Row) -> dict[str, Any]:
        job = self.job
        if self.batch_format:
            body = dict(row.data["body"])
            for key, value in job.params.items():
                body.setdefault(key, value)
            if "model" not in body:
                if job.model is None:
                    raise ValueError("the body names no model and the job file sets none")
                body["model"] = job.model
            check_params(body, where="body")
            check_model(body["model"], job.allow_any_model, where="body.model")
        else:
            body = {"model": job.model, **job.params}
            if self.templates is not None:
                body["messages"] = [
                    {**fixed, "content": tmpl.render(row.data)} for fixed, tmpl in self.templates
                ]
            else:
                body["messages"] = row.data.get("messages")
        _check_messages(body.get("messages"))
        model = body["model"]
        if is_o_series(model):
            check_o_series_params(model, body, where="body")
            if "max_tokens" in body:  # the o-series take max_completion_tokens only
                body["max_completion_tokens"] = body.pop("max_tokens")
            _check_o1_roles(model, [m.get("role") for m in body["messages"]], "messages")
        return body

    def keep(self, row: Row) -> dict[str, Any]:
        return {c: row.data.get(c) for c in self.job.keep_columns}


def _names(data: dict[str, Any], most: int = 20) -> str:
    """A row's column names for a message; a very wide row's are cut short."""
    names = sorted(map(str, data))
    shown = ", ".join(names[:most])
    return shown + (f", ... ({len(names)} in all)" if len(names) > most else "") or "none"


def _check_messages(messages: Any) -> None:
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list of {role, content}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f"messages[{i}] must be an object with role and content")
        problem = role_problem(m["role"])
        if problem:  # the API answers 400 for it: a bad row, found before sending
            raise ValueError(f"messages[{i}]: {problem}")


def _check_o1_roles(model: str, roles: list[Any], where: str) -> None:
    if model.startswith("o1-preview") and "system" in roles:
        raise ValueError(
            f"{where}: {model} does not accept system messages; put the instructions "
            "into the user message"
        )
