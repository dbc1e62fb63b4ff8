"""Conversions between the server's records and the wire messages."""

from __future__ import annotations

from google.protobuf.timestamp_pb2 import Timestamp

from heartline._states import PENDING_STATES, TaskState
from heartline.server._events import TaskChanged
from heartline.server._model import ErrorInfo, TaskRow, TransitionRow
from heartline.v1 import task_pb2

_STATE_TO_PROTO = {s: s._to_proto() for s in TaskState}
_STATE_FROM_PROTO = {v: k for k, v in _STATE_TO_PROTO.items()}


def state_to_proto(state: TaskState | None) -> int:
    return _STATE_TO_PROTO[state] if state is not None else 0


def state_from_proto(value: int) -> TaskState | None:
    return _STATE_FROM_PROTO.get(value)


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
    )
