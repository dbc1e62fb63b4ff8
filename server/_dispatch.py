"""Where queued tasks go: the endpoint queues, the connected agents, and their credit.

:class:`Dispatcher` owns both, and is the only thing that changes them; the scheduler
calls it when a transition row says a task enters or leaves a queue or an agent, and
asks it which agent takes the next task. It knows nothing of states or attempts: that is
the transition table's business (``server/_lifecycle.py``).
"""

from __future__ import annotations

import heapq
from collections.abc import Collection, Iterable, Iterator
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
    hostname: str = ""
    version: str = ""
    stream_id: str = ""
    python: str = ""
    """The Python its workers run, "major.minor"; empty: unknown (an older agent), taken
    as able to run anything."""
    cloudpickle: str = ""
    in_flight: set[str] = field(default_factory=set)
    """Tasks on the agent (dispatched and not settled); each takes one credit."""

    @property
    def credit(self) -> int:
        """How many more tasks the agent may be given (may be negative after a reclaim)."""
        return self.capacity + self.prefetch - len(self.in_flight)


class _Run:
    """Queued tasks in the order they were pushed, each one's (priority, submit_time) no
    smaller than the one before: so the first live one is the run's least."""

    __slots__ = ("pos", "seq", "tasks")

    def __init__(self, seq: int, task: TaskRecord) -> None:
        self.seq = seq
        """Orders runs whose heads tie: a run made later holds tasks pushed later."""
        self.tasks: list[TaskRecord | None] = [task]
        self.pos = 0
        """Where the run's next task is; those before it were popped (set to None)."""


class EndpointQueue:
    """WAITING_FOR_EP tasks of one endpoint: highest priority first, then oldest, then in
    the order they were queued.

    The queue is a heap of *runs*, keyed by their first task: a task whose (priority,
    submit_time) is no smaller than the newest run's last one is appended to that run
    (a submission's tasks, and tasks submitted one after another, share one run), any
    other task starts a run of its own (a retry keeps its old submit_time). So a queued
    task costs a list slot and a ``live`` entry, not a heap entry of its own. Ties are
    broken by queueing order, as before: a run made later holds tasks pushed later.

    Lazy deletion: a task's entry in a run is live only while ``live[task_id]`` is that
    run. A task taken out of the queue closes the newest run, so if it comes back it
    goes to a new run, behind everything queued meanwhile, never to its old place. A
    dead entry keeps its record until its run drains or the runs are rebuilt (when dead
    entries outnumber live ones by 1,024).
    """

    __slots__ = ("_entries", "_tail", "deferred", "heap", "live", "needs", "parked", "seq")

    def __init__(self) -> None:
        self.heap: list[tuple[int, float, int, _Run]] = []
        self.live: dict[str, _Run] = {}
        self.seq = 0
        self.needs: dict[str, str] = {}
        """Queued tasks (in the runs, parked or deferred) whose function runs only on one
        Python (bytecode only): task id -> "major.minor". Empty, dispatch reads no task's
        Python at all (the common case)."""
        self.parked: dict[str, TaskRecord] = {}
        """Tasks no connected agent of the endpoint can run (none runs their Python):
        out of the runs until an agent that can connects (Dispatcher.connect)."""
        self.deferred: dict[str, TaskRecord] = {}
        """Tasks an agent can run but none with free credit could: back in the runs at
        the start of the next dispatch of the endpoint."""
        self._tail: _Run | None = None
        """The newest run, while tasks may still be appended to it."""
        self._entries = 0
        """Entries in the runs, live or dead."""

    def push(self, task: TaskRecord) -> None:
        if task.python:
            self.needs[task.task_id] = task.python
        tail = self._tail
        if tail is not None:
            last = tail.tasks[-1]
            assert last is not None  # a run's last entry is popped only as it drains
            if task.priority > last.priority or (
                task.priority == last.priority and task.submit_time >= last.submit_time
            ):
                tail.tasks.append(task)
                self.live[task.task_id] = tail
                self._entries += 1
                return
        self.seq += 1
        run = self._tail = _Run(self.seq, task)
        self.live[task.task_id] = run
        self._entries += 1
        heapq.heappush(self.heap, (task.priority, task.submit_time, run.seq, run))

    def discard(self, task_id: str) -> None:
        if (
            self.needs
            and self.needs.pop(task_id, None) is not None
            and (self.parked.pop(task_id, None) or self.deferred.pop(task_id, None))
        ):
            return  # parked or deferred: not in the runs
        if self.live.pop(task_id, None) is None:
            return
        self._tail = None
        if self._entries > 2 * len(self.live) + 1024:
            # Mostly dead entries (cancels, holds on an endpoint nobody serves): rebuild,
            # so the runs do not grow without bound.
            self._rebuild()

    def _rebuild(self) -> None:
        live = self.live
        heap = []
        entries = 0
        for *_, run in self.heap:
            kept = [t for t in run.tasks[run.pos :] if t is not None and live.get(t.task_id) is run]
            if kept:
                run.tasks, run.pos = kept, 0
                heap.append((kept[0].priority, kept[0].submit_time, run.seq, run))
                entries += len(kept)
        heapq.heapify(heap)
        self.heap, self._entries, self._tail = heap, entries, None

    def pop(self) -> str | None:
        task = self.pop_task()
        return None if task is None else task.task_id

    def requeue(self, tasks: list[TaskRecord]) -> None:
        """Put parked or deferred tasks back in the runs, in dispatch order."""
        tasks.sort(key=lambda t: (t.priority, t.submit_time))
        for task in tasks:
            self.push(task)

    def pop_task(self) -> TaskRecord | None:
        heap, live = self.heap, self.live
        while heap:
            head = heap[0]
            run = head[3]
            tasks = run.tasks
            i = run.pos
            task = tasks[i]
            assert task is not None
            tasks[i] = None  # the record may be evicted soon: hold it no longer
            i += 1
            self._entries -= 1
            if i == len(tasks):
                heapq.heappop(heap)
                if run is self._tail:
                    self._tail = None
            else:
                if i >= 1024 and 2 * i >= len(tasks):
                    # The popped front of a long-lived run (tasks keep joining while
                    # others leave): drop it, or the run would only grow.
                    del tasks[:i]
                    i = 0
                run.pos = i
                after = tasks[i]
                assert after is not None
                if after.priority != head[0] or after.submit_time != head[1]:
                    heapq.heapreplace(heap, (after.priority, after.submit_time, run.seq, run))
            if live.get(task.task_id) is run:
                del live[task.task_id]
                return task
        return None

    def __contains__(self, task_id: str) -> bool:
        return task_id in self.live or task_id in self.parked or task_id in self.deferred

    def __len__(self) -> int:
        return len(self.live) + len(self.parked) + len(self.deferred)


class Dispatcher:
    """Owns the endpoint queues and the connected agents."""

    __slots__ = ("_by_endpoint", "agents", "queues")

    def __init__(self) -> None:
        self.agents: dict[str, AgentState] = {}
        """Connected agents by id (read-only outside this class)."""
        self._by_endpoint: dict[str, dict[str, AgentState]] = {}
        """The same agents by endpoint id, then agent id; an endpoint with none has no
        entry. What an endpoint's dispatch, listing and waiting reasons read: they cost
        that endpoint's agents, not every agent of the server."""
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
        return queue is not None and task.task_id in queue

    def queued(self, endpoint_id: str) -> int:
        queue = self.queues.get(endpoint_id)
        return len(queue) if queue else 0

    # ---------------------------------------------------------------------- agents

    def connect(self, agent: AgentState) -> None:
        self.agents[agent.agent_id] = agent
        self._by_endpoint.setdefault(agent.endpoint_id, {})[agent.agent_id] = agent
        queue = self.queues.get(agent.endpoint_id)
        if queue is not None and queue.parked:
            # Tasks that waited for an agent on this Python: they may go now.
            python = agent.python
            back = [t for t in queue.parked.values() if not python or t.python == python]
            for task in back:
                del queue.parked[task.task_id]
            queue.requeue(back)

    def pythons(self, endpoint_id: str) -> set[str]:
        """The Pythons the endpoint's connected agents run ("" for one that did not say)."""
        return {a.python for a in self.agents_of(endpoint_id)}

    def unable(self, task: TaskRecord) -> str:
        """Why no connected agent of the task's endpoint can run it, or ""."""
        need = task.python
        if not need:
            return ""
        pythons = self.pythons(task.endpoint_id)
        if not pythons or need in pythons or "" in pythons:
            return ""
        return (
            f"no agent runs Python {need} (this function's bytecode); "
            f"agents: {', '.join(sorted(pythons))}"
        )

    def disconnect(self, agent_id: str) -> list[str]:
        """Forget the agent; return the tasks it held, sorted, for the caller to re-queue
        (each one's ``agent_id`` is undone by unbind() as it leaves the agent's state)."""
        agent = self.agents.pop(agent_id)
        of_endpoint = self._by_endpoint[agent.endpoint_id]
        del of_endpoint[agent_id]
        if not of_endpoint:
            del self._by_endpoint[agent.endpoint_id]
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

    def agents_of(self, endpoint_id: str) -> Collection[AgentState]:
        """The endpoint's connected agents (a view: read it before the next change)."""
        agents = self._by_endpoint.get(endpoint_id)
        return agents.values() if agents is not None else ()

    def online(self) -> Collection[str]:
        """The endpoints with at least one agent connected."""
        return self._by_endpoint.keys()

    def check_index(self, agents: Iterable[AgentState] | None = None) -> None:
        """Assert the endpoint index holds these agents (None: exactly every agent)."""
        if agents is None:
            indexed = {a: e for e, of in self._by_endpoint.items() for a in of}
            assert indexed == {a.agent_id: a.endpoint_id for a in self.agents.values()}, (
                "the agents by endpoint differ from the agents"
            )
            assert all(self._by_endpoint.values()), "an endpoint indexed with no agent"
            agents = self.agents.values()
        for agent in agents:
            assert self._by_endpoint[agent.endpoint_id][agent.agent_id] is agent, (
                f"agent {agent.agent_id} not indexed under its endpoint"
            )

    # -------------------------------------------------------------------- choosing

    def assignments(self, endpoint_id: str) -> Iterator[tuple[str, AgentState]]:
        """Pop queued tasks of the endpoint, each with the agent that should take it.

        The caller binds the task (or settles it) before asking for the next one: the
        credit is read again after each.
        """
        queue = self.queues.get(endpoint_id)
        if not queue:
            return
        agents = [a for a in self.agents_of(endpoint_id) if a.credit > 0]
        if queue.needs:
            # Some task's function runs only on one Python: match each to an agent on it.
            yield from self._matching(queue, endpoint_id, agents)
            return
        if len(agents) == 1:
            # One agent (the common case): nothing to spread, only its credit to read.
            agent = agents[0]
            pop = queue.pop_task
            while agent.credit > 0:
                task = pop()
                if task is None:
                    return
                yield task.task_id, agent
            return
        while agents and queue:
            # Spread by free credit: the agent with the most free slots takes the next task.
            agent = max(agents, key=lambda a: a.credit)
            task_id = queue.pop()
            if task_id is None:
                break
            yield task_id, agent
            if agent.credit <= 0:
                agents.remove(agent)

    def _matching(
        self, queue: EndpointQueue, endpoint_id: str, agents: list[AgentState]
    ) -> Iterator[tuple[str, AgentState]]:
        """assignments() when some queued task runs only on one Python.

        A task goes to the agent with the most free credit among those that can run it.
        One that no connected agent can run is parked (until one connects); one whose
        agents are all busy is deferred (back in the queue at the next dispatch). At
        most ``_DEFERRED`` are deferred per dispatch, so a long queue of tasks for a busy
        agent costs a bounded scan, not the whole queue each time.
        """
        if queue.deferred:
            back = list(queue.deferred.values())
            queue.deferred.clear()
            queue.requeue(back)
        pythons = self.pythons(endpoint_id)
        anything = "" in pythons  # an agent of unknown Python is sent anything
        needs = queue.needs
        while agents:
            task = queue.pop_task()
            if task is None:
                return
            need = task.python
            if not need:
                agent = max(agents, key=lambda a: a.credit)
            else:
                able = [a for a in agents if a.python == need or not a.python]
                if not able:
                    if need in pythons or anything:
                        queue.deferred[task.task_id] = task
                        if len(queue.deferred) >= _DEFERRED:
                            return
                    else:
                        queue.parked[task.task_id] = task
                    continue
                agent = max(able, key=lambda a: a.credit)
                del needs[task.task_id]
            yield task.task_id, agent
            if agent.credit <= 0:
                agents.remove(agent)


_DEFERRED = 1024
