"""Server configuration: one frozen dataclass with documented defaults."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from heartline._serialize import DEFAULT_MAX_PAYLOAD

DEFAULT_LISTEN = "127.0.0.1:50051"


def heartline_home() -> Path:
    """``$HEARTLINE_HOME``, or ``~/.heartline``."""
    return Path(os.environ.get("HEARTLINE_HOME") or Path.home() / ".heartline").expanduser()


@dataclass(frozen=True, slots=True)
class ServerConfig:
    listen: str = DEFAULT_LISTEN
    """HOST:PORT to listen on; port 0 picks a free port (reported by ``Server.start``)."""
    db_path: Path | None = None
    """The SQLite store; None means ``$HEARTLINE_HOME/heartline.db``."""
    heartbeat_interval: float = 5.0
    """Seconds between agent heartbeats (sent to agents in the welcome)."""
    heartbeat_timeout: float | None = None
    """Seconds of silence after which an agent is lost; None means 3 x heartbeat_interval."""
    max_payload: int = DEFAULT_MAX_PAYLOAD
    """Largest function, argument or result payload, in bytes (RESOURCE_EXHAUSTED above)."""
    errored_retention: float = 7 * 24 * 3600.0
    """Seconds an ERRORED task waits for a retry before it becomes FAILED."""
    result_retention: float = 7 * 24 * 3600.0
    """Seconds a settled task keeps its payloads before they are purged."""
    insecure_no_auth: bool = False
    """Allow listening on a non-loopback address without authentication."""
    validate: bool = False
    """Check the scheduler's invariants after every step (tests)."""

    @property
    def effective_heartbeat_timeout(self) -> float:
        return self.heartbeat_timeout or 3 * self.heartbeat_interval

    @property
    def effective_db_path(self) -> Path:
        return Path(self.db_path) if self.db_path else heartline_home() / "heartline.db"
