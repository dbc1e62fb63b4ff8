"""Memory the server frees goes back to the operating system.

Payloads of several MiB (functions, arguments, results) come and go. glibc's malloc serves
a large block from ``mmap`` (returned to the system on free) only above a threshold that
it raises, by default, to the size of each such block freed, up to 32 MiB: after the first
9.5 MiB function, later ones come from the heap, whose freed room the process keeps. So
20 registered 9.5 MiB functions held about 400 MiB for good, far above what the server's
caches hold. A fixed threshold keeps every block of 1 MiB or more in its own mapping,
returned when freed; smaller blocks, all the hot path uses, are unaffected.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import gc
import logging
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

from heartline._figures import GC_PAUSE_BOUNDS, Buckets

log = logging.getLogger("heartline.server")

MMAP_THRESHOLD = 1024 * 1024
"""Blocks of at least this many bytes get their own mapping (and are returned on free)."""
_M_MMAP_THRESHOLD = -3  # glibc malloc.h


def _libc(name: str, argtypes: tuple[Any, ...]) -> Callable[..., int] | None:
    """glibc's function ``name``, typed; None where there is none (another libc or
    system)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = getattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), name)
    except (OSError, AttributeError):
        return None
    function.argtypes = argtypes
    function.restype = ctypes.c_int
    return function


def trim() -> bool:
    """Give the heap's free pages back to the system (glibc ``malloc_trim``); False where
    it cannot. For after a one-off peak, such as a restart's restore: the rows read, the
    SQLite sort and page cache freed stay in the process otherwise (measured, 200,000
    tasks restored: 120 MiB of 290)."""
    malloc_trim = _libc("malloc_trim", (ctypes.c_size_t,))
    if malloc_trim is None:
        return False
    malloc_trim(0)
    return True


def return_large_frees() -> bool:
    """Fix glibc's mmap threshold at :data:`MMAP_THRESHOLD`; False where it cannot
    (another libc, another system), which changes nothing else."""
    mallopt = _libc("mallopt", (ctypes.c_int, ctypes.c_int))
    if mallopt is None:
        return False
    ok = mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
    if not ok:
        log.debug("event=mallopt-refused")
    return ok


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """The cyclic garbage collector off while a burst makes objects that all live on (a
    restart's task records), then everything made so far moved out of its reach
    (``gc.freeze``).

    Each collection walks the objects of its generation, and a burst of a million
    records sets off collections that walk all those made so far: measured, restoring
    1,000,000 queued tasks, 1.2 s of 16 with the collector on. Frozen, they are left out
    of later full collections too, which would otherwise stop the event loop for as
    long, each time; a frozen object is still freed when its last reference goes."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        if enabled:
            gc.enable()


class GcPauses:
    """How long each cyclic garbage collection stops the process, per generation.

    A collection holds the GIL for its whole walk: the event loop and the store's writer
    thread both wait. Counted from ``gc.callbacks`` (about a microsecond a collection),
    shown as ``heartline_gc_pause_seconds`` with ``--metrics``.
    """

    def __init__(self) -> None:
        self.generations = tuple(Buckets(GC_PAUSE_BOUNDS) for _ in range(3))
        self._started = 0.0

    def install(self) -> None:
        gc.callbacks.append(self._on_collection)

    def remove(self) -> None:
        with contextlib.suppress(ValueError):
            gc.callbacks.remove(self._on_collection)

    def _on_collection(self, phase: str, info: dict[str, int]) -> None:
        # Both phases run on the collecting thread, with the GIL held in between.
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.generations[info["generation"]].observe(time.perf_counter() - self._started)

    def copy(self) -> tuple[Buckets, ...]:
        return tuple(b.copy() for b in self.generations)


class Freezer:
    """Freezes what the server holds each time its agents grow by a quarter.

    A full collection walks every object the collector tracks, and Python starts one
    each time the survivors of younger collections reach a quarter of the objects
    already old. As 10,000 agents connected (each stream some hundreds of objects), that
    made 12 full collections of 0.3 to over 1 s each, 7.3 s in all, each holding the
    event loop; frozen (``gc.freeze``) at each quarter more agents, 2.7 s, none over
    0.5 s (bench/agents.py, docs/PERFORMANCE.md).

    A frozen object is still freed when its last reference goes; only garbage in a
    reference cycle among frozen objects (a stream gone since, say) waits: every
    ``thaw_seconds`` (an hour) the collector is thawed (``gc.unfreeze``), the next full
    collection walks everything once (what a restart froze too) and reclaims it, and
    what survived is frozen again: one long walk an hour, not one each quarter's growth.
    """

    def __init__(
        self, *, least: int = 1000, growth: float = 1.25, thaw_seconds: float = 3600.0
    ) -> None:
        self._least = least
        self._growth = growth
        self._thaw_seconds = thaw_seconds
        self._frozen_at = 0
        self._thawed_at = time.monotonic()
        self._thawed_full: int | None = None
        """While thawed, the full collections counted at the thaw."""

    def check(self, agents: int, now: float) -> bool:
        """Freeze, thaw, or do nothing, given the agents connected and ``now``
        (``time.monotonic()``); True if it froze."""
        if self._thawed_full is not None:
            if _full_collections() == self._thawed_full:
                return False  # waiting for the full collection that reclaims the cycles
            self._thawed_full = None
            return self._freeze(agents)
        if now - self._thawed_at >= self._thaw_seconds:
            self._thawed_at = now
            if gc.get_freeze_count():
                gc.unfreeze()
                self._thawed_full = _full_collections()
            return False
        if agents < self._least or agents < self._frozen_at * self._growth:
            return False
        gc.collect(1)  # the young garbage goes first: frozen, a cycle would wait
        return self._freeze(agents)

    def _freeze(self, agents: int) -> bool:
        gc.freeze()
        self._frozen_at = agents
        return True


def _full_collections() -> int:
    return gc.get_stats()[-1]["collections"]
