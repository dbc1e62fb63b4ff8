"""Plain figures the server and the agent keep for their metrics, without Prometheus.

The hot paths (the scheduler's transitions, the store's commits) count into these plain
objects; only a scrape turns them into Prometheus metric families (``heartline._metrics``,
imported only when ``--metrics`` is on). A Prometheus ``Histogram.observe`` costs about
2 us; ``Buckets.observe`` about 0.15 us.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable

DISPATCH_LATENCY_BOUNDS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
)  # fmt: skip
"""Upper bounds (seconds) of the buckets of submit-to-dispatch latency."""
COMMIT_SECONDS_BOUNDS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
)  # fmt: skip
"""Upper bounds (seconds) of the buckets of one store group commit."""
BATCH_ITEMS_BOUNDS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
"""Upper bounds of the buckets of queued items applied in one store group commit."""
GC_PAUSE_BOUNDS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
)  # fmt: skip
"""Upper bounds (seconds) of the buckets of one cyclic garbage collection."""


class Buckets:
    """Observations counted per bucket (a histogram's figures).

    ``counts[i]`` holds the observations ``v`` with ``bounds[i - 1] < v <= bounds[i]``;
    the last count is the overflow (``v > bounds[-1]``). Not thread-safe: one owner
    observes, and a reader copies under the owner's rules.
    """

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: Iterable[float]) -> None:
        self.bounds = tuple(sorted(bounds))
        self.counts = [0] * (len(self.bounds) + 1)
        self.total = 0.0
        """Sum of every observed value."""

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value

    @property
    def count(self) -> int:
        return sum(self.counts)

    def copy(self) -> Buckets:
        other = Buckets.__new__(Buckets)
        other.bounds = self.bounds
        other.counts = list(self.counts)
        other.total = self.total
        return other


def parse_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` of a metrics endpoint as ``(host, port)``.

    ``[::1]:9100`` names an IPv6 host; an empty host (``:9100``) means every interface.
    Port 0 picks a free port.

    Raises:
        ValueError: Not ``HOST:PORT`` with a port from 0 to 65535.
    """
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"expected HOST:PORT (port 0-65535), not {text!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"write an IPv6 host in brackets, as [::1]:9100, not {text!r}")
    return host or "0.0.0.0", int(port)
