"""The worker pool: worker processes that run one task at a time each.

The pool owns a local queue of jobs and a fixed number of worker slots. Each slot is
one long-lived supervisor coroutine that starts a worker process, reads its frames and
starts a replacement when it dies; nothing per task creates an asyncio task, so the
per-task cost is a frame each way plus a few dictionary operations.

What happens to a job is told to a :class:`PoolListener`, synchronously, in order:
``task_launched`` (handed to a worker), ``task_started`` (the worker is about to call
it), ``task_finished`` (an :class:`Outcome`, with what the attempt wrote to its stdout and
stderr: see endpoint/_capture.py). A cancelled job gets no more calls.
Model: anyio ``to_process.py``.
"""

from __future__ import annotations

import asyncio
import collections
import enum
import logging
import os
import signal
import sys
from dataclasses import dataclass
from typing import Any, Protocol

from heartline._defaults import ENV_ENDPOINT_NAME, MAX_OUTPUT, WORKER_SENT_FUNCTIONS
from heartline._lru import LruCache
from heartline._states import FailureCode
from heartline.endpoint._capture import OutputFiles, OutputFolder
from heartline.endpoint._frames import HEADER, ProtocolError, decode, encode

logger = logging.getLogger("heartline.endpoint.workers")

# Frames below this size are written with one syscall; bigger ones skip the copy.
_SMALL_FRAME = 1 << 16
# Bytes asked of a worker's stdout per read; a bigger frame is gathered over several.
_READ_CHUNK = 1 << 18
_READY_TIMEOUT = 120.0
_EXIT_TIMEOUT = 5.0
_RESPAWN_MIN = 0.1
_RESPAWN_MAX = 5.0


# Why an attempt ended without the function returning (shared with the server).
FailureKind = FailureCode


@dataclass(frozen=True, slots=True)
class Failure:
    """An attempt that did not return a value."""

    type_name: str
    message: str
    traceback: str
    kind: FailureKind


@dataclass(frozen=True, slots=True)
class Outcome:
    """How one attempt ended: ``result`` (pickled) when ``failure`` is None."""

    result: bytes = b""
    failure: Failure | None = None
    stdout: str = ""
    """The tail of what the attempt wrote to its stdout, up to its end or its worker's."""
    stderr: str = ""
    """The same of its stderr."""

    @property
    def ok(self) -> bool:
        return self.failure is None


@dataclass(slots=True)
class Job:
    """One attempt of one task, as the pool runs it."""

    task_id: str
    attempt: int
    function_id: str
    function: bytes
    args: bytes
    walltime: float = 0.0
    # The pickled results of the tasks this one takes as inputs, in placeholder order;
    # the one shared empty tuple for a task without inputs.
    inputs: tuple[bytes, ...] = ()


class PoolListener(Protocol):
    """Receives what happens to jobs; called synchronously on the event loop."""

    def task_launched(self, job: Job) -> None: ...

    def task_started(self, job: Job) -> None: ...

    def task_finished(self, job: Job, outcome: Outcome) -> None: ...


class WorkerState(enum.Enum):
    """Where one worker process is in its life."""

    STARTING = "starting"  # spawned, the ready handshake has not arrived
    IDLE = "idle"  # ready, no job
    BUSY = "busy"  # running exactly one job
    DEAD = "dead"  # exited or being killed; its supervisor starts a replacement


class _Worker:
    __slots__ = ("functions", "job", "output", "pid", "process", "state", "timer")

    def __init__(self, process: asyncio.subprocess.Process, output: OutputFiles) -> None:
        self.process = process
        self.pid = process.pid
        self.output = output
        """Its slot's output files (the worker writes them, the pool reads them)."""
        self.state = WorkerState.STARTING
        self.job: Job | None = None
        self.timer: asyncio.TimerHandle | None = None
        # Function ids this process is counted on to still hold (values unused). The
        # worker keeps an LRU of its own with larger bounds (heartline/_defaults.py) and
        # uses it once per "run" frame, one job at a time, in launch order; this LRU is
        # used once per launch, so it sees the same uses in the same order, with the same
        # sizes, and can only hold a subset of the worker's (the argument is written out
        # at server/_core.py AgentConnection._sent_functions, the same rule one hop up).
        # A function the worker could not unpickle is not in the worker's cache; the
        # pool then starts this set over (_handle), as a fresh worker would.
        self.functions: LruCache[str, None] = LruCache(*WORKER_SENT_FUNCTIONS)

    def kill(self) -> None:
        self.state = WorkerState.DEAD
        self.job = None
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.process.returncode is None:
            try:
                self.process.kill()
            except ProcessLookupError:
                pass


class PoolState(enum.Enum):
    OPEN = "open"
    CLOSED = "closed"


class WorkerPool:
    """A fixed number of worker processes fed from a local FIFO queue.

    Args:
        size: Number of worker processes.
        listener: Told what happens to every job.
    """

    def __init__(self, size: int, listener: PoolListener, *, endpoint_name: str = "") -> None:
        if size < 1:
            raise ValueError(f"a worker pool needs at least one worker, not {size}")
        self._size = size
        self._listener = listener
        self._state = PoolState.OPEN
        self._queue: collections.OrderedDict[str, Job] = collections.OrderedDict()
        self._idle: list[_Worker] = []
        self._running: dict[str, _Worker] = {}
        self._workers: set[_Worker] = set()
        self._restarts = 0
        self.max_output = MAX_OUTPUT
        """Bytes of each of a task's stdout and stderr reported with its outcome (the
        last ones); 0 reports none. The agent sets the server's (from its welcome)."""
        self._output: OutputFolder | None = None
        # The workers' environment: the endpoint they serve, for the error of a module a
        # task needs that is missing there (heartline/_shipped.py).
        self._env = {**os.environ, ENV_ENDPOINT_NAME: endpoint_name} if endpoint_name else None

    @property
    def size(self) -> int:
        return self._size

    @property
    def capacity(self) -> int:
        """Jobs that can run at once (the Engine seam's name for ``size``; it never moves)."""
        return self._size

    @property
    def worker_restarts(self) -> int:
        """Worker processes started to replace one that ended (died, or was killed)."""
        return self._restarts

    def workers_by_state(self) -> dict[WorkerState, int]:
        """How many worker processes are in each state now."""
        counts = dict.fromkeys(WorkerState, 0)
        for worker in self._workers:
            counts[worker.state] += 1
        return counts

    @property
    def idle_workers(self) -> int:
        return len(self._idle)

    @property
    def queued(self) -> int:
        return len(self._queue)

    def __contains__(self, task_id: str) -> bool:
        return task_id in self._queue or task_id in self._running

    async def run(self) -> None:
        """Keep ``size`` workers alive until :meth:`close`; kill them on the way out."""
        self._output = OutputFolder()
        try:
            async with asyncio.TaskGroup() as tg:
                for slot in range(self._size):
                    tg.create_task(self._supervise(slot))
        finally:
            self.close()
            self._output.remove()

    def close(self) -> None:
        """Stop taking work, drop queued jobs and kill every worker (nothing is reported)."""
        self._state = PoolState.CLOSED
        self._queue.clear()
        self._running.clear()
        self._idle.clear()
        for worker in self._workers:
            worker.kill()

    def submit(self, job: Job) -> None:
        """Queue a job; it goes to a worker at once if one is idle.

        Raises:
            RuntimeError: The pool is closed.
            ValueError: A job for this task is already queued or running.
        """
        if self._state is PoolState.CLOSED:
            raise RuntimeError("the worker pool is closed")
        if job.task_id in self:
            raise ValueError(f"task {job.task_id} is already in the worker pool")
        self._queue[job.task_id] = job
        self._pump()

    def cancel(self, task_id: str) -> bool:
        """Drop a queued job, or kill the worker running it; True if the pool had it."""
        if self._queue.pop(task_id, None) is not None:
            return True
        worker = self._running.pop(task_id, None)
        if worker is None:
            return False
        logger.info("event=task-cancelled task_id=%s pid=%s", task_id, worker.pid)
        worker.kill()
        return True

    # -- internals ------------------------------------------------------------------

    def _pump(self) -> None:
        """Hand queued jobs to idle workers."""
        while self._queue and self._idle:
            worker = self._idle.pop()
            _, job = self._queue.popitem(last=False)
            self._launch(worker, job)

    def _launch(self, worker: _Worker, job: Job) -> None:
        stdin = worker.process.stdin
        assert stdin is not None
        # One use per launch, hit or miss (see _Worker.functions).
        function: bytes | None = None
        if not worker.functions.touch(job.function_id):
            function = job.function
            worker.functions.put(job.function_id, None, len(function))
        worker.state = WorkerState.BUSY
        worker.job = job
        self._running[job.task_id] = worker
        if job.walltime > 0:
            # The clock starts at launch so a hanging unpickle or import counts too.
            worker.timer = asyncio.get_running_loop().call_later(
                job.walltime, self._walltime_expired, worker, job
            )
        self._listener.task_launched(job)
        body = encode(
            ("run", job.task_id, job.attempt, job.function_id, function, job.args, job.inputs)
        )
        # A dead worker's pipe may already be closing; its supervisor then sees end of
        # file and reports the job as a worker death, so there is nothing to do here.
        if not stdin.is_closing():
            if len(body) < _SMALL_FRAME:
                stdin.write(HEADER.pack(len(body)) + body)
            else:
                stdin.write(HEADER.pack(len(body)))
                stdin.write(body)

    def _walltime_expired(self, worker: _Worker, job: Job) -> None:
        if worker.job is not job:
            return
        self._running.pop(job.task_id, None)
        worker.kill()
        logger.info("event=walltime-expired task_id=%s pid=%s", job.task_id, worker.pid)
        message = (
            f"task {job.task_id} ran past its walltime of {job.walltime:g} s; its worker was killed"
        )
        # Killed just now: what it wrote so far is in the files (its replacement starts
        # only once it is reaped).
        stdout, stderr = worker.output.take(self.max_output)
        failure = Failure("heartline.WalltimeExceeded", message, "", FailureKind.WALLTIME)
        self._listener.task_finished(job, Outcome(failure=failure, stdout=stdout, stderr=stderr))

    async def _supervise(self, slot: int) -> None:
        """Run one worker slot: start a worker, serve it, replace it when it dies."""
        assert self._output is not None
        output = self._output.slot(slot)
        delay = _RESPAWN_MIN
        replacing = False
        try:
            while self._state is PoolState.OPEN:
                served = False
                try:
                    process = await asyncio.create_subprocess_exec(
                        sys.executable,
                        "-m",
                        "heartline.endpoint._worker",
                        output.stdout_path,
                        output.stderr_path,
                        stdin=asyncio.subprocess.PIPE,
                        stdout=asyncio.subprocess.PIPE,
                        env=self._env,
                    )
                except OSError as exc:
                    logger.warning("event=worker-spawn-failed slot=%d error=%r", slot, exc)
                else:
                    worker = _Worker(process, output)
                    self._workers.add(worker)
                    if replacing:
                        self._restarts += 1
                    replacing = True
                    try:
                        served = await self._serve(worker)
                    finally:
                        # Also reached on cancellation: never leave a process behind.
                        self._workers.discard(worker)
                        worker.kill()
                        await self._reap(worker)
                if self._state is not PoolState.OPEN:
                    return
                # A worker that cannot even start would otherwise be respawned in a hot loop.
                if served:
                    delay = _RESPAWN_MIN
                else:
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, _RESPAWN_MAX)
        finally:
            output.close()

    async def _serve(self, worker: _Worker) -> bool:
        """Read a worker's frames until it dies; return whether it got ready."""
        stdout = worker.process.stdout
        assert stdout is not None
        try:
            async with asyncio.timeout(_READY_TIMEOUT):
                message = await _read_frame(stdout)
            if message[0] != "ready":
                raise ProtocolError(f"expected a ready frame, got {message[0]!r}")
        except (asyncio.IncompleteReadError, TimeoutError, ProtocolError) as exc:
            if self._state is PoolState.CLOSED:
                return True
            logger.warning("event=worker-start-failed pid=%s error=%r", worker.pid, exc)
            worker.kill()
            return False
        if self._state is not PoolState.OPEN or worker.state is WorkerState.DEAD:
            worker.kill()
            return True
        logger.debug("event=worker-ready pid=%s", worker.pid)
        worker.state = WorkerState.IDLE
        self._idle.append(worker)
        self._pump()
        try:
            await self._read_frames(worker, stdout)
        except ProtocolError as exc:
            logger.warning("event=worker-protocol-error pid=%s error=%r", worker.pid, exc)
        await self._worker_died(worker)
        return True

    async def _read_frames(self, worker: _Worker, stdout: asyncio.StreamReader) -> None:
        """Handle the worker's frames until its stdout ends.

        Reads whatever the pipe holds and handles every whole frame in it: a short task's
        "start" and "done" usually arrive together and cost one wake-up, not four reads.
        """
        buffer = bytearray()
        header = HEADER.size
        while chunk := await stdout.read(_READ_CHUNK):
            buffer += chunk
            offset, end = 0, len(buffer)
            while end - offset >= header:
                (size,) = HEADER.unpack_from(buffer, offset)
                if end - offset - header < size:
                    break
                body = bytes(buffer[offset + header : offset + header + size])
                offset += header + size
                self._handle(worker, decode(body))
            del buffer[:offset]

    def _handle(self, worker: _Worker, message: tuple[Any, ...]) -> None:
        job = worker.job
        kind = message[0]
        # Frames of a job that was cancelled or timed out may still be in the pipe.
        if job is None or message[1] != job.task_id or message[2] != job.attempt:
            return
        if kind == "start":
            self._listener.task_started(job)
        elif kind == "done":
            _, _, _, ok, payload = message
            if worker.timer is not None:
                worker.timer.cancel()
                worker.timer = None
            worker.job = None
            worker.state = WorkerState.IDLE
            self._running.pop(job.task_id, None)
            self._idle.append(worker)
            # Taken (and emptied) before _pump may give this worker its next task.
            stdout, stderr = worker.output.take(self.max_output)
            if ok:
                outcome = Outcome(payload, None, stdout, stderr)
            else:
                type_name, text, tb, failure_kind = payload
                failure = Failure(type_name, text, tb, FailureKind(failure_kind))
                outcome = Outcome(b"", failure, stdout, stderr)
                if failure.kind is FailureKind.SERIALIZATION:
                    # Perhaps the function did not unpickle, so the worker lacks it.
                    worker.functions.clear()
            self._listener.task_finished(job, outcome)
            self._pump()
        else:
            raise ProtocolError(f"unknown frame {kind!r}")

    async def _worker_died(self, worker: _Worker) -> None:
        """The worker's stdout closed: report its job, if it still had one."""
        if worker in self._idle:
            self._idle.remove(worker)
        job = worker.job
        if worker.state is WorkerState.DEAD:
            return  # we killed it (cancel, walltime, close) and said so already
        worker.state = WorkerState.DEAD
        worker.job = None
        if worker.timer is not None:
            worker.timer.cancel()
            worker.timer = None
        if job is None:
            logger.warning("event=worker-died pid=%s", worker.pid)
            return
        self._running.pop(job.task_id, None)
        how = await self._reap(worker)
        logger.warning("event=worker-died pid=%s task_id=%s %s", worker.pid, job.task_id, how)
        message = f"the worker process (pid {worker.pid}) running task {job.task_id} died: {how}"
        # Everything it wrote before it died is in the files: the output up to the death.
        stdout, stderr = worker.output.take(self.max_output)
        failure = Failure("heartline.WorkerDied", message, "", FailureKind.WORKER_DIED)
        self._listener.task_finished(job, Outcome(failure=failure, stdout=stdout, stderr=stderr))

    async def _reap(self, worker: _Worker) -> str:
        """Wait for a worker process to exit (killing it if it lingers); say how it ended."""
        process = worker.process
        try:
            async with asyncio.timeout(_EXIT_TIMEOUT):
                code = await process.wait()
        except TimeoutError:
            worker.kill()
            code = await process.wait()
        if code < 0:
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = f"signal {-code}"
            return f"killed by {name}"
        return f"exit code {code}"


async def _read_frame(stream: asyncio.StreamReader) -> tuple[Any, ...]:
    (size,) = HEADER.unpack(await stream.readexactly(HEADER.size))
    return decode(await stream.readexactly(size))
