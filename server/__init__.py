"""The heartline server: gRPC services, the scheduler core and the store."""

from heartline.server._app import ConfigError, Server, run_server, serve
from heartline.server._config import ServerConfig
from heartline.server._store import SqliteStore, Store

__all__ = ["ConfigError", "Server", "ServerConfig", "SqliteStore", "Store", "run_server", "serve"]
