"""The scheduler's parts alone: the transition table, the dispatcher, the task's standing,
and validate()'s two scopes. The scheduler as a whole is tested in test_scheduler.py."""

from __future__ import annotations

import pytest

from heartline._states import ON_AGENT_STATES, PENDING_STATES, TaskState
from heartline.server._dispatch import AgentState, Dispatcher, EndpointQueue
from heartline.server._events import AgentConnected, AgentLost, NewTask, TasksSubmitted
from heartline.server._lifecycle import COMMANDS, TRANSITIONS, finish_of_command
from heartline.server._model import PRIORITY_HIGH, PRIORITY_NORMAL, Standing, TaskRecord
from heartline.server._scheduler import Scheduler, SchedulerConfig

S = TaskState


def task(
    tid: str, *, priority: int = PRIORITY_NORMAL, submit_time: float = 0.0, endpoint: str = "ep"
) -> TaskRecord:
    return TaskRecord(tid, endpoint, "fn", b"", "alice", S.WAITING_FOR_EP, submit_time, priority=priority)


# -------------------------------------------------------------------------- table


def test_submission_rows_lead_to_waiting_or_held_only() -> None:
    assert {f for s, f in TRANSITIONS if s is None} == {S.WAITING_FOR_EP, S.WAITING_FOR_DEPS, S.HELD}


def test_only_tasks_that_have_not_started_can_be_skipped() -> None:
    assert {s for s, f in TRANSITIONS if f is S.SKIPPED} == {S.WAITING_FOR_DEPS, S.WAITING_FOR_EP, S.HELD}


def test_only_waiting_and_held_rows_keep_a_standing() -> None:
    keeping = {(s, f) for (s, f), row in TRANSITIONS.items() if row.keep_standing}
    assert all(f in (S.WAITING_FOR_EP, S.HELD, S.WAITING_FOR_DEPS) for _, f in keeping)
    assert (S.WAITING_FOR_EP, S.HELD) in keeping and (S.HELD, S.WAITING_FOR_EP) in keeping


def test_a_new_attempt_starts_only_where_an_attempt_ends_or_a_lost_one_is_written_off() -> None:
    rows = {key for key, row in TRANSITIONS.items() if row.next_attempt}
    assert rows == {
        *((s, S.WAITING_FOR_EP) for s in ON_AGENT_STATES),
        (S.ERRORED, S.WAITING_FOR_EP),
        (S.WAITING_FOR_EP, S.DISPATCHED),
    }


def test_cancel_reaches_the_agent_only_from_an_agent() -> None:
    rows = {s for (s, f), row in TRANSITIONS.items() if row.cancel_on_agent}
    assert rows == set(ON_AGENT_STATES)
    assert all((s, S.CANCELLED) in TRANSITIONS for s in PENDING_STATES)


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_a_command_is_refused_where_the_table_has_no_row(command: str) -> None:
    t = task("t1")
    t.state = S.SUCCEEDED  # never held by the scheduler, but no row leaves it either
    assert finish_of_command(command, t) is None


# --------------------------------------------------------------------- dispatcher


def test_queue_pops_highest_priority_then_oldest() -> None:
    q = EndpointQueue()
    q.push(task("late", submit_time=2.0))
    q.push(task("early", submit_time=1.0))
    q.push(task("urgent", priority=PRIORITY_HIGH, submit_time=3.0))
    q.discard("early")
    assert [q.pop(), q.pop(), q.pop()] == ["urgent", "late", None]


def test_assignments_spread_by_free_credit_and_stop_when_credit_runs_out() -> None:
    d = Dispatcher()
    a = AgentState("A", "ep", capacity=1, prefetch=0)
    b = AgentState("B", "ep", capacity=2, prefetch=0)
    d.connect(a)
    d.connect(b)
    tasks = {t.task_id: t for t in (task(f"t{i}", submit_time=float(i)) for i in range(5))}
    for t in tasks.values():
        d.enqueue(t)
    given = []
    for task_id, agent in d.assignments("ep"):
        d.bind(tasks[task_id], agent)
        given.append((task_id, agent.agent_id))
    assert given == [("t0", "B"), ("t1", "A"), ("t2", "B")]
    assert d.queued("ep") == 2 and (a.credit, b.credit) == (0, 0)
    assert d.unbind(tasks["t1"]) is a and a.credit == 1 and tasks["t1"].agent_id is None


def test_each_endpoint_reads_only_its_own_agents() -> None:
    d = Dispatcher()
    agents = [AgentState(f"A{i}", f"ep{i % 3}", capacity=1, prefetch=0) for i in range(7)]
    for agent in agents:
        d.connect(agent)
    d.check_index()
    assert [a.agent_id for a in d.agents_of("ep1")] == ["A1", "A4"]
    assert list(d.agents_of("nowhere")) == [] and set(d.online()) == {"ep0", "ep1", "ep2"}
    d.enqueue(task("t0", endpoint="ep1"))
    assert [(t, a.agent_id) for t, a in d.assignments("ep1")] == [("t0", "A1")]
    for agent_id in ("A1", "A4"):
        d.disconnect(agent_id)
    d.check_index()
    assert "ep1" not in d.online() and list(d.agents_of("ep1")) == []
    assert len(d.agents) == 5


# ----------------------------------------------------------------------- standing


@pytest.mark.parametrize("standing", list(Standing))
def test_standing_is_stored_as_interrupted(standing: Standing) -> None:
    t = task("t1")
    t.standing = standing
    row = t.snapshot()
    assert row.interrupted == (standing is not Standing.FRESH)
    # The store keeps one bit: ORPHANED comes back LOST (restore tells them apart).
    expected = Standing.FRESH if standing is Standing.FRESH else Standing.LOST
    assert row.to_record().standing is expected


def test_restore_orphans_waiting_tasks_whose_agent_may_hold_them() -> None:
    s = Scheduler(SchedulerConfig(validate=True, heartbeat_timeout=10.0))
    s.handle(TasksSubmitted("ep", "alice", (NewTask("t1", "fn", b"", 2, 0, 3, 0.0),), "", 0.0))
    s.handle(AgentConnected("A", "ep", 1, 0, (), 0.0))
    s.handle(AgentLost("A", 1.0))
    assert s.tasks["t1"].standing is Standing.LOST and s.queued("ep") == 1

    restarted = Scheduler(SchedulerConfig(validate=True, heartbeat_timeout=10.0))
    restarted.restore([t.snapshot() for t in s.tasks.values()], 2.0)
    assert restarted.tasks["t1"].standing is Standing.ORPHANED and restarted.queued("ep") == 0
    restarted.validate(full=True)


# ----------------------------------------------------------------------- validate


def test_validate_checks_what_the_step_touched_and_full_checks_everything() -> None:
    s = Scheduler(SchedulerConfig(validate=True))
    s.handle(TasksSubmitted("ep", "alice", (NewTask("t1", "fn", b"", 2, 0, 3, 0.0),), "", 0.0))
    s.handle(TasksSubmitted("ep", "alice", (NewTask("t2", "fn", b"", 2, 0, 3, 0.0),), "", 1.0))
    # Break t1 behind the table's back (out of its queue, standing unchanged).
    s.dispatcher.dequeue(s.tasks["t1"])
    s.validate()  # the last step touched t2 only: the counts still add up
    with pytest.raises(AssertionError, match="t1 queue mismatch"):
        s.validate(full=True)
