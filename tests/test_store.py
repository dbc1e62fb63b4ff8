"""The store contract, against each store (tests/store_kit.py): round trips, group commit,
ordering, recovery."""

from __future__ import annotations

import asyncio
import itertools
import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest

from heartline._states import SkipReason, TaskState
from heartline.server._model import (
    FAILURE_WALLTIME,
    EndpointRow,
    ErrorInfo,
    FunctionRow,
    OutputRow,
    Standing,
    TaskRow,
    TransitionRow,
    WriteBatch,
)
from heartline.server._store import SqliteStore, Store, StoreClosedError
from tests import store_kit
from tests.store_kit import (
    changes,
    commit_error,
    commits_failing,
    count_commits,
    duplicate_error,
    is_sqlite,
    writer_paused,
)

# The fixtures: each test that takes `store` or `new_store` runs against every store.
new_store = store_kit.new_store
store = store_kit.store
sqlite_store = store_kit.sqlite_store

S = TaskState


def task(task_id: str, **changes: object) -> TaskRow:
    row = TaskRow(
        task_id=task_id, endpoint_id="ep-1", function_id="fn-1", args=b"args:" + task_id.encode(),
        owner="alice", state=S.WAITING_FOR_EP, submit_time=100.0, attempt=1, priority=2,
        max_retries=0, max_system_retries=3, walltime=0.0, start_time=None, settle_time=None,
        held_from=None, result=None, error=None, raised_count=0, system_failures=0,
        resubmitted_from="", group_id="", payload_purged=False,
    )  # fmt: skip
    return row._replace(**changes)


def submitted(*rows: TaskRow) -> WriteBatch:
    """A submit batch: the new tasks and their first transitions."""
    return WriteBatch(
        new_tasks=rows,
        transitions=tuple(
            TransitionRow(r.task_id, None, r.state, "submit", r.submit_time, 1) for r in rows
        ),
    )


async def test_round_trip_of_every_field(store: Store) -> None:
    full = task(
        "t-full", endpoint_id="ep-9", function_id="fn-9", args=b"\x00\xffargs", owner="bob",
        state=S.HELD, submit_time=12.5, attempt=3, priority=1, max_retries=4,
        max_system_retries=5, walltime=60.0, start_time=13.25, settle_time=14.75,
        held_from=S.WAITING_FOR_DEPS, result=b"\x00result", raised_count=2, system_failures=1,
        error=ErrorInfo("TimeoutError", "took too long", "Traceback ...", FAILURE_WALLTIME),
        resubmitted_from="t-old", group_id="g-1", payload_purged=True,
    )  # fmt: skip
    bare = task("t-bare")  # None times, no error, no result, no held_from
    await store.write(submitted(full, bare))
    got = await store.get_tasks(["t-full", "t-bare", "t-unknown"])
    assert set(got) == {"t-full", "t-bare"}
    assert got["t-full"] == (full, [])
    assert got["t-bare"] == (bare, [])
    assert type(got["t-full"][0].state) is TaskState
    assert type(got["t-full"][0].held_from) is TaskState
    assert await store.get_tasks([]) == {}


async def test_get_tasks_many_ids_and_unknowns(store: Store) -> None:
    rows = [task(f"t{i:04}") for i in range(1200)]  # more ids than one IN (...) chunk
    await store.write(submitted(*rows))
    asked = [r.task_id for r in rows] + ["nope", "t0001"]  # an unknown id and a repeat
    got = await store.get_tasks(asked, include_history=True)
    assert len(got) == 1200 and "nope" not in got
    assert all(len(history) == 1 for _, history in got.values())


async def test_update_changes_only_lifecycle_columns(store: Store) -> None:
    await store.write(submitted(task("t1")))
    changed = task(
        "t1", state=S.ERRORED, attempt=2, start_time=5.0, settle_time=6.0, raised_count=1,
        error=ErrorInfo("ValueError", "bad", "tb"), args=b"ignored", function_id="ignored",
    )  # fmt: skip
    await store.write(WriteBatch(task_updates=(changed,)))
    (row, _) = (await store.get_tasks(["t1"]))["t1"]
    assert row == changed._replace(args=b"args:t1", function_id="fn-1")


async def test_updates_of_one_task_in_a_group_are_coalesced(store: Store) -> None:
    await store.write(submitted(task("t1")))
    steps = [S.WAITING_FOR_EP, S.DISPATCHED, S.WAITING_FOR_NODES, S.WAITING_FOR_LAUNCH, S.RUNNING]
    async with writer_paused(store):
        before = changes(store)
        futures = [
            store.write(
                WriteBatch(
                    task_updates=(task("t1", state=finish),),
                    transitions=(TransitionRow("t1", start, finish, "agent", 1.0 + i, 1),),
                )
            )
            for i, (start, finish) in enumerate(itertools.pairwise(steps))
        ]
        # A batch with history and no snapshot of its task appends to the same UPDATE.
        futures.append(
            store.write(
                WriteBatch(transitions=(TransitionRow("t1", S.RUNNING, S.RUNNING, "x", 9.0, 1),))
            )
        )
        after = changes(store)
    await asyncio.gather(*futures)
    # One UPDATE for four queued ones: the last snapshot wins, the histories join in order.
    assert await after - await before == 1
    row, history = (await store.get_tasks(["t1"], include_history=True))["t1"]
    assert row.state is S.RUNNING
    assert [(t.from_state, t.to_state, t.time) for t in history] == [
        (None, S.WAITING_FOR_EP, 100.0),
        *[(a, b, 1.0 + i) for i, (a, b) in enumerate(itertools.pairwise(steps))],
        (S.RUNNING, S.RUNNING, 9.0),
    ]


async def test_output_is_written_apart_from_the_row_and_the_last_one_wins(
    store: Store,
) -> None:
    await store.write(submitted(task("t1"), task("t2")))
    running = task("t1", state=S.RUNNING)
    errored = task("t1", state=S.ERRORED, error=ErrorInfo("ValueError", "bad", "tb"))
    await store.write(
        WriteBatch(task_updates=(errored,), outputs=(OutputRow("t1", "out 1\n", "err 1\n"),))
    )
    (row, _) = (await store.get_tasks(["t1"]))["t1"]
    assert (row.stdout, row.stderr) == ("out 1\n", "err 1\n")
    assert row == errored._replace(stdout="out 1\n", stderr="err 1\n")
    # A task update keeps the stored output; a list of tasks leaves it out.
    await store.write(WriteBatch(task_updates=(running,)))
    (row, _) = (await store.get_tasks(["t1"], include_history=True))["t1"]
    assert (row.state, row.stdout, row.stderr) == (S.RUNNING, "out 1\n", "err 1\n")
    assert {(r.task_id, r.stdout, r.stderr) for r in await store.list_tasks()} == {
        ("t1", "", ""),
        ("t2", "", ""),
    }
    # In one commit group: the last output of a task wins, whatever updates come after it.
    async with writer_paused(store):
        futures = [
            store.write(WriteBatch(task_updates=(errored,), outputs=(OutputRow("t1", "2", ""),))),
            store.write(WriteBatch(outputs=(OutputRow("t1", "3", "three"),))),
            store.write(WriteBatch(task_updates=(running,))),
        ]
    await asyncio.gather(*futures)
    got = await store.get_tasks(["t1", "t2"])
    assert (got["t1"][0].state, got["t1"][0].stdout, got["t1"][0].stderr) == (
        S.RUNNING,
        "3",
        "three",
    )
    assert (got["t2"][0].stdout, got["t2"][0].stderr) == ("", "")
    # An empty output replaces a stored one too (a later attempt that printed nothing).
    await store.write(WriteBatch(outputs=(OutputRow("t1", "", ""),)))
    (row, _) = (await store.get_tasks(["t1"]))["t1"]
    assert (row.stdout, row.stderr) == ("", "")


async def test_a_malformed_output_fails_its_own_batch_only(store: Store) -> None:
    await store.write(submitted(task("t1")))
    bad = store.write(WriteBatch(outputs=(OutputRow("t1", b"bytes", ""),)))  # type: ignore[arg-type]
    good = store.write(WriteBatch(outputs=(OutputRow("t1", "fine", ""),)))
    with pytest.raises(TypeError, match="task t1: output must be two strings"):
        await bad
    await good
    assert (await store.get_tasks(["t1"]))["t1"][0].stdout == "fine"


async def test_history_keeps_every_field_and_any_cause(store: Store) -> None:
    await store.write(submitted(task("t1")))
    odd = TransitionRow(
        "t1", S.WAITING_FOR_EP, S.ERRORED, "raised ValueError('a\x1fb\x1ec')\n\tline 2",
        1764624000.123456789, 7,
    )  # fmt: skip
    await store.write(WriteBatch(task_updates=(task("t1", state=S.ERRORED),), transitions=(odd,)))
    (_, (first, got)) = (await store.get_tasks(["t1"], include_history=True))["t1"]
    assert first == TransitionRow("t1", None, S.WAITING_FOR_EP, "submit", 100.0, 1)
    # The separators the stored form uses become spaces; the time comes back exactly.
    assert got == odd._replace(cause="raised ValueError('a b c')\n\tline 2")
    assert got.time == 1764624000.123456789


async def test_history_is_in_insertion_order(store: Store) -> None:
    await store.write(submitted(task("t1"), task("t2")))
    # Times out of order on purpose: history follows insertion, not the clock.
    await store.write(
        WriteBatch(
            transitions=(
                TransitionRow("t1", S.WAITING_FOR_EP, S.DISPATCHED, "dispatch", 9.0, 1),
                TransitionRow("t2", S.WAITING_FOR_EP, S.HELD, "hold", 1.0, 1),
            )
        )
    )
    await store.write(
        WriteBatch(
            transitions=(TransitionRow("t1", S.DISPATCHED, S.WAITING_FOR_NODES, "ack", 2.0, 1),)
        )
    )
    got = await store.get_tasks(["t1", "t2"], include_history=True)
    assert [(t.from_state, t.to_state, t.cause) for t in got["t1"][1]] == [
        (None, S.WAITING_FOR_EP, "submit"),
        (S.WAITING_FOR_EP, S.DISPATCHED, "dispatch"),
        (S.DISPATCHED, S.WAITING_FOR_NODES, "ack"),
    ]
    assert [t.to_state for t in got["t2"][1]] == [S.WAITING_FOR_EP, S.HELD]
    assert (await store.get_tasks(["t1"]))["t1"][1] == []  # history only when asked


async def test_list_tasks_filters_and_keyset_pagination(store: Store) -> None:
    rows = [
        task(
            f"t{i:02}",
            submit_time=float(i // 2),
            owner="alice" if i % 3 else "bob",
            endpoint_id="ep-a" if i % 2 else "ep-b",
            state=S.SUCCEEDED if i % 4 == 0 else S.RUNNING,
            result=b"big result" if i % 4 == 0 else None,
        )
        for i in range(20)
    ]
    await store.write(submitted(*rows))
    newest_first = sorted(rows, key=lambda r: (r.submit_time, r.task_id), reverse=True)

    pages, after = [], None
    while page := await store.list_tasks(limit=6, after=after):
        pages.append([r.task_id for r in page])
        after = (page[-1].submit_time, page[-1].task_id)
    assert [len(p) for p in pages] == [6, 6, 6, 2]
    assert [task_id for page in pages for task_id in page] == [r.task_id for r in newest_first]

    def ids(**f: object) -> list[str]:
        return [r.task_id for r in newest_first if all(getattr(r, k) == v for k, v in f.items())]

    assert [r.task_id for r in await store.list_tasks(owner="bob")] == ids(owner="bob")
    assert [r.task_id for r in await store.list_tasks(endpoint_id="ep-a")] == ids(
        endpoint_id="ep-a"
    )
    got = await store.list_tasks(states={S.SUCCEEDED}, owner="alice")
    assert [r.task_id for r in got] == ids(state=S.SUCCEEDED, owner="alice")
    assert got and all(r.args == b"" and r.result == b"" for r in got)  # payloads left behind
    assert await store.list_tasks(states=()) == []
    assert [r.task_id for r in await store.list_tasks(limit=3)] == ids()[:3]
    with pytest.raises(ValueError, match="limit"):
        await store.list_tasks(limit=0)


async def test_load_unsettled_takes_pending_and_errored_only(store: Store) -> None:
    rows = [task(f"t-{s.name}", state=s, submit_time=float(-i)) for i, s in enumerate(TaskState)]
    await store.write(submitted(*rows))
    lost = task("t-lost", submit_time=99.0, interrupted=True)
    await store.write(submitted(lost))
    # A task whose column differs from its default, for each column a plain task's
    # read leaves out (SqliteStore reads those tasks whole): each must load as stored.
    unusual = [
        task(f"t-{name}", **{name: value})
        for name, value in {
            "start_time": 1.5, "settle_time": 2.5, "held_from": S.WAITING_FOR_EP,
            "result": b"r", "resubmitted_from": "t-old", "group_id": "g-1",
            "payload_purged": True, "name": "fetch", "inputs": ("t-old",),
            "skip_reason": SkipReason.WHEN_FALSE,
            "error": ErrorInfo("E", "m", "tb", FAILURE_WALLTIME),
        }.items()
    ]  # fmt: skip
    await store.write(submitted(*unusual))
    got = await store.load_unsettled()
    # A record may leave its args in the store (SqliteStore: a plain task's), for its
    # dispatch to read.
    left = [r.task_id for r in got if r.args is None]
    assert bool(left) is isinstance(store, SqliteStore)
    stored = await store.get_args([*left, "t-unknown"])
    assert sorted(stored) == sorted(left)
    for r in got:
        if r.args is None:
            r.args = stored[r.task_id]
    expected = [r for r in [*rows, lost, *unusual] if r.state.pending or r.state is S.ERRORED]
    # Records as the scheduler holds them: every stored column, the flag as a standing;
    # in no particular order.
    assert sorted(got, key=lambda r: r.task_id) == [
        r.to_record() for r in sorted(expected, key=lambda r: r.task_id)
    ]
    assert {r.state for r in got} == {s for s in TaskState if s.pending} | {S.ERRORED}
    by_id = {r.task_id: r for r in got}
    assert by_id["t-lost"].standing is Standing.LOST
    assert by_id["t-WAITING_FOR_EP"].standing is Standing.FRESH
    # Values many tasks repeat are one object, not a copy per row.
    assert all(r.endpoint_id is got[0].endpoint_id and r.owner is got[0].owner for r in got)


async def test_functions_endpoints_and_counts(store: Store) -> None:
    await store.write(
        WriteBatch(
            functions=(FunctionRow("fn-1", b"pickle-1", "alice", 1.0),),
            endpoints=(
                EndpointRow("ep-1", "local", "alice", 1.0),
                EndpointRow("ep-2", "gpu", "alice", 2.0),
                EndpointRow("ep-3", "local", "bob", 3.0),
            ),
            new_tasks=(task("t1"), task("t2", owner="bob", state=S.FAILED)),
        )
    )
    # Functions are immutable (first wins); endpoints are replaced (re-registration).
    await store.write(
        WriteBatch(
            functions=(FunctionRow("fn-1", b"other", "alice", 9.0),),
            endpoints=(EndpointRow("ep-2", "gpu", "alice", 5.0),),
        )
    )
    assert await store.get_function("fn-1") == FunctionRow("fn-1", b"pickle-1", "alice", 1.0)
    assert await store.get_function("nope") is None
    assert await store.function_tails(["fn-1", "nope", "fn-1"], 3) == {"fn-1": b"e-1"}
    assert await store.function_tails(["fn-1"], 100) == {"fn-1": b"pickle-1"}
    assert await store.get_endpoint("ep-2") == EndpointRow("ep-2", "gpu", "alice", 5.0)
    assert await store.get_endpoint("nope") is None
    assert (await store.get_endpoint_by_name("local", "bob")) == EndpointRow(
        "ep-3", "local", "bob", 3.0
    )
    assert await store.get_endpoint_by_name("gpu", "bob") is None
    assert [e.endpoint_id for e in await store.list_endpoints("alice")] == ["ep-2", "ep-1"]
    assert len(await store.list_endpoints()) == 3
    counts = await store.count_by_state()
    assert counts == {**dict.fromkeys(TaskState, 0), S.WAITING_FOR_EP: 1, S.FAILED: 1}
    assert (await store.count_by_state("bob"))[S.FAILED] == 1
    assert (await store.count_by_state("bob"))[S.WAITING_FOR_EP] == 0


async def test_data_survives_close_and_reopen(new_store: Callable[[], Store]) -> None:
    first = new_store()
    await first.open()
    done = task("t1", state=S.SUCCEEDED, result=b"1024", settle_time=3.0)
    await first.write(submitted(done))
    await first.write(WriteBatch(functions=(FunctionRow("fn-1", b"p", "alice", 1.0),)))
    await first.close()

    second = new_store()
    await second.open()
    try:
        got = await second.get_tasks(["t1"], include_history=True)
        assert got["t1"][0] == done
        assert [t.cause for t in got["t1"][1]] == ["submit"]
        assert await second.get_function("fn-1") is not None
    finally:
        await second.close()


async def test_duplicate_task_fails_only_its_own_batch(store: Store) -> None:
    await store.write(submitted(task("old")))
    commits = count_commits(store)
    async with writer_paused(store):
        good_before = store.write(submitted(task("a")))
        duplicate = store.write(submitted(task("b"), task("old")))
        good_after = store.write(submitted(task("c")))
    await good_before
    with pytest.raises(duplicate_error(store)):
        await duplicate
    await good_after
    assert commits[0] == 2  # the blocker's group, then ONE commit for all three batches
    got = await store.get_tasks(["a", "b", "c", "old"], include_history=True)
    assert set(got) == {"a", "c", "old"}  # "b" went down with its batch
    assert len(got["old"][1]) == 1  # the duplicate's transition was rolled back too


async def test_purge_results(store: Store) -> None:
    rows = [
        task("old-ok", state=S.SUCCEEDED, settle_time=10.0, result=b"r"),
        task("old-cancelled", state=S.CANCELLED, settle_time=10.0),
        task("old-errored", state=S.ERRORED, settle_time=10.0, error=ErrorInfo("E", "m")),
        task("new-ok", state=S.SUCCEEDED, settle_time=30.0, result=b"r"),
        task("running", state=S.RUNNING),
    ]
    await store.write(submitted(*rows))
    assert await store.purge_results(settled_before=20.0) == 2
    assert await store.purge_results(settled_before=20.0) == 0  # already purged
    got = await store.get_tasks([r.task_id for r in rows])
    for task_id in ("old-ok", "old-cancelled"):
        assert got[task_id][0].result is None
        assert got[task_id][0].args == b""
        assert got[task_id][0].payload_purged
    for r in rows[2:]:
        assert got[r.task_id][0] == r


async def test_a_read_sees_every_write_queued_before_it(store: Store) -> None:
    written = store.write(submitted(task("t1")))
    updated = store.write(WriteBatch(task_updates=(task("t1", state=S.DISPATCHED),)))
    got = await store.get_tasks(["t1"])  # not awaiting the writes first
    assert got["t1"][0].state is S.DISPATCHED
    assert written.done() and updated.done()
    assert (await store.count_by_state())[S.DISPATCHED] == 1


async def test_close_flushes_queued_writes(new_store: Callable[[], Store]) -> None:
    s = new_store()
    await s.open()
    futures = [s.write(submitted(task(f"t{i}"))) for i in range(50)]
    await s.close()
    assert all(f.done() and f.exception() is None for f in futures)
    await s.close()  # idempotent
    with pytest.raises(StoreClosedError):
        s.write(submitted(task("late")))
    with pytest.raises(StoreClosedError):
        await s.get_tasks(["t1"])

    reopened = new_store()
    await reopened.open()
    try:
        assert len(await reopened.get_tasks([f"t{i}" for i in range(50)])) == 50
    finally:
        await reopened.close()


async def test_a_failed_commit_reaches_the_futures_and_the_writer_lives_on(
    store: Store,
) -> None:
    error = commit_error(store)
    with commits_failing(store, error) as calls:
        async with writer_paused(store):  # the first commit is the blocker's own group
            lost = [store.write(submitted(task("t1"))), store.write(submitted(task("t2")))]
            read = asyncio.create_task(store.get_tasks(["t1"]))
            await asyncio.sleep(0)  # one loop turn: the read runs up to its enqueue
        for fut in lost:
            with pytest.raises(type(error), match="disk I/O"):
                await fut
        with pytest.raises(type(error)):
            await read  # it saw a write that was then rolled back
        assert calls[0] == 2

    await store.write(submitted(task("t3")))
    assert set(await store.get_tasks(["t1", "t2", "t3"])) == {"t3"}


async def test_close_of_a_never_opened_store_is_a_no_op(
    new_store: Callable[[], Store], tmp_path: Path
) -> None:
    s = new_store()
    await s.close()
    await s.close()
    with pytest.raises(StoreClosedError):
        s.write(WriteBatch())
    with pytest.raises(StoreClosedError):
        await s.get_request("r")
    with pytest.raises(RuntimeError, match="opens once"):
        await s.open()
    if is_sqlite(s):
        assert not (tmp_path / "heartline.db").exists()


async def test_open_fails_cleanly_on_a_bad_path(tmp_path: Path) -> None:
    s = SqliteStore(tmp_path / "missing-dir" / "heartline.db")
    with pytest.raises(sqlite3.OperationalError):
        await s.open()


async def test_the_wal_is_checkpointed_off_the_commit_path(sqlite_store: SqliteStore) -> None:
    # A checkpoint inside a commit made that commit wait for the copy and its fsync.
    (auto,) = await sqlite_store._submit(
        lambda conn, arg: conn.execute("PRAGMA wal_autocheckpoint").fetchone(), None
    )
    assert auto == 0
    # Yet the WAL stays small: 2,000 commits of a task with 8 KiB of args, which would
    # grow it to 88 MB without the checkpointer.
    wal = Path(sqlite_store._path + "-wal")
    largest = 0
    for i in range(2000):
        await sqlite_store.write(submitted(task(f"t-{i}", args=bytes(8192))))
        largest = max(largest, wal.stat().st_size)
    assert sqlite_store._checkpointer.checkpoints > 0
    assert largest < 16 * 1024 * 1024, f"the WAL grew to {largest} bytes"


async def test_wal_mode_is_on(sqlite_store: SqliteStore) -> None:
    mode = await sqlite_store._submit(
        lambda conn, arg: conn.execute("PRAGMA journal_mode").fetchone(), None
    )
    assert mode == ("wal",)
    sync = await sqlite_store._submit(
        lambda conn, arg: conn.execute("PRAGMA synchronous").fetchone(), None
    )
    assert sync == (1,)  # NORMAL
