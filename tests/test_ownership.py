"""Ownership with auth on, against a real server and agent: another user's tasks, groups
and endpoints are invisible (NOT_FOUND, as if they did not exist) to every read, watch,
command and submit, until their owner shares an endpoint, and then only submitting to it
is allowed (SPEC section 6)."""

from __future__ import annotations

from collections.abc import Callable

import pytest

import heartline
from heartline import Client, Group, TaskState, _serialize
from heartline.v1 import task_pb2
from heartline.v1 import task_service_pb2 as pb
from heartline.v1 import task_service_pb2_grpc as pb_grpc
from tests.conftest import ServerProc
from tests.helpers import Proc, authed_channel

TIMEOUT = 30.0


def test_another_users_tasks_groups_and_endpoints_are_not_found_until_shared(
    server: ServerProc, start_agent: Callable[..., Proc]
) -> None:
    with Client(server.address) as admin:
        alice_token, _ = admin.create_token("alice")
        bob_token, _ = admin.create_token("bob")
    start_agent("alice-ep", 1, "--token", alice_token)

    with (
        Client(server.address, token=alice_token) as alice,
        Client(server.address, token=bob_token) as bob,
    ):
        done = alice.submit("alice-ep", pow, 2, 5)
        assert alice.get_result(done, timeout=TIMEOUT) == 32
        held = alice.submit("alice-ep", pow, 2, 6, held=True)
        errored = alice.submit("alice-ep", int, "x")
        with pytest.raises(heartline.RemoteError):
            alice.get_result(errored, timeout=TIMEOUT)
        g = Group("alices", endpoint="alice-ep")
        g.task("a", pow, 2, 7)
        gid = alice.submit_group(g)
        alice.wait_group(gid, timeout=TIMEOUT)

        # Bob sees none of it, and each of his attempts answers as for an unknown id.
        for call in (
            lambda: bob.get_task(done),
            lambda: bob.get_tasks([done, held]),
            lambda: bob.get_result(done, timeout=TIMEOUT),
            lambda: bob.cancel([held]),
            lambda: bob.hold([held]),
            lambda: bob.release([held]),
            lambda: bob.retry([errored]),
            lambda: bob.give_up([errored]),
            lambda: bob.resubmit([done]),
            lambda: bob.get_group(gid),
            lambda: bob.cancel_group(gid),
            lambda: bob.submit("alice-ep", pow, 2, 2),
        ):
            with pytest.raises(heartline.NotFoundError):
                call()
        assert bob.list_tasks() == []
        assert bob.list_groups() == []
        assert bob.list_endpoints() == []
        assert sum(bob.stats().tasks_by_state.values()) == 0
        # Nothing of Alice's changed.
        assert alice.get_task(held).state is TaskState.HELD
        assert alice.get_task(errored).state is TaskState.ERRORED
        assert {t.id for t in alice.list_tasks()} >= {done, held, errored}

        # Shared: Bob may submit to the endpoint; his task is his, Alice's stay hers.
        alice.share_endpoint("alice-ep", "bob")
        assert [e.name for e in bob.list_endpoints()] == ["alice-ep"]
        mine = bob.submit("alice-ep", pow, 3, 3)
        assert bob.get_result(mine, timeout=TIMEOUT) == 27
        assert [t.id for t in bob.list_tasks()] == [mine]
        with pytest.raises(heartline.NotFoundError):
            bob.get_task(done)
        with pytest.raises(heartline.NotFoundError):
            bob.cancel([held])
        with pytest.raises(heartline.NotFoundError):
            alice.get_task(mine)  # Bob's task on Alice's endpoint is Bob's

        # The admin sees everyone's.
        with Client(server.address) as admin:
            assert {done, held, errored, mine} <= {t.id for t in admin.list_tasks(limit=1000)}
            assert admin.get_group(gid).id == gid


def test_a_session_watch_never_sees_another_users_tasks_of_the_same_session_id(
    server: ServerProc, start_agent: Callable[..., Proc]
) -> None:
    """Sessions are ids clients make up; the server keys them by owner, so a user who
    watches another user's session id gets none of that user's transitions."""
    start_agent("local", 1)
    session = "shared-session-id"
    with Client(server.address) as admin:
        carol_token, _ = admin.create_token("carol")
        admin.share_endpoint("local", "carol")
    payload = _serialize.dumps_function(pow)
    spec = task_pb2.TaskSpec(
        function_id=_serialize.function_id(payload), args=_serialize.dumps_args((2, 8), {})
    )
    watch = pb.WatchTasksRequest(session_id=session, settled_only=True)
    submit = pb.SubmitTasksRequest(endpoint="local", tasks=[spec], session_id=session)
    with (
        authed_channel(server.address) as mine,
        authed_channel(server.address, carol_token) as hers,
    ):
        admin_stub = pb_grpc.TaskServiceStub(mine)
        carol_stub = pb_grpc.TaskServiceStub(hers)
        admin_watch = admin_stub.WatchTasks(watch, timeout=TIMEOUT)
        carol_watch = carol_stub.WatchTasks(watch, timeout=TIMEOUT)
        assert list(next(admin_watch).updates) == [] and list(next(carol_watch).updates) == []
        admin_stub.RegisterFunction(pb.RegisterFunctionRequest(function=payload), timeout=TIMEOUT)
        (theirs,) = admin_stub.SubmitTasks(submit, timeout=TIMEOUT).task_ids
        settled = next(admin_watch).updates  # the admin's own session sees its task settle
        assert [(u.task_id, u.state) for u in settled] == [(theirs, task_pb2.TASK_STATE_SUCCEEDED)]
        # Carol's own task, submitted after the admin's settled: on her stream it is the
        # first thing to arrive (the admin's would have come before it, had it leaked).
        (own,) = carol_stub.SubmitTasks(submit, timeout=TIMEOUT).task_ids
        first = next(carol_watch).updates
        assert [u.task_id for u in first] == [own]
        admin_watch.cancel()
        carol_watch.cancel()
