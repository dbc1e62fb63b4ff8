"""A task's stdout and stderr come home (issue 15): captured on the worker, stored with the
task, shown by ``Task.stdout`` / ``Task.stderr``, ``heartline tasks show`` and the JSON of
``GetTasks``, through a real server and real agent processes.

Which attempt's output a task shows: its latest finished one. An attempt that ended in a
system failure (its worker died) keeps what it wrote up to the death, and the task shows
it until the next attempt ends and replaces it (even with nothing).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
import uuid
from pathlib import Path

import cloudpickle
import grpc

from heartline import Client, TaskState, _defaults
from heartline._defaults import MAX_OUTPUT
from heartline._output import MARKER_ROOM, cut_marker
from heartline._serialize import dumps_result
from heartline.client import FailureKind
from heartline.v1 import endpoint_service_pb2 as ep_pb
from heartline.v1 import endpoint_service_pb2_grpc as ep_grpc
from heartline.v1 import task_pb2
from tests.conftest import Stack, launch_server
from tests.helpers import assert_eventually, grpcurl, run_cli, wait_state

cloudpickle.register_pickle_by_value(sys.modules[__name__])

TIMEOUT = 30.0
LINES = 10_000


def line(i: int) -> str:
    return f"line {i:05d} of {LINES}: the task is still going\n"


# ------------------------------------------------------------------ remote functions


def chatter(lines: int) -> int:
    for i in range(lines):
        print(line(i), end="")
    print("warning: almost done", file=sys.stderr)
    print("warning: done", file=sys.stderr)
    return lines


def says(word: str, times: int) -> str:
    for _ in range(times):
        print(word)
    return word


def dies_mid_print() -> None:
    print("first line")
    print("second line", flush=True)
    print("to stderr", file=sys.stderr)
    os.kill(os.getpid(), signal.SIGKILL)
    print("never printed")


def dies_once_then_waits(flag: str, release: str) -> str:
    """Attempt 1 prints and dies; attempt 2 prints, waits for ``release``, returns."""
    if not os.path.exists(flag):
        open(flag, "w").close()
        print("attempt 1 was here")
        os.kill(os.getpid(), signal.SIGKILL)
    print("attempt 2 started")
    deadline = time.monotonic() + 60
    while not os.path.exists(release) and time.monotonic() < deadline:
        time.sleep(0.01)
    return "done"


# ------------------------------------------------------------------ tests


def test_a_long_output_shows_its_last_64_kib_everywhere(stack: Stack, hc: Client) -> None:
    tid = hc.submit("local", chatter, LINES)
    assert hc.get_result(tid, timeout=TIMEOUT) == LINES
    task = hc.get_task(tid)
    total = sum(len(line(i)) for i in range(LINES))
    assert total > MAX_OUTPUT
    marker = cut_marker(total - MAX_OUTPUT)
    assert task.stdout.startswith(marker)
    assert task.stdout.endswith(line(LINES - 1))
    assert len(task.stdout.encode()) == MAX_OUTPUT + len(marker)
    # What is kept is exactly the end of what was printed.
    printed = "".join(line(i) for i in range(LINES))
    assert printed.endswith(task.stdout[len(marker) :])
    assert task.stderr == "warning: almost done\nwarning: done\n"

    shown = run_cli("tasks", "show", tid, env=stack.server.env, timeout=60)
    assert shown.returncode == 0, shown.stderr
    assert "stdout" in shown.stdout and "stderr" in shown.stdout
    assert marker.strip() in shown.stdout
    assert line(LINES - 1).strip() in shown.stdout.splitlines()
    assert "warning: done" in shown.stdout.splitlines()

    out = grpcurl(
        stack.address, "heartline.v1.TaskService/GetTasks", data={"task_ids": [tid]}, timeout=60
    )
    assert out.returncode == 0, out.stderr
    [got] = json.loads(out.stdout)["tasks"]
    assert got["stdout"] == task.stdout and got["stderr"] == task.stderr


def test_a_task_that_prints_nothing_has_no_output(stack: Stack, hc: Client) -> None:
    tid = hc.submit("local", pow, 2, 8)
    assert hc.get_result(tid, timeout=TIMEOUT) == 256
    task = hc.get_task(tid)
    assert (task.stdout, task.stderr) == ("", "")
    shown = run_cli("tasks", "show", tid, env=stack.server.env, timeout=60)
    assert shown.returncode == 0 and "stdout" not in shown.stdout, shown.stdout


def test_tasks_on_one_worker_never_mix_their_output(stack: Stack, hc: Client) -> None:
    ep = stack.solo_endpoint()  # one worker: every task runs where the one before it printed
    words = [f"word-{i}" for i in range(20)]
    ids = [hc.submit(ep, says, word, 3) for word in words]
    assert [hc.get_result(tid, timeout=TIMEOUT) for tid in ids] == words
    for tid, word, task in zip(ids, words, hc.get_tasks(ids), strict=True):
        assert task.id == tid
        assert (task.stdout, task.stderr) == (f"{word}\n" * 3, ""), task.id


def test_a_worker_killed_mid_print_keeps_what_it_printed(stack: Stack, hc: Client) -> None:
    tid = hc.submit("local", dies_mid_print, max_system_retries=0)
    task = wait_state(hc, tid, TaskState.ERRORED, timeout=TIMEOUT)
    assert task.error is not None and task.error.failure_kind is FailureKind.WORKER_DIED
    assert task.stdout == "first line\nsecond line\n"
    assert task.stderr == "to stderr\n"


def test_a_system_failed_attempts_output_stays_until_the_next_attempt_ends(
    stack: Stack, hc: Client, tmp_path: Path
) -> None:
    flag, release = tmp_path / "flag", tmp_path / "release"
    tid = hc.submit("local", dies_once_then_waits, str(flag), str(release), max_system_retries=1)

    def attempt_2_runs() -> None:
        task = hc.get_task(tid, history=False)
        assert (task.state, task.attempt) == (TaskState.RUNNING, 2), task

    assert_eventually(attempt_2_runs, timeout=TIMEOUT, interval=0.02)
    # Attempt 2 runs: the task shows what attempt 1 wrote before its worker died.
    assert hc.get_task(tid).stdout == "attempt 1 was here\n"
    release.touch()
    assert hc.get_result(tid, timeout=TIMEOUT) == "done"
    task = hc.get_task(tid)
    assert task.attempt == 2 and (task.stdout, task.stderr) == ("attempt 2 started\n", "")


def test_list_tasks_leaves_the_output_out(stack: Stack, hc: Client) -> None:
    tid = hc.submit("local", chatter, 3)
    assert hc.get_result(tid, timeout=TIMEOUT) == 3
    [listed] = [t for t in hc.list_tasks(limit=50) if t.id == tid]
    assert (listed.stdout, listed.stderr) == ("", "")
    task = hc.get_task(tid)
    assert task.stdout == line(0) + line(1) + line(2) and task.stderr.startswith("warning")


def test_the_server_tells_agents_its_limit_and_cuts_what_an_agent_sends_past_it(
    home: Path, tmp_path: Path
) -> None:
    """A forged agent (a raw Connect stream) that ignores the limit in its welcome."""
    limit = 1000
    srv = launch_server(home, tmp_path / "heartline.db", "127.0.0.1:0", "--max-output", str(limit))
    metadata = _defaults.bearer_metadata(_defaults.token())
    sent = "".join(line(i) for i in range(1000))  # 47,000 bytes

    async def forge(hc: Client) -> tuple[int, str]:
        async with grpc.aio.insecure_channel(srv.address) as channel:
            stub = ep_grpc.EndpointServiceStub(channel)
            reply = await stub.RegisterEndpoint(
                ep_pb.RegisterEndpointRequest(name="forger"), metadata=metadata, timeout=10
            )
            call = stub.Connect(metadata=metadata, timeout=20)
            hello = ep_pb.Hello(endpoint_id=reply.endpoint_id, agent_id=str(uuid.uuid4()))
            hello.capacity = 1
            await call.write(ep_pb.ConnectRequest(hello=hello))
            welcome = (await call.read()).welcome
            tid = await asyncio.to_thread(hc.submit, "forger", pow, 2, 2)
            dispatch = (await call.read()).dispatch.dispatches[0]
            assert dispatch.task_id == tid
            done = ep_pb.StatusUpdate(
                task_id=tid,
                attempt=dispatch.attempt,
                state=task_pb2.TASK_STATE_SUCCEEDED,
                result=dumps_result(4),
                stdout=sent,
                stderr="short\n",
            )
            await call.write(ep_pb.ConnectRequest(status=ep_pb.StatusBatch(updates=[done])))
            while (await call.read()).WhichOneof("message") != "ack":
                pass
            call.cancel()
            return welcome.max_output_bytes, tid

    with Client(srv.address) as hc:
        told, tid = asyncio.run(forge(hc))
        assert told == limit
        task = hc.get_task(tid)
    assert task.state is TaskState.SUCCEEDED and task.result == 4
    assert task.stdout == cut_marker(len(sent) - limit) + sent[-limit:]
    assert len(task.stdout.encode()) <= limit + MARKER_ROOM
    assert task.stderr == "short\n"
