"""The PostgreSQL store: several servers on one database, one of them active (SPEC section 9).

``PostgresStore`` keeps the contract of ``SqliteStore`` (server/_store.py) on the caller's
event loop, without a thread: one writer connection, one asyncio queue of writes AND
reads, and one task that drains it and applies each group in ONE transaction, a
``SAVEPOINT`` per item that runs SQL (so a failing item fails only its own future), and
ONE commit. Rows go in with ``executemany`` of prebuilt tuples (server/_rows.py, shared
with SQLite); a group's task updates are coalesced as SQLite's are (``Updates``). The SQL
it runs (the schema, its migrations, the statements and the queued operations) is in
server/_pgsql.py.

Leadership: ``open()`` takes a session-level advisory lock on the writer connection
(``pg_try_advisory_lock(_LOCK_KEY)``), polling while another server holds it (this one
stands by). Every write goes through that connection, so a server that lost it can write
nothing more: ``wait_lost()`` then returns, and the server stops. A killed server's
connection closes with its process, and PostgreSQL releases the lock with it; a silent
network loss is noticed by TCP keepalives, on both ends, within some 25 seconds.

Durability is the database's: a commit returns once PostgreSQL has made it durable (as
its ``synchronous_commit`` says).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Collection, Sequence
from typing import Any

from heartline._figures import BATCH_ITEMS_BOUNDS, COMMIT_SECONDS_BOUNDS, Buckets
from heartline._states import SkipReason, TaskState
from heartline.server import _pgsql as pgsql
from heartline.server._model import (
    EndpointRow,
    FunctionRow,
    GroupRow,
    GroupStateRow,
    RequestRow,
    TaskRecord,
    TaskRow,
    TokenRow,
    TransitionRow,
    WriteBatch,
)
from heartline.server._rows import STATE_OF, UNSETTLED, Updates
from heartline.server._store import (
    MAX_GROUP,
    Outcome,
    Store,
    StoreClosedError,
    StoreFigures,
    StoreState,
    redacted,
    settle,
)

try:
    import asyncpg
except ImportError:  # the postgresql extra is not installed
    asyncpg = None  # type: ignore[assignment]

__all__ = ["PostgresStore"]

_log = logging.getLogger("heartline.server.store")

_LOCK_KEY = 0x68656172746C696E
"""The advisory lock the active server holds: "heartlin" in ASCII, as a bigint. Advisory
locks are per database, so each heartline database has its own leader."""
_KEEPALIVE_IDLE, _KEEPALIVE_INTERVAL, _KEEPALIVE_COUNT = 10, 5, 3
"""Seconds of silence before the first TCP keepalive probe, seconds between probes, and
probes unanswered before the peer counts as gone (10 + 3 x 5 = 25 s): set on both ends,
so PostgreSQL frees a vanished server's lock, and a server hears of a vanished database."""


# A queued item: (operation, argument, future), as SqliteStore's, with coroutine ops:
# operation None applies a WriteBatch; _CLOSE stops the writer; anything else is awaited
# as op(conn, arg) inside the group's transaction.
_Op = Callable[[Any, Any], Awaitable[Any]]


async def _close_marker(conn: Any, arg: Any) -> None:  # a unique marker, never called
    raise AssertionError("the close marker is never applied")


_CLOSE: _Op = _close_marker


class PostgresStore(Store):
    """A store in a PostgreSQL database, shared by several servers: one active, the
    others standing by in ``open()``.

    Args:
        url: ``postgresql://user:password@host:port/database`` (or ``postgres://``).
        standby_poll: seconds between two tries for the lock while another server holds it.

    Raises:
        ImportError: asyncpg (the ``postgresql`` extra) is not installed.
    """

    open_errors = (
        (*Store.open_errors, asyncpg.PostgresError, asyncpg.InterfaceError)
        if asyncpg is not None
        else Store.open_errors
    )

    def __init__(self, url: str, *, standby_poll: float = 0.5) -> None:
        if asyncpg is None:
            raise ImportError(
                "a postgresql:// store needs asyncpg: pip install 'heartline[postgresql]'"
            )
        self._url = url
        self._standby_poll = standby_poll
        self._state = StoreState.NEW
        self._opening = False
        self._queue: asyncio.Queue[tuple[_Op | None, Any, asyncio.Future[Any]]]
        self._queue = asyncio.Queue()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._conn: Any = None
        """The writer connection: it holds the lock, and every write goes through it."""
        self._reader: Any = None
        """get_request's own connection (see Store.get_request), made again if it drops."""
        self._reader_lock = asyncio.Lock()
        self._writer: asyncio.Task[None] | None = None
        self._closing: asyncio.Future[None] | None = None
        self._lost: asyncio.Future[str] | None = None
        # Kept by the writer on the loop, copied by a metrics scrape on its own thread.
        self._figures_lock = threading.Lock()
        self._commit_seconds = Buckets(COMMIT_SECONDS_BOUNDS)
        self._batch_items = Buckets(BATCH_ITEMS_BOUNDS)

    # -- lifecycle ----------------------------------------------------------------------

    async def open(self) -> None:
        """Connect, wait for the lock (standing by while another server holds it), upgrade
        the schema, and serve. Cancelling it (a standby told to stop) closes what it opened.

        Raises:
            RuntimeError: the database's schema is of a version this heartline cannot
                open (the message names both versions).
        """
        if self._state is not StoreState.NEW or self._opening:
            raise RuntimeError(f"store is {self._state.value}; a store opens once")
        self._opening = True
        self._loop = loop = asyncio.get_running_loop()
        if self._lost is None:
            self._lost = loop.create_future()
        conn = reader = None
        try:
            conn = await self._connect()
            await self._lead(conn)
            await pgsql.migrate(conn, self.describe())
            reader = await self._connect()
            if self._state is not StoreState.NEW:  # closed while it stood by
                raise StoreClosedError(f"store {self.describe()} is {self._state.value}")
        except asyncio.CancelledError:
            for c in (conn, reader):
                if c is not None:
                    c.terminate()
            raise
        except BaseException:
            for c in (conn, reader):
                if c is not None:
                    await _close_quietly(c)
            raise
        finally:
            self._opening = False
        self._conn, self._reader = conn, reader
        conn.add_termination_listener(self._on_termination)
        self._writer = loop.create_task(self._run(conn), name="heartline-store")
        self._state = StoreState.OPEN

    async def close(self) -> None:
        if self._state is StoreState.NEW:
            self._state = StoreState.CLOSED
        if self._state is StoreState.CLOSED and self._closing is None:
            return  # closed before it ever opened
        if self._closing is None:
            # Refuse new work first, so the close marker is the last item queued.
            self._state = StoreState.CLOSING
            self._closing = asyncio.ensure_future(self._shut_down())
        await asyncio.shield(self._closing)

    async def _shut_down(self) -> None:
        closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((_CLOSE, None, closed))
        writer = self._writer
        assert writer is not None
        try:
            # The writer settles the marker and ends; should it end otherwise (a bug), its
            # error is close()'s rather than a close that never returns.
            await asyncio.wait([closed, writer], return_when=asyncio.FIRST_COMPLETED)
            await writer
        finally:
            self._state = StoreState.CLOSED
            for conn in (self._reader, self._conn):
                if conn is not None:
                    await _close_quietly(conn)

    async def wait_lost(self) -> str:
        if self._lost is None:
            self._lost = asyncio.get_running_loop().create_future()
        return await asyncio.shield(self._lost)

    def describe(self) -> str:
        return redacted(self._url)

    def figures(self) -> StoreFigures:
        with self._figures_lock:
            commit_seconds = self._commit_seconds.copy()
            batch_items = self._batch_items.copy()
        return StoreFigures(commit_seconds, batch_items, self._queue.qsize())

    async def _connect(self) -> Any:
        conn = await asyncpg.connect(
            self._url,
            server_settings={
                "application_name": "heartline",
                "tcp_keepalives_idle": str(_KEEPALIVE_IDLE),
                "tcp_keepalives_interval": str(_KEEPALIVE_INTERVAL),
                "tcp_keepalives_count": str(_KEEPALIVE_COUNT),
            },
        )
        _keep_alive(conn)
        return conn

    async def _lead(self, conn: Any) -> None:
        """Take the lock on ``conn``, waiting while another server holds it."""
        standing_by = False
        while not await conn.fetchval("SELECT pg_try_advisory_lock($1)", _LOCK_KEY):
            if self._state is not StoreState.NEW:  # closed while it stood by
                raise StoreClosedError(f"store {self.describe()} is {self._state.value}")
            if not standing_by:
                standing_by = True
                _log.warning(
                    "event=standby store=%s: another server is active on this database;"
                    " this one takes over when it goes",
                    self.describe(),
                )
            await asyncio.sleep(self._standby_poll)
        _log.log(
            logging.WARNING if standing_by else logging.INFO,
            "event=active store=%s",
            self.describe(),
        )

    def _on_termination(self, conn: Any) -> None:
        if self._state is StoreState.OPEN:
            self._set_lost("the connection that held the store's lock closed")

    def _set_lost(self, reason: str) -> None:
        if self._lost is not None and not self._lost.done():
            self._lost.set_result(reason)

    # -- the queue ----------------------------------------------------------------------

    def write(self, batch: WriteBatch) -> asyncio.Future[None]:
        return self._submit(None, batch)

    def _submit(self, op: _Op | None, arg: Any) -> asyncio.Future[Any]:
        """Queue ``op(conn, arg)`` (None: apply the WriteBatch ``arg``) behind everything
        queued before it; its future resolves once its group commits. Tests queue their
        own ops (tests/store_kit.py), as with SqliteStore."""
        if self._state is not StoreState.OPEN:
            raise StoreClosedError(f"store {self.describe()} is {self._state.value}")
        lost = self._lost
        if lost is not None and lost.done():
            raise StoreClosedError(f"store {self.describe()} is lost: {lost.result()}")
        assert self._loop is not None
        fut: asyncio.Future[Any] = self._loop.create_future()
        self._queue.put_nowait((op, arg, fut))
        return fut

    async def _run(self, conn: Any) -> None:
        """The writer: group after group, until the close marker."""
        queue = self._queue
        while True:
            items = [await queue.get()]
            while len(items) < MAX_GROUP and not queue.empty():
                items.append(queue.get_nowait())
            closing = next((i for i, item in enumerate(items) if item[0] is _CLOSE), None)
            outcomes = await self._apply_group(conn, items if closing is None else items[:closing])
            if closing is not None:
                outcomes.append((items[closing][2], None, None))
            settle(outcomes)
            if closing is not None:
                return

    async def _apply_group(self, conn: Any, items: list[Any]) -> list[Outcome]:
        """Apply ``items`` in one transaction; return their outcomes (never raises)."""
        if not items:
            return []
        lost = self._lost
        if conn.is_closed() or (lost is not None and lost.done()):
            gone = StoreClosedError(f"store {self.describe()} is lost")
            return [(fut, None, gone) for _, _, fut in items]
        group = _Group(conn)
        outcomes: list[Outcome] = []
        started = time.perf_counter()
        try:
            await conn.execute("BEGIN")
            for op, arg, fut in items:
                outcomes.append((fut, *await group.apply(op, arg)))
            await pgsql.flush(conn, group.updates)
            await self._commit(conn)
        except Exception as exc:  # noqa: BLE001 - handed to every future of the group
            _log.error("store: transaction of %d items failed: %r", len(items), exc)
            if not conn.is_closed() and conn.is_in_transaction():
                with contextlib.suppress(Exception):  # the connection went meanwhile
                    await conn.execute("ROLLBACK")
            if conn.is_closed():
                self._set_lost(f"a write failed: {exc!r}")
            # Reads of this group may have seen writes that are now gone: fail them too.
            return [(fut, None, exc) for _, _, fut in items]
        finally:
            elapsed = time.perf_counter() - started
            with self._figures_lock:
                self._commit_seconds.observe(elapsed)
                self._batch_items.observe(len(items))
        return outcomes

    async def _commit(self, conn: Any) -> None:
        """COMMIT the group's transaction: a method, so tests can count commits or make
        one fail (tests/store_kit.py), as SqliteStore's."""
        await conn.execute("COMMIT")

    # -- reads ----------------------------------------------------------------------------

    async def get_tasks(
        self, task_ids: Sequence[str], *, include_history: bool = False
    ) -> dict[str, tuple[TaskRow, list[TransitionRow]]]:
        return await self._submit(pgsql.get_tasks, (list(dict.fromkeys(task_ids)), include_history))

    async def list_tasks(
        self,
        *,
        states: Collection[TaskState] | None = None,
        endpoint_id: str | None = None,
        owner: str | None = None,
        limit: int = 100,
        after: tuple[float, str] | None = None,
    ) -> list[TaskRow]:
        if limit <= 0:
            raise ValueError(f"limit must be positive, got {limit}")
        where = pgsql.Where()
        if states is not None:
            if not states:
                return []
            where.add("state = ANY({}::text[])", [TaskState(s).value for s in states])
        if endpoint_id is not None:
            where.add("endpoint_id = {}", endpoint_id)
        if owner is not None:
            where.add("owner = {}", owner)
        if after is not None:
            where.add("(submit_time, task_id) < ({}, {})", *after)
        sql = (
            f"{pgsql.SELECT_TASKS_LIGHT}{where} ORDER BY submit_time DESC, task_id DESC LIMIT {{}}"
        )
        return await self._submit(pgsql.select_tasks, where.finish(sql, limit))

    async def load_unsettled(self) -> list[TaskRecord]:
        return await self._submit(pgsql.select_records, (pgsql.SELECT_UNSETTLED, [UNSETTLED]))

    async def load_results(
        self, task_ids: Sequence[str]
    ) -> dict[str, tuple[TaskState, bytes | None]]:
        sql = "SELECT task_id, state, result FROM tasks WHERE task_id = ANY($1::text[])"
        rows = await self._submit(pgsql.select, (sql, [list(dict.fromkeys(task_ids))]))
        return {task_id: (STATE_OF[state], result) for task_id, state, result in rows}

    async def get_args(self, task_ids: Sequence[str]) -> dict[str, bytes]:
        sql = "SELECT task_id, args FROM task_args WHERE task_id = ANY($1::text[])"
        rows = await self._submit(pgsql.select, (sql, [list(dict.fromkeys(task_ids))]))
        return {task_id: args for task_id, args in rows}

    async def get_group(self, group_id: str) -> tuple[GroupRow, GroupStateRow] | None:
        sql = f"{pgsql.SELECT_GROUPS} WHERE group_id = $1"
        rows = await self._submit(pgsql.select_groups, (sql, [group_id]))
        return rows[0] if rows else None

    async def list_groups(
        self,
        *,
        owner: str | None = None,
        pending_only: bool = False,
        limit: int = 100,
        after: tuple[float, str] | None = None,
    ) -> list[tuple[GroupRow, GroupStateRow]]:
        if limit <= 0:
            raise ValueError(f"limit must be positive, got {limit}")
        where = pgsql.Where()
        if owner is not None:
            where.add("owner = {}", owner)
        if pending_only:
            where.add("pending = 1")
        if after is not None:
            where.add("(submit_time, group_id) < ({}, {})", *after)
        sql = f"{pgsql.SELECT_GROUPS_LIGHT}{where} ORDER BY submit_time DESC, group_id DESC LIMIT {{}}"
        return await self._submit(pgsql.select_groups, where.finish(sql, limit))

    async def load_pending_groups(
        self,
    ) -> list[tuple[GroupRow, GroupStateRow, dict[str, tuple[TaskState, SkipReason | None]]]]:
        return await self._submit(pgsql.load_pending_groups, None)

    async def get_function(self, function_id: str) -> FunctionRow | None:
        sql = (
            "SELECT function_id, payload, owner, register_time FROM functions"
            " WHERE function_id = $1"
        )
        rows = await self._submit(pgsql.select, (sql, [function_id]))
        return FunctionRow(*rows[0]) if rows else None

    async def function_tails(self, function_ids: Sequence[str], size: int) -> dict[str, bytes]:
        sql = (
            "SELECT function_id, substr(payload, greatest(octet_length(payload) - $2 + 1, 1))"
            " FROM functions WHERE function_id = ANY($1::text[])"
        )
        rows = await self._submit(pgsql.select, (sql, [list(dict.fromkeys(function_ids)), size]))
        return {function_id: tail for function_id, tail in rows}

    async def function_size(self, function_id: str) -> int | None:
        sql = "SELECT octet_length(payload) FROM functions WHERE function_id = $1"
        rows = await self._submit(pgsql.select, (sql, [function_id]))
        return int(rows[0][0]) if rows else None

    async def function_bytes_by_owner(self, owner: str | None = None) -> dict[str, int]:
        where, params = ("WHERE owner = $1", [owner]) if owner is not None else ("", [])
        sql = f"SELECT owner, sum(octet_length(payload)) FROM functions {where} GROUP BY owner"
        return {o: int(total) for o, total in await self._submit(pgsql.select, (sql, params))}

    async def get_request(self, request_id: str) -> RequestRow | None:
        if self._state is not StoreState.OPEN:
            raise StoreClosedError(f"store {self.describe()} is {self._state.value}")
        sql = (
            'SELECT request_id, owner, method, digest, task_ids, "time" FROM requests'
            " WHERE request_id = $1"
        )
        async with self._reader_lock:
            if self._reader is None or self._reader.is_closed():
                self._reader = await self._connect()
            row = await self._reader.fetchrow(sql, pgsql.pg_text(request_id))
        if row is None:
            return None
        rid, owner, method, digest, task_ids, when = row
        return RequestRow(
            rid, owner, method, digest, tuple(filter(None, task_ids.split(","))), when
        )

    async def get_endpoint(self, endpoint_id: str) -> EndpointRow | None:
        sql = f"{pgsql.SELECT_ENDPOINTS} WHERE endpoint_id = $1"
        rows = await self._submit(pgsql.select, (sql, [endpoint_id]))
        return EndpointRow(*rows[0]) if rows else None

    async def get_endpoint_by_name(self, name: str, owner: str) -> EndpointRow | None:
        sql = f"{pgsql.SELECT_ENDPOINTS} WHERE owner = $1 AND name = $2"
        rows = await self._submit(pgsql.select, (sql, [owner, name]))
        return EndpointRow(*rows[0]) if rows else None

    async def list_endpoints(self, owner: str | None = None) -> list[EndpointRow]:
        where, params = (" WHERE owner = $1", [owner]) if owner is not None else ("", [])
        sql = f"{pgsql.SELECT_ENDPOINTS}{where} ORDER BY owner, name"
        return [EndpointRow(*r) for r in await self._submit(pgsql.select, (sql, params))]

    async def count_by_state(self, owner: str | None = None) -> dict[TaskState, int]:
        where, params = (" WHERE owner = $1", [owner]) if owner is not None else ("", [])
        sql = f"SELECT state, count(*) FROM tasks{where} GROUP BY state"
        counts = dict.fromkeys(TaskState, 0)
        counts.update((TaskState(s), n) for s, n in await self._submit(pgsql.select, (sql, params)))
        return counts

    async def purge_results(
        self, settled_before: float, keep_functions: Collection[str] = ()
    ) -> int:
        return await self._submit(pgsql.purge, (settled_before, sorted(keep_functions)))

    # -- users, tokens and shares: rare writes, each an op of its own on the queue -------

    async def create_token(self, row: TokenRow, secret_hash: str) -> None:
        await self._submit(pgsql.create_token, (row, secret_hash))

    async def list_tokens(self, user: str | None = None) -> list[TokenRow]:
        where, params = (' WHERE "user" = $1', [user]) if user is not None else ("", [])
        sql = f"SELECT {pgsql.TOKEN_COLUMNS} FROM tokens{where} ORDER BY created, token_id"
        return [TokenRow(*r) for r in await self._submit(pgsql.select, (sql, params))]

    async def revoke_token(self, token_id: str, when: float) -> TokenRow | None:
        return await self._submit(pgsql.revoke_token, (token_id, when))

    async def load_tokens(self) -> tuple[list[str], list[tuple[TokenRow, str]]]:
        return await self._submit(pgsql.load_tokens, None)

    async def share_endpoint(self, endpoint_id: str, user: str) -> None:
        sql = (
            'INSERT INTO endpoint_shares (endpoint_id, "user") VALUES ($1, $2)'
            " ON CONFLICT DO NOTHING"
        )
        await self._submit(pgsql.execute, (sql, [endpoint_id, user]))

    async def load_shares(self) -> list[tuple[str, str]]:
        sql = 'SELECT endpoint_id, "user" FROM endpoint_shares ORDER BY endpoint_id, "user"'
        return [(e, u) for e, u in await self._submit(pgsql.select, (sql, []))]

    async def set_allowed_functions(
        self, endpoint_id: str, function_ids: Collection[str] | None
    ) -> None:
        if function_ids is None:
            sql = "DELETE FROM endpoint_allow_lists WHERE endpoint_id = $1"
            params: list[Any] = [endpoint_id]
        else:
            sql = (
                "INSERT INTO endpoint_allow_lists (endpoint_id, function_ids) VALUES ($1, $2)"
                " ON CONFLICT (endpoint_id) DO UPDATE SET function_ids = excluded.function_ids"
            )
            params = [endpoint_id, ",".join(sorted(function_ids))]
        await self._submit(pgsql.execute, (sql, params))

    async def load_allowed_functions(self) -> dict[str, frozenset[str]]:
        sql = "SELECT endpoint_id, function_ids FROM endpoint_allow_lists"
        return {
            e: frozenset(filter(None, ids.split(",")))
            for e, ids in await self._submit(pgsql.select, (sql, []))
        }


class _Group:
    """One commit group's transaction on the writer connection."""

    __slots__ = ("conn", "savepoint", "updates")

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self.updates = Updates()
        self.savepoint = False
        """Whether the savepoint ``item`` is set (by an earlier item of the group)."""

    async def apply(self, op: _Op | None, arg: Any) -> tuple[Any, BaseException | None]:
        """Apply one item so that its failure undoes only itself."""
        conn = self.conn
        if op is None and not pgsql.inserts(arg):
            # Changes only: converted here, run with the group's updates. Nothing of it
            # reaches the database before then, so it needs no savepoint of its own.
            try:
                changes = pgsql.pg_changes(arg, pgsql.pg_histories(arg.transitions))
            except Exception as exc:  # noqa: BLE001 - handed to the item's own future
                return None, exc
            self.updates.add(changes)
            return None, None
        if op is not None:
            # A read or purge must see every update queued before it.
            await pgsql.flush(conn, self.updates)
        # One round trip: the previous item's savepoint goes, this one's is set.
        await conn.execute("RELEASE item; SAVEPOINT item" if self.savepoint else "SAVEPOINT item")
        self.savepoint = True
        try:
            if op is None:
                result = None
                changes = await pgsql.apply_batch(conn, arg)
            else:
                result = await op(conn, arg)
        except Exception as exc:  # noqa: BLE001 - handed to the item's own future
            # The savepoint stays set after it (PostgreSQL's ROLLBACK TO keeps it).
            await conn.execute("ROLLBACK TO item")
            return None, exc
        if op is None:
            self.updates.add(changes)
        return result, None


async def _close_quietly(conn: Any) -> None:
    """Close ``conn``: gracefully if it answers within seconds, else at once."""
    try:
        await conn.close(timeout=5)
    except Exception:  # noqa: BLE001 - close() aborted it already
        conn.terminate()


def _keep_alive(conn: Any) -> None:
    """TCP keepalives on the client's end too, and a bound on unacknowledged writes, so a
    silent network loss closes the connection (and wait_lost() returns) within some 25
    seconds. asyncpg has no option for it: its transport's socket is set directly."""
    transport = getattr(conn, "_transport", None)
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return  # a Unix socket: no network between
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for option, value in (
        ("TCP_KEEPIDLE", _KEEPALIVE_IDLE),
        ("TCP_KEEPINTVL", _KEEPALIVE_INTERVAL),
        ("TCP_KEEPCNT", _KEEPALIVE_COUNT),
        ("TCP_USER_TIMEOUT", 1000 * (_KEEPALIVE_IDLE + _KEEPALIVE_INTERVAL * _KEEPALIVE_COUNT)),
    ):
        if hasattr(socket, option):  # Linux has them all; other systems some
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)
