"""Fixtures: a real server process on a free loopback port with a real SQLite file,
and real endpoint agent processes, all stopped by PID at the end of each test."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.helpers import Proc, assert_eventually, heartline_cmd, start_process

HEARTBEAT = 0.2  # seconds; the tests' servers run with short heartbeats


def assert_loop_never_blocked(proc: Proc) -> None:
    """Fail if the process's event-loop watchdog saw a blocking call."""
    stalls = [line for line in proc.output if "event=loop-blocked" in line]
    assert not stalls, f"the event loop was blocked: {stalls}"


@dataclass
class ServerProc:
    proc: Proc
    address: str
    db: Path
    home: Path
    args: list[str] = field(default_factory=list)

    @property
    def env(self) -> dict[str, str]:
        return {"HEARTLINE_ADDRESS": self.address, "HEARTLINE_HOME": str(self.home)}


def launch_server(home: Path, db: Path, listen: str = "127.0.0.1:0", *extra: str) -> ServerProc:
    args = heartline_cmd(
        "server",
        "--listen",
        listen,
        "--db",
        str(db),
        "--heartbeat-interval",
        str(HEARTBEAT),
        "--validate",
        *extra,
    )
    proc = start_process(args, env={"HEARTLINE_HOME": str(home)})
    line = proc.wait_for_line("listening on")
    address = line.split("listening on", 1)[1].split()[0]
    return ServerProc(proc, address, db, home, args)


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "home"
    path.mkdir()
    monkeypatch.setenv("HEARTLINE_HOME", str(path))
    return path


@pytest.fixture
def server(home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[ServerProc]:
    srv = launch_server(home, tmp_path / "heartline.db")
    monkeypatch.setenv("HEARTLINE_ADDRESS", srv.address)
    try:
        yield srv
    finally:
        srv.proc.stop()
    assert_loop_never_blocked(srv.proc)


def endpoint_online(address: str, name: str, agents: int = 1) -> bool:
    from heartline import Client

    with Client(address) as hc:
        for ep in hc.list_endpoints():
            if ep.name == name:
                return ep.online and len(ep.agents) >= agents
    return False


@pytest.fixture
def start_agent(server: ServerProc, home: Path) -> Iterator[Callable[..., Proc]]:
    started: list[Proc] = []

    def start(name: str = "local", workers: int = 2, *extra: str, wait: bool = True) -> Proc:
        before = sum(1 for p in started if p.popen.poll() is None and getattr(p, "name", None) == name)
        proc = start_process(
            heartline_cmd(
                "endpoint", "start", "--name", name, "--server", server.address, "--workers", str(workers), *extra
            ),
            env={"HEARTLINE_HOME": str(home)},
        )
        proc.name = name  # type: ignore[attr-defined]
        started.append(proc)
        if wait:
            assert_eventually(
                lambda: endpoint_online(server.address, name, before + 1),
                timeout=30,
                message=f"agent for {name!r} online",
            )
        return proc

    try:
        yield start
    finally:
        for proc in started:
            proc.stop()
    for proc in started:
        assert_loop_never_blocked(proc)


@pytest.fixture
def agent(start_agent: Callable[..., Proc]) -> Proc:
    """One agent of the endpoint 'local' with 2 workers."""
    return start_agent("local", 2)


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    # gRPC honours http_proxy; tests talk to loopback only.
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "grpc_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")

