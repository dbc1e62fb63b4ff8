"""Groups in the pure scheduler under random events (Hypothesis).

A strategy draws a group: 1-50 DAG tasks ``t0..tN`` whose ``run_after``, ``inputs`` (a
name may repeat) and ``when`` expressions name earlier tasks only (so it is a DAG), 0-3
finally tasks with ``when`` over ``$(tasks.status)`` or over DAG tasks' statuses (and
sometimes inputs), random ``fail_fast``, timeout and ``max_retries`` (0-1), some tasks
submitted held. A driver then plays random events: agents report their tasks returned,
raised or their worker died, tasks are cancelled, held, released and given up,
the group is cancelled in a random mode, time passes (past the timeout, past the
errored retention), agents are lost and connect again (claiming some of what they still
run, or coming back later with a finished result); then it drains what is left (agents
return everything) until nothing is pending.

Everything is checked from outside, from the instructions only (the transitions of each
``Persist`` with their ``TaskChanged``, the ``SendDispatches``, the ``GroupStateRow`` and
``GroupChanged`` rows) against a model of the rules kept here:

- every transition starts where the task's previous one ended; a settled group task only
  moves ERRORED -> FAILED;
- a task enters WAITING_FOR_EP or an agent only once every task it needs has settled (its
  ``run_after``, ``inputs`` and ``when`` targets; a finally task: every DAG task);
- a task decided once its parents settled is run or skipped exactly as the rules say
  (input not succeeded, then ``run_after`` parent failed/cancelled/skipped for another
  reason than its ``when``, then a false ``when``; a ``when`` skip really is false), unless
  the group was stopping (a cancel, a timeout, fail_fast after a failure), which only
  ever skips DAG tasks with a group reason; none is left undecided at the end of a step;
- no (task, attempt) is dispatched twice; no DAG task is dispatched once the group
  stops; a finally task runs only after the DAG settled, and never when the group was
  cancelled with mode ``cancel`` before that;
- each dispatch carries the results its input tasks returned (distinct per task and
  attempt), and a result stored is the one the winning attempt reported;
- after each step the group's stored counts and status match the tracked statuses;
  at the end every task is settled and the last ``GroupStateRow`` and ``GroupChanged``
  say ``aggregate_of(status_of(final state))`` and not pending; the pending flag went
  false exactly once;
- no agent with a free slot is left idle while a task waits for one; commands are
  refused exactly when the transition table says so.

A second test plays random chains of plain tasks that take each other's results
(``NewTask.inputs``; ``settled_inputs`` for inputs already settled and evicted) and checks
the same ordering, skipping and inputs properties against its own model.

Two tests at the end pin bugs these found (a task written off at dispatch left its
dependants waiting for ever; a stale claim cancelled the attempt dispatched with it).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, Phase, event, given, settings

from heartline._states import (
    ON_AGENT_STATES,
    PENDING_STATES,
    CancelMode,
    GroupStatus,
    SkipReason,
    TaskState,
)
from heartline.server._events import (
    AgentLost,
    Event,
    GroupChanged,
    GroupCommanded,
    HeldTask,
    Instruction,
    NewGroup,
    NewTask,
    NotifyWatchers,
    Persist,
    SendAcks,
    SendCancels,
    SendDispatches,
    TaskChanged,
    TasksSubmitted,
    Tick,
)
from heartline.server._groups import (
    AGGREGATE_INPUT,
    AGGREGATE_STATUSES,
    TASK_STATUSES,
    GroupTask,
    When,
    aggregate_of,
    status_of,
    validate,
)
from heartline.server._model import (
    FAILURE_WORKER_DIED,
    PRIORITY_NORMAL,
    GroupMember,
    GroupStateRow,
    WhenRow,
)
from heartline.server._scheduler import (
    InputsMoved,
    InvalidTransition,
    Scheduler,
    UnknownGroup,
    UnknownTasks,
)
from tests.scheduler_kit import (
    EP,
    FN,
    OWNER,
    SESSION,
    args,
    cmd,
    connect,
    make,
    raised,
    report,
    sr,
    system_error,
    validate_made,
)

S = TaskState
R = SkipReason
GID = "g-1"
AGENTS = ("A", "B", "C")
ERRORED_RETENTION = 40.0
EVICTED = frozenset({S.SUCCEEDED, S.FAILED, S.CANCELLED, S.SKIPPED})
STOP_REASONS = frozenset({R.GROUP_STOPPING, R.GROUP_TIMED_OUT})
RUNNABLE = frozenset({S.WAITING_FOR_EP, *ON_AGENT_STATES})
# Per command: the states the transition table lets it apply to (retry: plain tasks only).
ALLOWED = {
    "cancel": PENDING_STATES,
    "hold": frozenset({S.WAITING_FOR_EP, S.WAITING_FOR_DEPS}),
    "release": frozenset({S.HELD}),
    "give-up": frozenset({S.ERRORED}),
    "retry": frozenset({S.ERRORED}),
}
OUTCOMES = ("returned", "returned", "returned", "raised", "raised", "worker-died")
SYSTEM_RETRIES = (0, 1, 3)
"""max_system_retries of the random runs: 0 writes a lost attempt off at its next dispatch."""
COUNT_ORDER = ("Succeeded", "Failed", "Skipped", "Cancelled", "None")
SETTINGS = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    # Shrinking a failing run (and the explain phase, which traces every line run) can
    # take minutes, past the per-test timeout: by default a failure is reported unshrunk
    # (every draw is printed, and the example database replays it). To shrink it:
    #   HEARTLINE_SHRINK=1 pytest tests/test_groups_machine.py --timeout=0
    phases=tuple(Phase)
    if os.environ.get("HEARTLINE_SHRINK")
    else tuple(p for p in Phase if p not in (Phase.shrink, Phase.explain)),
)


def tid_of(name: str) -> str:
    """Task ids differ from names, so a mix-up of the two shows."""
    return f"id-{name}"


def result_of(tid: str, attempt: int) -> bytes:
    """What an agent returns for an attempt: distinct per task and attempt."""
    return f"r-{tid}-{attempt}".encode()


def holds(when: WhenRow, value: str) -> bool:
    return (value in when.values) == (when.operator == "in")


def target(when: WhenRow) -> str | None:
    """The task a `when` reads the status of; None for the aggregate status."""
    if when.input == AGGREGATE_INPUT:
        return None
    assert when.input.startswith("$(tasks.") and when.input.endswith(".status)")
    return when.input[len("$(tasks.") : -len(".status)")]


# ---------------------------------------------------------------------- the driver


@dataclass
class Driver:
    """Feeds events to a scheduler and keeps what its instructions say, from outside."""

    s: Scheduler
    inputs_of: dict[str, tuple[str, ...]] = field(default_factory=dict)
    """Task id -> ids of the tasks whose results it takes, in placeholder order."""
    now: float = 0.0
    state: dict[str, TaskState] = field(default_factory=dict)
    attempt: dict[str, int] = field(default_factory=dict)
    skip: dict[str, SkipReason | None] = field(default_factory=dict)
    result: dict[str, bytes] = field(default_factory=dict)
    connected: dict[str, int] = field(default_factory=dict)
    """Agent id -> capacity, while its stream is open."""
    bound: dict[str, str] = field(default_factory=dict)
    """Task id -> the agent the scheduler handed it to (dispatch or reclaim)."""
    held: dict[str, dict[tuple[str, int], bool]] = field(default_factory=dict)
    """Agent id -> (task id, attempt) it holds -> still running (False: finished, its
    result not sent yet)."""
    dispatched: set[tuple[str, int]] = field(default_factory=set)
    group_rows: list[GroupStateRow] = field(default_factory=list)
    group_changes: list[GroupChanged] = field(default_factory=list)
    transitions: int = 0
    causes: set[str] = field(default_factory=set)
    """Every transition cause seen (for the statistics)."""
    kills: list[tuple[str, str]] = field(default_factory=list)
    """(agent, task) of this step's tasks cancelled on an agent: a cancel must go there."""

    # ----------------------------------------------------------------- plumbing

    def handle(self, event: Event, *, agent: str | None = None) -> list[Instruction]:
        """Feed one event (``agent``: the agent it comes from, which a reclaim binds to)."""
        self.now = max(self.now, event.time)
        out = self.s.handle(event)
        self.observe(out, agent)
        return out

    def tick_time(self, dt: float = 1.0) -> float:
        self.now += dt
        return self.now

    def observe(self, out: list[Instruction], agent: str | None) -> None:
        kinds = [type(i) for i in out]
        assert kinds.count(Persist) <= 1 and kinds.count(NotifyWatchers) <= 1, kinds
        persist = next((i for i in out if isinstance(i, Persist)), None)
        notify = next((i for i in out if isinstance(i, NotifyWatchers)), None)
        transitions = persist.batch.transitions if persist else ()
        changes = notify.changes if notify else ()
        assert len(transitions) == len(changes), "a transition without its watcher change"
        self.kills = []
        for t, c in zip(transitions, changes, strict=True):
            assert (c.task_id, c.state, c.cause, c.attempt) == (
                t.task_id,
                t.to_state,
                t.cause,
                t.attempt,
            ), (t, c)
            self.on_transition(t.task_id, t.from_state, t.to_state, c, agent)
        self.transitions += len(transitions)
        if persist:
            self.group_rows.extend(persist.batch.group_states)
        if notify:
            self.group_changes.extend(notify.groups)
        # The agent cancels by task id: a step that hands it a task and cancels the task
        # there too (an older attempt) must send the cancel first.
        cancels_after: set[tuple[str, str]] = set()
        for i in reversed(out):
            if isinstance(i, SendCancels):
                cancels_after |= {(i.agent_id, t) for t in i.task_ids}
            elif isinstance(i, SendDispatches):
                late = sorted(
                    k for k in ((i.agent_id, x.task_id) for x in i.items) if k in cancels_after
                )
                assert not late, f"dispatched, then cancelled on the same agent in one step: {late}"
        for i in out:
            if isinstance(i, SendDispatches):
                for item in i.items:
                    key = (item.task_id, item.attempt)
                    assert key not in self.dispatched, f"{key} dispatched twice"
                    self.dispatched.add(key)
                    assert self.state[item.task_id] == S.DISPATCHED
                    assert self.attempt[item.task_id] == item.attempt
                    self.bound[item.task_id] = i.agent_id  # the transition names no agent
                    expected = tuple(self.result[x] for x in self.inputs_of[item.task_id])
                    assert item.inputs == expected, (item.task_id, item.inputs, expected)
                    self.held.setdefault(i.agent_id, {})[key] = True
            elif isinstance(i, SendCancels):
                self.kills = [
                    k for k in self.kills if not (k[0] == i.agent_id and k[1] in i.task_ids)
                ]
                mine = self.held.get(i.agent_id, {})
                for key in [k for k in mine if k[0] in i.task_ids]:
                    del mine[key]
        assert not self.kills, f"cancelled on their agents, no cancel sent: {self.kills}"
        self.after_step()

    def on_transition(
        self,
        tid: str,
        start: TaskState | None,
        finish: TaskState,
        change: TaskChanged,
        agent: str | None,
    ) -> None:
        assert self.state.get(tid) == start, (tid, self.state.get(tid), start, finish)
        if finish in ON_AGENT_STATES and start not in ON_AGENT_STATES and finish != S.DISPATCHED:
            # A reclaim: the task is bound to the agent the event came from.
            assert change.cause == "agent-reconnected" and agent is not None, change
            self.bound[tid] = agent
        if start in ON_AGENT_STATES and finish not in ON_AGENT_STATES:
            agent_of = self.bound.pop(tid)
            if finish == S.CANCELLED:
                self.kills.append((agent_of, tid))
        if finish == S.SUCCEEDED:
            assert change.result == result_of(tid, change.attempt), change
            self.result[tid] = change.result
        if finish == S.SKIPPED:
            assert change.skip_reason is not None, change
        self.causes.add(change.cause.split(";")[0])
        self.state[tid] = finish
        self.attempt[tid] = change.attempt
        self.skip[tid] = change.skip_reason

    def after_step(self) -> None:
        # An agent with a free slot is never left idle while a task waits in the queue.
        waiting = [t for t, st_ in self.state.items() if st_ == S.WAITING_FOR_EP]
        if waiting:
            load: dict[str, int] = {}
            for a in self.bound.values():
                load[a] = load.get(a, 0) + 1
            idle = [a for a, cap in self.connected.items() if cap > load.get(a, 0)]
            assert not idle, f"{waiting} wait while agents {idle} have free slots"

    def pending(self) -> list[str]:
        return sorted(t for t, st_ in self.state.items() if st_ in PENDING_STATES)

    # ------------------------------------------------------------------ actions

    def command(self, name: str, tid: str) -> bool:
        """An owner's command; refused exactly when the table refuses it."""
        before = self.state[tid]
        try:
            self.handle(cmd(name, tid, time=self.tick_time()))
        except (InvalidTransition, UnknownTasks):
            assert before not in self.allowed(name, tid), f"{name} {tid} ({before}) refused"
            return False
        assert before in self.allowed(name, tid), f"{name} {tid} ({before}) accepted"
        return True

    def allowed(self, name: str, tid: str) -> frozenset[TaskState]:
        return ALLOWED[name]

    def connect(self, agent: str, capacity: int, claim: Iterable[tuple[str, int]]) -> None:
        """The agent says hello, claiming some of the tasks it still runs; the others
        it finished meanwhile (their results not sent yet)."""
        self.connected.pop(agent, None)
        mine = self.held.setdefault(agent, {})
        claimed = set(claim)
        for key in mine:
            if key not in claimed:
                mine[key] = False
        held = tuple(HeldTask(t, a, S.RUNNING) for t, a in sorted(claimed))
        self.connected[agent] = capacity
        self.handle(
            connect(agent, capacity=capacity, held=held, time=self.tick_time()), agent=agent
        )

    def lose(self, agent: str) -> None:
        self.connected.pop(agent, None)
        self.handle(AgentLost(agent, self.tick_time()))

    def finish(self, agent: str, key: tuple[str, int], outcome: str = "returned") -> None:
        """The agent reports an attempt it holds: returned, raised, or its worker died."""
        tid, attempt = key
        running = self.held[agent].pop(key)
        if outcome == "returned":
            end = sr(tid, S.SUCCEEDED, attempt, result=result_of(tid, attempt))
        elif outcome == "raised":
            end = sr(tid, S.ERRORED, attempt, error=raised())
        else:
            end = sr(tid, S.ERRORED, attempt, error=system_error(FAILURE_WORKER_DIED))
        # A finished attempt sends its result only; a running one says it started first.
        reports = (sr(tid, S.RUNNING, attempt), end) if running else (end,)
        out = self.handle(report(agent, *reports, time=self.tick_time()), agent=agent)
        acks = [a for i in out if isinstance(i, SendAcks) and i.agent_id == agent for a in i.acks]
        assert (tid, attempt) in acks, f"terminal report of {key} not acknowledged"

    def claimable(self, agent: str) -> list[tuple[str, int]]:
        """What the agent still runs and may claim when it connects again (stale
        attempts included: the scheduler cancels those, before any new dispatch)."""
        return sorted((t, a) for (t, a), alive in self.held.get(agent, {}).items() if alive)

    def reportable(self) -> list[tuple[str, tuple[str, int]]]:
        return sorted((a, key) for a in self.connected for key in self.held.get(a, {}))

    def drain(self) -> None:
        """Agents return everything they hold until nothing is pending."""
        fresh = 0
        for _ in range(500):
            if not self.pending():
                return
            before = self.transitions
            held = [t for t in self.pending() if self.state[t] == S.HELD]
            for tid in held:
                assert self.command("release", tid)
            for agent, key in self.reportable():
                if key in self.held[agent]:  # not cancelled meanwhile
                    self.finish(agent, key)
            if self.transitions == before:
                # Nothing moved: bring a fresh agent (its hello touches the queue).
                fresh += 1
                assert fresh < 5, f"stuck: {[(t, self.state[t]) for t in self.pending()]}"
                self.connect(f"Z{fresh}", 4, ())
        raise AssertionError(f"did not drain: {[(t, self.state[t]) for t in self.pending()]}")


# ------------------------------------------------------------------------ groups


@dataclass(frozen=True)
class Shape:
    members: tuple[GroupMember, ...]
    """DAG tasks, then finally tasks."""
    fail_fast: bool
    timeout: float
    max_retries: tuple[int, ...]
    max_system_retries: tuple[int, ...]
    held: frozenset[str]


def _task_when(names: list[str]) -> st.SearchStrategy[WhenRow]:
    return st.builds(
        WhenRow,
        st.sampled_from(names).map(lambda n: f"$(tasks.{n}.status)"),
        st.sampled_from(("in", "notin")),
        st.sets(st.sampled_from(TASK_STATUSES), min_size=1).map(lambda v: tuple(sorted(v))),
    )


_AGGREGATE_WHEN = st.builds(
    WhenRow,
    st.just(AGGREGATE_INPUT),
    st.sampled_from(("in", "notin")),
    st.sets(st.sampled_from(AGGREGATE_STATUSES), min_size=1).map(lambda v: tuple(sorted(v))),
)


@st.composite
def groups(
    draw: st.DrawFn, system_retries: tuple[int, ...] = SYSTEM_RETRIES, chain: bool = False
) -> Shape:
    """A valid group; ``chain``: t1 (there is one) runs after t0, and nothing is held."""
    n = draw(st.integers(2 if chain else 1, 50))
    names = [f"t{i}" for i in range(n)]
    members: list[GroupMember] = []
    for i, name in enumerate(names):
        run_after: tuple[str, ...] = ()
        inputs: tuple[str, ...] = ()
        when: tuple[WhenRow, ...] = ()
        if i:
            # Mostly recent tasks, so that chains get deep; any earlier task at times.
            earlier = st.one_of(
                st.sampled_from(names[max(0, i - 4) : i]), st.sampled_from(names[:i])
            )
            run_after = tuple(sorted(set(draw(st.lists(earlier, max_size=2)))))
            inputs = tuple(draw(st.lists(earlier, max_size=2)))
            when = tuple(draw(st.lists(_task_when(names[:i]), max_size=2)))
            if chain and i == 1:
                run_after = ("t0",)
        members.append(GroupMember(name, tid_of(name), False, run_after, inputs, when))
    for j in range(draw(st.integers(0, 3))):
        name = f"f{j}"
        when = tuple(draw(st.lists(st.one_of(_AGGREGATE_WHEN, _task_when(names)), max_size=2)))
        inputs = tuple(draw(st.lists(st.sampled_from(names), max_size=1)))
        members.append(GroupMember(name, tid_of(name), True, (), inputs, when))
    validate(
        [
            GroupTask(
                m.name,
                m.run_after,
                m.inputs,
                tuple(When(w.input, w.operator, w.values) for w in m.when),
                m.is_finally,
            )
            for m in members
        ]
    )
    total = len(members)
    return Shape(
        tuple(members),
        draw(st.booleans()),
        draw(st.one_of(st.just(0.0), st.integers(1, 60).map(float))),
        tuple(draw(st.lists(st.integers(0, 1), min_size=total, max_size=total))),
        tuple(draw(st.lists(st.sampled_from(system_retries), min_size=total, max_size=total))),
        frozenset()
        if chain
        else frozenset(draw(st.sets(st.sampled_from([m.name for m in members]), max_size=3))),
    )


class GroupRun(Driver):
    """A driver for one group, with the group rules' model."""

    def __init__(self, shape: Shape) -> None:
        super().__init__(make(heartbeat_timeout=1e9, errored_retention=ERRORED_RETENTION))
        self.shape = shape
        self.member = {m.task_id: m for m in shape.members}
        self.dag = [m.task_id for m in shape.members if not m.is_finally]
        self.finals = [m.task_id for m in shape.members if m.is_finally]
        self.inputs_of = {m.task_id: tuple(tid_of(n) for n in m.inputs) for m in shape.members}
        self.stops: set[SkipReason] = set()
        """Why DAG tasks may be skipped for the group: a cancel or stop (GROUP_STOPPING),
        the timeout (GROUP_TIMED_OUT)."""
        self.cancelled_early = False
        """Cancelled with mode "cancel" before the DAG settled: no finally task runs."""
        self.deadline_passed = False
        self.when_skipped: list[str] = []

    # ------------------------------------------------------------------- model

    def status(self, name: str) -> str:
        return status_of(self.state.get(tid_of(name), S.WAITING_FOR_DEPS))

    def dag_settled(self) -> bool:
        return all(self.state[t] not in PENDING_STATES for t in self.dag)

    def aggregate(self) -> str:
        return aggregate_of(status_of(self.state[t]) for t in self.dag)

    def needs(self, tid: str) -> list[str]:
        m = self.member[tid]
        if m.is_finally:
            return self.dag
        targets = [n for n in map(target, m.when) if n is not None]
        return [tid_of(n) for n in (*m.run_after, *m.inputs, *targets)]

    def when_holds(self, m: GroupMember) -> bool:
        aggregate = self.aggregate()
        return all(
            holds(w, aggregate if target(w) is None else self.status(target(w) or ""))
            for w in m.when
        )

    def expected(self, m: GroupMember) -> SkipReason | None:
        """What the rules (SPEC section 4) say a task whose parents settled does."""
        if any(self.status(n) != "Succeeded" for n in m.inputs):
            return R.INPUT_NOT_SUCCEEDED
        for n in m.run_after:
            status = self.status(n)
            if status in ("Failed", "Cancelled") or (
                status == "Skipped" and self.skip[tid_of(n)] is not R.WHEN_FALSE
            ):
                return R.PARENT_NOT_SUCCEEDED
        if not self.when_holds(m):
            return R.WHEN_FALSE
        return None

    def stopping(self) -> set[SkipReason]:
        """The group reasons a DAG task may be skipped for, now."""
        stops = set(self.stops)
        if self.shape.fail_fast and any(status_of(self.state[t]) == "Failed" for t in self.dag):
            stops.add(R.GROUP_STOPPING)
        return stops

    def counts(self) -> tuple[int, ...]:
        statuses = [status_of(self.state[t]) for t in self.dag]
        return tuple(statuses.count(s) for s in COUNT_ORDER)

    def group_pending(self) -> bool:
        return bool(self.pending())

    # ------------------------------------------------------------------ checks

    def on_transition(
        self,
        tid: str,
        start: TaskState | None,
        finish: TaskState,
        change: TaskChanged,
        agent: str | None,
    ) -> None:
        m = self.member[tid]
        assert change.group_id == GID, change
        if start is not None and start not in PENDING_STATES:
            assert (start, finish) == (S.ERRORED, S.FAILED), f"{tid} left {start} for {finish}"
        if finish in RUNNABLE:
            needs = self.needs(tid)
            unsettled = [
                p for p in needs if self.state.get(p, S.WAITING_FOR_DEPS) in PENDING_STATES
            ]
            assert not unsettled, f"{tid} {start}->{finish} before {unsettled} settled"
        if finish == S.DISPATCHED:
            if m.is_finally:
                assert not self.cancelled_early, f"finally {tid} runs in a cancelled group"
            else:
                assert not self.stopping(), f"DAG task {tid} dispatched in a stopping group"
        if start == S.WAITING_FOR_DEPS and finish in (S.WAITING_FOR_EP, S.SKIPPED):
            reason = change.skip_reason
            if reason in STOP_REASONS:
                self.check_stop_skip(tid, reason)
            else:
                expected = self.expected(m)
                assert reason == expected, f"{tid} decided {finish}/{reason}, rules say {expected}"
                assert not m.is_finally or self.dag_settled()
                if finish == S.WAITING_FOR_EP:
                    assert change.cause == "parents-settled", change
                    if not m.is_finally:
                        assert not self.stops, f"{tid} runs after the group stopped"
                if reason is R.WHEN_FALSE:
                    assert not self.when_holds(m)
                    self.when_skipped.append(tid)
        elif finish == S.SKIPPED:
            assert change.skip_reason in STOP_REASONS, f"{tid} skipped from {start}: {change}"
            self.check_stop_skip(tid, change.skip_reason)
        super().on_transition(tid, start, finish, change, agent)

    def check_stop_skip(self, tid: str, reason: SkipReason | None) -> None:
        assert not self.member[tid].is_finally, f"finally {tid} skipped for {reason}"
        assert reason in self.stopping(), f"{tid} skipped for {reason}, group not stopping"

    def after_step(self) -> None:
        super().after_step()
        if not self.state:
            return
        # Nothing is left undecided: a task whose parents settled has moved on.
        for tid, st_ in self.state.items():
            if st_ == S.WAITING_FOR_DEPS:
                unsettled = [p for p in self.needs(tid) if self.state[p] in PENDING_STATES]
                assert unsettled, f"{tid} still waits, though everything it needs settled"
        if self.group_rows:  # the stored group state says what the tracked statuses say
            last = self.group_rows[-1]
            assert last.counts == self.counts(), (last, self.counts())
            assert last.status == GroupStatus(self.aggregate()), (last, self.aggregate())
            assert last.pending == self.group_pending(), (last, self.pending())

    # ----------------------------------------------------------------- actions

    def allowed(self, name: str, tid: str) -> frozenset[TaskState]:
        return frozenset() if name == "retry" else ALLOWED[name]

    def submit(self) -> None:
        shape = self.shape
        tasks = tuple(
            NewTask(
                m.task_id,
                FN,
                args(m.task_id),
                PRIORITY_NORMAL,
                retries,
                system,
                0.0,
                m.name in shape.held,
                m.name,
                self.inputs_of[m.task_id],
            )
            for m, retries, system in zip(
                shape.members, shape.max_retries, shape.max_system_retries, strict=True
            )
        )
        new = NewGroup(GID, "machine", shape.fail_fast, shape.timeout, shape.members)
        out = self.handle(TasksSubmitted(EP, OWNER, tasks, SESSION, 0.0, group=new))
        assert {t.task_id for i in out if isinstance(i, Persist) for t in i.batch.new_tasks} == set(
            self.member
        )

    def cancel_group(self, mode: CancelMode) -> None:
        was_pending = self.group_pending()
        dag_settled = self.dag_settled()
        stops = set(self.stops)
        self.stops.add(R.GROUP_STOPPING)
        try:
            self.handle(GroupCommanded(GID, mode, self.tick_time()))
        except UnknownGroup:
            assert not was_pending, "a pending group is unknown"
            self.stops = stops
            return
        assert was_pending, "a settled group was cancelled"
        if mode is CancelMode.CANCEL and not dag_settled:
            self.cancelled_early = True
        if mode is CancelMode.STOP_RUN_FINALLY:
            left = [t for t in self.dag if self.state[t] in PENDING_STATES]
            assert all(self.state[t] in ON_AGENT_STATES for t in left), left
        else:
            assert self.dag_settled()
        if mode is CancelMode.CANCEL:
            assert not self.pending()

    def tick(self, dt: float) -> None:
        deadline = self.shape.timeout or None
        unsettled_dag = not self.dag_settled()
        now = self.tick_time(dt)
        crossing = deadline is not None and not self.deadline_passed and now >= deadline
        if crossing:
            self.deadline_passed = True
            if unsettled_dag and self.group_pending():
                self.stops.add(R.GROUP_TIMED_OUT)
        self.handle(Tick(now))
        if crossing:
            assert self.dag_settled(), "the timeout passed and DAG tasks still run"

    # -------------------------------------------------------------- at the end

    def check_end(self) -> None:
        assert not self.pending(), self.pending()
        assert set(self.state) == set(self.member)
        reference = GroupStatus(self.aggregate())
        last_row = self.group_rows[-1]
        assert last_row.status == reference and not last_row.pending, (last_row, reference)
        assert last_row.counts == self.counts()
        last_change = self.group_changes[-1]
        assert last_change.status == reference and not last_change.pending
        assert [r.pending for r in self.group_rows].count(False) == 1
        assert [c.pending for c in self.group_changes].count(False) == 1
        for final in self.finals:
            runs = [a for t, a in self.dispatched if t == final]
            assert len(runs) == len(set(runs))
            if self.cancelled_early:
                assert not runs and self.state[final] == S.CANCELLED, final
        for tid in self.when_skipped:  # final statuses still say the `when` is false
            assert self.state[tid] == S.SKIPPED and self.skip[tid] is R.WHEN_FALSE
            assert not self.when_holds(self.member[tid])
        with pytest.raises(UnknownGroup):
            self.s.handle(GroupCommanded(GID, CancelMode.CANCEL, self.tick_time()))
        self.s.validate(full=True)
        assert all(t.state == S.ERRORED for t in self.s.tasks.values())


# Weighted: agents report most often, so that DAGs get on.
ACTIONS = ("report",) * 8 + ("lose", "connect") * 2
ACTIONS += ("cancel", "hold", "release", "tick", "group", "give-up")


def pick(data: st.DataObject, among: list[str], fallback: list[str]) -> str:
    """Mostly a task the action applies to; sometimes any task (a refusal)."""
    pool = among if among and data.draw(st.integers(0, 4)) else fallback
    return data.draw(st.sampled_from(pool))


@SETTINGS
@given(shape=groups(), data=st.data())
def test_a_random_group_under_random_events_settles_by_the_rules(
    shape: Shape, data: st.DataObject
) -> None:
    run = GroupRun(shape)
    first = data.draw(st.integers(1, 5), label="capacity")
    if data.draw(st.booleans(), label="agent first"):
        run.connect("A", first, ())
        run.submit()
    else:
        run.submit()
        run.connect("A", first, ())
    ids = sorted(run.member)
    for _ in range(data.draw(st.integers(0, 3 * len(ids) + 10), label="steps")):
        if not run.pending():
            break
        action = data.draw(st.sampled_from(ACTIONS))
        state = run.state
        if action == "report":
            choices = run.reportable()
            if choices:
                agent, key = data.draw(st.sampled_from(choices))
                run.finish(agent, key, data.draw(st.sampled_from(OUTCOMES)))
        elif action in ("cancel", "hold", "release", "give-up"):
            fits = sorted(t for t in ids if state[t] in ALLOWED[action])
            run.command(action, pick(data, fits, ids))
        elif action == "tick":
            past = shape.timeout and not run.deadline_passed and data.draw(st.booleans())
            dt = max(shape.timeout - run.now, 0.0) if past else 0.0
            run.tick(dt + data.draw(st.sampled_from((0.5, 1.0, 5.0, 50.0))))
        elif action == "lose":
            if run.connected:
                run.lose(data.draw(st.sampled_from(sorted(run.connected))))
        elif action == "connect":
            agent = data.draw(st.sampled_from(AGENTS))
            running = run.claimable(agent)
            claim = data.draw(st.sets(st.sampled_from(running))) if running else set()
            run.connect(agent, data.draw(st.integers(1, 4)), claim)
        else:
            run.cancel_group(data.draw(st.sampled_from(tuple(CancelMode))))
    run.drain()
    run.check_end()
    validate_made()
    # What the run went through (pytest --hypothesis-show-statistics).
    event(f"aggregate {run.aggregate()}")
    event(f"dag tasks {'1' if len(run.dag) == 1 else '2-9' if len(run.dag) < 10 else '10-50'}")
    for cause in sorted(run.causes):
        event(f"cause {cause}")
    for stop in sorted(run.stopping()):
        event(f"stopped: {stop}")
    if any(t in run.finals for t, _ in run.dispatched):
        event("a finally task ran")


@dataclass
class Consumer:
    waits: set[str]
    """Inputs pending when it was submitted that have not settled since."""
    doomed: bool
    """An input had not succeeded (when it was submitted, or when it first settled)."""


class ChainRun(Driver):
    """Plain tasks (no group) that take earlier tasks' results."""

    def __init__(self) -> None:
        super().__init__(make(heartbeat_timeout=1e9, errored_retention=ERRORED_RETENTION))
        self.consumers: dict[str, Consumer] = {}
        self.count = 0
        self.told_settled = False

    def submit(self, specs: list[tuple[tuple[str, ...], int, bool]], tell_settled: bool) -> None:
        tasks = []
        for inputs, retries, held in specs:
            tid = f"p{self.count}"
            self.count += 1
            tasks.append(
                NewTask(
                    tid,
                    FN,
                    args(tid),
                    PRIORITY_NORMAL,
                    retries,
                    1,  # max_system_retries: a second loss errors it at dispatch
                    0.0,
                    held,
                    "",
                    inputs,
                )
            )
        evicted = {
            i: (self.state[i], self.result.get(i))
            for t in tasks
            for i in t.inputs
            if self.state[i] in EVICTED
        }
        event = TasksSubmitted(
            EP,
            OWNER,
            tuple(tasks),
            SESSION,
            self.tick_time(),
            settled_inputs=evicted if tell_settled else None,
        )
        self.told_settled |= bool(evicted)
        if not tell_settled and evicted:
            with pytest.raises(InputsMoved) as info:
                self.handle(event)
            assert set(info.value.task_ids) == set(evicted)
            assert not any(t.task_id in self.s.tasks for t in tasks)
            event = TasksSubmitted(
                EP, OWNER, tuple(tasks), SESSION, self.now, settled_inputs=evicted
            )
        for t in tasks:
            self.inputs_of[t.task_id] = t.inputs
            inputs = set(t.inputs)
            self.consumers[t.task_id] = Consumer(
                {i for i in inputs if self.state[i] in PENDING_STATES},
                any(
                    self.state[i] not in PENDING_STATES and self.state[i] != S.SUCCEEDED
                    for i in inputs
                ),
            )
        self.handle(event)

    def on_transition(
        self,
        tid: str,
        start: TaskState | None,
        finish: TaskState,
        change: TaskChanged,
        agent: str | None,
    ) -> None:
        assert change.group_id == "" and change.skip_reason in (None, R.INPUT_NOT_SUCCEEDED)
        c = self.consumers[tid]
        if start is None and finish != S.HELD:
            waits = bool(self.inputs_of[tid])
            assert finish == (S.WAITING_FOR_DEPS if waits else S.WAITING_FOR_EP), (tid, finish)
        if start == S.WAITING_FOR_DEPS and finish in (S.WAITING_FOR_EP, S.SKIPPED):
            assert not c.waits, f"{tid} decided before {c.waits} settled"
            assert finish == (S.SKIPPED if c.doomed else S.WAITING_FOR_EP), (tid, finish, c)
        if finish in RUNNABLE:
            assert not c.doomed, f"{tid} runs, an input did not succeed"
            assert all(self.state[i] == S.SUCCEEDED for i in self.inputs_of[tid]), tid
        if finish == S.SKIPPED:
            assert change.skip_reason is R.INPUT_NOT_SUCCEEDED and c.doomed, change
        if start in PENDING_STATES and finish not in PENDING_STATES:
            # Its first settling since each waiting consumer was submitted.
            for other in self.consumers.values():
                if tid in other.waits:
                    other.waits.discard(tid)
                    other.doomed |= finish != S.SUCCEEDED
        super().on_transition(tid, start, finish, change, agent)

    def after_step(self) -> None:
        super().after_step()
        for tid, st_ in self.state.items():
            if st_ == S.WAITING_FOR_DEPS:
                assert self.consumers[tid].waits, f"{tid} still waits for nothing"


@SETTINGS
@given(data=st.data())
def test_random_chains_of_plain_tasks_pass_results_along(data: st.DataObject) -> None:
    run = ChainRun()
    run.connect("A", data.draw(st.integers(1, 3), label="capacity"), ())
    for _ in range(data.draw(st.integers(1, 60), label="steps")):
        ids = sorted(run.state)
        action = data.draw(
            st.sampled_from(
                ("submit",) * 3
                + ("report",) * 5
                + ("cancel", "hold", "release", "retry", "give-up", "tick", "lose", "connect")
            )
        )
        if action == "submit" or not ids:
            specs = []
            for _ in range(data.draw(st.integers(1, 3))):
                recent = sorted(ids, key=lambda t: int(t[1:]))[-4:]
                some = st.one_of(st.sampled_from(recent), st.sampled_from(ids))
                inputs = tuple(data.draw(st.lists(some, max_size=3))) if ids else ()
                specs.append(
                    (
                        inputs,
                        data.draw(st.integers(0, 1)),
                        data.draw(st.booleans()) and data.draw(st.booleans()),
                    )
                )
            run.submit(specs, data.draw(st.booleans()))
        elif action == "report":
            choices = run.reportable()
            if choices:
                agent, key = data.draw(st.sampled_from(choices))
                run.finish(agent, key, data.draw(st.sampled_from(OUTCOMES)))
        elif action in ALLOWED:
            fits = sorted(t for t in ids if run.state[t] in ALLOWED[action])
            run.command(action, pick(data, fits, ids))
        elif action == "tick":
            run.handle(Tick(run.tick_time(data.draw(st.sampled_from((1.0, 50.0))))))
        elif action == "lose":
            if run.connected:
                run.lose(data.draw(st.sampled_from(sorted(run.connected))))
        else:
            agent = data.draw(st.sampled_from(AGENTS))
            running = run.claimable(agent)
            claim = data.draw(st.sets(st.sampled_from(running))) if running else set()
            run.connect(agent, data.draw(st.integers(1, 3)), claim)
    run.drain()
    assert not run.pending()
    run.s.validate(full=True)
    validate_made()
    event(f"tasks {'1-9' if run.count < 10 else '10+'}")
    for cause in sorted(run.causes):
        event(f"cause {cause}")
    if any(run.inputs_of[t] for t, _ in run.dispatched):
        event("a task ran with inputs")
    if run.told_settled:
        event("inputs read from the store")


# ------------------------------------------------------------- bugs found, fixed


@settings(SETTINGS, max_examples=20)
@given(shape=groups(system_retries=(0,), chain=True), data=st.data())
def test_a_task_written_off_at_dispatch_unblocks_its_dependants(
    shape: Shape, data: st.DataObject
) -> None:
    run = GroupRun(shape)
    run.submit()
    run.connect("A", data.draw(st.integers(1, 5), label="capacity"), ())  # t0 dispatched
    run.lose("A")  # t0 LOST, with no system retry left
    run.connect("B", data.draw(st.integers(1, 5), label="capacity"), ())  # t0 written off
    run.drain()
    run.check_end()
    validate_made()


@settings(SETTINGS, max_examples=20)
@given(data=st.data())
def test_a_stale_claim_does_not_cancel_the_attempt_dispatched_with_it(
    data: st.DataObject,
) -> None:
    run = ChainRun()
    run.submit([((), 0, False)] * data.draw(st.integers(1, 3), label="tasks"), True)
    run.connect("A", data.draw(st.integers(1, 3), label="capacity"), ())  # p0 attempt 1
    run.lose("A")  # A still runs it
    run.connect("B", 1, ())  # p0 attempt 2
    run.lose("B")
    run.connect("A", 1, [("p0", 1)])  # claims attempt 1: stale, and p0 is queued
    run.drain()
    validate_made()
