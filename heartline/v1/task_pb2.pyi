import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TaskState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TASK_STATE_UNSPECIFIED: _ClassVar[TaskState]
    TASK_STATE_WAITING_FOR_DEPS: _ClassVar[TaskState]
    TASK_STATE_WAITING_FOR_EP: _ClassVar[TaskState]
    TASK_STATE_HELD: _ClassVar[TaskState]
    TASK_STATE_DISPATCHED: _ClassVar[TaskState]
    TASK_STATE_WAITING_FOR_NODES: _ClassVar[TaskState]
    TASK_STATE_WAITING_FOR_LAUNCH: _ClassVar[TaskState]
    TASK_STATE_RUNNING: _ClassVar[TaskState]
    TASK_STATE_SUCCEEDED: _ClassVar[TaskState]
    TASK_STATE_ERRORED: _ClassVar[TaskState]
    TASK_STATE_FAILED: _ClassVar[TaskState]
    TASK_STATE_CANCELLED: _ClassVar[TaskState]
    TASK_STATE_SKIPPED: _ClassVar[TaskState]

class Priority(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PRIORITY_UNSPECIFIED: _ClassVar[Priority]
    PRIORITY_HIGH: _ClassVar[Priority]
    PRIORITY_NORMAL: _ClassVar[Priority]
    PRIORITY_LOW: _ClassVar[Priority]

class FailureKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FAILURE_KIND_UNSPECIFIED: _ClassVar[FailureKind]
    FAILURE_KIND_WORKER_DIED: _ClassVar[FailureKind]
    FAILURE_KIND_WALLTIME: _ClassVar[FailureKind]
    FAILURE_KIND_ENDPOINT_LOST: _ClassVar[FailureKind]
    FAILURE_KIND_SERIALIZATION: _ClassVar[FailureKind]
TASK_STATE_UNSPECIFIED: TaskState
TASK_STATE_WAITING_FOR_DEPS: TaskState
TASK_STATE_WAITING_FOR_EP: TaskState
TASK_STATE_HELD: TaskState
TASK_STATE_DISPATCHED: TaskState
TASK_STATE_WAITING_FOR_NODES: TaskState
TASK_STATE_WAITING_FOR_LAUNCH: TaskState
TASK_STATE_RUNNING: TaskState
TASK_STATE_SUCCEEDED: TaskState
TASK_STATE_ERRORED: TaskState
TASK_STATE_FAILED: TaskState
TASK_STATE_CANCELLED: TaskState
TASK_STATE_SKIPPED: TaskState
PRIORITY_UNSPECIFIED: Priority
PRIORITY_HIGH: Priority
PRIORITY_NORMAL: Priority
PRIORITY_LOW: Priority
FAILURE_KIND_UNSPECIFIED: FailureKind
FAILURE_KIND_WORKER_DIED: FailureKind
FAILURE_KIND_WALLTIME: FailureKind
FAILURE_KIND_ENDPOINT_LOST: FailureKind
FAILURE_KIND_SERIALIZATION: FailureKind

class RemoteError(_message.Message):
    __slots__ = ("type_name", "message", "traceback", "failure_kind")
    TYPE_NAME_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    TRACEBACK_FIELD_NUMBER: _ClassVar[int]
    FAILURE_KIND_FIELD_NUMBER: _ClassVar[int]
    type_name: str
    message: str
    traceback: str
    failure_kind: FailureKind
    def __init__(self, type_name: _Optional[str] = ..., message: _Optional[str] = ..., traceback: _Optional[str] = ..., failure_kind: _Optional[_Union[FailureKind, str]] = ...) -> None: ...

class Transition(_message.Message):
    __slots__ = ("from_state", "to_state", "cause", "time", "attempt")
    FROM_STATE_FIELD_NUMBER: _ClassVar[int]
    TO_STATE_FIELD_NUMBER: _ClassVar[int]
    CAUSE_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    from_state: TaskState
    to_state: TaskState
    cause: str
    time: _timestamp_pb2.Timestamp
    attempt: int
    def __init__(self, from_state: _Optional[_Union[TaskState, str]] = ..., to_state: _Optional[_Union[TaskState, str]] = ..., cause: _Optional[str] = ..., time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., attempt: _Optional[int] = ...) -> None: ...

class TaskSpec(_message.Message):
    __slots__ = ("function_id", "args", "priority", "max_retries", "max_system_retries", "walltime_seconds", "held")
    FUNCTION_ID_FIELD_NUMBER: _ClassVar[int]
    ARGS_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    MAX_RETRIES_FIELD_NUMBER: _ClassVar[int]
    MAX_SYSTEM_RETRIES_FIELD_NUMBER: _ClassVar[int]
    WALLTIME_SECONDS_FIELD_NUMBER: _ClassVar[int]
    HELD_FIELD_NUMBER: _ClassVar[int]
    function_id: str
    args: bytes
    priority: Priority
    max_retries: int
    max_system_retries: int
    walltime_seconds: float
    held: bool
    def __init__(self, function_id: _Optional[str] = ..., args: _Optional[bytes] = ..., priority: _Optional[_Union[Priority, str]] = ..., max_retries: _Optional[int] = ..., max_system_retries: _Optional[int] = ..., walltime_seconds: _Optional[float] = ..., held: _Optional[bool] = ...) -> None: ...

class Task(_message.Message):
    __slots__ = ("task_id", "state", "pending", "endpoint_id", "endpoint_name", "function_id", "attempt", "priority", "result", "error", "submit_time", "start_time", "settle_time", "history", "group_id", "owner", "waiting_reason", "max_retries", "max_system_retries", "walltime_seconds", "resubmitted_from", "payload_purged")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    PENDING_FIELD_NUMBER: _ClassVar[int]
    ENDPOINT_ID_FIELD_NUMBER: _ClassVar[int]
    ENDPOINT_NAME_FIELD_NUMBER: _ClassVar[int]
    FUNCTION_ID_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    SUBMIT_TIME_FIELD_NUMBER: _ClassVar[int]
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    SETTLE_TIME_FIELD_NUMBER: _ClassVar[int]
    HISTORY_FIELD_NUMBER: _ClassVar[int]
    GROUP_ID_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    WAITING_REASON_FIELD_NUMBER: _ClassVar[int]
    MAX_RETRIES_FIELD_NUMBER: _ClassVar[int]
    MAX_SYSTEM_RETRIES_FIELD_NUMBER: _ClassVar[int]
    WALLTIME_SECONDS_FIELD_NUMBER: _ClassVar[int]
    RESUBMITTED_FROM_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_PURGED_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    state: TaskState
    pending: bool
    endpoint_id: str
    endpoint_name: str
    function_id: str
    attempt: int
    priority: Priority
    result: bytes
    error: RemoteError
    submit_time: _timestamp_pb2.Timestamp
    start_time: _timestamp_pb2.Timestamp
    settle_time: _timestamp_pb2.Timestamp
    history: _containers.RepeatedCompositeFieldContainer[Transition]
    group_id: str
    owner: str
    waiting_reason: str
    max_retries: int
    max_system_retries: int
    walltime_seconds: float
    resubmitted_from: str
    payload_purged: bool
    def __init__(self, task_id: _Optional[str] = ..., state: _Optional[_Union[TaskState, str]] = ..., pending: _Optional[bool] = ..., endpoint_id: _Optional[str] = ..., endpoint_name: _Optional[str] = ..., function_id: _Optional[str] = ..., attempt: _Optional[int] = ..., priority: _Optional[_Union[Priority, str]] = ..., result: _Optional[bytes] = ..., error: _Optional[_Union[RemoteError, _Mapping]] = ..., submit_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., start_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., settle_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., history: _Optional[_Iterable[_Union[Transition, _Mapping]]] = ..., group_id: _Optional[str] = ..., owner: _Optional[str] = ..., waiting_reason: _Optional[str] = ..., max_retries: _Optional[int] = ..., max_system_retries: _Optional[int] = ..., walltime_seconds: _Optional[float] = ..., resubmitted_from: _Optional[str] = ..., payload_purged: _Optional[bool] = ...) -> None: ...

class TaskUpdate(_message.Message):
    __slots__ = ("task_id", "state", "pending", "attempt", "cause", "time", "result", "error")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    PENDING_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    CAUSE_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    state: TaskState
    pending: bool
    attempt: int
    cause: str
    time: _timestamp_pb2.Timestamp
    result: bytes
    error: RemoteError
    def __init__(self, task_id: _Optional[str] = ..., state: _Optional[_Union[TaskState, str]] = ..., pending: _Optional[bool] = ..., attempt: _Optional[int] = ..., cause: _Optional[str] = ..., time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., result: _Optional[bytes] = ..., error: _Optional[_Union[RemoteError, _Mapping]] = ...) -> None: ...
