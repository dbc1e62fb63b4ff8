"""The worker protocol's frame codec, shared by the agent's pool and its worker processes.

A frame is a 4-byte big-endian length and a pickled tuple (docs/ARCHITECTURE.md, "The
worker protocol").
"""

from __future__ import annotations

import pickle
import struct
from typing import Any

HEADER = struct.Struct(">I")


class ProtocolError(Exception):
    """A peer sent something that is not a frame of the protocol."""


def encode(message: tuple[Any, ...]) -> bytes:
    """The body of one frame (without its header)."""
    return pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)


def decode(body: bytes) -> tuple[Any, ...]:
    """A frame's message; ProtocolError if it is not a non-empty tuple."""
    try:
        message = pickle.loads(body)
    except Exception as exc:
        raise ProtocolError(f"undecodable frame: {exc!r}") from exc
    if not isinstance(message, tuple) or not message:
        raise ProtocolError(f"frame is not a tuple: {type(message).__name__}")
    return message
