"""The group RPCs of ``heartline.v1.TaskService`` (SPEC section 4): SubmitGroup, GetGroup,
ListGroups, CancelGroup, and the groups of a WatchTasks.

:class:`GroupRpcs` is mixed into ``TaskServicer`` and uses its request helpers (endpoint
and function checks, ``_new_task``, request ids, ``_durable``, ``_task``), so a group's
tasks are checked, stored and shown exactly as submitted tasks are.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING

import grpc

from heartline._defaults import MAX_GROUP_NAME, MAX_HISTORY_TASKS, MAX_TASKS_PER_SUBMIT
from heartline._states import CancelMode
from heartline.server._convert import group_row_to_update, group_to_proto
from heartline.server._events import GroupCommanded, NewGroup, NewTask, TasksSubmitted
from heartline.server._groups import GroupError, GroupTask, When, validate
from heartline.server._ids import new_id
from heartline.server._model import GroupMember, GroupRow, GroupStateRow, WhenRow
from heartline.server._rpc import (
    Abort,
    check_group_id,
    decode_page_token,
    encode_page_token,
    page_limit,
    refusing,
)
from heartline.server._scheduler import UnknownGroup
from heartline.v1 import task_pb2
from heartline.v1 import task_service_pb2 as pb

if TYPE_CHECKING:
    from heartline.server._core import ServerCore

_CANCEL_MODES = ", ".join(task_pb2.CancelMode.Name(m._to_proto()) for m in CancelMode)


def _shape(spec: task_pb2.TaskSpec, is_finally: bool) -> GroupTask:
    """The task's place in the group, as ``server/_groups.validate`` judges it."""
    return GroupTask(
        name=spec.name,
        run_after=tuple(spec.run_after),
        inputs=tuple(dict.fromkeys(spec.inputs)),
        when=tuple(When(w.input, w.operator, tuple(w.values)) for w in spec.when),
        is_finally=is_finally,
    )


def _member(spec: task_pb2.TaskSpec, task_id: str, is_finally: bool) -> GroupMember:
    return GroupMember(
        name=spec.name,
        task_id=task_id,
        is_finally=is_finally,
        run_after=tuple(spec.run_after),
        inputs=tuple(spec.inputs),
        when=tuple(WhenRow(w.input, w.operator, tuple(w.values)) for w in spec.when),
    )


def _check_header(request: pb.SubmitGroupRequest) -> None:
    """Refuse a group whose name, size or timeout is wrong, before its tasks are read."""
    name = request.name
    if not name:
        raise Abort(grpc.StatusCode.INVALID_ARGUMENT, "name is empty: give the group a name")
    if len(name) > MAX_GROUP_NAME:
        raise Abort(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"name has {len(name)} characters; at most {MAX_GROUP_NAME}",
        )
    if not name.isprintable():
        raise Abort(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"name {name[:80]!r} has a character that can't be shown (a newline, a control "
            "character)",
        )
    if not request.tasks:
        raise Abort(
            grpc.StatusCode.INVALID_ARGUMENT, "tasks is empty: a group needs at least one DAG task"
        )
    total = len(request.tasks) + len(request.finally_tasks)
    if total > MAX_TASKS_PER_SUBMIT:
        raise Abort(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"{total} tasks in one group ({len(request.tasks)} DAG, "
            f"{len(request.finally_tasks)} finally); at most {MAX_TASKS_PER_SUBMIT}",
        )
    timeout = request.timeout_seconds
    if not math.isfinite(timeout) or timeout < 0:
        raise Abort(
            grpc.StatusCode.INVALID_ARGUMENT,
            "timeout_seconds must be a finite number >= 0 (0 means none)",
        )


def _cancel_mode(value: int) -> CancelMode:
    if value == task_pb2.CANCEL_MODE_UNSPECIFIED:
        return CancelMode.CANCEL
    mode = CancelMode._from_proto(value)
    if mode is None:
        raise Abort(
            grpc.StatusCode.INVALID_ARGUMENT, f"unknown cancel mode {value}: use {_CANCEL_MODES}"
        )
    return mode


class GroupRpcs:
    """The group RPCs; a mixin of ``TaskServicer``, whose helpers it calls."""

    core: ServerCore

    # ------------------------------------------------------------ shared with watches

    async def _own_group(self, group_id: str, scope: str | None) -> tuple[GroupRow, GroupStateRow]:
        """The stored group; NOT_FOUND if there is none, or the caller does not see it
        (``scope``: the user whose groups it sees, None for all)."""
        found = await self.core.store.get_group(group_id)
        if found is None or (scope is not None and found[0].owner != scope):
            raise Abort(grpc.StatusCode.NOT_FOUND, f"no group {group_id}")
        return found

    async def _watched_groups(
        self, group_ids: list[str], scope: str | None
    ) -> list[task_pb2.GroupUpdate]:
        """Each group's current status, the first message of a watch; NOT_FOUND as
        GetGroup for one that is unknown or another owner's."""
        found = await asyncio.gather(*(self._own_group(gid, scope) for gid in group_ids))
        return [group_row_to_update(row, state) for row, state in found]

    def _group(
        self,
        row: GroupRow,
        state: GroupStateRow,
        tasks: Mapping[str, task_pb2.Task] | None = None,
    ) -> task_pb2.Group:
        endpoint = self.core.endpoints.get(row.endpoint_id)
        return group_to_proto(row, state, endpoint.name if endpoint else "", tasks=tasks)

    # ---------------------------------------------------------------- RPCs

    @refusing
    async def SubmitGroup(self, request, context):
        owner = self._owner(context)
        endpoint = self.resolve_endpoint(request.endpoint, owner)
        _check_header(request)
        specs = [(spec, False) for spec in request.tasks]
        specs += [(spec, True) for spec in request.finally_tasks]
        try:
            validate([_shape(spec, is_finally) for spec, is_finally in specs])
        except GroupError as err:
            raise Abort(grpc.StatusCode.INVALID_ARGUMENT, str(err)) from None
        needs = await self._check_functions({spec.function_id for spec, _ in specs}, endpoint)
        task_of = {spec.name: new_id() for spec, _ in specs}
        tasks: list[NewTask] = [
            self._new_task(
                f"task {spec.name!r}",
                spec,
                task_id=task_of[spec.name],
                inputs=tuple(task_of[n] for n in spec.inputs),
                python=needs.get(spec.function_id, ""),
            )
            for spec, _ in specs
        ]
        parts: list[bytes] = []
        if request.request_id:
            body = pb.SubmitGroupRequest()
            body.CopyFrom(request)
            body.ClearField("endpoint")
            body.ClearField("session_id")
            body.ClearField("request_id")
            parts = [endpoint.endpoint_id.encode(), body.SerializeToString(deterministic=True)]
        earlier, digest = await self._earlier(request.request_id, owner, "SubmitGroup", parts)
        if earlier is not None:
            # Its row holds the group's id, then its tasks' ids.
            return pb.SubmitGroupResponse(
                group_id=earlier.task_ids[0], task_ids=earlier.task_ids[1:]
            )
        # No await from here to the feed (see server/_requests.py).
        self._check_pending({owner: len(tasks)})
        group_id = new_id()
        ids = [task.task_id for task in tasks]
        group = NewGroup(
            group_id,
            request.name,
            request.fail_fast,
            request.timeout_seconds,
            tuple(_member(spec, tid, fin) for (spec, fin), tid in zip(specs, ids, strict=True)),
        )
        row = self._request_row(request.request_id, owner, "SubmitGroup", digest, [group_id, *ids])
        future = self.core.feed(
            TasksSubmitted(
                endpoint.endpoint_id,
                owner,
                tuple(tasks),
                self._watch_key(owner, request.session_id),
                time.time(),
                request=row,
                group=group,
            )
        )
        self._remember(row, future)
        await self._durable(future)
        return pb.SubmitGroupResponse(group_id=group_id, task_ids=ids)

    @refusing
    async def GetGroup(self, request, context):
        group_id = check_group_id(request.group_id)
        row, state = await self._own_group(group_id, self._scope(context))
        ids = [m.task_id for m in row.members]
        if request.include_history and len(ids) > MAX_HISTORY_TASKS:
            raise Abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"the group has {len(ids)} tasks; at most {MAX_HISTORY_TASKS} are answered with "
                "their history (the limit of tasks with history): read them with GetTasks in pages",
            )
        rows = await self.core.store.get_tasks(ids, include_history=request.include_history)
        tasks = {tid: self._task(*rows[tid]) for tid in ids if tid in rows}
        return pb.GetGroupResponse(group=self._group(row, state, tasks))

    @refusing
    async def ListGroups(self, request, context):
        limit = page_limit(request.page_size)
        after = decode_page_token(request.page_token) if request.page_token else None
        found = await self.core.store.list_groups(
            owner=self._scope(context),
            pending_only=request.pending_only,
            limit=limit + 1,
            after=after,
        )
        token = ""
        if len(found) > limit:
            found = found[:limit]
            last = found[-1][0]
            token = encode_page_token(last.submit_time, last.group_id)
        return pb.ListGroupsResponse(
            groups=[self._group(row, state) for row, state in found], next_page_token=token
        )

    @refusing
    async def CancelGroup(self, request, context):
        group_id = check_group_id(request.group_id)
        mode = _cancel_mode(request.mode)
        owner = self._owner(context)
        scope = self._scope(context)
        await self._own_group(group_id, scope)
        parts = [group_id.encode(), mode.value.encode()]
        earlier, digest = await self._earlier(request.request_id, owner, "CancelGroup", parts)
        if earlier is None:
            # A repeat of a cancel already applied answers the group as it is now.
            row = self._request_row(request.request_id, owner, "CancelGroup", digest, [group_id])
            try:
                future = self.core.feed(GroupCommanded(group_id, mode, time.time(), request=row))
            except UnknownGroup:
                # Read after the write that settled it (reads queue behind writes).
                _, state = await self._own_group(group_id, scope)
                raise Abort(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"group {group_id} has settled (status {state.status.value}); "
                    "nothing to cancel",
                ) from None
            self._remember(row, future)
            await self._durable(future)
        return pb.CancelGroupResponse(group=self._group(*await self._own_group(group_id, scope)))


__all__ = ["GroupRpcs"]
