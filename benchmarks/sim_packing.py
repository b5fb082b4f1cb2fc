"""The admission schedule alone on a fake clock: how much of a share its windows can pack.

    python benchmarks/sim_packing.py [--share 0.6] [--seconds 300] [--seeds 3]

No server, no network, no wall clock: `batcher.admission.schedule.reserve` is called with a
simulated `now`, as the local backend's queue head calls it (it sleeps until its slot; a waiter
the look-ahead picks goes at its own slot while the head asks again), for an endless queue of
requests costing what `bench_foreign.py` sends (its rows and template, counted as the engine
counts them: ~320-400 tokens at admission), at Langdock's limits (500 RPM / 60,000 TPM), with
the share the headers reveal held exactly at `--share` (0.6: others use 40 %). Admitted tokens
per minute after the first minute, over the share of the TPM, is the most the schedule can
reach on that server with a perfect estimate: what `bench_foreign.py --variants langdock`
measures, minus every real-world noise. Runs in a few seconds.

Variants show where the rest goes: the packing and the look-ahead's depth, the share margin
(`share_margin_factor`), the pacing's headroom; "10 s slack" is the mean room left in the 10 s
window after an admission (the packing loss: the next request is larger than the room;
negative: over the server's budget, which it would refuse).
"""

from __future__ import annotations

import argparse
import random
import statistics
from pathlib import Path
from typing import Any

from bench_shared import MAX_TOKENS
from bench_shared import WORDS as WORD_RANGE
from common import MODEL, WORDS, job_dict, table

from batcher.admission import schedule
from batcher.admission.policy import Policy, us
from batcher.tokens import admission_cost

RPM, TPM = 500, 60_000
QUEUE = 32  # bench_foreign.py's concurrency: that many requests wait for admission


def request_costs(count: int, seed: int) -> list[int]:
    """What bench_foreign.py's requests cost at admission: its rows (common.write_rows with
    its word range), its job's template and max_tokens, counted as the engine counts them."""
    messages = job_dict(Path("."), "http://unused")["messages"]
    rng = random.Random(seed)
    costs = []
    for _ in range(count):
        text = " ".join(rng.choices(WORDS, k=rng.randint(*WORD_RANGE)))
        body = {
            "model": MODEL,
            "max_tokens": MAX_TOKENS,
            "messages": [
                {"role": m["role"], "content": m["content"].replace("{text}", text)}
                for m in messages
            ],
        }
        costs.append(admission_cost(body, MODEL, MAX_TOKENS))
    return costs


VARIANTS: dict[str, dict[str, Any]] = {
    "default": {},
    "no packing (fills only)": {"lookahead_passes": 0},
    "look-ahead 8": {"lookahead": 8},
    "no look-ahead": {"lookahead": 0},
    "no share margin": {"share_margin_factor": 0.0},
    "headroom 1.0": {"headroom": 1.0},
    "no 10 s token window": {"token_windows_s": (60.0,)},
}


def simulate(
    policy: Policy, share: float, seconds: float, seed: int, costs: list[int]
) -> tuple[float, float]:
    """(admitted tokens per minute after the first minute / the share of the TPM, the mean room
    left in the 10 s token window after an admission)."""
    rnd = random.Random(seed)
    st = schedule.State()
    queue = [rnd.choice(costs) for _ in range(QUEUE)]
    now, admitted, slack, passed = 0, [], [], 0
    budget = policy.tpm * 10 / 60 * schedule._cap(policy, share)
    length = schedule._wlen(policy, 10.0)
    while now < us(seconds):
        st.sh0, st.sht = share, now  # the headers' reading, fresh at every admission
        look = queue[1 : 1 + policy.lookahead]
        reply = schedule.reserve(policy, st, queue[0], now, look, passed)
        cost = queue.pop(reply.waiter)
        passed += 1
        if not reply.waiter:
            now, passed = max(now, reply.at), 0  # the head sleeps until its slot
        admitted.append((reply.at, cost))
        if reply.at >= us(60):
            win = schedule._window(st, reply.at - length)
            slack.append(budget - win.total)
        queue.append(rnd.choice(costs))
    start, end = us(60), us(seconds)
    tokens = sum(c for at, c in admitted if start <= at < end)
    per_minute = tokens / ((end - start) / 60e6)
    return per_minute / (policy.tpm * share), statistics.fmean(slack)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--share", type=float, default=0.6, help="the revealed share (0.6)")
    parser.add_argument("--seconds", type=float, default=300.0, help="simulated seconds")
    parser.add_argument("--seeds", type=int, default=3, help="request streams per variant")
    args = parser.parse_args()
    costs = request_costs(2_000, seed=7)
    rows = []
    for name, knobs in VARIANTS.items():
        policy = Policy(RPM, TPM, **knobs)
        runs = [
            simulate(policy, args.share, args.seconds, s, costs) for s in range(1, args.seeds + 1)
        ]
        uses = [u for u, _ in runs]
        rows.append(
            [
                name,
                statistics.fmean(uses),
                f"{min(uses):.3f}-{max(uses):.3f}",
                statistics.fmean(s for _, s in runs),
            ]
        )
    print(
        f"\nthe schedule alone at {RPM} RPM / {TPM:,} TPM, share {args.share:g} held exactly, "
        f"bench_foreign's requests ({min(costs)}-{max(costs)} tokens, mean "
        f"{statistics.fmean(costs):.0f}), {args.seconds:g} simulated s, "
        f"{args.seeds} streams\n"
    )
    print(table(["variant", "share used", "range", "10 s slack (tokens)"], rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
