"""The scheduler core under random events: a Hypothesis rule-based state machine.

Random submits (priorities, held, retry budgets), agents that connect with random
capacity, prefetch and random held tasks, reports in valid and invalid orders (stale
attempts, unknown tasks, wrong agents, oversized results), commands on random ids
(refused ones included), lost agents, and ticks with time moving on. After every step:
``validate()`` passes, no dispatch fills an agent past its credit, every recorded transition is a row of
the transition table and starts where the task's previous one ended, a task that reached
SUCCEEDED/FAILED/CANCELLED never leaves it, no (task, attempt) is dispatched twice, and
a refused command changes nothing. A ``restart`` rule restores a fresh scheduler from
the task rows, as a server restarted on its store does.
"""

from __future__ import annotations

import os
from typing import Any

import hypothesis.strategies as st
from hypothesis import HealthCheck, Phase, settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from heartline._states import TaskState
from heartline.server._events import (
    AgentConnected,
    AgentLost,
    AgentReported,
    HeldTask,
    Instruction,
    NewTask,
    NotifyWatchers,
    Persist,
    SendAcks,
    SendCancels,
    SendDispatches,
    StatusReport,
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
    PRIORITY_HIGH,
    PRIORITY_LOW,
    PRIORITY_NORMAL,
    ErrorInfo,
)
from heartline.server._scheduler import (
    _TRANSITIONS,
    COMMANDS,
    InvalidTransition,
    Scheduler,
    SchedulerConfig,
    UnknownTasks,
)
from tests.test_scheduler import state_of

S = TaskState
ENDPOINTS = ("ep-a", "ep-b")
AGENTS = ("A", "B", "C")
ON_AGENT = (S.DISPATCHED, S.WAITING_FOR_NODES, S.WAITING_FOR_LAUNCH, S.RUNNING)
REPORTED = (S.WAITING_FOR_NODES, S.WAITING_FOR_LAUNCH, S.RUNNING, S.SUCCEEDED, S.ERRORED)
FINAL = frozenset({S.SUCCEEDED, S.FAILED, S.CANCELLED})
FAILURE_KINDS = (FAILURE_NONE, FAILURE_WORKER_DIED, FAILURE_WALLTIME, FAILURE_ENDPOINT_LOST, FAILURE_SERIALIZATION)
MAX_PAYLOAD = 16
HEARTBEAT_TIMEOUT = 10.0

priorities = st.sampled_from((PRIORITY_HIGH, PRIORITY_NORMAL, PRIORITY_LOW))
# Mostly one endpoint, so that agents, queues and commands meet often.
endpoints = st.sampled_from(ENDPOINTS[:1] * 3 + ENDPOINTS[1:])
delays = st.floats(min_value=0.0, max_value=4.0, allow_nan=False)


class SchedulerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.s = Scheduler(
            SchedulerConfig(
                heartbeat_timeout=HEARTBEAT_TIMEOUT,
                errored_retention=60.0,
                max_payload=MAX_PAYLOAD,
                validate=True,
            )
        )
        self.now = 0.0
        self.ids: list[str] = []
        self.last_state: dict[str, TaskState] = {}
        self.final: dict[str, tuple[TaskState, int]] = {}
        self.dispatched: set[tuple[str, int]] = set()
        self.max_attempt: dict[str, int] = {}

    # ------------------------------------------------------------------ plumbing

    def step(self, *events: Any) -> list[Instruction]:
        out = self.s.handle(*events)
        self.check(out)
        return out

    def check(self, out: list[Instruction]) -> None:
        kinds = [type(i) for i in out]
        assert kinds.count(Persist) <= 1 and kinds.count(NotifyWatchers) <= 1
        for kind in (SendDispatches, SendCancels, SendAcks):
            per_agent = [i.agent_id for i in out if isinstance(i, kind)]  # type: ignore[attr-defined]
            assert len(per_agent) == len(set(per_agent)), f"more than one {kind.__name__} per agent"
        transitions = next((i.batch.transitions for i in out if isinstance(i, Persist)), ())
        new_ids = {r.task_id for i in out if isinstance(i, Persist) for r in i.batch.new_tasks}
        for t in transitions:
            if t.from_state is None:
                assert t.task_id in new_ids and t.task_id not in self.last_state, t
                assert t.to_state in (S.WAITING_FOR_EP, S.HELD), t
            else:
                assert (t.from_state, t.to_state) in _TRANSITIONS, f"{t} is not in the table"
                assert self.last_state.get(t.task_id) == t.from_state, (
                    f"{t} starts from {t.from_state}, but the task was {self.last_state.get(t.task_id)}"
                )
            assert t.task_id not in self.final, f"{t.task_id} left {self.final.get(t.task_id)}: {t}"
            assert t.attempt >= self.max_attempt.get(t.task_id, 1), f"attempt went backwards: {t}"
            self.max_attempt[t.task_id] = t.attempt
            self.last_state[t.task_id] = t.to_state
            if t.to_state in FINAL:
                self.final[t.task_id] = (t.to_state, t.attempt)
        notify = next((i.changes for i in out if isinstance(i, NotifyWatchers)), ())
        assert [(c.task_id, c.state, c.attempt, c.cause) for c in notify] == [
            (t.task_id, t.to_state, t.attempt, t.cause) for t in transitions
        ]
        for batch in (i.batch for i in out if isinstance(i, Persist)):
            for row in (*batch.new_tasks, *batch.task_updates):
                assert row.state == self.last_state[row.task_id], f"stored row disagrees: {row}"
        for send in (i for i in out if isinstance(i, SendDispatches)):
            agent = self.s.agents[send.agent_id]
            # Dispatch never fills an agent past its credit (a reclaim may: it came
            # back holding what it holds, and then it gets nothing new).
            assert len(agent.in_flight) <= agent.capacity + agent.prefetch, f"{send.agent_id} over its credit"
            for item in send.items:
                task = self.s.tasks[item.task_id]
                assert task.endpoint_id == agent.endpoint_id
                assert (task.state, task.agent_id, task.attempt) == (S.DISPATCHED, send.agent_id, item.attempt)
                key = (item.task_id, item.attempt)
                assert key not in self.dispatched, f"attempt {item.attempt} of {item.task_id} dispatched twice"
                self.dispatched.add(key)
        for tid in self.final:
            assert tid not in self.s.tasks, f"{tid} settled but still held by the scheduler"

    def tick_clock(self, delay: float) -> float:
        self.now += delay
        return self.now

    # --------------------------------------------------------------------- rules

    @rule(
        endpoint=endpoints,
        specs=st.lists(
            st.tuples(priorities, st.booleans(), st.integers(0, 2), st.integers(0, 2)), min_size=1, max_size=3
        ),
        delay=delays,
    )
    def submit(self, endpoint: str, specs: list[tuple[int, bool, int, int]], delay: float) -> None:
        tasks = []
        for priority, held, max_retries, max_system_retries in specs:
            tid = f"t{len(self.ids)}"
            self.ids.append(tid)
            tasks.append(NewTask(tid, "fn", tid.encode(), priority, max_retries, max_system_retries, 0.0, held))
        out = self.step(TasksSubmitted(endpoint, "alice", tuple(tasks), "session", self.tick_clock(delay)))
        for task in tasks:
            assert self.last_state[task.task_id] in ((S.HELD,) if task.held else (S.WAITING_FOR_EP, S.DISPATCHED))
        assert out

    @rule(
        agent=st.sampled_from(AGENTS),
        endpoint=endpoints,
        capacity=st.integers(0, 3),
        prefetch=st.integers(0, 2),
        data=st.data(),
    )
    def connect(self, agent: str, endpoint: str, capacity: int, prefetch: int, data: st.DataObject) -> None:
        # An agent holds at most what the server could have given it.
        candidates = st.sampled_from([*self.ids, "ghost"])
        held = data.draw(
            st.lists(
                st.builds(HeldTask, candidates, st.integers(1, 4), st.sampled_from(ON_AGENT)),
                max_size=capacity + prefetch,
                unique_by=lambda h: h.task_id,
            ),
            label="held",
        )
        out = self.step(AgentConnected(agent, endpoint, capacity, prefetch, tuple(held), self.now))
        state = self.s.agents[agent]
        assert (state.endpoint_id, state.capacity, state.prefetch) == (endpoint, capacity, prefetch)
        sent = {i.task_id for d in out if isinstance(d, SendDispatches) for i in d.items}
        cancelled = {tid for i in out if isinstance(i, SendCancels) for tid in i.task_ids}
        for h in held:
            # Every held task is either kept on this agent (same attempt) or cancelled there.
            kept = (
                h.task_id in state.in_flight
                and h.task_id not in sent
                and self.s.tasks[h.task_id].attempt == h.attempt
            )
            assert kept != (h.task_id in cancelled), h

    @precondition(lambda self: self.s.agents)
    @rule(data=st.data(), delay=delays)
    def progress(self, data: st.DataObject, delay: float) -> None:
        """A valid report: a task an agent holds, its current attempt, any later state."""
        agent_id = data.draw(st.sampled_from(sorted(self.s.agents)), label="agent")
        agent = self.s.agents[agent_id]
        if not agent.in_flight:
            return
        tid = data.draw(st.sampled_from(sorted(agent.in_flight)), label="task")
        attempt = self.s.tasks[tid].attempt
        report = data.draw(self.reports(st.just(tid), st.just(attempt)), label="report")
        self.step(AgentReported(agent_id, (report,), self.tick_clock(delay)))
        if report.state in (S.SUCCEEDED, S.ERRORED):
            task = self.s.tasks.get(tid)
            still = tid in agent.in_flight and task is not None and task.attempt == attempt
            assert not still, "a finished attempt still takes credit"

    @rule(agent=st.sampled_from(AGENTS), data=st.data(), delay=delays)
    def report_anything(self, agent: str, data: st.DataObject, delay: float) -> None:
        """Reports in any order: stale attempts, wrong agents, unknown tasks, duplicates."""
        tids = st.sampled_from([*self.ids, "ghost"])
        reports = data.draw(st.lists(self.reports(tids, st.integers(1, 4)), min_size=1, max_size=4))
        out = self.step(AgentReported(agent, tuple(reports), self.tick_clock(delay)))
        acked = {a for i in out if isinstance(i, SendAcks) for a in i.acks}
        for r in reports:
            if r.state in (S.SUCCEEDED, S.ERRORED) and agent in self.s.agents:
                assert (r.task_id, r.attempt) in acked, f"terminal report {r} not acked"

    @staticmethod
    def reports(tids: st.SearchStrategy[str], attempts: st.SearchStrategy[int]) -> st.SearchStrategy[StatusReport]:
        errors = st.builds(
            ErrorInfo, st.sampled_from(["ValueError", "KeyError"]), st.just("boom"), st.just(""),
            st.sampled_from(FAILURE_KINDS),
        )
        return st.builds(
            StatusReport,
            tids,
            attempts,
            st.sampled_from(REPORTED),
            st.one_of(st.none(), st.binary(max_size=MAX_PAYLOAD + 4)),
            st.one_of(st.none(), errors),
        )

    @rule(
        command=st.sampled_from(sorted(COMMANDS)),
        data=st.data(),
        extra=st.sampled_from(["", "", "", "nope", "settled"]),
        delay=delays,
    )
    def command(self, command: str, data: st.DataObject, extra: str, delay: float) -> None:
        """A command on live tasks (mostly), with an unknown or long-settled id at times."""
        pool = sorted(self.s.tasks) or self.ids
        if not pool:
            return
        tids = data.draw(st.lists(st.sampled_from(pool), min_size=1, max_size=2), label="ids")
        if extra == "nope":
            tids.append("nope")
        elif extra == "settled" and self.final:
            tids.append(data.draw(st.sampled_from(sorted(self.final)), label="settled id"))
        self.run_command(command, tids, delay)

    def run_command(self, command: str, tids: list[str], delay: float) -> None:
        unknown = any(t not in self.s.tasks for t in tids)
        before = state_of(self.s)
        before_states = {t: self.s.tasks[t].state for t in tids if t in self.s.tasks}
        try:
            self.step(TasksCommanded(command, tuple(tids), self.tick_clock(delay)))
        except UnknownTasks as err:
            assert err.task_ids == [t for t in tids if t not in self.s.tasks]
            assert state_of(self.s) == before, "a refused command changed the scheduler"
        except InvalidTransition as err:
            assert err.refusals
            for tid, state, word in err.refusals:
                assert before_states[tid] == state
                assert f"task {tid} is {state.value}" in str(err) or len(err.refusals) > 5
            assert state_of(self.s) == before, "a refused command changed the scheduler"
        else:
            assert not unknown and all(t in before_states for t in tids)
            for tid in tids:
                # Accepted: each task made exactly the move the command asks for (and
                # possibly a dispatch after it).
                now = self.last_state[tid]
                expected = {
                    "cancel": {S.CANCELLED},
                    "hold": {S.HELD},
                    # A released task whose agents were lost too often is ERRORED at
                    # its dispatch (max_system_retries spent).
                    "release": {S.WAITING_FOR_EP, S.WAITING_FOR_DEPS, S.DISPATCHED, S.ERRORED},
                    "retry": {S.WAITING_FOR_EP, S.DISPATCHED},
                    "give-up": {S.FAILED},
                }[command]
                assert now in expected, f"{command} left {tid} {now}"

    @precondition(lambda self: self.s.tasks)
    @rule(data=st.data(), delay=delays)
    def command_one(self, data: st.DataObject, delay: float) -> None:
        """A command on one live task: mostly one its state allows, at times any."""
        tid = data.draw(st.sampled_from(sorted(self.s.tasks)), label="task")
        state = self.s.tasks[tid].state
        fitting = {
            S.WAITING_FOR_EP: ["hold", "cancel"],
            S.HELD: ["release", "cancel"],
            S.ERRORED: ["retry", "give-up"],
        }.get(state, ["cancel"])
        command = data.draw(st.sampled_from(fitting * 3 + sorted(COMMANDS)), label="command")
        self.run_command(command, [tid], delay)

    @rule(agent=st.sampled_from(AGENTS), delay=delays)
    def lose(self, agent: str, delay: float) -> None:
        held = set(self.s.agents[agent].in_flight) if agent in self.s.agents else set()
        self.step(AgentLost(agent, self.tick_clock(delay)))
        assert agent not in self.s.agents
        for tid in held:
            assert tid in self.s.tasks and self.s.tasks[tid].agent_id != agent

    @rule(delay=st.floats(min_value=0.0, max_value=40.0, allow_nan=False))
    def tick(self, delay: float) -> None:
        # Silence is judged outside (ServerCore.lose_silent_agents, an AgentLost): a
        # tick keeps every agent.
        agents = set(self.s.agents)
        self.step(Tick(self.tick_clock(delay)))
        assert set(self.s.agents) == agents, "a tick lost an agent"

    # ---------------------------------------------------------------- invariants

    @rule(delay=delays)
    def restart(self, delay: float) -> None:
        """The server restarts on its store: every agent is gone, tasks come back."""
        rows = [t.snapshot() for t in self.s.tasks.values()]
        self.s = Scheduler(self.s.config)
        out = self.s.restore(rows, self.tick_clock(delay))
        self.check(out)
        assert set(self.s.tasks) == {r.task_id for r in rows}
        for r in rows:
            assert self.s.tasks[r.task_id].attempt == r.attempt

    @invariant()
    def valid(self) -> None:
        self.s.validate(full=True)
        for tid, task in self.s.tasks.items():
            assert self.last_state[tid] == task.state, f"{tid} changed state without a recorded transition"


TestScheduler = SchedulerMachine.TestCase
TestScheduler.settings = settings(
    max_examples=200,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    # Shrinking a failing run of this machine can take minutes, past the per-test
    # timeout; by default a failure is reported unshrunk (every step is printed, and
    # the example database replays it). To shrink it:
    #   HEARTLINE_SHRINK=1 pytest tests/test_scheduler_machine.py --timeout=0
    phases=tuple(Phase) if os.environ.get("HEARTLINE_SHRINK") else tuple(p for p in Phase if p != Phase.shrink),
)
