"""The Python API: frames and tables in, the same rows in input order with answers out."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

import pandas as pd
import polars as pl
import pyarrow as pa
import pytest
from helpers import API_KEY

import batcher
from batcher.errors import AuthenticationError, InputDataError

FAST = {"rpm": None, "tpm": None}


@pytest.fixture(autouse=True)
def _key_and_state(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TEST_LANGDOCK_KEY", API_KEY)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def _job(url: str, **extra: Any) -> dict[str, Any]:
    return {
        "model": "gpt-4o-mini",
        "endpoint": {"base_url": url, "api_key_env": "TEST_LANGDOCK_KEY"},
        "messages": [{"role": "user", "content": "Label: {text}"}],
        "params": {"max_tokens": 8, "temperature": 0},
        "concurrency": 8,
        "retry": {"max_attempts": 4, "initial_wait_s": 0.01, "max_wait_s": 0.1},
        "progress_interval_s": 60,
        **extra,
    }


def _texts(n: int) -> list[str]:
    return [f"review {i} says something" for i in range(n)]


def test_pandas_in_pandas_out_in_input_order(mock_server) -> None:
    srv = mock_server(**FAST, latency_s=0.0, latency_jitter_s=0.02)
    df = pd.DataFrame({"doc": [f"d{i}" for i in range(30)][::-1], "text": _texts(30)})
    out = batcher.run(_job(srv.url, id_column="doc"), data=df, progress="quiet")
    assert isinstance(out, pd.DataFrame)
    assert list(out["doc"]) == list(df["doc"])  # input order, id column once
    assert list(out["text"]) == list(df["text"])
    assert set(out["status"]) == {"ok"} and out["content"].notna().all()
    assert "id" not in out.columns


def test_polars_and_arrow_with_position_ids(mock_server) -> None:
    srv = mock_server(**FAST)
    pdf = pl.DataFrame({"text": _texts(12)})
    out = batcher.run(_job(srv.url), data=pdf, progress="quiet")
    assert isinstance(out, pl.DataFrame)
    assert out["text"].to_list() == _texts(12)
    table = pa.table({"text": _texts(7)})
    got = batcher.run(_job(srv.url), data=table, progress="quiet")
    assert isinstance(got, pa.Table)
    assert got.column("text").to_pylist() == _texts(7)
    assert set(got.column("status").to_pylist()) == {"ok"}


def test_a_clashing_input_column_is_refused_before_sending(mock_server) -> None:
    srv = mock_server(**FAST)
    df = pd.DataFrame({"text": _texts(3), "content": ["a", "b", "c"]})
    with pytest.raises(InputDataError, match="'content'"):
        batcher.run(_job(srv.url), data=df, progress="quiet")
    assert srv.stats()["requests"] == 0


def test_calling_again_resumes_without_resending(mock_server) -> None:
    srv = mock_server(**FAST)
    df = pd.DataFrame({"text": _texts(20)})
    first = batcher.run(_job(srv.url), data=df, progress="quiet")
    sent = srv.stats()["requests"]
    again = batcher.run(_job(srv.url), data=df, progress="quiet")
    assert srv.stats()["requests"] == sent  # answered rows are not sent again
    assert list(again["content"]) == list(first["content"])


async def test_arun_inside_a_running_loop_and_run_from_a_loop(mock_server) -> None:
    srv = mock_server(**FAST)
    table = pa.table({"text": _texts(5)})
    got = await batcher.arun(_job(srv.url), data=table, progress="quiet")
    assert got.num_rows == 5
    # `run` called where a loop is running (as in Jupyter) gets a thread of its own.
    again = await asyncio.to_thread(lambda: batcher.run(_job(srv.url), data=table))
    assert again.column("content").to_pylist() == got.column("content").to_pylist()
    assert batcher.run(_job(srv.url), data=table, progress="quiet").num_rows == 5


def test_interrupted_arun_resumes_without_resending_answered_rows(mock_server) -> None:
    srv = mock_server(**FAST, latency_s=0.05)
    table = pa.table({"text": _texts(60)})
    job = _job(srv.url, concurrency=2)

    async def interrupted() -> None:
        task = asyncio.create_task(batcher.arun(job, data=table, progress="quiet"))
        while srv.stats()["accepted"] < 10:  # keyed to answers, not to time
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(interrupted())
    before = srv.stats()["accepted"]
    assert 10 <= before < 60
    out = batcher.run(job, data=table, progress="quiet")
    assert out.num_rows == 60 and set(out.column("status").to_pylist()) == {"ok"}
    assert srv.stats()["accepted"] <= 60 + 2  # at most the in-flight requests twice


def test_a_stopped_run_raises_its_error_with_the_partial_result(
    mock_server, monkeypatch: pytest.MonkeyPatch
) -> None:
    srv = mock_server(**FAST, api_keys=frozenset({"right"}))
    monkeypatch.setenv("TEST_LANGDOCK_KEY", "wrong")
    with pytest.raises(AuthenticationError) as info:
        batcher.run(_job(srv.url), data=pa.table({"text": _texts(4)}), progress="quiet")
    partial = info.value.partial  # type: ignore[attr-defined]
    assert partial.num_rows == 4
    assert partial.column("status").null_count == 4  # nothing answered


def test_public_names() -> None:
    for name in batcher.__all__:
        assert getattr(batcher, name) is not None
    assert (Path(batcher.__file__).parent / "py.typed").exists()


def test_typed_ids_come_back_with_their_answers(mock_server) -> None:
    """Ids the reader turns into text with str(): a timestamp id must join back."""
    import datetime as dt

    srv = mock_server(**FAST)
    stamps = [dt.datetime(2024, 1, 1, 5, i) for i in range(4)]
    table = pa.table({"at": pa.array(stamps, pa.timestamp("s")), "text": _texts(4)})
    out = batcher.run(_job(srv.url, id_column="at"), data=table, progress="quiet")
    assert out.column("status").to_pylist() == ["ok"] * 4
    assert out.column("at").to_pylist() == stamps


def test_cancelling_arun_ends_every_task_and_keeps_the_answers(mock_server) -> None:
    srv = mock_server(**FAST, latency_s=0.05)
    table = pa.table({"text": _texts(80)})
    job = _job(srv.url, concurrency=4)

    async def cancel_midway() -> int:
        task = asyncio.create_task(batcher.arun(job, data=table, progress="quiet"))
        while srv.stats()["accepted"] < 8:
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        assert others == []  # no engine task left running on the caller's loop
        return int(srv.stats()["accepted"])

    answered = asyncio.run(cancel_midway())
    out = batcher.run(job, data=table, progress="quiet")
    assert out.column("status").to_pylist() == ["ok"] * 80
    assert srv.stats()["duplicates"] == 0  # every answer received was journaled
    assert answered < 80


def test_a_filtered_frame_comes_back_with_its_index(mock_server) -> None:
    """`df["label"] = out["content"]` must align: the answer has the input's index."""
    srv = mock_server(**FAST)
    df = pd.DataFrame({"product": ["mouse", "keyboard"] * 5, "text": _texts(10)})
    df = df[df["product"] != "keyboard"]  # index 0, 2, 4, 6, 8
    out = batcher.run(_job(srv.url), data=df, progress="quiet")
    assert list(out.index) == [0, 2, 4, 6, 8]
    df["label"] = out["content"]
    assert df["label"].notna().all()
    assert (out["text"] == df["text"]).all()
    named = df.set_index(pd.Index(list("abcde"), name="key"))
    again = batcher.run(_job(srv.url), data=named, progress="quiet")
    assert list(again.index) == list("abcde") and again.index.name == "key"


def test_a_stopped_run_partial_keeps_the_frame_index(
    mock_server, monkeypatch: pytest.MonkeyPatch
) -> None:
    srv = mock_server(**FAST, api_keys=frozenset({"right"}))
    monkeypatch.setenv("TEST_LANGDOCK_KEY", "wrong")
    df = pd.DataFrame({"text": _texts(4)}, index=[10, 20, 30, 40])
    with pytest.raises(AuthenticationError) as info:
        batcher.run(_job(srv.url), data=df, progress="quiet")
    partial = info.value.partial  # type: ignore[attr-defined]
    assert list(partial.index) == [10, 20, 30, 40]
    assert partial["status"].isna().all()


def test_errors_name_the_frame_not_its_internal_copy(mock_server) -> None:
    srv = mock_server(**FAST)
    df = pd.DataFrame({"text": ["fine", None, "fine too"]}, index=[3, 5, 7])
    with pytest.raises(InputDataError) as info:
        batcher.run(_job(srv.url), data=df, progress="quiet")
    message = str(info.value)
    assert "the DataFrame passed as data (row 2, counting from 1, index 5)" in message
    assert ".input.parquet" not in message and "batcher/runs" not in message
    assert srv.stats()["requests"] == 0
    with pytest.raises(InputDataError) as info:
        batcher.run(_job(srv.url, keep_columns=["prodcut"]), data=df, progress="quiet")
    assert "the DataFrame passed as data" in str(info.value)
    assert ".input.parquet" not in str(info.value)


def test_state_of_frames_unused_for_30_days_is_removed(mock_server) -> None:
    """A notebook that labels a new frame every day must not keep a copy of each forever: a
    run's state goes after RUNS_KEPT_S unused; a frame in use again is kept, and its rows
    still come from the response store once its state is gone."""
    from batcher.api import RUNS_KEPT_S, state_dir

    srv = mock_server(**FAST)
    old = pd.DataFrame({"text": _texts(6)})
    batcher.run(_job(srv.url), data=old, progress="quiet")
    folder = state_dir()
    old_files = sorted(p.name for p in folder.iterdir())
    assert any(n.endswith(".input.parquet") for n in old_files)
    assert any(n.endswith(".journal") for n in old_files)
    past = time.time() - RUNS_KEPT_S - 3600
    for p in folder.iterdir():
        os.utime(p, (past, past))
    (folder / "stray.txt").write_text("a file of no run, not yet old")

    new = pd.DataFrame({"text": _texts(4)[::-1]})
    batcher.run(_job(srv.url), data=new, progress="quiet")
    names = {p.name for p in folder.iterdir()}
    assert not names & set(old_files)  # every file of the old run went
    assert "stray.txt" in names and any(n.endswith(".input.parquet") for n in names)

    sent = srv.stats()["requests"]
    again = batcher.run(_job(srv.url), data=old, progress="quiet")
    assert srv.stats()["requests"] == sent  # answered from the response store
    assert set(again["status"]) == {"ok"}


def test_a_frame_in_use_keeps_its_state(tmp_path: Path) -> None:
    import fcntl

    from batcher.api import prune_runs

    now = time.time()
    files = {
        "a.input.parquet": 40,  # a's journal is recent: a is in use
        "a.parquet.journal": 1,
        "b.parquet": 40,
        ".b.parquet.tmp-123": 40,  # an atomic write's leftover belongs to b
        "c.parquet": 40,  # c's journal is locked by a running process
        "c.parquet.journal": 40,
    }
    for name, days in files.items():
        path = tmp_path / name
        path.write_text("x")
        os.utime(path, (now - days * 86400, now - days * 86400))
    with open(tmp_path / "c.parquet.journal", "rb+") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        assert prune_runs(tmp_path, 30 * 86400) == 1  # b alone
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "a.input.parquet",
        "a.parquet.journal",
        "c.parquet",
        "c.parquet.journal",
    ]
    assert prune_runs(tmp_path, 30 * 86400) == 1  # c, once its run let go
    assert prune_runs(tmp_path / "missing") == 0
