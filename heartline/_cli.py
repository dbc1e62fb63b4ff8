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
from heartline._cli_admin import register_admin_commands
from heartline._cli_ops import (
    SERVER_HELP,
    SERVER_METAVAR,
    check_server,
    cli_tls,
    keep_in_context,
    register_operator_commands,
    tls_client_options,
)


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


def _server_config(listen, db, heartbeat_interval, heartbeat_timeout, insecure_no_auth, validate, metrics=None):
    from heartline.server import ServerConfig

    meta = click.get_current_context().meta
    tls = {f: Path(v) if (v := meta.get(f"heartline.{f}")) else None for f in _SERVER_TLS_FIELDS}
    limits = {f: v for f in _SERVER_LIMIT_FIELDS if (v := meta.get(f"heartline.{f}")) is not None}
    return ServerConfig(
        **tls,
        **limits,
        listen=listen,
        db=db or None,
        heartbeat_interval=heartbeat_interval,
        heartbeat_timeout=heartbeat_timeout,
        insecure_no_auth=insecure_no_auth,
        validate=validate,
        metrics=metrics,
    )


def _metrics_address(ctx, param, value):
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


# The server's TLS. The values wait in the click context for _server_config, so the
# options change no command's parameters; no environment variable sets them
# (HEARTLINE_TLS_CERT is a client's certificate).
_SERVER_TLS_FIELDS = ("tls_cert", "tls_key", "tls_client_ca")
_server_tls_options = [
    click.option("--tls-cert", type=click.Path(dir_okay=False), expose_value=False, callback=keep_in_context, help="Serve TLS with this certificate (PEM; with --tls-key)."),
    click.option("--tls-key", type=click.Path(dir_okay=False), expose_value=False, callback=keep_in_context, help="Private key (PEM) of --tls-cert."),
    click.option("--tls-client-ca", type=click.Path(dir_okay=False), expose_value=False, callback=keep_in_context, help="Require client certificates signed by this CA (PEM): mutual TLS."),
]  # fmt: skip

# Limits (SPEC section 6); like the TLS options, they wait in the click context.
_SERVER_LIMIT_FIELDS = ("max_watches_per_user", "max_pending_per_user", "max_output", "heartbeat_rate")
_server_limit_options = [
    click.option("--max-heartbeat-rate", "heartbeat_rate", type=click.FloatRange(min=0, min_open=True), default=None, metavar="PER_SECOND", expose_value=False, callback=keep_in_context, help=f"Heartbeats a second asked of all agents together, at most: with more agents than this times --heartbeat-interval, each is asked to beat less often, and its timeout grows as much [default: {_defaults.HEARTBEAT_RATE:g}]."),
    click.option("--max-output", type=click.IntRange(min=0), default=None, metavar="BYTES", expose_value=False, callback=keep_in_context, help=f"Bytes of each task's stdout, and as many of its stderr, kept with the task (the last ones; 0 keeps none) [default: {_defaults.MAX_OUTPUT}]."),
    click.option("--max-watches-per-user", type=click.IntRange(min=1), default=None, expose_value=False, callback=keep_in_context, help=f"Most watch streams one user may hold open [default: {_defaults.MAX_WATCHES_PER_USER}]."),
    click.option("--max-pending-per-user", type=click.IntRange(min=1), default=None, expose_value=False, callback=keep_in_context, help=f"Most pending tasks one user may have; a submit past it is refused [default: {_defaults.MAX_PENDING_PER_USER}]."),
]  # fmt: skip

_server_options = [
    click.option("--listen", default=_defaults.DEFAULT_ADDRESS, show_default=True, help="HOST:PORT to serve on."),
    click.option("--db", metavar="PATH|URL", help="The store: a SQLite file, or postgresql://USER:PASS@HOST:PORT/DB, which several servers may share (one serves, the others stand by and take over when it dies) [default: $HEARTLINE_HOME/heartline.db]."),
    click.option("--heartbeat-interval", type=float, default=_defaults.HEARTBEAT_INTERVAL, show_default=True, help="Seconds between agent heartbeats."),
    click.option("--heartbeat-timeout", type=float, default=None, help=f"Seconds of silence before an agent is lost [default: {_defaults.HEARTBEAT_TIMEOUT_FACTOR} x interval]."),
    click.option("--insecure-no-auth", is_flag=True, help="Turn authentication off: every caller is 'anonymous', an admin, and needs no token."),
    click.option("-v", "--verbose", count=True, help="Log more (-v info, -vv debug)."),
    click.option("--validate", is_flag=True, hidden=True, help="Check scheduler invariants every step (tests)."),
    _metrics_option,
    *_server_tls_options,
    *_server_limit_options,
]


def _with_server_options(fn):
    for option in reversed(_server_options):
        fn = option(fn)
    return fn


@main.command()
@_with_server_options
def server(listen, db, heartbeat_interval, heartbeat_timeout, insecure_no_auth, verbose, validate, metrics) -> None:
    """Run the heartline server.

    Each agent and each client holds one connection, one open file, to the server: at
    start it raises its soft limit of open files to the hard limit and logs how many
    connections that allows (a warning if few), and warns once when they near it.
    """
    from heartline.server import run_server
    from heartline.server._store import redacted

    _setup_logging(verbose)
    config = _server_config(listen, db, heartbeat_interval, heartbeat_timeout, insecure_no_auth, validate, metrics)

    def ready(address: str, metrics: str | None) -> None:
        click.echo(f"heartline server listening on {address}{_tls_note(config)} (store {redacted(config.effective_db)})")
        if metrics:
            click.echo(f"metrics at http://{metrics}/metrics")

    sys.exit(run_server(config, ready))


def _tls_note(config) -> str:
    return "" if config.tls_mode == "plaintext" else f" ({config.tls_mode})"


@main.command()
@_with_server_options
@click.option("--workers", type=int, default=None, help="Worker processes of the local endpoint [default: CPU count].")
@click.option("--tls-ca", type=click.Path(dir_okay=False), expose_value=False, callback=keep_in_context, help="CA (PEM) the local endpoint trusts --tls-cert by [default: --tls-cert itself, right for a self-signed one].")
def up(listen, db, heartbeat_interval, heartbeat_timeout, insecure_no_auth, verbose, validate, metrics, workers) -> None:
    """Run the server and one local endpoint named 'local', in one command."""
    from heartline.server import run_server
    from heartline.server._store import redacted

    _setup_logging(verbose)
    config = dataclasses.replace(
        _server_config(listen, db, heartbeat_interval, heartbeat_timeout, insecure_no_auth, validate, metrics),
        endpoints=("local",),  # registered before health says SERVING: a submit is queued at once
    )
    if config.tls_client_ca is not None:
        raise click.UsageError(
            "up does not take --tls-client-ca: its local endpoint has no client certificate. "
            "Run `heartline server ... --tls-client-ca F` and `heartline endpoint start "
            "--tls-ca F --tls-cert F --tls-key F` instead."
        )
    # Its agent trusts the server's certificate, and takes no TLS setting of a client's
    # from the environment (HEARTLINE_TLS_CA could name another server's CA).
    agent_ca = click.get_current_context().meta.get("heartline.tls_ca")
    if agent_ca is not None and config.tls_cert is None:
        raise click.UsageError("--tls-ca (what the local endpoint trusts) needs --tls-cert and --tls-key")
    agent_ca = agent_ca or config.tls_cert
    agent_tls = [] if agent_ca is None else ["--tls-ca", str(agent_ca)]
    agent_env = {k: v for k, v in os.environ.items() if not k.startswith("HEARTLINE_TLS_")}
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
        cmd += agent_tls
        # The agent gets its own process group so a Ctrl-C reaches it only through us.
        agent.append(subprocess.Popen(cmd, start_new_session=True, pass_fds=(lifeline,), env=agent_env))
        os.close(lifeline)
        click.echo(f"heartline server listening on {address}{_tls_note(config)} (store {redacted(config.effective_db)})")
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
@click.option("--server", "server_address", default=None, metavar=SERVER_METAVAR, callback=check_server, help=SERVER_HELP)
@click.option("--workers", type=int, default=None, help="Worker processes [default: CPU count].")
@click.option("--prefetch", type=int, default=None, help=f"Tasks queued beyond free workers [default: {_defaults.PREFETCH_PER_WORKER} x workers, at least {_defaults.MIN_PREFETCH}].")
@click.option("--executor", type=click.Choice(["process", "dask"]), default="process", show_default=True, help="Run tasks on worker processes here, or on a Dask distributed cluster (pip install 'heartline[dask]').")
@click.option("--dask-scheduler", default=None, metavar="tcp://HOST:PORT", help="With --executor dask: the Dask scheduler to use [default: a LocalCluster of --workers workers, started and stopped with the agent].")
@click.option("--token", default=None, envvar=_defaults.ENV_TOKEN, help="Bearer token.")
@click.option("-v", "--verbose", count=True, help="Log more (-v info, -vv debug).")
@click.option("--stop-with-fd", type=int, default=None, hidden=True, help="Stop when this pipe closes (heartline up).")
@click.option("--allow-function", "allow_functions", multiple=True, metavar="ID", help="Run only this function (its id, from Client.register_function); repeat for more. Replaces the allowed_functions of the endpoint's config file [default: that list, else every function].")
@_metrics_option
@tls_client_options
def endpoint_start(name, server_address, workers, prefetch, executor, dask_scheduler, token, verbose, stop_with_fd, allow_functions, metrics) -> None:
    """Start an endpoint agent that runs tasks on this machine.

    Its settings file, $HEARTLINE_HOME/endpoints/NAME/config.toml, may hold the
    function allow-list: allowed_functions = ["ID", ...].
    """
    from heartline._defaults import ENDPOINT_NAME, ENDPOINT_NAME_RULE
    from heartline.endpoint import AgentConfig, run_agent
    from heartline.endpoint._config import check_function_ids, read_endpoint_file

    _setup_logging(verbose)
    if not ENDPOINT_NAME.match(name):
        raise click.BadParameter(f"invalid endpoint name {name[:80]!r}: {ENDPOINT_NAME_RULE}", param_hint="--name")
    if dask_scheduler is not None and executor != "dask":
        raise click.BadParameter("is for --executor dask", param_hint="--dask-scheduler")
    if executor == "dask":
        try:
            import distributed  # noqa: F401 - only to say what is missing, here and now
        except ImportError:
            raise click.UsageError("--executor dask needs Dask distributed: pip install 'heartline[dask]'") from None
    kwargs = {"name": name, "token": token, "metrics": metrics, "tls": cli_tls(), "executor": executor, "dask_scheduler": dask_scheduler}
    if allow_functions:
        try:
            check_function_ids(allow_functions, "--allow-function")
        except ValueError as exc:
            raise click.BadParameter(str(exc).removeprefix("--allow-function: "), param_hint="--allow-function") from None
        kwargs["allowed_functions"] = frozenset(allow_functions)
    else:
        home = _defaults.home()
        try:
            kwargs["allowed_functions"] = read_endpoint_file(
                home / "endpoints" / name / _defaults.ENDPOINT_CONFIG_FILE
            ).allowed_functions
        except ValueError as exc:
            raise click.UsageError(str(exc)) from None
    kwargs["server"] = _defaults.address(server_address)
    if workers is not None:
        if workers < 1:
            raise click.BadParameter("must be at least 1", param_hint="--workers")
        kwargs["workers"] = workers
    if prefetch is not None:
        if prefetch < 0:
            raise click.BadParameter("must be at least 0", param_hint="--prefetch")
        kwargs["prefetch"] = prefetch
    try:
        config = AgentConfig(**kwargs)
    except ValueError as exc:  # the options are checked above: what is left is the environment's address
        raise click.UsageError(f"${_defaults.ENV_ADDRESS}: {exc}") from None
    sys.exit(run_agent(config, stop_with_fd=stop_with_fd))


register_operator_commands(main)
register_admin_commands(main)
