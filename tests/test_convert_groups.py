"""The wire forms of groups and of the group fields of tasks (server/_convert.py), and
how the watch registry routes group tasks' transitions and group changes
(server/_core.py)."""

from __future__ import annotations

import pytest

from heartline._states import CancelMode, GroupStatus, SkipReason, TaskState
from heartline.server._convert import (
    change_to_proto,
    group_change_to_proto,
    group_row_to_update,
    group_to_proto,
    row_to_update,
    task_to_proto,
)
from heartline.server._core import Watcher, WatchRegistry
from heartline.server._events import GroupChanged, TaskChanged
from heartline.server._model import GroupMember, GroupRow, GroupStateRow, TaskRow, WhenRow
from heartline.server._rpc import Abort, check_group_id, decode_page_token, encode_page_token
from heartline.v1 import task_pb2

GID = "8c2c0e0a-1b7e-4f5e-9a43-0d5c3a1f9b21"
A = "11111111-1111-4111-8111-111111111111"
B = "22222222-2222-4222-8222-222222222222"
F = "33333333-3333-4333-8333-333333333333"


def task_row(task_id: str = B, state: TaskState = TaskState.SKIPPED, **fields: object) -> TaskRow:
    row = TaskRow(
        task_id=task_id, endpoint_id="ep", function_id="f" * 64, args=b"", owner="me",
        state=state, submit_time=10.0, attempt=1, priority=2, max_retries=0,
        max_system_retries=3, walltime=0.0, start_time=None, settle_time=12.0, held_from=None,
        result=None, error=None, raised_count=0, system_failures=0, resubmitted_from="",
        group_id=GID, payload_purged=False, name="parse", inputs=(A, A),
        skip_reason=SkipReason.INPUT_NOT_SUCCEEDED,
    )  # fmt: skip
    return row._replace(**fields)


MEMBERS = (
    GroupMember("fetch", A),
    GroupMember(
        "parse",
        B,
        run_after=("fetch",),
        inputs=("fetch", "fetch"),
        when=(WhenRow("$(tasks.fetch.status)", "in", ("Succeeded",)),),
    ),
    GroupMember(
        "notify", F, is_finally=True, when=(WhenRow("$(tasks.status)", "notin", ("Failed",)),)
    ),
)
GROUP = GroupRow(GID, "nightly", "me", "ep", 10.0, True, 60.0, MEMBERS)
PENDING = GroupStateRow(GID, GroupStatus.NONE, True, (1, 0, 0, 0, 1), None, False, None)
SETTLED = GroupStateRow(
    GID, GroupStatus.COMPLETED, False, (1, 0, 1, 0, 0), CancelMode.STOP_RUN_FINALLY, True, 30.0
)


# ------------------------------------------------------------------------ tasks


def test_a_task_carries_its_name_skip_reason_inputs_and_group() -> None:
    task = task_to_proto(task_row())
    assert task.name == "parse"
    assert task.group_id == GID
    assert task.skip_reason == task_pb2.SKIP_REASON_INPUT_NOT_SUCCEEDED
    assert list(task.input_task_ids) == [A, A]  # placeholder order, repeats kept


def test_a_plain_task_has_no_group_fields() -> None:
    task = task_to_proto(
        task_row(state=TaskState.WAITING_FOR_EP, group_id="", name="", inputs=(), skip_reason=None)
    )
    assert (task.name, task.group_id, task.skip_reason, list(task.input_task_ids)) == (
        "",
        "",
        0,
        [],
    )


@pytest.mark.parametrize("reason", list(SkipReason))
def test_every_skip_reason_reaches_the_wire(reason: SkipReason) -> None:
    change = TaskChanged(
        B, "", TaskState.SKIPPED, 1, "skip", 12.0, skip_reason=reason, group_id=GID
    )
    update = change_to_proto(change, False)
    assert update.skip_reason == reason._to_proto() != 0
    assert update.group_id == GID
    assert task_to_proto(task_row(skip_reason=reason)).skip_reason == reason._to_proto()


def test_a_change_without_a_skip_reason_or_group_sends_neither() -> None:
    update = change_to_proto(TaskChanged(B, "s", TaskState.RUNNING, 1, "start", 11.0), True)
    assert (update.skip_reason, update.group_id) == (0, "")


def test_the_current_state_of_a_stored_task_carries_its_skip_reason_and_group() -> None:
    update = row_to_update(task_row(), include_results=False)
    assert update.skip_reason == task_pb2.SKIP_REASON_INPUT_NOT_SUCCEEDED
    assert update.group_id == GID
    # A reason is only read off a skipped task.
    pending = row_to_update(task_row(state=TaskState.WAITING_FOR_DEPS, settle_time=None), False)
    assert pending.skip_reason == 0 and pending.group_id == GID


# ------------------------------------------------------------------------ groups


def test_a_group_as_get_group_answers_it() -> None:
    tasks = {tid: task_pb2.Task(task_id=tid) for tid in (A, B, F)}
    group = group_to_proto(GROUP, SETTLED, "local", tasks=tasks)
    assert (group.group_id, group.name, group.owner) == (GID, "nightly", "me")
    assert (group.endpoint_id, group.endpoint_name) == ("ep", "local")
    assert group.status == task_pb2.GROUP_STATUS_COMPLETED
    assert not group.pending
    assert group.fail_fast and group.timeout_seconds == 60.0
    assert group.submit_time.ToNanoseconds() == 10 * 10**9
    assert group.settle_time.ToNanoseconds() == 30 * 10**9
    assert dict(group.task_counts) == {
        "Succeeded": 1, "Failed": 0, "Skipped": 1, "Cancelled": 0, "None": 0
    }  # fmt: skip
    assert group.finally_count == 1
    assert group.cancel_mode == task_pb2.CANCEL_MODE_STOP_RUN_FINALLY
    assert group.timed_out
    # DAG tasks in submission order, then finally tasks, each with its place and its task.
    assert [(t.name, t.is_finally, t.task.task_id) for t in group.tasks] == [
        ("fetch", False, A),
        ("parse", False, B),
        ("notify", True, F),
    ]
    parse = group.tasks[1]
    assert list(parse.run_after) == ["fetch"] and list(parse.inputs) == ["fetch", "fetch"]
    assert [(w.input, w.operator, list(w.values)) for w in parse.when] == [
        ("$(tasks.fetch.status)", "in", ["Succeeded"])
    ]
    assert group.tasks[2].when[0].operator == "notin"


def test_a_pending_group_has_no_settle_time_or_cancel_mode_and_no_tasks_unless_given() -> None:
    group = group_to_proto(GROUP, PENDING)
    assert group.pending and group.status == task_pb2.GROUP_STATUS_NONE
    assert not group.HasField("settle_time")
    assert group.cancel_mode == task_pb2.CANCEL_MODE_UNSPECIFIED
    assert not group.timed_out
    assert len(group.tasks) == 0
    assert group.task_counts["None"] == 1


def test_a_listed_group_without_members_still_converts() -> None:
    group = group_to_proto(GROUP._replace(members=()), PENDING, tasks={})
    assert group.finally_count == 0 and len(group.tasks) == 0


def test_a_member_whose_task_is_missing_keeps_its_place() -> None:
    group = group_to_proto(GROUP, PENDING, tasks={A: task_pb2.Task(task_id=A)})
    assert [t.name for t in group.tasks] == ["fetch", "parse", "notify"]
    assert not group.tasks[1].HasField("task")


@pytest.mark.parametrize("status", list(GroupStatus))
def test_group_updates_carry_status_pending_and_time(status: GroupStatus) -> None:
    update = group_change_to_proto(GroupChanged(GID, status, False, 42.5))
    assert (update.group_id, update.status, update.pending) == (GID, status._to_proto(), False)
    assert update.time.ToNanoseconds() == 42_500_000_000


def test_a_stored_groups_current_update_is_timed_by_its_settling_or_its_submission() -> None:
    settled = group_row_to_update(GROUP, SETTLED)
    assert not settled.pending and settled.status == task_pb2.GROUP_STATUS_COMPLETED
    assert settled.time.ToNanoseconds() == 30 * 10**9
    pending = group_row_to_update(GROUP, PENDING)
    assert pending.pending and pending.time.ToNanoseconds() == 10 * 10**9


# ------------------------------------------------------------------------ watches


def change(task_id: str, state: TaskState, group_id: str = GID, session: str = "") -> TaskChanged:
    return TaskChanged(task_id, session, state, 1, "x", 1.0, result=b"r", group_id=group_id)


def test_a_group_watcher_gets_its_groups_tasks_and_status_changes() -> None:
    registry = WatchRegistry()
    mine = Watcher((), "", settled_only=False, include_results=False, group_ids=[GID])
    other = Watcher((), "", settled_only=False, include_results=False, group_ids=[F])
    registry.add(mine)
    registry.add(other)
    registry.publish(
        [change(A, TaskState.RUNNING), change(B, TaskState.RUNNING, group_id="")],
        [GroupChanged(GID, GroupStatus.NONE, True, 1.0)],
    )
    updates, groups = mine.take()
    assert [u.task_id for u in updates] == [A]
    assert [g.group_id for g in groups] == [GID]
    assert not mine.wake.is_set()
    assert other.take() == ([], []) and not other.wake.is_set()


def test_a_group_watcher_respects_settled_only_and_include_results() -> None:
    registry = WatchRegistry()
    watcher = Watcher((), "", settled_only=True, include_results=True, group_ids=[GID])
    registry.add(watcher)
    registry.publish(
        [change(A, TaskState.RUNNING), change(A, TaskState.SUCCEEDED)],
        [GroupChanged(GID, GroupStatus.SUCCEEDED, False, 2.0)],
    )
    updates, groups = watcher.take()
    assert [(u.state, u.result) for u in updates] == [(task_pb2.TASK_STATE_SUCCEEDED, b"r")]
    # A group's changes all come: settled_only is about tasks.
    assert [(g.status, g.pending) for g in groups] == [(task_pb2.GROUP_STATUS_SUCCEEDED, False)]


def test_a_transition_watched_several_ways_reaches_a_watcher_once() -> None:
    registry = WatchRegistry()
    watcher = Watcher([A], "s", settled_only=False, include_results=False, group_ids=[GID])
    registry.add(watcher)
    registry.publish([change(A, TaskState.RUNNING, session="s")])
    assert len(watcher.take()[0]) == 1


def test_a_removed_group_watcher_hears_nothing() -> None:
    registry = WatchRegistry()
    watcher = Watcher([A], "s", settled_only=False, include_results=False, group_ids=[GID])
    registry.add(watcher)
    registry.remove(watcher)
    registry.publish(
        [change(A, TaskState.RUNNING)], [GroupChanged(GID, GroupStatus.NONE, False, 1.0)]
    )
    assert watcher.take() == ([], [])
    assert not registry._by_group and not registry._by_task and not registry._by_session


# ------------------------------------------------------------------------ request checks


def test_page_tokens_round_trip_and_garbage_is_refused() -> None:
    assert decode_page_token(encode_page_token(12.25, GID)) == (12.25, GID)
    for token in ("@@", "bm9waXBl", "eA=="):  # not base64; no "|"; "x"
        with pytest.raises(Abort) as info:
            decode_page_token(token)
        assert "malformed page_token" in info.value.message


def test_group_ids_are_checked_and_cut_short_when_echoed() -> None:
    assert check_group_id(GID) == GID
    with pytest.raises(Abort, match="group_id is empty"):
        check_group_id("")
    with pytest.raises(Abort) as info:
        check_group_id("x" * 500)
    assert "malformed group id" in info.value.message and len(info.value.message) < 200
