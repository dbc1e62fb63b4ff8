"""Exceptions and payloads as they cross process boundaries (heartline/_serialize.py)."""

from __future__ import annotations

import pytest

from heartline import SerializationError
from heartline._serialize import describe_exception, dumps_args, loads


class Unprintable(Exception):
    def __str__(self) -> str:
        raise RuntimeError("__str__ is broken")


def test_an_exception_whose_str_fails_is_still_described() -> None:
    try:
        raise Unprintable()
    except Unprintable as exc:
        name, message, tb = describe_exception(exc)
    assert name.endswith("Unprintable")
    assert message == "<unprintable Unprintable object>"
    assert "raise Unprintable()" in tb


def test_a_payload_that_does_not_unpickle_is_a_serialization_error() -> None:
    with pytest.raises(SerializationError, match="cannot deserialize"):
        loads(b"not a pickle")
    assert loads(dumps_args((1, 2), {"k": 3})) == ((1, 2), {"k": 3})
