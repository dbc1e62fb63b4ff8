"""Records shared by the scheduler and the store: plain data, no behaviour.

``TaskRecord`` is mutable and owned by the scheduler (only the scheduler's loop touches
it). Everything that crosses to the store's writer thread is a frozen snapshot.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, fields
from typing import NamedTuple

from heartline._states import CancelMode, FailureCode, GroupStatus, SkipReason, TaskState

_new_tuple = tuple.__new__

PRIORITY_HIGH = 1
PRIORITY_NORMAL = 2
PRIORITY_LOW = 3

# Short names for the shared FailureCode values.
FAILURE_NONE = FailureCode.RAISED
FAILURE_WORKER_DIED = FailureCode.WORKER_DIED
FAILURE_WALLTIME = FailureCode.WALLTIME
FAILURE_ENDPOINT_LOST = FailureCode.ENDPOINT_LOST
FAILURE_SERIALIZATION = FailureCode.SERIALIZATION


@dataclass(frozen=True, slots=True)
class ErrorInfo:
    """An exception of an attempt, as text."""

    type_name: str
    message: str
    traceback: str = ""
    failure_kind: int = FAILURE_NONE
    """0 when the function raised; a FAILURE_* value for a system failure."""


class States:
    """TaskState's members as plain class attributes, for the scheduler's hot paths
    (``S = States``): on Python 3.11, reading a member off its enum class
    (``TaskState.RUNNING``) costs some 250 ns, a plain class attribute some 40 ns, and a
    transition reads several."""

    WAITING_FOR_DEPS = TaskState.WAITING_FOR_DEPS
    WAITING_FOR_EP = TaskState.WAITING_FOR_EP
    HELD = TaskState.HELD
    DISPATCHED = TaskState.DISPATCHED
    WAITING_FOR_NODES = TaskState.WAITING_FOR_NODES
    WAITING_FOR_LAUNCH = TaskState.WAITING_FOR_LAUNCH
    RUNNING = TaskState.RUNNING
    SUCCEEDED = TaskState.SUCCEEDED
    ERRORED = TaskState.ERRORED
    FAILED = TaskState.FAILED
    CANCELLED = TaskState.CANCELLED
    SKIPPED = TaskState.SKIPPED


assert {k: v for k, v in vars(States).items() if not k.startswith("_")} == dict(
    TaskState.__members__
), "States names every TaskState member"


class Standing(enum.Enum):
    """Where a waiting task's last attempt stands (only WAITING_FOR_EP and HELD tasks are
    ever other than FRESH). Stored as the boolean column ``interrupted`` (not FRESH)."""

    FRESH = "fresh"
    """Queued or held; its next dispatch runs the current attempt."""
    LOST = "lost"
    """Its attempt went with a lost agent and may still finish there: the next dispatch
    counts a system failure and is a new attempt, unless the agent reclaims it first."""
    ORPHANED = "orphaned"
    """After a server restart: out of the queue until the reclaim deadline (one heartbeat
    timeout), so its agent can reclaim it when it says hello again; then LOST and queued."""


_FRESH = Standing.FRESH
"""Read on every snapshot: a module constant, not an enum class attribute (see States)."""


@dataclass(slots=True)
class TaskRecord:
    """One task as the scheduler holds it."""

    task_id: str
    endpoint_id: str
    function_id: str
    args: bytes | None
    """None: left in the store (a restart loads queued tasks without them, see
    ``Store.load_unsettled``); their dispatch reads them (``Store.get_args``)."""
    owner: str
    state: TaskState
    submit_time: float
    attempt: int = 1
    priority: int = PRIORITY_NORMAL
    max_retries: int = 0
    max_system_retries: int = 3
    walltime: float = 0.0
    start_time: float | None = None
    settle_time: float | None = None
    held_from: TaskState | None = None
    """The state a HELD task returns to when released."""
    result: bytes | None = None
    error: ErrorInfo | None = None
    raised_count: int = 0
    """Attempts that failed by the task's own doing, raised or past its walltime
    (counted against max_retries)."""
    system_failures: int = 0
    """Attempts ended by a system failure (counted against max_system_retries)."""
    resubmitted_from: str = ""
    group_id: str = ""
    payload_purged: bool = False
    standing: Standing = Standing.FRESH
    """Where its last attempt stands; written only by the transition table (and by the
    scheduler's restore, which tells LOST from ORPHANED)."""
    name: str = ""
    """In a group: the task's name, unique in the group."""
    inputs: tuple[str, ...] = ()
    """Ids of the tasks whose results it takes, in placeholder order (SPEC section 4)."""
    skip_reason: SkipReason | None = None
    """Why it was SKIPPED."""
    # Not stored: runtime placement.
    session_id: str = field(default="", compare=False)
    agent_id: str | None = field(default=None, compare=False)
    python: str = field(default="", compare=False)
    """The Python minor version its function needs (bytecode only), or "" for any: from
    the function's payload (heartline/_forms.py), set at submit and at restore."""

    def snapshot(self) -> TaskRow:
        """A frozen copy of the stored columns, safe to hand to the writer thread."""
        # Spelled out, and made by tuple.__new__ (a NamedTuple's own __new__ is a Python
        # function around it): this runs for every changed task of every step.
        return _new_tuple(
            TaskRow,
            (
                self.task_id,
                self.endpoint_id,
                self.function_id,
                self.args,
                self.owner,
                self.state,
                self.submit_time,
                self.attempt,
                self.priority,
                self.max_retries,
                self.max_system_retries,
                self.walltime,
                self.start_time,
                self.settle_time,
                self.held_from,
                self.result,
                self.error,
                self.raised_count,
                self.system_failures,
                self.resubmitted_from,
                self.group_id,
                self.payload_purged,
                self.name,
                self.inputs,
                self.skip_reason,
                self.standing is not _FRESH,
                "",  # stdout and stderr: the scheduler holds no output (WriteBatch.outputs)
                "",
            ),
        )


_FIELD_ORDER = (
    "task_id", "endpoint_id", "function_id", "args", "owner", "state", "submit_time",
    "attempt", "priority", "max_retries", "max_system_retries", "walltime", "start_time",
    "settle_time", "held_from", "result", "error", "raised_count", "system_failures",
    "resubmitted_from", "group_id", "payload_purged", "standing", "name", "inputs",
    "skip_reason", "session_id", "agent_id", "python",
)  # fmt: skip
"""TaskRecord's fields in order: the scheduler makes records positionally (a dataclass
__init__ of 28 fields matches keywords at several times the cost)."""
assert tuple(f.name for f in fields(TaskRecord)) == _FIELD_ORDER, (
    "TaskRecord's fields moved: the scheduler's _on_submitted makes records positionally"
)


class TaskRow(NamedTuple):
    """The stored columns of a task (a frozen snapshot of a TaskRecord).

    A NamedTuple, not a frozen dataclass: one is built for every changed task of every
    step, and a frozen dataclass pays an ``object.__setattr__`` per field.
    """

    task_id: str
    endpoint_id: str
    function_id: str
    args: bytes
    owner: str
    state: TaskState
    submit_time: float
    attempt: int
    priority: int
    max_retries: int
    max_system_retries: int
    walltime: float
    start_time: float | None
    settle_time: float | None
    held_from: TaskState | None
    result: bytes | None
    error: ErrorInfo | None
    raised_count: int
    system_failures: int
    resubmitted_from: str
    group_id: str
    payload_purged: bool
    name: str = ""
    inputs: tuple[str, ...] = ()
    skip_reason: SkipReason | None = None
    interrupted: bool = False
    """The task's standing is not FRESH (the store cannot tell LOST from ORPHANED; a
    restore decides)."""
    stdout: str = ""
    """The tail of what the task's latest finished attempt wrote to its stdout, as
    ``Store.get_tasks`` reads it ("" in other reads). Written apart from the row
    (``WriteBatch.outputs``): the scheduler holds no output."""
    stderr: str = ""
    """The same of its stderr."""

    def to_record(self) -> TaskRecord:
        # Positional (see _FIELD_ORDER: the stored columns up to payload_purged, standing,
        # then name, inputs, skip_reason): _asdict() and ** cost 3x as much.
        return TaskRecord(*self[:22], Standing.LOST if self[25] else Standing.FRESH, *self[22:25])


class OutputRow(NamedTuple):
    """What a task's attempt wrote: replaces the output stored with the task."""

    task_id: str
    stdout: str
    """The tail of its stdout (see heartline/_output.py)."""
    stderr: str
    """The tail of its stderr."""


class TransitionRow(NamedTuple):
    """One recorded transition: (task, start, finish, cause, time) plus the attempt."""

    task_id: str
    from_state: TaskState | None
    """None for the submit transition (the task did not exist before)."""
    to_state: TaskState
    cause: str
    time: float
    attempt: int


@dataclass(frozen=True, slots=True)
class FunctionRow:
    function_id: str
    payload: bytes
    owner: str
    register_time: float


@dataclass(frozen=True, slots=True)
class EndpointRow:
    endpoint_id: str
    name: str
    owner: str
    register_time: float


@dataclass(frozen=True, slots=True)
class TokenRow:
    """A token as the store lists it: never the secret, nor its hash."""

    token_id: str
    user: str
    endpoint: str | None
    """An agent token's endpoint name (all it may register and serve); None for a user token."""
    created: float
    revoked: float | None = None


class RequestRow(NamedTuple):
    """A client's request id, remembered so a repeat answers as the first one did."""

    request_id: str
    owner: str
    method: str
    """The RPC, e.g. ``"SubmitTasks"``: an id reused for another method is another body."""
    digest: str
    """sha256 of the request's body (without its request and session ids)."""
    task_ids: tuple[str, ...]
    """The tasks the request made (submit, resubmit), or named (commands)."""
    time: float


class WhenRow(NamedTuple):
    """One `when` expression of a group task: ``input`` ``operator`` ``values``."""

    input: str
    operator: str
    values: tuple[str, ...]


class GroupMember(NamedTuple):
    """One task's place in its group, fixed at submission."""

    name: str
    task_id: str
    is_finally: bool = False
    run_after: tuple[str, ...] = ()
    """Names of the DAG tasks it runs after, without their results."""
    inputs: tuple[str, ...] = ()
    """Names of the DAG tasks whose results it takes, in placeholder order (a name may
    repeat)."""
    when: tuple[WhenRow, ...] = ()


class GroupRow(NamedTuple):
    """A group as submitted: fixed once stored."""

    group_id: str
    name: str
    owner: str
    endpoint_id: str
    submit_time: float
    fail_fast: bool
    timeout: float
    """Seconds from submission; 0 means none."""
    members: tuple[GroupMember, ...]
    """DAG tasks in submission order, then finally tasks."""


class GroupStateRow(NamedTuple):
    """What changes of a group as its tasks move: written on each change, in the batch of
    the transitions that caused it."""

    group_id: str
    status: GroupStatus
    """The aggregate status of its DAG tasks."""
    pending: bool
    """A task of the group (finally tasks included) is pending."""
    counts: tuple[int, int, int, int, int]
    """DAG tasks by status: Succeeded, Failed, Skipped, Cancelled, None."""
    cancel_mode: CancelMode | None
    timed_out: bool
    settle_time: float | None


@dataclass(frozen=True, slots=True)
class WriteBatch:
    """Everything one scheduler step (or one request) asks the store to make durable.

    Applied in one transaction, in this order: functions, endpoints, new groups, new
    tasks (inserted), task updates (the full row replaces the stored one), transitions
    (appended), group states (replace the stored one), requests, outputs (replace a
    task's stored output; a task update leaves it as it is).
    """

    functions: tuple[FunctionRow, ...] = ()
    endpoints: tuple[EndpointRow, ...] = ()
    new_tasks: tuple[TaskRow, ...] = ()
    task_updates: tuple[TaskRow, ...] = ()
    transitions: tuple[TransitionRow, ...] = ()
    requests: tuple[RequestRow, ...] = ()
    new_groups: tuple[GroupRow, ...] = ()
    group_states: tuple[GroupStateRow, ...] = ()
    outputs: tuple[OutputRow, ...] = ()

    def __bool__(self) -> bool:
        return bool(
            self.functions
            or self.endpoints
            or self.new_tasks
            or self.task_updates
            or self.transitions
            or self.requests
            or self.new_groups
            or self.group_states
            or self.outputs
        )
