"""Conversions between the server's records and the wire messages."""

from __future__ import annotations

from collections.abc import Mapping

from google.protobuf.timestamp_pb2 import Timestamp

from heartline._states import PENDING_STATES, GroupStatus, SkipReason, TaskState
from heartline.server._events import GroupChanged, TaskChanged
from heartline.server._groups import TASK_STATUSES
from heartline.server._model import (
    ErrorInfo,
    GroupMember,
    GroupRow,
    GroupStateRow,
    TaskRow,
    TransitionRow,
    WhenRow,
)
from heartline.v1 import task_pb2

_STATE_TO_PROTO = {s: s._to_proto() for s in TaskState}
_STATE_FROM_PROTO = {v: k for k, v in _STATE_TO_PROTO.items()}


def state_to_proto(state: TaskState | None) -> int:
    return _STATE_TO_PROTO[state] if state is not None else 0


def state_from_proto(value: int) -> TaskState | None:
    return _STATE_FROM_PROTO.get(value)


def skip_reason_to_proto(reason: SkipReason | None) -> int:
    return reason._to_proto() if reason is not None else 0


def timestamp(seconds: float | None) -> Timestamp | None:
    if seconds is None:
        return None
    ts = Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


def error_to_proto(error: ErrorInfo | None) -> task_pb2.RemoteError | None:
    if error is None:
        return None
    return task_pb2.RemoteError(
        type_name=error.type_name,
        message=error.message,
        traceback=error.traceback,
        failure_kind=error.failure_kind,
    )


def error_from_proto(error: task_pb2.RemoteError) -> ErrorInfo:
    return ErrorInfo(error.type_name, error.message, error.traceback, error.failure_kind)


def transition_to_proto(row: TransitionRow) -> task_pb2.Transition:
    return task_pb2.Transition(
        from_state=state_to_proto(row.from_state),
        to_state=state_to_proto(row.to_state),
        cause=row.cause,
        time=timestamp(row.time),
        attempt=row.attempt,
    )


def task_to_proto(
    row: TaskRow,
    *,
    endpoint_name: str = "",
    history: list[TransitionRow] | None = None,
    waiting_reason: str = "",
    include_result: bool = True,
) -> task_pb2.Task:
    task = task_pb2.Task(
        task_id=row.task_id,
        state=state_to_proto(row.state),
        pending=row.state in PENDING_STATES,
        endpoint_id=row.endpoint_id,
        endpoint_name=endpoint_name,
        function_id=row.function_id,
        attempt=row.attempt,
        priority=row.priority,
        result=(row.result or b"") if include_result else b"",
        error=error_to_proto(row.error),
        submit_time=timestamp(row.submit_time),
        start_time=timestamp(row.start_time),
        settle_time=timestamp(row.settle_time),
        history=[transition_to_proto(t) for t in history or ()],
        group_id=row.group_id,
        owner=row.owner,
        waiting_reason=waiting_reason,
        max_retries=row.max_retries,
        max_system_retries=row.max_system_retries,
        walltime_seconds=row.walltime,
        resubmitted_from=row.resubmitted_from,
        payload_purged=row.payload_purged,
        name=row.name,
        skip_reason=skip_reason_to_proto(row.skip_reason),
        input_task_ids=row.inputs,
        stdout=row.stdout,
        stderr=row.stderr,
    )
    return task


def change_to_proto(change: TaskChanged, include_results: bool) -> task_pb2.TaskUpdate:
    return task_pb2.TaskUpdate(
        task_id=change.task_id,
        state=_STATE_TO_PROTO[change.state],
        pending=change.state in PENDING_STATES,
        attempt=change.attempt,
        cause=change.cause,
        time=timestamp(change.time),
        result=(change.result or b"") if include_results else b"",
        error=error_to_proto(change.error),
        skip_reason=skip_reason_to_proto(change.skip_reason),
        group_id=change.group_id,
    )


def row_to_update(row: TaskRow, include_results: bool) -> task_pb2.TaskUpdate:
    """The current state of a stored task, as the first message of a watch."""
    settled = row.state not in PENDING_STATES
    return task_pb2.TaskUpdate(
        task_id=row.task_id,
        state=_STATE_TO_PROTO[row.state],
        pending=not settled,
        attempt=row.attempt,
        cause="current",
        time=timestamp(row.settle_time if settled else row.submit_time),
        result=(row.result or b"") if include_results and row.state == TaskState.SUCCEEDED else b"",
        error=error_to_proto(row.error) if settled else None,
        skip_reason=skip_reason_to_proto(row.skip_reason) if row.state == TaskState.SKIPPED else 0,
        group_id=row.group_id,
    )


# ------------------------------------------------------------------------- groups


def when_to_proto(when: WhenRow) -> task_pb2.WhenExpression:
    return task_pb2.WhenExpression(input=when.input, operator=when.operator, values=when.values)


def member_to_proto(member: GroupMember, task: task_pb2.Task | None = None) -> task_pb2.GroupTask:
    return task_pb2.GroupTask(
        name=member.name,
        is_finally=member.is_finally,
        run_after=member.run_after,
        inputs=member.inputs,
        when=[when_to_proto(w) for w in member.when],
        task=task,
    )


def group_to_proto(
    row: GroupRow,
    state: GroupStateRow,
    endpoint_name: str = "",
    *,
    tasks: Mapping[str, task_pb2.Task] | None = None,
) -> task_pb2.Group:
    """A group as a client sees it.

    Args:
        tasks: Each member's task by id; when given, the group carries its tasks (DAG
            tasks in submission order, then finally tasks), as GetGroup answers.
    """
    group = task_pb2.Group(
        group_id=row.group_id,
        name=row.name,
        endpoint_id=row.endpoint_id,
        endpoint_name=endpoint_name,
        owner=row.owner,
        status=state.status._to_proto(),
        pending=state.pending,
        fail_fast=row.fail_fast,
        timeout_seconds=row.timeout,
        submit_time=timestamp(row.submit_time),
        settle_time=timestamp(state.settle_time),
        task_counts=dict(zip(TASK_STATUSES, state.counts, strict=True)),
        # A listed row carries no members (the store leaves them behind): then 0.
        finally_count=sum(m.is_finally for m in row.members),
        cancel_mode=state.cancel_mode._to_proto() if state.cancel_mode is not None else 0,
        timed_out=state.timed_out,
    )
    if tasks is not None:
        group.tasks.extend(member_to_proto(m, tasks.get(m.task_id)) for m in row.members)
    return group


def _group_update(
    group_id: str, status: GroupStatus, pending: bool, time: float | None
) -> task_pb2.GroupUpdate:
    return task_pb2.GroupUpdate(
        group_id=group_id, status=status._to_proto(), pending=pending, time=timestamp(time)
    )


def group_change_to_proto(change: GroupChanged) -> task_pb2.GroupUpdate:
    """A change of a group's status or pending flag, as pushed to watchers."""
    return _group_update(change.group_id, change.status, change.pending, change.time)


def group_row_to_update(row: GroupRow, state: GroupStateRow) -> task_pb2.GroupUpdate:
    """The current status of a stored group, as the first message of a watch."""
    time = row.submit_time if state.pending or state.settle_time is None else state.settle_time
    return _group_update(row.group_id, state.status, state.pending, time)
