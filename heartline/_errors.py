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
import re

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


class TimeoutError(HeartlineError, builtins.TimeoutError):
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


# What gRPC says when a TLS handshake fails where this client sees it (looked for in this
# order), what that means, and what to do. Waiting cures none of these: see tls_failure.
_NOT_TRUSTED = "the server's certificate is not trusted"
_TLS_FAILURES: tuple[tuple[tuple[str, ...], str, str], ...] = (
    (
        ("wrong_version_number",),
        "the server does not speak TLS",
        (
            "connect without TLS (no tls=, --tls-ca or HEARTLINE_TLS_CA), or start the server "
            "with --tls-cert and --tls-key"
        ),
    ),
    (
        ("hostname verification", "is not in peer certificate"),
        "the server's certificate is not issued for {host}",
        "connect by a name or address the certificate lists",
    ),
    (
        # The server's alert about this client's certificate (TLS 1.3 says it after the
        # handshake instead: the connection is closed, see _CLOSED_AT_CONNECT).
        (
            "alert_certificate_required",
            "alert_bad_certificate",
            "alert_unknown_ca",
            "alert_certificate_unknown",
        ),
        "the server refused this client's certificate, or its lack of one",
        (
            "pass one signed by a CA the server trusts: tls=TLS(cert=..., key=...), or "
            "--tls-cert and --tls-key"
        ),
    ),
    (
        ("tls handshake failed", "ssl handshake failed"),
        _NOT_TRUSTED,
        "pass the CA that signed it: tls=TLS(ca=...), --tls-ca or HEARTLINE_TLS_CA",
    ),
    (
        ("failed to create security handshaker",),
        "the TLS settings are not usable",
        "check the files given to tls=TLS(...) or --tls-*",
    ),
)
# OpenSSL's own reason after its error code, e.g. "...:CERTIFICATE_VERIFY_FAILED: unable
# to get local issuer certificate".
_OPENSSL_REASON = re.compile(r"OPENSSL_internal:[A-Z0-9_]+: ([^:]+)")
# A connection closed while it was being set up: what a TLS server does to a plaintext
# client, and a mutual-TLS server to a client without a certificate it trusts.
_CLOSED_AT_CONNECT = "socket closed"
# How gRPC begins the text of a call that found no connection: pick_first (one address)
# says the first, round_robin (an address list, heartline/_channel.py) the second.
_AT_CONNECT = ("failed to connect", "connections to all backends failing")
# A list's servers answer but none says SERVING: they stand by (heartline/_channel.py).
_ALL_STANDING_BY = "backend unhealthy"


def tls_failure(details: str) -> bool:
    """Whether gRPC's text of an UNAVAILABLE says a TLS handshake failed in a way that
    waiting does not cure (the server's certificate not trusted or not for this host, a
    server without TLS, the server's alert refusing this client's certificate)."""
    return _tls_failure(details.lower()) is not None


def _at_connect(lowered: str) -> bool:
    return any(words in lowered for words in _AT_CONNECT)


def _tls_failure(lowered: str) -> tuple[tuple[str, ...], str, str] | None:
    if not _at_connect(lowered):
        return None
    return next((f for f in _TLS_FAILURES if any(n in lowered for n in f[0])), None)


def _tls_message(address: str, details: str, tls: bool | None) -> str | None:
    lowered = details.lower()
    failure = _tls_failure(lowered)
    if failure is not None:
        _, why, hint = failure
        # A list's certificate check is against its first host (heartline/_channel.py).
        first = address.split(",", 1)[0].strip()
        why = why.format(host=first.rsplit(":", 1)[0].strip("[]"))
        reason = _OPENSSL_REASON.search(details)
        if reason and why == _NOT_TRUSTED:
            why = f"{why} ({reason.group(1).strip()})"
        return f"cannot connect to {address} over TLS: {why}; {hint}"
    if not _at_connect(lowered) or _CLOSED_AT_CONNECT not in lowered or tls is None:
        return None
    if tls:
        return (
            f"cannot connect to {address} over TLS: the server closed the connection in the "
            "handshake; it may want a client certificate signed by a CA it trusts "
            "(tls=TLS(cert=..., key=...), or --tls-cert and --tls-key)"
        )
    return (
        f"cannot connect to {address}: the server closed the connection at once; if it "
        "serves TLS, pass the CA that signed its certificate: tls=TLS(ca=...), --tls-ca or "
        "HEARTLINE_TLS_CA"
    )


def unreachable_message(address: str, details: str, *, tls: bool | None = None) -> str | None:
    """A message a newcomer can act on when no server answers at ``address``, or none that
    it can talk to (a failed TLS handshake), or, for an address list, none that is active
    (all stand by); None when ``details`` (gRPC's text of an UNAVAILABLE) says something else. ``tls`` says whether the client used TLS (None:
    unknown), which tells what a connection closed at once means."""
    tls_message = _tls_message(address, details, tls)
    if tls_message is not None:
        return tls_message
    lowered = details.lower()
    if _ALL_STANDING_BY in lowered:
        return (
            f"no heartline server at {address} is active: those that answer stand by (one "
            "takes over within seconds of the active server's end). Start one, or point at "
            "the active one with --server HOST:PORT[,HOST:PORT...] or HEARTLINE_ADDRESS"
        )
    reason = next((why for needle, why in _UNREACHABLE if needle in lowered), None)
    if reason is None:
        return None
    return (
        f"no heartline server answers at {address} ({reason}). Start one with `heartline up` "
        "(or `heartline server`), or point at another with --server HOST:PORT or "
        "HEARTLINE_ADDRESS"
    )


def rpc_error_from_grpc(
    err: grpc.RpcError, address: str | None = None, *, tls: bool | None = None
) -> RPCError:
    """Map a grpc error (sync or aio) to the matching :class:`RPCError` subclass.

    With the ``address`` called, a server that is not there, or a TLS handshake that
    failed, is said in plain words (gRPC's own text stays in ``.details``); ``tls`` says
    whether the call went over TLS.
    """
    code = err.code() if callable(getattr(err, "code", None)) else grpc.StatusCode.UNKNOWN
    details = err.details() if callable(getattr(err, "details", None)) else str(err)
    details = details or ""
    message = details or code.name
    if address is not None and code == grpc.StatusCode.UNAVAILABLE:
        message = unreachable_message(address, details, tls=tls) or message
    cls = _BY_CODE.get(code, RPCError)
    error = cls(message, code)
    error.details = details
    return error
