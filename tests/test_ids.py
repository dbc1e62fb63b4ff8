"""Server-made ids: valid UUIDs (version 7) that sort in the order they were made."""

from __future__ import annotations

import uuid

from heartline.server import _ids
from heartline.server._ids import new_id


def test_ids_are_version_7_uuids_in_the_order_made() -> None:
    ids = [new_id() for _ in range(20_000)]  # thousands per millisecond
    assert len(set(ids)) == len(ids)
    assert ids == sorted(ids)
    for text in (ids[0], ids[-1]):
        parsed = uuid.UUID(text)
        assert str(parsed) == text
        assert parsed.version == 7
        assert parsed.variant == uuid.RFC_4122


def test_more_than_4096_ids_in_one_millisecond_stay_ordered(monkeypatch) -> None:
    # A clock stopped at one millisecond: past 4,096 ids the counter borrows from the
    # next millisecond instead of wrapping around.
    monkeypatch.setattr(_ids.time, "time_ns", lambda: 1_764_624_000_000 * 1_000_000)
    monkeypatch.setattr(_ids, "_last_ms", 0)
    ids = [new_id() for _ in range(10_000)]
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)
    assert uuid.UUID(ids[0]).int >> 80 == 1_764_624_000_000
    assert uuid.UUID(ids[-1]).int >> 80 == 1_764_624_000_000 + 10_000 // 4096
