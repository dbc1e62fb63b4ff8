"""How a function payload was made, read from the payload itself.

A function payload ends with a trailer: a small JSON object, its length and a magic
string. It says which Python (``major.minor``) and cloudpickle made the payload, which
forms it carries, and where the source form starts:

- ``reference``: no code by value (a function of an importable or shipped module): any
  Python with the modules runs it.
- ``bytecode``: code pickled by value: only the same Python minor version runs it.
- ``source``: a source form (heartline/_sourceform.py) any Python compiles again.

``pickle.loads(payload)`` ignores the trailer (it stops at the first pickle's end). The
client, the server (which never unpickles anything: it reads the JSON) and the worker
read it with :func:`read`. JSON, not pickle: the server reads it.
"""

from __future__ import annotations

import json
import struct
import sys
from dataclasses import dataclass

__all__ = [
    "BYTECODE",
    "REFERENCE",
    "SERIALIZERS",
    "SOURCE",
    "TRAILER_MAX",
    "Serialization",
    "read",
    "trailer",
]

BYTECODE = "bytecode"
SOURCE = "source"
REFERENCE = "reference"

SERIALIZERS = ("auto", BYTECODE, SOURCE)
"""What ``submit(..., serializer=...)`` takes: ``auto`` (the bytecode form, plus the
source form where the source is at hand), ``bytecode`` (bytecode only) or ``source``
(source only: refused if there is none)."""

_TAIL = struct.Struct(">I8s")
TRAILER_MAX = 1024
"""A trailer is never longer (its JSON is some 100 bytes): the last this many bytes of a
payload hold it whole, so :func:`read` of them reads what it would of the payload."""
_MAGIC = b"\x00hlform1"

PYTHON = f"{sys.version_info[0]}.{sys.version_info[1]}"
"""This process's Python, ``major.minor``."""


@dataclass(frozen=True, slots=True)
class Serialization:
    """How one function payload was made."""

    python: str
    """The client's Python, ``major.minor``."""
    cloudpickle: str
    """The client's cloudpickle version."""
    forms: tuple[str, ...]
    """The forms it carries, the one loaded by default first."""
    source_at: int = 0
    """Where the source form starts in the payload (when ``bytecode`` and ``source``)."""
    end: int = 0
    """Where the trailer starts."""

    @property
    def requires(self) -> str:
        """The Python minor version a worker must run to load it, or "" for any."""
        return self.python if self.forms == (BYTECODE,) else ""


def trailer(python: str, cloudpickle: str, forms: tuple[str, ...], source_at: int = 0) -> bytes:
    body = json.dumps(
        {
            "python": python,
            "cloudpickle": cloudpickle,
            "forms": list(forms),
            "source_at": source_at,
        },
        separators=(",", ":"),
    ).encode()
    assert len(body) + _TAIL.size <= TRAILER_MAX, body
    return body + _TAIL.pack(len(body), _MAGIC)


def read(payload: bytes) -> Serialization | None:
    """The trailer of a function payload, or None (a payload without one: made by
    another client, or by hand; taken as runnable anywhere)."""
    if len(payload) < _TAIL.size or payload[-8:] != _MAGIC:
        return None
    (size,) = struct.unpack_from(">I", payload, len(payload) - _TAIL.size)
    end = len(payload) - _TAIL.size - size
    if end < 0:
        return None
    try:
        meta = json.loads(payload[end : len(payload) - _TAIL.size])
        forms = tuple(str(f) for f in meta["forms"])
        source_at = int(meta.get("source_at", 0))
        return Serialization(str(meta["python"]), str(meta["cloudpickle"]), forms, source_at, end)
    except (ValueError, KeyError, TypeError):
        return None
