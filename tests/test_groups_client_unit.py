"""Unit tests of the client side of groups, without a server: building a Group and its
SubmitGroup request, what the client refuses itself, GroupInfo and the new Task fields from
hand-built messages, skipped outcomes, and, against the fake TaskService of
tests/helpers.py, the group calls and the Executor's futures passed as inputs."""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import itertools
import pickle
import threading
import uuid
from collections.abc import Iterator

import pytest
from google.protobuf.timestamp_pb2 import Timestamp

import heartline
from heartline import (
    AsyncClient,
    CancelMode,
    Client,
    Executor,
    Group,
    GroupInfo,
    GroupStatus,
    SkipReason,
    TaskRef,
    TaskSkippedError,
    TaskState,
)
from heartline._serialize import TaskInput
from heartline.client import When
from heartline.client._base import ClientBase, outcome_of_update
from heartline.client._types import Task
from heartline.v1 import task_pb2
from tests.helpers import FakeServer, serve_fake, wait_until, wait_until_sync

WAIT = 10  # seconds: bound of every wait in these tests


def square(x):
    return x * x


def add(a, b):
    return a + b


def boom(msg):
    raise ValueError(msg)


def combine(*args, **kwargs):
    return args, kwargs


@pytest.fixture
def fake() -> Iterator[FakeServer]:
    with serve_fake() as server:
        yield server


@pytest.fixture
def fake_auto() -> Iterator[FakeServer]:
    with serve_fake(auto_run=True) as server:
        yield server


# -- building a group ------------------------------------------------------------------


def nightly() -> Group:
    g = Group("nightly", endpoint="local", fail_fast=True, timeout=60)
    raw = g.task("fetch", square, 3, priority="high", max_retries=2)
    lint = g.task("lint", square, 4, run_after=[raw], walltime=5.0)
    # fetch twice (an argument and a keyword) is one input; lint comes second
    g.task("parse", combine, raw, 7, lint, sep=raw, max_system_retries=0)
    g.task(
        "report",
        combine,
        tag=g.task("extra", add, 1, 2),
        run_after="lint",
        when=[("$(tasks.lint.status)", "in", ["Succeeded"])],
    )
    g.finally_task("notify", combine, when=[When("$(tasks.status)", "in", ("Failed",))])
    return g


def test_group_request_carries_names_inputs_run_after_when_and_options():
    base = ClientBase()
    request, functions = base._group_request(nightly(), None)
    assert (request.name, request.endpoint, request.fail_fast) == ("nightly", "local", True)
    assert request.timeout_seconds == 60.0
    assert request.session_id == base.session_id
    assert uuid.UUID(request.request_id)
    assert [s.name for s in request.tasks] == ["fetch", "lint", "parse", "extra", "report"]
    assert [s.name for s in request.finally_tasks] == ["notify"]
    fetch, lint, parse, _extra, report = request.tasks
    (notify,) = request.finally_tasks

    assert list(parse.inputs) == ["fetch", "lint"]
    assert pickle.loads(parse.args) == (
        (TaskInput(0), 7, TaskInput(1)),
        {"sep": TaskInput(0)},
    )
    assert list(report.inputs) == ["extra"]
    assert pickle.loads(report.args) == ((), {"tag": TaskInput(0)})
    assert list(fetch.inputs) == [] and pickle.loads(fetch.args) == ((3,), {})

    assert list(lint.run_after) == ["fetch"] and list(report.run_after) == ["lint"]
    assert list(parse.run_after) == []
    assert [(w.input, w.operator, list(w.values)) for w in report.when] == [
        ("$(tasks.lint.status)", "in", ["Succeeded"])
    ]
    assert [(w.input, w.operator, list(w.values)) for w in notify.when] == [
        ("$(tasks.status)", "in", ["Failed"])
    ]
    assert list(notify.run_after) == [] and list(notify.inputs) == []

    assert (fetch.priority, fetch.max_retries) == (task_pb2.PRIORITY_HIGH, 2)
    assert lint.walltime_seconds == 5.0 and lint.priority == task_pb2.PRIORITY_NORMAL
    assert parse.HasField("max_system_retries") and parse.max_system_retries == 0
    assert not fetch.HasField("max_system_retries")
    # each function once, under its content hash
    assert {s.function_id for s in (*request.tasks, notify)} == set(functions)
    assert all(fid == hashlib.sha256(p).hexdigest() for fid, p in functions.items())


def test_keyword_refs_take_input_indexes_in_placeholder_order():
    g = Group("g", endpoint="local")
    a, b = g.task("a", square, 1), g.task("b", square, 2)
    g.task("c", combine, 0, x=b, y=a, z=b)
    request, _ = ClientBase()._group_request(g, None)
    c = request.tasks[2]
    assert list(c.inputs) == ["b", "a"]
    assert pickle.loads(c.args) == ((0,), {"x": TaskInput(0), "y": TaskInput(1), "z": TaskInput(0)})


def test_group_endpoint_comes_from_the_group_else_the_call():
    base = ClientBase()
    g = Group("g")
    g.task("a", square, 1)
    with pytest.raises(heartline.InvalidArgumentError, match="names no endpoint"):
        base._group_request(g, None)
    assert base._group_request(g, "gpu")[0].endpoint == "gpu"
    g.endpoint = "local"
    assert base._group_request(g, "gpu")[0].endpoint == "local"
    assert base._group_request(g, None)[0].timeout_seconds == 0.0  # no timeout


def test_refs_of_another_group_are_refused_naming_task_and_field():
    g, other = Group("g", endpoint="local"), Group("other", endpoint="local")
    mine, theirs = g.task("mine", square, 1), other.task("theirs", square, 2)
    with pytest.raises(ValueError, match=r"task 'x': argument 1: TaskRef\('other', 'theirs'\)"):
        g.task("x", add, mine, theirs)
    with pytest.raises(ValueError, match="task 'y': keyword argument 'b': .*another group"):
        g.task("y", add, a=mine, b=theirs)
    with pytest.raises(ValueError, match="task 'z': run_after: .*'theirs'"):
        g.task("z", square, 1, run_after=[mine, theirs])
    with pytest.raises(ValueError, match="task 'f': argument 0"):
        g.finally_task("f", square, theirs)
    # nothing refused was added: the names are still free
    for name in ("x", "y", "z", "f"):
        assert isinstance(g.task(name, square, 1), TaskRef)


def test_duplicate_names_are_refused():
    g = Group("g", endpoint="local")
    ref = g.task("a", square, 1)
    assert ref == TaskRef(g, "a") and ref.name == "a" and ref.group is g
    with pytest.raises(ValueError, match="task 'a': duplicate name"):
        g.task("a", square, 2)
    with pytest.raises(ValueError, match="task 'a': duplicate name"):
        g.finally_task("a", square, 2)
    g.finally_task("f", square, 3)
    with pytest.raises(ValueError, match="task 'f': duplicate name"):
        g.task("f", square, 4)
    request, _ = ClientBase()._group_request(g, None)
    assert [s.name for s in request.tasks] == ["a"]
    assert [s.name for s in request.finally_tasks] == ["f"]


def test_server_rules_are_left_to_the_server():
    # A cycle, an unknown name, an odd operator and $(tasks.status) in a DAG task are
    # the server's to refuse (INVALID_ARGUMENT naming the culprit): the client sends them.
    g = Group("g", endpoint="local")
    g.task("a", square, 1, run_after=["b"], when=[("$(tasks.status)", "is", "Failed")])
    g.task("b", square, 2, run_after=["a", "nope"])
    request, _ = ClientBase()._group_request(g, None)
    assert list(request.tasks[1].run_after) == ["a", "nope"]
    assert request.tasks[0].when[0].operator == "is"


@pytest.mark.parametrize(
    ("call", "error"),
    [
        (lambda g: g.task("a", square, 1, when=[("$(tasks.b.status)", "in")]), ValueError),
        (lambda g: g.task("a", square, 1, when=("$(tasks.b.status)", "in", "x")), TypeError),
        (lambda g: g.task("a", square, 1, when=[("$(tasks.b.status)", "in", [1])]), TypeError),
        (lambda g: g.task("a", square, 1, run_after=[3]), TypeError),
        (lambda g: g.task(7, square, 1), TypeError),
        (lambda g: g.task("a", square, threading.Lock()), heartline.SerializationError),
        (lambda g: g.task("a", "not callable"), heartline.SerializationError),
        (lambda g: g.task("a", square, 1, priority="urgent"), heartline.InvalidArgumentError),
        (lambda g: g.task("a", square, [g.task("b", square, 1)]), heartline.SerializationError),
    ],
)
def test_malformed_tasks_are_refused_before_anything_is_sent(call, error):
    with pytest.raises(error):
        call(Group("g", endpoint="local"))


@pytest.mark.parametrize(
    "kwargs",
    [{"timeout": 0}, {"timeout": -1}, {"timeout": "10"}, {"endpoint": ""}, {"name": None}],
)
def test_bad_group_options_are_refused(kwargs):
    with pytest.raises(heartline.InvalidArgumentError):
        Group(**{"name": "g", **kwargs})


# -- answers: GroupInfo, Task fields, skipped outcomes ----------------------------------


def _ts(seconds: int) -> Timestamp:
    return Timestamp(seconds=seconds)


def _task(tid, state, **fields):
    return task_pb2.Task(task_id=tid, state=state, pending=False, group_id="g1", **fields)


def test_group_info_from_proto_every_field():
    msg = task_pb2.Group(
        group_id="g1",
        name="nightly",
        endpoint_id="e1",
        endpoint_name="local",
        owner="alice",
        status=task_pb2.GROUP_STATUS_COMPLETED,
        pending=True,
        fail_fast=True,
        timeout_seconds=30.0,
        submit_time=_ts(100),
        settle_time=_ts(160),
        task_counts={"Succeeded": 1, "Skipped": 1, "Mystery": 2},
        finally_count=1,
        cancel_mode=task_pb2.CANCEL_MODE_STOP_RUN_FINALLY,
        timed_out=True,
        tasks=[
            task_pb2.GroupTask(
                name="fetch",
                task=_task("t1", task_pb2.TASK_STATE_SUCCEEDED, name="fetch"),
            ),
            task_pb2.GroupTask(
                name="parse",
                run_after=["lint"],
                inputs=["fetch", "lint"],
                when=[
                    task_pb2.WhenExpression(
                        input="$(tasks.lint.status)", operator="notin", values=["Failed"]
                    )
                ],
                task=_task(
                    "t2",
                    task_pb2.TASK_STATE_SKIPPED,
                    name="parse",
                    skip_reason=task_pb2.SKIP_REASON_WHEN_FALSE,
                    input_task_ids=["t1", "t0"],
                ),
            ),
            task_pb2.GroupTask(name="notify", is_finally=True),
        ],
    )
    info = GroupInfo._from_proto(msg)
    assert (info.id, info.name, info.owner) == ("g1", "nightly", "alice")
    assert (info.endpoint_id, info.endpoint_name) == ("e1", "local")
    assert info.status is GroupStatus.COMPLETED and info.status == "Completed"
    assert info.pending is True and info.fail_fast is True and info.timeout == 30.0
    assert info.submit_time == datetime.datetime(1970, 1, 1, 0, 1, 40, tzinfo=datetime.UTC)
    assert info.settle_time.second == 40 and info.settle_time.minute == 2
    assert dict(info.counts) == {
        "Succeeded": 1,
        "Failed": 0,
        "Skipped": 1,
        "Cancelled": 0,
        "None": 0,
        "Mystery": 2,
    }
    assert info.finally_count == 1
    assert info.cancel_mode is CancelMode.STOP_RUN_FINALLY and info.timed_out is True
    assert list(info.group_tasks) == ["fetch", "parse", "notify"]
    assert list(info.tasks) == ["fetch", "parse"]  # notify came without its task
    parse = info.group_tasks["parse"]
    assert (parse.is_finally, parse.run_after, parse.inputs) == (
        False,
        ("lint",),
        ("fetch", "lint"),
    )
    assert parse.parents == ("lint", "fetch")
    assert parse.when == (When("$(tasks.lint.status)", "notin", ("Failed",)),)
    assert parse.task is info.tasks["parse"]
    assert info.group_tasks["notify"].is_finally and info.group_tasks["notify"].task is None
    skipped = info.tasks["parse"]
    assert skipped.skip_reason is SkipReason.WHEN_FALSE
    assert (skipped.name, skipped.group_id) == ("parse", "g1")
    assert skipped.input_task_ids == ("t1", "t0")
    assert isinstance(skipped.exception, TaskSkippedError)
    assert skipped.exception.skip_reason is SkipReason.WHEN_FALSE
    assert skipped.result is None


def test_group_info_defaults():
    info = GroupInfo._from_proto(task_pb2.Group(group_id="g2"))
    assert info.status is GroupStatus.NONE
    assert info.timeout is None and info.cancel_mode is None and info.submit_time is None
    assert info.tasks == {} and info.group_tasks == {}
    assert set(info.counts.values()) == {0}
    plain = Task._from_proto(task_pb2.Task(task_id="t", state=task_pb2.TASK_STATE_RUNNING))
    assert (plain.group_id, plain.name, plain.skip_reason, plain.input_task_ids) == (
        None,
        None,
        None,
        (),
    )


@pytest.mark.parametrize("reason", list(SkipReason))
def test_skipped_update_raises_task_skipped_error_naming_the_reason(reason):
    update = task_pb2.TaskUpdate(
        task_id="t9", state=task_pb2.TASK_STATE_SKIPPED, skip_reason=reason._to_proto()
    )
    with pytest.raises(TaskSkippedError) as info:
        outcome_of_update(update)
    err = info.value
    assert isinstance(err, heartline.TaskFailedError)
    assert not isinstance(err, heartline.RemoteError)
    assert err.skip_reason is reason and err.task_id == "t9" and err.state == "skipped"
    assert str(err).startswith(f"task t9 skipped: {reason.value} (")


def test_skipped_without_a_reason_says_its_cause():
    update = task_pb2.TaskUpdate(task_id="t9", state=task_pb2.TASK_STATE_SKIPPED, cause="old")
    with pytest.raises(TaskSkippedError, match=r"^task t9 skipped: old$") as info:
        outcome_of_update(update)
    assert info.value.skip_reason is None


# -- AsyncClient and Client against the fake ---------------------------------------------


async def test_submit_group_then_results_and_wait(fake):
    async with AsyncClient(fake.address) as client:
        gid = await client.submit_group(nightly())
        svc = fake.service
        (request,) = svc.group_requests
        assert request.session_id == client.session_id and request.request_id
        assert svc.register_calls == 3  # square, combine, add: once each
        info = await client.get_group(gid)
        assert info.id == gid and info.pending and info.status is GroupStatus.NONE
        assert list(info.tasks) == ["fetch", "lint", "parse", "extra", "report", "notify"]
        assert info.group_tasks["notify"].is_finally
        assert info.group_tasks["parse"].inputs == ("fetch", "lint")

        # its tasks settle to the session, as submitted ones do
        fetch = info.tasks["fetch"].id
        fake.settle(fetch, task_pb2.TASK_STATE_SUCCEEDED, result=pickle.dumps(9))
        assert await client.get_result(fetch, timeout=WAIT) == 9
        report = info.tasks["report"].id
        fake.settle(
            report,
            task_pb2.TASK_STATE_SKIPPED,
            skip_reason=task_pb2.SKIP_REASON_PARENT_NOT_SUCCEEDED,
        )
        with pytest.raises(TaskSkippedError, match="parent-not-succeeded"):
            await client.get_result(report, timeout=WAIT)

        waiting = asyncio.ensure_future(client.wait_group(gid, timeout=WAIT))
        await wait_until(lambda: any(gid in r.group_ids for r in svc.watch_requests))
        fake.set_group(gid, task_pb2.GROUP_STATUS_FAILED, True)  # a change, still pending
        await asyncio.sleep(0.05)
        assert not waiting.done()
        fake.set_group(gid, task_pb2.GROUP_STATUS_FAILED, False)
        info = await waiting
        assert info.status is GroupStatus.FAILED and not info.pending
        assert info.tasks["report"].skip_reason is SkipReason.PARENT_NOT_SUCCEEDED
        watch = next(r for r in svc.watch_requests if gid in r.group_ids)
        assert list(watch.group_ids) == [gid] and not watch.task_ids and not watch.session_id


async def test_wait_group_timeout_and_settled_group(fake):
    async with AsyncClient(fake.address) as client:
        gid = await client.submit_group(nightly())
        with pytest.raises(heartline.TimeoutError, match=f"group {gid} did not settle"):
            await client.wait_group(gid, timeout=0.1)
        fake.set_group(gid, task_pb2.GROUP_STATUS_SUCCEEDED, False)
        # settled already: the watch's first message says so
        info = await client.wait_group(gid, timeout=WAIT)
        assert info.status is GroupStatus.SUCCEEDED


async def test_wait_group_survives_a_broken_stream(fake):
    async with AsyncClient(fake.address) as client:
        gid = await client.submit_group(nightly())
        waiting = asyncio.ensure_future(client.wait_group(gid, timeout=WAIT))
        await wait_until(lambda: any(gid in r.group_ids for r in fake.service.watch_requests))
        watches = sum(gid in r.group_ids for r in fake.service.watch_requests)
        fake.stop()
        fake.set_group(gid, task_pb2.GROUP_STATUS_COMPLETED, False)  # settled while away
        fake.start()
        info = await waiting
        assert info.status is GroupStatus.COMPLETED
        assert sum(gid in r.group_ids for r in fake.service.watch_requests) > watches


async def test_list_groups_pages_and_filters(fake):
    fake.service.page_limit = 2
    async with AsyncClient(fake.address) as client:
        gids = [await client.submit_group(nightly()) for _ in range(5)]
        fake.set_group(gids[0], task_pb2.GROUP_STATUS_SUCCEEDED, False)
        listed = await client.list_groups()
        assert [g.id for g in listed] == gids[::-1]  # newest first, over three pages
        assert all(g.tasks == {} for g in listed)
        assert len(fake.service.list_group_requests) == 3
        assert [g.id for g in await client.list_groups(limit=3)] == gids[:1:-1]
        pending = await client.list_groups(pending_only=True)
        assert [g.id for g in pending] == gids[:0:-1]
        assert fake.service.list_group_requests[-1].pending_only
        with pytest.raises(ValueError):
            await client.list_groups(limit=0)


async def test_cancel_group_modes(fake):
    async with AsyncClient(fake.address) as client:
        gid = await client.submit_group(nightly())
        with pytest.raises(heartline.InvalidArgumentError, match="'cancel_run_finally'"):
            await client.cancel_group(gid, mode="abort")
        assert fake.service.cancel_group_requests == []  # refused before anything was sent
        info = await client.cancel_group(gid, CancelMode.CANCEL_RUN_FINALLY)
        (request,) = fake.service.cancel_group_requests
        assert request.mode == task_pb2.CANCEL_MODE_CANCEL_RUN_FINALLY and request.request_id
        assert info.cancel_mode is CancelMode.CANCEL_RUN_FINALLY and not info.pending
        assert {t.state for t in info.tasks.values()} == {TaskState.CANCELLED}
        with pytest.raises(heartline.FailedPreconditionError):
            await client.cancel_group(gid, "stop_run_finally")
        assert fake.service.cancel_group_requests[-1].mode == task_pb2.CANCEL_MODE_STOP_RUN_FINALLY
        with pytest.raises(heartline.NotFoundError):
            await client.get_group("nope")
        with pytest.raises(heartline.InvalidArgumentError):
            await client.get_group("")


def test_sync_client_group_calls(fake):
    g = Group("sync")  # no endpoint of its own: the call's
    g.task("only", square, 2)
    with Client(fake.address) as hc:
        gid = hc.submit_group(g, endpoint="local")
        assert fake.service.group_requests[0].endpoint == "local"
        assert hc.get_group(gid).tasks["only"].name == "only"
        assert [i.id for i in hc.list_groups()] == [gid]
        fake.set_group(gid, task_pb2.GROUP_STATUS_SUCCEEDED, False)
        assert hc.wait_group(gid, timeout=WAIT).status is GroupStatus.SUCCEEDED
        with pytest.raises(heartline.FailedPreconditionError):
            hc.cancel_group(gid)


# -- Executor: futures as inputs -----------------------------------------------------------


def test_executor_chain_of_fifty_futures(fake_auto):
    with Executor("local", fake_auto.address) as ex:
        futures = [ex.submit(add, 0, 1)]
        for _ in range(49):
            futures.append(ex.submit(add, futures[-1], 1))
        assert futures[-1].result(WAIT) == 50
        assert [f.result(WAIT) for f in futures] == list(range(1, 51))
    svc = fake_auto.service
    stored_by = {}  # task id -> index of the answer that gave it
    for i, (request, answer) in enumerate(zip(svc.submit_requests, svc.submit_answers)):
        for spec in request.tasks:
            # an input is named by the id of a task stored by an earlier answer
            assert all(stored_by[tid] < i for tid in spec.inputs)
        stored_by.update(dict.fromkeys(answer, i))
    assert len(stored_by) == 50
    for prev, fut in itertools.pairwise(futures):
        assert list(svc.tasks[fut.task_id].input_task_ids) == [prev.task_id]
    spec = svc.submit_requests[-1].tasks[-1]
    assert pickle.loads(spec.args) == ((TaskInput(0), 1), {})


def test_executor_parks_a_dependent_until_its_input_has_an_id(fake):
    with Executor("local", fake.address) as ex:
        fake.hold_submits()
        a = ex.submit(square, 3)
        wait_until_sync(lambda: len(fake.service.submit_requests) == 1)
        b = ex.submit(add, a, a)  # a twice: one input
        c = ex.submit(square, 5)
        fake.release_submits()
        wait_until_sync(lambda: b.task_id is not None and c.task_id is not None)
        later = [spec for r in fake.service.submit_requests[1:] for spec in r.tasks]
        # c waited for a's answer only to ride along (batching), not for b's input.
        assert sorted(pickle.loads(spec.args) for spec in later if not spec.inputs) == [
            ((5,), {})
        ]
        (b_spec,) = [spec for spec in later if spec.inputs]
        assert list(b_spec.inputs) == [a.task_id]
        assert pickle.loads(b_spec.args) == ((TaskInput(0), TaskInput(0)), {})
        fake.settle(a.task_id, task_pb2.TASK_STATE_SUCCEEDED, result=pickle.dumps(9))
        fake.settle(b.task_id, task_pb2.TASK_STATE_SUCCEEDED, result=pickle.dumps(18))
        fake.settle(c.task_id, task_pb2.TASK_STATE_SUCCEEDED, result=pickle.dumps(25))
        assert (a.result(WAIT), b.result(WAIT), c.result(WAIT)) == (9, 18, 25)


def test_executor_dependent_of_a_failed_task_is_skipped(fake_auto):
    with Executor("local", fake_auto.address) as ex:
        bad = ex.submit(boom, "kaput")
        after = ex.submit(square, x=bad)
        with pytest.raises(heartline.RemoteError):
            bad.result(WAIT)
        with pytest.raises(TaskSkippedError, match="input-not-succeeded") as info:
            after.result(WAIT)
        assert info.value.skip_reason is SkipReason.INPUT_NOT_SUCCEEDED
        assert info.value.task_id == after.task_id


def test_executor_dependents_of_a_task_cancelled_before_sending(fake):
    with Executor("local", fake.address) as ex:
        fake.hold_submits()
        a = ex.submit(square, 2)
        wait_until_sync(lambda: len(fake.service.submit_requests) == 1)
        b = ex.submit(square, a)  # parked on a
        c = ex.submit(square, b)  # parked on b
        assert b.cancel()
        fake.release_submits()
        with pytest.raises(TaskSkippedError, match="input 0 was never submitted") as info:
            c.result(WAIT)
        assert info.value.skip_reason is SkipReason.INPUT_NOT_SUCCEEDED
        wait_until_sync(lambda: a.task_id is not None)
        assert b.task_id is None and c.task_id is None
        assert len(fake.service.tasks) == 1  # only a was ever sent
        fake.settle(a.task_id, task_pb2.TASK_STATE_SUCCEEDED, result=pickle.dumps(4))
        assert a.result(WAIT) == 4


def test_executor_refuses_a_future_of_another_executor(fake):
    with Executor("local", fake.address) as ex, Executor("local", fake.address) as other:
        theirs = other.submit(square, 2)
        with pytest.raises(ValueError, match="argument 0 is a future of another Executor"):
            ex.submit(square, theirs)
        with pytest.raises(ValueError, match="keyword argument 'x'"):
            ex.submit(square, x=theirs)
        with pytest.raises(heartline.SerializationError, match="top-level argument"):
            ex.submit(square, [theirs])
        wait_until_sync(lambda: theirs.task_id is not None)
        assert len(fake.service.tasks) == 1  # nothing of ex was sent
        fake.settle(theirs.task_id, task_pb2.TASK_STATE_SUCCEEDED, result=pickle.dumps(4))
