"""Lifecycle under faults (SPEC §3, §5, §8), injected by signals on real processes.

Each test runs a real server process (real SQLite file, heartbeat interval 0.2 s, so an
agent is lost after 0.6 s of silence) and real agent processes, and SIGSTOPs or SIGKILLs
them mid-run: an agent that goes silent, an agent killed in the middle of 5,000 tasks, one
of two agents of an endpoint killed, the server killed and restarted on the same store and
port, and workers that die or overrun their walltime. Every outcome is checked from the
store (client ``get_task`` with history): each task settled once, its result recorded
once, and extra attempts only where a fault explains them.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

import cloudpickle
import pytest

import heartline
from heartline import Client, Executor, TaskState
from heartline.client import FailureKind
from tests.conftest import HEARTBEAT, STORE_KINDS, ServerProc, relaunch_server
from tests.helpers import (
    Proc,
    agents_online,
    assert_eventually,
    run_cli,
    tail,
    wait_state,
    with_history,
)

# The functions below run on the agents' worker processes; ship them by value so the
# workers need not import this test module.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

HEARTBEAT_TIMEOUT = 3 * HEARTBEAT  # the server's default: 3 x the interval
TIMEOUT = 30.0  # bound of each wait for tasks to move; far above what they need
BULK = 5000  # tasks in the "middle of a run" scenarios
TERMINAL = frozenset(
    {
        TaskState.SUCCEEDED,
        TaskState.ERRORED,
        TaskState.FAILED,
        TaskState.CANCELLED,
        TaskState.SKIPPED,
    }
)
# Causes of the transition that takes a task off an agent that is gone.
LOST_CAUSES = frozenset({"stream-closed", "heartbeat-timeout", "endpoint-lost"})


@pytest.fixture(params=STORE_KINDS)
def store_kind(request: pytest.FixtureRequest) -> str:
    """Each test runs on a SQLite store, then on a PostgreSQL one."""
    return request.param


# ------------------------------------------------------------------------ remote functions


def nap(seconds: float, log: str) -> str:
    # One line per start of the function: the test counts how often it really ran.
    with open(log, "a") as fh:
        fh.write(f"{os.getpid()}\n")
    time.sleep(seconds)
    return "rested"


def brief(x: int, mark_at: int | None = None, marker: str = "") -> int:
    if x == mark_at:
        # Tell the test (through the file system, not the busy server) how far the run got.
        with open(marker, "w") as fh:
            fh.write(str(os.getpid()))
    return x * 3


def crash_unless(flag: str, value: int) -> int:
    """Kill the worker process mid-task unless ``flag`` exists."""
    if os.path.exists(flag):
        return value
    os._exit(3)


def linger_unless(flag: str, seconds: float) -> str:
    """Overrun any short walltime unless ``flag`` exists."""
    if os.path.exists(flag):
        return "quick"
    time.sleep(seconds)
    return "slow"


# ------------------------------------------------------------------------ helpers


def count(hc: Client, state: TaskState) -> int:
    return hc.stats().tasks_by_state.get(state.value, 0)


def wait_count(
    hc: Client, state: TaskState, n: int, timeout: float = TIMEOUT, why: str = ""
) -> None:
    def check() -> None:
        now = count(hc, state)
        assert now >= n, f"{now} tasks are {state.value}, want {n}"

    assert_eventually(
        check, timeout=timeout, interval=0.02, message=why or f"{n} tasks {state.value}"
    )


def assert_settled_once(task: heartline.Task) -> None:
    """One terminal transition, and it is the last one; for a success, one transition to it."""
    terminal = [h for h in task.history if h.to_state in TERMINAL]
    assert len(terminal) == 1, f"task {task.id} settled {len(terminal)} times: {story(task)}"
    assert task.history[-1] is terminal[0], f"task {task.id} moved after settling: {story(task)}"
    assert task.history[-1].to_state is task.state
    if task.state is TaskState.SUCCEEDED:
        assert sum(h.to_state is TaskState.SUCCEEDED for h in task.history) == 1, story(task)


def story(task: heartline.Task) -> str:
    steps = ", ".join(
        f"{h.from_state.value if h.from_state else None}->{h.to_state.value} "
        f"({h.cause}, attempt {h.attempt})"
        for h in task.history
    )
    return f"[{task.state.value}, attempt {task.attempt}] {steps}"


# ------------------------------------------------------------------------ 1. SIGSTOP


def test_a_silent_agent_makes_its_task_wait_then_it_resumes_without_a_rerun(
    server: ServerProc, start_agent: Callable[..., Proc], hc: Client, tmp_path: Path
) -> None:
    agent = start_agent("local", 1, "--prefetch", "0")
    runs = tmp_path / "runs.log"
    tid = hc.submit("local", nap, 3.0, str(runs))
    wait_state(hc, tid, TaskState.RUNNING)

    stopped_at = time.time()
    agent.signal(signal.SIGSTOP)
    try:
        # The server hears nothing more: the task waits for its endpoint again.
        task = wait_state(
            hc, tid, TaskState.WAITING_FOR_EP, timeout=HEARTBEAT_TIMEOUT + HEARTBEAT + 5
        )
        assert "offline" in task.waiting_reason, task.waiting_reason
        lost = hc.get_task(tid).history[-1]
        assert (lost.from_state, lost.to_state, lost.cause) == (
            TaskState.RUNNING,
            TaskState.WAITING_FOR_EP,
            "heartbeat-timeout",
        )
        assert lost.time is not None
        took = lost.time.timestamp() - stopped_at
        assert took <= HEARTBEAT_TIMEOUT + HEARTBEAT, f"declared lost {took:.2f}s after SIGSTOP"
        assert lost.attempt == 1
    finally:
        agent.signal(signal.SIGCONT)

    # The agent comes back still holding the task (its worker never stopped): running again.
    task = wait_state(hc, tid, TaskState.RUNNING, timeout=1.9)
    assert task.attempt == 1
    assert hc.get_result(tid, timeout=TIMEOUT) == "rested"
    task = hc.get_task(tid)
    assert task.state is TaskState.SUCCEEDED and task.attempt == 1, story(task)
    # Ran once: one dispatch, taken back on reconnect instead of dispatched again.
    assert [h.to_state for h in task.history].count(TaskState.DISPATCHED) == 1, story(task)
    assert [h.cause for h in task.history].count("dispatch") == 1, story(task)
    assert any(
        h.from_state is TaskState.WAITING_FOR_EP
        and h.to_state is TaskState.RUNNING
        and h.cause == "agent-reconnected"
        for h in task.history
    ), story(task)
    assert all(h.attempt == 1 for h in task.history), story(task)
    assert_settled_once(task)
    assert len(runs.read_text().splitlines()) == 1, "the function started more than once"


# ------------------------------------------------------------------------ 2. SIGKILL of an agent


def check_bulk(
    hc: Client, ids: list[str], value: Callable[[int], int], *procs: Proc
) -> list[heartline.Task]:
    """Every task SUCCEEDED with its value, settled once; extra attempts only after a loss."""
    tasks = with_history(hc, ids)
    bad = [t for t in tasks if t.state is not TaskState.SUCCEEDED]
    assert not bad, f"{len(bad)} tasks did not succeed, e.g. {story(bad[0])}\n{tail(*procs)}"
    wrong = [(i, t.result) for i, t in enumerate(tasks) if t.result != value(i)]
    assert not wrong, f"wrong results (index, value): {wrong[:5]}"
    for t in tasks:
        assert_settled_once(t)
        if t.attempt > 1:
            causes = {h.cause for h in t.history}
            assert causes & LOST_CAUSES, f"attempt {t.attempt} without a lost agent: {story(t)}"
        attempts = [h.attempt for h in t.history]
        assert attempts == sorted(attempts), story(t)
    for proc in procs:  # the kill crashed nothing and broke no invariant (--validate)
        assert "Traceback" not in proc.text(), tail(proc)
    return tasks


def register_endpoint(
    server: ServerProc, start_agent: Callable[..., Proc], name: str = "local"
) -> None:
    """Register the endpoint (an agent's first start does), and leave it with no agent,
    so that tasks submitted next are all stored before any of them runs."""
    start_agent(name, 1).stop()
    assert_eventually(
        lambda: agents_online(server.address, name) == 0, timeout=TIMEOUT, message="agent gone"
    )


def bulk_calls(
    n: int, marker: Path, mark_at: int
) -> list[tuple[Callable[..., int], tuple[object, ...], dict]]:
    return [(brief, (i, mark_at, str(marker)), {}) for i in range(n)]


def test_agent_killed_mid_run_of_5000_then_a_new_agent_finishes_them(
    server: ServerProc, start_agent: Callable[..., Proc], hc: Client, tmp_path: Path
) -> None:
    register_endpoint(server, start_agent)
    marker = tmp_path / "marker"
    ids = hc.submit_batch("local", bulk_calls(BULK, marker, BULK // 5))
    assert len(ids) == BULK
    first = start_agent("local", 2)
    assert_eventually(marker.exists, timeout=60, message="a fifth of the run done")
    first.kill()
    assert count(hc, TaskState.SUCCEEDED) < BULK, (
        "the run finished before the kill; nothing was tested"
    )

    # An agent of the endpoint comes back (and adopts the dead one's unacked results).
    second = start_agent("local", 2)
    wait_count(hc, TaskState.SUCCEEDED, BULK, timeout=90, why="all tasks succeeded")
    tasks = check_bulk(hc, ids, lambda i: i * 3, server.proc, first, second)
    # The kill caught work on the agent (its 2 workers and prefetch of 32): it came back.
    assert any(LOST_CAUSES & {h.cause for h in t.history} for t in tasks), (
        "no task was on the killed agent"
    )


# ------------------------------------------------------------------------ 3. one of two agents


def test_one_of_two_agents_killed_the_other_finishes_the_work(
    server: ServerProc, start_agent: Callable[..., Proc], hc: Client, tmp_path: Path
) -> None:
    register_endpoint(server, start_agent)
    n = 1500
    marker = tmp_path / "marker"
    ids = hc.submit_batch("local", bulk_calls(n, marker, n // 5))
    doomed = start_agent("local", 2)
    survivor = start_agent("local", 2)
    assert_eventually(marker.exists, timeout=60, message="a fifth of the run done")
    doomed.kill()
    assert count(hc, TaskState.SUCCEEDED) < n, (
        "the run finished before the kill; nothing was tested"
    )
    assert_eventually(
        lambda: agents_online(server.address, "local") == 1,
        timeout=TIMEOUT,
        message="one agent left",
    )

    wait_count(
        hc, TaskState.SUCCEEDED, n, timeout=60, why="the surviving agent finished everything"
    )
    assert survivor.popen.poll() is None
    tasks = check_bulk(hc, ids, lambda i: i * 3, server.proc, doomed, survivor)
    assert any(LOST_CAUSES & {h.cause for h in t.history} for t in tasks), (
        "no task was on the killed agent"
    )


# ------------------------------------------------------------------------ 4. SIGKILL of the server


def test_server_killed_mid_run_of_5000_restarts_on_its_store_and_loses_nothing(
    server: ServerProc, start_agent: Callable[..., Proc], tmp_path: Path
) -> None:
    srv = server
    servers = [srv]
    extra = 200  # submitted through an Executor sharing the client, at low priority: they run last
    # Register the endpoint, and leave it without agents for now.
    register_endpoint(srv, start_agent)
    marker = tmp_path / "marker"
    with Client(srv.address) as hc:
        # Everything is acknowledged (stored) before the agents run any of it.
        ex = Executor("local", client=hc, priority="low")
        futures = [ex.submit(brief, -i) for i in range(extra)]
        assert_eventually(
            lambda: all(f.task_id is not None for f in futures),
            timeout=TIMEOUT,
            message="stored",
        )
        ids = hc.submit_batch("local", bulk_calls(BULK, marker, BULK // 5))
        agents = [start_agent("local", 2, wait=False) for _ in range(2)]
        assert_eventually(marker.exists, timeout=60, message="a fifth of the run done")
        srv.proc.kill()
        assert not any(f.done() for f in futures), "low-priority tasks ran before the kill"

        # Same store, same port; the agents find it again by themselves.
        srv = relaunch_server(srv)
        servers.append(srv)
        assert_eventually(
            lambda: agents_online(srv.address, "local") == 2,
            timeout=30,
            message="both agents back",
        )

        # The same client object's waiters resolve through its reconnected watch.
        deadline = time.monotonic() + 90
        results = [hc.get_result(tid, timeout=max(0.1, deadline - time.monotonic())) for tid in ids]
        assert results == [i * 3 for i in range(BULK)]
        assert [f.result(timeout=max(0.1, deadline - time.monotonic())) for f in futures] == [
            -3 * i for i in range(extra)
        ]
        ex.shutdown()

        all_ids = ids + [f.task_id for f in futures]
        assert len(set(all_ids)) == BULK + extra
        assert count(hc, TaskState.SUCCEEDED) == BULK + extra
        tasks = with_history(hc, all_ids)  # type: ignore[arg-type]
        bad = [t for t in tasks if t.state is not TaskState.SUCCEEDED]
        assert not bad, f"{len(bad)} not succeeded, e.g. {story(bad[0])}\n{tail(*servers, *agents)}"
        for t in tasks:
            assert_settled_once(t)
            assert t.history[0].from_state is None
            if t.attempt > 1:
                causes = {h.cause for h in t.history}
                assert causes & (LOST_CAUSES | {"server-restarted"}), story(t)
        restarted = [t for t in tasks if any(h.cause == "server-restarted" for h in t.history)]
        assert restarted, "no task was on an agent when the server died"
        for proc in [s.proc for s in servers] + agents:
            assert "Traceback" not in proc.text(), tail(proc)


# ------------------------------------------------------------------------ 5. system failures


def test_a_worker_that_dies_is_requeued_then_errored_and_the_agent_keeps_serving(
    server: ServerProc, start_agent: Callable[..., Proc], hc: Client, tmp_path: Path
) -> None:
    agent = start_agent("local", 2, "--prefetch", "0")
    tid = hc.submit("local", crash_unless, str(tmp_path / "never"), 1, max_system_retries=1)
    # A system failure is no remote exception: the task failed, and says how.
    with pytest.raises(heartline.TaskFailedError, match="worker-died") as info:
        hc.get_result(tid, timeout=TIMEOUT)
    assert not isinstance(info.value, heartline.RemoteError)
    task = hc.get_task(tid)
    assert task.state is TaskState.ERRORED and task.attempt == 2, story(task)
    assert task.error is not None and task.error.failure_kind is FailureKind.WORKER_DIED
    assert task.error.type_name == "heartline.WorkerDied"
    assert "died" in task.error.message and "exit" in task.error.message, task.error.message
    assert "gave up after 2 system failures" in task.error.message, task.error.message
    causes = [(h.to_state, h.cause, h.attempt) for h in task.history if h.cause == "worker-died"]
    assert causes == [
        (TaskState.WAITING_FOR_EP, "worker-died", 2),
        (TaskState.ERRORED, "worker-died", 2),
    ], story(task)
    assert_settled_once(task)

    # The agent replaced its worker and keeps serving.
    assert agent.popen.poll() is None, tail(agent)
    assert hc.get_result(hc.submit("local", brief, 5), timeout=TIMEOUT) == 15


def test_a_task_past_its_walltime_is_errored_at_attempt_1_and_the_agent_keeps_serving(
    server: ServerProc, start_agent: Callable[..., Proc], hc: Client, tmp_path: Path
) -> None:
    """SPEC section 3: a walltime is the task's failure, counted against max_retries
    (default 0), not a system failure retried max_system_retries times."""
    agent = start_agent("local", 2, "--prefetch", "0")
    tid = hc.submit("local", linger_unless, str(tmp_path / "never"), 5.0, walltime=0.5)
    with pytest.raises(heartline.TaskFailedError, match="walltime") as info:
        hc.get_result(tid, timeout=TIMEOUT)
    assert not isinstance(info.value, heartline.RemoteError)
    task = hc.get_task(tid)
    # From the task's own stamps, so a slow start of the agent does not count.
    running = next(h.time for h in task.history if h.to_state is TaskState.RUNNING)
    ran = (task.history[-1].time - running).total_seconds()
    assert ran < 4.5, f"the walltime did not cut the 5 s sleep short: it ran {ran} s"
    assert task.state is TaskState.ERRORED and task.attempt == 1, story(task)
    assert task.error is not None and task.error.failure_kind is FailureKind.WALLTIME
    assert task.error.type_name == "heartline.WalltimeExceeded"
    assert "walltime" in task.error.message, task.error.message
    causes = [(h.to_state, h.attempt) for h in task.history if h.cause.startswith("walltime")]
    assert causes == [(TaskState.ERRORED, 1)], story(task)
    assert_settled_once(task)

    # With max_retries=1 it runs twice, then errs.
    tid = hc.submit(
        "local", linger_unless, str(tmp_path / "never"), 5.0, walltime=0.3, max_retries=1
    )
    with pytest.raises(heartline.TaskFailedError, match="walltime"):
        hc.get_result(tid, timeout=TIMEOUT)
    task = hc.get_task(tid)
    assert task.state is TaskState.ERRORED and task.attempt == 2, story(task)
    causes = [(h.to_state, h.cause) for h in task.history if h.cause.startswith("walltime")]
    assert causes == [
        (TaskState.WAITING_FOR_EP, "walltime-exceeded; retry 1 of 1"),
        (TaskState.ERRORED, "walltime-exceeded"),
    ], story(task)

    assert agent.popen.poll() is None, tail(agent)
    assert hc.get_result(hc.submit("local", brief, 7), timeout=TIMEOUT) == 21


def errored_by_crash(hc: Client, flag: Path, value: int, retries: int = 0) -> str:
    tid = hc.submit("local", crash_unless, str(flag), value, max_system_retries=retries)
    with pytest.raises(heartline.TaskFailedError, match="worker-died"):
        hc.get_result(tid, timeout=TIMEOUT)
    assert hc.get_task(tid, history=False).state is TaskState.ERRORED
    return tid


def cancelled_task(hc: Client, flag: Path, value: int) -> str:
    tid = hc.submit("local", crash_unless, str(flag), value, held=True)
    [update] = hc.cancel([tid])
    assert update.state is TaskState.CANCELLED
    return tid


def test_retry_give_up_and_resubmit_from_the_client(
    server: ServerProc, start_agent: Callable[..., Proc], hc: Client, tmp_path: Path
) -> None:
    start_agent("local", 2, "--prefetch", "0")
    flag = tmp_path / "fixed"

    # retry: ERRORED -> a fresh attempt (with fresh retry budgets). A walltime is the
    # task's own failure (errored at attempt 1); a crash is retried once by the system.
    walltime_tid = hc.submit("local", linger_unless, str(flag), 5.0, walltime=0.5)
    crash_tid = errored_by_crash(hc, flag, 11, retries=1)
    with pytest.raises(heartline.TaskFailedError, match="walltime"):
        hc.get_result(walltime_tid, timeout=TIMEOUT)
    flag.touch()  # "fix the bug", then retry
    attempts = {crash_tid: 3, walltime_tid: 2}
    updates = hc.retry([crash_tid, walltime_tid])
    assert [u.task_id for u in updates] == [crash_tid, walltime_tid]
    # The answer is read after the retry committed: a quick attempt may already be done.
    assert all(
        u.attempt == attempts[u.task_id] and (u.pending or u.state is TaskState.SUCCEEDED)
        for u in updates
    ), updates
    assert hc.get_result(crash_tid, timeout=TIMEOUT) == 11
    assert hc.get_result(walltime_tid, timeout=TIMEOUT) == "quick"
    for tid in (crash_tid, walltime_tid):
        task = hc.get_task(tid)
        assert task.state is TaskState.SUCCEEDED and task.attempt == attempts[tid], story(task)
        assert (TaskState.ERRORED, TaskState.WAITING_FOR_EP, "retry") in [
            (h.from_state, h.to_state, h.cause) for h in task.history
        ], story(task)
        assert sum(h.to_state is TaskState.SUCCEEDED for h in task.history) == 1

    # give up: ERRORED -> FAILED, for good
    other_flag = tmp_path / "fixed-later"
    doomed = errored_by_crash(hc, other_flag, 12)
    [update] = hc.give_up([doomed])
    assert update.state is TaskState.FAILED and not update.pending
    task = hc.get_task(doomed)
    assert task.state is TaskState.FAILED, story(task)
    assert [(h.from_state, h.to_state) for h in task.history][-1] == (
        TaskState.ERRORED,
        TaskState.FAILED,
    )
    with pytest.raises(heartline.HeartlineError, match="failed"):
        hc.retry([doomed])  # FAILED is permanent
    assert hc.get_task(doomed, history=False).state is TaskState.FAILED

    # resubmit: FAILED or CANCELLED -> a new task from the stored record, linked to it
    cancelled = cancelled_task(hc, other_flag, 13)
    other_flag.touch()
    new_ids = hc.resubmit([doomed, cancelled])
    assert len(new_ids) == 2 and not {doomed, cancelled} & set(new_ids)
    for old, new, value in zip([doomed, cancelled], new_ids, [12, 13], strict=True):
        assert hc.get_result(new, timeout=TIMEOUT) == value
        task = hc.get_task(new)
        assert task.resubmitted_from == old, story(task)
        assert task.attempt == 1 and task.history[0].from_state is None, story(task)
        assert old in task.history[0].cause, story(task)
    # The originals keep their record.
    assert [t.state for t in hc.get_tasks([doomed, cancelled])] == [
        TaskState.FAILED,
        TaskState.CANCELLED,
    ]


def test_retry_give_up_and_resubmit_from_the_cli(
    server: ServerProc, start_agent: Callable[..., Proc], hc: Client, tmp_path: Path
) -> None:
    start_agent("local", 2, "--prefetch", "0")

    def cli(*args: str) -> str:
        out = run_cli(*args, env=server.env, timeout=60)
        assert out.returncode == 0, (
            f"heartline {' '.join(args)} exited {out.returncode}:\n{out.stdout}\n{out.stderr}"
        )
        assert "Traceback" not in out.stderr, out.stderr
        return out.stdout

    flag = tmp_path / "fixed"
    tid = errored_by_crash(hc, flag, 21, retries=1)
    assert hc.get_task(tid, history=False).attempt == 2
    flag.touch()
    [line] = cli("tasks", "retry", tid).splitlines()
    # Read after the retry committed: the quick new attempt may already be done.
    assert line.split()[0] == tid and line.split()[1] in {
        s.value for s in TaskState if s.pending
    } | {TaskState.SUCCEEDED.value}, line
    assert hc.get_result(tid, timeout=TIMEOUT) == 21
    task = hc.get_task(tid)
    assert task.state is TaskState.SUCCEEDED and task.attempt == 3, story(task)

    other_flag = tmp_path / "fixed-later"
    doomed = errored_by_crash(hc, other_flag, 22)
    assert cli("tasks", "give-up", doomed).split() == [doomed, "failed"]
    assert hc.get_task(doomed, history=False).state is TaskState.FAILED

    cancelled = cancelled_task(hc, other_flag, 23)
    other_flag.touch()
    lines = cli("tasks", "resubmit", doomed, cancelled).splitlines()
    assert len(lines) == 2, lines
    for line, old, value in zip(lines, [doomed, cancelled], [22, 23], strict=True):
        shown_old, arrow, new = line.split()
        assert (shown_old, arrow) == (old, "->") and new != old, line
        assert hc.get_result(new, timeout=TIMEOUT) == value
        assert hc.get_task(new, history=False).resubmitted_from == old
