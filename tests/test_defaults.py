"""One home for defaults: every part reads heartline._defaults, none keeps its own copy."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from heartline import _defaults
from heartline._cli import main
from heartline.client._base import MAX_IDS as CLIENT_MAX_IDS
from heartline.client._base import resolve_address, resolve_metadata
from heartline.endpoint import AgentConfig
from heartline.server import ServerConfig
from heartline.server._scheduler import SchedulerConfig
from heartline.server._task_service import MAX_IDS as SERVER_MAX_IDS


def test_server_agent_client_and_cli_share_the_defaults(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for var in (_defaults.ENV_ADDRESS, _defaults.ENV_TOKEN):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv(_defaults.ENV_HOME, str(tmp_path))
    server = ServerConfig()
    agent = AgentConfig(name="x")
    assert server.listen == agent.server == resolve_address(None) == _defaults.DEFAULT_ADDRESS
    assert server.heartbeat_interval == _defaults.HEARTBEAT_INTERVAL
    assert server.effective_heartbeat_timeout == SchedulerConfig().heartbeat_timeout
    assert server.effective_db == str(tmp_path / "heartline.db")
    assert agent.home == tmp_path == _defaults.home()
    assert agent.token is None and resolve_metadata(None) is None
    assert server.max_payload == SchedulerConfig().max_payload == _defaults.MAX_PAYLOAD
    assert CLIENT_MAX_IDS == SERVER_MAX_IDS == _defaults.MAX_IDS


def test_the_environment_reaches_every_part(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(_defaults.ENV_ADDRESS, "127.0.0.1:6000")
    monkeypatch.setenv(_defaults.ENV_TOKEN, "s3cret")
    agent = AgentConfig(name="x")
    assert agent.server == resolve_address(None) == "127.0.0.1:6000"
    assert agent.token == "s3cret"
    assert resolve_metadata(None) == _defaults.bearer_metadata("s3cret") == (
        ("authorization", "Bearer s3cret"),
    )


def test_cli_help_shows_the_shared_defaults() -> None:
    out = CliRunner().invoke(main, ["server", "--help"], terminal_width=200).output
    assert _defaults.DEFAULT_ADDRESS in out
    assert f"{_defaults.HEARTBEAT_INTERVAL}" in out


@pytest.mark.parametrize(("workers", "prefetch", "expected"), [(2, None, 32), (16, None, 64), (2, 0, 0), (2, 5, 5)])
def test_an_agent_prefetches_per_worker_with_a_floor(workers: int, prefetch: int | None, expected: int) -> None:
    agent = AgentConfig(name="x", workers=workers, prefetch=prefetch)
    assert agent.effective_prefetch == expected
    out = CliRunner().invoke(main, ["endpoint", "start", "--help"], terminal_width=200).output
    assert f"{_defaults.PREFETCH_PER_WORKER} x workers, at least {_defaults.MIN_PREFETCH}" in out


def test_agents_keep_more_functions_than_the_server_counts_on() -> None:
    # The rule that lets a dispatch leave a function out (see heartline/_defaults.py).
    for assumed, kept in (
        (_defaults.STREAM_SENT_FUNCTIONS, _defaults.AGENT_FUNCTION_CACHE),
        (_defaults.WORKER_SENT_FUNCTIONS, _defaults.WORKER_FUNCTION_CACHE),
    ):
        assert kept[0] >= assumed[0] and kept[1] >= assumed[1]


def test_the_output_limit_is_one_default_for_server_agent_and_cli() -> None:
    from heartline.endpoint._workers import WorkerPool

    pool = WorkerPool(1, None)  # type: ignore[arg-type]
    assert ServerConfig().max_output == pool.max_output == _defaults.MAX_OUTPUT
    for command in ("server", "up"):
        out = CliRunner().invoke(main, [command, "--help"], terminal_width=200).output
        assert f"[default: {_defaults.MAX_OUTPUT}]" in out, out
    assert ServerConfig(max_output=0).max_output == 0  # keeps none
    with pytest.raises(ValueError, match="max_output must be an int of at least 0"):
        ServerConfig(max_output=-1)
