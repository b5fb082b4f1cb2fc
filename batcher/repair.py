"""The follow-up request that repairs a structured answer. Pure: a request in, a request out.

    invalid    the answer did not parse or validate against the schema: the same messages,
               then the answer (as the assistant's turn) and what was wrong with it (as the
               user's), asking for the JSON again
    cut off    finish_reason "length": the same request with twice the max_tokens, up to a
               ceiling (a request already at the ceiling is not repaired)

The repaired request's admission cost is counted like any other (tokens.count_request_tokens),
so the limiter and the budget charge it in full.
"""

from __future__ import annotations

from batcher.records import Request, Result
from batcher.spec import Job
from batcher.tokens import count_request_tokens, max_output_tokens

REFUSED = "the model refused"


def repair_request(req: Request, result: Result, job: Job, ceiling: int) -> Request | None:
    """The request to send to repair `result` (an answer to `req`), or None if it cannot be
    repaired (no answer to correct, a refusal, max_tokens already at the ceiling, too big)."""
    body = dict(req.body)
    if result.finish_reason == "length":
        key = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
        now = body.get(key)
        if not isinstance(now, int) or now >= ceiling:
            return None
        body[key] = min(ceiling, now * 2)
    elif result.content and not (result.error or "").startswith(REFUSED):
        body["messages"] = [
            *body["messages"],
            {"role": "assistant", "content": result.content},
            {
                "role": "user",
                "content": f"That answer is not valid: {result.error}. Reply again with only "
                "the JSON object, matching the schema exactly.",
            },
        ]
    else:
        return None
    reserved = max_output_tokens(body, job.assumed_max_tokens)[0]
    cost = count_request_tokens(body, req.model, job.images) + reserved
    if cost > job.limit_for(req.model).tpm:
        return None
    return Request(req.row_id, body, req.model, cost, req.keep, None, reserved)
