"""The worker pool with real worker processes (heartline.endpoint._workers)."""

from __future__ import annotations

import asyncio
import io
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import cloudpickle
import pytest

from heartline._serialize import TaskInput, dumps_args, dumps_function, dumps_result, function_id
from heartline.endpoint._workers import FailureKind, Job, Outcome, WorkerPool

WAIT = 30.0  # bound on any single wait; a healthy pool answers in milliseconds

# The pool runs on the test's own event loop, as on an agent's: the watchdog checks that
# nothing blocks it.
pytestmark = pytest.mark.usefixtures("loop_watchdog")


class Recorder:
    """A PoolListener that keeps every event and lets a test await an outcome."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str]] = []
        self._outcomes: dict[str, asyncio.Future[Outcome]] = {}
        self._started: dict[str, asyncio.Future[None]] = {}

    def _future(self, table: dict[str, asyncio.Future[Any]], task_id: str) -> asyncio.Future[Any]:
        if task_id not in table:
            table[task_id] = asyncio.get_running_loop().create_future()
        return table[task_id]

    def task_launched(self, job: Job) -> None:
        self.events.append(("launched", job.task_id))

    def task_started(self, job: Job) -> None:
        self.events.append(("started", job.task_id))
        self._future(self._started, job.task_id).set_result(None)

    def task_finished(self, job: Job, outcome: Outcome) -> None:
        self.events.append(("finished", job.task_id))
        self._future(self._outcomes, job.task_id).set_result(outcome)

    async def outcome(self, task_id: str) -> Outcome:
        async with asyncio.timeout(WAIT):
            return await self._future(self._outcomes, task_id)

    async def started(self, task_id: str) -> None:
        async with asyncio.timeout(WAIT):
            await self._future(self._started, task_id)

    def of(self, task_id: str) -> list[str]:
        return [kind for kind, tid in self.events if tid == task_id]


@pytest.fixture
async def pool() -> AsyncIterator[tuple[WorkerPool, Recorder]]:
    recorder = Recorder()
    worker_pool = WorkerPool(2, recorder)
    runner = asyncio.create_task(worker_pool.run())
    yield worker_pool, recorder
    worker_pool.close()
    async with asyncio.timeout(WAIT):
        await runner


_counter = iter(range(1_000_000))


def job(
    fn: Callable[..., Any],
    *args: Any,
    walltime: float = 0.0,
    inputs: Sequence[bytes] = (),
    **kwargs: Any,
) -> Job:
    payload = dumps_function(fn)
    return Job(
        task_id=f"t{next(_counter)}",
        attempt=1,
        function_id=function_id(payload),
        function=payload,
        args=dumps_args(args, kwargs),
        walltime=walltime,
        inputs=tuple(inputs),
    )


async def run(pool: WorkerPool, recorder: Recorder, j: Job) -> Outcome:
    pool.submit(j)
    return await recorder.outcome(j.task_id)


def value(outcome: Outcome) -> Any:
    assert outcome.failure is None, outcome.failure
    return pickle.loads(outcome.result)


# Functions are defined here and pickled by value (cloudpickle registers this test
# module for that), so the worker does not need to import the tests.
cloudpickle.register_pickle_by_value(__import__(__name__))


def fails(message: str) -> None:
    raise KeyError(message)


def exits(code: int) -> None:
    os._exit(code)


def sleeps(seconds: float) -> str:
    time.sleep(seconds)
    return "woke"


def chatty(n: int) -> int:
    # Raw bytes to fd 1 as well: the nastiest thing a task can do to the channel.
    print("hello from the task " * n)
    os.write(1, b"\x00\x00\x00\x10garbage-not-a-frame")
    return n * 2


def writes_everywhere(mark: str) -> str:
    """Output of every kind: print, sys.stderr, C-level writes to fd 1 and 2, a child."""
    print(f"print {mark}")
    print(f"error {mark}", file=sys.stderr)
    os.write(1, f"fd1 {mark}\n".encode())
    os.write(2, f"fd2 {mark}\n".encode())
    sys.stdout.flush()  # the child writes after everything above
    subprocess.run(["sh", "-c", f"echo child {mark}"], check=True)
    return mark


def hides_its_stdout() -> None:
    sys.stdout = io.StringIO()  # and never puts it back
    print("into the void")


def prints_then_dies(how: str) -> None:
    print("line one")
    print("line two", file=sys.stderr)
    if how == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(60)  # past its walltime


def prints_lines(n: int) -> int:
    for i in range(n):
        print(f"line {i:05d} of the task's stdout")
    print("é" * 3, file=sys.stderr)
    return n


def returns_lock() -> threading.Lock:
    return threading.Lock()


def echo(*args: Any, **kwargs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    return args, kwargs


async def test_runs_a_function_and_reports_in_order(pool: tuple[WorkerPool, Recorder]) -> None:
    p, rec = pool
    j = job(pow, 2, 10)
    assert value(await run(p, rec, j)) == 1024
    assert rec.of(j.task_id) == ["launched", "started", "finished"]


async def test_many_tasks_reuse_the_function_cache(pool: tuple[WorkerPool, Recorder]) -> None:
    p, rec = pool
    jobs = [job(divmod, i, 7) for i in range(200)]
    for j in jobs:
        p.submit(j)
    results = [value(await rec.outcome(j.task_id)) for j in jobs]
    assert results == [divmod(i, 7) for i in range(200)]
    assert p.queued == 0


async def test_raised_exception_keeps_type_message_traceback(
    pool: tuple[WorkerPool, Recorder],
) -> None:
    p, rec = pool
    outcome = await run(p, rec, job(fails, "no such key"))
    assert outcome.failure is not None
    assert outcome.failure.kind is FailureKind.RAISED
    assert outcome.failure.type_name == "KeyError"
    assert "no such key" in outcome.failure.message
    assert "in fails" in outcome.failure.traceback
    assert "_worker.py" not in outcome.failure.traceback
    # The worker survived: the pool still serves.
    assert value(await run(p, rec, job(pow, 3, 3))) == 27


async def test_worker_death_is_reported_and_replaced(pool: tuple[WorkerPool, Recorder]) -> None:
    p, rec = pool
    outcome = await run(p, rec, job(exits, 3))
    assert outcome.failure is not None
    assert outcome.failure.kind is FailureKind.WORKER_DIED
    assert "exit code 3" in outcome.failure.message
    # More tasks than workers: every slot, including the replaced one, serves.
    jobs = [job(pow, 2, i) for i in range(6)]
    for j in jobs:
        p.submit(j)
    assert [value(await rec.outcome(j.task_id)) for j in jobs] == [2**i for i in range(6)]


async def test_walltime_kills_and_reports(pool: tuple[WorkerPool, Recorder]) -> None:
    p, rec = pool
    j = job(sleeps, 60, walltime=0.5)
    started = time.monotonic()
    outcome = await run(p, rec, j)
    assert time.monotonic() - started < 30
    assert outcome.failure is not None
    assert outcome.failure.kind is FailureKind.WALLTIME
    assert "walltime of 0.5 s" in outcome.failure.message
    assert value(await run(p, rec, job(sleeps, 0))) == "woke"


async def test_cancel_running_task_kills_worker_and_next_task_runs() -> None:
    rec = Recorder()
    p = WorkerPool(1, rec)  # one worker: the next task can only run on the replacement
    runner = asyncio.create_task(p.run())
    try:
        slow = job(sleeps, 60)
        p.submit(slow)
        await rec.started(slow.task_id)
        assert p.cancel(slow.task_id) is True
        assert value(await run(p, rec, job(pow, 5, 2))) == 25
        # Nothing more is reported for the cancelled task.
        assert rec.of(slow.task_id) == ["launched", "started"]
        assert p.cancel(slow.task_id) is False
    finally:
        p.close()
        async with asyncio.timeout(WAIT):
            await runner


async def test_cancel_queued_task_drops_it() -> None:
    rec = Recorder()
    p = WorkerPool(1, rec)
    runner = asyncio.create_task(p.run())
    try:
        blocker = job(sleeps, 0.3)
        queued = job(pow, 2, 2)
        after = job(pow, 2, 3)
        p.submit(blocker)
        p.submit(queued)
        p.submit(after)
        assert p.cancel(queued.task_id) is True
        assert value(await rec.outcome(after.task_id)) == 8
        assert rec.of(queued.task_id) == []
        assert value(await rec.outcome(blocker.task_id)) == "woke"
    finally:
        p.close()
        async with asyncio.timeout(WAIT):
            await runner


async def test_print_does_not_corrupt_frames(
    pool: tuple[WorkerPool, Recorder], capfd: pytest.CaptureFixture[str]
) -> None:
    p, rec = pool
    many = await run(p, rec, job(chatty, 100))
    assert value(many) == 200
    one = await run(p, rec, job(chatty, 1))
    assert value(one) == 2
    # The prints and the raw write are the task's output, not the agent's.
    assert one.stdout == "hello from the task \n\x00\x00\x00\x10garbage-not-a-frame"
    assert many.stdout.startswith("hello from the task " * 100 + "\n")
    assert "hello from the task" not in capfd.readouterr().err


async def test_unpicklable_result_is_a_serialization_error(
    pool: tuple[WorkerPool, Recorder],
) -> None:
    p, rec = pool
    outcome = await run(p, rec, job(returns_lock))
    assert outcome.failure is not None
    assert outcome.failure.kind is FailureKind.SERIALIZATION
    assert "cannot serialize the result" in outcome.failure.message
    assert value(await run(p, rec, job(pow, 2, 5))) == 32


async def test_unloadable_function_is_a_serialization_error(
    pool: tuple[WorkerPool, Recorder],
) -> None:
    p, rec = pool
    bad = Job("bad-fn", 1, "f" * 64, b"not a pickle", dumps_args((), {}))
    outcome = await run(p, rec, bad)
    assert outcome.failure is not None
    assert outcome.failure.kind is FailureKind.SERIALIZATION
    assert "cannot deserialize the function" in outcome.failure.message
    # Never started: no "started" event, and the worker lives on.
    assert rec.of("bad-fn") == ["launched", "finished"]
    bad_args = job(pow, 1, 1)
    bad_args.args = b"\x80\x05garbage"
    outcome = await run(p, rec, bad_args)
    assert outcome.failure is not None
    assert "cannot deserialize the arguments" in outcome.failure.message
    assert value(await run(p, rec, job(pow, 2, 6))) == 64


async def test_duplicate_submit_is_refused(pool: tuple[WorkerPool, Recorder]) -> None:
    p, rec = pool
    j = job(sleeps, 0.2)
    p.submit(j)
    with pytest.raises(ValueError, match="already in the worker pool"):
        p.submit(j)
    assert value(await rec.outcome(j.task_id)) == "woke"


async def test_inputs_take_the_places_of_their_placeholders(
    pool: tuple[WorkerPool, Recorder],
) -> None:
    p, rec = pool
    # Out of order, a None among them, a plain argument between: each placeholder gets
    # its own input, in args and in kwargs alike.
    j = job(
        echo,
        TaskInput(2),
        "plain",
        TaskInput(0),
        key=TaskInput(1),
        other=7,
        inputs=[dumps_result([1, 2]), dumps_result(None), dumps_result({"x": 1.5})],
    )
    assert value(await run(p, rec, j)) == (
        ({"x": 1.5}, "plain", [1, 2]),
        {"key": None, "other": 7},
    )
    assert rec.of(j.task_id) == ["launched", "started", "finished"]


async def test_an_input_that_does_not_unpickle_is_a_serialization_error(
    pool: tuple[WorkerPool, Recorder],
) -> None:
    p, rec = pool
    # Input 1 names a module the worker lacks (as a result of a class only the producing
    # task's environment has would).
    missing = b"cno_such_module_here\nThing\n."
    j = job(echo, TaskInput(0), TaskInput(1), inputs=[dumps_result(1), missing])
    outcome = await run(p, rec, j)
    assert outcome.failure is not None
    assert outcome.failure.kind is FailureKind.SERIALIZATION
    assert outcome.failure.type_name == "ModuleNotFoundError"
    assert outcome.failure.message.startswith(
        "cannot deserialize input 1 of the task: ModuleNotFoundError:"
    ), outcome.failure.message
    assert "no_such_module_here" in outcome.failure.message
    # Never called, and the worker serves on (its function is sent again).
    assert rec.of(j.task_id) == ["launched", "finished"]
    again = job(echo, TaskInput(0), inputs=[dumps_result("ok")])
    assert value(await run(p, rec, again)) == (("ok",), {})


@pytest.mark.parametrize("given", [0, 1])
async def test_placeholders_without_their_inputs_are_a_serialization_error(
    pool: tuple[WorkerPool, Recorder], given: int
) -> None:
    p, rec = pool
    j = job(echo, TaskInput(0), k=TaskInput(1), inputs=[dumps_result("a")][:given])
    outcome = await run(p, rec, j)
    assert outcome.failure is not None
    assert outcome.failure.kind is FailureKind.SERIALIZATION
    assert outcome.failure.type_name.endswith("SerializationError")
    assert f"but the task has {given} inputs" in outcome.failure.message
    assert rec.of(j.task_id) == ["launched", "finished"]  # the function was not called


async def test_frames_are_read_whole_however_the_pipe_cuts_them() -> None:
    from heartline.endpoint._frames import HEADER, encode

    pool = WorkerPool(1, Recorder())
    seen: list[tuple[Any, ...]] = []
    pool._handle = lambda worker, message: seen.append(message)  # type: ignore[method-assign]
    frames = [("start", "t1", 1), ("done", "t1", 1, True, b"x" * 300_000), ("start", "t2", 1)]
    data = b"".join(HEADER.pack(len(body)) + body for body in map(encode, frames))
    stream = asyncio.StreamReader()
    # Two frames in one piece, then the rest cut inside a header and inside a body.
    for piece in (data[:3], data[3:17], data[17:200_000], data[200_000:]):
        stream.feed_data(piece)
    stream.feed_eof()
    async with asyncio.timeout(WAIT):
        await pool._read_frames(None, stream)  # type: ignore[arg-type]
    assert seen == frames


async def test_each_task_gets_its_own_output_of_every_kind() -> None:
    rec = Recorder()
    p = WorkerPool(1, rec)  # one worker: the second task runs where the first one wrote
    runner = asyncio.create_task(p.run())
    try:
        first = await run(p, rec, job(writes_everywhere, "A"))
        await run(p, rec, job(hides_its_stdout))  # the worker puts its stdout back after it
        second = await run(p, rec, job(writes_everywhere, "B"))
        quiet = await run(p, rec, job(pow, 2, 3))
    finally:
        p.close()
        async with asyncio.timeout(WAIT):
            await runner
    assert value(first) == "A" and value(second) == "B" and value(quiet) == 8
    assert first.stdout == "print A\nfd1 A\nchild A\n"
    assert first.stderr == "error A\nfd2 A\n"
    assert second.stdout == "print B\nfd1 B\nchild B\n"
    assert second.stderr == "error B\nfd2 B\n"
    assert (quiet.stdout, quiet.stderr) == ("", "")


@pytest.mark.parametrize(
    ("how", "kind"), [("kill", FailureKind.WORKER_DIED), ("walltime", FailureKind.WALLTIME)]
)
async def test_a_worker_that_dies_mid_task_keeps_what_it_printed(
    pool: tuple[WorkerPool, Recorder], how: str, kind: FailureKind
) -> None:
    p, rec = pool
    outcome = await run(
        p, rec, job(prints_then_dies, how, walltime=0.5 if how == "walltime" else 0)
    )
    assert outcome.failure is not None and outcome.failure.kind is kind
    # Every line is written out as it is printed: none is lost with the worker.
    assert outcome.stdout == "line one\n"
    assert outcome.stderr == "line two\n"
    # The slot's next worker starts with empty output.
    after = await run(p, rec, job(pow, 2, 2))
    assert (after.stdout, after.stderr) == ("", "")


async def test_a_long_output_is_cut_to_its_tail(pool: tuple[WorkerPool, Recorder]) -> None:
    p, rec = pool
    p.max_output = 1000
    line = len("line 00000 of the task's stdout\n")
    outcome = await run(p, rec, job(prints_lines, 10_000))
    assert value(outcome) == 10_000
    marker, tail = outcome.stdout.split("\n", 1)
    assert marker == f"[... {10_000 * line - 1000} bytes cut ...]"
    assert len(tail.encode()) == 1000
    assert tail.endswith("line 09999 of the task's stdout\n")
    assert outcome.stderr == "ééé\n"
    p.max_output = 0
    outcome = await run(p, rec, job(prints_lines, 3))
    assert value(outcome) == 3 and (outcome.stdout, outcome.stderr) == ("", "")
