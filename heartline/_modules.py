"""Local modules that travel with a function: which ones, found on the client.

cloudpickle sends a script's ``__main__`` functions, closures and lambdas by value, but a
function of an imported module by reference (``mylib.helper``): the endpoint must import
``mylib`` itself. Installed packages (numpy, the standard library) are the endpoint's
business; the user's own modules beside a script or a notebook (**local** modules) are
not, so the client ships their source with the function:

- A module is local when it has a ``.py`` source file outside the standard library and
  every site-packages/dist-packages folder, is not heartline's own, not ``__main__`` and
  not registered with ``cloudpickle.register_pickle_by_value`` (cloudpickle already sends
  those by value), and is not installed another way: not imported from a folder a .pth
  file puts on ``sys.path``, and no installed distribution provides its top-level name.
  So an editable install of the user's own project (any tool's) counts as installed and
  goes by reference, like any package: install it on the endpoint too, or name it in
  ``ship_modules``.
- Which modules a function uses: the globals its code names (through nested code,
  closures, defaults, and the by-value functions and classes it reaches) mapped to their
  modules, the modules it imports in its body, and its own module. Then, transitively,
  what each shipped module holds at its top level (its imports), imports in its
  functions' bodies, its parent package, and the submodules of packages that code names
  (``pkg.sub.f()``): a package ships its ``__init__`` and the loaded submodules used.
- The payload carries them ahead of the function, and a worker installs them:
  heartline/_shipped.py.

Discovery runs once per function object (the client caches payloads), never per task.
"""

from __future__ import annotations

import collections
import dataclasses
import dis
import functools
import importlib
import importlib.abc
import importlib.machinery
import importlib.metadata
import importlib.util
import os
import site
import sys
import sysconfig
import threading
import types
import weakref
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple, TypeAlias

import cloudpickle

from heartline._errors import InvalidArgumentError
from heartline._lru import LruCache
from heartline._shipped import ShippedModule

ShipModules: TypeAlias = "bool | Iterable[str | types.ModuleType] | None"
"""The ``ship_modules`` keyword of the clients: True or None (ship local modules found
automatically), False (ship nothing), or extra modules (names or module objects) to ship
besides those found."""


_OWN_PACKAGE = __name__.partition(".")[0]
_INSTALL_FOLDERS = frozenset({"site-packages", "dist-packages"})
# Objects one discovery looks at, at most: a global list of a million numbers must not
# cost a million steps. Past it the discovery ships what it found so far.
_WALK_BUDGET = 20_000


# --------------------------------------------------------------------------- which ones


@dataclasses.dataclass(frozen=True)
class ShipPolicy:
    """Which modules travel by value with a client's functions."""

    auto: bool = True
    """Ship the local modules a function uses, found automatically."""
    extra: tuple[types.ModuleType, ...] = ()
    """Modules shipped with every function besides those found (``ship_modules=[...]``)."""

    @classmethod
    def of(cls, ship_modules: ShipModules) -> ShipPolicy:
        """Validate the clients' ``ship_modules`` keyword.

        Raises:
            InvalidArgumentError: it is not a bool or a list of module names or modules,
                or a named module does not import here or has no Python source to ship.
        """
        if ship_modules is None or ship_modules is True:
            return cls()
        if ship_modules is False:
            return cls(auto=False)
        if isinstance(ship_modules, (str, types.ModuleType)) or not isinstance(
            ship_modules, Iterable
        ):
            raise InvalidArgumentError(
                "ship_modules must be True, False or a list of module names or modules, "
                f"not {ship_modules!r}"
            )
        return cls(extra=tuple(_extra_module(item) for item in ship_modules))

    def modules_for(self, fn: Any) -> tuple[ShippedModule, ...]:
        """The modules to ship with ``fn``, each after the modules it needs."""
        registered = cloudpickle.list_registry_pickle_by_value()
        roots = dict.fromkeys(self.extra)
        if self.auto:
            roots.update(dict.fromkeys(_Walk(registered).modules_used_by(fn)))
        if not roots:
            return ()
        return _closures.shipped(tuple(roots), tuple(sorted(registered)))


def _extra_module(item: Any) -> types.ModuleType:
    if isinstance(item, str):
        try:
            module = importlib.import_module(item)
        except Exception as exc:
            raise InvalidArgumentError(
                f"ship_modules names {item!r}, which does not import here: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
    elif isinstance(item, types.ModuleType):
        module = item
    else:
        raise InvalidArgumentError(f"ship_modules takes module names or modules, not {item!r}")
    if _is_own(module.__name__):
        raise InvalidArgumentError(
            f"ship_modules names {module.__name__!r}: heartline is on every endpoint already"
        )
    if _source_file(module) is None and not _is_namespace(module):
        raise InvalidArgumentError(
            f"ship_modules names {module.__name__!r}, which has no Python source to ship "
            "(a built-in or compiled module): install it on the endpoint"
        )
    return module


def _is_own(name: str) -> bool:
    return name.partition(".")[0] == _OWN_PACKAGE


def _source_file(module: types.ModuleType) -> str | None:
    path = getattr(module, "__file__", None)
    return path if isinstance(path, str) and path.endswith(".py") else None


def _is_namespace(module: types.ModuleType) -> bool:
    return getattr(module, "__file__", None) is None and hasattr(module, "__path__")


@functools.cache
def _site_folders() -> tuple[str, ...]:
    """Every site-packages folder of this interpreter."""
    paths = {sysconfig.get_path("purelib"), sysconfig.get_path("platlib")}
    # An old virtualenv's site module lacks these: its folders are sysconfig's above.
    paths.update(getattr(site, "getsitepackages", list)())
    paths.add(getattr(site, "getusersitepackages", str)())
    return tuple(sorted({os.path.realpath(p) for p in paths if p}))


@functools.cache
def _installed_folders() -> tuple[str, ...]:
    """The standard library's and every site-packages folder, each ending in a separator."""
    paths = {sysconfig.get_path("stdlib"), sysconfig.get_path("platstdlib"), *_site_folders()}
    return tuple(sorted({os.path.join(os.path.realpath(p), "") for p in paths if p}))


@functools.cache
def _pth_folders() -> frozenset[str]:
    """Folders that .pth files in the site folders put on ``sys.path``: where the
    editable installs of pip, hatch, flit, pdm and setuptools' compat mode leave the code."""
    folders = set()
    for site_folder in _site_folders():
        try:
            names = [n for n in os.listdir(site_folder) if n.endswith(".pth")]
        except OSError:
            continue
        for name in names:
            try:
                lines = Path(site_folder, name).read_text(errors="replace").splitlines()
            except OSError:
                continue
            for line in lines:
                line = line.strip()
                if line and not line.startswith(("#", "import ", "import\t")):
                    folders.add(os.path.realpath(os.path.join(site_folder, line)))
    return frozenset(folders)


@functools.cache
def _distributed_names() -> frozenset[str]:
    """Top-level import names that installed distributions provide: setuptools' editable
    installs (an import hook, no .pth folder) and ``pip install --target`` folders. Read
    once, and only once a module passed the cheaper tests: it opens every distribution."""
    return frozenset(importlib.metadata.packages_distributions())


def _is_installed_path(path: str) -> bool:
    real = os.path.realpath(path)
    return real.startswith(_installed_folders()) or not _INSTALL_FOLDERS.isdisjoint(
        Path(real).parts
    )


def _import_root(path: str, levels: int) -> str:
    """The ``sys.path`` folder a module was imported from: ``levels`` folders above the
    one its file (or, for a namespace package, its folder) is in."""
    parents = Path(os.path.realpath(path)).parents
    return str(parents[min(levels, len(parents) - 1)])


# Verdicts by module name, with the module they were made for (a reloaded or replaced
# module is judged again). Client side only.
_verdicts: dict[str, tuple[types.ModuleType, bool]] = {}


def is_local(module: types.ModuleType, registered: Iterable[str] = ()) -> bool:
    """Whether ``module`` is one of the user's own, shipped by value (see the module
    docstring); ``registered`` holds the names registered by value with cloudpickle."""
    name = module.__name__
    if name == "__main__" or _is_own(name) or _under(name, registered):
        return False
    known = _verdicts.get(name)
    if known is not None and known[0] is module:
        return known[1]
    verdict = _judge(module)
    _verdicts[name] = (module, verdict)
    return verdict


def _judge(module: types.ModuleType) -> bool:
    depth = module.__name__.count(".")
    path = _source_file(module)
    if path is not None:
        places = [path]
        roots = [_import_root(path, depth + hasattr(module, "__path__"))]
    elif _is_namespace(module):
        places = [p for p in getattr(module, "__path__", ()) if isinstance(p, str)]
        roots = [_import_root(p, depth) for p in places]
    else:
        return False  # built-in, compiled, or made in memory: nothing to ship
    if not places or any(_is_installed_path(p) for p in places):
        return False
    if not _pth_folders().isdisjoint(roots):
        return False
    return module.__name__.partition(".")[0] not in _distributed_names()


def _under(name: str, registered: Iterable[str]) -> bool:
    return any(name == r or name.startswith(r + ".") for r in registered)


# --------------------------------------------------------------------------- code


class _CodeRefs(NamedTuple):
    """What a code object (and the code nested in it) refers to by name."""

    names: tuple[str, ...]
    """Every name in ``co_names``, sorted: globals, and attribute names too (as cloudpickle
    itself reads them); only those the globals hold count."""
    imports: tuple[tuple[str, int, tuple[str, ...]], ...]
    """Its import statements: (module name, level, from-list)."""


_IMPORT_NAME = dis.opmap["IMPORT_NAME"]
_CONSTANT_OPS = frozenset({"LOAD_CONST", "LOAD_SMALL_INT"})
# Closures made in a loop share their code object: read each once.
_code_refs_cache: weakref.WeakKeyDictionary[types.CodeType, _CodeRefs] = weakref.WeakKeyDictionary()


def code_refs(code: types.CodeType) -> _CodeRefs:
    """The names and imports of ``code`` and of every code object nested in it."""
    known = _code_refs_cache.get(code)
    if known is not None:
        return known
    names: set[str] = set()
    imports: list[tuple[str, int, tuple[str, ...]]] = []
    stack = [code]
    while stack:
        current = stack.pop()
        names.update(current.co_names)
        if _IMPORT_NAME in current.co_code:  # a cheap filter before reading the bytecode
            imports.extend(_imports_in(current))
        stack.extend(c for c in current.co_consts if isinstance(c, types.CodeType))
    refs = _CodeRefs(tuple(sorted(names)), tuple(imports))
    _code_refs_cache[code] = refs
    return refs


def _imports_in(code: types.CodeType) -> Iterator[tuple[str, int, tuple[str, ...]]]:
    """Each import of one code object: its name, level and from-list, which the two
    constants loaded just before ``IMPORT_NAME`` hold."""
    constants: list[Any] = []
    for instruction in dis.get_instructions(code):
        if instruction.opname in _CONSTANT_OPS:
            constants.append(instruction.argval)
            continue
        if instruction.opname == "IMPORT_NAME":
            level, fromlist = constants[-2:] if len(constants) >= 2 else (0, None)
            yield (
                instruction.argval,
                level if isinstance(level, int) else 0,
                tuple(f for f in fromlist if isinstance(f, str))
                if isinstance(fromlist, tuple)
                else (),
            )
        constants.clear()


def imported_modules(refs: _CodeRefs, package: str | None) -> Iterator[types.ModuleType]:
    """The loaded modules that the import statements of ``refs`` name, resolved against
    ``package`` (for relative imports): ``import a.b`` names a and a.b; ``from a import
    b`` names a, and a.b when that is a module."""
    for name, level, fromlist in refs.imports:
        try:
            base = importlib.util.resolve_name("." * level + name, package) if level else name
        except (ImportError, ValueError):
            continue  # a relative import outside a package: nothing to find
        if not base:
            continue
        parts = base.split(".")
        wanted = [".".join(parts[: i + 1]) for i in range(len(parts))]
        wanted += [f"{base}.{item}" for item in fromlist]
        for candidate in wanted:
            module = sys.modules.get(candidate)
            if isinstance(module, types.ModuleType):
                yield module


def submodules_named(
    modules: Iterable[types.ModuleType], names: Sequence[str]
) -> Iterator[types.ModuleType]:
    """The loaded submodules of the packages among ``modules`` that code using ``names``
    reaches as attributes: ``pkg.sub.f()`` names ``sub``, so ``pkg.sub`` is used (and,
    ``sub`` being a package too, so on down). A submodule loaded but never named stays."""
    packages = [m for m in modules if hasattr(m, "__path__")]
    seen = {p.__name__ for p in packages}
    while packages:
        package = packages.pop()
        for name in names:
            sub = sys.modules.get(f"{package.__name__}.{name}")
            if isinstance(sub, types.ModuleType) and sub.__name__ not in seen:
                seen.add(sub.__name__)
                yield sub
                if hasattr(sub, "__path__"):
                    packages.append(sub)


# --------------------------------------------------------------------------- discovery


def _home(obj: Any) -> types.ModuleType | None:
    """The module an object comes from: itself for a module, else its ``__module__``
    (a function's or class's own, an instance's class's)."""
    if isinstance(obj, types.ModuleType):
        return obj
    try:
        name = getattr(obj, "__module__", None)
        if not isinstance(name, str):
            name = getattr(type(obj), "__module__", None)
    except Exception:  # noqa: BLE001 - a proxy object's __getattr__ may raise anything
        return None
    module = sys.modules.get(name) if isinstance(name, str) else None
    return module if isinstance(module, types.ModuleType) else None


class _Walk:
    """One discovery: from a function through what cloudpickle would pickle by value,
    noting the local modules each object comes from."""

    def __init__(self, registered: Iterable[str]) -> None:
        self.registered = tuple(registered)
        self.found: dict[types.ModuleType, None] = {}
        self._seen: set[int] = set()

    def modules_used_by(self, fn: Any) -> list[types.ModuleType]:
        """The local modules ``fn`` uses directly, in a stable order."""
        stack = [fn]
        budget = _WALK_BUDGET
        while stack and budget:
            obj = stack.pop()
            if id(obj) in self._seen:
                continue
            self._seen.add(id(obj))
            budget -= 1
            home = _home(obj)
            if home is not None and is_local(home, self.registered):
                self.found[home] = None
            if not isinstance(obj, types.ModuleType):
                stack.extend(self._references(obj))
        return sorted(self.found, key=lambda m: m.__name__)

    def _references(self, obj: Any) -> Iterable[Any]:
        kind = type(obj)
        if kind in (list, tuple, set, frozenset):
            return obj
        if kind is dict:
            return [*obj.keys(), *obj.values()]
        if isinstance(obj, types.FunctionType):
            return self._function_references(obj) if self._by_value(obj) else ()
        if isinstance(obj, type):
            return self._class_references(obj) if self._by_value(obj) else ()
        if isinstance(obj, types.MethodType):
            return (obj.__func__, obj.__self__)
        if isinstance(obj, functools.partial):
            return (obj.func, *obj.args, *obj.keywords.values())
        if isinstance(obj, (staticmethod, classmethod)):
            return (obj.__func__,)
        if isinstance(obj, property):
            return (obj.fget, obj.fset, obj.fdel)
        if isinstance(obj, (types.BuiltinFunctionType, types.CodeType)):
            return ()
        # An instance (a callable object, a global): cloudpickle pickles its class and
        # its state.
        state = getattr(obj, "__dict__", None)
        return (kind, *state.values()) if isinstance(state, dict) else (kind,)

    def _by_value(self, obj: types.FunctionType | type) -> bool:
        """Whether cloudpickle pickles this function or class by value: it is not
        found under its qualified name in an importable module (``__main__``, modules
        registered by value, closures, lambdas)."""
        name = getattr(obj, "__module__", None)
        if not isinstance(name, str) or name == "__main__" or _under(name, self.registered):
            return True
        found: Any = sys.modules.get(name)
        try:
            for part in getattr(obj, "__qualname__", "<unnamed>").split("."):
                found = getattr(found, part, None)
        except Exception:  # noqa: BLE001 - a module's __getattr__ may raise anything
            return True
        return found is not obj

    @staticmethod
    def _function_references(fn: types.FunctionType) -> list[Any]:
        refs = code_refs(fn.__code__)
        scope = fn.__globals__
        found: list[Any] = [scope[n] for n in refs.names if n in scope]
        found.extend(imported_modules(refs, scope.get("__package__")))
        modules = [m for m in found if isinstance(m, types.ModuleType)]
        found.extend(submodules_named(modules, refs.names))
        for cell in fn.__closure__ or ():
            try:
                found.append(cell.cell_contents)
            except ValueError:  # an empty cell
                pass
        found.extend(fn.__defaults__ or ())
        found.extend((fn.__kwdefaults__ or {}).values())
        found.extend(fn.__dict__.values())  # e.g. __wrapped__
        return found

    @staticmethod
    def _class_references(kind: type) -> list[Any]:
        return [*kind.__bases__, *vars(kind).values()]


def _related(module: types.ModuleType) -> Iterator[types.ModuleType]:
    """The modules a module needs where it is installed: its parent package, what its
    top level holds (imported modules, and functions, classes and values from other
    modules), the imports in its functions' bodies, and the submodules its code names
    (``pkg.sub`` works on the client, so it must on the endpoint).

    A package's attributes hold every submodule anybody loaded; only those its own
    code imports or names count, or a package would ship all of them.
    """
    name = module.__name__
    parent = sys.modules.get(name.rpartition(".")[0])
    if isinstance(parent, types.ModuleType):
        yield parent
    inside = name + "."
    used = [module]
    for value in list(vars(module).values()):
        if isinstance(value, types.ModuleType) and value.__name__.startswith(inside):
            continue  # set by the import system when anybody imported it
        home = _home(value)
        if home is not None and home is not module:
            used.append(home)
    source = _read_source(module)
    if source is not None:
        package = name if hasattr(module, "__path__") else name.rpartition(".")[0]
        used.extend(imported_modules(source.refs, package))
        used.extend(submodules_named(used, source.refs.names))
    yield from used[1:]


def _closure(
    roots: Iterable[types.ModuleType], registered: Iterable[str]
) -> list[types.ModuleType]:
    """``roots`` and the local modules they need, transitively, each after those it
    needs. A package's own submodules come after it (its parent is what a submodule
    needs first); any other cycle is cut where it closes, and the worker's importer
    resolves it as Python does."""
    registered = tuple(registered)
    order: list[types.ModuleType] = []
    state: dict[str, bool] = {}  # name -> done (False: on the current path)
    waiting = collections.deque(sorted(roots, key=lambda m: m.__name__))
    while waiting:
        root = waiting.popleft()
        if root.__name__ in state:
            continue
        state[root.__name__] = False
        needs, submodules = _local_relations(root, registered)
        stack = [(root, needs, submodules)]
        while stack:
            module, needs, submodules = stack[-1]
            following = next(needs, None)
            if following is None:
                stack.pop()
                state[module.__name__] = True
                order.append(module)
                waiting.extend(submodules)
            elif following.__name__ not in state:
                state[following.__name__] = False
                stack.append((following, *_local_relations(following, registered)))
    return order


def _local_relations(
    module: types.ModuleType, registered: tuple[str, ...]
) -> tuple[Iterator[types.ModuleType], list[types.ModuleType]]:
    """The local modules ``module`` needs, and its own local submodules, each sorted."""
    related = {m.__name__: m for m in _related(module) if is_local(m, registered)}
    inside = module.__name__ + "."
    names = sorted(related)
    needs = [related[n] for n in names if not n.startswith(inside)]
    return iter(needs), [related[n] for n in names if n.startswith(inside)]


# --------------------------------------------------------------------------- sources


class _Source(NamedTuple):
    text: str
    refs: _CodeRefs


# Sources by file, with the (mtime, size) they were read at: a new function using the
# same modules does not read and compile them again.
_sources_cache: dict[str, tuple[tuple[int, int], _Source]] = {}


def _stamp(path: str) -> tuple[int, int] | None:
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return (stat.st_mtime_ns, stat.st_size)


def _read_source(module: types.ModuleType) -> _Source | None:
    """The module's source text as its file holds it now, and what its code refers to;
    None when the file is gone or does not compile (the module then stays by reference,
    and the endpoint says so if it lacks it)."""
    path = _source_file(module)
    if path is None:
        return None
    stamp = _stamp(path)
    if stamp is None:
        return None
    known = _sources_cache.get(path)
    if known is not None and known[0] == stamp:
        return known[1]
    try:
        text = importlib.util.decode_source(Path(path).read_bytes())
        code = compile(text, path, "exec", dont_inherit=True)
    except (OSError, SyntaxError, ValueError, UnicodeDecodeError):
        return None
    source = _Source(text, code_refs(code))
    _sources_cache[path] = (stamp, source)
    return source


def _sources(modules: Iterable[types.ModuleType]) -> Iterator[ShippedModule]:
    for module in modules:
        is_package = hasattr(module, "__path__")
        if _is_namespace(module):
            yield ShippedModule(module.__name__, "", "", True)
            continue
        source = _read_source(module)
        if source is not None:
            yield ShippedModule(module.__name__, source.text, module.__file__ or "", is_package)


class _Closures:
    """The modules shipped for each set of root modules, kept while no module has been
    loaded since and no shipped file has changed: closures made in a loop all use the
    same modules, and working out their relations costs far more than the pickling."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # the Executor pickles in its callers' threads
        self._kept: LruCache[
            Any, tuple[tuple[Any, ...], int, tuple[Any, ...], tuple[ShippedModule, ...]]
        ] = (
            LruCache(_CLOSURES_KEPT, _CLOSURE_BYTES_KEPT)
        )

    def shipped(
        self, roots: tuple[types.ModuleType, ...], registered: tuple[str, ...]
    ) -> tuple[ShippedModule, ...]:
        key = (tuple((m.__name__, id(m)) for m in roots), registered)
        with self._lock:
            known = self._kept.get(key)
        if known is not None:
            kept_roots, loaded, stamps, modules = known
            # The very module objects (an id is reused once a module is dropped from
            # sys.modules and another, maybe from another folder, takes its place), no
            # module loaded since, no shipped file changed.
            if (
                all(ref() is m for ref, m in zip(kept_roots, roots, strict=True))
                and loaded == len(sys.modules)
                and stamps == tuple(_stamp(m.filename) for m in modules)
            ):
                return modules
        loaded = len(sys.modules)
        modules = tuple(_sources(_closure(roots, registered)))
        stamps = tuple(_stamp(m.filename) for m in modules)
        refs = tuple(weakref.ref(m) for m in roots)
        with self._lock:
            self._kept.put(
                key, (refs, loaded, stamps, modules), sum(len(m.source) for m in modules)
            )
        return modules


_CLOSURES_KEPT = 256
_CLOSURE_BYTES_KEPT = 64 * 1024 * 1024
_closures = _Closures()


def check_size(what: str, modules: Sequence[ShippedModule], size: int, limit: int) -> None:
    """Refuse a payload over ``limit`` that ships modules, naming them and their sizes.

    Raises:
        InvalidArgumentError: ``size`` is over ``limit``.
    """
    if size <= limit or not modules:
        return
    biggest = sorted(modules, key=lambda m: -len(m.source))
    listed = ", ".join(f"{m.name} {_mib(len(m.source.encode()))}" for m in biggest[:5])
    more = f" and {len(modules) - 5} more" if len(modules) > 5 else ""
    raise InvalidArgumentError(
        f"{what} cannot be sent: with the local modules it ships ({listed}{more}) its "
        f"payload is {_mib(size)}, over the payload limit of {_mib(limit)}; install those "
        "modules on the endpoint and make the client with ship_modules=False"
    )


def _mib(n: int) -> str:
    return f"{n / (1024 * 1024):.1f} MiB"
