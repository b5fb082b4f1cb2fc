"""The collector setting of a run: on while any run is on, then exactly as it was."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from batcher.collector import YOUNG_THRESHOLD, run_collector


@pytest.fixture(autouse=True)
def _restore_gc() -> Iterator[None]:
    saved = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*saved)


def test_a_run_freezes_what_exists_and_restores_the_collector_after() -> None:
    gc.set_threshold(700, 10, 10)
    before = object.__new__(type("Before", (), {}))  # exists before the run: frozen during it
    with run_collector():
        assert gc.get_freeze_count() > 0
        assert gc.get_threshold() == (YOUNG_THRESHOLD, 10, 10)
        assert not any(o is before for o in gc.get_objects())  # out of the collector's view
    assert gc.get_freeze_count() == 0
    assert gc.get_threshold() == (700, 10, 10)
    assert any(o is before for o in gc.get_objects())


def test_nested_runs_restore_only_when_the_last_ends() -> None:
    gc.set_threshold(500, 7, 3)
    with run_collector():
        with run_collector():
            assert gc.get_threshold()[0] == YOUNG_THRESHOLD
        assert gc.get_threshold()[0] == YOUNG_THRESHOLD  # the outer run is still on
        assert gc.get_freeze_count() > 0
    assert gc.get_threshold() == (500, 7, 3)
    assert gc.get_freeze_count() == 0


def test_a_process_that_turned_collection_off_keeps_it_off() -> None:
    gc.set_threshold(0)
    with run_collector():
        assert gc.get_threshold()[0] == 0
    assert gc.get_threshold()[0] == 0


def test_an_error_in_the_run_restores_the_collector() -> None:
    gc.set_threshold(700, 10, 10)
    with pytest.raises(RuntimeError), run_collector():
        raise RuntimeError("boom")
    assert gc.get_threshold() == (700, 10, 10)
    assert gc.get_freeze_count() == 0


def test_objects_the_process_froze_itself_stay_frozen() -> None:
    gc.freeze()
    with run_collector():
        assert gc.get_threshold()[0] == YOUNG_THRESHOLD
    assert gc.get_freeze_count() > 0  # not unfrozen: a pre-fork server keeps what it froze


def test_after_the_command_froze_its_imports_a_run_still_freezes_what_came_since() -> None:
    """The command freezes what its imports made; the objects made after (the job, the engine,
    lazy imports) are still frozen for the run, and everything is unfrozen at its end."""
    from batcher import collector

    gc.freeze()
    collector.imports_frozen()
    try:
        since = [[] for _ in range(1000)]  # noqa: F841 (made after the freeze: tracked)
        frozen = gc.get_freeze_count()
        with run_collector():
            assert gc.get_freeze_count() >= frozen + 1000
        assert gc.get_freeze_count() == 0
    finally:
        collector._command_froze = False
        gc.unfreeze()
