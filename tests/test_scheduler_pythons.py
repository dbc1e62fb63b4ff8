"""Routing by Python version, in the pure scheduler: a task whose function is bytecode
only (no source form) goes only to an agent on the Python that made it; the others go
anywhere. Events in, exact instructions out (tests/test_scheduler.py style).
"""

from __future__ import annotations

import dataclasses

from heartline.server._events import AgentConnected, AgentLost, NotifyWatchers, SendDispatches
from heartline.server._scheduler import Scheduler
from tests.scheduler_kit import (
    EP,
    S,
    changed,
    cmd,
    item,
    persist,
    report,
    row,
    spec,
    sr,
    submit,
    tr,
)


def agent(agent_id: str, python: str, *, capacity: int = 1, time: float = 0.0) -> AgentConnected:
    return AgentConnected(agent_id, EP, capacity, 0, (), time, python=python)


def needs(tid: str, python: str):
    """A task whose function runs only on ``python`` (bytecode only)."""
    return dataclasses.replace(spec(tid), python=python)


def dispatched(out: list, agent_id: str) -> tuple[str, ...]:
    return next(
        (tuple(i.task_id for i in ins.items) for ins in out if isinstance(ins, SendDispatches)
         and ins.agent_id == agent_id),
        (),
    )  # fmt: skip


def test_a_bytecode_task_goes_to_the_agent_on_its_python_and_others_anywhere(
    sched: Scheduler,
) -> None:
    sched.handle(agent("A311", "3.11", capacity=2), agent("B313", "3.13", capacity=2))

    out = sched.handle(submit(needs("t13", "3.13"), needs("t11", "3.11"), "any", time=1.0))

    assert dispatched(out, "B313") == ("t13",)
    assert dispatched(out, "A311") == ("t11", "any")
    assert sched.tasks["t13"].agent_id == "B313"
    assert sched.tasks["t11"].agent_id == "A311"


def test_a_task_no_agent_can_run_waits_with_the_reason_and_goes_when_one_connects(
    sched: Scheduler,
) -> None:
    sched.handle(agent("A311", "3.11", capacity=4))

    out = sched.handle(submit(needs("t13", "3.13"), time=1.0))

    # Stored and waiting: nothing is sent to the 3.11 agent, which could not load it.
    assert out == [
        persist(
            new=(row("t13", S.WAITING_FOR_EP, submit_time=1.0),),
            transitions=(tr("t13", None, S.WAITING_FOR_EP, "submit", 1.0),),
        ),
        NotifyWatchers((changed("t13", S.WAITING_FOR_EP, "submit", 1.0),)),
    ]
    assert sched.queued(EP) == 1
    assert sched.waiting_reason("t13") == (
        "no agent runs Python 3.13 (this function's bytecode); agents: 3.11"
    )
    # A later task that runs anywhere is not held up behind it.
    assert dispatched(sched.handle(submit("any", time=2.0)), "A311") == ("any",)

    out = sched.handle(agent("B313", "3.13", time=3.0))

    assert out == [
        persist(
            updates=(row("t13", S.DISPATCHED, submit_time=1.0),),
            transitions=(tr("t13", S.WAITING_FOR_EP, S.DISPATCHED, "dispatch", 3.0),),
        ),
        SendDispatches("B313", (item("t13"),)),
        NotifyWatchers((changed("t13", S.DISPATCHED, "dispatch", 3.0),)),
    ]


def test_a_task_whose_agent_is_busy_waits_for_it_not_for_another_python(
    sched: Scheduler,
) -> None:
    sched.handle(agent("A311", "3.11", capacity=2), agent("B313", "3.13", capacity=1))

    out = sched.handle(submit(needs("x1", "3.13"), needs("x2", "3.13"), "any", time=1.0))

    assert dispatched(out, "B313") == ("x1",)
    assert dispatched(out, "A311") == ("any",)
    assert sched.waiting_reason("x2") == "queued for dispatch"
    # x1 settles: its slot goes to x2, the next task for that Python.
    out = sched.handle(report("B313", sr("x1", S.SUCCEEDED, result=b"r"), time=2.0))
    assert dispatched(out, "B313") == ("x2",)


def test_cancel_and_hold_reach_a_task_waiting_for_its_python(sched: Scheduler) -> None:
    sched.handle(agent("A311", "3.11"))
    sched.handle(submit(needs("a", "3.13"), needs("b", "3.13"), time=1.0))
    sched.handle(cmd("cancel", "a", time=2.0))
    sched.handle(cmd("hold", "b", time=2.0))

    assert sched.tasks["b"].state == S.HELD
    assert sched.queued(EP) == 0
    out = sched.handle(agent("B313", "3.13", time=3.0))
    assert not any(isinstance(ins, SendDispatches) for ins in out)


def test_the_agent_of_its_python_lost_the_task_waits_again(sched: Scheduler) -> None:
    sched.handle(agent("A311", "3.11"), agent("B313", "3.13"))
    sched.handle(submit(needs("t", "3.13"), time=1.0))
    assert sched.tasks["t"].agent_id == "B313"

    out = sched.handle(AgentLost("B313", 2.0))

    assert not any(isinstance(ins, SendDispatches) for ins in out)
    assert sched.tasks["t"].state == S.WAITING_FOR_EP
    assert sched.waiting_reason("t") == (
        "no agent runs Python 3.13 (this function's bytecode); agents: 3.11"
    )


def test_an_agent_that_does_not_say_its_python_takes_anything(sched: Scheduler) -> None:
    sched.handle(agent("old", ""))

    out = sched.handle(submit(needs("t", "3.13"), time=1.0))

    assert dispatched(out, "old") == ("t",)
