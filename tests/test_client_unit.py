"""Unit tests of the client library: request building, batching, the function cache,
conversions, error mapping and outcomes; and, against the fake TaskService of
tests/helpers.py, the handling of the watch stream (session results, named watches,
reconnect).

End-to-end tests with the real server and agents live elsewhere.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import datetime
import hashlib
import pickle
import threading
import uuid
from collections.abc import Iterator

import cloudpickle
import grpc
import pytest

import heartline
from heartline import TaskState
from heartline._errors import rpc_error_from_grpc
from heartline.client import AsyncClient, Client, Executor
from heartline.client._base import (
    MAX_BATCH_BYTES,
    ClientBase,
    FunctionCache,
    SubmitOptions,
    chunk_specs,
    outcome_of_update,
    resolve_address,
    resolve_metadata,
)
from heartline.client._types import (
    EndpointInfo,
    FailureKind,
    Priority,
    Stats,
    Task,
    TaskError,
    TaskUpdate,
)
from heartline.v1 import task_pb2, task_service_pb2
from tests.helpers import FakeServer, serve_fake, wait_until, wait_until_sync

WAIT = 10  # seconds: bound of every wait in these tests


def square(x):
    return x * x


def boom(msg):
    raise ValueError(msg)


# -- configuration -----------------------------------------------------------------


def test_address_and_token_from_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("HEARTLINE_ADDRESS", raising=False)
    monkeypatch.delenv("HEARTLINE_TOKEN", raising=False)
    monkeypatch.setenv("HEARTLINE_HOME", str(tmp_path))  # no token file there
    assert resolve_address(None) == "127.0.0.1:50051"
    assert resolve_metadata(None) is None
    monkeypatch.setenv("HEARTLINE_ADDRESS", "10.0.0.1:6000")
    monkeypatch.setenv("HEARTLINE_TOKEN", "s3cret")
    assert resolve_address(None) == "10.0.0.1:6000"
    assert resolve_address("h:1") == "h:1"
    assert resolve_metadata(None) == (("authorization", "Bearer s3cret"),)
    assert resolve_metadata("other") == (("authorization", "Bearer other"),)


def test_session_ids_are_unique_hex():
    a, b = ClientBase(), ClientBase()
    assert a.session_id != b.session_id
    assert uuid.UUID(hex=a.session_id).hex == a.session_id


@pytest.mark.parametrize(
    "kwargs",
    [
        {"priority": "urgent"},
        {"max_retries": -1},
        {"max_retries": 1.5},
        {"max_retries": True},
        {"max_system_retries": -2},
        {"walltime": 0},
        {"walltime": "10"},
    ],
)
def test_bad_submit_options_are_refused(kwargs):
    with pytest.raises(heartline.InvalidArgumentError):
        SubmitOptions.of(**kwargs)


def test_submit_options_build_the_spec():
    spec = SubmitOptions.of(priority="high", max_retries=2, walltime=1.5, held=True)._spec(
        "f" * 64, b"args"
    )
    assert spec.function_id == "f" * 64
    assert spec.args == b"args"
    assert spec.priority == task_pb2.PRIORITY_HIGH
    assert spec.max_retries == 2
    assert spec.walltime_seconds == 1.5
    assert spec.held is True
    assert not spec.HasField("max_system_retries")  # unset: the server's default applies
    spec = SubmitOptions.of(max_system_retries=0)._spec("f" * 64, b"")
    assert spec.HasField("max_system_retries") and spec.max_system_retries == 0
    assert spec.priority == task_pb2.PRIORITY_NORMAL


# -- request building and batching ---------------------------------------------------


def test_prepare_pickles_function_once_and_args_per_call():
    base = ClientBase()
    prepared = base._prepare([(square, (i,), {}) for i in range(5)], SubmitOptions())
    assert list(prepared.functions) == [prepared.specs[0].function_id]
    assert len({s.function_id for s in prepared.specs}) == 1
    assert pickle.loads(prepared.specs[3].args) == ((3,), {})
    fid = prepared.specs[0].function_id
    assert fid == hashlib.sha256(prepared.functions[fid]).hexdigest()
    # once registered, the batch still names the payload (AsyncClient._register skips
    # it, and registers it again only if the server says it dropped the function)
    base._functions.mark_registered(prepared.specs[0].function_id)
    again = base._prepare([(square, (1,), {"k": 2})], SubmitOptions())
    assert again.functions == {fid: prepared.functions[fid]}
    assert pickle.loads(again.specs[0].args) == ((1,), {"k": 2})


def test_function_cache_weak_and_strong_keys(monkeypatch):
    cache = FunctionCache()
    calls = []
    import heartline.client._base as base_mod

    real = base_mod.dumps_function

    def counting(fn, *policy):
        calls.append(fn)
        return real(fn, *policy)

    monkeypatch.setattr(base_mod, "dumps_function", counting)
    fid1, payload1 = cache.lookup(pow)  # builtin: not weak-referenceable
    fid2, payload2 = cache.lookup(pow)
    assert (fid1, payload1) == (fid2, payload2)
    assert fid1 == hashlib.sha256(payload1).hexdigest()

    def local(x):
        return x + 1

    assert cache.lookup(local) == cache.lookup(local)
    assert calls == [pow, local]  # each pickled exactly once
    assert cache.lookup(square)[0] != fid1


def test_unpicklable_arguments_raise_before_sending():
    base = ClientBase()
    with pytest.raises(heartline.SerializationError, match="arguments"):
        base._prepare([(square, (threading.Lock(),), {})], SubmitOptions())
    with pytest.raises(heartline.SerializationError):
        base._prepare([(threading.Lock(), (), {})], SubmitOptions())  # not callable
    with pytest.raises(heartline.InvalidArgumentError):
        base._prepare([(square, (1,))], SubmitOptions())  # not a triple


def test_batches_cut_by_count():
    specs = [task_pb2.TaskSpec(function_id="f", args=b"x") for _ in range(2500)]
    chunks = list(chunk_specs(specs))
    assert [len(c) for c in chunks] == [1000, 1000, 500]


def test_batches_cut_by_size():
    big = b"x" * (3 * 1024 * 1024)
    specs = [task_pb2.TaskSpec(function_id="f", args=big) for _ in range(5)]
    chunks = list(chunk_specs(specs))
    assert [len(c) for c in chunks] == [2, 2, 1]
    base = ClientBase()
    requests = list(base._submit_requests("local", specs))
    assert all(r.ByteSize() <= MAX_BATCH_BYTES for r in requests)
    assert all(r.session_id == base.session_id and r.endpoint == "local" for r in requests)
    # one oversized spec travels alone (the server names the size and the limit)
    huge = task_pb2.TaskSpec(args=b"x" * (MAX_BATCH_BYTES + 1))
    assert [len(c) for c in chunk_specs([specs[0], huge, specs[0]])] == [1, 1, 1]


def test_bad_endpoint_and_ids_are_refused():
    base = ClientBase()
    with pytest.raises(heartline.InvalidArgumentError):
        list(base._submit_requests("", []))
    with pytest.raises(heartline.InvalidArgumentError, match="one string"):
        base._ids_request("abc")
    with pytest.raises(heartline.InvalidArgumentError):
        base._ids_request(["ok", ""])
    with pytest.raises(heartline.InvalidArgumentError, match="state"):
        base._list_request(["nope"], None, 10)
    req = base._list_request([TaskState.RUNNING, "held"], "ep", 10)
    assert list(req.states) == [task_pb2.TASK_STATE_RUNNING, task_pb2.TASK_STATE_HELD]


# -- conversions ---------------------------------------------------------------------


def _ts(seconds: int):
    from google.protobuf.timestamp_pb2 import Timestamp

    return Timestamp(seconds=seconds, nanos=500_000_000)


def test_task_from_proto_every_field():
    msg = task_pb2.Task(
        task_id="t1",
        state=task_pb2.TASK_STATE_ERRORED,
        pending=False,
        endpoint_id="e1",
        endpoint_name="local",
        function_id="f1",
        attempt=2,
        priority=task_pb2.PRIORITY_LOW,
        result=b"",
        error=task_pb2.RemoteError(type_name="ValueError", message="bad", traceback="TB"),
        submit_time=_ts(100),
        start_time=_ts(101),
        settle_time=_ts(102),
        history=[
            task_pb2.Transition(
                to_state=task_pb2.TASK_STATE_WAITING_FOR_EP, cause="submit", time=_ts(100)
            ),
            task_pb2.Transition(
                from_state=task_pb2.TASK_STATE_RUNNING,
                to_state=task_pb2.TASK_STATE_ERRORED,
                cause="raised",
                time=_ts(102),
                attempt=2,
            ),
        ],
        group_id="g1",
        owner="alice",
        waiting_reason="",
        max_retries=1,
        max_system_retries=3,
        walltime_seconds=60.0,
        resubmitted_from="t0",
        payload_purged=False,
    )
    task = Task._from_proto(msg)
    utc = datetime.UTC
    assert task.id == "t1"
    assert task.state is TaskState.ERRORED and not task.pending
    assert (task.endpoint, task.endpoint_id, task.function_id) == ("local", "e1", "f1")
    assert task.attempt == 2 and task.priority is Priority.LOW
    assert task.error == TaskError("ValueError", "bad", "TB", None)
    assert task.submitted == datetime.datetime(1970, 1, 1, 0, 1, 40, 500000, tzinfo=utc)
    assert task.started.second == 41 and task.settled.second == 42
    assert [(h.from_state, h.to_state, h.cause, h.attempt) for h in task.history] == [
        (None, TaskState.WAITING_FOR_EP, "submit", 0),
        (TaskState.RUNNING, TaskState.ERRORED, "raised", 2),
    ]
    assert task.history[1].time.tzinfo is utc
    assert (task.group_id, task.owner, task.waiting_reason) == ("g1", "alice", "")
    assert (task.max_retries, task.max_system_retries, task.walltime) == (1, 3, 60.0)
    assert task.resubmitted_from == "t0" and task.payload_purged is False
    assert task.result is None
    exc = task.exception
    assert isinstance(exc, heartline.RemoteError)
    assert (exc.remote_type, exc.message, exc.remote_traceback) == ("ValueError", "bad", "TB")
    # the dataclass is frozen
    with pytest.raises(AttributeError):
        task.state = TaskState.RUNNING  # type: ignore[misc]


def test_task_defaults_and_success_result():
    msg = task_pb2.Task(
        task_id="t2",
        state=task_pb2.TASK_STATE_SUCCEEDED,
        result=cloudpickle.dumps({"v": 1}),
        endpoint_id="e9",
    )
    task = Task._from_proto(msg)
    assert task.result == {"v": 1} and task.exception is None
    assert task.endpoint == "e9"  # no name: the id
    assert task.submitted is None and task.history == () and task.walltime is None
    assert task.resubmitted_from is None and task.error is None
    pending = Task._from_proto(
        task_pb2.Task(task_id="t3", state=task_pb2.TASK_STATE_RUNNING, pending=True)
    )
    assert pending.result is None and pending.exception is None
    purged = Task._from_proto(
        task_pb2.Task(task_id="t4", state=task_pb2.TASK_STATE_SUCCEEDED, payload_purged=True)
    )
    assert purged.result is None
    assert isinstance(purged.exception, heartline.TaskFailedError)
    assert "purged" in str(purged.exception)


def test_endpoint_stats_update_from_proto():
    ep = EndpointInfo._from_proto(
        task_service_pb2.Endpoint(
            endpoint_id="e1",
            name="local",
            online=True,
            queued=7,
            registered_time=_ts(5),
            agents=[
                task_service_pb2.AgentInfo(
                    agent_id="a1",
                    capacity=4,
                    in_flight=2,
                    last_heartbeat=_ts(9),
                    version="0.1.0",
                    hostname="box",
                )
            ],
        )
    )
    assert (ep.id, ep.name, ep.online, ep.queued) == ("e1", "local", True, 7)
    agent = ep.agents[0]
    assert (agent.agent_id, agent.capacity, agent.in_flight, agent.version, agent.hostname) == (
        "a1",
        4,
        2,
        "0.1.0",
        "box",
    )
    assert agent.last_heartbeat.second == 9 and ep.registered.second == 5
    stats = Stats._from_proto(
        task_service_pb2.GetStatsResponse(
            tasks_by_state={"success": 3, "running": 1},
            endpoints_online=1,
            agents_online=2,
            transitions=40,
        )
    )
    assert stats.tasks_by_state[TaskState.SUCCEEDED] == 3
    assert (stats.endpoints_online, stats.agents_online, stats.transitions) == (1, 2, 40)
    assert stats.start_time is None
    upd = TaskUpdate._from_proto(
        task_pb2.TaskUpdate(
            task_id="t", state=task_pb2.TASK_STATE_CANCELLED, attempt=1, cause="cancel"
        )
    )
    assert (upd.task_id, upd.state, upd.pending, upd.attempt, upd.cause, upd.time) == (
        "t",
        TaskState.CANCELLED,
        False,
        1,
        "cancel",
        None,
    )


# -- outcomes and error mapping ---------------------------------------------------------


def _update(state, **fields):
    return task_pb2.TaskUpdate(task_id="t1", state=state, **fields)


def test_outcome_success():
    update = _update(task_pb2.TASK_STATE_SUCCEEDED, result=pickle.dumps(1024))
    assert outcome_of_update(update) == 1024
    with pytest.raises(heartline.SerializationError):
        outcome_of_update(_update(task_pb2.TASK_STATE_SUCCEEDED, result=b"not a pickle"))


@pytest.mark.parametrize("state", [task_pb2.TASK_STATE_ERRORED, task_pb2.TASK_STATE_FAILED])
def test_outcome_remote_error_keeps_type_message_traceback(state):
    err = task_pb2.RemoteError(
        type_name="mypkg.MyError", message="it broke", traceback="Traceback...\nline 3"
    )
    with pytest.raises(heartline.RemoteError) as info:
        outcome_of_update(_update(state, error=err))
    exc = info.value
    assert exc.task_id == "t1"
    assert exc.state == TaskState._from_proto(state).value
    assert exc.remote_type == "mypkg.MyError"
    assert exc.message == "it broke"
    assert exc.remote_traceback == "Traceback...\nline 3"
    assert str(exc).startswith("mypkg.MyError: it broke")
    assert "line 3" in str(exc)


def test_outcome_system_failure_and_other_settles():
    err = task_pb2.RemoteError(
        type_name="WorkerDied",
        message="worker exited",
        failure_kind=task_pb2.FAILURE_KIND_WORKER_DIED,
    )
    with pytest.raises(heartline.TaskFailedError) as info:
        outcome_of_update(_update(task_pb2.TASK_STATE_ERRORED, error=err))
    assert not isinstance(info.value, heartline.RemoteError)
    assert "worker-died" in str(info.value) and "worker exited" in str(info.value)
    assert TaskError._from_proto(err).failure_kind is FailureKind.WORKER_DIED
    for state, word in [
        (task_pb2.TASK_STATE_CANCELLED, "cancelled"),
        (task_pb2.TASK_STATE_SKIPPED, "skipped"),
    ]:
        with pytest.raises(heartline.TaskFailedError, match=word) as info:
            outcome_of_update(_update(state, cause=word))
        assert not isinstance(info.value, heartline.RemoteError)


class _FakeRpcError(grpc.RpcError):
    def __init__(self, code, details):
        self._code, self._details = code, details

    def code(self):
        return self._code

    def details(self):
        return self._details


@pytest.mark.parametrize(
    ("code", "cls"),
    [
        (grpc.StatusCode.INVALID_ARGUMENT, heartline.InvalidArgumentError),
        (grpc.StatusCode.NOT_FOUND, heartline.NotFoundError),
        (grpc.StatusCode.PERMISSION_DENIED, heartline.PermissionDeniedError),
        (grpc.StatusCode.UNAUTHENTICATED, heartline.UnauthenticatedError),
        (grpc.StatusCode.FAILED_PRECONDITION, heartline.FailedPreconditionError),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, heartline.ResourceExhaustedError),
        (grpc.StatusCode.UNAVAILABLE, heartline.UnavailableError),
        (grpc.StatusCode.INTERNAL, heartline.RPCError),
    ],
)
def test_error_mapping_per_status_code(code, cls):
    err = rpc_error_from_grpc(_FakeRpcError(code, "task t1 is running"))
    assert type(err) is cls
    assert err.code is code and err.message == "task t1 is running"


# -- the fake TaskService (tests/helpers.py), for the stream handling ---------------------


@pytest.fixture
def fake() -> Iterator[FakeServer]:
    with serve_fake() as server:
        yield server


@pytest.fixture
def fake_auto() -> Iterator[FakeServer]:
    with serve_fake(auto_run=True) as server:
        yield server


# -- AsyncClient against the fake ------------------------------------------------------


async def test_watch_opened_once_before_first_submit_and_results_resolve(fake):
    async with AsyncClient(fake.address, token="tok") as client:
        tid = await client.submit("local", square, 3)
        svc = fake.service
        assert len(svc.watch_requests) == 1
        watch = svc.watch_requests[0]
        assert watch.session_id == client.session_id
        assert watch.settled_only and watch.include_results and not watch.task_ids
        assert svc.submit_requests[0].session_id == client.session_id
        fake.settle(tid, task_pb2.TASK_STATE_SUCCEEDED, result=pickle.dumps(9))
        assert await client.get_result(tid, timeout=WAIT) == 9
        # a second function submit neither re-registers nor reopens the watch
        tid2 = await client.submit("local", square, 4)
        fake.settle(
            tid2,
            task_pb2.TASK_STATE_ERRORED,
            error=task_pb2.RemoteError(type_name="ValueError", message="nope", traceback="TB"),
        )
        with pytest.raises(heartline.RemoteError) as info:
            await client.get_result(tid2, timeout=WAIT)
        assert (info.value.remote_type, info.value.message) == ("ValueError", "nope")
        assert svc.register_calls == 1
        assert len(svc.watch_requests) == 1
        assert all(("authorization", "Bearer tok") in md for md in svc.metadata)


async def test_get_result_timeout(fake):
    async with AsyncClient(fake.address) as client:
        tid = await client.submit("local", square, 3)
        with pytest.raises(heartline.TimeoutError):
            await client.get_result(tid, timeout=0.05)
        with pytest.raises(TimeoutError):  # also the builtin
            await client.get_result(tid, timeout=0)
        fake.settle(tid, task_pb2.TASK_STATE_SUCCEEDED, result=pickle.dumps("late"))
        assert await client.get_result(tid, timeout=WAIT) == "late"


async def test_get_result_of_foreign_task_uses_named_watch(fake):
    async with AsyncClient(fake.address) as submitter, AsyncClient(fake.address) as other:
        tid = await submitter.submit("local", square, 5)
        waiting = asyncio.ensure_future(other.get_result(tid, timeout=WAIT))
        await wait_until(lambda: any(tid in r.task_ids for r in fake.service.watch_requests))
        assert not waiting.done()
        fake.settle(tid, task_pb2.TASK_STATE_SUCCEEDED, result=pickle.dumps(25))
        assert await waiting == 25
        named = [r for r in fake.service.watch_requests if tid in r.task_ids][0]
        assert named.session_id == "" and named.settled_only and named.include_results
        # an already-settled foreign task: the first message carries its state
        assert await other.get_result(tid, timeout=WAIT) == 25


async def test_watch_reconnect_names_unresolved_tasks(fake):
    async with AsyncClient(fake.address) as client:
        ids = await client.submit_batch("local", [(square, (i,), {}) for i in range(3)])
        fake.settle(ids[0], task_pb2.TASK_STATE_SUCCEEDED, result=pickle.dumps(0))
        assert await client.get_result(ids[0], timeout=WAIT) == 0
        fake.stop()  # the server goes away: the stream breaks
        # while it is down, two tasks settle (as if recorded before the crash)
        fake.settle(ids[1], task_pb2.TASK_STATE_SUCCEEDED, result=pickle.dumps(1))
        fake.settle(ids[2], task_pb2.TASK_STATE_CANCELLED)
        fake.start()  # same port
        assert await client.get_result(ids[1], timeout=WAIT) == 1
        with pytest.raises(heartline.TaskFailedError, match="cancelled"):
            await client.get_result(ids[2], timeout=WAIT)
        reopen = fake.service.watch_requests[-1]
        assert reopen.session_id == client.session_id
        assert sorted(reopen.task_ids) == sorted(ids[1:])


async def test_unknown_endpoint_and_unpicklable_args(fake):
    async with AsyncClient(fake.address) as client:
        with pytest.raises(heartline.NotFoundError, match="nowhere"):
            await client.submit("nowhere", square, 1)
        sent = len(fake.service.submit_requests)
        with pytest.raises(heartline.SerializationError):
            await client.submit("local", square, threading.Lock())
        assert len(fake.service.submit_requests) == sent


async def test_large_batch_is_split(fake):
    async with AsyncClient(fake.address) as client:
        ids = await client.submit_batch("local", [(square, (i,), {}) for i in range(2345)])
        assert len(ids) == len(set(ids)) == 2345
        sizes = sorted(len(r.tasks) for r in fake.service.submit_requests)
        assert sizes == [345, 1000, 1000]
        assert fake.service.register_calls == 1


async def test_close_fails_unresolved_waits(fake):
    client = AsyncClient(fake.address)
    tid = await client.submit("local", square, 1)
    waiting = asyncio.ensure_future(client.get_result(tid))
    await asyncio.sleep(0)
    await client.close()
    with pytest.raises(heartline.HeartlineError, match="closed"):
        await asyncio.wait_for(waiting, WAIT)


# -- Client and Executor (sync faces over the same AsyncClient) ---------------------------


def test_sync_client_round_trip(fake_auto):
    with Client(fake_auto.address) as hc:
        tid = hc.submit("local", pow, 2, 10)
        assert hc.get_result(tid, timeout=WAIT) == 1024
        ids = hc.submit_batch("local", [(pow, (2, i), {}) for i in range(20)])
        assert [hc.get_result(t, timeout=WAIT) for t in ids] == [2**i for i in range(20)]
        bad = hc.submit("local", boom, "kaput")
        with pytest.raises(heartline.RemoteError) as info:
            hc.get_result(bad, timeout=WAIT)
        assert info.value.remote_type == "ValueError" and info.value.message == "kaput"
        assert "boom" in info.value.remote_traceback
        task = hc.get_task(tid)
        assert task.id == tid and task.state is TaskState.SUCCEEDED and task.result == 1024
        assert fake_auto.service.register_calls == 2  # pow once, boom once


def test_executor_submit_map_and_errors(fake_auto):
    with Executor("local", fake_auto.address) as ex:
        fut = ex.submit(pow, 2, 10)
        assert isinstance(fut, concurrent.futures.Future)
        assert fut.result(WAIT) == 1024
        assert list(ex.map(abs, range(-5, 0), timeout=WAIT)) == [5, 4, 3, 2, 1]
        results = list(ex.map(square, range(3000), timeout=WAIT))
        assert results == [i * i for i in range(3000)]
        assert all(len(r.tasks) <= 1000 for r in fake_auto.service.submit_requests)
        assert len(fake_auto.service.submit_requests) < 50  # batched, not one per task
        with pytest.raises(heartline.RemoteError):
            ex.submit(boom, "x").result(WAIT)
        with pytest.raises(heartline.SerializationError):
            ex.submit(square, threading.Lock())
    with pytest.raises(RuntimeError):
        ex.submit(pow, 1, 1)


def test_executor_submits_made_while_a_request_is_out_go_together(fake_auto):
    fake_auto.hold_submits()
    with Executor("local", fake_auto.address) as ex:
        first = ex.submit(square, 1)  # alone: it leaves at once
        wait_until_sync(lambda: len(fake_auto.service.submit_requests) == 1)
        rest = [ex.submit(square, i) for i in range(2, 12)]
        ex.client._run(asyncio.sleep(0))  # the loop thread has seen them (FIFO)
        assert ex._flushers == 1 and len(ex._queue) == 10  # they wait for the answer
        fake_auto.release_submits()
        assert [f.result(WAIT) for f in [first, *rest]] == [i * i for i in range(1, 12)]
    assert [len(r.tasks) for r in fake_auto.service.submit_requests] == [1, 10]


def test_executor_unknown_endpoint_fails_futures(fake):
    with Executor("nowhere", fake.address) as ex, pytest.raises(heartline.NotFoundError):
        ex.submit(square, 1).result(WAIT)


def test_executor_cancel_sends_cancel(fake):
    with Executor("local", fake.address) as ex:
        fut = ex.submit(square, 2)
        wait_until_sync(lambda: fut.task_id is not None)
        assert fut.cancel() is True
        assert fut.cancelled()
        wait_until_sync(lambda: fake.service.cancel_requests)
        assert fake.service.cancel_requests == [[fut.task_id]]
        assert fake.service.tasks[fut.task_id].state == task_pb2.TASK_STATE_CANCELLED
