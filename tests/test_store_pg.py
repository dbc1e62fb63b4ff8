"""PostgresStore on a real PostgreSQL (tests/pg.py): what the contract suite cannot say of
SQLite. Leadership (one active store a database, the others standing by), a lost
connection, schema versions, and the schema against SQLite's."""

from __future__ import annotations

import asyncio
import inspect
import logging
import sqlite3
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from heartline._states import TaskState
from heartline.server import _pgsql, _pgstore
from heartline.server._model import FunctionRow, TransitionRow, WriteBatch
from heartline.server._pgstore import PostgresStore
from heartline.server._store import SCHEMA_VERSION, SqliteStore, StoreClosedError
from tests.test_store import submitted, task

asyncpg = pytest.importorskip("asyncpg")

S = TaskState
WAIT = 10.0
"""Seconds any wait of these tests may take."""
POLL = 0.05


@pytest.fixture
async def admin(pg_url: str) -> AsyncIterator[Any]:
    """A connection of the test's own to the store's database."""
    conn = await asyncpg.connect(pg_url)
    yield conn
    await conn.close()


@pytest.fixture
async def pg_store(pg_url: str) -> AsyncIterator[PostgresStore]:
    s = PostgresStore(pg_url, standby_poll=POLL)
    await asyncio.wait_for(s.open(), WAIT)
    yield s
    await asyncio.wait_for(s.close(), WAIT)


async def until(read: Callable[[], Any], ok: Callable[[Any], bool], what: str) -> Any:
    """Poll ``read()`` (a value or an awaitable) until ``ok`` of it, for at most WAIT
    seconds; the value."""
    deadline = asyncio.get_running_loop().time() + WAIT
    while True:
        got = read()
        if inspect.isawaitable(got):
            got = await got
        if ok(got):
            return got
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"not within {WAIT} s: {what} (last: {got!r})")
        await asyncio.sleep(0.01)


async def lock_holders(admin: Any) -> list[int]:
    """The backends that hold an advisory lock in the store's database."""
    rows = await admin.fetch(
        "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted"
        " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
    )
    return [r["pid"] for r in rows]


async def connections(admin: Any) -> int:
    """The stores' connections to the database (application_name heartline)."""
    return await admin.fetchval(
        "SELECT count(*) FROM pg_stat_activity"
        " WHERE datname = current_database() AND application_name = 'heartline'"
    )


def lines(caplog: pytest.LogCaptureFixture, event: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if f"event={event} " in r.getMessage()]


async def test_a_second_store_stands_by_until_the_first_closes(
    pg_url: str, admin: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="heartline.server.store")
    first = PostgresStore(pg_url, standby_poll=POLL)
    await asyncio.wait_for(first.open(), WAIT)
    assert lines(caplog, "active") and not lines(caplog, "standby")
    (holder,) = await lock_holders(admin)
    await first.write(submitted(task("t1")))

    second = PostgresStore(pg_url, standby_poll=POLL)
    opening = asyncio.create_task(second.open())
    try:
        await until(lambda: lines(caplog, "standby"), bool, "the second store stands by")
        # It keeps trying for the lock (each try is seen), saying so once.
        tries: set[Any] = set()

        async def tried() -> int:
            tries.add(
                await admin.fetchval(
                    "SELECT query_start FROM pg_stat_activity WHERE datname = current_database()"
                    " AND query LIKE 'SELECT pg_try_advisory_lock%' AND pid != $1",
                    holder,
                )
            )
            return len(tries - {None})

        await until(tried, lambda n: n >= 3, "the standby tries for the lock again")
        assert not opening.done()
        (standby,) = lines(caplog, "standby")
        assert standby.levelno == logging.WARNING
        assert second.describe() in standby.getMessage()
        assert await lock_holders(admin) == [holder]
        with pytest.raises(StoreClosedError):
            second.write(WriteBatch())

        await asyncio.wait_for(first.close(), WAIT)
        await asyncio.wait_for(opening, WAIT)
        (taker,) = await lock_holders(admin)
        assert taker != holder
        assert [r.levelno for r in lines(caplog, "active")] == [logging.INFO, logging.WARNING]
        assert set(await second.get_tasks(["t1"])) == {"t1"}  # the same data
        await second.write(submitted(task("t2")))
    finally:
        opening.cancel()
        await second.close()
    await until(lambda: lock_holders(admin), lambda pids: pids == [], "the lock freed")


async def test_a_standby_is_cancelled_without_a_trace(
    pg_store: PostgresStore, pg_url: str, admin: Any
) -> None:
    own = await until(lambda: connections(admin), lambda n: n == 2, "the writer and the reader")
    second = PostgresStore(pg_url, standby_poll=POLL)
    opening = asyncio.create_task(second.open())
    await until(lambda: connections(admin), lambda n: n > own, "the standby connected")
    opening.cancel()  # what a SIGTERM to a standby server does
    with pytest.raises(asyncio.CancelledError):
        await opening
    await until(lambda: connections(admin), lambda n: n == own, "the standby's connection closed")
    await second.close()  # never opened: nothing to do
    with pytest.raises(StoreClosedError):
        second.write(WriteBatch())
    await pg_store.write(submitted(task("t1")))  # the active one is untouched


async def test_a_killed_connection_is_a_lost_store(pg_url: str, admin: Any) -> None:
    store = PostgresStore(pg_url, standby_poll=POLL)
    await asyncio.wait_for(store.open(), WAIT)
    try:
        await store.write(submitted(task("t1")))
        waiting = asyncio.create_task(store.wait_lost())
        (holder,) = await lock_holders(admin)
        assert await admin.fetchval("SELECT pg_terminate_backend($1)", holder)
        reason = await asyncio.wait_for(waiting, WAIT)
        assert "closed" in reason
        assert await asyncio.wait_for(store.wait_lost(), WAIT) == reason  # it stays lost
        with pytest.raises(StoreClosedError, match="lost"):
            store.write(submitted(task("t2")))
        with pytest.raises(StoreClosedError, match="lost"):
            await store.get_tasks(["t1"])
    finally:
        await asyncio.wait_for(store.close(), WAIT)
    await store.close()  # idempotent
    assert await lock_holders(admin) == []
    # The next store takes over with what was committed.
    again = PostgresStore(pg_url)
    await asyncio.wait_for(again.open(), WAIT)
    try:
        assert set(await again.get_tasks(["t1", "t2"])) == {"t1"}
    finally:
        await again.close()


async def test_writes_queued_when_the_connection_dies_fail(pg_url: str, admin: Any) -> None:
    store = PostgresStore(pg_url, standby_poll=POLL)
    await asyncio.wait_for(store.open(), WAIT)
    began, release = asyncio.Event(), asyncio.Event()

    async def hold(conn: Any, arg: None) -> None:
        began.set()
        await asyncio.wait_for(release.wait(), WAIT)

    try:
        blocker = store._submit(hold, None)
        await asyncio.wait_for(began.wait(), WAIT)
        queued = store.write(submitted(task("t1")))
        (holder,) = await lock_holders(admin)
        await admin.execute("SELECT pg_terminate_backend($1)", holder)
        await asyncio.wait_for(store.wait_lost(), WAIT)
        release.set()
        # The group in flight fails on the dead connection, the next one without trying.
        with pytest.raises((asyncpg.PostgresConnectionError, asyncpg.InterfaceError, OSError)):
            await asyncio.wait_for(blocker, WAIT)
        with pytest.raises(StoreClosedError, match="lost"):
            await asyncio.wait_for(queued, WAIT)
    finally:
        release.set()
        await asyncio.wait_for(store.close(), WAIT)


@pytest.mark.parametrize(
    ("version", "message"),
    [
        (99, r"schema version 99 was written by a newer heartline; this one reads up to 6"),
        (5, r"schema version 5 is too old to upgrade; this heartline reads version 6 only"),
    ],
)
async def test_a_database_it_cannot_read_is_refused_untouched(
    pg_url: str, admin: Any, version: int, message: str
) -> None:
    assert SCHEMA_VERSION == 6
    await admin.execute(
        "CREATE TABLE meta (key text PRIMARY KEY, value text NOT NULL);"
        f"INSERT INTO meta VALUES ('schema_version', '{version}');"
    )
    store = PostgresStore(pg_url)
    with pytest.raises(RuntimeError, match=message) as refused:
        await asyncio.wait_for(store.open(), WAIT)
    assert store.describe() in str(refused.value)
    tables = await admin.fetch(
        "SELECT tablename FROM pg_tables WHERE schemaname = 'public' ORDER BY 1"
    )
    assert [t[0] for t in tables] == ["meta"]
    assert await admin.fetchval("SELECT value FROM meta") == str(version)
    await until(lambda: connections(admin), lambda n: n == 0, "the refused store's connections")
    assert await lock_holders(admin) == []
    with pytest.raises(StoreClosedError):
        store.write(WriteBatch())


async def test_an_older_database_is_upgraded_one_step_a_transaction(
    pg_url: str, admin: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    await admin.execute(
        "CREATE TABLE meta (key text PRIMARY KEY, value text NOT NULL);"
        "INSERT INTO meta VALUES ('schema_version', '4');"
    )
    seen: list[tuple[str, bool]] = []

    def step(name: str) -> Callable[[Any], Any]:
        async def upgrade(conn: Any) -> None:
            seen.append((await conn.fetchval("SELECT value FROM meta"), conn.is_in_transaction()))
            await conn.execute(f"CREATE TABLE {name} (x integer)")

        return upgrade

    monkeypatch.setitem(_pgsql._PG_MIGRATIONS, 4, step("step_4_ran"))
    monkeypatch.setitem(_pgsql._PG_MIGRATIONS, 5, step("step_5_ran"))
    store = PostgresStore(pg_url)
    await asyncio.wait_for(store.open(), WAIT)
    try:
        # Each step saw the version it upgrades, inside a transaction of its own.
        assert seen == [("4", True), ("5", True)]
        assert await admin.fetchval("SELECT value FROM meta") == str(SCHEMA_VERSION)
        names = {r[0] for r in await admin.fetch("SELECT tablename FROM pg_tables")}
        assert {"step_4_ran", "step_5_ran", "tasks", "groups"} <= names
        await store.write(submitted(task("t1")))
        assert list(await store.get_tasks(["t1"])) == ["t1"]
    finally:
        await store.close()


async def test_the_schema_is_sqlite_s_in_postgresql_types(
    pg_store: PostgresStore, admin: Any, tmp_path: Path
) -> None:
    sqlite_store = SqliteStore(tmp_path / "heartline.db")
    await sqlite_store.open()
    await sqlite_store.close()
    types = {"TEXT": "text", "REAL": "double precision", "INTEGER": "integer", "BLOB": "bytea"}
    conn = sqlite3.connect(tmp_path / "heartline.db")
    try:
        names = [n for (n,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        expected = {
            table: [
                (name, types[kind], bool(notnull or pk))
                for _, name, kind, notnull, _, pk in conn.execute(f"PRAGMA table_info({table})")
            ]
            for table in names
        }
    finally:
        conn.close()
    rows = await admin.fetch(
        "SELECT table_name, column_name, data_type, is_nullable FROM information_schema.columns"
        " WHERE table_schema = 'public' ORDER BY table_name, ordinal_position"
    )
    got: dict[str, list[tuple[str, str, bool]]] = {}
    for table, column, kind, nullable in rows:
        got.setdefault(table, []).append((column, kind, nullable == "NO"))
    assert got == expected
    assert await admin.fetchval("SELECT value FROM meta") == str(SCHEMA_VERSION)


async def test_the_writer_connection_keeps_alive(pg_store: PostgresStore) -> None:
    async def settings(conn: Any, arg: None) -> list[str]:
        return [
            await conn.fetchval(f"SHOW {name}")
            for name in ("tcp_keepalives_idle", "tcp_keepalives_interval", "tcp_keepalives_count")
        ]

    # Loopback TCP: PostgreSQL reports (and uses) what the store asked for.
    assert await pg_store._submit(settings, None) == ["10", "5", "3"]


async def test_unsettled_tasks_are_read_in_chunks(
    pg_store: PostgresStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_pgsql, "_CHUNK", 3)
    rows = [task(f"t{i}", submit_time=float(i // 2)) for i in range(8)]
    await pg_store.write(submitted(*reversed(rows)))
    got = await pg_store.load_unsettled()
    assert got == [r.to_record() for r in rows]
    # Across chunks too, a submission's tasks share one float.
    assert got[2].submit_time is got[3].submit_time


async def test_a_row_asyncpg_cannot_encode_fails_only_its_batch(
    pg_store: PostgresStore,
) -> None:
    bad = pg_store.write(
        WriteBatch(
            new_tasks=(task("t-bad"),),
            functions=(FunctionRow("f-bad", "not bytes", "alice", 1.0),),  # type: ignore[arg-type]
        )
    )
    good = pg_store.write(
        WriteBatch(
            new_tasks=(task("t-good"),),
            transitions=(TransitionRow("t-good", None, S.WAITING_FOR_EP, "submit", 1.0, 1),),
        )
    )
    with pytest.raises(asyncpg.DataError, match="bytes-like"):
        await bad
    await good
    assert set(await pg_store.get_tasks(["t-bad", "t-good"])) == {"t-good"}
    assert await pg_store.get_function("f-bad") is None


def test_describe_shows_no_password() -> None:
    store = PostgresStore("postgresql://alice:s3cret@db.example:5433/heartline?password=x&a=b")
    where = store.describe()
    assert "s3cret" not in where and "password" not in where
    assert where.startswith("postgresql://alice:") and where.endswith(
        "db.example:5433/heartline?a=b"
    )
    plain = "postgres://alice@db.example/heartline"
    assert PostgresStore(plain).describe() == plain


def test_without_asyncpg_the_store_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_pgstore, "asyncpg", None)
    with pytest.raises(ImportError, match=r"pip install 'heartline\[postgresql\]'"):
        PostgresStore("postgresql://alice@db.example/heartline")
