"""The ``heartline`` command line: server, endpoint agents, and operator commands."""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import click

from heartline import _defaults
from heartline._cli_ops import register_operator_commands


def _setup_logging(verbose: int) -> None:
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(
        level=level,
        stream=sys.stderr,
        format="ts=%(asctime)s level=%(levelname)s logger=%(name)s msg=%(message)s",
    )


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="heartline")
def main() -> None:
    """heartline: run Python functions on your own machines, through one server."""


def _server_config(listen, db, heartbeat_interval, heartbeat_timeout, insecure_no_auth, validate, metrics=None):  # noqa: ANN001, ANN202
    from heartline.server import ServerConfig

    return ServerConfig(
        listen=listen,
        db_path=Path(db) if db else None,
        heartbeat_interval=heartbeat_interval,
        heartbeat_timeout=heartbeat_timeout,
        insecure_no_auth=insecure_no_auth,
        validate=validate,
        metrics=metrics,
    )


def _metrics_address(ctx, param, value):  # noqa: ANN001, ANN202
    """Check a --metrics HOST:PORT before anything starts (binding it is checked later)."""
    from heartline._figures import parse_address

    if value is not None:
        try:
            parse_address(value)
        except ValueError as exc:
            raise click.BadParameter(str(exc)) from None
    return value


_metrics_option = click.option(
    "--metrics", default=None, metavar="HOST:PORT", callback=_metrics_address,
    help="Serve Prometheus metrics on http://HOST:PORT/metrics (port 0: a free port, logged with -v).",
)  # fmt: skip


_server_options = [
    click.option("--listen", default=_defaults.DEFAULT_ADDRESS, show_default=True, help="HOST:PORT to serve on."),
    click.option("--db", type=click.Path(dir_okay=False), help="SQLite store [default: $HEARTLINE_HOME/heartline.db]."),
    click.option("--heartbeat-interval", type=float, default=_defaults.HEARTBEAT_INTERVAL, show_default=True, help="Seconds between agent heartbeats."),
    click.option("--heartbeat-timeout", type=float, default=None, help=f"Seconds of silence before an agent is lost [default: {_defaults.HEARTBEAT_TIMEOUT_FACTOR} x interval]."),
    click.option("--insecure-no-auth", is_flag=True, help="Allow a non-loopback address without authentication."),
    click.option("-v", "--verbose", count=True, help="Log more (-v info, -vv debug)."),
    click.option("--validate", is_flag=True, hidden=True, help="Check scheduler invariants every step (tests)."),
    _metrics_option,
]


def _with_server_options(fn):  # noqa: ANN001, ANN202
    for option in reversed(_server_options):
        fn = option(fn)
    return fn


@main.command()
@_with_server_options
def server(listen, db, heartbeat_interval, heartbeat_timeout, insecure_no_auth, verbose, validate, metrics) -> None:  # noqa: ANN001
    """Run the heartline server."""
    from heartline.server import run_server

    _setup_logging(verbose)
    config = _server_config(listen, db, heartbeat_interval, heartbeat_timeout, insecure_no_auth, validate, metrics)

    def ready(address: str, metrics: str | None) -> None:
        click.echo(f"heartline server listening on {address} (store {config.effective_db_path})")
        if metrics:
            click.echo(f"metrics at http://{metrics}/metrics")

    sys.exit(run_server(config, ready))


@main.command()
@_with_server_options
@click.option("--workers", type=int, default=None, help="Worker processes of the local endpoint [default: CPU count].")
def up(listen, db, heartbeat_interval, heartbeat_timeout, insecure_no_auth, verbose, validate, metrics, workers) -> None:  # noqa: ANN001
    """Run the server and one local endpoint named 'local', in one command."""
    from heartline.server import run_server

    _setup_logging(verbose)
    config = dataclasses.replace(
        _server_config(listen, db, heartbeat_interval, heartbeat_timeout, insecure_no_auth, validate, metrics),
        endpoints=("local",),  # registered before health says SERVING: a submit is queued at once
    )
    agent: list[subprocess.Popen] = []
    # The agent watches the read end of this pipe; the write end closes when this process
    # ends, however it ends (SIGKILL included), and the agent then stops.
    lifeline, keep_open = os.pipe()

    def ready(address: str, metrics: str | None) -> None:
        cmd = [
            sys.executable, "-m", "heartline", "endpoint", "start", "--name", "local",
            "--server", address, "--stop-with-fd", str(lifeline),
        ]  # fmt: skip
        if workers:
            cmd += ["--workers", str(workers)]
        # The agent gets its own process group so a Ctrl-C reaches it only through us.
        agent.append(subprocess.Popen(cmd, start_new_session=True, pass_fds=(lifeline,)))
        os.close(lifeline)
        click.echo(f"heartline server listening on {address} (store {config.effective_db_path})")
        if metrics:
            click.echo(f"metrics at http://{metrics}/metrics")
        click.echo("endpoint 'local' starting; submit with Executor(endpoint=\"local\"). Ctrl-C stops both.")

    def stop_agent() -> None:
        # The agent goes first, so it does not see its server vanish.
        for proc in agent:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    try:
        code = run_server(config, ready, stop_agent)
    finally:
        stop_agent()
        os.close(keep_open)
    sys.exit(code)


@main.group()
def endpoint() -> None:
    """Endpoint agents."""


@endpoint.command("start")
@click.option("--name", required=True, help="Endpoint name (registered on first start).")
@click.option("--server", "server_address", default=None, help=f"Server HOST:PORT [default: ${_defaults.ENV_ADDRESS} or {_defaults.DEFAULT_ADDRESS}].")
@click.option("--workers", type=int, default=None, help="Worker processes [default: CPU count].")
@click.option("--prefetch", type=int, default=None, help="Tasks queued beyond free workers [default: 4 x workers].")
@click.option("--token", default=None, envvar=_defaults.ENV_TOKEN, help="Bearer token.")
@click.option("-v", "--verbose", count=True, help="Log more (-v info, -vv debug).")
@click.option("--stop-with-fd", type=int, default=None, hidden=True, help="Stop when this pipe closes (heartline up).")
@_metrics_option
def endpoint_start(name, server_address, workers, prefetch, token, verbose, stop_with_fd, metrics) -> None:  # noqa: ANN001
    """Start an endpoint agent that runs tasks on this machine."""
    from heartline.endpoint import AgentConfig, run_agent

    _setup_logging(verbose)
    kwargs = {"name": name, "token": token, "metrics": metrics}
    kwargs["server"] = _defaults.address(server_address)
    if workers is not None:
        if workers < 1:
            raise click.BadParameter("must be at least 1", param_hint="--workers")
        kwargs["workers"] = workers
    if prefetch is not None:
        if prefetch < 0:
            raise click.BadParameter("must be at least 0", param_hint="--prefetch")
        kwargs["prefetch"] = prefetch
    sys.exit(run_agent(AgentConfig(**kwargs), stop_with_fd=stop_with_fd))


register_operator_commands(main)
