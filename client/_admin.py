"""Tokens and endpoint shares (``heartline.v1.AdminService``): the calls behind
``heartline token ...`` and ``heartline endpoints share``, mixed into :class:`AsyncClient`.
"""

from __future__ import annotations

import dataclasses
import datetime
from typing import TYPE_CHECKING, Any

import grpc

from heartline.v1 import admin_service_pb2, admin_service_pb2_grpc

from ._types import _time

if TYPE_CHECKING:
    from heartline._errors import RPCError


@dataclasses.dataclass(frozen=True)
class TokenInfo:
    """A token as the server lists it: never its secret."""

    id: str
    """The token's id: what ``revoke_token`` takes (the token is ``hl_<id>_<secret>``)."""
    user: str
    """The user the token acts as."""
    endpoint: str | None
    """An agent token's endpoint: the one endpoint it may register and serve; None for
    a user token."""
    created: datetime.datetime | None
    revoked: datetime.datetime | None
    """When it was revoked; None while it is live."""

    @classmethod
    def _from_proto(cls, msg: admin_service_pb2.TokenInfo) -> TokenInfo:
        return cls(
            id=msg.token_id,
            user=msg.user,
            endpoint=msg.endpoint or None,
            created=_time(msg, "create_time"),
            revoked=_time(msg, "revoke_time"),
        )


class AdminCalls:
    """The AdminService calls of :class:`AsyncClient` (on its channel, with its token)."""

    if TYPE_CHECKING:
        _metadata: Any
        _channel: Any

        def _open(self) -> Any: ...
        def _rpc_error(self, err: grpc.RpcError) -> RPCError: ...
        async def _retrying(self, call: Any) -> Any: ...

    async def _admin(self, name: str, request: Any, *, retry: bool = True) -> Any:
        self._open()
        method = getattr(admin_service_pb2_grpc.AdminServiceStub(self._channel), name)

        async def call() -> Any:
            try:
                return await method(request, metadata=self._metadata)
            except grpc.aio.AioRpcError as err:
                raise self._rpc_error(err) from err

        return await (self._retrying(call) if retry else call())

    async def create_token(
        self, user: str, *, endpoint: str | None = None
    ) -> tuple[str, TokenInfo]:
        """Create a token for ``user`` (created if new); admins only.

        Args:
            endpoint: make an agent token, which can only register and serve this
                endpoint.

        Returns:
            ``(token, info)``: the token is shown this once (the server keeps a hash).
        """
        request = admin_service_pb2.CreateTokenRequest(user=user, endpoint=endpoint or "")
        # Not repeated on a lost answer: a repeat would make a second token.
        response = await self._admin("CreateToken", request, retry=False)
        return response.token, TokenInfo._from_proto(response.info)

    async def list_tokens(self) -> list[TokenInfo]:
        """Tokens, revoked ones included, oldest first: everyone's for an admin, else yours."""
        response = await self._admin("ListTokens", admin_service_pb2.ListTokensRequest())
        return [TokenInfo._from_proto(t) for t in response.tokens]

    async def revoke_token(self, token_id: str) -> TokenInfo:
        """Revoke a token (yours, or any for an admin): its calls and open streams end."""
        request = admin_service_pb2.RevokeTokenRequest(token_id=token_id)
        return TokenInfo._from_proto((await self._admin("RevokeToken", request)).info)

    async def share_endpoint(self, endpoint: str, user: str) -> list[str]:
        """Let ``user`` submit to ``endpoint`` (a name of yours, or an id); return every
        user it is shared with."""
        request = admin_service_pb2.ShareEndpointRequest(endpoint=endpoint, user=user)
        return list((await self._admin("ShareEndpoint", request)).users)
