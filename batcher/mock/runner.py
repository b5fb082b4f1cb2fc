"""Running the app: in a background thread for sync code and tests, or as `batcher serve-mock`."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

from batcher.mock.app import MockServer
from batcher.mock.config import MockConfig


class ThreadedMockServer:
    """A MockServer on its own event loop in a daemon thread, for sync code and subprocesses.

    with ThreadedMockServer(MockConfig(rpm=60)) as srv:
        client = openai.OpenAI(base_url=srv.url, api_key="test")
    """

    def __init__(
        self,
        config: MockConfig | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.server = MockServer(config, clock=clock)
        self.host = host
        self.port = port
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def root(self) -> str:
        return self.server.root

    @property
    def config(self) -> MockConfig:
        return self.server.config

    def url_for(self, region: str = "eu", *, public: bool = False) -> str:
        return self.server.url_for(region, public=public)

    def start(self) -> str:
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._thread = threading.Thread(target=loop.run_forever, name="mock-server", daemon=True)
        self._thread.start()
        try:
            return asyncio.run_coroutine_threadsafe(
                self.server.start(self.host, self.port), loop
            ).result(timeout=30)
        except BaseException:
            self._shutdown_loop()
            raise

    def stop(self) -> None:
        if self._loop is None:
            return
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(self.server.stop(), self._loop).result(timeout=30)
        self._shutdown_loop()

    def _shutdown_loop(self) -> None:
        loop, thread = self._loop, self._thread
        self._loop = self._thread = None
        if loop is None:
            return

        async def cancel_pending() -> None:
            # Slow answers (the [[slow]] marker, long latencies) still sleeping: end them so
            # closing the loop does not warn about destroyed pending tasks.
            me = asyncio.current_task()
            pending = [t for t in asyncio.all_tasks() if t is not me]
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(cancel_pending(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        if thread is not None:
            thread.join(timeout=30)
        loop.close()

    def _call(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` on the server's loop: the counters are only touched from there."""
        if self._loop is None:
            return fn()

        async def run() -> Any:
            return fn()

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(timeout=30)

    def stats(self) -> dict[str, Any]:
        return self._call(self.server.stats)

    def reset(self, *, quota: bool = False) -> None:
        self._call(lambda: self.server.reset(quota=quota))

    def __enter__(self) -> ThreadedMockServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


async def serve_forever(
    config: MockConfig | None = None, host: str = "127.0.0.1", port: int = 0
) -> None:
    """Serve until SIGINT/SIGTERM; prints the client base URL on stdout first."""
    server = MockServer(config)
    url = await server.start(host, port)
    print(url, flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await server.stop()


def main_serve(config: MockConfig | None = None, host: str = "127.0.0.1", port: int = 0) -> None:
    """Blocking entry point for `batcher serve-mock`."""
    asyncio.run(serve_forever(config, host, port))
