"""`batcher merge`: shard outputs -> the job's output, each input id exactly once."""

from __future__ import annotations

from batcher.errors import InputDataError
from batcher.readers import count_rows
from batcher.sharding import shard_outputs
from batcher.spec import Job
from batcher.writer import merge_outputs


def merge_shards(job: Job, n: int) -> tuple[int, int]:
    """Merge the N shard outputs of `job`; returns (rows, error rows) written."""
    paths = shard_outputs(job.output, n)
    missing = [p.name for p in paths if not p.exists()]
    if missing:
        raise InputDataError(
            f"merge: shard outputs missing: {', '.join(missing)}; run "
            f"`batcher run JOB --shard K/{n}` for each missing shard first"
        )
    rows, errors = merge_outputs(paths, job.output, expected_rows=count_rows(job))
    if job.output_url is not None:  # the merged output is whole locally: now publish it
        from batcher.storage import publish

        publish(job.output, job.output_url)
    return rows, errors
