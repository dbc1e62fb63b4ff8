"""The source form of a function: what lets it run on another Python minor version.

cloudpickle writes a function made by value (a script's, a closure, a lambda) as its
bytecode, which only the Python minor version that made it can run. Where the function's
source is at hand, the client also writes a *source form*: a plain pickle (no code inside,
so any Python reads it) of each by-value function's source text, where it was written,
its closure's cell values and the globals it names, with the shipped modules it needs. A
worker on another minor version compiles the source again on its own Python
(:func:`rebuild`), with the same file name and line numbers, so tracebacks point at the
user's lines.

What it takes: every value it carries must pickle with the standard pickler without
referring to ``__main__`` (plain data, and functions and classes of importable modules by
reference); modules are imported by name; a by-value function it names (a helper in the
same script, a closure's inner function) gets a source form of its own. Anything else (a
lock in a closure, an instance of a class of the script) means no source form:
:class:`NoSource` says why.
"""

from __future__ import annotations

import ast
import builtins
import importlib
import inspect
import io
import pickle
import types
import zlib
from collections.abc import Sequence
from typing import Any

from heartline._shipped import _Installer

__all__ = ["NoSource", "make", "rebuild"]


class NoSource(Exception):
    """The function has no source form; the message says why."""


_MODULE = "m"
_FUNCTION = "f"
_DATA = "d"


class _StrictPickler(pickle.Pickler):
    """The standard pickler, refusing what would not load on a worker by name."""

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, (type, types.FunctionType)):
            module = getattr(obj, "__module__", None)
            if module == "__main__" or "<locals>" in getattr(obj, "__qualname__", ""):
                raise NoSource(f"{_name(obj)} is defined in a script or a function")
        elif isinstance(obj, types.ModuleType):
            raise NoSource(f"module {obj.__name__} inside a value")
        return NotImplemented


def _check_plain(value: Any, what: str) -> Any:
    try:
        _StrictPickler(io.BytesIO(), protocol=pickle.HIGHEST_PROTOCOL).dump(value)
    except NoSource as exc:
        raise NoSource(f"{what}: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - any pickling error means "not plain data"
        raise NoSource(f"{what} is not plain data ({type(exc).__name__}: {exc})") from None
    return value


def _by_value(fn: types.FunctionType) -> bool:
    """Whether cloudpickle would write ``fn`` as bytecode (not importable by name)."""
    module = getattr(fn, "__module__", None)
    if module in (None, "__main__") or "<locals>" in fn.__qualname__ or fn.__name__ == "<lambda>":
        return True
    try:
        found: Any = importlib.import_module(module)
        for part in fn.__qualname__.split("."):
            found = getattr(found, part)
    except Exception:  # noqa: BLE001 - not found by name: by value
        return True
    return found is not fn


def _global_names(code: types.CodeType) -> set[str]:
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _global_names(const)
    return names


class _Builder:
    def __init__(self) -> None:
        self.functions: list[tuple[Any, ...]] = []
        self.index: dict[int, int] = {}
        self.namespaces: dict[str, dict[str, tuple[str, Any]]] = {}

    def value(self, value: Any, what: str) -> tuple[str, Any]:
        if isinstance(value, types.ModuleType):
            return (_MODULE, value.__name__)
        if isinstance(value, types.FunctionType) and _by_value(value):
            return (_FUNCTION, self.function(value))
        return (_DATA, _check_plain(value, what))

    def function(self, fn: types.FunctionType) -> int:
        known = self.index.get(id(fn))
        if known is not None:
            return known
        index = self.index[id(fn)] = len(self.functions)
        self.functions.append(())  # its place, filled below (it may name itself)
        code = fn.__code__
        source, lambda_at = _source_of(fn)
        module = fn.__globals__.get("__name__", "__main__")
        namespace = self.namespaces.setdefault(module, {})
        for name in sorted(_global_names(code)):
            if name in namespace or name not in fn.__globals__:
                continue  # a builtin, an attribute name, or one a name already gave
            namespace[name] = self.value(fn.__globals__[name], f"the global {name!r}")
        cells = tuple(
            self.value(cell.cell_contents, f"the closure variable {name!r}")
            for name, cell in zip(code.co_freevars, fn.__closure__ or (), strict=True)
        )
        defaults = _check_plain(fn.__defaults__, "a default value")
        kwdefaults = _check_plain(fn.__kwdefaults__, "a default value")
        self.functions[index] = (
            module,
            fn.__name__,
            fn.__qualname__,
            code.co_filename,
            code.co_firstlineno,
            source,
            lambda_at,
            code.co_freevars,
            cells,
            defaults,
            kwdefaults,
        )
        return index


def _source_of(fn: types.FunctionType) -> tuple[str, int]:
    """The source text of ``fn`` (a lambda's: its whole lines), and for a lambda its
    column (else -1)."""
    try:
        lines, _ = inspect.getsourcelines(fn)
    except (OSError, TypeError) as exc:
        raise NoSource(f"the source of {_name(fn)} is not available ({exc})") from None
    source = "".join(lines)
    if fn.__name__ != "<lambda>":
        return source, -1
    # A lambda: find it among the lambdas of its lines, by line and parameter names.
    try:
        tree = _parse(source)
    except SyntaxError:
        raise NoSource(f"the lambda of {_name(fn)} is not on lines of its own") from None
    code = fn.__code__
    wanted = code.co_varnames[: code.co_argcount + code.co_kwonlyargcount]
    found = [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.Lambda)
        and node.lineno == 1
        and tuple(a.arg for a in node.args.posonlyargs + node.args.args + node.args.kwonlyargs)
        == wanted
    ]
    if len(found) != 1:
        raise NoSource("its line holds more than one lambda like it")
    return source, found[0].col_offset


def _parse(source: str) -> ast.Module:
    """Parse indented source in place: columns and line numbers are kept."""
    if source[:1] in (" ", "\t"):
        tree = ast.parse("if 1:\n" + source)
        ast.increment_lineno(tree, -1)
        body = tree.body[0]
        assert isinstance(body, ast.If)
        return ast.Module(body=body.body, type_ignores=[])
    return ast.parse(source)


def make(fn: Any, modules: Sequence[tuple[str, str, str, bool]]) -> bytes:
    """The source form of ``fn`` with the shipped ``modules`` it needs: a plain pickle
    that loads as the function on any Python.

    Raises:
        NoSource: it has none (the message says why).
    """
    if not isinstance(fn, types.FunctionType):
        raise NoSource(f"{_name(fn)} is not a plain Python function")
    builder = _Builder()
    target = builder.function(fn)
    spec = (1, builder.namespaces, builder.functions, target)
    return pickle.dumps(_Rebuild(modules, spec), protocol=pickle.HIGHEST_PROTOCOL)


class _Rebuild:
    def __init__(self, modules: Sequence[tuple[str, str, str, bool]], spec: tuple[Any, ...]):
        self.modules = modules
        self.spec = spec

    def __reduce__(self) -> tuple[Any, ...]:
        # The shipped modules are installed before a value that names one of them is
        # read: pickle builds a call's arguments in order (as WithModules does).
        return (_rebuild_after, (_Installer(self.modules), self.spec))


def _rebuild_after(_installed: None, spec: tuple[Any, ...]) -> Any:
    return rebuild(spec)


SOURCES: dict[tuple[str, int, int], tuple[str, dict[int, str]]] = {}
"""Source lines of every code object :func:`rebuild` made in this process, by code key
(heartline/_serialize.py ``SourceMap``): tracebacks of rebuilt functions show them."""


def rebuild(spec: tuple[Any, ...]) -> Any:
    """Compile a source form on this Python; return its function."""
    _version, namespaces, functions, target = spec
    globals_of = {module: {"__name__": module, "__builtins__": builtins} for module in namespaces}
    made: list[types.FunctionType] = []
    closures: list[tuple[types.FunctionType, tuple[tuple[str, Any], ...]]] = []
    freevars_of: dict[int, tuple[str, ...]] = {}
    for entry in functions:
        module, name, qualname, filename, firstline, source, lambda_at, freevars = entry[:8]
        cells, defaults, kwdefaults = entry[8:]
        fn = _compile(globals_of[module], name, filename, firstline, source, lambda_at, freevars)
        fn.__qualname__ = qualname
        fn.__defaults__ = defaults
        fn.__kwdefaults__ = kwdefaults
        made.append(fn)
        closures.append((fn, cells))
        freevars_of[id(fn)] = freevars
        _remember(fn.__code__, filename, firstline, source)

    def value(spec: tuple[str, Any]) -> Any:
        kind, data = spec
        if kind == _MODULE:
            return importlib.import_module(data)
        if kind == _FUNCTION:
            return made[data]
        return data

    for module, names in namespaces.items():
        namespace = globals_of[module]
        for name, spec_ in names.items():
            namespace[name] = value(spec_)
    for fn, cells in closures:
        # By name: a function that calls itself by its name closes over the factory's
        # binding of it (already itself), a variable the original did not have.
        by_name = dict(zip(freevars_of[id(fn)], cells, strict=True))
        for name, cell in zip(fn.__code__.co_freevars, fn.__closure__ or (), strict=True):
            if name in by_name:
                cell.cell_contents = value(by_name[name])
    return made[target]


def _compile(
    namespace: dict[str, Any],
    name: str,
    filename: str,
    firstline: int,
    source: str,
    lambda_at: int,
    freevars: tuple[str, ...],
) -> types.FunctionType:
    tree = _parse(source)
    if lambda_at >= 0:
        node: ast.expr | ast.stmt = next(
            n
            for n in ast.walk(tree)
            if isinstance(n, ast.Lambda) and n.lineno == 1 and n.col_offset == lambda_at
        )
    else:
        node = tree.body[0]
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            raise TypeError(f"the source of {name} is not a function definition")
        node.decorator_list = []
    _strip_evaluated(node)
    result = ast.Name(id=name, ctx=ast.Load())
    body: list[ast.stmt]
    if isinstance(node, ast.Lambda):
        body = [ast.Return(value=node)]
    else:
        body = [node, ast.Return(value=result)]
    # A factory whose parameters are the closure's variables: the function made inside
    # it closes over them as the original did; their values are set after (rebuild()).
    factory = ast.FunctionDef(
        name="__heartline_factory__",
        args=ast.arguments(
            posonlyargs=[],
            args=[ast.arg(arg=v) for v in freevars],
            kwonlyargs=[],
            kw_defaults=[],
            defaults=[],
        ),
        body=body,
        decorator_list=[],
        returns=None,
    )
    if "type_params" in ast.FunctionDef._fields:  # Python 3.12 and later
        factory.type_params = []
    module = ast.Module(body=[factory], type_ignores=[])
    ast.fix_missing_locations(module)
    ast.increment_lineno(module, firstline - 1)
    local: dict[str, Any] = {}
    exec(compile(module, filename, "exec"), namespace, local)  # noqa: S102 - the user's own code
    return local["__heartline_factory__"](*(None,) * len(freevars))


def _strip_evaluated(node: ast.AST) -> None:
    """Drop what a definition evaluates where it stands (defaults, annotations): the
    defaults travel as values, and annotations may name what the worker lacks."""
    args = node.args  # type: ignore[attr-defined]
    args.defaults = [ast.Constant(value=None) for _ in args.defaults]
    args.kw_defaults = [None if d is None else ast.Constant(value=None) for d in args.kw_defaults]
    for arg in args.posonlyargs + args.args + args.kwonlyargs + [args.vararg, args.kwarg]:
        if arg is not None:
            arg.annotation = None
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        node.returns = None


def _remember(code: types.CodeType, filename: str, firstline: int, source: str) -> None:
    lines = {firstline + i: line for i, line in enumerate(source.splitlines(keepends=True))}
    stack = [code]
    while stack:
        current = stack.pop()
        key = (current.co_qualname, current.co_firstlineno, zlib.crc32(current.co_code))
        SOURCES[key] = (filename, lines)
        stack.extend(c for c in current.co_consts if isinstance(c, types.CodeType))


def _name(obj: Any) -> str:
    return getattr(obj, "__qualname__", None) or repr(obj)
