"""Rows to tuples and back: the half of the stores that knows no SQL dialect.

Both stores (server/_store.py's SQLite one, server/_pgstore.py's PostgreSQL one, its SQL
in server/_pgsql.py) keep the same tables and columns, so they share how a row becomes the
parameters of a statement, how a selected row becomes a TaskRow, TaskRecord or group, the
form of a task's history, and the bookkeeping that coalesces a commit group's updates
(``Updates``). Selects list their columns in the order given here (``TASK_COLUMNS``,
``GROUP_COLUMNS``), so the readers below take them by position. These run for every row a
store writes or reads: keep them free of per-row work a store does not need.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from heartline._states import PENDING_STATES, CancelMode, GroupStatus, SkipReason, TaskState
from heartline.server._model import (
    ErrorInfo,
    GroupMember,
    GroupRow,
    GroupStateRow,
    Standing,
    TaskRecord,
    TaskRow,
    TransitionRow,
    WhenRow,
    WriteBatch,
)

__all__ = [
    "GROUP_COLUMNS",
    "PLAIN",
    "PLAIN_COLUMNS",
    "SKIP_OF",
    "STATE_OF",
    "TASK_COLUMNS",
    "UNSETTLED",
    "Changes",
    "Records",
    "Updates",
    "changes",
    "group_params",
    "group_rows",
    "histories",
    "history_rows",
    "members_json",
    "task_params",
    "task_row",
]

TASK_COLUMNS = (
    "task_id, endpoint_id, function_id, owner, state, submit_time, attempt, priority,"
    " max_retries, max_system_retries, walltime, start_time, settle_time, held_from, result,"
    " error_type, error_message, error_traceback, error_kind, raised_count, system_failures,"
    " resubmitted_from, group_id, payload_purged, name, inputs, skip_reason, interrupted"
)
"""The columns ``task_params`` fills, in its order (then ``history``). Selects put the
task's args after ``function_id``, then (``get_tasks``) stdout, stderr and the history:
TaskRow's order, which ``task_row`` and ``_task_record`` read by position."""
GROUP_COLUMNS = (
    "group_id, name, owner, endpoint_id, submit_time, fail_fast, timeout, status, pending,"
    " n_succeeded, n_failed, n_skipped, n_cancelled, n_none, cancel_mode, timed_out,"
    " settle_time"
)
"""GroupRow's columns, then GroupStateRow's: selects list them (then the members) in this
order, which ``group_rows`` reads by position."""
_HISTORY = "from\x1fto\x1fcause\x1ftime\x1fattempt\x1e"
"""The form of one transition in ``tasks.history``: ASCII unit separators between the
fields and a record separator after each (neither can be in a state; a cause loses
them). ``from`` is empty for the submit transition, ``time`` is the float's repr."""
UNSETTLED = [s.value for s in PENDING_STATES] + [TaskState.ERRORED.value]
"""The states ``load_unsettled`` reads: what a restarted scheduler resumes."""
_NO_ERROR = (None, None, None, None)
# Hot paths: `._value_` is the plain attribute behind the `.value` property (5x faster),
# and a dict lookup is TaskState(value) without the enum machinery.
STATE_OF: dict[str, TaskState] = {s.value: s for s in TaskState}
SKIP_OF: dict[str, SkipReason] = {r.value: r for r in SkipReason}
_GROUP_STATUS_OF: dict[str, GroupStatus] = {g.value: g for g in GroupStatus}
_CANCEL_OF: dict[str, CancelMode] = {m.value: m for m in CancelMode}


def _error_params(e: ErrorInfo | None) -> tuple[Any, ...]:
    return _NO_ERROR if e is None else (e.type_name, e.message, e.traceback, e.failure_kind)


def task_params(r: TaskRow, history: str) -> tuple[Any, ...]:
    return (
        r.task_id, r.endpoint_id, r.function_id, r.owner, r.state._value_,
        r.submit_time, r.attempt, r.priority, r.max_retries, r.max_system_retries, r.walltime,
        r.start_time, r.settle_time, None if r.held_from is None else r.held_from._value_,
        r.result, *_error_params(r.error), r.raised_count, r.system_failures,
        r.resubmitted_from, r.group_id, r.payload_purged, r.name, ",".join(r.inputs),
        None if r.skip_reason is None else r.skip_reason._value_, r.interrupted, history,
    )  # fmt: skip


def _update_params(r: TaskRow) -> tuple[Any, ...]:
    return (
        r.state._value_, r.attempt, r.start_time, r.settle_time,
        None if r.held_from is None else r.held_from._value_, r.result, *_error_params(r.error),
        r.raised_count, r.system_failures, r.payload_purged,
        None if r.skip_reason is None else r.skip_reason._value_, r.interrupted,
    )  # fmt: skip


def histories(transitions: Sequence[TransitionRow]) -> dict[str, str]:
    """task_id -> its transitions of ``transitions`` in ``_HISTORY`` form, in order."""
    parts: dict[str, list[str]] = {}
    for t in transitions:
        cause = t.cause
        if "\x1e" in cause or "\x1f" in cause:
            cause = cause.replace("\x1e", " ").replace("\x1f", " ")
        start = "" if t.from_state is None else t.from_state._value_
        record = f"{start}\x1f{t.to_state._value_}\x1f{cause}\x1f{t.time!r}\x1f{t.attempt}\x1e"
        if (mine := parts.get(t.task_id)) is None:
            parts[t.task_id] = [record]
        else:
            mine.append(record)
    return {task_id: "".join(records) for task_id, records in parts.items()}


def history_rows(task_id: str, history: str) -> list[TransitionRow]:
    """The transitions a ``tasks.history`` value holds, oldest first."""
    rows = []
    for record in history.split("\x1e")[:-1]:
        start, finish, cause, when, attempt = record.split("\x1f")
        rows.append(
            TransitionRow(
                task_id,
                STATE_OF[start] if start else None,
                STATE_OF[finish],
                cause,
                float(when),
                int(attempt),
            )
        )
    return rows


def task_row(c: Sequence[Any]) -> TaskRow:
    return TaskRow(
        task_id=c[0], endpoint_id=c[1], function_id=c[2], args=c[3], owner=c[4],
        state=STATE_OF[c[5]], submit_time=c[6], attempt=c[7], priority=c[8],
        max_retries=c[9], max_system_retries=c[10], walltime=c[11], start_time=c[12],
        settle_time=c[13], held_from=None if c[14] is None else STATE_OF[c[14]], result=c[15],
        error=None if c[16] is None else ErrorInfo(c[16], c[17], c[18], c[19]),
        raised_count=c[20], system_failures=c[21], resubmitted_from=c[22], group_id=c[23],
        payload_purged=bool(c[24]), name=c[25], inputs=tuple(c[26].split(",")) if c[26] else (),
        skip_reason=None if c[27] is None else SKIP_OF[c[27]], interrupted=bool(c[28]),
        stdout=(c[29] or "") if len(c) > 29 else "", stderr=(c[30] or "") if len(c) > 30 else "",
    )  # fmt: skip


_LOST = Standing.LOST
_FRESH = Standing.FRESH
"""Read for every restored task: module constants, not enum class attributes."""


def _task_record(c: Sequence[Any], share: Callable[[Any, Any], Any]) -> TaskRecord:
    """A row of _SELECT_TASKS as the scheduler holds it. The values many tasks repeat
    (endpoint, function, owner, walltime) are shared through ``share`` (a dict's
    setdefault): a database driver makes a new object per row, 250 bytes a task of copies
    otherwise.

    The same column mapping as ``task_row(c).to_record()``, spelled out: going through
    a TaskRow costs a restart 4 s more per million tasks. tests/test_store.py holds the
    two equal for every column, in every store
    (test_load_unsettled_takes_pending_and_errored_only)."""
    return TaskRecord(
        c[0], share(c[1], c[1]), share(c[2], c[2]), c[3], share(c[4], c[4]),
        STATE_OF[c[5]], c[6], c[7], c[8], c[9], c[10], share(c[11], c[11]), c[12], c[13],
        None if c[14] is None else STATE_OF[c[14]], c[15],
        None if c[16] is None else ErrorInfo(c[16], c[17], c[18], c[19]),
        c[20], c[21], c[22], c[23], bool(c[24]),
        _LOST if c[28] else _FRESH,
        c[25], tuple(c[26].split(",")) if c[26] else (),
        None if c[27] is None else SKIP_OF[c[27]],
    )  # fmt: skip


def _plain_record(c: Sequence[Any], share: Callable[[Any, Any], Any]) -> TaskRecord:
    """A row of ``PLAIN_COLUMNS`` and the args, of a task ``PLAIN`` holds for, as the
    scheduler holds it: the same as ``_task_record`` of its whole row
    (tests/test_store.py holds the two equal)."""
    return TaskRecord(
        c[0], share(c[1], c[1]), share(c[2], c[2]), c[14], share(c[3], c[3]),
        STATE_OF[c[4]], c[5], c[6], c[7], c[8], c[9], share(c[10], c[10]), None, None,
        None, None, None, c[11], c[12], "", "", False, _LOST if c[13] else _FRESH,
    )  # fmt: skip


def group_params(g: GroupRow) -> tuple[Any, ...]:
    return (g.group_id, g.name, g.owner, g.endpoint_id, g.submit_time, g.fail_fast, g.timeout)


def members_json(g: GroupRow) -> tuple[str, str]:
    # NamedTuples encode as JSON arrays in their field order (see the schema).
    return (g.group_id, json.dumps(g.members, separators=(",", ":")))


def _members_of(text: str) -> tuple[GroupMember, ...]:
    return tuple(
        GroupMember(
            name, task_id, bool(is_finally), tuple(run_after), tuple(inputs),
            tuple(WhenRow(i, op, tuple(values)) for i, op, values in when),
        )
        for name, task_id, is_finally, run_after, inputs, when in json.loads(text)
    )  # fmt: skip


def _group_state_params(g: GroupStateRow) -> tuple[Any, ...]:
    return (
        g.status._value_, g.pending, *g.counts,
        None if g.cancel_mode is None else g.cancel_mode._value_, g.timed_out, g.settle_time,
        g.group_id,
    )  # fmt: skip


def group_rows(c: Sequence[Any]) -> tuple[GroupRow, GroupStateRow]:
    """A row of _SELECT_GROUPS (members ``()`` when the select left them NULL)."""
    group = GroupRow(
        group_id=c[0], name=c[1], owner=c[2], endpoint_id=c[3], submit_time=c[4],
        fail_fast=bool(c[5]), timeout=c[6], members=() if c[17] is None else _members_of(c[17]),
    )  # fmt: skip
    state = GroupStateRow(
        group_id=c[0], status=_GROUP_STATUS_OF[c[7]], pending=bool(c[8]),
        counts=(c[9], c[10], c[11], c[12], c[13]),
        cancel_mode=None if c[14] is None else _CANCEL_OF[c[14]], timed_out=bool(c[15]),
        settle_time=c[16],
    )  # fmt: skip
    return group, state


PLAIN_COLUMNS = (
    "task_id, endpoint_id, function_id, owner, state, submit_time, attempt, priority,"
    " max_retries, max_system_retries, walltime, raised_count, system_failures, interrupted"
)
"""What a restart reads of a *plain* task (``PLAIN``), in ``_plain_record``'s order
(then its args, which SqliteStore leaves in the store): 14 columns of 29. A database
driver builds a Python object for every column of every row, the bulk of a restart's
read (measured, SQLite, a million queued tasks, records built: every column 7.1 s, these
and the test of ``PLAIN`` 5.9 s, medians of 3)."""
PLAIN = (
    "start_time IS NULL AND settle_time IS NULL AND held_from IS NULL AND result IS NULL"
    " AND error_type IS NULL AND error_message IS NULL AND error_traceback IS NULL"
    " AND error_kind IS NULL AND resubmitted_from = '' AND group_id = '' AND"
    " payload_purged = 0 AND name = '' AND inputs = '' AND skip_reason IS NULL"
)
"""True of a task whose other columns hold their defaults (never started, no error, no
group, no inputs, not held or resubmitted): every column ``PLAIN_COLUMNS`` leaves out is
then what ``_plain_record`` puts there. Most of a long queue is such tasks."""


class Records:
    """TaskRecords made from rows of a select of tasks (any order; rows of one
    submission come together, so they share one float), fed in one go (SQLite's cursor)
    or in chunks (PostgreSQL's). ``add`` takes rows of every column (``_SELECT_TASKS``),
    ``add_plain`` rows of ``PLAIN_COLUMNS`` and the args, of plain tasks only."""

    __slots__ = ("_share", "_submit_time", "records")

    def __init__(self) -> None:
        self.records: list[TaskRecord] = []
        self._share = {}.setdefault
        self._submit_time: float | None = None

    def add(self, rows: Iterable[Sequence[Any]]) -> None:
        self._add(rows, _task_record)

    def add_plain(self, rows: Iterable[Sequence[Any]]) -> None:
        self._add(rows, _plain_record)

    def _add(
        self,
        rows: Iterable[Sequence[Any]],
        record: Callable[[Sequence[Any], Callable[[Any, Any], Any]], TaskRecord],
    ) -> None:
        share = self._share
        append = self.records.append
        submit_time = self._submit_time
        for c in rows:
            task = record(c, share)
            # A submission's rows come together: its tasks share one float again, as
            # they did before the restart (a dict of every distinct time would cost more).
            if task.submit_time == submit_time:
                task.submit_time = submit_time
            else:
                submit_time = task.submit_time
            append(task)
        self._submit_time = submit_time


Changes = tuple[
    list[tuple[str, tuple[Any, ...]]],
    dict[str, str],
    list[tuple[str, tuple[Any, ...]]],
    list[tuple[str, tuple[str, str]]],
]
"""What a batch changes in rows it did not insert: its task updates (by task id), the
history it appends, its group states (by group id) and its outputs (by task id)."""


def changes(batch: WriteBatch, history: dict[str, str]) -> Changes:
    """What ``batch`` changes in rows it did not insert (``history``: the history it
    appends to them), as parameters, checked: a store converts them inside the batch's
    savepoint, so a malformed row fails only its own batch."""
    task_updates = [(r.task_id, _update_params(r)) for r in batch.task_updates]
    group_updates = [(g.group_id, _group_state_params(g)) for g in batch.group_states]
    for _, params in group_updates:
        if len(params) != 11:
            raise ValueError(f"group {params[-1]}: counts must be 5 numbers, got {params[2:-4]}")
    outputs = [(o.task_id, (o.stdout, o.stderr)) for o in batch.outputs]
    for task_id, (stdout, stderr) in outputs:
        if type(stdout) is not str or type(stderr) is not str:
            raise TypeError(f"task {task_id}: output must be two strings")
    return task_updates, history, group_updates, outputs


class Updates:
    """The UPDATEs of a group's batches, applied together: the last update of a task (or
    of a group's state) in the group wins, as each one replaces the stored columns, while
    the history each batch appends to a task is joined in order. So a task pays one
    UPDATE per commit however many of its transitions the commit holds.

    A store adds each batch's changes once the batch is in, and ``take``\\ s the rows to
    run before anything reads (and before its commit)."""

    __slots__ = ("groups", "history", "outputs", "tasks")

    def __init__(self) -> None:
        self.tasks: dict[str, tuple[Any, ...]] = {}
        """task_id -> ``_update_params``, without the history and the id."""
        self.history: dict[str, str] = {}
        """task_id -> history to append, oldest first."""
        self.groups: dict[str, tuple[Any, ...]] = {}
        """group_id -> ``_group_state_params``."""
        self.outputs: dict[str, tuple[str, str]] = {}
        """task_id -> (stdout, stderr): the last output of a task in the group wins."""

    def add(self, changes: Changes) -> None:
        tasks, history, groups, outputs = changes
        self.tasks.update(tasks)
        mine = self.history
        for task_id, records in history.items():
            mine[task_id] = mine.get(task_id, "") + records
        self.groups.update(groups)
        if outputs:
            self.outputs.update(outputs)

    def take(
        self,
    ) -> tuple[
        Sequence[tuple[Any, ...]],
        Sequence[tuple[str, str, str]],
        Sequence[tuple[str, str]],
        Iterable[tuple[Any, ...]],
    ]:
        """The rows to run, in this order, and forget them: task updates (the lifecycle
        columns of ``_update_params``, the history to append, the id), outputs (stdout,
        stderr, id: after the task's own UPDATE, which then rewrites a row without its
        new output, not with it), history appends of tasks without an update (history,
        id), group states (``_group_state_params``)."""
        if not (self.tasks or self.history or self.groups or self.outputs):
            return _NOTHING  # before each read: mostly nothing is due
        tasks: list[tuple[Any, ...]] = []
        outputs: list[tuple[str, str, str]] = []
        history: list[tuple[str, str]] = []
        groups: Iterable[tuple[Any, ...]] = ()
        if self.tasks:
            appended = self.history
            tasks = [
                (*params, appended.pop(task_id, ""), task_id)
                for task_id, params in self.tasks.items()
            ]
            self.tasks = {}
        if self.outputs:
            outputs = [(*o, t) for t, o in self.outputs.items()]
            self.outputs = {}
        if self.history:
            history = [(h, t) for t, h in self.history.items()]
            self.history = {}
        if self.groups:
            groups = self.groups.values()
            self.groups = {}
        return tasks, outputs, history, groups


_NOTHING: tuple[tuple[()], tuple[()], tuple[()], tuple[()]] = ((), (), (), ())
"""What ``Updates.take`` gives when nothing is due."""
