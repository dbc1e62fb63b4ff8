"""Groups end to end: a real server process, real agents and a real SQLite file, driven
through the public API (Client, Executor) and the CLI: a pipeline with a failing task
and finally tasks, results passed along, a chain of Executor futures, validation that
stores nothing, cancel modes, and a server SIGKILLed mid-run."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import cloudpickle
import pytest

import heartline
from heartline import Client, Executor, Group, GroupStatus, SkipReason, TaskSkippedError, TaskState
from tests.conftest import STORE_KINDS, ServerProc, Stack, relaunch_server
from tests.helpers import Proc, assert_eventually, grpcurl, heartline_cmd

cloudpickle.register_pickle_by_value(sys.modules[__name__])

TIMEOUT = 60.0  # bound of every wait; far above what any group here needs

# The module shares one server and one agent of "local" (conftest's ``stack``).


@pytest.fixture(scope="module", params=STORE_KINDS)
def stack_store_kind(request: pytest.FixtureRequest) -> str:
    """The module's tests run on a SQLite store, then on a PostgreSQL one."""
    return request.param


@pytest.fixture(params=STORE_KINDS)
def store_kind(request: pytest.FixtureRequest) -> str:
    """Each test runs on a SQLite store, then on a PostgreSQL one."""
    return request.param


@pytest.fixture(scope="module")
def stack_workers() -> int:
    return 4


# --------------------------------------------------------------------------- remote functions


def fetch(i: int) -> int:
    return i


def parse(x: int, bad: int = -1) -> int:
    if x == bad:
        raise ValueError(f"cannot parse {x}")
    return x * 10


def check(x: int) -> bool:
    return x >= 0


def notify(path: str, what: str) -> str:
    with open(path, "a") as f:
        f.write(what + "\n")
    return what


def add(a: int, b: int) -> int:
    return a + b


def inc(x: int) -> int:
    return x + 1


def nap(seconds: float, value: int) -> int:
    time.sleep(seconds)
    return value


def pipeline(marks: Path, bad: int) -> Group:
    """60 DAG tasks: 20 fetches, 20 parses taking them, 19 checks after the parses and a
    sum of the last parse and the first; a notify-on-failure and a celebrate-on-success
    finally task."""
    g = Group("pipeline", endpoint="local")
    parsed = []
    for i in range(20):
        raw = g.task(f"fetch-{i}", fetch, i)
        parsed.append(g.task(f"parse-{i}", parse, raw, bad=bad))
    for i in range(19):
        g.task(f"check-{i}", check, parsed[i])
    g.task("sum", add, parsed[0], parsed[19])
    g.finally_task(
        "notify", notify, str(marks), "failed", when=[("$(tasks.status)", "in", ["Failed"])]
    )
    g.finally_task(
        "celebrate", notify, str(marks), "ok", when=[("$(tasks.status)", "notin", ["Failed"])]
    )
    return g


# --------------------------------------------------------------------------- the pipeline


def test_a_pipeline_with_a_failing_task_runs_its_notify_finally_task_exactly_once(
    stack: Stack, hc: Client, tmp_path: Path
) -> None:
    marks = tmp_path / "marks"
    gid = hc.submit_group(pipeline(marks, bad=7))

    info = hc.wait_group(gid, timeout=TIMEOUT)

    assert info.status is GroupStatus.FAILED and not info.pending
    tasks = info.tasks
    assert len(tasks) == 62
    assert tasks["parse-7"].state is TaskState.ERRORED
    assert tasks["check-7"].state is TaskState.SKIPPED
    assert tasks["check-7"].skip_reason is SkipReason.INPUT_NOT_SUCCEEDED
    assert all(tasks[f"check-{i}"].state is TaskState.SUCCEEDED for i in range(19) if i != 7), {
        n: (t.state, t.error, t.skip_reason)
        for n, t in tasks.items()
        if t.state is not TaskState.SUCCEEDED
    }
    assert tasks["sum"].result == 0 + 190  # results passed along two edges
    assert tasks["notify"].state is TaskState.SUCCEEDED
    assert tasks["celebrate"].skip_reason is SkipReason.WHEN_FALSE
    assert marks.read_text() == "failed\n"  # ran exactly once, and only it
    with pytest.raises(TaskSkippedError, match="input-not-succeeded"):
        hc.get_result(tasks["check-7"].id, timeout=TIMEOUT)
    assert info.counts == {"Succeeded": 58, "Failed": 1, "Skipped": 1, "Cancelled": 0, "None": 0}
    listed = {g.id: g for g in hc.list_groups()}
    assert listed[gid].status is GroupStatus.FAILED and not listed[gid].pending


def test_the_same_pipeline_without_a_failure_celebrates_instead(
    stack: Stack, hc: Client, tmp_path: Path
) -> None:
    marks = tmp_path / "marks"
    info = hc.wait_group(hc.submit_group(pipeline(marks, bad=-1)), timeout=TIMEOUT)

    assert info.status is GroupStatus.SUCCEEDED
    assert info.tasks["notify"].skip_reason is SkipReason.WHEN_FALSE
    assert marks.read_text() == "ok\n"


def test_a_false_when_completes_the_group_and_its_run_after_children_still_run(
    stack: Stack, hc: Client
) -> None:
    g = Group("branches", endpoint="local")
    g.task("lint", fetch, 1)
    report = g.task("report", fetch, 2, when=[("$(tasks.lint.status)", "in", ["Failed"])])
    g.task("after", fetch, 3, run_after=["report"])
    g.task("uses", inc, report)

    info = hc.wait_group(hc.submit_group(g), timeout=TIMEOUT)

    assert info.status is GroupStatus.COMPLETED
    assert info.tasks["report"].skip_reason is SkipReason.WHEN_FALSE
    assert info.tasks["after"].result == 3
    assert info.tasks["uses"].skip_reason is SkipReason.INPUT_NOT_SUCCEEDED


# --------------------------------------------------------------------------- the Executor


def test_a_chain_of_50_executor_futures(stack: Stack) -> None:
    with Executor("local", stack.address) as ex:
        fut = ex.submit(inc, 0)
        for _ in range(49):
            fut = ex.submit(inc, fut)
        assert fut.result(timeout=TIMEOUT) == 50
        b = ex.submit(str, ex.submit(pow, 2, 10))
        assert b.result(timeout=TIMEOUT) == "1024"


def test_an_executor_future_whose_input_failed_is_skipped(stack: Stack) -> None:
    with Executor("local", stack.address) as ex:
        bad = ex.submit(parse, 7, bad=7)
        after = ex.submit(inc, bad)
        with pytest.raises(heartline.RemoteError):
            bad.result(timeout=TIMEOUT)
        with pytest.raises(TaskSkippedError) as info:
            after.result(timeout=TIMEOUT)
        assert info.value.skip_reason is SkipReason.INPUT_NOT_SUCCEEDED


# --------------------------------------------------------------------------- refused groups


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (
            lambda g: (
                g.task("a", fetch, 1, run_after=["b"]),
                g.task("b", fetch, 2, run_after=["a"]),
            ),
            "a cycle",
        ),
        (
            lambda g: g.task("a", fetch, 1, run_after=["nope"]),
            "task 'a': run_after: unknown task 'nope'",
        ),
        (
            lambda g: g.task("a", fetch, 1, when=[("$(tasks.status)", "in", ["Failed"])]),
            "DAG tasks can not refer to the aggregate status of tasks",
        ),
        (
            lambda g: (
                g.task("a", fetch, 1),
                g.task("b", fetch, 1, when=[("$(tasks.a.status)", "is", ["x"])]),
            ),
            "task 'b': when: unknown operator 'is'",
        ),
    ],
)
def test_a_group_that_cannot_run_is_refused_and_nothing_is_stored(
    stack: Stack, hc: Client, build: Callable[[Group], object], message: str
) -> None:
    before = {g.id for g in hc.list_groups(limit=1000)}
    g = Group("refused", endpoint="local")
    build(g)
    with pytest.raises(heartline.InvalidArgumentError) as info:
        hc.submit_group(g)
    assert message in str(info.value)
    assert {g.id for g in hc.list_groups(limit=1000)} == before


# --------------------------------------------------------------------------- cancel modes


@pytest.mark.parametrize(
    ("mode", "running", "finally_ran"),
    [
        ("cancel", TaskState.CANCELLED, False),
        ("cancel_run_finally", TaskState.CANCELLED, True),
        ("stop_run_finally", TaskState.SUCCEEDED, True),
    ],
)
def test_cancel_modes(
    stack: Stack, hc: Client, tmp_path: Path, mode: str, running: TaskState, finally_ran: bool
) -> None:
    endpoint = stack.solo_endpoint()  # one worker: "slow" runs, "next" waits for it
    gate = tmp_path / "gate"
    g = Group(f"cancel-{mode}", endpoint=endpoint)
    g.task("slow", start_blocker_fn, str(gate))
    g.task("next", fetch, 1, run_after=["slow"])
    g.finally_task("fin", fetch, 9)
    gid = hc.submit_group(g)
    assert_eventually(gate.exists, timeout=TIMEOUT, message="slow started")

    hc.cancel_group(gid, mode=mode)
    if mode == "stop_run_finally":
        (tmp_path / "gate.go").touch()  # let the running task finish
    info = hc.wait_group(gid, timeout=TIMEOUT)

    assert info.tasks["slow"].state is running
    assert info.tasks["next"].state in (TaskState.CANCELLED, TaskState.SKIPPED)
    assert (info.tasks["fin"].state is TaskState.SUCCEEDED) == finally_ran
    assert str(info.cancel_mode) == mode
    with pytest.raises(heartline.FailedPreconditionError, match="has settled"):
        hc.cancel_group(gid)


def start_blocker_fn(path: str) -> str:
    """Mark that it started, then wait (bounded) for a go file next to the mark."""
    Path(path).touch()
    deadline = time.monotonic() + 60
    go = Path(path + ".go")
    while not go.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    return "done"


# --------------------------------------------------------------------------- the CLI and grpcurl


def test_groups_show_draws_the_dag_and_list_shows_the_group(stack: Stack, hc: Client) -> None:
    g = Group("drawn", endpoint="local")
    a = g.task("a", fetch, 1)
    g.task("b", inc, a)
    g.finally_task("f", fetch, 2)
    gid = hc.submit_group(g)
    hc.wait_group(gid, timeout=TIMEOUT)
    env = {"HEARTLINE_ADDRESS": stack.address, "HEARTLINE_HOME": str(stack.home)}

    shown = subprocess.run(
        heartline_cmd("groups", "show", gid), env=env, capture_output=True, text=True, timeout=60
    )
    listed = subprocess.run(
        heartline_cmd("groups", "list"), env=env, capture_output=True, text=True, timeout=60
    )

    assert shown.returncode == 0, shown.stderr
    info = hc.get_group(gid)
    ids = {name: t.id for name, t in info.tasks.items()}
    assert "Succeeded" in shown.stdout.splitlines()[0] or "Succeeded" in shown.stdout
    for line in (
        f"├── a  success  {ids['a']}",
        f"│   └── b  success  {ids['b']}",
        "└── finally",
        f"    └── f  success  {ids['f']}",
    ):
        assert line in shown.stdout.splitlines(), shown.stdout
    assert listed.returncode == 0 and gid in listed.stdout, listed.stdout


# --------------------------------------------------------------------------- SIGKILL


def test_a_group_survives_a_server_sigkill_and_each_task_succeeds_exactly_once(
    server: ServerProc, start_agent: Callable[..., Proc], tmp_path: Path
) -> None:
    srv = server
    start_agent("local", 2)
    g = Group("survivor", endpoint="local")
    refs = [g.task(f"w{i}", nap, 0.2, i) for i in range(20)]  # 2 s on 2 workers
    total = g.task("total", sum_all, *refs)
    g.task("double", add, total, total)
    g.finally_task("fin", fetch, 1)
    with Client(srv.address) as hc:
        gid = hc.submit_group(g)
        assert_eventually(
            lambda: hc.get_group(gid).counts["Succeeded"] >= 3,
            timeout=TIMEOUT,
            message="a few done",
        )
        assert hc.get_group(gid).pending
        srv.proc.kill()
        killed = time.time()
        srv = relaunch_server(srv)
        info = hc.wait_group(gid, timeout=TIMEOUT)
        full = hc.get_group(gid, history=True)

    assert info.status is GroupStatus.SUCCEEDED
    # The kill came mid-run: tasks settled on both sides of it.
    settled = [t.settled.timestamp() for t in full.tasks.values() if t.settled is not None]
    assert min(settled) < killed < max(settled)
    assert full.tasks["double"].result == 2 * sum(range(20))
    for name, task in full.tasks.items():
        wins = [t for t in task.history if t.to_state is TaskState.SUCCEEDED]
        assert task.state is TaskState.SUCCEEDED and len(wins) == 1, (name, task.history)


def sum_all(*xs: int) -> int:
    return sum(xs)


def test_get_group_answers_over_grpcurl(stack: Stack, hc: Client) -> None:
    g = Group("json", endpoint="local")
    g.task("a", fetch, 1)
    gid = hc.submit_group(g)
    hc.wait_group(gid, timeout=TIMEOUT)
    out = grpcurl(stack.address, "heartline.v1.TaskService/GetGroup", data={"groupId": gid})
    assert out.returncode == 0, out.stderr
    group = json.loads(out.stdout)["group"]
    assert group["status"] == "GROUP_STATUS_SUCCEEDED"
    assert group["tasks"][0]["name"] == "a"
