"""A real redis-server for tests: started on a free loopback port, stopped (or killed) on demand.

Tests find Redis through `BATCHER_TEST_REDIS_URL` (CI's `.ci/redis.sh start` exports it). Without
it, `shared_redis_url()` starts one server for the session if `redis-server` is on PATH, and says
why it cannot otherwise, so the caller can skip with that reason.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

ENV_URL = "BATCHER_TEST_REDIS_URL"
_STARTUP_TIMEOUT_S = 10.0


def redis_binary() -> str | None:
    return shutil.which("redis-server")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """One redis-server on 127.0.0.1, persistence off, owned by the test that made it."""

    def __init__(self, binary: str | None = None) -> None:
        found = binary or redis_binary()
        if found is None:
            raise RuntimeError("redis-server is not installed (apt-get install -y redis-server)")
        self.binary = found
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self._dir = tempfile.mkdtemp(prefix="batcher-redis-")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        # A free port can be taken between probing and binding: try a few.
        last_err = ""
        for _ in range(5):
            self.port = free_port()
            # Output to a file, not a pipe: a pipe nobody reads blocks the server once full.
            with open(Path(self._dir) / "redis.log", "ab") as log:
                self.proc = subprocess.Popen(
                    [self.binary, "--port", str(self.port), "--bind", "127.0.0.1",
                     "--save", "", "--appendonly", "no", "--dir", self._dir,
                     "--daemonize", "no", "--loglevel", "warning"],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )  # fmt: skip
            deadline = time.monotonic() + _STARTUP_TIMEOUT_S
            while time.monotonic() < deadline and self.proc.poll() is None:
                if _ping(self.port):
                    return self
                time.sleep(0.02)
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait()
            last_err = (Path(self._dir) / "redis.log").read_text(errors="replace")[-500:]
        raise RuntimeError(f"redis-server did not start: {last_err}")

    def kill(self) -> None:
        """SIGKILL: the server vanishes the way a crashed or unplugged one does."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def freeze(self) -> None:
        """SIGSTOP: connections stay open but nothing answers, like a hung or unreachable host."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.thaw()  # a stopped process would not act on SIGTERM
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.proc = None
        shutil.rmtree(self._dir, ignore_errors=True)


class SharedRedis:
    """The session's Redis: `BATCHER_TEST_REDIS_URL` if set, else a server started here."""

    def __init__(self) -> None:
        self.server: RedisServer | None = None
        self.url: str | None = os.environ.get(ENV_URL) or None
        self.skip_reason = ""
        if self.url is None:
            if redis_binary() is None:
                self.skip_reason = (
                    f"no Redis for tests: set {ENV_URL}=redis://127.0.0.1:PORT/0 "
                    "or install redis-server (apt-get install -y redis-server)"
                )
            else:
                self.server = RedisServer().start()
                self.url = self.server.url

    def close(self) -> None:
        if self.server is not None:
            self.server.stop()
