"""The server in-process: a real grpc.aio server on port 0 with a real SQLite store."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from heartline import AsyncClient, HeartlineError, _defaults
from heartline.server import Server, ServerConfig
from tests.helpers import open_agent_stream

# The server runs on the test's own event loop: the watchdog checks that nothing blocks it.
pytestmark = pytest.mark.usefixtures("loop_watchdog")


async def test_a_failed_commit_stops_the_server(tmp_path: Path) -> None:
    # Memory would be ahead of the store; only a restart from the store is safe.
    server = Server(ServerConfig(listen="127.0.0.1:0", db=tmp_path / "h.db", validate=True))
    await server.start()
    try:

        def fail(conn: sqlite3.Connection) -> None:
            raise sqlite3.OperationalError("disk I/O error")

        server.store._commit = fail  # type: ignore[method-assign]
        async with AsyncClient(server.address) as client:
            with pytest.raises(HeartlineError):
                await client.submit("anywhere", pow, 2, 3)
        assert server.failed.is_set()
    finally:
        await server.stop(grace=0)


async def test_a_clean_stop_is_not_a_failure(tmp_path: Path) -> None:
    server = Server(ServerConfig(listen="127.0.0.1:0", db=tmp_path / "h.db", validate=True))
    await server.start()
    await server.stop(grace=0)
    assert not server.failed.is_set()


async def test_a_client_giving_up_on_a_command_does_not_drop_its_announcement(
    tmp_path: Path,
) -> None:
    # The cancel's RPC times out while its commit waits; the commit still happens and
    # watchers must still hear of it (the store future is shielded from the RPC).
    import asyncio
    import threading

    import grpc

    from heartline import TaskState
    from heartline.v1 import endpoint_service_pb2, endpoint_service_pb2_grpc

    server = Server(ServerConfig(listen="127.0.0.1:0", db=tmp_path / "h.db", validate=True))
    await server.start()
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = endpoint_service_pb2_grpc.EndpointServiceStub(channel)
            await stub.RegisterEndpoint(
                endpoint_service_pb2.RegisterEndpointRequest(name="nobody"),
                metadata=_defaults.bearer_metadata(_defaults.token()),
            )
        async with AsyncClient(server.address) as client, AsyncClient(server.address) as watcher:
            tid = await client.submit("nobody", pow, 2, 3, held=True)
            waiting = asyncio.ensure_future(watcher.get_result(tid, timeout=30))
            # The watch must be live before the writer blocks, so the cancel can reach
            # it only as a push, not through the watch's first read of current state.
            async with asyncio.timeout(10):
                while tid not in server.core.watchers._by_task:
                    await asyncio.sleep(0.01)
            await server.store.get_tasks([tid])  # reads are FIFO: the watch's read is done

            started, release = threading.Event(), threading.Event()

            def block(conn: sqlite3.Connection, arg: None) -> None:
                started.set()
                release.wait(30)

            blocker = server.store._submit(block, None)  # type: ignore[attr-defined]
            assert await asyncio.to_thread(started.wait, 30)
            try:
                cancel = asyncio.ensure_future(client.cancel([tid]))
                with pytest.raises((HeartlineError, asyncio.TimeoutError)):
                    await asyncio.wait_for(asyncio.shield(cancel), 0.3)
                cancel.cancel()  # the client gives up on the call
                await asyncio.gather(cancel, return_exceptions=True)
            finally:
                release.set()
                await blocker
            with pytest.raises(HeartlineError, match="cancelled"):
                await waiting
            assert (await watcher.get_task(tid)).state is TaskState.CANCELLED
    finally:
        await server.stop(grace=0)


async def test_agents_registering_one_name_at_once_get_one_endpoint(tmp_path: Path) -> None:
    # Two agents started together for a new endpoint used to race: each saw no endpoint
    # of that name while the other's registration was committing, and the name got two
    # endpoints (tasks went to one, the agents served the other). Called on the core
    # directly: over gRPC the requests seldom overlap, here they always do.
    import asyncio

    db = tmp_path / "h.db"
    server = Server(ServerConfig(listen="127.0.0.1:0", db=db, validate=True))
    await server.start()
    try:
        rows = await asyncio.gather(
            *(server.core.ensure_endpoint("twins", "admin") for _ in range(8))
        )
        assert len({r.endpoint_id for r in rows}) == 1, rows
    finally:
        await server.stop(grace=0)
    with sqlite3.connect(db) as conn:
        stored = conn.execute("SELECT endpoint_id FROM endpoints WHERE name = 'twins'").fetchall()
    assert stored == [(rows[0].endpoint_id,)]


async def test_heartbeats_are_no_scheduler_step_and_only_a_silent_agent_is_lost(
    tmp_path: Path,
) -> None:
    # Two agents on one endpoint: one beats every 0.1 s, one goes silent after its hello.
    # Heartbeats only stamp the stream; the timer loses the silent one (its stream
    # closed, its cause heartbeat-timeout), and nothing a heartbeat does reaches the
    # scheduler.
    import asyncio
    import datetime

    import grpc

    from heartline.server._events import AgentConnected, AgentLost, Tick
    from heartline.v1 import endpoint_service_pb2 as ep
    from heartline.v1 import endpoint_service_pb2_grpc

    config = ServerConfig(
        listen="127.0.0.1:0", db=tmp_path / "h.db", validate=True, heartbeat_interval=0.2
    )
    server = Server(config)
    await server.start()
    fed: list[object] = []
    feed = server.core.feed

    def spy(*events: object):  # the real feed, with a record of what reached it
        fed.extend(events)
        return feed(*events)  # type: ignore[arg-type]

    server.core.feed = spy  # type: ignore[method-assign]
    metadata = _defaults.bearer_metadata(_defaults.token())
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = endpoint_service_pb2_grpc.EndpointServiceStub(channel)
            endpoint = await stub.RegisterEndpoint(
                ep.RegisterEndpointRequest(name="pulse"), metadata=metadata
            )

            steady, _ = await open_agent_stream(stub, endpoint.endpoint_id, "steady")
            silent, _ = await open_agent_stream(stub, endpoint.endpoint_id, "silent")
            beats = 0

            async def beat_until_the_silent_one_is_closed() -> None:
                nonlocal beats
                ended = asyncio.ensure_future(silent.read())
                while not ended.done():
                    await steady.write(ep.ConnectRequest(heartbeat=ep.Heartbeat()))
                    beats += 1
                    await asyncio.wait({ended}, timeout=0.1)
                assert ended.result() is grpc.aio.EOF

            async with asyncio.timeout(10):
                await beat_until_the_silent_one_is_closed()
            assert set(server.core.scheduler.agents) == {"steady"}
            assert beats >= 6  # the steady one outlived the timeout (0.6 s) on heartbeats

            async with AsyncClient(server.address) as client:
                (pulse,) = await client.list_endpoints()
            (agent,) = pulse.agents
            assert agent.agent_id == "steady" and agent.last_heartbeat is not None
            age = datetime.datetime.now(datetime.UTC) - agent.last_heartbeat
            assert age.total_seconds() < 0.6, age
            steady.cancel()
    finally:
        await server.stop(grace=0)
    assert {type(e) for e in fed} <= {AgentConnected, AgentLost, Tick}, fed
    lost = [e for e in fed if isinstance(e, AgentLost)]
    assert [(e.agent_id, e.cause) for e in lost][:1] == [("silent", "heartbeat-timeout")], lost


async def test_list_endpoints_pages_end_at_the_page_size_or_the_agents_a_page_holds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import grpc

    from heartline.server import _task_service
    from heartline.v1 import endpoint_service_pb2 as ep
    from heartline.v1 import endpoint_service_pb2_grpc, task_service_pb2, task_service_pb2_grpc

    monkeypatch.setattr(_task_service, "AGENTS_PER_PAGE", 3)
    server = Server(ServerConfig(listen="127.0.0.1:0", db=tmp_path / "h.db", validate=True))
    await server.start()
    metadata = _defaults.bearer_metadata(_defaults.token())
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            agents = endpoint_service_pb2_grpc.EndpointServiceStub(channel)
            tasks = task_service_pb2_grpc.TaskServiceStub(channel)
            ids = []
            for name in ("e0", "e1", "e2", "e3", "e4"):  # registered in this order
                reply = await agents.RegisterEndpoint(
                    ep.RegisterEndpointRequest(name=name), metadata=metadata
                )
                ids.append(reply.endpoint_id)
            # e1 has 2 agents, e2 has 3 (a page of its own), e4 has 1.
            streams = [
                (await open_agent_stream(agents, ids[i], f"a{i}-{k}"))[0]
                for i, n in ((1, 2), (2, 3), (4, 1))
                for k in range(n)
            ]
            async with asyncio.timeout(10):
                while len(server.core.scheduler.agents) < 6:
                    await asyncio.sleep(0.01)

            async def pages(size: int) -> list[list[tuple[str, int]]]:
                request = task_service_pb2.ListEndpointsRequest(page_size=size)
                out = []
                for _ in range(10):
                    reply = await tasks.ListEndpoints(request, metadata=metadata)
                    out.append([(e.name, len(e.agents)) for e in reply.endpoints])
                    if not reply.next_page_token:
                        return out
                    request.page_token = reply.next_page_token
                raise AssertionError(f"no last page: {out}")

            # Ends at 2 endpoints, or before the endpoint that would pass 3 agents (e3, with
            # none, still fits beside e2).
            assert await pages(2) == [[("e0", 0), ("e1", 2)], [("e2", 3), ("e3", 0)], [("e4", 1)]]
            assert await pages(0) == [[("e0", 0), ("e1", 2)], [("e2", 3), ("e3", 0)], [("e4", 1)]]
            for request, message in (
                (task_service_pb2.ListEndpointsRequest(page_size=-1), "page_size is negative"),
                (task_service_pb2.ListEndpointsRequest(page_token="!!"), "malformed page_token"),
            ):
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await tasks.ListEndpoints(request, metadata=metadata)
                assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
                assert message in (info.value.details() or "")
            async with AsyncClient(server.address) as client:
                listed = await client.list_endpoints()  # every page, by name
            assert [(e.name, len(e.agents)) for e in listed] == [
                ("e0", 0), ("e1", 2), ("e2", 3), ("e3", 0), ("e4", 1)
            ]  # fmt: skip
            for stream in streams:
                stream.cancel()
    finally:
        await server.stop(grace=0)
