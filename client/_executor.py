"""Executor: ``concurrent.futures.Executor`` over a Client.

``submit`` pickles in the caller's thread (so a bad argument raises there, before anything
is sent) and queues the task; the client's loop thread sends whatever is queued as one
SubmitTasks batch, so a burst of submits (or a ``map``) travels in few requests while a lone
submit leaves at once: submits made while a request is out wait for its answer and go
together (more requests start alongside only for full batches), and a burst wakes the loop
thread once. Futures resolve from the client's watch stream, never by polling.

A future of the same executor passed as an argument (top level of args or kwargs) becomes
an input: the task runs after it on the server and gets its result in its place. Its spec
names the input by task id, so it can only leave once the input's SubmitTasks has been
answered: a queued task whose inputs have no id yet is parked on the first of them and put
back at the head of the queue when that one is stored (or is known never to be sent). An
input is always queued before its dependents (a future exists only once queued), so
nothing waits on something behind it, and independent tasks keep flowing meanwhile.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import enum
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from heartline import _defaults
from heartline._errors import HeartlineError, TaskSkippedError
from heartline._modules import ShipModules
from heartline._states import SkipReason
from heartline._tls import TLS
from heartline.v1 import task_pb2

from ._base import (
    _SPEC_OVERHEAD,
    MAX_BATCH_BYTES,
    MAX_BATCH_TASKS,
    PreparedBatch,
    SubmitOptions,
    _check_endpoint,
    outcome_of_update,
    replace_refs,
)
from ._sync import Client
from ._types import Priority

_MAX_FLUSHERS = 4
# While one SubmitTasks is out, what is queued waits for it to come back and then goes
# as one batch (each request costs the server far more than a task in it); a further
# request starts alongside only once this many tasks are waiting.
_BATCH_GOAL = 64


class _Submission(enum.Enum):
    """How far a TaskFuture's task got towards the server (changed on the loop thread)."""

    QUEUED = 1
    """In the executor's queue, or parked until its inputs have ids."""
    SENDING = 2
    """In a SubmitTasks request not answered yet."""
    STORED = 3
    """Stored by the server: ``task_id`` is set."""
    UNSENT = 4
    """Never to be sent: cancelled before, its request failed, or an input of it is UNSENT."""


class TaskFuture(concurrent.futures.Future):
    """The future of one task; ``task_id`` is set once the server has stored the task.

    ``cancel()`` on a pending future also cancels the task on the server.
    """

    def __init__(self, executor: Executor) -> None:
        super().__init__()
        self.task_id: str | None = None
        self._executor = executor
        self._submission = _Submission.QUEUED

    def cancel(self) -> bool:
        if not super().cancel():
            return False
        self._executor._request_cancel(self)
        return True

    def __reduce__(self) -> Any:
        raise TypeError(
            "a TaskFuture stands for its task's result only as a top-level argument of a "
            "submit to the same Executor, not inside a container"
        )


@dataclasses.dataclass(eq=False, slots=True)
class _Queued:
    """A task waiting to be sent."""

    future: TaskFuture
    spec: task_pb2.TaskSpec
    functions: dict[str, bytes]
    """Payloads of the functions of its submit call (shared by that call's tasks)."""
    inputs: tuple[TaskFuture, ...]
    """The futures whose results it takes, in placeholder order."""


class Executor(concurrent.futures.Executor):
    """Run calls on one endpoint through ``concurrent.futures``.

    Args:
        endpoint: endpoint name or id.
        address: server ``host:port``, or several comma-separated that fail over (see
            :class:`Client`); default ``$HEARTLINE_ADDRESS`` or ``127.0.0.1:50051``.
        token: bearer token; default ``$HEARTLINE_TOKEN``, else the token file
            ``$HEARTLINE_HOME/token`` (the server's first start writes it).
        client: an existing Client to use (not closed on shutdown) instead of a new one.
        priority, max_retries, max_system_retries, walltime, held: submit options applied
            to every task (see :meth:`AsyncClient.submit`).
        retry_timeout: seconds a call keeps trying while the server is away (see
            :class:`Client`); futures survive a server restart within it.
        tls: how to reach the server over TLS (see :class:`Client`).
        ship_modules: which of your own modules travel with each function (see
            :class:`Client`); with ``client``, that client's setting applies.
    """

    def __init__(
        self,
        endpoint: str,
        address: str | None = None,
        *,
        token: str | None = None,
        client: Client | None = None,
        priority: str | Priority = Priority.NORMAL,
        max_retries: int = 0,
        max_system_retries: int | None = None,
        walltime: float | None = None,
        held: bool = False,
        serializer: str = "auto",
        retry_timeout: float = _defaults.RETRY_TIMEOUT,
        tls: TLS | bool | None = None,
        ship_modules: ShipModules = True,
    ) -> None:
        _check_endpoint(endpoint)
        self.endpoint = endpoint
        self._options = SubmitOptions.of(
            priority=priority,
            max_retries=max_retries,
            max_system_retries=max_system_retries,
            walltime=walltime,
            held=held,
            serializer=serializer,
        )
        self._owns_client = client is None
        self.client = (
            client
            if client is not None
            else Client(
                address,
                token=token,
                retry_timeout=retry_timeout,
                tls=tls,
                ship_modules=ship_modules,
            )
        )
        self._async = self.client._async
        self._loop = self.client._loop
        # Tasks waiting to be sent; appended from any thread.
        self._queue: collections.deque[_Queued] = collections.deque()
        # Queued tasks waiting for an input's id, by that input (loop thread only).
        self._parked: dict[TaskFuture, list[_Queued]] = {}
        self._flushers = 0  # loop thread only
        # A _kick is on its way to the loop thread (under _lock): a burst of submits
        # wakes the loop once, not once per call.
        self._kick_scheduled = False
        self._cancels: set[str] = set()  # loop thread only
        self._cancelling: set[asyncio.Task[Any]] = set()  # loop thread only
        self._outstanding: set[TaskFuture] = set()
        self._lock = threading.Lock()
        self._shutdown = False

    # -- concurrent.futures.Executor -----------------------------------------------

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> TaskFuture:
        """Run ``fn(*args, **kwargs)`` on the endpoint; return its future.

        A future of this executor at the top level of ``args`` or ``kwargs`` is replaced
        by its result: the task waits for it on the server (``waiting-for-deps``), and is
        skipped if it does not succeed (its future then raises TaskSkippedError).

        Raises:
            SerializationError: ``fn`` or its arguments can't be pickled (nothing sent).
            ValueError: an argument is a future of another Executor.
            RuntimeError: the executor was shut down.
        """
        return self._enqueue([(fn, args, kwargs)])[0]

    def map(
        self,
        fn: Callable[..., Any],
        *iterables: Iterable[Any],
        timeout: float | None = None,
        chunksize: int = 1,
    ) -> Iterator[Any]:
        """Like :func:`map` run on the endpoint; results in order, sent in batches.

        ``chunksize`` is accepted for compatibility; batching is automatic.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        futures = self._enqueue([(fn, args, {}) for args in zip(*iterables)])

        def results() -> Iterator[Any]:
            try:
                futures.reverse()
                while futures:
                    fut = futures.pop()
                    if deadline is None:
                        yield fut.result()
                    else:
                        yield fut.result(max(deadline - time.monotonic(), 0))
            finally:
                for fut in futures:
                    fut.cancel()

        return results()

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop accepting work; optionally cancel what is pending and wait for the rest."""
        with self._lock:
            self._shutdown = True
            outstanding = list(self._outstanding)
        if cancel_futures:
            for fut in outstanding:
                fut.cancel()
            self.client._run(self._drain_cancels())
        if not self._owns_client:
            if wait:
                concurrent.futures.wait(outstanding)
            return
        if wait:
            self._close_when_done(outstanding)
        else:
            threading.Thread(target=self._close_when_done, args=(outstanding,), daemon=True).start()

    def _close_when_done(self, outstanding: list[TaskFuture]) -> None:
        concurrent.futures.wait(outstanding)
        self.client._run(self._drain_cancels())
        self.client.close()

    # -- queueing (caller threads) -------------------------------------------------

    def _enqueue(self, calls: list[Any]) -> list[TaskFuture]:
        placed = []
        inputs: list[tuple[TaskFuture, ...]] = []
        for fn, args, kwargs in calls:
            args, kwargs, refs = replace_refs(args, kwargs, TaskFuture, self._check_input)
            placed.append((fn, args, kwargs))
            inputs.append(tuple(refs))
        prepared = self._async._prepare(placed, self._options)
        futures = [TaskFuture(self) for _ in prepared.specs]
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot submit to an Executor after shutdown")
            self._outstanding.update(futures)
            # Every task carries (a reference to) the payloads of functions the server may
            # lack: whichever batch goes first registers them, the others wait for that.
            functions = prepared.functions
            self._queue.extend(
                _Queued(fut, spec, functions, refs)
                for fut, spec, refs in zip(futures, prepared.specs, inputs)
            )
            wake = not self._kick_scheduled
            self._kick_scheduled = True
        for fut in futures:
            fut.add_done_callback(self._forget)
        if wake:
            self._loop.call_soon_threadsafe(self._kick_from_caller)
        return futures

    def _check_input(self, fut: TaskFuture, where: str) -> None:
        if fut._executor is not self:
            raise ValueError(
                f"{where} is a future of another Executor: a task can take as input only a "
                "future of its own Executor (or pass future.result() instead)"
            )

    def _forget(self, fut: concurrent.futures.Future[Any]) -> None:
        with self._lock:
            self._outstanding.discard(fut)  # type: ignore[arg-type]

    def _request_cancel(self, fut: TaskFuture) -> None:
        if not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._cancel_on_loop, fut)

    # -- sending (loop thread) -----------------------------------------------------

    def _kick_from_caller(self) -> None:
        with self._lock:
            # Cleared before looking at the queue: a task queued from now on wakes us again.
            self._kick_scheduled = False
        self._kick()

    def _kick(self) -> None:
        """Start a flusher for what is queued: at once when none is sending (a lone task
        goes without waiting), alongside the ones out only for a full batch."""
        flushers = self._flushers
        if not self._queue or flushers >= _MAX_FLUSHERS:
            return
        if flushers == 0 or len(self._queue) >= _BATCH_GOAL:
            self._flushers += 1
            self._async._spawn(self._flush())

    def _take_batch(self) -> tuple[list[_Queued], dict[str, bytes]]:
        """Pop queued tasks up to one request's count and size (parking those whose
        inputs have no task id yet)."""
        batch: list[_Queued] = []
        functions: dict[str, bytes] = {}
        size = 0
        queue = self._queue
        while queue and len(batch) < MAX_BATCH_TASKS:
            spec_size = len(queue[0].spec.args) + _SPEC_OVERHEAD
            if batch and size + spec_size > MAX_BATCH_BYTES:
                break
            queued = queue.popleft()
            if queued.future.cancelled():
                self._unsent(queued.future)  # cancelled before it was sent: never send it
                continue
            if queued.inputs and not self._inputs_ready(queued):
                continue
            queued.future._submission = _Submission.SENDING
            functions.update(queued.functions)
            batch.append(queued)
            size += spec_size
        return batch, functions

    def _inputs_ready(self, queued: _Queued) -> bool:
        """Name the inputs' task ids in the spec if they all have one; else park the
        task on the first input still on its way, or fail it if one will never be sent."""
        ids = []
        for i, fut in enumerate(queued.inputs):
            if fut._submission is _Submission.STORED:
                ids.append(fut.task_id)
            elif fut._submission is _Submission.UNSENT:
                error = TaskSkippedError(
                    "", SkipReason.INPUT_NOT_SUCCEEDED, f"its input {i} was never submitted"
                )
                if not fut.cancelled():
                    error.__cause__ = fut.exception(0)
                if queued.future.set_running_or_notify_cancel():
                    queued.future.set_exception(error)
                self._unsent(queued.future)
                return False
            else:
                self._parked.setdefault(fut, []).append(queued)
                return False
        queued.spec.inputs.extend(ids)
        return True

    def _unsent(self, fut: TaskFuture) -> None:
        fut._submission = _Submission.UNSENT
        self._unpark(fut)

    def _unpark(self, fut: TaskFuture) -> None:
        """Put the tasks parked on ``fut`` back at the head of the queue, in their order."""
        parked = self._parked.pop(fut, None)
        if parked:
            self._queue.extendleft(reversed(parked))
            self._kick()

    async def _flush(self) -> None:
        try:
            while self._queue:
                batch, functions = self._take_batch()
                if not batch:
                    continue
                self._kick()  # more queued: let another flusher send it meanwhile
                prepared = PreparedBatch([queued.spec for queued in batch], functions)
                try:
                    ids = await self._async._submit_prepared(self.endpoint, prepared)
                except Exception as exc:  # noqa: BLE001 - the whole batch failed: each future says why
                    for queued in batch:
                        if queued.future.set_running_or_notify_cancel():
                            queued.future.set_exception(exc)
                        self._unsent(queued.future)
                    continue
                for queued, tid in zip(batch, ids):
                    self._bind(queued.future, tid)
        finally:
            self._flushers -= 1

    def _bind(self, fut: TaskFuture, task_id: str) -> None:
        fut.task_id = task_id
        fut._submission = _Submission.STORED
        self._unpark(fut)
        waiter: asyncio.Future[Any] | None = self._async._waiters.get(task_id)
        if waiter is None:
            # Settled at once and already dropped again (a batch of results over the
            # client's kept-bytes limit): ask the server for it by name.
            waiter = self._async._spawn(self._async._wait_settled(task_id, None))
        if fut.cancelled():
            self._cancel_on_loop(fut)
        waiter.add_done_callback(lambda w: self._settled(fut, task_id, w))

    def _settled(self, fut: TaskFuture, task_id: str, waiter: asyncio.Future[Any]) -> None:
        self._async._consume(task_id, waiter)
        if not fut.set_running_or_notify_cancel():
            return
        if waiter.cancelled():  # the fallback watch was ended by close()
            fut.set_exception(HeartlineError("the client was closed"))
            return
        try:
            fut.set_result(outcome_of_update(waiter.result()))
        except BaseException as exc:  # noqa: BLE001 - the future carries any error
            fut.set_exception(exc)

    def _cancel_on_loop(self, fut: TaskFuture) -> None:
        if fut.task_id is None:
            return  # not sent yet: _take_batch drops it, or _bind comes back here
        first = not self._cancels
        self._cancels.add(fut.task_id)
        if first:
            self._loop.call_soon(self._send_cancels)

    def _send_cancels(self) -> None:
        ids, self._cancels = sorted(self._cancels), set()
        if ids:
            task = self._async._spawn(self._cancel_quietly(ids))
            self._cancelling.add(task)
            task.add_done_callback(self._cancelling.discard)

    async def _drain_cancels(self) -> None:
        """Wait until every cancel asked for so far has reached the server."""
        await asyncio.sleep(0)  # let call_soon'd _send_cancels run first
        if self._cancelling:
            await asyncio.gather(*self._cancelling, return_exceptions=True)

    async def _cancel_quietly(self, ids: list[str]) -> None:
        try:
            await self._async.cancel(ids)
        except HeartlineError:
            pass  # e.g. already settled: the future is cancelled either way
