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

class SkipReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SKIP_REASON_UNSPECIFIED: _ClassVar[SkipReason]
    SKIP_REASON_WHEN_FALSE: _ClassVar[SkipReason]
    SKIP_REASON_INPUT_NOT_SUCCEEDED: _ClassVar[SkipReason]
    SKIP_REASON_PARENT_NOT_SUCCEEDED: _ClassVar[SkipReason]
    SKIP_REASON_GROUP_STOPPING: _ClassVar[SkipReason]
    SKIP_REASON_GROUP_TIMED_OUT: _ClassVar[SkipReason]

class GroupStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    GROUP_STATUS_UNSPECIFIED: _ClassVar[GroupStatus]
    GROUP_STATUS_NONE: _ClassVar[GroupStatus]
    GROUP_STATUS_SUCCEEDED: _ClassVar[GroupStatus]
    GROUP_STATUS_FAILED: _ClassVar[GroupStatus]
    GROUP_STATUS_COMPLETED: _ClassVar[GroupStatus]

class CancelMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CANCEL_MODE_UNSPECIFIED: _ClassVar[CancelMode]
    CANCEL_MODE_CANCEL: _ClassVar[CancelMode]
    CANCEL_MODE_CANCEL_RUN_FINALLY: _ClassVar[CancelMode]
    CANCEL_MODE_STOP_RUN_FINALLY: _ClassVar[CancelMode]
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
SKIP_REASON_UNSPECIFIED: SkipReason
SKIP_REASON_WHEN_FALSE: SkipReason
SKIP_REASON_INPUT_NOT_SUCCEEDED: SkipReason
SKIP_REASON_PARENT_NOT_SUCCEEDED: SkipReason
SKIP_REASON_GROUP_STOPPING: SkipReason
SKIP_REASON_GROUP_TIMED_OUT: SkipReason
GROUP_STATUS_UNSPECIFIED: GroupStatus
GROUP_STATUS_NONE: GroupStatus
GROUP_STATUS_SUCCEEDED: GroupStatus
GROUP_STATUS_FAILED: GroupStatus
GROUP_STATUS_COMPLETED: GroupStatus
CANCEL_MODE_UNSPECIFIED: CancelMode
CANCEL_MODE_CANCEL: CancelMode
CANCEL_MODE_CANCEL_RUN_FINALLY: CancelMode
CANCEL_MODE_STOP_RUN_FINALLY: CancelMode

class WhenExpression(_message.Message):
    __slots__ = ("input", "operator", "values")
    INPUT_FIELD_NUMBER: _ClassVar[int]
    OPERATOR_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    input: str
    operator: str
    values: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, input: _Optional[str] = ..., operator: _Optional[str] = ..., values: _Optional[_Iterable[str]] = ...) -> None: ...

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
    __slots__ = ("function_id", "args", "priority", "max_retries", "max_system_retries", "walltime_seconds", "held", "name", "run_after", "inputs", "when")
    FUNCTION_ID_FIELD_NUMBER: _ClassVar[int]
    ARGS_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    MAX_RETRIES_FIELD_NUMBER: _ClassVar[int]
    MAX_SYSTEM_RETRIES_FIELD_NUMBER: _ClassVar[int]
    WALLTIME_SECONDS_FIELD_NUMBER: _ClassVar[int]
    HELD_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    RUN_AFTER_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    WHEN_FIELD_NUMBER: _ClassVar[int]
    function_id: str
    args: bytes
    priority: Priority
    max_retries: int
    max_system_retries: int
    walltime_seconds: float
    held: bool
    name: str
    run_after: _containers.RepeatedScalarFieldContainer[str]
    inputs: _containers.RepeatedScalarFieldContainer[str]
    when: _containers.RepeatedCompositeFieldContainer[WhenExpression]
    def __init__(self, function_id: _Optional[str] = ..., args: _Optional[bytes] = ..., priority: _Optional[_Union[Priority, str]] = ..., max_retries: _Optional[int] = ..., max_system_retries: _Optional[int] = ..., walltime_seconds: _Optional[float] = ..., held: _Optional[bool] = ..., name: _Optional[str] = ..., run_after: _Optional[_Iterable[str]] = ..., inputs: _Optional[_Iterable[str]] = ..., when: _Optional[_Iterable[_Union[WhenExpression, _Mapping]]] = ...) -> None: ...

class Task(_message.Message):
    __slots__ = ("task_id", "state", "pending", "endpoint_id", "endpoint_name", "function_id", "attempt", "priority", "result", "error", "submit_time", "start_time", "settle_time", "history", "group_id", "owner", "waiting_reason", "max_retries", "max_system_retries", "walltime_seconds", "resubmitted_from", "payload_purged", "name", "skip_reason", "input_task_ids", "stdout", "stderr")
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
    NAME_FIELD_NUMBER: _ClassVar[int]
    SKIP_REASON_FIELD_NUMBER: _ClassVar[int]
    INPUT_TASK_IDS_FIELD_NUMBER: _ClassVar[int]
    STDOUT_FIELD_NUMBER: _ClassVar[int]
    STDERR_FIELD_NUMBER: _ClassVar[int]
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
    name: str
    skip_reason: SkipReason
    input_task_ids: _containers.RepeatedScalarFieldContainer[str]
    stdout: str
    stderr: str
    def __init__(self, task_id: _Optional[str] = ..., state: _Optional[_Union[TaskState, str]] = ..., pending: _Optional[bool] = ..., endpoint_id: _Optional[str] = ..., endpoint_name: _Optional[str] = ..., function_id: _Optional[str] = ..., attempt: _Optional[int] = ..., priority: _Optional[_Union[Priority, str]] = ..., result: _Optional[bytes] = ..., error: _Optional[_Union[RemoteError, _Mapping]] = ..., submit_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., start_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., settle_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., history: _Optional[_Iterable[_Union[Transition, _Mapping]]] = ..., group_id: _Optional[str] = ..., owner: _Optional[str] = ..., waiting_reason: _Optional[str] = ..., max_retries: _Optional[int] = ..., max_system_retries: _Optional[int] = ..., walltime_seconds: _Optional[float] = ..., resubmitted_from: _Optional[str] = ..., payload_purged: _Optional[bool] = ..., name: _Optional[str] = ..., skip_reason: _Optional[_Union[SkipReason, str]] = ..., input_task_ids: _Optional[_Iterable[str]] = ..., stdout: _Optional[str] = ..., stderr: _Optional[str] = ...) -> None: ...

class TaskUpdate(_message.Message):
    __slots__ = ("task_id", "state", "pending", "attempt", "cause", "time", "result", "error", "skip_reason", "group_id")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    PENDING_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    CAUSE_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    SKIP_REASON_FIELD_NUMBER: _ClassVar[int]
    GROUP_ID_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    state: TaskState
    pending: bool
    attempt: int
    cause: str
    time: _timestamp_pb2.Timestamp
    result: bytes
    error: RemoteError
    skip_reason: SkipReason
    group_id: str
    def __init__(self, task_id: _Optional[str] = ..., state: _Optional[_Union[TaskState, str]] = ..., pending: _Optional[bool] = ..., attempt: _Optional[int] = ..., cause: _Optional[str] = ..., time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., result: _Optional[bytes] = ..., error: _Optional[_Union[RemoteError, _Mapping]] = ..., skip_reason: _Optional[_Union[SkipReason, str]] = ..., group_id: _Optional[str] = ...) -> None: ...

class GroupTask(_message.Message):
    __slots__ = ("name", "is_finally", "run_after", "inputs", "when", "task")
    NAME_FIELD_NUMBER: _ClassVar[int]
    IS_FINALLY_FIELD_NUMBER: _ClassVar[int]
    RUN_AFTER_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    WHEN_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    name: str
    is_finally: bool
    run_after: _containers.RepeatedScalarFieldContainer[str]
    inputs: _containers.RepeatedScalarFieldContainer[str]
    when: _containers.RepeatedCompositeFieldContainer[WhenExpression]
    task: Task
    def __init__(self, name: _Optional[str] = ..., is_finally: _Optional[bool] = ..., run_after: _Optional[_Iterable[str]] = ..., inputs: _Optional[_Iterable[str]] = ..., when: _Optional[_Iterable[_Union[WhenExpression, _Mapping]]] = ..., task: _Optional[_Union[Task, _Mapping]] = ...) -> None: ...

class Group(_message.Message):
    __slots__ = ("group_id", "name", "endpoint_id", "endpoint_name", "owner", "status", "pending", "fail_fast", "timeout_seconds", "submit_time", "settle_time", "task_counts", "finally_count", "cancel_mode", "timed_out", "tasks")
    class TaskCountsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    GROUP_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    ENDPOINT_ID_FIELD_NUMBER: _ClassVar[int]
    ENDPOINT_NAME_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    PENDING_FIELD_NUMBER: _ClassVar[int]
    FAIL_FAST_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    SUBMIT_TIME_FIELD_NUMBER: _ClassVar[int]
    SETTLE_TIME_FIELD_NUMBER: _ClassVar[int]
    TASK_COUNTS_FIELD_NUMBER: _ClassVar[int]
    FINALLY_COUNT_FIELD_NUMBER: _ClassVar[int]
    CANCEL_MODE_FIELD_NUMBER: _ClassVar[int]
    TIMED_OUT_FIELD_NUMBER: _ClassVar[int]
    TASKS_FIELD_NUMBER: _ClassVar[int]
    group_id: str
    name: str
    endpoint_id: str
    endpoint_name: str
    owner: str
    status: GroupStatus
    pending: bool
    fail_fast: bool
    timeout_seconds: float
    submit_time: _timestamp_pb2.Timestamp
    settle_time: _timestamp_pb2.Timestamp
    task_counts: _containers.ScalarMap[str, int]
    finally_count: int
    cancel_mode: CancelMode
    timed_out: bool
    tasks: _containers.RepeatedCompositeFieldContainer[GroupTask]
    def __init__(self, group_id: _Optional[str] = ..., name: _Optional[str] = ..., endpoint_id: _Optional[str] = ..., endpoint_name: _Optional[str] = ..., owner: _Optional[str] = ..., status: _Optional[_Union[GroupStatus, str]] = ..., pending: _Optional[bool] = ..., fail_fast: _Optional[bool] = ..., timeout_seconds: _Optional[float] = ..., submit_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., settle_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., task_counts: _Optional[_Mapping[str, int]] = ..., finally_count: _Optional[int] = ..., cancel_mode: _Optional[_Union[CancelMode, str]] = ..., timed_out: _Optional[bool] = ..., tasks: _Optional[_Iterable[_Union[GroupTask, _Mapping]]] = ...) -> None: ...

class GroupUpdate(_message.Message):
    __slots__ = ("group_id", "status", "pending", "time")
    GROUP_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    PENDING_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    group_id: str
    status: GroupStatus
    pending: bool
    time: _timestamp_pb2.Timestamp
    def __init__(self, group_id: _Optional[str] = ..., status: _Optional[_Union[GroupStatus, str]] = ..., pending: _Optional[bool] = ..., time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...
