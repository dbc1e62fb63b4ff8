"""Where queued tasks go: the endpoint queues, the connected agents, and their credit.

:class:`Dispatcher` owns both, and is the only thing that changes them; the scheduler
calls it when a transition row says a task enters or leaves a queue or an agent, and
asks it which agent takes the next task. It knows nothing of states or attempts: that is
the transition table's business (``server/_lifecycle.py``).
"""

from __future__ import annotations

import heapq
from collections.abc import Iterator
from dataclasses import dataclass, field

from heartline.server._model import TaskRecord

__all__ = ["AgentState", "Dispatcher", "EndpointQueue"]


@dataclass(slots=True)
class AgentState:
    """One connected agent as the scheduler sees it."""

    agent_id: str
    endpoint_id: str
    capacity: int
    prefetch: int
    last_seen: float
    hostname: str = ""
    version: str = ""
    stream_id: str = ""
    in_flight: set[str] = field(default_factory=set)
    """Tasks on the agent (dispatched and not settled); each takes one credit."""

    @property
    def credit(self) -> int:
        """How many more tasks the agent may be given (may be negative after a reclaim)."""
        return self.capacity + self.prefetch - len(self.in_flight)


class EndpointQueue:
    """WAITING_FOR_EP tasks of one endpoint: highest priority first, then oldest.

    Lazy deletion: a heap entry is live only while ``live[task_id]`` holds its seq.
    """

    __slots__ = ("heap", "live", "seq")

    def __init__(self) -> None:
        self.heap: list[tuple[int, float, int, str]] = []
        self.live: dict[str, int] = {}
        self.seq = 0

    def push(self, task: TaskRecord) -> None:
        self.seq += 1
        self.live[task.task_id] = self.seq
        heapq.heappush(self.heap, (task.priority, task.submit_time, self.seq, task.task_id))

    def discard(self, task_id: str) -> None:
        self.live.pop(task_id, None)
        if len(self.heap) > 2 * len(self.live) + 1024:
            # Mostly dead entries (cancels, holds on an endpoint nobody serves): rebuild,
            # so the heap does not grow without bound.
            self.heap = [e for e in self.heap if self.live.get(e[3]) == e[2]]
            heapq.heapify(self.heap)

    def pop(self) -> str | None:
        heap, live = self.heap, self.live
        while heap:
            _, _, seq, task_id = heapq.heappop(heap)
            if live.get(task_id) == seq:
                del live[task_id]
                return task_id
        return None

    def __contains__(self, task_id: str) -> bool:
        return task_id in self.live

    def __len__(self) -> int:
        return len(self.live)


class Dispatcher:
    """Owns the endpoint queues and the connected agents."""

    __slots__ = ("agents", "queues")

    def __init__(self) -> None:
        self.agents: dict[str, AgentState] = {}
        """Connected agents by id (read-only outside this class)."""
        self.queues: dict[str, EndpointQueue] = {}
        """Queues by endpoint id (read-only outside this class)."""

    # ---------------------------------------------------------------------- queues

    def enqueue(self, task: TaskRecord) -> None:
        queue = self.queues.get(task.endpoint_id)
        if queue is None:
            queue = self._queue(task.endpoint_id)
        queue.push(task)

    def dequeue(self, task: TaskRecord) -> None:
        """Take the task out of its queue (nothing if it is not there)."""
        # Made if missing, as before the split: the metrics list every endpoint that
        # ever had a queued or waiting task among the known ones.
        queue = self.queues.get(task.endpoint_id)
        if queue is None:
            queue = self._queue(task.endpoint_id)
        queue.discard(task.task_id)

    def _queue(self, endpoint_id: str) -> EndpointQueue:
        queue = self.queues.get(endpoint_id)
        if queue is None:
            queue = self.queues[endpoint_id] = EndpointQueue()
        return queue

    def is_queued(self, task: TaskRecord) -> bool:
        queue = self.queues.get(task.endpoint_id)
        return queue is not None and task.task_id in queue.live

    def queued(self, endpoint_id: str) -> int:
        queue = self.queues.get(endpoint_id)
        return len(queue) if queue else 0

    # ---------------------------------------------------------------------- agents

    def connect(self, agent: AgentState) -> None:
        self.agents[agent.agent_id] = agent

    def disconnect(self, agent_id: str) -> list[str]:
        """Forget the agent; return the tasks it held, sorted, for the caller to re-queue
        (each one's ``agent_id`` is undone by unbind() as it leaves the agent's state)."""
        agent = self.agents.pop(agent_id)
        held = sorted(agent.in_flight)
        agent.in_flight.clear()
        return held

    def bind(self, task: TaskRecord, agent: AgentState) -> None:
        task.agent_id = agent.agent_id
        agent.in_flight.add(task.task_id)

    def unbind(self, task: TaskRecord) -> AgentState | None:
        """Free the task's slot on its agent; return that agent if it is still connected."""
        agent = self.agents.get(task.agent_id or "")
        if agent is not None:
            agent.in_flight.discard(task.task_id)
        task.agent_id = None
        return agent

    def agents_of(self, endpoint_id: str) -> list[AgentState]:
        return [a for a in self.agents.values() if a.endpoint_id == endpoint_id]

    # -------------------------------------------------------------------- choosing

    def assignments(self, endpoint_id: str) -> Iterator[tuple[str, AgentState]]:
        """Pop queued tasks of the endpoint, each with the agent that should take it.

        The caller binds the task (or settles it) before asking for the next one: the
        credit is read again after each.
        """
        queue = self.queues.get(endpoint_id)
        if not queue:
            return
        agents = [a for a in self.agents.values() if a.endpoint_id == endpoint_id and a.credit > 0]
        while agents and queue:
            # Spread by free credit: the agent with the most free slots takes the next task.
            agent = max(agents, key=lambda a: a.credit)
            task_id = queue.pop()
            if task_id is None:
                break
            yield task_id, agent
            if agent.credit <= 0:
                agents.remove(agent)
