"""Serialization of functions, arguments and results (cloudpickle), and content hashes.

Remote tracebacks keep their source lines. Code pickled by value (a script's functions,
closures, lambdas, modules registered with ``cloudpickle.register_pickle_by_value``)
arrives on the worker without its source file, and cloudpickle 3.1.3 and later also name
its file ``<dynamic-code>``. So the client ships each such code object's source lines with
it: a function's payload (and an argument payload that holds code) is the cloudpickle
stream, followed, when there is by-value code, by a second plain pickle of a
:data:`SourceMap`. ``pickle.loads`` of a payload still returns the function alone (it stops
at the first pickle's end); the worker reads both with :func:`loads_with_sources` and
:func:`describe_exception` puts each frame's file name and line back.

The user's own modules that a function uses (a script's ``mylib.py``) travel with it too,
as source, inside the same stream and ahead of the function, so that loading the payload
installs them before the function needs them (heartline/_modules.py); a module the
endpoint lacks anyway is named in the error.
"""

from __future__ import annotations

import hashlib
import io
import linecache
import pickle
import traceback
import types
import zlib
from collections.abc import Iterator
from typing import Any

import cloudpickle

from heartline import _forms, _sourceform
from heartline._defaults import MAX_PAYLOAD
from heartline._errors import SerializationError
from heartline._modules import ShipPolicy, check_size
from heartline._shipped import WithModules, missing_module_error

CodeKey = tuple[str, int, int]
"""What names a code object on both sides: (qualified name, first line, crc32 of its bytecode)."""
SourceMap = dict[CodeKey, tuple[str, dict[int, str]]]
"""Code key -> (the file it was written in, {line number: source line})."""


class _SourcePickler(cloudpickle.Pickler):
    """A cloudpickle Pickler that notes every code object it pickles (all by value)."""

    def __init__(self, file: io.BytesIO) -> None:
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self.codes: list[types.CodeType] = []

    def reducer_override(self, obj: Any) -> Any:
        if type(obj) is types.CodeType:
            self.codes.append(obj)
            return NotImplemented  # cloudpickle's own reduction, unchanged
        return super().reducer_override(obj)


def code_key(code: types.CodeType) -> CodeKey:
    return (code.co_qualname, code.co_firstlineno, zlib.crc32(code.co_code))


def _source_map(codes: list[types.CodeType]) -> SourceMap:
    """The source lines of each code object whose file can be read here."""
    sources: SourceMap = {}
    for code in codes:
        lines = linecache.getlines(code.co_filename)
        if not lines:
            continue  # typed at a prompt, or the file is gone: nothing to ship
        last = code.co_firstlineno
        for _, end, _, _ in code.co_positions():
            if end is not None and end > last:
                last = end
        wanted = range(code.co_firstlineno, min(last, len(lines)) + 1)
        sources[code_key(code)] = (code.co_filename, {n: lines[n - 1] for n in wanted})
    return sources


# Types whose values the standard pickler writes exactly as cloudpickle would (by value,
# no code, nothing looked up by name): such payloads skip cloudpickle's Pickler, whose
# set-up alone costs more than pickling a number. Exact types only: a subclass may
# reduce to anything.
_PLAIN = frozenset({int, float, str, bytes, bool, type(None)})


def _is_plain(value: Any) -> bool:
    """Whether ``value`` is a plain scalar, or a tuple, list or dict (str keys) of them."""
    kind = type(value)
    if kind in _PLAIN:
        return True
    if kind is tuple or kind is list:
        return all(type(v) in _PLAIN for v in value)
    if kind is dict:
        return all(type(k) is str and type(v) in _PLAIN for k, v in value.items())
    return False


def _dumps(obj: Any) -> bytes:
    """cloudpickle ``obj``, followed by the source map of its by-value code, if any."""
    return _dumps_noting(obj, io.BytesIO())[0]


def _dumps_noting(obj: Any, buffer: io.BytesIO) -> tuple[bytes, bool]:
    """:func:`_dumps`, and whether any code went by value."""
    pickler = _SourcePickler(buffer)
    pickler.dump(obj)
    if pickler.codes:
        sources = _source_map(pickler.codes)
        if sources:
            pickle.dump(sources, buffer, protocol=pickle.HIGHEST_PROTOCOL)
    return buffer.getvalue(), bool(pickler.codes)


_SHIP_FOUND = ShipPolicy()
_CLOUDPICKLE = cloudpickle.__version__


def dumps_function(fn: Any, ship: ShipPolicy = _SHIP_FOUND, serializer: str = "auto") -> bytes:
    """Pickle a callable by value where needed, with the local modules ``ship`` names
    (by default those it uses, found automatically) ahead of it.

    ``serializer`` picks the forms the payload carries (heartline/_forms.py): ``auto``
    the bytecode form, then the source form where there is one; ``bytecode`` the first
    only; ``source`` the second only. A function pickled by reference (no code by value)
    runs on any Python as it is, and carries that one form whatever ``serializer`` says.

    Raises:
        SerializationError: ``fn`` is not callable or cannot be pickled, or
            ``serializer="source"`` and it has no source form (the message says why).
        InvalidArgumentError: the modules it ships take its payload over the limit.
    """
    if not callable(fn):
        raise SerializationError(f"{fn!r} is not callable")
    try:
        modules = ship.modules_for(fn)
        payload, by_value = _dumps_noting(WithModules(fn, modules) if modules else fn, io.BytesIO())
    except Exception as exc:
        raise SerializationError(f"cannot serialize function {_name(fn)}: {exc}") from exc
    python = _forms.PYTHON
    if not by_value:
        payload += _forms.trailer(python, _CLOUDPICKLE, (_forms.REFERENCE,))
    elif serializer == _forms.BYTECODE:
        payload += _forms.trailer(python, _CLOUDPICKLE, (_forms.BYTECODE,))
    else:
        try:
            source = _sourceform.make(fn, modules)
        except _sourceform.NoSource as exc:
            if serializer == _forms.SOURCE:
                raise SerializationError(
                    f"{_name(fn)} has no source form, so it can run only on Python {python} "
                    f"(serializer='source'): {exc}"
                ) from None
            source = None
        except Exception as exc:
            if serializer == _forms.SOURCE:
                raise SerializationError(
                    f"cannot make the source form of {_name(fn)}: {exc}"
                ) from exc
            source = None
        if source is None:
            payload += _forms.trailer(python, _CLOUDPICKLE, (_forms.BYTECODE,))
        elif serializer == _forms.SOURCE:
            payload = source + _forms.trailer(python, _CLOUDPICKLE, (_forms.SOURCE,))
        else:
            at = len(payload)
            forms = (_forms.BYTECODE, _forms.SOURCE)
            payload += source + _forms.trailer(python, _CLOUDPICKLE, forms, at)
    check_size(f"the function {_name(fn)}", modules, len(payload), MAX_PAYLOAD)
    return payload


def dumps_args(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bytes:
    """Pickle a call's arguments as the tuple ``(args, kwargs)``."""
    try:
        args, kwargs = tuple(args), dict(kwargs)
        if _is_plain(args) and _is_plain(kwargs):
            # No code inside, so no source map either: the payload is this one pickle.
            return pickle.dumps((args, kwargs), protocol=pickle.HIGHEST_PROTOCOL)
        return _dumps((args, kwargs))
    except Exception as exc:
        raise SerializationError(f"cannot serialize arguments: {exc}") from exc


class TaskInput:
    """A placeholder in a task's arguments for the result of another task (its input).

    The client puts one where a ``TaskRef`` or a future sat, at the top level of args or
    kwargs, and names the input tasks in the same order; the worker puts each input's
    result in its place (:func:`fill_inputs`) before the call.
    """

    __slots__ = ("index",)

    def __init__(self, index: int) -> None:
        self.index = index

    def __reduce__(self) -> tuple[Any, ...]:
        return (TaskInput, (self.index,))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TaskInput) and other.index == self.index

    def __hash__(self) -> int:
        return hash((TaskInput, self.index))

    def __repr__(self) -> str:
        return f"TaskInput({self.index})"


def fill_inputs(
    args: tuple[Any, ...], kwargs: dict[str, Any], inputs: list[Any]
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Put the input results in place of the top-level :class:`TaskInput` placeholders.

    Raises:
        SerializationError: a placeholder names an input that was not given.
    """

    def fill(value: Any) -> Any:
        if type(value) is TaskInput:
            if not 0 <= value.index < len(inputs):
                raise SerializationError(
                    f"the arguments name input {value.index}, but the task has {len(inputs)} inputs"
                )
            return inputs[value.index]
        return value

    return tuple(fill(a) for a in args), {k: fill(v) for k, v in kwargs.items()}


def loads_with_sources(data: bytes) -> tuple[Any, SourceMap]:
    """Unpickle a function or argument payload and the source map that may follow it;
    the modules shipped in a function payload are installed in this process first.

    Raises:
        ModuleNotFoundError: the payload needs a module this process cannot import;
            the message names it (and the endpoint, see heartline/_shipped.py).
        Exception: whatever else unpickling raises (the caller says which payload failed).
    """
    made = _forms.read(data) if data[-1:] != b"." else None
    if made is not None:
        if made.python != _forms.PYTHON and _forms.BYTECODE in made.forms:
            if _forms.SOURCE not in made.forms:
                # Bytecode of another minor version may crash the process that runs
                # it: refuse it here (the server sends none such; this is the backstop).
                raise SerializationError(
                    f"this function was serialized as bytecode on Python {made.python}, "
                    f"which this worker's Python {_forms.PYTHON} cannot run: submit it with "
                    f"serializer='source', or run an agent on Python {made.python}"
                )
            return _load_source(data[made.source_at : made.end])
        if made.forms == (_forms.SOURCE,):
            return _load_source(data[: made.end])
        data = data[: made.source_at or made.end]
    stream = io.BytesIO(data)
    value = _unpickle(stream)
    sources: SourceMap = {}
    if stream.tell() < len(data):
        found = pickle.load(stream)
        if isinstance(found, dict):
            sources = found
    return value, sources


def _load_source(data: bytes) -> tuple[Any, SourceMap]:
    """Load a source form: its function, compiled on this Python, and its lines."""
    return _unpickle(io.BytesIO(data)), _sourceform.SOURCES


def _unpickle(stream: io.BytesIO) -> Any:
    """The next pickle of ``stream``; a module it needs and this process lacks is named
    in the error (heartline/_shipped.py)."""
    try:
        return pickle.load(stream)
    except ModuleNotFoundError as exc:
        if exc.name is None:
            raise
        # The new message says all; the unpickler's frames would only hide it.
        raise missing_module_error(exc) from None


def dumps_result(value: Any) -> bytes:
    """Pickle a task's return value."""
    if _is_plain(value):
        return pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
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
        raise SerializationError(
            f"cannot deserialize payload on this Python {_forms.PYTHON} (cloudpickle "
            f"{_CLOUDPICKLE}): {type(exc).__name__}: {exc} (a value pickled on another "
            "Python version, or of a class or module this process lacks, may not load)"
        ) from exc


def function_id(payload: bytes) -> str:
    """The content hash that names a pickled function."""
    return hashlib.sha256(payload).hexdigest()


def describe_exception(
    exc: BaseException, sources: SourceMap | None = None
) -> tuple[str, str, str]:
    """Return (qualified type name, message, traceback text) of an exception.

    Frames of code that came by value get their file name and source line from
    ``sources`` (see the module docstring).
    """
    cls = type(exc)
    module = cls.__module__
    name = (
        cls.__qualname__ if module in ("builtins", "__main__") else f"{module}.{cls.__qualname__}"
    )
    try:
        message = str(exc)
    except Exception:  # noqa: BLE001 - a broken __str__ must not hide the error itself
        message = f"<unprintable {cls.__qualname__} object>"
    try:
        report = traceback.TracebackException.from_exception(exc)
        if sources:
            _restore_sources(report, exc, sources, set())
        tb = "".join(report.format())
    except Exception:  # noqa: BLE001 - same, for the traceback's last line
        tb = "".join(traceback.format_tb(exc.__traceback__)) + f"{name}: {message}\n"
    return name, message, tb


def _restore_sources(
    report: traceback.TracebackException, exc: BaseException, sources: SourceMap, seen: set[int]
) -> None:
    """Give the frames of by-value code in ``report`` (and its chain) their source back."""
    if id(report) in seen:
        return
    seen.add(id(report))
    frames = list(_frames(exc.__traceback__))
    if len(frames) == len(report.stack):
        for i, (code, summary) in enumerate(zip(frames, report.stack, strict=True)):
            known = sources.get(code_key(code))
            if known is None:
                continue
            filename, lines = known
            line = lines.get(summary.lineno or 0)
            if line is None:
                continue
            report.stack[i] = traceback.FrameSummary(
                filename,
                summary.lineno,
                summary.name,
                lookup_line=False,
                line=line.rstrip("\n"),
                end_lineno=summary.end_lineno,
                colno=summary.colno,
                end_colno=summary.end_colno,
            )
    for nested, cause in (
        (report.__cause__, exc.__cause__),
        (report.__context__, exc.__context__),
    ):
        if nested is not None and cause is not None:
            _restore_sources(nested, cause, sources, seen)
    for nested, member in zip(
        getattr(report, "exceptions", None) or (),
        getattr(exc, "exceptions", None) or (),
        strict=False,
    ):
        _restore_sources(nested, member, sources, seen)


def _frames(tb: types.TracebackType | None) -> Iterator[types.CodeType]:
    while tb is not None:
        yield tb.tb_frame.f_code
        tb = tb.tb_next


def _name(fn: Any) -> str:
    return getattr(fn, "__qualname__", None) or repr(fn)
