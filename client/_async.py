"""AsyncClient: the one I/O layer of the client, over ``grpc.aio``.

Results come from the server, never by polling: before its first submit a client opens one
``WatchTasks`` stream for its session (settled updates only, results included) and waits
for the server's first message, which confirms the subscription. Every settled update
resolves an ``asyncio.Future`` in ``_waiters``. If the stream breaks it is reopened with
backoff, naming the tasks still unresolved, so the server sends their current states. No
WatchTasks request names more than ``MAX_IDS`` tasks (the server's limit): the reopened
session watch names the first ``MAX_IDS`` and named watches of at most ``MAX_IDS`` each
cover the rest; a refused request fails only the waits of the tasks it named.

Settled outcomes nobody has asked for yet are kept in settle order, at most
``MAX_KEPT_SETTLED`` of them and about ``MAX_KEPT_BYTES``; the oldest are dropped first.
Dropping one only forgets a done future: whoever already awaits it holds it. A later
``get_result`` of a dropped (or foreign) task watches it by name; such named watches started
in one loop iteration share one stream.
"""

from __future__ import annotations

import asyncio
import builtins
import collections
import enum
import random
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, Self, TypeVar

import grpc

from heartline import _defaults
from heartline._channel import (
    AddressError,
    ServerTarget,
    any_listening,
    open_channel,
    server_target,
)
from heartline._errors import (
    HeartlineError,
    InvalidArgumentError,
    NotFoundError,
    RPCError,
    TimeoutError,
    rpc_error_from_grpc,
    tls_failure,
    unreachable_message,
)
from heartline._modules import ShipModules
from heartline._states import CancelMode, TaskState
from heartline._tls import TLS, channel_credentials
from heartline.v1 import task_pb2, task_service_pb2, task_service_pb2_grpc

from ._admin import AdminCalls
from ._base import (
    MAX_IDS,
    MAX_KEPT_BYTES,
    MAX_KEPT_SETTLED,
    Call,
    ClientBase,
    PreparedBatch,
    SubmitOptions,
    channel_options,
    new_request_id,
    outcome_of_update,
)
from ._groups import Group, GroupInfo
from ._types import EndpointInfo, Priority, Stats, Task, TaskUpdate

# Codes on which reopening a watch with the same request can't help.
_FATAL_WATCH_CODES = frozenset(
    {
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.UNIMPLEMENTED,
    }
)
_MAX_SUBMITS_IN_FLIGHT = 4
# Answers that a repeat of the same call may cure (the server restarting, a lost link).
_RETRIED_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})
T = TypeVar("T")
# How the server's NOT_FOUND for a function it does not have begins (server/_task_service.py).
_UNKNOWN_FUNCTION = "unknown function "


class ClientState(enum.Enum):
    UNOPENED = 1
    """Created; the channel opens on first use."""
    OPENED = 2
    """The channel is open (the session watch may or may not be)."""
    CLOSED = 3
    """Closed; every call raises."""


class _NamedGroup:
    """One named watch shared by the get_result calls that started it in one loop iteration."""

    __slots__ = ("ended", "ids", "task", "users")

    def __init__(self) -> None:
        self.ids: list[str] = []
        self.users = 0
        self.task: asyncio.Task[Any] | None = None
        self.ended = False


def _backoff(attempt: int) -> float:
    """Jittered exponential backoff: 50 ms doubling, capped at 5 s."""
    return min(0.05 * 2**attempt, 5.0) * random.uniform(0.5, 1.0)


class AsyncClient(AdminCalls, ClientBase):
    """Submit and control tasks from asyncio code.

    Args:
        address: ``host:port`` of the server; default ``$HEARTLINE_ADDRESS`` or
            ``127.0.0.1:50051``. Several servers sharing one store, comma-separated
            (``"db1:50051,db2:50051"``): calls go to whichever is active, and follow a
            standby that takes over.
        token: bearer token; default ``$HEARTLINE_TOKEN``, else the token file
            ``$HEARTLINE_HOME/token`` (the server's first start writes it).
        tls: connect over TLS (see :class:`~heartline.TLS`; ``True`` trusts the system's
            CAs, ``False`` is plaintext); default from ``$HEARTLINE_TLS_CA`` (and
            ``$HEARTLINE_TLS_CERT``, ``$HEARTLINE_TLS_KEY``), else plaintext.
        ship_modules: which of your own modules travel with each function, as source:
            True (default) ships the local modules it uses (a script's or notebook's
            neighbours, not installed packages), found once per function; a list adds
            modules (names or module objects) found code can't see, e.g. imported by
            ``importlib.import_module``; False ships none (the endpoint must import them).

    Use as ``async with AsyncClient() as client:`` or call :meth:`close`.

    Raises:
        HeartlineError: a TLS file is missing, unreadable or not PEM (the message names it).
        InvalidArgumentError: ``ship_modules`` names a module that does not import here or
            has no Python source; or an address list is malformed (a host of it that does
            not resolve is said at the first call). The message names the item.
    """

    def __init__(
        self,
        address: str | None = None,
        *,
        token: str | None = None,
        retry_timeout: float = _defaults.RETRY_TIMEOUT,
        tls: TLS | bool | None = None,
        ship_modules: ShipModules = True,
    ) -> None:
        super().__init__(
            address,
            token=token,
            retry_timeout=retry_timeout,
            tls=tls,
            ship_modules=ship_modules,
        )
        # Read now, so a bad file is said at once rather than at the first call.
        self._credentials = channel_credentials(self.tls)
        self._state = ClientState.UNOPENED
        self._channel: grpc.aio.Channel | None = None
        self._target: ServerTarget | None = None
        self._stub: Any = None
        # Settled updates by task id; resolved from watch streams.
        self._waiters: dict[str, asyncio.Future[task_pb2.TaskUpdate]] = {}
        # Ids of the done futures in _waiters, in settle order, with their sizes: what is
        # kept for tasks nobody has asked about yet (bounded; see _evict).
        self._kept: collections.OrderedDict[str, int] = collections.OrderedDict()
        self._kept_bytes = 0
        # Task id -> how many running named watches name it (the session watch skips those).
        self._covered: dict[str, int] = {}
        # Settles that arrived before their SubmitTasks answer (kept only while one is out).
        self._early: dict[str, task_pb2.TaskUpdate] = {}
        self._submits_in_flight = 0
        self._watch_lock: asyncio.Lock | None = None
        self._watch_call: Any = None
        self._watch_live = False
        self._watch_epoch = 0
        self._registering: dict[str, asyncio.Future[None]] = {}
        self._named: dict[str, _NamedGroup] = {}  # task id -> its get_result named watch
        self._filling: _NamedGroup | None = None  # the named group this loop iteration fills
        self._tasks: set[asyncio.Task[Any]] = set()
        self._submit_limit: asyncio.Semaphore | None = None
        self._reached = False

    @property
    def reached(self) -> bool:
        """Whether a call of this client has been answered by its server yet."""
        return self._reached

    async def __aenter__(self) -> Self:
        self._open()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # -- plumbing ------------------------------------------------------------------

    def _open(self) -> Any:
        """Open the channel on first use (inside the loop that will drive it)."""
        if self._state is ClientState.OPENED:
            return self._stub
        if self._state is ClientState.CLOSED:
            raise HeartlineError("the client is closed")
        try:
            # A list's host names are looked up here, once, on the caller's loop: IP
            # addresses and localhost need no lookup, and Client's loop is its own.
            self._target = server_target(self.address)
        except AddressError as err:
            raise InvalidArgumentError(str(err)) from None
        self._channel = open_channel(self._target, self._credentials, channel_options())
        self._stub = task_service_pb2_grpc.TaskServiceStub(self._channel)
        self._watch_lock = asyncio.Lock()
        self._submit_limit = asyncio.Semaphore(_MAX_SUBMITS_IN_FLIGHT)
        self._state = ClientState.OPENED
        return self._stub

    async def _unary(self, name: str, request: Any) -> Any:
        """One unary call, repeated on UNAVAILABLE and DEADLINE_EXCEEDED (every unary
        call of the client is safe to repeat: reads, content-addressed registrations,
        and submits and commands that carry a request id)."""
        stub = self._open()

        async def call() -> Any:
            try:
                return await getattr(stub, name)(request, metadata=self._metadata)
            except grpc.aio.AioRpcError as err:
                raise self._rpc_error(err) from err

        return await self._retrying(call)

    def _rpc_error(self, err: grpc.RpcError) -> RPCError:
        """``err`` as a heartline error, in plain words if the server can't be reached."""
        return rpc_error_from_grpc(err, self.address, tls=self.tls is not None)

    async def _retrying(self, call: Callable[[], Awaitable[T]]) -> T:
        """Await ``call()``, again with jittered backoff while the server is away, for up
        to ``retry_timeout`` seconds. A client that never reached its server gives up at
        once when nothing answers at the address (see :meth:`_nobody_there`): that is a
        wrong address or a server not started, which waiting would only hide. A failed
        TLS handshake (the server's certificate not trusted) is given up at once, always."""
        attempt = 0
        deadline: float | None = None
        while True:
            try:
                result = await call()
            except RPCError as err:
                if err.code not in _RETRIED_CODES or self._state is not ClientState.OPENED:
                    raise
                if tls_failure(err.details):
                    raise  # a certificate that is not trusted stays so
                if await self._nobody_there(err.details):
                    raise
                now = asyncio.get_running_loop().time()
                if deadline is None:
                    deadline = now + self.retry_timeout
                delay = _backoff(attempt)
                if now + delay > deadline:
                    raise
                await asyncio.sleep(delay)
                attempt += 1
                continue
            self._reached = True
            return result

    async def _nobody_there(self, details: str) -> bool:
        """Whether a failed call (gRPC's ``details`` of an UNAVAILABLE) means nothing
        answers at the address, for a client that never reached its server.

        One address: gRPC's words say it (connection refused, a name that does not
        resolve...). A list: its words only tell of the server that failed last, and a
        list fails as a whole while its active server is gone and a standby not yet
        SERVING (or still answering NOT_SERVING, "backend unhealthy"); so nothing
        answers only when no server of the list even accepts a connection. While one
        does, the call is retried as for a server that was reached: a standby may take
        over within seconds.
        """
        if self._reached or unreachable_message(self.address, details) is None:
            return False
        if self._target is None or not self._target.servers:
            return True
        return not await any_listening(self._target)

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        """Start a background task owned by this client (cancelled on close)."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def close(self) -> None:
        """Close the streams and the channel; unresolved waits raise HeartlineError."""
        if self._state is ClientState.CLOSED:
            return
        was_open = self._state is ClientState.OPENED
        self._state = ClientState.CLOSED
        self._watch_live = False
        if self._watch_call is not None:
            self._watch_call.cancel()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        self._fail_waiters(HeartlineError("the client was closed"), self._waiters)
        if was_open and self._channel is not None:
            await self._channel.close()

    # -- submitting ----------------------------------------------------------------

    async def submit(
        self,
        endpoint: str,
        function: Any,
        /,
        *args: Any,
        priority: str | Priority = Priority.NORMAL,
        max_retries: int = 0,
        max_system_retries: int | None = None,
        walltime: float | None = None,
        held: bool = False,
        serializer: str = "auto",
        **kwargs: Any,
    ) -> str:
        """Submit ``function(*args, **kwargs)`` to an endpoint (name or id); return the task id.

        The keyword options (priority, max_retries, max_system_retries, walltime, held,
        serializer) are taken by heartline (``serializer``: ``"auto"``, ``"bytecode"`` or
        ``"source"``, how the function travels, see :class:`SubmitOptions`); pass a function keyword of one of those names through
        :meth:`submit_batch`.

        Raises:
            SerializationError: the function or its arguments can't be pickled (nothing sent).
        """
        options = SubmitOptions.of(
            priority=priority,
            max_retries=max_retries,
            max_system_retries=max_system_retries,
            walltime=walltime,
            held=held,
            serializer=serializer,
        )
        prepared = self._prepare([(function, args, kwargs)], options)
        return (await self._submit_prepared(endpoint, prepared))[0]

    async def submit_batch(
        self,
        endpoint: str,
        calls: Iterable[Call],
        *,
        priority: str | Priority = Priority.NORMAL,
        max_retries: int = 0,
        max_system_retries: int | None = None,
        walltime: float | None = None,
        held: bool = False,
        serializer: str = "auto",
    ) -> list[str]:
        """Submit many ``(function, args, kwargs)`` calls; return their task ids in order.

        Sent as SubmitTasks requests of at most 1000 tasks and about 8 MiB each.
        """
        options = SubmitOptions.of(
            priority=priority,
            max_retries=max_retries,
            max_system_retries=max_system_retries,
            walltime=walltime,
            held=held,
            serializer=serializer,
        )
        return await self._submit_prepared(endpoint, self._prepare(calls, options))

    async def register_function(self, function: Any, /) -> str:
        """Send ``function`` to the server (once per client, as a submit does) and return
        its id: the sha256 of its pickle, what an endpoint's allow-list names
        (``heartline endpoint start --allow-function ID``). The same function object
        gives the same id for as long as this process keeps it; an edited function
        gets a new one.

        Raises:
            SerializationError: the function can't be pickled (nothing sent).
            ResourceExhaustedError: it is over the payload limit, or the functions you
                stored would pass the server's byte budget per user.
        """
        fid, payload = self._functions.lookup(function)
        self._open()
        await self._register({fid: payload})
        return fid

    async def _submit_prepared(self, endpoint: str, prepared: PreparedBatch) -> list[str]:
        requests = list(self._submit_requests(endpoint, prepared.specs))
        if not requests:
            return []
        self._open()
        await self._retrying(self._subscribe)
        await self._register(prepared.functions)
        epoch = self._watch_epoch
        self._submits_in_flight += 1
        try:
            if len(requests) == 1:
                answers = [await self._submit_tasks(requests[0], prepared.functions)]
            else:
                answers = await asyncio.gather(
                    *(self._limited_submit(r, prepared.functions) for r in requests)
                )
            ids = [tid for answer in answers for tid in answer.task_ids]
            self._track(ids, epoch)
        finally:
            self._submits_in_flight -= 1
            if not self._submits_in_flight:
                self._early.clear()
        return ids

    async def _limited_submit(
        self, request: task_service_pb2.SubmitTasksRequest, functions: dict[str, bytes]
    ) -> task_service_pb2.SubmitTasksResponse:
        assert self._submit_limit is not None
        async with self._submit_limit:
            return await self._submit_tasks(request, functions)

    async def _submit_tasks(
        self, request: task_service_pb2.SubmitTasksRequest, functions: dict[str, bytes]
    ) -> task_service_pb2.SubmitTasksResponse:
        """SubmitTasks, once more if the server no longer has a function we registered.

        The server drops a stored function once no kept task uses it (its result
        retention, see SqliteStore.purge_results), while this client's mark "registered"
        lives on. On exactly that refusal (NOT_FOUND "unknown function ..."), which the
        server gives before it stores anything, the client forgets the marks of the
        request's functions, registers them again and retries once.
        """
        fids = {spec.function_id for spec in request.tasks}
        return await self._unary_registering("SubmitTasks", request, fids, functions)

    async def _unary_registering(
        self, name: str, request: Any, fids: set[str], functions: dict[str, bytes]
    ) -> Any:
        """A submitting call, once more after registering again the functions ``fids``
        on the server's NOT_FOUND "unknown function ..." (see :meth:`_submit_tasks`)."""
        try:
            return await self._unary(name, request)
        except NotFoundError as err:
            if not err.details.startswith(_UNKNOWN_FUNCTION) or not fids <= functions.keys():
                raise
        await self._register({fid: functions[fid] for fid in fids}, again=True)
        return await self._unary(name, request)

    async def _register(self, functions: dict[str, bytes], *, again: bool = False) -> None:
        """Send each function the server may not have, once per client (``again``: even
        those marked registered, which the server may have dropped since)."""
        pending = []
        for fid, payload in functions.items():
            if not again and self._functions.is_registered(fid):
                continue
            fut = self._registering.get(fid)
            if fut is None:
                fut = self._spawn(self._register_one(fid, payload))
                self._registering[fid] = fut
            pending.append(fut)
        if pending:
            await asyncio.gather(*pending)

    async def _register_one(self, fid: str, payload: bytes) -> None:
        try:
            await self._unary(
                "RegisterFunction",
                task_service_pb2.RegisterFunctionRequest(function=payload, function_id=fid),
            )
            self._functions.mark_registered(fid)
        finally:
            self._registering.pop(fid, None)

    def _track(self, ids: Sequence[str], epoch: int) -> None:
        """Make a waiter for each new task id; catch settles the session watch may have missed."""
        loop = asyncio.get_running_loop()
        early_settles = False
        for tid in ids:
            fut = self._waiters.get(tid)
            if fut is None:
                fut = self._waiters[tid] = loop.create_future()
            early = self._early.pop(tid, None) if self._early else None
            if early is not None and not fut.done():
                fut.set_result(early)
                self._keep(tid, early.ByteSize())
                early_settles = True
        if early_settles:
            self._evict()
        if epoch != self._watch_epoch or not self._watch_live:
            # The session stream broke while these were being submitted: a settle could
            # have fallen in the gap, and the reopened stream did not name these ids.
            self._spawn_named(list(ids))

    # -- watching ------------------------------------------------------------------

    def _watch_request(self, task_ids: Sequence[str], session: bool):
        return task_service_pb2.WatchTasksRequest(
            task_ids=task_ids,
            session_id=self.session_id if session else "",
            settled_only=True,
            include_results=True,
        )

    def _resolve(self, response: task_service_pb2.WatchTasksResponse) -> None:
        waiters = self._waiters
        kept = self._kept
        added = 0
        for update in response.updates:
            if update.pending:
                continue
            tid = update.task_id
            fut = waiters.get(tid)
            if fut is not None:
                if not fut.done():
                    fut.set_result(update)
                    size = update.ByteSize()
                    kept[tid] = size
                    added += size
            elif self._submits_in_flight:
                self._early[tid] = update
        self._kept_bytes += added
        if len(kept) > MAX_KEPT_SETTLED or self._kept_bytes > MAX_KEPT_BYTES:
            self._evict()

    # -- what is kept of settled tasks -----------------------------------------------

    def _keep(self, task_id: str, size: int) -> None:
        """Note a future of _waiters that just became done (call _evict after)."""
        self._kept[task_id] = size
        self._kept_bytes += size

    def _evict(self) -> None:
        """Drop the oldest kept outcomes beyond the count and byte limits.

        Only done futures are dropped, and only from ``_waiters``: a get_result or an
        Executor future already waiting on one holds it (its callbacks have run or are
        scheduled), so nobody waiting loses anything; a later get_result watches by name.
        """
        kept, waiters = self._kept, self._waiters
        while kept and (len(kept) > MAX_KEPT_SETTLED or self._kept_bytes > MAX_KEPT_BYTES):
            tid, size = kept.popitem(last=False)
            self._kept_bytes -= size
            fut = waiters.get(tid)
            if fut is not None and fut.done():
                del waiters[tid]

    def _consume(self, task_id: str, fut: asyncio.Future[Any]) -> None:
        """Forget the outcome of ``task_id`` once it was handed to the user."""
        if self._waiters.get(task_id) is fut:
            del self._waiters[task_id]
            size = self._kept.pop(task_id, None)
            if size is not None:
                self._kept_bytes -= size

    # -- the session watch ---------------------------------------------------------

    def _unresolved(self) -> list[str]:
        """Ids still waited on that no running named watch covers."""
        covered = self._covered
        return [t for t, f in self._waiters.items() if not f.done() and t not in covered]

    async def _subscribe(self) -> None:
        """Make sure the session watch is live; raise if the server refuses or is down.

        The session watch names (at most MAX_IDS of) the unresolved tasks, so the server
        sends their current states; named watches of at most MAX_IDS ids cover the rest.
        A fatal refusal fails the waits of the tasks the request named, and only those.
        """
        if self._watch_live:
            return
        assert self._watch_lock is not None
        async with self._watch_lock:
            if self._watch_live:
                return
            stub = self._open()
            unresolved = self._unresolved()
            named, rest = unresolved[:MAX_IDS], unresolved[MAX_IDS:]
            call = stub.WatchTasks(
                self._watch_request(named, session=True), metadata=self._metadata
            )
            try:
                first = await call.read()
            except grpc.aio.AioRpcError as err:
                error = self._rpc_error(err)
                if err.code() in _FATAL_WATCH_CODES and named:
                    self._fail_waiters(error, self._waiting(named))
                raise error from err
            except BaseException:
                call.cancel()
                raise
            if first is grpc.aio.EOF:
                raise RPCError(
                    "the server ended the watch stream at once", grpc.StatusCode.UNAVAILABLE
                )
            self._resolve(first)
            self._watch_call = call
            self._watch_epoch += 1
            self._watch_live = True
            self._spawn(self._read_session(call))
            if rest:
                # Registered after the session watch: a settle is caught by one or the other.
                self._spawn_named(rest)

    async def _read_session(self, call: Any) -> None:
        try:
            while True:
                response = await call.read()
                if response is grpc.aio.EOF:
                    break
                self._resolve(response)
        except grpc.aio.AioRpcError:
            pass
        if self._state is ClientState.CLOSED or call is not self._watch_call:
            return
        self._watch_live = False
        self._watch_call = None
        await self._resubscribe()

    async def _resubscribe(self) -> None:
        """Reopen the session watch with backoff while anything waits on it."""
        attempt = 0
        while self._state is ClientState.OPENED and not self._watch_live:
            if not self._unresolved():
                return  # nothing waits on it; the next submit reopens it
            await asyncio.sleep(_backoff(attempt))
            attempt += 1
            try:
                await self._subscribe()
            except RPCError:
                # A fatal refusal has failed the waits of the ids it named (only those);
                # the next round names the tasks still waiting.
                pass
            except HeartlineError:
                return

    # -- named watches -------------------------------------------------------------

    def _waiting(self, task_ids: Iterable[str]) -> dict[str, asyncio.Future[Any]]:
        waiters = self._waiters
        return {t: f for t in task_ids if (f := waiters.get(t)) is not None and not f.done()}

    def _cover(self, task_ids: list[str], step: int) -> None:
        covered = self._covered
        for tid in task_ids:
            n = covered.get(tid, 0) + step
            if n > 0:
                covered[tid] = n
            else:
                covered.pop(tid, None)

    def _spawn_named(self, task_ids: list[str]) -> list[asyncio.Task[Any]]:
        """Watch the ids by name until settled, at most MAX_IDS per stream."""
        tasks = []
        for i in range(0, len(task_ids), MAX_IDS):
            chunk = task_ids[i : i + MAX_IDS]
            self._cover(chunk, 1)
            task = self._spawn(self._watch_named(chunk))
            task.add_done_callback(lambda _t, chunk=chunk: self._cover(chunk, -1))
            tasks.append(task)
        return tasks

    async def _watch_named(self, task_ids: list[str]) -> None:
        """Watch named tasks until each has settled (reopening on breaks)."""
        attempt = 0
        stub = self._open()
        while True:
            waiting = self._waiting(task_ids)
            if not waiting:
                return
            left = set(waiting)
            call = stub.WatchTasks(
                self._watch_request(list(waiting), session=False), metadata=self._metadata
            )
            try:
                credit = 0
                while True:
                    response = await call.read()
                    if response is grpc.aio.EOF:
                        break
                    attempt = 0
                    self._resolve(response)
                    for update in response.updates:
                        if not update.pending:
                            left.discard(update.task_id)
                    # Now and then (amortized O(1) per update) drop ids settled or given up
                    # elsewhere; the ones this stream hears of are dropped above.
                    credit += len(response.updates) + 1
                    if left and credit >= len(left):
                        credit = 0
                        left = set(self._waiting(left))
                    if not left:
                        return
            except grpc.aio.AioRpcError as err:
                if err.code() in _FATAL_WATCH_CODES or tls_failure(err.details() or ""):
                    self._fail_waiters(self._rpc_error(err), waiting)
                    return
            finally:
                call.cancel()
            await asyncio.sleep(_backoff(attempt))
            attempt += 1

    def _named_group(self, task_id: str) -> _NamedGroup:
        """The named watch ``task_id`` joins: the one being filled in this loop iteration."""
        group = self._filling
        if group is None or len(group.ids) >= MAX_IDS:
            group = self._filling = _NamedGroup()
            asyncio.get_running_loop().call_soon(self._start_group, group)
        group.ids.append(task_id)
        self._named[task_id] = group
        return group

    def _start_group(self, group: _NamedGroup) -> None:
        if self._filling is group:
            self._filling = None
        # Not "is OPENED": a fresh client opens its channel lazily, in _watch_named.
        if group.ended or self._state is ClientState.CLOSED:
            return
        group.task = self._spawn_named(group.ids)[0]

    def _end_group(self, group: _NamedGroup) -> None:
        """Nobody waits on the group any more: stop its watch and forget its open waits."""
        group.ended = True
        if self._filling is group:
            self._filling = None
        if group.task is not None:
            group.task.cancel()
        for tid in group.ids:
            if self._named.get(tid) is group:
                del self._named[tid]
                fut = self._waiters.get(tid)
                if fut is not None and not fut.done():
                    del self._waiters[tid]

    def _fail_waiters(self, error: BaseException, waiters: dict[str, asyncio.Future[Any]]) -> None:
        for tid, fut in waiters.items():
            if not fut.done():
                fut.set_exception(error)
                fut.exception()  # retrieved here: nobody may be waiting on it
                if self._waiters.get(tid) is fut:
                    self._keep(tid, 0)
        self._evict()

    async def _wait_settled(self, task_id: str, timeout: float | None) -> task_pb2.TaskUpdate:
        fut = self._waiters.get(task_id)
        if fut is not None and fut.done():
            self._consume(task_id, fut)
            return fut.result()
        if fut is None:
            # Not submitted here, already consumed, or its outcome was dropped: watch it by
            # name; the server sends its current state (with the result) first.
            self._ids_request([task_id])
            fut = self._waiters[task_id] = asyncio.get_running_loop().create_future()
            group: _NamedGroup | None = self._named_group(task_id)
        else:
            group = self._named.get(task_id)
        if group is not None:
            group.users += 1
        try:
            done, _ = await asyncio.wait((fut,), timeout=timeout)
            if not done:
                raise TimeoutError(f"task {task_id} did not settle within {timeout} s")
            self._consume(task_id, fut)
            return fut.result()
        finally:
            if group is not None:
                group.users -= 1
                if group.users == 0:
                    self._end_group(group)

    async def get_result(self, task_id: str, timeout: float | None = None) -> Any:
        """Wait for a task to settle; return its value or raise its error.

        Raises:
            RemoteError: the function raised; keeps the remote type, message, traceback.
            TaskFailedError: the task was cancelled, failed by the system, or skipped.
            TimeoutError: it did not settle within ``timeout`` seconds.
        """
        return outcome_of_update(await self._wait_settled(task_id, timeout))

    # -- reading and controlling ---------------------------------------------------

    async def get_task(self, task_id: str, *, history: bool = True) -> Task:
        """Read one task (with its transition history by default)."""
        return (await self.get_tasks([task_id], history=history))[0]

    async def get_tasks(self, task_ids: Iterable[str], *, history: bool = False) -> list[Task]:
        """Read tasks by id, in the order given (a repeated id gives the same task again)."""
        ids = self._ids_request(task_ids)
        distinct = list(dict.fromkeys(ids))
        # With history, the server answers at most MAX_HISTORY_TASKS tasks a request.
        page = _defaults.MAX_HISTORY_TASKS if history else max(1, len(distinct))
        by_id: dict[str, Task] = {}
        for lo in range(0, max(1, len(distinct)), page):  # one request even for none
            request = task_service_pb2.GetTasksRequest(
                task_ids=distinct[lo : lo + page], include_history=history
            )
            response = await self._unary("GetTasks", request)
            by_id.update((t.task_id, Task._from_proto(t)) for t in response.tasks)
        return [by_id[i] for i in ids]

    async def list_tasks(
        self,
        *,
        states: Iterable[TaskState | str] | None = None,
        endpoint: str | None = None,
        limit: int = 100,
    ) -> list[Task]:
        """List up to ``limit`` tasks, newest first, filtered by state and endpoint."""
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ValueError(f"limit must be a positive int, not {limit!r}")
        request = self._list_request(states, endpoint, min(limit, 1000))
        tasks: list[Task] = []
        while len(tasks) < limit:
            request.page_size = min(limit - len(tasks), 1000)
            response = await self._unary("ListTasks", request)
            tasks.extend(Task._from_proto(t) for t in response.tasks)
            if not response.next_page_token or not response.tasks:
                break
            request.page_token = response.next_page_token
        return tasks[:limit]

    async def _control(
        self, name: str, request_type: Any, task_ids: Iterable[str]
    ) -> list[TaskUpdate]:
        request = request_type(task_ids=self._ids_request(task_ids), request_id=new_request_id())
        response = await self._unary(name, request)
        return [TaskUpdate._from_proto(u) for u in response.updates]

    async def cancel(self, task_ids: Iterable[str]) -> list[TaskUpdate]:
        """Cancel pending tasks (a running task's worker is ended)."""
        return await self._control("CancelTasks", task_service_pb2.CancelTasksRequest, task_ids)

    async def hold(self, task_ids: Iterable[str]) -> list[TaskUpdate]:
        """Hold queued tasks: they are not dispatched until released."""
        return await self._control("HoldTasks", task_service_pb2.HoldTasksRequest, task_ids)

    async def release(self, task_ids: Iterable[str]) -> list[TaskUpdate]:
        """Release held tasks to the state they were held from."""
        return await self._control("ReleaseTasks", task_service_pb2.ReleaseTasksRequest, task_ids)

    async def retry(self, task_ids: Iterable[str]) -> list[TaskUpdate]:
        """Queue ERRORED tasks again with attempt+1; get_result then waits for the new outcome."""
        ids = self._ids_request(task_ids)
        updates = await self._control("RetryTasks", task_service_pb2.RetryTasksRequest, ids)
        for tid in ids:
            fut = self._waiters.get(tid)
            if fut is not None and fut.done():
                self._consume(tid, fut)  # the stored outcome is stale now
        return updates

    async def give_up(self, task_ids: Iterable[str]) -> list[TaskUpdate]:
        """Mark ERRORED tasks FAILED for good."""
        return await self._control("GiveUpTasks", task_service_pb2.GiveUpTasksRequest, task_ids)

    async def resubmit(self, task_ids: Iterable[str]) -> list[str]:
        """Create new tasks from FAILED or CANCELLED ones; return the new ids in order."""
        request = task_service_pb2.ResubmitTasksRequest(
            task_ids=self._ids_request(task_ids),
            session_id=self.session_id,
            request_id=new_request_id(),
        )
        self._open()
        await self._retrying(self._subscribe)
        epoch = self._watch_epoch
        self._submits_in_flight += 1
        try:
            ids = list((await self._unary("ResubmitTasks", request)).task_ids)
            self._track(ids, epoch)
        finally:
            self._submits_in_flight -= 1
            if not self._submits_in_flight:
                self._early.clear()
        return ids

    async def list_endpoints(self) -> list[EndpointInfo]:
        """List every endpoint the caller may use, by name, with its agents and queue
        length (read in pages: each call costs the server a bounded time)."""
        request = task_service_pb2.ListEndpointsRequest(page_size=1000)
        endpoints: list[EndpointInfo] = []
        while True:
            response = await self._unary("ListEndpoints", request)
            endpoints.extend(EndpointInfo._from_proto(e) for e in response.endpoints)
            if not response.next_page_token or not response.endpoints:
                break
            request.page_token = response.next_page_token
        endpoints.sort(key=lambda e: (e.name, e.id))
        return endpoints

    async def stats(self) -> Stats:
        """Task counts by state, endpoints and agents online, transitions so far."""
        return Stats._from_proto(await self._unary("GetStats", task_service_pb2.GetStatsRequest()))

    # -- groups ----------------------------------------------------------------------

    async def submit_group(self, group: Group, *, endpoint: str | None = None) -> str:
        """Submit a group in one call, validated whole and stored atomically; return its id.

        Args:
            group: the group.
            endpoint: where its tasks run when the group names no endpoint of its own.

        Raises:
            InvalidArgumentError: the group can't run (a cycle, an unknown or duplicate
                name, a bad ``when``...); the message names the culprit; nothing is stored.
            SerializationError: a function can't be pickled (nothing sent).
        """
        request, functions = self._group_request(group, endpoint)
        self._open()
        await self._retrying(self._subscribe)
        await self._register(functions)
        fids = {spec.function_id for spec in (*request.tasks, *request.finally_tasks)}
        epoch = self._watch_epoch
        self._submits_in_flight += 1
        try:
            response = await self._unary_registering("SubmitGroup", request, fids, functions)
            # Its tasks settle to this session like submitted ones: get_result is at hand.
            self._track(response.task_ids, epoch)
        finally:
            self._submits_in_flight -= 1
            if not self._submits_in_flight:
                self._early.clear()
        return response.group_id

    async def get_group(self, group_id: str, *, history: bool = False) -> GroupInfo:
        """Read a group with its tasks (each task's transitions too with ``history``)."""
        request = task_service_pb2.GetGroupRequest(
            group_id=self._group_id(group_id), include_history=history
        )
        return GroupInfo._from_proto((await self._unary("GetGroup", request)).group)

    async def wait_group(self, group_id: str, timeout: float | None = None) -> GroupInfo:
        """Wait until no task of the group (finally tasks included) is pending; return it.

        Raises:
            TimeoutError: it did not settle within ``timeout`` seconds.
            NotFoundError: no such group (or not yours).
        """
        self._group_id(group_id)
        try:
            async with asyncio.timeout(timeout):
                await self._watch_group(group_id)
        except builtins.TimeoutError:
            raise TimeoutError(f"group {group_id} did not settle within {timeout} s") from None
        return await self.get_group(group_id)

    async def _watch_group(self, group_id: str) -> None:
        """Return once a watch of the group says it is no longer pending.

        The server's first message carries the group's current status, so nothing is
        missed; a broken stream is reopened with backoff, as named watches are.
        """
        stub = self._open()
        request = task_service_pb2.WatchTasksRequest(group_ids=[group_id], settled_only=True)
        attempt = 0
        while True:
            if self._state is ClientState.CLOSED:
                raise HeartlineError("the client was closed")
            call = stub.WatchTasks(request, metadata=self._metadata)
            try:
                while True:
                    response = await call.read()
                    if response is grpc.aio.EOF:
                        break
                    self._reached = True
                    attempt = 0
                    for update in response.groups:
                        if update.group_id == group_id and not update.pending:
                            return
            except grpc.aio.AioRpcError as err:
                error = self._rpc_error(err)
                if (
                    err.code() in _FATAL_WATCH_CODES
                    or tls_failure(error.details)
                    or await self._nobody_there(error.details)
                ):
                    raise error from err
            finally:
                call.cancel()
            await asyncio.sleep(_backoff(attempt))
            attempt += 1

    async def list_groups(self, pending_only: bool = False, limit: int = 100) -> list[GroupInfo]:
        """List up to ``limit`` groups, newest first, without their tasks."""
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ValueError(f"limit must be a positive int, not {limit!r}")
        request = task_service_pb2.ListGroupsRequest(pending_only=bool(pending_only))
        groups: list[GroupInfo] = []
        while len(groups) < limit:
            request.page_size = min(limit - len(groups), 1000)
            response = await self._unary("ListGroups", request)
            groups.extend(GroupInfo._from_proto(g) for g in response.groups)
            if not response.next_page_token or not response.groups:
                break
            request.page_token = response.next_page_token
        return groups[:limit]

    async def cancel_group(self, group_id: str, mode: str | CancelMode = "cancel") -> GroupInfo:
        """Cancel or stop a group; return it as it is right after.

        Args:
            mode: ``"cancel"`` (cancel everything pending or running; finally tasks do not
                run), ``"cancel_run_finally"`` (cancel the DAG tasks, then run the finally
                tasks) or ``"stop_run_finally"`` (start no new DAG task, let running ones
                finish, then run the finally tasks).

        Raises:
            InvalidArgumentError: an unknown mode.
            FailedPreconditionError: the group has settled already.
        """
        try:
            wire_mode = CancelMode(mode)._to_proto()
        except ValueError:
            raise InvalidArgumentError(
                f"mode must be one of {', '.join(repr(m.value) for m in CancelMode)}, not {mode!r}"
            ) from None
        request = task_service_pb2.CancelGroupRequest(
            group_id=self._group_id(group_id), mode=wire_mode, request_id=new_request_id()
        )
        return GroupInfo._from_proto((await self._unary("CancelGroup", request)).group)
