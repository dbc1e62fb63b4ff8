"""Soak: does a long run of all-new functions keep the server's and the agent's memory flat?

Starts a real server (durable SQLite store in a temporary folder) and a real agent with
``--workers`` worker processes on loopback, then submits ``-n`` tasks in ``submit_batch``
calls of ``--batch``, each task with a function of its own (a new closure, so a new
function id: registered, stored, sent to the agent and to a worker once each). At most
``--window`` batches are in flight; the client waits for the oldest batch's results
before it submits more. Every ``--every`` settled tasks it samples the resident memory
(VmRSS) of the server, the agent, its workers and itself.

Prints one JSON line: the RSS series in MiB, the growth of each series after the
``--flat-after`` mark, tasks/s and elapsed time. Every wait is bounded (``--timeout`` for
the whole run); the processes are stopped by PID. Example: ``python bench/soak.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import _children, _start, _stop, _wait_for  # a sibling script


def make(i: int) -> Callable[[int], int]:
    """A new closure, so a new function payload and id, for every task."""
    return lambda x: x + i


def _rss_mib(pid: int) -> float | None:
    """Resident memory of a live process in MiB (Linux /proc), None when it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None


async def _soak(
    address: str, opts: argparse.Namespace, pids: dict[str, Any], db: Path
) -> dict[str, Any]:
    from heartline import AsyncClient

    n, batch, every = opts.n, opts.batch, opts.every
    deadline = time.monotonic() + opts.timeout
    series: dict[str, list[float | None]] = {
        "server": [], "agent": [], "workers": [], "client": []
    }  # fmt: skip
    marks: list[int] = []
    db_mib: list[float] = []
    settled = 0
    in_flight: collections.deque[tuple[int, list[str]]] = collections.deque()

    def sample() -> None:
        marks.append(settled)
        series["server"].append(_rss_mib(pids["server"]))
        series["agent"].append(_rss_mib(pids["agent"]))
        workers = [_rss_mib(p) for p in pids["workers"]]
        series["workers"].append(round(sum(w for w in workers if w is not None), 1))
        series["client"].append(_rss_mib(os.getpid()))
        size = sum(p.stat().st_size for p in db.parent.glob(db.name + "*") if p.is_file())
        db_mib.append(round(size / 2**20, 1))

    async def settle_oldest() -> None:
        nonlocal settled
        lo, ids = in_flight.popleft()
        left = max(1.0, deadline - time.monotonic())
        results = await asyncio.gather(*(client.get_result(t, timeout=left) for t in ids))
        if results != [2 * i for i in range(lo, lo + len(ids))]:
            raise SystemExit(f"soak: wrong results in the batch from task {lo}")
        before = settled
        settled += len(ids)
        if settled // every > before // every:
            sample()

    async with AsyncClient(address) as client:
        start = time.perf_counter()
        for lo in range(0, n, batch):
            if time.monotonic() > deadline:
                raise SystemExit(f"soak: past --timeout {opts.timeout}s after {settled} tasks")
            calls = [(make(i), (i,), {}) for i in range(lo, min(n, lo + batch))]
            in_flight.append((lo, await client.submit_batch("local", calls)))
            del calls  # the closures go; the client's weakly keyed cache lets them
            while len(in_flight) > opts.window:
                await settle_oldest()
        while in_flight:
            await settle_oldest()
        elapsed = time.perf_counter() - start
    if not marks or marks[-1] != settled:
        sample()
    return {
        "tasks_per_s": round(n / elapsed, 1),
        "elapsed_s": round(elapsed, 1),
        "marks": marks,
        "rss_mib": series,
        "db_mib": db_mib,
    }


def _growth(marks: list[int], values: list[float | None], after: int) -> float | None:
    """MiB gained from the first sample at or past ``after`` to the last sample."""
    kept = [v for m, v in zip(marks, values) if m >= after and v is not None]
    return round(kept[-1] - kept[0], 1) if len(kept) >= 2 else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=200_000, help="tasks, each with its own function")
    parser.add_argument("--batch", type=int, default=1000, help="tasks per submit_batch call")
    parser.add_argument("--window", type=int, default=4, help="batches in flight at most")
    parser.add_argument("--every", type=int, default=25_000, help="settled tasks per RSS sample")
    parser.add_argument("--flat-after", type=int, default=50_000, help="growth is measured after this")
    parser.add_argument("--workers", type=int, default=2, help="agent worker processes")
    parser.add_argument("--port", type=int, default=50593, help="loopback port for the server")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds for the whole run")
    opts = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="heartline-soak-") as tmp:
        home = Path(tmp)
        os.environ["HEARTLINE_HOME"] = str(home)  # this client reads its token there too
        address = f"127.0.0.1:{opts.port}"
        env = {**os.environ, "HEARTLINE_HOME": str(home)}
        db = home / "heartline.db"
        server = _start(["server", "--listen", address, "--db", str(db)], env, home / "server.log")
        agent = None
        try:
            _wait_for(lambda: "listening on" in (home / "server.log").read_text(), 30, "server")
            agent_args = ["endpoint", "start", "--name", "local", "--server", address,
                          "--workers", str(opts.workers)]  # fmt: skip
            agent = _start(agent_args, env, home / "agent.log")
            _wait_for(lambda: "connected" in (home / "agent.log").read_text(), 30, "agent")
            _wait_for(lambda: len(_children(agent.pid)) >= opts.workers, 30, "workers")
            pids = {"server": server.pid, "agent": agent.pid, "workers": _children(agent.pid)}
            figures = asyncio.run(_soak(address, opts, pids, db))
        finally:
            if agent is not None:
                _stop(agent)
            _stop(server)
    marks = figures["marks"]
    figures["growth_after_mib"] = {
        name: _growth(marks, values, opts.flat_after) for name, values in figures["rss_mib"].items()
    }
    print(
        json.dumps(
            {
                "bench": "soak",
                "n": opts.n,
                "distinct_functions": opts.n,
                "batch": opts.batch,
                "window": opts.window,
                "workers": opts.workers,
                "flat_after": opts.flat_after,
                **figures,
                "cpus": os.cpu_count(),
                "python": platform.python_version(),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
