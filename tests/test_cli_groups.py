"""Unit tests of `heartline groups list|show|cancel`: the tree drawing as a pure function,
and the commands run in-process against the fake TaskService of tests/helpers.py."""

from __future__ import annotations

import pickle
from collections.abc import Iterator

import pytest
from click.testing import CliRunner

from heartline import Client, Group
from heartline._cli import main
from heartline._cli_ops import group_counts_text, group_tree
from heartline.client import GroupInfo
from heartline.v1 import task_pb2
from tests.helpers import FakeServer, serve_fake


def square(x):
    return x * x


@pytest.fixture
def fake() -> Iterator[FakeServer]:
    with serve_fake() as server:
        yield server


def _member(name, state, *, after=(), inputs=(), final=False, **task_fields):
    return task_pb2.GroupTask(
        name=name,
        is_finally=final,
        run_after=after,
        inputs=inputs,
        task=task_pb2.Task(task_id=f"t-{name}", name=name, state=state, **task_fields),
    )


def diamond() -> GroupInfo:
    """a -> (b, c) -> d, and a finally task; c failed, so d was skipped."""
    return GroupInfo._from_proto(
        task_pb2.Group(
            group_id="g1",
            name="nightly",
            status=task_pb2.GROUP_STATUS_FAILED,
            pending=True,
            tasks=[
                _member("a", task_pb2.TASK_STATE_SUCCEEDED),
                _member("b", task_pb2.TASK_STATE_SUCCEEDED, inputs=["a"]),
                _member(
                    "c",
                    task_pb2.TASK_STATE_ERRORED,
                    after=["a"],
                    error=task_pb2.RemoteError(type_name="ValueError", message="bad"),
                ),
                _member(
                    "d",
                    task_pb2.TASK_STATE_SKIPPED,
                    after=["c"],
                    inputs=["b"],
                    skip_reason=task_pb2.SKIP_REASON_PARENT_NOT_SUCCEEDED,
                ),
                _member("notify", task_pb2.TASK_STATE_RUNNING, final=True, pending=True),
            ],
        )
    )


def test_tree_of_a_diamond_and_a_finally_task():
    assert group_tree(diamond()) == [
        "nightly (g1)  Failed, pending",
        "├── a  success  t-a",
        "│   ├── b  success  t-b",
        "│   │   └── d  skipped (parent-not-succeeded)  t-d",
        "│   └── c  errored (ValueError)  t-c",
        "│       └── d  (shown above)",
        "└── finally",
        "    └── notify  running  t-notify",
    ]


def test_tree_of_several_roots_without_finally():
    info = GroupInfo._from_proto(
        task_pb2.Group(
            group_id="g2",
            name="flat",
            status=task_pb2.GROUP_STATUS_SUCCEEDED,
            cancel_mode=task_pb2.CANCEL_MODE_STOP_RUN_FINALLY,
            timed_out=True,
            tasks=[
                _member("x", task_pb2.TASK_STATE_SUCCEEDED),
                _member("y", task_pb2.TASK_STATE_WAITING_FOR_DEPS, after=["x", "x"], pending=True),
                # a parent the group does not have is drawn as a root
                _member("z", task_pb2.TASK_STATE_WAITING_FOR_EP, after=["gone"], pending=True),
            ],
        )
    )
    assert group_tree(info) == [
        "flat (g2)  Succeeded, stop_run_finally, timed out",
        "├── x  success  t-x",
        "│   └── y  waiting-for-deps  t-y",
        "└── z  waiting-for-ep  t-z",
    ]


def test_tree_draws_every_task_of_a_cycle_once():
    # The server refuses cycles; the drawing still ends and shows each task.
    info = GroupInfo._from_proto(
        task_pb2.Group(
            group_id="g3",
            name="loop",
            tasks=[
                _member("p", task_pb2.TASK_STATE_HELD, after=["q"]),
                _member("q", task_pb2.TASK_STATE_HELD, after=["p"]),
            ],
        )
    )
    assert group_tree(info) == [
        "loop (g3)  None",
        "└── p  held  t-p",
        "    └── q  held  t-q",
        "        └── p  (shown above)",
    ]


def test_counts_text():
    assert group_counts_text({"Succeeded": 2, "Failed": 0, "Skipped": 1, "None": 3}) == (
        "2 succeeded, 1 skipped, 3 pending"
    )
    assert group_counts_text({"Succeeded": 0}) == "-"


# -- the commands, against the fake ---------------------------------------------------------


def _submit(fake: FakeServer, name: str) -> str:
    g = Group(name, endpoint="local")
    first = g.task("first", square, 1)
    g.task("second", square, first)
    g.finally_task("last", square, 3)
    with Client(fake.address) as hc:
        return hc.submit_group(g)


def run(fake: FakeServer, *args: str):
    return CliRunner().invoke(main, [*args, "--server", fake.address], catch_exceptions=False)


def test_groups_list(fake):
    old, new = _submit(fake, "old"), _submit(fake, "new")
    first_task = fake.service.group_members[old][0][0]
    fake.settle(first_task, task_pb2.TASK_STATE_SUCCEEDED, result=pickle.dumps(1))
    fake.service.groups[old].task_counts.update({"Succeeded": 1, "None": 1})
    fake.set_group(old, task_pb2.GROUP_STATUS_SUCCEEDED, False)
    out = run(fake, "groups", "list")
    assert out.exit_code == 0, out.output
    rows = [line for line in out.stdout.splitlines() if old in line or new in line]
    assert len(rows) == 2 and new in rows[0] and old in rows[1]  # newest first
    assert "old" in rows[1] and "Succeeded" in rows[1] and "1 succeeded, 1 pending" in rows[1]
    assert "new" in rows[0] and "None (pending)" in rows[0]
    out = run(fake, "groups", "list", "--pending")
    assert out.exit_code == 0 and new in out.stdout and old not in out.stdout
    assert fake.service.list_group_requests[-1].pending_only


def test_groups_show_draws_the_tree(fake):
    gid = _submit(fake, "shown")
    ids = [tid for tid, _, _ in fake.service.group_members[gid]]
    fake.settle(ids[0], task_pb2.TASK_STATE_ERRORED, error=task_pb2.RemoteError(type_name="E"))
    fake.settle(
        ids[1], task_pb2.TASK_STATE_SKIPPED, skip_reason=task_pb2.SKIP_REASON_INPUT_NOT_SUCCEEDED
    )
    out = run(fake, "groups", "show", gid)
    assert out.exit_code == 0, out.output
    lines = out.stdout.splitlines()
    assert lines[:5] == [
        f"shown ({gid})  None, pending",
        f"├── first  errored (E)  {ids[0]}",
        f"│   └── second  skipped (input-not-succeeded)  {ids[1]}",
        "└── finally",
        f"    └── last  waiting-for-ep  {ids[2]}",
    ]
    assert "local" in lines[5]  # the endpoint, first in the summary below the tree


def test_groups_cancel_with_a_mode(fake):
    gid = _submit(fake, "doomed")
    out = run(fake, "groups", "cancel", gid, "--mode", "cancel_run_finally")
    assert out.exit_code == 0, out.output
    assert out.stdout.strip() == f"{gid} cancel_run_finally: None, settled"
    assert fake.service.cancel_group_requests[-1].mode == task_pb2.CANCEL_MODE_CANCEL_RUN_FINALLY
    # again: the group has settled; one line on stderr, exit 1
    out = run(fake, "groups", "cancel", gid)
    assert out.exit_code == 1
    assert out.stderr.strip().splitlines() == [
        f"error: group {gid} has settled (FAILED_PRECONDITION)"
    ]
    assert fake.service.cancel_group_requests[-1].mode == task_pb2.CANCEL_MODE_CANCEL


def test_groups_errors_are_one_line(fake):
    out = run(fake, "groups", "show", "nope")
    assert out.exit_code == 1 and out.stdout == ""
    assert out.stderr.strip().splitlines() == ["error: group nope not found (NOT_FOUND)"]
    out = CliRunner().invoke(main, ["groups", "cancel", "g", "--mode", "abort"])
    assert out.exit_code == 2 and "abort" in out.stderr  # a usage error, from click
