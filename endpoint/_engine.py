"""The seam between the agent and whatever runs its tasks.

The agent hands each attempt of a task (a :class:`~heartline.endpoint._workers.Job`) to one
:class:`Engine` and hears back through an :class:`EngineListener`. Two engines sit behind
it: the ``process`` engine (:class:`~heartline.endpoint._workers.WorkerPool`, worker
processes on this machine) and the ``dask`` engine
(:class:`~heartline.endpoint._dask.DaskEngine`, futures on a Dask distributed cluster).

The contract, the same for every engine:

- ``submit`` takes a job and never blocks; the engine reports, synchronously on the
  agent's event loop and in this order, ``task_launched`` (handed to whatever will run it:
  WAITING_FOR_LAUNCH), ``task_started`` (it is about to run: RUNNING) and exactly one
  ``task_finished``. A worker that dies under the job is a ``WORKER_DIED`` failure, a job
  past its walltime a ``WALLTIME`` failure; the engine never retries: retries are the
  server's decision.
- ``cancel`` stops a job wherever it is (queued, or running: its code really stops) and
  nothing more is reported for it. ``close`` does that to every job.
- ``capacity`` is how many jobs can run at once now; an engine whose capacity moves (a
  cluster that scales) says so with ``capacity_changed``.

Model: globus-compute's ``engines/base.py``, without its retries inside the engine.
"""

from __future__ import annotations

from typing import Protocol

from heartline.endpoint._workers import Job, Outcome, PoolListener


class EngineListener(PoolListener, Protocol):
    """Receives what happens to jobs, and capacity changes; called on the event loop."""

    def capacity_changed(self, capacity: int) -> None:
        """The engine can now run ``capacity`` jobs at once (it may be 0)."""
        ...


class Engine(Protocol):
    """What the agent needs of whatever runs its tasks."""

    max_output: int
    """Bytes of each of a task's stdout and stderr to report with its outcome (the last
    ones); the agent sets the server's. An engine that cannot capture output (Dask's:
    what a task prints goes to the Dask worker's log) reports none."""

    @property
    def capacity(self) -> int:
        """Jobs that can run at once now (worker slots, or a cluster's threads)."""
        ...

    def submit(self, job: Job) -> None:
        """Take a job; raises ``ValueError`` if the engine already holds its task."""
        ...

    def cancel(self, task_id: str) -> bool:
        """Stop the task's job, queued or running; True if the engine held it."""
        ...

    def __contains__(self, task_id: str) -> bool: ...

    async def run(self) -> None:
        """Serve jobs until :meth:`close`; release everything on the way out."""
        ...

    def close(self) -> None:
        """Stop taking work and stop every job; nothing more is reported."""
        ...


__all__ = ["Engine", "EngineListener", "Job", "Outcome"]
