"""The stream writers' pacing policy (heartline/_pacer.py)."""

from __future__ import annotations

import asyncio

from heartline._pacer import Pacer


async def test_urgent_wakes_the_writer_at_once_when_idle() -> None:
    pacer = Pacer(min_interval=0.001, lazy_delay=60.0)
    pacer.urgent()
    async with asyncio.timeout(5):
        await pacer.wait()


async def test_lazy_items_wait_for_company_or_their_delay() -> None:
    pacer = Pacer(min_interval=0.001, lazy_delay=60.0)
    pacer.lazy()
    waiter = asyncio.ensure_future(pacer.wait())
    await asyncio.sleep(0)  # let the writer start waiting
    assert not waiter.done()  # a lazy item alone does not wake it (its delay is 60 s)
    pacer.urgent()  # an urgent item arrives: both go together
    async with asyncio.timeout(5):
        await waiter

    fast = Pacer(min_interval=0.001, lazy_delay=0.01)
    fast.lazy()
    async with asyncio.timeout(5):
        await fast.wait()  # alone, it goes once its delay has passed


async def test_under_load_sends_are_spaced_by_the_min_interval() -> None:
    loop = asyncio.get_running_loop()
    pacer = Pacer(min_interval=0.05, lazy_delay=60.0)
    pacer.urgent()
    await pacer.wait()
    first = loop.time()
    pacer.urgent()
    async with asyncio.timeout(5):
        await pacer.wait()
    assert loop.time() - first >= 0.045
