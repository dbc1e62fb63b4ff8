"""What the TaskService handlers share: refusals, id checks, page tokens.

Its own module so that ``server/_task_service.py`` and ``server/_group_service.py`` can
both use it without importing each other.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Sequence

import grpc

from heartline._defaults import MAX_IDS

_UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
_EXAMPLE_UUID = "8c2c0e0a-1b7e-4f5e-9a43-0d5c3a1f9b21"


class Abort(Exception):
    """A request refused with a status and a message a person can act on."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def refusing(method):
    """Turn an Abort raised by a handler into the gRPC status it names."""

    async def wrapper(self, request, context):
        try:
            return await method(self, request, context)
        except Abort as err:
            await context.abort(err.code, err.message)

    wrapper.__name__ = method.__name__
    wrapper.__doc__ = method.__doc__
    return wrapper


def check_ids(ids: Sequence[str], what: str = "task_ids", kind: str = "task") -> list[str]:
    """The ids, if there are some, not too many, and each is a lowercase UUID.

    Args:
        what: the field, as the messages name it.
        kind: what the ids name ("task", "group").

    Raises:
        Abort: INVALID_ARGUMENT naming the field, or the first malformed id.
    """
    if not ids:
        raise Abort(grpc.StatusCode.INVALID_ARGUMENT, f"{what} is empty: name at least one {kind}")
    if len(ids) > MAX_IDS:
        raise Abort(
            grpc.StatusCode.INVALID_ARGUMENT, f"{what} has {len(ids)} ids; at most {MAX_IDS}"
        )
    bad = next((value for value in ids if not is_id(value)), None)
    if bad is not None:
        raise Abort(grpc.StatusCode.INVALID_ARGUMENT, malformed_id(bad, kind))
    return list(ids)


def check_group_id(group_id: str) -> str:
    """One group id (GetGroup, CancelGroup); INVALID_ARGUMENT if empty or malformed."""
    if not group_id:
        raise Abort(grpc.StatusCode.INVALID_ARGUMENT, "group_id is empty: name the group")
    if not is_id(group_id):
        raise Abort(grpc.StatusCode.INVALID_ARGUMENT, malformed_id(group_id, "group"))
    return group_id


def is_id(value: str) -> bool:
    """A task or group id: a lowercase UUID."""
    return _UUID.match(value) is not None


def shown(value: str, limit: int = 80) -> str:
    """A client's value as an error message may echo it: quoted, and cut short (a long
    echo could overflow the client's metadata limit and hide the real error)."""
    return repr(value[:limit]) + ("..." if len(value) > limit else "")


def malformed_id(value: str, kind: str = "task") -> str:
    """The message for a malformed id; the value is cut short (it came from a client)."""
    return f"malformed {kind} id {shown(value)}: {kind} ids are lowercase UUIDs like {_EXAMPLE_UUID}"


def encode_page_token(submit_time: float, row_id: str) -> str:
    """A page token: where the previous page (newest first) stopped."""
    return base64.urlsafe_b64encode(f"{submit_time!r}|{row_id}".encode()).decode()


def decode_page_token(token: str) -> tuple[float, str]:
    """``(submit_time, id)`` of a page token; INVALID_ARGUMENT if it is not one of ours."""
    try:
        text = base64.urlsafe_b64decode(token.encode()).decode()
        when, row_id = text.split("|", 1)
        return float(when), row_id
    except ValueError:  # bad base64, bad UTF-8, no "|", or not a number
        raise Abort(grpc.StatusCode.INVALID_ARGUMENT, f"malformed page_token {shown(token)}") from None


def page_limit(page_size: int) -> int:
    """Rows per page: 100 by default, at most 1000; INVALID_ARGUMENT if negative."""
    if page_size < 0:
        raise Abort(grpc.StatusCode.INVALID_ARGUMENT, "page_size is negative")
    return min(page_size or 100, 1000)
