"""The filesystem seam: a job's input and output may be object-storage URLs.

    s3://bucket/key   pyarrow.fs.S3FileSystem (in pyarrow's wheels). Credentials as the AWS SDK
                      finds them: AWS_ACCESS_KEY_ID/…, AWS_PROFILE, instance roles. An
                      S3-compatible server (MinIO, R2, moto) via AWS_ENDPOINT_URL_S3 or
                      AWS_ENDPOINT_URL.
    gs://bucket/key   pyarrow.fs.GcsFileSystem; Application Default Credentials.
    hf://datasets/…   huggingface_hub's HfFileSystem (the optional extra `batcher[hf]`);
                      HF_TOKEN or `huggingface-cli login`.

Object storage is touched only at the two edges of a run, so everything between (streamed
reading, the journal, the lock, resume) is the same code as for local files:

- input: `fetch_input` downloads the object once, streamed in chunks, to a local copy in the
  job's state dir and re-downloads it only when the object's ETag/size/mtime (`digest`)
  changed. Readers then stream the copy (Parquet by record batch, JSONL by line); nothing is
  held in memory. The disk holds the input once more: the price of one code path and of a
  content hash for the journal's fingerprint that needs no second download.
- output: the writers write the local state copy atomically, then `publish` uploads it.
  Readers of the bucket must never see half an output, so the upload goes to a temporary key
  beside the final one and is renamed (a server-side copy) once complete and its size checked.
  An S3 multipart upload is itself invisible until completed, but pyarrow's output stream
  completes it when closed, also after an error mid-way: uploading straight to the final key
  could publish a truncated object. The one exception is an object above S3's 5 GiB
  single-copy limit, uploaded to the final key directly (a multipart completion is atomic for
  readers); hf:// uploads are one commit each, atomic by themselves.

No URL may carry credentials (`s3://key:secret@bucket`, `?access_key=`): URLs appear in logs
and messages, secrets never may.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
from pathlib import Path
from typing import Any, TypeGuard

import pyarrow as pa
import pyarrow.fs as pafs

from batcher.errors import InputDataError, JobSpecError, StorageError

SCHEMES = ("s3", "gs", "gcs", "hf")
CHUNK = 8 << 20  # 8 MiB: above S3's 5 MiB minimum part size, small enough to stream
S3_COPY_LIMIT = 5 << 30  # the largest object one S3 CopyObject (pyarrow's move) can copy
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://(.*)$", re.DOTALL)
_ENDPOINT_VARS = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")


def is_url(text: object) -> TypeGuard[str]:
    """Is this job-file value a URL (any scheme) rather than a local path?"""
    return isinstance(text, str) and _URL.match(text.strip()) is not None


def check_url(url: str) -> str:
    """The URL if batcher can use it; ValueError saying why not (for the job file's checks)."""
    m = _URL.match(url)
    if m is None:
        raise ValueError(f"{url!r} is not a URL")
    scheme, rest = m.group(1).lower(), m.group(2)
    if scheme not in SCHEMES:
        raise ValueError(
            f"{scheme}:// is not supported; use a local path or an s3://, gs:// or hf:// URL"
        )
    if "@" in rest.split("/", 1)[0] or "?" in rest or "#" in rest:
        raise ValueError(
            "a URL must not carry credentials or options (it is shown in logs); give "
            "credentials the usual way (environment variables, a profile, a login)"
        )
    bucket, _, key = rest.partition("/")
    if not bucket or not key or key.endswith("/"):
        raise ValueError(f"{url!r} must name an object: {scheme}://bucket/path/file")
    return url


def url_name(url: str) -> str:
    """The object's file name: s3://b/dir/labels.parquet -> labels.parquet."""
    return url.rstrip("/").rsplit("/", 1)[-1]


def with_name(url: str, name: str) -> str:
    """The same folder, another object: for shard outputs (labels.shard-1-of-4.parquet)."""
    return f"{url.rstrip('/').rsplit('/', 1)[0]}/{name}"


def state_path(state_dir: Path, url: str) -> Path:
    """Where a URL's local copy lives: `<state_dir>/<hash of the URL>/<its file name>`.

    The folder named by the URL keeps two jobs whose outputs share a file name (s3://a/out.
    parquet, s3://b/out.parquet) from sharing a journal; the file name is kept, so formats are
    still told by suffix and messages stay readable.
    """
    folder = hashlib.sha256(url.encode()).hexdigest()[:12]
    return state_dir / folder / url_name(url)


def filesystem(url: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a URL; credentials come from the environment."""
    m = _URL.match(check_url(url))
    assert m is not None
    scheme, rest = m.group(1).lower(), m.group(2)
    try:
        if scheme == "s3":
            endpoint = next((os.environ[v] for v in _ENDPOINT_VARS if os.environ.get(v)), None)
            if endpoint:
                # Given explicitly: an S3-compatible server, whatever this pyarrow reads itself.
                return pafs.S3FileSystem(endpoint_override=endpoint), rest
            return pafs.FileSystem.from_uri(url)  # asks AWS for the bucket's region
        if scheme in ("gs", "gcs"):
            return pafs.GcsFileSystem(), rest
        return pafs.PyFileSystem(pafs.FSSpecHandler(_hf_filesystem())), rest
    except (OSError, pa.ArrowException) as exc:
        raise StorageError(f"cannot reach {url}: {_short(exc)}; {_hint(scheme)}") from None


def _hf_filesystem() -> Any:
    try:
        from huggingface_hub import HfFileSystem
    except ImportError:
        raise JobSpecError("hf:// URLs need huggingface_hub: pip install 'batcher[hf]'") from None
    return HfFileSystem()


def _hint(scheme: str) -> str:
    if scheme == "s3":
        return (
            "check the URL and the AWS credentials (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or "
            "AWS_PROFILE, AWS_REGION; AWS_ENDPOINT_URL for an S3-compatible server)"
        )
    if scheme in ("gs", "gcs"):
        return "check the URL and GOOGLE_APPLICATION_CREDENTIALS (or `gcloud auth`)"
    return "check the URL and HF_TOKEN (or `huggingface-cli login`)"


def _short(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__


def digest(url: str) -> str:
    """The object's identity without reading it: size, mtime and ETag (where the store has
    one). A different value means a different object; the same value is trusted as the same."""
    fs, path = filesystem(url)
    scheme = url.split(":", 1)[0].lower()
    try:
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.NotFound:
            raise InputDataError(f"{url}: input object not found")
        if info.type != pafs.FileType.File:
            raise InputDataError(f"{url}: not an object (a folder?); name the file")
        etag = ""
        with contextlib.suppress(OSError, pa.ArrowException):  # optional: not every store
            with fs.open_input_file(path) as fh:  # a HEAD on S3/GCS, no body is read
                meta = fh.metadata()
            etag = next((v.decode() for k, v in meta.items() if k.lower() in ("etag", "md5")), "")
    except (OSError, pa.ArrowException) as exc:
        raise InputDataError(f"cannot read {url}: {_short(exc)}; {_hint(scheme)}") from None
    mtime = info.mtime_ns if info.mtime_ns is not None else ""
    return f"{info.size}:{mtime}:{etag}"


def fetch_input(url: str, local: Path) -> Path:
    """A local copy of the input object at `local`, downloaded (streamed) unless the copy
    there is of the same object version. Returns `local`."""
    source = local.with_name(local.name + ".source")
    want = {"url": url, "digest": digest(url)}
    with contextlib.suppress(OSError, ValueError):
        if local.is_file() and json.loads(source.read_text()) == want:
            return local  # the same object: no download (resume, estimate, then run)
    fs, path = filesystem(url)
    tmp = local.with_name(f".{local.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        local.parent.mkdir(parents=True, exist_ok=True)
        with fs.open_input_stream(path) as src, tmp.open("wb") as dst:
            while chunk := src.read(CHUNK):
                dst.write(chunk)
        os.replace(tmp, local)
        source.write_text(json.dumps(want))
    except (OSError, pa.ArrowException) as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.filename is not None:  # the local side
            raise StorageError(
                f"cannot copy {url} to {local}: {exc.strerror or exc}; free disk space or "
                "set state_dir: to a folder with room for the input"
            ) from None
        scheme = url.split(":", 1)[0].lower()
        raise InputDataError(f"cannot read {url}: {_short(exc)}; {_hint(scheme)}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return local


def publish(local: Path, url: str) -> None:
    """Upload a finished local file to `url` so that readers see all of it or nothing."""
    fs, path = filesystem(url)
    scheme = url.split(":", 1)[0].lower()
    size = local.stat().st_size
    direct = scheme == "hf" or (scheme == "s3" and size > S3_COPY_LIMIT)
    folder, _, name = path.rpartition("/")
    tmp = path if direct else f"{folder}/.{name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        if scheme == "hf":
            # One commit with the whole file (fsspec's stream would commit a part on error).
            _hf_filesystem().put_file(str(local), path)
            return
        _upload(fs, local, tmp)
        if not direct:
            got = fs.get_file_info(tmp).size
            if got != size:
                raise OSError(f"the uploaded copy holds {got} bytes, not {size}")
            fs.move(tmp, path)
        _remove_leftovers(fs, folder, name)
    except (OSError, pa.ArrowException) as exc:
        if not direct:
            with contextlib.suppress(OSError, pa.ArrowException):
                fs.delete_file(tmp)
        raise StorageError(
            f"cannot publish {local} to {url}: {_short(exc)}; the output is complete in "
            f"{local} (and the journal intact): {_hint(scheme)}, then run the same command "
            "again to upload it"
        ) from None
    except BaseException:
        if not direct:
            with contextlib.suppress(OSError, pa.ArrowException):
                fs.delete_file(tmp)
        raise


def _remove_leftovers(fs: pafs.FileSystem, folder: str, name: str) -> None:
    """Temp keys of earlier publishes of this output that died (a SIGKILL mid-upload): the
    job lock makes this process the output's only publisher, so they are ours to delete."""
    prefix = f".{name}.tmp-"
    with contextlib.suppress(OSError, pa.ArrowException):  # tidiness only: never fatal
        for info in fs.get_file_info(pafs.FileSelector(folder, allow_not_found=True)):
            if info.base_name.startswith(prefix):
                fs.delete_file(info.path)


def _upload(fs: pafs.FileSystem, local: Path, path: str) -> None:
    with local.open("rb") as src, fs.open_output_stream(path) as dst:
        while chunk := src.read(CHUNK):
            dst.write(chunk)


def object_exists(url: str) -> bool:
    """Is there an object at `url`? (for tools and tests; errors say why not)."""
    fs, path = filesystem(url)
    return bool(fs.get_file_info(path).type == pafs.FileType.File)


__all__ = [
    "SCHEMES",
    "check_url",
    "digest",
    "fetch_input",
    "filesystem",
    "is_url",
    "object_exists",
    "publish",
    "state_path",
    "url_name",
    "with_name",
]
