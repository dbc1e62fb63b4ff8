"""The agent's on-disk log of unacked terminal reports (endpoint/_outbox.py)."""

from __future__ import annotations

from pathlib import Path

from heartline.endpoint import _outbox
from heartline.endpoint._outbox import Outbox
from heartline.v1 import endpoint_service_pb2 as pb
from heartline.v1 import task_pb2


def report(task_id: str, attempt: int = 1, result: bytes = b"r") -> pb.StatusUpdate:
    return pb.StatusUpdate(
        task_id=task_id, attempt=attempt, state=task_pb2.TASK_STATE_SUCCEEDED, result=result
    )


def test_a_dead_agents_unacked_reports_are_adopted_by_the_next_one(tmp_path: Path) -> None:
    first = Outbox(tmp_path, "agent-1")
    assert first.open() == {}
    first.add([report("a"), report("b"), report("c", 2)])
    live = {("b", 1): report("b"), ("c", 2): report("c", 2)}
    first.ack([("a", 1)], live)
    first.close(keep=True)  # as if the process died: the file stays, its lock is gone

    second = Outbox(tmp_path, "agent-2")
    adopted = second.open()

    assert adopted == live
    assert not (tmp_path / "outbox-agent-1.log").exists()
    # The adopted reports are now in the new agent's own log, so they survive it too.
    second.close(keep=True)
    third = Outbox(tmp_path, "agent-3")
    assert third.open() == live
    third.close(keep=False)


def test_a_live_agents_log_is_not_adopted(tmp_path: Path) -> None:
    alive = Outbox(tmp_path, "alive")
    alive.open()
    alive.add([report("x")])

    other = Outbox(tmp_path, "other")
    assert other.open() == {}
    assert (tmp_path / "outbox-alive.log").exists()
    alive.close(keep=False)
    other.close(keep=False)
    assert list(tmp_path.glob("outbox-*.log")) == []


def test_a_torn_last_record_is_ignored(tmp_path: Path) -> None:
    box = Outbox(tmp_path, "torn")
    box.open()
    box.add([report("whole")])
    box.close(keep=True)
    with open(tmp_path / "outbox-torn.log", "ab") as fh:
        fh.write(b"A\x00\x00\x01\x00partial")  # claims 256 bytes, has 7

    following = Outbox(tmp_path, "next")
    assert set(following.open()) == {("whole", 1)}
    following.close(keep=False)


def test_nothing_live_starts_the_log_afresh(tmp_path: Path) -> None:
    box = Outbox(tmp_path, "idle")
    box.open()
    box.add([report("a")])
    box.ack([("a", 1)], {})
    assert (tmp_path / "outbox-idle.log").stat().st_size == 0
    box.close(keep=False)


def test_a_big_log_is_compacted_to_the_live_reports(tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    monkeypatch.setattr(_outbox, "_COMPACT_AT", 10_000)
    box = Outbox(tmp_path, "busy")
    box.open()
    keep = report("keep", result=b"k" * 100)
    box.add([keep])
    for i in range(200):  # never idle: "keep" stays unacked throughout
        box.add([report(f"t{i}", result=b"x" * 100)])
        box.ack([(f"t{i}", 1)], {("keep", 1): keep})

    assert (tmp_path / "outbox-busy.log").stat().st_size < 10_000 + 1_000
    box.close(keep=True)
    after = Outbox(tmp_path, "after")
    assert after.open() == {("keep", 1): keep}
    after.close(keep=False)


def test_big_live_reports_are_not_rewritten_on_every_ack(tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    monkeypatch.setattr(_outbox, "_COMPACT_AT", 1_000)
    box = Outbox(tmp_path, "big")
    box.open()
    live = {(f"keep{i}", 1): report(f"keep{i}", result=b"k" * 500) for i in range(10)}
    box.add(live.values())  # 5 KB live, over the 1 KB threshold on its own
    rewrites = 0
    real_truncate = box._file.truncate

    def counting_truncate(size: int) -> int:
        nonlocal rewrites
        rewrites += 1
        return real_truncate(size)

    box._file.truncate = counting_truncate  # type: ignore[method-assign]
    for i in range(50):
        box.add([report(f"t{i}")])
        box.ack([(f"t{i}", 1)], live)
    assert rewrites <= 3  # not 50: compaction waits for the log to double
    box.close(keep=True)
    after = Outbox(tmp_path, "after-big")
    assert after.open() == live
    after.close(keep=False)
