"""A server that is not there is said in words a newcomer can act on, by the CLI and the
Python client alike (no gRPC jargon, the address, and how to start or point at one)."""

from __future__ import annotations

import socket

import grpc
import pytest

import heartline
from heartline import Client, Executor
from heartline._errors import rpc_error_from_grpc, unreachable_message
from tests.helpers import run_cli


@pytest.fixture
def nobody() -> str:
    """A loopback address where nothing listens."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"127.0.0.1:{port}"


def assert_actionable(text: str, address: str) -> None:
    assert f"no heartline server answers at {address}" in text, text
    assert "heartline up" in text and "--server" in text and "HEARTLINE_ADDRESS" in text, text
    assert "ipv4:" not in text and "failed to connect to all addresses" not in text, text


@pytest.mark.parametrize("args", [("stats",), ("tasks", "list"), ("endpoints", "list")])
def test_every_cli_command_says_no_server_answers(nobody: str, args: tuple[str, ...]) -> None:
    out = run_cli(*args, "--server", nobody, timeout=60)
    assert out.returncode == 1, out.stdout
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), out.stderr
    assert_actionable(lines[0], nobody)
    assert "(connection refused)" in lines[0]


def test_the_environment_address_is_the_one_named(nobody: str) -> None:
    out = run_cli("stats", env={"HEARTLINE_ADDRESS": nobody}, timeout=60)
    assert out.returncode == 1
    assert_actionable(out.stderr, nobody)


def test_the_python_client_and_executor_say_it_too(nobody: str) -> None:
    with Client(nobody) as hc:
        with pytest.raises(heartline.UnavailableError) as info:
            hc.stats()
        assert_actionable(str(info.value), nobody)
        assert "Connection refused" in info.value.details  # gRPC's own words are kept
        with pytest.raises(heartline.UnavailableError) as info:
            hc.submit("local", pow, 2, 3)
        assert_actionable(str(info.value), nobody)
    with Executor("local", nobody) as ex:
        with pytest.raises(heartline.UnavailableError) as info:
            ex.submit(pow, 2, 3).result(timeout=30)
        assert_actionable(str(info.value), nobody)


class _Refused(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


def test_a_name_that_does_not_resolve_and_other_unavailables() -> None:
    dns = "errors resolving nohost.invalid:50051: [field:hostname lookup error:Domain name not found]"
    assert "the host name does not resolve" in (unreachable_message("nohost.invalid:50051", dns) or "")
    # An UNAVAILABLE that is not about reaching the server keeps the server's words.
    err = rpc_error_from_grpc(_Refused(grpc.StatusCode.UNAVAILABLE, "the store could not commit"), "h:1")
    assert err.message == "the store could not commit"
    # Without an address (or another code) nothing is rewritten.
    refused = _Refused(grpc.StatusCode.UNAVAILABLE, "failed to connect to all addresses; Connection refused")
    assert rpc_error_from_grpc(refused).message.startswith("failed to connect")
