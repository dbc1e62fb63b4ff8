"""``heartline.v1.EndpointService``: agent registration and the Connect stream."""

from __future__ import annotations

import asyncio
import logging
import time

import grpc

from heartline._defaults import (
    ENDPOINT_NAME,
    ENDPOINT_NAME_RULE,
    FUNCTION_ID,
    HELLO_TAKEOVER_SILENCE,
    HELLO_TIMEOUT,
    MAX_ALLOWED_FUNCTIONS,
)
from heartline._output import clip_output
from heartline._states import TaskState
from heartline.server._auth import caller, registering_refusal, serving_refusal
from heartline.server._convert import error_from_proto, state_from_proto
from heartline.server._core import AgentConnection, ServerCore
from heartline.server._events import (
    AgentCapacity,
    AgentConnected,
    AgentLost,
    AgentReported,
    HeldTask,
    StatusReport,
)
from heartline.v1 import endpoint_service_pb2 as pb
from heartline.v1 import endpoint_service_pb2_grpc

log = logging.getLogger("heartline.server")
_SUCCEEDED, _ERRORED = TaskState.SUCCEEDED, TaskState.ERRORED
MAX_CAPACITY = 100_000
MAX_AGENT_ID = 128


class EndpointServicer(endpoint_service_pb2_grpc.EndpointServiceServicer):
    def __init__(self, core: ServerCore) -> None:
        self.core = core

    def _owner(self, context: grpc.aio.ServicerContext) -> str:
        """The calling user: an endpoint belongs to the user who registered it."""
        return caller().user

    async def RegisterEndpoint(self, request, context):
        owner = self._owner(context)
        if not ENDPOINT_NAME.match(request.name):
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"invalid endpoint name {request.name[:80]!r}: {ENDPOINT_NAME_RULE}",
            )
        refusal = registering_refusal(caller(), request.name)
        if refusal is not None:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, refusal)
        row = await self.core.ensure_endpoint(request.name, owner)
        return pb.RegisterEndpointResponse(endpoint_id=row.endpoint_id, name=row.name)

    async def Connect(self, request_iterator, context):
        try:
            first = await asyncio.wait_for(context.read(), HELLO_TIMEOUT)
        except TimeoutError:
            await context.abort(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"no hello within {HELLO_TIMEOUT:g}s: an agent's first message on Connect is its hello",
            )
        if first is grpc.aio.EOF:
            return
        if first.WhichOneof("message") != "hello":
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"the first message on Connect must be a hello, not {first.WhichOneof('message') or 'an empty message'}",
            )
        hello = first.hello
        endpoint = self.core.endpoints.get(hello.endpoint_id)
        if endpoint is None:
            await context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"unknown endpoint id {hello.endpoint_id[:80]!r}: register the endpoint again",
            )
        refusal = serving_refusal(caller(), endpoint)
        if refusal is not None:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, refusal)
        # A capacity of 0 is allowed: a Dask agent says hello before it has reached its
        # cluster, and a cluster may have no workers yet (dask-jobqueue's adaptive ones
        # start at 0 and scale on queued tasks, which the agent's prefetch provides).
        # Refused, such an agent could never connect; its Capacity messages follow.
        if (
            not 0 < len(hello.agent_id) <= MAX_AGENT_ID
            or not 0 <= hello.capacity <= MAX_CAPACITY
            or hello.prefetch < 0
        ):
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"hello needs an agent_id of 1-{MAX_AGENT_ID} characters, a capacity in "
                f"0..{MAX_CAPACITY} and a prefetch >= 0",
            )
        allowed: frozenset[str] | None = None
        if hello.HasField("allowed_functions"):
            ids = hello.allowed_functions.function_ids
            bad = next((fid for fid in ids if not FUNCTION_ID.match(fid)), None)
            if bad is not None or len(ids) > MAX_ALLOWED_FUNCTIONS:
                await context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"hello's allowed_functions must hold at most {MAX_ALLOWED_FUNCTIONS} "
                    "function ids (sha256 hex digests)"
                    + ("" if bad is None else f"; {bad[:80]!r} is none"),
                )
            allowed = frozenset(ids)
        held = []
        for h in hello.held_tasks:
            state = state_from_proto(h.state)
            if state is not None:
                held.append(HeldTask(h.task_id, h.attempt, state))
        agent_id = hello.agent_id
        conn = AgentConnection(
            agent_id, endpoint.endpoint_id, self.core.functions, self.core.store.get_args
        )
        previous = self.core.connections.get(agent_id)
        if previous is not None:
            # A live agent's id is not up for grabs: another stream may take it over only
            # once the old one has missed heartbeats (a reconnect after a network cut the
            # server has not noticed yet); until then it is refused, and an agent retries.
            silence = time.monotonic() - previous.last_heard
            limit = HELLO_TAKEOVER_SILENCE * previous.heartbeat_interval
            if silence < limit:
                await context.abort(
                    grpc.StatusCode.ALREADY_EXISTS,
                    f"agent id {agent_id[:80]!r} is connected on another stream (heard from "
                    f"{silence:.1f}s ago): a new agent takes a new id; an agent reconnecting "
                    f"is let in once its old stream is closed or silent for {limit:g}s",
                )
            previous.close("the agent opened a new stream")
        self.core.connections[agent_id] = conn
        # Only a hello let in sets the endpoint's allow-list (not one refused above).
        self.core.set_allowed_functions(endpoint, allowed, agent_id)
        welcome = pb.Welcome(
            heartbeat_interval_seconds=self.core.welcome_heartbeats(conn),
            agent_id=agent_id,
            max_payload_bytes=self.core.config.max_payload,
            max_output_bytes=self.core.config.max_output,
        )
        try:
            await context.write(pb.ConnectResponse(welcome=welcome))
        except BaseException:  # the agent went away first: it never was connected
            if self.core.connections.get(agent_id) is conn:
                del self.core.connections[agent_id]
            raise
        self.core.feed_soon(
            AgentConnected(
                agent_id,
                endpoint.endpoint_id,
                hello.capacity,
                hello.prefetch,
                tuple(held),
                time.time(),
                hello.hostname,
                hello.version,
                conn.stream_id,
                hello.python_version[:16],
                hello.cloudpickle_version[:32],
            )
        )
        log.info(
            "agent connected agent=%s endpoint=%s capacity=%d held=%d",
            agent_id,
            endpoint.name,
            hello.capacity,
            len(held),
        )
        reader = asyncio.ensure_future(self._read(conn, context))
        writer = asyncio.ensure_future(conn.run_writer(context.write))
        try:
            done, _ = await asyncio.wait({reader, writer}, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                # An abort (e.g. a message that does not decode) has said why already.
                if not task.cancelled() and not isinstance(
                    task.exception(), (type(None), grpc.aio.AbortError)
                ):
                    log.warning("agent stream %s ended: %r", agent_id, task.exception())
        finally:
            # First, with no await before it: gRPC cancels this handler when the agent's
            # side goes away, and a cancellation landing in the gather below would skip
            # whatever came after it (the agent then stayed online until its heartbeat
            # timeout: up to minutes with many agents).
            if self.core.connections.get(agent_id) is conn:
                del self.core.connections[agent_id]
                self.core.feed_soon(
                    AgentLost(agent_id, time.time(), "stream-closed", conn.stream_id)
                )
                log.info("agent disconnected agent=%s", agent_id)
            for task in (reader, writer):
                task.cancel()
            await asyncio.gather(reader, writer, return_exceptions=True)

    async def _read(self, conn: AgentConnection, context) -> None:
        core = self.core
        agent_id = conn.agent_id
        max_output = core.config.max_output
        while True:
            message = await context.read()
            if message is grpc.aio.EOF:
                return
            if conn.close_reason is not None:
                return
            conn.last_heard = time.monotonic()
            kind = message.WhichOneof("message")
            if kind == "status":
                reports = []
                for u in message.status.updates:
                    state = state_from_proto(u.state)
                    if state is None:
                        continue
                    stdout = stderr = ""
                    if state is _SUCCEEDED or state is _ERRORED:
                        # The agent was told the limit; an agent is not trusted to keep it.
                        stdout = clip_output(u.stdout, max_output)
                        stderr = clip_output(u.stderr, max_output)
                    reports.append(
                        StatusReport(
                            u.task_id,
                            u.attempt,
                            state,
                            u.result if u.result else None,
                            error_from_proto(u.error) if u.HasField("error") else None,
                            stdout,
                            stderr,
                        )
                    )
                core.feed_soon(AgentReported(agent_id, tuple(reports), time.time()))
            elif kind == "capacity":
                core.feed_soon(AgentCapacity(agent_id, message.capacity.capacity, time.time()))
            # A heartbeat is the timestamp above, nothing more (ServerCore.lose_silent_agents).
