"""Task states as the client sees them, and which of them are pending or settled; why a
group task was skipped, a group's aggregate status, and the ways to cancel a group."""

from __future__ import annotations

import enum

from heartline.v1 import task_pb2


class TaskState(str, enum.Enum):
    """The lifecycle state of a task (SPEC section 3).

    Values are the state strings (``TaskState.WAITING_FOR_EP == "waiting-for-ep"``);
    each member maps one-to-one onto the wire enum ``heartline.v1.TaskState``.
    """

    WAITING_FOR_DEPS = "waiting-for-deps"
    WAITING_FOR_EP = "waiting-for-ep"
    HELD = "held"
    DISPATCHED = "dispatched"
    WAITING_FOR_NODES = "waiting-for-nodes"
    WAITING_FOR_LAUNCH = "waiting-for-launch"
    RUNNING = "running"
    SUCCEEDED = "success"
    ERRORED = "errored"
    FAILED = "failed"
    CANCELLED = "cancelled"
    SKIPPED = "skipped"

    def __str__(self) -> str:
        return self.value

    @property
    def pending(self) -> bool:
        """True while the task may still change on its own (not settled)."""
        return self in PENDING_STATES

    @property
    def settled(self) -> bool:
        """True once the task has an outcome (it may still be retried if ERRORED)."""
        return self not in PENDING_STATES

    @property
    def terminal(self) -> bool:
        """True for states no event leaves (ERRORED excepted: it may be retried)."""
        return self in TERMINAL_STATES

    @classmethod
    def _from_proto(cls, value: int) -> TaskState:
        try:
            return _FROM_PROTO[value]
        except KeyError:
            raise ValueError(f"unknown wire task state {value}") from None

    def _to_proto(self) -> int:
        return _TO_PROTO[self]


class FailureCode(enum.IntEnum):
    """Why an attempt ended without the function returning: the wire enum's values.

    The one definition the server and the agent share (the client's public
    ``heartline.client.FailureKind`` names the same values as strings).
    """

    RAISED = 0  # not a system failure: the function raised (FAILURE_KIND_UNSPECIFIED)
    WORKER_DIED = task_pb2.FAILURE_KIND_WORKER_DIED
    WALLTIME = task_pb2.FAILURE_KIND_WALLTIME
    ENDPOINT_LOST = task_pb2.FAILURE_KIND_ENDPOINT_LOST
    SERIALIZATION = task_pb2.FAILURE_KIND_SERIALIZATION


PENDING_STATES = frozenset(
    {
        TaskState.WAITING_FOR_DEPS,
        TaskState.WAITING_FOR_EP,
        TaskState.HELD,
        TaskState.DISPATCHED,
        TaskState.WAITING_FOR_NODES,
        TaskState.WAITING_FOR_LAUNCH,
        TaskState.RUNNING,
    }
)
SETTLED_STATES = frozenset(TaskState) - PENDING_STATES
TERMINAL_STATES = frozenset(
    {TaskState.SUCCEEDED, TaskState.FAILED, TaskState.CANCELLED, TaskState.SKIPPED}
)
# States in which the task is in the hands of an agent.
ON_AGENT_STATES = frozenset(
    {
        TaskState.DISPATCHED,
        TaskState.WAITING_FOR_NODES,
        TaskState.WAITING_FOR_LAUNCH,
        TaskState.RUNNING,
    }
)

_TO_PROTO: dict[TaskState, int] = {
    s: task_pb2.TaskState.Value("TASK_STATE_" + s.name) for s in TaskState
}
_FROM_PROTO: dict[int, TaskState] = {v: k for k, v in _TO_PROTO.items()}


class SkipReason(str, enum.Enum):
    """Why a group task was skipped (SPEC section 4); maps onto ``heartline.v1.SkipReason``."""

    WHEN_FALSE = "when-false"
    """Its `when` expressions were false."""
    INPUT_NOT_SUCCEEDED = "input-not-succeeded"
    """A task whose result it takes did not succeed."""
    PARENT_NOT_SUCCEEDED = "parent-not-succeeded"
    """A task it runs after failed, was cancelled, or was skipped for another reason
    than its own `when` (as in Tekton, a `when` skip does not cascade to `run_after`)."""
    GROUP_STOPPING = "group-stopping"
    """The group was stopping (fail_fast after a failure, or stop_run_finally)."""
    GROUP_TIMED_OUT = "group-timed-out"
    """The group's timeout passed before it ran."""

    def __str__(self) -> str:
        return self.value

    @classmethod
    def _from_proto(cls, value: int) -> SkipReason | None:
        """None for SKIP_REASON_UNSPECIFIED (the task was not skipped)."""
        return _SKIP_FROM_PROTO.get(value)

    def _to_proto(self) -> int:
        return _SKIP_TO_PROTO[self]


class GroupStatus(str, enum.Enum):
    """A group's aggregate status, `$(tasks.status)` (TEP-0049): ``Failed`` if any DAG
    task failed (this wins); else ``Completed`` if all settled and one or more were
    skipped; else ``Succeeded`` if all succeeded; else ``None`` (pending, or cancelled).
    Maps onto ``heartline.v1.GroupStatus``."""

    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    COMPLETED = "Completed"
    NONE = "None"

    def __str__(self) -> str:
        return self.value

    @classmethod
    def _from_proto(cls, value: int) -> GroupStatus:
        return _GROUP_FROM_PROTO.get(value, GroupStatus.NONE)

    def _to_proto(self) -> int:
        return _GROUP_TO_PROTO[self]


class CancelMode(str, enum.Enum):
    """How a group is cancelled (TEP-0058); maps onto ``heartline.v1.CancelMode``."""

    CANCEL = "cancel"
    """Cancel every pending or running task; finally tasks do not run."""
    CANCEL_RUN_FINALLY = "cancel_run_finally"
    """Cancel the DAG tasks, then run the finally tasks."""
    STOP_RUN_FINALLY = "stop_run_finally"
    """Start no new DAG task, let running ones finish, then run the finally tasks."""

    def __str__(self) -> str:
        return self.value

    @classmethod
    def _from_proto(cls, value: int) -> CancelMode | None:
        """None for CANCEL_MODE_UNSPECIFIED."""
        return _CANCEL_FROM_PROTO.get(value)

    def _to_proto(self) -> int:
        return _CANCEL_TO_PROTO[self]


_SKIP_TO_PROTO = {r: task_pb2.SkipReason.Value("SKIP_REASON_" + r.name) for r in SkipReason}
_SKIP_FROM_PROTO = {v: k for k, v in _SKIP_TO_PROTO.items()}
_GROUP_TO_PROTO = {g: task_pb2.GroupStatus.Value("GROUP_STATUS_" + g.name) for g in GroupStatus}
_GROUP_FROM_PROTO = {v: k for k, v in _GROUP_TO_PROTO.items()}
_CANCEL_TO_PROTO = {m: task_pb2.CancelMode.Value("CANCEL_MODE_" + m.name) for m in CancelMode}
_CANCEL_FROM_PROTO = {v: k for k, v in _CANCEL_TO_PROTO.items()}
