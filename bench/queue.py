"""Queue depth: server memory and restart time with many tasks queued on an offline endpoint.

Starts a real server (durable SQLite store in a temporary folder, authentication on: the
admin token its first start writes), registers an endpoint that no agent serves, and
submits ``-n`` no-op tasks to it with ``submit_batch`` (``--batch`` per call). Then
restarts the server on the same store, once per ``--restarts`` item:

* ``kill``: SIGKILL (what a crash leaves: the WAL as it was), the honest restart;
* ``term``: SIGTERM (a clean stop: the store closes and checkpoints).

and measures how long the new process takes until it serves again: ``listening_s`` (its
log says "listening on"), ``serving_s`` (health says SERVING) and ``ready_s`` (GetStats
answered through the store *and* ListEndpoints shows the whole queue restored: ready
means ready), all counted from the new process's start (Python's imports included).

Reports the server's RSS (``VmRSS``) and peak RSS (``VmHWM``) from ``/proc/PID/status``:
before the submits, along them (``rss_curve``: [tasks queued, MiB]), after them, and
after each restart; the store's size on disk; the submit rate. ``per_task_bytes`` is
the RSS growth per queued task (after - before, over ``-n``).

Prints one JSON line. Bounded by ``--timeout`` seconds; every process it started is
stopped (by PID) before it exits. Examples::

    python bench/queue.py -n 200000
    python bench/queue.py -n 1000000 --restarts kill,term
    MALLOC_ARENA_MAX=2 python bench/queue.py -n 200000   # the server inherits the env
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def noop(i: int) -> int:
    return i


class BenchTimeout(Exception):
    pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of a live process, in KiB (empty once it is gone)."""
    out: dict[str, int] = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0])
    except OSError:
        pass
    return out


def _mib(kib: int | None) -> float | None:
    return None if kib is None else round(kib / 1024, 1)


def _store_bytes(db: Path) -> dict[str, int]:
    sizes = {}
    for suffix in ("", "-wal", "-shm"):
        path = Path(str(db) + suffix)
        sizes["db" + suffix.replace("-", "_")] = path.stat().st_size if path.exists() else 0
    return sizes


class Bench:
    def __init__(self, opts: argparse.Namespace, home: Path) -> None:
        self.opts = opts
        self.home = home
        self.port = opts.port or _free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.db = home / "heartline.db"
        self.env = {**os.environ, "HEARTLINE_HOME": str(home)}
        self.deadline = time.monotonic() + opts.timeout
        self.server: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.token: str | None = None

    def left(self) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise BenchTimeout(f"bench: over --timeout {self.opts.timeout}s")
        return left

    # -- the server process ----------------------------------------------------------

    def start(self) -> tuple[subprocess.Popen[bytes], Path, float]:
        self.starts += 1
        log = self.home / f"server-{self.starts}.log"
        args = [
            sys.executable, "-m", "heartline", "server", "--listen", self.address,
            "--db", str(self.db), "-v",
            "--max-pending-per-user", str(max(1_000_000, self.opts.n + 1000)),
        ]  # fmt: skip
        t0 = time.perf_counter()
        self.server = subprocess.Popen(
            args, env=self.env, stdin=subprocess.DEVNULL,
            stdout=log.open("wb"), stderr=subprocess.STDOUT,
        )  # fmt: skip
        return self.server, log, t0

    def stop(self, sig: int) -> float:
        """Signal the server, wait for it to exit; seconds it took."""
        proc = self.server
        assert proc is not None
        t0 = time.perf_counter()
        if proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(timeout=max(1.0, min(120.0, self.left())))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        return time.perf_counter() - t0

    def cleanup(self) -> None:
        proc = self.server
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    # -- readiness -------------------------------------------------------------------

    async def ready(self, log: Path, t0: float, expect_queued: int) -> dict[str, object]:
        """Time until the new process listens, says SERVING, and answers real calls."""
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        from heartline import AsyncClient

        proc = self.server
        assert proc is not None
        figures: dict[str, object] = {}
        peak_during = 0
        while "listening on" not in log.read_text(errors="replace"):
            if proc.poll() is not None:
                raise SystemExit(
                    f"bench: server exited {proc.returncode}: {log.read_text()[-2000:]}"
                )
            peak_during = max(peak_during, _status(proc.pid).get("VmRSS", 0))
            self.left()
            await asyncio.sleep(0.01)
        figures["listening_s"] = round(time.perf_counter() - t0, 3)
        async with grpc.aio.insecure_channel(self.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while True:
                self.left()
                try:
                    reply = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        break
                except grpc.aio.AioRpcError:
                    pass
                await asyncio.sleep(0.01)
        figures["serving_s"] = round(time.perf_counter() - t0, 3)
        if self.token is None:  # the admin token the server's first start wrote
            self.token = (self.home / "token").read_text().strip()
        async with AsyncClient(self.address, token=self.token, retry_timeout=self.left()) as client:
            stats = await client.stats()
            endpoints = await client.list_endpoints()
        figures["ready_s"] = round(time.perf_counter() - t0, 3)
        queued = sum(e.queued for e in endpoints)
        figures["queued"] = queued
        figures["waiting_for_ep"] = stats.tasks_by_state.get("waiting-for-ep", 0)
        if queued != expect_queued:
            figures["error"] = f"queued {queued}, expected {expect_queued}"
        status = _status(proc.pid)
        figures["rss_mib"] = _mib(status.get("VmRSS"))
        figures["peak_rss_mib"] = _mib(status.get("VmHWM"))
        return figures

    # -- the measurement ---------------------------------------------------------------

    async def register_endpoint(self, name: str) -> str:
        import grpc

        from heartline import _defaults
        from heartline.v1 import endpoint_service_pb2 as pb
        from heartline.v1 import endpoint_service_pb2_grpc as pb_grpc

        async with grpc.aio.insecure_channel(self.address) as channel:
            reply = await pb_grpc.EndpointServiceStub(channel).RegisterEndpoint(
                pb.RegisterEndpointRequest(name=name),
                metadata=_defaults.bearer_metadata(self.token),
                timeout=30,
            )
        return reply.endpoint_id

    async def submit(self, endpoint: str) -> dict[str, object]:
        from heartline import AsyncClient

        n, batch = self.opts.n, self.opts.batch
        proc = self.server
        assert proc is not None
        curve: list[list[float]] = []
        step = max(batch, (n // 10) // batch * batch)
        async with AsyncClient(self.address, token=self.token) as client:
            start = time.perf_counter()
            done = 0
            for lo in range(0, n, batch):
                self.left()
                hi = min(n, lo + batch)
                await client.submit_batch(endpoint, [(noop, (i,), {}) for i in range(lo, hi)])
                done = hi
                # The client keeps a waiter per task: drop them, nobody waits here (the
                # bench measures the server; this keeps the client's own memory flat).
                client._waiters.clear()
                if done % step == 0 or done == n:
                    curve.append([done, _mib(_status(proc.pid).get("VmRSS"))])
            elapsed = time.perf_counter() - start
            stats = await client.stats()
        return {
            "submit_s": round(elapsed, 2),
            "submit_tasks_per_s": round(n / elapsed, 1),
            "waiting_for_ep": stats.tasks_by_state.get("waiting-for-ep", 0),
            "rss_curve": curve,
        }

    async def run(self) -> dict[str, object]:
        out: dict[str, object] = {}
        _, log, t0 = self.start()
        first = await self.ready(log, t0, 0)
        out["first_start"] = {k: first[k] for k in ("ready_s", "rss_mib")}
        endpoint = "offline"
        await self.register_endpoint(endpoint)
        before = _status(self.server.pid)
        figures = await self.submit(endpoint)
        await asyncio.sleep(1.0)  # let the last commit's memory settle
        after = _status(self.server.pid)
        out["rss_before_mib"] = _mib(before.get("VmRSS"))
        out["rss_after_mib"] = _mib(after.get("VmRSS"))
        out["peak_rss_mib"] = _mib(after.get("VmHWM"))
        out["per_task_bytes"] = round(
            (after.get("VmRSS", 0) - before.get("VmRSS", 0)) * 1024 / self.opts.n, 1
        )
        out.update(figures)
        out["store_bytes"] = _store_bytes(self.db)
        restarts = []
        for kind in filter(None, self.opts.restarts.split(",")):
            sig = {"kill": signal.SIGKILL, "term": signal.SIGTERM}[kind]
            stopped = self.stop(sig)
            store = _store_bytes(self.db)
            _, log, t0 = self.start()
            figures = await self.ready(log, t0, self.opts.n)
            await asyncio.sleep(2.0)
            figures["rss_settled_mib"] = _mib(_status(self.server.pid).get("VmRSS"))
            restored = [line for line in log.read_text().splitlines() if "restored" in line]
            restarts.append(
                {"signal": kind, "stop_s": round(stopped, 3), "store_at_start": store,
                 **figures, "log": restored[-1][-80:] if restored else None}
            )  # fmt: skip
        out["restarts"] = restarts
        return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=1_000_000, help="tasks to queue")
    parser.add_argument("--batch", type=int, default=5000, help="tasks per submit_batch call")
    parser.add_argument(
        "--restarts",
        default="kill,term",
        help="restarts to time, in order: kill (SIGKILL), term (SIGTERM)",
    )
    parser.add_argument("--port", type=int, default=0, help="loopback port (default: a free one)")
    parser.add_argument(
        "--timeout", type=float, default=1800.0, help="give up after this many seconds"
    )
    parser.add_argument(
        "--keep",
        type=Path,
        default=None,
        help="copy the store and server logs here at the end (for analysis)",
    )
    opts = parser.parse_args()

    error = None
    figures: dict[str, object] = {}
    with tempfile.TemporaryDirectory(prefix="heartline-queue-") as tmp:
        bench = Bench(opts, Path(tmp))
        try:
            figures = asyncio.run(bench.run())
        except BenchTimeout as exc:
            error = str(exc)
        finally:
            bench.cleanup()
            if opts.keep is not None:
                import shutil

                opts.keep.mkdir(parents=True, exist_ok=True)
                for path in Path(tmp).iterdir():
                    if path.is_file():
                        shutil.copy2(path, opts.keep / path.name)
    print(
        json.dumps(
            {
                "bench": "queue",
                "n": opts.n,
                "batch": opts.batch,
                **figures,
                **({"error": error} if error else {}),
                "malloc_arena_max": os.environ.get("MALLOC_ARENA_MAX"),
                "cpus": os.cpu_count(),
                "python": platform.python_version(),
            }
        )
    )
    return 1 if error else 0


if __name__ == "__main__":
    sys.exit(main())
