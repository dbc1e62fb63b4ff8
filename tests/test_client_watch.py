"""The client's watch streams at scale: no WatchTasks request names more task ids than the
server accepts (``MAX_IDS``), a refused request fails only the waits of the tasks it
named, and the settled outcomes nobody asked for are kept bounded (count and bytes), with
``get_result`` of a dropped one answered through a named watch.

Two tests run the real server and agent (more than MAX_IDS tasks pending across a server
SIGKILL and restart; a client that never calls get_result); the others drive the client
against the small fake TaskService of ``tests/helpers.py`` with the limits made small.
"""

from __future__ import annotations

import asyncio
import pickle
import sys
import time
from collections.abc import Callable, Iterator

import cloudpickle
import grpc
import pytest

import heartline
import heartline.client._async as client_async
from heartline.client import AsyncClient, Client, Executor
from heartline.client._base import MAX_IDS
from heartline.v1 import task_pb2
from tests.conftest import ServerProc, relaunch_server
from tests.helpers import FakeServer, FakeTaskService, Proc, assert_eventually
from tests.test_client_unit import fake_auto  # noqa: F401 - a fixture

# The functions below run on the agent's workers; ship them by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

WAIT = 10  # seconds: bound of each wait against the fake server
TIMEOUT = 30.0  # seconds: bound of each wait against the real server


def echo(x):
    return x


def blob(n, i):
    return bytes([i % 256]) * n


async def wait_until(predicate: Callable[[], object], timeout: float = WAIT) -> None:
    """Bounded wait for a condition another task or thread makes true (no fixed sleeps)."""
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.005)


def watched_ids(service: FakeTaskService, since: int = 0) -> list[str]:
    return [t for r in service.watch_requests[since:] for t in r.task_ids]


# ------------------------------------------------------------------------ real server


def test_server_limit_is_the_clients_limit() -> None:
    from heartline.server._task_service import MAX_IDS as SERVER_MAX_IDS

    assert MAX_IDS <= SERVER_MAX_IDS


def test_more_than_max_ids_pending_across_a_server_restart_all_resolve(
    server: ServerProc, start_agent: Callable[..., Proc]
) -> None:
    n = MAX_IDS + 50
    start_agent("local", 2)
    with Client(server.address) as hc:
        ids = hc.submit_batch("local", [(echo, (i,), {}) for i in range(n)], held=True)
        assert len(set(ids)) == n
        aclient = hc._async
        assert aclient._watch_live

        server.proc.kill()
        # The client's session stream breaks; it retries with backoff meanwhile.
        assert_eventually(
            lambda: not aclient._watch_live, timeout=TIMEOUT, message="watch broken"
        )
        # Without --validate: that full-state check on every scheduler step makes running
        # 10,000 tasks take ~40 s, and what this test exercises is the client. The restarted
        # server is stopped and checked for a blocked loop like every other (conftest).
        relaunch_server(server, validate=False)

        # The reopened watches name every one of the n unresolved tasks, in requests
        # the server accepts: the session watch is live again and no wait failed.
        assert_eventually(
            lambda: aclient._watch_live, timeout=TIMEOUT, message="watch reopened"
        )
        failed = [f for f in list(aclient._waiters.values()) if f.done()]
        assert not failed, f"{len(failed)} waits failed, e.g. {failed[0].exception()!r}"

        for i in range(0, n, MAX_IDS // 2):  # release takes at most MAX_IDS ids too
            hc.release(ids[i : i + MAX_IDS // 2])
        deadline = time.monotonic() + TIMEOUT
        results = [
            hc.get_result(tid, timeout=max(0.1, deadline - time.monotonic())) for tid in ids
        ]
        assert results == list(range(n))


async def test_a_client_that_never_asks_keeps_at_most_the_cap(
    server: ServerProc,
    start_agent: Callable[..., Proc],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cap, n = 50, 200
    monkeypatch.setattr(client_async, "MAX_KEPT_SETTLED", cap)
    await asyncio.to_thread(start_agent, "local", 2)
    async with AsyncClient(server.address) as client:
        ids = await client.submit_batch("local", [(echo, (i,), {}) for i in range(n)])
        # Every task settled and the client heard of it: no wait is left open.
        await wait_until(
            lambda: all(f.done() for f in client._waiters.values()), timeout=TIMEOUT
        )
        assert len(client._waiters) <= cap
        assert len(client._kept) <= cap
        assert set(client._kept) == set(client._waiters)
        assert client._kept_bytes == sum(client._kept.values()) > 0
        # The newest are the ones kept; the oldest were dropped.
        assert ids[-1] in client._waiters and ids[0] not in client._waiters

        # A dropped outcome still comes back right (by a named watch), and so does a kept one.
        assert await client.get_result(ids[0], timeout=TIMEOUT) == 0
        assert await client.get_result(ids[-1], timeout=TIMEOUT) == n - 1
        results = await asyncio.gather(*(client.get_result(t, timeout=TIMEOUT) for t in ids))
        assert results == list(range(n))
        assert len(client._waiters) <= cap and not client._named


# ------------------------------------------------------------------------ fake server


class RefusingTaskService(FakeTaskService):
    """Refuses (NOT_FOUND) a watch that names a poisoned id, as the server does for a
    task it no longer has."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.poison: set[str] = set()

    async def WatchTasks(self, request, context):
        bad = self.poison.intersection(request.task_ids)
        if bad:
            self.watch_requests.append(request)
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no task {min(bad)}")
        async for response in super().WatchTasks(request, context):
            yield response


@pytest.fixture
def fake() -> Iterator[FakeServer]:
    server = FakeServer(RefusingTaskService())
    server.start()
    yield server
    server.close()


@pytest.fixture
def small_max_ids(monkeypatch: pytest.MonkeyPatch) -> int:
    monkeypatch.setattr(client_async, "MAX_IDS", 5)
    return 5


async def test_reopened_watch_names_at_most_max_ids_per_request(fake, small_max_ids):
    async with AsyncClient(fake.address) as client:
        ids = await client.submit_batch("local", [(echo, (i,), {}) for i in range(12)])
        before = len(fake.service.watch_requests)
        fake.stop()
        fake.start()
        await wait_until(lambda: sorted(watched_ids(fake.service, before)) == sorted(ids))
        reopened = fake.service.watch_requests[before:]
        assert all(len(r.task_ids) <= small_max_ids for r in reopened)
        session = [r for r in reopened if r.session_id == client.session_id]
        assert len(session) == 1 and list(session[0].task_ids) == ids[:small_max_ids]
        assert all(r.session_id == "" for r in reopened if r is not session[0])
        for i, tid in enumerate(ids):
            fake.settle(tid, task_pb2.TASK_STATE_SUCCEEDED, result=pickle.dumps(i))
        results = await asyncio.gather(*(client.get_result(t, timeout=WAIT) for t in ids))
        assert results == list(range(12))


async def test_a_refused_watch_fails_only_the_tasks_it_named(fake, small_max_ids):
    async with AsyncClient(fake.address) as client:
        ids = await client.submit_batch("local", [(echo, (i,), {}) for i in range(12)])
        fake.service.poison.add(ids[2])  # the server "lost" one task of the first chunk
        fake.stop()
        fake.start()
        first, others = ids[:small_max_ids], ids[small_max_ids:]
        await wait_until(lambda: all(client._waiters[t].done() for t in first))
        await wait_until(lambda: client._watch_live)
        for i, tid in enumerate(ids):
            fake.settle(tid, task_pb2.TASK_STATE_SUCCEEDED, result=pickle.dumps(i))
        for tid in first:
            with pytest.raises(heartline.NotFoundError, match=ids[2]):
                await client.get_result(tid, timeout=WAIT)
        results = await asyncio.gather(*(client.get_result(t, timeout=WAIT) for t in others))
        assert results == list(range(small_max_ids, 12))


async def test_track_while_the_watch_is_down_chunks_named_watches(fake, small_max_ids):
    async with AsyncClient(fake.address) as client:
        ids = await client.submit_batch("local", [(echo, (i,), {}) for i in range(12)])
        before = len(fake.service.watch_requests)
        client._track(ids, epoch=-1)  # as if the session watch broke during the submit
        await wait_until(lambda: len(fake.service.watch_requests) >= before + 3)
        named = fake.service.watch_requests[before:]
        assert sorted(len(r.task_ids) for r in named) == [2, 5, 5]
        assert sorted(watched_ids(fake.service, before)) == sorted(ids)
        for i, tid in enumerate(ids):
            fake.settle(tid, task_pb2.TASK_STATE_SUCCEEDED, result=pickle.dumps(i))
        results = await asyncio.gather(*(client.get_result(t, timeout=WAIT) for t in ids))
        assert results == list(range(12))
        await wait_until(lambda: not client._covered)  # the named watches ended


async def test_kept_outcomes_are_bounded_by_bytes_and_dropped_ones_share_one_watch(
    fake, monkeypatch
):
    monkeypatch.setattr(client_async, "MAX_KEPT_BYTES", 5 * 1000)
    async with AsyncClient(fake.address) as client:
        ids = await client.submit_batch("local", [(blob, (1000, i), {}) for i in range(30)])
        for i, tid in enumerate(ids):
            fake.settle(tid, task_pb2.TASK_STATE_SUCCEEDED, result=pickle.dumps(blob(1000, i)))
        await wait_until(lambda: all(f.done() for f in client._waiters.values()))
        assert 0 < client._kept_bytes <= 5 * 1000
        assert len(client._waiters) == len(client._kept) < 5
        dropped = [t for t in ids if t not in client._waiters]
        assert len(dropped) > 25
        before = len(fake.service.watch_requests)
        results = await asyncio.gather(*(client.get_result(t, timeout=WAIT) for t in ids))
        assert results == [blob(1000, i) for i in range(30)]
        # The dropped ones were asked for in one loop iteration: one named watch for all.
        named = fake.service.watch_requests[before:]
        assert len(named) == 1 and sorted(named[0].task_ids) == sorted(dropped)
        assert named[0].session_id == ""
        assert not client._waiters and not client._kept and client._kept_bytes == 0


async def test_awaited_waits_are_never_dropped(fake, monkeypatch):
    monkeypatch.setattr(client_async, "MAX_KEPT_SETTLED", 3)
    async with AsyncClient(fake.address) as client:
        ids = await client.submit_batch("local", [(echo, (i,), {}) for i in range(40)])
        waiting = asyncio.gather(*(client.get_result(t, timeout=WAIT) for t in ids))
        await wait_until(lambda: len(client._waiters) == 40)  # nothing settled yet
        before = len(fake.service.watch_requests)
        for i, tid in enumerate(ids):
            fake.settle(tid, task_pb2.TASK_STATE_SUCCEEDED, result=pickle.dumps(i))
        assert await asyncio.wait_for(waiting, WAIT) == list(range(40))
        assert len(fake.service.watch_requests) == before  # all from the session watch
        assert not client._waiters and not client._kept


def test_executor_futures_resolve_with_a_tiny_cap(fake_auto, monkeypatch):
    monkeypatch.setattr(client_async, "MAX_KEPT_SETTLED", 2)
    monkeypatch.setattr(client_async, "MAX_KEPT_BYTES", 64)
    with Executor("local", fake_auto.address) as ex:
        assert list(ex.map(echo, range(500), timeout=WAIT)) == list(range(500))
        assert len(ex.client._async._waiters) <= 2


def test_a_fresh_client_can_wait_on_a_task_another_client_submitted(server: ServerProc, agent) -> None:  # noqa: ANN001
    # Its first call is get_result: the named watch must open the channel itself.
    with Client(server.address) as first:
        tid = first.submit("local", abs, -7)
        assert first.get_result(tid, timeout=30) == 7
    with Client(server.address) as fresh:
        assert fresh.get_result(tid, timeout=30) == 7
