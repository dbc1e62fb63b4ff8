"""The worker process: runs one task at a time for the agent.

Run as ``python -m heartline.endpoint._worker STDOUT_FILE STDERR_FILE``. It speaks the
worker protocol of docs/ARCHITECTURE.md over its stdin/stdout: frames of a 4-byte big-endian
length and a pickled tuple. What a task writes to its stdout and stderr goes to the two
files (see endpoint/_capture.py): the pool takes it from there when the task ends.

- worker -> agent ``("ready", pid)`` once, after imports.
- agent -> worker
  ``("run", task_id, attempt, function_id, function_bytes | None, args, inputs)``: ``inputs``
  is a tuple of the pickled results of the task's input tasks, in placeholder order (empty
  for a task without inputs); each takes the place of its ``TaskInput`` in the arguments.
- worker -> agent ``("start", task_id, attempt)`` just before the call
- worker -> agent ``("done", task_id, attempt, True, result_bytes)`` or
  ``("done", task_id, attempt, False, (type_name, message, traceback, failure_kind))``

The worker exits when its stdin closes (the agent is gone). A function that returns a
coroutine (an ``async def``) is run to its end on the worker's one event loop.
"""

from __future__ import annotations

import asyncio
import inspect
import io
import os
import pickle
import signal
import sys
import threading
import types
from collections.abc import Callable
from typing import Any, BinaryIO, Protocol

from heartline._defaults import WORKER_FUNCTION_CACHE
from heartline._errors import SerializationError
from heartline._lru import LruCache
from heartline._serialize import (
    SourceMap,
    TaskInput,
    describe_exception,
    dumps_result,
    fill_inputs,
    loads_with_sources,
)
from heartline._states import FailureCode
from heartline.endpoint._frames import HEADER, decode, encode

_RAISED = int(FailureCode.RAISED)
_SERIALIZATION = int(FailureCode.SERIALIZATION)


class _Channel:
    """Frames over two private file descriptors."""

    def __init__(self, reader: BinaryIO, writer_fd: int) -> None:
        self._reader = reader
        self._writer_fd = writer_fd

    def receive(self) -> tuple[Any, ...] | None:
        header = self._reader.read(HEADER.size)
        if len(header) < HEADER.size:
            return None
        (size,) = HEADER.unpack(header)
        body = self._reader.read(size)
        if len(body) < size:
            return None
        return decode(body)

    def send(self, message: tuple[Any, ...]) -> None:
        body = encode(message)
        view = memoryview(HEADER.pack(len(body)) + body)
        while view:
            view = view[os.write(self._writer_fd, view) :]


def _take_stdio(stdout_path: str, stderr_path: str) -> _Channel:
    """Move the frame channel to private fds so user code cannot touch it.

    fd 1 and fd 2 become the pool's output files of this worker slot (emptied of what a
    cancelled task of the worker before left, then appended to), so a ``print()`` in a
    task, or a write of C code or a subprocess, is kept for the task instead of
    corrupting a frame; fd 0 becomes /dev/null, so ``input()`` sees end of file instead of
    eating the next frame. ``sys.stdout`` and ``sys.stderr`` flush every line, so a worker
    killed mid-task has written all its task printed but a last unfinished line.
    """
    frames_in = os.dup(0)
    frames_out = os.dup(1)
    sys.stdout.flush()
    sys.stderr.flush()
    for fd, path in ((1, stdout_path), (2, stderr_path)):
        file = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_TRUNC, 0o600)
        os.dup2(file, fd)
        os.close(file)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    for stream in (sys.stdout, sys.stderr):
        if isinstance(stream, io.TextIOWrapper):
            stream.reconfigure(line_buffering=True)
    return _Channel(os.fdopen(frames_in, "rb", buffering=1 << 16), frames_out)


def _flush_output() -> None:
    """Write out what the task printed, before the agent takes it (on "done"); put back
    the streams a task replaced, so the next task's prints land in the files again."""
    replaced = sys.stdout is not sys.__stdout__ or sys.stderr is not sys.__stderr__
    streams = (sys.stdout, sys.stderr)
    if replaced:
        streams += (sys.__stdout__, sys.__stderr__)
    for stream in streams:
        try:
            stream.flush()  # type: ignore[union-attr]
        except Exception:  # noqa: BLE001, S110 - closed or broken by the task: its loss
            pass
    if replaced:
        sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__  # type: ignore[assignment]


# Unpickled functions by id, with the source lines of their by-value code. The pool
# counts on this worker to still hold what it sent recently (heartline/_defaults.py):
# every "run" frame touches its function here, in the order the pool launched them.
Functions = LruCache[str, tuple[Callable[..., Any], SourceMap]]


def _failure(
    exc: BaseException, kind: int, message: str | None = None, sources: SourceMap | None = None
) -> tuple[str, str, str, int]:
    type_name, text, tb = describe_exception(exc, sources)
    return type_name, message if message is not None else text, tb, kind


class Channel(Protocol):
    """Where :func:`run_task` sends its "start" frame (a worker process's frame channel;
    the Dask engine's stand-in)."""

    def send(self, message: tuple[Any, ...]) -> None: ...


def run_task(
    channel: Channel,
    functions: Functions,
    task_id: str,
    attempt: int,
    function_id: str,
    function_bytes: bytes | None,
    args_bytes: bytes,
    inputs: tuple[bytes, ...] = (),
) -> tuple[Any, ...]:
    """Run one task; send its "start" frame, return its "done" frame.

    The one way a task runs, in a worker process and on a Dask worker thread alike.
    """
    try:
        cached = functions.get(function_id)
        if cached is None:
            if function_bytes is None:
                raise LookupError(f"function {function_id} was never sent to this worker")
            cached = loads_with_sources(function_bytes)
            functions.put(function_id, cached, len(function_bytes))
        fn, sources = cached
    except Exception as exc:  # noqa: BLE001 - any error here is the function payload's
        message = f"cannot deserialize the function {function_id}: {type(exc).__name__}: {exc}"
        return ("done", task_id, attempt, False, _failure(exc, _SERIALIZATION, message))
    try:
        (args, kwargs), arg_sources = loads_with_sources(args_bytes)
        if arg_sources:
            sources = {**sources, **arg_sources}
    except Exception as exc:  # noqa: BLE001 - any error here is the arguments'
        message = f"cannot deserialize the arguments: {type(exc).__name__}: {exc}"
        return ("done", task_id, attempt, False, _failure(exc, _SERIALIZATION, message))
    if inputs or _has_placeholder(args, kwargs):
        values = []
        for index, data in enumerate(inputs):
            try:
                # A result is a plain cloudpickle (dumps_result): no source map follows.
                values.append(pickle.loads(data))
            except Exception as exc:  # noqa: BLE001 - any unpickling error is the input's
                message = (
                    f"cannot deserialize input {index} of the task: {type(exc).__name__}: {exc}"
                )
                return ("done", task_id, attempt, False, _failure(exc, _SERIALIZATION, message))
        try:
            args, kwargs = fill_inputs(args, kwargs, values)
        except SerializationError as exc:  # a placeholder names an input not given
            return ("done", task_id, attempt, False, _failure(exc, _SERIALIZATION))

    channel.send(("start", task_id, attempt))
    try:
        value = fn(*args, **kwargs)
        if inspect.iscoroutine(value):
            value = _event_loop().run_until_complete(value)
    except BaseException as exc:  # noqa: BLE001 - SystemExit from a task is the task's error
        # The user wants their traceback, not ours (nor asyncio's, for a coroutine).
        exc.__traceback__ = _from_user_code(exc.__traceback__)
        return ("done", task_id, attempt, False, _failure(exc, _RAISED, sources=sources))
    try:
        result = dumps_result(value)
    except Exception as exc:  # noqa: BLE001 - any error here is the result's
        return ("done", task_id, attempt, False, _failure(exc, _SERIALIZATION))
    return ("done", task_id, attempt, True, result)


def _has_placeholder(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """Whether the arguments of a task sent without inputs still hold a placeholder (it
    must fail, not be called with the placeholder); a loop over the top level only."""
    for value in args:
        if type(value) is TaskInput:
            return True
    if kwargs:
        for value in kwargs.values():
            if type(value) is TaskInput:
                return True
    return False


_loops = threading.local()


def _event_loop() -> asyncio.AbstractEventLoop:
    """This thread's one event loop, made on first use and reused by every coroutine task,
    so a task may await I/O; cancel and walltime end the whole worker, loop included.

    One per thread: a worker process has one thread, a Dask worker runs tasks on several.
    """
    loop: asyncio.AbstractEventLoop | None = getattr(_loops, "loop", None)
    if loop is None:
        loop = _loops.loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
    return loop


_OURS = (os.path.abspath(__file__), os.path.dirname(os.path.abspath(asyncio.__file__)) + os.sep)


def _from_user_code(tb: types.TracebackType | None) -> types.TracebackType | None:
    """Skip the frames of this module and of the event loop that ran a coroutine.

    By file, not by module name: run with ``-m`` this module is ``__main__``, and so is
    a function the client sent from its own script.
    """
    first = tb.tb_next if tb is not None else None
    entry = first
    while entry is not None:
        filename = entry.tb_frame.f_code.co_filename
        if filename != _OURS[0] and not filename.startswith(_OURS[1]):
            return entry
        entry = entry.tb_next
    return first


def main(argv: list[str] | None = None) -> None:
    """Serve tasks until the agent closes stdin.

    Args:
        argv: The paths of the stdout and stderr files (default: the command line's).
    """
    stdout_path, stderr_path = sys.argv[1:3] if argv is None else argv
    # Ctrl-C in a terminal, or a supervisor's SIGTERM to the process group, is meant
    # for the agent, which then ends its workers (SIGKILL). A worker that died first
    # would be reported and replaced during the agent's shutdown.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    channel = _take_stdio(stdout_path, stderr_path)
    functions: Functions = LruCache(*WORKER_FUNCTION_CACHE)
    try:
        channel.send(("ready", os.getpid()))
        while (message := channel.receive()) is not None:
            if message[0] == "run":
                done = run_task(channel, functions, *message[1:])
                _flush_output()
                channel.send(done)
    except BrokenPipeError:
        # The agent is gone (killed): nobody is left to tell; leave quietly.
        os._exit(0)


if __name__ == "__main__":
    main()
