"""The gate in front of every service: closed until the server is active.

A server listens before it serves: while it stands by (another server holds the shared
PostgreSQL store) or restores its tasks, health says NOT_SERVING and every other call is
refused ``UNAVAILABLE``, which clients and agents retry. A client given several addresses
picks the server whose health says SERVING (heartline/_channel.py), so it reaches the
active server without ever seeing this refusal unless every server is between states.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import grpc

from heartline.server._auth import OPEN_PREFIXES, refusal

__all__ = ["ActiveGate"]


class ActiveGate(grpc.aio.ServerInterceptor):
    """Refuses every call but health and reflection ``UNAVAILABLE`` until ``open()``."""

    def __init__(self) -> None:
        self._open = False
        self.reason = "the server is starting"
        """What a refused call is told (a standby says which store it waits for)."""

    def open(self) -> None:
        self._open = True

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if self._open or handler is None or handler_call_details.method.startswith(OPEN_PREFIXES):
            return handler
        return refusal(handler, grpc.StatusCode.UNAVAILABLE, f"{self.reason}; try again")
