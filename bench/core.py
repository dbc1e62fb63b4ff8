"""The pure server core alone: how fast ``Scheduler.handle`` moves tasks, and how much
memory a queued task holds. No I/O, no event loop, no store.

Builds a Scheduler as the server does (``SchedulerConfig`` with validation off, as in
production), connects one agent with room for a whole batch, then feeds, per batch of
``--batch`` tasks: one submission (the step dispatches every task of it), one report of
every task's ``WAITING_FOR_NODES`` (the agent acks a dispatch batch in one loop
iteration), then reports of ``--report-batch`` tasks each carrying their
``WAITING_FOR_LAUNCH``, ``RUNNING`` and ``SUCCEEDED`` (a short task's whole story rides
in one message, ``docs/ARCHITECTURE.md`` "Steps and batching"). Six transitions a task.
The events are built before the clock starts, with fresh strings per task as a decoded
request would give them (a uuid4 task id, the function id); only ``handle`` is timed.

Memory: ``--memory-n`` tasks submitted to an endpoint without an agent (so all stay
queued), in batches, with tracemalloc on; the bytes still allocated afterwards (the
events and instructions dropped, a gc run), divided by the number of tasks. That counts
everything the server keeps for a queued task: its record, its queue entries, its id
(85 bytes for a uuid4 string) and its arguments (``--args-bytes``, plus 33 bytes).

Prints one JSON line, each figure the median of ``--repeat`` runs. Rates are per CPU
second of this process in ``handle`` (``time.process_time``), so other work on the
machine sways them less; ``wall_transitions_per_s`` is the same by the wall clock. Run::

    .venv/bin/python bench/core.py              # -n 100000 --batch 1000
    .venv/bin/python bench/core.py -n 20000 --memory-n 20000 --repeat 1   # quick look
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import sys
import time
import tracemalloc
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from heartline._states import TaskState
from heartline.server._events import (
    AgentConnected,
    AgentReported,
    Event,
    NewTask,
    StatusReport,
    TasksSubmitted,
)
from heartline.server._model import PRIORITY_NORMAL
from heartline.server._scheduler import Scheduler, SchedulerConfig

S = TaskState
ENDPOINT = "4b0c3a52-0c5e-4d8e-9f3b-1d2a6f0e7c11"
OWNER = "alice"
SESSION = "c9f1e7a0-5b7d-4c3e-8a61-0f2e9d4b6a27"
AGENT = "agent-1"
FUNCTION = "5f" * 32  # a sha256, in hex
RESULT = b"\x80\x05K\x07."  # pickle.dumps(7)


def _fresh(text: str) -> str:
    """A new str object equal to text, as each decode of a request makes one."""
    return (text + "!")[:-1]


def _submission(n: int, args_bytes: int, now: float) -> TasksSubmitted:
    tasks = tuple(
        NewTask(
            str(uuid.uuid4()),
            _fresh(FUNCTION),
            bytes(args_bytes),
            PRIORITY_NORMAL,
            0,
            3,
            0.0,
        )
        for _ in range(n)
    )
    return TasksSubmitted(ENDPOINT, OWNER, tasks, SESSION, now)


def _steps(n: int, batch: int, report_batch: int, args_bytes: int) -> list[tuple[Event, ...]]:
    """Every step the agent's server would feed, in order, for n tasks."""
    steps: list[tuple[Event, ...]] = []
    now = 1.0
    for lo in range(0, n, batch):
        submitted = _submission(min(batch, n - lo), args_bytes, now)
        steps.append((submitted,))
        ids = [t.task_id for t in submitted.tasks]
        now += 0.001
        acks = tuple(StatusReport(tid, 1, S.WAITING_FOR_NODES) for tid in ids)
        steps.append((AgentReported(AGENT, acks, now),))
        for at in range(0, len(ids), report_batch):
            now += 0.001
            reports = []
            for tid in ids[at : at + report_batch]:
                reports.append(StatusReport(tid, 1, S.WAITING_FOR_LAUNCH))
                reports.append(StatusReport(tid, 1, S.RUNNING))
                reports.append(StatusReport(tid, 1, S.SUCCEEDED, RESULT))
            steps.append((AgentReported(AGENT, tuple(reports), now),))
    return steps


def _scheduler() -> Scheduler:
    # As ServerCore makes it, validation off (the server's default).
    return Scheduler(SchedulerConfig(validate=False))


def run_throughput(n: int, batch: int, report_batch: int, args_bytes: int) -> dict[str, float]:
    """One run: n tasks through their whole story; the seconds spent in handle()."""
    steps = _steps(n, batch, report_batch, args_bytes)
    scheduler = _scheduler()
    scheduler.handle(AgentConnected(AGENT, ENDPOINT, batch, 0, (), 0.5))
    before = scheduler.transitions_total
    handle = scheduler.handle
    gc.collect()
    # The prebuilt events are no part of the server's heap: keep them out of the
    # collector's full passes (the core's own allocations still count).
    gc.freeze()
    try:
        start, cpu = time.perf_counter(), time.process_time()
        for events in steps:
            handle(*events)
        cpu = time.process_time() - cpu
        elapsed = time.perf_counter() - start
    finally:
        gc.unfreeze()
    transitions = scheduler.transitions_total - before
    if scheduler.tasks or transitions != 6 * n:
        raise SystemExit(f"bench: {len(scheduler.tasks)} tasks left, {transitions} transitions")
    return {"cpu": cpu, "wall": elapsed, "transitions": transitions}


def run_memory(n: int, batch: int, args_bytes: int) -> float:
    """Bytes retained per queued task: n tasks submitted to an endpoint no agent serves."""
    scheduler = _scheduler()
    scheduler.handle(_submission(1, args_bytes, 0.5))  # the endpoint's queue exists
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for lo in range(0, n, batch):
            scheduler.handle(_submission(min(batch, n - lo), args_bytes, 1.0 + lo))
        gc.collect()
        after = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    if scheduler.queued(ENDPOINT) != n + 1:
        raise SystemExit(f"bench: {scheduler.queued(ENDPOINT)} queued, not {n + 1}")
    return (after - before) / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=100_000, help="tasks per run")
    parser.add_argument("--batch", type=int, default=1000, help="tasks per submission")
    parser.add_argument(
        "--report-batch", type=int, default=100, help="tasks per report of their outcome"
    )
    parser.add_argument("--args-bytes", type=int, default=24, help="size of each task's args")
    parser.add_argument("--memory-n", type=int, default=100_000, help="tasks queued for memory")
    parser.add_argument("--repeat", type=int, default=3, help="runs; medians are printed")
    options = parser.parse_args()

    runs = [
        run_throughput(options.n, options.batch, options.report_batch, options.args_bytes)
        for _ in range(options.repeat)
    ]
    seconds = statistics.median(r["cpu"] for r in runs)
    wall = statistics.median(r["wall"] for r in runs)
    transitions = runs[0]["transitions"]
    memory = [
        run_memory(options.memory_n, options.batch, options.args_bytes)
        for _ in range(options.repeat)
    ]
    print(
        json.dumps(
            {
                "bench": "core",
                "tasks": options.n,
                "batch": options.batch,
                "report_batch": options.report_batch,
                "transitions_per_s": round(transitions / seconds),
                "tasks_per_s": round(options.n / seconds),
                "us_per_task": round(seconds / options.n * 1e6, 2),
                "wall_transitions_per_s": round(transitions / wall),
                "bytes_per_queued_task": round(statistics.median(memory)),
                "memory_tasks": options.memory_n,
                "args_bytes": options.args_bytes,
                "repeat": options.repeat,
                "python": platform.python_version(),
            }
        )
    )


if __name__ == "__main__":
    main()
