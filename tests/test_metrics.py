"""Prometheus metrics (SPEC section 7): the scheduler's plain figures, the collectors,
and ``/metrics`` scraped from a real server and a real agent, compared with GetStats."""

from __future__ import annotations

import asyncio
import gc
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import cloudpickle
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from heartline import Client, RemoteError, TaskState
from heartline._figures import Buckets, parse_address
from heartline._metrics import MetricsError, MetricsServer, on_loop
from heartline.server import Server, ServerConfig
from heartline.server._events import (
    AgentConnected,
    AgentLost,
    AgentReported,
    NewTask,
    StatusReport,
    TasksCommanded,
    TasksSubmitted,
)
from heartline.server._model import ErrorInfo, TaskRow
from heartline.server._scheduler import Scheduler, SchedulerConfig
from tests.conftest import ServerProc, assert_loop_never_blocked, launch_server
from tests.helpers import Proc, assert_eventually, run_cli

# The functions below run on the agent's workers; ship them by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

S = TaskState
EP = "ep-1"

# ------------------------------------------------------------------ plain figures


def test_buckets_count_each_value_in_the_first_bucket_whose_bound_it_does_not_exceed() -> None:
    b = Buckets([1.0, 0.1])
    for value in (0.05, 0.1, 0.5, 1.0, 7.0):
        b.observe(value)
    assert b.bounds == (0.1, 1.0)
    assert b.counts == [2, 2, 1]  # <= 0.1, <= 1.0, above
    assert b.count == 5
    assert b.total == pytest.approx(8.65)
    copy = b.copy()
    b.observe(0.0)
    assert copy.counts == [2, 2, 1]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:9100", ("127.0.0.1", 9100)),
        ("localhost:0", ("localhost", 0)),
        ("[::1]:9100", ("::1", 9100)),
        (":9100", ("0.0.0.0", 9100)),
    ],
)
def test_metrics_addresses(text: str, expected: tuple[str, int]) -> None:
    assert parse_address(text) == expected


@pytest.mark.parametrize("text", ["", "9100", "host", "host:", "host:x", "host:65536", "::1:9100"])
def test_malformed_metrics_addresses_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="HOST:PORT|brackets"):
        parse_address(text)


# ------------------------------------------------------------ scheduler figures


def _new(tid: str, *, max_retries: int = 0, held: bool = False) -> NewTask:
    return NewTask(tid, "fn", b"", 0, max_retries, 3, 0.0, held)


def _submit(*tasks: NewTask, time: float) -> TasksSubmitted:
    return TasksSubmitted(EP, "alice", tasks, "session", time)


def _nonzero(s: Scheduler) -> dict[str, int]:
    return {state.value: n for state, n in s.tasks_by_state.items() if n}


def test_scheduler_counts_tasks_by_state_and_dispatch_latency() -> None:
    s = Scheduler(SchedulerConfig(validate=True))  # validate checks the counts every step
    s.handle(
        _submit(_new("a"), _new("b", max_retries=1), _new("c"), _new("h", held=True), time=10.0)
    )
    assert _nonzero(s) == {"waiting-for-ep": 3, "held": 1}
    assert s.dispatch_latency.count == 0

    s.handle(AgentConnected("A", EP, 2, 0, (), 10.5))
    assert _nonzero(s) == {"waiting-for-ep": 1, "held": 1, "dispatched": 2}
    assert s.dispatch_latency.count == 2
    assert s.dispatch_latency.total == pytest.approx(1.0)

    s.handle(
        AgentReported("A", (StatusReport("a", 1, S.RUNNING), StatusReport("b", 1, S.RUNNING)), 11.0)
    )
    assert _nonzero(s) == {"waiting-for-ep": 1, "held": 1, "running": 2}

    # a succeeds (c goes out); b raises and has a retry left (requeued, dispatched again)
    raised = ErrorInfo("ValueError", "x")
    s.handle(
        AgentReported(
            "A",
            (
                StatusReport("a", 1, S.SUCCEEDED, result=b"r"),
                StatusReport("b", 1, S.ERRORED, error=raised),
            ),
            12.0,
        )
    )
    assert _nonzero(s) == {"held": 1, "dispatched": 2, "success": 1}
    assert s.dispatch_latency.count == 4  # a, b, then c and b's second attempt
    assert s.dispatch_latency.counts[-1] == 0

    s.handle(TasksCommanded("cancel", ("h",), 13.0))
    s.handle(AgentLost("A", 14.0))
    assert _nonzero(s) == {"waiting-for-ep": 2, "success": 1, "cancelled": 1}
    assert sum(s.tasks_by_state.values()) == 4
    # 4 submits, 2 dispatches, 2 running, a's success and b's requeue, 2 dispatches,
    # h's cancel, and 2 back to the queue with the lost agent.
    assert s.transitions_total == 15


def _row(tid: str, state: TaskState) -> TaskRow:
    return TaskRow(
        task_id=tid, endpoint_id=EP, function_id="fn", args=b"", owner="alice", state=state,
        submit_time=0.0, attempt=1, priority=0, max_retries=0, max_system_retries=3,
        walltime=0.0, start_time=None, settle_time=None, held_from=None, result=None,
        error=None, raised_count=0, system_failures=0, resubmitted_from="", group_id="",
        payload_purged=False,
    )  # fmt: skip


def test_restore_seeds_the_counts_from_the_store_and_moves_tasks_it_takes_back() -> None:
    rows = [_row("r", S.RUNNING), _row("w", S.WAITING_FOR_EP), _row("e", S.ERRORED)]
    stored = dict.fromkeys(TaskState, 0) | {
        S.RUNNING: 1,
        S.WAITING_FOR_EP: 1,
        S.ERRORED: 1,
        S.SUCCEEDED: 7,
    }

    s = Scheduler(SchedulerConfig(validate=True))
    s.restore(rows, 100.0, stored)
    # The running task was on an agent: it waits for it again (a transition, counted).
    assert _nonzero(s) == {"waiting-for-ep": 2, "errored": 1, "success": 7}

    bare = Scheduler(SchedulerConfig(validate=True))
    bare.restore(rows, 100.0)  # without the store's counts: the loaded tasks only
    assert _nonzero(bare) == {"waiting-for-ep": 2, "errored": 1}


def test_validate_notices_a_count_that_drifted() -> None:
    s = Scheduler(SchedulerConfig(validate=True))
    s.handle(_submit(_new("a"), time=1.0))
    s.tasks_by_state[S.WAITING_FOR_EP] += 1
    with pytest.raises(AssertionError, match="counted waiting-for-ep"):
        s.validate()


# ------------------------------------------------------------ in-process server


def _families(text: str) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """Sample name -> {sorted label pairs: value}."""
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return out


def _one(samples: dict, name: str, **labels: str) -> float:
    return samples[name][tuple(sorted(labels.items()))]


def _tasks(samples: dict) -> dict[str, int]:
    return {dict(k)["state"]: int(v) for k, v in samples["heartline_tasks"].items()}


def _scrape(address: str) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as reply:
        assert reply.status == 200
        return _families(reply.read().decode())


async def test_a_scrape_takes_its_snapshot_on_the_servers_loop(tmp_path: Path) -> None:
    server = Server(
        ServerConfig(
            listen="127.0.0.1:0", db=tmp_path / "h.db", metrics="127.0.0.1:0", validate=True
        )
    )
    await server.start()
    try:
        assert server.metrics_address is not None
        samples = await asyncio.to_thread(_scrape, server.metrics_address)
        assert _tasks(samples) == {s.value: 0 for s in TaskState}
        assert _one(samples, "heartline_transitions_total") == 0
        assert _one(samples, "heartline_agents_online") == 0
        assert _one(samples, "heartline_dispatch_latency_seconds_count") == 0
        # Every store operation so far (open, restore's reads) went through group commits.
        assert _one(samples, "heartline_store_batch_items_count") >= 1
        assert _one(samples, "heartline_store_commit_seconds_count") == _one(
            samples, "heartline_store_batch_items_count"
        )
    finally:
        await server.stop(grace=0)
    assert server.metrics_address is None


async def test_garbage_collections_are_timed_by_generation_while_metrics_are_on(
    tmp_path: Path,
) -> None:
    hooks = len(gc.callbacks)
    server = Server(ServerConfig(listen="127.0.0.1:0", db=tmp_path / "h.db", metrics="127.0.0.1:0"))
    await server.start()
    try:
        assert server.metrics_address is not None
        before = await asyncio.to_thread(_scrape, server.metrics_address)
        full = _one(before, "heartline_gc_pause_seconds_count", generation="2")
        gc.collect()
        gc.collect()
        after = await asyncio.to_thread(_scrape, server.metrics_address)
        assert _one(after, "heartline_gc_pause_seconds_count", generation="2") >= full + 2
        assert _one(after, "heartline_gc_pause_seconds_sum", generation="2") > 0
        assert {dict(k)["generation"] for k in after["heartline_gc_pause_seconds_count"]} == {
            "0",
            "1",
            "2",
        }
    finally:
        await server.stop(grace=0)
    assert len(gc.callbacks) == hooks  # the clock is gone with the metrics


def test_without_metrics_prometheus_client_is_not_even_imported() -> None:
    code = (
        "import sys, heartline._cli, heartline.server._app, heartline.endpoint._agent;"
        "assert 'prometheus_client' not in sys.modules, 'imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


async def test_a_scrape_gives_up_on_a_blocked_loop() -> None:
    loop = asyncio.get_running_loop()
    ran = threading.Event()
    outcome: list[BaseException] = []

    def scrape() -> None:
        try:
            on_loop(loop, ran.set, timeout=0.1)
        except MetricsError as exc:
            outcome.append(exc)

    thread = threading.Thread(target=scrape)
    thread.start()
    time.sleep(0.4)  # the loop is blocked: the snapshot cannot run  # noqa: ASYNC251
    thread.join()
    await asyncio.sleep(0.01)  # the late snapshot was cancelled: it does not run
    assert outcome and "within 0.1s" in str(outcome[0])
    assert not ran.is_set()


async def test_an_address_in_use_is_a_clear_error() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(
            MetricsError, match=f"cannot serve metrics on 127.0.0.1:{port}: Address already in use"
        ):
            MetricsServer.start(f"127.0.0.1:{port}")
    metrics = MetricsServer.start("127.0.0.1:0")
    try:
        assert isinstance(metrics.registry, CollectorRegistry)
        assert metrics.url.startswith("http://127.0.0.1:") and metrics.url.endswith("/metrics")
    finally:
        await metrics.stop()


# ------------------------------------------------------------ real processes


def wait_for_release(path: str) -> str:
    import os
    import time

    while not os.path.exists(path):
        time.sleep(0.02)
    return "released"


def die_once(marker: str) -> str:
    import os

    if not os.path.exists(marker):
        open(marker, "w").close()
        os._exit(3)  # the worker dies: a system failure, run again on a new worker
    return "survived"


def boom() -> None:
    raise ValueError("boom")


def metrics_address(proc: Proc) -> str:
    """The bound metrics address: the server prints it in its ready lines, the agent
    logs it (-v)."""

    def find() -> str:
        for line in proc.output:
            for marker in ("metrics at http://", "event=metrics-listening url=http://"):
                if marker in line:
                    return line.split(marker, 1)[1].split("/metrics", 1)[0]
        raise AssertionError("no metrics address printed yet")

    return assert_eventually(find, timeout=10, message="metrics address printed")


@pytest.fixture
def server(home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[ServerProc]:
    """The conftest's server, with metrics on a free port (printed with the ready line)."""
    srv = launch_server(home, tmp_path / "heartline.db", "127.0.0.1:0", "--metrics", "127.0.0.1:0")
    monkeypatch.setenv("HEARTLINE_ADDRESS", srv.address)
    try:
        yield srv
    finally:
        srv.proc.stop()
    assert_loop_never_blocked(srv.proc)


def _matches_stats(hc: Client, address: str) -> dict:
    """A scrape whose figures equal GetStats (asked right after it, nothing moving)."""
    samples = _scrape(address)
    stats = hc.stats()
    assert _tasks(samples) == dict(stats.tasks_by_state)
    assert _one(samples, "heartline_transitions_total") == stats.transitions
    assert _one(samples, "heartline_agents_online") == stats.agents_online
    assert _one(samples, "heartline_endpoints_online") == stats.endpoints_online
    return samples


def test_metrics_of_a_real_server_and_agent_match_get_stats(
    server: ServerProc, start_agent: Callable[..., Proc], tmp_path: Path
) -> None:
    # No prefetch: with 2 workers busy, the rest of the tasks queue at the server.
    agent = start_agent("local", 2, "--prefetch", "0", "--metrics", "127.0.0.1:0", "-v")
    at_server, at_agent = metrics_address(server.proc), metrics_address(agent)
    release, marker = tmp_path / "release", tmp_path / "died-once"

    with Client(server.address) as hc:
        waiting = hc.submit_batch(
            "local", [(wait_for_release, (str(release),), {}) for _ in range(6)]
        )
        held = hc.submit("local", boom, held=True)

        # During the run: two tasks run, four wait at the server, one is held.
        def running() -> dict:
            samples = _matches_stats(hc, at_server)
            assert _tasks(samples)["running"] == 2
            assert _tasks(samples)["waiting-for-ep"] == 4
            assert _tasks(samples)["held"] == 1
            assert (
                _one(
                    samples, "heartline_queue_depth", endpoint="local", endpoint_id=_ep_id(samples)
                )
                == 4
            )
            assert _one(samples, "heartline_dispatch_latency_seconds_count") == 2
            return samples

        assert_eventually(running, timeout=20, message="server metrics during the run")

        def agent_running() -> None:
            samples = _scrape(at_agent)
            assert _one(samples, "heartline_agent_connected") == 1
            assert _one(samples, "heartline_agent_tasks", state="running") == 2
            assert _one(samples, "heartline_agent_workers", state="busy") == 2

        assert_eventually(agent_running, timeout=20, message="agent metrics during the run")

        release.touch()
        assert [hc.get_result(t, timeout=30) for t in waiting] == ["released"] * 6
        died = hc.submit("local", die_once, str(marker))
        assert hc.get_result(died, timeout=30) == "survived"
        failed = hc.submit("local", boom)
        with pytest.raises(RemoteError, match="boom"):
            hc.get_result(failed, timeout=30)
        hc.cancel([held])

        # After the run: every figure settles and equals GetStats.
        final = assert_eventually(
            lambda: _matches_stats(hc, at_server), timeout=20, message="final stats"
        )
        assert _tasks(final) | {"success": 0, "errored": 0, "cancelled": 0} == {
            s.value: 0 for s in TaskState
        }
        assert (_tasks(final)["success"], _tasks(final)["errored"], _tasks(final)["cancelled"]) == (
            7,
            1,
            1,
        )
        tasks = hc.get_tasks([*waiting, held, died, failed], history=True)
        dispatches = sum(1 for t in tasks for step in t.history if step.to_state is S.DISPATCHED)
        # die_once was dispatched twice: its first attempt died with its worker.
        assert _one(final, "heartline_dispatch_latency_seconds_count") == dispatches == 6 + 2 + 1
        assert _one(final, "heartline_dispatch_latency_seconds_bucket", le="+Inf") == dispatches
        assert (
            _one(final, "heartline_queue_depth", endpoint="local", endpoint_id=_ep_id(final)) == 0
        )
        assert _one(final, "heartline_store_commit_seconds_count") > 0

    def agent_settled() -> None:
        samples = _scrape(at_agent)
        assert _one(samples, "heartline_agent_connected") == 1
        assert all(v == 0 for v in samples["heartline_agent_tasks"].values())
        assert _one(samples, "heartline_agent_outbox_reports") == 0  # every report acked
        # success: 6 released + die_once's second attempt; errored: its worker death, boom
        assert _one(samples, "heartline_agent_tasks_finished_total", state="success") == 7
        assert _one(samples, "heartline_agent_tasks_finished_total", state="errored") == 2
        assert _one(samples, "heartline_agent_worker_restarts_total") == 1
        assert _one(samples, "heartline_agent_workers", state="idle") == 2

    assert_eventually(agent_settled, timeout=20, message="agent metrics after the run")


def test_a_restarted_server_counts_every_stored_task_again(
    server: ServerProc, start_agent: Callable[..., Proc], tmp_path: Path
) -> None:
    start_agent("local", 2)
    release = tmp_path / "release"
    with Client(server.address) as hc:
        done = hc.submit_batch("local", [(pow, (2, i), {}) for i in range(3)])
        assert [hc.get_result(t, timeout=30) for t in done] == [1, 2, 4]
        hc.cancel([hc.submit("local", boom, held=True)])
        hc.submit("local", boom, held=True)
        running = hc.submit("local", wait_for_release, str(release))
        assert_eventually(lambda: hc.get_task(running).state is S.RUNNING, timeout=20)
        before = hc.stats().tasks_by_state
    server.proc.stop()

    # The restore seeds the counts from the store (settled tasks included); the task
    # that was running waits for its agent again, a transition counted like any other.
    again = launch_server(server.home, server.db, "127.0.0.1:0", "--metrics", "127.0.0.1:0", "-v")
    try:
        with Client(again.address) as hc:
            samples = assert_eventually(
                lambda: _matches_stats(hc, metrics_address(again.proc)), timeout=20
            )
        expected = dict(before) | {"running": 0, "waiting-for-ep": 1}
        assert _tasks(samples) == expected
        assert (expected["success"], expected["cancelled"], expected["held"]) == (3, 1, 1)
    finally:
        release.touch()
        again.proc.stop()
    assert_loop_never_blocked(again.proc)


def _ep_id(samples: dict) -> str:
    (labels,) = [
        dict(k) for k in samples["heartline_queue_depth"] if dict(k)["endpoint"] == "local"
    ]
    return labels["endpoint_id"]


def test_a_metrics_address_that_cannot_be_bound_is_a_one_line_error(
    home: Path, tmp_path: Path
) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = f"127.0.0.1:{busy.getsockname()[1]}"
        env = {"HEARTLINE_HOME": str(home)}
        srv = run_cli(
            "server",
            "--listen",
            "127.0.0.1:0",
            "--db",
            str(tmp_path / "h.db"),
            "--metrics",
            taken,
            env=env,
        )
        agent = run_cli(
            "endpoint",
            "start",
            "--name",
            "x",
            "--server",
            "127.0.0.1:1",
            "--metrics",
            taken,
            env=env,
        )
    assert srv.returncode == 2
    assert (
        srv.stderr == f"heartline server: cannot serve metrics on {taken}: Address already in use\n"
    )
    assert agent.returncode == 1
    assert (
        agent.stderr
        == f"heartline endpoint 'x': cannot serve metrics on {taken}: Address already in use\n"
    )
    assert "Traceback" not in srv.stdout + agent.stdout


def test_a_malformed_metrics_address_is_a_usage_error(home: Path) -> None:
    for command in (["server"], ["endpoint", "start", "--name", "x"]):
        out = run_cli(*command, "--metrics", "9100", env={"HEARTLINE_HOME": str(home)})
        assert out.returncode == 2
        assert "Invalid value for '--metrics': expected HOST:PORT" in out.stderr
        assert "Traceback" not in out.stderr
