"""A bare aiohttp client over a job's rows: what `bench_overhead.py` compares batcher's whole
process with (start-up included). Imports only the standard library and aiohttp.

    python benchmarks/bare_client.py JOB.json BASE_URL API_KEY CONCURRENCY

Reads the job's JSONL input, fills its two-message template (`{text}`), POSTs every body with
`asyncio.gather` over a semaphore on one `ClientSession`, parses each answer as JSON, and
prints the number of rows answered 200 with choices.
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

import aiohttp


def bodies(job: dict[str, Any]) -> list[dict[str, Any]]:
    system, user = job["messages"]
    out = []
    with open(job["input"], "rb") as fh:
        for raw in fh:
            row = json.loads(raw)
            out.append(
                {
                    "model": job["model"],
                    **job["params"],
                    "messages": [
                        {"role": "system", "content": system["content"]},
                        {"role": "user", "content": user["content"].replace("{text}", row["text"])},
                    ],
                }
            )
    return out


async def send_all(url: str, key: str, items: list[dict[str, Any]], concurrency: int) -> int:
    sem = asyncio.Semaphore(concurrency)
    connector = aiohttp.TCPConnector(limit=concurrency)
    headers = {"Authorization": f"Bearer {key}"}
    async with aiohttp.ClientSession(connector=connector, headers=headers) as session:

        async def one(body: dict[str, Any]) -> bool:
            async with sem, session.post(f"{url}/chat/completions", json=body) as resp:
                data = await resp.json()
                return resp.status == 200 and bool(data["choices"])

        results = await asyncio.gather(*(one(b) for b in items))
    return sum(results)


def main() -> int:
    job_file, url, key, concurrency = sys.argv[1:5]
    with open(job_file, encoding="utf-8") as fh:
        job = json.load(fh)
    print(asyncio.run(send_all(url, key, bodies(job), int(concurrency))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
