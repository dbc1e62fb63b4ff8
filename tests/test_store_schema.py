"""The store's schema versions: an older file is upgraded at open, one it cannot read is
refused untouched with a message that says what to do."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from heartline._states import TaskState
from heartline.server._model import OutputRow, TaskRow, TransitionRow, WriteBatch
from heartline.server._store import SCHEMA_VERSION, SqliteStore

S = TaskState


def task(task_id: str, state: TaskState) -> TaskRow:
    return TaskRow(
        task_id=task_id, endpoint_id="ep-1", function_id="fn-1", args=b"a", owner="alice",
        state=state, submit_time=100.0, attempt=1, priority=2, max_retries=0,
        max_system_retries=3, walltime=0.0, start_time=None, settle_time=None, held_from=None,
        result=None, error=None, raised_count=0, system_failures=0, resubmitted_from="",
        group_id="", payload_purged=False,
    )  # fmt: skip


def tables(path: Path) -> set[str]:
    conn = sqlite3.connect(path)
    try:
        return {name for (name,) in conn.execute("SELECT name FROM sqlite_master")}
    finally:
        conn.close()


@pytest.mark.parametrize(
    ("version", "message"),
    [
        ("2", r"schema version 2 is too old to upgrade; this heartline upgrades versions 4 to"),
        ("99", r"schema version 99 was written by a newer heartline; .* upgrade heartline"),
    ],
)
async def test_a_file_it_cannot_read_is_refused_untouched(
    tmp_path: Path, version: str, message: str
) -> None:
    path = tmp_path / "other.db"
    conn = sqlite3.connect(path)
    conn.executescript(
        "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);"
        f"INSERT INTO meta VALUES ('schema_version', '{version}');"
        "CREATE TABLE tasks (task_id TEXT PRIMARY KEY, group_id TEXT NOT NULL);"
    )
    conn.close()
    s = SqliteStore(path)
    with pytest.raises(sqlite3.DatabaseError, match=message):
        await s.open()
    assert tables(path) == {"meta", "tasks", "sqlite_autoindex_meta_1", "sqlite_autoindex_tasks_1"}


def make_version_5(path: Path) -> None:
    """Turn a store file of today's schema into one of version 5: no output columns."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.executescript(
            "BEGIN;"
            "ALTER TABLE tasks DROP COLUMN stderr;"
            "ALTER TABLE tasks DROP COLUMN stdout;"
            "UPDATE meta SET value = '5' WHERE key = 'schema_version';"
            "COMMIT;"
        )
    finally:
        conn.close()


def columns(path: Path, table: str = "tasks") -> list[tuple[object, ...]]:
    conn = sqlite3.connect(path)
    try:
        return conn.execute(f"PRAGMA table_info({table})").fetchall()
    finally:
        conn.close()


def make_version_4(path: Path, transitions: list[tuple[object, ...]]) -> None:
    """Turn a store file of today's schema into one of version 4: history in a table."""
    make_version_5(path)
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.executescript(
            "BEGIN;"
            "CREATE TABLE transitions (id INTEGER PRIMARY KEY, task_id TEXT NOT NULL,"
            " from_state TEXT, to_state TEXT NOT NULL, cause TEXT NOT NULL, time REAL NOT NULL,"
            " attempt INTEGER NOT NULL);"
            "CREATE INDEX transitions_task ON transitions (task_id);"
            "ALTER TABLE tasks DROP COLUMN history;"
            "UPDATE meta SET value = '4' WHERE key = 'schema_version';"
            "COMMIT;"
        )
        conn.executemany(
            "INSERT INTO transitions (task_id, from_state, to_state, cause, time, attempt)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            transitions,
        )
    finally:
        conn.close()


async def test_a_version_4_file_is_upgraded_with_its_history(tmp_path: Path) -> None:
    assert SCHEMA_VERSION == 6  # upgraded through version 5
    path = tmp_path / "v4.db"
    first = SqliteStore(path)
    await first.open()
    try:
        await first.write(
            WriteBatch(new_tasks=(task("t1", S.SUCCEEDED), task("t2", S.WAITING_FOR_EP)))
        )
    finally:
        await first.close()
    make_version_4(
        path,
        [
            ("t1", None, "waiting-for-ep", "submit", 100.0, 1),
            ("t2", None, "waiting-for-ep", "submit", 100.5, 1),
            # Out of clock order: history follows insertion.
            ("t1", "waiting-for-ep", "dispatched", "dispatch to agent a1", 99.25, 1),
            ("t1", "dispatched", "success", "agent said\x1fdone\x1e", 101.125, 2),
        ],
    )
    second = SqliteStore(path)
    await second.open()
    try:
        got = await second.get_tasks(["t1", "t2"], include_history=True)
        assert got["t1"][1] == [
            TransitionRow("t1", None, S.WAITING_FOR_EP, "submit", 100.0, 1),
            TransitionRow("t1", S.WAITING_FOR_EP, S.DISPATCHED, "dispatch to agent a1", 99.25, 1),
            TransitionRow("t1", S.DISPATCHED, S.SUCCEEDED, "agent said done ", 101.125, 2),
        ]
        assert got["t2"][1] == [TransitionRow("t2", None, S.WAITING_FOR_EP, "submit", 100.5, 1)]
        # It goes on from there as any store of today's schema.
        await second.write(
            WriteBatch(
                task_updates=(task("t2", S.HELD),),
                transitions=(TransitionRow("t2", S.WAITING_FOR_EP, S.HELD, "hold", 102.0, 1),),
            )
        )
        (_, history) = (await second.get_tasks(["t2"], include_history=True))["t2"]
        assert [t.to_state for t in history] == [S.WAITING_FOR_EP, S.HELD]
    finally:
        await second.close()
    assert "transitions" not in tables(path)
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("SELECT value FROM meta").fetchall() == [(str(SCHEMA_VERSION),)]
    finally:
        conn.close()


async def test_a_version_5_file_is_upgraded_to_keep_task_output(tmp_path: Path) -> None:
    fresh = tmp_path / "fresh.db"
    path = tmp_path / "v5.db"
    for file in (fresh, path):
        store = SqliteStore(file)
        await store.open()
        try:
            await store.write(
                WriteBatch(new_tasks=(task("t1", S.SUCCEEDED), task("t2", S.WAITING_FOR_EP)))
            )
        finally:
            await store.close()
    make_version_5(path)
    assert "stdout" not in [c[1] for c in columns(path)]
    store = SqliteStore(path)
    await store.open()
    try:
        got = await store.get_tasks(["t1", "t2"])
        # Tasks stored before keep no output: none was captured.
        assert got["t1"][0] == task("t1", S.SUCCEEDED)
        assert (got["t1"][0].stdout, got["t1"][0].stderr) == ("", "")
        await store.write(WriteBatch(outputs=(OutputRow("t2", "printed\n", "warned\n"),)))
        (row, _) = (await store.get_tasks(["t2"]))["t2"]
        assert (row.stdout, row.stderr) == ("printed\n", "warned\n")
    finally:
        await store.close()
    # The same columns, in the same order, as a file made by this version.
    assert columns(path) == columns(fresh)
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("SELECT value FROM meta").fetchall() == [(str(SCHEMA_VERSION),)]
    finally:
        conn.close()
