"""The pure parts of groups (server/_groups.py): validation, `when`, what a task does once
its parents settled, and the aggregate status kept by counts."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from heartline._states import TaskState
from heartline.server._groups import (
    CANCELLED,
    COMPLETED,
    FAILED,
    NONE,
    SKIPPED,
    SUCCEEDED,
    TASK_STATUSES,
    GroupCounts,
    GroupError,
    GroupTask,
    SkipReason,
    When,
    aggregate_of,
    find_cycle,
    next_step,
    status_of,
    validate,
)


def t(name: str, *, after=(), inputs=(), when=(), final=False) -> GroupTask:  # noqa: ANN001
    return GroupTask(name, tuple(after), tuple(inputs), tuple(When(*w) for w in when), final)


def w(task: str, op: str, *values: str) -> tuple[str, str, tuple[str, ...]]:
    source = "$(tasks.status)" if task == "*" else f"$(tasks.{task}.status)"
    return (source, op, values)


# ----------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("tasks", "message"),
    [
        ([], "the group has no tasks"),
        ([t("a"), t("a")], "task 'a': duplicate name"),
        ([t("a b")], "task 'a b': invalid name"),
        ([t("a", after=["nope"])], "task 'a': run_after: unknown task 'nope'"),
        ([t("a", inputs=["nope"])], "task 'a': inputs: unknown task 'nope'"),
        ([t("a", after=["a"])], "task 'a': run_after: a task can't wait for itself"),
        ([t("a"), t("f", final=True), t("b", after=["f"])], "task 'b': run_after: 'f' is a finally task"),
        ([t("a"), t("f", after=["a"], final=True)], "task 'f': run_after: a finally task runs after every"),
        ([t("a"), t("b", when=[w("a", "is", SUCCEEDED)])], "task 'b': when: unknown operator 'is'"),
        ([t("a", when=[w("*", "in", FAILED)])], "DAG tasks can not refer to the aggregate status of tasks"),
        ([t("a"), t("b", when=[("$(params.x)", "in", ("y",))])], "task 'b': when: unknown input"),
        ([t("a"), t("b", when=[w("a", "in", "Done")])], "task 'b': when: values must be some of"),
        ([t("a"), t("f", when=[w("*", "in", "Skipped")], final=True)], "task 'f': when: values"),
        ([t("a"), t("b", when=[w("zz", "in", SUCCEEDED)])], "task 'b': when: unknown task 'zz'"),
        ([t("a", after=["c"]), t("b", after=["a"]), t("c", inputs=["b"])], "a cycle, each waiting"),
    ],
)
def test_a_group_that_cannot_run_is_refused_naming_the_culprit(tasks, message) -> None:  # noqa: ANN001
    with pytest.raises(GroupError, match=None) as info:
        validate(tasks)
    assert message in str(info.value), str(info.value)


def test_the_cycle_is_named_in_order_and_long_chains_are_fine() -> None:
    cycle = find_cycle([t("a", after=["c"]), t("b", after=["a"]), t("c", after=["b"]), t("d")])
    assert cycle[0] == cycle[-1] and set(cycle) == {"a", "b", "c"} and len(cycle) == 4
    # Each waits for the next.
    waits = {"a": "c", "b": "a", "c": "b"}
    assert all(waits[x] == y for x, y in zip(cycle, cycle[1:], strict=False))
    chain = [t("t0")] + [t(f"t{i}", inputs=[f"t{i - 1}"]) for i in range(1, 5000)]
    validate(chain)  # no recursion limit
    assert find_cycle(chain) == []


def test_a_valid_group_passes_and_parents_include_when_targets() -> None:
    group = [
        t("fetch"),
        t("parse", inputs=["fetch"]),
        t("lint", after=["fetch"]),
        t("report", inputs=["parse"], when=[w("lint", "in", SUCCEEDED)]),
        t("notify", when=[w("*", "in", FAILED)], final=True),
    ]
    validate(group)
    assert group[3].parents == {"parse", "lint"}
    assert group[4].parents == frozenset()


# ----------------------------------------------------------------------- statuses


def test_status_strings_of_states() -> None:
    assert status_of(TaskState.SUCCEEDED) == SUCCEEDED
    assert status_of(TaskState.ERRORED) == status_of(TaskState.FAILED) == FAILED
    assert status_of(TaskState.SKIPPED) == SKIPPED
    assert status_of(TaskState.CANCELLED) == CANCELLED
    assert {status_of(s) for s in TaskState if s.pending} == {NONE}


@pytest.mark.parametrize(
    ("statuses", "aggregate"),
    [
        ([SUCCEEDED, SUCCEEDED], SUCCEEDED),
        ([SUCCEEDED, FAILED, NONE], FAILED),
        ([SUCCEEDED, SKIPPED], COMPLETED),
        ([SUCCEEDED, SKIPPED, NONE], NONE),
        ([SUCCEEDED, CANCELLED], NONE),
        ([SKIPPED, CANCELLED], COMPLETED),
        ([FAILED, SKIPPED], FAILED),
    ],
)
def test_aggregate_status_table(statuses: list[str], aggregate: str) -> None:
    assert aggregate_of(statuses) == aggregate
    counts = GroupCounts(len(statuses))
    for s in statuses:
        counts.move(NONE, s)
    assert counts.aggregate == aggregate
    assert counts.settled == (NONE not in statuses)


@given(st.lists(st.tuples(st.integers(0, 9), st.sampled_from(TASK_STATUSES)), max_size=60))
def test_counts_moved_one_transition_at_a_time_match_the_reference(moves) -> None:  # noqa: ANN001
    statuses = [NONE] * 10
    counts = GroupCounts(10)
    for index, new in moves:
        counts.move(statuses[index], new)
        statuses[index] = new
        assert counts.aggregate == aggregate_of(statuses)
        assert counts.settled == (NONE not in statuses)


# ----------------------------------------------------------------------- next_step


def test_next_step_runs_or_skips_with_the_reason() -> None:
    statuses = {"ok": SUCCEEDED, "bad": FAILED, "gone": CANCELLED, "when": SKIPPED, "cascade": SKIPPED}
    reasons = {"when": SkipReason.WHEN_FALSE, "cascade": SkipReason.PARENT_NOT_SUCCEEDED}

    def decide(task: GroupTask, aggregate: str = NONE, stopping=None):  # noqa: ANN001, ANN202
        return next_step(task, statuses, reasons, aggregate, stopping)

    assert decide(t("x", inputs=["ok"], after=["ok"])) is None
    assert decide(t("x", inputs=["bad"])) is SkipReason.INPUT_NOT_SUCCEEDED
    assert decide(t("x", inputs=["when"])) is SkipReason.INPUT_NOT_SUCCEEDED
    assert decide(t("x", after=["bad"])) is SkipReason.PARENT_NOT_SUCCEEDED
    assert decide(t("x", after=["gone"])) is SkipReason.PARENT_NOT_SUCCEEDED
    # As in Tekton: a parent skipped by its own `when` does not skip run_after children...
    assert decide(t("x", after=["when"])) is None
    # ... but a skip that cascades from a failure does.
    assert decide(t("x", after=["cascade"])) is SkipReason.PARENT_NOT_SUCCEEDED
    assert decide(t("x", when=[w("bad", "in", FAILED)])) is None
    assert decide(t("x", when=[w("bad", "notin", FAILED)])) is SkipReason.WHEN_FALSE
    assert decide(t("x", after=["ok"]), stopping=SkipReason.GROUP_TIMED_OUT) is SkipReason.GROUP_TIMED_OUT
    notify = t("n", when=[w("*", "in", FAILED)], final=True)
    assert decide(notify, aggregate=FAILED) is None
    assert decide(notify, aggregate=SUCCEEDED) is SkipReason.WHEN_FALSE
    # Finally tasks run even while the group stops.
    assert decide(notify, aggregate=FAILED, stopping=SkipReason.GROUP_STOPPING) is None
    cleanup = t("c", when=[w("*", "notin", FAILED)], final=True)
    assert decide(cleanup, aggregate=COMPLETED) is None
    assert decide(cleanup, aggregate=FAILED) is SkipReason.WHEN_FALSE
