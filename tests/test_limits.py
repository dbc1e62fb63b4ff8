"""Per-user limits (SPEC section 6), against a real server started with small ones:
``--max-watches-per-user 3 --max-pending-per-user 10``. Each refusal is
RESOURCE_EXHAUSTED naming the limit and its value; another user is not held back by the
first one's streams or tasks; a refused submit stores nothing; closing a stream, or tasks
settling, lets the user go on.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import cloudpickle
import grpc
import pytest

import heartline
from heartline import Client, Group, TaskState
from heartline.v1 import (
    endpoint_service_pb2,
    endpoint_service_pb2_grpc,
    task_service_pb2,
    task_service_pb2_grpc,
)
from tests.conftest import ServerProc, Stack, launch_server
from tests.helpers import assert_eventually, authed_channel

cloudpickle.register_pickle_by_value(sys.modules[__name__])

TIMEOUT = 30.0
WATCHES = 3
PENDING = 10
WATCH_LIMIT = f"the limit of open watch streams per user ({WATCHES},"
PENDING_LIMIT = f"the limit of {PENDING} pending tasks per user"


def double(x: int) -> int:
    return 2 * x


def fail(x: int) -> int:
    raise ValueError(f"limits {x}")


@pytest.fixture
def limited(home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[ServerProc]:
    srv = launch_server(
        home,
        tmp_path / "heartline.db",
        "127.0.0.1:0",
        "--max-watches-per-user",
        str(WATCHES),
        "--max-pending-per-user",
        str(PENDING),
    )
    monkeypatch.setenv("HEARTLINE_ADDRESS", srv.address)
    yield srv
    srv.proc.stop()


class Watches:
    """Raw WatchTasks streams of one user (a session each), opened and closed at will."""

    def __init__(self, address: str, token: str | None = None) -> None:
        self.channel = authed_channel(address, token)
        self.stub = task_service_pb2_grpc.TaskServiceStub(self.channel)
        self.calls: list[grpc.Future] = []

    def open(self) -> None:
        """Open one more stream; return once the server answered its first message
        (so it is counted), or raise the server's refusal (grpc.RpcError)."""
        request = task_service_pb2.WatchTasksRequest(session_id=f"s-{len(self.calls)}")
        call = self.stub.WatchTasks(request, timeout=120)
        try:
            next(call)
        except grpc.RpcError:
            call.cancel()
            raise
        self.calls.append(call)

    def close_one(self) -> None:
        self.calls.pop().cancel()

    def close(self) -> None:
        for call in self.calls:
            call.cancel()
        self.channel.close()


def test_a_user_holds_at_most_the_limit_of_watch_streams(limited: ServerProc) -> None:
    with Client(limited.address) as admin:
        bob_token, _ = admin.create_token("bob")
    mine, bobs = Watches(limited.address), Watches(limited.address, bob_token)
    try:
        for _ in range(WATCHES):
            mine.open()
        with pytest.raises(grpc.RpcError) as info:
            mine.open()
        assert info.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert WATCH_LIMIT in info.value.details() and "'admin'" in info.value.details()
        # Another user's streams are counted apart.
        for _ in range(WATCHES):
            bobs.open()
        with pytest.raises(grpc.RpcError) as info:
            bobs.open()
        assert info.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "'bob'" in info.value.details()
        # A stream closed frees its place (once the server has seen it go).
        mine.close_one()
        assert_eventually(mine.open, timeout=TIMEOUT, message="a watch opens after one closed")
        with pytest.raises(grpc.RpcError):
            mine.open()
        # A stream refused for a bad request counts nothing either.
        mine.close_one()
        with pytest.raises(grpc.RpcError) as info:
            next(mine.stub.WatchTasks(task_service_pb2.WatchTasksRequest(), timeout=10))
        assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert_eventually(mine.open, timeout=TIMEOUT, message="a watch opens after one closed")
    finally:
        mine.close()
        bobs.close()
    # The public client says it the same way: its session stream is refused.
    with Client(limited.address) as admin:
        full = Watches(limited.address)
        try:
            assert_eventually(
                lambda: [full.open() for _ in range(WATCHES)],
                timeout=TIMEOUT,
                message="the closed streams let go",
            )
            assert admin.list_endpoints() == []  # a unary call needs no stream
            with pytest.raises(heartline.ResourceExhaustedError, match=r"open watch streams"):
                admin.submit("anywhere", double, 1)  # opens the client's session stream first
        finally:
            full.close()


def _register_endpoint(address: str, name: str) -> None:
    channel = authed_channel(address)
    try:
        stub = endpoint_service_pb2_grpc.EndpointServiceStub(channel)
        stub.RegisterEndpoint(endpoint_service_pb2.RegisterEndpointRequest(name=name), timeout=10)
    finally:
        channel.close()


def _refused_pending(hc: Client, call) -> None:
    tasks, groups = len(hc.list_tasks(limit=1000)), len(hc.list_groups(limit=1000))
    with pytest.raises(heartline.ResourceExhaustedError) as info:
        call()
    assert PENDING_LIMIT in str(info.value) and "'admin'" in str(info.value), str(info.value)
    assert "nothing was stored" in str(info.value)
    assert (len(hc.list_tasks(limit=1000)), len(hc.list_groups(limit=1000))) == (tasks, groups)


def test_a_user_may_have_at_most_the_limit_of_pending_tasks(limited: ServerProc) -> None:
    # No agent yet: every task submitted stays pending (queued) until one starts.
    _register_endpoint(limited.address, "later")
    with Client(limited.address) as hc:
        first = hc.submit_batch("later", [(double, (i,), {}) for i in range(8)])
        _refused_pending(
            hc, lambda: hc.submit_batch("later", [(double, (i,), {}) for i in range(3)])
        )
        g = Group("too-big", endpoint="later")
        a = g.task("a", double, 1)
        g.task("b", double, a)
        g.task("c", double, a)
        _refused_pending(hc, lambda: hc.submit_group(g))
        # Two cancelled: two places free; filled again (10), so their resubmit would pass it.
        hc.cancel(first[:2])
        more = hc.submit_batch("later", [(double, (i,), {}) for i in range(8, 12)])
        _refused_pending(hc, lambda: hc.resubmit(first[:2]))
        _refused_pending(hc, lambda: hc.submit("later", double, 12))
        _refused_pending(hc, lambda: hc.submit("later", double, 11, held=True))  # held: pending

        # Another user is counted apart.
        bob_token, _ = hc.create_token("bob")
        hc.share_endpoint("later", "bob")
        with Client(limited.address, token=bob_token) as bob:
            assert bob.get_task(bob.submit("later", double, 100)).state is TaskState.WAITING_FOR_EP

        # Once the tasks settle, the user may submit again.
        agents = Stack(limited)
        try:
            agents.start_agent("later", 4)
            pending = first[2:] + more
            assert [hc.get_result(t, timeout=TIMEOUT) for t in pending] == [
                2 * i for i in range(2, 12)
            ]
            again = hc.submit_batch("later", [(double, (i,), {}) for i in range(PENDING)])
            assert [hc.get_result(t, timeout=TIMEOUT) for t in again] == [
                2 * i for i in range(PENDING)
            ]
            resubmitted = hc.resubmit(first[:2])
            assert [hc.get_result(t, timeout=TIMEOUT) for t in resubmitted] == [0, 2]

            # A retry makes an ERRORED task pending again: the same limit holds.
            errored = [hc.submit("later", fail, i, max_retries=0) for i in range(2)]
            for tid in errored:
                with pytest.raises(heartline.TaskFailedError):
                    hc.get_result(tid, timeout=TIMEOUT)
            held = hc.submit_batch(
                "later", [(double, (i,), {}) for i in range(PENDING - 1)], held=True
            )
            _refused_pending(hc, lambda: hc.retry(errored))
            assert {hc.get_task(t).state for t in errored} == {TaskState.ERRORED}
            hc.retry(errored[:1])  # one place left: taken
            assert hc.get_task(errored[0]).attempt == 2
            hc.cancel(held)
        finally:
            agents.stop_agents()  # before the server stops


# --------------------------------------------------------------------------- the count


def test_the_scheduler_counts_pending_tasks_per_owner_on_each_transition() -> None:
    """In process: the count the limit reads moves with every transition into or out of
    the pending states, and a restart seeds it from the store's rows (the scheduler's
    full validate, run after each test, checks it against the tasks held)."""
    import dataclasses

    from tests import scheduler_kit as kit

    S = TaskState
    s = kit.make()
    s.handle(kit.submit("a1", "a2", kit.spec("a3", held=True), time=1.0))
    s.handle(dataclasses.replace(kit.submit("b1", time=1.0), owner="bob"))
    assert s.pending_by_owner == {kit.OWNER: 3, "bob": 1}
    s.handle(kit.connect("ag", capacity=4, time=2.0))
    s.handle(kit.report("ag", kit.sr("a1", S.RUNNING), kit.sr("b1", S.RUNNING), time=3.0))
    assert s.pending_by_owner == {kit.OWNER: 3, "bob": 1}  # running is pending
    s.handle(kit.report("ag", kit.sr("b1", S.SUCCEEDED, result=b"r"), time=4.0))
    assert s.pending_by_owner == {kit.OWNER: 3}  # an owner with none is dropped
    s.handle(kit.report("ag", kit.sr("a1", S.ERRORED, error=kit.raised()), time=5.0))
    assert s.pending_by_owner == {kit.OWNER: 2}
    s.handle(kit.cmd("retry", "a1", time=6.0))  # ERRORED -> queued again: pending
    assert s.pending_by_owner == {kit.OWNER: 3}
    s.handle(kit.cmd("cancel", "a2", "a3", time=7.0))
    assert s.pending_by_owner == {kit.OWNER: 1}

    restarted = kit.make()
    restarted.restore(
        [
            kit.row("x1", S.RUNNING),
            kit.row("x2", S.WAITING_FOR_EP, owner="bob"),
            kit.row("x3", S.ERRORED),
        ],
        10.0,
    )
    assert restarted.pending_by_owner == {kit.OWNER: 1, "bob": 1}
