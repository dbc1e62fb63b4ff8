"""The dask engine (heartline.endpoint._dask) driven directly, against a real cluster.

A ``dask scheduler`` and ``dask worker`` processes run as separate processes (no nanny,
so a worker's PID is the process that runs the task and SIGKILL really kills it); the
engine runs on the test's own event loop with a recording listener, as on an agent.
"""

from __future__ import annotations

import asyncio
import os
import pickle
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import cloudpickle
import psutil
import pytest

from heartline._serialize import dumps_args, dumps_function, function_id
from heartline.endpoint._dask import DaskEngine, EngineState
from heartline.endpoint._engine import Engine, EngineListener
from heartline.endpoint._workers import FailureKind, Job, Outcome, WorkerPool
from tests.conftest import DaskCluster, start_dask_cluster
from tests.helpers import tail, wait_until

WAIT = 30.0  # bound on any single wait; a healthy cluster answers in well under a second

pytestmark = [pytest.mark.usefixtures("loop_watchdog"), pytest.mark.timeout(60)]

# Functions are pickled by value, so the Dask workers need not import the tests.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


# --------------------------------------------------------------------------- the cluster


@pytest.fixture(scope="module")
def cluster() -> Iterator[DaskCluster]:
    """One worker with one thread, shared by the tests that leave the cluster as it was."""
    shared = start_dask_cluster("the module's dask cluster", workers=1)
    yield shared
    shared.group.close_and_check()


@pytest.fixture
def own_cluster() -> Iterator[Callable[[int], DaskCluster]]:
    """A cluster for a test that kills or adds workers."""
    made: list[DaskCluster] = []

    def make(workers: int) -> DaskCluster:
        made.append(start_dask_cluster("this test's dask cluster", workers))
        return made[-1]

    yield make
    for each in made:
        each.group.close_and_check()


# --------------------------------------------------------------------------- the listener


class Recorder:
    """An EngineListener that keeps every event, with its time, and awaits outcomes."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str, int, float]] = []  # (kind, task, attempt, time)
        self.capacities: list[int] = []
        self.problems: list[str] = []
        self.results: list[tuple[str, int, Outcome]] = []
        self._changed = asyncio.Event()

    def _note(self, kind: str, job: Job) -> None:
        self.events.append((kind, job.task_id, job.attempt, time.monotonic()))
        self._changed.set()

    def task_launched(self, job: Job) -> None:
        self._note("launched", job)

    def task_started(self, job: Job) -> None:
        self._note("started", job)

    def task_finished(self, job: Job, outcome: Outcome) -> None:
        if self.outcomes(job.task_id, job.attempt):
            self.problems.append(f"{job.task_id}/{job.attempt} finished twice")
        self._note("finished", job)
        self.results.append((job.task_id, job.attempt, outcome))

    def capacity_changed(self, capacity: int) -> None:
        self.capacities.append(capacity)
        self._changed.set()

    def outcomes(self, task_id: str, attempt: int = 1) -> list[Outcome]:
        return [o for t, a, o in self.results if (t, a) == (task_id, attempt)]

    def kinds(self, task_id: str, attempt: int = 1) -> list[str]:
        return [k for k, t, a, _ in self.events if (t, a) == (task_id, attempt)]

    def time_of(self, kind: str, task_id: str) -> float:
        return next(at for k, t, _, at in self.events if (k, t) == (kind, task_id))

    async def until(self, predicate: Callable[[], Any], timeout: float = WAIT) -> None:
        """Wait, bounded, until a listener call makes ``predicate`` true."""
        async with asyncio.timeout(timeout):
            while not predicate():
                self._changed.clear()
                await self._changed.wait()

    async def outcome(self, job: Job, timeout: float = WAIT) -> Outcome:
        await self.until(lambda: self.outcomes(job.task_id, job.attempt), timeout)
        return self.outcomes(job.task_id, job.attempt)[0]

    async def started(self, job: Job) -> None:
        await self.until(lambda: "started" in self.kinds(job.task_id, job.attempt))


@pytest.fixture
async def engine(cluster: DaskCluster) -> AsyncIterator[tuple[DaskEngine, Recorder]]:
    async with running(DaskEngine(Recorder(), cluster.address, poll_interval=0.5)) as pair:
        yield pair


class running:
    """Runs an engine on the test's loop; closes it and awaits its end on the way out."""

    def __init__(self, dask_engine: DaskEngine) -> None:
        self.engine = dask_engine
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> tuple[DaskEngine, Recorder]:
        recorder = self.engine._listener
        assert isinstance(recorder, Recorder)
        self._task = asyncio.create_task(self.engine.run())
        await recorder.until(lambda: self.engine.capacity > 0 or self._task.done())
        if self._task.done():
            self._task.result()  # raise what stopped it
        return self.engine, recorder

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self.engine.close()
        async with asyncio.timeout(WAIT):
            await self._task
        recorder = self.engine._listener
        assert isinstance(recorder, Recorder)
        assert not recorder.problems, recorder.problems


# --------------------------------------------------------------------------- tasks


_counter = iter(range(1_000_000))


def job(fn: Callable[..., Any], *args: Any, walltime: float = 0.0, **kwargs: Any) -> Job:
    payload = dumps_function(fn)
    return Job(
        task_id=f"t{next(_counter)}-{os.getpid()}",
        attempt=1,
        function_id=function_id(payload),
        function=payload,
        args=dumps_args(args, kwargs),
        walltime=walltime,
    )


def again(previous: Job, fn: Callable[..., Any], *args: Any) -> Job:
    """The next attempt of the same task, running ``fn`` this time."""
    fresh = job(fn, *args)
    fresh.task_id, fresh.attempt = previous.task_id, previous.attempt + 1
    return fresh


def value(outcome: Outcome) -> Any:
    assert outcome.failure is None, outcome.failure
    return pickle.loads(outcome.result)


def add(a: int, b: int) -> int:
    return a + b


def fails_here(message: str) -> None:
    raise KeyError(message)


def writes_later(path: str, seconds: float) -> str:
    """Writes ``path`` after ``seconds``, waking every 20 ms (an interrupt lands between)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(0.02)
    Path(path).write_text("ran to the end")
    return "wrote"


def notes_pid_then_waits(path: str, seconds: float) -> int:
    # Written whole, then renamed: the test polls for the file and reads it at once.
    Path(f"{path}.part").write_text(str(os.getpid()))
    os.replace(f"{path}.part", path)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(0.02)
    return os.getpid()


def naps(seconds: float) -> str:
    time.sleep(seconds)
    return "rested"


async def asleep_then(value: int) -> int:
    await asyncio.sleep(0.01)
    return value * 2


# --------------------------------------------------------------------------- tests


def test_worker_pool_fits_the_seam() -> None:
    """The process pool is an Engine as it stands (checked by mypy, and here at runtime)."""
    listener: EngineListener = Recorder()
    pool: Engine = WorkerPool(2, listener)
    assert pool.capacity == 2
    dask_engine: Engine = DaskEngine(listener, "tcp://127.0.0.1:1")
    assert dask_engine.capacity == 0


async def test_result(engine: tuple[DaskEngine, Recorder]) -> None:
    dask_engine, recorder = engine
    assert recorder.capacities == [1]
    j = job(add, 2, 40)
    dask_engine.submit(j)
    assert j.task_id in dask_engine
    assert value(await recorder.outcome(j)) == 42
    assert recorder.kinds(j.task_id) == ["launched", "started", "finished"]
    assert j.task_id not in dask_engine
    coroutine = job(asleep_then, 21)
    dask_engine.submit(coroutine)
    assert value(await recorder.outcome(coroutine)) == 42


async def test_remote_exception_keeps_its_traceback(engine: tuple[DaskEngine, Recorder]) -> None:
    dask_engine, recorder = engine
    j = job(fails_here, "no such key")
    dask_engine.submit(j)
    failure = (await recorder.outcome(j)).failure
    assert failure is not None and failure.kind is FailureKind.RAISED
    assert failure.type_name == "KeyError"
    assert "no such key" in failure.message
    assert "fails_here" in failure.traceback
    assert "raise KeyError(message)" in failure.traceback
    assert "_dask.py" not in failure.traceback and "distributed" not in failure.traceback
    assert recorder.kinds(j.task_id) == ["launched", "started", "finished"]


async def test_cancel_queued_and_running(
    engine: tuple[DaskEngine, Recorder], tmp_path: Path
) -> None:
    """On one thread: a running task and one queued behind it are both stopped."""
    dask_engine, recorder = engine
    running_job = job(writes_later, str(tmp_path / "running"), 20.0)
    queued_job = job(writes_later, str(tmp_path / "queued"), 0.0)
    dask_engine.submit(running_job)
    await recorder.started(running_job)
    dask_engine.submit(queued_job)
    assert recorder.kinds(queued_job.task_id) == ["launched"]

    assert dask_engine.cancel(queued_job.task_id)
    assert dask_engine.cancel(running_job.task_id)
    assert not dask_engine.cancel(running_job.task_id)  # no longer held

    # The one thread is free long before the running task's 20 s: it really stopped.
    after = job(add, 1, 1)
    dask_engine.submit(after)
    assert value(await recorder.outcome(after, timeout=10.0)) == 2
    assert not (tmp_path / "running").exists()
    assert not (tmp_path / "queued").exists()
    assert recorder.kinds(running_job.task_id) == ["launched", "started"]
    assert recorder.kinds(queued_job.task_id) == ["launched"]


async def test_walltime_stops_the_task(engine: tuple[DaskEngine, Recorder], tmp_path: Path) -> None:
    dask_engine, recorder = engine
    slow = job(writes_later, str(tmp_path / "slow"), 5.0, walltime=0.5)
    dask_engine.submit(slow)
    failure = (await recorder.outcome(slow)).failure
    assert failure is not None and failure.kind is FailureKind.WALLTIME
    assert "walltime of 0.5 s" in failure.message
    ran_for = recorder.time_of("finished", slow.task_id) - recorder.time_of("started", slow.task_id)
    assert 0.5 <= ran_for < 3.0
    # One thread: had the task gone on, it would have written its file before this ran.
    after = job(add, 2, 2)
    dask_engine.submit(after)
    assert value(await recorder.outcome(after, timeout=10.0)) == 4
    assert not (tmp_path / "slow").exists()


async def test_killed_worker_is_one_system_failure(
    own_cluster: Callable[[int], DaskCluster], tmp_path: Path
) -> None:
    """SIGKILL the Dask worker mid-task: one WORKER_DIED for that attempt, and Dask's own
    rerun on the other worker (it allows failures) is stopped, never reported."""
    cluster = await asyncio.to_thread(own_cluster, 2)
    dask_engine = DaskEngine(Recorder(), cluster.address, poll_interval=0.5)
    async with running(dask_engine) as (_, recorder):
        await recorder.until(lambda: dask_engine.capacity == 2)
        pid_file = tmp_path / "pid"
        first = job(notes_pid_then_waits, str(pid_file), 120.0)
        dask_engine.submit(first)
        await recorder.started(first)
        await wait_until(pid_file.exists, timeout=WAIT)
        victim = int(pid_file.read_text())
        assert victim in cluster.workers, (victim, cluster.workers)
        os.kill(victim, signal.SIGKILL)

        failure = (await recorder.outcome(first)).failure
        assert failure is not None and failure.kind is FailureKind.WORKER_DIED, failure
        assert cluster.workers[victim] in failure.message
        assert first.task_id not in dask_engine
        await recorder.until(lambda: dask_engine.capacity == 1)

        # The survivor has one thread: Dask's rerun of attempt 1 there (if it started
        # one before our release reached it) would hold it for 120 s.
        second = again(first, add, 3, 4)
        dask_engine.submit(second)
        assert value(await recorder.outcome(second, timeout=10.0)) == 7
        assert recorder.kinds(first.task_id, 1) == ["launched", "started", "finished"]
        assert recorder.kinds(second.task_id, 2) == ["launched", "started", "finished"]
    assert len(recorder.outcomes(first.task_id, 1)) == 1


async def test_capacity_follows_the_cluster(own_cluster: Callable[[int], DaskCluster]) -> None:
    cluster = await asyncio.to_thread(own_cluster, 1)
    dask_engine = DaskEngine(Recorder(), cluster.address, poll_interval=0.5)
    async with running(dask_engine) as (_, recorder):
        assert recorder.capacities == [1]
        # Started off the loop: waiting for a process's output blocks.
        await asyncio.gather(
            asyncio.to_thread(cluster.add_worker), asyncio.to_thread(cluster.add_worker)
        )
        await recorder.until(lambda: dask_engine.capacity == 3)
        assert recorder.capacities[-1] == 3 and recorder.capacities == sorted(recorder.capacities)

        nappers = [job(naps, 1.0) for _ in range(3)]
        for each in nappers:
            dask_engine.submit(each)
        for each in nappers:
            assert value(await recorder.outcome(each)) == "rested"
        # All three ran at once: each started before any of them finished.
        last_start = max(recorder.time_of("started", j.task_id) for j in nappers)
        first_end = min(recorder.time_of("finished", j.task_id) for j in nappers)
        assert last_start < first_end, recorder.events


def _tracker(process: psutil.Process) -> bool:
    """multiprocessing's resource tracker: started with the first spawned process, it
    lives as long as this interpreter by design, whoever spawned that process."""
    try:
        return "multiprocessing.resource_tracker" in " ".join(process.cmdline())
    except psutil.Error:
        return False


@pytest.mark.timeout(90)
async def test_local_cluster_starts_and_leaves_nothing() -> None:
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    dask_engine = DaskEngine(Recorder(), None, local_workers=1, poll_interval=0.5)
    async with running(dask_engine) as (_, recorder):
        assert dask_engine.scheduler_address is not None
        assert recorder.capacities == [1]
        j = job(add, 20, 22)
        dask_engine.submit(j)
        assert value(await recorder.outcome(j)) == 42
        started = {p.pid for p in psutil.Process().children(recursive=True)} - before
        assert started, "the LocalCluster runs its workers as processes"
    assert dask_engine.state is EngineState.CLOSED

    def leftovers() -> list[psutil.Process]:
        return [
            p
            for p in psutil.Process().children(recursive=True)
            if p.pid not in before and p.status() != psutil.STATUS_ZOMBIE and not _tracker(p)
        ]

    try:
        await wait_until(lambda: not leftovers(), timeout=WAIT)
    except TimeoutError:
        pytest.fail(f"processes left by the LocalCluster: {leftovers()}")


async def test_jobs_taken_before_the_cluster_is_reached(cluster: DaskCluster) -> None:
    """A job submitted before run() reaches the cluster waits, then runs."""
    recorder = Recorder()
    dask_engine = DaskEngine(recorder, cluster.address, poll_interval=0.5)
    early = job(add, 1, 2)
    dask_engine.submit(early)
    assert early.task_id in dask_engine and recorder.kinds(early.task_id) == []
    async with running(dask_engine):
        assert value(await recorder.outcome(early)) == 3


async def test_close_reports_nothing(cluster: DaskCluster, tmp_path: Path) -> None:
    recorder = Recorder()
    dask_engine = DaskEngine(recorder, cluster.address, poll_interval=0.5)
    async with running(dask_engine):
        busy = job(writes_later, str(tmp_path / "busy"), 20.0)
        dask_engine.submit(busy)
        await recorder.started(busy)
    assert recorder.kinds(busy.task_id) == ["launched", "started"]
    with pytest.raises(RuntimeError, match="closed"):
        dask_engine.submit(job(add, 1, 1))
    # The cluster's one thread is free again: the running task was stopped on close.
    async with running(DaskEngine(Recorder(), cluster.address, poll_interval=0.5)) as pair:
        after = job(add, 5, 5)
        pair[0].submit(after)
        assert value(await pair[1].outcome(after, timeout=10.0)) == 10
    assert not (tmp_path / "busy").exists(), tail(*cluster.group.procs)
