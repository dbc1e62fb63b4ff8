"""``heartline.v1.AdminService``: tokens, and who may use an endpoint.

The interceptor has already said who is calling (:func:`caller`) and refused what the
identity alone rules out (``CreateToken`` for a non-admin, anything for an agent token);
here are the checks that need the token or endpoint a call is about.
"""

from __future__ import annotations

import grpc

from heartline._defaults import ENDPOINT_NAME, ENDPOINT_NAME_RULE
from heartline.server._auth import USER_NAME, USER_NAME_RULE, caller
from heartline.server._convert import timestamp
from heartline.server._core import ServerCore
from heartline.server._model import EndpointRow, TokenRow
from heartline.server._rpc import Abort, refusing
from heartline.v1 import admin_service_pb2 as pb
from heartline.v1 import admin_service_pb2_grpc


def token_info(row: TokenRow) -> pb.TokenInfo:
    return pb.TokenInfo(
        token_id=row.token_id,
        user=row.user,
        endpoint=row.endpoint or "",
        create_time=timestamp(row.created),
        revoke_time=timestamp(row.revoked),
    )


def _check_user(user: str) -> str:
    if not user:
        raise Abort(grpc.StatusCode.INVALID_ARGUMENT, "user is empty: name the user")
    if not USER_NAME.match(user):
        raise Abort(
            grpc.StatusCode.INVALID_ARGUMENT, f"invalid user name {user[:80]!r}: {USER_NAME_RULE}"
        )
    return user


class AdminServicer(admin_service_pb2_grpc.AdminServiceServicer):
    def __init__(self, core: ServerCore) -> None:
        self.core = core

    @refusing
    async def CreateToken(self, request, context):
        user = _check_user(request.user)
        if request.endpoint and not ENDPOINT_NAME.match(request.endpoint):
            raise Abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"invalid endpoint name {request.endpoint[:80]!r}: {ENDPOINT_NAME_RULE}",
            )
        row, token = await self.core.tokens.create(user, request.endpoint or None)
        return pb.CreateTokenResponse(info=token_info(row), token=token)

    @refusing
    async def ListTokens(self, request, context):
        me = caller()
        rows = await self.core.tokens.list(None if me.admin else me.user)
        return pb.ListTokensResponse(tokens=[token_info(r) for r in rows])

    @refusing
    async def RevokeToken(self, request, context):
        token_id = request.token_id
        if not token_id:
            raise Abort(grpc.StatusCode.INVALID_ARGUMENT, "token_id is empty: name the token")
        me = caller()
        if not me.admin and token_id not in {
            r.token_id for r in await self.core.tokens.list(me.user)
        }:
            row = None  # another user's token answers as if it did not exist
        else:
            row = await self.core.tokens.revoke(token_id)
        if row is None:
            raise Abort(
                grpc.StatusCode.NOT_FOUND,
                f"no token {token_id[:80]!r}: `heartline token list` shows the ids",
            )
        return pb.RevokeTokenResponse(info=token_info(row))

    @refusing
    async def ShareEndpoint(self, request, context):
        user = _check_user(request.user)
        me = caller()
        endpoint = self._endpoint(request.endpoint, me.user, me.admin)
        if not me.admin and endpoint.owner != me.user:
            raise Abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"endpoint {endpoint.name!r} is {endpoint.owner!r}'s: only its owner or an "
                "admin shares it",
            )
        if user not in self.core.tokens.users:
            raise Abort(
                grpc.StatusCode.NOT_FOUND,
                f"no user {user!r}: create one with `heartline token create --user {user}`",
            )
        if user != endpoint.owner:
            await self.core.store.share_endpoint(endpoint.endpoint_id, user)
            self.core.shares.setdefault(endpoint.endpoint_id, set()).add(user)
        return pb.ShareEndpointResponse(
            endpoint_id=endpoint.endpoint_id,
            users=sorted(self.core.shares.get(endpoint.endpoint_id, ())),
        )

    def _endpoint(self, ref: str, user: str, admin: bool) -> EndpointRow:
        """The endpoint ``ref`` names: an id, else the caller's own endpoint of that
        name, else (for an admin) the one endpoint of that name."""
        if not ref:
            raise Abort(grpc.StatusCode.INVALID_ARGUMENT, "endpoint is empty: give its name or id")
        endpoints = self.core.endpoints
        row = endpoints.get(ref)
        if row is not None and (admin or row.owner == user):
            return row
        named = [r for r in endpoints.values() if r.name == ref]
        own = [r for r in named if r.owner == user]
        if own:
            return own[0]
        if admin and len(named) == 1:
            return named[0]
        if admin and named:
            owners = ", ".join(sorted(r.owner for r in named))
            raise Abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{len(named)} endpoints are named {ref!r} (of {owners}): give its id "
                "(`heartline endpoints list` shows them)",
            )
        raise Abort(grpc.StatusCode.NOT_FOUND, f"no endpoint {ref[:80]!r} of yours")
