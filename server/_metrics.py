"""The server's Prometheus metrics (SPEC section 7), built at scrape time.

Where each figure lives, and how a scrape reads it:

* the scheduler keeps tasks by state (changed in ``Scheduler._record``, the one place that
  records a transition; seeded from the store's ``count_by_state`` at restore, so the
  figures match ``GetStats``), the transition count and the dispatch latency buckets;
  with the agents, queues and endpoints, they are copied ON the event loop that owns
  them (``_snapshot``, run through :func:`heartline._metrics.on_loop`);
* the store's writer thread keeps its commit figures under its own lock
  (``SqliteStore.figures``), read from the scraping thread.

Nothing here runs unless the server was started with ``--metrics``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from heartline._figures import Buckets
from heartline._metrics import add_buckets, histogram, on_loop
from heartline._states import TaskState
from heartline.server._core import ServerCore
from heartline.server._memory import GcPauses


@dataclass(frozen=True, slots=True)
class EndpointFigures:
    endpoint_id: str
    name: str
    queued: int
    agents: int


@dataclass(frozen=True, slots=True)
class ServerFigures:
    """What one scrape reads from the event loop's side."""

    tasks_by_state: dict[TaskState, int]
    transitions: int
    dispatch_latency: Buckets
    agents_online: int
    endpoints_online: int
    endpoints: tuple[EndpointFigures, ...]


def snapshot(core: ServerCore) -> ServerFigures:
    """Copy the figures; must run on the server's event loop."""
    scheduler = core.scheduler
    dispatcher = scheduler.dispatcher
    agents_of = {e: len(dispatcher.agents_of(e)) for e in dispatcher.online()}
    names = {endpoint_id: row.name for endpoint_id, row in core.endpoints.items()}
    known = names.keys() | scheduler.queues.keys() | agents_of.keys()
    return ServerFigures(
        tasks_by_state=dict(scheduler.tasks_by_state),
        transitions=scheduler.transitions_total,
        dispatch_latency=scheduler.dispatch_latency.copy(),
        agents_online=len(scheduler.agents),
        endpoints_online=len(agents_of),
        endpoints=tuple(
            EndpointFigures(e, names.get(e, ""), scheduler.queued(e), agents_of.get(e, 0))
            for e in sorted(known)
        ),
    )


class ServerCollector:
    """A prometheus_client collector of one server's figures."""

    def __init__(
        self, core: ServerCore, loop: asyncio.AbstractEventLoop, gc_pauses: GcPauses | None = None
    ) -> None:
        self._core = core
        self._loop = loop
        self._gc_pauses = gc_pauses

    def collect(self) -> Iterator[Metric]:
        # Called on the HTTP server's thread.
        figures = on_loop(self._loop, lambda: snapshot(self._core))
        tasks = GaugeMetricFamily(
            "heartline_tasks", "Tasks in each state (as GetStats counts them).", labels=["state"]
        )
        for state in TaskState:
            tasks.add_metric([state.value], figures.tasks_by_state.get(state, 0))
        yield tasks
        yield CounterMetricFamily(
            "heartline_transitions",
            "Task state transitions since the server started.",
            value=figures.transitions,
        )
        yield histogram(
            "heartline_dispatch_latency_seconds",
            "Seconds from a task's submission to each of its dispatches to an agent.",
            figures.dispatch_latency,
        )
        yield GaugeMetricFamily(
            "heartline_endpoints_online",
            "Endpoints with at least one agent connected.",
            value=figures.endpoints_online,
        )
        yield GaugeMetricFamily(
            "heartline_agents_online", "Agents connected.", value=figures.agents_online
        )
        queued = GaugeMetricFamily(
            "heartline_queue_depth",
            "Tasks queued at the server for an endpoint (waiting for an agent's slot).",
            labels=["endpoint", "endpoint_id"],
        )
        agents = GaugeMetricFamily(
            "heartline_endpoint_agents",
            "Agents connected per endpoint.",
            labels=["endpoint", "endpoint_id"],
        )
        for ep in figures.endpoints:
            queued.add_metric([ep.name, ep.endpoint_id], ep.queued)
            agents.add_metric([ep.name, ep.endpoint_id], ep.agents)
        yield queued
        yield agents
        if self._gc_pauses is not None:
            pauses = HistogramMetricFamily(
                "heartline_gc_pause_seconds",
                "Seconds each cyclic garbage collection held the process, by generation.",
                labels=["generation"],
            )
            for generation, buckets in enumerate(self._gc_pauses.copy()):
                add_buckets(pauses, [str(generation)], buckets)
            yield pauses
        store = self._core.store.figures()
        if store is not None:
            yield histogram(
                "heartline_store_commit_seconds",
                "Seconds one group commit of the store takes (BEGIN to COMMIT).",
                store.commit_seconds,
            )
            yield histogram(
                "heartline_store_batch_items",
                "Queued writes and reads applied in one group commit.",
                store.batch_items,
            )
            yield GaugeMetricFamily(
                "heartline_store_queue_depth",
                "Writes and reads queued for the store's writer thread.",
                value=store.queued,
            )
