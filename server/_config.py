"""Server configuration: one frozen dataclass with documented defaults."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from heartline import _defaults


@dataclass(frozen=True, slots=True)
class ServerConfig:
    listen: str = _defaults.DEFAULT_ADDRESS
    """HOST:PORT to listen on; port 0 picks a free port (reported by ``Server.start``)."""
    db_path: Path | None = None
    """The SQLite store; None means ``$HEARTLINE_HOME/heartline.db``."""
    heartbeat_interval: float = _defaults.HEARTBEAT_INTERVAL
    """Seconds between agent heartbeats (sent to agents in the welcome)."""
    heartbeat_timeout: float | None = None
    """Seconds of silence after which an agent is lost; None means 3 x heartbeat_interval."""
    max_payload: int = _defaults.MAX_PAYLOAD
    """Largest function, argument or result payload, in bytes (RESOURCE_EXHAUSTED above)."""
    errored_retention: float = 7 * 24 * 3600.0
    """Seconds an ERRORED task waits for a retry before it becomes FAILED."""
    result_retention: float = 7 * 24 * 3600.0
    """Seconds a settled task keeps its payloads before they are purged."""
    endpoints: tuple[str, ...] = ()
    """Endpoint names registered at start, before health says SERVING (``heartline up``:
    ``("local",)``), so a submit to them is queued even before their agent connects."""
    insecure_no_auth: bool = False
    """Allow listening on a non-loopback address without authentication."""
    metrics: str | None = None
    """``HOST:PORT`` to serve Prometheus metrics on (path ``/metrics``); None serves
    none. Port 0 picks a free port (logged as ``event=metrics-listening``)."""
    validate: bool = False
    """Check the scheduler's invariants after every step (tests)."""

    @property
    def effective_heartbeat_timeout(self) -> float:
        return _defaults.heartbeat_timeout(self.heartbeat_interval, self.heartbeat_timeout)

    @property
    def effective_db_path(self) -> Path:
        return Path(self.db_path) if self.db_path else _defaults.home() / "heartline.db"
