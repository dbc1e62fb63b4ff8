"""The heartbeat interval a server asks of its agents, stretched with their number
(server/_liveness.py), and what the server and a real agent do with it."""

from __future__ import annotations

import asyncio
import math
from pathlib import Path

import grpc
import pytest

from heartline import _defaults
from heartline.endpoint._agent import Agent
from heartline.endpoint._config import AgentConfig
from heartline.server import Server, ServerConfig
from heartline.server._liveness import HeartbeatPolicy
from heartline.v1 import endpoint_service_pb2 as ep
from heartline.v1 import endpoint_service_pb2_grpc
from tests.helpers import open_agent_stream

pytestmark = pytest.mark.usefixtures("loop_watchdog")


def test_a_few_agents_beat_at_the_configured_interval_many_at_a_bounded_rate() -> None:
    policy = HeartbeatPolicy(interval=5.0, timeout=15.0, rate=200.0)
    assert [policy.interval_for(n) for n in (0, 1, 999, 1000)] == [5.0] * 4
    assert policy.interval_for(1001) == pytest.approx(5 * math.sqrt(2))
    for agents in (1001, 1500, 2000, 2001, 10_000, 123_456):
        interval = policy.interval_for(agents)
        assert agents / interval <= 200.0  # the rate holds...
        assert agents / interval > 200.0 / math.sqrt(2)  # ...with at most one step to spare
        steps = 2 * math.log2(interval / 5.0)
        assert steps == pytest.approx(round(steps))  # a whole number of steps
        assert policy.timeout_for(interval) == pytest.approx(3 * interval)
    assert policy.interval_for(10_000) == pytest.approx(5 * math.sqrt(2) ** 7)  # 56.6 s
    # An explicit timeout keeps its ratio to the interval.
    assert HeartbeatPolicy(0.2, 1.0, 10.0).timeout_for(0.4) == pytest.approx(2.0)


def test_a_rate_that_is_not_positive_is_refused() -> None:
    with pytest.raises(ValueError, match="heartbeat_rate must be above 0"):
        ServerConfig(heartbeat_rate=0.0)


async def test_more_agents_than_the_rate_allows_are_asked_for_a_longer_interval_and_judged_by_it(
    tmp_path: Path,
) -> None:
    # 0.2 s between beats for 10 a second at most: 2 agents beat at 0.2 s; a third makes
    # 15 a second, so every agent is asked for 0.4 s (two steps of sqrt 2), timeout 1.2 s.
    config = ServerConfig(
        listen="127.0.0.1:0",
        db=tmp_path / "h.db",
        validate=True,
        heartbeat_interval=0.2,
        heartbeat_rate=10.0,
    )
    server = Server(config)
    await server.start()
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = endpoint_service_pb2_grpc.EndpointServiceStub(channel)
            endpoint = await stub.RegisterEndpoint(
                ep.RegisterEndpointRequest(name="fleet"),
                metadata=_defaults.bearer_metadata(_defaults.token()),
            )
            streams = [
                await open_agent_stream(stub, endpoint.endpoint_id, f"a{i}") for i in range(3)
            ]
            assert [interval for _, interval in streams] == pytest.approx([0.2, 0.2, 0.4])
            async with asyncio.timeout(10):
                for call, _ in streams[:2]:  # the first two are told at the next tick
                    message = await call.read()
                    assert message.WhichOneof("message") == "settings"
                    assert message.settings.heartbeat_interval_seconds == pytest.approx(0.4)
            connections = server.core.connections
            assert [connections[f"a{i}"].heartbeat_timeout for i in range(3)] == pytest.approx(
                [1.2] * 3
            )

            # Beating every 0.4 s, all three outlive the first timeout (0.6 s) twice over.
            loop = asyncio.get_running_loop()
            until = loop.time() + 1.4
            while loop.time() < until:
                for call, _ in streams:
                    await call.write(ep.ConnectRequest(heartbeat=ep.Heartbeat()))
                await asyncio.sleep(0.4)
            assert set(server.core.scheduler.agents) == {"a0", "a1", "a2"}
            for call, _ in streams:
                call.cancel()
    finally:
        await server.stop(grace=0)


async def test_the_agent_beats_at_the_interval_a_settings_message_gives(tmp_path: Path) -> None:
    config = ServerConfig(
        listen="127.0.0.1:0",
        db=tmp_path / "h.db",
        validate=True,
        heartbeat_interval=0.2,
        heartbeat_rate=5.0,
    )
    server = Server(config)
    await server.start()
    agent = Agent(AgentConfig(name="real", server=server.address, home=tmp_path, workers=1))
    ready = asyncio.Event()
    running = asyncio.ensure_future(agent.run(ready=ready))
    try:
        async with asyncio.timeout(20):
            await ready.wait()
            async with grpc.aio.insecure_channel(server.address) as channel:
                stub = endpoint_service_pb2_grpc.EndpointServiceStub(channel)
                # Two more agents on its endpoint, over 5 heartbeats a second at 0.2 s: 2
                # agents need 0.4 s, 3 need 0.6 s, asked for 0.8 s (4 steps of sqrt 2).
                extra = [
                    await open_agent_stream(stub, agent.endpoint_id, f"x{i}") for i in range(2)
                ]
                assert [interval for _, interval in extra] == pytest.approx([0.4, 0.8])
                conn = server.core.connections[agent.agent_id]
                while conn.heartbeat_interval < 0.7:  # told at the next tick
                    await asyncio.sleep(0.02)
                assert conn.heartbeat_interval == pytest.approx(0.8)
                # The agent's beats now come that far apart, not 0.2 s apart.
                heard = conn.last_heard
                gaps = []
                while len(gaps) < 3:
                    await asyncio.sleep(0.01)
                    if conn.last_heard != heard:
                        gaps.append(conn.last_heard - heard)
                        heard = conn.last_heard
                assert min(gaps[1:]) > 0.6, gaps
                for call, _ in extra:
                    call.cancel()
    finally:
        await agent.stop()
        await asyncio.gather(running, return_exceptions=True)
        await server.stop(grace=0)
