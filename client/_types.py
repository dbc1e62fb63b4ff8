"""Public value types of the client: small frozen dataclasses built from the wire messages.

Nothing generated (``*_pb2``) appears in a public signature; each type converts itself
from its message with a private ``_from_proto``.
"""

from __future__ import annotations

import dataclasses
import datetime
import enum
import functools
from collections.abc import Mapping
from typing import Any

from heartline._errors import RemoteError, TaskFailedError, TaskSkippedError
from heartline._serialize import loads
from heartline._states import SkipReason, TaskState
from heartline.v1 import task_pb2, task_service_pb2

_UTC = datetime.UTC


class Priority(str, enum.Enum):
    """Dispatch priority of a task: highest first, then oldest."""

    HIGH = "high"
    NORMAL = "normal"
    LOW = "low"

    def __str__(self) -> str:
        return self.value

    @classmethod
    def _from_proto(cls, value: int) -> Priority:
        return _PRIORITY_FROM_PROTO.get(value, Priority.NORMAL)

    def _to_proto(self) -> int:
        return _PRIORITY_TO_PROTO[self]


_PRIORITY_TO_PROTO: dict[Priority, int] = {
    p: task_pb2.Priority.Value("PRIORITY_" + p.name) for p in Priority
}
_PRIORITY_FROM_PROTO: dict[int, Priority] = {v: k for k, v in _PRIORITY_TO_PROTO.items()}


class FailureKind(str, enum.Enum):
    """Why an attempt ended without the function returning or raising."""

    WORKER_DIED = "worker-died"
    WALLTIME = "walltime"
    ENDPOINT_LOST = "endpoint-lost"
    SERIALIZATION = "serialization"

    def __str__(self) -> str:
        return self.value

    @classmethod
    def _from_proto(cls, value: int) -> FailureKind | None:
        return _FAILURE_FROM_PROTO.get(value)


_FAILURE_FROM_PROTO: dict[int, FailureKind] = {
    task_pb2.FailureKind.Value("FAILURE_KIND_" + k.name): k for k in FailureKind
}


def _time(msg: Any, field: str) -> datetime.datetime | None:
    """A Timestamp field as an aware UTC datetime, or None when unset."""
    if not msg.HasField(field):
        return None
    return getattr(msg, field).ToDatetime(tzinfo=_UTC)


@dataclasses.dataclass(frozen=True)
class TaskError:
    """The exception of a task's last attempt, as text."""

    type_name: str
    """Qualified name of the remote exception type, e.g. ``"ValueError"``."""
    message: str
    """The remote exception's message."""
    traceback: str
    """The formatted remote traceback."""
    failure_kind: FailureKind | None = None
    """Set when the attempt ended by a system failure rather than by the function."""

    @classmethod
    def _from_proto(cls, msg: task_pb2.RemoteError) -> TaskError:
        return cls(
            type_name=msg.type_name,
            message=msg.message,
            traceback=msg.traceback,
            failure_kind=FailureKind._from_proto(msg.failure_kind),
        )


@dataclasses.dataclass(frozen=True)
class TaskTransition:
    """One recorded state change of a task."""

    from_state: TaskState | None
    """The state left; None for the submit transition."""
    to_state: TaskState
    cause: str
    """The event that caused it, e.g. ``"submit"``, ``"dispatch"``, ``"worker-died"``."""
    time: datetime.datetime | None
    attempt: int

    @classmethod
    def _from_proto(cls, msg: task_pb2.Transition) -> TaskTransition:
        return cls(
            from_state=TaskState._from_proto(msg.from_state) if msg.from_state else None,
            to_state=TaskState._from_proto(msg.to_state),
            cause=msg.cause,
            time=_time(msg, "time"),
            attempt=msg.attempt,
        )


@dataclasses.dataclass(frozen=True)
class TaskUpdate:
    """A task's state right after an operation (cancel, hold, ...) or a watched transition."""

    task_id: str
    state: TaskState
    pending: bool
    attempt: int
    cause: str
    time: datetime.datetime | None
    skip_reason: SkipReason | None = None
    """Why the task was skipped, when SKIPPED."""
    group_id: str | None = None
    """The task's group; None outside one."""

    @classmethod
    def _from_proto(cls, msg: task_pb2.TaskUpdate) -> TaskUpdate:
        return cls(
            task_id=msg.task_id,
            state=TaskState._from_proto(msg.state),
            pending=msg.pending,
            attempt=msg.attempt,
            cause=msg.cause,
            time=_time(msg, "time"),
            skip_reason=SkipReason._from_proto(msg.skip_reason),
            group_id=msg.group_id or None,
        )


def settled_outcome(
    task_id: str,
    state: TaskState,
    result: bytes,
    error: TaskError | None,
    *,
    cause: str = "",
    payload_purged: bool = False,
    skip_reason: SkipReason | None = None,
) -> Any:
    """Return a settled task's value, or raise what its outcome means.

    Raises:
        RemoteError: the function raised (ERRORED/FAILED without a system failure kind).
        TaskSkippedError: the task was skipped without running (the reason is named).
        TaskFailedError: any other settled state without a value.
        SerializationError: the result could not be unpickled here.
    """
    if state is TaskState.SUCCEEDED:
        if payload_purged or not result:
            raise TaskFailedError(task_id, state.value, "the result payload was purged")
        return loads(result)
    if state is TaskState.SKIPPED:
        raise TaskSkippedError(task_id, skip_reason, "" if skip_reason else cause)
    if error is not None and error.failure_kind is None and error.type_name:
        raise RemoteError(task_id, state.value, error.type_name, error.message, error.traceback)
    if error is not None:
        kind = f"{error.failure_kind.value}: " if error.failure_kind else ""
        raise TaskFailedError(task_id, state.value, f"{kind}{error.message}".rstrip(": "))
    if state.pending:
        raise TaskFailedError(task_id, state.value, "the task has not settled yet")
    raise TaskFailedError(task_id, state.value, cause or state.value)


@dataclasses.dataclass(frozen=True)
class Task:
    """A task as the server stores it.

    ``result`` is the returned value (unpickled on first access), ``exception`` the
    error a :meth:`Client.get_result` would raise; both are None while the task is
    pending.
    """

    id: str
    state: TaskState
    pending: bool
    attempt: int
    endpoint: str
    """The endpoint's name (its id when the name is unknown)."""
    endpoint_id: str
    function_id: str
    priority: Priority
    error: TaskError | None
    """The exception of the last attempt, when ERRORED or FAILED."""
    submitted: datetime.datetime | None
    started: datetime.datetime | None
    settled: datetime.datetime | None
    history: tuple[TaskTransition, ...]
    """Transitions, oldest first (empty unless asked for)."""
    group_id: str | None
    """The group the task belongs to; None outside one."""
    name: str | None
    """The task's name in its group; None outside one."""
    skip_reason: SkipReason | None
    """Why the task was skipped, when SKIPPED."""
    input_task_ids: tuple[str, ...]
    """Ids of the tasks whose results it takes as arguments, in placeholder order."""
    owner: str
    waiting_reason: str
    """For a pending task, why it is waiting, e.g. ``"endpoint offline"``."""
    max_retries: int
    max_system_retries: int
    walltime: float | None
    """Per-attempt walltime in seconds; None means none."""
    resubmitted_from: str | None
    payload_purged: bool
    stdout: str = dataclasses.field(default="", repr=False)
    """What the task's latest finished attempt wrote to its stdout: the last bytes, up to
    the server's limit (64 KiB by default), after a ``[... N bytes cut ...]`` line when
    there was more. An attempt whose worker died keeps what it wrote until then; "" for
    none, and once the payloads are purged."""
    stderr: str = dataclasses.field(default="", repr=False)
    """The same of its stderr."""
    _result: bytes = dataclasses.field(default=b"", repr=False, compare=False)

    @functools.cached_property
    def _outcome(self) -> tuple[bool, Any]:
        try:
            return True, settled_outcome(
                self.id,
                self.state,
                self._result,
                self.error,
                payload_purged=self.payload_purged,
                skip_reason=self.skip_reason,
            )
        except TaskFailedError as exc:
            return False, exc

    @property
    def result(self) -> Any:
        """The returned value when SUCCEEDED, else None.

        Raises:
            SerializationError: the result cannot be unpickled in this interpreter.
        """
        if self.state is not TaskState.SUCCEEDED:
            return None
        ok, value = self._outcome
        return value if ok else None

    @property
    def exception(self) -> TaskFailedError | None:
        """The error of a settled task without a value (a RemoteError if it raised, a
        TaskSkippedError if it was skipped)."""
        if self.pending or self.state is TaskState.SUCCEEDED and not self.payload_purged:
            return None
        ok, value = self._outcome
        return None if ok else value

    @classmethod
    def _from_proto(cls, msg: task_pb2.Task) -> Task:
        return cls(
            id=msg.task_id,
            state=TaskState._from_proto(msg.state),
            pending=msg.pending,
            attempt=msg.attempt,
            endpoint=msg.endpoint_name or msg.endpoint_id,
            endpoint_id=msg.endpoint_id,
            function_id=msg.function_id,
            priority=Priority._from_proto(msg.priority),
            error=TaskError._from_proto(msg.error) if msg.HasField("error") else None,
            submitted=_time(msg, "submit_time"),
            started=_time(msg, "start_time"),
            settled=_time(msg, "settle_time"),
            history=tuple(TaskTransition._from_proto(t) for t in msg.history),
            group_id=msg.group_id or None,
            name=msg.name or None,
            skip_reason=SkipReason._from_proto(msg.skip_reason),
            input_task_ids=tuple(msg.input_task_ids),
            owner=msg.owner,
            waiting_reason=msg.waiting_reason,
            max_retries=msg.max_retries,
            max_system_retries=msg.max_system_retries,
            walltime=msg.walltime_seconds or None,
            resubmitted_from=msg.resubmitted_from or None,
            payload_purged=msg.payload_purged,
            stdout=msg.stdout,
            stderr=msg.stderr,
            _result=msg.result,
        )


@dataclasses.dataclass(frozen=True)
class AgentInfo:
    """One connected agent of an endpoint."""

    agent_id: str
    capacity: int
    in_flight: int
    """Tasks on the agent (dispatched, queued, running)."""
    last_heartbeat: datetime.datetime | None
    version: str
    hostname: str
    python: str = ""
    """The Python its workers run, "major.minor" ("" from an agent that does not say): a
    function that is bytecode only (no source form) runs only on the same one."""
    cloudpickle: str = ""
    """The cloudpickle version of its workers."""

    @classmethod
    def _from_proto(cls, msg: task_service_pb2.AgentInfo) -> AgentInfo:
        return cls(
            agent_id=msg.agent_id,
            capacity=msg.capacity,
            in_flight=msg.in_flight,
            last_heartbeat=_time(msg, "last_heartbeat"),
            version=msg.version,
            hostname=msg.hostname,
            python=msg.python_version,
            cloudpickle=msg.cloudpickle_version,
        )


@dataclasses.dataclass(frozen=True)
class EndpointInfo:
    """An endpoint with its agents and queue length."""

    id: str
    name: str
    online: bool
    agents: tuple[AgentInfo, ...]
    queued: int
    """Tasks waiting for this endpoint."""
    registered: datetime.datetime | None

    @classmethod
    def _from_proto(cls, msg: task_service_pb2.Endpoint) -> EndpointInfo:
        return cls(
            id=msg.endpoint_id,
            name=msg.name,
            online=msg.online,
            agents=tuple(AgentInfo._from_proto(a) for a in msg.agents),
            queued=msg.queued,
            registered=_time(msg, "registered_time"),
        )


@dataclasses.dataclass(frozen=True)
class Stats:
    """Server-wide counters."""

    tasks_by_state: Mapping[str, int]
    """Task counts keyed by state string (``TaskState`` members compare equal to them)."""
    endpoints_online: int
    agents_online: int
    transitions: int
    """Transitions since the server started."""
    start_time: datetime.datetime | None

    @classmethod
    def _from_proto(cls, msg: task_service_pb2.GetStatsResponse) -> Stats:
        return cls(
            tasks_by_state=dict(sorted(msg.tasks_by_state.items())),
            endpoints_online=msg.endpoints_online,
            agents_online=msg.agents_online,
            transitions=msg.transitions,
            start_time=_time(msg, "start_time"),
        )
