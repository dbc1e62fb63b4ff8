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


class Number(int):
    """An int subclass: it may reduce to anything, so it never takes the plain path."""


def test_plain_values_pickle_as_cloudpickle_would() -> None:
    import pickle

    import cloudpickle

    from heartline._serialize import _dumps, dumps_result, loads_with_sources

    for args, kwargs in [((1, 2.5, "x", b"y", None, True), {"k": 3}), ((), {})]:
        payload = dumps_args(args, kwargs)
        assert payload == _dumps((args, kwargs))  # byte for byte, no source map
        assert loads_with_sources(payload) == ((args, kwargs), {})
    for value in [7, "text", [1, 2], {"a": 1}, (None,)]:
        assert dumps_result(value) == cloudpickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    # Not plain: these still go through cloudpickle (a lambda by value, a subclass).
    square = lambda x: x * x
    (((fn,), _), sources) = loads_with_sources(dumps_args((square,), {}))
    assert fn(3) == 9 and sources
    assert type(pickle.loads(dumps_result([Number(2)]))[0]) is Number
