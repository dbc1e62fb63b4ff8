"""The operator CLI as a subprocess against a live server with real agents: tasks
list/show/hold/release/cancel, endpoints list, stats, and one-line errors."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import uuid

import cloudpickle
import pytest

import heartline
from heartline import Client, TaskState
from tests.conftest import Stack
from tests.helpers import run_cli, start_blocker, wait_state

cloudpickle.register_pickle_by_value(sys.modules[__name__])

TIMEOUT = 20.0


@pytest.fixture(scope="module")
def stack_workers() -> int:
    """The module's ``stack`` (tests/conftest.py) runs ``local`` with 2 workers."""
    return 2


def cli(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    return run_cli(*args, env=stack.server.env, timeout=60)


def ok(stack: Stack, *args: str) -> str:
    out = cli(stack, *args)
    assert out.returncode == 0, f"heartline {' '.join(args)} exited {out.returncode}:\n{out.stdout}\n{out.stderr}"
    assert "Traceback" not in out.stderr
    return out.stdout


def one_line_error(out: subprocess.CompletedProcess[str]) -> str:
    """Assert the CLI failed cleanly: non-zero exit, one line on stderr, no traceback."""
    assert out.returncode != 0, out.stdout
    assert "Traceback" not in out.stderr and "Traceback" not in out.stdout, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith("error: "), lines[0]
    return lines[0]


def square(x: int) -> int:
    return x * x


# --------------------------------------------------------------------------- control


def test_hold_release_cancel_from_the_cli(stack: Stack, hc: Client) -> None:
    ep = stack.solo_endpoint()
    running = start_blocker(hc, ep)
    queued = hc.submit(ep, square, 5)
    other = hc.submit(ep, square, 6)
    assert [t.state for t in hc.get_tasks([queued, other])] == [TaskState.WAITING_FOR_EP] * 2

    # hold a queued task
    assert ok(stack, "tasks", "hold", queued).split() == [queued, "held"]
    assert hc.get_task(queued, history=False).state is TaskState.HELD

    # cancel a queued task
    assert ok(stack, "tasks", "cancel", other).split() == [other, "cancelled"]
    with pytest.raises(heartline.TaskFailedError, match="cancelled"):
        hc.get_result(other, timeout=TIMEOUT)

    # cancel the running task: its worker is freed, a new task runs while `queued` stays held
    assert ok(stack, "tasks", "cancel", running).split() == [running, "cancelled"]
    assert hc.get_task(running, history=False).state is TaskState.CANCELLED
    assert hc.get_result(hc.submit(ep, square, 2), timeout=TIMEOUT) == 4
    assert hc.get_task(queued, history=False).state is TaskState.HELD

    # release it: it runs and succeeds
    out = ok(stack, "tasks", "release", queued).split()
    assert out[0] == queued and out[1] != "held"
    assert hc.get_result(queued, timeout=TIMEOUT) == 25


def test_cancel_running_task_from_the_cli_frees_the_worker(stack: Stack, hc: Client) -> None:
    ep = stack.solo_endpoint()
    running = start_blocker(hc, ep)
    assert ok(stack, "tasks", "cancel", running).split() == [running, "cancelled"]
    assert hc.get_result(hc.submit(ep, square, 3), timeout=TIMEOUT) == 9
    # `tasks wait` agrees: the cancelled task did not succeed (exit 1).
    out = cli(stack, "tasks", "wait", running, "--timeout", "10")
    assert out.returncode == 1
    assert "0 succeeded, 1 did not" in out.stdout


def test_hold_then_release_a_task_submitted_held(stack: Stack, hc: Client) -> None:
    tid = hc.submit("local", square, 7, held=True)
    assert hc.get_task(tid, history=False).state is TaskState.HELD
    out = ok(stack, "tasks", "release", tid).split()
    assert out[0] == tid and out[1] != "held"
    assert hc.get_result(tid, timeout=TIMEOUT) == 49
    out = cli(stack, "tasks", "wait", tid, "--timeout", "10")
    assert out.returncode == 0 and "1 succeeded, 0 did not" in out.stdout


# --------------------------------------------------------------------------- reading


def test_tasks_show_prints_the_history(stack: Stack, hc: Client) -> None:
    tid = hc.submit("local", square, 9)
    assert hc.get_result(tid, timeout=TIMEOUT) == 81
    out = ok(stack, "tasks", "show", tid)
    assert tid in out
    assert re.search(r"state\s+success", out), out
    assert re.search(r"endpoint\s+local", out), out
    assert re.search(r"result\s+81", out), out
    assert "history" in out
    history = [line for line in out.splitlines() if "│" in line]
    # one row per transition, in order, each with its cause
    task = hc.get_task(tid)
    rows = [line for line in history if any(s.value in line for s in TaskState)]
    assert len(rows) == len(task.history), out
    for row, transition in zip(rows, task.history, strict=True):
        assert transition.to_state.value in row
        assert transition.cause in row
    assert "success" in rows[-1]


def test_tasks_show_of_an_errored_task_prints_the_remote_traceback(stack: Stack, hc: Client) -> None:
    def explode() -> None:
        raise KeyError("no such key")

    tid = hc.submit("local", explode)
    with pytest.raises(heartline.RemoteError):
        hc.get_result(tid, timeout=TIMEOUT)
    out = ok(stack, "tasks", "show", tid)
    assert re.search(r"state\s+errored", out), out
    assert "KeyError: 'no such key'" in out
    assert 'raise KeyError("no such key")' in out


def test_tasks_list_by_state(stack: Stack, hc: Client) -> None:
    done = hc.submit("local", square, 4)
    assert hc.get_result(done, timeout=TIMEOUT) == 16
    held = hc.submit("local", square, 3, held=True)

    out = ok(stack, "tasks", "list", "--state", "success")
    assert done in out and held not in out, out
    row = next(line for line in out.splitlines() if done in line)
    assert "success" in row and "local" in row

    out = ok(stack, "tasks", "list", "--state", "held")
    assert held in out and done not in out, out

    out = ok(stack, "tasks", "list", "--state", "failed")
    assert "no tasks" in out
    hc.cancel([held])


def test_endpoints_list_shows_local_online(stack: Stack, hc: Client) -> None:
    out = ok(stack, "endpoints", "list")
    [row] = [line for line in out.splitlines() if re.search(r"\blocal\b", line)]
    cells = [cell.strip() for cell in row.split("│") if cell.strip()]
    [local] = [ep for ep in hc.list_endpoints() if ep.name == "local"]
    # endpoint, id, online, agents, the agents' Python, workers, ...
    python = "{}.{}".format(*sys.version_info[:2])
    assert cells[:6] == ["local", local.id, "yes", "1", python, "2"], out


def test_stats_counts(stack: Stack, hc: Client) -> None:
    ids = hc.submit_batch("local", [(square, (i,), {}) for i in range(3)])
    assert [hc.get_result(t, timeout=TIMEOUT) for t in ids] == [0, 1, 4]
    out = ok(stack, "stats")
    stats = hc.stats()
    assert stats.tasks_by_state.get("success", 0) >= 3
    for state in TaskState:
        match = re.search(rf"\b{re.escape(state.value)}\b\W+(\d+)", out)
        assert match, f"no row for {state.value}:\n{out}"
        assert int(match.group(1)) == stats.tasks_by_state.get(state.value, 0), out
    online = re.search(r"endpoints online:\s*(\d+)\s+agents online:\s*(\d+)", out)
    assert online, out
    assert (int(online.group(1)), int(online.group(2))) == (stats.endpoints_online, stats.agents_online)
    assert stats.agents_online >= 1


# --------------------------------------------------------------------------- errors


def test_cancel_of_a_succeeded_task_is_one_line(stack: Stack, hc: Client) -> None:
    tid = hc.submit("local", square, 8)
    assert hc.get_result(tid, timeout=TIMEOUT) == 64
    line = one_line_error(cli(stack, "tasks", "cancel", tid))
    assert tid in line and "success" in line and "cancel" in line, line
    assert "FAILED_PRECONDITION" in line, line
    assert hc.get_task(tid, history=False).state is TaskState.SUCCEEDED


def test_malformed_and_unknown_ids_are_one_line(stack: Stack) -> None:
    line = one_line_error(cli(stack, "tasks", "show", "not-a-task"))
    assert "not-a-task" in line and "INVALID_ARGUMENT" in line, line
    line = one_line_error(cli(stack, "tasks", "hold", "not-a-task"))
    assert "not-a-task" in line, line
    unknown = str(uuid.uuid4())
    line = one_line_error(cli(stack, "tasks", "show", unknown))
    assert unknown in line and "NOT_FOUND" in line, line


def test_unreachable_server_is_one_line(tmp_path) -> None:  # noqa: ANN001
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {"HEARTLINE_ADDRESS": f"127.0.0.1:{port}", "HEARTLINE_HOME": str(tmp_path)}
    for args in (("stats",), ("endpoints", "list"), ("tasks", "list")):
        out = run_cli(*args, env=env, timeout=60)
        line = one_line_error(out)
        assert "UNAVAILABLE" in line or "unavailable" in line.lower(), line


def test_wait_on_held_task_times_out_cleanly(stack: Stack, hc: Client) -> None:
    tid = hc.submit("local", square, 1, held=True)
    out = cli(stack, "tasks", "wait", tid, "--timeout", "0.5")
    # stderr also carries the progress bar's last frame; the error is one line after it.
    assert out.returncode != 0
    assert "Traceback" not in out.stderr, out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and out.stderr.strip().splitlines()[-1] == errors[0], out.stderr
    assert tid in errors[0] and "0.5" in errors[0], errors[0]
    hc.cancel([tid])
    wait_state(hc, tid, TaskState.CANCELLED, timeout=TIMEOUT)
