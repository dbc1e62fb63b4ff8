"""TLS and mutual TLS, end to end: a real server with `--tls-cert/--tls-key
[--tls-client-ca]`, real agents, the Python client, the CLI and grpcurl. A client that
does not trust the server, or that the server refuses, fails within seconds with one line
that says why, not after the client's whole retry_timeout.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import heartline
from heartline import TLS, Client, Executor
from heartline._errors import tls_failure, unreachable_message
from tests.certs import Certs, make_certs
from tests.conftest import ServerProc, launch_agent, launch_server
from tests.helpers import (
    Proc,
    assert_eventually,
    grpcurl,
    heartline_cmd,
    run_cli,
    start_process,
    tail,
)

TIMEOUT = 30.0
FAST = 8.0  # seconds within which a refused connection is said (a retry would take 60)


def double(x: int) -> int:
    return 2 * x


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def strangers(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    """Another CA and its certificates: nothing of ours trusts them."""
    return make_certs(tmp_path_factory.mktemp("other-certs"))


@pytest.fixture(autouse=True)
def _no_tls_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("HEARTLINE_TLS_CA", "HEARTLINE_TLS_CERT", "HEARTLINE_TLS_KEY"):
        monkeypatch.delenv(var, raising=False)


def _server_tls(certs: Certs, mutual: bool = False) -> tuple[str, ...]:
    flags = ("--tls-cert", str(certs.server.cert), "--tls-key", str(certs.server.key))
    return (*flags, "--tls-client-ca", str(certs.ca)) if mutual else flags


def _client_flags(certs: Certs, with_cert: bool = True) -> tuple[str, ...]:
    flags = ("--tls-ca", str(certs.ca))
    if with_cert:
        flags += ("--tls-cert", str(certs.client.cert), "--tls-key", str(certs.client.key))
    return flags


def _online(address: str, name: str, tls: TLS) -> bool:
    with Client(address, tls=tls) as hc:
        try:
            endpoints = hc.list_endpoints()
        except heartline.UnavailableError:
            return False
    return any(ep.name == name and ep.online for ep in endpoints)


def _start_agent(server: ServerProc, tls: TLS, *flags: str, name: str = "local") -> Proc:
    agent = launch_agent(server.address, server.home, name, 1, *flags)
    assert_eventually(
        lambda: _online(server.address, name, tls),
        timeout=TIMEOUT,
        message=f"agent online\n{tail(agent, server)}",
    )
    return agent


@pytest.fixture
def tls_server(home: Path, tmp_path: Path, certs: Certs) -> Iterator[ServerProc]:
    server = launch_server(home, tmp_path / "heartline.db", "127.0.0.1:0", *_server_tls(certs))
    yield server
    server.proc.stop()


@pytest.fixture
def mtls_server(home: Path, tmp_path: Path, certs: Certs) -> Iterator[ServerProc]:
    server = launch_server(
        home, tmp_path / "heartline.db", "127.0.0.1:0", *_server_tls(certs, mutual=True)
    )
    yield server
    server.proc.stop()


def _listening_line(server: ServerProc) -> str:
    return next(line for line in server.proc.output if "listening on" in line)


def _fails_fast(address: str, tls: TLS | bool) -> heartline.UnavailableError:
    """The error a fresh client with ``tls`` gets, checked to come within FAST seconds
    although the client would retry a server that is away for a minute."""
    start = time.monotonic()
    with (
        Client(address, tls=tls, retry_timeout=60) as hc,
        pytest.raises(heartline.UnavailableError) as info,
    ):
        hc.stats()
    assert time.monotonic() - start < FAST, f"took {time.monotonic() - start:.1f}s"
    message = str(info.value)
    assert len(message.splitlines()) == 1, message
    assert "ipv4:" not in message and "TSI_" not in message, message  # no gRPC jargon
    return info.value


def _cli_fails_fast(*args: str) -> str:
    """The one line a CLI command prints on stderr when it cannot talk to the server."""
    start = time.monotonic()
    out = run_cli(*args, timeout=TIMEOUT)
    assert time.monotonic() - start < FAST + 7, f"took {time.monotonic() - start:.1f}s"
    assert out.returncode == 1, (out.stdout, out.stderr)
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), out.stderr
    return lines[0]


# --------------------------------------------------------------------------- TLS


def test_tls_server_serves_client_agent_cli_and_grpcurl(
    tls_server: ServerProc, certs: Certs, monkeypatch: pytest.MonkeyPatch
) -> None:
    address = tls_server.address
    assert "(TLS)" in _listening_line(tls_server), tls_server.proc.text()
    tls = TLS(ca=certs.ca)
    agent = _start_agent(tls_server, tls, "--tls-ca", str(certs.ca))
    assert_eventually(lambda: "over TLS" in agent.text(), timeout=TIMEOUT)

    with Client(address, tls=tls) as hc:
        assert hc.tls == tls
        tid = hc.submit("local", double, 21)
        assert hc.get_result(tid, timeout=TIMEOUT) == 42
    with Executor("local", address, tls=tls) as ex:
        assert ex.submit(double, 4).result(timeout=TIMEOUT) == 8

    out = run_cli("tasks", "show", tid, "--server", address, "--tls-ca", str(certs.ca))
    assert out.returncode == 0, out.stderr
    assert "success" in out.stdout, out.stdout

    # HEARTLINE_TLS_CA does for the CLI and the client what --tls-ca does.
    out = run_cli("endpoints", "list", "--server", address, env={"HEARTLINE_TLS_CA": str(certs.ca)})
    assert out.returncode == 0 and "local" in out.stdout, out.stderr
    monkeypatch.setenv("HEARTLINE_TLS_CA", str(certs.ca))
    with Client(address) as hc:
        assert hc.tls == TLS(ca=certs.ca)
        assert hc.stats().endpoints_online == 1

    listed = grpcurl(address, "list", options=("-cacert", str(certs.ca)))
    assert listed.returncode == 0, listed.stderr
    assert "heartline.v1.TaskService" in listed.stdout
    health = grpcurl(address, "grpc.health.v1.Health/Check", options=("-cacert", str(certs.ca)))
    assert health.returncode == 0 and "SERVING" in health.stdout, health.stderr
    # grpcurl without the CA does not trust the server either.
    refused = grpcurl(address, "list", options=("-cacert", str(certs.self_signed.cert)))
    assert refused.returncode != 0 and "certificate" in refused.stderr, refused.stderr


def test_a_client_that_does_not_trust_the_server_fails_fast_in_one_line(
    tls_server: ServerProc, certs: Certs, strangers: Certs
) -> None:
    address = tls_server.address
    for tls in (TLS(), TLS(ca=strangers.ca), TLS(ca=certs.self_signed.cert)):
        err = _fails_fast(address, tls)
        assert str(err).startswith(
            f"cannot connect to {address} over TLS: the server's certificate is not trusted ("
        ), err
        assert "tls=TLS(ca=...), --tls-ca or HEARTLINE_TLS_CA" in str(err), err
        assert "CERTIFICATE_VERIFY_FAILED" in err.details or "signature" in err.details

    # A plaintext client gets the connection closed at once, and is told about TLS.
    err = _fails_fast(address, False)
    assert f"cannot connect to {address}: the server closed the connection at once" in str(err)
    assert "--tls-ca" in str(err), err

    line = _cli_fails_fast("stats", "--server", address, "--tls-ca", str(strangers.ca))
    assert "the server's certificate is not trusted" in line, line
    line = _cli_fails_fast("tasks", "list", "--server", address)
    assert "--tls-ca" in line, line

    # An agent that does not trust the server stops, saying why (waiting will not fix it).
    agent = launch_agent(address, tls_server.home, "local", 1, "--tls-ca", str(strangers.ca))
    assert agent.popen.wait(timeout=TIMEOUT) == 1, agent.text()
    assert "the server's certificate is not trusted" in agent.text(), agent.text()
    assert "Traceback" not in agent.text(), agent.text()


def test_a_client_that_reached_the_server_is_not_retried_past_a_certificate_it_does_not_trust(
    home: Path, tmp_path: Path, certs: Certs, strangers: Certs
) -> None:
    db = tmp_path / "heartline.db"
    server = launch_server(home, db, "127.0.0.1:0", *_server_tls(certs))
    with Client(server.address, tls=TLS(ca=certs.ca), retry_timeout=60) as hc:
        hc.stats()
        server.proc.stop()
        # The same address, now with a certificate this client does not trust.
        launch_server(home, db, server.address, *_server_tls(strangers))
        start = time.monotonic()
        with pytest.raises(heartline.UnavailableError, match="certificate is not trusted"):
            hc.stats()
        assert time.monotonic() - start < FAST


# --------------------------------------------------------------------------- mutual TLS


def test_mutual_tls_serves_clients_agents_cli_and_grpcurl_with_certificates(
    mtls_server: ServerProc, certs: Certs
) -> None:
    address = mtls_server.address
    assert "(mutual TLS)" in _listening_line(mtls_server), mtls_server.proc.text()
    tls = TLS(ca=certs.ca, cert=certs.client.cert, key=certs.client.key)
    agent = _start_agent(mtls_server, tls, *_client_flags(certs))
    assert_eventually(lambda: "over mutual TLS" in agent.text(), timeout=TIMEOUT)

    with Client(address, tls=tls) as hc:
        tid = hc.submit("local", double, 5)
        assert hc.get_result(tid, timeout=TIMEOUT) == 10
    out = run_cli("stats", "--server", address, *_client_flags(certs))
    assert out.returncode == 0, out.stderr
    env = {
        "HEARTLINE_TLS_CA": str(certs.ca),
        "HEARTLINE_TLS_CERT": str(certs.client.cert),
        "HEARTLINE_TLS_KEY": str(certs.client.key),
    }
    out = run_cli("tasks", "list", "--server", address, env=env)
    assert out.returncode == 0 and tid in out.stdout, out.stderr

    options = (
        "-cacert",
        str(certs.ca),
        "-cert",
        str(certs.client.cert),
        "-key",
        str(certs.client.key),
    )
    health = grpcurl(address, "grpc.health.v1.Health/Check", options=options)
    assert health.returncode == 0 and "SERVING" in health.stdout, health.stderr
    refused = grpcurl(address, "grpc.health.v1.Health/Check", options=("-cacert", str(certs.ca)))
    assert refused.returncode != 0, refused.stdout


def test_mutual_tls_refuses_a_client_without_a_certificate_fast_in_one_line(
    mtls_server: ServerProc, certs: Certs, strangers: Certs
) -> None:
    address = mtls_server.address
    for tls in (
        TLS(ca=certs.ca),
        TLS(ca=certs.ca, cert=strangers.client.cert, key=strangers.client.key),
    ):
        err = _fails_fast(address, tls)
        assert str(err).startswith(
            f"cannot connect to {address} over TLS: the server closed the connection in the "
            "handshake; it may want a client certificate"
        ), err
        assert "--tls-cert and --tls-key" in str(err), err

    line = _cli_fails_fast("stats", "--server", address, "--tls-ca", str(certs.ca))
    assert "client certificate" in line, line


# --------------------------------------------------------------------------- up, and bad settings


def test_up_with_a_self_signed_certificate_serves_its_local_endpoint_over_tls(
    home: Path, certs: Certs
) -> None:
    pair = certs.self_signed
    proc = start_process(
        heartline_cmd(
            "up",
            "--listen",
            "127.0.0.1:0",
            "--workers",
            "1",
            "--tls-cert",
            str(pair.cert),
            "--tls-key",
            str(pair.key),
        ),
        env={"HEARTLINE_TLS_CA": "/nonexistent/ca.pem"},  # not for up's own agent
    )
    try:
        line = proc.wait_for_line("listening on", timeout=TIMEOUT)
        assert "(TLS)" in line, line
        address = line.split("listening on", 1)[1].split()[0]
        assert "over TLS" in proc.wait_for_line("connected to", timeout=TIMEOUT)
        with Executor("local", address, tls=TLS(ca=pair.cert)) as ex:
            assert ex.submit(double, 50).result(timeout=TIMEOUT) == 100
    finally:
        proc.stop()


def test_up_refuses_mutual_tls_and_the_server_refuses_incomplete_tls(
    home: Path, tmp_path: Path, certs: Certs
) -> None:
    up = run_cli("up", "--listen", "127.0.0.1:0", *_server_tls(certs, mutual=True), timeout=TIMEOUT)
    assert up.returncode == 2 and "--tls-client-ca" in up.stderr, up.stderr
    db = str(tmp_path / "heartline.db")

    def server(*tls: str) -> str:
        out = run_cli("server", "--listen", "127.0.0.1:0", "--db", db, *tls, timeout=TIMEOUT)
        assert out.returncode == 2, (out.stdout, out.stderr)
        assert "Traceback" not in out.stderr, out.stderr
        return out.stderr

    cert, missing, other = str(certs.server.cert), tmp_path / "missing.key", certs.client.key
    assert "--tls-cert and --tls-key go together" in server("--tls-cert", cert)
    said = server("--tls-cert", cert, "--tls-key", str(missing))
    assert f"cannot read the TLS server key {missing} (--tls-key)" in said, said
    said = server("--tls-cert", cert, "--tls-key", str(other))
    assert f"the TLS server key {other} (--tls-key) is not the key of the certificate" in said


def test_tls_settings_are_checked_before_anything_connects(tmp_path: Path, certs: Certs) -> None:
    missing = tmp_path / "nope.pem"
    with pytest.raises(
        heartline.HeartlineError, match=f"cannot read the TLS CA certificate {missing}"
    ):
        Client("127.0.0.1:1", tls=TLS(ca=missing))
    not_pem = tmp_path / "not.pem"
    not_pem.write_text("hello")
    with pytest.raises(heartline.HeartlineError, match="is not PEM"):
        Client("127.0.0.1:1", tls=TLS(ca=not_pem))
    with pytest.raises(heartline.HeartlineError, match="is not the key of the certificate"):
        Client("127.0.0.1:1", tls=TLS(ca=certs.ca, cert=certs.client.cert, key=certs.server.key))
    with pytest.raises(ValueError, match="cert and key go together"):
        TLS(ca=certs.ca, cert=certs.client.cert)
    assert TLS(ca=str(certs.ca)) == TLS(ca=certs.ca)

    line = _cli_fails_fast("stats", "--server", "127.0.0.1:1", "--tls-ca", str(missing))
    assert f"cannot read the TLS CA certificate {missing} (--tls-ca)" in line, line
    out = run_cli("stats", "--tls-ca", str(certs.ca), "--tls-cert", str(certs.client.cert))
    assert out.returncode == 2 and "--tls-cert and --tls-key go together" in out.stderr
    agent = start_process(
        heartline_cmd(
            "endpoint", "start", "--name", "x", "--server", "127.0.0.1:1", "--tls-ca", str(missing)
        ),
        env={"HEARTLINE_HOME": str(tmp_path)},
    )
    assert agent.popen.wait(timeout=TIMEOUT) == 1, agent.text()
    assert f"cannot read the TLS CA certificate {missing}" in agent.text(), agent.text()


# --------------------------------------------------------------------------- gRPC's words


# What gRPC 1.85 says when a handshake fails on the client's side (and older wording).
_UNTRUSTED = (
    "failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:1: Tls handshake "
    "failed (TSI_PROTOCOL_FAILURE): SSL_ERROR_SSL: error:1000007d:SSL routines:OPENSSL_internal"
    ":CERTIFICATE_VERIFY_FAILED: unable to get local issuer certificate: OK"
)
_UNTRUSTED_OLD = (
    "failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:1: Ssl handshake "
    "failed: SSL_ERROR_SSL: error:1000007d:SSL routines:OPENSSL_internal:CERTIFICATE_VERIFY_FAILED"
)
_NOT_TLS = (
    "failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:1: Tls handshake "
    "failed (TSI_PROTOCOL_FAILURE): SSL_ERROR_SSL: error:100000f7:SSL routines:OPENSSL_internal"
    ":WRONG_VERSION_NUMBER: Invalid certificate verification context: OK"
)
_CERT_REFUSED = (
    "failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:1: Tls handshake "
    "failed (TSI_PROTOCOL_FAILURE): SSL_ERROR_SSL: error:1000045c:SSL routines:OPENSSL_internal"
    ":TLSV1_ALERT_CERTIFICATE_REQUIRED: OK"
)
_OTHER_NAME = (
    "failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:1: Custom "
    "verification check failed with error: UNAUTHENTICATED: Hostname Verification Check failed."
)


@pytest.mark.parametrize(
    ("details", "says"),
    [
        (
            _UNTRUSTED,
            "the server's certificate is not trusted (unable to get local issuer certificate)",
        ),
        (_UNTRUSTED_OLD, "the server's certificate is not trusted"),
        (_NOT_TLS, "the server does not speak TLS"),
        (_OTHER_NAME, "the server's certificate is not issued for 127.0.0.1"),
        (_CERT_REFUSED, "the server refused this client's certificate"),
    ],
)
def test_grpc_handshake_failures_in_plain_words(details: str, says: str) -> None:
    assert tls_failure(details)
    message = unreachable_message("127.0.0.1:1", details, tls=True)
    assert message is not None and message.startswith("cannot connect to 127.0.0.1:1 over TLS: ")
    assert says in message, message


def test_a_closed_connection_is_said_by_whether_the_client_used_tls() -> None:
    details = (
        "failed to connect to all addresses; last error: UNAVAILABLE: ipv4:127.0.0.1:1: "
        "Socket closed"
    )
    assert not tls_failure(details)  # the server restarting looks the same: retried
    assert "client certificate" in (unreachable_message("x:1", details, tls=True) or "")
    assert "--tls-ca" in (unreachable_message("x:1", details, tls=False) or "")
    assert "no heartline server answers" in (unreachable_message("x:1", details) or "")
    assert unreachable_message("x:1", "Socket closed", tls=True) is None  # not at connect
