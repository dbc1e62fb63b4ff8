"""Client: the blocking face, driving one AsyncClient on a private event-loop thread.

Each method is a one-line hop onto the loop (``run_coroutine_threadsafe``); there is no
second implementation of any call.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Iterable
from typing import Any, Self, TypeVar

from heartline import _defaults
from heartline._modules import ShipModules
from heartline._states import CancelMode, TaskState
from heartline._tls import TLS

from ._admin import TokenInfo
from ._async import AsyncClient
from ._base import Call
from ._groups import Group, GroupInfo
from ._types import EndpointInfo, Priority, Stats, Task, TaskUpdate

T = TypeVar("T")


class Client:
    """Submit and control tasks from ordinary (blocking) code.

    Args:
        address: ``host:port`` of the server; default ``$HEARTLINE_ADDRESS`` or
            ``127.0.0.1:50051``. Several servers sharing one store, comma-separated
            (``"db1:50051,db2:50051"``): calls go to whichever is active, and follow a
            standby that takes over.
        token: bearer token; default ``$HEARTLINE_TOKEN``, else the token file
            ``$HEARTLINE_HOME/token`` (the server's first start writes it).
        retry_timeout: seconds a call keeps trying while the server it reached is away
            (e.g. restarting); submits and commands carry request ids, so a repeat is
            never applied twice.
        tls: connect over TLS, e.g. ``TLS(ca="ca.pem")`` (see :class:`~heartline.TLS`;
            ``True`` trusts the system's CAs, ``False`` is plaintext); default from
            ``$HEARTLINE_TLS_CA`` (and ``$HEARTLINE_TLS_CERT``, ``$HEARTLINE_TLS_KEY``),
            else plaintext.
        ship_modules: which of your own modules travel with each function, as source:
            True (default) ships the local modules it uses (a script's or notebook's
            neighbours, such as ``mylib.py``; installed packages stay the endpoint's), found
            once per function; a list adds modules (names or module objects) found code
            can't see, e.g. imported by ``importlib.import_module``; False ships none.

    Use as ``with Client() as hc:`` or call :meth:`close`. Thread-safe.

    Raises:
        InvalidArgumentError: ``ship_modules`` names a module that does not import here or
            has no Python source; or an address list is malformed (a host of it that does
            not resolve is said at the first call). The message names the item.
    """

    def __init__(
        self,
        address: str | None = None,
        *,
        token: str | None = None,
        retry_timeout: float = _defaults.RETRY_TIMEOUT,
        tls: TLS | bool | None = None,
        ship_modules: ShipModules = True,
    ) -> None:
        self._async = AsyncClient(
            address,
            token=token,
            retry_timeout=retry_timeout,
            tls=tls,
            ship_modules=ship_modules,
        )
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="heartline-client", daemon=True
        )
        self._thread.start()
        self._closed = False

    @property
    def address(self) -> str:
        """The server's ``host:port``, or several, comma-separated."""
        return self._async.address

    @property
    def tls(self) -> TLS | None:
        """How the client reaches the server: a TLS, or None (plaintext)."""
        return self._async.tls

    @property
    def retry_timeout(self) -> float:
        """Seconds a call keeps trying while the server it reached is away."""
        return self._async.retry_timeout

    @property
    def session_id(self) -> str:
        """This client's session id."""
        return self._async.session_id

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError("a Client method was called from its own loop thread")
        if self._closed:
            coro.close()
            raise RuntimeError("the client is closed")
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result()
        except BaseException:
            future.cancel()  # e.g. KeyboardInterrupt: don't leave the call running
            raise

    def close(self) -> None:
        """Close the connection and stop the loop thread. Idempotent."""
        if self._closed:
            return
        try:
            self._run(self._close_on_loop())
        finally:
            self._closed = True
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
            self._loop.close()

    async def _close_on_loop(self) -> None:
        await self._async.close()
        # Let grpc's own per-call tasks see their (already delivered) final status before
        # the loop stops; a call left half-finished makes grpc's shared poller schedule
        # onto a closed loop later ("Event loop is closed" noise in other loops).
        current = asyncio.current_task()
        for _ in range(100):
            others = [t for t in asyncio.all_tasks() if t is not current]
            if not others:
                return
            await asyncio.wait(others, timeout=0.01)
        for task in asyncio.all_tasks():
            if task is not current:
                task.cancel()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def submit(
        self,
        endpoint: str,
        function: Any,
        /,
        *args: Any,
        priority: str | Priority = Priority.NORMAL,
        max_retries: int = 0,
        max_system_retries: int | None = None,
        walltime: float | None = None,
        held: bool = False,
        serializer: str = "auto",
        **kwargs: Any,
    ) -> str:
        """Submit ``function(*args, **kwargs)``; see :meth:`AsyncClient.submit`."""
        return self._run(
            self._async.submit(
                endpoint,
                function,
                *args,
                priority=priority,
                max_retries=max_retries,
                max_system_retries=max_system_retries,
                walltime=walltime,
                held=held,
                serializer=serializer,
                **kwargs,
            )
        )

    def submit_batch(self, endpoint: str, calls: Iterable[Call], **options: Any) -> list[str]:
        """Submit many ``(function, args, kwargs)`` calls; see :meth:`AsyncClient.submit_batch`."""
        return self._run(self._async.submit_batch(endpoint, calls, **options))

    def register_function(self, function: Any, /) -> str:
        """Send ``function`` to the server and return its id (for an endpoint's allow-list:
        ``heartline endpoint start --allow-function ID``); see
        :meth:`AsyncClient.register_function`."""
        return self._run(self._async.register_function(function))

    def get_result(self, task_id: str, timeout: float | None = None) -> Any:
        """Wait for a task's value or error; see :meth:`AsyncClient.get_result`."""
        return self._run(self._async.get_result(task_id, timeout))

    def get_task(self, task_id: str, *, history: bool = True) -> Task:
        """Read one task (with its transition history by default)."""
        return self._run(self._async.get_task(task_id, history=history))

    def get_tasks(self, task_ids: Iterable[str], *, history: bool = False) -> list[Task]:
        """Read tasks by id, in the order given."""
        return self._run(self._async.get_tasks(task_ids, history=history))

    def list_tasks(
        self,
        *,
        states: Iterable[TaskState | str] | None = None,
        endpoint: str | None = None,
        limit: int = 100,
    ) -> list[Task]:
        """List up to ``limit`` tasks, newest first, filtered by state and endpoint."""
        return self._run(self._async.list_tasks(states=states, endpoint=endpoint, limit=limit))

    def cancel(self, task_ids: Iterable[str]) -> list[TaskUpdate]:
        """Cancel pending tasks (a running task's worker is ended)."""
        return self._run(self._async.cancel(task_ids))

    def hold(self, task_ids: Iterable[str]) -> list[TaskUpdate]:
        """Hold queued tasks: they are not dispatched until released."""
        return self._run(self._async.hold(task_ids))

    def release(self, task_ids: Iterable[str]) -> list[TaskUpdate]:
        """Release held tasks to the state they were held from."""
        return self._run(self._async.release(task_ids))

    def retry(self, task_ids: Iterable[str]) -> list[TaskUpdate]:
        """Queue ERRORED tasks again with attempt+1."""
        return self._run(self._async.retry(task_ids))

    def give_up(self, task_ids: Iterable[str]) -> list[TaskUpdate]:
        """Mark ERRORED tasks FAILED for good."""
        return self._run(self._async.give_up(task_ids))

    def resubmit(self, task_ids: Iterable[str]) -> list[str]:
        """Create new tasks from FAILED or CANCELLED ones; return the new ids in order."""
        return self._run(self._async.resubmit(task_ids))

    def list_endpoints(self) -> list[EndpointInfo]:
        """List every endpoint the caller may use, by name, with its agents and queue
        length (read in pages: each call costs the server a bounded time)."""
        return self._run(self._async.list_endpoints())

    def stats(self) -> Stats:
        """Task counts by state, endpoints and agents online, transitions so far."""
        return self._run(self._async.stats())

    def submit_group(self, group: Group, *, endpoint: str | None = None) -> str:
        """Submit a group in one call; return its id. See :meth:`AsyncClient.submit_group`."""
        return self._run(self._async.submit_group(group, endpoint=endpoint))

    def get_group(self, group_id: str, *, history: bool = False) -> GroupInfo:
        """Read a group with its tasks."""
        return self._run(self._async.get_group(group_id, history=history))

    def wait_group(self, group_id: str, timeout: float | None = None) -> GroupInfo:
        """Wait until no task of the group is pending; see :meth:`AsyncClient.wait_group`."""
        return self._run(self._async.wait_group(group_id, timeout))

    def list_groups(self, pending_only: bool = False, limit: int = 100) -> list[GroupInfo]:
        """List up to ``limit`` groups, newest first, without their tasks."""
        return self._run(self._async.list_groups(pending_only=pending_only, limit=limit))

    def cancel_group(self, group_id: str, mode: str | CancelMode = "cancel") -> GroupInfo:
        """Cancel or stop a group; see :meth:`AsyncClient.cancel_group`."""
        return self._run(self._async.cancel_group(group_id, mode))

    def create_token(self, user: str, *, endpoint: str | None = None) -> tuple[str, TokenInfo]:
        """Create a token for ``user``; see :meth:`AsyncClient.create_token`."""
        return self._run(self._async.create_token(user, endpoint=endpoint))

    def list_tokens(self) -> list[TokenInfo]:
        """Tokens, oldest first: everyone's for an admin, else yours."""
        return self._run(self._async.list_tokens())

    def revoke_token(self, token_id: str) -> TokenInfo:
        """Revoke a token: its calls and open streams end."""
        return self._run(self._async.revoke_token(token_id))

    def share_endpoint(self, endpoint: str, user: str) -> list[str]:
        """Let ``user`` submit to ``endpoint``; return every user it is shared with."""
        return self._run(self._async.share_endpoint(endpoint, user))
