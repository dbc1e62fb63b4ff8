"""The pure scheduler core: feed events, compare the exact instructions.

Every scheduler here runs with ``validate=True``, so the invariants of what each step
touched are checked after it, and all of them (``validate(full=True)``) at the end of
each test. Refused commands are checked to leave the whole scheduler state untouched.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, given, settings

from heartline._states import TaskState
from heartline.server._dispatch import EndpointQueue
from heartline.server._events import (
    AgentCapacity,
    AgentLost,
    HeldTask,
    NewTask,
    NotifyWatchers,
    Persist,
    SendAcks,
    SendCancels,
    SendDispatches,
    TaskChanged,
    Tick,
)
from heartline.server._model import (
    FAILURE_ENDPOINT_LOST,
    FAILURE_SERIALIZATION,
    FAILURE_WALLTIME,
    FAILURE_WORKER_DIED,
    PRIORITY_HIGH,
    PRIORITY_LOW,
    PRIORITY_NORMAL,
    ErrorInfo,
    OutputRow,
    Standing,
    TaskRecord,
)
from heartline.server._scheduler import (
    InvalidTransition,
    Scheduler,
    UnknownTasks,
)
from tests.scheduler_kit import (
    EP,
    FN,
    OTHER_EP,
    OWNER,
    S,
    changed,
    cmd,
    connect,
    item,
    make,
    persist,
    raised,
    report,
    row,
    running,
    spec,
    sr,
    state_of,
    submit,
    system_error,
    tr,
)

# ------------------------------------------------------------------------- submit


def test_submit_queues_the_task_and_persists_it_with_its_first_transition(sched: Scheduler) -> None:
    out = sched.handle(submit("t1", "t2", time=5.0))

    assert out == [
        persist(
            new=(
                row("t1", S.WAITING_FOR_EP, submit_time=5.0),
                row("t2", S.WAITING_FOR_EP, submit_time=5.0),
            ),
            transitions=(
                tr("t1", None, S.WAITING_FOR_EP, "submit", 5.0),
                tr("t2", None, S.WAITING_FOR_EP, "submit", 5.0),
            ),
        ),
        NotifyWatchers(
            (
                changed("t1", S.WAITING_FOR_EP, "submit", 5.0),
                changed("t2", S.WAITING_FOR_EP, "submit", 5.0),
            )
        ),
    ]
    assert sched.queued(EP) == 2
    assert sched.waiting_reason("t1") == "endpoint offline: no agent connected"


def test_submit_held_goes_to_held_and_is_not_dispatched(sched: Scheduler) -> None:
    sched.handle(connect("A", capacity=4))

    out = sched.handle(submit(spec("t1", held=True), time=1.0))

    assert out == [
        persist(
            new=(row("t1", S.HELD, submit_time=1.0, held_from=S.WAITING_FOR_EP),),
            transitions=(tr("t1", None, S.HELD, "submit", 1.0),),
        ),
        NotifyWatchers((changed("t1", S.HELD, "submit", 1.0),)),
    ]
    assert sched.queued(EP) == 0
    assert sched.agents["A"].in_flight == set()
    assert sched.waiting_reason("t1") == "held: release it to run"


def test_resubmit_records_the_task_it_came_from(sched: Scheduler) -> None:
    event = dataclasses.replace(submit("t2", time=3.0), resubmitted_from=("t1",))

    out = sched.handle(event)

    assert out == [
        persist(
            new=(row("t2", S.WAITING_FOR_EP, submit_time=3.0, resubmitted_from="t1"),),
            transitions=(tr("t2", None, S.WAITING_FOR_EP, "resubmit of t1", 3.0),),
        ),
        NotifyWatchers((changed("t2", S.WAITING_FOR_EP, "resubmit of t1", 3.0),)),
    ]


def test_submit_to_an_endpoint_with_an_agent_dispatches_in_the_same_step(sched: Scheduler) -> None:
    sched.handle(connect("A", capacity=1))

    out = sched.handle(submit("t1", time=2.0))

    assert out == [
        persist(
            new=(row("t1", S.DISPATCHED, submit_time=2.0),),
            transitions=(
                tr("t1", None, S.WAITING_FOR_EP, "submit", 2.0),
                tr("t1", S.WAITING_FOR_EP, S.DISPATCHED, "dispatch", 2.0),
            ),
        ),
        SendDispatches("A", (item("t1"),)),
        NotifyWatchers(
            (
                changed("t1", S.WAITING_FOR_EP, "submit", 2.0),
                changed("t1", S.DISPATCHED, "dispatch", 2.0),
            )
        ),
    ]


# ----------------------------------------------------------------------- dispatch


def test_dispatch_sends_capacity_plus_prefetch_and_no_more(sched: Scheduler) -> None:
    sched.handle(submit("t1", "t2", "t3", "t4", "t5"))

    out = sched.handle(connect("A", capacity=2, prefetch=1, time=1.0))

    assert out == [
        persist(
            updates=(row("t1", S.DISPATCHED), row("t2", S.DISPATCHED), row("t3", S.DISPATCHED)),
            transitions=tuple(
                tr(t, S.WAITING_FOR_EP, S.DISPATCHED, "dispatch", 1.0) for t in ("t1", "t2", "t3")
            ),
        ),
        SendDispatches("A", (item("t1"), item("t2"), item("t3"))),
        NotifyWatchers(
            tuple(changed(t, S.DISPATCHED, "dispatch", 1.0) for t in ("t1", "t2", "t3"))
        ),
    ]
    assert sched.agents["A"].credit == 0
    assert sched.queued(EP) == 2
    assert sched.waiting_reason("t4") == "no free slot on the endpoint"
    assert sched.waiting_reason("t1") == "sent to the endpoint, not yet acknowledged"
    # Refused: nothing more goes out while the agent has no credit, whatever happens.
    assert sched.handle(Tick(3.0), submit("t6", time=3.0)) == [
        persist(
            new=(row("t6", S.WAITING_FOR_EP, submit_time=3.0),),
            transitions=(tr("t6", None, S.WAITING_FOR_EP, "submit", 3.0),),
        ),
        NotifyWatchers((changed("t6", S.WAITING_FOR_EP, "submit", 3.0),)),
    ]
    assert len(sched.agents["A"].in_flight) == 3


def test_dispatch_takes_high_before_normal_before_low_then_the_oldest(sched: Scheduler) -> None:
    sched.handle(submit(spec("low", priority=PRIORITY_LOW), time=0.0))
    sched.handle(submit(spec("normal-old", priority=PRIORITY_NORMAL), time=1.0))
    sched.handle(submit(spec("high", priority=PRIORITY_HIGH), time=2.0))
    sched.handle(submit(spec("normal-new", priority=PRIORITY_NORMAL), time=3.0))

    out = sched.handle(connect("A", capacity=3, time=4.0))

    dispatches = [i for i in out if isinstance(i, SendDispatches)]
    assert [i.task_id for d in dispatches for i in d.items] == ["high", "normal-old", "normal-new"]
    assert sched.tasks["low"].state == S.WAITING_FOR_EP


def test_a_capacity_change_moves_the_agents_credit(sched: Scheduler) -> None:
    # A Dask cluster scales: the agent says so; more goes out at once, and a shrink takes
    # nothing back (credit below zero until its tasks drain).
    sched.handle(submit("t1", "t2", "t3", "t4", "t5"))
    sched.handle(connect("A", capacity=1, prefetch=0, time=1.0))
    assert sched.agents["A"].in_flight == {"t1"}

    out = sched.handle(AgentCapacity("A", 3, 2.0))

    assert [i for i in out if isinstance(i, SendDispatches)] == [
        SendDispatches("A", (item("t2"), item("t3")))
    ]
    assert sched.agents["A"].capacity == 3
    assert sched.handle(AgentCapacity("A", 1, 3.0)) == []
    assert sched.agents["A"].credit == -2
    assert sched.waiting_reason("t4") == "no free slot on the endpoint"
    assert sched.handle(AgentCapacity("gone", 5, 4.0)) == []  # an agent already lost


def test_dispatch_spreads_across_agents_by_free_credit_with_one_batch_per_agent(
    sched: Scheduler,
) -> None:
    sched.handle(connect("A", capacity=2), connect("B", capacity=2))

    out = sched.handle(submit("t1", "t2", "t3", "t4", "t5", time=1.0))

    assert [i for i in out if isinstance(i, SendDispatches)] == [
        SendDispatches("A", (item("t1"), item("t3"))),
        SendDispatches("B", (item("t2"), item("t4"))),
    ]
    assert sched.tasks["t5"].state == S.WAITING_FOR_EP


def test_dispatch_prefers_the_agent_with_more_free_credit(sched: Scheduler) -> None:
    sched.handle(connect("A", capacity=3), connect("B", capacity=3))
    sched.handle(submit("t1", "t2", "t3", time=1.0))  # A: t1 t3, B: t2
    assert sched.agents["A"].credit == 1 and sched.agents["B"].credit == 2

    out = sched.handle(submit("t4", time=2.0))

    assert [i for i in out if isinstance(i, SendDispatches)] == [SendDispatches("B", (item("t4"),))]


def test_dispatch_never_goes_to_an_agent_of_another_endpoint(sched: Scheduler) -> None:
    sched.handle(connect("other", capacity=5, endpoint=OTHER_EP))

    out = sched.handle(submit("t1", time=1.0))

    assert not [i for i in out if isinstance(i, SendDispatches)]
    assert sched.tasks["t1"].state == S.WAITING_FOR_EP
    assert sched.agents["other"].in_flight == set()


# ---------------------------------------------------------- progress on the agent


def test_ack_assigned_started_move_the_task_forward(sched: Scheduler) -> None:
    sched.handle(submit("t1"), connect("A"))

    assert sched.handle(report("A", sr("t1", S.WAITING_FOR_NODES), time=1.0)) == [
        persist(
            updates=(row("t1", S.WAITING_FOR_NODES),),
            transitions=(tr("t1", S.DISPATCHED, S.WAITING_FOR_NODES, "ack", 1.0),),
        ),
        NotifyWatchers((changed("t1", S.WAITING_FOR_NODES, "ack", 1.0),)),
    ]
    assert sched.handle(report("A", sr("t1", S.WAITING_FOR_LAUNCH), time=2.0)) == [
        persist(
            updates=(row("t1", S.WAITING_FOR_LAUNCH),),
            transitions=(
                tr("t1", S.WAITING_FOR_NODES, S.WAITING_FOR_LAUNCH, "worker-assigned", 2.0),
            ),
        ),
        NotifyWatchers((changed("t1", S.WAITING_FOR_LAUNCH, "worker-assigned", 2.0),)),
    ]
    assert sched.handle(report("A", sr("t1", S.RUNNING), time=3.0)) == [
        persist(
            updates=(row("t1", S.RUNNING, start_time=3.0),),
            transitions=(tr("t1", S.WAITING_FOR_LAUNCH, S.RUNNING, "worker-started", 3.0),),
        ),
        NotifyWatchers((changed("t1", S.RUNNING, "worker-started", 3.0),)),
    ]


def test_a_report_may_skip_steps_forward(sched: Scheduler) -> None:
    sched.handle(submit("t1"), connect("A"))

    out = sched.handle(report("A", sr("t1", S.RUNNING), time=1.0))

    assert out[0] == persist(
        updates=(row("t1", S.RUNNING, start_time=1.0),),
        transitions=(tr("t1", S.DISPATCHED, S.RUNNING, "worker-started", 1.0),),
    )


def test_backward_and_repeated_progress_reports_change_nothing(sched: Scheduler) -> None:
    running(sched, "t1")
    before = state_of(sched)

    out = sched.handle(
        report(
            "A",
            sr("t1", S.WAITING_FOR_NODES),
            sr("t1", S.WAITING_FOR_LAUNCH),
            sr("t1", S.RUNNING),
            time=1.0,
        )
    )

    assert out == []
    assert state_of(sched) == before


def test_progress_report_for_a_task_the_agent_does_not_hold_is_cancelled_there(
    sched: Scheduler,
) -> None:
    sched.handle(submit("t1"), connect("A"), connect("B"))
    assert sched.tasks["t1"].agent_id == "A"
    before = state_of(sched)

    out = sched.handle(report("B", sr("t1", S.RUNNING), sr("ghost", S.RUNNING), time=1.0))

    assert out == [SendCancels("B", ("t1", "ghost"))]
    assert state_of(sched) == before


# ----------------------------------------------------------------------- returned


def test_returned_succeeds_acks_evicts_and_dispatches_the_next_task(sched: Scheduler) -> None:
    running(sched, "t1")
    sched.handle(submit("t2", time=2.0))
    assert sched.tasks["t2"].state == S.WAITING_FOR_EP

    out = sched.handle(report("A", sr("t1", S.SUCCEEDED, result=b"1024"), time=5.0))

    assert out == [
        persist(
            updates=(
                row("t1", S.SUCCEEDED, start_time=1.0, settle_time=5.0, result=b"1024"),
                row("t2", S.DISPATCHED, submit_time=2.0),
            ),
            transitions=(
                tr("t1", S.RUNNING, S.SUCCEEDED, "returned", 5.0),
                tr("t2", S.WAITING_FOR_EP, S.DISPATCHED, "dispatch", 5.0),
            ),
        ),
        SendDispatches("A", (item("t2"),)),
        SendAcks("A", (("t1", 1),)),
        NotifyWatchers(
            (
                changed("t1", S.SUCCEEDED, "returned", 5.0, result=b"1024"),
                changed("t2", S.DISPATCHED, "dispatch", 5.0),
            )
        ),
    ]
    assert "t1" not in sched.tasks
    assert sched.agents["A"].in_flight == {"t2"}


def test_success_of_an_evicted_task_cannot_be_retried(sched: Scheduler) -> None:
    # The scheduler forgets settled tasks; the servicer answers from the store.
    running(sched, "t1")
    sched.handle(report("A", sr("t1", S.SUCCEEDED, result=b"x"), time=2.0))
    before = state_of(sched)

    with pytest.raises(UnknownTasks) as info:
        sched.handle(cmd("retry", "t1", time=3.0))

    assert info.value.task_ids == ["t1"]
    assert "t1" in str(info.value)
    assert state_of(sched) == before


def test_result_at_the_payload_limit_is_accepted() -> None:
    s = make(max_payload=8)
    running(s, "t1")

    out = s.handle(report("A", sr("t1", S.SUCCEEDED, result=b"12345678"), time=2.0))

    assert out[0] == persist(
        updates=(row("t1", S.SUCCEEDED, start_time=1.0, settle_time=2.0, result=b"12345678"),),
        transitions=(tr("t1", S.RUNNING, S.SUCCEEDED, "returned", 2.0),),
    )


def test_result_over_the_payload_limit_is_refused_as_an_error() -> None:
    s = make(max_payload=8)
    s.handle(submit(spec("t1", max_retries=2)), connect("A"))
    s.handle(report("A", sr("t1", S.RUNNING), time=1.0))

    out = s.handle(report("A", sr("t1", S.SUCCEEDED, result=b"123456789"), time=2.0))

    error = ErrorInfo(
        "heartline.ResultTooLarge",
        "the result is 9 bytes, over the payload limit of 8 bytes",
        "",
        FAILURE_SERIALIZATION,
    )
    assert out == [
        persist(
            updates=(
                row("t1", S.ERRORED, max_retries=2, start_time=1.0, settle_time=2.0, error=error),
            ),
            transitions=(tr("t1", S.RUNNING, S.ERRORED, "serialization-error", 2.0),),
        ),
        SendAcks("A", (("t1", 1),)),
        NotifyWatchers((changed("t1", S.ERRORED, "serialization-error", 2.0, error=error),)),
    ]
    assert s.tasks["t1"].result is None


# ------------------------------------------------------------------------- raised


def test_raised_with_retries_left_is_requeued_as_the_next_attempt(sched: Scheduler) -> None:
    sched.handle(submit(spec("t1", max_retries=1)), connect("A"))
    sched.handle(report("A", sr("t1", S.RUNNING), time=1.0))
    error = raised()

    out = sched.handle(report("A", sr("t1", S.ERRORED, error=error), time=2.0))

    cause = "raised ValueError; retry 1 of 1"
    assert out == [
        persist(
            updates=(
                row(
                    "t1",
                    S.DISPATCHED,
                    attempt=2,
                    max_retries=1,
                    start_time=1.0,
                    error=error,
                    raised_count=1,
                ),
            ),
            transitions=(
                tr("t1", S.RUNNING, S.WAITING_FOR_EP, cause, 2.0, attempt=2),
                tr("t1", S.WAITING_FOR_EP, S.DISPATCHED, "dispatch", 2.0, attempt=2),
            ),
        ),
        SendDispatches("A", (item("t1", attempt=2),)),
        SendAcks("A", (("t1", 1),)),
        NotifyWatchers(
            (
                changed("t1", S.WAITING_FOR_EP, cause, 2.0, attempt=2),
                changed("t1", S.DISPATCHED, "dispatch", 2.0, attempt=2),
            )
        ),
    ]


def test_raised_without_retries_left_is_errored_and_kept(sched: Scheduler) -> None:
    sched.handle(submit(spec("t1", max_retries=1)), connect("A"))
    sched.handle(report("A", sr("t1", S.ERRORED, error=raised()), time=1.0))  # attempt 1: retried
    sched.handle(report("A", sr("t1", S.RUNNING, 2), time=2.0))
    error = raised("KeyError", "'x'")

    out = sched.handle(report("A", sr("t1", S.ERRORED, 2, error=error), time=3.0))

    assert out == [
        persist(
            updates=(
                row(
                    "t1",
                    S.ERRORED,
                    attempt=2,
                    max_retries=1,
                    start_time=2.0,
                    settle_time=3.0,
                    error=error,
                    raised_count=2,
                ),
            ),
            transitions=(tr("t1", S.RUNNING, S.ERRORED, "raised KeyError", 3.0, attempt=2),),
            # A later attempt's output replaces the earlier one's, even when empty.
            outputs=(OutputRow("t1", "", ""),),
        ),
        SendAcks("A", (("t1", 2),)),
        NotifyWatchers((changed("t1", S.ERRORED, "raised KeyError", 3.0, attempt=2, error=error),)),
    ]
    assert sched.tasks["t1"].state == S.ERRORED
    assert sched.agents["A"].in_flight == set()


def test_error_report_without_an_error_is_errored_with_a_placeholder(sched: Scheduler) -> None:
    running(sched, "t1")

    sched.handle(report("A", sr("t1", S.ERRORED), time=2.0))

    assert sched.tasks["t1"].state == S.ERRORED
    assert sched.tasks["t1"].error == ErrorInfo(
        "heartline.UnknownError", "the agent reported no error"
    )


def test_walltime_counts_against_max_retries_not_max_system_retries(sched: Scheduler) -> None:
    """SPEC section 3: a task past its walltime failed by its own doing, like a raise."""
    sched.handle(submit(spec("t1", max_retries=1, max_system_retries=3)), connect("A"))
    walltime = system_error(FAILURE_WALLTIME, "task t1 ran past its walltime of 1 s")

    out1 = sched.handle(report("A", sr("t1", S.ERRORED, 1, error=walltime), time=1.0))
    assert out1[0].batch.transitions == (  # type: ignore[union-attr]
        tr("t1", S.DISPATCHED, S.WAITING_FOR_EP, "walltime-exceeded; retry 1 of 1", 1.0, attempt=2),
        tr("t1", S.WAITING_FOR_EP, S.DISPATCHED, "dispatch", 1.0, attempt=2),
    )
    out2 = sched.handle(report("A", sr("t1", S.ERRORED, 2, error=walltime), time=2.0))

    assert out2[0].batch.transitions == (  # type: ignore[union-attr]
        tr("t1", S.DISPATCHED, S.ERRORED, "walltime-exceeded", 2.0, attempt=2),
    )
    task = sched.tasks["t1"]
    assert (task.state, task.raised_count, task.system_failures) == (S.ERRORED, 2, 0)
    assert task.error == walltime


def test_walltime_with_the_default_max_retries_errors_at_attempt_1(sched: Scheduler) -> None:
    sched.handle(submit(spec("t1")), connect("A"))

    sched.handle(
        report("A", sr("t1", S.ERRORED, 1, error=system_error(FAILURE_WALLTIME)), time=1.0)
    )

    assert (sched.tasks["t1"].state, sched.tasks["t1"].attempt) == (S.ERRORED, 1)


# --------------------------------------------------------------- system failures


def test_system_failures_requeue_until_max_system_retries_then_error_with_the_reason(
    sched: Scheduler,
) -> None:
    sched.handle(submit(spec("t1", max_system_retries=2, max_retries=5)), connect("A"))
    died = system_error(FAILURE_WORKER_DIED)

    out1 = sched.handle(report("A", sr("t1", S.ERRORED, 1, error=died), time=1.0))
    assert out1[0].batch.transitions == (  # type: ignore[union-attr]
        tr("t1", S.DISPATCHED, S.WAITING_FOR_EP, "worker-died", 1.0, attempt=2),
        tr("t1", S.WAITING_FOR_EP, S.DISPATCHED, "dispatch", 1.0, attempt=2),
    )
    out2 = sched.handle(report("A", sr("t1", S.ERRORED, 2, error=died), time=2.0))
    assert out2[0].batch.transitions == (  # type: ignore[union-attr]
        tr("t1", S.DISPATCHED, S.WAITING_FOR_EP, "worker-died", 2.0, attempt=3),
        tr("t1", S.WAITING_FOR_EP, S.DISPATCHED, "dispatch", 2.0, attempt=3),
    )

    out3 = sched.handle(report("A", sr("t1", S.ERRORED, 3, error=died), time=3.0))

    final = ErrorInfo(
        "heartline.WorkerDied",
        "the worker process died (gave up after 3 system failures; max_system_retries is 2)",
        "",
        FAILURE_WORKER_DIED,
    )
    assert out3 == [
        persist(
            updates=(
                row(
                    "t1",
                    S.ERRORED,
                    attempt=3,
                    max_retries=5,
                    max_system_retries=2,
                    settle_time=3.0,
                    error=final,
                    system_failures=3,
                ),
            ),
            transitions=(tr("t1", S.DISPATCHED, S.ERRORED, "worker-died", 3.0, attempt=3),),
            outputs=(OutputRow("t1", "", ""),),
        ),
        SendAcks("A", (("t1", 3),)),
        NotifyWatchers((changed("t1", S.ERRORED, "worker-died", 3.0, attempt=3, error=final),)),
    ]
    assert sched.tasks["t1"].raised_count == 0  # system failures do not use the max_retries budget


def test_serialization_failure_is_errored_at_once(sched: Scheduler) -> None:
    sched.handle(submit(spec("t1", max_retries=3, max_system_retries=3)), connect("A"))
    error = ErrorInfo(
        "heartline.SerializationError",
        "cannot unpickle: version mismatch",
        "",
        FAILURE_SERIALIZATION,
    )

    out = sched.handle(report("A", sr("t1", S.ERRORED, error=error), time=1.0))

    assert out == [
        persist(
            updates=(row("t1", S.ERRORED, max_retries=3, settle_time=1.0, error=error),),
            transitions=(tr("t1", S.DISPATCHED, S.ERRORED, "serialization-error", 1.0),),
        ),
        SendAcks("A", (("t1", 1),)),
        NotifyWatchers((changed("t1", S.ERRORED, "serialization-error", 1.0, error=error),)),
    ]


# ----------------------------------------------------------------- endpoint lost


def test_agent_lost_requeues_its_tasks_and_the_next_dispatch_is_a_new_attempt(
    sched: Scheduler,
) -> None:
    sched.handle(submit("t1", "t2"), connect("A", capacity=2))
    sched.handle(report("A", sr("t1", S.RUNNING), time=1.0))

    out = sched.handle(AgentLost("A", 2.0))

    assert out == [
        persist(
            updates=(
                row("t1", S.WAITING_FOR_EP, start_time=1.0, interrupted=True),
                row("t2", S.WAITING_FOR_EP, interrupted=True),
            ),
            transitions=(
                tr("t1", S.RUNNING, S.WAITING_FOR_EP, "endpoint-lost", 2.0),
                tr("t2", S.DISPATCHED, S.WAITING_FOR_EP, "endpoint-lost", 2.0),
            ),
        ),
        NotifyWatchers(
            (
                changed("t1", S.WAITING_FOR_EP, "endpoint-lost", 2.0),
                changed("t2", S.WAITING_FOR_EP, "endpoint-lost", 2.0),
            )
        ),
    ]
    assert "A" not in sched.agents
    assert sched.waiting_reason("t1") == "endpoint offline: no agent connected"

    out = sched.handle(connect("B", capacity=2, time=3.0))

    assert [i for i in out if isinstance(i, SendDispatches)] == [
        SendDispatches("B", (item("t1", 2), item("t2", 2)))
    ]
    assert sched.tasks["t1"].system_failures == 1


def test_lost_of_an_unknown_agent_and_reports_from_a_lost_agent_change_nothing(
    sched: Scheduler,
) -> None:
    running(sched, "t1")
    sched.handle(AgentLost("A", 2.0))
    before = state_of(sched)

    assert sched.handle(AgentLost("nobody", 3.0), AgentLost("A", 3.0)) == []
    # Nothing on a stream already declared lost is acknowledged.
    assert sched.handle(report("A", sr("t1", S.SUCCEEDED, result=b"r"), time=4.0)) == []
    assert state_of(sched) == before


def test_an_agent_lost_to_silence_has_its_tasks_dispatched_again_under_that_cause() -> None:
    # The server's timer judges silence (ServerCore.lose_silent_agents); a tick alone
    # loses nobody, however long since the agent's last message.
    s = make(heartbeat_timeout=10.0)
    s.handle(submit("t1"), connect("A", time=0.0))
    s.handle(connect("B", time=4.0))

    assert s.handle(Tick(15.0), Tick(100.0)) == []
    out = s.handle(AgentLost("A", 15.5, "heartbeat-timeout"))

    assert out == [
        persist(
            updates=(row("t1", S.DISPATCHED, attempt=2, system_failures=1),),
            transitions=(
                tr("t1", S.DISPATCHED, S.WAITING_FOR_EP, "heartbeat-timeout", 15.5),
                tr("t1", S.WAITING_FOR_EP, S.DISPATCHED, "dispatch", 15.5, attempt=2),
            ),
        ),
        SendDispatches("B", (item("t1", 2),)),
        NotifyWatchers(
            (
                changed("t1", S.WAITING_FOR_EP, "heartbeat-timeout", 15.5),
                changed("t1", S.DISPATCHED, "dispatch", 15.5, attempt=2),
            )
        ),
    ]
    assert set(s.agents) == {"B"}


# ---------------------------------------------------------------------- reconnect


def test_reconnect_reclaims_held_tasks_and_dispatches_the_rest_again(sched: Scheduler) -> None:
    sched.handle(submit("t1", "t2", "t3"), connect("A", capacity=3))
    sched.handle(report("A", sr("t1", S.RUNNING), sr("t2", S.WAITING_FOR_NODES), time=1.0))
    sched.handle(AgentLost("A", 2.0))

    held = (
        HeldTask("t1", 1, S.RUNNING),
        HeldTask("t2", 1, S.WAITING_FOR_LAUNCH),  # moved on while the stream was down
        HeldTask("ghost", 1, S.RUNNING),  # the server never heard of it
    )
    out = sched.handle(connect("A", capacity=3, held=held, time=3.0))

    assert out == [
        persist(
            updates=(
                row("t1", S.RUNNING, start_time=1.0),
                row("t2", S.WAITING_FOR_LAUNCH),
                row("t3", S.DISPATCHED, attempt=2, system_failures=1),
            ),
            transitions=(
                tr("t1", S.WAITING_FOR_EP, S.RUNNING, "agent-reconnected", 3.0),
                tr("t2", S.WAITING_FOR_EP, S.WAITING_FOR_LAUNCH, "agent-reconnected", 3.0),
                tr("t3", S.WAITING_FOR_EP, S.DISPATCHED, "dispatch", 3.0, attempt=2),
            ),
        ),
        SendCancels("A", ("ghost",)),
        SendDispatches("A", (item("t3", 2),)),
        NotifyWatchers(
            (
                changed("t1", S.RUNNING, "agent-reconnected", 3.0),
                changed("t2", S.WAITING_FOR_LAUNCH, "agent-reconnected", 3.0),
                changed("t3", S.DISPATCHED, "dispatch", 3.0, attempt=2),
            )
        ),
    ]
    assert sched.agents["A"].in_flight == {"t1", "t2", "t3"}
    assert all(t.standing is Standing.FRESH for t in sched.tasks.values())


def test_reclaimed_task_finishes_once_with_its_original_attempt(sched: Scheduler) -> None:
    running(sched, "t1")
    sched.handle(AgentLost("A", 2.0))
    sched.handle(connect("A", held=(HeldTask("t1", 1, S.RUNNING),), time=3.0))

    out = sched.handle(report("A", sr("t1", S.SUCCEEDED, result=b"ok"), time=4.0))

    assert out[0] == persist(
        updates=(row("t1", S.SUCCEEDED, start_time=1.0, settle_time=4.0, result=b"ok"),),
        transitions=(tr("t1", S.RUNNING, S.SUCCEEDED, "returned", 4.0),),
    )
    assert SendAcks("A", (("t1", 1),)) in out


def test_a_second_hello_from_a_connected_agent_starts_over_and_reclaims(sched: Scheduler) -> None:
    running(sched, "t1")

    out = sched.handle(connect("A", held=(HeldTask("t1", 1, S.RUNNING),), time=2.0))

    assert out[0] == persist(
        updates=(row("t1", S.RUNNING, start_time=1.0),),
        transitions=(
            tr("t1", S.RUNNING, S.WAITING_FOR_EP, "agent-reconnected", 2.0),
            tr("t1", S.WAITING_FOR_EP, S.RUNNING, "agent-reconnected", 2.0),
        ),
    )
    assert sched.tasks["t1"].attempt == 1 and sched.tasks["t1"].agent_id == "A"


def test_held_task_that_moved_on_is_cancelled_on_the_agent_and_nothing_else_changes(
    sched: Scheduler,
) -> None:
    sched.handle(submit("t1", "t2"), connect("A", capacity=2))
    sched.handle(connect("B", capacity=2, time=1.0))
    sched.handle(AgentLost("A", 2.0))  # t1, t2 go to B as attempt 2
    assert sched.tasks["t1"].agent_id == "B" and sched.tasks["t1"].attempt == 2
    sched.handle(
        report("B", sr("t2", S.SUCCEEDED, 2, result=b"r"), time=2.5)
    )  # t2 settled, evicted
    before = state_of(sched)

    held = (HeldTask("t1", 1, S.RUNNING), HeldTask("t2", 1, S.RUNNING))
    out = sched.handle(connect("A", capacity=0, held=held, time=3.0))

    assert out == [SendCancels("A", ("t1", "t2"))]
    assert state_of(sched)[0] == before[0]  # every task as it was


def test_held_task_with_another_attempt_is_cancelled(sched: Scheduler) -> None:
    running(sched, "t1")
    sched.handle(AgentLost("A", 2.0))
    before = state_of(sched)[0]

    out = sched.handle(connect("A", capacity=0, held=(HeldTask("t1", 7, S.RUNNING),), time=3.0))

    assert out == [SendCancels("A", ("t1",))]
    assert state_of(sched)[0] == before


# ---------------------------------------------------------------- hold / release


def test_hold_takes_a_queued_task_out_of_the_queue_and_release_puts_it_back(
    sched: Scheduler,
) -> None:
    sched.handle(submit("t1"))

    assert sched.handle(cmd("hold", "t1", time=1.0)) == [
        persist(
            updates=(row("t1", S.HELD, held_from=S.WAITING_FOR_EP),),
            transitions=(tr("t1", S.WAITING_FOR_EP, S.HELD, "hold", 1.0),),
        ),
        NotifyWatchers((changed("t1", S.HELD, "hold", 1.0),)),
    ]
    assert sched.queued(EP) == 0
    assert [i for i in sched.handle(connect("A", time=2.0)) if isinstance(i, SendDispatches)] == []

    assert sched.handle(cmd("release", "t1", time=3.0)) == [
        persist(
            updates=(row("t1", S.DISPATCHED),),
            transitions=(
                tr("t1", S.HELD, S.WAITING_FOR_EP, "release", 3.0),
                tr("t1", S.WAITING_FOR_EP, S.DISPATCHED, "dispatch", 3.0),
            ),
        ),
        SendDispatches("A", (item("t1"),)),
        NotifyWatchers(
            (
                changed("t1", S.WAITING_FOR_EP, "release", 3.0),
                changed("t1", S.DISPATCHED, "dispatch", 3.0),
            )
        ),
    ]


def test_release_of_a_task_submitted_held_queues_it(sched: Scheduler) -> None:
    sched.handle(submit(spec("t1", held=True)))

    out = sched.handle(cmd("release", "t1", time=1.0))

    assert out[0] == persist(
        updates=(row("t1", S.WAITING_FOR_EP),),
        transitions=(tr("t1", S.HELD, S.WAITING_FOR_EP, "release", 1.0),),
    )
    assert sched.queued(EP) == 1


@pytest.mark.parametrize(
    ("command", "word", "setup_state"),
    [
        ("release", "released", S.WAITING_FOR_EP),
        ("hold", "held", S.RUNNING),
        ("hold", "held", S.HELD),
        ("release", "released", S.RUNNING),
        ("retry", "retried", S.WAITING_FOR_EP),
        ("retry", "retried", S.RUNNING),
        ("give-up", "given up", S.WAITING_FOR_EP),
        ("give-up", "given up", S.DISPATCHED),
        ("cancel", "cancelled", S.ERRORED),
    ],
)
def test_refused_command_names_task_state_and_event_and_changes_nothing(
    sched: Scheduler, command: str, word: str, setup_state: TaskState
) -> None:
    sched.handle(submit("t1", spec("t2", held=setup_state == S.HELD)))
    if setup_state in (S.RUNNING, S.DISPATCHED, S.ERRORED):
        sched.handle(connect("A", capacity=2, time=1.0))
        if setup_state == S.RUNNING:
            sched.handle(report("A", sr("t2", S.RUNNING), time=1.0))
        if setup_state == S.ERRORED:
            sched.handle(report("A", sr("t2", S.ERRORED, error=raised()), time=1.0))
    assert sched.tasks["t2"].state == setup_state
    before = state_of(sched)

    with pytest.raises(InvalidTransition) as info:
        sched.handle(cmd(command, "t2", time=9.0))

    assert str(info.value) == f"task t2 is {setup_state.value}, so it cannot be {word}"
    assert info.value.refusals == [("t2", setup_state, word)]
    assert state_of(sched) == before


def test_a_batch_command_with_one_refused_task_changes_none_of_the_others(sched: Scheduler) -> None:
    sched.handle(submit("t1", "t2", "t3"), connect("A"))  # t1 dispatched
    before = state_of(sched)

    with pytest.raises(InvalidTransition) as info:
        sched.handle(cmd("hold", "t2", "t1", "t3", time=1.0))

    assert info.value.refusals == [("t1", S.DISPATCHED, "held")]
    assert state_of(sched) == before
    assert (
        sched.tasks["t2"].state == S.WAITING_FOR_EP and sched.tasks["t3"].state == S.WAITING_FOR_EP
    )


def test_a_command_naming_an_unknown_task_changes_none_of_the_others(sched: Scheduler) -> None:
    sched.handle(submit("t1", "t2"))
    before = state_of(sched)

    with pytest.raises(UnknownTasks) as info:
        sched.handle(cmd("cancel", "t1", "nope", "t2", "nada", time=1.0))

    assert info.value.task_ids == ["nope", "nada"]
    assert str(info.value) == "unknown tasks: nope, nada"
    assert state_of(sched) == before


def test_refusal_message_lists_five_tasks_and_counts_the_rest(sched: Scheduler) -> None:
    tids = [f"t{i}" for i in range(7)]
    sched.handle(submit(*tids))

    with pytest.raises(InvalidTransition) as info:
        sched.handle(cmd("release", *tids, time=1.0))

    assert len(info.value.refusals) == 7
    assert str(info.value).count("so it cannot be released") == 5
    assert str(info.value).endswith(" (and 2 more)")


def test_a_command_must_be_handled_in_a_step_of_its_own(sched: Scheduler) -> None:
    # A refusal must leave everything unchanged; events before the command in the same
    # step would otherwise be applied without their instructions.
    sched.handle(submit("t1"))
    before = state_of(sched)

    with pytest.raises(ValueError, match="a command must be handled alone"):
        sched.handle(submit("t2", time=1.0), cmd("cancel", "t1", time=1.0))

    assert state_of(sched) == before


# ------------------------------------------------------------------------- cancel


def test_cancel_of_a_queued_task(sched: Scheduler) -> None:
    sched.handle(submit("t1", "t2"))

    out = sched.handle(cmd("cancel", "t1", "t1", time=1.0))  # a repeated id counts once

    assert out == [
        persist(
            updates=(row("t1", S.CANCELLED, settle_time=1.0),),
            transitions=(tr("t1", S.WAITING_FOR_EP, S.CANCELLED, "cancel", 1.0),),
        ),
        NotifyWatchers((changed("t1", S.CANCELLED, "cancel", 1.0),)),
    ]
    assert "t1" not in sched.tasks
    assert sched.queued(EP) == 1


def test_cancel_of_a_held_task(sched: Scheduler) -> None:
    sched.handle(submit(spec("t1", held=True)))

    out = sched.handle(cmd("cancel", "t1", time=1.0))

    assert out[0] == persist(
        updates=(row("t1", S.CANCELLED, settle_time=1.0),),
        transitions=(tr("t1", S.HELD, S.CANCELLED, "cancel", 1.0),),
    )
    assert sched.tasks == {}


def test_cancel_of_a_running_task_kills_it_on_its_agent_and_frees_the_credit(
    sched: Scheduler,
) -> None:
    running(sched, "t1")
    sched.handle(submit("t2", time=2.0))

    out = sched.handle(cmd("cancel", "t1", time=3.0))

    assert out == [
        persist(
            updates=(
                row("t1", S.CANCELLED, start_time=1.0, settle_time=3.0),
                row("t2", S.DISPATCHED, submit_time=2.0),
            ),
            transitions=(
                tr("t1", S.RUNNING, S.CANCELLED, "cancel", 3.0),
                tr("t2", S.WAITING_FOR_EP, S.DISPATCHED, "dispatch", 3.0),
            ),
        ),
        SendCancels("A", ("t1",)),
        SendDispatches("A", (item("t2"),)),
        NotifyWatchers(
            (
                changed("t1", S.CANCELLED, "cancel", 3.0),
                changed("t2", S.DISPATCHED, "dispatch", 3.0),
            )
        ),
    ]
    assert sched.agents["A"].in_flight == {"t2"}
    # The agent's late result for the cancelled task is acked and discarded.
    assert sched.handle(report("A", sr("t1", S.SUCCEEDED, result=b"late"), time=4.0)) == [
        SendAcks("A", (("t1", 1),))
    ]


# ---------------------------------------------------------- retry / give up / expiry


def errored(s: Scheduler, tid: str = "t1", time: float = 2.0) -> None:
    running(s, tid)
    s.handle(report("A", sr(tid, S.ERRORED, error=raised()), time=time))
    assert s.tasks[tid].state == S.ERRORED


def test_retry_of_an_errored_task_is_a_fresh_attempt(sched: Scheduler) -> None:
    errored(sched)

    out = sched.handle(cmd("retry", "t1", time=3.0))

    assert out == [
        persist(
            updates=(row("t1", S.DISPATCHED, attempt=2, start_time=1.0),),
            transitions=(
                tr("t1", S.ERRORED, S.WAITING_FOR_EP, "retry", 3.0, attempt=2),
                tr("t1", S.WAITING_FOR_EP, S.DISPATCHED, "dispatch", 3.0, attempt=2),
            ),
        ),
        SendDispatches("A", (item("t1", 2),)),
        NotifyWatchers(
            (
                changed("t1", S.WAITING_FOR_EP, "retry", 3.0, attempt=2),
                changed("t1", S.DISPATCHED, "dispatch", 3.0, attempt=2),
            )
        ),
    ]


def test_give_up_fails_an_errored_task_for_good(sched: Scheduler) -> None:
    errored(sched)
    error = sched.tasks["t1"].error

    out = sched.handle(cmd("give-up", "t1", time=3.0))

    assert out == [
        persist(
            updates=(
                row("t1", S.FAILED, start_time=1.0, settle_time=3.0, error=error, raised_count=1),
            ),
            transitions=(tr("t1", S.ERRORED, S.FAILED, "give-up", 3.0),),
        ),
        NotifyWatchers((changed("t1", S.FAILED, "give-up", 3.0, error=error),)),
    ]
    assert "t1" not in sched.tasks


def test_errored_past_its_retention_is_failed_on_tick() -> None:
    s = make(errored_retention=100.0, heartbeat_timeout=1e9)
    errored(s, time=10.0)
    error = s.tasks["t1"].error

    assert s.handle(Tick(110.0)) == []
    out = s.handle(Tick(110.5))

    assert out == [
        persist(
            updates=(
                row("t1", S.FAILED, start_time=1.0, settle_time=110.5, error=error, raised_count=1),
            ),
            transitions=(tr("t1", S.ERRORED, S.FAILED, "errored-retention", 110.5),),
        ),
        NotifyWatchers((changed("t1", S.FAILED, "errored-retention", 110.5, error=error),)),
    ]
    assert s.tasks == {}


def test_a_restored_errored_task_is_failed_once_past_its_retention() -> None:
    s = make(errored_retention=100.0, heartbeat_timeout=1e9)
    error = raised()
    s.restore([row("t1", S.ERRORED, settle_time=10.0, error=error, raised_count=1)], 50.0)

    assert s.handle(Tick(110.0)) == []
    s.handle(Tick(110.5))

    assert "t1" not in s.tasks


def test_retention_counts_from_the_last_time_a_task_errored() -> None:
    # Its first entry (settled at 2.0) is stale once it is retried and errors again.
    s = make(errored_retention=100.0, heartbeat_timeout=1e9)
    errored(s, time=2.0)
    s.handle(cmd("retry", "t1", time=3.0))
    assert s.tasks["t1"].state == S.DISPATCHED  # to agent A, whose slot it freed
    s.handle(report("A", sr("t1", S.RUNNING, attempt=2), time=4.0))
    s.handle(report("A", sr("t1", S.ERRORED, attempt=2, error=raised()), time=50.0))

    assert s.handle(Tick(120.0)) == []  # past 2.0 + 100, not past 50.0 + 100
    assert s.tasks["t1"].state == S.ERRORED
    s.handle(Tick(150.5))
    assert "t1" not in s.tasks


# ------------------------------------------------------------- duplicate reports


def test_an_attempts_output_is_stored_in_its_step_and_never_held(sched: Scheduler) -> None:
    running(sched, "t1")

    out = sched.handle(
        report("A", sr("t1", S.SUCCEEDED, result=b"1", stdout="hi\n", stderr="careful\n"), time=2.0)
    )

    assert out == [
        persist(
            updates=(row("t1", S.SUCCEEDED, start_time=1.0, settle_time=2.0, result=b"1"),),
            transitions=(tr("t1", S.RUNNING, S.SUCCEEDED, "returned", 2.0),),
            outputs=(OutputRow("t1", "hi\n", "careful\n"),),
        ),
        SendAcks("A", (("t1", 1),)),
        NotifyWatchers((changed("t1", S.SUCCEEDED, "returned", 2.0, result=b"1"),)),
    ]
    assert "t1" not in sched.tasks


def test_a_first_attempt_that_wrote_nothing_stores_no_output(sched: Scheduler) -> None:
    running(sched, "t1", "t2")
    out = sched.handle(
        report("A", sr("t1", S.SUCCEEDED, result=b"1"), sr("t2", S.ERRORED, error=raised()), time=2)
    )
    assert out[0].batch.outputs == ()  # type: ignore[union-attr]


def test_each_attempts_output_replaces_the_last_one_even_when_empty(sched: Scheduler) -> None:
    """A system-failed attempt's output stays with the task until the next attempt ends."""
    sched.handle(submit(spec("t1", max_system_retries=1)), connect("A"))
    died = system_error(FAILURE_WORKER_DIED)

    out = sched.handle(report("A", sr("t1", S.ERRORED, 1, error=died, stdout="so far\n"), time=1))
    assert out[0].batch.outputs == (OutputRow("t1", "so far\n", ""),)  # type: ignore[union-attr]
    assert sched.tasks["t1"].state == S.DISPATCHED and sched.tasks["t1"].attempt == 2

    out = sched.handle(report("A", sr("t1", S.SUCCEEDED, 2, result=b"ok"), time=2))
    assert out[0].batch.outputs == (OutputRow("t1", "", ""),)  # type: ignore[union-attr]


def test_the_output_of_a_discarded_report_is_not_stored(sched: Scheduler) -> None:
    running(sched, "t1")
    sched.handle(report("A", sr("t1", S.SUCCEEDED, result=b"first", stdout="first\n"), time=2))
    out = sched.handle(
        report("A", sr("t1", S.SUCCEEDED, result=b"again", stdout="again\n"), time=3)
    )
    assert out == [SendAcks("A", (("t1", 1),))]


def test_late_terminal_report_of_an_earlier_attempt_is_acked_and_discarded(
    sched: Scheduler,
) -> None:
    sched.handle(submit(spec("t1", max_retries=1)), connect("A"))
    sched.handle(
        report("A", sr("t1", S.ERRORED, 1, error=raised()), time=1.0)
    )  # attempt 2 dispatched
    sched.handle(report("A", sr("t1", S.RUNNING, 2), time=2.0))
    before = state_of(sched)

    out = sched.handle(report("A", sr("t1", S.SUCCEEDED, 1, result=b"old"), time=3.0))

    assert out == [SendAcks("A", (("t1", 1),))]
    assert state_of(sched) == before


def test_first_terminal_report_wins_and_the_duplicate_is_acked(sched: Scheduler) -> None:
    running(sched, "t1")

    out = sched.handle(
        report(
            "A",
            sr("t1", S.SUCCEEDED, result=b"first"),
            sr("t1", S.ERRORED, error=raised()),
            time=2.0,
        )
    )

    assert out == [
        persist(
            updates=(row("t1", S.SUCCEEDED, start_time=1.0, settle_time=2.0, result=b"first"),),
            transitions=(tr("t1", S.RUNNING, S.SUCCEEDED, "returned", 2.0),),
        ),
        SendAcks("A", (("t1", 1), ("t1", 1))),
        NotifyWatchers((changed("t1", S.SUCCEEDED, "returned", 2.0, result=b"first"),)),
    ]
    # And once more, later: still only an ack.
    assert sched.handle(report("A", sr("t1", S.SUCCEEDED, result=b"again"), time=3.0)) == [
        SendAcks("A", (("t1", 1),))
    ]


def test_duplicate_success_of_an_errored_task_does_not_change_its_outcome(sched: Scheduler) -> None:
    errored(sched)
    before = state_of(sched)

    out = sched.handle(report("A", sr("t1", S.SUCCEEDED, result=b"late"), time=3.0))

    assert out == [SendAcks("A", (("t1", 1),))]
    assert state_of(sched) == before


# ------------------------------------------------------------------------ restore


def restored(s: Scheduler) -> list[Any]:
    return s.restore(
        [
            row("t1", S.RUNNING, start_time=1.0),
            row("t2", S.WAITING_FOR_EP),
            row("t3", S.HELD, held_from=S.WAITING_FOR_EP),
        ],
        time=50.0,
    )


def test_restore_keeps_tasks_that_were_on_an_agent_for_their_agent(sched: Scheduler) -> None:
    out = restored(sched)

    assert out == [
        persist(
            updates=(row("t1", S.WAITING_FOR_EP, start_time=1.0, interrupted=True),),
            transitions=(tr("t1", S.RUNNING, S.WAITING_FOR_EP, "server-restarted", 50.0),),
        ),
        NotifyWatchers((TaskChanged("t1", "", S.WAITING_FOR_EP, 1, "server-restarted", 50.0),)),
    ]
    assert sched.queued(EP) == 1  # t2; t1 waits for its agent
    assert sched.waiting_reason("t1") == "waiting for its agent to reconnect after a server restart"
    assert sched.waiting_reason("t3") == "held: release it to run"

    # The agent that still holds t1 reclaims it without a new attempt.
    out = sched.handle(connect("A", capacity=2, held=(HeldTask("t1", 1, S.RUNNING),), time=51.0))

    assert out[0].batch.transitions == (  # type: ignore[union-attr]
        tr("t1", S.WAITING_FOR_EP, S.RUNNING, "agent-reconnected", 51.0),
        tr("t2", S.WAITING_FOR_EP, S.DISPATCHED, "dispatch", 51.0),
    )
    assert [i for i in out if isinstance(i, SendDispatches)] == [SendDispatches("A", (item("t2"),))]


def test_restored_task_nobody_reclaims_runs_again_after_the_heartbeat_timeout() -> None:
    s = make(heartbeat_timeout=10.0)
    restored(s)
    s.handle(connect("B", capacity=2, time=51.0))  # takes t2, not t1
    assert s.tasks["t1"].state == S.WAITING_FOR_EP and s.tasks["t1"].agent_id is None

    assert s.handle(Tick(59.9)) == []
    out = s.handle(Tick(60.0))

    assert out == [
        persist(
            updates=(row("t1", S.DISPATCHED, attempt=2, start_time=1.0, system_failures=1),),
            transitions=(tr("t1", S.WAITING_FOR_EP, S.DISPATCHED, "dispatch", 60.0, attempt=2),),
        ),
        SendDispatches("B", (item("t1", 2),)),
        NotifyWatchers((TaskChanged("t1", "", S.DISPATCHED, 2, "dispatch", 60.0),)),
    ]


def test_result_of_a_restored_task_resent_after_the_hello_settles_it(sched: Scheduler) -> None:
    restored(sched)
    sched.handle(connect("A", capacity=0, time=51.0))  # t1 finished while the server was down

    out = sched.handle(report("A", sr("t1", S.SUCCEEDED, 1, result=b"r"), time=52.0))

    assert out == [
        persist(
            updates=(row("t1", S.SUCCEEDED, start_time=1.0, settle_time=52.0, result=b"r"),),
            transitions=(
                tr("t1", S.WAITING_FOR_EP, S.RUNNING, "agent-reconnected", 52.0),
                tr("t1", S.RUNNING, S.SUCCEEDED, "returned", 52.0),
            ),
        ),
        SendAcks("A", (("t1", 1),)),
        NotifyWatchers(
            (
                TaskChanged("t1", "", S.RUNNING, 1, "agent-reconnected", 52.0),
                TaskChanged("t1", "", S.SUCCEEDED, 1, "returned", 52.0, b"r"),
            )
        ),
    ]
    assert "t1" not in sched.tasks
    assert not any(t.standing is Standing.ORPHANED for t in sched.tasks.values())


# ------------------------------------- regressions: bugs these tests found first


def test_task_lost_more_often_than_max_system_retries_is_errored(sched: Scheduler) -> None:
    sched.handle(submit(spec("t1", max_system_retries=0)), connect("A"))
    sched.handle(AgentLost("A", 1.0))

    out = sched.handle(connect("B", time=2.0))

    task_row = next(
        r for i in out if isinstance(i, Persist) for r in i.batch.task_updates if r.task_id == "t1"
    )
    assert task_row.state == S.ERRORED
    assert task_row.error is not None and task_row.error.failure_kind == FAILURE_ENDPOINT_LOST
    assert "max_system_retries is 0" in task_row.error.message
    assert not [i for i in out if isinstance(i, SendDispatches)]
    assert sched.agents["B"].in_flight == set()


def test_held_and_released_lost_task_is_dispatched_as_a_new_attempt(sched: Scheduler) -> None:
    running(sched, "t1")
    sched.handle(AgentLost("A", 2.0))
    sched.handle(cmd("hold", "t1", time=3.0))
    sched.handle(cmd("release", "t1", time=4.0))

    out = sched.handle(connect("B", time=5.0))

    # Attempt 1 may still be running on the lost agent: this is another attempt.
    assert [i for i in out if isinstance(i, SendDispatches)] == [
        SendDispatches("B", (item("t1", 2),))
    ]
    assert sched.tasks["t1"].system_failures == 1


def test_result_of_the_current_attempt_resent_after_a_reconnect_settles_the_task(
    sched: Scheduler,
) -> None:
    # A runs t1; the stream drops; t1 finishes on A meanwhile. On reconnect A no longer
    # holds t1 (a higher-priority task takes its only slot) and resends t1's result.
    running(sched, "t1")
    sched.handle(submit(spec("urgent", priority=PRIORITY_HIGH), time=1.5))
    sched.handle(AgentLost("A", 2.0))
    sched.handle(connect("A", time=3.0))
    assert sched.tasks["urgent"].agent_id == "A"
    assert sched.tasks["t1"].state == S.WAITING_FOR_EP and sched.tasks["t1"].attempt == 1

    out = sched.handle(report("A", sr("t1", S.SUCCEEDED, 1, result=b"42"), time=4.0))

    # The first terminal report of the current attempt wins: it is not run a second time.
    assert SendAcks("A", (("t1", 1),)) in out
    assert "t1" not in sched.tasks
    assert [r for i in out if isinstance(i, Persist) for r in i.batch.task_updates] == [
        row("t1", S.SUCCEEDED, start_time=1.0, settle_time=4.0, result=b"42")
    ]


def test_held_and_released_orphan_after_a_restart_is_dispatched_as_a_new_attempt(
    sched: Scheduler,
) -> None:
    restored(sched)  # t1 was RUNNING (attempt 1) on an agent that may still run it
    sched.handle(cmd("hold", "t1", time=51.0))
    sched.handle(cmd("release", "t1", time=52.0))

    out = sched.handle(connect("B", capacity=2, time=53.0))

    assert [i for i in out if isinstance(i, SendDispatches)] == [
        SendDispatches("B", (item("t2"), item("t1", 2)))
    ]


def test_lost_task_is_still_a_new_attempt_after_a_server_restart(sched: Scheduler) -> None:
    running(sched, "t1")
    sched.handle(AgentLost("A", 2.0))  # attempt 1 may still run on A
    rows = [t.snapshot() for t in sched.tasks.values()]

    restarted = make()
    restarted.restore(rows, time=3.0)
    # A may still hold it: the restarted server waits one heartbeat timeout for A...
    out = restarted.handle(connect("B", time=4.0))
    assert [i for i in out if isinstance(i, SendDispatches)] == []
    assert restarted.waiting_reason("t1").startswith("waiting for its agent to reconnect")
    # ...then runs it elsewhere as a new attempt.
    out = restarted.handle(Tick(3.0 + restarted.config.heartbeat_timeout))
    assert [i for i in out if isinstance(i, SendDispatches)] == [
        SendDispatches("B", (item("t1", 2),))
    ]


def test_the_queue_does_not_keep_dead_entries_without_bound(sched: Scheduler) -> None:
    # Submit and cancel many tasks on an endpoint nobody serves: lazy deletion must not
    # leave the heap growing.
    for i in range(30):
        tids = [f"t{i}-{j}" for j in range(200)]
        sched.handle(submit(*tids, time=float(i)))
        sched.handle(cmd("cancel", *tids, time=float(i)))
    queue = sched.queues[EP]
    assert len(queue) == 0
    assert len(queue.heap) <= 1024 + 200


# -------------------------------------------------------------------- endpoint queue


def _copy(text: str) -> str:
    """An equal string that is another object, as each decoded request or row holds."""
    return (text + "!")[:-1]


def _queued(tid: str, priority: int, submit_time: float) -> TaskRecord:
    return TaskRecord(tid, EP, FN, b"", OWNER, S.WAITING_FOR_EP, submit_time, priority=priority)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["push", "push", "push", "discard", "pop"]),
            st.integers(0, 7),
            st.integers(1, 3),
            st.integers(0, 3),
        ),
        max_size=80,
    )
)
def test_the_queue_pops_as_one_sorted_heap_would(ops: list[tuple[str, int, int, int]]) -> None:
    # The queue keeps runs of tasks, not an entry per task: whatever the order of pushes,
    # discards and pops, it must pop exactly what (priority, submit_time, queueing
    # order) says, as the heap of one entry per task it replaced did.
    queue = EndpointQueue()
    model: dict[str, tuple[int, float, int]] = {}
    seq = 0
    for op, n, priority, when in ops:
        tid = f"t{n}"
        if op == "push" and tid not in model:
            seq += 1
            model[tid] = (priority, float(when), seq)
            queue.push(_queued(tid, priority, float(when)))
        elif op == "discard":
            model.pop(tid, None)
            queue.discard(tid)
        elif op == "pop":
            expected = min(model, key=model.__getitem__) if model else None
            assert queue.pop() == expected
            model.pop(expected or "", None)
        assert len(queue) == len(model) and all(t in queue for t in model)
    drained = []
    while (tid := queue.pop()) is not None:
        drained.append(tid)
    assert drained == sorted(model, key=model.__getitem__)


def test_a_long_queue_fed_while_it_drains_does_not_grow() -> None:
    # Tasks submitted one after another share one run; popping its front while new ones
    # join must not keep the popped part alive.
    queue = EndpointQueue()
    for i in range(20_000):
        queue.push(_queued(f"t{i}", 2, float(i)))
        if i >= 100:
            assert queue.pop() == f"t{i - 100}"
    assert len(queue) == 100 and len(queue.heap) == 1
    (run,) = (entry[3] for entry in queue.heap)
    assert len(run.tasks) <= 2 * 1024 + 100


def test_submitted_tasks_share_their_function_id(sched: Scheduler) -> None:
    # A decoded request holds a copy of the id per task: the scheduler keeps one.
    first, second = _copy(FN), _copy(FN)
    assert first is not second
    sched.handle(
        submit(
            NewTask("t1", first, b"", PRIORITY_NORMAL, 0, 3, 0.0),
            NewTask("t2", second, b"", PRIORITY_NORMAL, 0, 3, 0.0),
        )
    )
    assert sched.tasks["t1"].function_id is sched.tasks["t2"].function_id


def test_restored_tasks_share_the_strings_they_have_in_common() -> None:
    # Each stored row comes with its own copies; a million restored tasks must not keep
    # three strings each that a handful would do.
    rows = [
        row(
            tid,
            S.WAITING_FOR_EP,
            endpoint_id=_copy(EP),
            function_id=_copy(FN),
        )
        for tid in ("t1", "t2")
    ]
    assert rows[0].endpoint_id is not rows[1].endpoint_id
    s = make()
    s.restore(rows, 1.0)
    t1, t2 = s.tasks["t1"], s.tasks["t2"]
    assert t1.endpoint_id is t2.endpoint_id and t1.function_id is t2.function_id
    assert t1.owner is t2.owner
