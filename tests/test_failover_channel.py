"""A comma-separated list of server addresses (SPEC section 9): clients, agents and the
CLI talk to whichever server of the list is active (SERVING on the health service) and
follow a standby that takes over (heartline/_channel.py).

Three layers: the list's parsing and resolution; two in-process health-only servers that
show the channel's routing and failover; a real ``heartline server`` beside an in-process
standby (the health service alone, NOT_SERVING: any other call to it would fail
UNIMPLEMENTED) with a real Client, agent and CLI.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import re
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

import heartline
from heartline import AsyncClient, Client
from heartline._channel import (
    AddressError,
    open_channel,
    same_servers,
    server_target,
    split_servers,
)
from heartline._errors import tls_failure, unreachable_message
from heartline.endpoint import AgentConfig
from tests.certs import make_certs
from tests.conftest import ServerProc, launch_agent, launch_server
from tests.helpers import assert_eventually, endpoint_online, run_cli, tail

TIMEOUT = 30.0
FAST = 8.0  # seconds within which "nothing answers" is said (a retry would take 60)
WATCH = "/grpc.health.v1.Health/Watch"  # what gRPC's client-side health checking calls
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def _free_port() -> int:
    """A loopback port where nothing listens (until someone binds it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(autouse=True)
def _no_tls_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("HEARTLINE_TLS_CA", "HEARTLINE_TLS_CERT", "HEARTLINE_TLS_KEY"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def fake_dns(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[str]]:
    """Host names the test makes up, by their IP addresses (the rest resolve as ever)."""
    names: dict[str, list[str]] = {}
    real = socket.getaddrinfo

    def getaddrinfo(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        if host not in names:
            return real(host, port, *args, **kwargs)
        if not names[host]:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [
            (
                socket.AF_INET6 if ":" in ip else socket.AF_INET,
                socket.SOCK_STREAM,
                6,
                "",
                (ip, port, 0, 0) if ":" in ip else (ip, port),
            )
            for ip in names[host]
        ]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return names


# --------------------------------------------------------------------------- parsing


def test_one_address_goes_to_grpc_as_it_is() -> None:
    for address in ("127.0.0.1:50051", "localhost:1", "unix:/tmp/x.sock", "no-port", "[::1]:5"):
        target = server_target(address)
        assert (target.target, target.options, target.servers) == (address, (), ())
        assert split_servers(address) is None


def test_a_list_becomes_one_ipv4_target_balanced_by_health() -> None:
    target = server_target(" localhost:7001 ,127.0.0.1:7002,127.0.0.1:7001")
    # localhost is 127.0.0.1, spaces go, and the repeat is dialled once.
    assert target.target == "ipv4:127.0.0.1:7001,127.0.0.1:7002"
    assert target.servers == (("127.0.0.1", 7001), ("127.0.0.1", 7002))
    options = dict(target.options)
    assert json.loads(options["grpc.service_config"]) == {
        "loadBalancingConfig": [{"round_robin": {}}],
        "healthCheckConfig": {"serviceName": ""},
    }
    # TLS checks the first host as written, not the IP it resolved to.
    assert options["grpc.default_authority"] == "localhost:7001"
    assert "grpc.ssl_target_name_override" not in options
    assert split_servers("localhost:7001, [::1]:7002") == [("localhost", 7001), ("::1", 7002)]


def test_an_ipv6_list_and_names_with_several_addresses(fake_dns: dict[str, list[str]]) -> None:
    target = server_target("[::1]:7001,[::1]:7002")
    assert target.target == "ipv6:[::1]:7001,[::1]:7002"
    assert dict(target.options)["grpc.default_authority"] == "[::1]:7001"
    # Every address of a name is a server to try; a name with both families keeps IPv4
    # when the whole list can.
    fake_dns["two.test"] = ["10.0.0.1", "10.0.0.2", "fd00::1"]
    target = server_target("two.test:7001,127.0.0.1:7002")
    assert target.target == "ipv4:10.0.0.1:7001,10.0.0.2:7001,127.0.0.1:7002"
    assert dict(target.options)["grpc.default_authority"] == "two.test:7001"
    # ...and IPv6 when only IPv6 covers every item.
    fake_dns["six.test"] = ["fd00::2"]
    assert server_target("two.test:1,six.test:2").target == "ipv6:[fd00::1]:1,[fd00::2]:2"


@pytest.mark.parametrize(
    ("address", "says"),
    [
        ("127.0.0.1:1,,127.0.0.1:2", "server address list '127.0.0.1:1,,127.0.0.1:2' has an empty item"),
        ("127.0.0.1:1,", "has an empty item"),
        (",127.0.0.1:1", "has an empty item"),
        ("127.0.0.1:1, ", "has an empty item"),
        ("127.0.0.1:1,somehost", "server address 'somehost' in '127.0.0.1:1,somehost': no port"),
        ("127.0.0.1:1,:2", "server address ':2' in '127.0.0.1:1,:2': no host"),
        ("127.0.0.1:1,h:0", "server address 'h:0' in '127.0.0.1:1,h:0': the port must be a number from 1 to 65535, not '0'"),
        ("127.0.0.1:1,h:65536", "'h:65536' in '127.0.0.1:1,h:65536': the port must be"),
        ("127.0.0.1:1,h:http", "not 'http'"),
        ("127.0.0.1:1,h:", "server address 'h:' in '127.0.0.1:1,h:': the port must be"),
        ("::1:5,127.0.0.1:1", "server address '::1:5' in '::1:5,127.0.0.1:1': expected HOST:PORT, an IPv6 host in brackets as [::1]:PORT"),
        ("[::1]:1,[::1]", "server address '[::1]' in '[::1]:1,[::1]': no port"),
        ("[::1:1,127.0.0.1:2", "server address '[::1:1' in '[::1:1,127.0.0.1:2': no ']' after the IPv6 host"),
        ("[myhost]:1,127.0.0.1:2", "'myhost' in brackets is not an IPv6 address"),
        ("[::1]x1,127.0.0.1:2", "server address '[::1]x1' in '[::1]x1,127.0.0.1:2': no port"),
    ],
)  # fmt: skip
def test_a_malformed_list_is_refused_naming_the_item(address: str, says: str) -> None:
    with pytest.raises(AddressError) as info:
        split_servers(address)
    assert says in str(info.value)
    assert isinstance(info.value, ValueError)
    # The same for every face: the client, the agent's config, the channel itself.
    with pytest.raises(heartline.InvalidArgumentError, match=re.escape(says)):
        Client(address)
    with pytest.raises(ValueError, match=re.escape(says)):
        AgentConfig(name="x", server=address)
    with pytest.raises(AddressError, match=re.escape(says)):
        open_channel(address)


def test_a_host_of_a_list_that_does_not_resolve_is_named(fake_dns: dict[str, list[str]]) -> None:
    fake_dns["gone.test"] = []
    address = "127.0.0.1:1,gone.test:2"
    with pytest.raises(AddressError) as info:
        server_target(address)
    assert str(info.value) == (
        "server address 'gone.test:2' in '127.0.0.1:1,gone.test:2': the host name does not "
        "resolve (Name or service not known)"
    )
    # The client says it at its first call (its form was fine), in one line.
    with Client(address) as hc, pytest.raises(heartline.InvalidArgumentError) as err:
        hc.stats()
    assert "'gone.test:2'" in str(err.value) and "does not resolve" in str(err.value)


def test_a_list_that_shares_no_family_is_refused(fake_dns: dict[str, list[str]]) -> None:
    fake_dns["v6only.test"] = ["fd00::9"]
    with pytest.raises(AddressError) as info:
        server_target("127.0.0.1:1,v6only.test:2")
    assert str(info.value).startswith(
        "server address 'v6only.test:2' in '127.0.0.1:1,v6only.test:2' has only IPv6 "
        "addresses and '127.0.0.1:1' only IPv4 ones"
    )
    # localhost is IPv4 here, so it never makes a list mixed by its ::1.
    with pytest.raises(AddressError, match="'\\[::1\\]:2' in 'localhost:1,\\[::1\\]:2'"):
        server_target("localhost:1,[::1]:2")


def test_same_servers_ignores_order_and_spaces() -> None:
    assert same_servers("a:1,b:2", "b:2, a:1")
    assert same_servers("a:1", "a:1")
    assert not same_servers("a:1,b:2", "a:1")
    assert not same_servers("a:1", "a:2")


def test_grpc_words_of_a_list_are_said_plainly() -> None:
    # round_robin's words (a list), not pick_first's: a TLS failure is still one...
    untrusted = (
        "connections to all backends failing; last error: UNKNOWN: ipv4:127.0.0.1:1: "
        "Custom verification check failed with error: UNAUTHENTICATED: Hostname "
        "Verification Check failed."
    )
    assert tls_failure(untrusted)
    message = unreachable_message("name.test:1,other.test:2", untrusted, tls=True) or ""
    assert message.startswith("cannot connect to name.test:1,other.test:2 over TLS: ")
    assert "not issued for name.test;" in message  # the list's first host
    # ...nothing listening is still said as such...
    refused = (
        "connections to all backends failing; last error: UNKNOWN: ipv4:127.0.0.1:1: "
        "Failed to connect to remote host: Connection refused"
    )
    assert not tls_failure(refused)
    said = unreachable_message("a:1,b:2", refused) or ""
    assert said.startswith("no heartline server answers at a:1,b:2 (connection refused)")
    # ...and servers that all stand by are said to.
    standing_by = (
        "connections to all backends failing; last error: ipv4:127.0.0.1:2: backend unhealthy"
    )
    assert not tls_failure(standing_by)
    said = unreachable_message("a:1,b:2", standing_by) or ""
    assert said.startswith("no heartline server at a:1,b:2 is active: those that answer stand by")


def test_the_cli_checks_the_list_and_says_it_takes_one() -> None:
    out = run_cli("tasks", "list", "--server", "127.0.0.1:1,127.0.0.1")
    assert out.returncode == 2, out
    assert "Invalid value for '--server': server address '127.0.0.1' in" in out.stderr, out.stderr
    out = run_cli("endpoint", "start", "--name", "x", "--server", "127.0.0.1:1,,127.0.0.1:2")
    assert out.returncode == 2 and "has an empty item" in out.stderr, out.stderr
    out = run_cli("endpoint", "start", "--name", "x", env={"HEARTLINE_ADDRESS": "127.0.0.1:1,h:0"})
    assert out.returncode == 2, out
    assert "$HEARTLINE_ADDRESS: server address 'h:0'" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr
    for args in (("tasks", "list"), ("endpoint", "start"), ("stats",)):
        out = run_cli(*args, "--help")
        assert "HOST:PORT[,HOST:PORT...]" in out.stdout, out.stdout


# --------------------------------------------------------------------------- routing


class _Recorder(grpc.aio.ServerInterceptor):
    def __init__(self, calls: list[str]) -> None:
        self.calls = calls

    async def intercept_service(self, continuation: Any, details: Any) -> Any:
        self.calls.append(details.method)
        return await continuation(details)


class HealthServer:
    """A grpc.aio server with the health service alone. It says SERVING (or not) for
    "", and always SERVING for its own ``name``: a Check of that name tells which
    server answered (another answers NOT_FOUND). ``calls`` are the methods it saw."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.calls: list[str] = []
        self.port = 0
        self._server: grpc.aio.Server | None = None
        self._health = health.aio.HealthServicer()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self, serving: bool, credentials: grpc.ServerCredentials | None = None) -> None:
        server = grpc.aio.server(interceptors=[_Recorder(self.calls)])
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        if credentials is None:
            self.port = server.add_insecure_port("127.0.0.1:0")
        else:
            self.port = server.add_secure_port("127.0.0.1:0", credentials)
        await server.start()
        self._server = server
        await self.set(serving)
        await self._health.set(self.name, SERVING)

    async def set(self, serving: bool) -> None:
        await self._health.set("", SERVING if serving else NOT_SERVING)

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.stop(None)


async def _answered_by(channel: grpc.aio.Channel, name: str, calls: int = 10) -> bool:
    """Whether ``calls`` calls in a row all reach the server called ``name``."""
    stub = health_pb2_grpc.HealthStub(channel)
    for _ in range(calls):
        try:
            await stub.Check(
                health_pb2.HealthCheckRequest(service=name), timeout=5, wait_for_ready=True
            )
        except grpc.aio.AioRpcError:
            return False
    return True


async def _eventually(
    check: Callable[[], Awaitable[bool]], what: str, timeout: float = 15.0
) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await check():
        if loop.time() > deadline:
            raise AssertionError(f"{what}: not within {timeout}s")
        await asyncio.sleep(0.05)


@pytest.fixture
async def pair() -> Any:
    a, b = HealthServer("a"), HealthServer("b")
    await a.start(serving=True)
    await b.start(serving=False)
    yield a, b
    await a.stop()
    await b.stop()


@pytest.mark.parametrize("active_first", [True, False])
async def test_the_channel_goes_to_the_serving_server_and_follows_a_flip(
    pair: tuple[HealthServer, HealthServer], active_first: bool
) -> None:
    a, b = pair
    listed = [a.address, b.address] if active_first else [b.address, a.address]
    async with open_channel(" , ".join(listed)) as channel:
        # Every call goes to the SERVING one, from the first on; never to the standby.
        assert await _answered_by(channel, "a", calls=20)
        assert b.calls and set(b.calls) == {WATCH}, b.calls  # checked, never called

        # The active one steps down and the standby takes over, both alive.
        await a.set(False)
        await b.set(True)
        await _eventually(lambda: _answered_by(channel, "b"), "calls follow to b")
        assert await _answered_by(channel, "b", calls=20)

        # b dies; a serves again.
        await b.stop()
        await a.set(True)
        await _eventually(lambda: _answered_by(channel, "a"), "calls follow back to a")


async def test_a_list_over_tls_checks_the_first_hosts_certificate(
    tmp_path: Path, fake_dns: dict[str, list[str]]
) -> None:
    certs = make_certs(tmp_path / "certs")  # for 127.0.0.1, ::1 and localhost
    server_credentials = grpc.ssl_server_credentials(
        [(certs.server.key.read_bytes(), certs.server.cert.read_bytes())]
    )
    credentials = grpc.ssl_channel_credentials(root_certificates=certs.ca.read_bytes())
    a, b = HealthServer("a"), HealthServer("b")
    await a.start(serving=False, credentials=server_credentials)
    await b.start(serving=True, credentials=server_credentials)
    try:
        async with open_channel(f"localhost:{a.port},localhost:{b.port}", credentials) as channel:
            assert await _answered_by(channel, "b")
        # A first host the certificate does not name: refused, whatever IP it has.
        fake_dns["elsewhere.test"] = ["127.0.0.1"]
        address = f"elsewhere.test:{a.port},localhost:{b.port}"
        async with open_channel(address, credentials) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.Check(health_pb2.HealthCheckRequest(service="b"), timeout=10)
        details = info.value.details() or ""
        assert info.value.code() is grpc.StatusCode.UNAVAILABLE and tls_failure(details), details
        said = unreachable_message(address, details, tls=True) or ""
        assert "the server's certificate is not issued for elsewhere.test" in said, said
    finally:
        await a.stop()
        await b.stop()


async def test_a_client_that_never_reached_a_list_gives_up_only_if_nothing_listens() -> None:
    standby = HealthServer("standby")
    await standby.start(serving=False)
    refused = (
        "connections to all backends failing; last error: UNKNOWN: ipv4:127.0.0.1:1: "
        "Failed to connect to remote host: Connection refused"
    )
    nobody, other = f"127.0.0.1:{_free_port()}", f"127.0.0.1:{_free_port()}"
    try:
        async with AsyncClient(f"{nobody},{other}") as client:
            assert await client._nobody_there(refused)  # nothing at either: said at once
        async with AsyncClient(f"{nobody},{standby.address}") as client:
            # Whatever gRPC last saw, a server that answers may take over: keep trying.
            assert not await client._nobody_there(refused)
            standing_by = "connections to all backends failing; last error: backend unhealthy"
            assert not await client._nobody_there(standing_by)
        async with AsyncClient(nobody) as client:
            assert await client._nobody_there(refused)  # one address: as ever
    finally:
        await standby.stop()


# --------------------------------------------------------------------------- end to end


class Standby:
    """A :class:`HealthServer` standing by (NOT_SERVING) on a loop thread of its own, for
    tests whose clients block."""

    def __init__(self) -> None:
        self.server = HealthServer("standby")
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._call(self.server.start(serving=False))

    @property
    def address(self) -> str:
        return self.server.address

    @property
    def calls(self) -> list[str]:
        return list(self.server.calls)

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=10)

    def close(self) -> None:
        try:
            self._call(self.server.stop())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
            self._loop.close()


@pytest.fixture
def standby() -> Iterator[Standby]:
    server = Standby()
    yield server
    server.close()


def test_a_client_an_agent_and_the_cli_use_the_active_server_of_a_list(
    server: ServerProc, standby: Standby
) -> None:
    listed = f"{standby.address},{server.address}"
    agent = launch_agent(listed, server.home, "failover", 2)
    assert_eventually(
        lambda: endpoint_online(server.address, "failover"),
        timeout=TIMEOUT,
        message=f"agent online through the list\n{tail(agent, server)}",
    )
    assert f"connected to {listed}" in agent.wait_for_line("connected to", timeout=TIMEOUT)

    ids = []
    for address in (listed, f"{server.address} , {standby.address}"):
        with Client(address) as hc:
            batch = hc.submit_batch("failover", [(pow, (2, i), {}) for i in range(8)])
            assert [hc.get_result(tid, timeout=TIMEOUT) for tid in batch] == [
                2**i for i in range(8)
            ]
            ids += batch

    out = run_cli("tasks", "list", "--server", listed, "--limit", "100", timeout=TIMEOUT)
    assert out.returncode == 0, out.stderr
    assert all(tid in out.stdout for tid in ids), out.stdout
    out = run_cli("stats", env={"HEARTLINE_ADDRESS": listed}, timeout=TIMEOUT)
    assert out.returncode == 0, out.stderr

    # The standby was health-checked by each, and never sent anything else (it would
    # have answered UNIMPLEMENTED, failing the calls above).
    assert standby.calls.count(WATCH) >= 3 and set(standby.calls) == {WATCH}, standby.calls


def test_a_list_where_nothing_listens_is_said_at_once() -> None:
    address = f"127.0.0.1:{_free_port()},localhost:{_free_port()}"
    start = time.monotonic()
    with Client(address, retry_timeout=60) as hc, pytest.raises(heartline.UnavailableError) as info:
        hc.stats()
    assert time.monotonic() - start < FAST, f"took {time.monotonic() - start:.1f}s"
    assert str(info.value).startswith(f"no heartline server answers at {address} ("), info.value
    out = run_cli("stats", "--server", address, timeout=TIMEOUT)
    assert out.returncode == 1, out
    assert out.stderr.startswith(f"error: no heartline server answers at {address} ("), out.stderr


def test_clients_and_agents_wait_for_a_server_of_the_list_to_be_active(
    home: Path, tmp_path: Path, standby: Standby
) -> None:
    port = _free_port()  # where the active server will start
    listed = f"{standby.address},127.0.0.1:{port}"
    agent = launch_agent(listed, home, "late", 1)
    with (
        Client(listed, retry_timeout=60) as hc,
        concurrent.futures.ThreadPoolExecutor(1) as pool,
    ):
        stats = pool.submit(hc.stats)
        # The client has tried (the standby was health-checked) and keeps trying: one
        # server of its list answers, though none is active yet.
        assert_eventually(lambda: standby.calls.count(WATCH) >= 2, timeout=TIMEOUT)
        assert not stats.done(), stats.exception()
        assert agent.popen.poll() is None, agent.text()

        # Without auth: the client's token would be read before this server writes one.
        late = launch_server(
            home, tmp_path / "heartline.db", f"127.0.0.1:{port}", "--insecure-no-auth"
        )
        assert stats.result(timeout=TIMEOUT).start_time is not None
        assert_eventually(
            lambda: endpoint_online(late.address, "late"),
            timeout=TIMEOUT,
            message=f"agent online once a server is active\n{tail(agent, late)}",
        )
        tid = hc.submit("late", pow, 3, 4)
        assert hc.get_result(tid, timeout=TIMEOUT) == 81
    assert set(standby.calls) == {WATCH}, standby.calls
