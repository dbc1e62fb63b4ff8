"""Dependencies between tasks, as the scheduler keeps them: who waits for whom, the
records of the groups it holds, and the results passed along the edges.

Plain data owned by the scheduler's loop; no I/O, and no task state is written here (the
scheduler moves tasks through the transition table and tells this module what moved).
A task waits for *parents*: in a group, the DAG tasks it runs after, takes results from,
or reads in a `when` (a finally task waits for its whole DAG instead); outside a group,
the tasks whose results it takes. Edges exist only from unsettled parents, so a settled
parent costs nothing; a group record counts its DAG tasks by status (moved on every
transition, never a rescan), so its aggregate status is always at hand.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from heartline._states import CancelMode, GroupStatus, SkipReason, TaskState
from heartline.server._groups import (
    CANCELLED,
    FAILED,
    NONE,
    SKIPPED,
    SUCCEEDED,
    TASK_STATUSES,
    GroupCounts,
    GroupTask,
    When,
    status_of,
)
from heartline.server._model import GroupMember, GroupRow, GroupStateRow

__all__ = ["Dependencies", "GroupRecord", "group_task_of"]


def group_task_of(member: GroupMember) -> GroupTask:
    """The pure rules' view of a stored group member."""
    return GroupTask(
        name=member.name,
        run_after=tuple(member.run_after),
        inputs=tuple(dict.fromkeys(member.inputs)),
        when=tuple(When(w.input, w.operator, tuple(w.values)) for w in member.when),
        is_finally=member.is_finally,
    )


class GroupRecord:
    """One group the scheduler holds: its shape, and where its tasks stand.

    Kept until every task of the group (finally tasks included) has settled, then dropped
    from memory (the store keeps its row); the statuses here outlive the evicted task
    records, which is what decides the tasks still waiting.
    """

    __slots__ = (
        "cancel_mode",
        "counts",
        "deadline",
        "finals",
        "finals_pending",
        "finals_released",
        "ids",
        "notified",
        "row",
        "settle_time",
        "shape",
        "skip_reasons",
        "statuses",
        "stopping",
        "timed_out",
    )

    def __init__(self, row: GroupRow) -> None:
        self.row = row
        self.shape: dict[str, GroupTask] = {m.name: group_task_of(m) for m in row.members}
        self.ids: dict[str, str] = {m.name: m.task_id for m in row.members}
        self.finals: tuple[str, ...] = tuple(m.name for m in row.members if m.is_finally)
        dag = [m.name for m in row.members if not m.is_finally]
        self.counts = GroupCounts(len(dag))
        self.statuses: dict[str, str] = dict.fromkeys(dag, NONE)
        """Each DAG task's status string."""
        self.skip_reasons: dict[str, SkipReason] = {}
        self.finals_pending = len(self.finals)
        self.finals_released = False
        """The DAG settled and the finally tasks were let go (decided)."""
        self.stopping: SkipReason | None = None
        """Set when the group starts no new DAG task, and why they are skipped."""
        self.cancel_mode: CancelMode | None = None
        self.timed_out = False
        self.settle_time: float | None = None
        self.deadline = row.submit_time + row.timeout if row.timeout > 0 else None
        self.notified: tuple[GroupStatus, bool] | None = None
        """The status and pending flag watchers last heard of."""

    @property
    def group_id(self) -> str:
        return self.row.group_id

    @property
    def pending(self) -> bool:
        return not self.counts.settled or self.finals_pending > 0

    @property
    def status(self) -> GroupStatus:
        return GroupStatus(self.counts.aggregate)

    def dag_ids(self) -> Iterable[str]:
        ids = self.ids
        return (ids[name] for name in self.statuses)

    def final_ids(self) -> Iterable[str]:
        ids = self.ids
        return (ids[name] for name in self.finals)

    def parents_of(self, name: str) -> frozenset[str]:
        """Task ids a DAG task waits for (empty for a finally task: it waits for all)."""
        task = self.shape[name]
        if task.is_finally:
            return frozenset()
        ids = self.ids
        return frozenset(ids[p] for p in task.parents)

    def move(self, name: str, new: str, skip: SkipReason | None) -> None:
        """A DAG task's status changed (a no-op if it did not)."""
        old = self.statuses[name]
        if old != new:
            self.counts.move(old, new)
            self.statuses[name] = new
        if new == SKIPPED and skip is not None:
            self.skip_reasons[name] = skip
        else:
            self.skip_reasons.pop(name, None)

    def state_row(self) -> GroupStateRow:
        by = self.counts.by_status
        counts = (by[SUCCEEDED], by[FAILED], by[SKIPPED], by[CANCELLED], by[NONE])
        return GroupStateRow(
            self.group_id,
            self.status,
            self.pending,
            counts,
            self.cancel_mode,
            self.timed_out,
            self.settle_time,
        )

    @classmethod
    def restored(
        cls,
        row: GroupRow,
        state: GroupStateRow,
        members: Mapping[str, tuple[TaskState, SkipReason | None]],
    ) -> GroupRecord:
        """A group as the store left it: statuses from its tasks' stored states."""
        group = cls(row)
        for m in row.members:
            task_state, skip = members.get(m.task_id, (TaskState.CANCELLED, None))
            if m.is_finally:
                if not task_state.pending:
                    group.finals_pending -= 1
            else:
                group.move(m.name, status_of(task_state), skip)
        group.cancel_mode = state.cancel_mode
        group.timed_out = state.timed_out
        group.settle_time = state.settle_time
        if state.timed_out:
            group.stopping = SkipReason.GROUP_TIMED_OUT
        elif state.cancel_mode is not None or (row.fail_fast and group.counts.by_status[FAILED]):
            group.stopping = SkipReason.GROUP_STOPPING
        group.finals_released = group.counts.settled and any(
            not members.get(group.ids[f], (TaskState.WAITING_FOR_DEPS, None))[0]
            is TaskState.WAITING_FOR_DEPS
            for f in group.finals
        )
        group.notified = (group.status, group.pending)
        return group


class Dependencies:
    """Edges from unsettled parents to the tasks waiting for them, and kept results."""

    __slots__ = ("children", "consumers", "doomed", "groups", "results", "waiting")

    def __init__(self) -> None:
        self.groups: dict[str, GroupRecord] = {}
        self.children: dict[str, list[str]] = {}
        """Unsettled parent id -> ids of the tasks waiting for it."""
        self.waiting: dict[str, int] = {}
        """Task id -> how many of its parents have not settled (absent: none)."""
        self.consumers: dict[str, int] = {}
        """Task id -> how many unsettled (or ERRORED) tasks take its result."""
        self.results: dict[str, bytes] = {}
        """Results of succeeded tasks that some held task takes as input."""
        self.doomed: set[str] = set()
        """Tasks outside a group with an input that did not succeed (to be skipped)."""

    def wait_for(self, task_id: str, parents: Iterable[str]) -> None:
        """Make a task wait for these (unsettled) parents."""
        count = 0
        for parent in parents:
            self.children.setdefault(parent, []).append(task_id)
            count += 1
        if count:
            self.waiting[task_id] = count

    def take_inputs(self, task_id: str, inputs: Iterable[str]) -> None:
        """A held task takes these tasks' results: keep them while it is held."""
        for input_id in dict.fromkeys(inputs):
            self.consumers[input_id] = self.consumers.get(input_id, 0) + 1

    def drop_inputs(self, inputs: Iterable[str]) -> None:
        """A task that took these results is gone from the scheduler (settled for good)."""
        consumers = self.consumers
        for input_id in dict.fromkeys(inputs):
            left = consumers[input_id] - 1
            if left:
                consumers[input_id] = left
            else:
                del consumers[input_id]
                self.results.pop(input_id, None)

    def parent_settled(self, parent_id: str, succeeded: bool) -> list[str]:
        """A parent settled: the ids of the tasks that now wait for nothing. A parent that
        did not succeed dooms the tasks outside a group that wait for it (they take its
        result); a group task's fate is the group rules' to decide."""
        ready = []
        waiting = self.waiting
        for child in self.children.pop(parent_id, ()):
            if not succeeded:
                self.doomed.add(child)
            left = waiting.get(child)
            if left is None:  # it settled meanwhile (see forget)
                continue
            left -= 1
            if left:
                waiting[child] = left
            else:
                del waiting[child]
                ready.append(child)
        return ready

    def forget(self, task_id: str) -> None:
        """A task that settled without waiting to the end (cancelled, skipped by a stop):
        it waits for nothing any more. Its edges go when their parents settle (a lookup
        per edge then, instead of a search now)."""
        self.waiting.pop(task_id, None)
        self.doomed.discard(task_id)

    def statuses_check(self) -> None:
        """Each group's counts match its statuses (for validate)."""
        for group in self.groups.values():
            expected = dict.fromkeys(TASK_STATUSES, 0)
            for status in group.statuses.values():
                expected[status] += 1
            assert expected == group.counts.by_status, (
                f"group {group.group_id}: counts {group.counts.by_status}, statuses say {expected}"
            )
