"""heartline: a self-hosted task-execution fabric for Python functions.

The public face: ``Client``, ``AsyncClient``, ``Executor``, ``TaskState``, ``Task``,
groups (``Group``, ``TaskRef``, ``GroupInfo``, ``GroupStatus``, ``SkipReason``,
``CancelMode``), ``TLS`` (how to connect over TLS) and the exception tree (see :mod:`heartline._errors`). Server, agent and
client internals live in ``heartline.server``, ``heartline.endpoint`` and
``heartline.client``.
"""

import os as _os

# Agents start worker processes with fork+exec under uvloop; gRPC's fork handlers only
# print warnings there. Must be set before grpc is first imported.
_os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
# gRPC's C core writes INFO lines to stderr until absl logging is set up (e.g. one per
# failed TLS handshake): heartline says what failed in one line of its own instead.
_os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

from heartline._errors import (
    FailedPreconditionError,
    HeartlineError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    RemoteError,
    ResourceExhaustedError,
    RPCError,
    SerializationError,
    TaskFailedError,
    TaskSkippedError,
    TimeoutError,
    UnauthenticatedError,
    UnavailableError,
)
from heartline._states import CancelMode, GroupStatus, SkipReason, TaskState
from heartline._tls import TLS
from heartline.client import (
    AsyncClient,
    Client,
    Executor,
    Group,
    GroupInfo,
    Task,
    TaskRef,
)

__version__ = "0.1.0"

__all__ = [  # noqa: RUF022 - plainly sorted, as tests/test_exported_members.py pins
    "AsyncClient",
    "CancelMode",
    "Client",
    "Executor",
    "FailedPreconditionError",
    "Group",
    "GroupInfo",
    "GroupStatus",
    "HeartlineError",
    "InvalidArgumentError",
    "NotFoundError",
    "PermissionDeniedError",
    "RPCError",
    "RemoteError",
    "ResourceExhaustedError",
    "SerializationError",
    "SkipReason",
    "TLS",
    "Task",
    "TaskFailedError",
    "TaskRef",
    "TaskSkippedError",
    "TaskState",
    "TimeoutError",
    "UnauthenticatedError",
    "UnavailableError",
    "__version__",
]
