"""Groups in the pure scheduler: feed events, compare the exact instructions.

Task ids are the tasks' names here, so expectations read like the DAG. Every scheduler
runs with validate on, and is checked fully at the end of each test (conftest).
"""

from __future__ import annotations

from typing import Any

import pytest
from heartline.server._events import (
    DispatchItem,
    GroupChanged,
    GroupCommanded,
    HeldTask,
    Instruction,
    NewGroup,
    NewTask,
    NotifyWatchers,
    Persist,
    SendAcks,
    SendCancels,
    SendDispatches,
    TasksSubmitted,
    Tick,
)
from heartline.server._model import (
    PRIORITY_NORMAL,
    GroupMember,
    GroupRow,
    GroupStateRow,
    TransitionRow,
    WhenRow,
)
from heartline.server._scheduler import InputsMoved, Scheduler, UnknownGroup

from heartline._states import CancelMode, GroupStatus, SkipReason, TaskState
from tests.scheduler_kit import (
    EP,
    FN,
    OWNER,
    SESSION,
    args,
    cmd,
    connect,
    make,
    raised,
    report,
    row,
    sr,
    submit,
    tr,
)

S = TaskState
G = "g-1"
R = SkipReason

# ------------------------------------------------------------------------ helpers


def m(
    name: str,
    *,
    after: tuple[str, ...] = (),
    inputs: tuple[str, ...] = (),
    when: tuple[tuple[str, str, tuple[str, ...]], ...] = (),
    final: bool = False,
) -> GroupMember:
    return GroupMember(name, name, final, after, inputs, tuple(WhenRow(*w) for w in when))


def status(task: str, op: str, *values: str) -> tuple[str, str, tuple[str, ...]]:
    source = "$(tasks.status)" if task == "*" else f"$(tasks.{task}.status)"
    return (source, op, values)


def group(
    *members: GroupMember,
    fail_fast: bool = False,
    timeout: float = 0.0,
    time: float = 0.0,
    held: tuple[str, ...] = (),
    max_retries: int = 0,
) -> TasksSubmitted:
    ordered = [x for x in members if not x.is_finally] + [x for x in members if x.is_finally]
    tasks = tuple(
        NewTask(
            x.task_id,
            FN,
            args(x.task_id),
            PRIORITY_NORMAL,
            max_retries,
            3,
            0.0,
            x.name in held,
            x.name,
            x.inputs,
        )
        for x in ordered
    )
    new = NewGroup(G, "nightly", fail_fast, timeout, tuple(ordered))
    return TasksSubmitted(EP, OWNER, tasks, SESSION, time, group=new)


def item(tid: str, *inputs: bytes, attempt: int = 1) -> DispatchItem:
    return DispatchItem(tid, attempt, FN, args(tid), 0.0, inputs)


def returned(
    s: Scheduler, tid: str, result: bytes, time: float, agent: str = "A"
) -> list[Instruction]:
    return s.handle(
        report(agent, sr(tid, S.RUNNING), sr(tid, S.SUCCEEDED, result=result), time=time)
    )


def fails(s: Scheduler, tid: str, time: float, agent: str = "A") -> list[Instruction]:
    return s.handle(
        report(agent, sr(tid, S.RUNNING), sr(tid, S.ERRORED, error=raised()), time=time)
    )


def of(out: list[Instruction], kind: type) -> list[Any]:
    return [i for i in out if isinstance(i, kind)]


def moves(out: list[Instruction]) -> list[tuple[str, S | None, S, str]]:
    """The transitions a step persisted, without their times and attempts."""
    return [
        (t.task_id, t.from_state, t.to_state, t.cause)
        for p in of(out, Persist)
        for t in p.batch.transitions
    ]


def dispatched(out: list[Instruction]) -> list[DispatchItem]:
    return [i for d in of(out, SendDispatches) for i in d.items]


def group_states(out: list[Instruction]) -> list[GroupStateRow]:
    return [g for p in of(out, Persist) for g in p.batch.group_states]


def group_changes(out: list[Instruction]) -> list[GroupChanged]:
    return [g for n in of(out, NotifyWatchers) for g in n.groups]


def counts(
    succeeded: int = 0, failed: int = 0, skipped: int = 0, cancelled: int = 0, none: int = 0
) -> tuple[int, ...]:
    return (succeeded, failed, skipped, cancelled, none)


def skip_of(out: list[Instruction], tid: str) -> SkipReason | None:
    rows = [
        r
        for p in of(out, Persist)
        for r in (*p.batch.new_tasks, *p.batch.task_updates)
        if r.task_id == tid
    ]
    return rows[-1].skip_reason if rows else None


@pytest.fixture
def busy() -> Scheduler:
    """A scheduler with one agent of ten free slots."""
    s = make()
    s.handle(connect("A", capacity=10))
    return s


DIAMOND = (m("a"), m("b", inputs=("a",)), m("c", inputs=("a",)), m("d", inputs=("b", "c")))

# ------------------------------------------------------------------------ diamond


def test_a_diamond_runs_in_order_with_results_passed_along(busy: Scheduler) -> None:
    s = busy

    out = s.handle(group(*DIAMOND, time=1.0))

    members = DIAMOND
    assert out == [
        Persist(
            batch=type(out[0].batch)(
                new_tasks=(
                    row("a", S.DISPATCHED, submit_time=1.0, group_id=G, name="a"),
                    row(
                        "b",
                        S.WAITING_FOR_DEPS,
                        submit_time=1.0,
                        group_id=G,
                        name="b",
                        inputs=("a",),
                    ),
                    row(
                        "c",
                        S.WAITING_FOR_DEPS,
                        submit_time=1.0,
                        group_id=G,
                        name="c",
                        inputs=("a",),
                    ),
                    row(
                        "d",
                        S.WAITING_FOR_DEPS,
                        submit_time=1.0,
                        group_id=G,
                        name="d",
                        inputs=("b", "c"),
                    ),
                ),
                transitions=(
                    tr("a", None, S.WAITING_FOR_EP, "submit", 1.0),
                    tr("b", None, S.WAITING_FOR_DEPS, "submit", 1.0),
                    tr("c", None, S.WAITING_FOR_DEPS, "submit", 1.0),
                    tr("d", None, S.WAITING_FOR_DEPS, "submit", 1.0),
                    tr("a", S.WAITING_FOR_EP, S.DISPATCHED, "dispatch", 1.0),
                ),
                new_groups=(GroupRow(G, "nightly", OWNER, EP, 1.0, False, 0.0, members),),
                group_states=(
                    GroupStateRow(G, GroupStatus.NONE, True, counts(none=4), None, False, None),
                ),
            )
        ),
        SendDispatches("A", (item("a"),)),
        NotifyWatchers(
            tuple(
                out[-1].changes  # checked below, field by field
            ),
            (GroupChanged(G, GroupStatus.NONE, True, 1.0),),
        ),
    ]
    assert [(c.task_id, c.state, c.group_id) for c in out[-1].changes] == [
        ("a", S.WAITING_FOR_EP, G),
        ("b", S.WAITING_FOR_DEPS, G),
        ("c", S.WAITING_FOR_DEPS, G),
        ("d", S.WAITING_FOR_DEPS, G),
        ("a", S.DISPATCHED, G),
    ]
    assert s.waiting_reason("d") == "waiting for b, c to settle"

    out = returned(s, "a", b"ra", 2.0)

    assert moves(out) == [
        ("a", S.DISPATCHED, S.RUNNING, "worker-started"),
        ("a", S.RUNNING, S.SUCCEEDED, "returned"),
        ("b", S.WAITING_FOR_DEPS, S.WAITING_FOR_EP, "parents-settled"),
        ("c", S.WAITING_FOR_DEPS, S.WAITING_FOR_EP, "parents-settled"),
        ("b", S.WAITING_FOR_EP, S.DISPATCHED, "dispatch"),
        ("c", S.WAITING_FOR_EP, S.DISPATCHED, "dispatch"),
    ]
    assert of(out, SendDispatches) == [SendDispatches("A", (item("b", b"ra"), item("c", b"ra")))]
    assert of(out, SendAcks) == [SendAcks("A", (("a", 1),))]
    assert group_states(out) == [
        GroupStateRow(G, GroupStatus.NONE, True, counts(1, none=3), None, False, None)
    ]
    assert group_changes(out) == []

    out = returned(s, "b", b"rb", 3.0)
    assert dispatched(out) == []  # d still waits for c
    assert s.waiting_reason("d") == "waiting for c to settle"

    out = returned(s, "c", b"rc", 4.0)
    assert dispatched(out) == [item("d", b"rb", b"rc")]

    out = returned(s, "d", b"rd", 5.0)
    assert group_states(out) == [
        GroupStateRow(G, GroupStatus.SUCCEEDED, False, counts(4), None, False, 5.0)
    ]
    assert group_changes(out) == [GroupChanged(G, GroupStatus.SUCCEEDED, False, 5.0)]
    assert G not in s.deps.groups and not s.deps.results and not s.deps.consumers


# ------------------------------------------------------------------ failures, when


def test_a_failing_branch_skips_its_downstream_and_the_other_branch_runs_on(
    busy: Scheduler,
) -> None:
    s = busy
    s.handle(
        group(m("a"), m("b", after=("a",)), m("c"), m("d", after=("c",)), m("e", inputs=("b",)))
    )

    out = fails(s, "a", 2.0)

    assert moves(out)[2:] == [
        ("b", S.WAITING_FOR_DEPS, S.SKIPPED, "skipped: parent-not-succeeded"),
        ("e", S.WAITING_FOR_DEPS, S.SKIPPED, "skipped: input-not-succeeded"),
    ]
    assert (
        skip_of(out, "b") is R.PARENT_NOT_SUCCEEDED and skip_of(out, "e") is R.INPUT_NOT_SUCCEEDED
    )
    assert group_changes(out) == [GroupChanged(G, GroupStatus.FAILED, True, 2.0)]

    out = returned(s, "c", b"rc", 3.0)
    assert dispatched(out) == [item("d")]  # the other branch runs on
    out = returned(s, "d", b"rd", 4.0)
    assert group_states(out) == [
        GroupStateRow(G, GroupStatus.FAILED, False, counts(2, 1, 2), None, False, 4.0)
    ]


def test_a_false_when_skips_the_task_and_its_consumers_but_not_its_run_after_children(
    busy: Scheduler,
) -> None:
    s = busy
    s.handle(
        group(
            m("lint"),
            m("report", when=(status("lint", "in", "Failed"),)),
            m("after", after=("report",)),
            m("uses", inputs=("report",)),
        )
    )

    out = returned(s, "lint", b"ok", 2.0)

    assert moves(out)[2:5] == [
        ("report", S.WAITING_FOR_DEPS, S.SKIPPED, "skipped: when-false"),
        ("after", S.WAITING_FOR_DEPS, S.WAITING_FOR_EP, "parents-settled"),
        ("uses", S.WAITING_FOR_DEPS, S.SKIPPED, "skipped: input-not-succeeded"),
    ]
    assert dispatched(out) == [item("after")]
    out = returned(s, "after", b"x", 3.0)
    assert group_changes(out) == [GroupChanged(G, GroupStatus.COMPLETED, False, 3.0)]


def test_fail_fast_skips_what_has_not_started_and_lets_running_tasks_finish() -> None:
    s = make()
    s.handle(connect("A", capacity=2))
    s.handle(group(m("a"), m("b"), m("c"), m("d", after=("b",)), fail_fast=True))
    s.handle(report("A", sr("b", S.RUNNING), time=1.0))  # a and b dispatched; c queued

    out = fails(s, "a", 2.0)

    assert moves(out)[2:] == [
        ("c", S.WAITING_FOR_EP, S.SKIPPED, "fail-fast"),
        ("d", S.WAITING_FOR_DEPS, S.SKIPPED, "fail-fast"),
    ]
    assert skip_of(out, "c") is R.GROUP_STOPPING and skip_of(out, "d") is R.GROUP_STOPPING
    assert dispatched(out) == [] and of(out, SendCancels) == []
    out = s.handle(report("A", sr("b", S.SUCCEEDED, result=b"rb"), time=3.0))
    assert group_states(out) == [
        GroupStateRow(G, GroupStatus.FAILED, False, counts(1, 1, 2), None, False, 3.0)
    ]


# --------------------------------------------------------------------- cancel modes

CANCELLABLE = (
    m("a"),
    m("b", after=("a",)),
    m("f", final=True),
)


def test_cancel_cancels_everything_pending_and_finally_tasks_do_not_run(busy: Scheduler) -> None:
    s = busy
    s.handle(group(*CANCELLABLE))

    out = s.handle(GroupCommanded(G, CancelMode.CANCEL, 2.0))

    assert moves(out) == [
        ("a", S.DISPATCHED, S.CANCELLED, "group-cancelled"),
        ("b", S.WAITING_FOR_DEPS, S.CANCELLED, "group-cancelled"),
        ("f", S.WAITING_FOR_DEPS, S.CANCELLED, "group-cancelled"),
    ]
    assert of(out, SendCancels) == [SendCancels("A", ("a",))]
    assert group_states(out) == [
        GroupStateRow(
            G, GroupStatus.NONE, False, counts(cancelled=2), CancelMode.CANCEL, False, 2.0
        )
    ]
    with pytest.raises(UnknownGroup):
        s.handle(GroupCommanded(G, CancelMode.CANCEL, 3.0))


def test_cancel_run_finally_cancels_the_dag_then_runs_the_finally_tasks(busy: Scheduler) -> None:
    s = busy
    s.handle(group(*CANCELLABLE))

    out = s.handle(GroupCommanded(G, CancelMode.CANCEL_RUN_FINALLY, 2.0))

    assert moves(out) == [
        ("a", S.DISPATCHED, S.CANCELLED, "group-cancelled"),
        ("b", S.WAITING_FOR_DEPS, S.CANCELLED, "group-cancelled"),
        ("f", S.WAITING_FOR_DEPS, S.WAITING_FOR_EP, "parents-settled"),
        ("f", S.WAITING_FOR_EP, S.DISPATCHED, "dispatch"),
    ]
    out = returned(s, "f", b"rf", 3.0)
    assert group_changes(out) == [GroupChanged(G, GroupStatus.NONE, False, 3.0)]


def test_stop_run_finally_starts_nothing_new_lets_running_tasks_finish_then_runs_finally(
    busy: Scheduler,
) -> None:
    s = busy
    s.handle(group(*CANCELLABLE))

    out = s.handle(GroupCommanded(G, CancelMode.STOP_RUN_FINALLY, 2.0))

    assert moves(out) == [("b", S.WAITING_FOR_DEPS, S.SKIPPED, "group-stopped")]
    assert skip_of(out, "b") is R.GROUP_STOPPING and of(out, SendCancels) == []
    out = returned(s, "a", b"ra", 3.0)
    assert moves(out)[2:] == [
        ("f", S.WAITING_FOR_DEPS, S.WAITING_FOR_EP, "parents-settled"),
        ("f", S.WAITING_FOR_EP, S.DISPATCHED, "dispatch"),
    ]
    out = returned(s, "f", b"rf", 4.0)
    assert group_states(out) == [
        GroupStateRow(
            G,
            GroupStatus.COMPLETED,
            False,
            counts(1, skipped=1),
            CancelMode.STOP_RUN_FINALLY,
            False,
            4.0,
        )
    ]


def test_a_stopping_group_skips_a_task_its_retry_would_queue_again(busy: Scheduler) -> None:
    s = busy
    s.handle(group(m("a"), m("b", after=("a",)), max_retries=1))
    s.handle(GroupCommanded(G, CancelMode.STOP_RUN_FINALLY, 2.0))

    out = fails(s, "a", 3.0)

    assert moves(out)[1:] == [
        ("a", S.RUNNING, S.WAITING_FOR_EP, "raised ValueError; retry 1 of 1"),
        ("a", S.WAITING_FOR_EP, S.SKIPPED, "group-stopping"),
    ]
    assert dispatched(out) == []


# ------------------------------------------------------------------------- timeout


def test_a_group_timeout_skips_pending_tasks_cancels_running_ones_and_runs_finally() -> None:
    s = make()
    s.handle(connect("A", capacity=1))
    s.handle(group(m("a"), m("b"), m("f", final=True), timeout=10.0, time=1.0))  # b queued

    assert moves(s.handle(Tick(10.9))) == []
    out = s.handle(Tick(11.0))

    assert moves(out) == [
        ("a", S.DISPATCHED, S.CANCELLED, "group-timed-out"),
        ("b", S.WAITING_FOR_EP, S.SKIPPED, "group-timed-out"),
        ("f", S.WAITING_FOR_DEPS, S.WAITING_FOR_EP, "parents-settled"),
        ("f", S.WAITING_FOR_EP, S.DISPATCHED, "dispatch"),
    ]
    assert skip_of(out, "b") is R.GROUP_TIMED_OUT
    assert of(out, SendCancels) == [SendCancels("A", ("a",))]
    assert group_states(out)[-1].timed_out


# ---------------------------------------------------------------- finally and when


@pytest.mark.parametrize(("fail", "ran"), [(True, {"on_failure"}), (False, {"on_success"})])
def test_finally_tasks_gated_on_the_aggregate_status(
    busy: Scheduler, fail: bool, ran: set[str]
) -> None:
    s = busy
    s.handle(
        group(
            m("a"),
            m("b"),
            m("on_failure", final=True, when=(status("*", "in", "Failed"),)),
            m("on_success", final=True, when=(status("*", "notin", "Failed"),)),
        )
    )
    returned(s, "a", b"ra", 2.0)
    assert s.tasks["on_failure"].state == S.WAITING_FOR_DEPS
    assert (
        s.waiting_reason("on_failure")
        == "a finally task: waiting for the group's DAG tasks to settle"
    )

    out = fails(s, "b", 3.0) if fail else returned(s, "b", b"rb", 3.0)

    assert {i.task_id for i in dispatched(out)} == ran
    skipped = ({"on_failure", "on_success"} - ran).pop()
    assert skip_of(out, skipped) is R.WHEN_FALSE
    assert group_changes(out) == [
        GroupChanged(G, GroupStatus.FAILED if fail else GroupStatus.SUCCEEDED, True, 3.0)
    ]
    out = returned(s, ran.pop(), b"x", 4.0)
    assert [g.pending for g in group_changes(out)] == [False]


def test_a_held_task_is_decided_only_when_released(busy: Scheduler) -> None:
    s = busy
    s.handle(group(m("a"), m("b", after=("a",)), held=("b",)))
    assert s.tasks["b"].held_from == S.WAITING_FOR_DEPS
    returned(s, "a", b"ra", 2.0)
    assert s.tasks["b"].state == S.HELD

    out = s.handle(cmd("release", "b", time=3.0))

    assert moves(out) == [
        ("b", S.HELD, S.WAITING_FOR_DEPS, "release"),
        ("b", S.WAITING_FOR_DEPS, S.WAITING_FOR_EP, "parents-settled"),
        ("b", S.WAITING_FOR_EP, S.DISPATCHED, "dispatch"),
    ]


def test_an_errored_group_task_cannot_be_retried(busy: Scheduler) -> None:
    s = busy
    s.handle(group(m("a"), m("b", after=("a",))))
    fails(s, "a", 2.0)
    with pytest.raises(Exception, match="cannot be retried"):
        s.handle(cmd("retry", "a", time=3.0))


# ------------------------------------------------------------ inputs outside a group


def test_a_plain_task_waits_for_its_input_and_gets_its_result(busy: Scheduler) -> None:
    s = busy
    s.handle(submit("a"))
    out = s.handle(
        TasksSubmitted(
            EP, OWNER, (NewTask("b", FN, args("b"), 2, 0, 3, 0.0, inputs=("a",)),), SESSION, 1.0
        )
    )
    assert moves(out) == [("b", None, S.WAITING_FOR_DEPS, "submit")]

    out = returned(s, "a", b"ra", 2.0)

    assert dispatched(out) == [item("b", b"ra")]


def test_a_plain_task_whose_input_settled_long_ago_is_decided_at_once(busy: Scheduler) -> None:
    s = busy
    new = (
        NewTask("b", FN, args("b"), 2, 0, 3, 0.0, inputs=("old",)),
        NewTask("c", FN, args("c"), 2, 0, 3, 0.0, inputs=("gone",)),
    )
    with pytest.raises(InputsMoved) as info:
        s.handle(
            TasksSubmitted(
                EP, OWNER, new, SESSION, 1.0, settled_inputs={"old": (S.SUCCEEDED, b"r")}
            )
        )
    assert info.value.task_ids == ["gone"] and not s.tasks

    settled = {"old": (S.SUCCEEDED, b"r"), "gone": (S.CANCELLED, None)}
    out = s.handle(TasksSubmitted(EP, OWNER, new, SESSION, 1.0, settled_inputs=settled))

    assert moves(out) == [
        ("b", None, S.WAITING_FOR_DEPS, "submit"),
        ("c", None, S.WAITING_FOR_DEPS, "submit"),
        ("b", S.WAITING_FOR_DEPS, S.WAITING_FOR_EP, "parents-settled"),
        ("c", S.WAITING_FOR_DEPS, S.SKIPPED, "skipped: input-not-succeeded"),
        ("b", S.WAITING_FOR_EP, S.DISPATCHED, "dispatch"),
    ]
    assert dispatched(out) == [item("b", b"r")]


def test_inputs_over_the_payload_limit_are_refused_at_dispatch_naming_it() -> None:
    s = make(max_payload=100)
    s.handle(group(m("a"), m("b", inputs=("a",))))
    s.handle(connect("A", capacity=2))
    returned(s, "a", b"x" * 95, 2.0)

    task = s.tasks["b"]
    assert task.state == S.ERRORED
    assert task.error is not None and task.error.type_name == "heartline.InputsTooLarge"
    assert "over the payload limit of 100 bytes" in task.error.message


# ------------------------------------------------------------------------ restart


def test_a_group_restored_after_a_restart_goes_on_where_it_was(busy: Scheduler) -> None:
    s = busy
    s.handle(group(*DIAMOND, m("f", final=True)))
    returned(s, "a", b"ra", 2.0)
    returned(s, "b", b"rb", 3.0)
    # What the store would hand back: the unsettled tasks, the group, settled results.
    rows = [s.tasks[t].snapshot() for t in ("c", "d", "f")]
    group_row = GroupRow(G, "nightly", OWNER, EP, 0.0, False, 0.0, (*DIAMOND, m("f", final=True)))
    members = {"a": (S.SUCCEEDED, None), "b": (S.SUCCEEDED, None), "c": (S.DISPATCHED, None)}
    members |= {"d": (S.WAITING_FOR_DEPS, None), "f": (S.WAITING_FOR_DEPS, None)}
    state = GroupStateRow(G, GroupStatus.NONE, True, counts(2, none=2), None, False, None)
    results = {"a": (S.SUCCEEDED, b"ra"), "b": (S.SUCCEEDED, b"rb")}

    r = make()
    r.restore(rows, 10.0, groups=[(group_row, state, members)], results=results)
    # c's agent comes back still running it: it reclaims c, which finishes there.
    r.handle(connect("A", capacity=5, time=11.0, held=(HeldTask("c", 1, S.RUNNING),)))
    assert r.tasks["c"].state == S.RUNNING and r.tasks["d"].state == S.WAITING_FOR_DEPS
    out = returned(r, "c", b"rc", 12.0)

    assert dispatched(out) == [item("d", b"rb", b"rc")]
    returned(r, "d", b"rd", 13.0)
    out = returned(r, "f", b"rf", 14.0)
    assert group_changes(out) == [GroupChanged(G, GroupStatus.SUCCEEDED, False, 14.0)]


def test_transitions_of_group_tasks_are_recorded_like_any_other(busy: Scheduler) -> None:
    out = busy.handle(group(m("a"), m("b", after=("a",)), time=1.0))
    rows = [t for p in of(out, Persist) for t in p.batch.transitions]
    assert rows[1] == TransitionRow("b", None, S.WAITING_FOR_DEPS, "submit", 1.0, 1)
