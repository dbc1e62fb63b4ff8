"""The server in-process: a real grpc.aio server on port 0 with a real SQLite store."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from heartline import AsyncClient, HeartlineError
from heartline.server import Server, ServerConfig


async def test_a_failed_commit_stops_the_server(tmp_path: Path) -> None:
    # Memory would be ahead of the store; only a restart from the store is safe.
    server = Server(ServerConfig(listen="127.0.0.1:0", db_path=tmp_path / "h.db", validate=True))
    await server.start()
    try:

        def fail(conn: sqlite3.Connection) -> None:
            raise sqlite3.OperationalError("disk I/O error")

        server.store._commit = fail  # type: ignore[method-assign]
        async with AsyncClient(server.address) as client:
            with pytest.raises(HeartlineError):
                await client.submit("anywhere", pow, 2, 3)
        assert server.failed.is_set()
    finally:
        await server.stop(grace=0)


async def test_a_clean_stop_is_not_a_failure(tmp_path: Path) -> None:
    server = Server(ServerConfig(listen="127.0.0.1:0", db_path=tmp_path / "h.db", validate=True))
    await server.start()
    await server.stop(grace=0)
    assert not server.failed.is_set()
