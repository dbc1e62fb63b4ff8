"""The durable store: a narrow interface and its embedded SQLite implementation.

The PostgreSQL store (server/_pgstore.py) keeps the same contract (``Store``); both share
their SQL-free half, rows to tuples and back, in server/_rows.py.

``SqliteStore`` keeps one connection on one writer thread. Every operation, reads
included, goes through one FIFO queue to that thread, so a read sees every write queued
before it (the scheduler relies on this read-your-writes order). The thread takes the
first queued item, drains whatever else is queued, applies it all in ONE transaction,
commits once, and resolves every future of the group with one ``call_soon_threadsafe``
(group commit: durability costs one commit per group, not per request).

Durability: WAL mode with ``synchronous=NORMAL``. A commit appends its frames to the WAL
with ``write()``; the WAL is fsynced only at checkpoints, which never run inside a
commit (``_Checkpointer``). A killed process (SIGKILL)
cannot lose what the kernel already holds in its page cache, so nothing committed is
lost (SPEC section 8). Only an OS crash or power cut may drop the last commits, and even
then the database stays consistent; ``synchronous=FULL`` would cost an fsync per group.
"""

from __future__ import annotations

import abc
import asyncio
import concurrent.futures
import enum
import logging
import os
import queue
import sqlite3
import threading
import time
import urllib.parse
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from heartline._figures import BATCH_ITEMS_BOUNDS, COMMIT_SECONDS_BOUNDS, Buckets
from heartline._states import TERMINAL_STATES, GroupStatus, SkipReason, TaskState
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
from heartline.server._rows import (
    GROUP_COLUMNS,
    PLAIN,
    PLAIN_COLUMNS,
    SKIP_OF,
    STATE_OF,
    TASK_COLUMNS,
    UNSETTLED,
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

__all__ = [
    "MAX_GROUP",
    "SCHEMA_VERSION",
    "Outcome",
    "SqliteStore",
    "Store",
    "StoreClosedError",
    "StoreFigures",
    "StoreState",
    "is_database_url",
    "redacted",
    "settle",
    "store_for",
]

_log = logging.getLogger("heartline.server.store")

SCHEMA_VERSION = 6
"""The schema this code writes. Versions 4 and 5 are upgraded at open (``_MIGRATIONS``)."""
MAX_GROUP = 4096
"""Most queue items applied in one transaction: bounds the latency of a group under load."""
_MAX_VARS = 500
"""Ids bound per ``IN (...)`` query (well under SQLite's variable limit)."""


class StoreClosedError(RuntimeError):
    """The store is not open (never opened, or closed)."""


@dataclass(frozen=True, slots=True)
class StoreFigures:
    """A copy of a store's figures, for metrics."""

    commit_seconds: Buckets
    """Seconds per group commit (BEGIN to COMMIT, rolled back ones included)."""
    batch_items: Buckets
    """Queued items (writes and reads) per group commit."""
    queued: int
    """Items waiting for the writer."""


class Store(abc.ABC):
    """Narrow persistence interface of the server.

    The contract every store keeps (tests/store_kit.py runs one suite against each):

    - **One queue, in order.** Writes and reads (every method but ``get_request``) go
      through one FIFO queue to one writer. A read sees every write queued before it,
      committed or not yet (read-your-writes: the scheduler relies on it), and batches
      commit in the order they were written.
    - **Group commit.** The writer applies what is queued (up to a bound) in ONE
      transaction and commits once. Each item runs under its own savepoint: an item that
      fails (a duplicate task id, a malformed row) fails only its own future, and the
      rest of its group commits. A failed COMMIT fails every future of the group, reads
      included (they may have seen writes that are gone).
    - **Coalesced updates.** Within a group, the last update of a task (or of a group's
      state, or output) wins and is written once; the history each batch appends to a
      task is joined in order.
    - **Lifecycle.** A store opens once (``StoreClosedError`` before and after; a second
      ``open()`` raises ``RuntimeError``); ``close()`` commits everything queued first.
    - **Restart.** A new store on the same place reads back everything committed:
      ``load_unsettled`` (standing LOST where it was interrupted) and
      ``load_pending_groups`` are what a restarted scheduler resumes.
    """

    open_errors: tuple[type[BaseException], ...] = (OSError, RuntimeError, ValueError)
    """What ``open()`` raises when the store cannot be opened as configured (a bad path,
    an unreachable database, a schema of another version): the server reports these in
    one line instead of a traceback."""

    @abc.abstractmethod
    async def open(self) -> None:
        """Create or upgrade the schema and start serving.

        A store of a schema version it cannot read (newer, or too old to upgrade) is
        refused, untouched, with a message naming both versions. A store shared by
        several servers (PostgreSQL) waits here while another server is active.
        """

    @abc.abstractmethod
    async def close(self) -> None:
        """Commit everything queued, then release the store (and any leadership it
        held). Idempotent; a never opened store just closes."""

    @abc.abstractmethod
    def write(self, batch: WriteBatch) -> asyncio.Future[None]:
        """Queue ``batch``; never blocks.

        Must be called on the event loop's thread. The future resolves once the batch is
        committed, or gets the exception that kept it (and only it, unless the COMMIT
        itself failed) from committing.

        Raises:
            StoreClosedError: the store is not open (or lost: see ``wait_lost``).
        """

    @abc.abstractmethod
    async def get_tasks(
        self, task_ids: Sequence[str], *, include_history: bool = False
    ) -> dict[str, tuple[TaskRow, list[TransitionRow]]]:
        """Tasks by id, with their output, and their history (oldest first, empty unless
        asked); unknown ids are absent."""

    @abc.abstractmethod
    async def list_tasks(
        self,
        *,
        states: Collection[TaskState] | None = None,
        endpoint_id: str | None = None,
        owner: str | None = None,
        limit: int = 100,
        after: tuple[float, str] | None = None,
    ) -> list[TaskRow]:
        """Tasks newest first (submit_time, task_id descending; ids compare by their
        bytes).

        Rows carry no payloads, for speed: ``args`` is ``b""``, ``result`` is ``b""``
        when a result is stored (None when not), ``stdout`` and ``stderr`` are ""; use
        ``get_tasks`` for payloads.

        Args:
            after: ``(submit_time, task_id)`` of the last row of the previous page.
        """

    @abc.abstractmethod
    async def load_unsettled(self) -> list[TaskRecord]:
        """Every pending or ERRORED task, in no particular order (the scheduler orders its
        queues itself), as the scheduler holds it (standing LOST where stored as
        interrupted): what a restarted scheduler resumes. Records, not
        rows: a restart with a million tasks pending would hold both at once otherwise
        (256 bytes a task more at its peak)."""

    @abc.abstractmethod
    async def get_args(self, task_ids: Sequence[str]) -> dict[str, bytes]:
        """The stored arguments of each task by id; unknown ids are absent. What a
        dispatch reads of a task loaded without them (``TaskRecord.args`` None)."""

    async def release_memory(self) -> None:
        """Free what the store caches (after a restore's big read); it fills again as
        needed. Nothing to do where the database keeps its cache in its own process."""

    @abc.abstractmethod
    async def load_results(
        self, task_ids: Sequence[str]
    ) -> dict[str, tuple[TaskState, bytes | None]]:
        """The state and result payload of each task by id; unknown ids are absent."""

    @abc.abstractmethod
    async def get_group(self, group_id: str) -> tuple[GroupRow, GroupStateRow] | None:
        """A group (with its members) and its state, or None."""

    @abc.abstractmethod
    async def list_groups(
        self,
        *,
        owner: str | None = None,
        pending_only: bool = False,
        limit: int = 100,
        after: tuple[float, str] | None = None,
    ) -> list[tuple[GroupRow, GroupStateRow]]:
        """Groups newest first (submit_time, group_id descending), with their state.

        Rows carry no members, for speed: ``members`` is ``()``; use ``get_group``.

        Args:
            pending_only: only groups with a pending task (``GroupStateRow.pending``).
            after: ``(submit_time, group_id)`` of the last row of the previous page.
        """

    @abc.abstractmethod
    async def load_pending_groups(
        self,
    ) -> list[tuple[GroupRow, GroupStateRow, dict[str, tuple[TaskState, SkipReason | None]]]]:
        """Every pending group, oldest first, with its members, its state, and the state
        and skip reason of each of its stored tasks by task id: what a restarted
        scheduler resumes (with ``load_unsettled``)."""

    @abc.abstractmethod
    async def get_function(self, function_id: str) -> FunctionRow | None:
        """A registered function, or None."""

    @abc.abstractmethod
    async def function_tails(self, function_ids: Sequence[str], size: int) -> dict[str, bytes]:
        """The last ``size`` bytes of each registered function's payload (where its
        serialization trailer is, heartline/_forms.py), in one read; unknown ids absent."""

    @abc.abstractmethod
    async def function_size(self, function_id: str) -> int | None:
        """The size in bytes of a registered function (without reading it), or None."""

    @abc.abstractmethod
    async def function_bytes_by_owner(self, owner: str | None = None) -> dict[str, int]:
        """Bytes of the stored functions of each owner that has some (or of one)."""

    @abc.abstractmethod
    async def get_request(self, request_id: str) -> RequestRow | None:
        """A committed client request id (see RequestRow), or None.

        Unlike the other reads, this one does not wait behind queued writes (it reads
        committed rows on a connection of its own: a submit asks it before it is fed to
        the scheduler, and must not stall behind a big commit): a request id still being
        committed is the caller's to remember (server/_requests.py keeps such ids until
        their commit is done).
        """

    @abc.abstractmethod
    async def get_endpoint(self, endpoint_id: str) -> EndpointRow | None:
        """An endpoint by id, or None."""

    @abc.abstractmethod
    async def get_endpoint_by_name(self, name: str, owner: str) -> EndpointRow | None:
        """An owner's endpoint by name, or None."""

    @abc.abstractmethod
    async def list_endpoints(self, owner: str | None = None) -> list[EndpointRow]:
        """Endpoints (of one owner, or all), by owner then name."""

    @abc.abstractmethod
    async def count_by_state(self, owner: str | None = None) -> dict[TaskState, int]:
        """Number of tasks in each state; every state is a key (0 when none)."""

    @abc.abstractmethod
    async def purge_results(
        self, settled_before: float, keep_functions: Collection[str] = ()
    ) -> int:
        """Drop payloads of terminal tasks settled before ``settled_before``, and the
        functions nothing needs any more.

        The task record stays (``payload_purged`` says so). A stored function goes when
        it was registered before ``settled_before``, no task with a kept payload uses it
        (every pending or ERRORED task keeps its payload) and it is not in
        ``keep_functions`` (the ids the server holds in memory, which it may have just
        vouched for to a submit). A client that names a purged function is refused
        ``NOT_FOUND`` and registers it again. Returns how many tasks were purged.
        """

    # -- users, tokens and shares (server/_auth.py keeps them in memory) ---------------

    @abc.abstractmethod
    async def create_token(self, row: TokenRow, secret_hash: str) -> None:
        """Store a new token (``secret_hash``: sha256 of its secret, hex), and its user if new."""

    @abc.abstractmethod
    async def list_tokens(self, user: str | None = None) -> list[TokenRow]:
        """Tokens (of one user, or all), revoked ones included, oldest first."""

    @abc.abstractmethod
    async def revoke_token(self, token_id: str, when: float) -> TokenRow | None:
        """Mark a token revoked (once: a revoked token keeps its first time); the row
        after, or None if there is no such token."""

    @abc.abstractmethod
    async def load_tokens(self) -> tuple[list[str], list[tuple[TokenRow, str]]]:
        """Every user name, and every live token with its secret hash: what the server
        authenticates against, from memory."""

    @abc.abstractmethod
    async def share_endpoint(self, endpoint_id: str, user: str) -> None:
        """Let ``user`` use the endpoint (sharing twice is sharing once)."""

    @abc.abstractmethod
    async def load_shares(self) -> list[tuple[str, str]]:
        """Every ``(endpoint_id, user)`` share."""

    @abc.abstractmethod
    async def set_allowed_functions(
        self, endpoint_id: str, function_ids: Collection[str] | None
    ) -> None:
        """Keep an endpoint's function allow-list (its agents' last hello's); None: it
        has none (every function runs)."""

    @abc.abstractmethod
    async def load_allowed_functions(self) -> dict[str, frozenset[str]]:
        """The allow-list of every endpoint that has one, by endpoint id."""

    def figures(self) -> StoreFigures | None:
        """A copy of the store's figures for metrics (callable from any thread); None
        if this store keeps none."""
        return None

    # -- where it is, and whether it still serves this server --------------------------

    @abc.abstractmethod
    def describe(self) -> str:
        """Where the store is, for logs and the CLI (never a password)."""

    async def wait_lost(self) -> str:
        """Return, with the reason, once the store can no longer serve this server (its
        database connection is gone, and with it the leadership that connection held:
        another server may be active by now). The server then stops. The default: never
        (an embedded store is lost only through a failed write, which the server sees)."""
        await asyncio.get_running_loop().create_future()
        raise AssertionError("unreachable")


def is_database_url(db: str | os.PathLike[str]) -> bool:
    """Whether ``--db`` names a PostgreSQL database (else it is a SQLite file's path)."""
    return isinstance(db, str) and db.startswith(("postgresql://", "postgres://"))


def redacted(db: str | os.PathLike[str]) -> str:
    """``--db`` as logs and the CLI show it: a URL without its password (``***`` in its
    place, and a ``password`` query parameter dropped)."""
    if not is_database_url(db):
        return os.fspath(db)
    parts = urllib.parse.urlsplit(str(db))
    if parts.password is not None:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
        parts = parts._replace(netloc=netloc)
    query = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
    if any(k == "password" for k, _ in query):
        kept = urllib.parse.urlencode([(k, v) for k, v in query if k != "password"])
        parts = parts._replace(query=kept)
    return urllib.parse.urlunsplit(parts)


def store_for(db: str | os.PathLike[str]) -> Store:
    """The store ``--db`` names: a ``postgresql://`` URL, or the path of a SQLite file."""
    if is_database_url(db):
        from heartline.server._pgstore import PostgresStore

        return PostgresStore(str(db))
    return SqliteStore(db)


class StoreState(enum.Enum):
    """Where a store is in its life: new, open, closing, closed (a store opens once)."""

    NEW = "new"
    OPEN = "open"
    CLOSING = "closing"
    CLOSED = "closed"


# Run (and committed) before anything else, so a file of another version is refused
# before _SCHEMA touches it.
_META = f"""
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
INSERT OR IGNORE INTO meta (key, value) VALUES ('schema_version', '{SCHEMA_VERSION}');
"""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS tasks (
    task_id TEXT PRIMARY KEY,
    endpoint_id TEXT NOT NULL,
    function_id TEXT NOT NULL,
    owner TEXT NOT NULL,
    state TEXT NOT NULL,
    submit_time REAL NOT NULL,
    attempt INTEGER NOT NULL,
    priority INTEGER NOT NULL,
    max_retries INTEGER NOT NULL,
    max_system_retries INTEGER NOT NULL,
    walltime REAL NOT NULL,
    start_time REAL,
    settle_time REAL,
    held_from TEXT,
    result BLOB,
    error_type TEXT,
    error_message TEXT,
    error_traceback TEXT,
    error_kind INTEGER,
    raised_count INTEGER NOT NULL,
    system_failures INTEGER NOT NULL,
    resubmitted_from TEXT NOT NULL,
    group_id TEXT NOT NULL,
    payload_purged INTEGER NOT NULL,
    name TEXT NOT NULL,
    inputs TEXT NOT NULL,  -- task ids joined by ',' ('' for none)
    skip_reason TEXT,  -- a SkipReason value when SKIPPED
    interrupted INTEGER NOT NULL,
    history TEXT NOT NULL DEFAULT '',
    stdout TEXT,
    stderr TEXT
);
-- history: the task's transitions, oldest first, in _HISTORY form. In the row, not a table
-- of its own: a row per transition cost two B-tree inserts (six transitions a task), and
-- the row is rewritten on each UPDATE anyway. Measured with 20,000 tasks: 87 against 191
-- us of writer CPU per task. (Comments stay out of CREATE TABLE: SQLite keeps its text,
-- and ALTER TABLE ... DROP COLUMN cannot rewrite a column with a comment after it.)
-- stdout, stderr: the tail of what the latest finished attempt wrote (NULL: nothing
-- stored). Last in the row, so reading the columns before them never reads their
-- overflow pages; written by their own UPDATE (_UPDATE_OUTPUT), as the attempt ends,
-- after which a task rarely moves (a retried one rewrites them with each UPDATE).
CREATE INDEX IF NOT EXISTS tasks_state ON tasks (state);
CREATE INDEX IF NOT EXISTS tasks_endpoint ON tasks (endpoint_id);
CREATE INDEX IF NOT EXISTS tasks_submit ON tasks (submit_time, task_id);
-- Partial: a task outside any group costs no index insert. A query uses it only if its
-- WHERE has the term `group_id != ''` word for word (_IN_GROUP).
CREATE INDEX IF NOT EXISTS tasks_group ON tasks (group_id) WHERE group_id != '';
-- Arguments live apart from the row the lifecycle rewrites on every transition: SQLite
-- rewrites a whole row on UPDATE, so a 1 MB argument in `tasks` made each of a task's
-- ~7 updates copy 1 MB (measured: 3 ms per update instead of ~10 us).
CREATE TABLE IF NOT EXISTS task_args (task_id TEXT PRIMARY KEY, args BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS functions (
    function_id TEXT PRIMARY KEY,
    payload BLOB NOT NULL,
    owner TEXT NOT NULL,
    register_time REAL NOT NULL
);
-- The purge's candidates, read without touching the payloads (register_time sits after
-- the payload in the row, so reading it from the table reads the whole payload).
CREATE INDEX IF NOT EXISTS functions_registered ON functions (register_time, function_id);
-- Client request ids (RequestRow): a repeat of a request answers as the first one did.
CREATE TABLE IF NOT EXISTS requests (
    request_id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    method TEXT NOT NULL,
    digest TEXT NOT NULL,
    task_ids TEXT NOT NULL,
    time REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS requests_time ON requests (time);
CREATE TABLE IF NOT EXISTS endpoints (
    endpoint_id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    owner TEXT NOT NULL,
    register_time REAL NOT NULL,
    UNIQUE (owner, name)
);
-- A group (GroupRow) and its mutable state (GroupStateRow): status is a GroupStatus
-- value, counts are the DAG tasks by status, cancel_mode a CancelMode value or NULL.
CREATE TABLE IF NOT EXISTS groups (
    group_id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    owner TEXT NOT NULL,
    endpoint_id TEXT NOT NULL,
    submit_time REAL NOT NULL,
    fail_fast INTEGER NOT NULL,
    timeout REAL NOT NULL,
    status TEXT NOT NULL,
    pending INTEGER NOT NULL,
    n_succeeded INTEGER NOT NULL,
    n_failed INTEGER NOT NULL,
    n_skipped INTEGER NOT NULL,
    n_cancelled INTEGER NOT NULL,
    n_none INTEGER NOT NULL,
    cancel_mode TEXT,
    timed_out INTEGER NOT NULL,
    settle_time REAL
);
CREATE INDEX IF NOT EXISTS groups_submit ON groups (submit_time, group_id);
-- The members live apart from the row each group state rewrites, as task_args do
-- (measured, a 10,000-task group: 257 us per state UPDATE with the members in the row,
-- 48 us without). JSON, one array per GroupMember in its field order:
-- [name, task_id, is_finally, [run_after...], [inputs...], [[input, operator, [values...]]...]].
CREATE TABLE IF NOT EXISTS group_members (group_id TEXT PRIMARY KEY, members TEXT NOT NULL);
-- Users and their tokens (server/_auth.py): a token is hl_<token_id>_<secret>, and only
-- sha256(secret) is kept (the secret is 256 random bits: a plain hash is enough).
-- endpoint is set for an agent token (the one endpoint it serves); revoked is a time.
CREATE TABLE IF NOT EXISTS users (name TEXT PRIMARY KEY, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS tokens (
    token_id TEXT PRIMARY KEY,
    user TEXT NOT NULL,
    secret_hash TEXT NOT NULL,
    endpoint TEXT,
    created REAL NOT NULL,
    revoked REAL
);
-- Users besides the owner who may submit to an endpoint.
CREATE TABLE IF NOT EXISTS endpoint_shares (
    endpoint_id TEXT NOT NULL,
    user TEXT NOT NULL,
    PRIMARY KEY (endpoint_id, user)
);
-- An endpoint's function allow-list, as its agents' last hello gave it (no row: none,
-- every function runs): function ids joined by ',' ('' allows none). A table of its own,
-- so a file of this schema version made before it gets it at open.
CREATE TABLE IF NOT EXISTS endpoint_allow_lists (
    endpoint_id TEXT PRIMARY KEY,
    function_ids TEXT NOT NULL
);
"""

_INSERT_TASK = f"INSERT INTO tasks ({TASK_COLUMNS}, history) VALUES ({', '.join('?' * 29)})"
_INSERT_ARGS = "INSERT INTO task_args (task_id, args) VALUES (?, ?)"
# Selects list the columns in TaskRow's order, so task_row reads them by position.
_ARGS = "(SELECT args FROM task_args a WHERE a.task_id = tasks.task_id)"
_SELECT_TASKS = "SELECT " + TASK_COLUMNS.replace(" owner,", f" {_ARGS}, owner,") + " FROM tasks"
# get_tasks: with the output (and the history after it when asked).
_SELECT_TASKS_OUTPUT = _SELECT_TASKS.replace(" FROM tasks", ", stdout, stderr FROM tasks")
_SELECT_TASKS_HISTORY = _SELECT_TASKS_OUTPUT.replace(" FROM tasks", ", history FROM tasks")
# list_tasks leaves payloads behind; `x''` for a stored result keeps "has a result" visible.
_SELECT_TASKS_LIGHT = (
    "SELECT "
    + TASK_COLUMNS.replace(" owner,", " x'', owner,").replace(
        " result,", " CASE WHEN result IS NULL THEN NULL ELSE x'' END,"
    )
    + " FROM tasks"
)
# Only the columns the lifecycle changes; args, function, owner... are fixed at submit.
_UPDATE_TASK = (
    "UPDATE tasks SET state = ?, attempt = ?, start_time = ?, settle_time = ?, held_from = ?,"
    " result = ?, error_type = ?, error_message = ?, error_traceback = ?, error_kind = ?,"
    " raised_count = ?, system_failures = ?, payload_purged = ?, skip_reason = ?,"
    " interrupted = ?, history = history || ? WHERE task_id = ?"
)
_APPEND_HISTORY = "UPDATE tasks SET history = history || ? WHERE task_id = ?"
_UPDATE_OUTPUT = "UPDATE tasks SET stdout = ?, stderr = ? WHERE task_id = ?"
_IN_GROUP = "group_id != ''"
"""The partial index tasks_group's own condition: a query over tasks by group names it."""
# A new group is pending with no counts until a state row of its batch says otherwise.
_INSERT_GROUP = (
    "INSERT INTO groups (group_id, name, owner, endpoint_id, submit_time, fail_fast, timeout,"
    " status, pending, n_succeeded, n_failed, n_skipped, n_cancelled, n_none, cancel_mode,"
    f" timed_out, settle_time) VALUES (?, ?, ?, ?, ?, ?, ?, '{GroupStatus.NONE.value}', 1,"
    " 0, 0, 0, 0, 0, NULL, 0, NULL)"
)
_INSERT_MEMBERS = "INSERT INTO group_members (group_id, members) VALUES (?, ?)"
_UPDATE_GROUP = (
    "UPDATE groups SET status = ?, pending = ?, n_succeeded = ?, n_failed = ?, n_skipped = ?,"
    " n_cancelled = ?, n_none = ?, cancel_mode = ?, timed_out = ?, settle_time = ?"
    " WHERE group_id = ?"
)
# Selects list GroupRow's columns, then GroupStateRow's, so group_rows reads them by
# position; the light one (list_groups) leaves the members behind.
_MEMBERS = "(SELECT members FROM group_members m WHERE m.group_id = groups.group_id)"
_SELECT_GROUPS = f"SELECT {GROUP_COLUMNS}, {_MEMBERS} FROM groups"
_SELECT_GROUPS_LIGHT = f"SELECT {GROUP_COLUMNS}, NULL FROM groups"
# The tasks of every pending group, found through the partial index tasks_group.
_PENDING_GROUP_TASKS = (
    "SELECT t.group_id, t.task_id, t.state, t.skip_reason FROM groups g"
    f" JOIN tasks t ON t.group_id = g.group_id WHERE g.pending = 1 AND t.{_IN_GROUP}"
)
_UNSETTLED = f"state IN ({', '.join('?' * len(UNSETTLED))})"
# A restart reads the few columns of a plain task (most of a long queue), leaving its
# args in the store until its dispatch, with a rowid marking the other tasks, whose
# whole rows it then reads by rowid. No ORDER BY: the scheduler orders its queues itself.
# Measured, a million queued tasks: sorting them took 2 s, their args 2.5 s, all 29
# columns against these 14 about 1 s.
_SELECT_UNSETTLED = (
    f"SELECT {PLAIN_COLUMNS}, NULL, CASE WHEN {PLAIN} THEN NULL ELSE rowid END"
    f" FROM tasks WHERE {_UNSETTLED}"
)
_SELECT_BY_ROWID = f"{_SELECT_TASKS} WHERE rowid IN "
_ROWIDS_PER_SELECT = 500
"""Ids (or rowids) a select names at most: under SQLite's oldest limit of 999 parameters
a statement."""


# A queued item: (operation, argument, future). operation None applies a WriteBatch;
# _CLOSE stops the thread; anything else is called as op(conn, arg) inside the transaction.
_Op = Callable[[sqlite3.Connection, Any], Any]
_CLOSE: _Op = lambda conn, arg: None  # a unique marker, never called
Outcome = tuple["asyncio.Future[Any]", Any, BaseException | None]


def settle(outcomes: list[Outcome]) -> None:
    """Resolve a group's futures on the loop (a caller may have cancelled its own)."""
    for fut, result, exc in outcomes:
        if fut.done():
            continue
        if exc is None:
            fut.set_result(result)
        else:
            fut.set_exception(exc)


class _Checkpointer:
    """Copies the WAL back into the database file, mostly on a thread and connection of
    its own.

    SQLite's default runs a checkpoint inside the commit that fills the WAL past 1,000
    pages: that commit waits for the copy. Measured, lone tasks one after another: every
    ~70th took 15-20 ms more, which made the round trip's p99 21.6 ms (10.8 with
    checkpoints out of the commits). So the writer's connection never checkpoints on its
    own (``wal_autocheckpoint=0``), and:

    - this thread runs a PASSIVE checkpoint, which never blocks the writer, at most
      ``interval`` seconds after a commit, or at once after ``commits`` of them: it
      copies the bulk of the WAL while commits go on;
    - such a checkpoint cannot finish while commits keep adding to the WAL, and SQLite
      starts the WAL over only after one that did. So the writer, once this thread has
      copied, finishes the job itself between two groups (``committed``): when its queue
      is empty, or at the latest after ``patience`` copies (a server never idle), with a
      PASSIVE checkpoint of the few pages since, and its next commit starts the WAL over.

    A checkpoint that fails or finds the database busy only leaves the WAL longer until
    the next one.
    """

    def __init__(
        self, path: str, interval: float = 0.5, commits: int = 100, patience: int = 8
    ) -> None:
        self._path = path
        self._interval = interval
        self._commits = commits
        self._patience = patience
        self._since = 0  # commits since the last wake-up; the writer thread's alone
        self._dirty = False
        self._copies = 0  # this thread's checkpoints since the writer last finished one
        self._wake = threading.Event()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="heartline-checkpoint", daemon=True)
        self.checkpoints = 0
        """Checkpoints this thread ran (for tests)."""

    def start(self) -> None:
        self._thread.start()

    def committed(self, conn: sqlite3.Connection, idle: bool) -> None:
        """Called by the writer thread after each group (``idle``: nothing queued)."""
        self._dirty = True
        self._since += 1
        if self._since >= self._commits:
            self._since = 0
            self._wake.set()
        if self._copies and (idle or self._copies >= self._patience):
            try:
                busy, log, copied = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
            except sqlite3.Error as exc:
                _log.warning("store: checkpoint failed: %r", exc)
                return
            if not busy and log == copied:
                self._copies = 0

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        conn = sqlite3.connect(self._path, isolation_level=None, check_same_thread=True)
        try:
            while not self._stopping:
                self._wake.wait(self._interval)
                self._wake.clear()
                if self._dirty and not self._stopping:
                    self._dirty = False
                    try:
                        conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                    except sqlite3.Error as exc:
                        _log.warning("store: checkpoint failed: %r", exc)
                        continue
                    self.checkpoints += 1
                    self._copies += 1
        finally:
            conn.close()


class SqliteStore(Store):
    """The embedded store: one SQLite file (WAL), one writer thread, group commit.

    Args:
        path: the database file; created with its schema when missing.
    """

    open_errors = (*Store.open_errors, sqlite3.Error)

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self._path = os.fspath(path)
        self._state = StoreState.NEW
        self._queue: queue.SimpleQueue[tuple[_Op | None, Any, asyncio.Future[Any]]]
        self._queue = queue.SimpleQueue()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._closed: asyncio.Future[None] | None = None
        # get_request reads on a connection of its own, on a thread of its own: WAL lets
        # it read committed rows while the writer holds its transaction open.
        self._reader = concurrent.futures.ThreadPoolExecutor(1, "heartline-store-reader")
        self._reader_conn = threading.local()
        self._checkpointer = _Checkpointer(self._path)
        # Kept by the writer thread, copied by a metrics scrape: both under the lock
        # (once per group commit, so it costs nothing next to the commit).
        self._figures_lock = threading.Lock()
        self._commit_seconds = Buckets(COMMIT_SECONDS_BOUNDS)
        self._batch_items = Buckets(BATCH_ITEMS_BOUNDS)

    # -- lifecycle (event loop side) --------------------------------------------------

    async def open(self) -> None:
        if self._state is not StoreState.NEW:
            raise RuntimeError(f"store is {self._state.value}; a store opens once")
        self._loop = asyncio.get_running_loop()
        ready: asyncio.Future[None] = self._loop.create_future()
        self._thread = threading.Thread(
            target=self._run, args=(ready,), name="heartline-store", daemon=True
        )
        self._thread.start()
        await ready
        self._state = StoreState.OPEN

    async def close(self) -> None:
        if self._state is StoreState.NEW:
            self._state = StoreState.CLOSED
            return
        if self._state is StoreState.OPEN:
            # Refuse new work first, so the close marker is the last item queued.
            self._state = StoreState.CLOSING
            assert self._loop is not None
            self._closed = self._loop.create_future()
            self._queue.put((_CLOSE, None, self._closed))
        if self._closed is not None:
            await asyncio.shield(self._closed)
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
        if self._state is not StoreState.CLOSED:
            self._state = StoreState.CLOSED
            await asyncio.get_running_loop().run_in_executor(self._reader, self._close_reader)
            await asyncio.to_thread(self._reader.shutdown)

    def write(self, batch: WriteBatch) -> asyncio.Future[None]:
        return self._submit(None, batch)

    def _submit(self, op: _Op | None, arg: Any) -> asyncio.Future[Any]:
        """Queue ``op(conn, arg)`` (None: apply the WriteBatch ``arg``) behind everything
        queued before it; its future resolves once its group commits. Tests queue their
        own ops (tests/store_kit.py), as with PostgresStore."""
        if self._state is not StoreState.OPEN:
            raise StoreClosedError(f"store {self._path} is {self._state.value}")
        assert self._loop is not None
        fut: asyncio.Future[Any] = self._loop.create_future()
        self._queue.put((op, arg, fut))
        return fut

    # -- reads (event loop side) ------------------------------------------------------

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
        where: list[str] = []
        params: list[Any] = []
        if states is not None:
            if not states:
                return []
            where.append(f"state IN ({', '.join('?' * len(states))})")
            params.extend(TaskState(s).value for s in states)
        if endpoint_id is not None:
            where.append("endpoint_id = ?")
            params.append(endpoint_id)
        if owner is not None:
            where.append("owner = ?")
            params.append(owner)
        if after is not None:
            where.append("(submit_time, task_id) < (?, ?)")
            params.extend(after)
        sql = _SELECT_TASKS_LIGHT
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY submit_time DESC, task_id DESC LIMIT ?"
        params.append(limit)
        return await self._submit(_select_tasks, (sql, params))

    async def load_unsettled(self) -> list[TaskRecord]:
        return await self._submit(_select_unsettled, None)

    async def get_args(self, task_ids: Sequence[str]) -> dict[str, bytes]:
        return await self._submit(_get_args, list(dict.fromkeys(task_ids)))

    async def release_memory(self) -> None:
        await self._submit(_execute, ("PRAGMA shrink_memory", ()))

    async def load_results(
        self, task_ids: Sequence[str]
    ) -> dict[str, tuple[TaskState, bytes | None]]:
        return await self._submit(_load_results, list(dict.fromkeys(task_ids)))

    async def get_group(self, group_id: str) -> tuple[GroupRow, GroupStateRow] | None:
        sql = f"{_SELECT_GROUPS} WHERE group_id = ?"
        rows = await self._submit(_select_groups, (sql, (group_id,)))
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
        where: list[str] = []
        params: list[Any] = []
        if owner is not None:
            where.append("owner = ?")
            params.append(owner)
        if pending_only:
            where.append("pending = 1")
        if after is not None:
            where.append("(submit_time, group_id) < (?, ?)")
            params.extend(after)
        sql = _SELECT_GROUPS_LIGHT
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY submit_time DESC, group_id DESC LIMIT ?"
        params.append(limit)
        return await self._submit(_select_groups, (sql, params))

    async def load_pending_groups(
        self,
    ) -> list[tuple[GroupRow, GroupStateRow, dict[str, tuple[TaskState, SkipReason | None]]]]:
        return await self._submit(_load_pending_groups, None)

    async def get_function(self, function_id: str) -> FunctionRow | None:
        sql = (
            "SELECT function_id, payload, owner, register_time FROM functions WHERE function_id = ?"
        )
        rows = await self._submit(_select, (sql, (function_id,)))
        return FunctionRow(*rows[0]) if rows else None

    async def function_tails(self, function_ids: Sequence[str], size: int) -> dict[str, bytes]:
        return await self._submit(_function_tails, (list(dict.fromkeys(function_ids)), size))

    async def function_size(self, function_id: str) -> int | None:
        sql = "SELECT length(payload) FROM functions WHERE function_id = ?"
        rows = await self._submit(_select, (sql, (function_id,)))
        return int(rows[0][0]) if rows else None

    async def function_bytes_by_owner(self, owner: str | None = None) -> dict[str, int]:
        where, params = ("WHERE owner = ?", (owner,)) if owner is not None else ("", ())
        sql = f"SELECT owner, SUM(length(payload)) FROM functions {where} GROUP BY owner"
        return {o: int(total) for o, total in await self._submit(_select, (sql, params))}

    async def get_request(self, request_id: str) -> RequestRow | None:
        if self._state is not StoreState.OPEN:
            raise StoreClosedError(f"store {self._path} is {self._state.value}")
        loop = asyncio.get_running_loop()
        rows = await loop.run_in_executor(self._reader, self._read_request, request_id)
        if not rows:
            return None
        rid, owner, method, digest, task_ids, when = rows[0]
        return RequestRow(
            rid, owner, method, digest, tuple(filter(None, task_ids.split(","))), when
        )

    async def get_endpoint(self, endpoint_id: str) -> EndpointRow | None:
        sql = "SELECT endpoint_id, name, owner, register_time FROM endpoints WHERE endpoint_id = ?"
        rows = await self._submit(_select, (sql, (endpoint_id,)))
        return EndpointRow(*rows[0]) if rows else None

    async def get_endpoint_by_name(self, name: str, owner: str) -> EndpointRow | None:
        sql = (
            "SELECT endpoint_id, name, owner, register_time FROM endpoints"
            " WHERE owner = ? AND name = ?"
        )
        rows = await self._submit(_select, (sql, (owner, name)))
        return EndpointRow(*rows[0]) if rows else None

    async def list_endpoints(self, owner: str | None = None) -> list[EndpointRow]:
        sql = "SELECT endpoint_id, name, owner, register_time FROM endpoints"
        params: tuple[Any, ...] = ()
        if owner is not None:
            sql += " WHERE owner = ?"
            params = (owner,)
        rows = await self._submit(_select, (sql + " ORDER BY owner, name", params))
        return [EndpointRow(*r) for r in rows]

    async def count_by_state(self, owner: str | None = None) -> dict[TaskState, int]:
        sql = "SELECT state, count(*) FROM tasks"
        params: tuple[Any, ...] = ()
        if owner is not None:
            sql += " WHERE owner = ?"
            params = (owner,)
        rows = await self._submit(_select, (sql + " GROUP BY state", params))
        counts = dict.fromkeys(TaskState, 0)
        counts.update((TaskState(state), n) for state, n in rows)
        return counts

    async def purge_results(
        self, settled_before: float, keep_functions: Collection[str] = ()
    ) -> int:
        return await self._submit(_purge, (settled_before, frozenset(keep_functions)))

    # Users, tokens and shares are rare writes: each is a small op of its own on the
    # writer thread's queue (a WriteBatch is the scheduler's), committed in its group.

    async def create_token(self, row: TokenRow, secret_hash: str) -> None:
        await self._submit(_create_token, (row, secret_hash))

    async def list_tokens(self, user: str | None = None) -> list[TokenRow]:
        sql = f"SELECT {_TOKEN_COLUMNS} FROM tokens"
        params: tuple[Any, ...] = ()
        if user is not None:
            sql += " WHERE user = ?"
            params = (user,)
        rows = await self._submit(_select, (sql + " ORDER BY created, token_id", params))
        return [TokenRow(*r) for r in rows]

    async def revoke_token(self, token_id: str, when: float) -> TokenRow | None:
        return await self._submit(_revoke_token, (token_id, when))

    async def load_tokens(self) -> tuple[list[str], list[tuple[TokenRow, str]]]:
        return await self._submit(_load_tokens, None)

    async def share_endpoint(self, endpoint_id: str, user: str) -> None:
        sql = "INSERT OR IGNORE INTO endpoint_shares (endpoint_id, user) VALUES (?, ?)"
        await self._submit(_execute, (sql, (endpoint_id, user)))

    async def load_shares(self) -> list[tuple[str, str]]:
        sql = "SELECT endpoint_id, user FROM endpoint_shares ORDER BY endpoint_id, user"
        return [(e, u) for e, u in await self._submit(_select, (sql, ()))]

    async def set_allowed_functions(
        self, endpoint_id: str, function_ids: Collection[str] | None
    ) -> None:
        if function_ids is None:
            sql = "DELETE FROM endpoint_allow_lists WHERE endpoint_id = ?"
            params: tuple[Any, ...] = (endpoint_id,)
        else:
            sql = "INSERT OR REPLACE INTO endpoint_allow_lists (endpoint_id, function_ids) VALUES (?, ?)"
            params = (endpoint_id, ",".join(sorted(function_ids)))
        await self._submit(_execute, (sql, params))

    async def load_allowed_functions(self) -> dict[str, frozenset[str]]:
        sql = "SELECT endpoint_id, function_ids FROM endpoint_allow_lists"
        return {
            e: frozenset(filter(None, ids.split(",")))
            for e, ids in await self._submit(_select, (sql, ()))
        }

    def describe(self) -> str:
        return self._path

    def figures(self) -> StoreFigures:
        with self._figures_lock:
            commit_seconds = self._commit_seconds.copy()
            batch_items = self._batch_items.copy()
        return StoreFigures(commit_seconds, batch_items, self._queue.qsize())

    # -- the reader thread (get_request) ----------------------------------------------

    def _read_request(self, request_id: str) -> list[tuple[Any, ...]]:
        conn = getattr(self._reader_conn, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self._path, isolation_level=None, check_same_thread=True)
            conn.execute("PRAGMA query_only=ON")
            conn.execute("PRAGMA busy_timeout=10000")
            self._reader_conn.conn = conn
        sql = (
            "SELECT request_id, owner, method, digest, task_ids, time FROM requests"
            " WHERE request_id = ?"
        )
        return conn.execute(sql, (request_id,)).fetchall()

    def _close_reader(self) -> None:
        conn = getattr(self._reader_conn, "conn", None)
        if conn is not None:
            conn.close()
            self._reader_conn.conn = None

    # -- the writer thread ------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        # isolation_level=None: we issue BEGIN/COMMIT/SAVEPOINT ourselves.
        conn = sqlite3.connect(self._path, isolation_level=None, check_same_thread=True)
        try:
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if mode != "wal":
                raise sqlite3.OperationalError(f"{self._path}: cannot use WAL (got {mode!r})")
            conn.execute("PRAGMA synchronous=NORMAL")  # see the module docstring
            conn.execute("PRAGMA busy_timeout=10000")  # e.g. an operator's sqlite3 shell
            conn.execute("PRAGMA temp_store=MEMORY")
            conn.execute("PRAGMA wal_autocheckpoint=0")  # the checkpointer's (_Checkpointer)
            conn.execute("PRAGMA cache_size=-65536")  # 64 MiB
            conn.execute("PRAGMA journal_size_limit=67108864")  # WAL shrinks back after checkpoints
            conn.executescript(f"BEGIN IMMEDIATE; {_META} COMMIT;")
            _migrate(conn, self._path)
            conn.executescript(f"BEGIN IMMEDIATE; {_SCHEMA} COMMIT;")
        except BaseException:
            conn.close()
            raise
        return conn

    def _run(self, ready: asyncio.Future[None]) -> None:
        loop = self._loop
        assert loop is not None
        try:
            conn = self._connect()
        except BaseException as exc:  # noqa: BLE001 - handed to open()'s caller
            loop.call_soon_threadsafe(settle, [(ready, None, exc)])
            return
        self._checkpointer.start()
        loop.call_soon_threadsafe(settle, [(ready, None, None)])
        while True:
            items = [self._queue.get()]
            try:
                while len(items) < MAX_GROUP:
                    items.append(self._queue.get_nowait())
            except queue.Empty:
                pass
            closing = next((i for i, item in enumerate(items) if item[0] is _CLOSE), None)
            outcomes = self._apply_group(conn, items if closing is None else items[:closing])
            self._checkpointer.committed(conn, self._queue.empty())
            if closing is not None:
                self._checkpointer.stop()
                try:
                    conn.close()
                    closed: BaseException | None = None
                except Exception as exc:  # noqa: BLE001 - handed to close()'s caller
                    closed = exc
                outcomes.append((items[closing][2], None, closed))
            try:
                loop.call_soon_threadsafe(settle, outcomes)
            except RuntimeError:
                # The loop is closed: nobody is left to hear these outcomes.
                _log.warning("store: event loop closed; %d outcomes dropped", len(outcomes))
            if closing is not None:
                return

    def _apply_group(self, conn: sqlite3.Connection, items: list[Any]) -> list[Outcome]:
        """Apply ``items`` in one transaction; return their outcomes (never raises)."""
        outcomes: list[Outcome] = []
        if not items:
            return outcomes
        updates = Updates()
        started = time.perf_counter()
        try:
            conn.execute("BEGIN IMMEDIATE")
            for op, arg, fut in items:
                if op is not None:
                    # A read or purge must see every update queued before it.
                    _flush(conn, updates)
                outcomes.append((fut, *_apply_one(conn, op, arg, updates)))
            _flush(conn, updates)
            self._commit(conn)
        except Exception as exc:  # noqa: BLE001 - handed to every future of the group
            _log.error("store: transaction of %d items failed: %r", len(items), exc)
            try:
                conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass  # SQLite may have rolled back already
            # Reads of this group may have seen writes that are now gone: fail them too.
            return [(fut, None, exc) for _, _, fut in items]
        finally:
            elapsed = time.perf_counter() - started
            with self._figures_lock:
                self._commit_seconds.observe(elapsed)
                self._batch_items.observe(len(items))
        return outcomes

    def _commit(self, conn: sqlite3.Connection) -> None:
        """COMMIT the group's transaction: a method, so tests can count commits or make
        one fail (tests/store_kit.py; PostgresStore has its own)."""
        conn.execute("COMMIT")


def _migrate_4_to_5(conn: sqlite3.Connection) -> None:
    """History moves from the ``transitions`` table into ``tasks.history``."""
    conn.execute("ALTER TABLE tasks ADD COLUMN history TEXT NOT NULL DEFAULT ''")
    # The same form as histories writes, oldest first (rowids grow with insertion).
    conn.execute(
        "UPDATE tasks SET history = coalesce((SELECT group_concat(record, '') FROM ("
        "  SELECT coalesce(from_state, '') || char(31) || to_state || char(31)"
        "   || replace(replace(cause, char(30), ' '), char(31), ' ') || char(31)"
        "   || printf('%.6f', time) || char(31) || attempt || char(30) AS record"
        "  FROM transitions t WHERE t.task_id = tasks.task_id ORDER BY t.id)), '')"
    )
    conn.execute("DROP TABLE transitions")


def _migrate_5_to_6(conn: sqlite3.Connection) -> None:
    """Tasks keep the tail of their latest attempt's stdout and stderr."""
    conn.execute("ALTER TABLE tasks ADD COLUMN stdout TEXT")
    conn.execute("ALTER TABLE tasks ADD COLUMN stderr TEXT")


_MIGRATIONS: dict[int, Callable[[sqlite3.Connection], None]] = {
    4: _migrate_4_to_5,
    5: _migrate_5_to_6,
}
"""version -> the step that upgrades a store of that version to the next one."""


def _migrate(conn: sqlite3.Connection, path: str) -> None:
    """Upgrade the store to SCHEMA_VERSION, one version a transaction, or refuse it."""
    while True:
        (text,) = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        version = int(text)
        if version == SCHEMA_VERSION:
            return
        if version > SCHEMA_VERSION:
            raise sqlite3.DatabaseError(
                f"{path}: schema version {version} was written by a newer heartline; this"
                f" one reads up to {SCHEMA_VERSION}: upgrade heartline to open it"
            )
        step = _MIGRATIONS.get(version)
        if step is None:
            raise sqlite3.DatabaseError(
                f"{path}: schema version {version} is too old to upgrade; this heartline"
                f" upgrades versions {min(_MIGRATIONS)} to {SCHEMA_VERSION - 1}"
            )
        _log.warning("store: upgrading %s from schema %d to %d", path, version, version + 1)
        conn.execute("BEGIN IMMEDIATE")
        try:
            step(conn)
            conn.execute(
                "UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(version + 1),)
            )
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise


def _apply_one(
    conn: sqlite3.Connection, op: _Op | None, arg: Any, updates: Updates
) -> tuple[Any, BaseException | None]:
    """Apply one item under its own savepoint, so its failure undoes only itself."""
    conn.execute("SAVEPOINT item")
    try:
        if op is None:
            result = None
            changes = _apply_batch(conn, arg)
        else:
            result = op(conn, arg)
    except Exception as exc:  # noqa: BLE001 - handed to the item's own future
        conn.execute("ROLLBACK TO item")
        conn.execute("RELEASE item")
        return None, exc
    conn.execute("RELEASE item")
    if op is None:
        updates.add(changes)
    return result, None


def _flush(conn: sqlite3.Connection, updates: Updates) -> None:
    tasks, outputs, history, groups = updates.take()
    if tasks:
        conn.executemany(_UPDATE_TASK, tasks)
    if outputs:
        conn.executemany(_UPDATE_OUTPUT, outputs)
    if history:
        conn.executemany(_APPEND_HISTORY, history)
    if groups:
        conn.executemany(_UPDATE_GROUP, groups)


def _apply_batch(conn: sqlite3.Connection, batch: WriteBatch) -> Changes:
    """Insert the batch's rows; return its task updates, the history it appends to tasks
    it did not insert, its group states and its outputs, applied by the caller (after
    every insert of the group, before any read)."""
    # A new task's own transitions ride in its INSERT; the rest wait for the UPDATEs.
    history = histories(batch.transitions) if batch.transitions else {}
    if batch.functions:
        conn.executemany(
            "INSERT OR IGNORE INTO functions (function_id, payload, owner, register_time)"
            " VALUES (?, ?, ?, ?)",
            [(f.function_id, f.payload, f.owner, f.register_time) for f in batch.functions],
        )
    if batch.endpoints:
        conn.executemany(
            "INSERT OR REPLACE INTO endpoints (endpoint_id, name, owner, register_time)"
            " VALUES (?, ?, ?, ?)",
            [(e.endpoint_id, e.name, e.owner, e.register_time) for e in batch.endpoints],
        )
    if batch.new_groups:
        conn.executemany(_INSERT_GROUP, map(group_params, batch.new_groups))
        conn.executemany(_INSERT_MEMBERS, map(members_json, batch.new_groups))
    if batch.new_tasks:
        conn.executemany(
            _INSERT_TASK, [task_params(r, history.pop(r.task_id, "")) for r in batch.new_tasks]
        )
        conn.executemany(_INSERT_ARGS, [(r.task_id, r.args) for r in batch.new_tasks])
    if batch.requests:
        # OR IGNORE: the server looked the id up before it made the request's changes, so
        # a clash is impossible; if one came anyway, failing the batch would stop the server.
        conn.executemany(
            "INSERT OR IGNORE INTO requests (request_id, owner, method, digest, task_ids, time)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            [(r.request_id, r.owner, r.method, r.digest, ",".join(r.task_ids), r.time)
             for r in batch.requests],
        )  # fmt: skip
    return changes(batch, history)


def _select(conn: sqlite3.Connection, arg: tuple[str, Sequence[Any]]) -> list[tuple[Any, ...]]:
    sql, params = arg
    return conn.execute(sql, params).fetchall()


def _select_tasks(conn: sqlite3.Connection, arg: tuple[str, Sequence[Any]]) -> list[TaskRow]:
    sql, params = arg
    return [task_row(c) for c in conn.execute(sql, params)]


def _select_unsettled(conn: sqlite3.Connection, _: None) -> list[TaskRecord]:
    """``load_unsettled``: plain tasks from their few columns, the others whole."""
    records = Records()
    others: list[int] = []

    def plain(rows: Iterable[tuple[Any, ...]]) -> Iterator[tuple[Any, ...]]:
        for c in rows:
            if c[15] is None:
                yield c
            else:
                others.append(c[15])

    records.add_plain(plain(conn.execute(_SELECT_UNSETTLED, UNSETTLED)))
    for i in range(0, len(others), _ROWIDS_PER_SELECT):
        chunk = others[i : i + _ROWIDS_PER_SELECT]
        records.add(conn.execute(f"{_SELECT_BY_ROWID}({', '.join('?' * len(chunk))})", chunk))
    return records.records


def _get_args(conn: sqlite3.Connection, task_ids: list[str]) -> dict[str, bytes]:
    found: dict[str, bytes] = {}
    for i in range(0, len(task_ids), _ROWIDS_PER_SELECT):
        chunk = task_ids[i : i + _ROWIDS_PER_SELECT]
        sql = (
            f"SELECT task_id, args FROM task_args WHERE task_id IN ({', '.join('?' * len(chunk))})"
        )
        found.update(conn.execute(sql, chunk))
    return found


def _get_tasks(
    conn: sqlite3.Connection, arg: tuple[list[str], bool]
) -> dict[str, tuple[TaskRow, list[TransitionRow]]]:
    task_ids, include_history = arg
    found: dict[str, tuple[TaskRow, list[TransitionRow]]] = {}
    for i in range(0, len(task_ids), _MAX_VARS):
        chunk = task_ids[i : i + _MAX_VARS]
        marks = ", ".join("?" * len(chunk))
        select = _SELECT_TASKS_HISTORY if include_history else _SELECT_TASKS_OUTPUT
        for c in conn.execute(f"{select} WHERE task_id IN ({marks})", chunk):
            found[c[0]] = (task_row(c), history_rows(c[0], c[31]) if include_history else [])
    return found


def _load_results(
    conn: sqlite3.Connection, task_ids: list[str]
) -> dict[str, tuple[TaskState, bytes | None]]:
    found: dict[str, tuple[TaskState, bytes | None]] = {}
    for i in range(0, len(task_ids), _MAX_VARS):
        chunk = task_ids[i : i + _MAX_VARS]
        marks = ", ".join("?" * len(chunk))
        sql = f"SELECT task_id, state, result FROM tasks WHERE task_id IN ({marks})"
        for task_id, state, result in conn.execute(sql, chunk):
            found[task_id] = (STATE_OF[state], result)
    return found


def _function_tails(conn: sqlite3.Connection, arg: tuple[list[str], int]) -> dict[str, bytes]:
    function_ids, size = arg
    found: dict[str, bytes] = {}
    for i in range(0, len(function_ids), _MAX_VARS):
        chunk = function_ids[i : i + _MAX_VARS]
        marks = ", ".join("?" * len(chunk))
        # substr of a blob counts bytes; a negative start counts from its end.
        sql = (
            f"SELECT function_id, substr(payload, -?) FROM functions WHERE function_id IN ({marks})"
        )
        found.update(conn.execute(sql, [size, *chunk]))
    return found


def _select_groups(
    conn: sqlite3.Connection, arg: tuple[str, Sequence[Any]]
) -> list[tuple[GroupRow, GroupStateRow]]:
    sql, params = arg
    return [group_rows(c) for c in conn.execute(sql, params)]


def _load_pending_groups(
    conn: sqlite3.Connection, arg: None
) -> list[tuple[GroupRow, GroupStateRow, dict[str, tuple[TaskState, SkipReason | None]]]]:
    groups = conn.execute(
        f"{_SELECT_GROUPS} WHERE pending = 1 ORDER BY submit_time, group_id"
    ).fetchall()
    if not groups:
        return []
    tasks: dict[str, dict[str, tuple[TaskState, SkipReason | None]]] = {c[0]: {} for c in groups}
    for group_id, task_id, state, skip in conn.execute(_PENDING_GROUP_TASKS):
        tasks[group_id][task_id] = (STATE_OF[state], None if skip is None else SKIP_OF[skip])
    return [(*group_rows(c), tasks[c[0]]) for c in groups]


def _execute(conn: sqlite3.Connection, arg: tuple[str, Sequence[Any]]) -> None:
    sql, params = arg
    conn.execute(sql, params)


_TOKEN_COLUMNS = "token_id, user, endpoint, created, revoked"
"""TokenRow's columns, in its order (never the hash)."""


def _create_token(conn: sqlite3.Connection, arg: tuple[TokenRow, str]) -> None:
    row, secret_hash = arg
    conn.execute(
        "INSERT OR IGNORE INTO users (name, created) VALUES (?, ?)", (row.user, row.created)
    )
    conn.execute(
        "INSERT INTO tokens (token_id, user, secret_hash, endpoint, created, revoked)"
        " VALUES (?, ?, ?, ?, ?, ?)",
        (row.token_id, row.user, secret_hash, row.endpoint, row.created, row.revoked),
    )


def _revoke_token(conn: sqlite3.Connection, arg: tuple[str, float]) -> TokenRow | None:
    token_id, when = arg
    conn.execute(
        "UPDATE tokens SET revoked = ? WHERE token_id = ? AND revoked IS NULL", (when, token_id)
    )
    found = conn.execute(
        f"SELECT {_TOKEN_COLUMNS} FROM tokens WHERE token_id = ?", (token_id,)
    ).fetchone()
    return None if found is None else TokenRow(*found)


def _load_tokens(
    conn: sqlite3.Connection, arg: None
) -> tuple[list[str], list[tuple[TokenRow, str]]]:
    users = [name for (name,) in conn.execute("SELECT name FROM users ORDER BY name")]
    sql = f"SELECT {_TOKEN_COLUMNS}, secret_hash FROM tokens WHERE revoked IS NULL"
    return users, [(TokenRow(*c[:5]), c[5]) for c in conn.execute(sql)]


def _purge(conn: sqlite3.Connection, arg: tuple[float, frozenset[str]]) -> int:
    settled_before, keep_functions = arg
    states = [s.value for s in TERMINAL_STATES]
    due = f"state IN ({', '.join('?' * len(states))}) AND settle_time < ? AND payload_purged = 0"
    params = (*states, settled_before)
    conn.execute(
        f"UPDATE task_args SET args = x'' WHERE task_id IN (SELECT task_id FROM tasks WHERE {due})",
        params,
    )
    cur = conn.execute(
        "UPDATE tasks SET result = NULL, stdout = NULL, stderr = NULL, payload_purged = 1"
        f" WHERE {due}",
        params,
    )
    functions = _purge_functions(conn, settled_before, keep_functions)
    if functions:
        _log.info("event=purged-functions functions=%d", functions)
    # Request ids are kept as long as payloads are: a repeat older than that is a new request.
    conn.execute("DELETE FROM requests WHERE time < ?", (settled_before,))
    return cur.rowcount


def _purge_functions(
    conn: sqlite3.Connection, registered_before: float, keep: frozenset[str]
) -> int:
    """Delete functions registered before the cutoff that no task with a payload uses.

    Runs after the tasks' purge, in the same transaction. One pass over the tasks table
    (no index on function_id: it would cost every submit an index insert of a random
    key, about as much again as the row itself, for the sake of an hourly purge), and
    only when there is a candidate at all; the payload purge above visits every
    terminal task as well.
    """
    candidates = {
        fid
        for (fid,) in conn.execute(
            "SELECT function_id FROM functions WHERE register_time < ?", (registered_before,)
        )
    }
    candidates -= keep
    if not candidates:
        return 0
    for (fid,) in conn.execute("SELECT function_id FROM tasks WHERE payload_purged = 0"):
        candidates.discard(fid)
    conn.executemany("DELETE FROM functions WHERE function_id = ?", [(f,) for f in candidates])
    return len(candidates)
