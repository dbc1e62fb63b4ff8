"""The transition table: every move a task's state may make, and what each move does.

A row is keyed ``(start, finish)``; ``start`` is None for the two submission rows. Each row
names its *action*, a function over the task's own fields (times, result, error,
``held_from``, failure counters), and its *effects* on what lies outside the task (the
endpoint queue, the agent's in-flight set, a cancel sent to the agent, the attempt
number, the task's standing). ``Scheduler._transition`` runs a row generically; a pair
not in the table raises :class:`InvalidTransition`. Nothing else assigns a task's state.

A task's :class:`Standing` says where a waiting task's last attempt stands. Keeping it
beside the state (not in a set of ids on the scheduler) means queue membership follows
from the task alone: a task is queued exactly when it is WAITING_FOR_EP and not ORPHANED.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import NamedTuple

from heartline._states import ON_AGENT_STATES, PENDING_STATES, SkipReason, TaskState
from heartline.server._model import ErrorInfo, Standing, States, TaskRecord

S = States

__all__ = [
    "COMMANDS",
    "COMMAND_WORDS",
    "NO_ACTION",
    "TRANSITIONS",
    "Effect",
    "InputsMoved",
    "InvalidTransition",
    "Row",
    "SchedulerError",
    "Standing",
    "UnknownGroup",
    "UnknownTasks",
    "finish_of_command",
]


class SchedulerError(Exception):
    """Base of the errors the scheduler refuses a command with."""


class InvalidTransition(SchedulerError):
    """An event that the transition table does not allow; nothing was changed."""

    def __init__(self, refusals: list[tuple[str, TaskState, str]]) -> None:
        self.refusals = refusals
        shown = "; ".join(
            f"task {tid} is {state.value}, so it cannot be {event}"
            for tid, state, event in refusals[:5]
        )
        more = f" (and {len(refusals) - 5} more)" if len(refusals) > 5 else ""
        super().__init__(shown + more)


class UnknownTasks(SchedulerError):
    """Some tasks are not in the scheduler (settled long ago, or never existed)."""

    def __init__(self, task_ids: list[str]) -> None:
        self.task_ids = task_ids
        super().__init__(f"unknown tasks: {', '.join(task_ids[:5])}")


class UnknownGroup(SchedulerError):
    """The scheduler does not hold this group (it settled, or never existed)."""

    def __init__(self, group_id: str) -> None:
        self.group_id = group_id
        super().__init__(f"unknown group {group_id}")


class InputsMoved(SchedulerError):
    """Input tasks the caller did not read from the store are no longer held (they
    settled since it looked): read these from the store and submit again."""

    def __init__(self, task_ids: list[str]) -> None:
        self.task_ids = task_ids
        super().__init__(f"input tasks settled meanwhile: {', '.join(task_ids[:5])}")


class Effect(enum.Enum):
    """What a row does outside the task's own fields (``Scheduler._transition`` runs them)."""

    LEAVE_QUEUE = enum.auto()
    """The task leaves its endpoint's queue."""
    ENTER_QUEUE = enum.auto()
    """The task joins its endpoint's queue, unless it is ORPHANED (waiting for a reclaim)."""
    BIND_AGENT = enum.auto()
    """The task joins the given agent's in-flight set (dispatch, reclaim)."""
    UNBIND_AGENT = enum.auto()
    """The task leaves its agent's in-flight set; the agent's credit is free again."""
    CANCEL_ON_AGENT = enum.auto()
    """Tell the agent that held the task to drop it."""
    NEXT_ATTEMPT = enum.auto()
    """The attempt before is over: the task's next run is a new attempt. Leaving an agent
    (or ERRORED) that is so unless the caller says the attempt may still run (LOST,
    ORPHANED); leaving the queue it is so only for a LOST task (its lost attempt is
    written off), since a FRESH task's number moved on when its last attempt ended."""
    WRITE_OFF_LOST = enum.auto()
    """A LOST task leaving the queue (not reclaimed) counts its lost attempt as a
    system failure."""
    KEEP_STANDING = enum.auto()
    """The task keeps its standing (held and released tasks); other rows make it FRESH.
    An ORPHANED task leaving the queue becomes LOST: only the queue's waiting room holds
    orphans."""


Action = Callable[
    [TaskRecord, float, "bytes | None", "ErrorInfo | None", "SkipReason | None"], None
]


class Row(NamedTuple):
    """One row of the table; the effects are spelled out as booleans, in a tuple the
    scheduler unpacks at once (this runs for every transition)."""

    action: Action
    leave_queue: bool
    enter_queue: bool
    bind_agent: bool
    unbind_agent: bool
    cancel_on_agent: bool
    next_attempt: bool
    write_off_lost: bool
    keep_standing: bool


def _row(action: Action, *effects: Effect) -> Row:
    e = set(effects)
    return Row(
        action,
        Effect.LEAVE_QUEUE in e,
        Effect.ENTER_QUEUE in e,
        Effect.BIND_AGENT in e,
        Effect.UNBIND_AGENT in e,
        Effect.CANCEL_ON_AGENT in e,
        Effect.NEXT_ATTEMPT in e,
        Effect.WRITE_OFF_LOST in e,
        Effect.KEEP_STANDING in e,
    )


# ------------------------------------------------------------------------- actions
# Each takes (task, now, result, error, skip): the event's result, error or skip reason,
# None if it has none.


def _noop(
    task: TaskRecord,
    now: float,
    result: bytes | None,
    error: ErrorInfo | None,
    skip: SkipReason | None,
) -> None:
    pass


NO_ACTION: Action = _noop
"""The action of rows that change none of the task's fields (the scheduler skips the call)."""


def _submit_held(
    task: TaskRecord,
    now: float,
    result: bytes | None,
    error: ErrorInfo | None,
    skip: SkipReason | None,
) -> None:
    # A task that would wait for its parents was made with held_from WAITING_FOR_DEPS.
    if task.held_from is None:
        task.held_from = S.WAITING_FOR_EP


def _hold(
    task: TaskRecord,
    now: float,
    result: bytes | None,
    error: ErrorInfo | None,
    skip: SkipReason | None,
) -> None:
    task.held_from = task.state


def _release(
    task: TaskRecord,
    now: float,
    result: bytes | None,
    error: ErrorInfo | None,
    skip: SkipReason | None,
) -> None:
    task.held_from = None


def _start(
    task: TaskRecord,
    now: float,
    result: bytes | None,
    error: ErrorInfo | None,
    skip: SkipReason | None,
) -> None:
    if task.start_time is None:
        task.start_time = now


def _settle(
    task: TaskRecord,
    now: float,
    result: bytes | None,
    error: ErrorInfo | None,
    skip: SkipReason | None,
) -> None:
    task.settle_time = now
    task.held_from = None
    if error is not None:
        task.error = error


def _succeed(
    task: TaskRecord,
    now: float,
    result: bytes | None,
    error: ErrorInfo | None,
    skip: SkipReason | None,
) -> None:
    task.settle_time = now
    task.held_from = None
    task.result = result
    task.error = None  # an error of an earlier attempt is in the history, not the outcome


def _skip(
    task: TaskRecord,
    now: float,
    result: bytes | None,
    error: ErrorInfo | None,
    skip: SkipReason | None,
) -> None:
    assert skip is not None, f"{task.task_id} skipped without a reason"
    task.settle_time = now
    task.held_from = None
    task.skip_reason = skip


def _requeue(
    task: TaskRecord,
    now: float,
    result: bytes | None,
    error: ErrorInfo | None,
    skip: SkipReason | None,
) -> None:
    task.settle_time = None
    if error is not None:
        task.error = error  # why the attempt ended; kept until the task settles


def _retry(
    task: TaskRecord,
    now: float,
    result: bytes | None,
    error: ErrorInfo | None,
    skip: SkipReason | None,
) -> None:
    """An owner's retry of an ERRORED task: fresh retry budgets (the attempt moves on
    by the row's NEXT_ATTEMPT)."""
    task.settle_time = None
    task.result = None
    task.error = None
    task.raised_count = 0
    task.system_failures = 0


# ---------------------------------------------------------------------------- table

E = Effect
_ON_AGENT = (S.DISPATCHED, S.WAITING_FOR_NODES, S.WAITING_FOR_LAUNCH, S.RUNNING)
_QUEUE_TO_AGENT = (E.LEAVE_QUEUE, E.BIND_AGENT)

TRANSITIONS: dict[tuple[TaskState | None, TaskState], Row] = {
    # submission
    (None, S.WAITING_FOR_EP): _row(_noop, E.ENTER_QUEUE),
    (None, S.WAITING_FOR_DEPS): _row(_noop),
    (None, S.HELD): _row(_submit_held),
    # a task whose parents settled: it runs, or it is skipped; a group that stops skips
    # what has not started
    (S.WAITING_FOR_DEPS, S.WAITING_FOR_EP): _row(_noop, E.ENTER_QUEUE),
    (S.WAITING_FOR_DEPS, S.SKIPPED): _row(_skip),
    (S.WAITING_FOR_EP, S.SKIPPED): _row(_skip, E.LEAVE_QUEUE),
    (S.HELD, S.SKIPPED): _row(_skip),
    # queue controls
    (S.WAITING_FOR_EP, S.HELD): _row(_hold, E.LEAVE_QUEUE, E.KEEP_STANDING),
    (S.WAITING_FOR_DEPS, S.HELD): _row(_hold, E.KEEP_STANDING),
    (S.HELD, S.WAITING_FOR_EP): _row(_release, E.ENTER_QUEUE, E.KEEP_STANDING),
    (S.HELD, S.WAITING_FOR_DEPS): _row(_release, E.KEEP_STANDING),
    # dispatch; and an agent that comes back reclaiming what it holds (then the caller
    # says the attempt is current again, and nothing is written off)
    (S.WAITING_FOR_EP, S.DISPATCHED): _row(
        _noop, *_QUEUE_TO_AGENT, E.WRITE_OFF_LOST, E.NEXT_ATTEMPT
    ),
    (S.WAITING_FOR_EP, S.WAITING_FOR_NODES): _row(_noop, *_QUEUE_TO_AGENT),
    (S.WAITING_FOR_EP, S.WAITING_FOR_LAUNCH): _row(_noop, *_QUEUE_TO_AGENT),
    (S.WAITING_FOR_EP, S.RUNNING): _row(_start, *_QUEUE_TO_AGENT),
    # progress on the agent (a batch may skip a step: only forward moves are allowed)
    (S.DISPATCHED, S.WAITING_FOR_NODES): _row(_noop),
    (S.DISPATCHED, S.WAITING_FOR_LAUNCH): _row(_noop),
    (S.DISPATCHED, S.RUNNING): _row(_start),
    (S.WAITING_FOR_NODES, S.WAITING_FOR_LAUNCH): _row(_noop),
    (S.WAITING_FOR_NODES, S.RUNNING): _row(_start),
    (S.WAITING_FOR_LAUNCH, S.RUNNING): _row(_start),
    # outcomes of an attempt; a failure with retries left, or a lost agent, re-queues
    **{(s, S.SUCCEEDED): _row(_succeed, E.UNBIND_AGENT) for s in _ON_AGENT},
    **{(s, S.ERRORED): _row(_settle, E.UNBIND_AGENT) for s in _ON_AGENT},
    **{
        (s, S.WAITING_FOR_EP): _row(_requeue, E.UNBIND_AGENT, E.ENTER_QUEUE, E.NEXT_ATTEMPT)
        for s in _ON_AGENT
    },
    # a task whose agents were lost more often than max_system_retries allows
    (S.WAITING_FOR_EP, S.ERRORED): _row(_settle, E.LEAVE_QUEUE, E.WRITE_OFF_LOST),
    # cancel: any pending state
    (S.WAITING_FOR_DEPS, S.CANCELLED): _row(_settle),
    (S.WAITING_FOR_EP, S.CANCELLED): _row(_settle, E.LEAVE_QUEUE),
    (S.HELD, S.CANCELLED): _row(_settle),
    **{(s, S.CANCELLED): _row(_settle, E.UNBIND_AGENT, E.CANCEL_ON_AGENT) for s in _ON_AGENT},
    # after an error
    (S.ERRORED, S.WAITING_FOR_EP): _row(_retry, E.ENTER_QUEUE, E.NEXT_ATTEMPT),
    (S.ERRORED, S.FAILED): _row(_settle),
}
assert all((s, S.CANCELLED) in TRANSITIONS for s in PENDING_STATES), "all pending can be cancelled"
assert all(
    row.unbind_agent == (start in ON_AGENT_STATES and finish not in ON_AGENT_STATES)
    and row.bind_agent == (start not in ON_AGENT_STATES and finish in ON_AGENT_STATES)
    and row.leave_queue == (start is S.WAITING_FOR_EP)
    and row.enter_queue == (finish is S.WAITING_FOR_EP)
    for (start, finish), row in TRANSITIONS.items()
), "agent and queue effects follow the states"

# --------------------------------------------------------------------- commands

_COMMANDS: dict[str, Callable[[TaskRecord], TaskState | None]] = {
    "cancel": lambda t: S.CANCELLED,
    "hold": lambda t: S.HELD,
    "release": lambda t: t.held_from if t.state == S.HELD else None,
    # A group task's dependants were decided when it errored: its group has moved on.
    "retry": lambda t: S.WAITING_FOR_EP if t.state == S.ERRORED and not t.group_id else None,
    "give-up": lambda t: S.FAILED,
}
COMMAND_WORDS = {
    "cancel": "cancelled",
    "hold": "held",
    "release": "released",
    "retry": "retried",
    "give-up": "given up",
}
COMMANDS = frozenset(_COMMANDS)


def finish_of_command(command: str, task: TaskRecord) -> TaskState | None:
    """The state an owner's command moves the task to, or None if the table refuses it."""
    finish = _COMMANDS[command](task)
    if finish is None or (task.state, finish) not in TRANSITIONS:
        return None
    return finish
