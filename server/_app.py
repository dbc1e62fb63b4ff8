"""The server process: gRPC services, health and reflection, timers, shutdown."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from heartline._errors import HeartlineError
from heartline._tls import server_credentials
from heartline._watchdog import watch_loop
from heartline.server._admin_service import AdminServicer
from heartline.server._auth import ADMIN, ANONYMOUS, AuthInterceptor
from heartline.server._config import ServerConfig
from heartline.server._core import ServerCore
from heartline.server._decode import DecodeInterceptor
from heartline.server._endpoint_service import EndpointServicer
from heartline.server._gate import ActiveGate
from heartline.server._limits import FdLimit, raise_fd_limit
from heartline.server._memory import GcPauses, return_large_frees
from heartline.server._store import Store, is_database_url, store_for
from heartline.server._task_service import TaskServicer
from heartline.v1 import (
    admin_service_pb2,
    admin_service_pb2_grpc,
    endpoint_service_pb2,
    endpoint_service_pb2_grpc,
    task_service_pb2,
    task_service_pb2_grpc,
)

if TYPE_CHECKING:
    from heartline._metrics import MetricsServer

log = logging.getLogger("heartline.server")

# Room for a full batch of payloads at the limit is not the goal: a single message must fit
# one payload at the limit plus its envelope, so oversized payloads get our clear error.
_MESSAGE_HEADROOM = 16 * 1024 * 1024


class ConfigError(Exception):
    """The server cannot start with this configuration."""


def is_loopback(listen: str) -> bool:
    host = listen.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Server:
    """One heartline server: ``await start()`` then ``await wait_closed()`` or ``stop()``."""

    def __init__(self, config: ServerConfig, store: Store | None = None) -> None:
        self.config = config
        self.store = store or store_for(config.effective_db)
        self.core = ServerCore(config, self.store)
        self.port: int | None = None
        self._grpc: grpc.aio.Server | None = None
        self._gate = ActiveGate()
        self._timers: asyncio.Task[None] | None = None
        self._store_watch: asyncio.Task[None] | None = None
        self._stopped = asyncio.Event()
        self._metrics: MetricsServer | None = None
        self._gc_pauses: GcPauses | None = None

    @property
    def address(self) -> str:
        host = self.config.listen.rsplit(":", 1)[0]
        return f"{host}:{self.port}"

    async def start(self, before_serving: Callable[[str], object] | None = None) -> int:
        """Listen, open the store, restore unsettled tasks, serve; return the bound port.

        The port is bound first, behind a closed gate (server/_gate.py): while the store
        opens, health says NOT_SERVING and every other call is refused UNAVAILABLE. A
        PostgreSQL store's ``open()`` waits while another server is active on the same
        database (this one stands by), so this may take as long as that server lives.

        Health says SERVING only at the end, once the endpoints of ``config.endpoints``
        are registered and ``before_serving(address)`` (if given) has returned: a probe
        that sees SERVING may submit at once.
        """
        try:
            credentials = server_credentials(
                self.config.tls_cert, self.config.tls_key, self.config.tls_client_ca
            )
        except HeartlineError as err:
            raise ConfigError(str(err)) from None
        auth = not self.config.insecure_no_auth
        # A terminal report carries a result and the tail of two output streams.
        limit = self.config.max_payload + 2 * self.config.max_output + _MESSAGE_HEADROOM
        server = grpc.aio.server(
            # The gate goes first: nothing reaches auth or a service before the store is
            # open. DecodeInterceptor stays last: it runs after authentication (_decode.py).
            interceptors=[
                self._gate,
                AuthInterceptor(self.core.tokens if auth else None),
                DecodeInterceptor(),
            ],
            options=[
                ("grpc.max_receive_message_length", limit),
                ("grpc.max_send_message_length", -1),
                ("grpc.so_reuseport", 0),
                ("grpc.keepalive_permit_without_calls", 1),
                ("grpc.http2.min_ping_interval_without_data_ms", 5000),
            ],
        )
        task_service_pb2_grpc.add_TaskServiceServicer_to_server(TaskServicer(self.core), server)
        endpoint_service_pb2_grpc.add_EndpointServiceServicer_to_server(
            EndpointServicer(self.core), server
        )
        admin_service_pb2_grpc.add_AdminServiceServicer_to_server(AdminServicer(self.core), server)
        health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        # The servicer starts out SERVING for "": not before we say so.
        await health_servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        names = (
            task_service_pb2.DESCRIPTOR.services_by_name["TaskService"].full_name,
            endpoint_service_pb2.DESCRIPTOR.services_by_name["EndpointService"].full_name,
            admin_service_pb2.DESCRIPTOR.services_by_name["AdminService"].full_name,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        )
        reflection.enable_server_reflection(names, server)
        if credentials is None:
            self.port = server.add_insecure_port(self.config.listen)
        else:
            try:
                self.port = server.add_secure_port(self.config.listen, credentials)
            except RuntimeError:  # gRPC refused the credentials or the address
                self.port = 0
        if not self.port:
            raise ConfigError(f"cannot listen on {self.config.listen}")
        await server.start()
        self._grpc = server
        where = self.store.describe()
        self._gate.reason = f"the server at {self.address} is opening its store {where}"
        log.info("event=bound address=%s store=%s", self.address, where)
        try:
            if not is_database_url(self.config.effective_db):
                Path(self.config.effective_db).parent.mkdir(parents=True, exist_ok=True)
            await self.store.open()
        except self.store.open_errors as err:
            raise ConfigError(f"cannot open the store {where}: {err}") from err
        self._store_watch = asyncio.create_task(self._watch_store())
        await self.core.open()
        await self._start_metrics()
        if auth:
            await self.core.tokens.first_start(self.config.effective_token_file)
        for name in self.config.endpoints:
            # `heartline up`'s local endpoint: the admin's (its agent uses the admin token).
            await self.core.ensure_endpoint(name, ADMIN if auth else ANONYMOUS)
        self._timers = asyncio.create_task(self._run_timers())
        self._gate.open()
        log.info("listening on %s (%s)", self.address, self.config.tls_mode)
        if before_serving is not None:
            before_serving(self.address)
        for name in ("", *names[:3]):
            await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
        return self.port

    async def _watch_store(self) -> None:
        """Stop the server once its store can no longer serve it (PostgreSQL: the
        connection that held the leadership is gone, so a standby may be active now)."""
        reason = await self.store.wait_lost()
        log.critical("event=store-lost store=%s reason=%s", self.store.describe(), reason)
        self.core.failed.set()

    async def _run_timers(self) -> None:
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self.core.run_timers())
                tg.create_task(watch_loop())
        except Exception:
            # Without timers no lost agent is noticed: stop rather than serve half-blind.
            log.critical("event=timers-failed", exc_info=True)
            self.core.failed.set()

    async def _start_metrics(self) -> None:
        """Serve metrics if asked (after the restore, so the first scrape sees it)."""
        if self.config.metrics is None:
            return
        from heartline._metrics import MetricsError, MetricsServer
        from heartline.server._metrics import ServerCollector

        pauses = GcPauses()
        try:
            collector = ServerCollector(self.core, asyncio.get_running_loop(), pauses)
            self._metrics = MetricsServer.start(self.config.metrics, collector)
        except MetricsError as exc:
            await self.store.close()
            raise ConfigError(str(exc)) from None
        pauses.install()
        self._gc_pauses = pauses

    @property
    def metrics_address(self) -> str | None:
        """The bound ``HOST:PORT`` of the metrics endpoint, or None without one."""
        return self._metrics.address if self._metrics is not None else None

    async def stop(self, grace: float | None = 1.0) -> None:
        """Stop serving (waiting up to ``grace`` seconds for calls), flush the store."""
        if self._metrics is not None:
            await self._metrics.stop()
            self._metrics = None
        if self._gc_pauses is not None:
            self._gc_pauses.remove()
            self._gc_pauses = None
        if self._grpc is not None:
            await self._grpc.stop(grace)
            self._grpc = None
        for task in (self._timers, self._store_watch):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        self._timers = self._store_watch = None
        await self.store.close()
        self._stopped.set()

    async def wait_closed(self) -> None:
        await self._stopped.wait()

    @property
    def failed(self) -> asyncio.Event:
        """Set when the server must stop (a store write failed; see ServerCore.failed)."""
        return self.core.failed


async def serve(config: ServerConfig, ready=None, before_stop=None) -> bool:
    """Run a server until SIGINT or SIGTERM.

    ``ready(address, metrics_address)`` is called once it listens (the second is None
    without ``--metrics``), before health says SERVING (so what it
    starts, e.g. ``heartline up``'s agent, is under way by then); ``before_stop()`` (blocking, run in a
    thread) once a signal came, before the server stops. Returns False if the server
    stopped because it failed (see ServerCore.failed).
    """
    try:
        server = Server(config)
    except ImportError as err:  # --db postgresql://... without its driver
        raise ConfigError(str(err)) from None
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    # A standby waits inside start() for as long as the active server lives: a signal
    # must reach it there too.
    starting = asyncio.ensure_future(
        server.start(
            before_serving=None
            if ready is None
            else lambda address: ready(address, server.metrics_address)
        )
    )
    waits = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(server.failed.wait())]
    try:
        await asyncio.wait([starting, waits[0]], return_when=asyncio.FIRST_COMPLETED)
        if not starting.done():
            starting.cancel()
            await asyncio.gather(starting, return_exceptions=True)
            return True
        starting.result()  # a ConfigError goes to run_server
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        if before_stop is not None:
            await asyncio.to_thread(before_stop)
    finally:
        for wait in waits:
            wait.cancel()
        await server.stop(grace=2.0)
    return not server.failed.is_set()


def run_server(config: ServerConfig, ready=None, before_stop=None) -> int:
    """Blocking entry of ``heartline server``: uvloop, signals, exit code."""
    return_large_frees()  # the process's big payloads go back to the system (_memory.py)
    _log_fd_limit(raise_fd_limit())
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:  # pragma: no cover - uvloop is a dependency where it installs
        runner = asyncio.run
    try:
        ok = runner(serve(config, ready, before_stop))
    except ConfigError as err:
        print(f"heartline server: {err}", file=sys.stderr)
        return 2
    return 0 if ok else 1


_FEW_CONNECTIONS = 10_000
"""Under this many connections a server is told, at start, that its limit is low."""


def _log_fd_limit(limit: FdLimit | None) -> None:
    if limit is None:
        return
    line = (
        f"event=fd-limit soft={limit.soft} hard={limit.hard} found={limit.found}"
        f" connections={limit.connections}"
    )
    if limit.connections < _FEW_CONNECTIONS:
        log.warning(
            "%s: about %d agents and clients can connect at once; raise the hard limit "
            "(ulimit -Hn, systemd LimitNOFILE=) for more",
            line,
            limit.connections,
        )
    else:
        log.info(line)
