"""End to end on both executors: the same cases against an agent that runs its tasks on
worker processes (``--executor process``) and one that runs them on a Dask distributed
cluster (``--executor dask --dask-scheduler ...``), then the cases only a Dask cluster has.

Each executor gets a module stack (tests/conftest.py ``stack``): a real server process
and its ``local`` agent process; for ``dask``, also a real ``dask scheduler`` and two
one-thread ``dask worker`` processes, started before the agent and stopped by PID after
it. Endpoints that need a task queued at the server behind a running one (``solo``) get
one agent with one slot and no prefetch: for ``dask``, on a cluster of its own with one
worker of one thread.
"""

from __future__ import annotations

import os
import signal
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cloudpickle
import psutil
import pytest

import heartline
from heartline import Client, Executor, TaskState
from heartline.client import AgentInfo, FailureKind
from tests.conftest import DaskCluster, Stack, start_dask_cluster
from tests.helpers import assert_eventually, check_history, start_blocker, tail, wait_state

# The functions below run on the agents' workers (processes, or Dask worker threads);
# ship them by value so the workers need not import this test module.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

TIMEOUT = 30.0  # bound of every wait for a task; far above what any task here needs
EXECUTORS = ("process", "dask")
# Causes of the transition that takes a task off an agent that is gone.
LOST_CAUSES = frozenset({"stream-closed", "heartbeat-timeout", "endpoint-lost"})

pytestmark = [pytest.mark.timeout(90), pytest.mark.usefixtures("stack")]


# A dask-only test takes the ``dask`` stack alone (the same module stack as the others).
dask_only = pytest.mark.parametrize("executor", ["dask"], indirect=True)


# --------------------------------------------------------------------------- the stacks


@dataclass
class Engines:
    """How this module's agents run their tasks: the executor, and for ``dask`` the
    clusters (the ``local`` agent's, and a one-thread one for solo endpoints)."""

    executor: str
    cluster: DaskCluster | None
    solo: DaskCluster | None = None  # started by the first solo endpoint

    def args(self, cluster: DaskCluster | None = None) -> tuple[str, ...]:
        """An agent's arguments to run on this executor (on ``cluster``, or the module's)."""
        if self.executor == "process":
            return ()
        target = cluster or self.cluster
        assert target is not None
        return ("--executor", "dask", "--dask-scheduler", target.address)

    def solo_cluster(self) -> DaskCluster | None:
        if self.executor == "process":
            return None
        if self.solo is None:
            self.solo = start_dask_cluster("the solo endpoints' dask cluster", workers=1)
        return self.solo


@pytest.fixture(scope="module", params=EXECUTORS)
def executor(request: pytest.FixtureRequest) -> str:
    """Every test runs on both executors (but those marked ``dask_only``); pytest runs
    the tests of one executor together, on its module stack."""
    return request.param


@pytest.fixture(scope="module")
def engines(executor: str) -> Iterator[Engines]:
    cluster = None
    if executor == "dask":
        cluster = start_dask_cluster("the module stack's dask cluster", workers=2)
    made = Engines(executor, cluster)
    try:
        yield made
    finally:
        # After the stack (which depends on this fixture): its agents are gone by now.
        for each in (made.solo, cluster):
            if each is not None:
                each.group.close_and_check()


@pytest.fixture(scope="module")
def stack_agent_args(engines: Engines) -> tuple[str, ...]:
    """The module stack's ``local`` agent runs on the executor under test."""
    return engines.args()


@pytest.fixture(scope="module")
def stack_workers() -> int:
    return 2


def solo_endpoint(stack: Stack, engines: Engines) -> str:
    """An endpoint with one slot (one worker process, or one Dask thread) and no prefetch."""
    cluster = engines.solo_cluster()
    return stack.solo_endpoint(*engines.args(cluster))


# --------------------------------------------------------------------------- remote functions


def square(x: int) -> int:
    return x * x


async def doubled_later(x: int) -> int:
    return 2 * x


def explode(x: int) -> int:
    raise ValueError(f"bad value {x}")  # the line the remote traceback must show


def lingers(seconds: float, path: str) -> str:
    """Writes ``path`` after ``seconds`` (in short sleeps, so a stop lands between them)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(0.02)
    Path(path).write_text("ran to the end")
    return "slow"


def brief(x: int, mark_at: int, marker: str) -> int:
    time.sleep(0.005)
    if x == mark_at:
        # Tell the test (through the file system) how far the run got.
        Path(marker).write_text(str(x))
    return x * 3


def noted_nap(seconds: float) -> tuple[float, float]:
    """Sleeps; returns when it began and ended (wall clock, the same machine's)."""
    began = time.time()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(0.02)
    return began, time.time()


def meets(folder: str, n: int) -> tuple[float, float, int]:
    """Notes its start in ``folder``, then waits (at most 30 s) until ``n`` tasks have;
    returns when it began and ended, and how many it saw begin."""
    began = time.time()
    Path(folder, str(uuid.uuid4())).touch()
    deadline = time.monotonic() + 30
    while len(os.listdir(folder)) < n and time.monotonic() < deadline:
        time.sleep(0.02)
    return began, time.time(), len(os.listdir(folder))


def waits_for(path: str, x: int) -> int:
    """Runs until ``path`` exists (at most a minute)."""
    deadline = time.monotonic() + 60
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.02)
    return x


def dies_with_its_worker_unless(flag: str, pid_file: str, x: int) -> int:
    """Notes its process and waits (the test kills that Dask worker) unless ``flag`` exists."""
    if os.path.exists(flag):
        return x
    # Written whole, then renamed: the test polls for the file and reads it at once.
    Path(f"{pid_file}.part").write_text(str(os.getpid()))
    os.replace(f"{pid_file}.part", pid_file)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        time.sleep(0.02)
    return -1


# --------------------------------------------------------------------------- helpers


def state_of(hc: Client, tid: str) -> TaskState:
    return hc.get_task(tid, history=False).state


def agents_of(hc: Client, endpoint: str) -> list[AgentInfo]:
    for ep in hc.list_endpoints():
        if ep.name == endpoint:
            return list(ep.agents)
    return []


def capacities(hc: Client, endpoint: str) -> list[int]:
    return [a.capacity for a in agents_of(hc, endpoint)]


def with_history(hc: Client, ids: list[str]) -> list[heartline.Task]:
    return hc.get_tasks(ids, history=True)


# --------------------------------------------------------------------------- both executors


def test_results(stack: Stack, hc: Client) -> None:
    with Executor("local", stack.address) as ex:
        assert ex.submit(pow, 2, 10).result(timeout=TIMEOUT) == 1024
        assert ex.submit(doubled_later, 21).result(timeout=TIMEOUT) == 42
        assert list(ex.map(square, range(50), timeout=TIMEOUT)) == [x * x for x in range(50)]
    ids = hc.submit_batch("local", [(square, (i,), {}) for i in range(200)])
    assert [hc.get_result(t, timeout=TIMEOUT) for t in ids] == [i * i for i in range(200)]
    for task in with_history(hc, ids[::20]):
        check_history(task)
        # The engine reported each step (an agent lost under load and back adds more).
        states = [h.to_state for h in task.history]
        assert TaskState.WAITING_FOR_LAUNCH in states and TaskState.RUNNING in states, states


def test_remote_exception_keeps_its_traceback(hc: Client) -> None:
    tid = hc.submit("local", explode, 7)
    with pytest.raises(heartline.RemoteError) as info:
        hc.get_result(tid, timeout=TIMEOUT)
    err = info.value
    assert (err.remote_type, err.message) == ("ValueError", "bad value 7")
    assert 'raise ValueError(f"bad value {x}")' in err.remote_traceback
    assert "explode" in err.remote_traceback
    # The user's frames, not the engine's: no agent, pool or Dask frame in it.
    assert "distributed" not in err.remote_traceback, err.remote_traceback
    assert "_dask.py" not in err.remote_traceback, err.remote_traceback
    task = hc.get_task(tid)
    assert task.state is TaskState.ERRORED and task.attempt == 1
    assert task.error is not None and task.error.failure_kind is None  # it raised
    check_history(task)


def test_held_at_submit_runs_after_release(hc: Client) -> None:
    held = hc.submit("local", square, 9, held=True)
    assert hc.get_result(hc.submit("local", square, 2), timeout=TIMEOUT) == 4
    assert state_of(hc, held) is TaskState.HELD
    [update] = hc.release([held])
    assert update.state is not TaskState.HELD
    assert hc.get_result(held, timeout=TIMEOUT) == 81
    check_history(hc.get_task(held))


def test_hold_release_and_cancel_of_queued_tasks(
    stack: Stack, engines: Engines, hc: Client
) -> None:
    ep = solo_endpoint(stack, engines)
    blocker = start_blocker(hc, ep)
    to_hold = hc.submit(ep, square, 5)
    to_cancel = hc.submit(ep, square, 6)
    assert state_of(hc, to_hold) is TaskState.WAITING_FOR_EP
    assert state_of(hc, to_cancel) is TaskState.WAITING_FOR_EP

    [update] = hc.hold([to_hold])
    assert update.state is TaskState.HELD and update.pending
    [update] = hc.cancel([to_cancel])
    assert update.state is TaskState.CANCELLED and not update.pending
    hc.cancel([blocker])
    # The one slot is free again: a later task runs while the held one stays put.
    assert hc.get_result(hc.submit(ep, square, 7), timeout=TIMEOUT) == 49
    assert state_of(hc, to_hold) is TaskState.HELD

    [update] = hc.release([to_hold])
    assert update.state is not TaskState.HELD
    assert hc.get_result(to_hold, timeout=TIMEOUT) == 25
    cancelled = hc.get_task(to_cancel)
    assert [h.to_state for h in cancelled.history] == [
        TaskState.WAITING_FOR_EP,
        TaskState.CANCELLED,
    ]
    for task in with_history(hc, [to_hold, to_cancel, blocker]):
        check_history(task)


def test_hold_release_and_cancel_of_a_running_task(
    stack: Stack, engines: Engines, hc: Client, tmp_path: Path
) -> None:
    ep = solo_endpoint(stack, engines)
    ran_out = tmp_path / "ran-out"
    running = hc.submit(ep, lingers, 20.0, str(ran_out))
    wait_state(hc, running, TaskState.RUNNING, timeout=TIMEOUT)
    queued = hc.submit(ep, square, 4)
    assert state_of(hc, queued) is TaskState.WAITING_FOR_EP
    before = hc.get_task(running)

    # Only a queued task can be held, only a held one released: both refused, nothing moves.
    with pytest.raises(heartline.FailedPreconditionError, match=running):
        hc.hold([running])
    with pytest.raises(heartline.FailedPreconditionError, match=running):
        hc.release([running])
    assert hc.get_task(running).history == before.history

    t0 = time.monotonic()
    [update] = hc.cancel([running])
    assert update.state is TaskState.CANCELLED
    # The one slot is free long before the cancelled task's 20 s: it really stopped.
    assert hc.get_result(queued, timeout=TIMEOUT) == 16
    assert hc.get_result(hc.submit(ep, square, 3), timeout=TIMEOUT) == 9
    assert time.monotonic() - t0 < 10
    assert not ran_out.exists()
    task = hc.get_task(running)
    assert task.state is TaskState.CANCELLED
    assert [h.to_state for h in task.history][-2:] == [TaskState.RUNNING, TaskState.CANCELLED]
    check_history(task)


def test_walltime_errors_the_attempt_and_the_agent_keeps_serving(
    hc: Client, tmp_path: Path
) -> None:
    ran_out = tmp_path / "ran-out"
    tid = hc.submit("local", lingers, 5.0, str(ran_out), walltime=0.5)
    with pytest.raises(heartline.TaskFailedError, match="walltime"):
        hc.get_result(tid, timeout=TIMEOUT)
    task = hc.get_task(tid)
    assert task.state is TaskState.ERRORED and task.attempt == 1
    assert task.error is not None and task.error.failure_kind is FailureKind.WALLTIME
    assert "walltime" in task.error.message, task.error.message
    # The first RUNNING: an agent lost under load and back adds one when it reconnects.
    running = next(h for h in task.history if h.to_state is TaskState.RUNNING)
    stopped = task.history[-1]
    assert stopped.cause.startswith("walltime"), stopped
    assert running.time is not None and stopped.time is not None
    # Server stamps: RUNNING is stamped when the agent's report arrives, after its clock
    # started, so the span may be a little under the walltime.
    ran = (stopped.time - running.time).total_seconds()
    assert 0.3 <= ran < 4.0, f"the walltime did not cut the 5 s run short: it ran {ran:.2f} s"
    check_history(task)
    assert hc.get_result(hc.submit("local", square, 8), timeout=TIMEOUT) == 64
    assert not ran_out.exists()


def test_agent_killed_mid_run_and_restarted_loses_nothing(
    stack: Stack, engines: Engines, hc: Client, tmp_path: Path
) -> None:
    ep = f"restart-{uuid.uuid4().hex[:8]}"
    n = 300
    marker = tmp_path / "marker"
    first = stack.start_agent(ep, 2, *engines.args())
    ids = hc.submit_batch(ep, [(brief, (i, n // 5, str(marker)), {}) for i in range(n)])
    assert_eventually(marker.exists, timeout=TIMEOUT, message="a fifth of the run done")
    first.kill()
    done = sum(1 for t in hc.get_tasks(ids) if t.state is TaskState.SUCCEEDED)
    assert done < n, "the run finished before the kill; nothing was tested"

    # An agent of the endpoint comes back (and adopts the dead one's unacked results).
    second = stack.start_agent(ep, 2, *engines.args())

    def all_settled() -> None:
        pending = [t.id for t in hc.get_tasks(ids) if t.pending]
        assert not pending, f"{len(pending)} tasks pending"

    assert_eventually(all_settled, timeout=60, interval=0.1, message="every task settled")
    tasks = with_history(hc, ids)
    lost = 0
    for i, task in enumerate(tasks):
        check_history(task)
        assert task.state is TaskState.SUCCEEDED and task.result == 3 * i, (i, task.state)
        causes = {h.cause for h in task.history}
        if causes & LOST_CAUSES:
            lost += 1
        elif task.attempt > 1:
            raise AssertionError(f"task {task.id} attempt {task.attempt} without a lost agent")
    assert lost, "no task was on the killed agent"
    second.stop()
    assert "Traceback" not in second.text(), tail(second)


# --------------------------------------------------------------------------- dask only


@dask_only
def test_dask_worker_killed_mid_task_runs_again_as_attempt_2(
    engines: Engines, hc: Client, tmp_path: Path
) -> None:
    cluster = engines.cluster
    assert cluster is not None
    # A third worker, so that the cluster still has two once the one running the task dies.
    cluster.add_worker()
    assert_eventually(lambda: capacities(hc, "local") == [3], timeout=TIMEOUT, message="capacity 3")
    flag, pid_file = tmp_path / "flag", tmp_path / "pid"
    tid = hc.submit("local", dies_with_its_worker_unless, str(flag), str(pid_file), 11)
    wait_state(hc, tid, TaskState.RUNNING, timeout=TIMEOUT)
    assert_eventually(pid_file.exists, timeout=TIMEOUT, message="the task noted its worker")
    victim = int(pid_file.read_text())
    assert victim in cluster.workers, (victim, cluster.workers)
    flag.touch()  # the next attempt returns at once
    os.kill(victim, signal.SIGKILL)
    del cluster.workers[victim]

    assert hc.get_result(tid, timeout=TIMEOUT) == 11
    task = hc.get_task(tid)
    check_history(task)
    assert task.state is TaskState.SUCCEEDED and task.attempt == 2
    died = [h for h in task.history if h.cause == "worker-died"]
    assert [(h.from_state, h.to_state, h.attempt) for h in died] == [
        (TaskState.RUNNING, TaskState.WAITING_FOR_EP, 2)
    ], task.history
    first_attempt = task.history[: task.history.index(died[0])]
    assert TaskState.RUNNING in [h.to_state for h in first_attempt]
    assert all(h.attempt == 1 for h in first_attempt), task.history
    assert_eventually(
        lambda: capacities(hc, "local") == [2], timeout=TIMEOUT, message="capacity back to 2"
    )


@dask_only
def test_cluster_scaled_from_0_to_1_to_3_workers(
    stack: Stack, engines: Engines, hc: Client, tmp_path: Path
) -> None:
    """An agent on a cluster with no workers yet (an adaptive dask-jobqueue cluster
    starts so) connects at once with capacity 0 and takes tasks, which Dask queues; as
    workers join, its capacity grows and more tasks run at once."""
    cluster = start_dask_cluster("the scaling test's dask cluster", workers=0)
    agent = None
    try:
        ep = f"scale-{uuid.uuid4().hex[:8]}"
        agent = stack.start_agent(ep, 2, *engines.args(cluster))
        assert capacities(hc, ep) == [0]
        ids = hc.submit_batch(ep, [(noted_nap, (0.3,), {}) for _ in range(2)])
        for tid in ids:  # sent to the agent, queued by Dask
            wait_state(hc, tid, TaskState.WAITING_FOR_LAUNCH, timeout=TIMEOUT)

        cluster.add_worker()
        assert_eventually(lambda: capacities(hc, ep) == [1], timeout=TIMEOUT, message="capacity 1")
        (a0, a1), (b0, b1) = (hc.get_result(t, timeout=TIMEOUT) for t in ids)
        assert a1 <= b0 or b1 <= a0, "one thread ran two tasks at once"

        cluster.add_worker()
        cluster.add_worker()
        assert_eventually(lambda: capacities(hc, ep) == [3], timeout=TIMEOUT, message="capacity 3")
        # Each waits until all three have begun: they end only if they ran at once.
        folder = tmp_path / "met"
        folder.mkdir()
        ids = hc.submit_batch(ep, [(meets, (str(folder), 3), {}) for _ in range(3)])
        spans = [hc.get_result(t, timeout=TIMEOUT + 30) for t in ids]
        assert [seen for _, _, seen in spans] == [3, 3, 3], spans
        assert max(b for b, _, _ in spans) < min(e for _, e, _ in spans), spans
        for task in with_history(hc, ids):
            check_history(task)
    finally:
        if agent is not None:
            agent.stop()  # before its scheduler goes
        cluster.group.close_and_check()


@dask_only
def test_two_agents_of_one_endpoint_share_one_cluster(
    stack: Stack, engines: Engines, hc: Client, tmp_path: Path
) -> None:
    ep = f"shared-{uuid.uuid4().hex[:8]}"
    agents = [stack.start_agent(ep, 2, *engines.args()) for _ in range(2)]
    assert_eventually(
        lambda: capacities(hc, ep) == [2, 2], timeout=TIMEOUT, message="each sees the cluster"
    )
    go = tmp_path / "go"
    gated = hc.submit_batch(ep, [(waits_for, (str(go), i), {}) for i in range(8)])

    def spread() -> None:
        in_flight = [a.in_flight for a in agents_of(hc, ep)]
        assert sum(in_flight) == 8 and all(in_flight), in_flight

    # The tasks wait for the go file, so where they are can be read while they wait.
    assert_eventually(spread, timeout=TIMEOUT, message="the tasks spread over both agents")
    go.touch()
    quick = hc.submit_batch(ep, [(square, (i,), {}) for i in range(40)])
    assert [hc.get_result(t, timeout=TIMEOUT) for t in gated] == list(range(8))
    assert [hc.get_result(t, timeout=TIMEOUT) for t in quick] == [i * i for i in range(40)]
    for task in with_history(hc, gated + quick):
        check_history(task)  # settled once: no result recorded twice
    for agent in agents:
        agent.stop()


@dask_only
def test_without_a_scheduler_address_the_agent_runs_a_local_cluster(
    stack: Stack, hc: Client
) -> None:
    ep = f"lc-{uuid.uuid4().hex[:8]}"
    agent = stack.start_agent(ep, 1, "--executor", "dask")
    assert_eventually(lambda: capacities(hc, ep) == [1], timeout=TIMEOUT, message="capacity 1")
    assert "on a Dask LocalCluster of 1 workers" in agent.text(), tail(agent)
    assert hc.get_result(hc.submit(ep, square, 12), timeout=TIMEOUT) == 144
    cluster = psutil.Process(agent.pid).children(recursive=True)
    assert cluster, "the LocalCluster runs its workers as processes"

    assert agent.stop() == 0, tail(agent)

    def alive(process: psutil.Process) -> bool:
        try:
            return process.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    def gone() -> None:
        left = [p for p in cluster if alive(p)]
        assert not left, f"processes left by the LocalCluster: {left}"

    assert_eventually(gone, timeout=TIMEOUT, message="the LocalCluster stopped with its agent")
