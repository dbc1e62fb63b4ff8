"""The source form of a function and the payload trailer (heartline/_sourceform.py,
heartline/_forms.py), in this process: what a worker on another Python minor version
does, done here by loading the source form on purpose."""

from __future__ import annotations

import pickle
import threading

import pytest

from heartline import _forms, _sourceform
from heartline._errors import SerializationError
from heartline._serialize import describe_exception, dumps_function, loads_with_sources

SCALE = 3


def module_level(x: int, *, plus: int = 1) -> int:
    return helper(x) * SCALE + plus


def helper(x: int) -> int:
    return x + 1


def factorial(n: int) -> int:
    return 1 if n <= 1 else n * factorial(n - 1)


def _closure(n: int):
    def inner(x: int) -> list[int]:
        return [x * n, helper(x)]

    return inner


def _raising():
    def boom(x: int) -> None:
        raise ValueError(f"bad {x}")  # the line a traceback shows

    return boom


def _source_only(fn):
    payload = dumps_function(fn, serializer="source")
    made = _forms.read(payload)
    assert made is not None and made.forms == ("source",)
    fn2, sources = loads_with_sources(payload)
    assert fn2 is not fn
    return fn2, sources


def test_auto_carries_bytecode_first_then_source_and_loads_the_bytecode_here() -> None:
    fn = _closure(2)
    payload = dumps_function(fn)
    made = _forms.read(payload)
    assert made is not None
    assert made.forms == ("bytecode", "source")
    assert made.python == _forms.PYTHON and made.requires == ""
    assert pickle.loads(payload)(5) == [10, 6]  # plain pickle: the bytecode form alone
    # The source form alone, as another Python would load it.
    rebuilt = pickle.loads(payload[made.source_at : made.end])
    assert rebuilt(5) == [10, 6]


@pytest.mark.parametrize(
    ("fn", "args", "kwargs", "expected"),
    [
        (_closure(3), (4,), {}, [12, 5]),
        (lambda x, y=2: x**y + SCALE, (3,), {}, 12),
    ],
)
def test_the_source_form_rebuilds_functions_closures_defaults_and_lambdas(
    fn, args, kwargs, expected
) -> None:
    rebuilt, _ = _source_only(fn)
    assert rebuilt(*args, **kwargs) == expected


def test_the_source_form_of_a_module_level_function_keeps_its_globals_and_defaults() -> None:
    # A script's functions (in __main__) take this path; these are importable, so
    # dumps_function sends them by reference, and make() is called directly.
    rebuilt = pickle.loads(_sourceform.make(module_level, ()))
    assert rebuilt is not module_level
    assert (rebuilt(2), rebuilt(2, plus=0)) == (10, 9)
    assert pickle.loads(_sourceform.make(factorial, ()))(5) == 120


def test_a_rebuilt_function_raises_with_the_original_file_and_line() -> None:
    rebuilt, sources = _source_only(_raising())
    with pytest.raises(ValueError) as info:
        rebuilt(4)
    type_name, message, tb = describe_exception(info.value, sources)
    assert (type_name, message) == ("ValueError", "bad 4")
    assert __file__ in tb and "the line a traceback shows" in tb


def test_no_source_form_for_values_only_this_python_can_rebuild() -> None:
    class Local:  # not importable by name: only this Python's bytecode rebuilds it
        pass

    box = Local()
    here = pickle.loads(dumps_function(lambda: box)).__class__  # auto: bytecode works here
    assert here is not None
    made = _forms.read(dumps_function(lambda: box))
    assert made is not None and made.forms == ("bytecode",) and made.requires == _forms.PYTHON
    with pytest.raises(SerializationError, match="has no source form"):
        dumps_function(lambda: box, serializer="source")
    lock = threading.Lock()
    with pytest.raises(SerializationError, match="lock"):
        dumps_function(lambda: lock)


def test_functions_pickled_by_reference_run_anywhere_as_they_are() -> None:
    made = _forms.read(dumps_function(pow, serializer="bytecode"))
    assert made is not None and made.forms == ("reference",) and made.requires == ""


def test_a_worker_refuses_bytecode_of_another_python_instead_of_running_it() -> None:
    payload = dumps_function(_closure(2), serializer="bytecode")
    made = _forms.read(payload)
    assert made is not None
    other = "3.99"
    forged = payload[: made.end] + _forms.trailer(other, made.cloudpickle, ("bytecode",))
    with pytest.raises(SerializationError, match=r"Python 3\.99.*serializer='source'"):
        loads_with_sources(forged)
    # With a source form, the worker of another Python takes that one.
    both = dumps_function(_closure(2))
    made = _forms.read(both)
    assert made is not None
    head = both[: made.end]
    forged = head + _forms.trailer(other, made.cloudpickle, made.forms, made.source_at)
    fn, _ = loads_with_sources(forged)
    assert fn(1) == [2, 2]
