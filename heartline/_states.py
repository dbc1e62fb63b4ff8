"""Task states as the client sees them, and which of them are pending or settled."""

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
