"""The I/O-free core shared by every client: configuration, request building and batching,
the function registration cache, and the conversion of answers and outcomes.

Nothing here awaits or touches a socket; :mod:`._async` is the only I/O layer and
:mod:`._sync` drives it from a private event-loop thread.
"""

from __future__ import annotations

import dataclasses
import inspect
import threading
import uuid
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from heartline import _defaults
from heartline._channel import AddressError, split_servers
from heartline._errors import InvalidArgumentError
from heartline._forms import SERIALIZERS
from heartline._lru import LruCache
from heartline._modules import ShipModules, ShipPolicy
from heartline._serialize import TaskInput, dumps_args, dumps_function, function_id
from heartline._states import SkipReason, TaskState
from heartline.v1 import task_pb2, task_service_pb2

from ._types import Priority, TaskError, settled_outcome

if TYPE_CHECKING:
    from heartline._tls import TLS

    from ._groups import Group, _Member

MAX_BATCH_TASKS = 1000
"""At most this many tasks go in one SubmitTasks request."""
MAX_BATCH_BYTES = 8 * 1024 * 1024
"""A SubmitTasks request is cut before it passes this size (the server's limit is 10 MiB)."""
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
"""gRPC send/receive limit of the client's channel."""
MAX_IDS = _defaults.MAX_IDS
"""At most this many task ids go in one WatchTasks request: the server's limit."""
MAX_KEPT_SETTLED = 10_000
"""Settled outcomes nobody has asked for yet that a client keeps (oldest dropped first);
``get_result`` of a dropped one asks the server again through a named watch."""
MAX_KEPT_BYTES = 256 * 1024 * 1024
"""And at most about this many bytes of them (serialized updates, results included)."""

# Bytes a TaskSpec adds to a SubmitTasksRequest beyond its args: the function id
# (64 hex), small fields and the field/length framing. Overestimated on purpose.
_SPEC_OVERHEAD = 128

Call = tuple[Callable[..., Any], Sequence[Any], Mapping[str, Any]]
"""One call of a batch: ``(function, args, kwargs)``."""
R = TypeVar("R")


def resolve_address(address: str | None) -> str:
    """The server address: the argument, else ``$HEARTLINE_ADDRESS``, else the default."""
    return _defaults.address(address)


def resolve_metadata(token: str | None) -> tuple[tuple[str, str], ...] | None:
    """Call metadata carrying the bearer token (argument, else ``$HEARTLINE_TOKEN``, else
    the file ``$HEARTLINE_HOME/token``)."""
    return _defaults.bearer_metadata(_defaults.token(token))


def channel_options() -> list[tuple[str, Any]]:
    return [
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ]


@dataclasses.dataclass(frozen=True)
class SubmitOptions:
    """How a task is to be run; the keyword options of ``submit``/``submit_batch``."""

    priority: Priority = Priority.NORMAL
    """Dispatch priority: ``"high"``, ``"normal"`` or ``"low"``."""
    max_retries: int = 0
    """How many times a task whose function raised is run again."""
    max_system_retries: int | None = None
    """How many times a task is re-queued after a system failure; None: server default (3)."""
    walltime: float | None = None
    """Per-attempt walltime in seconds, enforced on the agent; None means none."""
    held: bool = False
    """Submit the task held: it is not dispatched until released."""
    serializer: str = "auto"
    """How the function travels: ``"auto"`` (its bytecode, plus its source where that is
    at hand, so an agent on another Python minor version can run it), ``"bytecode"`` or
    ``"source"`` (heartline/_forms.py)."""

    @classmethod
    def of(
        cls,
        *,
        priority: str | Priority = Priority.NORMAL,
        max_retries: int = 0,
        max_system_retries: int | None = None,
        walltime: float | None = None,
        held: bool = False,
        serializer: str = "auto",
    ) -> SubmitOptions:
        """Validate the user's keyword options.

        Raises:
            InvalidArgumentError: an option is out of range or of the wrong kind.
        """
        try:
            prio = Priority(priority)
        except ValueError:
            raise InvalidArgumentError(
                f"priority must be one of 'high', 'normal', 'low', not {priority!r}"
            ) from None
        _check_count("max_retries", max_retries)
        if max_system_retries is not None:
            _check_count("max_system_retries", max_system_retries)
        if walltime is not None:
            if isinstance(walltime, bool) or not isinstance(walltime, (int, float)):
                raise InvalidArgumentError(f"walltime must be seconds, not {walltime!r}")
            if not walltime > 0:
                raise InvalidArgumentError(f"walltime must be positive, not {walltime!r}")
        if serializer not in SERIALIZERS:
            raise InvalidArgumentError(
                f"serializer must be one of {', '.join(map(repr, SERIALIZERS))}, not {serializer!r}"
            )
        return cls(prio, max_retries, max_system_retries, walltime, bool(held), serializer)

    def _spec(self, fid: str, args: bytes) -> task_pb2.TaskSpec:
        spec = task_pb2.TaskSpec(
            function_id=fid,
            args=args,
            priority=self.priority._to_proto(),
            max_retries=self.max_retries,
            walltime_seconds=self.walltime or 0.0,
            held=self.held,
        )
        if self.max_system_retries is not None:
            spec.max_system_retries = self.max_system_retries
        return spec


def _check_count(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**31:
        raise InvalidArgumentError(f"{name} must be a non-negative int, not {value!r}")


_REGISTERED_MARKS = 65_536
"""Function ids a client remembers the server has, most recently used kept. Forgetting
one costs one more (idempotent) RegisterFunction; remembering all would grow with every
new function a long-lived client makes (closures in a loop)."""


class FunctionCache:
    """Pickles each function once and remembers which ids the server already has.

    Entries are keyed by the function object: weakly when it supports weak references
    (so a dropped lambda frees its payload), else by ``id()`` with a strong reference
    held (builtins such as ``pow``) so the id can't be reused by another object.
    Thread-safe: the Executor pickles in its callers' threads. ``ship`` says which local
    modules travel with each function (heartline/_modules.py); they are found here, once
    per function, never per task.
    """

    def __init__(self, ship: ShipPolicy | None = None) -> None:
        self._ship = ship if ship is not None else ShipPolicy()
        # Per function, its entry for "auto" (the usual) and for any other serializer
        # asked for, under that name.
        self._weak: weakref.WeakKeyDictionary[Any, tuple[str, bytes]] = weakref.WeakKeyDictionary()
        self._strong: dict[int, tuple[Any, str, bytes]] = {}
        self._other: weakref.WeakKeyDictionary[Any, dict[str, tuple[str, bytes]]] = (
            weakref.WeakKeyDictionary()
        )
        # Used on the client's event loop only (AsyncClient._register), so unlocked.
        self._registered: LruCache[str, None] = LruCache(_REGISTERED_MARKS, _REGISTERED_MARKS)
        self._lock = threading.Lock()

    def lookup(self, fn: Callable[..., Any], serializer: str = "auto") -> tuple[str, bytes]:
        """Return ``(function_id, payload)`` of ``fn``, pickling it on first sight.

        ``serializer`` other than ``"auto"`` (the default) picks the forms of the payload
        (heartline/_forms.py); such entries are kept apart, for functions that take weak
        references only (others are pickled again each time).

        Raises:
            SerializationError: ``fn`` is not callable or cannot be pickled.
            InvalidArgumentError: ``fn`` is a generator or async generator function, or
                the modules it ships take it over the payload limit.
        """
        if serializer != "auto":
            return self._lookup_other(fn, serializer)
        try:
            hit = self._weak.get(fn)
        except TypeError:  # not weak-referenceable (or unhashable)
            strong = self._strong.get(id(fn))
            if strong is not None and strong[0] is fn:
                return strong[1], strong[2]
            hit = None
        if hit is not None:
            return hit
        if inspect.isgeneratorfunction(fn) or inspect.isasyncgenfunction(fn):
            # A generator's values can't be streamed back; refuse before anything is sent.
            raise InvalidArgumentError(
                f"{getattr(fn, '__qualname__', fn)!r} is a generator function: a task returns "
                "one value, so return a list (or submit one task per item) instead"
            )
        payload = dumps_function(fn, self._ship)
        entry = (function_id(payload), payload)
        with self._lock:
            try:
                self._weak[fn] = entry
            except TypeError:
                self._strong[id(fn)] = (fn, *entry)
        return entry

    def _lookup_other(self, fn: Callable[..., Any], serializer: str) -> tuple[str, bytes]:
        try:
            hit = self._other.get(fn, {}).get(serializer)
        except TypeError:
            hit = None
        if hit is not None:
            return hit
        payload = dumps_function(fn, self._ship, serializer)
        entry = (function_id(payload), payload)
        with self._lock:
            try:
                self._other.setdefault(fn, {})[serializer] = entry
            except TypeError:
                pass
        return entry

    def is_registered(self, fid: str) -> bool:
        return self._registered.touch(fid)

    def mark_registered(self, fid: str) -> None:
        self._registered.put(fid, None, 1)


@dataclasses.dataclass
class PreparedBatch:
    """Task specs ready to send, and the functions they use."""

    specs: list[task_pb2.TaskSpec]
    functions: dict[str, bytes]
    """function_id -> payload of every function the batch uses: those not registered yet
    are registered before the submit, the others again if the server has dropped them."""


class ClientBase:
    """State and request building shared by :class:`AsyncClient` (and so :class:`Client`)."""

    def __init__(
        self,
        address: str | None = None,
        *,
        token: str | None = None,
        retry_timeout: float = _defaults.RETRY_TIMEOUT,
        tls: TLS | bool | None = None,
        ship_modules: ShipModules = True,
    ) -> None:
        self.address = resolve_address(address)
        """The server's ``host:port``, or several, comma-separated (they fail over)."""
        try:
            split_servers(self.address)  # its form now; host names resolve at first use
        except AddressError as err:
            raise InvalidArgumentError(str(err)) from None
        self.tls = _defaults.tls(tls)
        """How the client reaches the server: a :class:`~heartline.TLS`, or None (plaintext)."""
        if (
            isinstance(retry_timeout, bool)
            or not isinstance(retry_timeout, (int, float))
            or not 0 <= retry_timeout < float("inf")
        ):
            raise InvalidArgumentError(
                f"retry_timeout must be a finite number of seconds >= 0, not {retry_timeout!r}"
            )
        self.retry_timeout = float(retry_timeout)
        """Seconds a call keeps trying while its server is away (restarting, unreachable
        after it was reached); 0 gives up at the first failure."""
        self.session_id = uuid.uuid4().hex
        """This client's session: the server streams its submitted tasks' settles to it."""
        self._metadata = resolve_metadata(token)
        self._functions = FunctionCache(ShipPolicy.of(ship_modules))

    # -- building requests ---------------------------------------------------------

    def _prepare(self, calls: Iterable[Call], options: SubmitOptions) -> PreparedBatch:
        """Pickle functions (once each) and arguments; raise before anything is sent."""
        specs: list[task_pb2.TaskSpec] = []
        functions: dict[str, bytes] = {}
        cache = self._functions
        for call in calls:
            try:
                fn, args, kwargs = call
            except (TypeError, ValueError):
                raise InvalidArgumentError(
                    f"a batch entry must be (function, args, kwargs), not {call!r}"
                ) from None
            fid, payload = cache.lookup(fn, options.serializer)
            functions[fid] = payload
            specs.append(options._spec(fid, dumps_args(tuple(args), dict(kwargs or {}))))
        return PreparedBatch(specs, functions)

    def _submit_requests(
        self, endpoint: str, specs: Sequence[task_pb2.TaskSpec]
    ) -> Iterator[task_service_pb2.SubmitTasksRequest]:
        """Cut specs into SubmitTasks requests of bounded count and size."""
        _check_endpoint(endpoint)
        for chunk in chunk_specs(specs):
            yield task_service_pb2.SubmitTasksRequest(
                endpoint=endpoint,
                tasks=chunk,
                session_id=self.session_id,
                request_id=new_request_id(),
            )

    def _group_request(
        self, group: Group, endpoint: str | None
    ) -> tuple[task_service_pb2.SubmitGroupRequest, dict[str, bytes]]:
        """The SubmitGroup request of a group, and the functions its tasks use.

        The endpoint is the group's own, else ``endpoint``.
        """
        target = group.endpoint or endpoint
        if target is None:
            raise InvalidArgumentError(
                f"group {group.name!r} names no endpoint: give Group(..., endpoint=...) "
                "or submit_group(group, endpoint=...)"
            )
        _check_endpoint(target)
        functions: dict[str, bytes] = {}

        def spec_of(member: _Member) -> task_pb2.TaskSpec:
            fid, payload = self._functions.lookup(member.function, member.options.serializer)
            functions[fid] = payload
            spec = member.options._spec(fid, member.args)
            spec.name = member.name
            spec.run_after.extend(member.run_after)
            spec.inputs.extend(member.inputs)
            spec.when.extend(w._to_proto() for w in member.when)
            return spec

        request = task_service_pb2.SubmitGroupRequest(
            name=group.name,
            endpoint=target,
            tasks=[spec_of(m) for m in group._tasks],
            finally_tasks=[spec_of(m) for m in group._finally],
            fail_fast=group.fail_fast,
            timeout_seconds=group.timeout or 0.0,
            session_id=self.session_id,
            request_id=new_request_id(),
        )
        return request, functions

    @staticmethod
    def _group_id(group_id: Any) -> str:
        if not isinstance(group_id, str) or not group_id:
            raise InvalidArgumentError(f"a group id must be a non-empty string, not {group_id!r}")
        return group_id

    @staticmethod
    def _ids_request(task_ids: Iterable[str]) -> list[str]:
        if isinstance(task_ids, str):
            raise InvalidArgumentError("expected a list of task ids, got one string")
        ids = list(task_ids)
        for tid in ids:
            if not isinstance(tid, str) or not tid:
                raise InvalidArgumentError(f"a task id must be a non-empty string, not {tid!r}")
        return ids

    @staticmethod
    def _list_request(
        states: Iterable[TaskState | str] | None, endpoint: str | None, page_size: int
    ) -> task_service_pb2.ListTasksRequest:
        wire_states = []
        for s in states or ():
            try:
                wire_states.append(TaskState(s)._to_proto())
            except ValueError:
                raise InvalidArgumentError(f"unknown task state {s!r}") from None
        return task_service_pb2.ListTasksRequest(
            states=wire_states, endpoint=endpoint or "", page_size=page_size
        )


def replace_refs(
    args: Sequence[Any],
    kwargs: Mapping[str, Any],
    ref_type: type[R],
    check: Callable[[R, str], None],
) -> tuple[tuple[Any, ...], dict[str, Any], list[R]]:
    """Put a :class:`TaskInput` placeholder where a ``ref_type`` sits at the top level of
    ``args`` or ``kwargs``; return the new args and kwargs and the refs in placeholder
    order. The same ref twice is one input: both places get its one placeholder.

    ``check(ref, where)`` may refuse a ref by raising; ``where`` reads ``"argument 0"``
    or ``"keyword argument 'x'"``.
    """
    refs: list[R] = []
    index: dict[R, int] = {}

    def place(value: Any, where: str) -> Any:
        if not isinstance(value, ref_type):
            return value
        check(value, where)
        i = index.get(value)
        if i is None:
            i = index[value] = len(refs)
            refs.append(value)
        return TaskInput(i)

    new_args = tuple(place(a, f"argument {i}") for i, a in enumerate(args))
    new_kwargs = {k: place(v, f"keyword argument {k!r}") for k, v in kwargs.items()}
    return new_args, new_kwargs, refs


def new_request_id() -> str:
    """A fresh request id: a repeat of the request with it is answered, not applied, again."""
    return str(uuid.uuid4())


def _check_endpoint(endpoint: Any) -> None:
    if not isinstance(endpoint, str) or not endpoint:
        raise InvalidArgumentError(f"endpoint must be a name or id, not {endpoint!r}")


def chunk_specs(
    specs: Sequence[task_pb2.TaskSpec],
    max_tasks: int = MAX_BATCH_TASKS,
    max_bytes: int = MAX_BATCH_BYTES,
) -> Iterator[list[task_pb2.TaskSpec]]:
    """Split specs into runs of at most ``max_tasks`` and about ``max_bytes``.

    A single spec larger than ``max_bytes`` travels alone; the server then answers
    RESOURCE_EXHAUSTED with the size and the limit, which is the error the user needs.
    """
    chunk: list[task_pb2.TaskSpec] = []
    size = 0
    for spec in specs:
        spec_size = len(spec.args) + _SPEC_OVERHEAD
        if chunk and (len(chunk) >= max_tasks or size + spec_size > max_bytes):
            yield chunk
            chunk, size = [], 0
        chunk.append(spec)
        size += spec_size
    if chunk:
        yield chunk


def outcome_of_update(update: task_pb2.TaskUpdate) -> Any:
    """The value of a settled update, or raise its error (see :func:`settled_outcome`)."""
    return settled_outcome(
        update.task_id,
        TaskState._from_proto(update.state),
        update.result,
        TaskError._from_proto(update.error) if update.HasField("error") else None,
        cause=update.cause,
        skip_reason=SkipReason._from_proto(update.skip_reason),
    )
