"""Serialization of functions, arguments and results (cloudpickle), and content hashes."""

from __future__ import annotations

import hashlib
import pickle
import traceback
from typing import Any

import cloudpickle

from heartline._errors import SerializationError


def dumps_function(fn: Any) -> bytes:
    """Pickle a callable by value where needed; raise SerializationError if impossible."""
    if not callable(fn):
        raise SerializationError(f"{fn!r} is not callable")
    try:
        return cloudpickle.dumps(fn, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as exc:
        raise SerializationError(f"cannot serialize function {_name(fn)}: {exc}") from exc


def dumps_args(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bytes:
    """Pickle a call's arguments as the tuple ``(args, kwargs)``."""
    try:
        return cloudpickle.dumps((tuple(args), dict(kwargs)), protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as exc:
        raise SerializationError(f"cannot serialize arguments: {exc}") from exc


def dumps_result(value: Any) -> bytes:
    """Pickle a task's return value."""
    try:
        return cloudpickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as exc:
        raise SerializationError(
            f"cannot serialize the result of type {type(value).__qualname__}: {exc}"
        ) from exc


def loads(data: bytes) -> Any:
    """Unpickle a payload; a failure (e.g. a version mismatch) is a SerializationError."""
    try:
        return pickle.loads(data)
    except Exception as exc:
        raise SerializationError(f"cannot deserialize payload: {type(exc).__name__}: {exc}") from exc


def function_id(payload: bytes) -> str:
    """The content hash that names a pickled function."""
    return hashlib.sha256(payload).hexdigest()


def describe_exception(exc: BaseException) -> tuple[str, str, str]:
    """Return (qualified type name, message, traceback text) of an exception."""
    cls = type(exc)
    module = cls.__module__
    name = cls.__qualname__ if module in ("builtins", "__main__") else f"{module}.{cls.__qualname__}"
    try:
        message = str(exc)
    except Exception:  # noqa: BLE001 - a broken __str__ must not hide the error itself
        message = f"<unprintable {cls.__qualname__} object>"
    try:
        tb = "".join(traceback.format_exception(exc))
    except Exception:  # noqa: BLE001 - same, for the traceback's last line
        tb = "".join(traceback.format_tb(exc.__traceback__)) + f"{name}: {message}\n"
    return name, message, tb


def _name(fn: Any) -> str:
    return getattr(fn, "__qualname__", None) or repr(fn)
