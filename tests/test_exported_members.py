"""The public names are pinned: a change here is a change of the public API."""

import heartline
import heartline.client


def test_heartline_exported_members():
    assert heartline.__all__ == sorted(heartline.__all__)
    assert heartline.__all__ == [
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
    for name in heartline.__all__:
        member = getattr(heartline, name)
        if name != "__version__":
            assert member.__module__.startswith("heartline."), name
    assert heartline.__version__ == "0.1.0"


def test_client_exported_members():
    assert heartline.client.__all__ == sorted(heartline.client.__all__)
    assert heartline.client.__all__ == [
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
    for name in heartline.client.__all__:
        assert getattr(heartline.client, name).__module__.startswith("heartline.client."), name


def test_same_objects_across_faces():
    assert heartline.Client is heartline.client.Client
    assert heartline.Task is heartline.client.Task
    assert heartline.Group is heartline.client.Group
    assert heartline.GroupInfo is heartline.client.GroupInfo
    assert heartline.TaskRef is heartline.client.TaskRef
    assert issubclass(heartline.TimeoutError, TimeoutError)
    assert issubclass(heartline.RemoteError, heartline.TaskFailedError)
    assert issubclass(heartline.TaskSkippedError, heartline.TaskFailedError)
    assert not issubclass(heartline.TaskSkippedError, heartline.RemoteError)
