"""What goes into the scheduler (events) and what comes out (instructions).

Both are frozen: dataclasses, or NamedTuples for the records built once per task or
transition (cheaper to make). The scheduler is a pure function of its state and the
events it is fed, and its only output is the instructions it returns.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple

from heartline._states import CancelMode, GroupStatus, SkipReason, TaskState
from heartline.server._model import ErrorInfo, GroupMember, RequestRow, TaskRow, WriteBatch

# --------------------------------------------------------------------------- events


@dataclass(frozen=True, slots=True)
class NewTask:
    """One task of a submission, already validated and given its id."""

    task_id: str
    function_id: str
    args: bytes
    priority: int
    max_retries: int
    max_system_retries: int
    walltime: float
    held: bool = False
    name: str = ""
    """In a group: its name."""
    inputs: tuple[str, ...] = ()
    """Ids of the tasks whose results it takes, in placeholder order."""
    python: str = ""
    """The Python minor version its function needs (bytecode only), or "" for any."""


@dataclass(frozen=True, slots=True)
class NewGroup:
    """A group of a submission, already validated (``server/_groups.py``); its tasks are
    the submission's tasks, named by ``members``."""

    group_id: str
    name: str
    fail_fast: bool
    timeout: float
    """Seconds; 0 means none."""
    members: tuple[GroupMember, ...]
    """DAG tasks in submission order, then finally tasks; the same order as the tasks."""


@dataclass(frozen=True, slots=True)
class TasksSubmitted:
    endpoint_id: str
    owner: str
    tasks: tuple[NewTask, ...]
    session_id: str
    time: float
    stimulus: str = "submit"
    resubmitted_from: tuple[str, ...] = ()
    """Per task: the id of the task it was resubmitted from, or empty."""
    request: RequestRow | None = None
    """The client's request id and what it made, stored in the same batch as the tasks."""
    group: NewGroup | None = None
    """Set when the tasks are a group's."""
    settled_inputs: Mapping[str, tuple[TaskState, bytes | None]] | None = None
    """Outside a group: the state and result of each input task the scheduler no longer
    holds (settled and evicted), read from the store by the caller. An input neither
    held nor here is refused with InputsMoved (read again and resubmit the event)."""


@dataclass(frozen=True, slots=True)
class HeldTask:
    task_id: str
    attempt: int
    state: TaskState


@dataclass(frozen=True, slots=True)
class AgentConnected:
    agent_id: str
    endpoint_id: str
    capacity: int
    prefetch: int
    held: tuple[HeldTask, ...]
    time: float
    hostname: str = ""
    version: str = ""
    stream_id: str = ""
    """Which of the agent's streams this is (a reconnect opens a new one)."""
    python: str = ""
    """The Python its workers run, "major.minor"; empty: unknown (runs anything)."""
    cloudpickle: str = ""


@dataclass(frozen=True, slots=True)
class AgentLost:
    """The agent's stream closed, or it went silent past the heartbeat timeout.

    Heartbeats themselves are no event: the stream's connection notes when it last
    heard from the agent, and the server's timer reports the silent ones as lost."""

    agent_id: str
    time: float
    cause: str = "endpoint-lost"
    stream_id: str = ""
    """The stream that closed; a loss of an older stream than the agent's current one
    is ignored. Empty: whatever stream the agent has."""


@dataclass(frozen=True, slots=True)
class AgentCapacity:
    """The agent can now run ``capacity`` tasks at once (its engine scaled)."""

    agent_id: str
    capacity: int
    time: float


@dataclass(frozen=True, slots=True)
class StatusReport:
    task_id: str
    attempt: int
    state: TaskState
    result: bytes | None = None
    error: ErrorInfo | None = None
    stdout: str = ""
    """With a terminal report: the tail of what the attempt wrote to its stdout."""
    stderr: str = ""
    """The same of its stderr."""


@dataclass(frozen=True, slots=True)
class AgentReported:
    agent_id: str
    reports: tuple[StatusReport, ...]
    time: float


@dataclass(frozen=True, slots=True)
class TasksCommanded:
    """An owner's command on a set of tasks: cancel, hold, release, retry or give-up."""

    command: str
    task_ids: tuple[str, ...]
    time: float
    request: RequestRow | None = None
    """The client's request id, stored in the same batch as the command's transitions."""
    owner: str | None = None
    """Whose tasks the caller may command; None: anyone's (an admin, or auth off). A task
    of another owner is refused as unknown (its id answers NOT_FOUND, as if it did not
    exist)."""


@dataclass(frozen=True, slots=True)
class GroupCommanded:
    """An owner cancels or stops a group (TEP-0058)."""

    group_id: str
    mode: CancelMode
    time: float
    request: RequestRow | None = None


@dataclass(frozen=True, slots=True)
class Tick:
    """Time passes: find silent agents, expire ERRORED tasks past their retention."""

    time: float


Event = (
    TasksSubmitted
    | AgentConnected
    | AgentLost
    | AgentCapacity
    | AgentReported
    | TasksCommanded
    | GroupCommanded
    | Tick
)

# --------------------------------------------------------------------- instructions


@dataclass(frozen=True, slots=True)
class Persist:
    """Make these rows durable (one store batch)."""

    batch: WriteBatch


class DispatchItem(NamedTuple):
    """One task sent to an agent (a NamedTuple: one is built per dispatch, and a frozen
    dataclass pays an ``object.__setattr__`` per field)."""

    task_id: str
    attempt: int
    function_id: str
    args: bytes | None
    """None: still in the store (``TaskRecord.args``); the stream's writer reads it."""
    walltime: float
    inputs: tuple[bytes, ...] = ()
    """The results of the task's input tasks, in placeholder order."""


@dataclass(frozen=True, slots=True)
class SendDispatches:
    agent_id: str
    items: tuple[DispatchItem, ...]


@dataclass(frozen=True, slots=True)
class SendCancels:
    agent_id: str
    task_ids: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class SendAcks:
    """Acknowledge terminal reports; carried out once the Persist of the same step commits."""

    agent_id: str
    acks: tuple[tuple[str, int], ...]


class TaskChanged(NamedTuple):
    """One transition as watchers see it (a NamedTuple: one is built per transition)."""

    task_id: str
    session_id: str
    state: TaskState
    attempt: int
    cause: str
    time: float
    result: bytes | None = None
    error: ErrorInfo | None = None
    skip_reason: SkipReason | None = None
    group_id: str = ""


class GroupChanged(NamedTuple):
    """A group's aggregate status or pending flag changed."""

    group_id: str
    status: GroupStatus
    pending: bool
    time: float


@dataclass(frozen=True, slots=True)
class NotifyWatchers:
    """Push transitions to watchers; carried out once the Persist of the same step commits."""

    changes: tuple[TaskChanged, ...]
    groups: tuple[GroupChanged, ...] = ()


Instruction = Persist | SendDispatches | SendCancels | SendAcks | NotifyWatchers

__all__ = [
    "AgentConnected",
    "AgentLost",
    "AgentReported",
    "DispatchItem",
    "Event",
    "GroupChanged",
    "GroupCommanded",
    "HeldTask",
    "Instruction",
    "NewGroup",
    "NewTask",
    "NotifyWatchers",
    "Persist",
    "SendAcks",
    "SendCancels",
    "SendDispatches",
    "StatusReport",
    "TaskChanged",
    "TaskRow",
    "TasksCommanded",
    "TasksSubmitted",
    "Tick",
]
