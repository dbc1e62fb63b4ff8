"""The store contract suite's kit: the stores it runs against, and the seams its tests
reach into, the same for each store.

A test module binds the fixtures it uses (``store = store_kit.store``, and ``new_store``,
which ``store`` takes): each test that takes one runs once per store, with the ids
``sqlite`` and ``postgresql`` (skipped, saying why, where no PostgreSQL can start:
tests/pg.py). Bound by assignment, not imported: an imported fixture that a test takes
as an argument reads to ruff as a redefinition (F811). The seams are the stores' own,
both private and both meant for tests:

- ``_submit(op, arg)``: queue ``op(conn, arg)`` behind every write queued before it, run
  by the writer inside its group's transaction (SqliteStore calls it on its writer
  thread with a ``sqlite3.Connection``; PostgresStore awaits it with an asyncpg one);
- ``_commit(conn)``: the group's COMMIT, patched to count commits or fail one.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import sqlite3
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from heartline.server._store import SqliteStore, Store

__all__ = [
    "STORES",
    "changes",
    "commit_error",
    "commits_failing",
    "count_commits",
    "duplicate_error",
    "is_sqlite",
    "new_store",
    "query",
    "sqlite_store",
    "store",
    "uses_index",
    "writer_paused",
]

STORES = ("sqlite", "postgresql")
WAIT = 30.0
"""Seconds any wait of the kit may take before the test fails."""


@pytest.fixture(params=STORES)
def new_store(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[[], Store]:
    """Makes unopened stores, all on one place: a SQLite file, or a fresh PostgreSQL
    database (so a second one made is the same store reopened, or a second server)."""
    if request.param == "sqlite":
        path = tmp_path / "heartline.db"
        return lambda: SqliteStore(path)
    from heartline.server._pgstore import PostgresStore

    url = request.getfixturevalue("pg_url")
    return lambda: PostgresStore(url, standby_poll=0.05)


@pytest.fixture
async def store(new_store: Callable[[], Store]) -> AsyncIterator[Store]:
    """An open store of each kind, on the test's loop."""
    s = new_store()
    await s.open()
    yield s
    await s.close()


@pytest.fixture
async def sqlite_store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    """An open SqliteStore, for the tests about SQLite itself."""
    s = SqliteStore(tmp_path / "heartline.db")
    await s.open()
    yield s
    await s.close()


def is_sqlite(store: Store) -> bool:
    return isinstance(store, SqliteStore)


def _run(store: Store, sync: Callable[[Any], Any], pg: Callable[[Any], Any]) -> Any:
    """Queue an op for the writer: ``sync(conn)`` in SQLite's thread, ``await pg(conn)``
    in PostgreSQL's task; the future of its result."""
    if is_sqlite(store):
        return store._submit(lambda conn, arg: sync(conn), None)  # type: ignore[attr-defined]

    async def op(conn: Any, arg: None) -> Any:
        return await pg(conn)

    return store._submit(op, None)  # type: ignore[attr-defined]


@contextlib.asynccontextmanager
async def writer_paused(store: Store) -> AsyncIterator[None]:
    """Hold the writer, so everything queued inside the block forms ONE group."""
    if is_sqlite(store):
        started, release = threading.Event(), threading.Event()

        def block(conn: sqlite3.Connection) -> None:
            started.set()
            release.wait(WAIT)

        blocker = _run(store, block, block)
        assert await asyncio.to_thread(started.wait, WAIT)
    else:
        began, free = asyncio.Event(), asyncio.Event()

        async def hold(conn: Any) -> None:
            began.set()
            await asyncio.wait_for(free.wait(), WAIT)

        blocker = _run(store, hold, hold)
        release = free
        await asyncio.wait_for(began.wait(), WAIT)
    try:
        yield
    finally:
        release.set()
        await blocker


def _patch_commit(store: Store, before: Callable[[], None]) -> None:
    """Call ``before()`` ahead of each of the store's commits (it may raise)."""
    real = store._commit  # type: ignore[attr-defined]
    if is_sqlite(store):

        def commit(conn: Any) -> None:
            before()
            real(conn)
    else:

        async def commit(conn: Any) -> None:  # type: ignore[misc]
            before()
            await real(conn)

    store._commit = commit  # type: ignore[attr-defined]


def count_commits(store: Store) -> list[int]:
    """From now on, ``[n]``: the store's commits."""
    commits = [0]

    def count() -> None:
        commits[0] += 1

    _patch_commit(store, count)
    return commits


def commit_error(store: Store) -> Exception:
    """An error the store's database may raise at COMMIT."""
    if is_sqlite(store):
        return sqlite3.OperationalError("disk I/O error")
    import asyncpg

    return asyncpg.exceptions.DiskFullError("could not write to file: disk I/O error")


@contextlib.contextmanager
def commits_failing(store: Store, error: Exception) -> Iterator[list[int]]:
    """Inside the block, every commit but the first fails with ``error``; yields ``[n]``:
    the commits tried."""
    calls = [0]
    real = store._commit  # type: ignore[attr-defined]

    def maybe_fail() -> None:
        calls[0] += 1
        if calls[0] > 1:
            raise error

    _patch_commit(store, maybe_fail)
    try:
        yield calls
    finally:
        store._commit = real  # type: ignore[attr-defined]


def duplicate_error(store: Store) -> type[Exception]:
    """What the store raises for a row whose key is taken."""
    if is_sqlite(store):
        return sqlite3.IntegrityError
    import asyncpg

    return asyncpg.exceptions.UniqueViolationError


def changes(store: Store) -> asyncio.Future[int]:
    """Rows the writer has inserted, updated or deleted, read in queue order. Only the
    difference of two reads in ONE group (``writer_paused``) means anything: SQLite counts
    since the connection opened, PostgreSQL within the transaction."""
    return _run(
        store,
        lambda conn: conn.total_changes,
        lambda conn: conn.fetchval(
            "SELECT coalesce(sum(n_tup_ins + n_tup_upd + n_tup_del), 0)::bigint"
            " FROM pg_stat_xact_user_tables"
        ),
    )


async def query(store: Store, sql: str) -> list[tuple[Any, ...]]:
    """Rows of ``sql`` (no parameters) read by the writer, in queue order."""

    async def fetch(conn: Any) -> list[tuple[Any, ...]]:
        return [tuple(r) for r in await conn.fetch(sql)]

    return await _run(store, lambda conn: conn.execute(sql).fetchall(), fetch)


async def uses_index(store: Store, sql: str, index: str) -> bool:
    """Whether the database would read ``sql`` through ``index`` (PostgreSQL: when it
    may not scan a whole table, as a small test table tempts it to)."""

    async def explain(conn: Any) -> str:
        await conn.execute("SET LOCAL enable_seqscan = off")
        try:
            return "\n".join(r[0] for r in await conn.fetch(f"EXPLAIN {sql}"))
        finally:
            await conn.execute("SET LOCAL enable_seqscan = on")

    plan = await _run(
        store,
        lambda conn: " ".join(r[-1] for r in conn.execute(f"EXPLAIN QUERY PLAN {sql}")),
        explain,
    )
    if is_sqlite(store):
        return f"USING INDEX {index}" in plan or f"USING COVERING INDEX {index}" in plan
    return re.search(rf"\b(using|on) {index}\b", plan) is not None
