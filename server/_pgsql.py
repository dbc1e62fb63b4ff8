"""The SQL of the PostgreSQL store: its schema and migrations, its statements, the
operations its writer queues (each run inside a group's transaction), and how a group's
writes reach the database (inserts, then the coalesced updates of server/_rows.py's
``Updates``). ``PostgresStore`` (server/_pgstore.py) holds the connection and runs them.

asyncpg encodes parameters by the column's type: it refuses ``str`` for ``bytea`` and
``bytes`` for ``text``, and takes ``bool`` for ``integer`` and ``int`` for ``double
precision`` (read back as ``int`` and ``float``, as SQLite's affinities give them).
PostgreSQL's text cannot hold NUL: free text (error messages, causes, output, request
ids, group names) is stored with U+FFFD for each NUL, where SQLite keeps it as it is.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from heartline._states import TERMINAL_STATES, GroupStatus, SkipReason, TaskState
from heartline.server._model import (
    ErrorInfo,
    GroupRow,
    GroupStateRow,
    TaskRecord,
    TaskRow,
    TokenRow,
    TransitionRow,
    WriteBatch,
)
from heartline.server._rows import (
    GROUP_COLUMNS,
    SKIP_OF,
    STATE_OF,
    TASK_COLUMNS,
    Changes,
    Records,
    Updates,
    changes,
    group_params,
    group_rows,
    histories,
    history_rows,
    members_json,
    task_params,
    task_row,
)
from heartline.server._store import SCHEMA_VERSION

__all__ = [
    "SELECT_ENDPOINTS",
    "SELECT_GROUPS",
    "SELECT_GROUPS_LIGHT",
    "SELECT_TASKS_LIGHT",
    "SELECT_UNSETTLED",
    "TOKEN_COLUMNS",
    "Where",
    "apply_batch",
    "create_token",
    "execute",
    "flush",
    "get_tasks",
    "inserts",
    "load_pending_groups",
    "load_tokens",
    "migrate",
    "pg_changes",
    "pg_histories",
    "pg_text",
    "purge",
    "revoke_token",
    "select",
    "select_groups",
    "select_records",
    "select_tasks",
]

_log = logging.getLogger("heartline.server.store")

_CHUNK = 10_000
"""Rows fetched per round trip by the big reads (``load_unsettled``)."""


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


async def migrate(conn: Any, where: str) -> None:
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


_INSERT_TASK = f"INSERT INTO tasks ({TASK_COLUMNS}, history) VALUES ({_marks(29)})"
_INSERT_ARGS = "INSERT INTO task_args (task_id, args) VALUES ($1, $2)"
_ARGS = "(SELECT args FROM task_args a WHERE a.task_id = tasks.task_id)"
_SELECT_TASKS = "SELECT " + TASK_COLUMNS.replace(" owner,", f" {_ARGS}, owner,") + " FROM tasks"
_SELECT_TASKS_OUTPUT = _SELECT_TASKS.replace(" FROM tasks", ", stdout, stderr FROM tasks")
_SELECT_TASKS_HISTORY = _SELECT_TASKS_OUTPUT.replace(" FROM tasks", ", history FROM tasks")
SELECT_TASKS_LIGHT = (
    "SELECT "
    + TASK_COLUMNS.replace(" owner,", " ''::bytea, owner,").replace(
        " result,", " CASE WHEN result IS NULL THEN NULL ELSE ''::bytea END,"
    )
    + " FROM tasks"
)
SELECT_UNSETTLED = f"{_SELECT_TASKS} WHERE state = ANY($1::text[]) ORDER BY submit_time, task_id"
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
SELECT_GROUPS = f"SELECT {GROUP_COLUMNS}, {_MEMBERS} FROM groups"
SELECT_GROUPS_LIGHT = f"SELECT {GROUP_COLUMNS}, NULL FROM groups"
# The tasks of every pending group, through the partial index tasks_group: the query
# names its condition (group_id != '') as the index does.
_PENDING_GROUP_TASKS = (
    "SELECT t.group_id, t.task_id, t.state, t.skip_reason FROM groups g"
    " JOIN tasks t ON t.group_id = g.group_id WHERE g.pending = 1 AND t.group_id != ''"
)
SELECT_ENDPOINTS = "SELECT endpoint_id, name, owner, register_time FROM endpoints"
TOKEN_COLUMNS = 'token_id, "user", endpoint, created, revoked'
"""TokenRow's columns, in its order (never the hash)."""


class Where:
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


# -- ops: run by the writer, inside a group's transaction --------------------------------


async def select(conn: Any, arg: tuple[str, Sequence[Any]]) -> list[Any]:
    sql, params = arg
    return await conn.fetch(sql, *params)


async def execute(conn: Any, arg: tuple[str, Sequence[Any]]) -> None:
    sql, params = arg
    await conn.execute(sql, *params)


async def select_tasks(conn: Any, arg: tuple[str, Sequence[Any]]) -> list[TaskRow]:
    sql, params = arg
    return [task_row(c) for c in await conn.fetch(sql, *params)]


async def select_records(conn: Any, arg: tuple[str, Sequence[Any]]) -> list[TaskRecord]:
    # In chunks: a million records are enough to hold, without their rows at once too.
    sql, params = arg
    records = Records()
    cursor = await conn.cursor(sql, *params)
    while rows := await cursor.fetch(_CHUNK):
        records.add(rows)
    return records.records


async def get_tasks(
    conn: Any, arg: tuple[list[str], bool]
) -> dict[str, tuple[TaskRow, list[TransitionRow]]]:
    task_ids, include_history = arg
    select = _SELECT_TASKS_HISTORY if include_history else _SELECT_TASKS_OUTPUT
    found: dict[str, tuple[TaskRow, list[TransitionRow]]] = {}
    for c in await conn.fetch(f"{select} WHERE task_id = ANY($1::text[])", task_ids):
        found[c[0]] = (task_row(c), history_rows(c[0], c[31]) if include_history else [])
    return found


async def select_groups(
    conn: Any, arg: tuple[str, Sequence[Any]]
) -> list[tuple[GroupRow, GroupStateRow]]:
    sql, params = arg
    return [group_rows(c) for c in await conn.fetch(sql, *params)]


async def load_pending_groups(
    conn: Any, arg: None
) -> list[tuple[GroupRow, GroupStateRow, dict[str, tuple[TaskState, SkipReason | None]]]]:
    groups = await conn.fetch(f"{SELECT_GROUPS} WHERE pending = 1 ORDER BY submit_time, group_id")
    if not groups:
        return []
    tasks: dict[str, dict[str, tuple[TaskState, SkipReason | None]]] = {c[0]: {} for c in groups}
    for group_id, task_id, state, skip in await conn.fetch(_PENDING_GROUP_TASKS):
        tasks[group_id][task_id] = (STATE_OF[state], None if skip is None else SKIP_OF[skip])
    return [(*group_rows(c), tasks[c[0]]) for c in groups]


async def create_token(conn: Any, arg: tuple[TokenRow, str]) -> None:
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


async def revoke_token(conn: Any, arg: tuple[str, float]) -> TokenRow | None:
    token_id, when = arg
    await conn.execute(
        "UPDATE tokens SET revoked = $1 WHERE token_id = $2 AND revoked IS NULL", when, token_id
    )
    found = await conn.fetchrow(f"SELECT {TOKEN_COLUMNS} FROM tokens WHERE token_id = $1", token_id)
    return None if found is None else TokenRow(*found)


async def load_tokens(conn: Any, arg: None) -> tuple[list[str], list[tuple[TokenRow, str]]]:
    users = [name for (name,) in await conn.fetch("SELECT name FROM users ORDER BY name")]
    sql = f"SELECT {TOKEN_COLUMNS}, secret_hash FROM tokens WHERE revoked IS NULL"
    return users, [(TokenRow(c[0], c[1], c[2], c[3], c[4]), c[5]) for c in await conn.fetch(sql)]


_TERMINAL = sorted(s.value for s in TERMINAL_STATES)
_DUE = "state = ANY($1::text[]) AND settle_time < $2 AND payload_purged = 0"
"""The tasks whose payloads a purge drops (SqliteStore's ``purge`` says which)."""


async def purge(conn: Any, arg: tuple[float, list[str]]) -> int:
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


# -- a group's writes: its inserts, then its coalesced updates ----------------------------


async def flush(conn: Any, updates: Updates) -> None:
    tasks, outputs, history, groups = updates.take()
    if tasks:
        await conn.executemany(_UPDATE_TASK, tasks)
    if outputs:
        await conn.executemany(_UPDATE_OUTPUT, outputs)
    if history:
        await conn.executemany(_APPEND_HISTORY, history)
    if groups:
        await conn.executemany(_UPDATE_GROUP, groups)


def inserts(batch: WriteBatch) -> bool:
    return bool(
        batch.functions or batch.endpoints or batch.new_groups or batch.new_tasks or batch.requests
    )


async def apply_batch(conn: Any, batch: WriteBatch) -> Changes:
    """Insert the batch's rows; return what it changes in rows it did not insert,
    applied by the caller (after every insert of the group, before any read)."""
    # A new task's own transitions ride in its INSERT; the rest wait for the UPDATEs.
    history = pg_histories(batch.transitions)
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
            [group_params(g._replace(name=pg_text(g.name))) for g in batch.new_groups],
        )
        await conn.executemany(_INSERT_MEMBERS, map(members_json, batch.new_groups))
    if batch.new_tasks:
        await conn.executemany(
            _INSERT_TASK,
            [task_params(_clean_error(r), history.pop(r.task_id, "")) for r in batch.new_tasks],
        )
        await conn.executemany(_INSERT_ARGS, [(r.task_id, r.args) for r in batch.new_tasks])
    if batch.requests:
        # DO NOTHING: as SqliteStore's OR IGNORE (see there).
        await conn.executemany(
            'INSERT INTO requests (request_id, owner, method, digest, task_ids, "time")'
            " VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (request_id) DO NOTHING",
            [(pg_text(r.request_id), r.owner, r.method, r.digest, ",".join(r.task_ids), r.time)
             for r in batch.requests],
        )  # fmt: skip
    return pg_changes(batch, history)


# PostgreSQL's text holds no NUL: free text gets U+FFFD for each (the module docstring).
# Each check is one C-level scan of a string, and most rows skip the rest.


def pg_histories(transitions: Sequence[TransitionRow]) -> dict[str, str]:
    history = histories(transitions) if transitions else {}
    for task_id, records in history.items():
        if "\x00" in records:
            history[task_id] = records.replace("\x00", "\ufffd")
    return history


def pg_changes(batch: WriteBatch, history: dict[str, str]) -> Changes:
    if any(r.error is not None for r in batch.task_updates):
        batch = dataclasses.replace(
            batch, task_updates=tuple(map(_clean_error, batch.task_updates))
        )
    task_updates, history, group_updates, outputs = changes(batch, history)
    if outputs:
        outputs = [(t, (pg_text(out), pg_text(err))) for t, (out, err) in outputs]
    return task_updates, history, group_updates, outputs


def pg_text(text: str) -> str:
    return text.replace("\x00", "\ufffd") if "\x00" in text else text


def _clean_error(r: TaskRow) -> TaskRow:
    e = r.error
    if e is None or "\x00" not in f"{e.type_name}{e.message}{e.traceback}":
        return r
    return r._replace(
        error=ErrorInfo(
            pg_text(e.type_name), pg_text(e.message), pg_text(e.traceback), e.failure_kind
        )
    )
