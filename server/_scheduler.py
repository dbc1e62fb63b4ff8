"""The scheduler core: a pure state machine over tasks and agents.

``Scheduler.handle(*events) -> list[Instruction]``. No I/O and no awaits happen here: the
servicers feed events in, and carry the returned instructions out (store writes, stream
sends, watcher pushes). Every state change goes through :meth:`Scheduler._transition`,
which looks the ``(start, finish)`` pair up in ``_TRANSITIONS`` and refuses any pair not
in it; it records each transition with its cause and time in the same store batch.
"""

from __future__ import annotations

import heapq
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from heartline import _defaults
from heartline._states import ON_AGENT_STATES, PENDING_STATES, TaskState
from heartline.server._events import (
    AgentConnected,
    AgentLost,
    AgentReported,
    AgentSeen,
    CloseAgent,
    DispatchItem,
    Event,
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
from heartline.server._model import (
    FAILURE_ENDPOINT_LOST,
    FAILURE_NONE,
    FAILURE_SERIALIZATION,
    FAILURE_WALLTIME,
    FAILURE_WORKER_DIED,
    ErrorInfo,
    TaskRecord,
    TaskRow,
    TransitionRow,
    WriteBatch,
)

log = logging.getLogger("heartline.scheduler")

S = TaskState
_EVICTED_STATES = frozenset({S.SUCCEEDED, S.FAILED, S.CANCELLED, S.SKIPPED})
_FAILURE_CAUSE = {
    FAILURE_WORKER_DIED: "worker-died",
    FAILURE_WALLTIME: "walltime-exceeded",
    FAILURE_ENDPOINT_LOST: "endpoint-lost",
    FAILURE_SERIALIZATION: "serialization-error",
}


class SchedulerError(Exception):
    """Base of the errors the scheduler refuses a command with."""


class InvalidTransition(SchedulerError):
    """An event that the transition table does not allow; nothing was changed."""

    def __init__(self, refusals: list[tuple[str, TaskState, str]]) -> None:
        self.refusals = refusals
        shown = "; ".join(
            f"task {tid} is {state.value}, so it cannot be {event}" for tid, state, event in refusals[:5]
        )
        more = f" (and {len(refusals) - 5} more)" if len(refusals) > 5 else ""
        super().__init__(shown + more)


class UnknownTasks(SchedulerError):
    """Some tasks are not in the scheduler (settled long ago, or never existed)."""

    def __init__(self, task_ids: list[str]) -> None:
        self.task_ids = task_ids
        super().__init__(f"unknown tasks: {', '.join(task_ids[:5])}")


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    heartbeat_timeout: float = _defaults.heartbeat_timeout(_defaults.HEARTBEAT_INTERVAL)
    """Seconds without any message after which an agent is declared lost."""
    errored_retention: float = 7 * 24 * 3600.0
    """Seconds an ERRORED task waits for a retry before it is FAILED for good."""
    max_payload: int = _defaults.MAX_PAYLOAD
    """Largest result accepted from an agent, in bytes."""
    validate: bool = False
    """Check every invariant after each step (on in tests; costs time)."""


@dataclass(slots=True)
class AgentState:
    agent_id: str
    endpoint_id: str
    capacity: int
    prefetch: int
    last_seen: float
    hostname: str = ""
    version: str = ""
    stream_id: str = ""
    in_flight: set[str] = field(default_factory=set)

    @property
    def credit(self) -> int:
        return self.capacity + self.prefetch - len(self.in_flight)


class _Queue:
    """WAITING_FOR_EP tasks of one endpoint: highest priority first, then oldest.

    Lazy deletion: a heap entry is live only while ``live[task_id]`` holds its seq.
    """

    __slots__ = ("heap", "live", "seq")

    def __init__(self) -> None:
        self.heap: list[tuple[int, float, int, str]] = []
        self.live: dict[str, int] = {}
        self.seq = 0

    def push(self, task: TaskRecord) -> None:
        self.seq += 1
        self.live[task.task_id] = self.seq
        heapq.heappush(self.heap, (task.priority, task.submit_time, self.seq, task.task_id))

    def discard(self, task_id: str) -> None:
        self.live.pop(task_id, None)
        if len(self.heap) > 2 * len(self.live) + 1024:
            # Mostly dead entries (cancels, holds on an endpoint nobody serves): rebuild,
            # so the heap does not grow without bound.
            self.heap = [e for e in self.heap if self.live.get(e[3]) == e[2]]
            heapq.heapify(self.heap)

    def pop(self) -> str | None:
        heap, live = self.heap, self.live
        while heap:
            _, _, seq, task_id = heapq.heappop(heap)
            if live.get(task_id) == seq:
                del live[task_id]
                return task_id
        return None

    def __len__(self) -> int:
        return len(self.live)


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
    closes: list[CloseAgent] = field(default_factory=list)
    endpoints: set[str] = field(default_factory=set)
    """Endpoints whose queue or credit changed: try to dispatch on them."""


class Scheduler:
    """Owns every unsettled (and ERRORED) task and every connected agent."""

    def __init__(self, config: SchedulerConfig | None = None) -> None:
        self.config = config or SchedulerConfig()
        self.tasks: dict[str, TaskRecord] = {}
        self.agents: dict[str, AgentState] = {}
        self.queues: dict[str, _Queue] = {}
        self.orphans: set[str] = set()
        """After a restart: tasks that were on an agent, waiting (unqueued) to be reclaimed."""
        self.orphans_until = 0.0
        self.transitions_total = 0
        self._dispatched_to: set[str] = set()
        self._now = 0.0
        self._step = _Step()

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
        if len(events) > 1 and any(isinstance(e, TasksCommanded) for e in events):
            raise ValueError("a command must be handled alone, in a step of its own")
        self._step = _Step()
        for event in events:
            self._now = event.time
            self._handlers[type(event)](self, event)
        for endpoint_id in sorted(self._step.endpoints):
            self._dispatch(endpoint_id)
        self._dispatched_to = set(self._step.dispatches)
        instructions = self._finish_step()
        if self.config.validate:
            self.validate()
        return instructions

    def restore(self, rows: Iterable[TaskRow], time: float) -> list[Instruction]:
        """Load unsettled tasks from the store after a restart.

        Tasks that were on an agent go back to WAITING_FOR_EP but stay out of the queue
        for one heartbeat timeout: their agent, if it still holds them, reclaims them
        when it says hello again (see _reclaim); the rest are queued on the first Tick
        after that, so a task is not run twice just because its agent reconnected late.
        """
        self._step = _Step()
        self._now = time
        self.orphans_until = time + self.config.heartbeat_timeout
        for row in rows:
            task = row.to_record()
            self.tasks[task.task_id] = task
            if task.state in ON_AGENT_STATES:
                task.interrupted = True
                self._transition(task, S.WAITING_FOR_EP, "server-restarted", time)
                self._queue(task.endpoint_id).discard(task.task_id)
                self.orphans.add(task.task_id)
            elif task.state == S.WAITING_FOR_EP and task.interrupted:
                # Its agent was lost before the restart and may still hold it.
                self.orphans.add(task.task_id)
            elif task.state == S.WAITING_FOR_EP:
                self._queue(task.endpoint_id).push(task)

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
        if task.task_id in self.orphans:
            return "waiting for its agent to reconnect after a server restart"
        if task.state == S.WAITING_FOR_EP:
            agents = [a for a in self.agents.values() if a.endpoint_id == task.endpoint_id]
            if not agents:
                return "endpoint offline: no agent connected"
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
        queue = self.queues.get(endpoint_id)
        return len(queue) if queue else 0

    # --------------------------------------------------------------- event handlers

    def _on_submitted(self, event: TasksSubmitted) -> None:
        resubmitted = event.resubmitted_from or ("",) * len(event.tasks)
        for spec, origin in zip(event.tasks, resubmitted, strict=True):
            task = TaskRecord(
                task_id=spec.task_id,
                endpoint_id=event.endpoint_id,
                function_id=spec.function_id,
                args=spec.args,
                owner=event.owner,
                state=S.WAITING_FOR_EP,
                submit_time=event.time,
                priority=spec.priority,
                max_retries=spec.max_retries,
                max_system_retries=spec.max_system_retries,
                walltime=spec.walltime,
                resubmitted_from=origin,
                session_id=event.session_id,
            )
            cause = f"resubmit of {origin}" if origin else event.stimulus
            self.tasks[task.task_id] = task
            self._step.new[task.task_id] = task
            if spec.held:
                task.state = S.HELD
                task.held_from = S.WAITING_FOR_EP
            else:
                self._queue(task.endpoint_id).push(task)
                self._step.endpoints.add(task.endpoint_id)
            self._record(task, None, task.state, cause, event.time)

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
            last_seen=event.time,
            hostname=event.hostname,
            version=event.version,
            stream_id=event.stream_id,
        )
        self.agents[agent.agent_id] = agent
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
        """An agent that comes back still holds this task: it goes back to where it was."""
        self._queue(task.endpoint_id).discard(task.task_id)
        task.interrupted = False
        self.orphans.discard(task.task_id)
        task.agent_id = agent.agent_id
        agent.in_flight.add(task.task_id)
        self._transition(task, state, "agent-reconnected", now)

    def _on_agent_lost(self, event: AgentLost) -> None:
        agent = self.agents.get(event.agent_id)
        if agent is not None and event.stream_id in ("", agent.stream_id):
            self._lose_agent(agent, event.time, event.cause)

    def _lose_agent(self, agent: AgentState, now: float, cause: str) -> None:
        del self.agents[agent.agent_id]
        for task_id in sorted(agent.in_flight):
            task = self.tasks[task_id]
            task.agent_id = None
            task.interrupted = True
            self._transition(task, S.WAITING_FOR_EP, cause, now)
        agent.in_flight.clear()
        self._step.endpoints.add(agent.endpoint_id)

    def _on_agent_seen(self, event: AgentSeen) -> None:
        agent = self.agents.get(event.agent_id)
        if agent is not None:
            agent.last_seen = event.time

    def _on_agent_reported(self, event: AgentReported) -> None:
        agent = self.agents.get(event.agent_id)
        if agent is None:
            # Reports on a stream already declared lost: its tasks were re-queued; the
            # agent says hello again on its next stream. Nothing here is acknowledged.
            return
        agent.last_seen = event.time
        for report in event.reports:
            self._apply_report(agent, report, event.time)

    def _apply_report(self, agent: AgentState, report: StatusReport, now: float) -> None:
        task = self.tasks.get(report.task_id)
        terminal = report.state in (S.SUCCEEDED, S.ERRORED)
        if (
            terminal
            and task is not None
            and task.state == S.WAITING_FOR_EP
            and task.interrupted
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
                self._step.acks.setdefault(agent.agent_id, []).append((report.task_id, report.attempt))
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

    def _fail_attempt(self, task: TaskRecord, error: ErrorInfo, now: float) -> None:
        kind = error.failure_kind
        if kind in (FAILURE_NONE, FAILURE_WALLTIME):
            # The task's own doing (SPEC section 3): run as is, it would raise or time out
            # again, so only the task's max_retries may run it again.
            task.raised_count += 1
            what = "walltime-exceeded" if kind == FAILURE_WALLTIME else f"raised {error.type_name}"
            if task.raised_count <= task.max_retries:
                cause = f"{what}; retry {task.raised_count} of {task.max_retries}"
                self._transition(task, S.WAITING_FOR_EP, cause, now, error=error, next_attempt=True)
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
            self._transition(task, S.WAITING_FOR_EP, cause, now, error=error, next_attempt=True)
        else:
            message = (
                f"{error.message} (gave up after {task.system_failures} system failures; "
                f"max_system_retries is {task.max_system_retries})"
            )
            final = ErrorInfo(error.type_name, message, error.traceback, kind)
            self._transition(task, S.ERRORED, cause, now, error=final)

    def _on_commanded(self, event: TasksCommanded) -> None:
        finish_of = _COMMANDS[event.command]
        unknown = [tid for tid in event.task_ids if tid not in self.tasks]
        if unknown:
            raise UnknownTasks(unknown)
        refusals: list[tuple[str, TaskState, str]] = []
        plan: list[tuple[TaskRecord, TaskState]] = []
        for task_id in dict.fromkeys(event.task_ids):
            task = self.tasks[task_id]
            finish = finish_of(task)
            if finish is None or (task.state, finish) not in _TRANSITIONS:
                refusals.append((task_id, task.state, COMMAND_WORDS[event.command]))
            else:
                plan.append((task, finish))
        if refusals:
            raise InvalidTransition(refusals)
        for task, finish in plan:
            self._transition(task, finish, event.command, event.time)

    def _on_tick(self, event: Tick) -> None:
        if self.orphans and event.time >= self.orphans_until:
            # Nobody reclaimed them in time: their agents are gone; run them again.
            for task_id in sorted(self.orphans):
                task = self.tasks[task_id]
                self._queue(task.endpoint_id).push(task)
                self._step.endpoints.add(task.endpoint_id)
            self.orphans.clear()
        deadline = event.time - self.config.heartbeat_timeout
        for agent in [a for a in self.agents.values() if a.last_seen < deadline]:
            log.warning("agent %s silent since %.1fs: lost", agent.agent_id, agent.last_seen)
            self._lose_agent(agent, event.time, "heartbeat-timeout")
            self._step.closes.append(
                CloseAgent(agent.agent_id, "no heartbeat within the timeout", agent.stream_id)
            )
        expiry = event.time - self.config.errored_retention
        for task in [t for t in self.tasks.values() if t.state == S.ERRORED]:
            if task.settle_time is not None and task.settle_time < expiry:
                self._transition(task, S.FAILED, "errored-retention", event.time)

    _handlers: dict[type, Callable[[Scheduler, Event], None]] = {
        TasksSubmitted: _on_submitted,
        AgentConnected: _on_agent_connected,
        AgentLost: _on_agent_lost,
        AgentSeen: _on_agent_seen,
        AgentReported: _on_agent_reported,
        TasksCommanded: _on_commanded,
        Tick: _on_tick,
    }  # type: ignore[dict-item]

    # ------------------------------------------------------------------- dispatch

    def _dispatch(self, endpoint_id: str) -> None:
        queue = self.queues.get(endpoint_id)
        if not queue:
            return
        agents = [a for a in self.agents.values() if a.endpoint_id == endpoint_id and a.credit > 0]
        now = self._now
        while agents and queue:
            # Spread by free credit: the agent with the most free slots takes the next task.
            agent = max(agents, key=lambda a: a.credit)
            task_id = queue.pop()
            if task_id is None:
                break
            task = self.tasks[task_id]
            if task.interrupted:
                # Its last attempt went with a lost agent: that counts as a system failure.
                task.system_failures += 1
                if task.system_failures > task.max_system_retries:
                    error = ErrorInfo(
                        "heartline.EndpointLost",
                        f"the endpoint's agent was lost {task.system_failures} times while "
                        f"holding this task (max_system_retries is {task.max_system_retries})",
                        "",
                        FAILURE_ENDPOINT_LOST,
                    )
                    self._transition(task, S.ERRORED, "endpoint-lost", now, error=error)
                    continue
                task.attempt += 1
                task.interrupted = False
            task.agent_id = agent.agent_id
            agent.in_flight.add(task_id)
            self._transition(task, S.DISPATCHED, "dispatch", now)
            self._step.dispatches.setdefault(agent.agent_id, []).append(
                DispatchItem(task_id, task.attempt, task.function_id, task.args, task.walltime)
            )
            if agent.credit <= 0:
                agents.remove(agent)

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
        next_attempt: bool = False,
    ) -> None:
        start = task.state
        action = _TRANSITIONS.get((start, finish))
        if action is None:
            raise InvalidTransition([(task.task_id, start, f"moved to {finish.value} by {cause}")])
        # Leave the start state.
        if finish not in (S.WAITING_FOR_EP, S.HELD, S.DISPATCHED):
            # Held or queued, an interrupted task stays so: its next dispatch is a new
            # attempt (and _dispatch clears the mark when it makes one).
            task.interrupted = False
        if start == S.WAITING_FOR_EP:
            self._queue(task.endpoint_id).discard(task.task_id)
            self.orphans.discard(task.task_id)
        elif start in ON_AGENT_STATES and finish not in ON_AGENT_STATES:
            agent = self.agents.get(task.agent_id or "")
            if agent is not None:
                agent.in_flight.discard(task.task_id)
                self._step.endpoints.add(agent.endpoint_id)
                if finish == S.CANCELLED:
                    self._step.cancels.setdefault(agent.agent_id, []).append(task.task_id)
            task.agent_id = None
        action(task, now)
        if result is not None:
            task.result = result
        if error is not None:
            task.error = error
        if next_attempt:
            task.attempt += 1
        task.state = finish
        if finish == S.WAITING_FOR_EP:
            self._queue(task.endpoint_id).push(task)
            self._step.endpoints.add(task.endpoint_id)
        self._record(task, start, finish, cause, now)

    def _record(
        self, task: TaskRecord, start: TaskState | None, finish: TaskState, cause: str, now: float
    ) -> None:
        step = self._step
        step.transitions.append(TransitionRow(task.task_id, start, finish, cause, now, task.attempt))
        if task.task_id not in step.new:
            step.dirty[task.task_id] = task
        settled = finish not in PENDING_STATES
        step.changes.append(
            TaskChanged(
                task.task_id,
                task.session_id,
                finish,
                task.attempt,
                cause,
                now,
                task.result if finish == S.SUCCEEDED else None,
                task.error if settled else None,
            )
        )
        self.transitions_total += 1

    def _finish_step(self) -> list[Instruction]:
        step = self._step
        out: list[Instruction] = []
        batch = WriteBatch(
            new_tasks=tuple(t.snapshot() for t in step.new.values()),
            task_updates=tuple(t.snapshot() for t in step.dirty.values()),
            transitions=tuple(step.transitions),
        )
        if batch:
            out.append(Persist(batch))
        for agent_id, items in step.dispatches.items():
            out.append(SendDispatches(agent_id, tuple(items)))
        for agent_id, task_ids in step.cancels.items():
            out.append(SendCancels(agent_id, tuple(dict.fromkeys(task_ids))))
        out.extend(step.closes)
        for agent_id, acks in step.acks.items():
            out.append(SendAcks(agent_id, tuple(acks)))
        if step.changes:
            out.append(NotifyWatchers(tuple(step.changes)))
        for task in (*step.new.values(), *step.dirty.values()):
            if task.state in _EVICTED_STATES:
                self.tasks.pop(task.task_id, None)
        self._step = _Step()
        return out

    def _queue(self, endpoint_id: str) -> _Queue:
        queue = self.queues.get(endpoint_id)
        if queue is None:
            queue = self.queues[endpoint_id] = _Queue()
        return queue

    # ----------------------------------------------------------------- invariants

    def validate(self) -> None:
        """Check every invariant of the scheduler's state; raise AssertionError if broken."""
        for task_id, task in self.tasks.items():
            assert task.state not in _EVICTED_STATES, f"{task_id} settled but still held"
            queued = task_id in self._queue(task.endpoint_id).live
            expected = task.state == S.WAITING_FOR_EP and task_id not in self.orphans
            assert queued == expected, f"{task_id} queue mismatch"
            if task.state in ON_AGENT_STATES:
                agent = self.agents.get(task.agent_id or "")
                assert agent is not None, f"{task_id} {task.state} without an agent"
                assert task_id in agent.in_flight, f"{task_id} not in its agent's in-flight set"
            else:
                assert task.agent_id is None, f"{task_id} {task.state} bound to an agent"
            if task.state == S.HELD:
                assert task.held_from in (S.WAITING_FOR_EP, S.WAITING_FOR_DEPS)
            assert task.attempt >= 1
        for agent in self.agents.values():
            # Reclaims may leave an agent over its credit (it came back holding more than
            # it has slots, e.g. finished results not yet acked); dispatch never does.
            assert agent.credit >= 0 or agent.agent_id not in self._dispatched_to, (
                f"agent {agent.agent_id} was dispatched to beyond its credit"
            )
            for task_id in agent.in_flight:
                task = self.tasks.get(task_id)
                assert task is not None and task.agent_id == agent.agent_id
        for task_id, task in self.tasks.items():
            if task.interrupted:
                assert task.state in (S.WAITING_FOR_EP, S.HELD), f"interrupted {task_id}"
        for task_id in self.orphans:
            assert self.tasks[task_id].state == S.WAITING_FOR_EP, f"orphan {task_id} moved on"


# -------------------------------------------------------------- the transition table


def _noop(task: TaskRecord, now: float) -> None:
    pass


def _hold(task: TaskRecord, now: float) -> None:
    task.held_from = task.state


def _release(task: TaskRecord, now: float) -> None:
    task.held_from = None


def _start(task: TaskRecord, now: float) -> None:
    if task.start_time is None:
        task.start_time = now


def _settle(task: TaskRecord, now: float) -> None:
    task.settle_time = now
    task.held_from = None


def _succeed(task: TaskRecord, now: float) -> None:
    _settle(task, now)
    task.error = None  # an error of an earlier attempt is in the history, not the outcome


def _requeue(task: TaskRecord, now: float) -> None:
    task.settle_time = None


def _retry(task: TaskRecord, now: float) -> None:
    """An owner's retry of an ERRORED task: a fresh attempt with fresh retry budgets."""
    task.attempt += 1
    task.settle_time = None
    task.result = None
    task.error = None
    task.raised_count = 0
    task.system_failures = 0


_ON_AGENT = (S.DISPATCHED, S.WAITING_FOR_NODES, S.WAITING_FOR_LAUNCH, S.RUNNING)
_ORDER = {state: i for i, state in enumerate(_ON_AGENT)}
_REPORT_CAUSE = {
    S.WAITING_FOR_NODES: "ack",
    S.WAITING_FOR_LAUNCH: "worker-assigned",
    S.RUNNING: "worker-started",
}

_TRANSITIONS: dict[tuple[TaskState, TaskState], Callable[[TaskRecord, float], None]] = {
    # queue controls
    (S.WAITING_FOR_EP, S.HELD): _hold,
    (S.WAITING_FOR_DEPS, S.HELD): _hold,
    (S.HELD, S.WAITING_FOR_EP): _release,
    (S.HELD, S.WAITING_FOR_DEPS): _release,
    # dispatch, and an agent that comes back reclaiming what it holds
    (S.WAITING_FOR_EP, S.DISPATCHED): _noop,
    (S.WAITING_FOR_EP, S.WAITING_FOR_NODES): _noop,
    (S.WAITING_FOR_EP, S.WAITING_FOR_LAUNCH): _noop,
    (S.WAITING_FOR_EP, S.RUNNING): _start,
    # progress on the agent (a batch may skip a step: only forward moves are allowed)
    (S.DISPATCHED, S.WAITING_FOR_NODES): _noop,
    (S.DISPATCHED, S.WAITING_FOR_LAUNCH): _noop,
    (S.DISPATCHED, S.RUNNING): _start,
    (S.WAITING_FOR_NODES, S.WAITING_FOR_LAUNCH): _noop,
    (S.WAITING_FOR_NODES, S.RUNNING): _start,
    (S.WAITING_FOR_LAUNCH, S.RUNNING): _start,
    # outcomes of an attempt; a system failure or a raise with retries left re-queues
    **{(s, S.SUCCEEDED): _succeed for s in _ON_AGENT},
    **{(s, S.ERRORED): _settle for s in _ON_AGENT},
    **{(s, S.WAITING_FOR_EP): _requeue for s in _ON_AGENT},
    # a task whose agents were lost more often than max_system_retries allows
    (S.WAITING_FOR_EP, S.ERRORED): _settle,
    # cancel: any pending state
    **{(s, S.CANCELLED): _settle for s in PENDING_STATES},
    # after an error
    (S.ERRORED, S.WAITING_FOR_EP): _retry,
    (S.ERRORED, S.FAILED): _settle,
}

_COMMANDS: dict[str, Callable[[TaskRecord], TaskState | None]] = {
    "cancel": lambda t: S.CANCELLED,
    "hold": lambda t: S.HELD,
    "release": lambda t: t.held_from if t.state == S.HELD else None,
    "retry": lambda t: S.WAITING_FOR_EP if t.state == S.ERRORED else None,
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
