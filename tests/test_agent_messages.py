"""How the agent packs its reports into StatusBatch messages (endpoint/_agent.py)."""

from __future__ import annotations

from heartline.endpoint import _agent
from heartline.v1 import endpoint_service_pb2 as pb
from heartline.v1 import task_pb2


def test_reports_go_in_order_in_messages_of_bounded_size(monkeypatch) -> None:
    monkeypatch.setattr(_agent, "_MAX_BATCH_BYTES", 1000)
    done = pb.StatusUpdate(
        task_id="b", attempt=2, state=task_pb2.TASK_STATE_SUCCEEDED, result=b"r" * 900
    )
    reports = [done, ("a", 1, task_pb2.TASK_STATE_WAITING_FOR_NODES)]
    reports += [("c", 1, task_pb2.TASK_STATE_RUNNING)]
    messages = _agent._messages(reports)
    # Nothing fits beside the big result; the two small reports share the next message.
    assert [len(m.status.updates) for m in messages] == [1, 2]
    updates = [u for m in messages for u in m.status.updates]
    assert [(u.task_id, u.attempt, u.state) for u in updates] == [
        ("b", 2, task_pb2.TASK_STATE_SUCCEEDED),
        ("a", 1, task_pb2.TASK_STATE_WAITING_FOR_NODES),
        ("c", 1, task_pb2.TASK_STATE_RUNNING),
    ]
    assert updates[0] == done
    assert _agent._messages([]) == []


def test_a_reports_output_counts_toward_its_messages_size(monkeypatch) -> None:
    monkeypatch.setattr(_agent, "_MAX_BATCH_BYTES", 1000)
    chatty = pb.StatusUpdate(
        task_id="a",
        attempt=1,
        state=task_pb2.TASK_STATE_SUCCEEDED,
        stdout="o" * 500,
        stderr="e" * 400,
    )
    quiet = pb.StatusUpdate(task_id="b", attempt=1, state=task_pb2.TASK_STATE_SUCCEEDED)
    messages = _agent._messages([chatty, quiet])
    assert [[u.task_id for u in m.status.updates] for m in messages] == [["a"], ["b"]]
    assert messages[0].status.updates[0] == chatty
