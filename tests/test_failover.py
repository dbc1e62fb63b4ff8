"""Two servers on one PostgreSQL database (SPEC section 9): the one holding the store's
advisory lock serves; the other listens, says NOT_SERVING, refuses calls UNAVAILABLE, and
takes over when the first is SIGKILLed. Clients and agents given both addresses follow.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from pathlib import Path

import cloudpickle
import grpc
import pytest

from heartline import Client, TaskState
from heartline.v1 import task_service_pb2, task_service_pb2_grpc
from tests.conftest import ServerProc, launch_agent, launch_server
from tests.helpers import (
    assert_eventually,
    authed_channel,
    check_history,
    endpoint_online,
    free_port,
    health,
    run_cli,
    tail,
    with_history,
)

cloudpickle.register_pickle_by_value(sys.modules[__name__])

pytestmark = pytest.mark.timeout(300)

BULK = 5000
TAKEOVER = 10.0  # seconds from the active server's SIGKILL to the standby's SERVING (the bar)


def brief(x: int, mark_at: int, marker: str) -> int:
    if x == mark_at:
        # Tell the test (through the file system, not the busy server) how far the run got.
        with open(marker, "w") as fh:
            fh.write(str(os.getpid()))
    return x * 3


def pair(home: Path, db: str) -> tuple[ServerProc, ServerProc]:
    """An active server, then a standby on the same database, each on a port of its own."""
    active = launch_server(home, db, f"127.0.0.1:{free_port()}")
    standby = launch_server(home, db, f"127.0.0.1:{free_port()}", ready_line="event=standby")
    return active, standby


def test_a_second_server_stands_by_refuses_calls_and_stops_on_sigterm(
    home: Path, pg_url: str
) -> None:
    active, standby = pair(home, pg_url)
    assert health(active.address) == "SERVING"
    assert health(standby.address) == "NOT_SERVING"
    with authed_channel(standby.address) as channel:
        stub = task_service_pb2_grpc.TaskServiceStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            stub.ListEndpoints(task_service_pb2.ListEndpointsRequest(), timeout=10)
    assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
    assert "opening its store" in caught.value.details(), caught.value.details()
    # A standby waits inside its start: a SIGTERM still stops it, at once and cleanly.
    standby.proc.popen.send_signal(signal.SIGTERM)
    assert standby.proc.popen.wait(timeout=20) == 0, tail(standby.proc)
    assert health(active.address) == "SERVING"


def test_sigkill_of_the_active_server_with_5000_tasks_in_flight(
    home: Path, pg_url: str, tmp_path: Path
) -> None:
    active, standby = pair(home, pg_url)
    both = f"{active.address},{standby.address}"
    agent = launch_agent(both, home, "local", 2)
    assert_eventually(lambda: endpoint_online(both, "local"), timeout=30, message="agent online")
    marker = tmp_path / "marker"
    with Client(both) as hc:
        calls = [(brief, (i, BULK // 5, str(marker)), {}) for i in range(BULK)]
        ids = hc.submit_batch("local", calls)
        assert_eventually(marker.exists, timeout=60, message="a fifth of the run done")
        active.proc.kill()
        killed = time.monotonic()
        assert_eventually(
            lambda: health(standby.address) == "SERVING",
            timeout=TAKEOVER,
            interval=0.05,
            message=f"the standby serving within {TAKEOVER} s\n{tail(standby.proc)}",
        )
        took = time.monotonic() - killed
        assert took < TAKEOVER
        print(f"takeover: {took:.2f} s")

        deadline = time.monotonic() + 120
        results = [hc.get_result(t, timeout=max(0.1, deadline - time.monotonic())) for t in ids]
        assert results == [i * 3 for i in range(BULK)]
        tasks = with_history(hc, ids)
        assert all(t.state is TaskState.SUCCEEDED for t in tasks)
        for t in tasks:
            check_history(t)  # settled once, one SUCCEEDED: each result recorded exactly once
        moved = [t for t in tasks if any(h.cause == "server-restarted" for h in t.history)]
        assert moved, "no task was on the agent when the active server died"
    # The CLI follows the list too.
    shown = run_cli("stats", env={"HEARTLINE_ADDRESS": both, "HEARTLINE_HOME": str(home)})
    assert shown.returncode == 0, shown.stderr
    assert str(BULK) in shown.stdout, shown.stdout
    agent.stop()


def test_a_server_that_loses_its_database_connection_stops(home: Path, pg_url: str) -> None:
    # Its lock went with the connection: a standby may be active already, so serving on
    # from memory could answer for tasks another server now drives.
    server = launch_server(home, pg_url, f"127.0.0.1:{free_port()}")
    assert health(server.address) == "SERVING"

    async def terminate_its_connections() -> int:
        import asyncpg

        conn = await asyncpg.connect(pg_url)
        try:
            return await conn.fetchval(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
        finally:
            await conn.close()

    assert asyncio.run(terminate_its_connections()) >= 1
    server.proc.wait_for_line("event=store-lost", timeout=30)
    assert server.proc.popen.wait(timeout=30) == 1, tail(server.proc)
