"""The one home of heartline's defaults and of the settings read from the environment.

Server, agent, client and CLI import these; none of them writes its own copy.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from heartline._tls import TLS

ENV_ADDRESS = "HEARTLINE_ADDRESS"
ENV_TOKEN = "HEARTLINE_TOKEN"
ENV_HOME = "HEARTLINE_HOME"
ENV_TLS_CA = "HEARTLINE_TLS_CA"
"""PEM file of the CA that clients, agents and the CLI trust the server's certificate by."""
ENV_TLS_CERT = "HEARTLINE_TLS_CERT"
"""PEM file of the client certificate they present to a mutual-TLS server."""
ENV_TLS_KEY = "HEARTLINE_TLS_KEY"
"""PEM file of that client certificate's private key."""
ENV_ENDPOINT_NAME = "HEARTLINE_ENDPOINT_NAME"
"""Set by the agent for its worker processes: the endpoint they serve, named in the error
of a module a task needs that is missing there."""

DEFAULT_ADDRESS = "127.0.0.1:50051"
"""Where the server listens, and where clients, agents and the CLI look for it."""

ENDPOINT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
"""A valid endpoint name (it also names the agent's folder, so it is a safe path part)."""
ENDPOINT_NAME_RULE = "use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"
FUNCTION_ID = re.compile(r"^[0-9a-f]{64}$")
"""A function id: the sha256 hex digest of the pickled function (RegisterFunction's answer,
``Client.register_function``'s return value)."""

HEARTBEAT_INTERVAL = 5.0
"""Seconds between agent heartbeats; the server sends its own value in the welcome."""
HEARTBEAT_TIMEOUT_FACTOR = 3
"""Silence of this many heartbeat intervals loses an agent, unless a timeout is given."""
HEARTBEAT_RATE = 200.0
"""Heartbeats a second a server asks of all its agents together, at most: past
``HEARTBEAT_RATE x heartbeat interval`` agents, each is asked to beat less often
(server/_liveness.py)."""
HELLO_TIMEOUT = 5.0
"""Seconds the server waits for an agent's hello on a new Connect stream, then closes it."""
HELLO_TAKEOVER_SILENCE = 2
"""A hello naming a connected agent's id is refused unless that agent's stream has been
silent this many heartbeat intervals (it missed a heartbeat: a cut the server has not
noticed yet); then the new stream takes over."""

RETRY_TIMEOUT = 60.0
"""Seconds a client call keeps trying while the server it reached is away (restarting)."""

PREFETCH_PER_WORKER = 4
"""An agent's default prefetch: this many tasks per worker (Celery's multiplier)..."""
MIN_PREFETCH = 32
"""...and never fewer than this. Short tasks need a deep pipe: an agent runs at most
workers + prefetch tasks at a time, so it finishes at most that many per round trip to
the server (a few ms under load). With 2 workers, 8 in flight capped an agent at about
1,600 no-op tasks/s, 32 at about 2,700, with 30% less CPU per task as every message
carries more (docs/PERFORMANCE.md). For an endpoint with several agents and long tasks,
a smaller ``--prefetch`` (0: only free workers) spreads them more evenly."""
MAX_PAYLOAD = 10 * 1024 * 1024
"""Largest function, arguments or result payload in bytes (SPEC section 6)."""
MAX_OUTPUT = 64 * 1024
"""Bytes of a task's stdout, and as many of its stderr, kept with the task: the last ones
(the server's ``--max-output``, sent to its agents in the welcome)."""
MAX_FUNCTION_BYTES_PER_USER = 1024 * 1024 * 1024
"""Most bytes of stored functions one user may have (RESOURCE_EXHAUSTED past it); a
function no kept task uses goes with the result retention's purge."""
MAX_IDS = 10_000
MAX_HISTORY_TASKS = 1_000
"""Most tasks one GetTasks or GetGroup answers with their histories (each task's history
is many rows to read and convert on the server's loop); the client asks in pages."""
"""Most task ids one request may name (GetTasks, WatchTasks, commands)."""
MAX_TASKS_PER_SUBMIT = 10_000
"""Most tasks in one SubmitTasks request, or in one group (DAG and finally tasks)."""
MAX_GROUP_NAME = 128
"""Longest group name, in characters."""
MAX_WATCHES_PER_USER = 256
"""Most WatchTasks streams one user may hold open at once (RESOURCE_EXHAUSTED past it).
A client holds one for its session, plus one per wait on a task or group it did not
submit itself."""
MAX_PENDING_PER_USER = 1_000_000
"""Most pending (queued, held, waiting or running) tasks one user may have; a submit
that would pass it is refused whole (RESOURCE_EXHAUSTED) and stores nothing."""
MAX_ALLOWED_FUNCTIONS = 10_000
"""Most function ids in an endpoint's allow-list (an agent's hello carries it)."""
ENDPOINT_CONFIG_FILE = "config.toml"
"""An endpoint's own settings, in its folder ``<home>/endpoints/<name>/``: so far
``allowed_functions = ["<function id>", ...]``, the function allow-list."""

# Caches of pickled functions (SPEC: bounded memory for long-running processes). The
# server remembers which functions each agent stream has been sent; the agent keeps at
# least as much as the server assumes it has (twice the count and the bytes), so a
# dispatch that leaves the function out always finds it on the agent. The same rule
# holds between an agent's worker pool and each worker process.
SERVER_FUNCTION_CACHE = (4096, 64 * 1024 * 1024)
"""(count, bytes) of the server's in-memory cache of pickled functions (the store has all).

Its bytes bound the server's memory for functions, however many are registered: a
register or a dispatch that misses it reads the store (see server/_core.py FunctionCache)."""
STREAM_SENT_FUNCTIONS = (1024, 64 * 1024 * 1024)
"""(count, bytes) of functions the server counts on one agent stream to still hold."""
AGENT_FUNCTION_CACHE = (2 * STREAM_SENT_FUNCTIONS[0], 2 * STREAM_SENT_FUNCTIONS[1])
"""(count, bytes) of pickled functions an agent keeps."""
WORKER_SENT_FUNCTIONS = (256, 32 * 1024 * 1024)
"""(count, bytes) of functions the pool counts on one worker process to still hold."""
WORKER_FUNCTION_CACHE = (2 * WORKER_SENT_FUNCTIONS[0], 2 * WORKER_SENT_FUNCTIONS[1])
"""(count, bytes of their payloads) of unpickled functions a worker process keeps."""


def address(explicit: str | None = None) -> str:
    """The server address: ``explicit``, else ``$HEARTLINE_ADDRESS``, else the default."""
    return explicit or os.environ.get(ENV_ADDRESS) or DEFAULT_ADDRESS


def token(explicit: str | None = None) -> str | None:
    """The bearer token: ``explicit``, else ``$HEARTLINE_TOKEN``, else the content of
    ``$HEARTLINE_HOME/token`` (the admin token a server's first start wrote), else none."""
    value = explicit or os.environ.get(ENV_TOKEN)
    if value:
        return value
    try:
        return token_file().read_text().strip() or None
    except OSError:  # none there, or not ours to read: as if there were none
        return None


def token_file() -> Path:
    """Where a server's first start writes the admin token: ``$HEARTLINE_HOME/token``."""
    return home() / "token"


def tls(explicit: TLS | bool | None = None) -> TLS | None:
    """How a client, agent or CLI connects: ``explicit`` (a :class:`~heartline.TLS`;
    ``True`` is ``TLS()``, the system's CAs; ``False`` is plaintext), else a TLS of
    ``$HEARTLINE_TLS_CA``, ``$HEARTLINE_TLS_CERT`` and ``$HEARTLINE_TLS_KEY`` when any is
    set, else None (plaintext)."""
    from heartline._tls import TLS

    if isinstance(explicit, TLS):
        return explicit
    if explicit is True:
        return TLS()
    if explicit is False:
        return None
    if explicit is not None:
        raise TypeError(f"tls must be a heartline.TLS, True, False or None, not {explicit!r}")
    ca, cert, key = (os.environ.get(n) or None for n in (ENV_TLS_CA, ENV_TLS_CERT, ENV_TLS_KEY))
    if ca is None and cert is None and key is None:
        return None
    return TLS(ca=ca, cert=cert, key=key)


def home() -> Path:
    """The state folder: ``$HEARTLINE_HOME``, else ``~/.heartline``."""
    value = os.environ.get(ENV_HOME)
    return Path(value).expanduser() if value else Path.home() / ".heartline"


def bearer_metadata(token_value: str | None) -> tuple[tuple[str, str], ...] | None:
    """Call metadata that carries a bearer token, or None without one."""
    return (("authorization", f"Bearer {token_value}"),) if token_value else None


def heartbeat_timeout(interval: float, timeout: float | None = None) -> float:
    """The silence after which an agent is lost: ``timeout``, else a multiple of ``interval``."""
    return timeout or HEARTBEAT_TIMEOUT_FACTOR * interval
