"""Request bodies that do not decode: ``INVALID_ARGUMENT`` and one quiet log line.

Left to itself, grpc.aio parses a request with the method's deserializer before any
handler runs; a body that does not parse raises there, and gRPC answers ``UNKNOWN`` and
logs a multi-line ERROR traceback, once per bad body. :class:`DecodeInterceptor` moves the
same parse one step later, into the handler: it hands each method's handler back with no
request deserializer (gRPC passes the raw bytes) and a behaviour that parses them itself,
aborting ``INVALID_ARGUMENT`` ("the request body is not a valid heartline.v1.XRequest:
...") when they do not parse. Streams that read requests (``Connect``, reflection) parse
each incoming message the same way, whether the handler iterates its requests or calls
``context.read()``.

It must run after authentication: a caller without a token learns nothing, not even
that its body was malformed (``server/_app.py`` puts it last in the interceptor list).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

log = logging.getLogger("heartline.server")

LOG_INTERVAL = 10.0
"""Seconds between two log lines about undecodable requests (the rest are counted)."""
_MAX_DETAIL = 120
"""Longest parser message quoted back to the client."""


class _Undecodable:
    """What :func:`_parser` returns for a body that does not parse (not raised: an
    exception's traceback would keep the body alive until a cyclic garbage collection)."""

    __slots__ = ("message",)

    def __init__(self, message: str) -> None:
        self.message = message


class QuietLog:
    """One WARNING line per ``interval`` seconds at most; the lines held back are counted
    and the next line says how many."""

    def __init__(
        self, interval: float = LOG_INTERVAL, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.interval = interval
        self._clock = clock
        self._next = 0.0
        self.suppressed = 0

    def warn(self, fmt: str, *args: object) -> bool:
        """Log the line unless one went out less than ``interval`` ago; True if logged."""
        now = self._clock()
        if now < self._next:
            self.suppressed += 1
            return False
        self._next = now + self.interval
        suppressed, self.suppressed = self.suppressed, 0
        log.warning(fmt + " suppressed=%d", *args, suppressed)
        return True


def _message_name(deserializer: Callable[[bytes], Any], method: str) -> str:
    cls = getattr(deserializer, "__self__", None)
    descriptor = getattr(cls, "DESCRIPTOR", None)
    return getattr(descriptor, "full_name", None) or f"request of {method}"


def _parser(
    deserializer: Callable[[bytes], Any], method: str, quiet: QuietLog
) -> Callable[[bytes], Any]:
    """``parse(raw)``: the message, or an :class:`_Undecodable` saying why not."""
    name = _message_name(deserializer, method)

    def parse(raw: bytes) -> Any:
        try:
            return deserializer(raw)
        except Exception as exc:  # noqa: BLE001 - any parser failure is the client's
            detail = str(exc).rsplit("': ", 1)[-1] or type(exc).__name__
            if len(detail) > _MAX_DETAIL:
                detail = detail[:_MAX_DETAIL] + "..."
            quiet.warn(
                "event=undecodable-request method=%s bytes=%d error=%r", method, len(raw), detail
            )
            return _Undecodable(
                f"the request body is not a valid {name}: {detail[:1].lower()}{detail[1:]}"
            )

    return parse


class _ParsingContext:
    """The servicer context, with ``read()`` parsing each raw message (or aborting)."""

    __slots__ = ("_context", "_parse")

    def __init__(self, context: grpc.aio.ServicerContext, parse: Callable[[bytes], Any]) -> None:
        self._context = context
        self._parse = parse

    async def read(self) -> Any:
        raw = await self._context.read()
        if raw is grpc.aio.EOF:
            return raw
        message = self._parse(raw)
        if type(message) is _Undecodable:
            del raw  # not kept alive by the abort's traceback
            await self._context.abort(grpc.StatusCode.INVALID_ARGUMENT, message.message)
        return message

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)


async def _requests(context: _ParsingContext) -> AsyncIterator[Any]:
    while True:
        message = await context.read()
        if message is grpc.aio.EOF:
            return
        yield message


def _wrap(handler: grpc.RpcMethodHandler, method: str, quiet: QuietLog) -> grpc.RpcMethodHandler:
    """The handler taking raw bytes and parsing them itself; unchanged if it is not one
    we can wrap (no deserializer, or a sync behaviour, which this server has none of)."""
    deserializer = handler.request_deserializer
    if deserializer is None:
        return handler
    parse = _parser(deserializer, method, quiet)
    if handler.request_streaming:
        behavior = handler.stream_stream if handler.response_streaming else handler.stream_unary
    else:
        behavior = handler.unary_stream if handler.response_streaming else handler.unary_unary
    if behavior is None:
        return handler

    if handler.request_streaming:
        if inspect.isasyncgenfunction(behavior):

            async def streaming(request_iterator, context):
                ctx = _ParsingContext(context, parse)
                async with contextlib.aclosing(behavior(_requests(ctx), ctx)) as responses:
                    async for response in responses:
                        yield response

        elif inspect.iscoroutinefunction(behavior):

            async def streaming(request_iterator, context):
                ctx = _ParsingContext(context, parse)
                return await behavior(_requests(ctx), ctx)

        else:
            return handler
        new = streaming
    elif inspect.isasyncgenfunction(behavior):

        async def unary_in_stream_out(raw, context):
            request = parse(raw)
            del raw
            if type(request) is _Undecodable:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
            async with contextlib.aclosing(behavior(request, context)) as responses:
                async for response in responses:
                    yield response

        new = unary_in_stream_out
    elif inspect.iscoroutinefunction(behavior):

        async def unary_in(raw, context):
            request = parse(raw)
            del raw  # not kept alive by an abort's traceback (a cycle, until a collection)
            if type(request) is _Undecodable:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
            return await behavior(request, context)

        new = unary_in
    else:
        return handler
    kind = (
        ("stream" if handler.request_streaming else "unary")
        + "_"
        + ("stream" if handler.response_streaming else "unary")
    )
    return handler._replace(request_deserializer=None, **{kind: new})


class DecodeInterceptor(grpc.aio.ServerInterceptor):
    """Parses request bodies in the handler, so that one that does not decode answers
    ``INVALID_ARGUMENT`` with a short message and logs one rate-limited line."""

    def __init__(self, quiet: QuietLog | None = None) -> None:
        self.quiet = quiet or QuietLog()
        # method -> (the handler resolved last, its wrapped form): a method's registered
        # handler is wrapped once (a handler an earlier interceptor makes per call, per call).
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        known = self._wrapped.get(method)
        if known is not None and known[0] is handler:
            return known[1]
        wrapped = _wrap(handler, method, self.quiet)
        self._wrapped[method] = (handler, wrapped)  # methods are few: only known ones get here
        return wrapped
