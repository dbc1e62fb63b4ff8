"""Chaos: a mixed workload on a real server and real agents while agents and the server are
SIGKILLed (and agents SIGSTOPped) and restarted at random points.

Seeded (a fixed default seed): the seed is printed at the start and named in every failure; set
``HEARTLINE_CHAOS_SEED`` to replay a run's choices (the processes' timing still varies).
At the end every task in the store must be settled exactly once, every transition of its
history must be a pair of the scheduler's table, and its attempts must never go down.
"""

from __future__ import annotations

import os
import random
import signal
import sys
import time
from collections import Counter
from pathlib import Path

import cloudpickle
import pytest

import heartline
from heartline import Client, TaskState
from tests.conftest import (
    STORE_KINDS,
    ServerProc,
    launch_agent,
    launch_server,
    new_db,
    relaunch_server,
)
from tests.helpers import Proc, assert_eventually, check_history, tail

cloudpickle.register_pickle_by_value(sys.modules[__name__])

BUDGET = 60.0  # seconds for the whole test, faults and drain included
FAULT_PHASE = 25.0  # seconds of the budget spent injecting faults
ENDPOINT = "chaos"
WORKERS = 3
SYSTEM_RETRIES = 50  # far above the faults one task can meet here: outcomes stay predictable
# Causes of the transitions that faults bring about.
FAULT_CAUSES = frozenset(
    {"stream-closed", "heartbeat-timeout", "endpoint-lost", "server-restarted", "agent-reconnected"}
)


# ------------------------------------------------------------------------ remote functions


def triple(x: int) -> int:
    return 3 * x


def snooze(seconds: float, x: int) -> int:
    time.sleep(seconds)
    return x + 1


def fail(x: int) -> int:
    raise ValueError(f"chaos {x}")


# ------------------------------------------------------------------------ the run


class Chaos:
    """The processes of one run, and what was submitted."""

    def __init__(self, base: Path, rng: random.Random, db: str | Path) -> None:
        self.rng = rng
        self.home = base / "home"
        self.home.mkdir()
        self.db = db
        self.server: ServerProc = launch_server(self.home, self.db)
        self.address = self.server.address
        self.dead_servers: list[ServerProc] = []
        self.agents: list[Proc] = []
        self.dead_agents: list[Proc] = []
        self.log: list[str] = []
        # task id -> (kind, expected value or max_retries)
        self.expected: dict[str, tuple[str, int]] = {}

    def note(self, what: str) -> None:
        self.log.append(f"{time.monotonic():.2f} {what}")

    # -- processes

    def start_agent(self) -> Proc:
        extra = ["--prefetch", str(self.rng.choice([0, 2, 6]))]
        proc = launch_agent(self.address, self.home, ENDPOINT, WORKERS, *extra)
        self.agents.append(proc)
        self.note(f"start agent {proc.pid} {extra}")
        return proc

    def kill_agent(self) -> None:
        proc = self.agents.pop(self.rng.randrange(len(self.agents)))
        proc.kill()
        self.dead_agents.append(proc)
        self.note(f"SIGKILL agent {proc.pid}")

    def pause_agent(self) -> None:
        proc = self.rng.choice(self.agents)
        pause = self.rng.uniform(0.2, 1.2)  # below and above the 0.6 s heartbeat timeout
        self.note(f"SIGSTOP agent {proc.pid} for {pause:.2f}s")
        proc.signal(signal.SIGSTOP)
        try:
            time.sleep(pause)  # real time must pass while it is stopped
        finally:
            proc.signal(signal.SIGCONT)

    def restart_server(self) -> None:
        self.server.proc.kill()
        self.dead_servers.append(self.server)
        self.note(f"SIGKILL server {self.server.proc.pid}")
        self.server = relaunch_server(self.server)
        self.note(f"server back as {self.server.proc.pid}")

    def stop_all(self) -> None:
        for proc in self.agents:
            proc.stop()
        self.server.proc.stop()

    def logs(self, lines: int = 40) -> str:
        procs = [*self.dead_servers, self.server, *self.dead_agents, *self.agents]
        return "\n".join(["--- chaos log:", *self.log, tail(*procs, lines=lines)])

    # -- workload

    def submit_wave(self, hc: Client) -> None:
        rng = self.rng
        fast = [rng.randrange(1000) for _ in range(rng.randint(60, 200))]
        slow = [
            (round(rng.uniform(0.01, 0.08), 3), rng.randrange(1000))
            for _ in range(rng.randint(5, 30))
        ]
        raising = [(rng.randrange(1000), rng.randint(0, 2)) for _ in range(rng.randint(2, 12))]
        ids = hc.submit_batch(
            ENDPOINT, [(triple, (x,), {}) for x in fast], max_system_retries=SYSTEM_RETRIES
        )
        self.expected.update((tid, ("value", 3 * x)) for tid, x in zip(ids, fast, strict=True))
        ids = hc.submit_batch(
            ENDPOINT, [(snooze, s, {}) for s in slow], max_system_retries=SYSTEM_RETRIES
        )
        self.expected.update((tid, ("value", s[1] + 1)) for tid, s in zip(ids, slow, strict=True))
        for x, retries in raising:
            tid = hc.submit(
                ENDPOINT, fail, x, max_retries=retries, max_system_retries=SYSTEM_RETRIES
            )
            self.expected[tid] = ("raise", retries)
        self.note(f"submitted {len(fast)} fast, {len(slow)} slow, {len(raising)} raising")


def server_answers(hc: Client) -> bool:
    try:
        hc.stats()
    except heartline.UnavailableError:
        return False
    return True


def pending_count(hc: Client) -> int:
    by_state = hc.stats().tasks_by_state
    return sum(n for state, n in by_state.items() if TaskState(state).pending)


def stuck_report(hc: Client, show: int = 8) -> str:
    """What is still pending and where, for the message of a drain that never finished."""
    pending = [s for s in TaskState if s.pending]
    tasks = hc.list_tasks(states=pending, limit=10_000)
    lines = [f"{len(tasks)} tasks pending: {dict(Counter(t.state.value for t in tasks))}"]
    for ep in hc.list_endpoints():
        lines.append(f"endpoint {ep!r}")
    for task in hc.get_tasks([t.id for t in tasks[:show]], history=True):
        story = ", ".join(
            f"{h.from_state.value if h.from_state else None}->{h.to_state.value} "
            f"({h.cause}, attempt {h.attempt}, {h.time and h.time.time()})"
            for h in task.history
        )
        lines.append(f"task {task.id}: {story}")
    return "\n".join(lines)


DEFAULT_SEED = 20261123


def run_chaos(chaos: Chaos, seed: int) -> None:
    rng = chaos.rng
    started = time.monotonic()
    for _ in range(2):
        chaos.start_agent()
    with Client(chaos.address) as hc:
        assert_eventually(
            lambda: server_answers(hc) and hc.stats().agents_online == 2,
            timeout=30,
            message="agents",
        )
        rounds = 0
        while time.monotonic() - started < FAULT_PHASE:
            rounds += 1
            assert_eventually(lambda: server_answers(hc), timeout=30, message="server answers")
            chaos.submit_wave(hc)
            # A random point in the run: real time passing is the chaos here, not a wait.
            time.sleep(rng.uniform(0.05, 0.8))
            fault = rng.choices(["kill-agent", "kill-server", "pause-agent", "none"], [4, 2, 2, 1])[
                0
            ]
            if fault == "kill-agent" and chaos.agents:
                chaos.kill_agent()
            elif fault == "kill-server":
                chaos.restart_server()
            elif fault == "pause-agent" and chaos.agents:
                chaos.pause_agent()
            while len(chaos.agents) < 1 or (len(chaos.agents) < 3 and rng.random() < 0.5):
                chaos.start_agent()
        chaos.note(f"faults over after {rounds} rounds; draining")

        # Drain: everything stored must settle, with the agents left running.
        left = BUDGET - (time.monotonic() - started)
        assert_eventually(lambda: server_answers(hc), timeout=30, message="server answers")
        try:
            assert_eventually(
                lambda: pending_count(hc) == 0,
                timeout=max(5.0, left - 5),
                interval=0.2,
                message="every task settled",
            )
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{stuck_report(hc)}") from None

        everything = hc.list_tasks(limit=1_000_000)
        ids = [t.id for t in everything]
        assert set(chaos.expected) <= set(ids), (
            "a task acknowledged to the client is missing from the store"
        )
        tasks: list[heartline.Task] = []
        for i in range(0, len(ids), 1000):
            tasks.extend(hc.get_tasks(ids[i : i + 1000], history=True))

    states = Counter(t.state.value for t in tasks)
    causes = Counter(h.cause for t in tasks for h in t.history if h.cause in FAULT_CAUSES)
    faults = Counter(" ".join(line.split()[1:3]) for line in chaos.log if " SIG" in line)
    print(f"chaos seed {seed}: {len(tasks)} tasks, {rounds} rounds, {dict(states)}")
    print(f"  faults injected {dict(faults)}; transitions they caused {dict(causes)}")
    assert faults and causes, "no fault reached a task; nothing was tested"
    for task in tasks:
        check_history(task)
        kind, value = chaos.expected.get(task.id, ("unknown", 0))
        if kind == "value":
            assert task.state is TaskState.SUCCEEDED and task.result == value, (
                f"task {task.id}: {task.state.value} {task.error}, want {value}"
            )
        elif kind == "raise":
            assert task.state is TaskState.ERRORED, f"task {task.id} is {task.state.value}"
            assert task.error is not None and task.error.type_name == "ValueError", task.error
            raised = sum(1 for h in task.history if h.cause.startswith("raised ValueError"))
            assert raised == value + 1, f"task {task.id} raised {raised} times, max_retries {value}"
    # Faults must not crash anything, trip the server's invariant checks (--validate) or
    # raise an unexpected error in an agent's stream loop (logged as event=stream-error).
    # A killed agent's output also holds its orphaned workers' complaints: only the
    # agent's own error events are checked there.
    servers = [srv.proc for srv in (*chaos.dead_servers, chaos.server)]
    for proc in servers + chaos.agents + chaos.dead_agents:
        text = proc.text()
        needle = "event=stream-error" if proc in chaos.dead_agents else "Traceback"
        if needle in text or "event=stream-error" in text:
            at = text.find("Traceback")
            raise AssertionError(
                f"pid {proc.pid} logged an error:\n{text[max(0, at - 400) : at + 4000]}"
            )
    assert time.monotonic() - started < BUDGET, (
        f"the chaos run took {time.monotonic() - started:.1f}s"
    )


@pytest.mark.parametrize("store_kind", STORE_KINDS)
def test_chaos_settles_every_task_exactly_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, store_kind: str, request: pytest.FixtureRequest
) -> None:
    # A fixed seed by default, so CI runs the same plan every time; set
    # HEARTLINE_CHAOS_SEED to explore others.
    seed = int(os.environ.get("HEARTLINE_CHAOS_SEED") or DEFAULT_SEED)
    print(f"chaos seed {seed} (replay with HEARTLINE_CHAOS_SEED={seed})")
    chaos = Chaos(tmp_path, random.Random(seed), new_db(store_kind, tmp_path, request))
    monkeypatch.setenv("HEARTLINE_ADDRESS", chaos.address)
    monkeypatch.setenv("HEARTLINE_HOME", str(chaos.home))  # its server's token file
    try:
        run_chaos(chaos, seed)
    except Exception as exc:
        raise AssertionError(f"chaos seed {seed}: {exc!r}\n{chaos.logs()}") from exc
    finally:
        chaos.stop_all()
