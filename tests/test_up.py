"""`heartline up`: the newcomer's one command runs a server and a local endpoint."""

from __future__ import annotations

import os
import signal
from pathlib import Path

from heartline import Executor
from tests.conftest import assert_loop_never_blocked
from tests.helpers import heartline_cmd, start_process


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"


def test_up_serves_a_local_endpoint_and_ctrl_c_stops_both(home: Path) -> None:
    proc = start_process(heartline_cmd("up", "--listen", "127.0.0.1:0", "--workers", "1"))
    try:
        line = proc.wait_for_line("listening on", timeout=30)
        address = line.split("listening on", 1)[1].split()[0]
        proc.wait_for_line("connected to", timeout=30)
        agent_pids = [
            int(p.name)
            for p in Path("/proc").iterdir()
            if p.name.isdigit()
            and f"--server\0{address}".encode() in (p / "cmdline").read_bytes()
        ]
        assert len(agent_pids) == 1

        with Executor("local", address) as ex:
            assert ex.submit(pow, 3, 4).result(timeout=30) == 81
        assert (home / "heartline.db").exists()
        assert (home / "endpoints" / "local" / "endpoint.json").exists()

        proc.signal(signal.SIGINT)  # what Ctrl-C sends
        assert proc.popen.wait(timeout=30) == 0
        assert not _alive(agent_pids[0]), "the agent outlived `heartline up`"
        assert "Traceback" not in proc.text()
        assert_loop_never_blocked(proc)
    finally:
        if proc.popen.poll() is None:
            proc.kill()
