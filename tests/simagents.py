"""Simulated endpoint agents: thousands of ``Connect`` streams on one event loop.

Each simulated agent speaks the stream protocol as ``endpoint/_agent.py`` does, without
workers: a hello (a fresh agent id, the real agent's version, Python and cloudpickle
fields, ``capacity`` and ``prefetch``), the welcome, heartbeats at the welcome's interval
(the first one at a random point of the first interval, so thousands of agents do not
beat in step), and for each DispatchBatch one StatusBatch back that tells each task's
story as a quick task's first report does: RUNNING, then SUCCEEDED with a cloudpickled
result (the task's first positional argument, so a no-op ``f(i) -> i`` gets its real
answer back; None when there is none), at once or, with a task time, that long after
the batch came. Acks are ignored: nothing is kept to resend. A cancel is answered as the
real agent answers it: the task is not reported, and nothing is said. A stream that
breaks on its own is opened again with the agent's id after a jittered backoff, as the
real agent does, and counted.

Agents share channels (``per_channel`` streams on each), each channel its own TCP
connection: ``grpc.use_local_subchannel_pool`` keeps gRPC from sharing one subchannel
between channels with equal arguments. With ``per_channel=1`` every agent has its own.

Run as a process (all agents on one loop, uvloop when installed)::

    python -m tests.simagents --server ADDR --token TOKEN --endpoints N --agents M \\
        [--per-channel K] [--capacity C] [--prefetch P] [--prefix NAME] [--first I] \\
        [--task-seconds S]

Agent ``i`` serves the endpoint ``{prefix}{(first + i) % N}`` (registered with
RegisterEndpoint, once per name). It prints JSON lines on stdout: ``ready`` once every
agent has its welcome (``error`` on a refusal or a timeout, then exits 1), then answers
commands read from stdin, one per line:

- ``stats``: ``{"event": "stats", "tasks_per_agent": [...], "heartbeats": n, ...}``;
- ``churn FRACTION``: drops that fraction of its agents as killed agents go (their
  streams cancelled, no goodbye; a channel left without agents is closed; the tasks they
  were running lost with them) and starts as many new agents, with new ids, on the same
  endpoints; ``churned`` once they are welcomed;
- ``stop`` (or end of input, or SIGTERM): closes everything, prints ``stopped`` with the
  final figures, exits 0.

:class:`SimFleet` is the same thing as an async API, for a test's own loop.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import enum
import json
import pickle
import random
import signal
import socket
import sys
import threading
import time
import uuid
from collections.abc import Sequence
from typing import Any

import cloudpickle
import grpc

from heartline import _defaults, _forms
from heartline.endpoint._agent import _VERSION as AGENT_VERSION
from heartline.server._limits import raise_fd_limit
from heartline.v1 import endpoint_service_pb2 as pb
from heartline.v1 import endpoint_service_pb2_grpc as pb_grpc
from heartline.v1 import task_pb2

__all__ = ["FleetError", "SimFleet", "main"]

_CONNECT = "/heartline.v1.EndpointService/Connect"
_CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", -1),
    ("grpc.max_send_message_length", -1),
    # One TCP connection per channel: without it, channels with equal arguments share
    # one subchannel (gRPC's global pool), so a thousand "own" channels are one socket.
    ("grpc.use_local_subchannel_pool", 1),
]
_RUNNING = task_pb2.TASK_STATE_RUNNING
_SUCCEEDED = task_pb2.TASK_STATE_SUCCEEDED
# The stream's writes are handed over as bytes (no request serializer): the heartbeat
# is serialized once for every agent.
_HEARTBEAT = pb.ConnectRequest(heartbeat=pb.Heartbeat()).SerializeToString()
_NONE = cloudpickle.dumps(None)
_FATAL_CODES = frozenset({grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED})
_REGISTER_TIMEOUT = 30.0
_REGISTER_CONCURRENCY = 32
_CHANNEL_READY_TIMEOUT = 20.0
"""Seconds a new channel has to connect before its first stream is opened."""
# Backoff between a broken stream and the next, as the real agent's defaults
# (endpoint/_config.py reconnect_min, reconnect_max): full jitter, doubling.
_RECONNECT_MIN = 0.1
_RECONNECT_MAX = 10.0


class FleetError(Exception):
    """The server refused the agents (a bad token, a foreign endpoint), or they did not
    all get their welcome in time."""


def _result_of(args: bytes) -> bytes:
    """The pickled first positional argument of a task's ``(args, kwargs)`` payload (what a
    no-op ``f(i) -> i`` returns), or pickled None when there is none or it can't be read."""
    try:
        call_args, _ = pickle.loads(args)
        if not call_args:
            return _NONE
        return pickle.dumps(call_args[0], protocol=pickle.HIGHEST_PROTOCOL)
    except Exception:  # noqa: BLE001 - any payload: the answer is then None
        return _NONE


_Run = tuple[str, int, bytes]
"""A task the agent runs: (task_id, attempt, pickled result)."""


def _status_batch(runs: Sequence[_Run]) -> bytes:
    """One StatusBatch for the tasks of a DispatchBatch: each RUNNING, then SUCCEEDED."""
    message = pb.ConnectRequest()
    add = message.status.updates.add
    for task_id, attempt, result in runs:
        add(task_id=task_id, attempt=attempt, state=_RUNNING)
        add(task_id=task_id, attempt=attempt, state=_SUCCEEDED, result=result)
    return message.SerializeToString()


class _Link:
    """One channel (one TCP connection) and the agents that hold streams on it."""

    __slots__ = ("agents", "channel", "connect", "connected")

    def __init__(self, target: str) -> None:
        self.channel = grpc.aio.insecure_channel(target, options=_CHANNEL_OPTIONS)
        self.connect = self.channel.stream_stream(
            _CONNECT, request_serializer=None, response_deserializer=pb.ConnectResponse.FromString
        )
        self.agents = 0
        self.connected = False

    async def wait_connected(self) -> None:
        """Return once the channel has connected (at once after its first time).

        A stream opened on a channel still making its first connection sometimes never
        sends its first message (grpcio 1.85, a thousand channels connecting at once: the
        server sees the stream's HEADERS and no DATA, and the client's write never
        returns). Opened on a connected channel, it does not.

        Raises:
            _StreamLost: it did not connect in time.
        """
        if self.connected:
            return
        try:
            await asyncio.wait_for(self.channel.channel_ready(), _CHANNEL_READY_TIMEOUT)
        except TimeoutError:
            raise _StreamLost(
                f"the channel did not connect within {_CHANNEL_READY_TIMEOUT:g}s"
            ) from None
        self.connected = True


class AgentState(enum.Enum):
    """Where a simulated agent is in its life."""

    CONNECTING = "connecting"  # no stream yet, or between streams
    CONNECTED = "connected"  # welcome received
    DROPPED = "dropped"  # killed by a churn
    STOPPED = "stopped"


class _StreamLost(Exception):
    """The stream ended without our asking; the agent opens another."""


class _SimAgent:
    """One simulated agent: a task that holds its stream, and the figures it counts."""

    __slots__ = (
        "_beat",
        "_cancelled",
        "_interval",
        "_pending",
        "_running",
        "_writer",
        "agent_id",
        "endpoint",
        "fleet",
        "link",
        "phase",
        "state",
        "task",
        "tasks_run",
        "welcomed_once",
    )

    def __init__(self, fleet: SimFleet, endpoint: str, link: _Link) -> None:
        self.fleet = fleet
        self.endpoint = endpoint
        self.link = link
        self.agent_id = str(uuid.uuid4())
        self.state = AgentState.CONNECTING
        self.tasks_run = 0
        self.welcomed_once = False
        self.phase = "new"  # where a session is; said when an agent is not welcomed in time
        self.task: asyncio.Task[None] | None = None
        self._beat: asyncio.TimerHandle | None = None
        self._interval = _defaults.HEARTBEAT_INTERVAL  # the welcome's, or a Settings message's
        self._pending: collections.deque[tuple[bytes, int]] = collections.deque()
        self._writer: asyncio.Task[None] | None = None
        # Dispatch batches "running" (with a task time): their timers, by a serial.
        self._running: dict[int, asyncio.TimerHandle] = {}
        self._cancelled: set[str] = set()

    async def run(self) -> None:
        failures = 0
        while True:
            try:
                await self._session()
                reason = "the server closed the stream"
            except grpc.aio.AioRpcError as err:
                if err.code() in _FATAL_CODES:
                    self.fleet._refused(f"{err.code().name}: {err.details()}")
                    return
                reason = f"{err.code().name}: {err.details()}"
            except _StreamLost as exc:
                reason = str(exc)
            except Exception as exc:  # noqa: BLE001 - as the real agent: said, then again
                reason = repr(exc)
            self.fleet.last_disconnect = reason
            if self.welcomed_once:
                self.fleet.reconnects += 1
            if self.phase == "welcomed":  # this stream got its welcome: the backoff starts over
                failures = 0
            failures = min(failures + 1, 30)
            cap = min(_RECONNECT_MAX, _RECONNECT_MIN * 2**failures)
            self.phase = f"backoff after {reason}"
            await asyncio.sleep(random.uniform(0, cap))

    async def _greet(self, call: grpc.aio.StreamStreamCall) -> pb.ConnectResponse:
        """Write the hello, read the welcome.

        Raises:
            _StreamLost: no welcome came (in time), or the stream ended.
            grpc.aio.AioRpcError: the server refused the hello.
        """
        fleet = self.fleet
        try:
            # Bounded, so a hello that never got out is tried again, and counted.
            async with asyncio.timeout(fleet.welcome_timeout):
                self.phase = "writing the hello"
                await call.write(fleet._hello(self))
                self.phase = "waiting for the welcome"
                first = await call.read()
        except TimeoutError:
            fleet.welcome_timeouts += 1
            raise _StreamLost(
                f"no welcome within {fleet.welcome_timeout:g}s ({self.phase})"
            ) from None
        except asyncio.InvalidStateError:  # grpc's word for a write on an ended call
            code, details = await call.code(), await call.details()
            raise _StreamLost(f"the stream ended before the welcome: {code} {details}") from None
        if first is grpc.aio.EOF or first.WhichOneof("message") != "welcome":
            raise _StreamLost("the server did not answer the hello with a welcome")
        self.phase = "welcomed"
        return first

    async def _session(self) -> None:
        fleet = self.fleet
        self.phase = "waiting for a hello slot"
        async with fleet._connecting:
            self.phase = "waiting for the channel to connect"
            await self.link.wait_connected()
            # Opened only now: the server closes a stream whose hello is not in within
            # 5 s (heartline/_defaults.py HELLO_TIMEOUT).
            call = self.link.connect(metadata=fleet.metadata)
            try:
                first = await self._greet(call)
            except BaseException:
                call.cancel()
                raise
        try:
            interval = first.welcome.heartbeat_interval_seconds
            self._interval = interval if interval > 0 else _defaults.HEARTBEAT_INTERVAL
            self.state = AgentState.CONNECTED
            fleet._welcomed(self)
            loop = asyncio.get_running_loop()
            # The first beat at a random point of the first interval: no lockstep.
            self._beat = loop.call_later(random.uniform(0, self._interval), self._heartbeat, call)
            while True:
                message = await call.read()
                if message is grpc.aio.EOF:
                    raise _StreamLost("the server closed the stream")
                kind = message.WhichOneof("message")
                if kind == "dispatch":
                    dispatches = message.dispatch.dispatches
                    fleet.dispatches += 1
                    fleet.tasks_received += len(dispatches)
                    runs = [(d.task_id, d.attempt, _result_of(d.args)) for d in dispatches]
                    if fleet.task_seconds > 0:
                        self._run_later(call, runs, fleet.task_seconds)
                    else:
                        self._report(call, runs)
                elif kind == "cancel":
                    # The real agent kills what it still runs and says nothing more.
                    fleet.cancels += len(message.cancel.task_ids)
                    if self._running:
                        self._cancelled.update(message.cancel.task_ids)
                elif kind == "settings":
                    # A server with many agents asks for fewer heartbeats (a newer
                    # protocol's message: an older one never sends it); the next beat
                    # waits the new interval, as the real agent's does.
                    interval = message.settings.heartbeat_interval_seconds
                    if interval > 0:
                        fleet.settings += 1
                        self._interval = interval
                # acks: nothing is kept to forget
        finally:
            # A drop (cancellation) lands here too: the stream is cancelled, as a killed
            # agent's is, with no goodbye.
            if self._beat is not None:
                self._beat.cancel()
                self._beat = None
            if self._writer is not None:
                self._writer.cancel()
                self._writer = None
            self._pending.clear()  # unsent reports: lost, as a killed agent's
            # What it was running is lost with it: the server dispatches it again.
            for handle in self._running.values():
                handle.cancel()
            self._running.clear()
            self._cancelled.clear()
            if self.state is AgentState.CONNECTED:
                self.state = AgentState.CONNECTING
                fleet.welcomed -= 1
            call.cancel()

    def _heartbeat(self, call: grpc.aio.StreamStreamCall) -> None:
        self._beat = asyncio.get_running_loop().call_later(self._interval, self._heartbeat, call)
        # As the real agent: a status batch going up at the same time stands for it.
        if not self._pending:
            self.fleet.heartbeats += 1
            self._send(call, _HEARTBEAT, 0)

    def _report(self, call: grpc.aio.StreamStreamCall, runs: Sequence[_Run]) -> None:
        if self._cancelled:
            kept = [run for run in runs if run[0] not in self._cancelled]
            self._cancelled.difference_update(run[0] for run in runs)
            runs = kept
        if runs:
            self._send(call, _status_batch(runs), len(runs))

    def _run_later(self, call: grpc.aio.StreamStreamCall, runs: list[_Run], delay: float) -> None:
        """Report the tasks after ``delay`` seconds, as if they ran that long."""
        key = self.fleet._serial = self.fleet._serial + 1

        def done() -> None:
            del self._running[key]
            if not self._running:
                self._cancelled.clear()
            self._report(call, runs)

        self._running[key] = asyncio.get_running_loop().call_later(delay, done)

    def _send(self, call: grpc.aio.StreamStreamCall, data: bytes, tasks: int) -> None:
        """Queue a message (reporting ``tasks`` tasks); one writer per agent drains the
        queue (one write in flight)."""
        self._pending.append((data, tasks))
        if self._writer is None:
            self._writer = asyncio.get_running_loop().create_task(self._drain(call))

    async def _drain(self, call: grpc.aio.StreamStreamCall) -> None:
        try:
            while self._pending:
                data, tasks = self._pending.popleft()
                await call.write(data)
                self.tasks_run += tasks  # its report is on the wire
        except Exception:  # noqa: BLE001 - however the write failed, the stream is gone
            # The reader sees why and the agent reconnects.
            self._pending.clear()
        finally:
            self._writer = None


class SimFleet:
    """Simulated agents on this event loop, spread over endpoints and shared channels.

    Args:
        server: ``HOST:PORT`` of the server (plaintext).
        token: The bearer token the agents send (None: the one a client would find).
        endpoints: Endpoint names; agent ``i`` serves ``endpoints[(first + i) % len]``.
        per_channel: Agents per channel (TCP connection); 1 gives each its own.
        capacity: The capacity each hello says.
        prefetch: The prefetch each hello says (None: the real agent's default for
            ``capacity`` workers).
        first: Where this fleet's first agent falls in the round robin over endpoints.
        connect_concurrency: Most hellos waiting for their welcome at once.
        welcome_timeout: Seconds from a stream's opening to its welcome; past them the
            stream is cancelled and another opened (counted as ``welcome_timeouts``).
        task_seconds: How long each task "runs": a DispatchBatch is reported that long
            after it came (0: at once). A task cancelled meanwhile is not reported.
    """

    def __init__(
        self,
        server: str,
        token: str | None,
        endpoints: Sequence[str],
        *,
        per_channel: int = 100,
        capacity: int = 2,
        prefetch: int | None = None,
        first: int = 0,
        connect_concurrency: int = 500,
        welcome_timeout: float = 20.0,
        task_seconds: float = 0.0,
    ) -> None:
        if not endpoints or per_channel < 1 or capacity < 0 or connect_concurrency < 1:
            raise ValueError("need endpoints, per_channel >= 1, capacity >= 0")
        self.server = server
        self.metadata = _defaults.bearer_metadata(_defaults.token(token))
        self.endpoint_names = list(endpoints)
        self.per_channel = per_channel
        self.capacity = capacity
        self.prefetch = (
            prefetch
            if prefetch is not None
            else max(_defaults.PREFETCH_PER_WORKER * capacity, _defaults.MIN_PREFETCH)
        )
        self._next = first
        self._endpoint_ids: dict[str, str] = {}
        self._links: list[_Link] = []
        self._with_room: list[_Link] = []
        self.agents: list[_SimAgent] = []
        self.dropped: list[_SimAgent] = []
        self._connecting = asyncio.Semaphore(connect_concurrency)
        self._awaited = 0
        self._all_welcomed = asyncio.Event()
        self.refusal: str | None = None
        self.welcomed = 0
        self.heartbeats = 0
        self.reconnects = 0
        self.last_disconnect: str | None = None
        self.dispatches = 0
        self.cancels = 0
        self.welcome_timeout = welcome_timeout
        self.welcome_timeouts = 0
        self.task_seconds = task_seconds
        self.tasks_received = 0
        self.settings = 0
        self._serial = 0
        self._hostname = socket.gethostname()
        self._version = AGENT_VERSION  # what the real agent's hello carries

    # -- registration and agents --------------------------------------------------------

    async def register(self, names: Sequence[str] | None = None) -> dict[str, str]:
        """RegisterEndpoint once per name (default: the endpoints the agents will use).

        Raises:
            FleetError: the server refused a registration.
        """
        wanted = list(names if names is not None else self.endpoint_names)
        limit = asyncio.Semaphore(_REGISTER_CONCURRENCY)
        async with grpc.aio.insecure_channel(self.server) as channel:
            stub = pb_grpc.EndpointServiceStub(channel)

            async def one(name: str) -> None:
                async with limit:
                    try:
                        reply = await stub.RegisterEndpoint(
                            pb.RegisterEndpointRequest(name=name),
                            metadata=self.metadata,
                            timeout=_REGISTER_TIMEOUT,
                        )
                    except grpc.aio.AioRpcError as err:
                        raise FleetError(
                            f"RegisterEndpoint {name!r}: {err.code().name}: {err.details()}"
                        ) from None
                self._endpoint_ids[name] = reply.endpoint_id

            await asyncio.gather(*(one(name) for name in wanted if name not in self._endpoint_ids))
        return dict(self._endpoint_ids)

    def _link(self) -> _Link:
        """A channel with room for one more agent (a new one if none has)."""
        while self._with_room:
            link = self._with_room[-1]
            if link.agents < self.per_channel:
                break
            self._with_room.pop()
        else:
            link = _Link(self.server)
            self._links.append(link)
            self._with_room.append(link)
        link.agents += 1
        if link.agents >= self.per_channel:
            self._with_room.pop()
        return link

    async def start(
        self, count: int, *, endpoints: Sequence[str] | None = None, timeout: float = 300.0
    ) -> list[_SimAgent]:
        """Start ``count`` agents (on ``endpoints``, one each, else round robin over the
        fleet's) and return them once every one has its welcome.

        Raises:
            FleetError: the server refused one, or not all were welcomed in ``timeout``.
        """
        if endpoints is None:
            n = len(self.endpoint_names)
            endpoints = [self.endpoint_names[(self._next + i) % n] for i in range(count)]
            self._next += count
        assert len(endpoints) == count
        await self.register(sorted(set(endpoints)))
        self._awaited += count
        self._all_welcomed.clear()
        started = []
        loop = asyncio.get_running_loop()
        for name in endpoints:
            agent = _SimAgent(self, name, self._link())
            agent.task = loop.create_task(agent.run())
            self.agents.append(agent)
            started.append(agent)
        if count:
            try:
                await asyncio.wait_for(self._all_welcomed.wait(), timeout)
            except TimeoutError:
                phases = collections.Counter(a.phase for a in started if not a.welcomed_once)
                raise FleetError(
                    f"{self._awaited} of {count} agents not welcomed within {timeout:g}s: "
                    + ", ".join(f"{n} {phase}" for phase, n in phases.most_common())
                ) from None
        if self.refusal is not None:
            raise FleetError(f"the server refused an agent: {self.refusal}")
        return started

    def _hello(self, agent: _SimAgent) -> bytes:
        return pb.ConnectRequest(
            hello=pb.Hello(
                endpoint_id=self._endpoint_ids[agent.endpoint],
                agent_id=agent.agent_id,
                version=self._version,
                python_version=_forms.PYTHON,
                cloudpickle_version=cloudpickle.__version__,
                capacity=self.capacity,
                prefetch=self.prefetch,
                hostname=self._hostname,
            )
        ).SerializeToString()

    def _welcomed(self, agent: _SimAgent) -> None:
        self.welcomed += 1
        if not agent.welcomed_once:
            agent.welcomed_once = True
            self._awaited -= 1
            if self._awaited == 0:
                self._all_welcomed.set()

    def _refused(self, why: str) -> None:
        if self.refusal is None:
            self.refusal = why
        self._all_welcomed.set()

    async def _end(self, agents: Sequence[_SimAgent], state: AgentState) -> None:
        """Cancel the agents' streams and close each channel left without agents."""
        for agent in agents:
            if agent.task is not None:
                agent.task.cancel()
        tasks = [a.task for a in agents if a.task is not None]
        await asyncio.gather(*tasks, return_exceptions=True)
        empty = []
        for agent in agents:
            agent.state = state
            if not agent.welcomed_once:
                self._awaited -= 1
            agent.link.agents -= 1
            if agent.link.agents == 0:
                empty.append(agent.link)
            elif agent.link not in self._with_room:
                self._with_room.append(agent.link)
        for link in empty:
            self._links.remove(link)
            if link in self._with_room:
                self._with_room.remove(link)
        await asyncio.gather(*(link.channel.close() for link in empty))

    async def churn(self, fraction: float, *, timeout: float = 300.0) -> tuple[int, float]:
        """Drop ``fraction`` of the agents as killed agents go, start as many new ones
        on the same endpoints; return (dropped, seconds until the new ones were welcomed).
        """
        count = min(len(self.agents), round(len(self.agents) * fraction))
        t0 = time.perf_counter()
        victims = random.sample(self.agents, count)
        gone = {id(a) for a in victims}
        self.agents = [a for a in self.agents if id(a) not in gone]
        self.dropped.extend(victims)
        await self._end(victims, AgentState.DROPPED)
        await self.start(count, endpoints=[a.endpoint for a in victims], timeout=timeout)
        return count, time.perf_counter() - t0

    async def close(self) -> None:
        """Cancel every stream and close every channel."""
        live = [a for a in self.agents if a.state in (AgentState.CONNECTING, AgentState.CONNECTED)]
        await self._end(live, AgentState.STOPPED)
        links, self._links = self._links, []
        self._with_room = []
        await asyncio.gather(*(link.channel.close() for link in links))

    def stats(self) -> dict[str, Any]:
        """The fleet's figures so far (``tasks_per_agent`` of the live agents, in start
        order; ``tasks_per_dropped_agent`` of those a churn dropped)."""
        return {
            "agents": len(self.agents),
            "tasks_per_agent": [a.tasks_run for a in self.agents],
            "tasks_per_dropped_agent": [a.tasks_run for a in self.dropped],
            "heartbeats": self.heartbeats,
            "welcomed": self.welcomed,
            "reconnects": self.reconnects,
            "last_disconnect": self.last_disconnect,
            "dispatches": self.dispatches,
            "tasks_received": self.tasks_received,
            "cancels": self.cancels,
            "welcome_timeouts": self.welcome_timeouts,
            "settings": self.settings,
            "heartbeat_intervals": dict(
                collections.Counter(a._interval for a in self.agents if a.welcomed_once)
            ),
            "channels": len(self._links),
        }


# --------------------------------------------------------------------------- the process


def _emit(event: str, **fields: Any) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


def _read_commands(loop: asyncio.AbstractEventLoop, commands: asyncio.Queue[str | None]) -> None:
    """Feed stdin's lines to the loop (None at end of input). A daemon thread: a read
    blocked on a pipe nobody closes must not keep the process from exiting."""
    try:
        for line in sys.stdin:
            loop.call_soon_threadsafe(commands.put_nowait, line.strip())
    except (OSError, ValueError):
        pass
    loop.call_soon_threadsafe(commands.put_nowait, None)


async def _serve(opts: argparse.Namespace) -> int:
    names = [f"{opts.prefix}{i}" for i in range(opts.endpoints)]
    fleet = SimFleet(
        opts.server,
        opts.token,
        names,
        per_channel=opts.per_channel,
        capacity=opts.capacity,
        prefetch=opts.prefetch,
        first=opts.first,
        connect_concurrency=opts.connect_concurrency,
        task_seconds=opts.task_seconds,
    )
    loop = asyncio.get_running_loop()
    commands: asyncio.Queue[str | None] = asyncio.Queue()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, commands.put_nowait, "stop")
    try:
        t0 = time.perf_counter()
        try:
            await fleet.start(opts.agents, timeout=opts.connect_timeout)
        except FleetError as exc:
            _emit("error", error=str(exc), welcomed=fleet.welcomed)
            return 1
        _emit(
            "ready",
            agents=len(fleet.agents),
            welcomed=fleet.welcomed,
            connect_s=round(time.perf_counter() - t0, 3),
            channels=len(fleet._links),
            welcome_timeouts=fleet.welcome_timeouts,
            fd_limit=opts.fd_limit,
        )
        threading.Thread(target=_read_commands, args=(loop, commands), daemon=True).start()
        while True:
            command = await commands.get()
            if command is None or command == "stop":
                break
            word, _, arg = command.partition(" ")
            if word == "stats":
                _emit("stats", **fleet.stats())
            elif word == "churn":
                try:
                    dropped, welcomed_s = await fleet.churn(
                        float(arg), timeout=opts.connect_timeout
                    )
                except (ValueError, FleetError) as exc:
                    _emit("error", error=f"churn {arg}: {exc}")
                    continue
                _emit("churned", dropped=dropped, welcomed_s=round(welcomed_s, 3))
            elif word:
                _emit("error", error=f"unknown command {command!r}: stats, churn F, stop")
    finally:
        await fleet.close()
    _emit("stopped", **fleet.stats())
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server", required=True, help="HOST:PORT of the server")
    parser.add_argument("--token", default=None, help="bearer token (default: a client's)")
    parser.add_argument("--endpoints", type=int, required=True, help="endpoints to spread over")
    parser.add_argument("--agents", type=int, required=True, help="agents to run")
    parser.add_argument("--per-channel", type=int, default=100, help="agents per connection")
    parser.add_argument("--capacity", type=int, default=2, help="capacity in each hello")
    parser.add_argument(
        "--prefetch", type=int, default=None, help="prefetch in each hello (default: the agent's)"
    )
    parser.add_argument("--prefix", default="sim-", help="endpoint names are PREFIX0, PREFIX1...")
    parser.add_argument(
        "--first", type=int, default=0, help="round-robin position of this process's first agent"
    )
    parser.add_argument(
        "--connect-concurrency", type=int, default=500, help="most hellos in flight at once"
    )
    parser.add_argument(
        "--connect-timeout", type=float, default=300.0, help="seconds for every welcome"
    )
    parser.add_argument(
        "--task-seconds",
        type=float,
        default=0.0,
        help="how long each task runs (0: reported at once)",
    )
    opts = parser.parse_args(argv)
    limit = raise_fd_limit()  # thousands of sockets: the server's own raise
    opts.fd_limit = None if limit is None else limit.soft
    loop_factory = None
    try:
        import uvloop

        loop_factory = uvloop.new_event_loop
    except ImportError:
        pass
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        return runner.run(_serve(opts))


if __name__ == "__main__":
    sys.exit(main())
