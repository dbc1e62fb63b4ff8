"""How often agents beat, and how long a silence loses one.

Every heartbeat costs the server a message read (about 0.4 ms of CPU, most of it in
gRPC's stream machinery), so a fixed interval makes the idle cost grow with the agents:
10,000 agents at 5 s would keep a core nearly busy doing nothing. As Dask's scheduler
does for its workers (``distributed/scheduler.py`` ``heartbeat_interval``: no more than
200 heartbeats a second, the interval sent back with each reply), the server asks all
its agents together for at most ``rate`` heartbeats a second: past ``rate x interval``
agents, the interval it asks of each stretches, and the timeout with it.

The interval moves in steps of a factor of the square root of 2, so an agent is told
anew only each time the fleet grows by that factor (a ramp from 1,000 to 10,000 agents
tells the earliest ones 7 times); and it only ever grows within a stream's life: a
longer interval only makes the server more lenient, so an agent that has not read the
change yet, or an older agent that ignores it, is never judged silent by mistake. A
stream opened when the fleet has shrunk is told the shorter interval again.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

_STEP = math.sqrt(2)


@dataclass(frozen=True, slots=True)
class HeartbeatPolicy:
    """The intervals and timeouts the server asks of its agents."""

    interval: float
    """The shortest interval (seconds): what a few agents are asked for."""
    timeout: float
    """The silence that loses an agent beating at ``interval``; a longer interval's
    timeout is as many of its intervals."""
    rate: float
    """Heartbeats a second the server asks of all its agents together, at most."""

    def interval_for(self, agents: int) -> float:
        """The interval to ask of each of ``agents`` agents."""
        need = agents / self.rate
        if need <= self.interval:
            return self.interval
        steps = math.ceil(2 * math.log2(need / self.interval) - 1e-9)
        return self.interval * _STEP**steps

    def timeout_for(self, interval: float) -> float:
        """The silence that loses an agent asked to beat every ``interval`` seconds."""
        return self.timeout * interval / self.interval
