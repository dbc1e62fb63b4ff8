"""The bounded LRU map behind every function cache."""

from __future__ import annotations

import pytest

from heartline._lru import LruCache


def test_evicts_the_least_recently_used_past_the_count() -> None:
    cache: LruCache[str, int] = LruCache(2, 1000)
    cache.put("a", 1, 1)
    cache.put("b", 2, 1)
    assert cache.get("a") == 1  # a is now newer than b
    cache.put("c", 3, 1)
    assert "b" not in cache and cache.get("a") == 1 and cache.get("c") == 3
    assert (len(cache), cache.bytes, cache.evictions) == (2, 2, 1)


def test_evicts_past_the_bytes_and_keeps_one_oversized_entry_alone() -> None:
    cache: LruCache[str, str] = LruCache(10, 100)
    cache.put("a", "x", 60)
    cache.touch("a")
    cache.put("b", "y", 60)
    assert "a" not in cache and cache.bytes == 60
    cache.put("big", "z", 500)
    assert list(k for k in ("a", "b", "big") if k in cache) == ["big"]
    assert cache.bytes == 500
    cache.put("small", "w", 1)
    assert "big" not in cache and cache.bytes == 1


def test_replacing_an_entry_counts_its_size_once() -> None:
    cache: LruCache[str, str] = LruCache(10, 100)
    cache.put("a", "x", 40)
    cache.put("a", "y", 50)
    assert (cache.get("a"), cache.bytes, len(cache)) == ("y", 50, 1)
    cache.discard("a")
    assert (cache.bytes, len(cache), cache.touch("a")) == (0, 0, False)


def test_refuses_a_cache_without_room() -> None:
    with pytest.raises(ValueError):
        LruCache(0, 10)
