"""The one exception tree of heartline, and the mapping from gRPC status codes.

::

    HeartlineError
    ├── RPCError                      a call to the server failed; .code is the grpc.StatusCode
    │   ├── InvalidArgumentError      INVALID_ARGUMENT
    │   ├── NotFoundError             NOT_FOUND
    │   ├── PermissionDeniedError     PERMISSION_DENIED
    │   ├── UnauthenticatedError      UNAUTHENTICATED
    │   ├── FailedPreconditionError   FAILED_PRECONDITION (e.g. a refused transition)
    │   ├── ResourceExhaustedError    RESOURCE_EXHAUSTED (e.g. a payload over the limit)
    │   └── UnavailableError          UNAVAILABLE (e.g. no server answers at the address)
    ├── SerializationError            a function, its arguments or a result could not be pickled
    ├── TaskFailedError               a task settled without a result (cancelled, failed, skipped)
    │   ├── RemoteError               the task's function raised; keeps the remote type name,
    │   │                             message and traceback text
    │   └── TaskSkippedError          a group task (or a task taking another's result) was
    │                                 skipped without running; .skip_reason says why
    └── TimeoutError                  (also a builtins.TimeoutError) a wait ran out
"""

from __future__ import annotations

import builtins

import grpc

from heartline._states import SkipReason


class HeartlineError(Exception):
    """Base of every error heartline raises."""


class RPCError(HeartlineError):
    """A call to the server failed with a gRPC status."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = message
        """gRPC's own text of the status (``message`` may say it in plainer words)."""
        if code is not None:
            self.code = code

    def __str__(self) -> str:
        return f"{self.message} ({self.code.name})"


class InvalidArgumentError(RPCError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFoundError(RPCError):
    code = grpc.StatusCode.NOT_FOUND


class PermissionDeniedError(RPCError):
    code = grpc.StatusCode.PERMISSION_DENIED


class UnauthenticatedError(RPCError):
    code = grpc.StatusCode.UNAUTHENTICATED


class FailedPreconditionError(RPCError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhaustedError(RPCError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class UnavailableError(RPCError):
    code = grpc.StatusCode.UNAVAILABLE


class SerializationError(HeartlineError):
    """A function, its arguments or its result could not be serialized."""


class TaskFailedError(HeartlineError):
    """A task settled without a value: cancelled, failed, skipped, or errored by the system."""

    def __init__(self, task_id: str, state: str, message: str) -> None:
        super().__init__(f"task {task_id} {state}: {message}")
        self.task_id = task_id
        self.state = state


class RemoteError(TaskFailedError):
    """The task's function raised on the endpoint.

    ``str(err)`` reads ``TypeName: message``; ``remote_type`` is the remote
    exception's qualified type name and ``remote_traceback`` its traceback text.
    """

    def __init__(
        self,
        task_id: str,
        state: str,
        remote_type: str,
        message: str,
        remote_traceback: str,
    ) -> None:
        HeartlineError.__init__(self, f"{remote_type}: {message}")
        self.task_id = task_id
        self.state = state
        self.remote_type = remote_type
        self.message = message
        self.remote_traceback = remote_traceback

    def __str__(self) -> str:
        text = f"{self.remote_type}: {self.message}"
        if self.remote_traceback:
            text += f"\n\nRemote traceback:\n{self.remote_traceback.rstrip()}"
        return text


_SKIP_EXPLANATIONS: dict[SkipReason, str] = {
    SkipReason.WHEN_FALSE: "its when expressions were false",
    SkipReason.INPUT_NOT_SUCCEEDED: "a task whose result it takes did not succeed",
    SkipReason.PARENT_NOT_SUCCEEDED: "a task it runs after did not succeed",
    SkipReason.GROUP_STOPPING: "its group was stopping",
    SkipReason.GROUP_TIMED_OUT: "its group timed out before it ran",
}


class TaskSkippedError(TaskFailedError):
    """The task was skipped without running: a group task whose ``when`` was false, or a
    task whose input or parent did not succeed, or whose group stopped or timed out.

    ``skip_reason`` is the :class:`~heartline.SkipReason` (None if the server gave none).
    """

    def __init__(self, task_id: str, skip_reason: SkipReason | None, detail: str = "") -> None:
        if skip_reason is None:
            message = detail or "no reason given"
        else:
            message = f"{skip_reason.value} ({_SKIP_EXPLANATIONS[skip_reason]})"
            if detail:
                message = f"{message}: {detail}"
        super().__init__(task_id or "(not submitted)", "skipped", message)
        self.skip_reason = skip_reason


class TimeoutError(HeartlineError, builtins.TimeoutError):  # noqa: A001 - deliberate
    """A wait for a task ran out of time."""


_BY_CODE: dict[grpc.StatusCode, type[RPCError]] = {
    cls.code: cls
    for cls in (
        InvalidArgumentError,
        NotFoundError,
        PermissionDeniedError,
        UnauthenticatedError,
        FailedPreconditionError,
        ResourceExhaustedError,
        UnavailableError,
    )
}


# What gRPC says when nothing answers at an address, and how to say it to a person.
_UNREACHABLE = (
    ("connection refused", "connection refused"),
    ("errors resolving", "the host name does not resolve"),
    ("dns resolution failed", "the host name does not resolve"),
    ("failed to connect to all addresses", "cannot connect"),
    ("connection timed out", "the connection timed out"),
    ("network is unreachable", "the network is unreachable"),
)


def unreachable_message(address: str, details: str) -> str | None:
    """A message a newcomer can act on when no server answers at ``address``; None when
    ``details`` (gRPC's text of an UNAVAILABLE) says something else."""
    lowered = details.lower()
    reason = next((why for needle, why in _UNREACHABLE if needle in lowered), None)
    if reason is None:
        return None
    return (
        f"no heartline server answers at {address} ({reason}). Start one with `heartline up` "
        "(or `heartline server`), or point at another with --server HOST:PORT or "
        "HEARTLINE_ADDRESS"
    )


def rpc_error_from_grpc(err: grpc.RpcError, address: str | None = None) -> RPCError:
    """Map a grpc error (sync or aio) to the matching :class:`RPCError` subclass.

    With the ``address`` called, a server that is not there is said in plain words
    (gRPC's own text stays in ``.details``).
    """
    code = err.code() if callable(getattr(err, "code", None)) else grpc.StatusCode.UNKNOWN
    details = err.details() if callable(getattr(err, "details", None)) else str(err)
    details = details or ""
    message = details or code.name
    if address is not None and code == grpc.StatusCode.UNAVAILABLE:
        message = unreachable_message(address, details) or message
    cls = _BY_CODE.get(code, RPCError)
    error = cls(message, code)
    error.details = details
    return error
