"""The endpoint agent: one Connect stream to the server, feeding a local worker pool.

The stream protocol is docs/ARCHITECTURE.md "The agent stream". Per task the agent
reports, in order: WAITING_FOR_NODES (received and queued here), WAITING_FOR_LAUNCH
(handed to a worker), RUNNING (the worker started it), then one terminal report,
SUCCEEDED or ERRORED. A task refused before it reaches a worker (function not allowed
or unknown) goes from WAITING_FOR_NODES straight to ERRORED; a function, arguments or
inputs (the results of the tasks it takes as inputs, sent with its Dispatch and kept
with its Job) that cannot be unpickled go from WAITING_FOR_LAUNCH straight to ERRORED.
A terminal report of an attempt that reached a worker carries the tail of what it wrote to
its stdout and stderr (the server's ``max_output_bytes`` of each, from the welcome).

Every change is appended to an outbox and one sender coroutine drains it: whatever was
produced while the sender slept (at least one loop iteration, more under load while a
write is in flight) goes up as one StatusBatch. Nothing waits on a timer.
"""

from __future__ import annotations

import asyncio
import enum
import importlib.metadata
import logging
import os
import random
import signal
import socket
import sys
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import cloudpickle
import grpc

from heartline import _defaults, _forms
from heartline._channel import AddressError, open_channel, same_servers, server_target, several
from heartline._errors import HeartlineError, rpc_error_from_grpc, tls_failure
from heartline._lru import LruCache
from heartline._pacer import Pacer
from heartline._states import TaskState
from heartline._tls import channel_credentials, describe
from heartline._watchdog import watch_loop
from heartline.endpoint._config import AgentConfig, Identity
from heartline.endpoint._engine import Engine, EngineListener
from heartline.endpoint._outbox import Outbox
from heartline.endpoint._workers import Job, Outcome, WorkerPool
from heartline.v1 import endpoint_service_pb2 as pb
from heartline.v1 import endpoint_service_pb2_grpc as pb_grpc
from heartline.v1 import task_pb2

if TYPE_CHECKING:
    from heartline._metrics import MetricsServer

logger = logging.getLogger("heartline.endpoint")

_NODES = task_pb2.TASK_STATE_WAITING_FOR_NODES
_LAUNCH = task_pb2.TASK_STATE_WAITING_FOR_LAUNCH
_RUNNING = task_pb2.TASK_STATE_RUNNING
_SUCCEEDED = task_pb2.TASK_STATE_SUCCEEDED
_ERRORED = task_pb2.TASK_STATE_ERRORED

# Keep each upstream message well under a server's default 4 MiB receive limit; a
# single update bigger than this still goes alone.
_MAX_BATCH_BYTES = 3 * 1024 * 1024
# What an update weighs in a message beyond its result and error text (overestimated).
_PROGRESS_WEIGHT = 64
# Error text a task produced is cut to this many characters; a runaway message must
# not push the stream over the server's message limit.
_MAX_ERROR_TEXT = 64 * 1024
_REGISTER_TIMEOUT = 30.0
_CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", -1),
    ("grpc.max_send_message_length", -1),
]
_WELCOME_TIMEOUT = 30.0
"""Seconds from opening a stream to the server's welcome, after which it is opened again."""
# Errors that waiting will not fix: the agent stops and says why.
_FATAL_CODES = frozenset({grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED})


class AgentState(enum.Enum):
    """Where an agent is in its life."""

    NEW = "new"
    CONNECTING = "connecting"  # no stream yet, or between streams (backing off)
    CONNECTED = "connected"  # welcome received; dispatches flow
    STOPPING = "stopping"
    STOPPED = "stopped"


@dataclass(slots=True)
class _Held:
    """A task the agent holds: the attempt it runs and the last state reported."""

    attempt: int
    state: int


_Progress = tuple[str, int, int]
"""A progress report waiting to go up: (task_id, attempt, state)."""


class _StreamLost(Exception):
    """The stream ended; the agent reconnects."""


class _Reregister(Exception):
    """The server does not know our endpoint id; register again without backing off."""


def _make_engine(config: AgentConfig, listener: EngineListener) -> Engine:
    """The engine ``config.executor`` names; the Dask one is imported only when asked
    for (an optional extra, and a second to import)."""
    if config.executor == "dask":
        from heartline.endpoint._dask import DaskEngine

        return DaskEngine(listener, config.dask_scheduler, local_workers=config.workers)
    return WorkerPool(config.workers, listener, endpoint_name=config.name)


class Agent:
    """An endpoint agent: registers, holds the Connect stream, runs tasks on workers.

    Args:
        config: How to run.
    """

    def __init__(self, config: AgentConfig) -> None:
        self._config = config
        self._agent_id = str(uuid.uuid4())
        self._state = AgentState.NEW
        self._engine: Engine = _make_engine(config, self)
        # The engine's capacity moved since the last hello or Capacity message.
        self._capacity_due = False
        self._identity: Identity | None = None
        # Pickled functions by id, least recently used out first. A Dispatch carries the
        # function only when the server does not count on us holding it; it counts on
        # no more than it may (server/_core.py AgentConnection._sent_functions), as
        # long as _on_dispatch uses this cache once per dispatch item, in stream order.
        self._functions: LruCache[str, bytes] = LruCache(*_defaults.AGENT_FUNCTION_CACHE)
        self._held: dict[str, _Held] = {}
        self._unacked: dict[tuple[str, int], pb.StatusUpdate] = {}
        # The same reports on disk, so a result outlives this process (see _outbox.py).
        self._disk = Outbox(config.endpoint_dir, self._agent_id)
        # Reports not sent yet, in order: a progress report as (task_id, attempt, state),
        # built into the message only when it goes; a terminal report as its StatusUpdate.
        self._outbox: list[_Progress | pb.StatusUpdate] = []
        # Terminal reports made in this loop iteration, appended to the disk log in one
        # write at its end (or before they go up, whichever comes first).
        self._to_disk: list[pb.StatusUpdate] = []
        self._heartbeat_due = False
        # Terminal reports are urgent; progress reports (queued, launched, running) are
        # lazy, so a short task's whole story goes up in one message (see _pacer.py).
        self._pacer = Pacer()
        self._stop_requested = asyncio.Event()
        self._stopped = asyncio.Event()
        self._fatal: HeartlineError | None = None
        self._failures = 0
        # The server's payload limit from the last welcome; 0 means none was given.
        self._max_payload = 0
        self._heartbeat_interval = _defaults.HEARTBEAT_INTERVAL
        """Seconds between heartbeats: the welcome's, or a later Settings message's."""
        # Terminal reports made, by wire state (metrics).
        self._finished: dict[int, int] = {}
        self._metrics: MetricsServer | None = None
        # The channel's TLS credentials, read from config.tls's files when run() starts.
        self._credentials: grpc.ChannelCredentials | None = None

    @property
    def agent_id(self) -> str:
        """This agent process's id (a fresh uuid4)."""
        return self._agent_id

    @property
    def endpoint_id(self) -> str | None:
        """The endpoint's id once registered."""
        return self._identity.endpoint_id if self._identity else None

    @property
    def config(self) -> AgentConfig:
        return self._config

    @property
    def state(self) -> AgentState:
        return self._state

    # -- figures for metrics (read on the agent's event loop) --------------------------

    @property
    def engine(self) -> Engine:
        """What runs this agent's tasks (worker processes, or a Dask cluster)."""
        return self._engine

    def held_by_state(self) -> dict[TaskState, int]:
        """Tasks held here (not yet finished), by the last state reported for each."""
        counts = dict.fromkeys(map(TaskState._from_proto, (_NODES, _LAUNCH, _RUNNING)), 0)
        for held in self._held.values():
            state = TaskState._from_proto(held.state)
            counts[state] = counts.get(state, 0) + 1
        return counts

    def finished_by_state(self) -> dict[TaskState, int]:
        """Terminal reports this agent made (SUCCEEDED or ERRORED) since it started."""
        counts = dict.fromkeys(map(TaskState._from_proto, (_SUCCEEDED, _ERRORED)), 0)
        counts.update((TaskState._from_proto(s), n) for s, n in self._finished.items())
        return counts

    @property
    def unacked_reports(self) -> int:
        """Terminal reports kept (in memory and in the outbox log) until the server acks them."""
        return len(self._unacked)

    @property
    def metrics_address(self) -> str | None:
        """The bound ``HOST:PORT`` of the metrics endpoint, or None without one."""
        return self._metrics.address if self._metrics is not None else None

    async def run(self, *, ready: asyncio.Event | None = None) -> None:
        """Serve until :meth:`stop` or cancellation.

        Args:
            ready: Set each time the server welcomes the agent.

        Raises:
            HeartlineError: The server refused the agent's credentials, its TLS
                certificate is not trusted, a TLS file of ``config.tls`` can't be read,
                or the metrics address (``config.metrics``) cannot be bound.
        """
        if self._state is not AgentState.NEW:
            raise RuntimeError(f"an agent runs once; this one is {self._state.value}")
        try:
            self._credentials = channel_credentials(self._config.tls)
        except HeartlineError:
            self._state = AgentState.STOPPED
            self._stopped.set()
            raise
        self._start_metrics()
        self._state = AgentState.CONNECTING
        self._unacked.update(self._disk.open())
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._engine.run())
                link = tg.create_task(self._link(ready))
                watchdog = tg.create_task(watch_loop())
                await self._stop_requested.wait()
                self._state = AgentState.STOPPING
                link.cancel()
                watchdog.cancel()
                self._engine.close()
        finally:
            self._state = AgentState.STOPPED
            self._engine.close()
            self._flush_disk()
            self._disk.close(keep=bool(self._unacked))
            try:
                if self._metrics is not None:
                    await self._metrics.stop()
            finally:
                self._stopped.set()
        if self._fatal is not None:
            raise self._fatal

    def _start_metrics(self) -> None:
        """Serve metrics if asked.

        Raises:
            MetricsError: The address cannot be bound; the agent did not start.
        """
        if self._config.metrics is None:
            return
        from heartline._metrics import MetricsError, MetricsServer
        from heartline.endpoint._metrics import AgentCollector

        try:
            collector = AgentCollector(self, asyncio.get_running_loop())
            self._metrics = MetricsServer.start(self._config.metrics, collector)
        except MetricsError:
            self._state = AgentState.STOPPED
            self._stopped.set()
            raise

    async def stop(self) -> None:
        """Stop taking work, kill the workers and close the stream; wait until done."""
        if self._state is AgentState.NEW:
            self._state = AgentState.STOPPED
            self._stopped.set()
        self._stop_requested.set()
        await self._stopped.wait()

    # -- the link: registration, stream, reconnects -----------------------------------

    async def _link(self, ready: asyncio.Event | None) -> None:
        while True:
            try:
                await self._session(ready)
                reason = "the server closed the stream"
            except _Reregister:
                continue
            except grpc.aio.AioRpcError as err:
                # A server certificate not trusted (or for another host, or no TLS at all)
                # stays so: like a refused token, waiting will not fix it.
                if err.code() in _FATAL_CODES or tls_failure(err.details() or ""):
                    self._fatal = rpc_error_from_grpc(err, self._config.server, tls=self._uses_tls)
                    logger.error(
                        "event=refused server=%s error=%s", self._config.server, self._fatal
                    )
                    self._stop_requested.set()
                    return
                reason = str(rpc_error_from_grpc(err, self._config.server, tls=self._uses_tls))
            except (_StreamLost, AddressError) as exc:
                # A list's host that does not resolve (now) is waited out, as gRPC's own
                # lookup failure of one address is: DNS may come back.
                reason = str(exc)
            except Exception as exc:
                logger.exception("event=stream-error server=%s", self._config.server)
                reason = repr(exc)
            if self._stop_requested.is_set():
                return  # stopping: whatever ended the session, there is no reconnecting
            was_connected = self._state is AgentState.CONNECTED
            self._state = AgentState.CONNECTING
            cap = min(self._config.reconnect_max, self._config.reconnect_min * 2**self._failures)
            delay = random.uniform(0, cap)  # full jitter
            self._failures = min(self._failures + 1, 60)
            if was_connected or self._failures == 1:
                logger.warning(
                    "event=disconnected server=%s reason=%r retry_in=%.2fs held=%d unacked=%d",
                    self._config.server,
                    reason,
                    delay,
                    len(self._held),
                    len(self._unacked),
                )
            else:
                logger.debug("event=reconnect-failed reason=%r retry_in=%.2fs", reason, delay)
            await asyncio.sleep(delay)

    def _metadata(self) -> tuple[tuple[str, str], ...] | None:
        # Resolved again at each (re)connect: a token given as None still finds the
        # token file a server wrote since (`heartline up` starts its agent that way).
        return _defaults.bearer_metadata(_defaults.token(self._config.token))

    @property
    def _uses_tls(self) -> bool:
        return self._config.tls is not None

    async def _channel(self) -> grpc.aio.Channel:
        """A channel to the server, or to whichever server of a list is active.

        Raises:
            AddressError: a host of the list does not resolve.
        """
        server = self._config.server
        if several(server):
            # Looked up again at each connect (a name may have moved), off the loop.
            return open_channel(
                await asyncio.to_thread(server_target, server), self._credentials, _CHANNEL_OPTIONS
            )
        return open_channel(server, self._credentials, _CHANNEL_OPTIONS)

    async def _register(self, stub: pb_grpc.EndpointServiceStub) -> tuple[Identity, bool]:
        """The endpoint's identity, and whether it was registered just now."""
        if self._identity is not None:
            return self._identity, False
        cfg = self._config
        path = cfg.endpoint_dir / "endpoint.json"
        known = Identity.load(path)
        # Any order of the same list is the same servers, so the same store.
        if known is not None and known.name == cfg.name and same_servers(known.server, cfg.server):
            self._identity = known
            return known, False
        reply = await stub.RegisterEndpoint(
            pb.RegisterEndpointRequest(name=cfg.name),
            metadata=self._metadata(),
            timeout=_REGISTER_TIMEOUT,
        )
        self._identity = Identity(reply.endpoint_id, reply.name or cfg.name, cfg.server)
        self._identity.save(path)
        logger.info("event=registered endpoint_id=%s name=%s", reply.endpoint_id, cfg.name)
        return self._identity, True

    def _forget_identity(self) -> None:
        self._identity = None
        (self._config.endpoint_dir / "endpoint.json").unlink(missing_ok=True)

    async def _session(self, ready: asyncio.Event | None) -> None:
        """One connection: hello, welcome, then stream until it breaks."""
        async with await self._channel() as channel:
            stub = pb_grpc.EndpointServiceStub(channel)
            identity, fresh = await self._register(stub)
            call = stub.Connect(metadata=self._metadata())
            try:
                # Snapshot without awaiting: every change after this point is in the
                # outbox, every one before it is in the hello or the resent reports.
                hello = self._hello(identity)
                self._flush_disk()
                resend = list(self._unacked.values())
                self._outbox.clear()
                try:
                    # Bounded: a stream that opened but never carries the hello, or never
                    # brings the welcome, is one to open again, not to wait on for ever
                    # (seen once in ~1,000 with 1,500 channels connecting at once).
                    async with asyncio.timeout(_WELCOME_TIMEOUT):
                        await call.write(pb.ConnectRequest(hello=hello))
                        for message in _messages(resend):
                            await call.write(message)
                        first = await call.read()
                except TimeoutError:
                    raise _StreamLost(
                        f"no welcome within {_WELCOME_TIMEOUT:g}s of the hello"
                    ) from None
                except grpc.aio.AioRpcError as err:
                    if err.code() is not grpc.StatusCode.NOT_FOUND:
                        raise
                    # The server forgot the endpoint (e.g. a new store): register again.
                    logger.warning("event=endpoint-unknown endpoint_id=%s", identity.endpoint_id)
                    self._forget_identity()
                    if fresh:
                        raise
                    raise _Reregister from err
                if first is grpc.aio.EOF or first.WhichOneof("message") != "welcome":
                    raise _StreamLost("the server did not answer the hello with a welcome")
                interval = first.welcome.heartbeat_interval_seconds
                if not interval > 0:
                    interval = _defaults.HEARTBEAT_INTERVAL
                self._heartbeat_interval = interval
                self._max_payload = max(0, first.welcome.max_payload_bytes)
                if first.welcome.HasField("max_output_bytes"):
                    self._engine.max_output = max(0, first.welcome.max_output_bytes)
                self._state = AgentState.CONNECTED
                self._failures = 0
                logger.info(
                    "event=connected endpoint_id=%s agent_id=%s server=%s heartbeat=%gs held=%d resent=%d",
                    identity.endpoint_id,
                    self._agent_id,
                    self._config.server,
                    interval,
                    len(hello.held_tasks),
                    len(resend),
                )
                if ready is not None:
                    ready.set()
                try:
                    async with asyncio.TaskGroup() as tg:
                        tg.create_task(self._send_loop(call))
                        tg.create_task(self._heartbeat_loop())
                        await self._receive_loop(call)
                except BaseExceptionGroup as group:
                    raise _session_error(group) from None
            finally:
                call.cancel()

    def _hello(self, identity: Identity) -> pb.Hello:
        return pb.Hello(
            endpoint_id=identity.endpoint_id,
            agent_id=self._agent_id,
            version=_VERSION,
            # Which function payloads its workers can load (heartline/_forms.py).
            python_version=_forms.PYTHON,
            cloudpickle_version=cloudpickle.__version__,
            capacity=self._hello_capacity(),
            prefetch=self._config.effective_prefetch,
            held_tasks=[
                pb.HeldTask(task_id=task_id, attempt=held.attempt, state=held.state)
                for task_id, held in self._held.items()
            ]
            # A finished attempt whose report was never acked is still ours: the server
            # takes it back as running, then the resent report settles it.
            + [
                pb.HeldTask(task_id=task_id, attempt=attempt, state=_RUNNING)
                for task_id, attempt in self._unacked
            ],
            hostname=socket.gethostname(),
            allowed_functions=(
                None
                if self._config.allowed_functions is None
                else pb.AllowedFunctions(function_ids=sorted(self._config.allowed_functions))
            ),
        )

    def _hello_capacity(self) -> int:
        self._capacity_due = False  # the hello says it
        return self._engine.capacity

    async def _send_loop(self, call: grpc.aio.StreamStreamCall) -> None:
        # The only writer of the stream once the hello is out (grpc allows one write
        # in flight); while a write is in flight the outbox fills and goes up next.
        while True:
            await self._pacer.wait()
            if self._capacity_due:
                self._capacity_due = False
                capacity = pb.Capacity(capacity=self._engine.capacity)
                await _write(call, pb.ConnectRequest(capacity=capacity))
            if self._outbox:
                self._flush_disk()  # a report is on disk before it can be acked
                updates, self._outbox = self._outbox, []
                self._heartbeat_due = False
                for message in _messages(updates):
                    await _write(call, message)
            elif self._heartbeat_due:
                self._heartbeat_due = False
                await _write(call, pb.ConnectRequest(heartbeat=pb.Heartbeat()))

    async def _heartbeat_loop(self) -> None:
        while True:
            # Read each time: a Settings message may have changed it.
            await asyncio.sleep(self._heartbeat_interval)
            self._heartbeat_due = True
            self._pacer.urgent()

    async def _receive_loop(self, call: grpc.aio.StreamStreamCall) -> None:
        while True:
            message = await call.read()
            if message is grpc.aio.EOF:
                raise _StreamLost("the server closed the stream")
            kind = message.WhichOneof("message")
            if kind == "dispatch":
                self._on_dispatch(message.dispatch.dispatches)
            elif kind == "cancel":
                self._on_cancel(message.cancel.task_ids)
            elif kind == "ack":
                keys = [(ack.task_id, ack.attempt) for ack in message.ack.acks]
                for key in keys:
                    self._unacked.pop(key, None)
                self._disk.ack(keys, self._unacked)
            elif kind == "settings":
                interval = message.settings.heartbeat_interval_seconds
                if interval > 0:
                    logger.info("event=heartbeat-interval seconds=%g", interval)
                    self._heartbeat_interval = interval
            else:
                logger.debug("event=ignored-message kind=%s", kind)

    # -- downstream -------------------------------------------------------------------

    def _on_dispatch(self, dispatches: Sequence[pb.Dispatch]) -> None:
        allowed = self._config.allowed_functions
        for d in dispatches:
            # One use of the cache per item, in order, before anything may skip the
            # item (a duplicate, a refusal): the server's picture of this cache replays
            # exactly these uses, and must never count on an id this cache dropped.
            function: bytes | None = d.function
            if function:
                self._functions.put(d.function_id, function, len(function))
            else:
                function = self._functions.get(d.function_id)
            held = self._held.get(d.task_id)
            if held is not None:
                if held.attempt >= d.attempt:
                    continue  # already ours (e.g. dispatched again after a reconnect)
                # A newer attempt supersedes the one running here.
                self._engine.cancel(d.task_id)
                del self._held[d.task_id]
            if (d.task_id, d.attempt) in self._unacked:
                continue  # already finished; the report is on its way
            self._held[d.task_id] = _Held(d.attempt, _NODES)
            self._report((d.task_id, d.attempt, _NODES), urgent=False)
            if allowed is not None and d.function_id not in allowed:
                self._refuse(
                    d,
                    "PermissionError",
                    f"function {d.function_id} is not allowed on endpoint "
                    f"{self._config.name!r}; the task was not run",
                )
            elif function is None:
                self._refuse(
                    d,
                    "LookupError",
                    f"function {d.function_id} was never sent to this agent; the task was not run",
                )
            elif self._state is not AgentState.STOPPING:
                inputs = d.inputs
                self._engine.submit(
                    Job(
                        d.task_id,
                        d.attempt,
                        d.function_id,
                        function,
                        d.args,
                        d.walltime_seconds,
                        inputs=tuple(inputs) if inputs else (),
                    )
                )

    def _refuse(self, d: pb.Dispatch, type_name: str, message: str) -> None:
        logger.info("event=task-refused task_id=%s reason=%r", d.task_id, message)
        error = task_pb2.RemoteError(type_name=type_name, message=message)
        self._finish(
            pb.StatusUpdate(task_id=d.task_id, attempt=d.attempt, state=_ERRORED, error=error)
        )

    def _on_cancel(self, task_ids: Sequence[str]) -> None:
        for task_id in task_ids:
            if self._held.pop(task_id, None) is not None:
                self._engine.cancel(task_id)

    # -- the engine's listener ----------------------------------------------------------

    def capacity_changed(self, capacity: int) -> None:
        logger.info("event=capacity-changed capacity=%d", capacity)
        self._capacity_due = True
        self._pacer.urgent()

    def task_launched(self, job: Job) -> None:
        self._advance(job, _LAUNCH)

    def task_started(self, job: Job) -> None:
        self._advance(job, _RUNNING)

    def task_finished(self, job: Job, outcome: Outcome) -> None:
        held = self._held.get(job.task_id)
        if held is None or held.attempt != job.attempt:
            return
        size = len(outcome.result)
        if outcome.failure is None and (not self._max_payload or size <= self._max_payload):
            update = pb.StatusUpdate(
                task_id=job.task_id, attempt=job.attempt, state=_SUCCEEDED, result=outcome.result
            )
        elif outcome.failure is None:
            # The server would refuse the message; say why instead of sending it.
            error = task_pb2.RemoteError(
                type_name="heartline.ResultTooLarge",
                message=f"the result is {size} bytes, over the payload limit of "
                f"{self._max_payload} bytes",
                failure_kind=task_pb2.FAILURE_KIND_SERIALIZATION,
            )
            update = pb.StatusUpdate(
                task_id=job.task_id, attempt=job.attempt, state=_ERRORED, error=error
            )
        else:
            f = outcome.failure
            error = task_pb2.RemoteError(
                type_name=f.type_name[:_MAX_ERROR_TEXT],
                message=_clip(f.message),
                traceback=_clip(f.traceback),
                failure_kind=int(f.kind),
            )
            update = pb.StatusUpdate(
                task_id=job.task_id, attempt=job.attempt, state=_ERRORED, error=error
            )
        if outcome.stdout:
            update.stdout = outcome.stdout
        if outcome.stderr:
            update.stderr = outcome.stderr
        self._finish(update)

    # -- upstream -----------------------------------------------------------------------

    def _advance(self, job: Job, state: int) -> None:
        held = self._held.get(job.task_id)
        if held is None or held.attempt != job.attempt:
            return
        held.state = state
        self._report((job.task_id, job.attempt, state), urgent=False)

    def _finish(self, update: pb.StatusUpdate) -> None:
        self._held.pop(update.task_id, None)
        self._finished[update.state] = self._finished.get(update.state, 0) + 1
        # Kept, on disk too, and resent on every reconnect, until the server acks it:
        # written here, not when sent, so a result that finishes while the server is
        # away outlives this process as well.
        self._unacked[(update.task_id, update.attempt)] = update
        if not self._to_disk:
            asyncio.get_running_loop().call_soon(self._flush_disk)
        self._to_disk.append(update)
        self._report(update)

    def _flush_disk(self) -> None:
        """Append the terminal reports made since the last flush to the log, in one write.

        Run at the end of the loop iteration that made them, so a result outlives this
        process about as soon as it exists (also while the server is away), and before
        any of them is sent, so none can be acked (and its log record dropped) first.
        """
        if self._to_disk:
            updates, self._to_disk = self._to_disk, []
            self._disk.add(updates)

    def _report(self, update: _Progress | pb.StatusUpdate, *, urgent: bool = True) -> None:
        self._outbox.append(update)
        if urgent:
            self._pacer.urgent()
        else:
            self._pacer.lazy()


async def _write(call: grpc.aio.StreamStreamCall, message: pb.ConnectRequest) -> None:
    try:
        await call.write(message)
    except asyncio.InvalidStateError as exc:
        # grpc's way of saying the server already ended the call: an ordinary
        # disconnect (e.g. it declared us lost), not a bug.
        raise _StreamLost("the server ended the stream") from exc


def _messages(updates: Sequence[_Progress | pb.StatusUpdate]) -> list[pb.ConnectRequest]:
    """StatusBatch messages of the updates, in order, of at most about _MAX_BATCH_BYTES each."""
    messages: list[pb.ConnectRequest] = []
    message = pb.ConnectRequest()
    add = message.status.updates.add
    append = message.status.updates.append
    count = size = 0
    for update in updates:
        if type(update) is tuple:
            weight = _PROGRESS_WEIGHT
        else:
            error = update.error
            weight = (
                _PROGRESS_WEIGHT
                + len(update.result)
                + len(error.traceback)
                + len(error.message)
                + len(update.stdout)
                + len(update.stderr)
            )
        if count and size + weight > _MAX_BATCH_BYTES:
            messages.append(message)
            message = pb.ConnectRequest()
            add = message.status.updates.add
            append = message.status.updates.append
            count = size = 0
        if type(update) is tuple:
            # Built in place: a third of the cost of a StatusUpdate copied in.
            task_id, attempt, state = update
            add(task_id=task_id, attempt=attempt, state=state)
        else:
            append(update)
        count += 1
        size += weight
    if count:
        messages.append(message)
    return messages


def _clip(text: str) -> str:
    if len(text) <= _MAX_ERROR_TEXT:
        return text
    half = _MAX_ERROR_TEXT // 2
    return f"{text[:half]}\n... [{len(text) - 2 * half} characters cut] ...\n{text[-half:]}"


def _session_error(group: BaseExceptionGroup) -> BaseException:
    """What a session's task group ended with, to raise in its place.

    A cancellation of the session (the agent stopping) that lands while a child fails
    (the stream broke: when `heartline up` is killed, its server and the agent's lifeline
    go at once) comes out of the group as that child's error. It stays a cancellation:
    raised as the stream's error, the link would take it for a lost connection and try
    to reconnect, for ever, while the agent waits for it to stop.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        return asyncio.CancelledError()
    return _first_error(group)


def _first_error(group: BaseExceptionGroup) -> BaseException:
    """The exception that ended a session's task group (not the cancellations it caused)."""
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            return _first_error(exc)
        if not isinstance(exc, asyncio.CancelledError):
            return exc
    return group


def _version() -> str:
    try:
        return importlib.metadata.version("heartline")
    except importlib.metadata.PackageNotFoundError:
        return "0.1.0"


_VERSION = _version()


def run_agent(config: AgentConfig, *, stop_with_fd: int | None = None) -> int:
    """Run an agent in the foreground until SIGINT or SIGTERM (for the CLI).

    Prints one line to stderr once connected; logs go through :mod:`logging` (level
    from ``$HEARTLINE_LOG_LEVEL``, default WARNING, unless logging is already set up).

    Args:
        stop_with_fd: The read end of a pipe whose write end the parent holds
            (``heartline up``): when it closes, because the parent ended in any way,
            SIGKILL included, the agent stops as on SIGTERM.

    Returns:
        The process exit code: 0 after a clean stop, 1 if the server refused the agent.
    """
    _configure_logging()
    loop_factory = None
    try:
        import uvloop

        loop_factory = uvloop.new_event_loop
    except ImportError:  # uvloop is optional where it does not build (Windows)
        pass
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        return runner.run(_serve_foreground(config, stop_with_fd))


async def _serve_foreground(config: AgentConfig, stop_with_fd: int | None = None) -> int:
    agent = Agent(config)
    ready = asyncio.Event()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    if stop_with_fd is not None:

        def parent_gone() -> None:
            # Readable means end of file: nobody ever writes to this pipe.
            loop.remove_reader(stop_with_fd)
            logger.warning("event=parent-gone: stopping")
            stop.set()

        loop.add_reader(stop_with_fd, parent_gone)

    async def stop_on_signal() -> None:
        await stop.wait()
        await agent.stop()

    async def announce() -> None:
        await ready.wait()
        over = "" if config.tls is None else f" over {describe(config.tls)}"
        # --workers sizes a Dask agent only through a LocalCluster it starts.
        if config.executor == "process":
            runs_on = f"with {config.workers} workers"
        elif config.dask_scheduler is None:
            runs_on = f"on a Dask LocalCluster of {config.workers} workers"
        else:
            runs_on = f"on the Dask cluster at {config.dask_scheduler}"
        print(
            f"heartline endpoint {config.name!r} (id {agent.endpoint_id}) connected to "
            f"{config.server}{over} {runs_on}",
            file=sys.stderr,
            flush=True,
        )

    try:
        async with asyncio.TaskGroup() as tg:
            helpers = [tg.create_task(stop_on_signal()), tg.create_task(announce())]
            try:
                await agent.run(ready=ready)
                code = 0
            except HeartlineError as exc:
                print(f"heartline endpoint {config.name!r}: {exc}", file=sys.stderr, flush=True)
                code = 1
            finally:
                for helper in helpers:
                    helper.cancel()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        if stop_with_fd is not None:
            loop.remove_reader(stop_with_fd)
    return code


def _configure_logging() -> None:
    root = logging.getLogger()
    if root.handlers:
        return
    level = os.environ.get("HEARTLINE_LOG_LEVEL", "WARNING").upper()
    logging.basicConfig(
        level=level if level in logging.getLevelNamesMapping() else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
