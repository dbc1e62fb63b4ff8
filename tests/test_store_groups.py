"""The stores and task groups: groups, their members and state, the group columns of
tasks, and the reads the scheduler's restore makes (SPEC section 4); against each store
(tests/store_kit.py)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import pytest

from heartline._states import CancelMode, GroupStatus, SkipReason, TaskState
from heartline.server import _pgsql
from heartline.server._model import (
    FunctionRow,
    GroupMember,
    GroupRow,
    GroupStateRow,
    RequestRow,
    TaskRow,
    TransitionRow,
    WhenRow,
    WriteBatch,
)
from heartline.server._store import _PENDING_GROUP_TASKS, Store
from tests import store_kit
from tests.store_kit import (
    changes,
    count_commits,
    duplicate_error,
    is_sqlite,
    query,
    uses_index,
    writer_paused,
)
from tests.test_store import task

# The fixtures: each test that takes `store` or `new_store` runs against every store.
new_store = store_kit.new_store
store = store_kit.store

S = TaskState
MEMBERS = (
    GroupMember("fetch", "t-fetch"),
    GroupMember("lint", "t-lint", run_after=("fetch",)),
    GroupMember(
        "report",
        "t-report",
        run_after=("lint",),
        inputs=("fetch", "fetch"),  # a name may repeat
        when=(
            WhenRow("$(tasks.lint.status)", "in", ("Succeeded",)),
            WhenRow("$(tasks.fetch.status)", "notin", ("Failed", "Cancelled")),
        ),
    ),
    GroupMember(
        "notify",
        "t-notify",
        is_finally=True,
        when=(WhenRow("$(tasks.status)", "in", ("Failed", "Completed")),),
    ),
)


def group(group_id: str, **changes: object) -> GroupRow:
    row = GroupRow(
        group_id=group_id, name="nightly", owner="alice", endpoint_id="ep-1", submit_time=100.0,
        fail_fast=False, timeout=0.0, members=(),
    )  # fmt: skip
    return row._replace(**changes)


def fresh(group_id: str) -> GroupStateRow:
    """The state a group is stored with until a state row says otherwise."""
    return GroupStateRow(group_id, GroupStatus.NONE, True, (0, 0, 0, 0, 0), None, False, None)


def member_tasks(g: GroupRow) -> tuple[TaskRow, ...]:
    """A task per member of ``g``, with its group columns filled in."""
    ids = {m.name: m.task_id for m in g.members}
    return tuple(
        task(
            m.task_id,
            group_id=g.group_id,
            name=m.name,
            inputs=tuple(ids[n] for n in m.inputs),
            submit_time=g.submit_time,
            state=S.WAITING_FOR_DEPS
            if m.run_after or m.inputs or m.is_finally
            else S.WAITING_FOR_EP,
        )
        for m in g.members
    )


def submitted_group(g: GroupRow, *tasks: TaskRow, **more: object) -> WriteBatch:
    """A submit batch of a group: the group, its tasks and their first transitions."""
    return WriteBatch(
        new_groups=(g,),
        new_tasks=tasks,
        transitions=tuple(
            TransitionRow(r.task_id, None, r.state, "submit", r.submit_time, 1) for r in tasks
        ),
        **more,  # type: ignore[arg-type]
    )


async def test_a_group_and_its_tasks_round_trip(store: Store) -> None:
    g = group("g-1", owner="bob", endpoint_id="ep-9", submit_time=12.5, fail_fast=True,
              timeout=600.0, members=MEMBERS)  # fmt: skip
    tasks = member_tasks(g)
    skipped = tasks[2]._replace(state=S.SKIPPED, skip_reason=SkipReason.WHEN_FALSE)
    tasks = (*tasks[:2], skipped, tasks[3])
    assert tasks[2].inputs == ("t-fetch", "t-fetch")
    await store.write(submitted_group(g, *tasks))

    got = await store.get_group("g-1")
    assert got == (g, fresh("g-1"))
    stored, state = got
    assert all(type(m) is GroupMember for m in stored.members)
    assert type(stored.members[2].when[0]) is WhenRow
    assert type(stored.fail_fast) is bool and type(state.pending) is bool
    assert type(state.status) is GroupStatus
    assert await store.get_group("nope") is None

    rows = await store.get_tasks([t.task_id for t in tasks])
    assert [rows[t.task_id][0] for t in tasks] == list(tasks)
    assert type(rows["t-report"][0].skip_reason) is SkipReason
    # Every read of tasks carries the group columns.
    light = {r.task_id: r for r in await store.list_tasks()}
    report = light["t-report"]
    assert (report.name, report.inputs, report.skip_reason, report.interrupted) == (
        "report",
        ("t-fetch", "t-fetch"),
        SkipReason.WHEN_FALSE,
        False,
    )
    unsettled = {r.task_id: r for r in await store.load_unsettled()}
    assert unsettled["t-notify"] == tasks[3].to_record() and "t-report" not in unsettled


async def test_a_group_of_none_keeps_empty_fields(store: Store) -> None:
    g = group("g-bare", members=(GroupMember("only", "t-only"),))
    await store.write(submitted_group(g, task("t-only", group_id="g-bare", name="only")))
    assert await store.get_group("g-bare") == (g, fresh("g-bare"))
    (row, _) = (await store.get_tasks(["t-only"]))["t-only"]
    assert (row.inputs, row.skip_reason) == ((), None)


async def test_task_updates_write_the_skip_reason(store: Store) -> None:
    g = group("g-1", members=MEMBERS)
    await store.write(submitted_group(g, *member_tasks(g)))
    skipped = member_tasks(g)[1]._replace(
        state=S.SKIPPED, settle_time=5.0, skip_reason=SkipReason.PARENT_NOT_SUCCEEDED
    )
    await store.write(WriteBatch(task_updates=(skipped,)))
    assert (await store.get_tasks(["t-lint"]))["t-lint"][0] == skipped
    # name and inputs are fixed at submission; an update leaves them as stored.
    await store.write(WriteBatch(task_updates=(skipped._replace(name="x", inputs=("y",)),)))
    assert (await store.get_tasks(["t-lint"]))["t-lint"][0] == skipped
    cleared = skipped._replace(state=S.WAITING_FOR_EP, skip_reason=None)
    await store.write(WriteBatch(task_updates=(cleared,)))
    assert (await store.get_tasks(["t-lint"]))["t-lint"][0].skip_reason is None


async def test_group_state_updates(store: Store) -> None:
    g = group("g-1", members=MEMBERS)
    running = GroupStateRow("g-1", GroupStatus.NONE, True, (1, 0, 0, 0, 2), None, False, None)
    # A state row in the group's own submit batch is applied after its insert.
    await store.write(submitted_group(g, *member_tasks(g), group_states=(running,)))
    assert await store.get_group("g-1") == (g, running)

    done = GroupStateRow(
        "g-1", GroupStatus.FAILED, False, (1, 1, 1, 0, 0), CancelMode.CANCEL_RUN_FINALLY, True, 9.5
    )
    await store.write(WriteBatch(group_states=(done,)))
    got = await store.get_group("g-1")
    assert got == (g, done)
    assert type(got[1].cancel_mode) is CancelMode

    # Several states of one group in one commit: one UPDATE, the last one wins.
    steps = [done._replace(counts=(i, 0, 0, 0, 0), status=GroupStatus.COMPLETED) for i in range(4)]
    async with writer_paused(store):
        before = changes(store)
        futures = [store.write(WriteBatch(group_states=(s,))) for s in steps]
        after = changes(store)
    for f in futures:
        await f
    assert await after - await before == 1
    assert await store.get_group("g-1") == (g, steps[-1])


async def test_list_groups_newest_first_with_filters_and_pages(store: Store) -> None:
    groups = [
        group(f"g-{i:02}", submit_time=float(i // 2), owner="bob" if i % 3 == 0 else "alice",
              members=(GroupMember("a", f"t-{i:02}"),))
        for i in range(11)
    ]  # fmt: skip
    settled = {"g-01", "g-04", "g-09"}
    for g in groups:
        states = ()
        if g.group_id in settled:
            states = (fresh(g.group_id)._replace(pending=False, status=GroupStatus.SUCCEEDED),)
        await store.write(WriteBatch(new_groups=(g,), group_states=states))
    newest_first = sorted(groups, key=lambda g: (g.submit_time, g.group_id), reverse=True)

    pages, after = [], None
    while page := await store.list_groups(limit=4, after=after):
        pages.append([g.group_id for g, _ in page])
        after = (page[-1][0].submit_time, page[-1][0].group_id)
    assert [len(p) for p in pages] == [4, 4, 3]
    assert [gid for p in pages for gid in p] == [g.group_id for g in newest_first]

    got = await store.list_groups()
    assert got[0] == (groups[10]._replace(members=()), fresh("g-10"))  # members left behind
    assert all(g.members == () for g, _ in got)

    pending = [g.group_id for g, s in await store.list_groups(pending_only=True)]
    assert pending == [g.group_id for g in newest_first if g.group_id not in settled]
    bob = [g.group_id for g, _ in await store.list_groups(owner="bob")]
    assert bob == [g.group_id for g in newest_first if g.owner == "bob"]
    both = await store.list_groups(owner="bob", pending_only=True, limit=2)
    assert [g.group_id for g, _ in both] == ["g-06", "g-03"]  # g-09 is settled
    assert all(s.pending for _, s in both)
    with pytest.raises(ValueError, match="limit"):
        await store.list_groups(limit=0)


async def test_load_pending_groups(store: Store) -> None:
    a = group("g-a", submit_time=2.0, members=MEMBERS)
    a_tasks = list(member_tasks(a))
    a_tasks[0] = a_tasks[0]._replace(state=S.SUCCEEDED, result=b"r", settle_time=3.0)
    a_tasks[1] = a_tasks[1]._replace(state=S.FAILED, settle_time=3.0)
    a_tasks[2] = a_tasks[2]._replace(state=S.SKIPPED, skip_reason=SkipReason.INPUT_NOT_SUCCEEDED)
    b_members = (GroupMember("x", "t-b-x"),)
    b = group("g-b", submit_time=1.0, members=b_members)
    b_done = GroupStateRow("g-b", GroupStatus.SUCCEEDED, False, (1, 0, 0, 0, 0), None, False, 4.0)
    c = group("g-c", submit_time=1.0, members=(GroupMember("y", "t-c-y"),))
    await store.write(submitted_group(a, *a_tasks))
    await store.write(submitted_group(b, *member_tasks(b), group_states=(b_done,)))
    await store.write(WriteBatch(new_groups=(c,)))  # its tasks not written (yet)
    await store.write(WriteBatch(new_tasks=(task("t-alone"),)))  # in no group

    got = await store.load_pending_groups()
    assert [(g, s) for g, s, _ in got] == [(c, fresh("g-c")), (a, fresh("g-a"))]  # oldest first
    assert got[0][2] == {}
    assert got[1][2] == {
        "t-fetch": (S.SUCCEEDED, None),
        "t-lint": (S.FAILED, None),
        "t-report": (S.SKIPPED, SkipReason.INPUT_NOT_SUCCEEDED),
        "t-notify": (S.WAITING_FOR_DEPS, None),
    }

    # The group's tasks are found through the partial index, not a scan of every task.
    sql = _PENDING_GROUP_TASKS if is_sqlite(store) else _pgsql._PENDING_GROUP_TASKS
    assert await uses_index(store, sql, "tasks_group")

    await store.write(WriteBatch(group_states=(fresh("g-c")._replace(pending=False),)))
    assert [g.group_id for g, _, _ in await store.load_pending_groups()] == ["g-a"]


async def test_load_results(store: Store) -> None:
    rows = [task(f"t{i:04}", state=S.SUCCEEDED, result=f"r{i}".encode()) for i in range(1100)]
    rows += [task("failed", state=S.FAILED), task("running", state=S.RUNNING)]
    await store.write(WriteBatch(new_tasks=tuple(rows)))
    asked = [r.task_id for r in rows] + ["nope", "t0001"]  # an unknown id and a repeat
    got = await store.load_results(asked)
    assert len(got) == 1102 and "nope" not in got
    assert got["t0000"] == (S.SUCCEEDED, b"r0")
    assert got["t1099"] == (S.SUCCEEDED, b"r1099")  # past the first IN (...) chunk
    assert got["failed"] == (S.FAILED, None)
    assert got["running"] == (S.RUNNING, None)
    assert type(got["failed"][0]) is TaskState
    assert await store.load_results([]) == {}


async def test_groups_survive_close_and_reopen(new_store: Callable[[], Store]) -> None:
    g = group("g-1", members=MEMBERS, timeout=30.0)
    tasks = member_tasks(g)
    state = GroupStateRow("g-1", GroupStatus.NONE, True, (0, 0, 1, 0, 2), None, True, None)
    skipped = tasks[2]._replace(state=S.SKIPPED, skip_reason=SkipReason.GROUP_TIMED_OUT)
    first = new_store()
    await first.open()
    await first.write(submitted_group(g, *tasks))
    await first.write(WriteBatch(task_updates=(skipped,), group_states=(state,)))
    await first.close()

    second = new_store()
    await second.open()
    try:
        assert await second.get_group("g-1") == (g, state)
        got = await second.get_tasks([t.task_id for t in tasks])
        assert [got[t.task_id][0] for t in tasks] == [tasks[0], tasks[1], skipped, tasks[3]]
        ((pg, ps, members),) = await second.load_pending_groups()
        assert (pg, ps) == (g, state)
        assert members["t-report"] == (S.SKIPPED, SkipReason.GROUP_TIMED_OUT)
    finally:
        await second.close()


async def test_a_failed_group_insert_stores_nothing_of_its_batch(store: Store) -> None:
    old = group("g-old", members=MEMBERS)
    await store.write(submitted_group(old, *member_tasks(old)))
    before_tasks = await store.get_tasks(["t-fetch"], include_history=True)
    new = group("g-new", members=(GroupMember("n", "t-new"),))
    bad = submitted_group(
        new,
        task("t-new", group_id="g-new", name="n"),
        functions=(FunctionRow("fn-bad", b"p", "alice", 1.0),),
        task_updates=(member_tasks(old)[0]._replace(state=S.RUNNING),),
        group_states=(fresh("g-old")._replace(status=GroupStatus.FAILED, pending=False),),
        requests=(RequestRow("req-bad", "alice", "SubmitGroup", "d", ("t-new",), 1.0),),
    )
    bad = dataclasses.replace(bad, new_groups=(new, old))  # g-new goes in, then g-old clashes
    a = group("g-a", members=(GroupMember("a", "t-a"),))
    c = group("g-c", members=(GroupMember("c", "t-c"),))
    commits = count_commits(store)
    async with writer_paused(store):
        good_before = store.write(submitted_group(a, task("t-a", group_id="g-a", name="a")))
        failed = store.write(bad)
        good_after = store.write(submitted_group(c, task("t-c", group_id="g-c", name="c")))
    await good_before
    with pytest.raises(duplicate_error(store)):
        await failed
    await good_after
    assert commits[0] == 2  # the blocker's group, then ONE commit for all three batches

    assert await store.get_group("g-new") is None
    assert await store.get_group("g-old") == (old, fresh("g-old"))  # its state untouched
    assert set(await store.get_tasks(["t-new", "t-a", "t-c"])) == {"t-a", "t-c"}
    assert await store.get_tasks(["t-fetch"], include_history=True) == before_tasks
    assert await store.get_function("fn-bad") is None
    assert await store.get_request("req-bad") is None
    members = await query(store, "SELECT group_id FROM group_members")
    assert sorted(members) == [("g-a",), ("g-c",), ("g-old",)]


async def test_a_malformed_group_state_fails_only_its_batch(store: Store) -> None:
    g = group("g-1", members=(GroupMember("a", "t-a"),))
    await store.write(submitted_group(g, task("t-a", group_id="g-1", name="a")))
    bad = GroupStateRow("g-1", GroupStatus.FAILED, False, (1, 0, 0, 0), None, False, 1.0)  # type: ignore[arg-type]
    good = fresh("g-1")._replace(counts=(0, 0, 0, 0, 1))
    async with writer_paused(store):
        failed = store.write(WriteBatch(new_tasks=(task("t-bad"),), group_states=(bad,)))
        fine = store.write(WriteBatch(group_states=(good,)))
    with pytest.raises(ValueError, match="counts must be 5 numbers"):
        await failed
    await fine
    assert await store.get_group("g-1") == (g, good)
    assert await store.get_tasks(["t-bad"]) == {}
