"""Shared pytest fixtures."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from batcher.mock import MockConfig, ThreadedMockServer

# -- mock server ---------------------------------------------------------------------------------


@pytest.fixture
def mock_server() -> Iterator[Callable[..., ThreadedMockServer]]:
    """Factory: `mock_server(rpm=60, ...)` starts a ThreadedMockServer with that MockConfig.

    `clock=` (keyword) injects a clock; every server started is stopped at teardown.
    """
    started: list[ThreadedMockServer] = []

    def start(*, clock: Callable[[], float] = time.monotonic, **config: Any) -> ThreadedMockServer:
        # Unmarked unless a test asks: here the bundled server plays the real API, whose
        # answers are stored and resumed (tests of the bundled server's own marking pass
        # marked=True).
        config.setdefault("marked", False)
        server = ThreadedMockServer(MockConfig(**config), clock=clock)
        server.start()
        started.append(server)
        return server

    yield start
    for server in reversed(started):
        server.stop()


@pytest.fixture(autouse=True)
def _own_response_store(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each test its own $XDG_CACHE_HOME: the response store is shared by every job of a user,
    so without this one test's answers would serve another's requests."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg-cache")))
