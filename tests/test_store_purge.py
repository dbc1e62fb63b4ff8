"""Store.purge_results: payloads of old settled tasks, and the functions nothing needs;
against each store (tests/store_kit.py)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from heartline._states import TaskState
from heartline.server._model import FunctionRow, OutputRow, TaskRow, TransitionRow, WriteBatch
from heartline.server._store import SqliteStore, Store
from tests import store_kit

# The fixtures: each test that takes `store` runs against every store.
new_store = store_kit.new_store
store = store_kit.store

S = TaskState
CUTOFF = 1000.0


def task(task_id: str, function_id: str, state: TaskState, settle_time: float | None) -> TaskRow:
    return TaskRow(
        task_id=task_id, endpoint_id="ep-1", function_id=function_id, args=b"args",
        owner="alice", state=state, submit_time=10.0, attempt=1, priority=2,
        max_retries=0, max_system_retries=3, walltime=0.0, start_time=None,
        settle_time=settle_time, held_from=None,
        result=b"result" if state == S.SUCCEEDED else None, error=None, raised_count=0,
        system_failures=0, resubmitted_from="", group_id="", payload_purged=False,
    )  # fmt: skip


def function(function_id: str, register_time: float) -> FunctionRow:
    return FunctionRow(function_id, b"pickle:" + function_id.encode(), "alice", register_time)


async def stored(store: Store, ids: list[str]) -> set[str]:
    return {fid for fid in ids if await store.get_function(fid) is not None}


async def test_functions_go_with_the_last_payload_that_uses_them(store: Store) -> None:
    functions = [
        function("old-done", 5.0),  # its only task is purged now: goes
        function("old-done-twice", 5.0),  # two old tasks, both purged: goes
        function("old-unused", 5.0),  # registered long ago, never used: goes
        function("old-pending", 5.0),  # a pending task keeps its payload: stays
        function("old-errored", 5.0),  # ERRORED keeps its payload (retry): stays
        function("old-recent", 5.0),  # settled after the cutoff: stays
        function("old-mixed", 5.0),  # one purged task, one pending: stays
        function("old-in-memory", 5.0),  # unused, but the server holds it: stays
        function("new-unused", CUTOFF + 1),  # just registered, tasks not submitted: stays
    ]
    tasks = [
        task("t1", "old-done", S.SUCCEEDED, 50.0),
        task("t2", "old-done-twice", S.CANCELLED, 50.0),
        task("t3", "old-done-twice", S.FAILED, 60.0),
        task("t4", "old-pending", S.HELD, None),
        task("t5", "old-errored", S.ERRORED, 50.0),
        task("t6", "old-recent", S.SUCCEEDED, CUTOFF + 5),
        task("t7", "old-mixed", S.SKIPPED, 50.0),
        task("t8", "old-mixed", S.WAITING_FOR_EP, None),
    ]
    await store.write(
        WriteBatch(
            functions=tuple(functions),
            new_tasks=tuple(tasks),
            transitions=tuple(TransitionRow(t.task_id, None, t.state, "x", 10.0, 1) for t in tasks),
        )
    )
    ids = [f.function_id for f in functions]
    assert await store.purge_results(CUTOFF, keep_functions={"old-in-memory"}) == 4
    assert await stored(store, ids) == {
        "old-pending", "old-errored", "old-recent", "old-mixed", "old-in-memory", "new-unused"
    }  # fmt: skip
    # The records stay, marked, with their function ids.
    rows = await store.get_tasks(["t1", "t6"])
    assert rows["t1"][0].payload_purged and rows["t1"][0].function_id == "old-done"
    assert not rows["t6"][0].payload_purged
    # Again: nothing more is due, and memory no longer holding one lets it go.
    assert await store.purge_results(CUTOFF) == 0
    assert "old-in-memory" not in await stored(store, ids)


async def test_a_function_registered_again_after_its_purge_is_back(store: Store) -> None:
    await store.write(WriteBatch(functions=(function("f", 5.0),)))
    await store.purge_results(CUTOFF)
    assert await store.get_function("f") is None
    await store.write(WriteBatch(functions=(function("f", CUTOFF + 10),)))
    assert await store.get_function("f") == function("f", CUTOFF + 10)
    await store.purge_results(CUTOFF)
    assert await store.get_function("f") is not None


async def test_the_candidates_are_read_without_the_payloads(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "heartline.db")
    await store.open()
    await store.close()
    with sqlite3.connect(tmp_path / "heartline.db") as conn:
        plan = conn.execute(
            "EXPLAIN QUERY PLAN SELECT function_id FROM functions WHERE register_time < ?", (1.0,)
        ).fetchall()
    assert "COVERING INDEX functions_registered" in " ".join(str(row[-1]) for row in plan)


async def test_the_purge_clears_the_output_of_the_tasks_it_purges(store: Store) -> None:
    tasks = [task("old", "f", S.SUCCEEDED, 50.0), task("recent", "f", S.FAILED, CUTOFF + 5)]
    await store.write(
        WriteBatch(
            new_tasks=tuple(tasks),
            transitions=tuple(TransitionRow(t.task_id, None, t.state, "x", 10.0, 1) for t in tasks),
            outputs=(OutputRow("old", "said", "warned"), OutputRow("recent", "said", "warned")),
        )
    )
    assert await store.purge_results(CUTOFF) == 1
    rows = await store.get_tasks(["old", "recent"])
    old, recent = rows["old"][0], rows["recent"][0]
    assert old.payload_purged and (old.stdout, old.stderr) == ("", "")
    assert (recent.stdout, recent.stderr) == ("said", "warned")
