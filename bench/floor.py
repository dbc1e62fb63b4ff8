"""The floor: what bare Python gRPC round trips cost a lone task on loopback.

No heartline code runs here: plain ``grpc.aio`` processes (uvloop if importable, as the
server and the agent use it) with generic handlers passing raw bytes (no protos, no
serialization), on 127.0.0.1, one message in flight at a time. This script is the client
and starts a ``server`` process; the server is also attached to an ``agent`` process by
one long-lived bidirectional stream that the agent opened, and the agent has a ``worker``
child process behind a pipe (length-prefixed frames on its stdin and stdout). Measures,
as the median (``_p50_ms``) and the 99th percentile (``_p99_ms``) of ``-n`` round trips
after ``--warmup`` untimed ones, each with a ``--size``-byte payload:

* ``unary_rtt``: a unary echo call, client to server and back;
* ``stream_rtt``: the same over one open bidirectional stream (write, wait for the echo);
* ``relay_chain_rtt``: the path of a lone task, four hops and back: client --unary-->
  server --stream--> agent --pipe--> worker, which echoes; the agent sends the reply up
  its stream and the server answers the unary call with it. What a lone task pays at
  the least, before any storage, scheduling or serialization.

``cpu_us_per_rtt``: CPU microseconds per round trip of each process (all its threads)
along the relay chain; ``unary_...`` and ``stream_cpu_us_per_rtt``: the same, direct.

Prints one JSON line. Bounded by ``--timeout`` seconds (every child process also stops
itself soon after); every process it started is stopped by PID before it exits.
Example: ``python bench/floor.py -n 2000``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import select
import signal
import statistics
import struct
import subprocess
import sys
import time
from collections import deque
from collections.abc import Awaitable, Callable
from pathlib import Path

# As heartline does (heartline/__init__.py): the agent forks its worker; without this,
# gRPC's fork handlers print warnings. Must be set before grpc is imported.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

import grpc

SERVICE = "floor.Floor"
FRAME = struct.Struct("<I")  # the length prefix of a pipe frame
# No proxy, even if the environment names one: loopback only.
CHANNEL_OPTIONS = [("grpc.enable_http_proxy", 0)]


def _loop_factory(choice: str) -> tuple[str, Callable[[], asyncio.AbstractEventLoop]]:
    if choice != "asyncio":
        try:
            import uvloop

            return "uvloop", uvloop.new_event_loop
        except ImportError:
            if choice == "uvloop":
                raise
    return "asyncio", asyncio.new_event_loop


# --- the child processes ---------------------------------------------------------------


async def _server() -> None:
    """Echo (unary and stream), and Relay: forward to the attached agent, await its reply."""
    loop = asyncio.get_running_loop()
    attached = asyncio.Event()
    agent: list[grpc.aio.ServicerContext] = []
    # Replies come back on the agent's stream in the order the requests went down.
    pending: deque[asyncio.Future[bytes]] = deque()

    async def echo(request: bytes, _context) -> bytes:
        return request

    async def echo_stream(_requests, context) -> None:
        while (message := await context.read()) is not grpc.aio.EOF:
            await context.write(message)

    async def connect(_requests, context) -> None:  # the agent's long-lived stream
        agent.append(context)
        attached.set()
        while (message := await context.read()) is not grpc.aio.EOF:
            pending.popleft().set_result(message)

    async def relay(request: bytes, _context) -> bytes:
        await attached.wait()
        reply = loop.create_future()
        pending.append(reply)
        # One relay in flight at a time here; concurrent ones would need a write lock.
        await agent[0].write(request)
        return await reply

    handlers = {
        "Echo": grpc.unary_unary_rpc_method_handler(echo),
        "EchoStream": grpc.stream_stream_rpc_method_handler(echo_stream),
        "Connect": grpc.stream_stream_rpc_method_handler(connect),
        "Relay": grpc.unary_unary_rpc_method_handler(relay),
    }
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(port, flush=True)  # the parent reads the port from this line
    await server.wait_for_termination()


async def _agent(port: int, timeout: float) -> None:
    """Open the stream to the server; pass each message through the worker and back."""
    # The worker first, before gRPC starts its threads (fork+exec, as the real agent does).
    worker = await asyncio.create_subprocess_exec(
        sys.executable, __file__, "--role", "worker", "--timeout", str(timeout),
        stdin=subprocess.PIPE, stdout=subprocess.PIPE,
    )  # fmt: skip
    assert worker.stdin is not None and worker.stdout is not None
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=CHANNEL_OPTIONS) as ch:
        stream = ch.stream_stream(f"/{SERVICE}/Connect")()
        print(worker.pid, flush=True)  # ready; the parent stops the worker by this PID
        while (message := await stream.read()) is not grpc.aio.EOF:
            worker.stdin.write(FRAME.pack(len(message)) + message)
            await worker.stdin.drain()
            (size,) = FRAME.unpack(await worker.stdout.readexactly(FRAME.size))
            await stream.write(await worker.stdout.readexactly(size))


def _worker() -> None:
    """Echo length-prefixed frames from stdin to stdout until stdin closes."""
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    while header := stdin.read(FRAME.size):
        (size,) = FRAME.unpack(header)
        stdout.write(header + stdin.read(size))
        stdout.flush()


# --- the client (this process) ---------------------------------------------------------


def _cpu_seconds(pid: int) -> float:
    """CPU seconds of a process, all its threads. Its POSIX CPU clock (the id that
    clock_getcpuclockid(pid) gives) counts in nanoseconds; /proc/PID/stat's utime+stime,
    the fallback, in 10 ms ticks: too coarse for a second of a light process."""
    try:
        return time.clock_gettime(((~pid) << 3) | 2)  # CPUCLOCK_SCHED of process pid
    except OSError:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _ms(values: list[float], q: float) -> float:
    """The q-th percentile (0..100) of values in seconds, nearest rank, in milliseconds."""
    rank = min(len(values) - 1, max(0, math.ceil(q / 100 * len(values)) - 1))
    return round(sorted(values)[rank] * 1e3, 3)


async def _time(
    name: str,
    round_trip: Callable[[bytes], Awaitable[bytes]],
    opts: argparse.Namespace,
    pids: dict[str, int],
) -> dict[str, object]:
    """Warm up, then time ``opts.n`` round trips one after the other."""
    payload = os.urandom(opts.size)
    for _ in range(opts.warmup):
        await round_trip(payload)
    cpu0 = {role: _cpu_seconds(pid) for role, pid in pids.items()}
    rtts = []
    for _ in range(opts.n):
        start = time.perf_counter()
        reply = await round_trip(payload)
        rtts.append(time.perf_counter() - start)
        if reply != payload:
            raise SystemExit(f"floor: {name}: wrong echo")
    cpu = {
        role: round((_cpu_seconds(pid) - cpu0[role]) * 1e6 / opts.n, 1)
        for role, pid in pids.items()
    }
    return {
        f"{name}_rtt_p50_ms": round(statistics.median(rtts) * 1e3, 3),
        f"{name}_rtt_p99_ms": _ms(rtts, 99),
        f"{name}_cpu_us_per_rtt": cpu,
    }


async def _client(port: int, opts: argparse.Namespace, pids: dict[str, int]) -> dict:
    server = {"client": os.getpid(), "server": pids["server"]}
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=CHANNEL_OPTIONS) as ch:
        echo = ch.unary_unary(f"/{SERVICE}/Echo")
        relay = ch.unary_unary(f"/{SERVICE}/Relay")
        stream = ch.stream_stream(f"/{SERVICE}/EchoStream")()

        async def stream_echo(payload: bytes) -> bytes:
            await stream.write(payload)
            return await stream.read()

        figures = await _time("unary", echo, opts, server)
        figures |= await _time("stream", stream_echo, opts, server)
        await stream.done_writing()
        figures |= await _time("relay_chain", relay, opts, {**server, **pids})
    figures["cpu_us_per_rtt"] = figures.pop("relay_chain_cpu_us_per_rtt")  # the headline
    return figures


def _first_line(proc: subprocess.Popen[bytes], deadline: float, what: str) -> int:
    """The integer a child prints on its first line of stdout (a port, a PID)."""
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
    line = proc.stdout.readline() if ready else b""
    if not line.strip():
        raise SystemExit(f"floor: {what} not ready (exit code {proc.poll()})")
    return int(line)


def _stop(pid: int, proc: subprocess.Popen[bytes] | None = None) -> None:
    """SIGTERM by PID (no child installs a handler: it ends there); SIGKILL if it lingers."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    if proc is not None:
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.kill(pid, signal.SIGKILL)
            proc.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=2000, help="timed round trips per measure")
    parser.add_argument("--warmup", type=int, default=200, help="untimed round trips first")
    parser.add_argument("--size", type=int, default=128, help="payload bytes per message")
    parser.add_argument(
        "--loop", choices=("auto", "uvloop", "asyncio"), default="auto",
        help="event loop of every process (auto: uvloop if importable)",
    )  # fmt: skip
    parser.add_argument(
        "--timeout", type=float, default=120.0, help="give up after this many seconds"
    )
    # Internal: this script run as one of the child processes.
    parser.add_argument("--role", choices=("server", "agent", "worker"), help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    opts = parser.parse_args()
    loop_name, loop_factory = _loop_factory(opts.loop)

    if opts.role is not None:
        # A child bounds itself (SIGALRM's default action ends it), should its parent
        # die without stopping it.
        signal.alarm(math.ceil(opts.timeout) + 10)
        if opts.role == "worker":
            _worker()
            return 0
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            if opts.role == "server":
                runner.run(_server())
            else:
                runner.run(_agent(opts.port, opts.timeout))
        return 0

    deadline = time.monotonic() + opts.timeout
    child = [sys.executable, __file__, "--loop", loop_name, "--timeout", str(opts.timeout)]
    procs: list[subprocess.Popen[bytes]] = []
    worker_pid = None
    try:
        procs.append(subprocess.Popen([*child, "--role", "server"], stdout=subprocess.PIPE))
        port = _first_line(procs[0], deadline, "server")
        agent = [*child, "--role", "agent", "--port", str(port)]
        procs.append(subprocess.Popen(agent, stdout=subprocess.PIPE))
        worker_pid = _first_line(procs[1], deadline, "agent")
        pids = {"server": procs[0].pid, "agent": procs[1].pid, "worker": worker_pid}
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            remaining = deadline - time.monotonic()
            try:
                figures = runner.run(asyncio.wait_for(_client(port, opts, pids), remaining))
            except TimeoutError:
                raise SystemExit(f"floor: not done within --timeout {opts.timeout}s") from None
    finally:
        if worker_pid is not None:
            _stop(worker_pid)  # the agent's child: the agent reaps it
        for proc in reversed(procs):
            _stop(proc.pid, proc)
    print(
        json.dumps(
            {
                "bench": "floor",
                "n": opts.n,
                "warmup": opts.warmup,
                "size": opts.size,
                "loop": loop_name,
                **figures,
                "grpc": grpc.__version__,
                "cpus": os.cpu_count(),
                "python": platform.python_version(),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
