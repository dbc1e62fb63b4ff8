"""Who is calling, and may they: tokens, the caller's identity, and the one interceptor.

Two questions, asked apart (the split of temporalio/temporal ``common/authorization``):

- *who are you*: :meth:`Tokens.authenticate` maps the bearer token of a call to an
  :class:`Identity` (a dict lookup and one constant-time compare, from memory);
- *may you*: :func:`authorize` decides per call from the identity and the method alone
  (an agent token only serves its endpoint; creating tokens is for admins). Decisions
  that need the thing a call is about (whose endpoint, whose token) are the servicers',
  from :func:`caller`.

Both run in :class:`AuthInterceptor`, which puts the identity where the handler finds it
(:func:`caller`, a context variable of the call's task). Nothing past the interceptor
reads metadata.

A token is ``hl_<token_id>_<secret>``: the id names it (in lists, in revokes), the secret
is 256 random bits of which the store keeps only the sha256. The live tokens are kept in
memory, loaded at start and kept in step on each create and revoke. A revoke also ends
the streams (``WatchTasks``, ``Connect``) the token opened, with ``UNAUTHENTICATED``.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import hashlib
import hmac
import inspect
import logging
import os
import re
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from heartline.server._model import EndpointRow, TokenRow
from heartline.server._store import Store

log = logging.getLogger("heartline.server")

ADMIN = "admin"
"""The user the server's first start creates; its user tokens are admin tokens."""
ANONYMOUS = "anonymous"
"""Every caller's user when auth is off (``--insecure-no-auth``)."""
TOKEN_PREFIX = "hl_"
USER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")
"""A valid user name."""
USER_NAME_RULE = "use 1-64 letters, digits, '.', '_', '@' or '-', starting with a letter or digit"

# Methods anyone may call without a token: probes and `grpcurl list`/`describe`.
OPEN_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
_ENDPOINT_SERVICE = "/heartline.v1.EndpointService/"
_ADMIN_ONLY = frozenset({"/heartline.v1.AdminService/CreateToken"})


@dataclass(frozen=True, slots=True)
class Identity:
    """Who a call comes from: what the interceptor hands inward (see :func:`caller`)."""

    user: str
    """The user the call acts as: the owner of what it makes, whose things it sees."""
    token_id: str
    """The token the call came with (``""`` when auth is off)."""
    endpoint: str | None = None
    """An agent token's endpoint name: the one endpoint the call may register and serve
    (and nothing else). None for a user token."""
    admin: bool = False
    """Sees and controls everyone's tasks, groups, endpoints and tokens."""


NO_AUTH = Identity(ANONYMOUS, "", None, admin=True)
"""Every caller when auth is off."""

_CALLER: contextvars.ContextVar[Identity] = contextvars.ContextVar("heartline_caller")


def caller() -> Identity:
    """The identity of the call being handled.

    The interceptor sets it in the call's own task, before the handler runs; it holds
    for the whole handler, streams included, and for tasks the handler starts.

    Raises:
        RuntimeError: not inside a call that went through :class:`AuthInterceptor`.
    """
    try:
        return _CALLER.get()
    except LookupError:
        raise RuntimeError("caller() is only known inside a call handled by the server") from None


def authorize(identity: Identity, method: str) -> str | None:
    """Why ``identity`` may not call ``method`` (``/package.Service/Method``), or None.

    Only what the identity and the method decide alone; the servicers check the rest.
    """
    if identity.endpoint is not None:
        if not method.startswith(_ENDPOINT_SERVICE):
            return (
                f"an agent token (for endpoint {identity.endpoint!r}) may only register and "
                f"serve its endpoint, not call {method.rsplit('/', 1)[-1]}"
            )
    elif method in _ADMIN_ONLY and not identity.admin:
        return f"{method.rsplit('/', 1)[-1]} is for admins; {identity.user!r} is not one"
    return None


def serving_refusal(identity: Identity, endpoint: EndpointRow) -> str | None:
    """Why ``identity`` may not serve ``endpoint`` (hello on ``Connect``), or None.

    An agent token serves its own endpoint only; a user token serves the user's
    endpoints; an admin serves any.
    """
    if identity.endpoint is not None:
        if endpoint.name == identity.endpoint and endpoint.owner == identity.user:
            return None
        return f"this agent token serves endpoint {identity.endpoint!r} only, not {endpoint.name!r}"
    if identity.admin or endpoint.owner == identity.user:
        return None
    return f"endpoint {endpoint.name!r} is not {identity.user!r}'s to serve"


def registering_refusal(identity: Identity, name: str) -> str | None:
    """Why ``identity`` may not register an endpoint of this name, or None."""
    if identity.endpoint is not None and name != identity.endpoint:
        return (
            f"this agent token serves endpoint {identity.endpoint!r} only, "
            f"not {name!r}: ask an admin for a token of that endpoint"
        )
    return None


# --------------------------------------------------------------------------- tokens


def new_token() -> tuple[str, str]:
    """A fresh ``(token_id, token)``."""
    token_id = secrets.token_hex(6)
    return token_id, f"{TOKEN_PREFIX}{token_id}_{secrets.token_urlsafe(32)}"


def _split(token: str) -> tuple[str, str] | None:
    """``(token_id, secret)`` of a token, or None if it is not one of ours."""
    if not token.startswith(TOKEN_PREFIX):
        return None
    token_id, sep, secret = token[len(TOKEN_PREFIX) :].partition("_")
    return (token_id, secret) if sep and secret else None


def _digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode("utf-8", "surrogateescape")).digest()


def write_token_file(path: Path, token: str) -> None:
    """Write ``token`` to ``path``, readable by its owner only from the first byte: a
    new file made with mode 0600 then renamed over any old one."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as out:
            out.write(token + "\n")
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


class _Stream:
    """A stream a token opened: its call's task and context, to end it on a revoke."""

    __slots__ = ("context", "task")

    def __init__(self, task: asyncio.Task[Any], context: grpc.aio.ServicerContext) -> None:
        self.task = task
        self.context = context

    async def cut(self, message: str) -> None:
        # The status goes out first, from here (a cancelled handler sends none), then the
        # handler is cancelled so that its own cleanup runs.
        with contextlib.suppress(Exception):  # AbortError, expected; or a status sent already
            await self.context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        self.task.cancel()


class Tokens:
    """The users and live tokens, in memory; the store has them durably.

    Loaded by :meth:`load` at start, then changed only through :meth:`create` and
    :meth:`revoke` (on the server's loop), which write the store first.
    """

    def __init__(self, store: Store) -> None:
        self._store = store
        self._live: dict[str, tuple[bytes, Identity]] = {}
        """token_id -> (sha256 of its secret, the identity it stands for)."""
        self._streams: dict[str, set[_Stream]] = {}
        """token_id -> the open streams it authenticated."""
        self.users: set[str] = set()
        """Every user name."""

    async def load(self) -> None:
        users, tokens = await self._store.load_tokens()
        self.users = set(users)
        self._live = {
            row.token_id: (bytes.fromhex(secret_hash), _identity(row))
            for row, secret_hash in tokens
        }

    def authenticate(self, token: str) -> Identity | None:
        """The identity of a live token, or None (not a token, unknown, revoked, wrong)."""
        parts = _split(token)
        if parts is None:
            return None
        entry = self._live.get(parts[0])
        if entry is None:
            return None
        digest, identity = entry
        return identity if hmac.compare_digest(_digest(parts[1]), digest) else None

    def live(self, token_id: str) -> Identity | None:
        """The identity of a live token by id, or None."""
        entry = self._live.get(token_id)
        return None if entry is None else entry[1]

    async def create(self, user: str, endpoint: str | None = None) -> tuple[TokenRow, str]:
        """A new token (and the user, if new), stored: ``(its row, the token)``."""
        row, token = _issue(user, endpoint)
        await self._add(row, token)
        log.info(
            "event=token-created token_id=%s user=%s endpoint=%s",
            row.token_id,
            user,
            endpoint or "-",
        )
        return row, token

    async def _add(self, row: TokenRow, token: str) -> None:
        digest = _digest(token.split("_", 2)[2])
        await self._store.create_token(row, digest.hex())
        self.users.add(row.user)
        self._live[row.token_id] = (digest, _identity(row))

    async def revoke(self, token_id: str) -> TokenRow | None:
        """Revoke a token (stored first), then end the streams it opened; the row, or
        None if there is no such token. Revoking a revoked token changes nothing."""
        row = await self._store.revoke_token(token_id, time.time())
        if row is None:
            return None
        if self._live.pop(token_id, None) is not None:
            streams = self._streams.pop(token_id, set())
            log.info(
                "event=token-revoked token_id=%s user=%s streams=%d",
                token_id,
                row.user,
                len(streams),
            )
            message = f"token {token_id} was revoked"
            await asyncio.gather(*(stream.cut(message) for stream in streams))
        return row

    async def list(self, user: str | None = None) -> list[TokenRow]:
        """Tokens (of one user, or all), revoked ones included, oldest first."""
        return await self._store.list_tokens(user)

    async def first_start(self, path: Path) -> bool:
        """On a store without users: create ``admin`` and an admin token, written to
        ``path`` (mode 0600) before the store has it. True if it did so."""
        if self.users:
            return False
        row, token = _issue(ADMIN)
        existed = path.exists()
        await asyncio.to_thread(write_token_file, path, token)
        await self._add(row, token)
        log.info(
            "event=admin-token-written user=%s token_id=%s path=%s%s: clients, agents and "
            "the CLI with HEARTLINE_HOME=%s use it",
            ADMIN,
            row.token_id,
            path,
            " (replaced a token of another store)" if existed else "",
            path.parent,
        )
        return True

    # -- streams ---------------------------------------------------------------------

    def _open_stream(self, identity: Identity, context: grpc.aio.ServicerContext) -> _Stream | None:
        """Remember the current call's stream under its token; None if the token was
        revoked since the call was authenticated."""
        if identity.token_id not in self._live:
            return None
        task = asyncio.current_task()
        assert task is not None
        stream = _Stream(task, context)
        self._streams.setdefault(identity.token_id, set()).add(stream)
        return stream

    def _close_stream(self, identity: Identity, stream: _Stream) -> None:
        streams = self._streams.get(identity.token_id)
        if streams is not None:
            streams.discard(stream)
            if not streams:
                del self._streams[identity.token_id]

    def open_streams(self, token_id: str) -> int:
        """How many streams of this token are open."""
        return len(self._streams.get(token_id, ()))


def _issue(user: str, endpoint: str | None = None) -> tuple[TokenRow, str]:
    token_id, token = new_token()
    return TokenRow(token_id, user, endpoint or None, time.time()), token


def _identity(row: TokenRow) -> Identity:
    return Identity(
        row.user, row.token_id, row.endpoint, admin=row.user == ADMIN and not row.endpoint
    )


# --------------------------------------------------------------------------- the interceptor

_MISSING = (
    "missing token: send 'authorization: Bearer <token>' (heartline reads --token, "
    "$HEARTLINE_TOKEN or the file $HEARTLINE_HOME/token the server wrote on its first start)"
)
_INVALID = "invalid or revoked token"
_FACTORIES = {
    (False, False): (grpc.unary_unary_rpc_method_handler, "unary_unary"),
    (False, True): (grpc.unary_stream_rpc_method_handler, "unary_stream"),
    (True, False): (grpc.stream_unary_rpc_method_handler, "stream_unary"),
    (True, True): (grpc.stream_stream_rpc_method_handler, "stream_stream"),
}


def _bearer(metadata: Any) -> str | None:
    """The token of the ``authorization`` metadata, ``""`` if it is not a bearer one, or
    None without it."""
    for key, value in metadata or ():
        if key == "authorization":
            scheme, _, token = value.partition(" ")
            return token.strip() if scheme.lower() == "bearer" else ""
    return None


def refusal(
    handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str
) -> grpc.RpcMethodHandler:
    """A handler of the same kind as ``handler`` that only refuses."""

    async def refuse(request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(code, message)

    factory, _ = _FACTORIES[(handler.request_streaming, handler.response_streaming)]
    return factory(
        refuse,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


def _tracked(
    handler: grpc.RpcMethodHandler, tokens: Tokens, identity: Identity
) -> grpc.RpcMethodHandler:
    """The streaming ``handler``, with its call remembered under its token while it runs."""
    _, kind = _FACTORIES[(handler.request_streaming, handler.response_streaming)]
    behaviour: Callable[..., Any] | None = getattr(handler, kind)
    if behaviour is None:
        return handler
    if inspect.isasyncgenfunction(behaviour):

        async def tracked_stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
            stream = tokens._open_stream(identity, context)
            if stream is None:
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, _INVALID)
            try:
                async with contextlib.aclosing(behaviour(request, context)) as responses:
                    async for response in responses:
                        yield response
            finally:
                tokens._close_stream(identity, stream)  # type: ignore[arg-type]

        new: Callable[..., Any] = tracked_stream
    elif inspect.iscoroutinefunction(behaviour):

        async def tracked_call(request: Any, context: grpc.aio.ServicerContext) -> Any:
            stream = tokens._open_stream(identity, context)
            if stream is None:
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, _INVALID)
            try:
                return await behaviour(request, context)
            finally:
                tokens._close_stream(identity, stream)  # type: ignore[arg-type]

        new = tracked_call
    else:
        return handler
    factory, _ = _FACTORIES[(handler.request_streaming, handler.response_streaming)]
    return factory(
        new,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Authenticates and authorizes every call but health and reflection, and hands the
    caller's :class:`Identity` to the handler (:func:`caller`).

    Args:
        tokens: the registry to authenticate against; None turns auth off (every caller
            is :data:`NO_AUTH`).
    """

    def __init__(self, tokens: Tokens | None) -> None:
        self._tokens = tokens

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        tokens = self._tokens
        if tokens is None:
            _CALLER.set(NO_AUTH)
            return handler
        method = handler_call_details.method
        if handler is None or method.startswith(OPEN_PREFIXES):
            return handler
        token = _bearer(handler_call_details.invocation_metadata)
        if not token:
            return refusal(handler, grpc.StatusCode.UNAUTHENTICATED, _MISSING)
        identity = tokens.authenticate(token)
        if identity is None:
            return refusal(handler, grpc.StatusCode.UNAUTHENTICATED, _INVALID)
        denied = authorize(identity, method)
        if denied is not None:
            return refusal(handler, grpc.StatusCode.PERMISSION_DENIED, denied)
        # Set in this call's own task: the handler runs in it (tests/test_auth.py checks).
        _CALLER.set(identity)
        if handler.request_streaming or handler.response_streaming:
            return _tracked(handler, tokens, identity)
        return handler
