"""Server configuration: one frozen dataclass with documented defaults."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from heartline import _defaults
from heartline.server._liveness import HeartbeatPolicy


@dataclass(frozen=True, slots=True)
class ServerConfig:
    listen: str = _defaults.DEFAULT_ADDRESS
    """HOST:PORT to listen on; port 0 picks a free port (reported by ``Server.start``)."""
    db: str | os.PathLike[str] | None = None
    """The store: the path of a SQLite file, or a ``postgresql://user:pass@host:port/db``
    URL (several servers may share one PostgreSQL database: one serves, the others stand
    by, server/_pgstore.py). None means ``$HEARTLINE_HOME/heartline.db``."""
    heartbeat_interval: float = _defaults.HEARTBEAT_INTERVAL
    """Seconds between agent heartbeats (sent to agents in the welcome)."""
    heartbeat_timeout: float | None = None
    """Seconds of silence after which an agent is lost; None means 3 x heartbeat_interval."""
    heartbeat_rate: float = _defaults.HEARTBEAT_RATE
    """Heartbeats a second asked of all agents together, at most: with more than
    ``heartbeat_rate x heartbeat_interval`` agents, each is asked for a longer interval
    (and given a timeout as many times longer)."""
    max_payload: int = _defaults.MAX_PAYLOAD
    """Largest function, argument or result payload, in bytes (RESOURCE_EXHAUSTED above)."""
    max_output: int = _defaults.MAX_OUTPUT
    """Bytes of a task's stdout, and as many of its stderr, kept with the task: the last
    ones, after a ``[... N bytes cut ...]`` line when there was more (agents are told in
    the welcome, and the server cuts what it receives past it); 0 keeps none."""
    max_function_bytes: int = _defaults.MAX_FUNCTION_BYTES_PER_USER
    """Most bytes of stored functions per user (RESOURCE_EXHAUSTED past it)."""
    max_watches_per_user: int = _defaults.MAX_WATCHES_PER_USER
    """Most WatchTasks streams one user may hold open at once; one more is refused
    RESOURCE_EXHAUSTED until one closes. With auth off every caller is one user,
    ``anonymous``."""
    max_pending_per_user: int = _defaults.MAX_PENDING_PER_USER
    """Most pending tasks (not yet settled: held, waiting, queued or on an agent) one
    user may have; a SubmitTasks, SubmitGroup or ResubmitTasks that would pass it is
    refused whole (RESOURCE_EXHAUSTED) and stores nothing. A retry of ERRORED tasks is
    not refused, so a user may pass it by the tasks retried."""
    errored_retention: float = 7 * 24 * 3600.0
    """Seconds an ERRORED task waits for a retry before it becomes FAILED."""
    result_retention: float = 7 * 24 * 3600.0
    """Seconds a settled task keeps its payloads before they are purged."""
    endpoints: tuple[str, ...] = ()
    """Endpoint names registered at start, before health says SERVING (``heartline up``:
    ``("local",)``), so a submit to them is queued even before their agent connects."""
    insecure_no_auth: bool = False
    """Turn authentication off: every caller is ``anonymous``, an admin, and needs no
    token. Also allows listening on a non-loopback address that way."""
    token_file: Path | None = None
    """Where the first start (a store without users) writes the admin token, mode 0600;
    None means ``$HEARTLINE_HOME/token``, where clients, agents and the CLI look."""
    metrics: str | None = None
    """``HOST:PORT`` to serve Prometheus metrics on (path ``/metrics``); None serves
    none. Port 0 picks a free port (logged as ``event=metrics-listening``)."""
    validate: bool = False
    """Check the scheduler's invariants after every step (tests)."""
    tls_cert: Path | None = None
    """PEM file of the server's certificate (chain); with ``tls_key`` the server serves
    TLS only. None serves plaintext."""
    tls_key: Path | None = None
    """PEM file of the private key of ``tls_cert`` (unencrypted)."""
    tls_client_ca: Path | None = None
    """PEM file of the CA(s) whose client certificates the server accepts; given, every
    client must present one (mutual TLS). Needs ``tls_cert`` and ``tls_key``."""

    def __post_init__(self) -> None:
        for name, least in (
            ("max_watches_per_user", 1),
            ("max_pending_per_user", 1),
            ("max_output", 0),
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"{name} must be an int of at least {least}, not {value!r}")
        if not self.heartbeat_rate > 0:
            raise ValueError(f"heartbeat_rate must be above 0, not {self.heartbeat_rate!r}")

    @property
    def tls_mode(self) -> str:
        """How clients connect: ``"plaintext"``, ``"TLS"`` or ``"mutual TLS"``."""
        if self.tls_cert is None:
            return "plaintext"
        return "TLS" if self.tls_client_ca is None else "mutual TLS"

    @property
    def effective_heartbeat_timeout(self) -> float:
        return _defaults.heartbeat_timeout(self.heartbeat_interval, self.heartbeat_timeout)

    @property
    def heartbeats(self) -> HeartbeatPolicy:
        return HeartbeatPolicy(
            self.heartbeat_interval, self.effective_heartbeat_timeout, self.heartbeat_rate
        )

    @property
    def effective_token_file(self) -> Path:
        return Path(self.token_file) if self.token_file else _defaults.token_file()

    @property
    def effective_db(self) -> str:
        """``db``, or the default SQLite file's path."""
        return os.fspath(self.db) if self.db else str(_defaults.home() / "heartline.db")
