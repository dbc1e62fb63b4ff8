"""Notice when something blocks the event loop.

A coroutine that sleeps ``interval`` and measures how late it wakes: a wake later than
``threshold`` means some callback held the loop that long (a blocking call where an
await belonged). It logs one warning line with ``event=loop-blocked``; the test fixtures
fail a test whose server or agent printed one.
"""

from __future__ import annotations

import asyncio
import logging

log = logging.getLogger("heartline.watchdog")


async def watch_loop(interval: float = 0.1, threshold: float = 1.0) -> None:
    """Run until cancelled, logging every stall of the loop longer than ``threshold``."""
    loop = asyncio.get_running_loop()
    while True:
        before = loop.time()
        await asyncio.sleep(interval)
        late = loop.time() - before - interval
        if late > threshold:
            log.warning("event=loop-blocked seconds=%.2f", late)
