from heartline.v1 import task_pb2 as _task_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RegisterEndpointRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class RegisterEndpointResponse(_message.Message):
    __slots__ = ("endpoint_id", "name")
    ENDPOINT_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    endpoint_id: str
    name: str
    def __init__(self, endpoint_id: _Optional[str] = ..., name: _Optional[str] = ...) -> None: ...

class HeldTask(_message.Message):
    __slots__ = ("task_id", "attempt", "state")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    attempt: int
    state: _task_pb2.TaskState
    def __init__(self, task_id: _Optional[str] = ..., attempt: _Optional[int] = ..., state: _Optional[_Union[_task_pb2.TaskState, str]] = ...) -> None: ...

class Hello(_message.Message):
    __slots__ = ("endpoint_id", "agent_id", "version", "capacity", "prefetch", "held_tasks", "hostname", "allowed_functions", "python_version", "cloudpickle_version")
    ENDPOINT_ID_FIELD_NUMBER: _ClassVar[int]
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_FIELD_NUMBER: _ClassVar[int]
    PREFETCH_FIELD_NUMBER: _ClassVar[int]
    HELD_TASKS_FIELD_NUMBER: _ClassVar[int]
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    ALLOWED_FUNCTIONS_FIELD_NUMBER: _ClassVar[int]
    PYTHON_VERSION_FIELD_NUMBER: _ClassVar[int]
    CLOUDPICKLE_VERSION_FIELD_NUMBER: _ClassVar[int]
    endpoint_id: str
    agent_id: str
    version: str
    capacity: int
    prefetch: int
    held_tasks: _containers.RepeatedCompositeFieldContainer[HeldTask]
    hostname: str
    allowed_functions: AllowedFunctions
    python_version: str
    cloudpickle_version: str
    def __init__(self, endpoint_id: _Optional[str] = ..., agent_id: _Optional[str] = ..., version: _Optional[str] = ..., capacity: _Optional[int] = ..., prefetch: _Optional[int] = ..., held_tasks: _Optional[_Iterable[_Union[HeldTask, _Mapping]]] = ..., hostname: _Optional[str] = ..., allowed_functions: _Optional[_Union[AllowedFunctions, _Mapping]] = ..., python_version: _Optional[str] = ..., cloudpickle_version: _Optional[str] = ...) -> None: ...

class AllowedFunctions(_message.Message):
    __slots__ = ("function_ids",)
    FUNCTION_IDS_FIELD_NUMBER: _ClassVar[int]
    function_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, function_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class Heartbeat(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Capacity(_message.Message):
    __slots__ = ("capacity",)
    CAPACITY_FIELD_NUMBER: _ClassVar[int]
    capacity: int
    def __init__(self, capacity: _Optional[int] = ...) -> None: ...

class StatusUpdate(_message.Message):
    __slots__ = ("task_id", "attempt", "state", "result", "error", "stdout", "stderr")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    STDOUT_FIELD_NUMBER: _ClassVar[int]
    STDERR_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    attempt: int
    state: _task_pb2.TaskState
    result: bytes
    error: _task_pb2.RemoteError
    stdout: str
    stderr: str
    def __init__(self, task_id: _Optional[str] = ..., attempt: _Optional[int] = ..., state: _Optional[_Union[_task_pb2.TaskState, str]] = ..., result: _Optional[bytes] = ..., error: _Optional[_Union[_task_pb2.RemoteError, _Mapping]] = ..., stdout: _Optional[str] = ..., stderr: _Optional[str] = ...) -> None: ...

class StatusBatch(_message.Message):
    __slots__ = ("updates",)
    UPDATES_FIELD_NUMBER: _ClassVar[int]
    updates: _containers.RepeatedCompositeFieldContainer[StatusUpdate]
    def __init__(self, updates: _Optional[_Iterable[_Union[StatusUpdate, _Mapping]]] = ...) -> None: ...

class ConnectRequest(_message.Message):
    __slots__ = ("hello", "heartbeat", "status", "capacity")
    HELLO_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_FIELD_NUMBER: _ClassVar[int]
    hello: Hello
    heartbeat: Heartbeat
    status: StatusBatch
    capacity: Capacity
    def __init__(self, hello: _Optional[_Union[Hello, _Mapping]] = ..., heartbeat: _Optional[_Union[Heartbeat, _Mapping]] = ..., status: _Optional[_Union[StatusBatch, _Mapping]] = ..., capacity: _Optional[_Union[Capacity, _Mapping]] = ...) -> None: ...

class Welcome(_message.Message):
    __slots__ = ("heartbeat_interval_seconds", "agent_id", "max_payload_bytes", "max_output_bytes")
    HEARTBEAT_INTERVAL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    MAX_PAYLOAD_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_OUTPUT_BYTES_FIELD_NUMBER: _ClassVar[int]
    heartbeat_interval_seconds: float
    agent_id: str
    max_payload_bytes: int
    max_output_bytes: int
    def __init__(self, heartbeat_interval_seconds: _Optional[float] = ..., agent_id: _Optional[str] = ..., max_payload_bytes: _Optional[int] = ..., max_output_bytes: _Optional[int] = ...) -> None: ...

class Dispatch(_message.Message):
    __slots__ = ("task_id", "attempt", "function_id", "function", "args", "walltime_seconds", "inputs")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    FUNCTION_ID_FIELD_NUMBER: _ClassVar[int]
    FUNCTION_FIELD_NUMBER: _ClassVar[int]
    ARGS_FIELD_NUMBER: _ClassVar[int]
    WALLTIME_SECONDS_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    attempt: int
    function_id: str
    function: bytes
    args: bytes
    walltime_seconds: float
    inputs: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, task_id: _Optional[str] = ..., attempt: _Optional[int] = ..., function_id: _Optional[str] = ..., function: _Optional[bytes] = ..., args: _Optional[bytes] = ..., walltime_seconds: _Optional[float] = ..., inputs: _Optional[_Iterable[bytes]] = ...) -> None: ...

class DispatchBatch(_message.Message):
    __slots__ = ("dispatches",)
    DISPATCHES_FIELD_NUMBER: _ClassVar[int]
    dispatches: _containers.RepeatedCompositeFieldContainer[Dispatch]
    def __init__(self, dispatches: _Optional[_Iterable[_Union[Dispatch, _Mapping]]] = ...) -> None: ...

class CancelBatch(_message.Message):
    __slots__ = ("task_ids",)
    TASK_IDS_FIELD_NUMBER: _ClassVar[int]
    task_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, task_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class Ack(_message.Message):
    __slots__ = ("task_id", "attempt")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    attempt: int
    def __init__(self, task_id: _Optional[str] = ..., attempt: _Optional[int] = ...) -> None: ...

class AckBatch(_message.Message):
    __slots__ = ("acks",)
    ACKS_FIELD_NUMBER: _ClassVar[int]
    acks: _containers.RepeatedCompositeFieldContainer[Ack]
    def __init__(self, acks: _Optional[_Iterable[_Union[Ack, _Mapping]]] = ...) -> None: ...

class Settings(_message.Message):
    __slots__ = ("heartbeat_interval_seconds",)
    HEARTBEAT_INTERVAL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    heartbeat_interval_seconds: float
    def __init__(self, heartbeat_interval_seconds: _Optional[float] = ...) -> None: ...

class ConnectResponse(_message.Message):
    __slots__ = ("welcome", "dispatch", "cancel", "ack", "settings")
    WELCOME_FIELD_NUMBER: _ClassVar[int]
    DISPATCH_FIELD_NUMBER: _ClassVar[int]
    CANCEL_FIELD_NUMBER: _ClassVar[int]
    ACK_FIELD_NUMBER: _ClassVar[int]
    SETTINGS_FIELD_NUMBER: _ClassVar[int]
    welcome: Welcome
    dispatch: DispatchBatch
    cancel: CancelBatch
    ack: AckBatch
    settings: Settings
    def __init__(self, welcome: _Optional[_Union[Welcome, _Mapping]] = ..., dispatch: _Optional[_Union[DispatchBatch, _Mapping]] = ..., cancel: _Optional[_Union[CancelBatch, _Mapping]] = ..., ack: _Optional[_Union[AckBatch, _Mapping]] = ..., settings: _Optional[_Union[Settings, _Mapping]] = ...) -> None: ...
