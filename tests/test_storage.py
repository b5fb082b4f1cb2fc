"""Object-storage input and output (batcher/storage.py) against a real S3-compatible server.

moto in server mode listens on 127.0.0.1 (one server for the module, a fresh bucket per test);
batcher talks to it through pyarrow's own S3 client, found by AWS_ENDPOINT_URL as a user's
MinIO or R2 would be. No client is mocked.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from helpers import review_rows, run_batcher, write_job

from batcher import storage
from batcher.errors import InputDataError, JobSpecError, StorageError
from batcher.journal import read_results
from batcher.spec import job_from_mapping

moto_server = pytest.importorskip("moto.server")

FAST = {"rpm": None, "tpm": None}
_names = itertools.count()


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture
def s3(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> Callable[..., str]:
    """Credentials and endpoint the usual way (environment); `s3()` makes a fresh bucket."""
    for var in ("AWS_PROFILE", "AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_REGION", "us-east-1")

    def bucket(*, create: bool = True) -> str:
        name = f"bkt-{os.getpid()}-{next(_names)}"
        if create:
            admin = pafs.S3FileSystem(endpoint_override=s3_endpoint, allow_bucket_creation=True)
            admin.create_dir(name)
        return name

    return bucket


def _fs() -> pafs.S3FileSystem:
    return pafs.S3FileSystem(endpoint_override=os.environ["AWS_ENDPOINT_URL"])


def _listing(bucket: str) -> list[str]:
    infos = _fs().get_file_info(pafs.FileSelector(bucket, recursive=True))
    return sorted(i.path for i in infos if i.type == pafs.FileType.File)


def _put_parquet(bucket: str, key: str, n: int) -> str:
    table = pa.Table.from_pylist(review_rows(n))
    pq.write_table(table, f"{bucket}/{key}", filesystem=_fs(), row_group_size=7)
    return f"s3://{bucket}/{key}"


def _read(url: str) -> list[dict]:
    fs, path = storage.filesystem(url)
    return pq.read_table(path, filesystem=fs).to_pylist()


def test_s3_input_and_output_round_trip_through_the_cli(
    tmp_path: Path, mock_server, s3: Callable[..., str]
) -> None:
    srv = mock_server(**FAST)
    src, dst = s3(), s3()
    in_url = _put_parquet(src, "data/reviews.parquet", 40)
    out_url = f"s3://{dst}/labels/result.parquet"
    job = write_job(
        tmp_path, srv.url, input=in_url, output=out_url, state_dir="state", keep_columns=["text"]
    )
    res = run_batcher("run", job)
    assert res.returncode == 0, res.stderr
    rows = _read(out_url)
    assert sorted(r["id"] for r in rows) == sorted(f"r{i}" for i in range(40))
    assert {r["status"] for r in rows} == {"ok"}
    assert all(r["text"].startswith("review number") for r in rows)
    # Only the finished object is in the bucket: no temp key left, no journal, no lock.
    assert _listing(dst) == [f"{dst}/labels/result.parquet"]
    # Journal, lock note and the input's local copy live in the state dir.
    local = storage.state_path(tmp_path / "state", out_url)
    assert (local.parent / "result.parquet.journal").stat().st_size > 0
    assert local.exists()  # the local copy of what was published
    assert storage.state_path(tmp_path / "state", in_url).exists()
    assert srv.stats()["requests"] == 40


def test_interrupted_publish_resumes_from_the_local_journal(
    tmp_path: Path, mock_server, s3: Callable[..., str]
) -> None:
    """The run stops where nothing has reached the bucket (it does not exist yet); the rerun
    sends nothing again, reuses the downloaded input, and publishes."""
    srv = mock_server(**FAST)
    src, dst = s3(), s3(create=False)
    in_url = _put_parquet(src, "reviews.parquet", 25)
    out_url = f"s3://{dst}/result.parquet"
    job = write_job(tmp_path, srv.url, input=in_url, output=out_url)
    first = run_batcher("run", job)
    assert first.returncode == 4, first.stderr
    assert "cannot publish" in first.stderr and "run the same command again" in first.stderr
    local = storage.state_path(tmp_path / ".batcher", out_url)  # the default state dir
    journal = local.with_name(local.name + ".journal")
    assert len(list(read_results(journal))) == 25  # every answer kept, locally
    copy = storage.state_path(tmp_path / ".batcher", in_url)
    downloaded_at = copy.stat().st_mtime_ns

    s3_admin = pafs.S3FileSystem(
        endpoint_override=os.environ["AWS_ENDPOINT_URL"], allow_bucket_creation=True
    )
    s3_admin.create_dir(dst)
    second = run_batcher("run", job)
    assert second.returncode == 0, second.stderr
    assert srv.stats()["requests"] == 25  # no row paid twice
    assert copy.stat().st_mtime_ns == downloaded_at  # same object: not downloaded again
    assert sorted(r["id"] for r in _read(out_url)) == sorted(f"r{i}" for i in range(25))
    assert _listing(dst) == [f"{dst}/result.parquet"]


def test_changed_input_object_is_downloaded_again(s3: Callable[..., str], tmp_path: Path) -> None:
    bucket = s3()
    url = _put_parquet(bucket, "in.parquet", 3)
    local = tmp_path / "copy" / "in.parquet"
    storage.fetch_input(url, local)
    assert pq.read_table(local).num_rows == 3
    _put_parquet(bucket, "in.parquet", 5)
    storage.fetch_input(url, local)
    assert pq.read_table(local).num_rows == 5
    assert [p.name for p in local.parent.iterdir() if ".tmp-" in p.name] == []


def test_output_object_appears_only_complete(
    s3: Callable[..., str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An upload that dies half-way leaves the published object as it was (here: the previous
    version) and no temp key; the next publish replaces it whole."""
    bucket = s3()
    url = f"s3://{bucket}/out/result.bin"
    old, new = tmp_path / "old.bin", tmp_path / "new.bin"
    old.write_bytes(b"old" * 1000)
    new.write_bytes(os.urandom(3 << 20))
    storage.publish(old, url)

    real_upload = storage._upload

    def dies_half_way(fs: pafs.FileSystem, local: Path, path: str) -> None:
        # A real partial upload on the real server, then the process "crashes".
        with fs.open_output_stream(path) as dst:
            dst.write(local.read_bytes()[: 1 << 20])
            raise OSError("connection reset by peer")

    monkeypatch.setattr(storage, "_upload", dies_half_way)
    with pytest.raises(StorageError, match="run the same command again"):
        storage.publish(new, url)
    fs, path = storage.filesystem(url)
    with fs.open_input_stream(path) as fh:
        assert fh.read() == old.read_bytes()
    assert _listing(bucket) == [f"{bucket}/out/result.bin"]

    monkeypatch.setattr(storage, "_upload", real_upload)
    with fs.open_output_stream(f"{bucket}/out/.result.bin.tmp-999-dead") as stale:
        stale.write(b"left by a publish that was killed")  # a SIGKILL skips the cleanup
    storage.publish(new, url)
    with fs.open_input_stream(path) as fh:
        assert fh.read() == new.read_bytes()
    assert _listing(bucket) == [f"{bucket}/out/result.bin"]


def test_missing_input_object_is_a_clear_error(
    tmp_path: Path, mock_server, s3: Callable[..., str]
) -> None:
    srv = mock_server(**FAST)
    bucket = s3()
    job = write_job(
        tmp_path, srv.url, input=f"s3://{bucket}/nope.jsonl", output=f"s3://{bucket}/o.parquet"
    )
    res = run_batcher("run", job)
    assert res.returncode == 2, res.stderr
    assert f"s3://{bucket}/nope.jsonl: input object not found" in res.stderr
    assert srv.stats()["requests"] == 0
    with pytest.raises(InputDataError, match="not found"):
        storage.digest(f"s3://{bucket}/nope.jsonl")


# ---- the job file's URLs (no server) ----

BASE = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "{text}"}]}


def test_urls_are_not_joined_with_the_job_dir(tmp_path: Path) -> None:
    job = job_from_mapping(
        {**BASE, "input": "s3://b/in/data.parquet", "output": "gs://c/out/res.parquet"}, tmp_path
    )
    assert job.input_url == "s3://b/in/data.parquet"
    assert job.output_url == "gs://c/out/res.parquet"
    assert job.state_dir == tmp_path / ".batcher"
    assert job.input.parent.parent == job.output.parent.parent == tmp_path / ".batcher"
    assert (job.input.name, job.output.name) == ("data.parquet", "res.parquet")
    assert not job.may_name_other_models  # still told Parquet by its suffix
    local = job_from_mapping({**BASE, "input": "in.jsonl", "output": "o.parquet"}, tmp_path)
    assert (local.input, local.input_url, local.state_dir) == (tmp_path / "in.jsonl", None, None)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://host/x.parquet", "http:// is not supported"),
        ("s3://bucket", "must name an object"),
        ("s3://bucket/folder/", "must name an object"),
        ("s3://AKIA:secret@bucket/x.parquet", "must not carry credentials"),
        ("s3://bucket/x.parquet?secret_key=abc", "must not carry credentials"),
    ],
)
def test_unusable_urls_are_refused(tmp_path: Path, url: str, message: str) -> None:
    with pytest.raises(JobSpecError, match=message) as err:
        job_from_mapping({**BASE, "input": "in.jsonl", "output": url}, tmp_path)
    assert "secret" not in str(err.value).replace("credentials", "")


def test_the_same_url_in_and_out_is_refused(tmp_path: Path) -> None:
    with pytest.raises(JobSpecError, match="output is the input"):
        job_from_mapping({**BASE, "input": "s3://b/x.jsonl", "output": "s3://b/x.jsonl"}, tmp_path)


def test_hf_urls_say_which_extra_to_install() -> None:
    try:
        import huggingface_hub  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("huggingface_hub is installed")
    with pytest.raises(JobSpecError, match=r"pip install 'batcher\[hf\]'"):
        storage.filesystem("hf://datasets/org/name/data.parquet")


def test_shards_publish_their_own_objects(
    tmp_path: Path, mock_server, s3: Callable[..., str]
) -> None:
    srv = mock_server(**FAST)
    src, dst = s3(), s3()
    in_url = _put_parquet(src, "reviews.parquet", 16)
    job = write_job(tmp_path, srv.url, input=in_url, output=f"s3://{dst}/out/labels.parquet")
    for k in (1, 2):
        res = run_batcher("run", job, "--shard", f"{k}/2")
        assert res.returncode == 0, res.stderr
    assert _listing(dst) == [
        f"{dst}/out/labels.shard-1-of-2.parquet",
        f"{dst}/out/labels.shard-2-of-2.parquet",
    ]
    ids = [r["id"] for k in (1, 2) for r in _read(f"s3://{dst}/out/labels.shard-{k}-of-2.parquet")]
    assert sorted(ids) == sorted(f"r{i}" for i in range(16))
