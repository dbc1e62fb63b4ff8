"""A least-recently-used map bounded by entry count and by total size."""

from __future__ import annotations

import collections
from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")


class LruCache(Generic[K, V]):
    """At most ``max_count`` entries and about ``max_bytes`` of them, oldest use out first.

    Sizes are what the caller says (e.g. a payload's length). An entry bigger than
    ``max_bytes`` on its own is still kept, alone, until the next put pushes it out.
    Not thread-safe: each cache belongs to one thread (an event loop, a worker).
    """

    __slots__ = ("_entries", "_max_bytes", "_max_count", "bytes", "evictions")

    def __init__(self, max_count: int, max_bytes: int) -> None:
        if max_count < 1 or max_bytes < 1:
            raise ValueError(f"an LRU cache needs room: {max_count} entries, {max_bytes} bytes")
        self._max_count = max_count
        self._max_bytes = max_bytes
        self._entries: collections.OrderedDict[K, tuple[V, int]] = collections.OrderedDict()
        self.bytes = 0
        """Total size of the entries held."""
        self.evictions = 0
        """Entries pushed out so far."""

    def get(self, key: K) -> V | None:
        """The value, marked as just used; None when absent."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        self._entries.move_to_end(key)
        return entry[0]

    def touch(self, key: K) -> bool:
        """Mark ``key`` as just used; False when absent."""
        if key not in self._entries:
            return False
        self._entries.move_to_end(key)
        return True

    def put(self, key: K, value: V, size: int) -> None:
        """Add or replace an entry as the newest, then evict the oldest past the bounds."""
        old = self._entries.pop(key, None)
        if old is not None:
            self.bytes -= old[1]
        self._entries[key] = (value, size)
        self.bytes += size
        entries = self._entries
        while len(entries) > 1 and (len(entries) > self._max_count or self.bytes > self._max_bytes):
            _, (_, dropped) = entries.popitem(last=False)
            self.bytes -= dropped
            self.evictions += 1

    def discard(self, key: K) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self.bytes -= entry[1]

    def clear(self) -> None:
        self._entries.clear()
        self.bytes = 0

    def keys(self) -> list[K]:
        """The keys held, least recently used first (a copy)."""
        return list(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)
