"""The server's I/O shell around the scheduler: it feeds events in and carries
instructions out (store writes, agent stream sends, watcher pushes).

Only :meth:`ServerCore.feed` calls the scheduler, always on the server's event loop.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import math
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence

import grpc

from heartline import _defaults
from heartline._defaults import SERVER_FUNCTION_CACHE, STREAM_SENT_FUNCTIONS
from heartline._forms import TRAILER_MAX
from heartline._forms import read as read_serialization
from heartline._lru import LruCache
from heartline._pacer import Pacer
from heartline._states import PENDING_STATES, TaskState
from heartline.server._auth import Tokens
from heartline.server._config import ServerConfig
from heartline.server._convert import change_to_proto, group_change_to_proto
from heartline.server._events import (
    AgentLost,
    DispatchItem,
    Event,
    GroupChanged,
    Instruction,
    NotifyWatchers,
    Persist,
    SendAcks,
    SendCancels,
    SendDispatches,
    TaskChanged,
    Tick,
)
from heartline.server._limits import FdWatch, fd_soft_limit, open_fds
from heartline.server._memory import Freezer, collector_paused, trim
from heartline.server._model import EndpointRow, FunctionRow, WriteBatch
from heartline.server._requests import RequestMemo
from heartline.server._rpc import Abort
from heartline.server._scheduler import Scheduler, SchedulerConfig
from heartline.server._store import Store, StoreClosedError
from heartline.v1 import endpoint_service_pb2 as ep_pb2
from heartline.v1 import task_pb2

log = logging.getLogger("heartline.server")

_FD_CHECK_SECONDS = 10.0
"""How often the timers count the open descriptors against the limit."""


def _mib(n: int) -> str:
    return f"{n / (1024 * 1024):.1f} MiB"


class FunctionCache:
    """Pickled functions by id: a bounded LRU in memory, then the store.

    Everything this cache holds is also in the store: the store's purge spares the ids
    of :meth:`held` (see ``SqliteStore.purge_results``), so a function the server vouches
    for from memory (a submit's "is it registered?") is never one the store dropped.
    """

    def __init__(self, store: Store, bounds: tuple[int, int] = SERVER_FUNCTION_CACHE) -> None:
        self._store = store
        self._payloads: LruCache[str, bytes] = LruCache(*bounds)
        # Ids with a store read in flight: they land in memory after the read answers.
        self._loading: dict[str, int] = {}

    def remember(self, function_id: str, payload: bytes) -> None:
        self._payloads.put(function_id, payload, len(payload))

    async def get(self, function_id: str) -> bytes | None:
        payload = self._payloads.get(function_id)
        if payload is None:
            self._loading[function_id] = self._loading.get(function_id, 0) + 1
            try:
                row = await self._store.get_function(function_id)
            finally:
                left = self._loading.pop(function_id) - 1
                if left:
                    self._loading[function_id] = left
            if row is not None:
                payload = row.payload
                self._payloads.put(function_id, payload, len(payload))
        return payload

    def has(self, function_id: str) -> bool:
        """The function is in memory (so in the store too)."""
        return function_id in self._payloads

    def held(self) -> set[str]:
        """Ids in memory or on their way there: what a store purge must keep."""
        return {*self._payloads.keys(), *self._loading}


class AgentConnection:
    """The downstream half of one agent's Connect stream: an outbox and its writer."""

    def __init__(
        self,
        agent_id: str,
        endpoint_id: str,
        functions: FunctionCache,
        read_args: Callable[[Sequence[str]], Awaitable[dict[str, bytes]]],
    ) -> None:
        self.agent_id = agent_id
        self.endpoint_id = endpoint_id
        self.stream_id = uuid.uuid4().hex
        self._functions = functions
        self._read_args = read_args
        self._outbox: list[tuple[str, tuple]] = []
        # Dispatches and cancels are urgent; acks only free the agent's memory, so they
        # are lazy (see heartline/_pacer.py).
        self._pacer = Pacer()
        # Function ids this stream counts on the agent to still hold (values unused).
        #
        # Invariant: every id in this set is in the agent's function cache, so a
        # dispatch that leaves the bytes out always finds them there. Why:
        # (1) this LRU sees the accesses the agent's LRU sees, in the same order: one
        #     per dispatch item, in stream order (the agent uses its cache once for EVERY
        #     item it reads, duplicates it skips included: endpoint/_agent.py
        #     _on_dispatch), and each access here puts the id if it was not here;
        # (2) an id weighs the same on both sides (its payload's length);
        # (3) this set's bounds are no larger than the agent's (heartline/_defaults.py).
        # Take an id x in this set, last used at access t. Every id used after t is
        # still here (an LRU drops older ids first, and x is still here), so together
        # with x they fit this set's bounds, hence the agent's. An LRU drops x only when
        # x and the ids it holds that were used after t overflow its bounds; the agent's
        # such ids are among ours (same accesses since t), so the agent never drops x
        # (and has x since t: the bytes went at t, or it had x then, by the same
        # argument). The agent may hold more (ids from earlier streams): harmless.
        # A new stream starts with an empty set, and _dispatch empties it when it cannot
        # mirror an access (a payload the server lacks): the argument only looks at
        # accesses after t, so it holds again from there. The pool and its workers keep
        # the same rule (endpoint/_workers.py _Worker.functions).
        # tests/test_caches.py drives both pairs far past their bounds.
        self._sent_functions: LruCache[str, None] = LruCache(*STREAM_SENT_FUNCTIONS)
        self.close_reason: str | None = None
        self.last_heard = time.monotonic()
        """When the agent last sent a message on this stream (``time.monotonic()``).

        A heartbeat only moves this (no scheduler step, no write): the server's timer
        reads it, and only an agent silent past :attr:`heartbeat_timeout` becomes an
        event (:meth:`ServerCore.lose_silent_agents`)."""
        self.heartbeat_interval = 0.0
        """The interval the agent was asked to beat at (the welcome's, or a later
        Settings message's); see server/_liveness.py."""
        self.heartbeat_timeout = math.inf
        """The silence that loses this agent (none before its welcome)."""

    def ask_heartbeats(self, interval: float, timeout: float, *, tell: bool = True) -> None:
        """Ask the agent to beat every ``interval`` seconds, judging it by ``timeout``
        from now on; ``tell=False`` when the welcome says it."""
        self.heartbeat_interval = interval
        self.heartbeat_timeout = timeout
        if tell:
            self.push("settings", (interval,))

    def heard_at(self) -> float:
        """:attr:`last_heard` as wall-clock time (``time.time()``)."""
        return time.time() - (time.monotonic() - self.last_heard)

    def push(self, kind: str, items: tuple) -> None:
        self._outbox.append((kind, items))
        if kind == "ack" or kind == "settings":
            self._pacer.lazy()
        else:
            self._pacer.urgent()

    def close(self, reason: str) -> None:
        self.close_reason = reason
        self._pacer.urgent()

    async def run_writer(self, write) -> None:
        """Send everything pushed, coalescing consecutive items of one kind per message."""
        while True:
            await self._pacer.wait()
            if self.close_reason is not None:
                return
            outbox, self._outbox = self._outbox, []
            for message in await self._messages(outbox):
                await write(message)

    async def _messages(self, outbox: list[tuple[str, tuple]]) -> list[ep_pb2.ConnectResponse]:
        runs: list[tuple[str, list]] = []
        for kind, items in outbox:
            if runs and runs[-1][0] == kind:
                runs[-1][1].extend(items)
            else:
                runs.append((kind, list(items)))
        messages = []
        for kind, items in runs:
            if kind == "dispatch":
                stored = [i.task_id for i in items if i.args is None]
                args = await self._read_args(stored) if stored else {}
                messages.append(
                    ep_pb2.ConnectResponse(
                        dispatch=ep_pb2.DispatchBatch(
                            dispatches=[await self._dispatch(i, args) for i in items]
                        )
                    )
                )
            elif kind == "cancel":
                messages.append(
                    ep_pb2.ConnectResponse(
                        cancel=ep_pb2.CancelBatch(task_ids=list(dict.fromkeys(items)))
                    )
                )
            elif kind == "settings":  # the last one holds
                settings = ep_pb2.Settings(heartbeat_interval_seconds=items[-1])
                messages.append(ep_pb2.ConnectResponse(settings=settings))
            else:
                acks = [ep_pb2.Ack(task_id=tid, attempt=attempt) for tid, attempt in items]
                messages.append(ep_pb2.ConnectResponse(ack=ep_pb2.AckBatch(acks=acks)))
        return messages

    async def _dispatch(self, item: DispatchItem, stored: dict[str, bytes]) -> ep_pb2.Dispatch:
        """The item as sent; ``stored``: the args read of items without them."""
        # Called once per dispatch item, in the order the agent will read them.
        args = item.args
        if args is None:
            args = stored.get(item.task_id)
            if args is None:  # never expected: a pending task's args stay stored
                log.error("event=args-missing task_id=%s", item.task_id)
                args = b""  # the worker reports it as a task that cannot load its args
        function = b""
        if not self._sent_functions.touch(item.function_id):
            payload = await self._functions.get(item.function_id)
            if payload is None:
                # The agent still touches this id (it may hold it from an earlier
                # stream), an access this set cannot mirror without the size: start
                # over as a new stream would. The agent refuses the task if it lacks it.
                log.warning(
                    "event=function-missing function_id=%s task_id=%s",
                    item.function_id,
                    item.task_id,
                )
                self._sent_functions.clear()
            else:
                function = payload
                self._sent_functions.put(item.function_id, None, len(payload))
        return ep_pb2.Dispatch(
            task_id=item.task_id,
            attempt=item.attempt,
            function_id=item.function_id,
            function=function,
            args=args,
            walltime_seconds=item.walltime,
            inputs=item.inputs,
        )


class Watcher:
    """One WatchTasks stream: what it wants, and the updates not yet sent."""

    def __init__(
        self,
        task_ids: Iterable[str],
        session_id: str,
        settled_only: bool,
        include_results: bool,
        group_ids: Iterable[str] = (),
    ) -> None:
        self.task_ids = frozenset(task_ids)
        self.session_id = session_id
        self.group_ids = frozenset(group_ids)
        """Groups whose tasks' transitions and own status changes it gets."""
        self.settled_only = settled_only
        """Only transitions that settle a task (a group's status changes all come)."""
        self.include_results = include_results
        self.pending: list[task_pb2.TaskUpdate] = []
        self.pending_groups: list[task_pb2.GroupUpdate] = []
        self.wake = asyncio.Event()

    def take(self) -> tuple[list[task_pb2.TaskUpdate], list[task_pb2.GroupUpdate]]:
        """The task updates and group updates not yet sent, each oldest first."""
        self.wake.clear()
        out, self.pending = self.pending, []
        groups, self.pending_groups = self.pending_groups, []
        return out, groups


class WatchRegistry:
    """The open watches, indexed by what they watch: sessions, tasks and groups."""

    def __init__(self) -> None:
        self._by_session: dict[str, set[Watcher]] = {}
        self._by_task: dict[str, set[Watcher]] = {}
        self._by_group: dict[str, set[Watcher]] = {}

    def _keys(self, watcher: Watcher) -> list[tuple[str, dict[str, set[Watcher]]]]:
        keys = [(tid, self._by_task) for tid in watcher.task_ids]
        keys += [(gid, self._by_group) for gid in watcher.group_ids]
        if watcher.session_id:
            keys.append((watcher.session_id, self._by_session))
        return keys

    def add(self, watcher: Watcher) -> None:
        for key, index in self._keys(watcher):
            index.setdefault(key, set()).add(watcher)

    def remove(self, watcher: Watcher) -> None:
        for key, index in self._keys(watcher):
            watchers = index.get(key)
            if watchers is not None:
                watchers.discard(watcher)
                if not watchers:
                    del index[key]

    def _targets(self, change: TaskChanged) -> set[Watcher] | None:
        """The watchers of a transition: of its session, its task or its group."""
        found: set[Watcher] | None = None
        for key, index in (
            (change.session_id, self._by_session),
            (change.task_id, self._by_task),
            (change.group_id, self._by_group),
        ):
            if key:
                watchers = index.get(key)
                if watchers:
                    # Unions only when a transition has watchers two ways (rare).
                    found = watchers if found is None else found | watchers
        return found

    def publish(self, changes: Iterable[TaskChanged], groups: Iterable[GroupChanged] = ()) -> None:
        """Hand transitions and group changes to the watchers that want them."""
        if not self._by_session and not self._by_task and not self._by_group:
            return
        for change in changes:
            targets = self._targets(change)
            if not targets:
                continue
            settled = change.state not in PENDING_STATES
            with_result = without_result = None
            for watcher in targets:
                if watcher.settled_only and not settled:
                    continue
                if watcher.include_results:
                    with_result = with_result or change_to_proto(change, True)
                    watcher.pending.append(with_result)
                else:
                    without_result = without_result or change_to_proto(change, False)
                    watcher.pending.append(without_result)
                watcher.wake.set()
        for group in groups:
            watchers = self._by_group.get(group.group_id)
            if watchers:
                update = group_change_to_proto(group)
                for watcher in watchers:
                    watcher.pending_groups.append(update)
                    watcher.wake.set()


class ServerCore:
    """Scheduler + store + agent connections + watchers, on one event loop."""

    def __init__(self, config: ServerConfig, store: Store) -> None:
        self.config = config
        self.store = store
        self.scheduler = Scheduler(
            SchedulerConfig(
                heartbeat_timeout=config.effective_heartbeat_timeout,
                errored_retention=config.errored_retention,
                max_payload=config.max_payload,
                validate=config.validate,
            )
        )
        self.functions = FunctionCache(store)
        self.function_bytes: dict[str, int] = {}
        """Bytes of stored functions by owner (config.max_function_bytes bounds each)."""
        self._registering: set[str] = set()
        self.connections: dict[str, AgentConnection] = {}
        self._heartbeats = config.heartbeats
        self._freezer = Freezer()
        self._stretched_to = 0.0
        """No stream was asked for a shorter heartbeat interval than this."""
        self.watchers = WatchRegistry()
        self.requests = RequestMemo(store)
        self.endpoints: dict[str, EndpointRow] = {}
        self._endpoints_named: dict[str, list[EndpointRow]] = {}
        """The same endpoints by name (one per owner): a submit by name looks at those
        of its name, not at every endpoint."""
        self._registration = asyncio.Lock()
        """Held while an endpoint is looked up by name and, if new, registered."""
        self.tokens = Tokens(store)
        """Users and live tokens (server/_auth.py): AdminService changes them."""
        self.shares: dict[str, set[str]] = {}
        """endpoint_id -> the users besides its owner who may use it (kept in step with
        the store by AdminService.ShareEndpoint)."""
        self.allowed_functions: dict[str, frozenset[str]] = {}
        """endpoint_id -> its function allow-list, as its agents' last hello gave it (and
        kept in the store, so it holds across restarts before they reconnect); an
        endpoint without one runs every function."""
        self.watches_by_user: dict[str, int] = {}
        self._background: set[asyncio.Task[None]] = set()
        """Open WatchTasks streams by user (config.max_watches_per_user bounds each)."""
        self.start_time = time.time()
        self._later: list[Event] = []
        # The newest store write: writes commit in order, so once it has committed every
        # earlier one has too (a barrier for steps that write nothing themselves).
        self._last_write: asyncio.Future[None] | None = None
        self.failed = asyncio.Event()
        """Set when a store write failed: memory is ahead of the store, so the server
        must stop; a restart rebuilds everything from the store (fail-stop)."""

    async def open(self) -> None:
        """Load endpoints and unsettled tasks from the store; resume where it stopped."""
        for row in await self.store.list_endpoints():
            self._remember_endpoint(row)
        await self.tokens.load()
        self.function_bytes = await self.store.function_bytes_by_owner()
        for endpoint_id, user in await self.store.load_shares():
            self.shares.setdefault(endpoint_id, set()).add(user)
        self.allowed_functions = await self.store.load_allowed_functions()
        with collector_paused():
            await self._restore()

    async def _restore(self) -> None:
        rows = await self.store.load_unsettled()
        # Metrics count tasks by state from here on; only they need the settled ones.
        counts = await self.store.count_by_state() if self.config.metrics else None
        groups = await self.store.load_pending_groups()
        # The results the waiting tasks take from tasks that settled before the restart.
        inputs = {i for row in rows for i in row.inputs}
        if inputs:
            inputs.difference_update(row.task_id for row in rows)
        results = await self.store.load_results(sorted(inputs)) if inputs else {}
        # The Python each bytecode-only function of these tasks needs (heartline/_forms.py):
        # from the payloads' trailers, in one read, not each whole payload one at a time.
        tails = await self.store.function_tails(
            list({row.function_id for row in rows}), TRAILER_MAX
        )
        requirements: dict[str, str] = {}
        for fid, tail in tails.items():
            made = read_serialization(tail)
            if made is not None and made.requires:
                requirements[fid] = made.requires
        persisted = self.execute(
            self.scheduler.restore(
                rows,
                time.time(),
                counts,
                groups=groups,
                results=results,
                requirements=requirements,
            )
        )
        if persisted is not None:
            await persisted
        if rows:
            log.info("restored %d unsettled tasks, %d groups", len(rows), len(groups))
            # The restore's peak (the rows read, SQLite's sort and cache) is free now but
            # stays in the process unless handed back (measured, 200,000 tasks restored:
            # 120 MiB of 290).
            del rows
            await self.store.release_memory()
            trim()

    def feed(self, *events: Event) -> asyncio.Future[None] | None:
        """Hand events to the scheduler and carry out its instructions.

        Returns the store future of the step's writes (None if nothing was written);
        a caller that must answer only once its change is durable awaits it.
        """
        return self.execute(self.scheduler.handle(*events))

    def feed_soon(self, event: Event) -> None:
        """Queue an event from an agent stream; all such events of one loop iteration
        go to the scheduler as one step, so credit freed by many reports is spent in
        one dispatch batch and one store write. Their order is kept."""
        if not self._later:
            asyncio.get_running_loop().call_soon(self._feed_later)
        self._later.append(event)

    def _feed_later(self) -> None:
        events, self._later = self._later, []
        self.feed(*events)

    def execute(self, instructions: list[Instruction]) -> asyncio.Future[None] | None:
        persisted: asyncio.Future[None] | None = None
        after_commit: list[Instruction] = []
        for ins in instructions:
            if isinstance(ins, Persist):
                persisted = self._write(ins.batch)
            elif isinstance(ins, SendDispatches):
                self._push(ins.agent_id, "dispatch", ins.items)
            elif isinstance(ins, SendCancels):
                self._push(ins.agent_id, "cancel", ins.task_ids)
            else:
                after_commit.append(ins)
        if after_commit:
            # Acks and announcements wait for this step's commit, or, if it wrote
            # nothing, for the newest write before it (e.g. the one that settled the
            # task a duplicate report is about).
            barrier = persisted or self._last_write
            if barrier is None or (
                barrier.done() and not barrier.cancelled() and barrier.exception() is None
            ):
                self._after_commit(after_commit)
            else:
                barrier.add_done_callback(lambda f: self._committed(f, after_commit))
        return persisted

    def _write(self, batch: WriteBatch) -> asyncio.Future[None]:
        try:
            future = self.store.write(batch)
        except StoreClosedError as exc:
            # Shutting down: a late event's write has nowhere to go, and needs nowhere
            # (a restart rebuilds from the store either way). Not a failure.
            log.debug("event=write-after-close")
            future = asyncio.get_running_loop().create_future()
            future.set_exception(exc)
            future.exception()  # retrieved: nobody else may look
            return future
        future.add_done_callback(self._check_write)
        self._last_write = future
        return future

    def _check_write(self, future: asyncio.Future[None]) -> None:
        if future.cancelled() or future.exception() is None:
            return
        if not self.failed.is_set():
            log.critical(
                "event=store-write-failed error=%r: stopping; a restart recovers from the store",
                future.exception(),
            )
            self.failed.set()

    def _committed(self, future: asyncio.Future[None], instructions: list[Instruction]) -> None:
        # On failure nothing is acked or announced that is not durable (_check_write
        # stops the server; agents resend their reports to the next one).
        if not future.cancelled() and future.exception() is None:
            self._after_commit(instructions)

    def _after_commit(self, instructions: list[Instruction]) -> None:
        for ins in instructions:
            if isinstance(ins, SendAcks):
                self._push(ins.agent_id, "ack", ins.acks)
            elif isinstance(ins, NotifyWatchers):
                self.watchers.publish(ins.changes, ins.groups)

    def _push(self, agent_id: str, kind: str, items: tuple) -> None:
        conn = self.connections.get(agent_id)
        if conn is not None:
            conn.push(kind, items)

    async def register_function(self, payload: bytes, function_id: str, owner: str) -> None:
        """Store the function (once: a known id costs its owner nothing more).

        Raises:
            Abort: RESOURCE_EXHAUSTED, a new function past the owner's byte budget
                (``config.max_function_bytes``).
        """
        if function_id in self._registering or self.functions.has(function_id):
            await self._store_function(payload, function_id, owner)
            return
        # The running count may count a function twice (one stored already, not in
        # memory): it is made exact from the store when it reaches the limit, so the
        # common register asks the store nothing.
        self._registering.add(function_id)  # a concurrent register of it counts nothing
        try:
            size, limit = len(payload), self.config.max_function_bytes
            used = self.function_bytes.get(owner, 0)
            if used + size > limit:
                if await self.store.function_size(function_id) is not None:
                    size = 0  # stored already: it costs nothing more
                else:
                    counted = await self.store.function_bytes_by_owner(owner)
                    used = self.function_bytes[owner] = counted.get(owner, 0)
                    if used + size > limit:
                        raise Abort(
                            grpc.StatusCode.RESOURCE_EXHAUSTED,
                            f"the functions {owner!r} stored take {_mib(used)}; this one "
                            f"({_mib(size)}) would pass the limit of {_mib(limit)} of stored "
                            "functions per user: reuse the functions registered (those no "
                            "kept task uses go with the result retention's purge)",
                        )
            self.function_bytes[owner] = used + size
            await self._store_function(payload, function_id, owner)
        finally:
            self._registering.discard(function_id)

    async def _store_function(self, payload: bytes, function_id: str, owner: str) -> None:
        await asyncio.shield(
            self._write(
                WriteBatch(functions=(FunctionRow(function_id, payload, owner, time.time()),))
            )
        )
        self.functions.remember(function_id, payload)

    async def register_endpoint(self, row: EndpointRow) -> None:
        await asyncio.shield(self._write(WriteBatch(endpoints=(row,))))
        self._remember_endpoint(row)

    def _remember_endpoint(self, row: EndpointRow) -> None:
        self.endpoints[row.endpoint_id] = row
        self._endpoints_named.setdefault(row.name, []).append(row)

    def endpoint_named(self, name: str, owner: str) -> EndpointRow | None:
        """The endpoint of this name the user may submit to: its own, else one shared
        with it (the oldest, if several users shared one of that name)."""
        rows = self._endpoints_named.get(name, ())
        own = next((r for r in rows if r.owner == owner), None)
        if own is not None:
            return own
        shared = [r for r in rows if owner in self.shared_with(r.endpoint_id)]
        return min(shared, key=lambda r: r.register_time) if shared else None

    def may_use_endpoint(self, row: EndpointRow, user: str) -> bool:
        """The user owns the endpoint, or its owner shared it with the user."""
        return row.owner == user or user in self.shared_with(row.endpoint_id)

    def shared_with(self, endpoint_id: str) -> frozenset[str] | set[str]:
        """The users an endpoint is shared with (see ``heartline endpoints share``)."""
        return self.shares.get(endpoint_id, frozenset())

    def set_allowed_functions(
        self, endpoint: EndpointRow, function_ids: frozenset[str] | None, agent_id: str
    ) -> None:
        """The hello of agent ``agent_id`` gave the endpoint's allow-list (None: it has
        none): keep it, in memory at once, and in the store (written only when it
        changed; queued now, so writes keep the order of hellos, and not waited for:
        the hello does not stall behind a commit)."""
        endpoint_id = endpoint.endpoint_id
        if self.allowed_functions.get(endpoint_id) == function_ids:
            return
        if function_ids is None:
            del self.allowed_functions[endpoint_id]
        else:
            self.allowed_functions[endpoint_id] = function_ids
        others = sum(
            1 for a in self.scheduler.dispatcher.agents_of(endpoint_id) if a.agent_id != agent_id
        )
        level = logging.WARNING if others else logging.INFO
        log.log(
            level,
            "event=allow-list-changed endpoint=%s functions=%s connected_agents=%d%s",
            endpoint.name,
            "all" if function_ids is None else len(function_ids),
            others,
            ": the agents of one endpoint should share one allow-list (the last hello's holds)"
            if others
            else "",
        )
        task = asyncio.ensure_future(self._store_allowed(endpoint, function_ids))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _store_allowed(
        self, endpoint: EndpointRow, function_ids: frozenset[str] | None
    ) -> None:
        try:
            await self.store.set_allowed_functions(endpoint.endpoint_id, function_ids)
        except Exception as exc:  # noqa: BLE001 - memory holds it until a restart
            log.error("event=allow-list-not-stored endpoint=%s error=%r", endpoint.name, exc)

    def function_refusal(self, endpoint: EndpointRow, function_ids: Iterable[str]) -> str | None:
        """Why the endpoint refuses one of these functions (its allow-list has it not),
        or None if it runs them all."""
        allowed = self.allowed_functions.get(endpoint.endpoint_id)
        if allowed is None:
            return None
        refused = sorted(set(function_ids) - allowed)
        if not refused:
            return None
        more = f" (and {len(refused) - 1} more of this request)" if len(refused) > 1 else ""
        return (
            f"function {refused[0]}{more} is not allowed on endpoint {endpoint.name!r} "
            f"(id {endpoint.endpoint_id}): its agents run only the {len(allowed)} "
            f"function{'' if len(allowed) == 1 else 's'} of its allow-list (`heartline "
            "endpoint start --allow-function ID`, or "
            f"allowed_functions in its {_defaults.ENDPOINT_CONFIG_FILE})"
        )

    def pending_refusal(self, new_tasks: Mapping[str, int]) -> str | None:
        """Why a submit of this many new tasks per owner would pass the limit of pending
        tasks per user (``config.max_pending_per_user``), or None. Called with no await
        between it and the feed, so concurrent submits can't both slip under it."""
        limit = self.config.max_pending_per_user
        pending = self.scheduler.pending_by_owner
        for owner, count in new_tasks.items():
            have = pending.get(owner, 0)
            if have + count > limit:
                return (
                    f"user {owner!r} has {have} pending tasks, and {count} more would pass "
                    f"the limit of {limit} pending tasks per user (max_pending_per_user, "
                    "`heartline server --max-pending-per-user`): nothing was stored; "
                    "submit again once some settle, or cancel some"
                )
        return None

    def retry_refusal(self, task_ids: Iterable[str]) -> str | None:
        """:meth:`pending_refusal` for a retry: each ERRORED task among ``task_ids`` would
        be pending again, counted against its owner. Called with no await before the feed."""
        again: dict[str, int] = {}
        tasks = self.scheduler.tasks
        for task_id in task_ids:
            task = tasks.get(task_id)
            if task is not None and task.state == TaskState.ERRORED:
                again[task.owner] = again.get(task.owner, 0) + 1
        return self.pending_refusal(again) if again else None

    def open_watch(self, user: str) -> str | None:
        """Count a new WatchTasks stream of the user; or, past the limit of open watch
        streams per user, count nothing and say why. Each stream counted is released
        with :meth:`close_watch`."""
        limit = self.config.max_watches_per_user
        have = self.watches_by_user.get(user, 0)
        if have >= limit:
            return (
                f"user {user!r} has {have} watch streams open, the limit of open watch "
                f"streams per user ({limit}, max_watches_per_user, `heartline server "
                "--max-watches-per-user`): close one (a client holds one for its "
                "session, and one per wait on a task or group it did not submit)"
            )
        self.watches_by_user[user] = have + 1
        return None

    def close_watch(self, user: str) -> None:
        left = self.watches_by_user.get(user, 0) - 1
        if left > 0:
            self.watches_by_user[user] = left
        else:
            self.watches_by_user.pop(user, None)

    async def ensure_endpoint(self, name: str, owner: str) -> EndpointRow:
        """The owner's endpoint of this name, registered (durably) if it is new."""
        row = self.endpoint_named(name, owner)
        if row is not None:
            return row
        # Two agents that start at once with one name must get one endpoint: the check
        # and the (awaited) write are one step for every registration. Rare, so one lock.
        async with self._registration:
            row = self.endpoint_named(name, owner)
            if row is None:
                row = EndpointRow(str(uuid.uuid4()), name, owner, time.time())
                await self.register_endpoint(row)
                log.info("event=endpoint-registered name=%s endpoint_id=%s", name, row.endpoint_id)
        return row

    def lose_silent_agents(self, now: float) -> None:
        """Close the streams that carried nothing for the heartbeat timeout up to ``now``
        (``time.monotonic()``), and tell the scheduler their agents are lost.

        A scan of the connections' timestamps: at 10,000 agents about a millisecond, once
        per tick, where each heartbeat as a scheduler step cost far more in all."""
        silent = [c for c in self.connections.values() if now - c.last_heard > c.heartbeat_timeout]
        wall = time.time()
        for conn in silent:
            log.warning("agent %s silent for %.1fs: lost", conn.agent_id, now - conn.last_heard)
            # Out of the connections first: the stream's own end then reports nothing
            # more, so the loss is recorded once, with this cause.
            del self.connections[conn.agent_id]
            conn.close("no heartbeat within the timeout")
            self.feed_soon(AgentLost(conn.agent_id, wall, "heartbeat-timeout", conn.stream_id))

    def stretch_heartbeats(self) -> None:
        """Ask every agent told a shorter interval than the current fleet needs for the
        longer one (server/_liveness.py)."""
        policy = self._heartbeats
        interval = policy.interval_for(len(self.connections))
        if interval <= self._stretched_to:
            return  # every stream has this interval or a longer one already
        timeout = policy.timeout_for(interval)
        asked = 0
        for conn in self.connections.values():
            if conn.heartbeat_interval < interval:
                conn.ask_heartbeats(interval, timeout)
                asked += 1
        self._stretched_to = interval
        if asked:
            log.info(
                "event=heartbeats-stretched interval=%g timeout=%g agents=%d asked=%d",
                interval,
                timeout,
                len(self.connections),
                asked,
            )

    def welcome_heartbeats(self, conn: AgentConnection) -> float:
        """The interval a new stream's welcome gives (the fleet's, with it counted in)."""
        policy = self._heartbeats
        interval = policy.interval_for(len(self.connections))
        conn.ask_heartbeats(interval, policy.timeout_for(interval), tell=False)
        self._stretched_to = min(self._stretched_to, interval)
        return interval

    async def run_timers(self) -> None:
        """Heartbeat checks, retention and the descriptor watch, until cancelled."""
        interval = max(0.05, self.config.heartbeat_interval / 2)
        last_purge = last_fds = 0.0
        fd_watch = FdWatch(fd_soft_limit())
        loop = asyncio.get_running_loop()
        while True:
            due = loop.time() + interval
            await asyncio.sleep(interval)
            # Woken far past its time, the loop was held up (a long step, a pause): the
            # streams' messages that arrived meanwhile are not read yet, so silence is
            # judged at the next tick, once they are.
            if loop.time() - due < interval:
                self.lose_silent_agents(time.monotonic())
            self.stretch_heartbeats()
            if self._freezer.check(len(self.connections), time.monotonic()):
                log.info(
                    "event=gc-frozen agents=%d objects=%d",
                    len(self.connections),
                    gc.get_freeze_count(),
                )
            now = time.time()
            self.feed_soon(Tick(now))
            if now - last_fds >= _FD_CHECK_SECONDS:
                last_fds = now
                # Off the loop: listing /proc/self/fd takes milliseconds at 10,000.
                used = await asyncio.to_thread(open_fds)
                warning = None if used is None else fd_watch.check(used)
                if warning is not None:
                    log.warning(warning)
            if now - last_purge > 3600:
                last_purge = now
                try:
                    purged = await self.store.purge_results(
                        now - self.config.result_retention, keep_functions=self.functions.held()
                    )
                except Exception as exc:  # noqa: BLE001 - retried next hour; timers go on
                    log.error("event=purge-failed error=%r", exc)
                else:
                    if purged:
                        log.info("event=purged tasks=%d", purged)
                    try:  # purged functions no longer count against their owners
                        self.function_bytes = await self.store.function_bytes_by_owner()
                    except Exception as exc:  # noqa: BLE001 - counted again next hour
                        log.error("event=function-bytes-failed error=%r", exc)
