"""The server's file-descriptor limit: raised to the hard limit at start, and one warning
(not one a second) when open descriptors near it; with it raised, a server started under
a soft limit of 1,024 serves 1,500 agents, each on its own connection (simulated agents,
``tests/simagents.py``)."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest

from heartline import Client
from heartline.server._limits import RESERVED_FDS, FdWatch, raise_fd_limit
from tests.helpers import assert_eventually, heartline_cmd, start_process, tail

# Run the server with a soft limit of 1,024, as many shells give a process.
_LOW_SOFT_LIMIT = (
    "import os, resource, sys;"
    " hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1];"
    " resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard));"
    " os.execv(sys.argv[1], sys.argv[1:])"
)


def _limits_of(pid: int) -> tuple[int, int]:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return int(soft), int(hard)
    raise AssertionError(f"no open-files limit for {pid}")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/PID/limits")
def test_the_server_raises_its_soft_limit_to_the_hard_one_and_says_so(tmp_path: Path) -> None:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    args = heartline_cmd(
        "server", "--listen", "127.0.0.1:0", "--db", str(tmp_path / "h.db"), "-v"
    )  # fmt: skip
    proc = start_process(
        [sys.executable, "-c", _LOW_SOFT_LIMIT, *args], {"HEARTLINE_HOME": str(tmp_path)}
    )
    try:
        line = proc.wait_for_line("event=fd-limit")
        proc.wait_for_line("listening on")
        soft_now, hard_now = _limits_of(proc.pid)
    finally:
        assert proc.stop() == 0
    assert hard_now == hard
    if hard != resource.RLIM_INFINITY:
        assert soft_now == hard
    assert "found=1024" in line and f"soft={soft_now}" in line
    assert f"connections={soft_now - RESERVED_FDS}" in line


def test_raising_the_limit_keeps_the_hard_one() -> None:
    before = resource.getrlimit(resource.RLIMIT_NOFILE)
    limit = raise_fd_limit()
    assert limit is not None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert hard == before[1]
    assert limit.soft == soft and limit.found == before[0]
    assert limit.connections == soft - RESERVED_FDS


def test_the_watch_warns_once_near_the_limit_and_again_only_after_falling_back() -> None:
    watch = FdWatch(1000)
    assert watch.check(100) is None
    warning = watch.check(905)
    assert warning is not None and "open=905 limit=1000" in warning and "ulimit -Hn" in warning
    # At the edge for a long while: still the one line.
    assert [watch.check(n) for n in (950, 999, 1000, 850)] == [None] * 4
    assert watch.check(790) is None  # fell back under 80%: armed again
    assert watch.check(920) is not None


_AGENTS = 1_500  # more connections than a soft limit of 1,024 allows
_AGENT_ENDPOINTS = 15
_WELCOME_DEADLINE = 30.0  # seconds for every agent's welcome (about 3 s on 2 cores)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="sets RLIMIT_NOFILE, reads /proc")
@pytest.mark.timeout(60)
def test_a_server_started_with_1024_files_serves_1500_agents_each_on_its_own_connection(
    tmp_path: Path,
) -> None:
    server = start_process(
        [
            sys.executable, "-c", _LOW_SOFT_LIMIT,
            *heartline_cmd("server", "--listen", "127.0.0.1:0", "--db", str(tmp_path / "h.db")),
        ],
        {"HEARTLINE_HOME": str(tmp_path)},
    )  # fmt: skip
    line = server.wait_for_line("listening on")
    address = line.split("listening on", 1)[1].split()[0]
    token = (tmp_path / "token").read_text().strip()
    # One connection per agent (--per-channel 1); the agents' process raises its own
    # soft limit to the hard one.
    root = str(Path(__file__).resolve().parents[1])
    agents = start_process(
        [
            sys.executable, "-m", "tests.simagents", "--server", address, "--token", token,
            "--endpoints", str(_AGENT_ENDPOINTS), "--agents", str(_AGENTS), "--per-channel", "1",
            "--connect-timeout", str(_WELCOME_DEADLINE),
        ],
        {"PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))},
        stdin=subprocess.PIPE,
    )  # fmt: skip
    assert agents.popen.stdin is not None
    try:
        event = json.loads(agents.wait_for_line('"event": ', timeout=_WELCOME_DEADLINE + 5))
        assert event["event"] == "ready", f"{event}\n{tail(agents, server)}"
        assert event["welcomed"] == _AGENTS and event["channels"] == _AGENTS, event

        def online(count: int, endpoints: int) -> None:
            with Client(address, token=token) as hc:
                stats = hc.stats()
            assert (stats.agents_online, stats.endpoints_online) == (count, endpoints), stats

        assert_eventually(lambda: online(_AGENTS, _AGENT_ENDPOINTS), timeout=10, interval=0.2)
        # The server does hold more sockets than its soft limit of 1,024 allowed.
        assert len(os.listdir(f"/proc/{server.pid}/fd")) > _AGENTS
        agents.popen.stdin.write("stop\n")
        agents.popen.stdin.flush()
        agents.wait_for_line('"event": "stopped"', timeout=15)
        assert agents.popen.wait(timeout=15) == 0, tail(agents)
        # Gone with their connections, well before any heartbeat timeout (21 s here): a
        # stream's end is recorded even when gRPC cancels its handler as it cleans up.
        assert_eventually(lambda: online(0, 0), timeout=10, interval=0.2)
    finally:
        agents.popen.stdin.close()
        agents.stop()
    assert server.stop() == 0, tail(server)
