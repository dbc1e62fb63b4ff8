"""Agent configuration and the endpoint identity kept on disk."""

from __future__ import annotations

import json
import os
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from heartline import _defaults
from heartline._channel import split_servers
from heartline._figures import parse_address
from heartline._tls import TLS


def _default_workers() -> int:
    return os.cpu_count() or 1


EXECUTORS = ("process", "dask")
"""What an agent may run its tasks on (``AgentConfig.executor``)."""


@dataclass(frozen=True, slots=True)
class AgentConfig:
    """How an endpoint agent runs. Defaults that read the environment do so when the
    config is created, not at import."""

    name: str
    """The endpoint's name; several agents started with one name serve one endpoint."""

    server: str = field(default_factory=_defaults.address)
    """``HOST:PORT`` of the heartline server; default ``$HEARTLINE_ADDRESS`` or
    ``127.0.0.1:50051``. Several servers sharing one store, comma-separated
    (``HOST:PORT,HOST:PORT``): the agent connects to whichever is active, and to the
    standby that takes over when it dies."""

    workers: int = field(default_factory=_default_workers)
    """Worker processes, each running one task at a time; default ``os.cpu_count()``. With
    the ``dask`` executor and no scheduler address: the workers of the LocalCluster."""

    executor: str = "process"
    """What runs the tasks: ``process`` (worker processes on this machine) or ``dask``
    (futures on a Dask distributed cluster; ``pip install 'heartline[dask]'``)."""

    dask_scheduler: str | None = None
    """With the ``dask`` executor: the scheduler's address (``tcp://HOST:PORT``); None
    starts a LocalCluster with ``workers`` workers, stopped with the agent."""

    prefetch: int | None = None
    """Tasks the server may send beyond free workers; None means 4 x ``workers``, at
    least 32 (see ``heartline._defaults.MIN_PREFETCH``)."""

    home: Path = field(default_factory=_defaults.home)
    """State folder; default ``$HEARTLINE_HOME`` or ``~/.heartline``. The endpoint's
    identity lives in ``<home>/endpoints/<name>/endpoint.json``."""

    token: str | None = field(default_factory=_defaults.token)
    """Bearer token sent as ``authorization: Bearer <token>``; default
    ``$HEARTLINE_TOKEN``, else the file ``$HEARTLINE_HOME/token``, else none."""

    tls: TLS | None = field(default_factory=_defaults.tls)
    """How the agent reaches the server over TLS (a :class:`~heartline.TLS`); default
    from ``$HEARTLINE_TLS_CA`` (and ``$HEARTLINE_TLS_CERT``, ``$HEARTLINE_TLS_KEY``), else
    None: plaintext."""

    reconnect_min: float = 0.1
    """Smallest reconnect backoff in seconds."""

    reconnect_max: float = 10.0
    """Largest reconnect backoff in seconds (full jitter below it)."""

    allowed_functions: frozenset[str] | None = None
    """Function ids this endpoint runs (its allow-list; ``Client.register_function(fn)``
    returns a function's id); None allows all. The agent tells the server in its hello,
    so a submit of another function is refused (PERMISSION_DENIED); a task of another
    function that reaches the agent anyway is reported ERRORED and never run.
    ``heartline endpoint start`` takes it from ``--allow-function``, else from the
    endpoint's config file (:func:`read_endpoint_file`)."""

    metrics: str | None = None
    """``HOST:PORT`` to serve Prometheus metrics on (path ``/metrics``); None serves
    none. Port 0 picks a free port (logged as ``event=metrics-listening``)."""

    def __post_init__(self) -> None:
        if not _defaults.ENDPOINT_NAME.match(self.name):
            raise ValueError(f"invalid endpoint name {self.name!r}: {_defaults.ENDPOINT_NAME_RULE}")
        if self.workers < 1:
            raise ValueError(f"workers must be at least 1, not {self.workers}")
        if self.executor not in EXECUTORS:
            raise ValueError(
                f"executor must be one of {', '.join(EXECUTORS)}, not {self.executor!r}"
            )
        if self.dask_scheduler is not None and self.executor != "dask":
            raise ValueError("dask_scheduler is for the dask executor (executor='dask')")
        if self.prefetch is not None and self.prefetch < 0:
            raise ValueError(f"prefetch must not be negative, not {self.prefetch}")
        if not 0 < self.reconnect_min <= self.reconnect_max:
            raise ValueError(
                "reconnect_min must be positive and at most reconnect_max, not "
                f"{self.reconnect_min} and {self.reconnect_max}"
            )
        split_servers(self.server)  # ValueError when a list is malformed
        if self.metrics is not None:
            parse_address(self.metrics)  # ValueError when malformed
        if self.tls is not None and not isinstance(self.tls, TLS):
            raise ValueError(f"tls must be a heartline.TLS or None, not {self.tls!r}")
        object.__setattr__(self, "home", Path(self.home).expanduser())
        if self.allowed_functions is not None:
            if isinstance(self.allowed_functions, str):
                raise ValueError(
                    "allowed_functions must be a collection of function ids, not one string"
                )
            allowed = frozenset(self.allowed_functions)
            check_function_ids(allowed, "allowed_functions")
            object.__setattr__(self, "allowed_functions", allowed)

    @property
    def effective_prefetch(self) -> int:
        """The prefetch sent in the hello."""
        if self.prefetch is not None:
            return self.prefetch
        return max(_defaults.PREFETCH_PER_WORKER * self.workers, _defaults.MIN_PREFETCH)

    @property
    def endpoint_dir(self) -> Path:
        """This endpoint's folder under ``home``."""
        return self.home / "endpoints" / self.name

    @property
    def endpoint_file(self) -> Path:
        """This endpoint's config file: ``<home>/endpoints/<name>/config.toml`` (see
        :func:`read_endpoint_file`)."""
        return self.endpoint_dir / _defaults.ENDPOINT_CONFIG_FILE


def check_function_ids(ids: Iterable[object], where: str) -> None:
    """Raise ValueError unless every id is a function id (a sha256 hex digest) and there
    are at most ``MAX_ALLOWED_FUNCTIONS``."""
    count = 0
    for fid in ids:
        count += 1
        if not isinstance(fid, str) or not _defaults.FUNCTION_ID.match(fid):
            raise ValueError(
                f"{where}: {str(fid)[:80]!r} is not a function id (the 64 lowercase hex "
                "digits Client.register_function returns)"
            )
    if count > _defaults.MAX_ALLOWED_FUNCTIONS:
        raise ValueError(
            f"{where}: {count} function ids; at most {_defaults.MAX_ALLOWED_FUNCTIONS}"
        )


@dataclass(frozen=True, slots=True)
class EndpointFile:
    """An endpoint's own settings, from ``<home>/endpoints/<name>/config.toml``."""

    allowed_functions: frozenset[str] | None = None
    """The function allow-list (key ``allowed_functions``, a list of function ids; an
    empty list allows none); None when the file sets none."""


_ENDPOINT_FILE_KEYS = frozenset({"allowed_functions"})


def read_endpoint_file(path: Path) -> EndpointFile:
    """Read an endpoint's config file; a missing file sets nothing.

    Example ``config.toml``::

        # Only these functions run here (ids from Client.register_function).
        allowed_functions = [
            "3f9a...",
        ]

    Raises:
        ValueError: the file can't be read, is not TOML, has an unknown key, or a value
            that is not a list of function ids. The message names the file.
    """
    try:
        text = path.read_text()
    except FileNotFoundError:
        return EndpointFile()
    except OSError as exc:
        raise ValueError(f"{path}: cannot read it: {exc.strerror or exc}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{path}: not valid TOML: {exc}") from None
    unknown = sorted(set(data) - _ENDPOINT_FILE_KEYS)
    if unknown:
        raise ValueError(
            f"{path}: unknown key {unknown[0]!r}; the keys are {', '.join(sorted(_ENDPOINT_FILE_KEYS))}"
        )
    allowed = data.get("allowed_functions")
    if allowed is None:
        return EndpointFile()
    if not isinstance(allowed, list):
        raise ValueError(f"{path}: allowed_functions must be a list of function ids")  # noqa: TRY004 - a bad file, as any other
    check_function_ids(allowed, f"{path}: allowed_functions")
    return EndpointFile(allowed_functions=frozenset(allowed))


@dataclass(frozen=True, slots=True)
class Identity:
    """An endpoint's registration, as kept in ``endpoint.json``."""

    endpoint_id: str
    name: str
    server: str

    @classmethod
    def load(cls, path: Path) -> Identity | None:
        """Read an identity file; None if it is missing or unreadable."""
        try:
            data = json.loads(path.read_text())
            return cls(str(data["endpoint_id"]), str(data["name"]), str(data["server"]))
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def save(self, path: Path) -> None:
        """Write the identity atomically (a crash leaves the old file or the new one)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        # A name of our own: several agents of one endpoint may save at the same time.
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(
            json.dumps({"endpoint_id": self.endpoint_id, "name": self.name, "server": self.server})
            + "\n"
        )
        os.replace(tmp, path)
