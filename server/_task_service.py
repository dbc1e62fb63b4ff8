"""``heartline.v1.TaskService``: validates requests, feeds the scheduler, answers."""

from __future__ import annotations

import asyncio
import bisect
import dataclasses
import math
import re
import time
from collections.abc import Iterable, Sequence

import grpc

from heartline._defaults import MAX_HISTORY_TASKS, MAX_IDS, MAX_TASKS_PER_SUBMIT
from heartline._forms import read as read_serialization
from heartline._serialize import function_id as hash_function
from heartline._states import TaskState
from heartline.server._auth import caller
from heartline.server._convert import row_to_update, state_from_proto, task_to_proto, timestamp
from heartline.server._core import ServerCore, Watcher
from heartline.server._events import NewTask, TasksCommanded, TasksSubmitted
from heartline.server._group_service import GroupRpcs
from heartline.server._ids import new_id
from heartline.server._model import PRIORITY_NORMAL, EndpointRow, RequestRow
from heartline.server._requests import MAX_REQUEST_ID, RequestIdReused, digest
from heartline.server._rpc import (
    Abort,
    check_ids,
    decode_page_token,
    encode_page_token,
    is_id,
    malformed_id,
    page_limit,
    refusing,
    shown,
)
from heartline.server._scheduler import COMMAND_WORDS, InputsMoved, InvalidTransition, UnknownTasks
from heartline.v1 import task_pb2, task_service_pb2_grpc
from heartline.v1 import task_service_pb2 as pb

ANONYMOUS = "anonymous"
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_INPUT_ROUNDS = 5
"""How often a submit reads input tasks that settled while it looked, before it gives up."""


def _inputs_kept_moving() -> Abort:
    return Abort(
        grpc.StatusCode.UNAVAILABLE,
        "the input tasks kept settling while this request read them; send it again",
    )


AGENTS_PER_PAGE = 1000
"""A ListEndpoints page ends before the endpoint that would take it past this many
agents (it holds one endpoint at least)."""


def _registered(row: EndpointRow) -> tuple[float, str]:
    """ListEndpoints' order, and what its page token holds."""
    return (row.register_time, row.endpoint_id)


def _mib(n: int) -> str:
    return f"{n / (1024 * 1024):.1f} MiB"


_GROUP_ONLY = {
    "name": "submit the group with SubmitGroup",
    "run_after": "outside a group, a task waits only for the tasks named in its inputs",
    "when": "submit the group with SubmitGroup",
}


def _check_plain_task(index: int, spec: task_pb2.TaskSpec) -> None:
    """Refuse the group fields of a task submitted outside a group, and malformed inputs."""
    for field_name, hint in _GROUP_ONLY.items():
        if getattr(spec, field_name):
            raise Abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"task {index}: {field_name} is only for group tasks: {hint}",
            )
    if len(spec.inputs) > MAX_IDS:
        raise Abort(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"task {index}: inputs has {len(spec.inputs)} ids; at most {MAX_IDS}",
        )
    bad = next((value for value in spec.inputs if not is_id(value)), None)
    if bad is not None:
        raise Abort(grpc.StatusCode.INVALID_ARGUMENT, f"task {index}: inputs: {malformed_id(bad)}")


class TaskServicer(GroupRpcs, task_service_pb2_grpc.TaskServiceServicer):
    def __init__(self, core: ServerCore) -> None:
        self.core = core

    # ---------------------------------------------------------------- helpers

    def _owner(self, context: grpc.aio.ServicerContext) -> str:
        """The calling user: the owner of what the call makes."""
        return caller().user

    def _scope(self, context: grpc.aio.ServicerContext) -> str | None:
        """Whose tasks, groups and endpoints the caller sees: its own (the user), or
        everyone's (None: an admin, or any caller when auth is off)."""
        me = caller()
        return None if me.admin else me.user

    def _sees(self, owner: str, scope: str | None) -> bool:
        return scope is None or owner == scope

    def _watch_key(self, owner: str, session_id: str) -> str:
        """A session's key among the watchers: sessions are the client's ids, so one
        user's watch never reaches another user's session of the same id."""
        return f"{owner}\x1f{session_id}" if session_id else ""

    def resolve_endpoint(self, ref: str, owner: str) -> EndpointRow:
        """An endpoint the user may submit to (its own, or one shared with it), by id or
        name; another user's answers NOT_FOUND, as if it did not exist."""
        if not ref:
            raise Abort(grpc.StatusCode.INVALID_ARGUMENT, "endpoint is empty: give its name or id")
        row = self.core.endpoints.get(ref)
        if row is not None and not self.core.may_use_endpoint(row, owner):
            row = None
        if row is None:
            row = self.core.endpoint_named(ref, owner)
        if row is None:
            raise Abort(
                grpc.StatusCode.NOT_FOUND,
                f"unknown endpoint {shown(ref)}: start an agent for it with "
                f"`heartline endpoint start --name {ref[:80]}`",
            )
        return row

    async def _check_functions(
        self, function_ids: set[str], endpoint: EndpointRow | None = None
    ) -> dict[str, str]:
        """Refuse a malformed or unknown function id, or (given the endpoint) one the
        endpoint's allow-list has not, or one no agent of it can run; return the Python
        each bytecode-only function needs (see :meth:`_function_needs`)."""
        for fid in function_ids:
            if not _SHA256.match(fid):
                raise Abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"malformed function_id {shown(fid)}: expected the sha256 hex digest "
                    "returned by RegisterFunction",
                )
        if endpoint is not None:
            self._check_allowed(endpoint, function_ids)
        needs = await self._function_needs(function_ids)
        if endpoint is not None and needs:
            self._check_runnable(endpoint, needs)
        return needs

    async def _function_needs(
        self, function_ids: Iterable[str], *, strict: bool = True
    ) -> dict[str, str]:
        """The Python minor version each bytecode-only function needs (function id ->
        "major.minor"), read from its payload's trailer (heartline/_forms.py); the others
        run on any agent and are not named.

        Raises:
            Abort: NOT_FOUND, an unknown function.
        """
        needs: dict[str, str] = {}
        for fid in function_ids:
            payload = await self.core.functions.get(fid)
            if payload is None:
                if not strict:
                    continue  # the dispatch refuses it, as before (a resubmit's)
                raise Abort(
                    grpc.StatusCode.NOT_FOUND,
                    f"unknown function {fid}: register it with RegisterFunction first",
                )
            made = read_serialization(payload)
            if made is not None and made.requires:
                needs[fid] = made.requires
        return needs

    def _check_runnable(self, endpoint: EndpointRow, needs: dict[str, str]) -> None:
        """Refuse a bytecode-only function no connected agent of the endpoint can run
        (another Python minor version), before anything is stored. An endpoint with no
        agent connected takes it: an agent that can may connect later."""
        pythons = self.core.scheduler.dispatcher.pythons(endpoint.endpoint_id)
        if not pythons or "" in pythons:
            return
        for fid, need in needs.items():
            if need not in pythons:
                agents = ", ".join(sorted(pythons))
                raise Abort(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"function {fid[:12]} was serialized as bytecode on Python {need} "
                    f"(it has no source form), and the agents of endpoint {endpoint.name!r} "
                    f"run Python {agents}: submit it with serializer='source' (a function "
                    f"whose source is available), or run an agent on Python {need}",
                )

    def _check_allowed(self, endpoint: EndpointRow, function_ids: Iterable[str]) -> None:
        refusal = self.core.function_refusal(endpoint, function_ids)
        if refusal is not None:
            raise Abort(grpc.StatusCode.PERMISSION_DENIED, refusal)

    def _check_pending(self, new_tasks: dict[str, int]) -> None:
        """Refuse a submit that would pass the limit of pending tasks per user; call it
        with no await between it and the feed."""
        refusal = self.core.pending_refusal(new_tasks)
        if refusal is not None:
            raise Abort(grpc.StatusCode.RESOURCE_EXHAUSTED, refusal)

    def _new_task(
        self,
        label: str,
        spec: task_pb2.TaskSpec,
        *,
        task_id: str | None = None,
        inputs: tuple[str, ...] = (),
        python: str = "",
    ) -> NewTask:
        """A checked task of a submission.

        Args:
            label: How messages name it: "task 3" (its index), "task 'parse'" (its name).
            task_id: Its id, when the caller made one; else a new one.
            inputs: Ids of the tasks whose results it takes, in placeholder order.
        """
        limit = self.core.config.max_payload
        if len(spec.args) > limit:
            raise Abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{label}: its arguments are {_mib(len(spec.args))}, over the payload "
                f"limit of {_mib(limit)}",
            )
        if spec.priority not in (0, 1, 2, 3):
            raise Abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"{label}: unknown priority {spec.priority}"
            )
        if spec.max_retries < 0:
            raise Abort(grpc.StatusCode.INVALID_ARGUMENT, f"{label}: max_retries is negative")
        system = spec.max_system_retries if spec.HasField("max_system_retries") else 3
        if system < 0:
            raise Abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"{label}: max_system_retries is negative"
            )
        if not math.isfinite(spec.walltime_seconds) or spec.walltime_seconds < 0:
            raise Abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{label}: walltime_seconds must be a finite number >= 0",
            )
        return NewTask(
            task_id=task_id or new_id(),
            function_id=spec.function_id,
            args=spec.args,
            priority=spec.priority or PRIORITY_NORMAL,
            max_retries=spec.max_retries,
            max_system_retries=system,
            # A shared 0.0 for the usual "no walltime" (a float a queued task otherwise).
            walltime=spec.walltime_seconds or 0.0,
            held=spec.held,
            name=spec.name,
            inputs=inputs,
            python=python,
        )

    async def _durable(self, future: asyncio.Future[None] | None) -> None:
        if future is not None:
            try:
                # Shielded: a client that gives up must not cancel the store's future,
                # whose callbacks carry the step's acks and watcher pushes.
                await asyncio.shield(future)
            except Exception as exc:  # the store could not commit; the server stops (fail-stop)
                raise Abort(
                    grpc.StatusCode.UNAVAILABLE, f"the store could not commit: {exc}"
                ) from exc

    async def _earlier(
        self, request_id: str, owner: str, method: str, parts: Iterable[bytes]
    ) -> tuple[RequestRow | None, str]:
        """The earlier request of this id (stored), or None; and this body's digest."""
        if not request_id:
            return None, ""
        if len(request_id) > MAX_REQUEST_ID:
            raise Abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"request_id has {len(request_id)} characters; at most {MAX_REQUEST_ID}",
            )
        body = digest(method, parts)
        try:
            earlier = await self.core.requests.earlier(request_id, owner, method, body)
        except RequestIdReused as err:
            raise Abort(grpc.StatusCode.ALREADY_EXISTS, str(err)) from None
        except Exception as exc:  # the earlier request's commit failed (fail-stop)
            raise Abort(grpc.StatusCode.UNAVAILABLE, f"the store could not commit: {exc}") from exc
        return earlier, body

    def _request_row(
        self, request_id: str, owner: str, method: str, body: str, task_ids: Sequence[str]
    ) -> RequestRow | None:
        if not request_id:
            return None
        return RequestRow(request_id, owner, method, body, tuple(task_ids), time.time())

    def _remember(self, row: RequestRow | None, future: asyncio.Future[None] | None) -> None:
        if row is not None:
            self.core.requests.remember(row, future)

    async def _command(
        self,
        command: str,
        task_ids: Sequence[str],
        request_id: str,
        context: grpc.aio.ServicerContext,
    ) -> list[task_pb2.TaskUpdate]:
        owner = self._owner(context)
        scope = self._scope(context)
        ids = check_ids(task_ids)
        method = f"command:{command}"
        earlier, body = await self._earlier(request_id, owner, method, [" ".join(ids).encode()])
        if earlier is None:
            # A repeat of a command already applied answers the tasks' states now, as
            # the first did once it was stored; it changes nothing again.
            request = self._request_row(request_id, owner, method, body, ids)
            if command == "retry" and (refusal := self.core.retry_refusal(ids)) is not None:
                # A retried task is pending again: it counts against the same limit.
                raise Abort(grpc.StatusCode.RESOURCE_EXHAUSTED, refusal)
            try:
                future = self.core.feed(
                    TasksCommanded(command, tuple(ids), time.time(), request=request, owner=scope)
                )
            except UnknownTasks as err:
                raise await self._explain_unknown(err.task_ids, command, scope) from None
            except InvalidTransition as err:
                raise Abort(grpc.StatusCode.FAILED_PRECONDITION, str(err)) from None
            self._remember(request, future)
            await self._durable(future)
        rows = await self.core.store.get_tasks(ids)
        return [row_to_update(rows[tid][0], False) for tid in dict.fromkeys(ids) if tid in rows]

    async def _explain_unknown(self, task_ids: list[str], command: str, scope: str | None) -> Abort:
        rows = await self.core.store.get_tasks(task_ids)
        missing = [
            tid for tid in task_ids if tid not in rows or not self._sees(rows[tid][0].owner, scope)
        ]
        if missing:
            return Abort(grpc.StatusCode.NOT_FOUND, f"no task {missing[0]}")
        tid = task_ids[0]
        state = rows[tid][0].state.value
        return Abort(
            grpc.StatusCode.FAILED_PRECONDITION,
            f"task {tid} is {state}, so it cannot be {COMMAND_WORDS[command]}",
        )

    # ---------------------------------------------------------------- RPCs

    @refusing
    async def RegisterFunction(self, request, context):
        limit = self.core.config.max_payload
        payload = request.function  # each read of a bytes field copies it: read it once
        if not payload:
            raise Abort(grpc.StatusCode.INVALID_ARGUMENT, "function is empty")
        if len(payload) > limit:
            raise Abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"the function is {_mib(len(payload))}, over the payload limit of {_mib(limit)}",
            )
        fid = hash_function(payload)
        if request.function_id and request.function_id != fid:
            raise Abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"function_id {shown(request.function_id)} does not match the payload's sha256 {fid}",
            )
        await self.core.register_function(payload, fid, self._owner(context))
        return pb.RegisterFunctionResponse(function_id=fid)

    @refusing
    async def SubmitTasks(self, request, context):
        owner = self._owner(context)
        endpoint = self.resolve_endpoint(request.endpoint, owner)
        if not request.tasks:
            raise Abort(grpc.StatusCode.INVALID_ARGUMENT, "tasks is empty: submit at least one")
        if len(request.tasks) > MAX_TASKS_PER_SUBMIT:
            raise Abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{len(request.tasks)} tasks in one request; at most {MAX_TASKS_PER_SUBMIT}",
            )
        for i, spec in enumerate(request.tasks):
            _check_plain_task(i, spec)
        needs = await self._check_functions({spec.function_id for spec in request.tasks}, endpoint)
        tasks = tuple(
            self._new_task(
                f"task {i}",
                spec,
                inputs=tuple(spec.inputs),
                python=needs.get(spec.function_id, "") if needs else "",
            )
            for i, spec in enumerate(request.tasks)
        )
        inputs = list(dict.fromkeys(tid for task in tasks for tid in task.inputs))
        if len(inputs) > MAX_IDS:
            raise Abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"the tasks take the results of {len(inputs)} tasks in all; at most {MAX_IDS}",
            )
        parts = [endpoint.endpoint_id.encode()]
        if request.request_id:
            parts += [spec.SerializeToString(deterministic=True) for spec in request.tasks]
        ids = [t.task_id for t in tasks]
        settled: dict[str, tuple[TaskState, bytes | None]] = {}
        for _ in range(_INPUT_ROUNDS):
            await self._read_inputs(inputs, owner, settled)
            earlier, body = await self._earlier(request.request_id, owner, "SubmitTasks", parts)
            if earlier is not None:
                return pb.SubmitTasksResponse(task_ids=earlier.task_ids)
            # No await from here to the feed: a concurrent copy finds this one remembered.
            if self._inputs_moved(inputs, settled):
                continue
            self._check_pending({owner: len(tasks)})
            row = self._request_row(request.request_id, owner, "SubmitTasks", body, ids)
            try:
                future = self.core.feed(
                    TasksSubmitted(
                        endpoint.endpoint_id,
                        owner,
                        tasks,
                        self._watch_key(owner, request.session_id),
                        time.time(),
                        request=row,
                        settled_inputs=settled or None,
                    )
                )
            except InputsMoved:  # checked just above; kept in case the scheduler's rule grows
                continue
            self._remember(row, future)
            await self._durable(future)
            return pb.SubmitTasksResponse(task_ids=ids)
        raise _inputs_kept_moving()

    def _inputs_moved(
        self, task_ids: list[str], settled: dict[str, tuple[TaskState, bytes | None]]
    ) -> bool:
        """Some input settled and left the scheduler since it was looked at: the feed
        would be refused (InputsMoved), so read it first. Called in the same loop
        iteration as the feed, so nothing can move in between."""
        held = self.core.scheduler.tasks
        return any(tid not in held and tid not in settled for tid in task_ids)

    async def _read_inputs(
        self, task_ids: list[str], owner: str, settled: dict[str, tuple[TaskState, bytes | None]]
    ) -> None:
        """Check that the owner's input tasks exist; add to ``settled`` the state and result
        of each one the scheduler no longer holds (it settled), read from the store.

        Raises:
            Abort: NOT_FOUND for an unknown task or another owner's (as if it did not
                exist); FAILED_PRECONDITION for a succeeded one whose result was purged.
        """
        held = self.core.scheduler.tasks
        missing = []
        for tid in task_ids:
            if tid in settled:
                continue
            task = held.get(tid)
            if task is None:
                missing.append(tid)
            elif task.owner != owner:
                raise Abort(grpc.StatusCode.NOT_FOUND, f"no task {tid}")
        if not missing:
            return
        rows = await self.core.store.get_tasks(missing)
        for tid in missing:
            found = rows.get(tid)
            if found is None or found[0].owner != owner:
                raise Abort(grpc.StatusCode.NOT_FOUND, f"no task {tid}")
            row = found[0]
            if row.state == TaskState.SUCCEEDED and row.payload_purged:
                raise Abort(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"task {tid} cannot be an input: its result was purged after retention",
                )
            settled[tid] = (row.state, row.result)

    @refusing
    async def GetTasks(self, request, context):
        # Each task once, in the order first named: a request naming one id 10,000 times
        # costs one conversion, not 10,000 (SPEC section 6: heavy reads are bounded).
        ids = list(dict.fromkeys(check_ids(request.task_ids)))
        if request.include_history and len(ids) > MAX_HISTORY_TASKS:
            raise Abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{len(ids)} tasks asked for with their history; at most {MAX_HISTORY_TASKS} "
                "per request (the limit of tasks with history): ask in pages",
            )
        rows = await self.core.store.get_tasks(ids, include_history=request.include_history)
        scope = self._scope(context)
        missing = [
            tid for tid in ids if tid not in rows or not self._sees(rows[tid][0].owner, scope)
        ]
        if missing:
            raise Abort(grpc.StatusCode.NOT_FOUND, f"no task {missing[0]}")
        return pb.GetTasksResponse(tasks=[self._task(*rows[tid]) for tid in ids])

    def _task(self, row, history=None, *, include_result: bool = True):
        endpoint = self.core.endpoints.get(row.endpoint_id)
        return task_to_proto(
            row,
            endpoint_name=endpoint.name if endpoint else "",
            history=history,
            waiting_reason=self.core.scheduler.waiting_reason(row.task_id),
            include_result=include_result,
        )

    @refusing
    async def ListTasks(self, request, context):
        owner = self._owner(context)
        states = []
        for value in request.states:
            state = state_from_proto(value)
            if state is None:
                raise Abort(grpc.StatusCode.INVALID_ARGUMENT, f"unknown state {value}")
            states.append(state)
        endpoint_id = (
            self.resolve_endpoint(request.endpoint, owner).endpoint_id if request.endpoint else None
        )
        limit = page_limit(request.page_size)
        after = decode_page_token(request.page_token) if request.page_token else None
        rows = await self.core.store.list_tasks(
            states=states or None,
            endpoint_id=endpoint_id,
            owner=self._scope(context),
            limit=limit + 1,
            after=after,
        )
        token = ""
        if len(rows) > limit:
            rows = rows[:limit]
            token = encode_page_token(rows[-1].submit_time, rows[-1].task_id)
        return pb.ListTasksResponse(
            tasks=[self._task(r, include_result=False) for r in rows], next_page_token=token
        )

    async def WatchTasks(self, request, context):
        owner = self._owner(context)
        try:
            ids = check_ids(request.task_ids) if request.task_ids else []
            group_ids = (
                list(dict.fromkeys(check_ids(request.group_ids, "group_ids", "group")))
                if request.group_ids
                else []
            )
            if not ids and not group_ids and not request.session_id:
                raise Abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    "name task_ids, group_ids or a session_id to watch",
                )
        except Abort as err:
            await context.abort(err.code, err.message)
            return
        scope = self._scope(context)
        watcher = Watcher(
            ids,
            self._watch_key(owner, request.session_id),
            request.settled_only,
            request.include_results,
            group_ids,
        )
        refusal = self.core.open_watch(owner)
        if refusal is not None:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, refusal)
            return
        # Register before reading the current states, so no transition falls in between
        # (a change may then arrive twice; watchers treat updates as idempotent).
        self.core.watchers.add(watcher)
        try:
            try:
                groups = await self._watched_groups(group_ids, scope) if group_ids else []
                rows = await self.core.store.get_tasks(ids) if ids else {}
                missing = [
                    tid
                    for tid in ids
                    if tid not in rows or not self._sees(rows[tid][0].owner, scope)
                ]
                if missing:
                    raise Abort(grpc.StatusCode.NOT_FOUND, f"no task {missing[0]}")
            except Abort as err:
                await context.abort(err.code, err.message)
                return
            first = [
                row_to_update(rows[tid][0], request.include_results)
                for tid in ids
                if not request.settled_only or not rows[tid][0].state.pending
            ]
            yield pb.WatchTasksResponse(updates=first, groups=groups)
            while True:
                await watcher.wake.wait()
                updates, group_updates = watcher.take()
                if updates or group_updates:
                    yield pb.WatchTasksResponse(updates=updates, groups=group_updates)
        finally:
            self.core.watchers.remove(watcher)
            self.core.close_watch(owner)

    @refusing
    async def CancelTasks(self, request, context):
        return pb.CancelTasksResponse(
            updates=await self._command("cancel", request.task_ids, request.request_id, context)
        )

    @refusing
    async def HoldTasks(self, request, context):
        return pb.HoldTasksResponse(
            updates=await self._command("hold", request.task_ids, request.request_id, context)
        )

    @refusing
    async def ReleaseTasks(self, request, context):
        return pb.ReleaseTasksResponse(
            updates=await self._command("release", request.task_ids, request.request_id, context)
        )

    @refusing
    async def RetryTasks(self, request, context):
        return pb.RetryTasksResponse(
            updates=await self._command("retry", request.task_ids, request.request_id, context)
        )

    @refusing
    async def GiveUpTasks(self, request, context):
        return pb.GiveUpTasksResponse(
            updates=await self._command("give-up", request.task_ids, request.request_id, context)
        )

    @refusing
    async def ResubmitTasks(self, request, context):
        requested = check_ids(request.task_ids)
        ids = list(dict.fromkeys(requested))  # one new task per old one, named once
        rows = await self.core.store.get_tasks(ids)
        scope = self._scope(context)
        missing = [
            tid for tid in ids if tid not in rows or not self._sees(rows[tid][0].owner, scope)
        ]
        if missing:
            raise Abort(grpc.StatusCode.NOT_FOUND, f"no task {missing[0]}")
        by_endpoint: dict[str, list] = {}
        for tid in ids:
            row = rows[tid][0]
            if row.state not in (TaskState.FAILED, TaskState.CANCELLED):
                raise Abort(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"task {tid} is {row.state.value}, so it cannot be resubmitted "
                    "(only failed or cancelled tasks can; retry an errored one)",
                )
            if row.payload_purged:
                raise Abort(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"task {tid} cannot be resubmitted: its payload was purged after retention",
                )
            by_endpoint.setdefault(row.endpoint_id, []).append(row)
        for endpoint_id, group in by_endpoint.items():
            endpoint = self.core.endpoints.get(endpoint_id)
            if endpoint is not None:
                self._check_allowed(endpoint, {r.function_id for r in group})
        needs = await self._function_needs({r.function_id for r, *_ in rows.values()}, strict=False)
        for endpoint_id, group in by_endpoint.items():
            endpoint = self.core.endpoints.get(endpoint_id)
            if endpoint is not None and needs:
                self._check_runnable(endpoint, needs)
        owner = self._owner(context)
        # A task that took results takes the same ones again (SPEC section 4); a group
        # task comes back as a plain task.
        inputs = list(dict.fromkeys(i for tid in ids for i in rows[tid][0].inputs))
        parts = [" ".join(requested).encode()]
        settled: dict[str, tuple[TaskState, bytes | None]] = {}
        for _ in range(_INPUT_ROUNDS):
            await self._read_inputs(inputs, owner, settled)
            earlier, body = await self._earlier(request.request_id, owner, "ResubmitTasks", parts)
            if earlier is not None:
                return pb.ResubmitTasksResponse(task_ids=earlier.task_ids)
            # No await from here to the feed (see server/_requests.py).
            if self._inputs_moved(inputs, settled):
                continue
            new_by_owner: dict[str, int] = {}
            for group in by_endpoint.values():
                new_by_owner[group[0].owner] = new_by_owner.get(group[0].owner, 0) + len(group)
            self._check_pending(new_by_owner)
            new_ids: dict[str, str] = {}
            events = []
            for endpoint_id, group in by_endpoint.items():
                tasks = tuple(
                    NewTask(
                        task_id=new_id(),
                        function_id=r.function_id,
                        args=r.args,
                        priority=r.priority,
                        max_retries=r.max_retries,
                        max_system_retries=r.max_system_retries,
                        walltime=r.walltime,
                        inputs=r.inputs,
                        python=needs.get(r.function_id, ""),
                    )
                    for r in group
                )
                new_ids.update({r.task_id: t.task_id for r, t in zip(group, tasks, strict=True)})
                events.append(
                    TasksSubmitted(
                        endpoint_id,
                        group[0].owner,
                        tasks,
                        self._watch_key(owner, request.session_id),
                        time.time(),
                        resubmitted_from=tuple(r.task_id for r in group),
                        settled_inputs=settled or None,
                    )
                )
            answer = [new_ids[tid] for tid in requested]
            row = self._request_row(request.request_id, owner, "ResubmitTasks", body, answer)
            if row is not None:
                events[0] = dataclasses.replace(events[0], request=row)
            # One step, so one store batch: all the new tasks and the request id, or none.
            future = self.core.feed(*events)
            self._remember(row, future)
            await self._durable(future)
            return pb.ResubmitTasksResponse(task_ids=answer)
        raise _inputs_kept_moving()

    @refusing
    async def ListEndpoints(self, request, context):
        limit = page_limit(request.page_size)
        after = decode_page_token(request.page_token) if request.page_token else None
        scheduler = self.core.scheduler
        agents_of = scheduler.dispatcher.agents_of
        connections = self.core.connections
        scope = self._scope(context)
        rows = sorted(
            (
                r
                for r in self.core.endpoints.values()
                if scope is None or self.core.may_use_endpoint(r, scope)
            ),
            key=_registered,
        )
        start = 0 if after is None else bisect.bisect_right(rows, after, key=_registered)
        response = pb.ListEndpointsResponse()
        page = response.endpoints
        listed = 0  # agents on this page
        for index in range(start, len(rows)):
            row = rows[index]
            agents = agents_of(row.endpoint_id)
            if len(page) == limit or (page and listed + len(agents) > AGENTS_PER_PAGE):
                response.next_page_token = encode_page_token(*_registered(rows[index - 1]))
                break
            listed += len(agents)
            # Built in place (no message copied into its parent): at 1,000 agents a
            # page, this is most of the call's time.
            endpoint = page.add(
                endpoint_id=row.endpoint_id,
                name=row.name,
                online=bool(agents),
                queued=scheduler.queued(row.endpoint_id),
            )
            endpoint.registered_time.FromNanoseconds(int(row.register_time * 1e9))
            for a in agents:
                info = endpoint.agents.add(
                    agent_id=a.agent_id,
                    capacity=a.capacity,
                    in_flight=len(a.in_flight),
                    version=a.version,
                    hostname=a.hostname,
                    python_version=a.python,
                    cloudpickle_version=a.cloudpickle,
                )
                conn = connections.get(a.agent_id)
                if conn is not None:  # None: its stream closed, the loss not yet handled
                    info.last_heartbeat.FromNanoseconds(int(conn.heard_at() * 1e9))
        return response

    @refusing
    async def GetStats(self, request, context):
        counts = await self.core.store.count_by_state(self._scope(context))
        scheduler = self.core.scheduler
        return pb.GetStatsResponse(
            tasks_by_state={s.value: counts.get(s, 0) for s in TaskState},
            endpoints_online=len(scheduler.dispatcher.online()),
            agents_online=len(scheduler.agents),
            transitions=scheduler.transitions_total,
            start_time=timestamp(self.core.start_time),
        )
