"""Dask alone: ``client.submit`` of no-ops on a Dask cluster, without heartline.

The baseline for ``bench/throughput.py --executor dask``: the same no-op tasks, on the same
kind of cluster, submitted straight to Dask. The difference between the two is what the
server, the stream and the agent add.

Measures, on a scheduler reached at ``--scheduler`` or on a cluster it starts itself (a
``dask scheduler`` and ``--workers`` ``dask worker`` processes on loopback, one thread
each, stopped at the end):

* ``tasks_per_s``: ``-n`` no-ops submitted one ``client.submit`` at a time (``pure=False``,
  each its own key, as the dask engine submits them), until every result is gathered;
* ``batch_tasks_per_s``: the same through one ``client.map``;
* ``rtt_p50_ms`` / ``rtt_p99_ms``: one no-op submitted and awaited alone, ``--rtt`` times.

Prints one JSON line. Example: ``python bench/dask_alone.py -n 5000 --workers 2``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

# Run as a script, this folder comes first on the path, and bench/queue.py (a benchmark)
# would shadow the standard library's queue, which dask imports.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import distributed

_ADDRESS = re.compile(r"tcp://[0-9.]+:[0-9]+")


def noop(i: int) -> int:
    return i


def _wait_for(proc: subprocess.Popen[bytes], log: Path, needle: str, timeout: float = 60.0) -> str:
    """The first line of ``proc``'s log holding ``needle``, polled (bounded)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in log.read_text(errors="replace").splitlines():
            if needle in line:
                return line
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    raise RuntimeError(f"no {needle!r} from pid {proc.pid}:\n{log.read_text(errors='replace')}")


@dataclasses.dataclass(frozen=True)
class Cluster:
    """A cluster of processes started here: its scheduler's address and every pid."""

    address: str
    pids: tuple[int, ...]


@contextlib.contextmanager
def local_cluster(workers: int) -> Iterator[Cluster]:
    """A scheduler and ``workers`` one-thread workers as processes, stopped on the way out."""
    procs: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory(prefix="dask-alone-") as folder:

        def start(name: str, *args: str) -> tuple[subprocess.Popen[bytes], Path]:
            log = Path(folder) / f"{name}.log"
            with log.open("wb") as out:
                proc = subprocess.Popen(
                    [sys.executable, "-m", *args],
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                )
            procs.append(proc)
            return proc, log

        try:
            scheduler, log = start(
                "scheduler",
                "distributed.cli.dask_scheduler",
                "--host",
                "127.0.0.1",
                "--port",
                "0",
                "--no-dashboard",
            )
            match = _ADDRESS.search(_wait_for(scheduler, log, "Scheduler at:"))
            assert match is not None
            address = match.group(0)
            started = [
                start(
                    f"worker-{i}",
                    "distributed.cli.dask_worker",
                    address,
                    "--nthreads",
                    "1",
                    "--no-nanny",
                    "--host",
                    "127.0.0.1",
                    "--no-dashboard",
                )
                for i in range(workers)
            ]
            for worker, log in started:
                _wait_for(worker, log, "Registered to:")
            yield Cluster(address, tuple(p.pid for p in procs))
        finally:
            for proc in reversed(procs):
                proc.terminate()
            for proc in procs:
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


async def measure(address: str, n: int, rtt: int) -> dict[str, float]:
    async with distributed.Client(address, asynchronous=True) as client:
        await client.submit(noop, -1, pure=False)  # warm: the function reaches the workers

        started = time.perf_counter()
        futures = [client.submit(noop, i, pure=False) for i in range(n)]
        await client.gather(futures)
        one_by_one = time.perf_counter() - started
        del futures

        started = time.perf_counter()
        await client.gather(client.map(noop, range(n), pure=False))
        batched = time.perf_counter() - started

        trips = []
        for i in range(rtt):
            t0 = time.perf_counter()
            await client.submit(noop, i, pure=False)
            trips.append((time.perf_counter() - t0) * 1000)
    quantiles = statistics.quantiles(trips, n=100)
    return {
        "tasks_per_s": round(n / one_by_one, 1),
        "batch_tasks_per_s": round(n / batched, 1),
        "rtt_p50_ms": round(statistics.median(trips), 3),
        "rtt_p99_ms": round(quantiles[98], 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=5000, help="no-op tasks per run")
    parser.add_argument("--rtt", type=int, default=200, help="lone round trips to time")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--scheduler", help="tcp://HOST:PORT of a running scheduler")
    args = parser.parse_args()
    with contextlib.ExitStack() as stack:
        address = args.scheduler or stack.enter_context(local_cluster(args.workers)).address
        figures = asyncio.run(measure(address, args.n, args.rtt))
    print(
        json.dumps(
            {
                "bench": "dask_alone",
                "n": args.n,
                "workers": None if args.scheduler else args.workers,
                "scheduler": args.scheduler or "local processes",
                "distributed": distributed.__version__,
                "python": platform.python_version(),
                **figures,
            }
        )
    )


if __name__ == "__main__":
    main()
