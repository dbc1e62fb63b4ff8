"""A hostile client against a real server: bodies that do not decode, Connect streams that
never say hello or lie in it, and memory asked for by big functions (SPEC section 6,
issue 8). Each is answered with a status and a short message, logs at most a few quiet
lines, and leaves the server healthy: a real task still runs.

Talks raw gRPC (``grpc.aio`` channels, method paths and bytes), as such a client would.
"""

from __future__ import annotations

import asyncio
import os
import random
import sys
import time
import uuid
from pathlib import Path

import cloudpickle
import grpc
import pytest
from google.protobuf import descriptor as pb_descriptor
from grpc_health.v1 import health_pb2, health_pb2_grpc

from heartline import Client, TaskState, _defaults
from heartline._serialize import dumps_result
from heartline.v1 import endpoint_service_pb2 as ep_pb
from heartline.v1 import task_pb2, task_service_pb2
from tests.conftest import ServerProc, Stack, launch_server
from tests.helpers import Proc, tail, wait_state

cloudpickle.register_pickle_by_value(sys.modules[__name__])

TIMEOUT = 20.0
MiB = 1024 * 1024
BODIES_PER_METHOD = 20
CONNECT = "/heartline.v1.EndpointService/Connect"


def metadata() -> tuple[tuple[str, str], ...] | None:
    """The token a client of this test's server sends (the one its first start wrote)."""
    return _defaults.bearer_metadata(_defaults.token())


def wait_for_file(path: str) -> str:
    """A remote function that runs until ``path`` exists (the test's release), a minute
    at most."""
    deadline = time.monotonic() + 60
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.02)
    return "real"


# --------------------------------------------------------------------------- bodies


def _filled(descriptor: pb_descriptor.Descriptor, depth: int = 0) -> bytes:
    """A request of this type with every string, bytes and nested message field set, so
    that cutting it short lands inside a length-delimited field most of the time."""
    from google.protobuf import message_factory

    message = message_factory.GetMessageClass(descriptor)()
    for field in descriptor.fields:
        repeated = field.is_repeated if hasattr(field, "is_repeated") else field.label == 3
        if field.type == field.TYPE_STRING:
            value: object = "x" * 40
        elif field.type == field.TYPE_BYTES:
            value = b"y" * 40
        elif (
            field.type == field.TYPE_MESSAGE
            and depth < 2
            and not field.message_type.GetOptions().map_entry
        ):
            sub = message_factory.GetMessageClass(field.message_type).FromString(
                _filled(field.message_type, depth + 1)
            )
            if repeated:
                getattr(message, field.name).append(sub)
            else:
                getattr(message, field.name).CopyFrom(sub)
            continue
        else:
            continue
        if repeated:
            getattr(message, field.name).extend([value, value])
        else:
            setattr(message, field.name, value)
    return message.SerializeToString()


def bodies(descriptor: pb_descriptor.Descriptor, rng: random.Random) -> list[tuple[bytes, bool]]:
    """``BODIES_PER_METHOD`` hostile bodies, half random bytes and half truncated requests,
    each with whether it decodes as ``descriptor`` (judged by the same protobuf runtime
    the server uses). Most do not."""
    from google.protobuf import message_factory

    parse = message_factory.GetMessageClass(descriptor).FromString
    full = _filled(descriptor) or b"\x0a\x28" + b"x" * 40
    out = []
    for i in range(BODIES_PER_METHOD):
        if i % 2:
            body = full[: rng.randrange(1, len(full))]
        else:
            body = rng.randbytes(rng.randint(1, 64))
        try:
            parse(body)
        except Exception:  # noqa: BLE001 - any parse failure
            decodes = False
        else:
            decodes = True
        out.append((body, decodes))
    return out


def unary_methods() -> list[tuple[str, pb_descriptor.MethodDescriptor]]:
    """Every method a client sends one request to: TaskService's, RegisterEndpoint, and
    the health check (which answers without a token)."""
    services = [
        task_service_pb2.DESCRIPTOR.services_by_name["TaskService"],
        ep_pb.DESCRIPTOR.services_by_name["EndpointService"],
        health_pb2.DESCRIPTOR.services_by_name["Health"],
    ]
    return [
        (f"/{s.full_name}/{m.name}", m)
        for s in services
        for m in s.methods
        if not m.client_streaming and (s.name != "Health" or m.name == "Check")
    ]


async def _call(
    channel: grpc.aio.Channel, path: str, method, body: bytes
) -> grpc.aio.AioRpcError | None:
    """Send ``body`` raw; the error it answered, or None (OK, or a watch that stayed open)."""
    try:
        if method.server_streaming:
            call = channel.unary_stream(path)(body, metadata=metadata(), timeout=5)
            async for _ in call:
                break
            call.cancel()
        else:
            await channel.unary_unary(path)(body, metadata=metadata(), timeout=5)
    except grpc.aio.AioRpcError as err:
        if err.code() is grpc.StatusCode.DEADLINE_EXCEEDED and method.server_streaming:
            return None  # a watch of a decodable body waits for updates
        return err
    return None


def test_bodies_that_do_not_decode_answer_invalid_argument_quietly(
    server: ServerProc, agent: Proc, hc: Client
) -> None:
    rng = random.Random(8)
    sent = {path: bodies(method.input_type, rng) for path, method in unary_methods()}
    assert len(sent) >= 18, sorted(sent)

    async def send_all() -> list[str]:
        wrong = []
        async with grpc.aio.insecure_channel(server.address) as channel:
            for path, method in unary_methods():
                name = method.input_type.full_name
                for body, decodes in sent[path]:
                    err = await _call(channel, path, method, body)
                    code = None if err is None else err.code()
                    if not decodes:
                        prefix = f"the request body is not a valid {name}: "
                        if (
                            code is not grpc.StatusCode.INVALID_ARGUMENT
                            or not err.details().startswith(prefix)
                            or len(err.details()) > 300
                        ):
                            wrong.append(f"{path} {body!r}: {code} {err and err.details()!r}")
                    elif code in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL):
                        wrong.append(f"{path} decodable {body!r}: {code} {err.details()!r}")
        return wrong

    started = time.monotonic()
    wrong = asyncio.run(send_all())
    assert not wrong, "\n".join(wrong[:20])
    undecodable = sum(not decodes for bs in sent.values() for _, decodes in bs)
    assert undecodable >= len(sent) * BODIES_PER_METHOD // 2, undecodable
    took = time.monotonic() - started
    assert took < 30, f"{undecodable} bad bodies took {took:.1f}s"

    # Quiet: no traceback, no ERROR, and a few rate-limited lines for hundreds of bodies.
    text = server.proc.text()
    assert "Traceback" not in text and "level=ERROR" not in text, tail(server.proc)
    lines = [line for line in server.proc.output if "event=undecodable-request" in line]
    assert 1 <= len(lines) <= 1 + int(took // 10) + 1, lines

    # Healthy: the health check answers SERVING and a real task runs.
    with grpc.insecure_channel(server.address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=5
        )
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    assert hc.get_result(hc.submit("local", pow, 2, 10), timeout=TIMEOUT) == 1024


# --------------------------------------------------------------------------- Connect


async def _register(channel: grpc.aio.Channel, name: str) -> str:
    register = channel.unary_unary(
        "/heartline.v1.EndpointService/RegisterEndpoint",
        request_serializer=ep_pb.RegisterEndpointRequest.SerializeToString,
        response_deserializer=ep_pb.RegisterEndpointResponse.FromString,
    )
    reply = await register(ep_pb.RegisterEndpointRequest(name=name), metadata=metadata(), timeout=5)
    return reply.endpoint_id


def _hello(endpoint_id: str, agent_id: str, held: tuple[tuple[str, int], ...] = ()) -> bytes:
    return ep_pb.ConnectRequest(
        hello=ep_pb.Hello(
            endpoint_id=endpoint_id,
            agent_id=agent_id,
            capacity=1,
            held_tasks=[
                ep_pb.HeldTask(task_id=t, attempt=a, state=task_pb2.TASK_STATE_RUNNING)
                for t, a in held
            ],
        )
    ).SerializeToString()


async def _stream_outcome(
    channel: grpc.aio.Channel, first: list[bytes], hang: float = 30.0
) -> tuple[grpc.StatusCode | None, str, float, bytes | None]:
    """Open Connect, send ``first`` (raw messages), then say nothing more: the status the
    server closed it with, its details, after how many seconds, and a message it sent
    first (a welcome) if any."""
    started = time.monotonic()
    call = channel.stream_stream(CONNECT)(metadata=metadata(), timeout=hang)
    welcome = None
    try:
        for raw in first:
            await call.write(raw)
        while True:
            message = await call.read()
            if message is grpc.aio.EOF:
                break
            welcome = welcome or message
    except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
        pass  # the server closed the stream: its status is the call's (a write that
        # raced the close may report a status of its own)
    code = await call.code()
    took = time.monotonic() - started
    return (None if code is grpc.StatusCode.OK else code), await call.details() or "", took, welcome


def test_connect_streams_that_never_say_hello_or_say_something_else_are_closed(
    server: ServerProc,
) -> None:
    async def run() -> dict[str, tuple[grpc.StatusCode | None, str, float, bytes | None]]:
        async with grpc.aio.insecure_channel(server.address) as channel:
            endpoint_id = await _register(channel, "hostile")
            heartbeat = ep_pb.ConnectRequest(heartbeat=ep_pb.Heartbeat()).SerializeToString()
            cases = {
                "silent": [],
                "heartbeat first": [heartbeat],
                "empty message first": [b""],
                "garbage then hang": [b"\xff\xfe\xfd garbage"],
                "truncated hello then hang": [_hello(endpoint_id, str(uuid.uuid4()))[:-3]],
            }
            outcomes = await asyncio.gather(*(_stream_outcome(channel, m) for m in cases.values()))
            return dict(zip(cases, outcomes, strict=True))

    outcomes = asyncio.run(run())
    code, details, took, welcome = outcomes.pop("silent")
    assert code is grpc.StatusCode.DEADLINE_EXCEEDED and welcome is None, (code, details)
    assert details.startswith(f"no hello within {_defaults.HELLO_TIMEOUT:g}s"), details
    assert _defaults.HELLO_TIMEOUT - 0.5 <= took <= _defaults.HELLO_TIMEOUT + 3.0, took
    for case, (code, details, took, welcome) in outcomes.items():
        assert code is grpc.StatusCode.INVALID_ARGUMENT and welcome is None, (case, code, details)
        assert took < _defaults.HELLO_TIMEOUT, (case, took)
        if "hello" in case:
            assert details.startswith("the request body is not a valid heartline.v1.ConnectRequest")
        elif "first" in case:
            assert details.startswith("the first message on Connect must be a hello"), details
        else:
            assert "not a valid heartline.v1.ConnectRequest" in details, details
    text = server.proc.text()
    assert "Traceback" not in text and "level=ERROR" not in text, tail(server.proc)


def test_a_hello_with_a_live_agents_id_cannot_take_its_tasks(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Heartbeats of 1s: the live agent is never silent for the 2s that would let another
    # stream take its id over (as a reconnect after a network cut may), however loaded.
    srv = launch_server(home, tmp_path / "heartline.db", "127.0.0.1:0", "--heartbeat-interval", "1")
    monkeypatch.setenv("HEARTLINE_ADDRESS", srv.address)
    stack = Stack(srv)
    agent = stack.start_agent("local", 1)
    release = tmp_path / "release"
    with Client(srv.address) as hc:
        tid = hc.submit("local", wait_for_file, str(release))
        wait_state(hc, tid, TaskState.RUNNING, timeout=TIMEOUT)
        (endpoint,) = [e for e in hc.list_endpoints() if e.name == "local"]
        (live,) = endpoint.agents
        forged = ep_pb.ConnectRequest(
            status=ep_pb.StatusBatch(
                updates=[
                    ep_pb.StatusUpdate(
                        task_id=tid,
                        attempt=1,
                        state=task_pb2.TASK_STATE_SUCCEEDED,
                        result=dumps_result("forged"),
                    )
                ]
            )
        ).SerializeToString()

        async def hijack() -> tuple:
            async with grpc.aio.insecure_channel(srv.address) as channel:
                # The live agent's id, claiming its running task: refused at the hello
                # (nothing is written after it: a write racing the close would end the
                # call with a client-side status of its own).
                same_id = await _stream_outcome(
                    channel, [_hello(endpoint.id, live.agent_id, ((tid, 1),))], hang=5
                )
                # A new id of the same endpoint claiming the task: welcomed as an agent, but
                # the task stays with the agent running it, and the forged result is ignored.
                call = channel.stream_stream(CONNECT)(metadata=metadata(), timeout=10)
                await call.write(_hello(endpoint.id, str(uuid.uuid4()), ((tid, 1),)))
                welcome = ep_pb.ConnectResponse.FromString(await call.read())
                await call.write(forged)
                answers = [ep_pb.ConnectResponse.FromString(await call.read())]
                call.cancel()
                return same_id, welcome, answers

        same_id, welcome, answers = asyncio.run(hijack())
        code, details, _, first = same_id
        assert code is grpc.StatusCode.ALREADY_EXISTS and first is None, (code, details)
        assert details.startswith(f"agent id {live.agent_id!r} is connected on another stream")
        assert welcome.WhichOneof("message") == "welcome"
        # The server tells the impostor to drop the task it claimed (it is not bound to
        # it), and acknowledges nothing it could use.
        assert answers[0].WhichOneof("message") in ("cancel", "ack"), answers

        task = hc.get_task(tid)
        assert task.state is TaskState.RUNNING, task.history
        (endpoint,) = [e for e in hc.list_endpoints() if e.name == "local"]
        assert live.agent_id in [a.agent_id for a in endpoint.agents]
        release.touch()
        assert hc.get_result(tid, timeout=TIMEOUT) == "real"
        task = hc.get_task(tid)
        assert task.attempt == 1, task.history
        causes = [h.cause for h in task.history]
        assert causes.count("dispatch") == 1 and "agent-reconnected" not in causes, causes
        # The live agent still serves.
        assert hc.get_result(hc.submit("local", pow, 3, 4), timeout=TIMEOUT) == 81
    assert "Traceback" not in srv.proc.text(), tail(srv.proc, agent)


# --------------------------------------------------------------------------- memory


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/PID/status")
def test_memory_stays_bounded_after_many_big_functions(server: ServerProc) -> None:
    pid = server.proc.pid
    register = grpc.insecure_channel(server.address, options=[("grpc.max_send_message_length", -1)])
    rng = random.Random(4)
    payload = int(9.5 * MiB)

    def register_many(n: int) -> None:
        call = register.unary_unary("/heartline.v1.TaskService/RegisterFunction")
        for _ in range(n):
            body = task_service_pb2.RegisterFunctionRequest(function=rng.randbytes(payload))
            call(body.SerializeToString(), metadata=metadata(), timeout=TIMEOUT)

    try:
        before = rss_mib(pid)
        register_many(20)
        after_20 = rss_mib(pid)
        register_many(20)
        after_40 = rss_mib(pid)
    finally:
        register.close()
    # What bounds it: 64 MiB of cached functions (SERVER_FUNCTION_CACHE) and SQLite's
    # 64 MiB page cache over a ~50 MiB process, plus the calls' buffers in flight. It
    # was 408 MiB after 20, growing with each call; here 196-234 MiB after 20 or 40.
    assert after_20 < 280, (before, after_20)
    assert after_40 < 280 and after_40 < after_20 + 48, (before, after_20, after_40)
    assert "Traceback" not in server.proc.text(), tail(server.proc)


async def test_stored_functions_have_a_byte_budget_per_user(tmp_path: Path) -> None:
    from heartline._serialize import function_id
    from heartline.server._config import ServerConfig
    from heartline.server._core import ServerCore
    from heartline.server._rpc import Abort
    from heartline.server._store import SqliteStore

    config = ServerConfig(db=tmp_path / "heartline.db", max_function_bytes=3 * MiB)
    rng = random.Random(5)
    payloads = [rng.randbytes(MiB) for _ in range(4)]

    async def register(core: ServerCore, payload: bytes, owner: str) -> None:
        await core.register_function(payload, function_id(payload), owner)

    store = SqliteStore(config.effective_db)
    await store.open()
    try:
        core = ServerCore(config, store)
        await core.open()
        for payload in payloads[:3]:
            await register(core, payload, "alice")
        await register(core, payloads[0], "alice")  # known: costs nothing more
        with pytest.raises(Abort) as refused:
            await register(core, payloads[3], "alice")
        assert refused.value.code is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "limit of 3.0 MiB of stored functions per user" in refused.value.message
        assert "'alice' stored take 3.0 MiB" in refused.value.message, refused.value.message
        await register(core, payloads[3], "bob")  # another user's budget
        await register(core, payloads[1], "bob")  # stored already (alice's): free
        assert core.function_bytes == {"alice": 3 * MiB, "bob": MiB}
    finally:
        await store.close()

    # A restart counts what the store holds.
    store = SqliteStore(config.effective_db)
    await store.open()
    try:
        core = ServerCore(config, store)
        await core.open()
        assert core.function_bytes == {"alice": 3 * MiB, "bob": MiB}
        with pytest.raises(Abort):
            await register(core, rng.randbytes(MiB), "alice")
    finally:
        await store.close()


def test_the_undecodable_log_says_one_line_per_interval_and_counts_the_rest(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from heartline.server._decode import QuietLog

    now = [100.0]
    quiet = QuietLog(interval=10.0, clock=lambda: now[0])
    with caplog.at_level("WARNING", logger="heartline.server"):
        said = [quiet.warn("event=undecodable-request n=%d", i) for i in range(5)]
        now[0] += 10.0
        said.append(quiet.warn("event=undecodable-request n=%d", 5))
    assert said == [True, False, False, False, False, True]
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "event=undecodable-request n=0 suppressed=0",
        "event=undecodable-request n=5 suppressed=4",
    ]
