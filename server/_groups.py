"""Groups of tasks, the pure parts: validation of a group's DAG, `when` expressions, what a
task whose parents have settled does next, and the aggregate status (Tekton's TEP-0049).

No state of the scheduler lives here and nothing here does I/O: the scheduler keeps one
:class:`GroupCounts` per group, moves a task's status in it on each transition (never a
rescan), and asks :func:`next_step` about a task once every task it needs has settled.
Model: tektoncd/pipeline ``pipelinerunstate.go`` (``GetPipelineTaskStatus``, skip reasons
as named constants), in our own words.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from heartline._states import SkipReason, TaskState

# Per-task status strings, as `$(tasks.<name>.status)` reads them.
SUCCEEDED = "Succeeded"
FAILED = "Failed"
SKIPPED = "Skipped"
CANCELLED = "Cancelled"
NONE = "None"
TASK_STATUSES = (SUCCEEDED, FAILED, SKIPPED, CANCELLED, NONE)
# The aggregate status of a group's DAG tasks, `$(tasks.status)`.
COMPLETED = "Completed"
AGGREGATE_STATUSES = (SUCCEEDED, FAILED, COMPLETED, NONE)

OPERATORS = ("in", "notin")
AGGREGATE_INPUT = "$(tasks.status)"
_TASK_INPUT = re.compile(r"^\$\(tasks\.(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)\.status\)$")
TASK_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


_STATUS_OF_STATE = {
    TaskState.SUCCEEDED: SUCCEEDED,
    TaskState.ERRORED: FAILED,
    TaskState.FAILED: FAILED,
    TaskState.SKIPPED: SKIPPED,
    TaskState.CANCELLED: CANCELLED,
}


def status_of(state: TaskState) -> str:
    """A task's status string: Succeeded, Failed (errored or failed), Skipped,
    Cancelled, or None while it is pending."""
    return _STATUS_OF_STATE.get(state, NONE)


class GroupError(ValueError):
    """A group that can't be run; the message names the task and the field."""


@dataclass(frozen=True, slots=True)
class When:
    """One `when` expression: ``input`` ``operator`` ``values``."""

    input: str
    """``$(tasks.<name>.status)``, or ``$(tasks.status)`` (finally tasks only)."""
    operator: str
    """``in`` or ``notin``."""
    values: tuple[str, ...]

    @property
    def target(self) -> str | None:
        """The task whose status the expression reads; None for the aggregate status."""
        match = _TASK_INPUT.match(self.input)
        return match["name"] if match else None

    def holds(self, value: str) -> bool:
        return (value in self.values) == (self.operator == "in")


@dataclass(frozen=True, slots=True)
class GroupTask:
    """The shape of one task of a group (its call travels apart)."""

    name: str
    run_after: tuple[str, ...] = ()
    """Tasks it runs after, without taking their results."""
    inputs: tuple[str, ...] = ()
    """Tasks whose results it takes as arguments (it runs after them too)."""
    when: tuple[When, ...] = ()
    is_finally: bool = False
    """A finally task: runs once every DAG task has settled."""

    @property
    def parents(self) -> frozenset[str]:
        """The DAG tasks that must settle before this one is decided (a finally task
        waits for all DAG tasks besides)."""
        watched = {w.target for w in self.when if w.target is not None}
        return frozenset(self.run_after) | frozenset(self.inputs) | watched


def validate(tasks: Sequence[GroupTask]) -> None:
    """Refuse a group that can't run, naming the culprit.

    Raises:
        GroupError: an empty group, a bad or duplicate name, an unknown or finally task
            named as a parent, a cycle, an unknown operator or input, or
            ``$(tasks.status)`` in a DAG task.
    """
    if not tasks:
        raise GroupError("the group has no tasks")
    names: set[str] = set()
    for task in tasks:
        if not TASK_NAME.match(task.name):
            raise GroupError(
                f"task {task.name[:80]!r}: invalid name: use 1-64 letters, digits, '.', '_' "
                "or '-', starting with a letter or digit"
            )
        if task.name in names:
            raise GroupError(f"task {task.name!r}: duplicate name")
        names.add(task.name)
    finals = {t.name for t in tasks if t.is_finally}
    for task in tasks:
        for field_name, named in (("run_after", task.run_after), ("inputs", task.inputs)):
            for parent in named:
                _check_parent(task, field_name, parent, names, finals)
        if task.is_finally and task.run_after:
            raise GroupError(
                f"task {task.name!r}: run_after: a finally task runs after every DAG task; "
                "it can't name its own"
            )
        for when in task.when:
            if when.operator not in OPERATORS:
                raise GroupError(
                    f"task {task.name!r}: when: unknown operator {when.operator[:20]!r}; "
                    "use 'in' or 'notin'"
                )
            if when.input == AGGREGATE_INPUT:
                if not task.is_finally:
                    raise GroupError(
                        f"task {task.name!r}: when: DAG tasks can not refer to the aggregate "
                        "status of tasks ($(tasks.status)); only finally tasks can"
                    )
                known = AGGREGATE_STATUSES
            elif when.target is not None:
                _check_parent(task, "when", when.target, names, finals)
                known = TASK_STATUSES
            else:
                raise GroupError(
                    f"task {task.name!r}: when: unknown input {when.input[:80]!r}; use "
                    "$(tasks.<name>.status) or, in a finally task, $(tasks.status)"
                )
            odd = [v for v in when.values if v not in known]
            if odd or not when.values:
                raise GroupError(
                    f"task {task.name!r}: when: values must be some of {', '.join(known)}, "
                    f"not {list(when.values)[:5]!r}"
                )
    cycle = find_cycle(tasks)
    if cycle:
        raise GroupError(
            f"task {cycle[0]!r}: run_after: a cycle, each waiting for the next: "
            f"{' -> '.join(cycle)}"
        )


def _check_parent(task: GroupTask, field_name: str, parent: str, names: set[str], finals: set[str]) -> None:
    if parent not in names:
        raise GroupError(f"task {task.name!r}: {field_name}: unknown task {parent[:80]!r}")
    if parent in finals:
        raise GroupError(
            f"task {task.name!r}: {field_name}: {parent!r} is a finally task; only DAG tasks "
            "can be waited for"
        )
    if parent == task.name:
        raise GroupError(f"task {task.name!r}: {field_name}: a task can't wait for itself")


def find_cycle(tasks: Sequence[GroupTask]) -> list[str]:
    """A cycle of the DAG tasks as ``[a, b, ..., a]``, each waiting for the next, or []
    (iterative, so deep chains are fine)."""
    parents = {t.name: sorted(t.parents) for t in tasks if not t.is_finally}
    white, grey, black = 0, 1, 2
    color = dict.fromkeys(parents, white)
    for root in parents:
        if color[root] != white:
            continue
        path: list[str] = []
        stack: list[tuple[str, int]] = [(root, 0)]
        while stack:
            name, i = stack.pop()
            if i == 0:
                color[name] = grey
                path.append(name)
            edges = parents[name]
            if i < len(edges):
                stack.append((name, i + 1))
                nxt = edges[i]
                if color.get(nxt) == grey:
                    return [*path[path.index(nxt) :], nxt]
                if color.get(nxt) == white:
                    stack.append((nxt, 0))
            else:
                color[name] = black
                path.pop()
    return []


class GroupCounts:
    """How many DAG tasks of a group have each status; moved on every transition."""

    __slots__ = ("by_status", "total")

    def __init__(self, total: int) -> None:
        self.total = total
        self.by_status = dict.fromkeys(TASK_STATUSES, 0)
        self.by_status[NONE] = total

    def move(self, old: str, new: str) -> None:
        if old != new:
            self.by_status[old] -= 1
            self.by_status[new] += 1

    @property
    def settled(self) -> bool:
        """Every DAG task has settled (the finally tasks may start)."""
        return self.by_status[NONE] == 0

    @property
    def aggregate(self) -> str:
        """`$(tasks.status)`: Failed if any failed (this wins); else Completed if all
        settled and one or more skipped; else Succeeded if all succeeded; else None
        (still pending, or cancelled)."""
        by = self.by_status
        if by[FAILED]:
            return FAILED
        if by[NONE] == 0 and by[SKIPPED]:
            return COMPLETED
        if by[SUCCEEDED] == self.total:
            return SUCCEEDED
        return NONE


def aggregate_of(statuses: Iterable[str]) -> str:
    """The aggregate status computed from scratch (the reference the counts must match)."""
    counts = list(statuses)
    if FAILED in counts:
        return FAILED
    if NONE not in counts and SKIPPED in counts:
        return COMPLETED
    if all(s == SUCCEEDED for s in counts):
        return SUCCEEDED
    return NONE


def next_step(
    task: GroupTask,
    statuses: Mapping[str, str],
    skip_reasons: Mapping[str, SkipReason | None],
    aggregate: str,
    stopping: SkipReason | None = None,
) -> SkipReason | None:
    """What a task does once every task it needs has settled: None to run, else why it
    is skipped.

    Args:
        statuses: Each DAG task's status string.
        skip_reasons: Why each skipped DAG task was skipped.
        aggregate: `$(tasks.status)`, for finally tasks.
        stopping: Set when the group starts nothing new (a DAG task is skipped for it).
    """
    if stopping is not None and not task.is_finally:
        return stopping
    for name in task.inputs:
        if statuses[name] != SUCCEEDED:
            return SkipReason.INPUT_NOT_SUCCEEDED
    for name in task.run_after:
        status = statuses[name]
        if status in (FAILED, CANCELLED) or (
            status == SKIPPED and skip_reasons.get(name) is not SkipReason.WHEN_FALSE
        ):
            return SkipReason.PARENT_NOT_SUCCEEDED
    for when in task.when:
        value = aggregate if when.target is None else statuses[when.target]
        if not when.holds(value):
            return SkipReason.WHEN_FALSE
    return None
