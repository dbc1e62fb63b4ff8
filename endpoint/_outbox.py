"""Terminal reports the server has not acknowledged yet, kept on disk.

An agent that dies (or loses its server) with results in hand must not lose them: each
agent process appends its unacked terminal reports to its own log file under the
endpoint's folder, and appends a tombstone when the server acks one. The next agent
process of the endpoint adopts the logs of agents that are gone (their file lock is
free), and reports those results again; the server keeps the first terminal report of
an attempt and acks any later duplicate.

Records: one byte kind (``A`` add, ``K`` ack), four bytes big-endian length, payload (a
serialized StatusUpdate for ``A``; ``task_id NUL attempt`` for ``K``). Writes are not
fsynced: a killed process loses nothing the kernel has; only a machine crash can drop the
tail, and then the task simply runs again (execution is at least once).
"""

from __future__ import annotations

import fcntl
import logging
import struct
from collections.abc import Iterable, Mapping
from pathlib import Path

from heartline.v1 import endpoint_service_pb2 as pb

logger = logging.getLogger("heartline.endpoint")

_HEADER = struct.Struct(">cI")
# Past this size the log is rewritten with just the live reports, so an agent that is
# never idle (always some report unacked) still keeps a small file.
_COMPACT_AT = 16 * 1024 * 1024
Key = tuple[str, int]


class Outbox:
    """This agent's log of unacked terminal reports (see the module docstring)."""

    def __init__(self, folder: Path, agent_id: str) -> None:
        self._folder = folder
        self._path = folder / f"outbox-{agent_id}.log"
        self._file = None  # type: ignore[var-annotated]
        self._size = 0
        self._compact_at = _COMPACT_AT

    def open(self) -> dict[Key, pb.StatusUpdate]:
        """Create this agent's log (locked for its lifetime) and adopt orphaned ones.

        Returns:
            The adopted reports, which this agent now owns and must resend.
        """
        self._folder.mkdir(parents=True, exist_ok=True)
        self._file = open(self._path, "ab", buffering=0)  # noqa: SIM115 - held for life
        fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        adopted: dict[Key, pb.StatusUpdate] = {}
        for other in sorted(self._folder.glob("outbox-*.log")):
            if other == self._path:
                continue
            try:
                fh = open(other, "rb")  # noqa: SIM115 - closed by the with below
            except FileNotFoundError:
                continue  # another new agent adopted it first
            with fh:
                try:
                    fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # a live agent of this endpoint owns it
                adopted.update(_replay(fh.read()))
            other.unlink(missing_ok=True)
        self._file.truncate(0)  # a fresh agent id: nothing of ours is in it yet
        if adopted:
            logger.warning("event=outbox-adopted reports=%d", len(adopted))
            self.add(adopted.values())
        return adopted

    def add(self, updates: Iterable[pb.StatusUpdate]) -> None:
        """Append terminal reports (one write for the lot)."""
        chunks = []
        for update in updates:
            payload = update.SerializeToString()
            chunks.append(_HEADER.pack(b"A", len(payload)) + payload)
        self._write(chunks)

    def ack(self, keys: Iterable[Key], live: Mapping[Key, pb.StatusUpdate]) -> None:
        """Record acks; ``live`` is what is still unacked after them.

        With nothing live the log starts afresh; past _COMPACT_AT it is rewritten with
        just the live reports.
        """
        if self._file is None:
            return
        if not live or self._size > self._compact_at:
            self._file.truncate(0)
            self._size = 0
            self.add(live.values())
            # If the live reports alone are big, compact again only once the log has
            # doubled, not on every ack.
            self._compact_at = max(_COMPACT_AT, 2 * self._size)
            return
        chunks = []
        for task_id, attempt in keys:
            payload = f"{task_id}\0{attempt}".encode()
            chunks.append(_HEADER.pack(b"K", len(payload)) + payload)
        self._write(chunks)

    def _write(self, chunks: list[bytes]) -> None:
        if chunks and self._file is not None:
            data = b"".join(chunks)
            self._file.write(data)
            self._size += len(data)

    def close(self, *, keep: bool) -> None:
        """Close the log; remove it unless it still holds unacked reports (``keep``)."""
        if self._file is None:
            return
        self._file.close()
        self._file = None
        if not keep:
            self._path.unlink(missing_ok=True)


def _replay(data: bytes) -> dict[Key, pb.StatusUpdate]:
    live: dict[Key, pb.StatusUpdate] = {}
    offset = 0
    while offset + _HEADER.size <= len(data):
        kind, size = _HEADER.unpack_from(data, offset)
        offset += _HEADER.size
        payload = data[offset : offset + size]
        if len(payload) < size:
            break  # a torn tail: the write that was cut never counted
        offset += size
        if kind == b"A":
            update = pb.StatusUpdate.FromString(payload)
            live[(update.task_id, update.attempt)] = update
        elif kind == b"K":
            task_id, _, attempt = payload.decode().partition("\0")
            live.pop((task_id, int(attempt)), None)
    return live



