"""Helpers for the pure scheduler tests: events, expected rows and instructions.

Every scheduler made by :func:`make` runs with ``validate=True`` (each step checks what it
touched), and a test module that uses ``validate_fully_at_the_end`` checks all of it
(``validate(full=True)``) at the end of each test.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from heartline.server._events import (
    AgentConnected,
    AgentReported,
    DispatchItem,
    HeldTask,
    NewTask,
    Persist,
    StatusReport,
    TaskChanged,
    TasksCommanded,
    TasksSubmitted,
)
from heartline.server._model import (
    PRIORITY_NORMAL,
    ErrorInfo,
    OutputRow,
    TaskRow,
    TransitionRow,
    WriteBatch,
)
from heartline.server._scheduler import Scheduler, SchedulerConfig

from heartline._states import TaskState

S = TaskState
EP = "ep-1"
OTHER_EP = "ep-2"
OWNER = "alice"
SESSION = "session-1"
FN = "fn-1"

# ------------------------------------------------------------------------ helpers


_made: list[Scheduler] = []


def make(**config: Any) -> Scheduler:
    s = Scheduler(SchedulerConfig(validate=True, **config))
    _made.append(s)
    return s


def validate_made() -> None:
    """Check every scheduler :func:`make` made, fully; then forget them (conftest runs
    this at the end of every test)."""
    try:
        for s in _made:
            s.validate(full=True)
    finally:
        _made.clear()


def args(tid: str) -> bytes:
    return f"args-{tid}".encode()


def spec(
    tid: str,
    *,
    priority: int = PRIORITY_NORMAL,
    max_retries: int = 0,
    max_system_retries: int = 3,
    held: bool = False,
) -> NewTask:
    return NewTask(tid, FN, args(tid), priority, max_retries, max_system_retries, 0.0, held)


def submit(*tasks: str | NewTask, time: float = 0.0, endpoint: str = EP) -> TasksSubmitted:
    specs = tuple(spec(t) if isinstance(t, str) else t for t in tasks)
    return TasksSubmitted(endpoint, OWNER, specs, SESSION, time)


def connect(
    agent: str,
    *,
    capacity: int = 1,
    prefetch: int = 0,
    held: tuple[HeldTask, ...] = (),
    time: float = 0.0,
    endpoint: str = EP,
) -> AgentConnected:
    return AgentConnected(agent, endpoint, capacity, prefetch, held, time)


def sr(
    tid: str,
    state: TaskState,
    attempt: int = 1,
    *,
    result: bytes | None = None,
    error: ErrorInfo | None = None,
    stdout: str = "",
    stderr: str = "",
) -> StatusReport:
    return StatusReport(tid, attempt, state, result, error, stdout, stderr)


def report(agent: str, *reports: StatusReport, time: float) -> AgentReported:
    return AgentReported(agent, reports, time)


def cmd(command: str, *tids: str, time: float) -> TasksCommanded:
    return TasksCommanded(command, tids, time)


def row(tid: str, state: TaskState, **overrides: Any) -> TaskRow:
    fields: dict[str, Any] = dict(
        task_id=tid,
        endpoint_id=EP,
        function_id=FN,
        args=args(tid),
        owner=OWNER,
        state=state,
        submit_time=0.0,
        attempt=1,
        priority=PRIORITY_NORMAL,
        max_retries=0,
        max_system_retries=3,
        walltime=0.0,
        start_time=None,
        settle_time=None,
        held_from=None,
        result=None,
        error=None,
        raised_count=0,
        system_failures=0,
        resubmitted_from="",
        group_id="",
        payload_purged=False,
    )
    fields.update(overrides)
    return TaskRow(**fields)


def tr(
    tid: str, start: TaskState | None, finish: TaskState, cause: str, time: float, attempt: int = 1
) -> TransitionRow:
    return TransitionRow(tid, start, finish, cause, time, attempt)


def changed(
    tid: str,
    state: TaskState,
    cause: str,
    time: float,
    attempt: int = 1,
    *,
    result: bytes | None = None,
    error: ErrorInfo | None = None,
) -> TaskChanged:
    return TaskChanged(tid, SESSION, state, attempt, cause, time, result, error)


def persist(
    *,
    new: tuple[TaskRow, ...] = (),
    updates: tuple[TaskRow, ...] = (),
    transitions: tuple[TransitionRow, ...] = (),
    outputs: tuple[OutputRow, ...] = (),
) -> Persist:
    return Persist(
        WriteBatch(new_tasks=new, task_updates=updates, transitions=transitions, outputs=outputs)
    )


def item(tid: str, attempt: int = 1) -> DispatchItem:
    return DispatchItem(tid, attempt, FN, args(tid), 0.0)


def raised(type_name: str = "ValueError", message: str = "bad input") -> ErrorInfo:
    return ErrorInfo(type_name, message, "Traceback (most recent call last): ...")


def system_error(kind: int, message: str = "the worker process died") -> ErrorInfo:
    return ErrorInfo("heartline.WorkerDied", message, "", kind)


def state_of(s: Scheduler) -> tuple[Any, ...]:
    """Everything the scheduler holds, deep-copied, for a before/after comparison."""
    return (
        {tid: (dataclasses.asdict(t), t.agent_id, t.session_id) for tid, t in s.tasks.items()},
        {aid: dataclasses.asdict(a) for aid, a in s.agents.items()},
        {ep: dict(q.live) for ep, q in s.queues.items() if q.live},
        s.orphans_until,
        s.transitions_total,
    )


def running(
    s: Scheduler, *tids: str, agent: str = "A", capacity: int | None = None, time: float = 1.0
) -> None:
    """Submit tids, connect an agent with room for all, and bring them to RUNNING."""
    s.handle(submit(*tids, time=0.0))
    s.handle(connect(agent, capacity=capacity or len(tids), time=time))
    s.handle(report(agent, *(sr(t, S.RUNNING) for t in tids), time=time))
    assert all(s.tasks[t].state == S.RUNNING for t in tids)
