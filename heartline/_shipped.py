"""Shipped modules in a payload, and how a worker installs them.

The client (heartline/_modules.py) finds the user's own modules a function uses; their
source travels inside the function's one pickle stream, ahead of the function
(:class:`WithModules`), so loading the payload installs them first: ``pickle.loads(payload)``
still returns the function, anywhere heartline is importable.

A worker installs a shipped module whatever it has under that name (the client's version
is what the function was written against; only a module imported there from the same
file with the same source is kept as is) through a finder first on ``sys.meta_path``,
with ``__file__`` the client's path and the source in ``linecache``, so tracebacks show
its lines. A worker runs many functions: a payload whose modules differ (by content) from
those in place reinstalls its whole set; functions loaded earlier keep the module objects
they were loaded with, and a later function that imports the module by name gets the last
one installed.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import linecache
import os
import sys
import types
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

from heartline._defaults import ENV_ENDPOINT_NAME


class ShippedModule(NamedTuple):
    """One module's source as it travels in a payload (as a plain tuple)."""

    name: str
    source: str
    filename: str
    """The client's path of its file ("" for a namespace package, which has none)."""
    is_package: bool


# --------------------------------------------------------------------------- the payload


class WithModules:
    """A function with the modules it needs: pickled as one stream that installs the
    modules, then builds the function, and loads as the function alone."""

    def __init__(self, fn: Any, modules: Sequence[ShippedModule]) -> None:
        self.fn = fn
        self.modules = modules

    def __reduce__(self) -> tuple[Any, ...]:
        # Pickle builds a call's arguments in order, so _Installer's call runs before a
        # single opcode of the function is read.
        return (_second, (_Installer(self.modules), self.fn))


class _Installer:
    def __init__(self, modules: Sequence[ShippedModule]) -> None:
        self.modules = modules

    def __reduce__(self) -> tuple[Any, ...]:
        return (install, (tuple(tuple(m) for m in self.modules),))


def _second(_installed: None, fn: Any) -> Any:
    return fn


# --------------------------------------------------------------------------- the worker


def _digest(module: ShippedModule) -> str:
    return hashlib.sha256(repr(tuple(module)).encode()).hexdigest()


class _ShippedFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports shipped modules from their source; first on ``sys.meta_path``, so the
    client's version wins over a module of the same name on the endpoint."""

    def __init__(self) -> None:
        self._shipped: dict[str, ShippedModule] = {}
        # name -> (digest, the module object installed from it)
        self._installed: dict[str, tuple[str, types.ModuleType]] = {}

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: types.ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        shipped = self._shipped.get(fullname)
        if shipped is None:
            return None
        spec = importlib.machinery.ModuleSpec(
            fullname, self, origin=shipped.filename or None, is_package=shipped.is_package
        )
        if shipped.filename:
            spec.has_location = True  # sets __file__: tracebacks name the client's path
            if shipped.is_package:
                spec.submodule_search_locations = [os.path.dirname(shipped.filename)]
        return spec

    def exec_module(self, module: types.ModuleType) -> None:
        shipped = self._shipped[module.__name__]
        filename = shipped.filename or f"<shipped {shipped.name}>"
        code = compile(shipped.source, filename, "exec", dont_inherit=True)
        exec(code, module.__dict__)  # noqa: S102 - what importing the client's file would run

    def get_source(self, fullname: str) -> str | None:
        shipped = self._shipped.get(fullname)
        return shipped.source if shipped is not None else None

    def is_package(self, fullname: str) -> bool:
        shipped = self._shipped.get(fullname)
        return shipped is not None and shipped.is_package

    def install(self, modules: Sequence[ShippedModule]) -> None:
        """Install ``modules``, unless each is here already with the same content; else
        the whole set again, so that the modules of one function see each other's
        versions (a package's ``from .core import f`` included)."""
        digests = [_digest(m) for m in modules]
        if all(self._current(m, d) for m, d in zip(modules, digests, strict=True)):
            return
        for module in modules:
            self._shipped[module.name] = module
            sys.modules.pop(module.name, None)
            if module.filename:
                # mtime None: linecache.checkcache keeps it even if the path exists here.
                lines = module.source.splitlines(keepends=True)
                linecache.cache[module.filename] = (
                    len(module.source),
                    None,
                    lines,
                    module.filename,
                )
        for module, digest in zip(modules, digests, strict=True):
            self._installed[module.name] = (digest, _import_shipped(module.name))

    def _current(self, module: ShippedModule, digest: str) -> bool:
        """Whether ``module`` is in place: installed from the same content, or imported
        here from the same file holding the same source (the client's own process, or an
        agent run from the script's folder), which is then adopted as is."""
        loaded = sys.modules.get(module.name)
        if loaded is None:
            return False
        known = self._installed.get(module.name)
        if known is not None and known[1] is loaded:
            return known[0] == digest
        if getattr(loaded, "__file__", None) != (module.filename or None):
            return False
        if module.filename and _file_text(module.filename) != module.source:
            return False
        self._installed[module.name] = (digest, loaded)
        return True


def _file_text(path: str) -> str | None:
    try:
        return importlib.util.decode_source(Path(path).read_bytes())
    except (OSError, ValueError, UnicodeDecodeError):
        return None


def _import_shipped(name: str) -> types.ModuleType:
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError:
        raise  # a module it imports is missing here: that one is named
    except (Exception, SystemExit) as exc:  # a sys.exit() at its top must not end a worker
        raise ImportError(
            f"the module {name!r} shipped with the function failed to load where this task "
            f"ran: {type(exc).__name__}: {exc}",
            name=name,
        ) from exc


_finder = _ShippedFinder()


def install(modules: Sequence[tuple[str, str, str, bool]]) -> None:
    """Install shipped modules in this process (called by unpickling a payload)."""
    if _finder not in sys.meta_path:
        sys.meta_path.insert(0, _finder)
    _finder.install([ShippedModule(*m) for m in modules])


def missing_module_error(exc: ModuleNotFoundError) -> ModuleNotFoundError:
    """The error to report for a module a payload needs that this process cannot import:
    it names the module, and the endpoint when the agent told its workers
    (``$HEARTLINE_ENDPOINT_NAME``)."""
    endpoint = os.environ.get(ENV_ENDPOINT_NAME)
    where = f"on the endpoint {endpoint!r} where it ran" if endpoint else "where it ran"
    return ModuleNotFoundError(
        f"this task needs the module {exc.name!r}, which is not installed {where}; "
        "install it on the endpoint, or list it in the client's ship_modules",
        name=exc.name,
    )
