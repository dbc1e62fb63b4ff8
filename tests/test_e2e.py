"""End to end: a real server process, real agent processes and a real SQLite file, driven
through the public client API (Executor, Client): submit, map, remote errors, a large
batch, and hold / release / cancel of queued and running tasks."""

from __future__ import annotations

import concurrent.futures
import sys
import time

import cloudpickle
import pytest

import heartline
from heartline import Client, Executor, TaskState
from tests.conftest import STORE_KINDS, Stack
from tests.helpers import assert_eventually, start_blocker, wait_state

# The functions below run on the agents' worker processes; ship them by value so the
# workers need not import this test module.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

TIMEOUT = 20.0  # bound of every wait for a task; far above what any task here needs

# The module shares one server and one agent of "local" with 4 workers: the ``stack``
# fixture of tests/conftest.py (``hc`` is a Client of it).


@pytest.fixture(scope="module", params=STORE_KINDS)
def stack_store_kind(request: pytest.FixtureRequest) -> str:
    """The module's tests run on a SQLite store, then on a PostgreSQL one."""
    return request.param


# --------------------------------------------------------------------------- remote functions


def square(x: int) -> int:
    return x * x


def slow_square(x: int) -> int:
    # Later items finish first, so results arrive out of submission order.
    time.sleep(0.002 * (50 - x % 50))
    return x * x


def explode(x: int) -> int:
    raise ValueError(f"bad value {x}")  # the line the remote traceback must show


def state_of(hc: Client, tid: str) -> TaskState:
    return hc.get_task(tid, history=False).state


# --------------------------------------------------------------------------- Executor


def test_executor_submit_returns_the_value(stack: Stack) -> None:
    with Executor("local", stack.address) as ex:
        fut = ex.submit(pow, 2, 10)
        assert fut.result(timeout=TIMEOUT) == 1024
        assert isinstance(fut.task_id, str) and fut.task_id
        fut2 = ex.submit(square, x=12)
        assert fut2.result(timeout=TIMEOUT) == 144
        assert fut2.task_id != fut.task_id


def test_executor_map_keeps_order(stack: Stack) -> None:
    with Executor("local", stack.address) as ex:
        assert list(ex.map(abs, range(-5, 0), timeout=TIMEOUT)) == [5, 4, 3, 2, 1]
        xs = list(range(200))
        assert list(ex.map(slow_square, xs, timeout=TIMEOUT)) == [x * x for x in xs]
        assert list(ex.map(pow, [2, 3, 4], [3, 2, 1], timeout=TIMEOUT)) == [8, 9, 4]


def test_executor_reraises_the_remote_exception(stack: Stack) -> None:
    with Executor("local", stack.address) as ex:
        fut = ex.submit(explode, 7)
        with pytest.raises(heartline.RemoteError) as info:
            fut.result(timeout=TIMEOUT)
        err = info.value
        assert err.remote_type == "ValueError"
        assert err.message == "bad value 7"
        assert str(err).startswith("ValueError: bad value 7")
        assert 'raise ValueError(f"bad value {x}")' in err.remote_traceback
        assert "explode" in err.remote_traceback
        assert isinstance(err, heartline.TaskFailedError)
        assert err.task_id == fut.task_id

        # In a map, the failing item raises when reached; the ones before it arrive.
        results = ex.map(lambda x: explode(x) if x == 2 else x, range(4), timeout=TIMEOUT)
        assert next(results) == 0
        assert next(results) == 1
        with pytest.raises(heartline.RemoteError, match="bad value 2"):
            next(results)


def test_client_get_result_reraises_and_get_task_keeps_the_error(stack: Stack, hc: Client) -> None:
    tid = hc.submit("local", explode, 3)
    with pytest.raises(heartline.RemoteError) as info:
        hc.get_result(tid, timeout=TIMEOUT)
    assert (info.value.remote_type, info.value.message) == ("ValueError", "bad value 3")
    task = hc.get_task(tid)
    assert task.state is TaskState.ERRORED and not task.pending
    assert task.error is not None and task.error.type_name == "ValueError"
    assert 'raise ValueError(f"bad value {x}")' in task.error.traceback
    assert isinstance(task.exception, heartline.RemoteError)
    assert [h.to_state for h in task.history][-1] is TaskState.ERRORED


# --------------------------------------------------------------------------- batch


def test_submit_batch_of_2000(stack: Stack, hc: Client) -> None:
    n = 2000
    ids = hc.submit_batch("local", [(pow, (2, i), {}) for i in range(n)])
    assert len(ids) == n and len(set(ids)) == n
    results = [hc.get_result(tid, timeout=60) for tid in ids]
    assert results == [2**i for i in range(n)]
    # The store agrees: every task is recorded as succeeded with its value.
    sample = hc.get_tasks(ids[::97])
    assert [t.state for t in sample] == [TaskState.SUCCEEDED] * len(sample)
    assert [t.result for t in sample] == [2**i for i in range(0, n, 97)]


# --------------------------------------------------------------------------- hold / release / cancel


def test_submitted_held_runs_only_after_release(stack: Stack, hc: Client) -> None:
    held = hc.submit("local", square, 9, held=True)
    assert state_of(hc, held) is TaskState.HELD
    # A task submitted after it runs to completion while it stays held.
    assert hc.get_result(hc.submit("local", square, 2), timeout=TIMEOUT) == 4
    assert state_of(hc, held) is TaskState.HELD
    [update] = hc.release([held])
    # Released to where it came from; it may be dispatched at once, as the agent has room.
    assert update.task_id == held and update.state is not TaskState.HELD
    assert hc.get_result(held, timeout=TIMEOUT) == 81
    history = [(h.from_state, h.to_state) for h in hc.get_task(held).history]
    assert history[0] == (None, TaskState.HELD)
    assert (TaskState.HELD, TaskState.WAITING_FOR_EP) in history
    assert history[-1][1] is TaskState.SUCCEEDED


def test_hold_a_queued_task_then_release_it(stack: Stack, hc: Client) -> None:
    ep = stack.solo_endpoint()
    blocker = start_blocker(hc, ep)
    queued = hc.submit(ep, square, 5)
    assert state_of(hc, queued) is TaskState.WAITING_FOR_EP

    [update] = hc.hold([queued])
    assert update.state is TaskState.HELD and update.pending
    hc.cancel([blocker])
    # The worker is free again: a later task runs while the held one stays put.
    assert hc.get_result(hc.submit(ep, square, 6), timeout=TIMEOUT) == 36
    assert state_of(hc, queued) is TaskState.HELD

    [update] = hc.release([queued])
    assert update.task_id == queued and update.state is not TaskState.HELD
    assert hc.get_result(queued, timeout=TIMEOUT) == 25


def test_cancel_a_queued_task(stack: Stack, hc: Client) -> None:
    ep = stack.solo_endpoint()
    blocker = start_blocker(hc, ep)
    queued = hc.submit(ep, square, 5)
    assert state_of(hc, queued) is TaskState.WAITING_FOR_EP

    [update] = hc.cancel([queued])
    assert update.task_id == queued and update.state is TaskState.CANCELLED and not update.pending
    with pytest.raises(heartline.TaskFailedError) as info:
        hc.get_result(queued, timeout=TIMEOUT)
    assert not isinstance(info.value, heartline.RemoteError)
    assert info.value.state == "cancelled"
    task = hc.get_task(queued)
    assert task.state is TaskState.CANCELLED
    assert [h.to_state for h in task.history] == [TaskState.WAITING_FOR_EP, TaskState.CANCELLED]
    assert isinstance(task.exception, heartline.TaskFailedError)
    hc.cancel([blocker])


def test_cancel_a_running_task_frees_its_worker(stack: Stack, hc: Client) -> None:
    ep = stack.solo_endpoint()
    running = start_blocker(hc, ep)
    waiting = hc.submit(ep, square, 4)
    assert state_of(hc, waiting) is TaskState.WAITING_FOR_EP

    t0 = time.monotonic()
    [update] = hc.cancel([running])
    assert update.state is TaskState.CANCELLED
    with pytest.raises(heartline.TaskFailedError, match="cancelled"):
        hc.get_result(running, timeout=TIMEOUT)
    # The one worker (which was sleeping for 60 s) is free: the queued task and a new
    # one both succeed promptly.
    assert hc.get_result(waiting, timeout=TIMEOUT) == 16
    assert hc.get_result(hc.submit(ep, square, 3), timeout=TIMEOUT) == 9
    assert time.monotonic() - t0 < TIMEOUT
    task = hc.get_task(running)
    assert task.state is TaskState.CANCELLED
    assert TaskState.RUNNING in [h.to_state for h in task.history]
    assert task.history[-1].to_state is TaskState.CANCELLED
    # The only worker has run two tasks since: the killed attempt left no late outcome.
    assert hc.get_task(running, history=False).state is TaskState.CANCELLED


def test_executor_future_cancel_cancels_the_task(stack: Stack, hc: Client) -> None:
    ep = stack.solo_endpoint()
    blocker = start_blocker(hc, ep)
    with Executor(ep, stack.address) as ex:
        fut = ex.submit(square, 8)
        assert_eventually(lambda: fut.task_id is not None, timeout=TIMEOUT, message="task stored")
        assert fut.cancel()
        assert fut.cancelled()
        with pytest.raises(concurrent.futures.CancelledError):
            fut.result(timeout=1)
        tid = fut.task_id
        assert tid is not None
        wait_state(hc, tid, TaskState.CANCELLED, timeout=TIMEOUT)
    hc.cancel([blocker])


async def test_async_client_release_and_cancel_held_tasks(stack: Stack) -> None:
    async with heartline.AsyncClient(stack.address) as ac:
        tid = await ac.submit("local", square, 11, held=True)
        [u] = await ac.release([tid])
        assert u.task_id == tid and u.state is not TaskState.HELD
        assert await ac.get_result(tid, timeout=TIMEOUT) == 121
        other = await ac.submit("local", square, 1, held=True)
        [u] = await ac.cancel([other])
        assert u.state is TaskState.CANCELLED
        with pytest.raises(heartline.TaskFailedError, match="cancelled"):
            await ac.get_result(other, timeout=TIMEOUT)
