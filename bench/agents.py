"""Ten thousand agents on one server: connecting, idling, serving no-ops, and churning.

Starts a real server (durable SQLite store in a temporary folder, authentication on: the
admin token its first start writes) and ``--procs`` processes of simulated agents
(``tests/simagents.py``: the Connect protocol of the real agent, without workers) that
share ``--agents`` agents over ``--endpoints`` endpoints, ``--per-channel`` agents per
TCP connection. Then measures, in order:

* ``connect_s``: from starting the agents' processes until every agent has its welcome
  (``sim_connect_s``: each process's own count, without its start-up), and
  ``agents_online`` as GetStats says (it must equal ``--agents``);
* idle, over ``--idle-seconds`` with nothing but heartbeats, after ``--settle-seconds``
  (agents told a longer interval while connecting take it up): the server's CPU
  (``/proc/PID/stat``, utime + stime) as ``idle_cpu_pct`` (percent of one core),
  ``idle_cpu_us_per_agent_s`` and ``cpu_us_per_heartbeat`` (heartbeats the agents sent
  in the same window; ``_net``: less ``baseline_cpu_pct``, the server's CPU alone for a
  few seconds before any agent came);
* ``list_endpoints_page_ms``: one ListEndpoints call as grpcurl makes it (its first page:
  100 endpoints, or fewer holding 1,000 agents at most), and ``list_endpoints_all_ms``:
  the whole list through ``AsyncClient.list_endpoints`` (every page, each endpoint and
  agent made a Python object), admin token, 5 times each: the median and each;
* load: ``--tasks`` no-op tasks spread evenly over every endpoint (``submit_batch`` per
  endpoint), each "running" ``--task-seconds`` on its agent, from the first submit until
  GetStats counts them all settled: ``tasks_per_s``, ``server_cpu_us_per_task`` (the
  heartbeats' share included), fairness (``tasks_per_agent`` of the agents that lived
  through the whole load: min, median, max) and ``lost`` (tasks not SUCCEEDED at the
  end: must be 0); a sample of results is read back through the client (each no-op
  returns its argument: ``results_ok``);
* churn: with ``--churn F`` (0 to skip), once half the tasks have settled each agents'
  process drops F of its agents as killed agents go (stream cancelled, no goodbye) and
  starts as many new ones; ``churn_recovery_s`` runs from the command until GetStats
  counts ``--agents`` agents online again (``churn_welcomed_s``: until the new agents had
  their welcomes). The dropped agents' unreported tasks must be dispatched again:
  ``lost`` covers them, ``tasks_dispatched - tasks_reported`` counts them;
* what the agents heard: ``sim_settings`` (Settings messages: a server that asks many
  agents for fewer heartbeats) and the heartbeat intervals they end with;
* ``gc_connected`` and ``gc_end``: the server's garbage collections (its
  ``heartline_gc_pause_seconds`` metric) once every agent is connected, and at the end,
  per generation: how many, their total seconds, the bound of the longest's bucket;
* ``server_rss_mib`` (and its peak) at the end; the machine; the arguments.

Prints one JSON line. Bounded by ``--timeout`` seconds; every process it started is
stopped (by PID) before it exits, on error too. Examples::

    python bench/agents.py                                    # 10,000 agents, 1,000 endpoints
    python bench/agents.py --agents 500 --endpoints 50 --tasks 2000 --idle-seconds 5
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import platform
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(_ROOT))  # tests.simagents, and heartline from a checkout

_RESULTS_CHECKED = 20
"""Results read back through the client at the end (each must equal its task's argument)."""
_LIST_ENDPOINTS_CALLS = 5
_POLL = 0.2
"""Seconds between GetStats polls while waiting for tasks or agents."""


def noop(i: int) -> int:
    return i


class BenchError(Exception):
    """The bench could not finish: the reason goes in the JSON line as ``error``."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a live process (0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _rss_mib(pid: int) -> dict[str, float]:
    """VmRSS and VmHWM of a live process, in MiB."""
    out: dict[str, float] = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = round(int(value.split()[0]) / 1024, 1)
    except OSError:
        pass
    return out


def _spread(values: list[int]) -> dict[str, float]:
    if not values:
        return {}
    return {
        "n": len(values),
        "min": min(values),
        "median": statistics.median(values),
        "max": max(values),
        "mean": round(statistics.fmean(values), 2),
    }


def _stop(proc: subprocess.Popen[Any], grace: float) -> int | None:
    """SIGTERM, then SIGKILL after ``grace`` seconds; the exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)
    return proc.returncode


class SimProcess:
    """One process of simulated agents: commands on its stdin, JSON events from its stdout."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path) -> None:
        self.log = log
        self.proc = subprocess.Popen(
            args,
            env=env,
            cwd=_ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log.open("wb"),
            text=True,
        )
        # Appended by the reader thread, taken by the bench's loop (deque ops are atomic).
        self.events: collections.deque[dict[str, Any] | None] = collections.deque()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith("{"):
                self.events.append(json.loads(line))
        self.events.append(None)  # end of output

    def send(self, command: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()

    async def expect(self, event: str, timeout: float) -> dict[str, Any]:
        """The next event, which must be ``event`` (an ``error`` one, or none, raises)."""
        # Polled, not waited for in a thread: nothing is left blocked if this is cancelled.
        deadline = time.monotonic() + timeout
        while True:
            try:
                got = self.events.popleft()
                break
            except IndexError:
                if time.monotonic() > deadline:
                    raise BenchError(
                        f"agents pid {self.proc.pid}: no {event!r} in {timeout:.0f}s"
                    ) from None
                await asyncio.sleep(0.02)
        if got is None or got.get("event") != event:
            tail = self.log.read_text(errors="replace")[-1500:]
            raise BenchError(f"agents pid {self.proc.pid}: wanted {event!r}, got {got}: {tail}")
        return got

    async def command(self, command: str, event: str, timeout: float) -> dict[str, Any]:
        self.send(command)
        return await self.expect(event, timeout)

    def stop(self, grace: float) -> int | None:
        """``stop`` on stdin (a clean close), then signals if it does not exit in time."""
        if self.proc.poll() is None:
            try:
                self.send("stop")
                self.proc.wait(timeout=grace)
            except (OSError, ValueError, subprocess.TimeoutExpired):
                pass
        code = _stop(self.proc, 10)
        if self.proc.stdin is not None:
            try:
                self.proc.stdin.close()
            except OSError:
                pass
        self._reader.join(5)
        return code


class Bench:
    def __init__(self, opts: argparse.Namespace, home: Path) -> None:
        self.opts = opts
        self.home = home
        self.address = f"127.0.0.1:{opts.port or _free_port()}"
        self.metrics = f"127.0.0.1:{_free_port()}"
        self.env = {**os.environ, "HEARTLINE_HOME": str(home)}
        for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "grpc_proxy"):
            self.env.pop(var, None)  # loopback only
        self.env["no_proxy"] = "127.0.0.1,localhost"
        self.deadline = time.monotonic() + opts.timeout
        self.server: subprocess.Popen[bytes] | None = None
        self.sims: list[SimProcess] = []
        self.token = ""

    def left(self) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise BenchError(f"over --timeout {self.opts.timeout:g}s")
        return left

    # -- processes -------------------------------------------------------------------

    def launch_server(self, log: Path) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [
                sys.executable, "-m", "heartline", "server", "--listen", self.address,
                "--db", str(self.home / "heartline.db"),
                "--heartbeat-interval", str(self.opts.heartbeat_interval),
                "--metrics", self.metrics,
            ],
            env=self.env, cwd=_ROOT, stdin=subprocess.DEVNULL,
            stdout=log.open("wb"), stderr=subprocess.STDOUT,
        )  # fmt: skip

    async def start_server(self) -> None:
        log = self.home / "server.log"
        self.server = self.launch_server(log)
        while "listening on" not in log.read_text(errors="replace"):
            if self.server.poll() is not None:
                raise BenchError(
                    f"server exited {self.server.returncode}: {log.read_text()[-2000:]}"
                )
            self.left()
            await asyncio.sleep(0.02)
        self.token = (self.home / "token").read_text().strip()

    def start_sims(self) -> None:
        o = self.opts
        first = 0
        for k in range(o.procs):
            count = o.agents // o.procs + (k < o.agents % o.procs)
            args = [
                sys.executable, "-m", "tests.simagents", "--server", self.address,
                "--token", self.token, "--endpoints", str(o.endpoints), "--agents", str(count),
                "--per-channel", str(o.per_channel), "--capacity", str(o.capacity),
                "--first", str(first), "--prefix", "ep-",
                "--connect-timeout", str(max(1.0, self.left())),
            ]  # fmt: skip
            if o.prefetch is not None:
                args += ["--prefetch", str(o.prefetch)]
            if o.task_seconds > 0:
                args += ["--task-seconds", str(o.task_seconds)]
            self.sims.append(SimProcess(args, self.env, self.home / f"agents-{k}.log"))
            first += count

    def cleanup(self) -> dict[str, Any]:
        codes = [sim.stop(grace=30) for sim in self.sims]
        server_code = _stop(self.server, 30) if self.server is not None else None
        return {"agents_exit_codes": codes, "server_exit_code": server_code}

    # -- measurements ----------------------------------------------------------------

    async def sims_stats(self) -> list[dict[str, Any]]:
        return list(
            await asyncio.gather(*(s.command("stats", "stats", self.left()) for s in self.sims))
        )

    async def wait_agents_online(self, client: Any, want: int) -> int:
        while True:
            online = (await client.stats()).agents_online
            if online == want:
                return online
            if time.monotonic() + _POLL > self.deadline:
                raise BenchError(f"GetStats counts {online} agents online, want {want}")
            await asyncio.sleep(_POLL)

    async def baseline(self) -> float:
        """The server's CPU (percent of one core) with no agent, over a few seconds."""
        assert self.server is not None
        wall = min(self.opts.idle_seconds, 5.0)
        t0, cpu0 = time.monotonic(), _cpu_seconds(self.server.pid)
        await asyncio.sleep(min(wall, self.left()))
        return round(100 * (_cpu_seconds(self.server.pid) - cpu0) / (time.monotonic() - t0), 2)

    async def idle(self, baseline_pct: float) -> dict[str, Any]:
        assert self.server is not None
        # The welcomes' aftermath settles, and the agents told a longer heartbeat interval
        # while they connected take it up (each after the sleep it was in).
        await asyncio.sleep(min(self.opts.settle_seconds, self.left()))
        before = sum(s["heartbeats"] for s in await self.sims_stats())
        t0, cpu0 = time.monotonic(), _cpu_seconds(self.server.pid)
        await asyncio.sleep(min(self.opts.idle_seconds, self.left()))
        cpu1, t1 = _cpu_seconds(self.server.pid), time.monotonic()
        beats = sum(s["heartbeats"] for s in await self.sims_stats()) - before
        cpu, wall = cpu1 - cpu0, t1 - t0
        net = max(0.0, cpu - baseline_pct / 100 * wall)  # less what the server spends alone
        return {
            "idle_s": round(wall, 2),
            "idle_cpu_pct": round(100 * cpu / wall, 2),
            "idle_cpu_us_per_agent_s": round(cpu * 1e6 / (self.opts.agents * wall), 2),
            "idle_heartbeats": beats,
            "heartbeats_per_s": round(beats / wall, 1),
            "cpu_us_per_heartbeat": round(cpu * 1e6 / beats, 1) if beats else None,
            "cpu_us_per_heartbeat_net": round(net * 1e6 / beats, 1) if beats else None,
        }

    async def list_endpoints(self, client: Any) -> dict[str, Any]:
        """One ListEndpoints call as grpcurl makes it (the first page, 100 endpoints or
        1,000 agents at most), and the whole list as the client reads it (every page,
        each endpoint and agent made a Python object)."""
        import grpc

        from heartline import _defaults
        from heartline.v1 import task_service_pb2, task_service_pb2_grpc

        page, whole, agents, paged = [], [], 0, 0
        metadata = _defaults.bearer_metadata(self.token)
        async with grpc.aio.insecure_channel(self.address) as channel:
            stub = task_service_pb2_grpc.TaskServiceStub(channel)
            for _ in range(_LIST_ENDPOINTS_CALLS):
                self.left()
                t0 = time.perf_counter()
                reply = await stub.ListEndpoints(
                    task_service_pb2.ListEndpointsRequest(), metadata=metadata
                )
                page.append(round((time.perf_counter() - t0) * 1000, 1))
                paged = sum(len(e.agents) for e in reply.endpoints)
        for _ in range(_LIST_ENDPOINTS_CALLS):
            self.left()
            t0 = time.perf_counter()
            endpoints = await client.list_endpoints()
            whole.append(round((time.perf_counter() - t0) * 1000, 1))
            agents = sum(len(e.agents) for e in endpoints)
        return {
            "list_endpoints_page_ms": {"median": statistics.median(page), "all": page},
            "list_endpoints_page_agents": paged,
            "list_endpoints_all_ms": {"median": statistics.median(whole), "all": whole},
            "list_endpoints_agents": agents,
        }

    def gc_pauses(self) -> dict[str, Any]:
        """The server's garbage collections so far, per generation: how many, their
        total seconds, and the bucket bound of the longest (heartline_gc_pause_seconds)."""
        import urllib.request

        from prometheus_client.parser import text_string_to_metric_families

        with urllib.request.urlopen(f"http://{self.metrics}/metrics", timeout=30) as reply:
            text = reply.read().decode()
        out: dict[str, Any] = {}
        for family in text_string_to_metric_families(text):
            if family.name != "heartline_gc_pause_seconds":
                continue
            for sample in family.samples:
                gen = out.setdefault(sample.labels["generation"], {"longest_le": 0.0})
                if sample.name.endswith("_count"):
                    gen["count"] = int(sample.value)
                elif sample.name.endswith("_sum"):
                    gen["total_s"] = round(sample.value, 3)
            below = {}
            for sample in family.samples:
                if sample.name.endswith("_bucket"):
                    below.setdefault(sample.labels["generation"], []).append(
                        (float(sample.labels["le"]), sample.value)
                    )
            for gen, buckets in below.items():
                buckets.sort()
                total = buckets[-1][1]
                # The smallest bound that holds every collection.
                out[gen]["longest_le"] = next(le for le, n in buckets if n == total)
        return out

    async def churn(self, client: Any) -> dict[str, Any]:
        t0 = time.monotonic()
        fraction = f"churn {self.opts.churn}"
        events = await asyncio.gather(
            *(s.command(fraction, "churned", self.left()) for s in self.sims)
        )
        welcomed = time.monotonic() - t0
        await self.wait_agents_online(client, self.opts.agents)
        return {
            "churn_dropped": sum(e["dropped"] for e in events),
            "churn_welcomed_s": round(welcomed, 3),
            "churn_recovery_s": round(time.monotonic() - t0, 3),
        }

    async def load(self, client: Any) -> dict[str, Any]:
        from heartline import TaskState

        assert self.server is not None
        o = self.opts
        names = [f"ep-{i}" for i in range(o.endpoints)]
        per = [o.tasks // o.endpoints + (i < o.tasks % o.endpoints) for i in range(o.endpoints)]
        submitted: list[tuple[str, int]] = []
        limit = asyncio.Semaphore(8)
        pending_states = {s.value for s in TaskState if s.pending}
        out: dict[str, Any] = {}
        churn: asyncio.Task[dict[str, Any]] | None = None
        settled_at: float | None = None
        cpu1 = 0.0

        async def submit(name: str, lo: int, n: int) -> None:
            async with limit:
                args = list(range(lo, lo + n))
                ids = await client.submit_batch(name, [(noop, (i,), {}) for i in args])
                submitted.extend(zip(ids, args, strict=True))

        t0, cpu0 = time.monotonic(), _cpu_seconds(self.server.pid)
        starts = [sum(per[:i]) for i in range(len(per))]
        await asyncio.gather(*(submit(n, lo, k) for n, lo, k in zip(names, starts, per) if k))
        out["submit_s"] = round(time.monotonic() - t0, 3)
        try:
            while True:
                stats = await client.stats()
                pending = sum(n for s, n in stats.tasks_by_state.items() if s in pending_states)
                settled = sum(stats.tasks_by_state.values()) - pending
                if churn is None and o.churn > 0 and settled >= o.tasks / 2:
                    churn = asyncio.ensure_future(self.churn(client))
                if pending == 0 and settled_at is None:
                    # Within a poll of the last task's settling; the churn may go on.
                    settled_at, cpu1 = time.monotonic(), _cpu_seconds(self.server.pid)
                if settled_at is not None and (churn is None or churn.done()):
                    break
                if time.monotonic() + _POLL > self.deadline:
                    raise BenchError(
                        f"{pending} of {o.tasks} tasks pending at the timeout"
                        + ("" if churn is None or churn.done() else "; the churn is not over")
                    )
                await asyncio.sleep(_POLL)
        finally:
            if churn is not None and not churn.done():
                churn.cancel()
        wall = settled_at - t0
        out.update(
            {
                "load_s": round(wall, 3),
                "tasks_per_s": round(o.tasks / wall, 1),
                "server_cpu_us_per_task": round((cpu1 - cpu0) * 1e6 / o.tasks, 1),
                "server_cpu_pct_under_load": round(100 * (cpu1 - cpu0) / wall, 1),
            }
        )
        if churn is not None:
            out.update(churn.result())
        final = (await client.stats()).tasks_by_state
        succeeded = final.get(TaskState.SUCCEEDED.value, 0)
        out["lost"] = o.tasks - succeeded
        out["tasks_by_state"] = {s: n for s, n in final.items() if n}
        sample = random.sample(submitted, min(_RESULTS_CHECKED, len(submitted)))
        results = await asyncio.gather(
            *(client.get_result(tid, timeout=self.left()) for tid, _ in sample)
        )
        out["results_ok"] = all(r == i for r, (_, i) in zip(results, sample, strict=True))
        return out

    def fairness(self, stats: list[dict[str, Any]], dropped: list[int]) -> dict[str, Any]:
        """Tasks per agent: of the agents that lived through the whole load (the first
        ones each process started, minus those it dropped), of those that replaced the
        dropped ones, and of the dropped ones."""
        whole, replacements, gone = [], [], []
        for figures, n in zip(stats, dropped, strict=True):
            counts = figures["tasks_per_agent"]
            whole += counts[: len(counts) - n]
            replacements += counts[len(counts) - n :]
            gone += figures["tasks_per_dropped_agent"]
        reported = sum(whole) + sum(replacements) + sum(gone)
        return {
            "tasks_per_agent": _spread(whole),
            "tasks_per_replacement_agent": _spread(replacements),
            "tasks_per_dropped_agent": _spread(gone),
            "agents_without_a_task": sum(1 for c in whole if c == 0),
            "tasks_dispatched": sum(s["tasks_received"] for s in stats),
            "tasks_reported": reported,
            "sim_reconnects": sum(s["reconnects"] for s in stats),
            "sim_welcome_timeouts": sum(s["welcome_timeouts"] for s in stats),
            # Settings messages (a server that asks many agents for fewer heartbeats)
            # and the heartbeat intervals the agents end with: {seconds: agents}.
            "sim_settings": sum(s.get("settings", 0) for s in stats),
            "heartbeat_intervals": dict(
                sum(
                    (collections.Counter(s.get("heartbeat_intervals", {})) for s in stats),
                    collections.Counter(),
                )
            ),
            "sim_last_disconnect": next(
                (s["last_disconnect"] for s in stats if s["last_disconnect"]), None
            ),
        }

    async def run(self) -> dict[str, Any]:
        from heartline import AsyncClient

        out: dict[str, Any] = {}
        await self.start_server()
        assert self.server is not None
        out["baseline_cpu_pct"] = await self.baseline()
        t0 = time.monotonic()
        self.start_sims()
        ready = [await sim.expect("ready", self.left()) for sim in self.sims]
        out["connect_s"] = round(time.monotonic() - t0, 3)
        out["sim_connect_s"] = [r["connect_s"] for r in ready]
        out["channels"] = sum(r["channels"] for r in ready)
        async with AsyncClient(self.address, token=self.token) as client:
            out["agents_online"] = await self.wait_agents_online(client, self.opts.agents)
            out["online_s"] = round(time.monotonic() - t0, 3)
            out["rss_connected_mib"] = _rss_mib(self.server.pid).get("VmRSS")
            out["gc_connected"] = self.gc_pauses()
            out.update(await self.idle(out["baseline_cpu_pct"]))
            out.update(await self.list_endpoints(client))
            out.update(await self.load(client))
            out["gc_end"] = self.gc_pauses()
        stats = await self.sims_stats()
        out.update(self.fairness(stats, [len(s["tasks_per_dropped_agent"]) for s in stats]))
        rss = _rss_mib(self.server.pid)
        out["server_rss_mib"] = rss.get("VmRSS")
        out["server_peak_rss_mib"] = rss.get("VmHWM")
        return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", type=int, default=10_000, help="simulated agents in all")
    parser.add_argument("--endpoints", type=int, default=1_000, help="endpoints they serve")
    parser.add_argument("--procs", type=int, default=2, help="processes of simulated agents")
    parser.add_argument("--per-channel", type=int, default=100, help="agents per connection")
    parser.add_argument("--capacity", type=int, default=2, help="capacity each agent says")
    parser.add_argument(
        "--prefetch", type=int, default=None, help="prefetch each agent says (default: the agent's)"
    )
    parser.add_argument("--tasks", type=int, default=20_000, help="no-op tasks in the load")
    parser.add_argument("--idle-seconds", type=float, default=20.0, help="idle measurement")
    parser.add_argument(
        "--settle-seconds",
        type=float,
        default=10.0,
        help="wait after connecting before the idle measurement",
    )
    parser.add_argument(
        "--churn", type=float, default=0.1, help="fraction of agents replaced mid-load (0: none)"
    )
    parser.add_argument(
        "--task-seconds",
        type=float,
        default=1.0,
        help="how long each task runs on its agent: a dropped agent has some in hand",
    )
    parser.add_argument(
        "--heartbeat-interval", type=float, default=5.0, help="the server's heartbeat interval"
    )
    parser.add_argument("--port", type=int, default=0, help="loopback port (default: a free one)")
    parser.add_argument("--timeout", type=float, default=600.0, help="give up after this many s")
    parser.add_argument("--keep", type=Path, default=None, help="copy the logs here at the end")
    opts = parser.parse_args()
    if opts.agents < opts.procs or opts.endpoints < 1 or opts.procs < 1:
        parser.error("need --procs >= 1, --agents >= --procs and --endpoints >= 1")

    error = None
    figures: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="heartline-agents-") as tmp:
        bench = Bench(opts, Path(tmp))
        try:
            figures = asyncio.run(bench.run())
        except BenchError as exc:
            error = str(exc)
        except Exception as exc:  # noqa: BLE001 - said in the JSON line, processes stopped
            error = repr(exc)
        finally:
            figures.update(bench.cleanup())
            if opts.keep is not None:
                import shutil

                opts.keep.mkdir(parents=True, exist_ok=True)
                for path in Path(tmp).glob("*.log"):
                    shutil.copy2(path, opts.keep / path.name)
    print(
        json.dumps(
            {
                "bench": "agents",
                **figures,
                **({"error": error} if error else {}),
                "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(opts).items()},
                "cpus": os.cpu_count(),
                "python": platform.python_version(),
            }
        )
    )
    return 1 if error else 0


if __name__ == "__main__":
    sys.exit(main())
