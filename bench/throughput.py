"""End-to-end throughput and single-task round trip, through real processes.

Starts a real server (durable SQLite store in a temporary folder, or the PostgreSQL
database ``--db`` names) and a real agent
with ``--workers`` worker processes on loopback, then measures:

* ``tasks_per_s``: ``submit_batch`` of ``-n`` no-op tasks from one client until every
  result is back at that client;
* ``executor_tasks_per_s``: the same ``-n`` tasks through ``Executor.submit``, one call
  per task from one thread, until every future is done (and ``executor_rtt_p50_ms`` /
  ``executor_rtt_p99_ms``: one task alone through the Executor, 100 times);
* ``rtt_p50_ms`` (also ``rtt_median_ms``), ``rtt_p90_ms``, ``rtt_p99_ms``: one task
  submitted and awaited alone with ``AsyncClient``, ``--rtt`` times;
* ``cpu_us_per_task``: CPU microseconds per task of the server, the agent, its workers
  and the client, for each of the three runs (``batch``, ``executor``, ``rtt``), with the
  server's event-loop thread alone as ``server_loop`` (the rest of ``server`` is its store
  writer thread and gRPC's threads);
* ``cpu_s``: CPU seconds of each process over the whole measurement.

With ``--legs`` it also reports ``rtt_legs_ms``: where a lone task's time goes, as the
median of each leg between the client's clock and the server's transition stamps.

With ``--metrics`` the server and the agent serve Prometheus metrics (on free loopback
ports) and a thread scrapes both every ``--scrape-interval`` seconds while measuring, to
price the metrics against a run without them.

With ``--profile DIR`` py-spy records the server and the agent (with its workers) as
collapsed stacks in DIR while measuring; sampling slows every process, so figures from
a profiled run are not comparable with others.

Prints one JSON line. Example: ``python bench/throughput.py -n 20000``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any, Self


def noop(i: int) -> int:
    return i


def _start(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "heartline", *args],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit(f"bench: {what} not ready within {timeout}s")
        time.sleep(0.05)


def _cpu_seconds(pid: int, stat: str | None = None) -> float:
    """User + system CPU seconds of a live process (Linux /proc), 0 where unavailable;
    ``stat`` names another stat file (a thread's)."""
    try:
        fields = Path(stat or f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _children(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                kids.append(int(stat.parent.name))
        except (OSError, ValueError, IndexError):
            continue
    return kids


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class _Meter:
    """CPU seconds of every process of the run, between two marks, per task.

    ``sample()`` reads the server, the agent, its workers (the children alive at start)
    and this process (the client, all its threads); ``per_task`` turns the difference of
    two samples into microseconds per task per process.
    """

    def __init__(self, pids: dict[str, int], workers: list[int]) -> None:
        self._pids = pids
        self._workers = workers

    def sample(self) -> dict[str, float]:
        cpu = {name: _cpu_seconds(pid) for name, pid in self._pids.items()}
        # The server's event loop thread alone (its thread id is its pid); the rest of
        # "server" is the store's writer thread and gRPC's own threads.
        server = self._pids["server"]
        cpu["server_loop"] = _cpu_seconds(server, f"/proc/{server}/task/{server}/stat")
        cpu["workers"] = sum(_cpu_seconds(p) for p in self._workers)
        cpu["client"] = time.process_time()
        return cpu

    @staticmethod
    def per_task(before: dict[str, float], after: dict[str, float], n: int) -> dict[str, float]:
        return {k: round((after[k] - before[k]) * 1e6 / n, 1) for k in before}


def _pct(values: list[float], q: float) -> float:
    """The q-th percentile (0..100) of values, nearest rank, in milliseconds."""
    ordered = sorted(values)
    rank = min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))
    return round(ordered[rank] * 1000, 3)


async def _measure_batch(
    client, n: int, batch: int, meter: _Meter
) -> tuple[dict[str, float], dict[str, float]]:
    """The ``submit_batch`` path: figures, and CPU microseconds per task per process."""
    # Warm up: function registration, the watch stream, worker imports.
    warm = await client.submit_batch("local", [(noop, (i,), {}) for i in range(200)])
    await asyncio.gather(*(client.get_result(t, timeout=60) for t in warm))

    cpu0 = meter.sample()
    start = time.perf_counter()
    ids: list[str] = []
    for lo in range(0, n, batch):
        ids += await client.submit_batch(
            "local", [(noop, (i,), {}) for i in range(lo, min(n, lo + batch))]
        )
    submitted = time.perf_counter()
    results = await asyncio.gather(*(client.get_result(t, timeout=600) for t in ids))
    elapsed = time.perf_counter() - start
    cpu = meter.per_task(cpu0, meter.sample(), n)
    if results != list(range(n)):
        raise SystemExit("bench: wrong results")
    return {
        "tasks_per_s": round(n / elapsed, 1),
        "submit_s": round(submitted - start, 3),
        "total_s": round(elapsed, 3),
    }, cpu


def _measure_executor(
    address: str, n: int, token: str | None, meter: _Meter
) -> tuple[dict[str, float], dict[str, float]]:
    """The ``Executor.submit`` path, one call per task from one thread, as a user would."""
    from heartline import Executor

    with Executor("local", address, token=token) as ex:
        warm = [ex.submit(noop, i) for i in range(200)]
        for fut in warm:
            fut.result(timeout=60)
        cpu0 = meter.sample()
        start = time.perf_counter()
        futures = [ex.submit(noop, i) for i in range(n)]
        submitted = time.perf_counter()
        results = [fut.result(timeout=600) for fut in futures]
        elapsed = time.perf_counter() - start
        cpu = meter.per_task(cpu0, meter.sample(), n)
        if results != list(range(n)):
            raise SystemExit("bench: wrong results (executor)")
        # One task alone through the Executor (its batching must not add latency).
        rtts = []
        for i in range(100):
            t0 = time.perf_counter()
            ex.submit(noop, i).result(timeout=60)
            rtts.append(time.perf_counter() - t0)
    return {
        "executor_tasks_per_s": round(n / elapsed, 1),
        "executor_submit_s": round(submitted - start, 3),
        "executor_total_s": round(elapsed, 3),
        "executor_rtt_p50_ms": _pct(rtts, 50),
        "executor_rtt_p99_ms": _pct(rtts, 99),
    }, cpu


def _legs(rows: list[tuple[float, float, float, object]]) -> dict[str, float]:
    """Median milliseconds of each leg of a lone task's round trip.

    ``rows`` holds, per task, the client's wall-clock times (call made, submit answered,
    result in hand) and its Task with history. The server stamps each transition; the
    legs are client call -> first stamp, stamp to stamp (by the state reached), and
    submit answered / result in hand against the stamps before them.
    """
    legs: dict[str, list[float]] = {}

    def add(name: str, seconds: float) -> None:
        legs.setdefault(name, []).append(seconds)

    for called, answered, done, task in rows:
        stamps = [(t.to_state.value, t.time.timestamp()) for t in task.history if t.time]
        if not stamps:
            continue
        add("client->" + stamps[0][0], stamps[0][1] - called)
        for (_, a), (state, b) in itertools.pairwise(stamps):
            add("->" + state, b - a)
        add("first stamp->submit answered", answered - stamps[0][1])
        add("last stamp->client has result", done - stamps[-1][1])
    return {name: round(statistics.median(v) * 1000, 3) for name, v in legs.items()}


async def _measure_rtt(
    client, rtt_count: int, meter: _Meter, legs: bool
) -> tuple[dict[str, Any], dict[str, float]]:
    """One task submitted and awaited alone, ``rtt_count`` times."""
    rtts = []
    rows = []
    cpu0 = meter.sample()
    for i in range(rtt_count):
        t0 = time.perf_counter()
        w0 = time.time()
        tid = await client.submit("local", noop, i)
        w1 = time.time()
        await client.get_result(tid, timeout=60)
        w2 = time.time()
        rtts.append(time.perf_counter() - t0)
        rows.append((w0, w1, w2, tid))
    cpu = meter.per_task(cpu0, meter.sample(), rtt_count)
    figures: dict[str, Any] = {
        "rtt_median_ms": round(statistics.median(rtts) * 1000, 3),
        "rtt_p50_ms": _pct(rtts, 50),
        "rtt_p90_ms": round(statistics.quantiles(rtts, n=10)[-1] * 1000, 3),
        "rtt_p99_ms": _pct(rtts, 99),
    }
    if legs:
        tasks = await client.get_tasks([r[3] for r in rows], history=True)
        figures["rtt_legs_ms"] = _legs([(*r[:3], t) for r, t in zip(rows, tasks)])
    return figures, cpu


def _measure(
    address: str,
    n: int,
    batch: int,
    rtt_count: int,
    token: str | None,
    meter: _Meter,
    legs: bool,
) -> dict[str, Any]:
    from heartline import AsyncClient

    cpu0 = time.process_time()

    async def batch_path() -> tuple[dict[str, float], dict[str, float]]:
        async with AsyncClient(address, token=token) as client:
            return await _measure_batch(client, n, batch, meter)

    async def rtt_path() -> tuple[dict[str, Any], dict[str, float]]:
        async with AsyncClient(address, token=token) as client:
            # Warm up this client's watch stream and function registration.
            await client.get_result(await client.submit("local", noop, 0), timeout=60)
            return await _measure_rtt(client, rtt_count, meter, legs)

    figures, batch_cpu = asyncio.run(batch_path())
    executor, executor_cpu = _measure_executor(address, n, token, meter)
    rtt, rtt_cpu = asyncio.run(rtt_path())
    return {
        "client_cpu_s": round(time.process_time() - cpu0, 2),
        **figures,
        **executor,
        **rtt,
        "cpu_us_per_task": {"batch": batch_cpu, "executor": executor_cpu, "rtt": rtt_cpu},
    }


def _profile(folder: Path | None, pids: dict[str, int]) -> list[subprocess.Popen[bytes]]:
    """Starts one ``py-spy record`` per process (and its children), stopped by SIGINT."""
    if folder is None:
        return []
    folder.mkdir(parents=True, exist_ok=True)
    spy = Path(sys.executable).with_name("py-spy")
    return [
        subprocess.Popen(
            [
                str(spy),
                "record",
                "--pid",
                str(pid),
                "--subprocesses",
                "--threads",
                "--rate",
                "250",
                "--format",
                "raw",
                "--output",
                str(folder / f"{name}.txt"),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for name, pid in pids.items()
    ]


class _Scraper:
    """Scrapes URLs every ``interval`` seconds on a thread, like a (busy) Prometheus."""

    def __init__(self, urls: list[str], interval: float) -> None:
        self.urls = urls
        self.interval = interval
        self.scrapes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Self:
        if self.urls:
            self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        if self.urls:
            self._thread.join()

    def _run(self) -> None:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        while not self._stop.wait(self.interval):
            for url in self.urls:
                with opener.open(url, timeout=10) as reply:
                    reply.read()
                self.scrapes += 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=20_000, help="tasks in the throughput run")
    parser.add_argument("--batch", type=int, default=1000, help="tasks per submit_batch call")
    parser.add_argument("--rtt", type=int, default=300, help="single-task round trips to time")
    parser.add_argument("--workers", type=int, default=2, help="agent worker processes")
    parser.add_argument(
        "--prefetch", type=int, default=None, help="agent prefetch (default: agent's)"
    )
    parser.add_argument(
        "--executor",
        choices=("process", "dask"),
        default="process",
        help="the agent's engine; dask: on a cluster of a scheduler and --workers one-thread "
        "dask worker processes started here (bench/dask_alone.py measures it without heartline)",
    )
    parser.add_argument("--port", type=int, default=50591, help="loopback port for the server")
    parser.add_argument(
        "--db",
        default=None,
        metavar="URL",
        help="the server's store: a postgresql://... URL of an empty database (default: a "
        "SQLite file in a temporary folder)",
    )
    parser.add_argument("--metrics", action="store_true", help="serve and scrape metrics")
    parser.add_argument("--scrape-interval", type=float, default=1.0, help="seconds per scrape")
    parser.add_argument("--no-auth", action="store_true", help="server --insecure-no-auth")
    parser.add_argument(
        "--profile",
        type=Path,
        default=None,
        help="record py-spy profiles of the server and agent (with its workers) "
        "into this folder, as collapsed stacks",
    )
    parser.add_argument(
        "--legs",
        action="store_true",
        help="also report where a lone task's time goes (median ms per leg, "
        "from the tasks' transition stamps and the client's clock)",
    )
    opts = parser.parse_args()

    with contextlib.ExitStack() as stack:
        tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="heartline-bench-"))
        home = Path(tmp)
        cluster = None
        if opts.executor == "dask":
            from dask_alone import local_cluster  # imports distributed: only when asked

            cluster = stack.enter_context(local_cluster(opts.workers))
        address = f"127.0.0.1:{opts.port}"
        env = {**os.environ, "HEARTLINE_HOME": str(home)}
        metrics = [f"127.0.0.1:{_free_port()}" for _ in (1, 2)] if opts.metrics else []
        server_args = ["server", "--listen", address, "--db", opts.db or str(home / "heartline.db")]
        if metrics:
            server_args += ["--metrics", metrics[0]]
        if opts.no_auth:
            server_args += ["--insecure-no-auth"]
        server = _start(server_args, env, home / "server.log")
        agent = None
        try:
            _wait_for(lambda: "listening on" in (home / "server.log").read_text(), 30, "server")
            agent_args = [
                "endpoint",
                "start",
                "--name",
                "local",
                "--server",
                address,
                "--workers",
                str(opts.workers),
            ]
            if opts.prefetch is not None:
                agent_args += ["--prefetch", str(opts.prefetch)]
            if cluster is not None:
                agent_args += ["--executor", "dask", "--dask-scheduler", cluster.address]
            if metrics:
                agent_args += ["--metrics", metrics[1]]
            agent = _start(agent_args, env, home / "agent.log")
            _wait_for(lambda: "connected" in (home / "agent.log").read_text(), 30, "agent")
            # What runs the tasks: the agent's worker processes, or the Dask cluster's
            # scheduler and workers (counted as "workers").
            workers = list(cluster.pids) if cluster is not None else _children(agent.pid)
            before = [_cpu_seconds(p) for p in (server.pid, agent.pid, *workers)]
            urls = [f"http://{m}/metrics" for m in metrics]
            profilers = _profile(opts.profile, {"server": server.pid, "agent": agent.pid})
            with _Scraper(urls, opts.scrape_interval) as scraper:
                # The admin token the server's first start wrote (none without auth).
                token = None if opts.no_auth else (home / "token").read_text().strip()
                meter = _Meter({"server": server.pid, "agent": agent.pid}, workers)
                figures = _measure(address, opts.n, opts.batch, opts.rtt, token, meter, opts.legs)
            for profiler in profilers:
                profiler.send_signal(signal.SIGINT)
                profiler.wait(timeout=60)
            if metrics:
                figures["scrapes"] = scraper.scrapes
            after = [_cpu_seconds(p) for p in (server.pid, agent.pid, *workers)]
            spent = [round(b - a, 2) for a, b in zip(before, after)]
            # CPU seconds over the whole measurement (throughput and round-trip runs).
            figures["cpu_s"] = {
                "server": spent[0],
                "agent": spent[1],
                "workers": round(sum(spent[2:]), 2),
            }
        finally:
            if agent is not None:
                _stop(agent)
            _stop(server)
    print(
        json.dumps(
            {
                "bench": "throughput",
                "n": opts.n,
                "workers": opts.workers,
                "executor": opts.executor,
                "durable_store": True,
                "store": "postgresql" if opts.db else "sqlite",
                "metrics": opts.metrics,
                "auth": not opts.no_auth,
                **figures,
                "cpus": os.cpu_count(),
                "python": platform.python_version(),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
