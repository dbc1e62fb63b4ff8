import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from heartline.v1 import task_pb2 as _task_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RegisterFunctionRequest(_message.Message):
    __slots__ = ("function", "function_id")
    FUNCTION_FIELD_NUMBER: _ClassVar[int]
    FUNCTION_ID_FIELD_NUMBER: _ClassVar[int]
    function: bytes
    function_id: str
    def __init__(self, function: _Optional[bytes] = ..., function_id: _Optional[str] = ...) -> None: ...

class RegisterFunctionResponse(_message.Message):
    __slots__ = ("function_id",)
    FUNCTION_ID_FIELD_NUMBER: _ClassVar[int]
    function_id: str
    def __init__(self, function_id: _Optional[str] = ...) -> None: ...

class SubmitTasksRequest(_message.Message):
    __slots__ = ("endpoint", "tasks", "session_id", "request_id")
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    TASKS_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    endpoint: str
    tasks: _containers.RepeatedCompositeFieldContainer[_task_pb2.TaskSpec]
    session_id: str
    request_id: str
    def __init__(self, endpoint: _Optional[str] = ..., tasks: _Optional[_Iterable[_Union[_task_pb2.TaskSpec, _Mapping]]] = ..., session_id: _Optional[str] = ..., request_id: _Optional[str] = ...) -> None: ...

class SubmitTasksResponse(_message.Message):
    __slots__ = ("task_ids",)
    TASK_IDS_FIELD_NUMBER: _ClassVar[int]
    task_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, task_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class GetTasksRequest(_message.Message):
    __slots__ = ("task_ids", "include_history")
    TASK_IDS_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_HISTORY_FIELD_NUMBER: _ClassVar[int]
    task_ids: _containers.RepeatedScalarFieldContainer[str]
    include_history: bool
    def __init__(self, task_ids: _Optional[_Iterable[str]] = ..., include_history: _Optional[bool] = ...) -> None: ...

class GetTasksResponse(_message.Message):
    __slots__ = ("tasks",)
    TASKS_FIELD_NUMBER: _ClassVar[int]
    tasks: _containers.RepeatedCompositeFieldContainer[_task_pb2.Task]
    def __init__(self, tasks: _Optional[_Iterable[_Union[_task_pb2.Task, _Mapping]]] = ...) -> None: ...

class ListTasksRequest(_message.Message):
    __slots__ = ("states", "endpoint", "page_size", "page_token")
    STATES_FIELD_NUMBER: _ClassVar[int]
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    states: _containers.RepeatedScalarFieldContainer[_task_pb2.TaskState]
    endpoint: str
    page_size: int
    page_token: str
    def __init__(self, states: _Optional[_Iterable[_Union[_task_pb2.TaskState, str]]] = ..., endpoint: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListTasksResponse(_message.Message):
    __slots__ = ("tasks", "next_page_token")
    TASKS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    tasks: _containers.RepeatedCompositeFieldContainer[_task_pb2.Task]
    next_page_token: str
    def __init__(self, tasks: _Optional[_Iterable[_Union[_task_pb2.Task, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class WatchTasksRequest(_message.Message):
    __slots__ = ("task_ids", "session_id", "settled_only", "include_results", "group_ids")
    TASK_IDS_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    SETTLED_ONLY_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_RESULTS_FIELD_NUMBER: _ClassVar[int]
    GROUP_IDS_FIELD_NUMBER: _ClassVar[int]
    task_ids: _containers.RepeatedScalarFieldContainer[str]
    session_id: str
    settled_only: bool
    include_results: bool
    group_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, task_ids: _Optional[_Iterable[str]] = ..., session_id: _Optional[str] = ..., settled_only: _Optional[bool] = ..., include_results: _Optional[bool] = ..., group_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class WatchTasksResponse(_message.Message):
    __slots__ = ("updates", "groups")
    UPDATES_FIELD_NUMBER: _ClassVar[int]
    GROUPS_FIELD_NUMBER: _ClassVar[int]
    updates: _containers.RepeatedCompositeFieldContainer[_task_pb2.TaskUpdate]
    groups: _containers.RepeatedCompositeFieldContainer[_task_pb2.GroupUpdate]
    def __init__(self, updates: _Optional[_Iterable[_Union[_task_pb2.TaskUpdate, _Mapping]]] = ..., groups: _Optional[_Iterable[_Union[_task_pb2.GroupUpdate, _Mapping]]] = ...) -> None: ...

class CancelTasksRequest(_message.Message):
    __slots__ = ("task_ids", "request_id")
    TASK_IDS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    task_ids: _containers.RepeatedScalarFieldContainer[str]
    request_id: str
    def __init__(self, task_ids: _Optional[_Iterable[str]] = ..., request_id: _Optional[str] = ...) -> None: ...

class CancelTasksResponse(_message.Message):
    __slots__ = ("updates",)
    UPDATES_FIELD_NUMBER: _ClassVar[int]
    updates: _containers.RepeatedCompositeFieldContainer[_task_pb2.TaskUpdate]
    def __init__(self, updates: _Optional[_Iterable[_Union[_task_pb2.TaskUpdate, _Mapping]]] = ...) -> None: ...

class HoldTasksRequest(_message.Message):
    __slots__ = ("task_ids", "request_id")
    TASK_IDS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    task_ids: _containers.RepeatedScalarFieldContainer[str]
    request_id: str
    def __init__(self, task_ids: _Optional[_Iterable[str]] = ..., request_id: _Optional[str] = ...) -> None: ...

class HoldTasksResponse(_message.Message):
    __slots__ = ("updates",)
    UPDATES_FIELD_NUMBER: _ClassVar[int]
    updates: _containers.RepeatedCompositeFieldContainer[_task_pb2.TaskUpdate]
    def __init__(self, updates: _Optional[_Iterable[_Union[_task_pb2.TaskUpdate, _Mapping]]] = ...) -> None: ...

class ReleaseTasksRequest(_message.Message):
    __slots__ = ("task_ids", "request_id")
    TASK_IDS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    task_ids: _containers.RepeatedScalarFieldContainer[str]
    request_id: str
    def __init__(self, task_ids: _Optional[_Iterable[str]] = ..., request_id: _Optional[str] = ...) -> None: ...

class ReleaseTasksResponse(_message.Message):
    __slots__ = ("updates",)
    UPDATES_FIELD_NUMBER: _ClassVar[int]
    updates: _containers.RepeatedCompositeFieldContainer[_task_pb2.TaskUpdate]
    def __init__(self, updates: _Optional[_Iterable[_Union[_task_pb2.TaskUpdate, _Mapping]]] = ...) -> None: ...

class RetryTasksRequest(_message.Message):
    __slots__ = ("task_ids", "request_id")
    TASK_IDS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    task_ids: _containers.RepeatedScalarFieldContainer[str]
    request_id: str
    def __init__(self, task_ids: _Optional[_Iterable[str]] = ..., request_id: _Optional[str] = ...) -> None: ...

class RetryTasksResponse(_message.Message):
    __slots__ = ("updates",)
    UPDATES_FIELD_NUMBER: _ClassVar[int]
    updates: _containers.RepeatedCompositeFieldContainer[_task_pb2.TaskUpdate]
    def __init__(self, updates: _Optional[_Iterable[_Union[_task_pb2.TaskUpdate, _Mapping]]] = ...) -> None: ...

class GiveUpTasksRequest(_message.Message):
    __slots__ = ("task_ids", "request_id")
    TASK_IDS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    task_ids: _containers.RepeatedScalarFieldContainer[str]
    request_id: str
    def __init__(self, task_ids: _Optional[_Iterable[str]] = ..., request_id: _Optional[str] = ...) -> None: ...

class GiveUpTasksResponse(_message.Message):
    __slots__ = ("updates",)
    UPDATES_FIELD_NUMBER: _ClassVar[int]
    updates: _containers.RepeatedCompositeFieldContainer[_task_pb2.TaskUpdate]
    def __init__(self, updates: _Optional[_Iterable[_Union[_task_pb2.TaskUpdate, _Mapping]]] = ...) -> None: ...

class ResubmitTasksRequest(_message.Message):
    __slots__ = ("task_ids", "session_id", "request_id")
    TASK_IDS_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    task_ids: _containers.RepeatedScalarFieldContainer[str]
    session_id: str
    request_id: str
    def __init__(self, task_ids: _Optional[_Iterable[str]] = ..., session_id: _Optional[str] = ..., request_id: _Optional[str] = ...) -> None: ...

class ResubmitTasksResponse(_message.Message):
    __slots__ = ("task_ids",)
    TASK_IDS_FIELD_NUMBER: _ClassVar[int]
    task_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, task_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class ListEndpointsRequest(_message.Message):
    __slots__ = ("page_size", "page_token")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class AgentInfo(_message.Message):
    __slots__ = ("agent_id", "capacity", "in_flight", "last_heartbeat", "version", "hostname", "python_version", "cloudpickle_version")
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_FIELD_NUMBER: _ClassVar[int]
    IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    LAST_HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    PYTHON_VERSION_FIELD_NUMBER: _ClassVar[int]
    CLOUDPICKLE_VERSION_FIELD_NUMBER: _ClassVar[int]
    agent_id: str
    capacity: int
    in_flight: int
    last_heartbeat: _timestamp_pb2.Timestamp
    version: str
    hostname: str
    python_version: str
    cloudpickle_version: str
    def __init__(self, agent_id: _Optional[str] = ..., capacity: _Optional[int] = ..., in_flight: _Optional[int] = ..., last_heartbeat: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., version: _Optional[str] = ..., hostname: _Optional[str] = ..., python_version: _Optional[str] = ..., cloudpickle_version: _Optional[str] = ...) -> None: ...

class Endpoint(_message.Message):
    __slots__ = ("endpoint_id", "name", "online", "agents", "queued", "registered_time")
    ENDPOINT_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    ONLINE_FIELD_NUMBER: _ClassVar[int]
    AGENTS_FIELD_NUMBER: _ClassVar[int]
    QUEUED_FIELD_NUMBER: _ClassVar[int]
    REGISTERED_TIME_FIELD_NUMBER: _ClassVar[int]
    endpoint_id: str
    name: str
    online: bool
    agents: _containers.RepeatedCompositeFieldContainer[AgentInfo]
    queued: int
    registered_time: _timestamp_pb2.Timestamp
    def __init__(self, endpoint_id: _Optional[str] = ..., name: _Optional[str] = ..., online: _Optional[bool] = ..., agents: _Optional[_Iterable[_Union[AgentInfo, _Mapping]]] = ..., queued: _Optional[int] = ..., registered_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class ListEndpointsResponse(_message.Message):
    __slots__ = ("endpoints", "next_page_token")
    ENDPOINTS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    endpoints: _containers.RepeatedCompositeFieldContainer[Endpoint]
    next_page_token: str
    def __init__(self, endpoints: _Optional[_Iterable[_Union[Endpoint, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class GetStatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetStatsResponse(_message.Message):
    __slots__ = ("tasks_by_state", "endpoints_online", "agents_online", "transitions", "start_time")
    class TasksByStateEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    TASKS_BY_STATE_FIELD_NUMBER: _ClassVar[int]
    ENDPOINTS_ONLINE_FIELD_NUMBER: _ClassVar[int]
    AGENTS_ONLINE_FIELD_NUMBER: _ClassVar[int]
    TRANSITIONS_FIELD_NUMBER: _ClassVar[int]
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    tasks_by_state: _containers.ScalarMap[str, int]
    endpoints_online: int
    agents_online: int
    transitions: int
    start_time: _timestamp_pb2.Timestamp
    def __init__(self, tasks_by_state: _Optional[_Mapping[str, int]] = ..., endpoints_online: _Optional[int] = ..., agents_online: _Optional[int] = ..., transitions: _Optional[int] = ..., start_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class SubmitGroupRequest(_message.Message):
    __slots__ = ("name", "endpoint", "tasks", "finally_tasks", "fail_fast", "timeout_seconds", "session_id", "request_id")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    TASKS_FIELD_NUMBER: _ClassVar[int]
    FINALLY_TASKS_FIELD_NUMBER: _ClassVar[int]
    FAIL_FAST_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    name: str
    endpoint: str
    tasks: _containers.RepeatedCompositeFieldContainer[_task_pb2.TaskSpec]
    finally_tasks: _containers.RepeatedCompositeFieldContainer[_task_pb2.TaskSpec]
    fail_fast: bool
    timeout_seconds: float
    session_id: str
    request_id: str
    def __init__(self, name: _Optional[str] = ..., endpoint: _Optional[str] = ..., tasks: _Optional[_Iterable[_Union[_task_pb2.TaskSpec, _Mapping]]] = ..., finally_tasks: _Optional[_Iterable[_Union[_task_pb2.TaskSpec, _Mapping]]] = ..., fail_fast: _Optional[bool] = ..., timeout_seconds: _Optional[float] = ..., session_id: _Optional[str] = ..., request_id: _Optional[str] = ...) -> None: ...

class SubmitGroupResponse(_message.Message):
    __slots__ = ("group_id", "task_ids")
    GROUP_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_IDS_FIELD_NUMBER: _ClassVar[int]
    group_id: str
    task_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, group_id: _Optional[str] = ..., task_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class GetGroupRequest(_message.Message):
    __slots__ = ("group_id", "include_history")
    GROUP_ID_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_HISTORY_FIELD_NUMBER: _ClassVar[int]
    group_id: str
    include_history: bool
    def __init__(self, group_id: _Optional[str] = ..., include_history: _Optional[bool] = ...) -> None: ...

class GetGroupResponse(_message.Message):
    __slots__ = ("group",)
    GROUP_FIELD_NUMBER: _ClassVar[int]
    group: _task_pb2.Group
    def __init__(self, group: _Optional[_Union[_task_pb2.Group, _Mapping]] = ...) -> None: ...

class ListGroupsRequest(_message.Message):
    __slots__ = ("pending_only", "page_size", "page_token")
    PENDING_ONLY_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    pending_only: bool
    page_size: int
    page_token: str
    def __init__(self, pending_only: _Optional[bool] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListGroupsResponse(_message.Message):
    __slots__ = ("groups", "next_page_token")
    GROUPS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    groups: _containers.RepeatedCompositeFieldContainer[_task_pb2.Group]
    next_page_token: str
    def __init__(self, groups: _Optional[_Iterable[_Union[_task_pb2.Group, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class CancelGroupRequest(_message.Message):
    __slots__ = ("group_id", "mode", "request_id")
    GROUP_ID_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    group_id: str
    mode: _task_pb2.CancelMode
    request_id: str
    def __init__(self, group_id: _Optional[str] = ..., mode: _Optional[_Union[_task_pb2.CancelMode, str]] = ..., request_id: _Optional[str] = ...) -> None: ...

class CancelGroupResponse(_message.Message):
    __slots__ = ("group",)
    GROUP_FIELD_NUMBER: _ClassVar[int]
    group: _task_pb2.Group
    def __init__(self, group: _Optional[_Union[_task_pb2.Group, _Mapping]] = ...) -> None: ...
