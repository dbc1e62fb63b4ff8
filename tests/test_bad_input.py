"""Bad input against a real server and real agents: each is refused with the right error
and a message a person can act on, and nothing stored is lost (SPEC section 6)."""

from __future__ import annotations

import re
import sys
import threading
import time
import uuid
from collections.abc import Iterator

import cloudpickle
import grpc
import pytest

import heartline
from heartline import Client, Executor, TaskState
from heartline.v1 import task_pb2, task_service_pb2, task_service_pb2_grpc
from tests.conftest import Stack
from tests.helpers import authed_channel, start_blocker

cloudpickle.register_pickle_by_value(sys.modules[__name__])

TIMEOUT = 20.0
MiB = 1024 * 1024


@pytest.fixture(scope="module")
def stack_workers() -> int:
    """The module's ``stack`` (tests/conftest.py) runs ``local`` with 2 workers."""
    return 2


@pytest.fixture(scope="module")
def canaries(stack: Stack) -> dict[str, object]:
    """Tasks stored before any bad request: settled ones with their values, and one held
    (pending) task. ``task id -> expected value`` (None for the held one)."""
    with Client(stack.address) as client:
        ids = client.submit_batch("local", [(pow, (3, i), {}) for i in range(5)])
        expected: dict[str, object] = {tid: client.get_result(tid, timeout=TIMEOUT) for tid in ids}
        assert list(expected.values()) == [3**i for i in range(5)]
        expected[client.submit("local", pow, 3, 9, held=True)] = None
    return expected


def assert_nothing_lost(hc: Client, canaries: dict[str, object]) -> None:
    tasks = hc.get_tasks(list(canaries))
    assert [t.id for t in tasks] == list(canaries)
    for task, value in zip(tasks, canaries.values(), strict=True):
        if value is None:
            assert task.state is TaskState.HELD
        else:
            assert task.state is TaskState.SUCCEEDED
            assert task.result == value


def total_tasks(hc: Client) -> int:
    return sum(hc.stats().tasks_by_state.values())


@pytest.fixture
def stub(stack: Stack) -> Iterator[task_service_pb2_grpc.TaskServiceStub]:
    with authed_channel(stack.address) as channel:
        yield task_service_pb2_grpc.TaskServiceStub(channel)


# --------------------------------------------------------------------------- remote functions


def square(x: int) -> int:
    return x * x


def make_lock() -> threading.Lock:
    return threading.Lock()


# --------------------------------------------------------------------------- refused locally


def test_unpicklable_function_is_refused_locally(stack: Stack, hc: Client, canaries: dict[str, object]) -> None:
    lock = threading.Lock()
    before = total_tasks(hc)
    with pytest.raises(heartline.SerializationError, match="cannot serialize function") as info:
        hc.submit("local", lambda: lock.locked())
    assert "lock" in str(info.value)
    with pytest.raises(heartline.SerializationError):
        hc.submit_batch("local", [(square, (1,), {}), (lambda: lock.locked(), (), {})])
    with Executor("local", stack.address) as ex, pytest.raises(heartline.SerializationError):
        ex.submit(lambda: lock.locked())
    assert total_tasks(hc) == before  # nothing was sent
    assert_nothing_lost(hc, canaries)


def test_unpicklable_argument_is_refused_locally(stack: Stack, hc: Client, canaries: dict[str, object]) -> None:
    before = total_tasks(hc)
    with pytest.raises(heartline.SerializationError, match="cannot serialize arguments") as info:
        hc.submit("local", square, threading.Lock())
    assert "lock" in str(info.value)
    # One bad call spoils the whole batch before anything is sent.
    with pytest.raises(heartline.SerializationError):
        hc.submit_batch("local", [(square, (1,), {}), (square, (), {"x": threading.Lock()})])
    with Executor("local", stack.address) as ex, pytest.raises(heartline.SerializationError):
        list(ex.map(square, [1, threading.Lock()]))
    assert total_tasks(hc) == before
    assert_nothing_lost(hc, canaries)


# --------------------------------------------------------------------------- payload limit


def test_arguments_over_the_limit_are_resource_exhausted(hc: Client, canaries: dict[str, object]) -> None:
    before = total_tasks(hc)
    with pytest.raises(heartline.ResourceExhaustedError) as info:
        hc.submit("local", len, b"x" * (11 * MiB))
    message = info.value.message
    assert "11.0 MiB" in message, message  # the size
    assert "10.0 MiB" in message, message  # the limit
    assert info.value.code is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert total_tasks(hc) == before
    # Still serving: a task just under the limit goes through and runs.
    tid = hc.submit("local", len, b"x" * (9 * MiB))
    assert hc.get_result(tid, timeout=TIMEOUT) == 9 * MiB
    assert_nothing_lost(hc, canaries)


def test_function_over_the_limit_via_raw_stub(
    hc: Client, stub: task_service_pb2_grpc.TaskServiceStub, canaries: dict[str, object]
) -> None:
    with pytest.raises(grpc.RpcError) as info:
        stub.RegisterFunction(task_service_pb2.RegisterFunctionRequest(function=b"\0" * (11 * MiB)), timeout=TIMEOUT)
    err = info.value
    assert err.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "11.0 MiB" in err.details() and "10.0 MiB" in err.details(), err.details()
    assert_nothing_lost(hc, canaries)


# --------------------------------------------------------------------------- invalid transitions


def test_release_of_a_succeeded_task_is_failed_precondition(hc: Client, canaries: dict[str, object]) -> None:
    tid = next(iter(canaries))
    before = hc.get_task(tid)
    with pytest.raises(heartline.FailedPreconditionError) as info:
        hc.release([tid])
    message = info.value.message
    assert tid in message and "success" in message and "release" in message, message
    after = hc.get_task(tid)
    assert after.state is TaskState.SUCCEEDED
    assert after.history == before.history
    assert_nothing_lost(hc, canaries)


def test_hold_of_a_running_task_is_failed_precondition(
    stack: Stack, hc: Client, canaries: dict[str, object]
) -> None:
    ep = stack.solo_endpoint()
    running = start_blocker(hc, ep)
    queued = hc.submit(ep, square, 7)
    assert hc.get_task(queued, history=False).state is TaskState.WAITING_FOR_EP
    before = hc.get_task(running)

    with pytest.raises(heartline.FailedPreconditionError) as info:
        hc.hold([running])
    message = info.value.message
    assert running in message and "running" in message and "held" in message, message

    # A batch with one refused task changes nothing, not even the task that could be held.
    with pytest.raises(heartline.FailedPreconditionError, match=running):
        hc.hold([queued, running])
    assert hc.get_task(queued, history=False).state is TaskState.WAITING_FOR_EP
    after = hc.get_task(running)
    assert after.state is TaskState.RUNNING
    assert after.history == before.history

    hc.cancel([running])
    assert hc.get_result(queued, timeout=TIMEOUT) == 49
    assert_nothing_lost(hc, canaries)


# --------------------------------------------------------------------------- unknown and malformed names


def test_submit_to_unknown_endpoint_is_not_found(hc: Client, canaries: dict[str, object]) -> None:
    before = total_tasks(hc)
    with pytest.raises(heartline.NotFoundError) as info:
        hc.submit("nope", square, 2)
    assert "nope" in info.value.message
    assert total_tasks(hc) == before
    assert_nothing_lost(hc, canaries)


def test_get_tasks_unknown_and_malformed_ids(hc: Client, canaries: dict[str, object]) -> None:
    unknown = str(uuid.uuid4())
    with pytest.raises(heartline.NotFoundError) as info:
        hc.get_task(unknown)
    assert unknown in info.value.message
    with pytest.raises(heartline.NotFoundError):
        hc.get_tasks([next(iter(canaries)), unknown])
    with pytest.raises(heartline.InvalidArgumentError) as info2:
        hc.get_task("not-a-task")
    assert "not-a-task" in info2.value.message
    with pytest.raises(heartline.InvalidArgumentError):
        hc.cancel(["not-a-task"])
    assert_nothing_lost(hc, canaries)


# --------------------------------------------------------------------------- bad payloads on the agent


def test_unpicklable_result_errors_the_task_and_the_agent_keeps_serving(
    stack: Stack, hc: Client, canaries: dict[str, object]
) -> None:
    ep = stack.solo_endpoint()
    agent = stack.agents[-1]
    tid = hc.submit(ep, make_lock)
    with pytest.raises(heartline.TaskFailedError) as info:
        hc.get_result(tid, timeout=TIMEOUT)
    assert "result" in str(info.value) and re.search(r"serializ|pickl", str(info.value)), str(info.value)
    task = hc.get_task(tid)
    assert task.state is TaskState.ERRORED
    assert task.error is not None
    assert "result" in task.error.message and re.search(r"serializ|pickl", task.error.message), task.error
    # The same (only) worker of the same agent runs the next task.
    assert hc.get_result(hc.submit(ep, square, 5), timeout=TIMEOUT) == 25
    assert agent.popen.poll() is None
    assert_nothing_lost(hc, canaries)


def test_bogus_function_payload_errors_the_task_and_the_agent_keeps_serving(
    stack: Stack, hc: Client, stub: task_service_pb2_grpc.TaskServiceStub, canaries: dict[str, object]
) -> None:
    ep = stack.solo_endpoint()
    agent = stack.agents[-1]
    fid = stub.RegisterFunction(
        task_service_pb2.RegisterFunctionRequest(function=b"not a pickle"), timeout=TIMEOUT
    ).function_id
    args = cloudpickle.dumps(((), {}))
    answer = stub.SubmitTasks(
        task_service_pb2.SubmitTasksRequest(endpoint=ep, tasks=[task_pb2.TaskSpec(function_id=fid, args=args)]),
        timeout=TIMEOUT,
    )
    [tid] = answer.task_ids
    with pytest.raises(heartline.TaskFailedError) as info:
        hc.get_result(tid, timeout=TIMEOUT)
    assert not isinstance(info.value, heartline.RemoteError)
    task = hc.get_task(tid)
    assert task.state is TaskState.ERRORED
    assert task.error is not None
    assert re.search(r"unpickl|deserializ", task.error.message) and "function" in task.error.message, task.error
    assert hc.get_result(hc.submit(ep, square, 6), timeout=TIMEOUT) == 36
    assert agent.popen.poll() is None
    assert_nothing_lost(hc, canaries)


def test_bogus_arguments_payload_errors_the_task(
    stack: Stack, hc: Client, stub: task_service_pb2_grpc.TaskServiceStub, canaries: dict[str, object]
) -> None:
    fid = stub.RegisterFunction(
        task_service_pb2.RegisterFunctionRequest(function=cloudpickle.dumps(square)), timeout=TIMEOUT
    ).function_id
    answer = stub.SubmitTasks(
        task_service_pb2.SubmitTasksRequest(
            endpoint="local", tasks=[task_pb2.TaskSpec(function_id=fid, args=b"not a pickle either")]
        ),
        timeout=TIMEOUT,
    )
    [tid] = answer.task_ids
    with pytest.raises(heartline.TaskFailedError):
        hc.get_result(tid, timeout=TIMEOUT)
    task = hc.get_task(tid)
    assert task.state is TaskState.ERRORED
    assert task.error is not None and "argument" in task.error.message, task.error
    assert hc.get_result(hc.submit("local", square, 4), timeout=TIMEOUT) == 16
    assert_nothing_lost(hc, canaries)


def test_submit_with_unregistered_or_malformed_function_id(
    hc: Client, stub: task_service_pb2_grpc.TaskServiceStub, canaries: dict[str, object]
) -> None:
    before = total_tasks(hc)
    args = cloudpickle.dumps(((), {}))
    for fid, code in (("0" * 64, grpc.StatusCode.NOT_FOUND), ("xyz", grpc.StatusCode.INVALID_ARGUMENT)):
        with pytest.raises(grpc.RpcError) as info:
            stub.SubmitTasks(
                task_service_pb2.SubmitTasksRequest(
                    endpoint="local", tasks=[task_pb2.TaskSpec(function_id=fid, args=args)]
                ),
                timeout=TIMEOUT,
            )
        assert info.value.code() is code
        assert fid in info.value.details()
    assert total_tasks(hc) == before
    assert_nothing_lost(hc, canaries)


def test_server_still_answers_after_all_of_it(stack: Stack, hc: Client, canaries: dict[str, object]) -> None:
    assert stack.server.proc.popen.poll() is None
    assert all(agent.popen.poll() is None for agent in stack.agents)
    t0 = time.monotonic()
    assert hc.get_result(hc.submit("local", square, 12), timeout=TIMEOUT) == 144
    assert time.monotonic() - t0 < TIMEOUT
    assert_nothing_lost(hc, canaries)


def test_a_huge_unknown_endpoint_name_is_not_found_and_not_echoed_whole(
    stack: Stack, hc: Client, canaries: dict[str, object]
) -> None:
    name = "x" * 10_000
    with pytest.raises(heartline.NotFoundError) as info:
        hc.submit(name, pow, 2, 3)
    assert len(str(info.value)) < 400 and "unknown endpoint 'xxx" in str(info.value)
    assert_nothing_lost(hc, canaries)


def test_get_tasks_naming_one_id_many_times_answers_it_once_per_distinct_id(
    stack: Stack, hc: Client, canaries: dict[str, object]
) -> None:
    first, second = list(canaries)[:2]
    with authed_channel(stack.address) as channel:
        stub = task_service_pb2_grpc.TaskServiceStub(channel)
        reply = stub.GetTasks(
            task_service_pb2.GetTasksRequest(task_ids=[first] * 5000 + [second, first], include_history=True),
            timeout=TIMEOUT,
        )
    assert [t.task_id for t in reply.tasks] == [first, second]
    # The client keeps the order given, repeats included.
    assert [t.id for t in hc.get_tasks([second, first, second])] == [second, first, second]


def test_history_is_answered_for_at_most_a_page_of_tasks_and_the_client_pages(
    stack: Stack, hc: Client
) -> None:
    from heartline._defaults import MAX_HISTORY_TASKS

    ids = hc.submit_batch("local", [(pow, (2, i), {}) for i in range(MAX_HISTORY_TASKS + 5)], held=True)
    try:
        with grpc.insecure_channel(stack.address) as channel:
            stub = task_service_pb2_grpc.TaskServiceStub(channel)
            token = heartline._defaults.token()
            with pytest.raises(grpc.RpcError) as info:
                stub.GetTasks(
                    task_service_pb2.GetTasksRequest(task_ids=ids, include_history=True),
                    timeout=TIMEOUT,
                    metadata=heartline._defaults.bearer_metadata(token),
                )
        assert info.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert f"at most {MAX_HISTORY_TASKS}" in info.value.details()
        tasks = hc.get_tasks(ids, history=True)  # the client asks in pages
        assert [t.id for t in tasks] == ids
        assert all(t.history and t.state is TaskState.HELD for t in tasks)
    finally:
        hc.cancel(ids)
