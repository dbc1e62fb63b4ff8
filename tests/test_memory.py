"""The server's garbage-collector policy (server/_memory.py ``Freezer``)."""

from __future__ import annotations

import gc
import time
from collections.abc import Iterator

import pytest

from heartline.server._memory import Freezer


@pytest.fixture
def unfrozen() -> Iterator[None]:
    gc.unfreeze()
    try:
        yield
    finally:
        gc.unfreeze()


@pytest.mark.usefixtures("unfrozen")
def test_what_the_server_holds_is_frozen_each_time_its_agents_grow_by_a_quarter() -> None:
    freezer = Freezer(least=100, growth=1.25, thaw_seconds=600)
    now = time.monotonic()
    assert not freezer.check(99, now) and gc.get_freeze_count() == 0
    assert freezer.check(100, now) and gc.get_freeze_count() > 0
    assert not freezer.check(124, now)  # not a quarter more yet
    assert freezer.check(125, now)


@pytest.mark.usefixtures("unfrozen")
def test_a_thaw_lets_one_full_collection_walk_everything_then_freezes_again() -> None:
    freezer = Freezer(least=1, thaw_seconds=600)
    now = time.monotonic()
    assert freezer.check(1, now)
    # A cycle among frozen objects, dropped: only a walk after a thaw can free it.
    cycle: list[object] = []
    cycle.append(cycle)
    gc.freeze()
    del cycle
    assert not freezer.check(1, now + 600)  # thawed, waiting for a full collection
    assert gc.get_freeze_count() == 0
    assert not freezer.check(1000, now + 601)  # no freeze before that collection
    assert gc.get_freeze_count() == 0
    assert gc.collect() >= 1  # the cycle is reclaimed
    assert freezer.check(1, now + 602) and gc.get_freeze_count() > 0
