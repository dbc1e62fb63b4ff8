"""The one test stack: a real server process on a free loopback port with a real SQLite
file, and real endpoint agent processes.

- per test: ``sched`` (a pure scheduler, checked fully at the end), ``home``, ``server``, ``start_agent`` (a factory), ``agent``, ``hc``;
- per module: ``stack`` (one server and a ``local`` agent shared by the module's tests;
  a module overrides ``stack_workers`` to size that agent, ``stack_agent_args`` to pass
  it more arguments);
- plain functions for tests that start or restart processes themselves:
  ``launch_server``, ``relaunch_server``, ``launch_agent``, ``Stack``, and
  ``start_dask_cluster`` (a ``dask scheduler`` and ``dask worker`` processes, a
  :class:`DaskCluster`).

Every process started through ``tests.helpers.start_process`` (so every server and agent
above) is stopped by PID at teardown of the test or module that owns it, and its output
is checked for ``event=loop-blocked``: a blocked event loop fails the test that saw it
(a module stack's processes are checked after each test, and once more when the module
ends). No test has to remember to ask for the check.
"""

from __future__ import annotations

import asyncio
import logging
import re
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from heartline import Client
from heartline._watchdog import watch_loop
from heartline.server._scheduler import Scheduler
from heartline.server._store import SqliteStore
from tests.helpers import (
    PROCESSES,
    Proc,
    assert_eventually,
    endpoint_online,
    heartline_cmd,
    start_process,
    tail,
)
from tests.pg import PgCluster, cluster_or_skip
from tests.scheduler_kit import make, validate_made

__all__ = [
    "HEARTBEAT",
    "STORE_KINDS",
    "DaskCluster",
    "ServerProc",
    "Stack",
    "assert_loop_never_blocked",
    "endpoint_online",
    "launch_agent",
    "launch_server",
    "new_db",
    "relaunch_server",
    "start_dask_cluster",
]

HEARTBEAT = 0.2  # seconds; the tests' servers run with short heartbeats


# --------------------------------------------------------------------------- the check


def assert_loop_never_blocked(proc: Proc) -> None:
    """Fail if the process's event-loop watchdog saw a blocking call (a stall that a
    SIGSTOP the test sent explains is none; see ``Proc.stalls``)."""
    stalls = proc.stalls()
    assert not stalls, f"the event loop of pid {proc.pid} was blocked: {stalls}\n{tail(proc)}"


class ProcessGroup:
    """Processes one fixture owns: stopped (newest first) and checked at its teardown."""

    def __init__(self, what: str, procs: list[Proc] | None = None) -> None:
        self.what = what
        self.procs: list[Proc] = []
        for proc in procs or ():
            self.adopt(proc)

    def adopt(self, proc: Proc) -> Proc:
        proc.owner = self
        self.procs.append(proc)
        return proc

    def close(self) -> list[str]:
        """Stop every process; return what each logged of a blocked event loop."""
        problems = []
        try:
            for proc in reversed(self.procs):
                proc.stop()
        finally:
            for proc in self.procs:
                proc.drain()
                stalls = proc.stalls(since=proc.checked)
                proc.checked = len(proc.output)
                PROCESSES.done(proc)
                if stalls:
                    problems.append(f"pid {proc.pid}: {stalls}\n{tail(proc)}")
            self.procs = []
        return problems

    def close_and_check(self) -> None:
        problems = self.close()
        assert not problems, f"a blocked event loop in {self.what}:\n" + "\n".join(problems)


def _check_running(procs: list[Proc]) -> list[str]:
    """The new stall lines of processes that keep running (a module stack's)."""
    problems = []
    for proc in procs:
        upto = len(proc.output)
        stalls = proc.stalls(since=proc.checked, until=upto)
        proc.checked = upto
        if stalls:
            problems.append(f"pid {proc.pid} ({getattr(proc.owner, 'what', '?')}): {stalls}")
    return problems


@pytest.fixture(autouse=True)
def _processes_checked() -> Iterator[None]:
    """Stop the processes this test (or its function-scoped fixtures) started, and fail the
    test if any of them, or a longer-lived process while the test ran, blocked its loop."""
    first = PROCESSES.started
    yield
    mine = ProcessGroup("this test", PROCESSES.started_since(first))
    others = [p for p in PROCESSES.unchecked if p.owner is not mine]
    problems = mine.close()
    problems += _check_running(others)
    assert not problems, "a blocked event loop while this test ran:\n" + "\n".join(problems)


@pytest.fixture(scope="session", autouse=True)
def _no_process_left() -> Iterator[None]:
    """Stops and checks whatever no test or module claimed (e.g. a failed module setup's)."""
    yield
    ProcessGroup(
        "processes left at the end of the session", PROCESSES.started_since(0)
    ).close_and_check()


@pytest.fixture
async def loop_watchdog() -> AsyncIterator[None]:
    """For in-process servers and worker pools: runs the event-loop watchdog on the test's
    own loop and fails the test if it saw a blocking call."""
    stalls: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            stalls.append(record.getMessage())

    logger = logging.getLogger("heartline.watchdog")
    handler, level = Collect(logging.WARNING), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING)
    watchdog = asyncio.ensure_future(watch_loop())
    try:
        yield
    finally:
        watchdog.cancel()
        await asyncio.gather(watchdog, return_exceptions=True)
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert not stalls, f"the test's event loop was blocked: {stalls}"


# --------------------------------------------------------------------------- processes


@dataclass
class ServerProc:
    proc: Proc
    address: str
    db: str | Path
    """A SQLite file, or a PostgreSQL database's URL."""
    home: Path
    args: list[str] = field(default_factory=list)
    extra: tuple[str, ...] = ()
    validate: bool = True

    @property
    def env(self) -> dict[str, str]:
        return {"HEARTLINE_ADDRESS": self.address, "HEARTLINE_HOME": str(self.home)}


def launch_server(
    home: Path,
    db: str | Path,
    listen: str = "127.0.0.1:0",
    *extra: str,
    validate: bool = True,
    ready_line: str = "listening on",
) -> ServerProc:
    """Start ``heartline server`` (with ``--validate`` unless told otherwise) and wait until
    it prints ``ready_line``: by default, until it serves (a standby never does while
    another server is active: wait for ``event=standby`` there, with a ``listen`` port
    of its own)."""
    args = heartline_cmd(
        "server",
        "--listen",
        listen,
        "--db",
        str(db),
        "--heartbeat-interval",
        str(HEARTBEAT),
        *(["--validate"] if validate else []),
        *extra,
    )
    proc = start_process(args, env={"HEARTLINE_HOME": str(home)})
    try:
        line = proc.wait_for_line(ready_line)
    except BaseException:
        proc.kill()
        raise
    address = line.split("listening on", 1)[1].split()[0] if "listening on" in line else listen
    return ServerProc(proc, address, db, home, args, extra, validate)


def relaunch_server(old: ServerProc, *, validate: bool | None = None) -> ServerProc:
    """A new server on ``old``'s store, address and home, with its options (and
    ``--validate`` as ``validate`` says, else as before); ``old`` must be gone."""
    new = launch_server(
        old.home,
        old.db,
        old.address,
        *old.extra,
        validate=old.validate if validate is None else validate,
    )
    assert new.address == old.address, (new.address, old.address)
    return new


def launch_agent(
    address: str, home: Path, name: str = "local", workers: int = 2, *extra: str
) -> Proc:
    """Start ``heartline endpoint start`` (it does not wait for the agent to connect)."""
    proc = start_process(
        heartline_cmd(
            "endpoint",
            "start",
            "--name",
            name,
            "--server",
            address,
            "--workers",
            str(workers),
            *extra,
        ),
        env={"HEARTLINE_HOME": str(home)},
    )
    proc.name = name
    return proc


@dataclass
class Stack:
    """A server and the agents started on it. With an ``owner``, the processes belong to
    that group (a module's stack); without, to the test that starts them."""

    server: ServerProc
    agents: list[Proc] = field(default_factory=list)
    owner: ProcessGroup | None = None

    @property
    def address(self) -> str:
        return self.server.address

    @property
    def home(self) -> Path:
        return self.server.home

    def start_agent(
        self, name: str = "local", workers: int = 2, *extra: str, wait: bool = True
    ) -> Proc:
        """Start an agent of endpoint ``name``; with ``wait``, return once it is connected."""
        before = sum(1 for p in self.agents if p.popen.poll() is None and p.name == name)
        proc = launch_agent(self.address, self.home, name, workers, *extra)
        if self.owner is not None:
            self.owner.adopt(proc)
        self.agents.append(proc)
        if wait:
            assert_eventually(
                lambda: endpoint_online(self.address, name, before + 1),
                timeout=30,
                message=f"agent for {name!r} online\n{tail(proc)}",
            )
        return proc

    def solo_endpoint(self, *extra: str) -> str:
        """A fresh endpoint served by one agent with 1 worker and no prefetch, so a task
        is queued at the server whenever another one runs; ``extra`` goes to the agent
        (e.g. an executor of one thread)."""
        import uuid

        name = f"solo-{uuid.uuid4().hex[:8]}"
        self.start_agent(name, 1, "--prefetch", "0", *extra)
        return name

    def stop_agents(self) -> None:
        for proc in reversed(self.agents):
            proc.stop()


DASK_WAIT = 30.0  # bound on a Dask process's start; a healthy one takes about a second


@dataclass
class DaskCluster:
    """A real Dask scheduler and worker processes on loopback, stopped by PID with ``group``.

    Workers run without a nanny, so a worker's PID is the process that runs the tasks
    (a SIGKILL really kills it, and nothing restarts it), each with one thread by default.
    """

    address: str
    group: ProcessGroup
    workers: dict[int, str] = field(default_factory=dict)  # worker PID -> its address

    def add_worker(self, nthreads: int = 1) -> Proc:
        """Start a worker and return once the scheduler has registered it."""
        proc = self.group.adopt(
            start_process(
                [
                    sys.executable,
                    "-m",
                    "distributed.cli.dask_worker",
                    self.address,
                    "--no-nanny",
                    "--nthreads",
                    str(nthreads),
                    "--host",
                    "127.0.0.1",
                    "--no-dashboard",
                    "--death-timeout",
                    "30",
                ]
            )
        )
        line = proc.wait_for_line("Start worker at:", timeout=DASK_WAIT)
        self.workers[proc.pid] = _tcp_address(line)
        proc.wait_for_line("Registered to:", timeout=DASK_WAIT)
        return proc


def _tcp_address(line: str) -> str:
    match = re.search(r"tcp://[0-9.]+:[0-9]+", line)
    assert match is not None, line
    return match.group(0)


def start_dask_cluster(what: str, workers: int) -> DaskCluster:
    """``dask scheduler`` and ``workers`` one-thread ``dask worker`` processes, in a
    ProcessGroup of their own named ``what`` (the caller closes it)."""
    group = ProcessGroup(what)
    scheduler = group.adopt(
        start_process(
            [
                sys.executable,
                "-m",
                "distributed.cli.dask_scheduler",
                "--host",
                "127.0.0.1",
                "--port",
                "0",
                "--no-dashboard",
                # Its HTTP server (metrics, health) runs anyway: on a free port, not :8787.
                "--dashboard-address",
                "127.0.0.1:0",
            ]
        )
    )
    address = _tcp_address(scheduler.wait_for_line("Scheduler at:", timeout=DASK_WAIT))
    cluster = DaskCluster(address, group)
    for _ in range(workers):
        cluster.add_worker()
    return cluster


def _loopback_only(mp: pytest.MonkeyPatch) -> None:
    # gRPC honours http_proxy; tests talk to loopback only.
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "grpc_proxy"):
        mp.delenv(var, raising=False)
    mp.setenv("no_proxy", "127.0.0.1,localhost")


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    _loopback_only(monkeypatch)


@pytest.fixture(scope="session", autouse=True)
def _session_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A ``$HEARTLINE_HOME`` for tests that set none (in-process servers write their
    admin token there, and clients read it), so no test reads or writes ``~/.heartline``.
    The ``home`` fixture and module stacks set their own on top of it."""
    path = tmp_path_factory.mktemp("session-home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HEARTLINE_HOME", str(path))
        mp.delenv("HEARTLINE_TOKEN", raising=False)
        yield path


# --------------------------------------------------------------------------- per test


@pytest.fixture(autouse=True)
def _schedulers_checked() -> Iterator[None]:
    """Every pure scheduler the test made with ``tests.scheduler_kit.make`` is checked
    fully (``validate(full=True)``) at its end."""
    yield
    validate_made()


@pytest.fixture
def sched() -> Scheduler:
    """A pure scheduler with validate on."""
    return make()


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    """An open SQLite store in a temporary file (in-process, on the test's loop)."""
    s = SqliteStore(tmp_path / "heartline.db")
    await s.open()
    yield s
    await s.close()


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PgCluster]:
    """One PostgreSQL server for the session (for each xdist worker), stopped at its end;
    skipped, saying why, where none can start (failed under CI: see tests/pg.py)."""
    cluster = cluster_or_skip()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def pg_url(pg_cluster: PgCluster) -> str:
    """The URL of a fresh, empty PostgreSQL database for this test."""
    return pg_cluster.database()


STORE_KINDS = ("sqlite", "postgresql")
"""The stores a module can run its servers on (``store_kind`` / ``stack_store_kind``)."""


def new_db(kind: str, folder: Path, request: pytest.FixtureRequest) -> str | Path:
    """A fresh store of ``kind``: a SQLite file in ``folder``, or a new PostgreSQL database."""
    if kind == "sqlite":
        return folder / "heartline.db"
    assert kind == "postgresql", kind
    cluster: PgCluster = request.getfixturevalue("pg_cluster")
    return cluster.database()


@pytest.fixture
def store_kind() -> str:
    """The store of the test's ``server``: a module runs its tests on both by overriding
    this fixture with ``params=STORE_KINDS``."""
    return "sqlite"


@pytest.fixture(scope="module")
def stack_store_kind() -> str:
    """The store of the module's ``stack``; overridden as ``store_kind`` is."""
    return "sqlite"


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "home"
    path.mkdir()
    monkeypatch.setenv("HEARTLINE_HOME", str(path))
    return path


@pytest.fixture
def server(
    home: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    store_kind: str,
    request: pytest.FixtureRequest,
) -> Iterator[ServerProc]:
    srv = launch_server(home, new_db(store_kind, tmp_path, request))
    monkeypatch.setenv("HEARTLINE_ADDRESS", srv.address)
    yield srv
    srv.proc.stop()  # checked for a blocked loop by _processes_checked


@pytest.fixture
def start_agent(server: ServerProc) -> Iterator[Callable[..., Proc]]:
    """``start(name="local", workers=2, *extra, wait=True) -> Proc``: an agent of the test's
    server; with ``wait``, returns once it is connected."""
    agents = Stack(server)
    yield agents.start_agent
    agents.stop_agents()  # before the server stops; checked by _processes_checked


@pytest.fixture
def agent(start_agent: Callable[..., Proc]) -> Proc:
    """One agent of the endpoint 'local' with 2 workers."""
    return start_agent("local", 2)


@pytest.fixture
def hc(request: pytest.FixtureRequest) -> Iterator[Client]:
    """A Client of the test's server: the function-scoped ``server`` if the test uses it,
    else the module's ``stack`` (which the test must name too where the module runs its
    stack on each store: pytest cannot look a parametrized fixture up by name)."""
    target = request.getfixturevalue("server" if "server" in request.fixturenames else "stack")
    with Client(target.address) as client:
        yield client


# --------------------------------------------------------------------------- per module


@pytest.fixture(scope="module")
def stack_workers() -> int:
    """Workers of the module stack's ``local`` agent; a module overrides this fixture."""
    return 4


@pytest.fixture(scope="module")
def stack_agent_args() -> tuple[str, ...]:
    """More arguments of the module stack's ``local`` agent (e.g. its executor); a module
    overrides this fixture."""
    return ()


@pytest.fixture(scope="module")
def stack(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    stack_workers: int,
    stack_agent_args: tuple[str, ...],
    stack_store_kind: str,
) -> Iterator[Stack]:
    """One server and one agent of the endpoint ``local`` shared by the tests of a module;
    ``Stack.start_agent`` / ``solo_endpoint`` add agents that live as long as it."""
    base = tmp_path_factory.mktemp(request.module.__name__.rsplit(".", 1)[-1])
    home = base / "home"
    home.mkdir()
    group = ProcessGroup(f"the stack of {request.module.__name__}")
    with pytest.MonkeyPatch.context() as mp:
        _loopback_only(mp)
        mp.setenv("HEARTLINE_HOME", str(home))
        try:
            srv = launch_server(home, new_db(stack_store_kind, base, request))
            group.adopt(srv.proc)
            running = Stack(srv, owner=group)
            running.start_agent("local", stack_workers, *stack_agent_args)
            yield running
        finally:
            group.close_and_check()
