"""The heartline client: ``Client`` (blocking), ``AsyncClient`` (asyncio) and ``Executor``
(``concurrent.futures``), plus the value types they return."""

from ._admin import TokenInfo
from ._async import AsyncClient
from ._base import SubmitOptions
from ._executor import Executor, TaskFuture
from ._groups import Group, GroupInfo, GroupTask, TaskRef, When
from ._sync import Client
from ._types import (
    AgentInfo,
    EndpointInfo,
    FailureKind,
    Priority,
    Stats,
    Task,
    TaskError,
    TaskTransition,
    TaskUpdate,
)

__all__ = [
    "AgentInfo",
    "AsyncClient",
    "Client",
    "EndpointInfo",
    "Executor",
    "FailureKind",
    "Group",
    "GroupInfo",
    "GroupTask",
    "Priority",
    "Stats",
    "SubmitOptions",
    "Task",
    "TaskError",
    "TaskFuture",
    "TaskRef",
    "TaskTransition",
    "TaskUpdate",
    "TokenInfo",
    "When",
]
