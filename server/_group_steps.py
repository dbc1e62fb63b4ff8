"""The scheduler's steps for dependencies and groups (SPEC section 4).

A part of :class:`heartline.server._scheduler.Scheduler`, kept apart so each file has one
job: this one decides what a task that waits for others does once they settle, keeps each
group's record moving with its tasks (``_follow``, called for every transition of a task
that is in a group, takes inputs, or has dependants), and stops, cancels and times out
groups. Every state change still goes through ``Scheduler._transition`` and the table.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

from heartline._states import ON_AGENT_STATES, PENDING_STATES, CancelMode, SkipReason, TaskState
from heartline.server._deps import Dependencies, GroupRecord
from heartline.server._events import GroupCommanded
from heartline.server._groups import FAILED, next_step, status_of
from heartline.server._lifecycle import UnknownGroup
from heartline.server._model import FAILURE_SERIALIZATION, ErrorInfo, States, TaskRecord

if TYPE_CHECKING:
    from heartline.server._scheduler import SchedulerConfig, _Step

S = States
_EVICTED_STATES = frozenset({S.SUCCEEDED, S.FAILED, S.CANCELLED, S.SKIPPED})


class GroupSteps:
    """Dependency and group steps of the scheduler (mixed into ``Scheduler``)."""

    # Provided by Scheduler.
    tasks: dict[str, TaskRecord]
    deps: Dependencies
    config: SchedulerConfig
    _step: _Step
    _now: float

    if TYPE_CHECKING:  # Scheduler's, the one writer of a task's state

        def _transition(
            self, task: TaskRecord, finish: TaskState, cause: str, now: float, **kw: object
        ) -> None: ...

    def _on_group_commanded(self, event: GroupCommanded) -> None:
        group = self.deps.groups.get(event.group_id)
        if group is None:
            raise UnknownGroup(event.group_id)
        step = self._step
        if event.request is not None:
            step.requests.append(event.request)
        group.cancel_mode = event.mode
        step.groups[group.group_id] = group
        now = event.time
        if event.mode is CancelMode.STOP_RUN_FINALLY:
            self._stop_group(
                group, SkipReason.GROUP_STOPPING, cancel_running=False, cause="group-stopped"
            )
            return
        ids = list(group.dag_ids())
        if event.mode is CancelMode.CANCEL:
            group.finals_released = True  # none of them runs
            ids += group.final_ids()
        group.stopping = group.stopping or SkipReason.GROUP_STOPPING
        for task_id in ids:
            task = self.tasks.get(task_id)
            if task is not None and task.state in PENDING_STATES:
                self._transition(task, S.CANCELLED, "group-cancelled", now)

    def _stop_group(
        self, group: GroupRecord, reason: SkipReason, *, cancel_running: bool, cause: str
    ) -> None:
        """Start no new DAG task of the group: skip those not started; cancel the running
        ones too if asked (a timeout). A scan of the group, once per stop."""
        group.stopping = reason
        self._step.groups[group.group_id] = group
        for task_id in list(group.dag_ids()):
            task = self.tasks.get(task_id)
            if task is None or task.state not in PENDING_STATES:
                continue
            if task.state in ON_AGENT_STATES:
                if cancel_running:
                    self._transition(task, S.CANCELLED, cause, self._now)
            else:
                self._transition(task, S.SKIPPED, cause, self._now, skip=reason)

    def _settle_dependants(self) -> None:
        """Move what this step's settled tasks unblock, until nothing moves: dependants
        run or are skipped, stopping groups skip what they requeue, settled DAGs let
        their finally tasks go. Iterative, so a long chain skipped at once is fine."""
        step = self._step
        deps = self.deps
        while True:
            while step.settled or step.ready or step.skips:
                if step.settled:
                    settled, step.settled = step.settled, []
                    for task_id, succeeded in settled:
                        step.ready.extend(deps.parent_settled(task_id, succeeded))
                elif step.ready:
                    ready, step.ready = step.ready, []
                    for task_id in ready:
                        self._decide(task_id)
                else:
                    skips, step.skips = step.skips, []
                    for task_id, reason in skips:
                        task = self.tasks.get(task_id)
                        if task is not None and task.state == S.WAITING_FOR_EP:
                            self._transition(
                                task, S.SKIPPED, "group-stopping", self._now, skip=reason
                            )
            if not self._check_groups():
                return

    def _check_groups(self) -> bool:
        """Group-level moves of the groups touched this step; True if any task moved."""
        moved = False
        for group in list(self._step.groups.values()):
            if group.stopping is None and group.row.fail_fast and group.counts.by_status[FAILED]:
                self._stop_group(
                    group, SkipReason.GROUP_STOPPING, cancel_running=False, cause="fail-fast"
                )
                moved = True
            if group.counts.settled and not group.finals_released:
                group.finals_released = True
                for task_id in group.final_ids():
                    task = self.tasks.get(task_id)
                    if task is not None and task.state == S.WAITING_FOR_DEPS:
                        self._step.ready.append(task_id)
                        moved = True
            if not group.pending and group.settle_time is None:
                group.settle_time = self._now
        return moved

    def _decide(self, task_id: str) -> None:
        """A task that waits for nothing any more: run it, or skip it and say why."""
        task = self.tasks.get(task_id)
        deps = self.deps
        if task is None or task.state != S.WAITING_FOR_DEPS:
            return  # settled meanwhile, or held (decided when released)
        if task.group_id:
            group = deps.groups[task.group_id]
            shape = group.shape[task.name]
            if shape.is_finally and not group.counts.settled:
                return  # released from hold before its DAG settled
            reason = next_step(
                shape, group.statuses, group.skip_reasons, group.counts.aggregate, group.stopping
            )
        else:
            reason = SkipReason.INPUT_NOT_SUCCEEDED if task_id in deps.doomed else None
        if reason is None:
            self._transition(task, S.WAITING_FOR_EP, "parents-settled", self._now)
        else:
            self._transition(task, S.SKIPPED, f"skipped: {reason.value}", self._now, skip=reason)

    def _follow(self, task: TaskRecord, start: TaskState | None, finish: TaskState) -> None:
        """What a transition means for dependencies and groups (see _transition)."""
        deps = self.deps
        step = self._step
        task_id = task.task_id
        settled = finish not in PENDING_STATES
        settles = settled and (start is None or start in PENDING_STATES)
        group = deps.groups.get(task.group_id) if task.group_id else None
        if group is not None:
            step.groups[group.group_id] = group
            if task.name in group.statuses:
                group.move(task.name, status_of(finish), task.skip_reason)
                if finish == S.WAITING_FOR_EP and start is not None and group.stopping is not None:
                    step.skips.append((task_id, group.stopping))
            elif settles:
                group.finals_pending -= 1
        if settles:
            step.settled.append((task_id, finish == S.SUCCEEDED))
            if finish == S.SUCCEEDED and task_id in deps.consumers:
                deps.results[task_id] = task.result or b""
            deps.forget(task_id)
        if finish in _EVICTED_STATES and task.inputs:
            deps.drop_inputs(task.inputs)
        if start == S.HELD and finish == S.WAITING_FOR_DEPS and task_id not in deps.waiting:
            step.ready.append(task_id)

    def _plain_parents(
        self,
        task_id: str,
        inputs: tuple[str, ...],
        settled: Mapping[str, tuple[TaskState, bytes | None]],
    ) -> list[str]:
        """The unsettled inputs a task outside a group waits for; settled ones give their
        result now, or doom the task (an input that did not succeed skips it)."""
        deps = self.deps
        parents = []
        for input_id in dict.fromkeys(inputs):
            held = self.tasks.get(input_id)
            if held is not None and held.state in PENDING_STATES:
                parents.append(input_id)
                continue
            state, result = (held.state, held.result) if held is not None else settled[input_id]
            if state == S.SUCCEEDED and result is not None:
                deps.results[input_id] = result
            else:
                deps.doomed.add(task_id)
        return parents

    def _restore_dependencies(
        self, task: TaskRecord, results: Mapping[str, tuple[TaskState, bytes | None]]
    ) -> None:
        """Edges, kept results and readiness of a task loaded after a restart."""
        deps = self.deps
        tid = task.task_id
        inputs = tuple(dict.fromkeys(task.inputs))
        if inputs:
            deps.take_inputs(tid, inputs)
            for input_id in inputs:
                held = self.tasks.get(input_id)
                if held is not None:
                    state, result = held.state, None
                else:
                    state, result = results.get(input_id, (S.CANCELLED, None))
                if state == S.SUCCEEDED and result is not None:
                    deps.results[input_id] = result
                elif state not in PENDING_STATES and not task.group_id:
                    deps.doomed.add(tid)
        if task.state != S.WAITING_FOR_DEPS and task.held_from != S.WAITING_FOR_DEPS:
            return
        if task.group_id:
            group = deps.groups.get(task.group_id)
            candidates: Iterable[str] = group.parents_of(task.name) if group is not None else ()
        else:
            candidates = inputs
        parents = [
            p for p in candidates if p in self.tasks and self.tasks[p].state in PENDING_STATES
        ]
        deps.wait_for(tid, parents)
        if not parents and task.state == S.WAITING_FOR_DEPS:
            self._step.ready.append(tid)

    def _inputs_of(self, task: TaskRecord) -> tuple[tuple[bytes, ...], ErrorInfo | None]:
        """The results a task takes, in placeholder order; or why it can't have them."""
        results = self.deps.results
        missing = [i for i in task.inputs if i not in results]
        if missing:
            return (), ErrorInfo(
                "heartline.InputMissing",
                f"the result of its input task {missing[0]} is no longer stored",
                "",
                FAILURE_SERIALIZATION,
            )
        inputs = tuple(results[i] for i in task.inputs)
        limit = self.config.max_payload
        # A task with inputs is always loaded with its args (server/_rows.py PLAIN).
        assert task.args is not None
        size = len(task.args) + sum(map(len, inputs))
        if size > limit:
            return (), ErrorInfo(
                "heartline.InputsTooLarge",
                f"its arguments ({len(task.args)} bytes) and the results of its {len(inputs)} "
                f"inputs ({size - len(task.args)} bytes) come to {size} bytes, over the payload "
                f"limit of {limit} bytes",
                "",
                FAILURE_SERIALIZATION,
            )
        return inputs, None

    def _waiting_for(self, task: TaskRecord) -> str:
        group = self.deps.groups.get(task.group_id) if task.group_id else None
        if group is not None:
            shape = group.shape[task.name]
            if shape.is_finally:
                return "a finally task: waiting for the group's DAG tasks to settle"
            names = sorted(p for p in shape.parents if group.statuses[p] == "None")
        else:
            names = [
                i
                for i in dict.fromkeys(task.inputs)
                if i in self.tasks and self.tasks[i].state in PENDING_STATES
            ]
        shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        return f"waiting for {shown} to settle" if names else "waiting for the tasks it needs"
