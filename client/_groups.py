"""Groups of tasks (SPEC section 4): the :class:`Group` a user defines, the :class:`TaskRef`
its tasks return, and the :class:`GroupInfo` the server answers with.

A group is checked here only for what needs no server: a :class:`TaskRef` of another
group and a duplicate name are refused with ``ValueError`` as the group is built. Every
other rule (unknown names, cycles, operators, ``$(tasks.status)`` in a DAG task) is the
server's, which refuses the whole group with INVALID_ARGUMENT naming the culprit.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from heartline._errors import InvalidArgumentError, SerializationError
from heartline._serialize import dumps_args
from heartline._states import CancelMode, GroupStatus
from heartline.v1 import task_pb2

from ._base import SubmitOptions, _check_endpoint, replace_refs
from ._types import Priority, Task, _time

WhenLike = Any
"""A :class:`When`, or a tuple ``(input, operator, values)``."""


@dataclasses.dataclass(frozen=True)
class When:
    """Run a group task only if the status read from ``input`` is (``"in"``) or is not
    (``"notin"``) one of ``values``: ``When("$(tasks.lint.status)", "in", ("Succeeded",))``.
    """

    input: str
    """``"$(tasks.<name>.status)"``, or ``"$(tasks.status)"`` (finally tasks only)."""
    operator: str
    """``"in"`` or ``"notin"``."""
    values: tuple[str, ...]
    """Status strings: ``Succeeded``, ``Failed``, ``Skipped``, ``Cancelled``, ``None``
    for a task; ``Succeeded``, ``Failed``, ``Completed``, ``None`` for the aggregate."""

    @classmethod
    def _of(cls, value: WhenLike, task: str) -> When:
        if isinstance(value, When):
            return value
        if isinstance(value, str):
            raise TypeError(
                f"task {task!r}: when: expected a list of (input, operator, values), "
                f"not the string {value!r}"
            )
        try:
            source, operator, values = value
        except (TypeError, ValueError):
            raise ValueError(
                f"task {task!r}: when: expected (input, operator, values), not {value!r}"
            ) from None
        if isinstance(values, str):
            values = (values,)
        when = cls(source, operator, tuple(values))
        if not all(isinstance(v, str) for v in (when.input, when.operator, *when.values)):
            raise TypeError(f"task {task!r}: when: expected strings, not {value!r}")
        return when

    def _to_proto(self) -> task_pb2.WhenExpression:
        return task_pb2.WhenExpression(input=self.input, operator=self.operator, values=self.values)

    @classmethod
    def _from_proto(cls, msg: task_pb2.WhenExpression) -> When:
        return cls(msg.input, msg.operator, tuple(msg.values))


@dataclasses.dataclass(frozen=True)
class TaskRef:
    """A task of a :class:`Group`, as :meth:`Group.task` returns it.

    Passed as an argument (at the top level of args or kwargs) of another task of the
    same group, it stands for this task's result: that task runs after this one and gets
    the result in its place, and is skipped if this one does not succeed. Named in
    ``run_after``, it orders without passing data.
    """

    group: Group = dataclasses.field(repr=False)
    name: str

    def __repr__(self) -> str:
        return f"TaskRef({self.group.name!r}, {self.name!r})"

    def __reduce__(self) -> Any:
        # Only a top-level argument is replaced by the task's result; one nested in a
        # container would otherwise travel as the whole Group.
        raise TypeError(
            f"{self!r} stands for a task's result only at the top level of another task's "
            "args or kwargs, not inside a container"
        )


@dataclasses.dataclass(frozen=True)
class _Member:
    """One task of a group as defined: its call (arguments already pickled) and its place."""

    name: str
    function: Callable[..., Any]
    args: bytes
    options: SubmitOptions
    run_after: tuple[str, ...]
    inputs: tuple[str, ...]
    when: tuple[When, ...]


class Group:
    """A named set of tasks with ``run_after`` edges and optional finally tasks, submitted
    whole with :meth:`Client.submit_group`::

        g = Group("nightly", endpoint="local")
        raw = g.task("fetch", download, url)
        g.task("parse", parse, raw)  # runs after fetch, gets its result
        g.finally_task("notify", notify, when=[("$(tasks.status)", "in", ["Failed"])])

    Args:
        name: the group's name (several groups may share one).
        endpoint: endpoint name or id every task runs on; None: the ``endpoint`` given to
            ``submit_group``.
        fail_fast: skip every DAG task not yet started once one fails (Tekton's way); by
            default only the tasks downstream of a failure are skipped.
        timeout: seconds; when they pass, pending DAG tasks are skipped and finally tasks
            still run. None: no timeout.

    Raises:
        InvalidArgumentError: an option is out of range or of the wrong kind.
    """

    def __init__(
        self,
        name: str,
        endpoint: str | None = None,
        fail_fast: bool = False,
        timeout: float | None = None,
    ) -> None:
        if not isinstance(name, str):
            raise InvalidArgumentError(f"a group name must be a string, not {name!r}")
        if endpoint is not None:
            _check_endpoint(endpoint)
        if timeout is not None and (
            isinstance(timeout, bool)
            or not isinstance(timeout, (int, float))
            or not 0 < timeout < math.inf
        ):
            raise InvalidArgumentError(f"timeout must be positive seconds, not {timeout!r}")
        self.name = name
        self.endpoint = endpoint
        self.fail_fast = bool(fail_fast)
        self.timeout = None if timeout is None else float(timeout)
        self._tasks: list[_Member] = []
        self._finally: list[_Member] = []
        self._names: set[str] = set()

    def __repr__(self) -> str:
        return f"Group({self.name!r}, tasks={len(self._tasks)}, finally={len(self._finally)})"

    def task(
        self,
        name: str,
        function: Callable[..., Any],
        /,
        *args: Any,
        run_after: Iterable[str | TaskRef] | str | TaskRef = (),
        when: Iterable[WhenLike] = (),
        priority: str | Priority = Priority.NORMAL,
        max_retries: int = 0,
        max_system_retries: int | None = None,
        walltime: float | None = None,
        serializer: str = "auto",
        **kwargs: Any,
    ) -> TaskRef:
        """Add the DAG task ``name``, calling ``function(*args, **kwargs)``.

        A :class:`TaskRef` of this group at the top level of ``args`` or ``kwargs`` is
        replaced by that task's result (the task runs after it). ``run_after`` names
        tasks (names or TaskRefs) to run after without taking their results; ``when``
        holds ``(input, operator, values)`` expressions. The keyword options priority,
        max_retries, max_system_retries and walltime are heartline's (as in
        :meth:`AsyncClient.submit`); bind a function keyword of one of those names with
        :func:`functools.partial`.

        Raises:
            ValueError: a duplicate name, a TaskRef of another group, or a ``when`` that
                is not ``(input, operator, values)``.
            TypeError: a name, ``run_after`` entry or ``when`` part that is not a string,
                or a ``when`` that is one string rather than a list of expressions.
            SerializationError: the arguments can't be pickled, or ``function`` is not
                callable.
        """
        options = SubmitOptions.of(
            priority=priority,
            max_retries=max_retries,
            max_system_retries=max_system_retries,
            walltime=walltime,
            serializer=serializer,
        )
        member = self._member(name, function, args, kwargs, run_after, when, options)
        self._tasks.append(member)
        self._names.add(name)
        return TaskRef(self, name)

    def finally_task(
        self,
        name: str,
        function: Callable[..., Any],
        /,
        *args: Any,
        when: Iterable[WhenLike] = (),
        priority: str | Priority = Priority.NORMAL,
        max_retries: int = 0,
        max_system_retries: int | None = None,
        walltime: float | None = None,
        serializer: str = "auto",
        **kwargs: Any,
    ) -> TaskRef:
        """Add the finally task ``name``: it runs once every DAG task has settled (its
        ``when`` may read ``$(tasks.status)``, the group's aggregate status). Otherwise
        as :meth:`task`.
        """
        options = SubmitOptions.of(
            priority=priority,
            max_retries=max_retries,
            max_system_retries=max_system_retries,
            walltime=walltime,
            serializer=serializer,
        )
        member = self._member(name, function, args, kwargs, (), when, options)
        self._finally.append(member)
        self._names.add(name)
        return TaskRef(self, name)

    def _member(
        self,
        name: str,
        function: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        run_after: Iterable[str | TaskRef] | str | TaskRef,
        when: Iterable[WhenLike],
        options: SubmitOptions,
    ) -> _Member:
        if not isinstance(name, str):
            raise TypeError(f"a task name must be a string, not {name!r}")
        if name in self._names:
            raise ValueError(f"group {self.name!r}: task {name!r}: duplicate name")
        if not callable(function):
            raise SerializationError(f"task {name!r}: {function!r} is not callable")

        def check(ref: TaskRef, where: str) -> None:
            self._check_ref(name, where, ref)

        args, kwargs, refs = replace_refs(args, kwargs, TaskRef, check)
        if isinstance(run_after, (str, TaskRef)):
            run_after = (run_after,)
        after = []
        for parent in run_after:
            if isinstance(parent, TaskRef):
                self._check_ref(name, "run_after", parent)
                parent = parent.name
            elif not isinstance(parent, str):
                raise TypeError(
                    f"task {name!r}: run_after: expected task names or TaskRefs, not {parent!r}"
                )
            after.append(parent)
        return _Member(
            name=name,
            function=function,
            args=dumps_args(args, kwargs),
            options=options,
            run_after=tuple(after),
            inputs=tuple(ref.name for ref in refs),
            when=tuple(When._of(w, name) for w in when),
        )

    def _check_ref(self, task: str, where: str, ref: TaskRef) -> None:
        if ref.group is not self:
            raise ValueError(
                f"task {task!r}: {where}: {ref!r} is a task of another group; a task can "
                f"only take results from and run after tasks of its own group {self.name!r}"
            )


@dataclasses.dataclass(frozen=True)
class GroupTask:
    """One task of a group: its place in the DAG, and the task itself."""

    name: str
    is_finally: bool
    run_after: tuple[str, ...]
    """Tasks it runs after without taking their results."""
    inputs: tuple[str, ...]
    """Tasks whose results it takes, in placeholder order."""
    when: tuple[When, ...]
    task: Task | None
    """The task as stored (None if the server sent none)."""

    @property
    def parents(self) -> tuple[str, ...]:
        """The tasks it runs after or takes results from, each once, in that order."""
        return tuple(dict.fromkeys(self.run_after + self.inputs))

    @classmethod
    def _from_proto(cls, msg: task_pb2.GroupTask) -> GroupTask:
        return cls(
            name=msg.name,
            is_finally=msg.is_finally,
            run_after=tuple(msg.run_after),
            inputs=tuple(msg.inputs),
            when=tuple(When._from_proto(w) for w in msg.when),
            task=Task._from_proto(msg.task) if msg.HasField("task") else None,
        )


TASK_STATUSES = ("Succeeded", "Failed", "Skipped", "Cancelled", "None")
"""The per-task status strings of ``GroupInfo.counts`` (``None``: not settled yet)."""


@dataclasses.dataclass(frozen=True)
class GroupInfo:
    """A group as the server stores it (``tasks`` and ``group_tasks`` are empty in the
    answers of ``list_groups``)."""

    id: str
    name: str
    status: GroupStatus
    """The aggregate status of the DAG tasks, ``$(tasks.status)``."""
    pending: bool
    """True while any of its tasks (finally tasks included) is pending."""
    endpoint_id: str
    endpoint_name: str
    owner: str
    fail_fast: bool
    timeout: float | None
    """Seconds; None means none."""
    submit_time: datetime.datetime | None
    settle_time: datetime.datetime | None
    counts: Mapping[str, int]
    """DAG tasks by per-task status (see :data:`TASK_STATUSES`), every status present."""
    finally_count: int
    cancel_mode: CancelMode | None
    """How the group was cancelled or stopped; None if it was not."""
    timed_out: bool
    """True when its timeout passed before its DAG tasks settled."""
    tasks: Mapping[str, Task]
    """Its tasks by name: the DAG tasks in submission order, then the finally tasks."""
    group_tasks: Mapping[str, GroupTask]
    """The same tasks with their place in the DAG (run_after, inputs, when, is_finally)."""

    @classmethod
    def _from_proto(cls, msg: task_pb2.Group) -> GroupInfo:
        counts = {status: msg.task_counts.get(status, 0) for status in TASK_STATUSES}
        counts.update(sorted(msg.task_counts.items()))  # any status this client doesn't know
        members = [GroupTask._from_proto(t) for t in msg.tasks]
        return cls(
            id=msg.group_id,
            name=msg.name,
            status=GroupStatus._from_proto(msg.status),
            pending=msg.pending,
            endpoint_id=msg.endpoint_id,
            endpoint_name=msg.endpoint_name,
            owner=msg.owner,
            fail_fast=msg.fail_fast,
            timeout=msg.timeout_seconds or None,
            submit_time=_time(msg, "submit_time"),
            settle_time=_time(msg, "settle_time"),
            counts=counts,
            finally_count=msg.finally_count,
            cancel_mode=CancelMode._from_proto(msg.cancel_mode),
            timed_out=msg.timed_out,
            tasks={m.name: m.task for m in members if m.task is not None},
            group_tasks={m.name: m for m in members},
        )
