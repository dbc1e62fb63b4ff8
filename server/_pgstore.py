"""The PostgreSQL store: several servers on one database, one of them active (SPEC section 9).

``PostgresStore`` keeps the contract of ``SqliteStore`` (server/_store.py) on the caller's
event loop, without a thread: one writer connection, one asyncio queue of writes AND
reads, and one task that drains it and applies each group in ONE transaction, a
``SAVEPOINT`` per item that runs SQL (so a failing item fails only its own future), and
ONE commit. Rows go in with ``executemany`` of prebuilt tuples (server/_rows.py, shared
with SQLite); a group's task updates are coalesced as SQLite's are (``_Updates``).

Leadership: ``open()`` takes a session-level advisory lock on the writer connection
(``pg_try_advisory_lock(_LOCK_KEY)``), polling while another server holds it (this one
stands by). Every write goes through that connection, so a server that lost it can write
nothing more: ``wait_lost()`` then returns, and the server stops. A killed server's
connection closes with its process, and PostgreSQL releases the lock with it; a silent
network loss is noticed by TCP keepalives, on both ends, within some 25 seconds.

Durability is the database's: a commit returns once PostgreSQL has made it durable (as
its ``synchronous_commit`` says).

asyncpg encodes parameters by the column's type: it refuses ``str`` for ``bytea`` and
``bytes`` for ``text``, and takes ``bool`` for ``integer`` and ``int`` for ``double
precision`` (read back as ``int`` and ``float``, as SQLite's affinities give them).
PostgreSQL's text cannot hold NUL: free text (error messages, causes, output, request
ids, group names) is stored with U+FFFD for each NUL, where SQLite keeps it as it is.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import socket
import threading
import time
import urllib.parse
from collections.abc import Awaitable, Callable, Collection, Sequence
from typing import Any

from heartline._figures import BATCH_ITEMS_BOUNDS, COMMIT_SECONDS_BOUNDS, Buckets
from heartline._states import TERMINAL_STATES, GroupStatus, SkipReason, TaskState
from heartline.server._model import (
    EndpointRow,
    ErrorInfo,
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
from heartline.server._rows import (
    _GROUP_COLUMNS,
    _SKIP_OF,
    _STATE_OF,
    _TASK_COLUMNS,
    _UNSETTLED,
    _Changes,
    _changes,
    _group_params,
    _group_rows,
    _histories,
    _history_rows,
    _members_json,
    _Records,
    _task_params,
    _task_row,
    _Updates,
)
from heartline.server._store import (
    _MAX_GROUP,
    SCHEMA_VERSION,
    Store,
    StoreClosedError,
    StoreFigures,
    _Outcome,
    _settle,
    _State,
    redacted,
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
_CHUNK = 10_000
"""Rows fetched per round trip by the big reads (``load_unsettled``)."""


async def _flush(conn: Any, updates: _Updates) -> None:
    tasks, outputs, history, groups = updates.take()
    if tasks:
        await conn.executemany(_UPDATE_TASK, tasks)
    if outputs:
        await conn.executemany(_UPDATE_OUTPUT, outputs)
    if history:
        await conn.executemany(_APPEND_HISTORY, history)
    if groups:
        await conn.executemany(_UPDATE_GROUP, groups)


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

    def __init__(self, url: str, *, standby_poll: float = 0.5) -> None:
        if asyncpg is None:
            raise ImportError(
                "a postgresql:// store needs asyncpg: pip install 'heartline[postgresql]'"
            )
        self._url = url
        self._standby_poll = standby_poll
        self._state = _State.NEW
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
        if self._state is not _State.NEW or self._opening:
            raise RuntimeError(f"store is {self._state.value}; a store opens once")
        self._opening = True
        self._loop = loop = asyncio.get_running_loop()
        if self._lost is None:
            self._lost = loop.create_future()
        conn = reader = None
        try:
            conn = await self._connect()
            await self._lead(conn)
            await _migrate(conn, self.describe())
            reader = await self._connect()
            if self._state is not _State.NEW:  # closed while it stood by
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
        self._state = _State.OPEN

    async def close(self) -> None:
        if self._state is _State.NEW:
            self._state = _State.CLOSED
        if self._state is _State.CLOSED and self._closing is None:
            return  # closed before it ever opened
        if self._closing is None:
            # Refuse new work first, so the close marker is the last item queued.
            self._state = _State.CLOSING
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
            self._state = _State.CLOSED
            for conn in (self._reader, self._conn):
                if conn is not None:
                    await _close_quietly(conn)

    async def wait_lost(self) -> str:
        if self._lost is None:
            self._lost = asyncio.get_running_loop().create_future()
        return await asyncio.shield(self._lost)

    def describe(self) -> str:
        parts = urllib.parse.urlsplit(redacted(self._url))
        query = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
        if not any(k == "password" for k, _ in query):
            return urllib.parse.urlunsplit(parts)
        kept = urllib.parse.urlencode([(k, v) for k, v in query if k != "password"])
        return urllib.parse.urlunsplit(parts._replace(query=kept))

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
            if self._state is not _State.NEW:  # closed while it stood by
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
        if self._state is _State.OPEN:
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
        if self._state is not _State.OPEN:
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
            while len(items) < _MAX_GROUP and not queue.empty():
                items.append(queue.get_nowait())
            closing = next((i for i, item in enumerate(items) if item[0] is _CLOSE), None)
            outcomes = await self._apply_group(conn, items if closing is None else items[:closing])
            if closing is not None:
                outcomes.append((items[closing][2], None, None))
            _settle(outcomes)
            if closing is not None:
                return

    async def _apply_group(self, conn: Any, items: list[Any]) -> list[_Outcome]:
        """Apply ``items`` in one transaction; return their outcomes (never raises)."""
        if not items:
            return []
        lost = self._lost
        if conn.is_closed() or (lost is not None and lost.done()):
            gone = StoreClosedError(f"store {self.describe()} is lost")
            return [(fut, None, gone) for _, _, fut in items]
        group = _Group(conn)
        outcomes: list[_Outcome] = []
        started = time.perf_counter()
        try:
            await conn.execute("BEGIN")
            for op, arg, fut in items:
                outcomes.append((fut, *await group.apply(op, arg)))
            await _flush(conn, group.updates)
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
        return await self._submit(_get_tasks, (list(dict.fromkeys(task_ids)), include_history))

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
        where = _Where()
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
        sql = f"{_SELECT_TASKS_LIGHT}{where} ORDER BY submit_time DESC, task_id DESC LIMIT {{}}"
        return await self._submit(_select_tasks, where.finish(sql, limit))

    async def load_unsettled(self) -> list[TaskRecord]:
        return await self._submit(_select_records, (_SELECT_UNSETTLED, [_UNSETTLED]))

    async def load_results(
        self, task_ids: Sequence[str]
    ) -> dict[str, tuple[TaskState, bytes | None]]:
        sql = "SELECT task_id, state, result FROM tasks WHERE task_id = ANY($1::text[])"
        rows = await self._submit(_select, (sql, [list(dict.fromkeys(task_ids))]))
        return {task_id: (_STATE_OF[state], result) for task_id, state, result in rows}

    async def get_group(self, group_id: str) -> tuple[GroupRow, GroupStateRow] | None:
        sql = f"{_SELECT_GROUPS} WHERE group_id = $1"
        rows = await self._submit(_select_groups, (sql, [group_id]))
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
        where = _Where()
        if owner is not None:
            where.add("owner = {}", owner)
        if pending_only:
            where.add("pending = 1")
        if after is not None:
            where.add("(submit_time, group_id) < ({}, {})", *after)
        sql = f"{_SELECT_GROUPS_LIGHT}{where} ORDER BY submit_time DESC, group_id DESC LIMIT {{}}"
        return await self._submit(_select_groups, where.finish(sql, limit))

    async def load_pending_groups(
        self,
    ) -> list[tuple[GroupRow, GroupStateRow, dict[str, tuple[TaskState, SkipReason | None]]]]:
        return await self._submit(_load_pending_groups, None)

    async def get_function(self, function_id: str) -> FunctionRow | None:
        sql = (
            "SELECT function_id, payload, owner, register_time FROM functions"
            " WHERE function_id = $1"
        )
        rows = await self._submit(_select, (sql, [function_id]))
        return FunctionRow(*rows[0]) if rows else None

    async def function_tails(self, function_ids: Sequence[str], size: int) -> dict[str, bytes]:
        sql = (
            "SELECT function_id, substr(payload, greatest(octet_length(payload) - $2 + 1, 1))"
            " FROM functions WHERE function_id = ANY($1::text[])"
        )
        rows = await self._submit(_select, (sql, [list(dict.fromkeys(function_ids)), size]))
        return {function_id: tail for function_id, tail in rows}

    async def function_size(self, function_id: str) -> int | None:
        sql = "SELECT octet_length(payload) FROM functions WHERE function_id = $1"
        rows = await self._submit(_select, (sql, [function_id]))
        return int(rows[0][0]) if rows else None

    async def function_bytes_by_owner(self, owner: str | None = None) -> dict[str, int]:
        where, params = ("WHERE owner = $1", [owner]) if owner is not None else ("", [])
        sql = f"SELECT owner, sum(octet_length(payload)) FROM functions {where} GROUP BY owner"
        return {o: int(total) for o, total in await self._submit(_select, (sql, params))}

    async def get_request(self, request_id: str) -> RequestRow | None:
        if self._state is not _State.OPEN:
            raise StoreClosedError(f"store {self.describe()} is {self._state.value}")
        sql = (
            'SELECT request_id, owner, method, digest, task_ids, "time" FROM requests'
            " WHERE request_id = $1"
        )
        async with self._reader_lock:
            if self._reader is None or self._reader.is_closed():
                self._reader = await self._connect()
            row = await self._reader.fetchrow(sql, _text(request_id))
        if row is None:
            return None
        rid, owner, method, digest, task_ids, when = row
        return RequestRow(
            rid, owner, method, digest, tuple(filter(None, task_ids.split(","))), when
        )

    async def get_endpoint(self, endpoint_id: str) -> EndpointRow | None:
        sql = f"{_SELECT_ENDPOINTS} WHERE endpoint_id = $1"
        rows = await self._submit(_select, (sql, [endpoint_id]))
        return EndpointRow(*rows[0]) if rows else None

    async def get_endpoint_by_name(self, name: str, owner: str) -> EndpointRow | None:
        sql = f"{_SELECT_ENDPOINTS} WHERE owner = $1 AND name = $2"
        rows = await self._submit(_select, (sql, [owner, name]))
        return EndpointRow(*rows[0]) if rows else None

    async def list_endpoints(self, owner: str | None = None) -> list[EndpointRow]:
        where, params = (" WHERE owner = $1", [owner]) if owner is not None else ("", [])
        sql = f"{_SELECT_ENDPOINTS}{where} ORDER BY owner, name"
        return [EndpointRow(*r) for r in await self._submit(_select, (sql, params))]

    async def count_by_state(self, owner: str | None = None) -> dict[TaskState, int]:
        where, params = (" WHERE owner = $1", [owner]) if owner is not None else ("", [])
        sql = f"SELECT state, count(*) FROM tasks{where} GROUP BY state"
        counts = dict.fromkeys(TaskState, 0)
        counts.update((TaskState(s), n) for s, n in await self._submit(_select, (sql, params)))
        return counts

    async def purge_results(
        self, settled_before: float, keep_functions: Collection[str] = ()
    ) -> int:
        return await self._submit(_purge, (settled_before, sorted(keep_functions)))

    # -- users, tokens and shares: rare writes, each an op of its own on the queue -------

    async def create_token(self, row: TokenRow, secret_hash: str) -> None:
        await self._submit(_create_token, (row, secret_hash))

    async def list_tokens(self, user: str | None = None) -> list[TokenRow]:
        where, params = (' WHERE "user" = $1', [user]) if user is not None else ("", [])
        sql = f"SELECT {_TOKEN_COLUMNS} FROM tokens{where} ORDER BY created, token_id"
        return [TokenRow(*r) for r in await self._submit(_select, (sql, params))]

    async def revoke_token(self, token_id: str, when: float) -> TokenRow | None:
        return await self._submit(_revoke_token, (token_id, when))

    async def load_tokens(self) -> tuple[list[str], list[tuple[TokenRow, str]]]:
        return await self._submit(_load_tokens, None)

    async def share_endpoint(self, endpoint_id: str, user: str) -> None:
        sql = (
            'INSERT INTO endpoint_shares (endpoint_id, "user") VALUES ($1, $2)'
            " ON CONFLICT DO NOTHING"
        )
        await self._submit(_execute, (sql, [endpoint_id, user]))

    async def load_shares(self) -> list[tuple[str, str]]:
        sql = 'SELECT endpoint_id, "user" FROM endpoint_shares ORDER BY endpoint_id, "user"'
        return [(e, u) for e, u in await self._submit(_select, (sql, []))]

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
        await self._submit(_execute, (sql, params))

    async def load_allowed_functions(self) -> dict[str, frozenset[str]]:
        sql = "SELECT endpoint_id, function_ids FROM endpoint_allow_lists"
        return {
            e: frozenset(filter(None, ids.split(",")))
            for e, ids in await self._submit(_select, (sql, []))
        }


class _Group:
    """One commit group's transaction on the writer connection."""

    __slots__ = ("conn", "savepoint", "updates")

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self.updates = _Updates()
        self.savepoint = False
        """Whether the savepoint ``item`` is set (by an earlier item of the group)."""

    async def apply(self, op: _Op | None, arg: Any) -> tuple[Any, BaseException | None]:
        """Apply one item so that its failure undoes only itself."""
        conn = self.conn
        if op is None and not _inserts(arg):
            # Changes only: converted here, run with the group's updates. Nothing of it
            # reaches the database before then, so it needs no savepoint of its own.
            try:
                changes = _pg_changes(arg, _pg_histories(arg.transitions))
            except Exception as exc:  # noqa: BLE001 - handed to the item's own future
                return None, exc
            self.updates.add(changes)
            return None, None
        if op is not None:
            # A read or purge must see every update queued before it.
            await _flush(conn, self.updates)
        # One round trip: the previous item's savepoint goes, this one's is set.
        await conn.execute("RELEASE item; SAVEPOINT item" if self.savepoint else "SAVEPOINT item")
        self.savepoint = True
        try:
            if op is None:
                result = None
                changes = await _apply_batch(conn, arg)
            else:
                result = await op(conn, arg)
        except Exception as exc:  # noqa: BLE001 - handed to the item's own future
            # The savepoint stays set after it (PostgreSQL's ROLLBACK TO keeps it).
            await conn.execute("ROLLBACK TO item")
            return None, exc
        if op is None:
            self.updates.add(changes)
        return result, None


def _inserts(batch: WriteBatch) -> bool:
    return bool(
        batch.functions or batch.endpoints or batch.new_groups or batch.new_tasks or batch.requests
    )


async def _apply_batch(conn: Any, batch: WriteBatch) -> _Changes:
    """Insert the batch's rows; return what it changes in rows it did not insert,
    applied by the caller (after every insert of the group, before any read)."""
    # A new task's own transitions ride in its INSERT; the rest wait for the UPDATEs.
    history = _pg_histories(batch.transitions)
    if batch.functions:
        await conn.executemany(
            "INSERT INTO functions (function_id, payload, owner, register_time)"
            " VALUES ($1, $2, $3, $4) ON CONFLICT (function_id) DO NOTHING",
            [(f.function_id, f.payload, f.owner, f.register_time) for f in batch.functions],
        )
    for e in batch.endpoints:
        # SQLite's INSERT OR REPLACE: the row of the same id, or of the same (owner,
        # name), goes. Rare (an endpoint's first hello): a statement pair per row.
        await conn.execute(
            "DELETE FROM endpoints WHERE endpoint_id = $1 OR (owner = $2 AND name = $3)",
            e.endpoint_id, e.owner, e.name,
        )  # fmt: skip
        await conn.execute(
            "INSERT INTO endpoints (endpoint_id, name, owner, register_time)"
            " VALUES ($1, $2, $3, $4)",
            e.endpoint_id, e.name, e.owner, e.register_time,
        )  # fmt: skip
    if batch.new_groups:
        await conn.executemany(
            _INSERT_GROUP,
            [_group_params(g._replace(name=_text(g.name))) for g in batch.new_groups],
        )
        await conn.executemany(_INSERT_MEMBERS, map(_members_json, batch.new_groups))
    if batch.new_tasks:
        await conn.executemany(
            _INSERT_TASK,
            [_task_params(_clean_error(r), history.pop(r.task_id, "")) for r in batch.new_tasks],
        )
        await conn.executemany(_INSERT_ARGS, [(r.task_id, r.args) for r in batch.new_tasks])
    if batch.requests:
        # DO NOTHING: as SqliteStore's OR IGNORE (see there).
        await conn.executemany(
            'INSERT INTO requests (request_id, owner, method, digest, task_ids, "time")'
            " VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (request_id) DO NOTHING",
            [(_text(r.request_id), r.owner, r.method, r.digest, ",".join(r.task_ids), r.time)
             for r in batch.requests],
        )  # fmt: skip
    return _pg_changes(batch, history)


# PostgreSQL's text holds no NUL: free text gets U+FFFD for each (the module docstring).
# Each check is one C-level scan of a string, and most rows skip the rest.


def _pg_histories(transitions: Sequence[TransitionRow]) -> dict[str, str]:
    history = _histories(transitions) if transitions else {}
    for task_id, records in history.items():
        if "\x00" in records:
            history[task_id] = records.replace("\x00", "\ufffd")
    return history


def _pg_changes(batch: WriteBatch, history: dict[str, str]) -> _Changes:
    if any(r.error is not None for r in batch.task_updates):
        batch = dataclasses.replace(
            batch, task_updates=tuple(map(_clean_error, batch.task_updates))
        )
    task_updates, history, group_updates, outputs = _changes(batch, history)
    if outputs:
        outputs = [(t, (_text(out), _text(err))) for t, (out, err) in outputs]
    return task_updates, history, group_updates, outputs


def _text(text: str) -> str:
    return text.replace("\x00", "\ufffd") if "\x00" in text else text


def _clean_error(r: TaskRow) -> TaskRow:
    e = r.error
    if e is None or "\x00" not in f"{e.type_name}{e.message}{e.traceback}":
        return r
    return r._replace(
        error=ErrorInfo(_text(e.type_name), _text(e.message), _text(e.traceback), e.failure_kind)
    )


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


class _Where:
    """A WHERE clause and its parameters, numbered ($1, $2...) as terms are added."""

    __slots__ = ("params", "terms")

    def __init__(self) -> None:
        self.terms: list[str] = []
        self.params: list[Any] = []

    def add(self, term: str, *params: Any) -> None:
        first = len(self.params) + 1
        self.terms.append(term.format(*(f"${first + i}" for i in range(len(params)))))
        self.params.extend(params)

    def __str__(self) -> str:
        return " WHERE " + " AND ".join(self.terms) if self.terms else ""

    def finish(self, sql: str, last: Any) -> tuple[str, list[Any]]:
        """``sql`` (its last parameter's place a ``{}``) and every parameter."""
        return sql.format(f"${len(self.params) + 1}"), [*self.params, last]


# -- the schema ---------------------------------------------------------------------------

# Committed before anything else, so a database of another version is refused before
# _SCHEMA touches it.
_META = f"""
CREATE TABLE IF NOT EXISTS meta (key text PRIMARY KEY, value text NOT NULL);
INSERT INTO meta (key, value) VALUES ('schema_version', '{SCHEMA_VERSION}')
    ON CONFLICT (key) DO NOTHING;
"""

# SQLite's schema version 6 (server/_store.py says why each table is as it is), in
# PostgreSQL's types. Ids and names sort by their bytes (COLLATE "C"), as SQLite's do,
# whatever the database's locale: pages and orders come out the same in both stores.
_SCHEMA = """
CREATE TABLE IF NOT EXISTS tasks (
    task_id text COLLATE "C" PRIMARY KEY,
    endpoint_id text COLLATE "C" NOT NULL,
    function_id text COLLATE "C" NOT NULL,
    owner text COLLATE "C" NOT NULL,
    state text NOT NULL,
    submit_time double precision NOT NULL,
    attempt integer NOT NULL,
    priority integer NOT NULL,
    max_retries integer NOT NULL,
    max_system_retries integer NOT NULL,
    walltime double precision NOT NULL,
    start_time double precision,
    settle_time double precision,
    held_from text,
    result bytea,
    error_type text,
    error_message text,
    error_traceback text,
    error_kind integer,
    raised_count integer NOT NULL,
    system_failures integer NOT NULL,
    resubmitted_from text COLLATE "C" NOT NULL,
    group_id text COLLATE "C" NOT NULL,
    payload_purged integer NOT NULL,
    name text COLLATE "C" NOT NULL,
    inputs text NOT NULL,
    skip_reason text,
    interrupted integer NOT NULL,
    history text NOT NULL DEFAULT '',
    stdout text,
    stderr text
);
CREATE INDEX IF NOT EXISTS tasks_state ON tasks (state);
CREATE INDEX IF NOT EXISTS tasks_endpoint ON tasks (endpoint_id);
CREATE INDEX IF NOT EXISTS tasks_submit ON tasks (submit_time, task_id);
CREATE INDEX IF NOT EXISTS tasks_group ON tasks (group_id) WHERE group_id != '';
CREATE TABLE IF NOT EXISTS task_args (task_id text COLLATE "C" PRIMARY KEY, args bytea NOT NULL);
CREATE TABLE IF NOT EXISTS functions (
    function_id text COLLATE "C" PRIMARY KEY,
    payload bytea NOT NULL,
    owner text COLLATE "C" NOT NULL,
    register_time double precision NOT NULL
);
CREATE INDEX IF NOT EXISTS functions_registered ON functions (register_time, function_id);
CREATE TABLE IF NOT EXISTS requests (
    request_id text COLLATE "C" PRIMARY KEY,
    owner text COLLATE "C" NOT NULL,
    method text NOT NULL,
    digest text NOT NULL,
    task_ids text NOT NULL,
    "time" double precision NOT NULL
);
CREATE INDEX IF NOT EXISTS requests_time ON requests ("time");
CREATE TABLE IF NOT EXISTS endpoints (
    endpoint_id text COLLATE "C" PRIMARY KEY,
    name text COLLATE "C" NOT NULL,
    owner text COLLATE "C" NOT NULL,
    register_time double precision NOT NULL,
    UNIQUE (owner, name)
);
CREATE TABLE IF NOT EXISTS groups (
    group_id text COLLATE "C" PRIMARY KEY,
    name text NOT NULL,
    owner text COLLATE "C" NOT NULL,
    endpoint_id text COLLATE "C" NOT NULL,
    submit_time double precision NOT NULL,
    fail_fast integer NOT NULL,
    timeout double precision NOT NULL,
    status text NOT NULL,
    pending integer NOT NULL,
    n_succeeded integer NOT NULL,
    n_failed integer NOT NULL,
    n_skipped integer NOT NULL,
    n_cancelled integer NOT NULL,
    n_none integer NOT NULL,
    cancel_mode text,
    timed_out integer NOT NULL,
    settle_time double precision
);
CREATE INDEX IF NOT EXISTS groups_submit ON groups (submit_time, group_id);
CREATE TABLE IF NOT EXISTS group_members (
    group_id text COLLATE "C" PRIMARY KEY,
    members text NOT NULL
);
CREATE TABLE IF NOT EXISTS users (
    name text COLLATE "C" PRIMARY KEY,
    created double precision NOT NULL
);
CREATE TABLE IF NOT EXISTS tokens (
    token_id text COLLATE "C" PRIMARY KEY,
    "user" text COLLATE "C" NOT NULL,
    secret_hash text NOT NULL,
    endpoint text,
    created double precision NOT NULL,
    revoked double precision
);
CREATE TABLE IF NOT EXISTS endpoint_shares (
    endpoint_id text COLLATE "C" NOT NULL,
    "user" text COLLATE "C" NOT NULL,
    PRIMARY KEY (endpoint_id, "user")
);
CREATE TABLE IF NOT EXISTS endpoint_allow_lists (
    endpoint_id text COLLATE "C" PRIMARY KEY,
    function_ids text NOT NULL
);
"""

_PG_MIGRATIONS: dict[int, Callable[[Any], Awaitable[None]]] = {}
"""version -> the step that upgrades a database of that version to the next one. The
versions are SQLite's (the same tables and columns): PostgreSQL starts at 6, so a new
version needs a step here as well as in server/_store.py's ``_MIGRATIONS``."""


async def _migrate(conn: Any, where: str) -> None:
    """Create the schema, upgrading it to SCHEMA_VERSION one version a transaction, or
    refuse the database. Runs only on the connection that holds the lock."""
    await conn.execute(_META)
    while True:
        version = int(await conn.fetchval("SELECT value FROM meta WHERE key = 'schema_version'"))
        if version == SCHEMA_VERSION:
            break
        if version > SCHEMA_VERSION:
            raise RuntimeError(
                f"{where}: schema version {version} was written by a newer heartline; this"
                f" one reads up to {SCHEMA_VERSION}: upgrade heartline to open it"
            )
        step = _PG_MIGRATIONS.get(version)
        if step is None:
            reads = (
                f"upgrades versions {min(_PG_MIGRATIONS)} to {SCHEMA_VERSION - 1}"
                if _PG_MIGRATIONS
                else f"reads version {SCHEMA_VERSION} only"
            )
            raise RuntimeError(
                f"{where}: schema version {version} is too old to upgrade; this heartline {reads}"
            )
        _log.warning("store: upgrading %s from schema %d to %d", where, version, version + 1)
        async with conn.transaction():
            await step(conn)
            await conn.execute(
                "UPDATE meta SET value = $1 WHERE key = 'schema_version'", str(version + 1)
            )
    async with conn.transaction():
        await conn.execute(_SCHEMA)


# -- statements ---------------------------------------------------------------------------


def _marks(n: int, first: int = 1) -> str:
    return ", ".join(f"${i}" for i in range(first, first + n))


_INSERT_TASK = f"INSERT INTO tasks ({_TASK_COLUMNS}, history) VALUES ({_marks(29)})"
_INSERT_ARGS = "INSERT INTO task_args (task_id, args) VALUES ($1, $2)"
_ARGS = "(SELECT args FROM task_args a WHERE a.task_id = tasks.task_id)"
_SELECT_TASKS = "SELECT " + _TASK_COLUMNS.replace(" owner,", f" {_ARGS}, owner,") + " FROM tasks"
_SELECT_TASKS_OUTPUT = _SELECT_TASKS.replace(" FROM tasks", ", stdout, stderr FROM tasks")
_SELECT_TASKS_HISTORY = _SELECT_TASKS_OUTPUT.replace(" FROM tasks", ", history FROM tasks")
_SELECT_TASKS_LIGHT = (
    "SELECT "
    + _TASK_COLUMNS.replace(" owner,", " ''::bytea, owner,").replace(
        " result,", " CASE WHEN result IS NULL THEN NULL ELSE ''::bytea END,"
    )
    + " FROM tasks"
)
_SELECT_UNSETTLED = f"{_SELECT_TASKS} WHERE state = ANY($1::text[]) ORDER BY submit_time, task_id"
_UPDATE_TASK = (
    "UPDATE tasks SET state = $1, attempt = $2, start_time = $3, settle_time = $4,"
    " held_from = $5, result = $6, error_type = $7, error_message = $8, error_traceback = $9,"
    " error_kind = $10, raised_count = $11, system_failures = $12, payload_purged = $13,"
    " skip_reason = $14, interrupted = $15, history = history || $16 WHERE task_id = $17"
)
_APPEND_HISTORY = "UPDATE tasks SET history = history || $1 WHERE task_id = $2"
_UPDATE_OUTPUT = "UPDATE tasks SET stdout = $1, stderr = $2 WHERE task_id = $3"
_INSERT_GROUP = (
    "INSERT INTO groups (group_id, name, owner, endpoint_id, submit_time, fail_fast, timeout,"
    " status, pending, n_succeeded, n_failed, n_skipped, n_cancelled, n_none, cancel_mode,"
    f" timed_out, settle_time) VALUES ({_marks(7)}, '{GroupStatus.NONE.value}', 1,"
    " 0, 0, 0, 0, 0, NULL, 0, NULL)"
)
_INSERT_MEMBERS = "INSERT INTO group_members (group_id, members) VALUES ($1, $2)"
_UPDATE_GROUP = (
    "UPDATE groups SET status = $1, pending = $2, n_succeeded = $3, n_failed = $4,"
    " n_skipped = $5, n_cancelled = $6, n_none = $7, cancel_mode = $8, timed_out = $9,"
    " settle_time = $10 WHERE group_id = $11"
)
_MEMBERS = "(SELECT members FROM group_members m WHERE m.group_id = groups.group_id)"
_SELECT_GROUPS = f"SELECT {_GROUP_COLUMNS}, {_MEMBERS} FROM groups"
_SELECT_GROUPS_LIGHT = f"SELECT {_GROUP_COLUMNS}, NULL FROM groups"
# The tasks of every pending group, through the partial index tasks_group: the query
# names its condition (group_id != '') as the index does.
_PENDING_GROUP_TASKS = (
    "SELECT t.group_id, t.task_id, t.state, t.skip_reason FROM groups g"
    " JOIN tasks t ON t.group_id = g.group_id WHERE g.pending = 1 AND t.group_id != ''"
)
_SELECT_ENDPOINTS = "SELECT endpoint_id, name, owner, register_time FROM endpoints"
_TOKEN_COLUMNS = 'token_id, "user", endpoint, created, revoked'
"""TokenRow's columns, in its order (never the hash)."""


# -- ops: run by the writer, inside a group's transaction --------------------------------


async def _select(conn: Any, arg: tuple[str, Sequence[Any]]) -> list[Any]:
    sql, params = arg
    return await conn.fetch(sql, *params)


async def _execute(conn: Any, arg: tuple[str, Sequence[Any]]) -> None:
    sql, params = arg
    await conn.execute(sql, *params)


async def _select_tasks(conn: Any, arg: tuple[str, Sequence[Any]]) -> list[TaskRow]:
    sql, params = arg
    return [_task_row(c) for c in await conn.fetch(sql, *params)]


async def _select_records(conn: Any, arg: tuple[str, Sequence[Any]]) -> list[TaskRecord]:
    # In chunks: a million records are enough to hold, without their rows at once too.
    sql, params = arg
    records = _Records()
    cursor = await conn.cursor(sql, *params)
    while rows := await cursor.fetch(_CHUNK):
        records.add(rows)
    return records.records


async def _get_tasks(
    conn: Any, arg: tuple[list[str], bool]
) -> dict[str, tuple[TaskRow, list[TransitionRow]]]:
    task_ids, include_history = arg
    select = _SELECT_TASKS_HISTORY if include_history else _SELECT_TASKS_OUTPUT
    found: dict[str, tuple[TaskRow, list[TransitionRow]]] = {}
    for c in await conn.fetch(f"{select} WHERE task_id = ANY($1::text[])", task_ids):
        found[c[0]] = (_task_row(c), _history_rows(c[0], c[31]) if include_history else [])
    return found


async def _select_groups(
    conn: Any, arg: tuple[str, Sequence[Any]]
) -> list[tuple[GroupRow, GroupStateRow]]:
    sql, params = arg
    return [_group_rows(c) for c in await conn.fetch(sql, *params)]


async def _load_pending_groups(
    conn: Any, arg: None
) -> list[tuple[GroupRow, GroupStateRow, dict[str, tuple[TaskState, SkipReason | None]]]]:
    groups = await conn.fetch(f"{_SELECT_GROUPS} WHERE pending = 1 ORDER BY submit_time, group_id")
    if not groups:
        return []
    tasks: dict[str, dict[str, tuple[TaskState, SkipReason | None]]] = {c[0]: {} for c in groups}
    for group_id, task_id, state, skip in await conn.fetch(_PENDING_GROUP_TASKS):
        tasks[group_id][task_id] = (_STATE_OF[state], None if skip is None else _SKIP_OF[skip])
    return [(*_group_rows(c), tasks[c[0]]) for c in groups]


async def _create_token(conn: Any, arg: tuple[TokenRow, str]) -> None:
    row, secret_hash = arg
    await conn.execute(
        "INSERT INTO users (name, created) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING",
        row.user, row.created,
    )  # fmt: skip
    await conn.execute(
        f'INSERT INTO tokens (token_id, "user", secret_hash, endpoint, created, revoked)'
        f" VALUES ({_marks(6)})",
        row.token_id, row.user, secret_hash, row.endpoint, row.created, row.revoked,
    )  # fmt: skip


async def _revoke_token(conn: Any, arg: tuple[str, float]) -> TokenRow | None:
    token_id, when = arg
    await conn.execute(
        "UPDATE tokens SET revoked = $1 WHERE token_id = $2 AND revoked IS NULL", when, token_id
    )
    found = await conn.fetchrow(
        f"SELECT {_TOKEN_COLUMNS} FROM tokens WHERE token_id = $1", token_id
    )
    return None if found is None else TokenRow(*found)


async def _load_tokens(conn: Any, arg: None) -> tuple[list[str], list[tuple[TokenRow, str]]]:
    users = [name for (name,) in await conn.fetch("SELECT name FROM users ORDER BY name")]
    sql = f"SELECT {_TOKEN_COLUMNS}, secret_hash FROM tokens WHERE revoked IS NULL"
    return users, [(TokenRow(c[0], c[1], c[2], c[3], c[4]), c[5]) for c in await conn.fetch(sql)]


_TERMINAL = sorted(s.value for s in TERMINAL_STATES)
_DUE = "state = ANY($1::text[]) AND settle_time < $2 AND payload_purged = 0"
"""The tasks whose payloads a purge drops (SqliteStore's ``_purge`` says which)."""


async def _purge(conn: Any, arg: tuple[float, list[str]]) -> int:
    settled_before, keep_functions = arg
    await conn.execute(
        "UPDATE task_args SET args = ''::bytea"
        f" WHERE task_id IN (SELECT task_id FROM tasks WHERE {_DUE})",
        _TERMINAL, settled_before,
    )  # fmt: skip
    status = await conn.execute(
        "UPDATE tasks SET result = NULL, stdout = NULL, stderr = NULL, payload_purged = 1"
        f" WHERE {_DUE}",
        _TERMINAL, settled_before,
    )  # fmt: skip
    # The functions registered before the cutoff that no task with a payload uses, and
    # that the server does not hold: one anti-join over the tasks (no index on their
    # function_id, for SqliteStore's reason: see _purge_functions there).
    status_functions = await conn.execute(
        "DELETE FROM functions f WHERE register_time < $1 AND NOT (function_id = ANY($2::text[]))"
        " AND NOT EXISTS (SELECT 1 FROM tasks t"
        "  WHERE t.function_id = f.function_id AND t.payload_purged = 0)",
        settled_before, keep_functions,
    )  # fmt: skip
    functions = int(status_functions.split()[-1])
    if functions:
        _log.info("event=purged-functions functions=%d", functions)
    # Request ids are kept as long as payloads are: a repeat older than that is a new request.
    await conn.execute('DELETE FROM requests WHERE "time" < $1', settled_before)
    return int(status.split()[-1])
