"""The scheduler core: a pure state machine over tasks and agents.

``Scheduler.handle(*events) -> list[Instruction]``. No I/O and no awaits happen here: the
servicers feed events in, and carry the returned instructions out (store writes, stream
sends, watcher pushes). The work is split three ways, each testable alone:

- ``server/_lifecycle.py``: the transition table. Every state change goes through
  :meth:`Scheduler._transition`, which runs the ``(start, finish)`` row generically (its
  action on the task's fields, then its effects) and refuses any pair not in the table;
  each transition is recorded with its cause and time in the same store batch.
- ``server/_dispatch.py``: the endpoint queues, the agents and their credit.
- this module: the event handlers, the steps, and the invariants (``validate``).
"""

from __future__ import annotations

import heapq
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from heartline import _defaults
from heartline._figures import DISPATCH_LATENCY_BOUNDS, Buckets
from heartline._states import ON_AGENT_STATES, PENDING_STATES, SkipReason, TaskState
from heartline.server._deps import Dependencies, GroupRecord
from heartline.server._dispatch import AgentState, Dispatcher, EndpointQueue
from heartline.server._events import (
    AgentCapacity,
    AgentConnected,
    AgentLost,
    AgentReported,
    DispatchItem,
    Event,
    GroupChanged,
    GroupCommanded,
    Instruction,
    NotifyWatchers,
    Persist,
    SendAcks,
    SendCancels,
    SendDispatches,
    StatusReport,
    TaskChanged,
    TasksCommanded,
    TasksSubmitted,
    Tick,
)
from heartline.server._group_steps import GroupSteps
from heartline.server._groups import status_of
from heartline.server._lifecycle import (
    COMMAND_WORDS,
    COMMANDS,
    NO_ACTION,
    TRANSITIONS,
    InputsMoved,
    InvalidTransition,
    Row,
    SchedulerError,
    UnknownGroup,
    UnknownTasks,
    finish_of_command,
)
from heartline.server._model import (
    FAILURE_ENDPOINT_LOST,
    FAILURE_NONE,
    FAILURE_SERIALIZATION,
    FAILURE_WALLTIME,
    FAILURE_WORKER_DIED,
    ErrorInfo,
    GroupRow,
    GroupStateRow,
    OutputRow,
    RequestRow,
    Standing,
    States,
    TaskRecord,
    TaskRow,
    TransitionRow,
    WriteBatch,
)

__all__ = [
    "COMMANDS",
    "COMMAND_WORDS",
    "AgentState",
    "InputsMoved",
    "InvalidTransition",
    "Scheduler",
    "SchedulerConfig",
    "SchedulerError",
    "UnknownGroup",
    "UnknownTasks",
]

# The table under its old name: tests check recorded histories against it.
_TRANSITIONS = TRANSITIONS

log = logging.getLogger("heartline.scheduler")

S = States
_EVICTED_STATES = frozenset({S.SUCCEEDED, S.FAILED, S.CANCELLED, S.SKIPPED})
_COUNTED_STATES = (*PENDING_STATES, S.ERRORED)
"""States whose tasks are all held here (so their counts can be checked exactly)."""
_FAILURE_CAUSE = {
    FAILURE_WORKER_DIED: "worker-died",
    FAILURE_WALLTIME: "walltime-exceeded",
    FAILURE_ENDPOINT_LOST: "endpoint-lost",
    FAILURE_SERIALIZATION: "serialization-error",
}
_ORDER = {
    state: i
    for i, state in enumerate((S.DISPATCHED, S.WAITING_FOR_NODES, S.WAITING_FOR_LAUNCH, S.RUNNING))
}
_REPORT_CAUSE = {
    S.WAITING_FOR_NODES: "ack",
    S.WAITING_FOR_LAUNCH: "worker-assigned",
    S.RUNNING: "worker-started",
}
_FUNCTION_IDS_KEPT = 4096
"""How many function ids the scheduler keeps one copy of (forgets them all past that)."""
_PROGRESS = {state: _ORDER[state] for state in _REPORT_CAUSE}
"""The progress reports an agent sends for a task it holds, by how far each one is."""
_FRESH, _LOST, _ORPHANED = Standing.FRESH, Standing.LOST, Standing.ORPHANED
_SUCCEEDED, _SKIPPED = S.SUCCEEDED, S.SKIPPED
_new_tuple = tuple.__new__
"""Makes a NamedTuple from a tuple without its Python ``__new__`` (once per transition)."""
_snapshot = TaskRecord.snapshot


def _plan(start: TaskState | None, finish: TaskState, row: Row) -> tuple[object, ...]:
    """A table row as _transition unpacks it: its action (None for a no-op); what the
    move means for the counts (+1 into the pending states, -1 out of them), for the
    watchers (settled) and for the tasks held (evicted); and the row's effects, None if
    it has none beyond the task's fields."""
    moves = any(
        (
            row.leave_queue,
            row.enter_queue,
            row.bind_agent,
            row.unbind_agent,
            row.cancel_on_agent,
            row.next_attempt,
            row.write_off_lost,
            row.keep_standing,
        )
    )
    return (
        None if row.action is NO_ACTION else row.action,
        (finish in PENDING_STATES) - (start is not None and start in PENDING_STATES),
        finish not in PENDING_STATES,
        finish in _EVICTED_STATES,
        tuple(row[1:]) if moves else None,
    )


_PLANS: dict[TaskState | None, dict[TaskState, tuple[Any, ...]]] = {}
"""The transition table compiled for _transition: ``_PLANS[start][finish]``, by start
state first (no key tuple to build per transition)."""
for (_start, _finish), _row in TRANSITIONS.items():
    _PLANS.setdefault(_start, {})[_finish] = _plan(_start, _finish, _row)
for _start in (None, *TaskState):
    _PLANS.setdefault(_start, {})


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    heartbeat_timeout: float = _defaults.heartbeat_timeout(_defaults.HEARTBEAT_INTERVAL)
    """Seconds without any message after which an agent is declared lost."""
    errored_retention: float = 7 * 24 * 3600.0
    """Seconds an ERRORED task waits for a retry before it is FAILED for good."""
    max_payload: int = _defaults.MAX_PAYLOAD
    """Largest result accepted from an agent, in bytes."""
    validate: bool = False
    """Check the invariants of what each step touched (on in tests; cheap enough to keep
    on with many tasks held)."""


@dataclass(slots=True)
class _Step:
    """What one call of handle() has produced so far."""

    new: dict[str, TaskRecord] = field(default_factory=dict)
    dirty: dict[str, TaskRecord] = field(default_factory=dict)
    transitions: list[TransitionRow] = field(default_factory=list)
    changes: list[TaskChanged] = field(default_factory=list)
    dispatches: dict[str, list[DispatchItem]] = field(default_factory=dict)
    cancels: dict[str, list[str]] = field(default_factory=dict)
    acks: dict[str, list[tuple[str, int]]] = field(default_factory=dict)
    endpoints: set[str] = field(default_factory=set)
    """Endpoints whose queue or credit changed: try to dispatch on them."""
    requests: list[RequestRow] = field(default_factory=list)
    """Client request ids to store with this step's changes (see RequestRow)."""
    touched: dict[str, TaskRecord] = field(default_factory=dict)
    """Tasks changed without a transition (orphans queued, tasks restored): with
    ``new`` and ``dirty``, what validate() checks."""
    agents: set[str] = field(default_factory=set)
    """Agents connected, lost, or whose in-flight set changed: what validate() checks."""
    new_groups: list[GroupRow] = field(default_factory=list)
    groups: dict[str, GroupRecord] = field(default_factory=dict)
    """Groups whose tasks moved: their state is stored and watchers told."""
    settled: list[tuple[str, bool]] = field(default_factory=list)
    """Tasks that settled this step, and whether they succeeded: their dependants move."""
    ready: list[str] = field(default_factory=list)
    """Tasks waiting for nothing any more: run or skip them (see _decide)."""
    skips: list[tuple[str, SkipReason]] = field(default_factory=list)
    """Queued DAG tasks of a stopping group (a retry, a release): skip them."""
    evicted: list[TaskRecord] = field(default_factory=list)
    """Tasks that settled for good this step: dropped once it is finished."""
    outputs: dict[str, tuple[str, str]] = field(default_factory=dict)
    """(stdout, stderr) of the attempts that ended this step, by task: stored in the
    step's batch, and never held past the step (see _keep_output)."""


class Scheduler(GroupSteps):
    """Owns every unsettled (and ERRORED) task; its dispatcher owns queues and agents."""

    def __init__(self, config: SchedulerConfig | None = None) -> None:
        self.config = config or SchedulerConfig()
        self.tasks: dict[str, TaskRecord] = {}
        self.dispatcher = Dispatcher()
        self.deps = Dependencies()
        """Who waits for whom, the groups held, and results passed along."""
        self._deadlines: list[tuple[float, str]] = []
        """(deadline, group id) of groups with a timeout, soonest first."""
        self._errored: list[tuple[float, str]] = []
        """(settle time, task id) of each move into ERRORED, oldest first: the tick's
        retention check pops what expired instead of scanning every task (a million
        queued tasks took tens of milliseconds a tick). An entry whose task has moved on
        since is dropped when popped."""
        self.orphans_until: float | None = None
        """After a restart: when ORPHANED tasks stop waiting for their agents (None once
        they were queued, or if there were none)."""
        self.transitions_total = 0
        # Figures for metrics, kept where transitions are recorded (a few dict operations
        # per transition, never a scan); read by a scrape on this loop.
        self.tasks_by_state: dict[TaskState, int] = dict.fromkeys(TaskState, 0)
        """Tasks in each state, evicted (settled) ones included; see restore()."""
        self.pending_by_owner: dict[str, int] = {}
        """Pending tasks by owner (owners with none absent): what the limit of pending
        tasks per user is checked against; kept in _transition, one step per transition."""
        self.dispatch_latency = Buckets(DISPATCH_LATENCY_BOUNDS)
        """Seconds from submission to each dispatch (a re-dispatch counts from the
        original submission too)."""
        self._dispatched_to: set[str] = set()
        self._function_ids: dict[str, str] = {}
        """One copy of each function id lately submitted, shared by the tasks that run it."""
        self._now = 0.0
        self._step = _Step()
        self._last = _Step()
        """The step finished last: what validate() checks by default."""

    @property
    def agents(self) -> dict[str, AgentState]:
        """Connected agents by id (read-only: the dispatcher changes them)."""
        return self.dispatcher.agents

    @property
    def queues(self) -> dict[str, EndpointQueue]:
        """Endpoint queues by endpoint id (read-only: the dispatcher changes them)."""
        return self.dispatcher.queues

    # ------------------------------------------------------------------ public API

    def handle(self, *events: Event) -> list[Instruction]:
        """Apply events in order and return the instructions they lead to.

        A command (TasksCommanded) is handled in a step of its own: its refusal must
        leave everything unchanged, which only a step of its own can promise.

        Raises:
            UnknownTasks, InvalidTransition: a command names tasks it cannot apply to;
                nothing was changed.
            ValueError: a command was combined with other events; nothing was changed.
        """
        if len(events) > 1 and any(isinstance(e, (TasksCommanded, GroupCommanded)) for e in events):
            raise ValueError("a command must be handled alone, in a step of its own")
        self._step = _Step()
        for event in events:
            self._now = event.time
            self._handlers[type(event)](self, event)
        step = self._step
        while True:
            self._settle_dependants()
            for endpoint_id in sorted(step.endpoints):
                self._dispatch(endpoint_id)
                if step.settled:
                    break
            # A task that errors at dispatch (its inputs refused, its lost attempts used
            # up) settles: its dependants and group move (a fail_fast group stops) before
            # anything more is dispatched.
            if not step.settled:
                break
        self._dispatched_to = set(self._step.dispatches)
        instructions = self._finish_step()
        if self.config.validate:
            self.validate()
        return instructions

    def restore(
        self,
        rows: Iterable[TaskRecord | TaskRow],
        time: float,
        counts: Mapping[TaskState, int] | None = None,
        groups: Iterable[
            tuple[GroupRow, GroupStateRow, Mapping[str, tuple[TaskState, SkipReason | None]]]
        ] = (),
        results: Mapping[str, tuple[TaskState, bytes | None]] | None = None,
        requirements: Mapping[str, str] | None = None,
    ) -> list[Instruction]:
        """Load unsettled tasks from the store after a restart (records as the store
        loads them, or rows).

        ``requirements`` names the Python minor version each bytecode-only function of
        the tasks needs (function id -> "major.minor"; the others run anywhere).

        ``counts`` (the store's tasks by state, settled ones included) seeds
        ``tasks_by_state``; without it only the loaded tasks are counted. ``groups`` are
        the pending groups with the stored state of each of their tasks; ``results`` the
        state and result of the settled tasks that loaded tasks take as inputs.

        Tasks that were on an agent go back to WAITING_FOR_EP ORPHANED: out of the queue
        for one heartbeat timeout, so their agent, if it still holds them, reclaims them
        when it says hello again (see _reclaim); the rest are queued on the first Tick
        after that, so a task is not run twice just because its agent reconnected late.
        Waiting tasks stored as interrupted (their agent was lost before the restart and
        may still hold them) wait the same way.
        """
        self._step = _Step()
        self._now = time
        rows = list(rows)
        for group_row, state_row, members in groups:
            group = GroupRecord.restored(group_row, state_row, members)
            self.deps.groups[group.group_id] = group
            self._step.groups[group.group_id] = group
            if group.deadline is not None and not group.counts.settled:
                heapq.heappush(self._deadlines, (group.deadline, group.group_id))
        by_state = self.tasks_by_state = dict.fromkeys(TaskState, 0)
        if counts is not None:
            by_state.update(counts)
        pending = self.pending_by_owner = {}
        orphans = False
        # Rows come with their own copy of every string: share the ones many tasks have
        # in common (a million restored tasks would keep three copies each). A store's
        # records share them already.
        shared: dict[str, str] = {}
        validate = self.config.validate
        tasks = self.tasks
        enqueue = self.dispatcher.enqueue
        with_dependencies = []
        # One pass, and nothing per task it does not need: a restart with a million
        # queued tasks spends seconds here.
        for row in rows:
            if type(row) is TaskRecord:
                task = row
            else:
                task = row.to_record()
                task.endpoint_id = shared.setdefault(task.endpoint_id, task.endpoint_id)
                task.function_id = shared.setdefault(task.function_id, task.function_id)
                task.owner = shared.setdefault(task.owner, task.owner)
            state = task.state
            if state in PENDING_STATES:
                pending[task.owner] = pending.get(task.owner, 0) + 1
            if counts is None:
                by_state[state] += 1
            if requirements:
                task.python = requirements.get(task.function_id, "")
            tasks[task.task_id] = task
            if validate:  # what validate() looks at; a dict entry a task otherwise
                self._step.touched[task.task_id] = task
            if state == S.WAITING_FOR_EP:
                if task.standing is _LOST:
                    # Loading, not a transition: the store keeps "not FRESH" only, and a
                    # waiting task whose agent may still hold it is an orphan after a
                    # restart.
                    task.standing = _ORPHANED
                    orphans = True
                else:
                    enqueue(task)
            elif state in ON_AGENT_STATES:
                self._transition(
                    task, S.WAITING_FOR_EP, "server-restarted", time, standing=_ORPHANED
                )
                orphans = True
            elif state == S.ERRORED and task.settle_time is not None:
                self._errored.append((task.settle_time, task.task_id))
            if task.inputs or S.WAITING_FOR_DEPS in (state, task.held_from):
                with_dependencies.append(task)
        heapq.heapify(self._errored)
        self.orphans_until = time + self.config.heartbeat_timeout if orphans else None
        # After every task is in: a task's inputs and parents may come after it.
        for task in with_dependencies:
            self._restore_dependencies(task, results or {})
        self._settle_dependants()

        instructions = self._finish_step()
        if self.config.validate:
            self.validate()
        return instructions

    def waiting_reason(self, task_id: str) -> str:
        """Why a pending task is waiting, in words an operator can act on."""
        task = self.tasks.get(task_id)
        if task is None or task.state not in PENDING_STATES:
            return ""
        if task.state == S.HELD:
            return "held: release it to run"
        if task.state == S.WAITING_FOR_DEPS:
            return self._waiting_for(task)
        if task.standing is Standing.ORPHANED:
            return "waiting for its agent to reconnect after a server restart"
        if task.state == S.WAITING_FOR_EP:
            agents = self.dispatcher.agents_of(task.endpoint_id)
            if not agents:
                return "endpoint offline: no agent connected"
            unable = self.dispatcher.unable(task)
            if unable:
                return unable
            if all(a.credit <= 0 for a in agents):
                return "no free slot on the endpoint"
            return "queued for dispatch"
        if task.state == S.DISPATCHED:
            return "sent to the endpoint, not yet acknowledged"
        if task.state == S.WAITING_FOR_NODES:
            return "queued on the endpoint for a worker"
        if task.state == S.WAITING_FOR_LAUNCH:
            return "handed to a worker, not started"
        return ""

    def queued(self, endpoint_id: str) -> int:
        return self.dispatcher.queued(endpoint_id)

    # --------------------------------------------------------------- event handlers

    def _on_submitted(self, event: TasksSubmitted) -> None:
        step = self._step
        deps = self.deps
        group: GroupRecord | None = None
        settled_inputs = event.settled_inputs or {}
        if event.group is None:
            # Refuse before anything changes: an input settled since the caller looked.
            moved = [
                i
                for spec in event.tasks
                for i in spec.inputs
                if i not in self.tasks and i not in settled_inputs
            ]
            if moved:
                raise InputsMoved(list(dict.fromkeys(moved)))
        if event.request is not None:
            step.requests.append(event.request)
        if event.group is not None:
            new = event.group
            group_row = GroupRow(
                new.group_id,
                new.name,
                event.owner,
                event.endpoint_id,
                event.time,
                new.fail_fast,
                new.timeout,
                new.members,
            )
            group = GroupRecord(group_row)
            deps.groups[group.group_id] = group
            step.new_groups.append(group_row)
            step.groups[group.group_id] = group
            if group.deadline is not None:
                heapq.heappush(self._deadlines, (group.deadline, group.group_id))
        resubmitted = event.resubmitted_from or ("",) * len(event.tasks)
        # Each decoded request holds its own copy of every string: the ids this step
        # keeps (the function's, shared by most tasks) are shared, not kept per task.
        known = self._function_ids
        if len(known) > _FUNCTION_IDS_KEPT:
            known.clear()
        endpoint_id, owner, now = event.endpoint_id, event.owner, event.time
        session_id, stimulus = event.session_id, event.stimulus
        group_id = group.group_id if group is not None else ""
        tasks, new_tasks, transition = self.tasks, step.new, self._transition
        for spec, origin in zip(event.tasks, resubmitted, strict=True):
            parents: Iterable[str] = ()
            inputs = spec.inputs
            if group is not None:
                parents = group.parents_of(spec.name)
                waits = bool(parents) or group.shape[spec.name].is_finally
            else:
                waits = bool(inputs)
                if waits:
                    parents = self._plain_parents(spec.task_id, inputs, settled_inputs)
            finish = S.WAITING_FOR_DEPS if waits else S.WAITING_FOR_EP
            held_from = None
            if spec.held:
                held_from = finish if waits else None
                finish = S.HELD
            task_id = spec.task_id
            # Positional, in TaskRecord's field order (checked in _model.py): a dataclass
            # __init__ of 28 fields matches keywords at several times the cost.
            task = TaskRecord(
                task_id,
                endpoint_id,
                known.setdefault(spec.function_id, spec.function_id),
                spec.args,
                owner,
                finish,  # state: the submission row runs from None to here
                now,  # submit_time
                1,  # attempt
                spec.priority,
                spec.max_retries,
                spec.max_system_retries,
                spec.walltime,
                None,  # start_time
                None,  # settle_time
                held_from,
                None,  # result
                None,  # error
                0,  # raised_count
                0,  # system_failures
                origin,  # resubmitted_from
                group_id,
                False,  # payload_purged
                _FRESH,  # standing
                spec.name,
                inputs,
                None,  # skip_reason
                session_id,
                None,  # agent_id
                spec.python,
            )
            tasks[task_id] = task
            new_tasks[task_id] = task
            if parents:
                deps.wait_for(task_id, parents)
            if inputs:
                deps.take_inputs(task_id, inputs)
            transition(
                task, finish, f"resubmit of {origin}" if origin else stimulus, now, submitted=True
            )
            if finish == S.WAITING_FOR_DEPS and not parents:
                step.ready.append(task_id)  # inputs all settled already, or a finally task

    def _on_agent_connected(self, event: AgentConnected) -> None:
        old = self.agents.get(event.agent_id)
        if old is not None:
            # A second hello from one agent id: the old stream is dead; start over.
            self._lose_agent(old, event.time, "agent-reconnected")
        agent = AgentState(
            agent_id=event.agent_id,
            endpoint_id=event.endpoint_id,
            capacity=max(0, event.capacity),
            prefetch=max(0, event.prefetch),
            hostname=event.hostname,
            version=event.version,
            stream_id=event.stream_id,
            python=event.python,
            cloudpickle=event.cloudpickle,
        )
        self.dispatcher.connect(agent)
        self._step.agents.add(agent.agent_id)
        stale: list[str] = []
        for held in event.held:
            task = self.tasks.get(held.task_id)
            if (
                task is not None
                and task.state == S.WAITING_FOR_EP
                and task.endpoint_id == agent.endpoint_id
                and task.attempt == held.attempt
                and held.state in ON_AGENT_STATES
            ):
                self._reclaim(task, agent, held.state, event.time)
            elif task is not None and task.agent_id == agent.agent_id:
                continue
            else:
                stale.append(held.task_id)
        if stale:
            self._step.cancels.setdefault(agent.agent_id, []).extend(stale)
        self._step.endpoints.add(agent.endpoint_id)

    def _reclaim(self, task: TaskRecord, agent: AgentState, state: TaskState, now: float) -> None:
        """An agent that comes back still holds this task: it goes back to where it was,
        its attempt current again (FRESH: nothing written off, no new attempt)."""
        self._transition(
            task, state, "agent-reconnected", now, agent=agent, standing=Standing.FRESH
        )

    def _on_agent_lost(self, event: AgentLost) -> None:
        agent = self.agents.get(event.agent_id)
        if agent is not None and event.stream_id in ("", agent.stream_id):
            self._lose_agent(agent, event.time, event.cause)

    def _lose_agent(self, agent: AgentState, now: float, cause: str) -> None:
        self._step.agents.add(agent.agent_id)
        for task_id in self.dispatcher.disconnect(agent.agent_id):
            # The attempt may still run there: LOST, so the agent may reclaim it.
            self._transition(
                self.tasks[task_id], S.WAITING_FOR_EP, cause, now, standing=Standing.LOST
            )
        self._step.endpoints.add(agent.endpoint_id)

    def _on_agent_capacity(self, event: AgentCapacity) -> None:
        agent = self.agents.get(event.agent_id)
        if agent is None:
            return  # a stream already declared lost: its next hello says it again
        # Fewer slots than tasks held is allowed (credit goes negative): nothing is taken
        # back from the agent; it is sent nothing more until its tasks drain.
        agent.capacity = max(0, event.capacity)
        self._step.agents.add(agent.agent_id)
        self._step.endpoints.add(agent.endpoint_id)

    def _on_agent_reported(self, event: AgentReported) -> None:
        agent = self.agents.get(event.agent_id)
        if agent is None:
            # Reports on a stream already declared lost: its tasks were re-queued; the
            # agent says hello again on its next stream. Nothing here is acknowledged.
            return
        now = event.time
        agent_id = agent.agent_id
        tasks = self.tasks
        transition = self._transition
        max_payload = self.config.max_payload
        for report in event.reports:
            state = report.state
            order = _PROGRESS.get(state)
            if order is None:
                if state is S.SUCCEEDED:
                    # A current attempt's result within the limit (most terminal reports):
                    # _apply_report's rules for it, inlined.
                    task = tasks.get(report.task_id)
                    result = report.result or b""
                    if (
                        task is not None
                        and task.agent_id == agent_id
                        and task.attempt == report.attempt
                        and task.state in ON_AGENT_STATES
                        and len(result) <= max_payload
                    ):
                        self._step.acks.setdefault(agent_id, []).append(
                            (task.task_id, report.attempt)
                        )
                        if report.stdout or report.stderr or report.attempt > 1:
                            self._keep_output(report)
                        transition(task, S.SUCCEEDED, "returned", now, result=result)
                        continue
                self._apply_report(agent, report, now)
                continue
            # Progress (most reports): _apply_report's rules for a non-terminal report,
            # inlined, as this runs three times for every task.
            task = tasks.get(report.task_id)
            if task is not None and task.agent_id == agent_id and task.attempt == report.attempt:
                held = _ORDER.get(task.state)
                if held is not None:  # on this agent: the report is current
                    if order > held:
                        transition(task, state, _REPORT_CAUSE[state], now)
                    continue
            if task is None or task.agent_id != agent_id:
                self._step.cancels.setdefault(agent_id, []).append(report.task_id)

    def _apply_report(self, agent: AgentState, report: StatusReport, now: float) -> None:
        task = self.tasks.get(report.task_id)
        terminal = report.state in (S.SUCCEEDED, S.ERRORED)
        if (
            terminal
            and task is not None
            and task.state == S.WAITING_FOR_EP
            and task.standing is not Standing.FRESH
            and task.attempt == report.attempt
            and task.endpoint_id == agent.endpoint_id
        ):
            # The attempt we gave up on finished after all (its agent came back with the
            # result): take it back instead of running the task a second time.
            self._reclaim(task, agent, S.RUNNING, now)
        current = (
            task is not None
            and task.agent_id == agent.agent_id
            and task.attempt == report.attempt
            and task.state in ON_AGENT_STATES
        )
        if not current:
            # A late duplicate (an earlier attempt, or a task settled meanwhile): the
            # first terminal report won; acknowledge so the agent forgets it.
            if terminal:
                self._step.acks.setdefault(agent.agent_id, []).append(
                    (report.task_id, report.attempt)
                )
            elif task is None or task.agent_id != agent.agent_id:
                self._step.cancels.setdefault(agent.agent_id, []).append(report.task_id)
            return
        assert task is not None
        if not terminal:
            if report.state in (S.WAITING_FOR_NODES, S.WAITING_FOR_LAUNCH, S.RUNNING) and (
                _ORDER[report.state] > _ORDER[task.state]
            ):
                self._transition(task, report.state, _REPORT_CAUSE[report.state], now)
            return
        self._step.acks.setdefault(agent.agent_id, []).append((task.task_id, report.attempt))
        if report.stdout or report.stderr or report.attempt > 1:
            self._keep_output(report)
        if report.state == S.SUCCEEDED:
            result = report.result or b""
            if len(result) > self.config.max_payload:
                error = ErrorInfo(
                    "heartline.ResultTooLarge",
                    f"the result is {len(result)} bytes, over the payload limit of "
                    f"{self.config.max_payload} bytes",
                    "",
                    FAILURE_SERIALIZATION,
                )
                self._fail_attempt(task, error, now)
                return
            self._transition(task, S.SUCCEEDED, "returned", now, result=result)
            return
        error = report.error or ErrorInfo("heartline.UnknownError", "the agent reported no error")
        self._fail_attempt(task, error, now)

    def _keep_output(self, report: StatusReport) -> None:
        """Store what the attempt of a current terminal report wrote, with its task.

        It goes to the store in this step's batch (replacing an earlier attempt's) and is
        never held here, not even for the ERRORED tasks the scheduler keeps. A first
        attempt that wrote nothing is left out: there is nothing stored to replace, so
        most tasks cost nothing more.
        """
        self._step.outputs[report.task_id] = (report.stdout, report.stderr)

    def _fail_attempt(self, task: TaskRecord, error: ErrorInfo, now: float) -> None:
        kind = error.failure_kind
        if kind in (FAILURE_NONE, FAILURE_WALLTIME):
            # The task's own doing (SPEC section 3): run as is, it would raise or time out
            # again, so only the task's max_retries may run it again.
            task.raised_count += 1
            what = "walltime-exceeded" if kind == FAILURE_WALLTIME else f"raised {error.type_name}"
            if task.raised_count <= task.max_retries:
                cause = f"{what}; retry {task.raised_count} of {task.max_retries}"
                self._transition(task, S.WAITING_FOR_EP, cause, now, error=error)
            else:
                self._transition(task, S.ERRORED, what, now, error=error)
            return
        cause = _FAILURE_CAUSE.get(kind, "system-failure")
        if kind == FAILURE_SERIALIZATION:
            # Retrying cannot fix a payload that does not (un)pickle.
            self._transition(task, S.ERRORED, cause, now, error=error)
            return
        task.system_failures += 1
        if task.system_failures <= task.max_system_retries:
            self._transition(task, S.WAITING_FOR_EP, cause, now, error=error)
        else:
            message = (
                f"{error.message} (gave up after {task.system_failures} system failures; "
                f"max_system_retries is {task.max_system_retries})"
            )
            final = ErrorInfo(error.type_name, message, error.traceback, kind)
            self._transition(task, S.ERRORED, cause, now, error=final)

    def _on_commanded(self, event: TasksCommanded) -> None:
        tasks = self.tasks
        owner = event.owner
        unknown = [
            tid
            for tid in event.task_ids
            if tid not in tasks or (owner is not None and tasks[tid].owner != owner)
        ]
        if unknown:
            raise UnknownTasks(unknown)
        refusals: list[tuple[str, TaskState, str]] = []
        plan: list[tuple[TaskRecord, TaskState]] = []
        for task_id in dict.fromkeys(event.task_ids):
            task = self.tasks[task_id]
            finish = finish_of_command(event.command, task)
            if finish is None:
                refusals.append((task_id, task.state, COMMAND_WORDS[event.command]))
            else:
                plan.append((task, finish))
        if refusals:
            raise InvalidTransition(refusals)
        if event.request is not None:
            self._step.requests.append(event.request)
        for task, finish in plan:
            self._transition(task, finish, event.command, event.time)

    def _on_tick(self, event: Tick) -> None:
        if self.orphans_until is not None and event.time >= self.orphans_until:
            self._queue_orphans()
        deadlines = self._deadlines
        while deadlines and deadlines[0][0] <= event.time:
            _, group_id = heapq.heappop(deadlines)
            group = self.deps.groups.get(group_id)
            if group is not None and not group.counts.settled:
                group.timed_out = True
                self._stop_group(
                    group, SkipReason.GROUP_TIMED_OUT, cancel_running=True, cause="group-timed-out"
                )
        expiry = event.time - self.config.errored_retention
        errored = self._errored
        while errored and errored[0][0] < expiry:
            settle_time, task_id = heapq.heappop(errored)
            task = self.tasks.get(task_id)
            if task is not None and task.state == S.ERRORED and task.settle_time == settle_time:
                self._transition(task, S.FAILED, "errored-retention", event.time)

    def _queue_orphans(self) -> None:
        """Nobody reclaimed the orphans in time: their agents are gone; run them again.

        Not a transition (they stay WAITING_FOR_EP, nothing is stored: the stored column
        already says interrupted), so it changes the standing here, the one place besides
        the table and restore. A scan of every task, but once per restart.
        """
        self.orphans_until = None
        orphans = sorted(
            (t for t in self.tasks.values() if t.standing is Standing.ORPHANED),
            key=lambda t: t.task_id,
        )
        for task in orphans:
            task.standing = Standing.LOST
            self.dispatcher.enqueue(task)
            self._step.endpoints.add(task.endpoint_id)
            self._step.touched[task.task_id] = task

    _handlers: ClassVar[dict[type, Callable[[Scheduler, Event], None]]] = {
        TasksSubmitted: _on_submitted,
        AgentConnected: _on_agent_connected,
        AgentLost: _on_agent_lost,
        AgentCapacity: _on_agent_capacity,
        AgentReported: _on_agent_reported,
        TasksCommanded: _on_commanded,
        GroupCommanded: GroupSteps._on_group_commanded,
        Tick: _on_tick,
    }  # type: ignore[dict-item]

    # ------------------------------------------------------------------- dispatch

    def _dispatch(self, endpoint_id: str) -> None:
        now = self._now
        step = self._step
        tasks = self.tasks
        transition = self._transition
        observe = self.dispatch_latency.observe
        # The dispatches of this step to one agent, and that agent: one dict lookup per
        # run of tasks to the same agent, not one per task.
        items: list[DispatchItem] = []
        items_of: AgentState | None = None
        for task_id, agent in self.dispatcher.assignments(endpoint_id):
            task = tasks[task_id]
            if task.standing is _LOST and task.system_failures >= task.max_system_retries:
                # Writing its lost attempt off would be one system failure too many.
                lost = task.system_failures + 1
                error = ErrorInfo(
                    "heartline.EndpointLost",
                    f"the endpoint's agent was lost {lost} times while "
                    f"holding this task (max_system_retries is {task.max_system_retries})",
                    "",
                    FAILURE_ENDPOINT_LOST,
                )
                self._transition(task, S.ERRORED, "endpoint-lost", now, error=error)
                if step.settled:
                    return  # its dependants and group move first (handle() dispatches again)
                continue
            inputs: tuple[bytes, ...] = ()
            if task.inputs:
                inputs, error = self._inputs_of(task)
                if error is not None:
                    self._transition(task, S.ERRORED, "inputs-refused", now, error=error)
                    if step.settled:
                        return  # as above: a fail_fast group stops before more start
                    continue
            transition(task, S.DISPATCHED, "dispatch", now, agent=agent)
            observe(now - task.submit_time)
            if agent is not items_of:
                items = step.dispatches.setdefault(agent.agent_id, [])
                items_of = agent
            items.append(
                _new_tuple(
                    DispatchItem,
                    (task_id, task.attempt, task.function_id, task.args, task.walltime, inputs),
                )
            )

    # ---------------------------------------------------------------- transitions

    def _transition(
        self,
        task: TaskRecord,
        finish: TaskState,
        cause: str,
        now: float,
        *,
        result: bytes | None = None,
        error: ErrorInfo | None = None,
        agent: AgentState | None = None,
        standing: Standing | None = None,
        submitted: bool = False,
        skip: SkipReason | None = None,
    ) -> None:
        """Run the table's row for (task's state, finish); the one writer of a task's state.

        Args:
            result, error: the event's payload, for the row's action.
            agent: the agent a dispatch or reclaim binds the task to.
            standing: where the task's attempt stands after this move, when the caller
                knows better than the row: LOST or ORPHANED (its agent lost, a restart:
                the attempt may still run, so it is not over), FRESH (a reclaim: the
                attempt is current again, nothing is written off).
            submitted: the task is new; the row is a submission row (start None).
            skip: why a task moving to SKIPPED is skipped.
        """
        start = None if submitted else task.state
        plan = _PLANS[start].get(finish)
        if plan is None:
            raise InvalidTransition(
                [(task.task_id, task.state, f"moved to {finish.value} by {cause}")]
            )
        # Unpacked at once: cheaper than attribute reads, for every transition.
        action, pending_delta, settled, evicted, effects = plan
        step = self._step
        if effects is not None:
            leave_queue, enter_queue, bind, unbind, cancel, next_attempt, write_off, keep = effects
            dispatcher = self.dispatcher
            # Leave the start state.
            if leave_queue:
                dispatcher.dequeue(task)
            if unbind:
                left = dispatcher.unbind(task)
                if left is not None:
                    step.agents.add(left.agent_id)
                    step.endpoints.add(left.endpoint_id)
                    if cancel:
                        step.cancels.setdefault(left.agent_id, []).append(task.task_id)
            if action is not None:
                action(task, now, result, error, skip)
            # Where its attempt stands, and the one place the attempt number moves on.
            was = task.standing
            written_off = write_off and was is _LOST and standing is None
            if standing is None:
                if not keep:
                    standing = _FRESH
                else:
                    standing = _LOST if was is _ORPHANED else was
            if written_off:
                task.system_failures += 1
            if next_attempt and (written_off if leave_queue else standing is _FRESH):
                task.attempt += 1
            task.standing = standing
            task.state = finish
            # Enter the finish state.
            if enter_queue and standing is not _ORPHANED:
                dispatcher.enqueue(task)
                step.endpoints.add(task.endpoint_id)
            if bind:
                assert agent is not None, f"{start}->{finish} needs an agent"
                dispatcher.bind(task, agent)
                step.agents.add(agent.agent_id)
        else:
            # A row with no effects (progress on an agent, most settling moves of a task
            # not on one): its action, and the task is FRESH unless told otherwise.
            if action is not None:
                action(task, now, result, error, skip)
            task.standing = _FRESH if standing is None else standing
            task.state = finish

        # Record it: the transition row, the counts, the change watchers see.
        task_id = task.task_id
        attempt = task.attempt
        step.transitions.append(
            _new_tuple(TransitionRow, (task_id, start, finish, cause, now, attempt))
        )
        by_state = self.tasks_by_state
        by_state[finish] += 1
        if start is not None:
            by_state[start] -= 1
        if finish is S.ERRORED and task.settle_time is not None:
            heapq.heappush(self._errored, (task.settle_time, task_id))
        if task_id not in step.new:
            step.dirty[task_id] = task
        if pending_delta:
            # Into the pending states (a submission row starts from none), or out of them.
            pending = self.pending_by_owner
            owner = task.owner
            if pending_delta < 0:
                left_pending = pending[owner] - 1
                if left_pending:
                    pending[owner] = left_pending
                else:
                    del pending[owner]
            else:
                pending[owner] = pending.get(owner, 0) + 1
        step.changes.append(
            _new_tuple(
                TaskChanged,
                (
                    task_id,
                    task.session_id,
                    finish,
                    attempt,
                    cause,
                    now,
                    task.result if finish is _SUCCEEDED else None,
                    task.error if settled else None,
                    task.skip_reason if finish is _SKIPPED else None,
                    task.group_id,
                ),
            )
        )
        if evicted:
            step.evicted.append(task)
        # Plain tasks nobody waits for pay two lookups here, and only when they settle.
        if (
            task.group_id
            or task.inputs
            or (settled and (task_id in self.deps.children or task_id in self.deps.consumers))
        ):
            self._follow(task, start, finish)

    def _finish_step(self) -> list[Instruction]:
        step = self._step
        out: list[Instruction] = []
        group_changes: list[GroupChanged] = []
        for group in step.groups.values():
            seen = (group.status, group.pending)
            if seen != group.notified:
                group.notified = seen
                group_changes.append(GroupChanged(group.group_id, seen[0], seen[1], self._now))
            if not group.pending:
                self.deps.groups.pop(group.group_id, None)
        self.transitions_total += len(step.transitions)
        batch = WriteBatch(
            new_tasks=tuple(map(_snapshot, step.new.values())),
            task_updates=tuple(map(_snapshot, step.dirty.values())),
            transitions=tuple(step.transitions),
            requests=tuple(step.requests),
            new_groups=tuple(step.new_groups),
            group_states=tuple(g.state_row() for g in step.groups.values()),
            outputs=tuple(OutputRow(t, *output) for t, output in step.outputs.items())
            if step.outputs
            else (),
        )
        if batch:
            out.append(Persist(batch))
        # Cancels before dispatches: a cancel always concerns an attempt older than any
        # dispatch of the same step, and the agent cancels by task id, so the other
        # order would end the attempt just sent (a reconnecting agent that claims an old
        # attempt of a task that is dispatched to it again).
        for agent_id, task_ids in step.cancels.items():
            out.append(SendCancels(agent_id, tuple(dict.fromkeys(task_ids))))
        for agent_id, items in step.dispatches.items():
            out.append(SendDispatches(agent_id, tuple(items)))
        for agent_id, acks in step.acks.items():
            out.append(SendAcks(agent_id, tuple(acks)))
        if step.changes or group_changes:
            out.append(NotifyWatchers(tuple(step.changes), tuple(group_changes)))
        tasks = self.tasks
        for task in step.evicted:
            tasks.pop(task.task_id, None)
        self._last = step
        self._step = _Step()
        return out

    # ----------------------------------------------------------------- invariants

    def validate(self, full: bool = False) -> None:
        """Check the invariants; raise AssertionError if one is broken.

        By default only what the last step touched (its tasks, settled ones included,
        and its agents), plus global counts that cost a pass over the agents and queues,
        never over the tasks: so a server can keep it on with many tasks held.

        Args:
            full: check every task, agent and queue entry, and the exact count of each
                state (the pure tests do, after every step).
        """
        last = self._last
        if full:
            tasks: Iterable[tuple[str, TaskRecord]] = self.tasks.items()
            agents: Iterable[AgentState] = self.agents.values()
        else:
            touched = {**last.touched, **last.new, **last.dirty}
            tasks = touched.items()
            agents = [self.agents[a] for a in last.agents if a in self.agents]
        for task_id, task in tasks:
            self._check_task(task_id, task)
        agents = list(agents)
        self.dispatcher.check_index(None if full else agents)
        for agent in agents:
            # Reclaims may leave an agent over its credit (it came back holding more than
            # it has slots, e.g. finished results not yet acked); dispatch never does.
            assert agent.credit >= 0 or agent.agent_id not in self._dispatched_to, (
                f"agent {agent.agent_id} was dispatched to beyond its credit"
            )
            for task_id in agent.in_flight:
                task = self.tasks.get(task_id)
                assert task is not None and task.agent_id == agent.agent_id, (
                    f"{task_id} in the in-flight set of {agent.agent_id}, not bound to it"
                )
        self._check_counts(full)
        if full:
            self.deps.statuses_check()

    def _check_task(self, task_id: str, task: TaskRecord) -> None:
        queued = self.dispatcher.is_queued(task)
        if self.tasks.get(task_id) is not task:
            assert task_id not in self.tasks, f"{task_id} replaced by another record"
            assert task.state in _EVICTED_STATES, f"{task_id} {task.state} dropped unsettled"
            assert not queued and task.agent_id is None, f"{task_id} settled but still placed"
            return
        assert task.state not in _EVICTED_STATES, f"{task_id} settled but still held"
        expected = task.state == S.WAITING_FOR_EP and task.standing is not Standing.ORPHANED
        assert queued == expected, f"{task_id} queue mismatch ({task.state}, {task.standing})"
        if task.state in ON_AGENT_STATES:
            agent = self.agents.get(task.agent_id or "")
            assert agent is not None, f"{task_id} {task.state} without an agent"
            assert task_id in agent.in_flight, f"{task_id} not in its agent's in-flight set"
        else:
            assert task.agent_id is None, f"{task_id} {task.state} bound to an agent"
        if task.standing is Standing.ORPHANED:
            assert task.state == S.WAITING_FOR_EP, f"orphan {task_id} moved on"
            assert self.orphans_until is not None, f"orphan {task_id} without a deadline"
        elif task.standing is Standing.LOST:
            assert task.state in (S.WAITING_FOR_EP, S.HELD), f"lost {task_id} is {task.state}"
        if task.state == S.HELD:
            assert task.held_from in (S.WAITING_FOR_EP, S.WAITING_FOR_DEPS)
        if task.state == S.ERRORED and task.settle_time is not None:
            assert (task.settle_time, task_id) in self._errored, f"{task_id} not up for retention"
        assert task.attempt >= 1
        deps = self.deps
        group = deps.groups.get(task.group_id) if task.group_id else None
        # An ERRORED task outlives its group's record (its group settled with it).
        assert not task.group_id or group is not None or task.state == S.ERRORED, (
            f"{task_id} held, its group {task.group_id} not"
        )
        if task.state == S.WAITING_FOR_DEPS:
            if group is not None and group.shape[task.name].is_finally:
                assert not group.counts.settled, (
                    f"finally task {task_id} still waits for a settled DAG"
                )
            else:
                assert deps.waiting.get(task_id, 0) > 0, f"{task_id} waits for deps, but for none"
        if group is not None and task.name in group.statuses:
            assert group.statuses[task.name] == status_of(task.state), f"{task_id} status drifted"
        for input_id in task.inputs:
            assert input_id in deps.consumers, f"{task_id} takes {input_id}, which nobody keeps"

    def _check_counts(self, full: bool) -> None:
        by_state = self.tasks_by_state
        assert min(by_state.values()) >= 0, f"negative count: {by_state}"
        # Every pending or ERRORED task is held here, so their counts are exact. Cheaply:
        # their sum; fully (or to name the state that drifted): each one.
        if full or sum(by_state[s] for s in _COUNTED_STATES) != len(self.tasks):
            held = dict.fromkeys(TaskState, 0)
            for task in self.tasks.values():
                held[task.state] += 1
            for state in _COUNTED_STATES:
                assert by_state[state] == held[state], (
                    f"{by_state[state]} tasks counted {state.value}, {held[state]} held"
                )
        pending = self.pending_by_owner
        in_pending = sum(by_state[s] for s in PENDING_STATES)
        assert sum(pending.values()) == in_pending and min(pending.values(), default=1) > 0, (
            f"pending tasks by owner {pending} do not add up to the {in_pending} pending"
        )
        if full:
            owners: dict[str, int] = {}
            for task in self.tasks.values():
                if task.state in PENDING_STATES:
                    owners[task.owner] = owners.get(task.owner, 0) + 1
            assert owners == pending, f"pending by owner {pending}, held {owners}"
        on_agents = sum(len(a.in_flight) for a in self.agents.values())
        assert on_agents == sum(by_state[s] for s in ON_AGENT_STATES), (
            f"{on_agents} tasks in agents' in-flight sets, "
            f"{sum(by_state[s] for s in ON_AGENT_STATES)} counted on agents"
        )
        queued = sum(len(q) for q in self.queues.values())
        waiting = by_state[S.WAITING_FOR_EP]
        assert queued <= waiting, f"{queued} queued, {waiting} waiting"
        if full:
            for endpoint_id, queue in self.queues.items():
                for task_id in (*queue.live, *queue.parked, *queue.deferred):
                    task = self.tasks.get(task_id)
                    assert task is not None and task.endpoint_id == endpoint_id, f"stale {task_id}"
                for task_id, python in queue.needs.items():
                    assert task_id in queue and self.tasks[task_id].python == python, task_id
