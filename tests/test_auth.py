"""Identity and tokens (SPEC section 6): who may call, as whom, and what a revoke ends.

In process: the interceptor hands the caller's identity to unary and streaming handlers
alike. Against a real server: every call without a live token is UNAUTHENTICATED (health
and reflection answer anyone), the first start's token file, the token commands, a
revoke ending open streams, and agent tokens serving their own endpoint only.
"""

from __future__ import annotations

import asyncio
import json
import os
import stat
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from google.protobuf import wrappers_pb2

from heartline import Client, PermissionDeniedError, UnauthenticatedError
from heartline.server._auth import NO_AUTH, AuthInterceptor, Identity, Tokens, caller
from heartline.server._store import SqliteStore
from heartline.v1 import (
    admin_service_pb2,
    endpoint_service_pb2,
    endpoint_service_pb2_grpc,
    task_service_pb2,
    task_service_pb2_grpc,
)
from tests.conftest import ServerProc, Stack, launch_agent, launch_server, relaunch_server
from tests.helpers import (
    assert_eventually,
    authed_channel,
    endpoint_online,
    grpcurl,
    run_cli,
    tail,
)

TIMEOUT = 30.0

# --------------------------------------------------------------------------- in process

_PROBE = "heartline.test.Probe"


def _who() -> wrappers_pb2.StringValue:
    return wrappers_pb2.StringValue(value=caller().user)


async def _unary(request, context):
    await asyncio.sleep(0.01)  # let another call run in between
    return _who()


async def _unary_stream(request, context):
    for _ in range(3):
        await asyncio.sleep(0.01)
        yield _who()


async def _stream_stream(request_iterator, context):
    # As Connect does: reads with context.read(), writes with context.write(), and does
    # part of its work in a task of its own.
    async def in_a_task() -> str:
        await asyncio.sleep(0.01)
        return caller().user

    while (await context.read()) is not grpc.aio.EOF:
        await context.write(_who())
        await context.write(
            wrappers_pb2.StringValue(value=await asyncio.ensure_future(in_a_task()))
        )


async def _stream_unary(request_iterator, context):
    async for _ in request_iterator:
        await asyncio.sleep(0.01)
    return _who()


async def _probe_server(tokens: Tokens | None) -> tuple[grpc.aio.Server, str]:
    server = grpc.aio.server(interceptors=[AuthInterceptor(tokens)])
    de, ser = wrappers_pb2.StringValue.FromString, wrappers_pb2.StringValue.SerializeToString
    handlers = {
        "Unary": grpc.unary_unary_rpc_method_handler(_unary, de, ser),
        "UnaryStream": grpc.unary_stream_rpc_method_handler(_unary_stream, de, ser),
        "StreamStream": grpc.stream_stream_rpc_method_handler(_stream_stream, de, ser),
        "StreamUnary": grpc.stream_unary_rpc_method_handler(_stream_unary, de, ser),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(_PROBE, handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"


async def _ask_every_kind(channel: grpc.aio.Channel, token: str | None) -> list[str]:
    """The users the four kinds of handler saw, for calls with ``token``."""
    kw = {
        "request_serializer": wrappers_pb2.StringValue.SerializeToString,
        "response_deserializer": wrappers_pb2.StringValue.FromString,
    }
    md = (("authorization", f"Bearer {token}"),) if token else None
    req = wrappers_pb2.StringValue()
    seen = [
        (
            await channel.unary_unary(f"/{_PROBE}/Unary", **kw)(req, metadata=md, timeout=TIMEOUT)
        ).value
    ]
    call = channel.unary_stream(f"/{_PROBE}/UnaryStream", **kw)(req, metadata=md, timeout=TIMEOUT)
    seen += [r.value async for r in call]
    bidi = channel.stream_stream(f"/{_PROBE}/StreamStream", **kw)(metadata=md, timeout=TIMEOUT)
    await bidi.write(req)
    seen += [(await bidi.read()).value, (await bidi.read()).value]
    await bidi.done_writing()
    assert await bidi.read() is grpc.aio.EOF

    async def requests():
        for _ in range(2):
            yield req

    seen.append(
        (
            await channel.stream_unary(f"/{_PROBE}/StreamUnary", **kw)(
                requests(), metadata=md, timeout=TIMEOUT
            )
        ).value
    )
    return seen


async def test_caller_is_the_callers_identity_in_every_kind_of_handler(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "auth.db")
    await store.open()
    try:
        tokens = Tokens(store)
        await tokens.load()
        _, alice = await tokens.create("alice")
        _, bob = await tokens.create("bob")
        server, address = await _probe_server(tokens)
        try:
            async with grpc.aio.insecure_channel(address) as channel:
                # Interleaved calls of two users: each handler sees its own caller only.
                seen_a, seen_b = await asyncio.gather(
                    _ask_every_kind(channel, alice), _ask_every_kind(channel, bob)
                )
                assert seen_a == ["alice"] * 7
                assert seen_b == ["bob"] * 7
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await _ask_every_kind(channel, None)
                assert refused.value.code() is grpc.StatusCode.UNAUTHENTICATED
                assert refused.value.details().startswith("missing token:")
        finally:
            await server.stop(None)
    finally:
        await store.close()


async def test_without_auth_every_caller_is_the_anonymous_admin() -> None:
    assert NO_AUTH == Identity("anonymous", "", None, admin=True)
    server, address = await _probe_server(None)
    try:
        async with grpc.aio.insecure_channel(address) as channel:
            assert await _ask_every_kind(channel, None) == ["anonymous"] * 7
    finally:
        await server.stop(None)


def test_caller_outside_a_call_says_so() -> None:
    with pytest.raises(RuntimeError, match="only known inside a call"):
        caller()


# --------------------------------------------------------------------------- a real server


def _methods() -> list[tuple[str, bool]]:
    """Every TaskService, EndpointService and AdminService method, and whether it streams."""
    out = []
    for module, name in (
        (task_service_pb2, "TaskService"),
        (endpoint_service_pb2, "EndpointService"),
        (admin_service_pb2, "AdminService"),
    ):
        service = module.DESCRIPTOR.services_by_name[name]
        for method in service.methods:
            out.append(
                (
                    f"{service.full_name}/{method.name}",
                    method.client_streaming or method.server_streaming,
                )
            )
    return out


def _grpcurl_code(address: str, method: str, token: str | bool) -> str:
    out = grpcurl(address, method, data={}, options=("-max-time", "20"), token=token)
    assert out.returncode != 0, f"{method} answered without a valid token: {out.stdout}"
    return out.stderr


def _admin_token(home: Path) -> str:
    return (home / "token").read_text().strip()


def test_no_token_a_wrong_one_or_a_revoked_one_is_unauthenticated(server: ServerProc) -> None:
    with Client(server.address) as admin:
        revoked, info = admin.create_token("mallory")
        admin.revoke_token(info.id)
    good = _admin_token(server.home)
    wrong_secret = good.rsplit("_", 1)[0] + "_" + "x" * 43
    everywhere = [(False, "missing token"), (revoked, "invalid or revoked token")]
    somewhere = [
        ("hl_0123456789ab_nope", "invalid or revoked token"),
        (wrong_secret, "invalid or revoked token"),
        ("not-a-heartline-token", "invalid or revoked token"),
    ]
    methods = _methods()
    assert len(methods) >= 20
    # Every method without a token and with a revoked one; the other bad tokens on a
    # unary call and on each kind of stream (the interceptor's one path for all).
    streams = [m for m, streaming in methods if streaming]
    some = ["heartline.v1.TaskService/GetStats", *streams]
    jobs = [(m, token, why) for m, _ in methods for token, why in everywhere]
    jobs += [(m, token, why) for m in some for token, why in somewhere]
    with ThreadPoolExecutor(8) as pool:
        errors = list(pool.map(lambda job: _grpcurl_code(server.address, job[0], job[1]), jobs))
    for (method, _, why), stderr in zip(jobs, errors, strict=True):
        assert "Code: Unauthenticated" in stderr, (method, stderr)
        assert why in stderr, (method, stderr)

    # A Bearer header that is not "Bearer <token>" is no token at all.
    out = grpcurl(
        server.address,
        "heartline.v1.TaskService/GetStats",
        data={},
        options=("-H", "authorization: Basic YWRtaW46YWRtaW4="),
        token=False,
    )
    assert "Code: Unauthenticated" in out.stderr and "missing token" in out.stderr

    # Probes and reflection answer anyone.
    out = grpcurl(server.address, "grpc.health.v1.Health/Check", data={}, token=False)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {"status": "SERVING"}
    out = grpcurl(server.address, "list", token=False)
    assert out.returncode == 0, out.stderr
    assert "heartline.v1.AdminService" in out.stdout.split()
    out = grpcurl(server.address, "describe", "heartline.v1.AdminService", token=False)
    assert out.returncode == 0 and "rpc CreateToken" in out.stdout, out.stderr

    # And the good token answers.
    out = grpcurl(server.address, "heartline.v1.TaskService/GetStats", data={}, token=good)
    assert out.returncode == 0, out.stderr


def test_the_first_start_writes_a_0600_token_file_and_later_starts_keep_it(
    home: Path, tmp_path: Path
) -> None:
    srv = launch_server(home, tmp_path / "heartline.db", "127.0.0.1:0", "-v")  # -v: info lines
    path = home / "token"
    first = path.read_text()
    assert first.startswith("hl_") and first.endswith("\n")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert str(path) in srv.proc.text() and first.strip() not in srv.proc.text()
    before = path.stat()
    with Client(srv.address) as hc:  # reads the file through $HEARTLINE_HOME
        (only,) = hc.list_tokens()
        assert (only.user, only.endpoint, only.revoked) == ("admin", None, None)
        assert first.startswith(f"hl_{only.id}_")
    srv.proc.stop()

    again = relaunch_server(srv)
    try:
        after = path.stat()
        assert path.read_text() == first
        assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
        assert "admin-token-written" not in again.proc.text()
        with Client(again.address) as hc:
            assert [t.id for t in hc.list_tokens()] == [only.id]
    finally:
        again.proc.stop()


def test_auth_off_needs_no_token_and_writes_no_file(home: Path, tmp_path: Path) -> None:
    srv = launch_server(home, tmp_path / "heartline.db", "127.0.0.1:0", "--insecure-no-auth")
    try:
        assert not (home / "token").exists()
        out = grpcurl(srv.address, "heartline.v1.TaskService/GetStats", data={}, token=False)
        assert out.returncode == 0, out.stderr
        with Client(srv.address) as hc:
            assert hc.list_endpoints() == []
    finally:
        srv.proc.stop()


def _cli(srv: ServerProc, *args: str, token: str | None = None) -> tuple[int, str, str]:
    env = dict(srv.env)
    if token is not None:
        env["HEARTLINE_TOKEN"] = token
    out = run_cli(*args, env=env, timeout=TIMEOUT)
    return out.returncode, out.stdout, out.stderr


def test_token_create_list_and_revoke_from_the_cli(server: ServerProc) -> None:
    code, out, err = _cli(server, "token", "create", "--user", "alice")
    assert code == 0, err
    alice = out.strip()
    assert out == alice + "\n" and alice.startswith("hl_"), out  # only the token: $(...) works
    alice_id = alice.split("_")[1]

    code, out, err = _cli(server, "token", "create", "--user", "alice", "--endpoint", "gpu")
    assert code == 0, err
    agent_id = out.strip().split("_")[1]

    code, out, err = _cli(server, "token", "list")
    assert code == 0, err
    rows = {line.split()[1]: line for line in out.splitlines() if len(line.split()) > 2}
    assert {alice_id, agent_id} <= set(rows), out
    assert "gpu" in rows[agent_id] and "alice" in rows[alice_id]
    assert "admin" in out

    # A user lists its own tokens, and may not make any.
    code, out, err = _cli(server, "token", "list", token=alice)
    assert code == 0, err
    assert alice_id in out and agent_id in out and "admin" not in out
    code, out, err = _cli(server, "token", "create", "--user", "eve", token=alice)
    assert code == 1 and out == ""
    assert err.startswith("error: ") and "PERMISSION_DENIED" in err and "admins" in err

    with Client(server.address, token=alice) as hc:
        assert hc.stats() is not None
        code, out, err = _cli(server, "token", "revoke", alice_id)
        assert code == 0, err
        assert alice_id in out
        with pytest.raises(UnauthenticatedError, match="invalid or revoked token"):
            hc.stats()

    code, out, err = _cli(server, "token", "list")
    revoked_row = next(line for line in out.splitlines() if alice_id in line)
    assert revoked_row.split()[-1] != "-", revoked_row  # a revoke time
    code, out, err = _cli(server, "token", "revoke", "ffffffffffff")
    assert code == 1 and "NOT_FOUND" in err


def test_a_revoked_tokens_open_streams_end(server: ServerProc, start_agent) -> None:
    start_agent("local", 1)
    with Client(server.address) as admin:
        alice, alice_info = admin.create_token("alice")
        agent_token, agent_info = admin.create_token("admin", endpoint="solo")

    # An agent with an agent token: its Connect stream is the token's.
    agent = launch_agent(server.address, server.home, "solo", 1, "--token", agent_token)
    assert_eventually(
        lambda: endpoint_online(server.address, "solo"), timeout=TIMEOUT, message=tail(agent)
    )
    with authed_channel(server.address, alice) as channel:
        stub = task_service_pb2_grpc.TaskServiceStub(channel)
        watch = stub.WatchTasks(
            task_service_pb2.WatchTasksRequest(session_id="s1"), timeout=TIMEOUT
        )
        next(watch)  # the stream is open (its first answer: current state)
        with Client(server.address) as admin:
            admin.revoke_token(alice_info.id)
            admin.revoke_token(agent_info.id)
        with pytest.raises(grpc.RpcError) as ended:
            next(watch)
        assert ended.value.code() is grpc.StatusCode.UNAUTHENTICATED, ended.value
        assert alice_info.id in ended.value.details() and "revoked" in ended.value.details()

    # The agent's stream ended the same way; UNAUTHENTICATED is fatal to an agent.
    assert agent.popen.wait(timeout=TIMEOUT) != 0, tail(agent)
    assert "UNAUTHENTICATED" in agent.text() and "revoked" in agent.text(), tail(agent)
    assert_eventually(lambda: not endpoint_online(server.address, "solo"), timeout=TIMEOUT)


def test_an_agent_token_serves_its_own_endpoint_only(server: ServerProc, start_agent) -> None:
    start_agent("local", 1)  # the admin's
    with Client(server.address) as admin:
        agent_token, _ = admin.create_token("bob", endpoint="gpu")
        bob, _ = admin.create_token("bob")
        local_id = next(e.id for e in admin.list_endpoints() if e.name == "local")

    with authed_channel(server.address, agent_token) as channel:
        stub = endpoint_service_pb2_grpc.EndpointServiceStub(channel)
        with pytest.raises(grpc.RpcError) as refused:
            stub.RegisterEndpoint(
                endpoint_service_pb2.RegisterEndpointRequest(name="cpu"), timeout=TIMEOUT
            )
        assert refused.value.code() is grpc.StatusCode.PERMISSION_DENIED
        assert "'gpu'" in refused.value.details() and "'cpu'" in refused.value.details()

        hello = endpoint_service_pb2.ConnectRequest(
            hello=endpoint_service_pb2.Hello(endpoint_id=local_id, agent_id="intruder", capacity=1)
        )
        with pytest.raises(grpc.RpcError) as refused:
            list(stub.Connect(iter([hello]), timeout=TIMEOUT))
        assert refused.value.code() is grpc.StatusCode.PERMISSION_DENIED
        assert "'gpu'" in refused.value.details() and "'local'" in refused.value.details()

        # Nothing but its endpoint: no TaskService call.
        tasks = task_service_pb2_grpc.TaskServiceStub(channel)
        with pytest.raises(grpc.RpcError) as refused:
            tasks.GetStats(task_service_pb2.GetStatsRequest(), timeout=TIMEOUT)
        assert refused.value.code() is grpc.StatusCode.PERMISSION_DENIED

    # A real agent given the token for another endpoint stops with the refusal...
    wrong = launch_agent(server.address, server.home, "cpu", 1, "--token", agent_token)
    assert wrong.popen.wait(timeout=TIMEOUT) != 0, tail(wrong)
    assert "PERMISSION_DENIED" in wrong.text(), tail(wrong)

    # ... and serves its own: the endpoint is bob's, and runs bob's tasks.
    right = launch_agent(server.address, server.home, "gpu", 1, "--token", agent_token)
    assert_eventually(
        lambda: endpoint_online(server.address, "gpu"), timeout=TIMEOUT, message=tail(right)
    )
    with Client(server.address, token=bob) as hc:
        assert [e.name for e in hc.list_endpoints()] == ["gpu"]
        assert hc.get_result(hc.submit("gpu", pow, 2, 10), timeout=TIMEOUT) == 1024
    right.stop()


def test_a_shared_endpoint_takes_the_other_users_tasks(server: ServerProc, start_agent) -> None:
    start_agent("local", 1)
    with Client(server.address) as admin:
        carol, _ = admin.create_token("carol")
    with Client(server.address, token=carol) as hc:
        assert hc.list_endpoints() == []
        code, _, err = _cli(server, "endpoints", "share", "local", "--user", "carol", token=carol)
        assert code == 1 and "NOT_FOUND" in err  # not hers: as if it did not exist
        code, out, err = _cli(server, "endpoints", "share", "local", "--user", "carol")
        assert code == 0, err
        assert "carol" in out
        code, _, err = _cli(server, "endpoints", "share", "local", "--user", "nobody")
        assert code == 1 and "NOT_FOUND" in err and "heartline token create --user nobody" in err
        assert [e.name for e in hc.list_endpoints()] == ["local"]
        assert hc.get_result(hc.submit("local", pow, 3, 3), timeout=TIMEOUT) == 27


def test_the_token_file_and_a_token_in_the_environment(
    server: ServerProc, monkeypatch: pytest.MonkeyPatch
) -> None:
    """HEARTLINE_TOKEN comes before the file; the file before nothing."""
    from heartline import _defaults

    assert _defaults.token() == _admin_token(server.home)
    monkeypatch.setenv("HEARTLINE_TOKEN", "hl_000000000000_env")
    assert _defaults.token() == "hl_000000000000_env"
    assert _defaults.token("explicit") == "explicit"
    with Client(server.address) as hc, pytest.raises(UnauthenticatedError):
        hc.stats()
    monkeypatch.delenv("HEARTLINE_TOKEN")
    os.unlink(server.home / "token")
    assert _defaults.token() is None
    with Client(server.address) as hc, pytest.raises(UnauthenticatedError, match="missing token"):
        hc.stats()


def test_admin_calls_are_refused_to_non_admins(stack: Stack) -> None:
    with Client(stack.address) as admin:
        dave, info = admin.create_token("dave")
        _, other = admin.create_token("erin")
    with Client(stack.address, token=dave) as hc:
        with pytest.raises(PermissionDeniedError, match="admins"):
            hc.create_token("dave")
        assert [t.id for t in hc.list_tokens()] == [info.id]
        with pytest.raises(Exception, match="NOT_FOUND"):
            hc.revoke_token(other.id)  # another user's token: as if it did not exist
        assert hc.revoke_token(info.id).revoked is not None  # one's own
