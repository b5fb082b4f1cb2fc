"""The pixel size of an image part, for admission counting; never more than a header is read.

`data:` URLs are decoded a prefix at a time and handed to Pillow, which reads only the header
(`Image.open` is lazy: no pixel is decoded). Remote URLs are fetched only when the job asks
(`images.fetch_sizes: true`): a bounded, timed-out GET per URL, once per process, run by a
few threads of the preparing worker (never on the event loop). Any failure gives `None`: the
caller then charges the worst case for the detail level.
"""

from __future__ import annotations

import base64
import binascii
import io
import logging
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor

log = logging.getLogger(__name__)

Size = tuple[int, int]

# Base64 characters tried before the whole URL: a PNG's size is in its first 33 bytes, a JPEG's
# usually in its first few KiB (after EXIF); the whole image is decoded only when both fail.
_DATA_PREFIXES = (4_096, 65_536)
# Remote images: at most this much is read looking for the header, in chunks of _CHUNK.
MAX_HEADER_BYTES = 512 * 1024
_CHUNK = 16 * 1024
_FETCH_THREADS = 8
_CACHE_MAX = 100_000  # remote URLs remembered per process (oldest forgotten first)


def size_from_bytes(data: bytes) -> Size | None:
    """(width, height) from the start of an image file, or None if the header is not there."""
    from PIL import Image  # only image jobs pay its import (~15 ms at every start)

    try:
        with Image.open(io.BytesIO(data)) as im:
            width, height = im.size
    # Pillow's format plugins raise many types on malformed headers (OSError, SyntaxError,
    # struct.error, DecompressionBombError, ...): any of them means "size unknown" here.
    except Exception:
        return None
    return (width, height) if width > 0 and height > 0 else None


def size_from_data_url(url: str) -> Size | None:
    """The size of the image inside a `data:` URL, decoding no more of it than needed."""
    header, sep, payload = url.partition(",")
    if not sep or not header.startswith("data:"):
        return None
    if not header.endswith(";base64"):
        return size_from_bytes(urllib.parse.unquote_to_bytes(payload))
    for n in (*_DATA_PREFIXES, len(payload)):
        prefix = payload[: n - n % 4] if n < len(payload) else payload
        try:
            data = base64.b64decode(prefix)
        except (binascii.Error, ValueError):
            return None
        size = size_from_bytes(data)
        if size is not None or n >= len(payload):
            return size
    return None


def fetch_size(url: str, timeout_s: float, max_bytes: int = MAX_HEADER_BYTES) -> Size | None:
    """GET the start of a remote image (http/https only) until Pillow finds its size.

    Bounded twice: at most `max_bytes` read, and `timeout_s` for the whole fetch (urllib's
    timeout alone is per socket operation, so a server trickling bytes could hold it longer).
    """
    if not url.startswith(("http://", "https://")):
        return None
    deadline = time.monotonic() + timeout_s
    request = urllib.request.Request(
        url, headers={"Range": f"bytes=0-{max_bytes - 1}", "User-Agent": "batcher"}
    )
    buf = bytearray()
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as resp:
            while len(buf) < max_bytes and time.monotonic() < deadline:
                chunk = resp.read(min(_CHUNK, max_bytes - len(buf)))
                if not chunk:
                    break
                buf += chunk
                size = size_from_bytes(bytes(buf))
                if size is not None:
                    return size
    except (OSError, ValueError) as exc:  # URLError, HTTPError, timeouts are OSErrors
        log.debug("image size of %s: %s", url[:200], exc)
        return None
    return None


class RemoteSizes:
    """Sizes of remote images by URL, each fetched once; failures are remembered too."""

    def __init__(self, fetch: Callable[[str, float], Size | None] = fetch_size) -> None:
        self._fetch = fetch
        self._sizes: dict[str, Size | None] = {}
        self._lock = threading.Lock()
        self._warned = False

    def get(self, urls: Iterable[str], timeout_s: float) -> dict[str, Size | None]:
        """The sizes of `urls` (None where unknown), fetching the ones not seen before."""
        wanted = dict.fromkeys(urls)
        with self._lock:
            todo = [u for u in wanted if u not in self._sizes]
        if todo:
            with ThreadPoolExecutor(min(_FETCH_THREADS, len(todo))) as pool:
                fetched = list(pool.map(lambda u: self._fetch(u, timeout_s), todo))
            failed = sum(s is None for s in fetched)
            if failed and not self._warned:
                self._warned = True
                log.warning(
                    "could not read the size of %d remote image(s) (e.g. %s); they are charged "
                    "the worst case for their detail level",
                    failed,
                    next(u for u, s in zip(todo, fetched, strict=True) if s is None)[:200],
                )
            with self._lock:
                if len(self._sizes) + len(todo) > _CACHE_MAX:
                    for old in list(self._sizes)[: len(todo)]:
                        del self._sizes[old]
                self._sizes.update(zip(todo, fetched, strict=True))
        with self._lock:
            return {u: self._sizes.get(u) for u in wanted}


REMOTE_SIZES = RemoteSizes()
