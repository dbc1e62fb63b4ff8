"""A dispatched task's inputs (SPEC §4, "Results flow along the edges"): from the Dispatch
through the agent and the pool's frame to the worker, which fills the placeholders.

The pool-level cases (values, an input that does not unpickle, too few inputs) are in
tests/test_worker_pool.py; this is the agent's part, on the harnesses of tests/test_caches.py
(an agent with a recording pool; a pool launching to an in-memory worker pipe).
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import cloudpickle

from heartline._lru import LruCache
from heartline._serialize import TaskInput, dumps_args, dumps_function, dumps_result, function_id
from heartline.endpoint import _worker
from heartline.endpoint._workers import WorkerPool, _Worker
from heartline.v1 import endpoint_service_pb2 as pb
from tests.test_caches import _agent, _Channel, _decode_frames, _Listener, _NoOutput, _Process

cloudpickle.register_pickle_by_value(__import__(__name__))


def describe(*args: Any, **kwargs: Any) -> str:
    return f"{args!r} {kwargs!r}"


async def test_a_dispatch_carries_its_inputs_to_the_worker(tmp_path: Path) -> None:
    agent, jobs, refused = _agent(tmp_path)
    payload = dumps_function(describe)
    fid = function_id(payload)
    with_inputs = dumps_args((TaskInput(1), "plain"), {"k": TaskInput(0)})
    agent._on_dispatch(
        [
            pb.Dispatch(
                task_id="edge",
                attempt=1,
                function_id=fid,
                function=payload,
                args=with_inputs,
                inputs=[dumps_result("first"), dumps_result(2)],
            ),
            pb.Dispatch(task_id="plain", attempt=1, function_id=fid, args=dumps_args((3,), {})),
        ]
    )
    # A newer attempt of the task supersedes the held one, with the inputs it came with.
    agent._on_dispatch(
        [
            pb.Dispatch(
                task_id="edge",
                attempt=2,
                function_id=fid,
                args=with_inputs,
                inputs=[dumps_result("again"), dumps_result(4)],
            )
        ]
    )
    assert refused == []
    assert [(j.task_id, j.attempt) for j in jobs.jobs] == [("edge", 1), ("plain", 1), ("edge", 2)]
    assert jobs.cancelled == ["edge"]
    assert jobs.jobs[0].inputs == (dumps_result("first"), dumps_result(2))
    assert jobs.jobs[1].inputs == ()
    assert all(type(j.inputs) is tuple for j in jobs.jobs)  # no proto container is kept

    # Each job through the pool's "run" frame into the worker's real _run.
    listener = _Listener()
    pool = WorkerPool(1, listener)
    worker = _Worker(_Process(), _NoOutput())  # type: ignore[arg-type]
    channel = _Channel()
    held: LruCache[str, Any] = LruCache(8, 1 << 20)
    results = []
    for job in jobs.jobs[1:]:
        pool._launch(worker, job)
        frame = _decode_frames(worker.process.stdin)
        assert frame[0] == "run" and frame[-1] == job.inputs
        done = _worker.run_task(channel, held, *frame[1:])
        pool._handle(worker, done)
        pool._idle.clear()
        outcome = listener.outcomes.pop(job.task_id)
        assert outcome.failure is None, outcome.failure
        results.append(pickle.loads(outcome.result))
    assert results == ["(3,) {}", "(4, 'plain') {'k': 'again'}"]
