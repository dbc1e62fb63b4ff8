"""Serving Prometheus metrics: the parts the server and the agent share.

Each process that runs with ``--metrics HOST:PORT`` serves a private
``CollectorRegistry`` with prometheus_client's threaded HTTP server. Its collector
builds the metric families at scrape time from a snapshot of plain figures, and the
snapshot is taken ON the event loop that owns them (:func:`on_loop`): the HTTP thread
never reads a dict the loop may be changing. Only this module and the collectors import
prometheus_client, and only when metrics are on.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from collections.abc import Callable, Iterable
from typing import TypeVar
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from heartline._errors import HeartlineError
from heartline._figures import Buckets, parse_address

log = logging.getLogger("heartline.metrics")

T = TypeVar("T")

SNAPSHOT_TIMEOUT = 5.0
"""Seconds a scrape waits for the event loop to take its snapshot (Prometheus's own
scrape timeout is 10 s by default)."""


class MetricsError(HeartlineError):
    """The metrics endpoint cannot be served (e.g. its address cannot be bound)."""


class MetricsServer:
    """A registry served over HTTP on a daemon thread; :meth:`stop` closes it."""

    def __init__(
        self, httpd: WSGIServer, thread: threading.Thread, registry: CollectorRegistry
    ) -> None:
        self._httpd = httpd
        self._thread = thread
        self.registry = registry

    @classmethod
    def start(cls, address: str, *collectors: Collector) -> MetricsServer:
        """Serve ``collectors`` at ``http://address/metrics``.

        Raises:
            MetricsError: ``address`` is malformed or cannot be bound.
        """
        try:
            host, port = parse_address(address)
        except ValueError as exc:
            raise MetricsError(f"--metrics: {exc}") from None
        registry = CollectorRegistry(auto_describe=False)
        for collector in collectors:
            registry.register(collector)
        try:
            httpd, thread = start_http_server(port, host, registry)
        except OSError as exc:
            reason = exc.strerror or str(exc)
            raise MetricsError(f"cannot serve metrics on {address}: {reason}") from None
        server = cls(httpd, thread, registry)
        log.info("event=metrics-listening url=%s", server.url)
        return server

    @property
    def address(self) -> str:
        """The bound ``HOST:PORT`` (the real port when 0 was asked)."""
        host, port = self._httpd.server_address[:2]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"

    @property
    def url(self) -> str:
        return f"http://{self.address}/metrics"

    async def stop(self) -> None:
        """Stop serving; waits (in a thread) for the serving loop to notice."""
        await asyncio.to_thread(self._httpd.shutdown)
        self._httpd.server_close()
        await asyncio.to_thread(self._thread.join, 5.0)


def on_loop(
    loop: asyncio.AbstractEventLoop, fn: Callable[[], T], timeout: float = SNAPSHOT_TIMEOUT
) -> T:
    """Run ``fn`` on ``loop``'s thread and return its result; called from another thread.

    Raises:
        MetricsError: The loop is closed or did not run ``fn`` within ``timeout``.
    """
    if _running_loop() is loop:
        return fn()  # already on the loop (e.g. a test collecting in-process)
    done: concurrent.futures.Future[T] = concurrent.futures.Future()

    def run() -> None:
        if not done.set_running_or_notify_cancel():
            return  # the scrape gave up waiting
        try:
            done.set_result(fn())
        except BaseException as exc:  # noqa: BLE001 - handed to the scraping thread
            done.set_exception(exc)

    try:
        loop.call_soon_threadsafe(run)
        return done.result(timeout)
    except RuntimeError as exc:  # the loop is closed: the process is stopping
        raise MetricsError(f"no snapshot: {exc}") from None
    except concurrent.futures.TimeoutError:
        done.cancel()
        log.warning("event=metrics-snapshot-timeout seconds=%g", timeout)
        raise MetricsError(f"the event loop took no snapshot within {timeout:g}s") from None


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def histogram(
    name: str,
    documentation: str,
    buckets: Buckets,
    labels: Iterable[tuple[str, str]] = (),
) -> HistogramMetricFamily:
    """A histogram family from plain ``Buckets`` (cumulative, as Prometheus wants)."""
    family = HistogramMetricFamily(name, documentation, labels=[k for k, _ in labels])
    add_buckets(family, [v for _, v in labels], buckets)
    return family


def add_buckets(family: HistogramMetricFamily, values: list[str], buckets: Buckets) -> None:
    """Add one series (its label values, then its figures) to a histogram family."""
    cumulative = []
    running = 0
    for bound, count in zip((*buckets.bounds, float("inf")), buckets.counts, strict=True):
        running += count
        cumulative.append((floatToGoString(bound), running))
    family.add_metric(values, cumulative, buckets.total)
