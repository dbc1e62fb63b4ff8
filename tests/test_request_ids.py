"""A server restart is invisible to clients: submits and commands carry request ids, the
client repeats them while the server is away, and a repeat is answered, never applied
twice (SPEC section 8; the request id is in task_service.proto)."""

from __future__ import annotations

import asyncio
import sys
import threading
import time
from pathlib import Path

import cloudpickle
import grpc
import pytest

import heartline
from heartline import Client, Executor, TaskState
from heartline._serialize import dumps_args, dumps_function, function_id
from heartline.server._events import NewTask, Persist, TasksCommanded, TasksSubmitted
from heartline.server._model import RequestRow, WriteBatch
from heartline.server._scheduler import Scheduler
from heartline.server._store import SqliteStore
from heartline.v1 import task_pb2, task_service_pb2_grpc
from heartline.v1 import task_service_pb2 as pb
from tests.conftest import (
    STORE_KINDS,
    ServerProc,
    launch_agent,
    launch_server,
    new_db,
    relaunch_server,
)
from tests.helpers import Proc, agents_online, assert_eventually, authed_channel

cloudpickle.register_pickle_by_value(sys.modules[__name__])

TIMEOUT = 60.0


def total(hc: Client) -> int:
    return sum(hc.stats().tasks_by_state.values())


def specs(stub: task_service_pb2_grpc.TaskServiceStub, n: int, base: int = 2) -> list[task_pb2.TaskSpec]:
    payload = dumps_function(pow)
    stub.RegisterFunction(pb.RegisterFunctionRequest(function=payload))
    return [
        task_pb2.TaskSpec(function_id=function_id(payload), args=dumps_args((base, i), {}), held=True)
        for i in range(n)
    ]


def test_a_repeated_submit_answers_the_same_ids_even_after_a_restart(
    server: ServerProc, agent: Proc
) -> None:
    with authed_channel(server.address) as channel:
        stub = task_service_pb2_grpc.TaskServiceStub(channel)
        request = pb.SubmitTasksRequest(endpoint="local", tasks=specs(stub, 5), request_id="job-1")
        first = list(stub.SubmitTasks(request).task_ids)
        assert len(set(first)) == 5
        assert list(stub.SubmitTasks(request).task_ids) == first
        # By id instead of name: the same endpoint, so the same body.
        by_id = pb.SubmitTasksRequest()
        by_id.CopyFrom(request)
        by_id.endpoint = Client(server.address).list_endpoints()[0].id
        assert list(stub.SubmitTasks(by_id).task_ids) == first

        # The same id with another body, or for another method: refused, naming the id.
        other = pb.SubmitTasksRequest(endpoint="local", tasks=specs(stub, 5, base=3), request_id="job-1")
        with pytest.raises(grpc.RpcError) as info:
            stub.SubmitTasks(other)
        assert info.value.code() is grpc.StatusCode.ALREADY_EXISTS
        assert "'job-1'" in info.value.details() and "another request" in info.value.details()
        with pytest.raises(grpc.RpcError) as info:
            stub.CancelTasks(pb.CancelTasksRequest(task_ids=first, request_id="job-1"))
        assert info.value.code() is grpc.StatusCode.ALREADY_EXISTS
        with pytest.raises(grpc.RpcError) as info:
            stub.SubmitTasks(pb.SubmitTasksRequest(endpoint="local", tasks=request.tasks, request_id="x" * 200))
        assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT

    with Client(server.address) as hc:
        assert total(hc) == 5

    server.proc.kill()
    restarted = relaunch_server(server)
    with authed_channel(restarted.address) as channel:
        stub = task_service_pb2_grpc.TaskServiceStub(channel)
        assert list(stub.SubmitTasks(request).task_ids) == first  # read back from the store
    with Client(restarted.address) as hc:
        assert total(hc) == 5


def test_a_repeated_command_is_answered_not_applied_again(server: ServerProc, agent: Proc) -> None:
    with authed_channel(server.address) as channel:
        stub = task_service_pb2_grpc.TaskServiceStub(channel)
        [tid] = stub.SubmitTasks(pb.SubmitTasksRequest(endpoint="local", tasks=specs(stub, 1))).task_ids
        release = pb.ReleaseTasksRequest(task_ids=[tid], request_id="release-1")
        assert stub.ReleaseTasks(release).updates[0].task_id == tid
        with Client(server.address) as hc:
            assert hc.get_result(tid, timeout=TIMEOUT) == 1
        # The repeat answers the task as it is now; without an id it would be refused.
        [again] = stub.ReleaseTasks(release).updates
        assert (again.task_id, again.state) == (tid, task_pb2.TASK_STATE_SUCCEEDED)
        with pytest.raises(grpc.RpcError) as info:
            stub.ReleaseTasks(pb.ReleaseTasksRequest(task_ids=[tid]))
        assert info.value.code() is grpc.StatusCode.FAILED_PRECONDITION


class AnswerDroppingProxy:
    """A TCP proxy on loopback (asyncio, on its own thread) that can swallow every byte
    the server sends back, then cut every connection."""

    def __init__(self, target: str) -> None:
        self._host, port = target.rsplit(":", 1)
        self._port = int(port)
        self.drop_answers = False
        self.dropped = 0
        self._loop = asyncio.new_event_loop()
        self._writers: set[asyncio.StreamWriter] = set()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._serve, "127.0.0.1", 0), self._loop
        ).result(timeout=10)
        self.address = f"127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(self._host, self._port)
        self._writers |= {writer, up_writer}

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter, answers: bool) -> None:
            try:
                while data := await src.read(65536):
                    if answers and self.drop_answers:
                        self.dropped += len(data)
                        continue
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                dst.close()

        await asyncio.gather(pump(reader, up_writer, False), pump(up_reader, writer, True))

    def cut(self) -> None:
        """Close every connection and forward normally again."""

        def close_all() -> None:
            self.drop_answers = False
            for writer in self._writers:
                writer.transport.abort()
            self._writers.clear()

        self._loop.call_soon_threadsafe(close_all)

    def close(self) -> None:
        async def shut() -> None:
            self.cut()
            self._server.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(shut(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()


def test_a_submit_whose_answer_is_lost_is_retried_and_stored_once(
    server: ServerProc, agent: Proc
) -> None:
    proxy = AnswerDroppingProxy(server.address)
    try:
        with Client(proxy.address) as hc, Client(server.address) as direct:
            assert hc.get_result(hc.submit("local", pow, 2, 0), timeout=TIMEOUT) == 1
            proxy.drop_answers = True
            answer: dict[str, object] = {}
            calls = [(pow, (2, i), {}) for i in range(1, 51)]

            def submit() -> None:
                try:
                    answer["ids"] = hc.submit_batch("local", calls)
                except BaseException as exc:  # noqa: BLE001 - reported by the asserts below
                    answer["error"] = exc

            submitter = threading.Thread(target=submit, daemon=True)
            submitter.start()
            # The server stored the batch; its answer went nowhere.
            assert_eventually(lambda: total(direct) == 51, timeout=TIMEOUT, message="stored")
            assert_eventually(lambda: proxy.dropped > 0, timeout=TIMEOUT, message="answer dropped")
            assert submitter.is_alive(), f"the client got an answer the proxy dropped: {answer}"
            proxy.cut()
            submitter.join(timeout=TIMEOUT)
            assert not submitter.is_alive(), "the client did not retry on its own"
            assert "error" not in answer, answer
            ids = answer["ids"]
            assert isinstance(ids, list) and len(set(ids)) == 50
            assert [hc.get_result(t, timeout=TIMEOUT) for t in ids] == [2**i for i in range(1, 51)]
            assert total(direct) == 51, "a task was stored twice"
            assert {t.id for t in direct.get_tasks(ids)} == set(ids)
    finally:
        proxy.close()


def square(x: int) -> int:
    return x * x


def kill_and_relaunch(server: ServerProc) -> ServerProc:
    server.proc.kill()
    restarted = relaunch_server(server)
    assert_eventually(lambda: agents_online(restarted.address, "local") == 1, timeout=TIMEOUT)
    return restarted


@pytest.mark.parametrize("store_kind", STORE_KINDS)
def test_executor_map_and_single_submits_survive_a_server_sigkill(
    home: Path, tmp_path: Path, store_kind: str, request: pytest.FixtureRequest
) -> None:
    server = launch_server(home, new_db(store_kind, tmp_path, request))
    launch_agent(server.address, home, "local", 2)
    assert_eventually(lambda: agents_online(server.address, "local") == 1, timeout=TIMEOUT)
    n_map, n_single = 5000, 2000
    with Executor("local", server.address) as ex:
        results: list[int] = []
        mapper = threading.Thread(
            target=lambda: results.extend(ex.map(square, range(n_map), timeout=180)), daemon=True
        )
        mapper.start()
        with Client(server.address) as probe:
            assert_eventually(lambda: total(probe) >= 1000, timeout=TIMEOUT, message="map under way")
        server = kill_and_relaunch(server)
        mapper.join(timeout=180)
        assert not mapper.is_alive()
        assert results == [i * i for i in range(n_map)]

    with Client(server.address) as hc:
        assert total(hc) == n_map
        ids: list[str] = []
        errors: list[BaseException] = []

        def submit_all() -> None:
            try:
                for i in range(n_single):
                    ids.append(hc.submit("local", square, i))
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        submitter = threading.Thread(target=submit_all, daemon=True)
        submitter.start()
        assert_eventually(lambda: len(ids) >= 500 or errors, timeout=TIMEOUT)
        server = kill_and_relaunch(server)
        submitter.join(timeout=180)
        assert not errors and len(ids) == n_single
        deadline = time.monotonic() + 120
        assert [hc.get_result(t, timeout=max(0.1, deadline - time.monotonic())) for t in ids] == [
            i * i for i in range(n_single)
        ]
        assert total(hc) == n_map + n_single
        assert hc.stats().tasks_by_state[TaskState.SUCCEEDED] == n_map + n_single


def test_a_client_that_never_reached_its_server_fails_at_once() -> None:
    # Nothing listens on port 1: a wrong address is said at once, not retried for a minute.
    t0 = time.monotonic()
    with Client("127.0.0.1:1") as hc, pytest.raises(heartline.UnavailableError):
        hc.stats()
    assert time.monotonic() - t0 < 10


def test_retry_timeout_is_checked() -> None:
    with pytest.raises(heartline.InvalidArgumentError):
        Client(retry_timeout=-1)
    with Client(retry_timeout=0) as hc:
        assert hc.retry_timeout == 0.0


def test_the_request_row_is_stored_in_the_same_batch_as_its_tasks_or_its_command() -> None:
    # Pure scheduler: the id is durable exactly when the request's changes are.
    sched = Scheduler()
    row = RequestRow("r-1", "anonymous", "SubmitTasks", "d" * 64, ("t1",), 1.0)
    task = NewTask("t1", "f" * 64, b"", 2, 0, 3, 0.0, False)
    [persist, *_] = sched.handle(TasksSubmitted("ep", "anonymous", (task,), "", 1.0, request=row))
    assert isinstance(persist, Persist)
    assert persist.batch.requests == (row,)
    assert [t.task_id for t in persist.batch.new_tasks] == ["t1"]

    hold = RequestRow("r-2", "anonymous", "command:hold", "e" * 64, ("t1",), 2.0)
    [persist, *_] = sched.handle(TasksCommanded("hold", ("t1",), 2.0, request=hold))
    assert isinstance(persist, Persist)
    assert persist.batch.requests == (hold,)
    assert [t.state for t in persist.batch.task_updates] == [TaskState.HELD]


async def test_the_store_keeps_request_ids_as_long_as_payloads(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "heartline.db")
    await store.open()
    try:
        old = RequestRow("old", "alice", "SubmitTasks", "a" * 64, ("t1", "t2"), 100.0)
        new = RequestRow("new", "alice", "command:hold", "b" * 64, ("t3",), 300.0)
        await store.write(WriteBatch(requests=(old, new)))
        assert await store.get_request("old") == old
        assert await store.get_request("nope") is None
        await store.purge_results(200.0)
        assert await store.get_request("old") is None
        assert await store.get_request("new") == new
    finally:
        await store.close()
    # Read back after a reopen, as a restarted server does.
    again = SqliteStore(tmp_path / "heartline.db")
    await again.open()
    try:
        assert await again.get_request("new") == new
    finally:
        await again.close()
