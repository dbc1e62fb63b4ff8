"""Bounded function caches (issue item 4): server, stream, agent, pool and worker.

The rule under test (heartline/_defaults.py, server/_core.py AgentConnection): what a
sender counts on its receiver to hold is an LRU over the same accesses, in the same
order, with bounds no larger than the receiver's own LRU, so it never counts on an id
the receiver dropped. Both pairs are driven past their bounds with skewed reuse,
duplicates, reconnects and payloads of very different sizes.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cloudpickle
import grpc
import pytest

from heartline import _defaults
from heartline._errors import NotFoundError
from heartline._lru import LruCache
from heartline._serialize import dumps_args, dumps_function, function_id
from heartline.endpoint import _worker
from heartline.endpoint._agent import Agent
from heartline.endpoint._config import AgentConfig
from heartline.endpoint._workers import Job, Outcome, WorkerPool
from heartline.server._core import AgentConnection, FunctionCache
from heartline.server._events import DispatchItem
from heartline.server._model import FunctionRow
from heartline.v1 import endpoint_service_pb2 as pb

WAIT = 30.0


# -- the LRU's one addition ------------------------------------------------------------


def test_lru_keys_are_a_copy_oldest_use_first() -> None:
    cache: LruCache[str, int] = LruCache(3, 100)
    for key in "abc":
        cache.put(key, 0, 1)
    cache.touch("a")
    keys = cache.keys()
    cache.put("d", 0, 1)
    assert keys == ["b", "c", "a"] and cache.keys() == ["c", "a", "d"]


# -- the defaults keep the rule ----------------------------------------------------------


def test_each_receiver_holds_at_least_what_its_sender_counts_on() -> None:
    for sent, held in [
        (_defaults.STREAM_SENT_FUNCTIONS, _defaults.AGENT_FUNCTION_CACHE),
        (_defaults.WORKER_SENT_FUNCTIONS, _defaults.WORKER_FUNCTION_CACHE),
    ]:
        assert held[0] >= sent[0] and held[1] >= sent[1]
    # A function of the largest payload fits the stream's set, so no entry sits alone.
    assert _defaults.STREAM_SENT_FUNCTIONS[1] > _defaults.MAX_PAYLOAD


# -- server stream -> agent ----------------------------------------------------------------


class _FakeStore:
    """Just the store read FunctionCache makes."""

    def __init__(self, payloads: dict[str, bytes]) -> None:
        self.payloads = payloads
        self.reads = 0

    async def get_function(self, fid: str) -> FunctionRow | None:
        self.reads += 1
        await asyncio.sleep(0)  # a real read suspends
        payload = self.payloads.get(fid)
        return None if payload is None else FunctionRow(fid, payload, "alice", 0.0)


class _FakePool:
    """What the agent hands to its pool, recorded."""

    def __init__(self) -> None:
        self.jobs: list[Job] = []
        self.cancelled: list[str] = []

    def submit(self, job: Job) -> None:
        self.jobs.append(job)

    def cancel(self, task_id: str) -> bool:
        self.cancelled.append(task_id)
        return True

    def close(self) -> None:
        pass


def _agent(tmp_path: Path, bounds: tuple[int, int] | None = None) -> tuple[Agent, _FakePool, list]:
    agent = Agent(AgentConfig(name="local", home=tmp_path, workers=1, server="127.0.0.1:1"))
    pool = _FakePool()
    agent._engine = pool  # type: ignore[assignment]
    if bounds is not None:
        agent._functions = LruCache(*bounds)
    refused: list[tuple[str, str, str]] = []

    def refuse(d: pb.Dispatch, type_name: str, message: str) -> None:
        refused.append((d.task_id, d.function_id, type_name))
        agent._held.pop(d.task_id, None)

    agent._refuse = refuse  # type: ignore[method-assign]
    return agent, pool, refused


async def _no_stored_args(task_ids: Sequence[str]) -> dict[str, bytes]:
    raise AssertionError(f"these dispatches carry their args; read for {task_ids}")


class _Link:
    """One server-side stream (AgentConnection) feeding one agent's _on_dispatch."""

    def __init__(self, agent: Agent, functions: FunctionCache, bounds: tuple[int, int] | None) -> None:
        self.agent = agent
        self.functions = functions
        self.bounds = bounds
        self.with_bytes = 0
        self.without_bytes = 0
        self.reconnect()

    def reconnect(self) -> None:
        self.conn = AgentConnection(self.agent.agent_id, "ep-1", self.functions, _no_stored_args)
        if self.bounds is not None:
            self.conn._sent_functions = LruCache(*self.bounds)

    async def send(self, items: Sequence[DispatchItem]) -> None:
        for message in await self.conn._messages([("dispatch", tuple(items))]):
            dispatches = message.dispatch.dispatches
            for d in dispatches:
                if d.function:
                    self.with_bytes += 1
                else:
                    self.without_bytes += 1
            self.agent._on_dispatch(dispatches)
            sent = set(self.conn._sent_functions.keys())
            held = set(self.agent._functions.keys())
            assert sent <= held, f"the stream counts on {sorted(sent - held)[:3]} the agent dropped"


def _payloads(
    rng: random.Random, count: int, sizes: Sequence[int], *, shared: bool = False
) -> dict[str, bytes]:
    """Payloads by id; ``shared`` bodies of one size are one object (little memory)."""
    if shared:
        bodies = {size: bytes(size) for size in sizes}
        return {f"f{i:05d}": bodies[rng.choice(sizes)] for i in range(count)}
    return {f"f{i:05d}": b"f%05d" % i + bytes(rng.choice(sizes)) for i in range(count)}


def _pick(rng: random.Random, ids: list[str], recent: list[str]) -> str:
    """Mostly recent ids (hits), sometimes any id (misses of evicted ones)."""
    if recent and rng.random() < 0.6:
        return rng.choice(recent[-12:])
    return rng.choice(ids)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("factor", [1, 2])
async def test_no_dispatch_without_bytes_finds_the_agent_lacking(
    tmp_path: Path, seed: int, factor: int
) -> None:
    # Small bounds so thousands of dispatches go far past them; factor 1 shows the rule
    # needs no slack (equal bounds), factor 2 is the shipped ratio.
    rng = random.Random(seed)
    stream_bounds = (8, 40_000)
    agent_bounds = (factor * 8, factor * 40_000)
    payloads = _payloads(rng, 60, [10, 300, 3_000, 12_000, 39_000, 70_000])
    missing = {f"f{i:05d}" for i in range(60, 63)}  # dispatched, but not in the store
    ids = [*payloads, *missing]
    agent, pool, refused = _agent(tmp_path / f"a{seed}{factor}", agent_bounds)
    link = _Link(agent, FunctionCache(_FakeStore(payloads), (4, 50_000)), stream_bounds)  # type: ignore[arg-type]
    sent: list[DispatchItem] = []
    recent: list[str] = []
    for step in range(400):
        items = []
        for _ in range(rng.randint(1, 8)):
            roll = rng.random()
            if sent and roll < 0.1:
                items.append(rng.choice(sent))  # a duplicate the agent skips
            elif sent and roll < 0.15:
                old = rng.choice(sent)  # a newer attempt supersedes a held one
                items.append(DispatchItem(old.task_id, old.attempt + 1, old.function_id, b"", 0.0))
            else:
                fid = _pick(rng, ids, recent)
                items.append(DispatchItem(f"t{len(sent)}", 1, fid, b"", 0.0))
            sent.append(items[-1])
            recent.append(items[-1].function_id)
        await link.send(items)
        if step % 97 == 96:
            link.reconnect()  # a new stream counts on nothing; the agent keeps its cache
    assert {fid for _, fid, _ in refused} <= missing
    assert all(type_name == "LookupError" for _, _, type_name in refused)
    for job in pool.jobs:
        assert job.function == payloads[job.function_id]
    # The run did what it was meant to: both sides evicted, both kinds of dispatch went out.
    assert agent._functions.evictions > 0 and link.with_bytes > 0 and link.without_bytes > 0
    assert len(pool.jobs) > 1000


async def test_the_shipped_bounds_past_their_count_and_bytes(tmp_path: Path) -> None:
    rng = random.Random(7)
    count = 3 * _defaults.STREAM_SENT_FUNCTIONS[0]
    payloads = _payloads(rng, count, [200, 200, 200, 400_000], shared=True)  # bytes bind too
    ids = list(payloads)
    agent, _pool, refused = _agent(tmp_path)
    link = _Link(agent, FunctionCache(_FakeStore(payloads)), None)  # type: ignore[arg-type]
    recent: list[str] = []
    n = 0
    for _ in range(300):
        items = []
        for _ in range(40):
            fid = _pick(rng, ids, recent) if rng.random() < 0.5 else ids[n % count]
            recent.append(fid)
            items.append(DispatchItem(f"t{n}", 1, fid, b"", 0.0))
            n += 1
        await link.send(items)
    assert refused == []
    assert link.conn._sent_functions.evictions > 0 and agent._functions.evictions > 0
    assert agent._functions.bytes <= _defaults.AGENT_FUNCTION_CACHE[1]
    assert len(agent._functions) <= _defaults.AGENT_FUNCTION_CACHE[0]


async def test_a_function_the_server_lacks_is_refused_and_the_stream_starts_over(
    tmp_path: Path,
) -> None:
    payloads = {"f1": b"one", "f2": b"two"}
    agent, pool, refused = _agent(tmp_path)
    link = _Link(agent, FunctionCache(_FakeStore(payloads)), None)  # type: ignore[arg-type]
    await link.send([DispatchItem("t1", 1, "f1", b"", 0.0), DispatchItem("t2", 1, "gone", b"", 0.0)])
    assert refused == [("t2", "gone", "LookupError")]
    assert link.conn._sent_functions.keys() == []  # started over
    await link.send([DispatchItem("t3", 1, "f1", b"", 0.0)])
    assert [j.task_id for j in pool.jobs] == ["t1", "t3"]
    assert link.with_bytes == 2  # f1 went again: the emptied set no longer counted on it


async def test_server_function_cache_is_bounded_and_reports_what_it_holds() -> None:
    store = _FakeStore({f"f{i}": b"x" * 10 for i in range(10)})
    cache = FunctionCache(store, (3, 1000))  # type: ignore[arg-type]
    for i in range(10):
        assert await cache.get(f"f{i}") == b"x" * 10
    assert cache.held() == {"f7", "f8", "f9"}
    assert await cache.get("f9") is not None and store.reads == 10  # a hit reads nothing
    loading = asyncio.ensure_future(cache.get("f0"))
    await asyncio.sleep(0)  # the read is in flight: a purge now must keep f0
    assert "f0" in cache.held()
    assert await loading == b"x" * 10 and "f0" in cache.held()
    assert await cache.get("nope") is None and "nope" not in cache.held()
    cache.remember("new", b"y" * 1000)  # over the bytes alone: kept alone
    assert cache.held() == {"new"}


# -- pool -> worker process --------------------------------------------------------------


class _Pipe:
    def __init__(self) -> None:
        self.data = bytearray()

    def write(self, data: bytes) -> None:
        self.data += data

    def is_closing(self) -> bool:
        return False


class _Process:
    pid = 4242
    returncode = None

    def __init__(self) -> None:
        self.stdin = _Pipe()

    def kill(self) -> None:
        pass


class _NoOutput:
    """A worker slot's output files, for a worker that never writes any."""

    def take(self, limit: int) -> tuple[str, str]:
        return "", ""


class _Channel:
    def __init__(self) -> None:
        self.sent: list[tuple[Any, ...]] = []

    def send(self, message: tuple[Any, ...]) -> None:
        self.sent.append(message)


class _Listener:
    def __init__(self) -> None:
        self.outcomes: dict[str, Outcome] = {}

    def task_launched(self, job: Job) -> None:
        pass

    def task_started(self, job: Job) -> None:
        pass

    def task_finished(self, job: Job, outcome: Outcome) -> None:
        self.outcomes[job.task_id] = outcome


def _adder(i: int, ballast: bytes) -> Any:
    return lambda x: x + i + 0 * len(ballast)


cloudpickle.register_pickle_by_value(__import__(__name__))


@pytest.mark.parametrize("seed", range(3))
async def test_the_pool_never_counts_on_a_function_its_worker_dropped(seed: int) -> None:
    # The pool's _launch writes real frames; the worker's real run_task reads them into its
    # own LRU. Small bounds (worker 2x pool), payload sizes from ~1 KB to ~60 KB, and
    # some functions that cannot be unpickled (the worker keeps nothing of those).
    rng = random.Random(seed)
    functions: dict[str, bytes] = {}
    for i in range(50):
        functions_payload = dumps_function(_adder(i, bytes(rng.choice([0, 5_000, 20_000, 60_000]))))
        functions[function_id(functions_payload)] = functions_payload
    broken = {f"{i:064x}": b"not a pickle %d" % i for i in range(3)}
    ids = [*functions, *broken]
    values = {fid: i for i, fid in enumerate(functions)}
    listener = _Listener()
    pool = WorkerPool(1, listener)
    from heartline.endpoint._workers import _Worker

    worker = _Worker(_Process(), _NoOutput())  # type: ignore[arg-type]
    worker.functions = LruCache(6, 90_000)
    held: LruCache[str, Any] = LruCache(12, 180_000)  # the worker process's own cache
    channel = _Channel()
    recent: list[str] = []
    for n in range(1500):
        fid = _pick(rng, ids, recent)
        recent.append(fid)
        payload = functions.get(fid) or broken[fid]
        job = Job(f"t{n}", 1, fid, payload, dumps_args((1,), {}))
        pool._launch(worker, job)
        frame = _decode_frames(worker.process.stdin)
        assert frame[0] == "run" and frame[1] == job.task_id
        done = _worker.run_task(channel, held, *frame[1:])
        assert done[0] == "done"
        pool._handle(worker, done)
        pool._idle.clear()
        outcome = listener.outcomes.pop(job.task_id)
        if fid in broken:
            assert outcome.failure is not None and "cannot deserialize the function" in outcome.failure.message
            assert "never sent" not in outcome.failure.message
        else:
            assert outcome.failure is None, outcome.failure
            assert cloudpickle.loads(outcome.result) == 1 + values[fid]
        sent, kept = set(worker.functions.keys()), set(held.keys())
        assert sent <= kept | set(broken), sorted(sent - kept)[:3]
    assert held.evictions > 0 and worker.functions.evictions > 0


def _decode_frames(pipe: _Pipe) -> tuple[Any, ...]:
    from heartline.endpoint._frames import HEADER, decode

    (size,) = HEADER.unpack(pipe.data[: HEADER.size])
    frame = decode(bytes(pipe.data[HEADER.size : HEADER.size + size]))
    del pipe.data[: HEADER.size + size]
    return frame


async def test_real_workers_run_more_functions_than_their_caches_hold() -> None:
    class Recorder(_Listener):
        def __init__(self) -> None:
            super().__init__()
            self.done = asyncio.Event()
            self.expected = 0

        def task_finished(self, job: Job, outcome: Outcome) -> None:
            super().task_finished(job, outcome)
            if len(self.outcomes) == self.expected:
                self.done.set()

    rng = random.Random(3)
    count = _defaults.WORKER_FUNCTION_CACHE[0] + 200
    payloads = [dumps_function(_adder(i, b"")) for i in range(count)]
    order = list(range(count)) + [rng.randrange(count) for _ in range(count)]
    recorder = Recorder()
    recorder.expected = len(order)
    pool = WorkerPool(2, recorder)
    runner = asyncio.create_task(pool.run())
    try:
        for n, i in enumerate(order):
            pool.submit(Job(f"t{n}", 1, function_id(payloads[i]), payloads[i], dumps_args((1,), {})))
        async with asyncio.timeout(120):
            await recorder.done.wait()
    finally:
        pool.close()
        async with asyncio.timeout(WAIT):
            await runner
    for n, i in enumerate(order):
        outcome = recorder.outcomes[f"t{n}"]
        assert outcome.failure is None, outcome.failure
        assert cloudpickle.loads(outcome.result) == 1 + i


# -- a client whose function the server dropped ------------------------------------------


async def test_a_purged_function_is_registered_again_on_submit(tmp_path: Path) -> None:
    from heartline import AsyncClient
    from heartline.server import Server, ServerConfig

    server = Server(
        ServerConfig(
            listen="127.0.0.1:0", db=tmp_path / "h.db", validate=True, endpoints=("local",)
        )
    )
    await server.start()
    agent = Agent(AgentConfig(name="local", server=server.address, home=tmp_path, workers=1))
    ready = asyncio.Event()
    running = asyncio.create_task(agent.run(ready=ready))
    try:
        async with asyncio.timeout(WAIT):
            await ready.wait()
        fn = _adder(40, b"")
        async with AsyncClient(server.address) as client:
            tid = await client.submit("local", fn, 2)
            assert await client.get_result(tid, timeout=WAIT) == 42
            fid = function_id(dumps_function(fn))
            # As after a restart (memory empty) once the retention has passed:
            server.core.functions = FunctionCache(server.store)
            await server.store.purge_results(time.time() + 1)
            assert await server.store.get_function(fid) is None
            tid = await client.submit("local", fn, 3)  # the client still marks it registered
            assert await client.get_result(tid, timeout=WAIT) == 43
            assert await server.store.get_function(fid) is not None
    finally:
        await agent.stop()
        await running
        await server.stop(grace=0)


class _Forgetful:
    """A TaskService that forgets every function at once: the retry happens only once."""

    def __init__(self) -> None:
        self.registered = 0
        self.submits = 0

    async def register(self, request: Any, context: Any) -> Any:
        from heartline.v1 import task_service_pb2

        self.registered += 1
        return task_service_pb2.RegisterFunctionResponse(function_id=request.function_id)

    async def submit(self, request: Any, context: Any) -> Any:
        self.submits += 1
        fid = request.tasks[0].function_id
        await context.abort(
            grpc.StatusCode.NOT_FOUND, f"unknown function {fid}: register it with RegisterFunction first"
        )


async def test_a_function_refused_again_after_registering_again_is_an_error() -> None:
    from heartline import AsyncClient
    from heartline.v1 import task_service_pb2, task_service_pb2_grpc

    fake = _Forgetful()
    servicer = task_service_pb2_grpc.TaskServiceServicer()
    servicer.RegisterFunction = fake.register  # type: ignore[method-assign]
    servicer.SubmitTasks = fake.submit  # type: ignore[method-assign]

    async def watch(request: Any, context: Any) -> Any:
        yield task_service_pb2.WatchTasksResponse()
        await asyncio.sleep(WAIT)

    servicer.WatchTasks = watch  # type: ignore[method-assign]
    grpc_server = grpc.aio.server()
    task_service_pb2_grpc.add_TaskServiceServicer_to_server(servicer, grpc_server)
    port = grpc_server.add_insecure_port("127.0.0.1:0")
    await grpc_server.start()
    try:
        async with AsyncClient(f"127.0.0.1:{port}") as client:
            with pytest.raises(NotFoundError, match="unknown function"):
                await client.submit("local", _adder(1, b""), 1)
        assert (fake.registered, fake.submits) == (2, 2)  # registered, refused, again, refused
    finally:
        await grpc_server.stop(0)


def test_a_client_remembers_a_bounded_number_of_registrations(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from heartline.client import _base

    monkeypatch.setattr(_base, "_REGISTERED_MARKS", 3)
    cache = _base.FunctionCache()
    for fid in "abcd":
        cache.mark_registered(fid)
        cache.is_registered("a")  # in use: kept
    assert [fid for fid in "abcd" if cache.is_registered(fid)] == ["a", "c", "d"]
