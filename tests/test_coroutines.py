"""`async def` functions run: the worker awaits them on its one event loop (one task at a
time per worker); walltime and cancel reach a running coroutine; generator functions are
refused before anything is sent."""

from __future__ import annotations

import asyncio
import sys
import time

import cloudpickle
import pytest

import heartline
from heartline import Client, TaskState
from tests.conftest import ServerProc
from tests.helpers import Proc, assert_eventually

cloudpickle.register_pickle_by_value(sys.modules[__name__])

TIMEOUT = 30.0


async def nap_then_double(seconds: float, x: int) -> int:
    await asyncio.sleep(seconds)
    return 2 * x


async def loop_identity() -> tuple[int, int]:
    import os

    await asyncio.sleep(0)
    return os.getpid(), id(asyncio.get_running_loop())


async def fail_after_await() -> None:
    await asyncio.sleep(0.01)
    raise KeyError("after an await")  # the coroutine's failing line


def numbers(n: int):  # noqa: ANN201 - a generator function
    yield from range(n)


async def async_numbers(n: int):  # noqa: ANN201
    for i in range(n):
        yield i


def test_coroutines_return_their_values_one_at_a_time_per_worker(
    server: ServerProc, agent: Proc
) -> None:
    with Client(server.address) as hc:
        assert hc.get_result(hc.submit("local", nap_then_double, 0.01, 21), timeout=TIMEOUT) == 42
        # 8 naps of 0.3 s on 2 workers: one coroutine at a time per worker, so about
        # 4 rounds, never all 8 at once.
        t0 = time.monotonic()
        ids = hc.submit_batch("local", [(nap_then_double, (0.3, i), {}) for i in range(8)])
        assert [hc.get_result(t, timeout=TIMEOUT) for t in ids] == [2 * i for i in range(8)]
        assert time.monotonic() - t0 >= 4 * 0.3 - 0.05
        # The loop is the worker's own and is reused: one loop per worker process.
        seen = [hc.get_result(t, timeout=TIMEOUT) for t in
                hc.submit_batch("local", [(loop_identity, (), {}) for _ in range(10)])]
        loops_by_worker: dict[int, set[int]] = {}
        for pid, loop in seen:
            loops_by_worker.setdefault(pid, set()).add(loop)
        assert 1 <= len(loops_by_worker) <= 2, loops_by_worker
        assert all(len(loops) == 1 for loops in loops_by_worker.values()), loops_by_worker


def test_a_coroutine_that_raises_shows_its_own_frames(server: ServerProc, agent: Proc) -> None:
    with Client(server.address) as hc:
        with pytest.raises(heartline.RemoteError) as info:
            hc.get_result(hc.submit("local", fail_after_await), timeout=TIMEOUT)
    tb = info.value.remote_traceback
    assert 'raise KeyError("after an await")  # the coroutine\'s failing line' in tb, tb
    assert "asyncio" not in tb and "_worker.py" not in tb, tb


def test_walltime_and_cancel_reach_a_running_coroutine(server: ServerProc, agent: Proc) -> None:
    with Client(server.address) as hc:
        t0 = time.monotonic()
        tid = hc.submit("local", nap_then_double, 30, 1, walltime=0.5)
        with pytest.raises(heartline.TaskFailedError, match="walltime"):
            hc.get_result(tid, timeout=TIMEOUT)
        assert time.monotonic() - t0 < 10

        tid = hc.submit("local", nap_then_double, 30, 1)
        assert_eventually(
            lambda: hc.get_task(tid, history=False).state is TaskState.RUNNING, timeout=TIMEOUT
        )
        hc.cancel([tid])
        assert hc.get_task(tid, history=False).state is TaskState.CANCELLED
        # The worker was replaced and serves again.
        assert hc.get_result(hc.submit("local", nap_then_double, 0, 5), timeout=TIMEOUT) == 10


@pytest.mark.parametrize("fn", [numbers, async_numbers])
def test_generator_functions_are_refused_before_anything_is_sent(fn) -> None:  # noqa: ANN001
    # No server at this address: the refusal comes before any call.
    with Client("127.0.0.1:1") as hc:
        with pytest.raises(heartline.InvalidArgumentError, match="generator function"):
            hc.submit("local", fn, 3)
