"""An endpoint's function allow-list (SPEC section 5), end to end: a real server, real
agents started with ``--allow-function`` or a list in their config file, ids from
``Client.register_function``.

The server learns the list from each agent's hello (kept in its store, so a restart
keeps it) and refuses a submit, a group or a resubmit of another function
``PERMISSION_DENIED`` before anything is stored; a task of another function that reached
the endpoint before the server knew (queued while no agent was connected) is refused by
the agent itself: ERRORED, never run.
"""

from __future__ import annotations

import functools
import sys
import threading
from pathlib import Path

import cloudpickle
import pytest

import heartline
from heartline import Client, Group, GroupStatus, TaskState
from heartline.v1 import endpoint_service_pb2, endpoint_service_pb2_grpc
from tests.conftest import ServerProc, relaunch_server
from tests.helpers import (
    Proc,
    assert_eventually,
    authed_channel,
    endpoint_online,
    run_cli,
    tail,
    wait_state,
)

cloudpickle.register_pickle_by_value(sys.modules[__name__])

TIMEOUT = 30.0


def square(x: int) -> int:
    return x * x


def shout(text: str) -> str:
    return text.upper()


def _task_count(hc: Client) -> int:
    return len(hc.list_tasks(limit=1000))


def _refused(hc: Client, fid: str, endpoint: str, call) -> str:
    """Run ``call``; assert it is refused PERMISSION_DENIED naming the function and the
    endpoint, and stored nothing. Returns the message."""
    tasks, groups = _task_count(hc), len(hc.list_groups(limit=1000))
    with pytest.raises(heartline.PermissionDeniedError) as info:
        call()
    message = str(info.value)
    assert fid in message and repr(endpoint) in message, message
    assert "allow-list" in message, message
    assert (_task_count(hc), len(hc.list_groups(limit=1000))) == (tasks, groups)
    return message


def test_register_function_returns_the_id_a_submit_uses(server: ServerProc, hc: Client) -> None:
    fid = hc.register_function(square)
    assert len(fid) == 64 and int(fid, 16) >= 0
    assert hc.register_function(square) == fid  # cached: the same id, nothing sent again
    assert hc.register_function(shout) != fid
    with pytest.raises(heartline.SerializationError):
        hc.register_function(functools.partial(print, threading.Lock()))  # a lock won't pickle


def test_an_agent_runs_only_the_functions_it_allows(
    server: ServerProc, start_agent, hc: Client
) -> None:
    allowed, other = hc.register_function(square), hc.register_function(shout)
    start_agent("picky", 1, "--allow-function", allowed)

    assert hc.get_result(hc.submit("picky", square, 7), timeout=TIMEOUT) == 49

    message = _refused(hc, other, "picky", lambda: hc.submit("picky", shout, "no"))
    assert "--allow-function" in message
    # A batch with one function not allowed is refused whole.
    _refused(
        hc,
        other,
        "picky",
        lambda: hc.submit_batch("picky", [(square, (1,), {}), (shout, ("no",), {})]),
    )
    # A group with one task of a function not allowed: the whole group, nothing stored.
    g = Group("mixed", endpoint="picky")
    a = g.task("a", square, 3)
    g.task("b", shout, a)
    _refused(hc, other, "picky", lambda: hc.submit_group(g))
    # An allowed group runs.
    ok = Group("fine", endpoint="picky")
    first = ok.task("a", square, 2)
    ok.task("b", square, first)
    assert hc.wait_group(hc.submit_group(ok), timeout=TIMEOUT).status is GroupStatus.SUCCEEDED
    # Another endpoint of the same user, without a list, runs anything.
    start_agent("open", 1)
    assert hc.get_result(hc.submit("open", shout, "yes"), timeout=TIMEOUT) == "YES"


def _register_endpoint(server: ServerProc, name: str) -> None:
    """Register an endpoint as an agent would, without starting one."""
    channel = authed_channel(server.address)
    try:
        stub = endpoint_service_pb2_grpc.EndpointServiceStub(channel)
        stub.RegisterEndpoint(endpoint_service_pb2.RegisterEndpointRequest(name=name), timeout=10)
    finally:
        channel.close()


def test_the_agent_refuses_what_reached_it_before_the_server_knew_and_a_restart_keeps_the_list(
    server: ServerProc, start_agent, hc: Client, home: Path
) -> None:
    allowed, other = hc.register_function(square), hc.register_function(shout)
    _register_endpoint(server, "filed")
    # No agent has said hello yet: the server knows no list, so both are queued.
    early_ok = hc.submit("filed", square, 4)
    early_other = hc.submit("filed", shout, "queued before the hello")
    # The list comes from the endpoint's config file this time (no --allow-function).
    folder = home / "endpoints" / "filed"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.toml").write_text(f'allowed_functions = ["{allowed}"]\n')
    agent: Proc = start_agent("filed", 1)

    assert hc.get_result(early_ok, timeout=TIMEOUT) == 16
    refused = wait_state(hc, early_other, TaskState.ERRORED, timeout=TIMEOUT)
    assert refused.error is not None and refused.error.type_name == "PermissionError"
    assert other in refused.error.message and "'filed'" in refused.error.message
    assert "not run" in refused.error.message
    # Since the hello, the server refuses it at once, and a resubmit of the refused task.
    _refused(hc, other, "filed", lambda: hc.submit("filed", shout, "again"))
    hc.give_up([early_other])
    _refused(hc, other, "filed", lambda: hc.resubmit([early_other]))

    # The list outlives the server and the agent: refused before any agent says hello.
    agent.stop()
    server.proc.stop()
    again = relaunch_server(server)
    try:
        with Client(again.address) as fresh:
            _refused(fresh, other, "filed", lambda: fresh.submit("filed", shout, "later"))
            queued = fresh.submit("filed", square, 5)  # allowed: queued for the agent
            assert fresh.get_task(queued).state is TaskState.WAITING_FOR_EP
            # An agent started without a list lifts it (its hello says it has none).
            (folder / "config.toml").unlink()
            start_agent_on(again, "filed")
            assert fresh.get_result(queued, timeout=TIMEOUT) == 25
            assert fresh.get_result(fresh.submit("filed", shout, "now"), timeout=TIMEOUT) == "NOW"
    finally:
        again.proc.stop()


def start_agent_on(server: ServerProc, name: str) -> Proc:
    from tests.conftest import launch_agent

    proc = launch_agent(server.address, server.home, name, 1)
    assert_eventually(
        lambda: endpoint_online(server.address, name),
        timeout=TIMEOUT,
        message=f"agent {name!r} online\n{tail(proc)}",
    )
    return proc


def test_the_cli_refuses_a_malformed_list_before_it_connects(home: Path) -> None:
    out = run_cli("endpoint", "start", "--name", "x", "--allow-function", "square", timeout=30)
    assert out.returncode == 2, out.stderr
    assert "--allow-function" in out.stderr and "'square' is not a function id" in out.stderr
    folder = home / "endpoints" / "x"
    folder.mkdir(parents=True)
    (folder / "config.toml").write_text('allowed_functions = "abc"\n')
    out = run_cli("endpoint", "start", "--name", "x", timeout=30)
    assert out.returncode == 2, out.stderr
    assert "config.toml: allowed_functions must be a list of function ids" in out.stderr
    (folder / "config.toml").write_text("alowed_functions = []\n")
    out = run_cli("endpoint", "start", "--name", "x", timeout=30)
    assert out.returncode == 2 and "unknown key 'alowed_functions'" in out.stderr, out.stderr


def test_the_server_refuses_a_hello_with_a_malformed_list(server: ServerProc) -> None:
    import grpc

    _register_endpoint(server, "forged")
    channel = authed_channel(server.address)
    try:
        stub = endpoint_service_pb2_grpc.EndpointServiceStub(channel)
        reply = stub.RegisterEndpoint(
            endpoint_service_pb2.RegisterEndpointRequest(name="forged"), timeout=10
        )
        hello = endpoint_service_pb2.Hello(
            endpoint_id=reply.endpoint_id,
            agent_id="a-1",
            capacity=1,
            allowed_functions=endpoint_service_pb2.AllowedFunctions(function_ids=["nope"]),
        )
        call = stub.Connect(iter([endpoint_service_pb2.ConnectRequest(hello=hello)]), timeout=10)
        with pytest.raises(grpc.RpcError) as info:
            list(call)
        assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert "'nope' is none" in info.value.details()
    finally:
        channel.close()
