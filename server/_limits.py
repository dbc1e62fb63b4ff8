"""The server's file-descriptor limit: raised at start, watched while it runs.

Every agent and every client holds one TCP connection to the server, one descriptor each,
and gRPC answers a server out of descriptors only with its own ``File descriptor limit
reached. Retrying.`` once a second, while new connections time out. The common soft
limit is 1,024, far under what one server carries; the hard limit is what an
unprivileged process may raise it to, so the server raises it at start
(:func:`raise_fd_limit`), says what it runs with, and warns once when its open
descriptors near the limit (:class:`FdWatch`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

RESERVED_FDS = 64
"""Descriptors the server keeps for itself (the store's files, listening sockets, gRPC's
own pipes, log files): the rest are for connections."""
_UNLIMITED_TARGET = 1 << 20
"""What to ask for where the hard limit is unlimited (the kernel caps it below that)."""


@dataclass(frozen=True)
class FdLimit:
    """The soft limit the server runs with, the hard one, and the soft one it found."""

    soft: int
    hard: int
    found: int

    @property
    def connections(self) -> int:
        """About how many connections (agents and clients together) the limit allows."""
        return max(0, self.soft - RESERVED_FDS)


def _finite(value: int) -> int:
    import resource

    return _UNLIMITED_TARGET if value == resource.RLIM_INFINITY else value


def raise_fd_limit() -> FdLimit | None:
    """Raise the soft RLIMIT_NOFILE to the hard limit; None where there is no such limit
    (not a Unix). Where the system refuses the hard limit itself (macOS caps it), the
    soft limit stays as it was. An unlimited value counts as ``_UNLIMITED_TARGET``."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not a Unix
        return None
    found, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    soft = _finite(found)
    if soft < _finite(hard):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (_finite(hard), hard))
            soft = _finite(hard)
        except (ValueError, OSError):
            pass
    return FdLimit(soft=soft, hard=_finite(hard), found=_finite(found))


def fd_soft_limit() -> int:
    """The soft RLIMIT_NOFILE now (``_UNLIMITED_TARGET`` where unlimited or unknown)."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not a Unix
        return _UNLIMITED_TARGET
    return _finite(resource.getrlimit(resource.RLIMIT_NOFILE)[0])


def open_fds() -> int | None:
    """How many descriptors this process has open; None where it cannot tell."""
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return None


class FdWatch:
    """Says once when the open descriptors pass ``high`` of the limit, and again only
    after they fell under ``low`` of it, so a server at the edge logs one line, not one
    a second."""

    def __init__(self, limit: int, high: float = 0.9, low: float = 0.8) -> None:
        self._high = int(limit * high)
        self._low = int(limit * low)
        self._limit = limit
        self._warned = False

    def check(self, used: int) -> str | None:
        """The warning to log for ``used`` open descriptors, or None."""
        if self._warned:
            if used < self._low:
                self._warned = False
            return None
        if used < self._high:
            return None
        self._warned = True
        return (
            f"event=fd-limit-near open={used} limit={self._limit}: new agents and clients "
            "will fail to connect at the limit; raise the hard limit (ulimit -Hn, "
            "systemd LimitNOFILE=) and restart the server"
        )
