"""A stopping agent's session ends as a cancellation, even when its stream breaks at once.

`heartline up` killed with SIGKILL takes the server and the agent's lifeline in the same
instant: the agent is told to stop while its stream fails. asyncio's TaskGroup then ends
with the stream's error in a group, and the cancellation is left only in the task's
``cancelling()`` count. Taken for a lost connection, it kept the agent reconnecting to a
dead server for ever (tests/test_up.py's SIGKILL test, seen once in CI).
"""

from __future__ import annotations

import asyncio

from heartline.endpoint import _agent


async def _session(gate: asyncio.Event, started: asyncio.Event) -> None:
    """A session's shape: a child that fails when the stream breaks, the body waiting."""

    async def receive() -> None:
        await gate.wait()
        raise _agent._StreamLost("the stream broke")

    try:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(receive())
            started.set()
            await asyncio.Event().wait()
    except BaseExceptionGroup as group:
        raise _agent._session_error(group) from None


def _run(cancel: bool) -> BaseException:
    async def main() -> BaseException:
        gate, started = asyncio.Event(), asyncio.Event()
        task = asyncio.create_task(_session(gate, started))
        await started.wait()
        gate.set()  # the child fails on the next turn of the loop...
        if cancel:
            task.cancel()  # ...the same turn the stop arrives
        try:
            await asyncio.wait_for(task, timeout=5)
        except BaseException as exc:  # noqa: BLE001 - the outcome is what is checked
            return exc
        raise AssertionError("the session returned")

    return asyncio.run(main())


def test_a_stop_that_lands_as_the_stream_breaks_stays_a_cancellation() -> None:
    assert isinstance(_run(cancel=True), asyncio.CancelledError)


def test_a_broken_stream_alone_is_the_streams_error() -> None:
    exc = _run(cancel=False)
    assert isinstance(exc, _agent._StreamLost), repr(exc)


async def test_an_agent_whose_stream_brings_no_welcome_opens_another(tmp_path, monkeypatch) -> None:
    # A server that takes the hello and then says nothing: the agent must not wait on
    # that stream for ever.
    import grpc

    from heartline.endpoint._agent import Agent
    from heartline.endpoint._config import AgentConfig
    from heartline.v1 import endpoint_service_pb2 as pb
    from heartline.v1 import endpoint_service_pb2_grpc

    monkeypatch.setattr(_agent, "_WELCOME_TIMEOUT", 0.3)
    hellos: list[str] = []
    second = asyncio.Event()

    class Mute(endpoint_service_pb2_grpc.EndpointServiceServicer):
        async def RegisterEndpoint(self, request, context):
            return pb.RegisterEndpointResponse(endpoint_id="e" * 36, name=request.name)

        async def Connect(self, request_iterator, context):
            first = await context.read()
            hellos.append(first.hello.agent_id)
            if len(hellos) >= 2:
                second.set()
            await asyncio.Event().wait()  # until the agent gives up on the stream

    server = grpc.aio.server()
    endpoint_service_pb2_grpc.add_EndpointServiceServicer_to_server(Mute(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    agent = Agent(AgentConfig(name="patient", server=f"127.0.0.1:{port}", home=tmp_path, workers=1))
    running = asyncio.ensure_future(agent.run())
    try:
        async with asyncio.timeout(20):
            await second.wait()
        assert hellos[0] == hellos[1] == agent.agent_id  # the same agent, a new stream
    finally:
        await agent.stop()
        await asyncio.gather(running, return_exceptions=True)
        await server.stop(0)
