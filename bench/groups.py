"""Groups end to end, through real processes, beside plain tasks in the same run.

Starts a real server (durable SQLite store in a temporary folder) and a real agent with
``--workers`` worker processes on loopback, then measures, each ``--repeat`` times
(medians are printed):

* ``store_group_s``: one group of ``--store-n`` tasks submitted in one call to an
  endpoint without agents, until the call returns (the group is stored);
* ``wide_tasks_per_s``: a group of ``-n`` independent no-op tasks, submitted and awaited
  (``wait_group``), and ``plain_tasks_per_s``: ``submit_batch`` of the same ``-n``
  tasks, all results back; ``wide_vs_plain`` is their ratio;
* ``chain_tasks_per_s``: a group of ``--chain`` tasks, each taking the previous one's
  result (so they run one after another).

Prints one JSON line. Example: ``python bench/groups.py -n 5000``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from throughput import _start, _stop, _wait_for  # a sibling script


def noop(i: int) -> int:
    return i


def inc(x: int) -> int:
    return x + 1


async def _store_group(client, n: int) -> float:
    from heartline import Group

    g = Group("store", endpoint="offline")
    for i in range(n):
        g.task(f"t{i}", noop, i)
    start = time.perf_counter()
    gid = await client.submit_group(g)
    took = time.perf_counter() - start
    await client.cancel_group(gid)
    return took


async def _wide(client, n: int) -> float:
    from heartline import Group

    g = Group("wide", endpoint="local")
    for i in range(n):
        g.task(f"t{i}", noop, i)
    start = time.perf_counter()
    gid = await client.submit_group(g)
    info = await client.wait_group(gid, timeout=600)
    took = time.perf_counter() - start
    if str(info.status) != "Succeeded":
        raise SystemExit(f"bench: the wide group ended {info.status}")
    return n / took


async def _plain(client, n: int, batch: int) -> float:
    start = time.perf_counter()
    ids: list[str] = []
    for lo in range(0, n, batch):
        ids += await client.submit_batch("local", [(noop, (i,), {}) for i in range(lo, min(n, lo + batch))])
    results = await asyncio.gather(*(client.get_result(t, timeout=600) for t in ids))
    took = time.perf_counter() - start
    if results != list(range(n)):
        raise SystemExit("bench: wrong results")
    return n / took


async def _chain(client, n: int) -> float:
    from heartline import Group

    g = Group("chain", endpoint="local")
    ref = g.task("t0", inc, 0)
    for i in range(1, n):
        ref = g.task(f"t{i}", inc, ref)
    start = time.perf_counter()
    gid = await client.submit_group(g)
    info = await client.wait_group(gid, timeout=600)
    took = time.perf_counter() - start
    last = await client.get_result(info.tasks[f"t{n - 1}"].id, timeout=60)
    if last != n:
        raise SystemExit(f"bench: the chain computed {last}, not {n}")
    return n / took


async def _measure(address: str, opts: argparse.Namespace) -> dict[str, float]:
    from heartline import AsyncClient

    runs: dict[str, list[float]] = {"store_group_s": [], "wide": [], "plain": [], "chain": []}
    async with AsyncClient(address) as client:
        # Warm up: function registration, the watch stream, worker imports.
        await _plain(client, 200, 200)
        await _wide(client, 200)
        for _ in range(opts.repeat):
            runs["store_group_s"].append(await _store_group(client, opts.store_n))
            runs["plain"].append(await _plain(client, opts.n, opts.batch))
            runs["wide"].append(await _wide(client, opts.n))
            runs["chain"].append(await _chain(client, opts.chain))
    med = {k: statistics.median(v) for k, v in runs.items()}
    return {
        "store_group_s": round(med["store_group_s"], 3),
        "wide_tasks_per_s": round(med["wide"], 1),
        "plain_tasks_per_s": round(med["plain"], 1),
        "wide_vs_plain": round(med["wide"] / med["plain"], 3),
        "chain_tasks_per_s": round(med["chain"], 1),
        "runs": {k: [round(x, 3) for x in v] for k, v in runs.items()},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=5000, help="tasks of the wide group and the plain batch")
    parser.add_argument("--store-n", type=int, default=10_000, help="tasks of the group timed to stored")
    parser.add_argument("--chain", type=int, default=1000, help="tasks of the chain")
    parser.add_argument("--batch", type=int, default=1000, help="tasks per submit_batch call")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each measure (medians)")
    parser.add_argument("--workers", type=int, default=2, help="agent worker processes")
    parser.add_argument("--port", type=int, default=50593, help="loopback port for the server")
    opts = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="heartline-bench-") as tmp:
        home = Path(tmp)
        address = f"127.0.0.1:{opts.port}"
        env = {**os.environ, "HEARTLINE_HOME": str(home)}
        server = _start(["server", "--listen", address, "--db", str(home / "heartline.db")], env, home / "server.log")
        agent = None
        try:
            _wait_for(lambda: "listening on" in (home / "server.log").read_text(), 30, "server")
            agent_args = ["endpoint", "start", "--name", "local", "--server", address, "--workers", str(opts.workers)]
            agent = _start(agent_args, env, home / "agent.log")
            _wait_for(lambda: "connected" in (home / "agent.log").read_text(), 30, "agent")
            # An endpoint with no agent, for the time-to-stored figure: registered by an
            # agent that then stops.
            offline = _start(["endpoint", "start", "--name", "offline", "--server", address], env, home / "offline.log")
            _wait_for(lambda: "connected" in (home / "offline.log").read_text(), 30, "offline agent")
            _stop(offline)
            figures = asyncio.run(_measure(address, opts))
        finally:
            if agent is not None:
                _stop(agent)
            _stop(server)
    print(
        json.dumps(
            {
                "bench": "groups",
                "n": opts.n,
                "store_n": opts.store_n,
                "chain": opts.chain,
                "workers": opts.workers,
                "repeat": opts.repeat,
                **figures,
                "cpus": os.cpu_count(),
                "python": platform.python_version(),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
