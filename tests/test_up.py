"""`heartline up`: the newcomer's one command runs a server and a local endpoint.

Ready means ready: once health says SERVING, a submit to `local` works at once. And the
agent `up` started ends with it, however `up` ends.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from heartline import Client, Executor
from tests.conftest import assert_loop_never_blocked
from tests.helpers import Proc, assert_eventually, heartline_cmd, start_process

TIMEOUT = 30.0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    except FileNotFoundError:
        return False


def _agent_pids(address: str) -> list[int]:
    """Processes whose command line says they serve ``address`` (the agent `up` started)."""
    pids = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            if f"--server\0{address}\0".encode() in (p / "cmdline").read_bytes():
                pids.append(int(p.name))
        except OSError:
            continue
    return pids


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _serving(address: str) -> bool:
    """One health check, as a probe or a script would make it."""
    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=1.0
            )
        except grpc.RpcError:
            return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def _stop(proc: Proc) -> None:
    proc.signal(signal.SIGINT)  # what Ctrl-C sends
    assert proc.popen.wait(timeout=TIMEOUT) == 0, proc.text()
    assert "Traceback" not in proc.text(), proc.text()
    assert_loop_never_blocked(proc)


def test_up_serves_a_local_endpoint_and_ctrl_c_stops_both(home: Path) -> None:
    proc = start_process(heartline_cmd("up", "--listen", "127.0.0.1:0", "--workers", "1"))
    try:
        line = proc.wait_for_line("listening on", timeout=TIMEOUT)
        address = line.split("listening on", 1)[1].split()[0]
        proc.wait_for_line("connected to", timeout=TIMEOUT)
        agent_pids = _agent_pids(address)
        assert len(agent_pids) == 1

        with Executor("local", address) as ex:
            assert ex.submit(pow, 3, 4).result(timeout=TIMEOUT) == 81
        assert (home / "heartline.db").exists()
        assert (home / "endpoints" / "local" / "endpoint.json").exists()

        _stop(proc)
        assert not _alive(agent_pids[0]), "the agent outlived `heartline up`"
    finally:
        proc.kill()


def test_health_serving_means_a_submit_to_local_works_ten_fresh_starts(tmp_path: Path) -> None:
    for run in range(10):
        home = tmp_path / f"home-{run}"
        address = f"127.0.0.1:{_free_port()}"
        proc = start_process(
            heartline_cmd("up", "--listen", address, "--workers", "1"),
            env={"HEARTLINE_HOME": str(home)},
        )
        try:
            # A script's loop: poll health, submit the moment it says SERVING.
            deadline = time.monotonic() + TIMEOUT
            while not _serving(address):
                assert proc.popen.poll() is None, f"run {run}: up exited:\n{proc.text()}"
                assert time.monotonic() < deadline, f"run {run}: never SERVING:\n{proc.text()}"
                time.sleep(0.02)
            # The admin token `up` wrote, as a client with this HEARTLINE_HOME reads it.
            with Client(address, token=(home / "token").read_text().strip()) as hc:
                tid = hc.submit("local", pow, 2, run)
                assert hc.get_result(tid, timeout=TIMEOUT) == 2**run, f"run {run}"
            _stop(proc)
        finally:
            proc.kill()


def test_up_killed_with_sigkill_takes_its_agent_and_workers_with_it(home: Path) -> None:
    proc = start_process(heartline_cmd("up", "--listen", "127.0.0.1:0", "--workers", "2"))
    try:
        line = proc.wait_for_line("listening on", timeout=TIMEOUT)
        address = line.split("listening on", 1)[1].split()[0]
        proc.wait_for_line("connected to", timeout=TIMEOUT)
        (agent_pid,) = _agent_pids(address)
        workers = assert_eventually(
            lambda: len(_children(agent_pid)) == 2 and _children(agent_pid),
            timeout=TIMEOUT,
            message="the agent's two workers",
        )

        proc.kill()  # SIGKILL: no handler runs in `up`

        assert_eventually(
            lambda: not any(_alive(pid) for pid in (agent_pid, *workers)),
            timeout=TIMEOUT,
            message="the agent and its workers end with `up`",
        )
        assert "event=parent-gone" in proc.text(), proc.text()
    finally:
        proc.kill()
        for pid in _agent_pids(address) if "address" in locals() else ():
            os.kill(pid, signal.SIGKILL)
