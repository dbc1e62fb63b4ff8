"""The event-loop watchdog notices a blocking call (heartline/_watchdog.py)."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from heartline._watchdog import watch_loop


async def test_a_blocking_call_is_reported(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="heartline.watchdog")
    watchdog = asyncio.ensure_future(watch_loop(interval=0.01, threshold=0.05))
    await asyncio.sleep(0.02)  # let the watchdog start its first sleep
    time.sleep(0.2)  # the blocking call under test, not synchronization
    async with asyncio.timeout(5):
        while "event=loop-blocked" not in caplog.text:
            await asyncio.sleep(0.01)
    watchdog.cancel()
    await asyncio.gather(watchdog, return_exceptions=True)
    assert "seconds=0.1" in caplog.text or "seconds=0.2" in caplog.text


async def test_an_idle_loop_is_not_reported(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="heartline.watchdog")
    watchdog = asyncio.ensure_future(watch_loop(interval=0.01, threshold=0.5))
    for _ in range(10):
        await asyncio.sleep(0.01)
    watchdog.cancel()
    await asyncio.gather(watchdog, return_exceptions=True)
    assert "loop-blocked" not in caplog.text
