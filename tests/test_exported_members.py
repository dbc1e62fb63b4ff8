"""The public names are pinned: a change here is a change of the public API."""

import heartline
import heartline.client


def test_heartline_exported_members():
    assert heartline.__all__ == sorted(heartline.__all__)
    assert heartline.__all__ == [
        "AsyncClient",
        "Client",
        "Executor",
        "FailedPreconditionError",
        "HeartlineError",
        "InvalidArgumentError",
        "NotFoundError",
        "PermissionDeniedError",
        "RPCError",
        "RemoteError",
        "ResourceExhaustedError",
        "SerializationError",
        "Task",
        "TaskFailedError",
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
        "Priority",
        "Stats",
        "SubmitOptions",
        "Task",
        "TaskError",
        "TaskFuture",
        "TaskTransition",
        "TaskUpdate",
    ]
    for name in heartline.client.__all__:
        assert getattr(heartline.client, name).__module__.startswith("heartline.client."), name


def test_same_objects_across_faces():
    assert heartline.Client is heartline.client.Client
    assert heartline.Task is heartline.client.Task
    assert issubclass(heartline.TimeoutError, TimeoutError)
    assert issubclass(heartline.RemoteError, heartline.TaskFailedError)
