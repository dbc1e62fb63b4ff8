"""The agent's Prometheus metrics, built at scrape time.

Every figure is read ON the agent's event loop (:func:`heartline._metrics.on_loop`) from
state the agent keeps anyway (held tasks, unacked reports, the pool's workers); the only
per-task cost is one counter of terminal reports. Nothing here runs unless the agent was
started with ``--metrics``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric

from heartline._metrics import on_loop
from heartline._states import TaskState
from heartline.endpoint._agent import Agent, AgentState
from heartline.endpoint._workers import WorkerPool, WorkerState


@dataclass(frozen=True, slots=True)
class AgentFigures:
    """What one scrape reads from the agent's loop."""

    agent_id: str
    endpoint: str
    endpoint_id: str
    connected: bool
    held: dict[TaskState, int]
    finished: dict[TaskState, int]
    unacked: int
    workers: dict[WorkerState, int]
    worker_restarts: int


def snapshot(agent: Agent) -> AgentFigures:
    """Copy the figures; must run on the agent's event loop."""
    # Worker processes are the process engine's; a Dask cluster has its own dashboard.
    pool = agent.engine if isinstance(agent.engine, WorkerPool) else None
    return AgentFigures(
        agent_id=agent.agent_id,
        endpoint=agent.config.name,
        endpoint_id=agent.endpoint_id or "",
        connected=agent.state is AgentState.CONNECTED,
        held=agent.held_by_state(),
        finished=agent.finished_by_state(),
        unacked=agent.unacked_reports,
        workers=pool.workers_by_state() if pool is not None else {},
        worker_restarts=pool.worker_restarts if pool is not None else 0,
    )


class AgentCollector:
    """A prometheus_client collector of one agent's figures."""

    def __init__(self, agent: Agent, loop: asyncio.AbstractEventLoop) -> None:
        self._agent = agent
        self._loop = loop

    def collect(self) -> Iterator[Metric]:
        # Called on the HTTP server's thread.
        f = on_loop(self._loop, lambda: snapshot(self._agent))
        yield InfoMetricFamily(
            "heartline_agent",
            "This agent process and the endpoint it serves.",
            value={"agent_id": f.agent_id, "endpoint": f.endpoint, "endpoint_id": f.endpoint_id},
        )
        yield GaugeMetricFamily(
            "heartline_agent_connected",
            "1 while the agent's stream to the server is up (welcomed), else 0.",
            value=int(f.connected),
        )
        held = GaugeMetricFamily(
            "heartline_agent_tasks",
            "Tasks held by the agent, by the last state it reported for them.",
            labels=["state"],
        )
        for state, n in f.held.items():
            held.add_metric([state.value], n)
        yield held
        finished = CounterMetricFamily(
            "heartline_agent_tasks_finished",
            "Terminal reports the agent made, by outcome.",
            labels=["state"],
        )
        for state, n in f.finished.items():
            finished.add_metric([state.value], n)
        yield finished
        yield GaugeMetricFamily(
            "heartline_agent_outbox_reports",
            "Terminal reports kept (and resent on reconnect) until the server acks them.",
            value=f.unacked,
        )
        workers = GaugeMetricFamily(
            "heartline_agent_workers", "Worker processes, by state.", labels=["state"]
        )
        for worker_state, n in f.workers.items():
            workers.add_metric([worker_state.value], n)
        yield workers
        yield CounterMetricFamily(
            "heartline_agent_worker_restarts",
            "Worker processes started to replace one that ended (died, cancelled, walltime).",
            value=f.worker_restarts,
        )
