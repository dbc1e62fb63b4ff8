"""The ``dask`` engine: each job becomes a future on a Dask distributed cluster.

An agent started with ``--executor dask`` hands its jobs to a Dask scheduler it reaches
(``--dask-scheduler tcp://HOST:PORT``: a cluster the user already runs, on Slurm or PBS
through dask-jobqueue, on Kubernetes...) or to a ``LocalCluster`` it starts itself. Each
attempt is one future, key ``heartline-<task id>-<attempt>``, running :func:`run_job` on a
Dask worker; that runs the job exactly as a worker process does
(``heartline.endpoint._worker``: unpickle, fill inputs, call, await a coroutine, pickle
the result or describe the error with its remote traceback) and returns the reply.
Heartline must be importable on the Dask workers (the same environment as the agent).

How the engine hears about a job (all on the agent's event loop):

- WAITING_FOR_LAUNCH when the future is submitted (Dask has it queued).
- RUNNING when a Dask worker thread begins it: :func:`run_job` logs an event
  (``Worker.log_event``) on the engine's own topic, ``heartline-task-started-<client
  id>``, which its client subscribes to. The task reports itself, so this works on any
  cluster with no plugin to install and no scheduler configuration to change. The event travels the worker's and the
  scheduler's ordered streams, so it reaches the client before the task's result does.
- The outcome when the future is done. A worker that leaves the cluster while it runs
  one of our attempts is that attempt's ``WORKER_DIED`` failure, read from the
  scheduler's ``remove-worker`` event on the ``all`` topic, which the scheduler logs
  before it reschedules anything; a ``KilledWorker`` error (the ``LocalCluster`` we start
  allows no failures) is the same. Either way the engine reports once and stops any
  rerun Dask starts on its own: retries are the server's decision.

Cancel and walltime: the future is released, so Dask drops a queued task. A running one
is stopped where it runs: :func:`run_job` registers its thread under the task's key, and
the engine asks that worker (``Client.run`` of :func:`stop_jobs`) to raise
:class:`TaskInterrupted` in that thread (``PyThreadState_SetAsyncExc``). A task dropped
before the engine heard it began is stopped on every worker at once (one request per
loop iteration for all such keys): a worker may already have taken it from its queue,
and the tombstone keeps it from beginning there. Limit: the exception lands at the next
Python bytecode, so code blocked in C (a long ``time.sleep``, a big numpy call, a
blocking read) stops only when that call returns, and the Dask thread stays busy until
then; code that catches BaseException can refuse it. The walltime clock starts when a
Dask worker begins the attempt (before unpickling, as a worker process's does), not
while Dask merely queues it: queue time in a shared cluster is not the task's doing.

Capacity is the sum of the cluster's worker threads, read from the scheduler
(``identity``) at start, whenever a worker joins or leaves, and every ``poll_interval``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ctypes
import enum
import logging
import os
import threading
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any

import dask
import distributed
from distributed.client import FutureCancelledError

from heartline._defaults import WORKER_FUNCTION_CACHE
from heartline._lru import LruCache
from heartline.endpoint._engine import EngineListener
from heartline.endpoint._worker import Functions, run_task
from heartline.endpoint._workers import Failure, FailureKind, Job, Outcome

logger = logging.getLogger("heartline.endpoint.dask")

# Start events go to a topic of the engine's own (this prefix and its client's id), so
# agents sharing one cluster do not each hear every other agent's tasks start.
STARTED_TOPIC = "heartline-task-started"
_CLUSTER_TOPIC = "all"  # the scheduler logs add-worker and remove-worker here
_POLL_INTERVAL = 2.0
_STOP_TIMEOUT = 10.0  # to ask one Dask worker to interrupt one task
_CLOSE_TIMEOUT = 20.0  # to close the client, and the LocalCluster we started
# Keys of attempts the agent dropped before hearing they began: if one begins anyway, it
# is stopped when its start event arrives. Bounded; the workers keep tombstones too.
_STOPPING_KEPT = 10_000
_TOMBSTONES_KEPT = 100_000  # per Dask worker

# A reply of run_job: (True, pickled result), (False, (type name, message, traceback,
# failure kind)), or None when the attempt was interrupted before it replied.
Reply = tuple[bool, Any] | None


def job_key(job: Job) -> str:
    """The Dask key of one attempt: unique per attempt, so no two attempts share a future."""
    return f"heartline-{job.task_id}-{job.attempt}"


# -- on the Dask worker -------------------------------------------------------------------


class TaskInterrupted(BaseException):
    """Raised in a Dask worker thread whose attempt was cancelled or ran past its walltime.

    A BaseException, so a task's own ``except Exception`` does not swallow it.
    """


# Which thread of this Dask worker runs which key, so a stop request finds it; and keys
# stopped before they began here, so they never do (a release from the scheduler can
# arrive after the worker already took the task from its queue).
_threads_lock = threading.Lock()
_threads: dict[str, int] = {}
_tombstones: collections.OrderedDict[str, None] = collections.OrderedDict()
# Per thread: a task thread runs one job at a time, so each has its own function cache
# (the LRU is not thread-safe) as a worker process has.
_local = threading.local()


class _Unheard:
    """Stands in for a worker process's frame channel: run_job reported the start already
    (as a Dask event), so the "start" frame goes nowhere."""

    __slots__ = ()

    def send(self, message: tuple[Any, ...]) -> None:
        pass


_UNHEARD = _Unheard()


def _functions() -> Functions:
    cache: Functions | None = getattr(_local, "functions", None)
    if cache is None:
        cache = _local.functions = LruCache(*WORKER_FUNCTION_CACHE)
    return cache


def _set_async_exc(thread_id: int, exc: type[BaseException] | None) -> int:
    """Raise ``exc`` in another thread at its next bytecode (None: withdraw a pending one)."""
    target = ctypes.py_object(exc) if exc is not None else None
    return int(ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread_id), target))


def run_job(
    topic: str,
    key: str,
    task_id: str,
    attempt: int,
    function_id: str,
    function: bytes,
    args: bytes,
    inputs: tuple[bytes, ...],
) -> Reply:
    """Run one attempt on a Dask worker thread, as a worker process would; return its reply."""
    thread_id = threading.get_ident()
    with _threads_lock:
        if key in _tombstones:
            del _tombstones[key]
            return None
        _threads[key] = thread_id
    try:
        worker = distributed.get_worker()
        worker.log_event(topic, {"key": key, "worker": worker.address})
        # The worker process's own code path, returning its "done" frame.
        done = run_task(
            _UNHEARD, _functions(), task_id, attempt, function_id, function, args, tuple(inputs)
        )
        return (done[3], done[4])
    except TaskInterrupted:
        return None  # stopped while unpickling; nobody waits for this reply
    finally:
        with _threads_lock:
            del _threads[key]
            # A stop that has not landed yet must not hit the next task on this thread.
            _set_async_exc(thread_id, None)


def stop_jobs(keys: list[str]) -> int:
    """Stop these keys on this Dask worker: interrupt the threads running them, and make
    sure the others never begin here. Returns how many threads were interrupted.

    Runs on the Dask worker (``Client.run``), under the same lock as :func:`run_job`'s
    bookkeeping, so the exception can only land in a thread while it runs that key.
    """
    interrupted = 0
    with _threads_lock:
        for key in keys:
            thread_id = _threads.get(key)
            if thread_id is not None:
                interrupted += _set_async_exc(thread_id, TaskInterrupted)
                continue
            _tombstones[key] = None
            if len(_tombstones) > _TOMBSTONES_KEPT:
                _tombstones.popitem(last=False)
    return interrupted


# -- on the agent ---------------------------------------------------------------------------


class EngineState(enum.Enum):
    NEW = "new"  # run() not called yet; submitted jobs wait
    STARTING = "starting"  # starting a LocalCluster or connecting to the scheduler
    OPEN = "open"  # jobs go to Dask as they come
    CLOSED = "closed"  # close() was called; nothing is taken or reported


class Phase(enum.Enum):
    """Where one attempt is, as far as the engine knows."""

    WAITING = "waiting"  # taken before the cluster was reached; not in Dask yet
    LAUNCHED = "launched"  # a Dask future: Dask has it queued
    RUNNING = "running"  # a Dask worker thread began it


@dataclass(eq=False, slots=True)
class _Attempt:
    job: Job
    key: str
    phase: Phase = Phase.WAITING
    future: distributed.Future | None = None
    watcher: asyncio.Task[None] | None = None  # awaits the future
    worker: str = ""  # the Dask worker that began it
    timer: asyncio.TimerHandle | None = None  # its walltime


class DaskEngine:
    """Runs jobs as futures on a Dask distributed cluster.

    Args:
        listener: Told what happens to every job, and the cluster's capacity.
        scheduler_address: A running scheduler (``tcp://HOST:PORT``); None starts a
            ``LocalCluster`` of worker processes in :meth:`run` and closes it on the way out.
        local_workers: Worker processes of that LocalCluster (one thread each); the
            machine's CPU count by default.
        poll_interval: Seconds between capacity reads, besides those a worker joining or
            leaving triggers.
    """

    def __init__(
        self,
        listener: EngineListener,
        scheduler_address: str | None = None,
        *,
        local_workers: int | None = None,
        poll_interval: float = _POLL_INTERVAL,
    ) -> None:
        self._listener = listener
        self._address = scheduler_address
        self._local_workers = local_workers or os.cpu_count() or 1
        self._poll_interval = poll_interval
        self.max_output = 0
        """Unused: what a task prints goes to its Dask worker's log (the seam's field)."""
        self._state = EngineState.NEW
        self._attempts: dict[str, _Attempt] = {}  # by task id
        self._by_key: dict[str, _Attempt] = {}
        self._stopping: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._capacity = 0
        self._client: distributed.Client | None = None
        self._group: asyncio.TaskGroup | None = None
        self._chores: set[asyncio.Task[None]] = set()  # stop requests in flight
        # Keys to stop on the cluster, each with the worker that began it ("": not known
        # to have begun), sent together at the end of this loop iteration.
        self._to_stop: dict[str, str] = {}
        self._flush: asyncio.Handle | None = None
        self._topic = STARTED_TOPIC  # made the engine's own once its client is connected
        self._closed = asyncio.Event()
        self._membership = asyncio.Event()  # a worker joined or left: read capacity now

    @property
    def state(self) -> EngineState:
        return self._state

    @property
    def capacity(self) -> int:
        return self._capacity

    @property
    def scheduler_address(self) -> str | None:
        """The scheduler in use (the LocalCluster's once started), or None before."""
        return self._address

    def __contains__(self, task_id: str) -> bool:
        return task_id in self._attempts

    def __len__(self) -> int:
        return len(self._attempts)

    # -- the Engine seam ---------------------------------------------------------------

    def submit(self, job: Job) -> None:
        """Take a job; it goes to Dask at once, or as soon as the cluster is reached.

        Raises:
            RuntimeError: The engine is closed.
            ValueError: The engine already holds this task.
        """
        if self._state is EngineState.CLOSED:
            raise RuntimeError("the dask engine is closed")
        if job.task_id in self._attempts:
            raise ValueError(f"task {job.task_id} is already in the dask engine")
        attempt = _Attempt(job, job_key(job))
        self._attempts[job.task_id] = attempt
        self._by_key[attempt.key] = attempt
        if self._state is EngineState.OPEN:
            self._launch(attempt)

    def cancel(self, task_id: str) -> bool:
        """Drop a queued job, or interrupt the Dask task running it; True if held."""
        attempt = self._attempts.get(task_id)
        if attempt is None:
            return False
        logger.info("event=task-cancelled task_id=%s key=%s", task_id, attempt.key)
        self._drop(attempt)
        return True

    def close(self) -> None:
        """Stop taking work and stop every job (nothing is reported); :meth:`run` returns."""
        if self._state is EngineState.CLOSED:
            return
        self._state = EngineState.CLOSED
        for attempt in list(self._attempts.values()):
            self._drop(attempt)
        self._send_stops()
        self._closed.set()

    async def run(self) -> None:
        """Reach the cluster, serve jobs until :meth:`close`, then let go of the cluster."""
        if self._state is not EngineState.NEW:
            if self._state is EngineState.CLOSED:
                return
            raise RuntimeError("the dask engine is already running")
        self._state = EngineState.STARTING
        try:
            async with contextlib.AsyncExitStack() as stack:
                client = await self._connect(stack)
                if self._state is EngineState.CLOSED:
                    return
                try:
                    async with asyncio.TaskGroup() as group:
                        self._group = group
                        self._client = client
                        follower = group.create_task(self._follow_capacity(client))
                        self._open(client)
                        await self._closed.wait()
                        # Let the stop requests close() made reach the workers (each bounded).
                        if self._chores:
                            await asyncio.wait(set(self._chores))
                        follower.cancel()
                finally:
                    # Else the scheduler logs a CRITICAL line when it cannot tell a client
                    # it is closing that the client is leaving (the "all" topic).
                    for topic in (self._topic, _CLUSTER_TOPIC):
                        client.unsubscribe_topic(topic)
        finally:
            # Cancelled, or failed: the task group is gone, so the stops close() makes
            # cannot be sent; releasing the futures (the client closes) still drops every
            # queued task. The agent calls close() first, so running ones are stopped too.
            self._group = None
            self.close()
            self._client = None

    # -- starting and stopping -------------------------------------------------------------

    async def _connect(self, stack: contextlib.AsyncExitStack) -> distributed.Client:
        """Start the LocalCluster (when no address was given) and connect a client to it."""
        address = self._address
        if address is None:
            # A worker that dies is the attempt's failure for the server to retry, not
            # something Dask should silently run again on another worker.
            with dask.config.set({"distributed.scheduler.allowed-failures": 0}):
                cluster = await distributed.LocalCluster(
                    n_workers=self._local_workers,
                    threads_per_worker=1,
                    processes=True,
                    asynchronous=True,
                    # Its HTTP server (metrics, health) runs anyway: on a free loopback
                    # port, so agents on one machine do not fight over :8787.
                    dashboard_address="127.0.0.1:0",
                )
            stack.push_async_callback(_close_quietly, cluster)
            address = self._address = cluster.scheduler_address
            logger.info("event=local-cluster-started address=%s", address)
        client = await distributed.Client(address, asynchronous=True)
        stack.push_async_callback(_close_quietly, client)
        logger.info("event=dask-connected address=%s", address)
        return client

    def _open(self, client: distributed.Client) -> None:
        """Listen to the cluster's events, then send the jobs taken so far."""
        # Subscriptions travel the same ordered stream as the submits that follow them,
        # so no task can start before the scheduler knows we listen.
        self._topic = f"{STARTED_TOPIC}-{client.id}"
        client.subscribe_topic(self._topic, self._on_started)
        client.subscribe_topic(_CLUSTER_TOPIC, self._on_cluster_event)
        self._state = EngineState.OPEN
        for attempt in list(self._attempts.values()):
            if attempt.phase is Phase.WAITING:
                self._launch(attempt)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None] | None:
        """Run a coroutine in the engine's task group (dropped when the engine is not running)."""
        if self._group is None:
            coro.close()
            return None
        return self._group.create_task(coro)

    # -- one attempt ------------------------------------------------------------------------

    def _launch(self, attempt: _Attempt) -> None:
        job = attempt.job
        assert self._client is not None
        try:
            attempt.future = self._client.submit(
                run_job,
                self._topic,
                attempt.key,
                job.task_id,
                job.attempt,
                job.function_id,
                job.function,
                job.args,
                job.inputs,
                key=attempt.key,
                pure=False,
            )
        except Exception as exc:  # noqa: BLE001 - e.g. the client is closing
            self._finish(attempt, _lost(attempt, f"Dask refused it: {type(exc).__name__}: {exc}"))
            return
        attempt.phase = Phase.LAUNCHED
        attempt.watcher = self._spawn(self._watch(attempt))
        self._listener.task_launched(job)

    async def _watch(self, attempt: _Attempt) -> None:
        """Wait for the attempt's future and report how it ended."""
        assert attempt.future is not None
        try:
            reply: Reply = await attempt.future
        except FutureCancelledError as exc:
            # Not ours (a dropped attempt's watcher is cancelled): the client lost its
            # scheduler, or someone else cancelled the key.
            self._finish(attempt, _lost(attempt, f"Dask cancelled it: {exc}"))
        except distributed.KilledWorker as exc:
            self._finish(attempt, _lost(attempt, f"the Dask worker running it died: {exc}"))
        except Exception as exc:  # noqa: BLE001 - run_job replies; anything else is Dask's
            self._finish(attempt, _lost(attempt, f"Dask failed it: {type(exc).__name__}: {exc}"))
        else:
            if reply is not None:
                self._finish(attempt, _outcome(reply))

    def _on_started(self, event: tuple[float, dict[str, Any]]) -> None:
        """A Dask worker thread began an attempt (the engine's start topic)."""
        _, message = event
        key, worker = message.get("key"), message.get("worker")
        if not isinstance(key, str) or not isinstance(worker, str):
            return
        attempt = self._by_key.get(key)
        if attempt is None:
            if key in self._stopping:
                # Dropped while queued, yet begun (or begun again by Dask after its
                # worker left): it must not run.
                del self._stopping[key]
                self._stop(key, worker)
            return
        if attempt.phase is not Phase.LAUNCHED:
            return
        attempt.phase = Phase.RUNNING
        attempt.worker = worker
        if attempt.job.walltime > 0:
            attempt.timer = asyncio.get_running_loop().call_later(
                attempt.job.walltime, self._walltime_expired, attempt
            )
        self._listener.task_started(attempt.job)

    def _walltime_expired(self, attempt: _Attempt) -> None:
        job = attempt.job
        if self._attempts.get(job.task_id) is not attempt:
            return
        logger.info("event=walltime-expired task_id=%s worker=%s", job.task_id, attempt.worker)
        self._drop(attempt)
        message = (
            f"task {job.task_id} ran past its walltime of {job.walltime:g} s; "
            f"its Dask task was interrupted"
        )
        self._listener.task_finished(
            job,
            Outcome(
                failure=Failure("heartline.WalltimeExceeded", message, "", FailureKind.WALLTIME)
            ),
        )

    def _finish(self, attempt: _Attempt, outcome: Outcome) -> None:
        """Report how an attempt ended, once; later news of it is ignored."""
        job = attempt.job
        if self._attempts.get(job.task_id) is not attempt:
            return
        self._forget(attempt)
        if attempt.future is not None:
            attempt.future.release()  # the scheduler may forget the result now
        if outcome.ok and attempt.phase is not Phase.RUNNING:
            # It returned, so it began: never report a result from WAITING_FOR_LAUNCH.
            self._listener.task_started(job)
        self._listener.task_finished(job, outcome)

    def _forget(self, attempt: _Attempt) -> None:
        del self._attempts[attempt.job.task_id]
        del self._by_key[attempt.key]
        if attempt.timer is not None:
            attempt.timer.cancel()
            attempt.timer = None
        if attempt.watcher is not None and attempt.watcher is not asyncio.current_task():
            attempt.watcher.cancel()

    def _drop(self, attempt: _Attempt) -> None:
        """Stop an attempt wherever it is, reporting nothing."""
        self._forget(attempt)
        if attempt.future is not None:
            # Our keys are ours alone: releasing the only reference cancels the task.
            attempt.future.release()
        if attempt.phase is Phase.RUNNING:
            self._stop(attempt.key, attempt.worker)
        elif attempt.phase is Phase.LAUNCHED:
            self._stop(attempt.key, "")

    def _stop(self, key: str, worker: str) -> None:
        """Stop ``key`` on the cluster: on ``worker``, or ("") wherever it may begin."""
        if not worker:
            self._stopping[key] = None
            if len(self._stopping) > _STOPPING_KEPT:
                self._stopping.popitem(last=False)
        self._to_stop[key] = worker
        if self._flush is None and self._group is not None:
            self._flush = asyncio.get_running_loop().call_soon(self._send_stops)

    def _send_stops(self) -> None:
        """Send this iteration's stops: one request to each worker concerned, or one to
        every worker when a key's place is not known (so no queued copy of it begins)."""
        if self._flush is not None:
            self._flush.cancel()
            self._flush = None
        stops, self._to_stop = self._to_stop, {}
        if not stops:
            return
        batches: dict[str, list[str]] = {}
        if all(stops.values()):
            for key, worker in stops.items():
                batches.setdefault(worker, []).append(key)
        else:
            # One message per worker holds every key, tombstones and interrupts alike:
            # two would race, and a worker could begin a queued key between them.
            batches[""] = list(stops)
        for worker, keys in batches.items():
            task = self._spawn(self._stop_on(keys, worker))
            if task is not None:
                self._chores.add(task)
                task.add_done_callback(self._chores.discard)

    async def _stop_on(self, keys: list[str], worker: str) -> None:
        """Ask one Dask worker ("": every worker) to stop ``keys``."""
        client = self._client
        if client is None:
            return
        try:
            async with asyncio.timeout(_STOP_TIMEOUT):
                answers = await client.run(
                    stop_jobs, keys, workers=[worker] if worker else None, on_error="return"
                )
        except Exception as exc:  # noqa: BLE001 - the worker may be gone; nothing to stop
            logger.warning(
                "event=dask-stop-failed keys=%d worker=%s error=%r", len(keys), worker, exc
            )
            return
        for address, answer in answers.items():
            if isinstance(answer, BaseException):
                logger.warning("event=dask-stop-failed worker=%s error=%r", address, answer)
            elif answer:
                logger.info("event=dask-tasks-interrupted worker=%s count=%s", address, answer)

    # -- the cluster -------------------------------------------------------------------------

    def _on_cluster_event(self, event: tuple[float, dict[str, Any]]) -> None:
        """A scheduler event on the ``all`` topic; only worker arrivals and departures count."""
        _, message = event
        action = message.get("action") if isinstance(message, dict) else None
        if action == "add-worker":
            self._membership.set()
        elif action == "remove-worker":
            self._membership.set()
            self._worker_left(str(message.get("worker")))

    def _worker_left(self, worker: str) -> None:
        """Every attempt that worker had begun failed with it (Dask may not rerun it)."""
        for attempt in list(self._attempts.values()):
            if attempt.phase is Phase.RUNNING and attempt.worker == worker:
                logger.warning(
                    "event=dask-worker-died task_id=%s worker=%s", attempt.job.task_id, worker
                )
                self._finish(attempt, _lost(attempt, f"the Dask worker {worker} running it left"))
                # Dask reschedules it elsewhere; it must not begin again.
                self._stop(attempt.key, "")

    async def _follow_capacity(self, client: distributed.Client) -> None:
        """Read the cluster's thread count now, on every join or leave, and every interval."""
        while True:
            self._membership.clear()
            try:
                info = await client.scheduler.identity(n_workers=0)
            except Exception as exc:  # noqa: BLE001 - the scheduler may be restarting
                logger.warning("event=dask-identity-failed error=%r", exc)
            else:
                self._set_capacity(int(info.get("total_threads", 0)))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._poll_interval):
                    await self._membership.wait()

    def _set_capacity(self, capacity: int) -> None:
        if capacity == self._capacity or self._state is EngineState.CLOSED:
            return
        logger.info("event=dask-capacity old=%d new=%d", self._capacity, capacity)
        self._capacity = capacity
        self._listener.capacity_changed(capacity)


def _outcome(reply: tuple[bool, Any]) -> Outcome:
    ok, payload = reply
    if ok:
        return Outcome(result=payload)
    type_name, message, traceback, kind = payload
    return Outcome(failure=Failure(type_name, message, traceback, FailureKind(kind)))


def _lost(attempt: _Attempt, why: str) -> Outcome:
    """A system failure of the attempt: the server decides whether to run it again."""
    message = f"task {attempt.job.task_id} attempt {attempt.job.attempt} was lost: {why}"
    return Outcome(failure=Failure("heartline.WorkerDied", message, "", FailureKind.WORKER_DIED))


async def _close_quietly(closable: distributed.Client | distributed.LocalCluster) -> None:
    """Close the client or the cluster, bounded; a failure to close is logged, not raised."""
    try:
        await closable.close(timeout=_CLOSE_TIMEOUT)
    except Exception as exc:  # noqa: BLE001 - shutting down: say so and go on
        logger.warning("event=dask-close-failed error=%r", exc)
