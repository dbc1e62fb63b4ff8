"""Local modules travel with a function (heartline/_modules.py): which modules count as
the user's own, what a function is found to use, and payloads that install them in a
fresh process that has never seen the folder they came from."""

from __future__ import annotations

import ast
import json
import os
import pickle
import subprocess
import sys
import textwrap
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import cloudpickle
import grpc
import pytest

import heartline
from heartline import InvalidArgumentError, _defaults, _modules, _serialize, _shipped
from heartline._modules import ShipPolicy, is_local
from heartline._serialize import dumps_function, function_id

TIMEOUT = 60.0  # bound of each fresh process; loading a payload takes well under a second

MYLIB = """\
import mylib2
from mypkg import sub


def helper(x):
    return mylib2.triple(x) + sub.one()


def boom(x):
    raise ValueError(f"boom {x}")  # mylib's failing line
"""
MYLIB2 = """\
FACTOR = 3


def triple(x):
    return x * FACTOR
"""
PACKAGE = {
    "mypkg/__init__.py": "from .core import base\n",
    "mypkg/core.py": "def base():\n    return 100\n",
    "mypkg/sub.py": "from . import core\n\n\ndef one():\n    return core.base() + 1\n",
    "mypkg/lazy.py": "VALUE = 'lazy'\n",
}
OURS = ("mylib", "mylib2", "mylib3", "mypkg", "nsx")


@pytest.fixture
def folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A script's folder on ``sys.path``: mylib (which imports mylib2 and the package
    mypkg), mylib3 (imported by nobody), and the namespace package nsx (no __init__)."""
    here = tmp_path / "project"
    files = {
        "mylib.py": MYLIB,
        "mylib2.py": MYLIB2,
        "mylib3.py": "def name():\n    return 'mylib3'\n",
        "nsx/leaf.py": "def leaf():\n    return 'leaf'\n",
        **PACKAGE,
    }
    for name, text in files.items():
        (here / name).parent.mkdir(parents=True, exist_ok=True)
        (here / name).write_text(text)
    monkeypatch.syspath_prepend(str(here))
    _forget_ours()
    yield here
    _forget_ours()


def _forget_ours() -> None:
    for name in list(sys.modules):
        if name.partition(".")[0] in OURS:
            del sys.modules[name]
    # A payload loaded in this process may have set up the worker's importer here.
    if _shipped._finder in sys.meta_path:
        sys.meta_path.remove(_shipped._finder)
    _shipped._finder.__init__()  # type: ignore[misc]


def script_function(source: str, name: str = "task") -> Callable[..., Any]:
    """A function as a script's ``__main__`` defines it (cloudpickle sends it by value)."""
    namespace: dict[str, Any] = {"__name__": "__main__"}
    exec(textwrap.dedent(source), namespace)  # noqa: S102 - the test's own script text
    return namespace[name]


def shipped(fn: Any, policy: ShipPolicy | None = None) -> list[str]:
    return [m.name for m in (policy or ShipPolicy()).modules_for(fn)]


# --------------------------------------------------------------------------- local or not


def test_modules_beside_a_script_are_local_and_installed_ones_are_not(folder: Path) -> None:
    import mylib
    import mypkg

    assert is_local(mylib) and is_local(mypkg) and is_local(sys.modules["mypkg.core"])
    for installed in (json, pickle, cloudpickle, grpc, pytest, heartline, heartline._modules):
        assert not is_local(installed), installed.__name__
    assert not is_local(sys)  # built in: no file
    assert not is_local(types.ModuleType("made_in_memory"))
    assert not is_local(sys.modules["__main__"])


def test_a_module_registered_by_value_is_left_to_cloudpickle(folder: Path) -> None:
    import mylib2

    cloudpickle.register_pickle_by_value(mylib2)
    try:
        assert not is_local(mylib2, cloudpickle.list_registry_pickle_by_value())
        fn = script_function("import mylib2\ndef task(x):\n    return mylib2.triple(x)\n")
        assert shipped(fn) == []
    finally:
        cloudpickle.unregister_pickle_by_value(mylib2)


def test_installed_another_way_counts_as_installed(
    folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mylib2

    # An editable install through a .pth file: the folder is put on sys.path by it.
    monkeypatch.setattr(_modules, "_pth_folders", lambda: frozenset({str(folder.resolve())}))
    monkeypatch.setattr(_modules, "_verdicts", {})
    assert not is_local(mylib2)
    # setuptools' editable install (an import hook): a distribution names the package.
    monkeypatch.setattr(_modules, "_pth_folders", frozenset)
    monkeypatch.setattr(_modules, "_distributed_names", lambda: frozenset({"mylib2"}))
    monkeypatch.setattr(_modules, "_verdicts", {})
    assert not is_local(mylib2)


# --------------------------------------------------------------------------- what is used


def test_imports_are_read_from_the_bytecode_of_this_python() -> None:
    # The reading relies on the constants loaded just before IMPORT_NAME: pinned here
    # for the Python that runs the tests.
    code = compile(
        "import a.b\nfrom . import core\nfrom ..x import y as z\n"
        "def f():\n    import lazy\n    from pkg.sub import thing\n",
        "<test>",
        "exec",
    )
    assert sorted(_modules.code_refs(code).imports) == [
        ("", 1, ("core",)),
        ("a.b", 0, ()),
        ("lazy", 0, ()),
        ("pkg.sub", 0, ("thing",)),
        ("x", 2, ("y",)),
    ]


def test_a_function_ships_the_local_modules_it_uses_each_after_those_it_needs(
    folder: Path,
) -> None:
    fn = script_function(
        """
        import json, cloudpickle, grpc
        import mylib

        def task(x):
            return mylib.helper(x), json.dumps(x), cloudpickle, grpc
        """
    )
    names = shipped(fn)
    assert set(names) == {"mylib", "mylib2", "mypkg", "mypkg.core", "mypkg.sub"}, names
    # A module comes after what it imports, a submodule after its package.
    assert names.index("mylib2") < names.index("mylib")
    assert names.index("mypkg.sub") < names.index("mylib")
    assert names.index("mypkg") < names.index("mypkg.core") < names.index("mypkg.sub")
    assert "mypkg.lazy" not in names  # never imported, so not loaded: not shipped


@pytest.mark.parametrize(
    "source",
    [
        # a function of a local module, pickled by reference ('mylib2.triple')
        "from mylib2 import triple as task",
        # an import in the function's body
        "def task(x):\n    import mylib2\n    return mylib2.triple(x)",
        # a closure over a local module's function
        "def make():\n    from mylib2 import triple\n    return lambda x: triple(x)\ntask = make()",
        # a default argument, and a helper of the script that uses the module
        (
            "import mylib2\ndef helper(x, f=mylib2.triple):\n    return f(x)\n"
            "def task(x):\n    return helper(x)"
        ),
        # a global container of the script holding the module's function
        "import mylib2\nTABLE = {'t': mylib2.triple}\ndef task(x):\n    return TABLE['t'](x)",
        # a bound method of a script's class whose method uses the module
        (
            "import mylib2\nclass Job:\n    def run(self, x):\n        return mylib2.triple(x)\n"
            "task = Job().run"
        ),
    ],
    ids=["by-reference", "body-import", "closure", "default", "container", "method"],
)
def test_the_ways_a_function_reaches_a_local_module(folder: Path, source: str) -> None:
    import mylib2  # noqa: F401 - loaded, as the script's imports would have it

    assert shipped(script_function(source)) == ["mylib2"]


def test_a_package_ships_its_init_and_the_loaded_submodules_used(folder: Path) -> None:
    import mypkg.lazy  # noqa: F401 - loaded (so an attribute of mypkg), never used below

    fn = script_function("import mypkg.sub\ndef task():\n    return mypkg.sub.one()\n")
    # sub: named by the function; core: imported by the package's __init__.
    assert shipped(fn) == ["mypkg", "mypkg.core", "mypkg.sub"]
    fn = script_function("import nsx.leaf\ndef task():\n    return nsx.leaf.leaf()\n")
    assert shipped(fn) == ["nsx", "nsx.leaf"]  # a namespace package ships empty


def test_ship_modules_false_ships_nothing_and_extra_names_ship(folder: Path) -> None:
    fn = script_function("import mylib\ndef task(x):\n    return mylib.helper(x)\n")
    nothing = ShipPolicy.of(False)
    assert shipped(fn, nothing) == []
    # The plain payload, then its trailer (heartline/_forms.py).
    assert dumps_function(fn, nothing, "bytecode").startswith(_serialize._dumps(fn))
    dynamic = script_function(
        "import importlib\ndef task():\n    return importlib.import_module('mylib3').name()\n"
    )
    assert shipped(dynamic) == []  # a name in a string: nobody can see it
    import mylib3

    assert shipped(dynamic, ShipPolicy.of(["mylib3"])) == ["mylib3"]
    assert shipped(dynamic, ShipPolicy.of([mylib3])) == ["mylib3"]
    assert ShipPolicy.of(None) == ShipPolicy.of(True) == ShipPolicy()


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("mylib", "must be True, False or a list"),
        (["no_such_module_anywhere"], "'no_such_module_anywhere', which does not import here"),
        ([3], "module names or modules, not 3"),
        ([sys], "'sys', which has no Python source"),
        (["heartline.client"], "heartline is on every endpoint already"),
    ],
)
def test_bad_ship_modules_are_refused_at_once(folder: Path, value: Any, message: str) -> None:
    with pytest.raises(InvalidArgumentError, match=message):
        ShipPolicy.of(value)
    with pytest.raises(InvalidArgumentError, match=message):
        heartline.Client("127.0.0.1:1", ship_modules=value)


def test_the_function_id_covers_the_modules_sources(folder: Path) -> None:
    fn = script_function("import mylib2\ndef task(x):\n    return mylib2.triple(x)\n")
    before = function_id(dumps_function(fn))
    assert function_id(dumps_function(fn)) == before
    (folder / "mylib2.py").write_text(MYLIB2.replace("FACTOR = 3", "FACTOR = 30"))
    assert function_id(dumps_function(fn)) != before


def test_modules_over_the_payload_limit_are_refused_naming_them(
    folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fn = script_function("import mylib\ndef task(x):\n    return mylib.helper(x)\n")
    monkeypatch.setattr(_serialize, "MAX_PAYLOAD", 1024)
    with pytest.raises(InvalidArgumentError) as info:
        dumps_function(fn)
    text = str(info.value)
    assert "mylib " in text and "mylib2 " in text and "MiB" in text, text
    assert "over the payload limit of 0.0 MiB" in text and "ship_modules=False" in text
    assert len(dumps_function(fn, ShipPolicy.of(False))) < 1024  # the function alone fits


# --------------------------------------------------------------------------- round trips

LOADER = """
import ast, pathlib, pickle, sys
from heartline._serialize import describe_exception, loads_with_sources

calls = ast.literal_eval(sys.argv[2])
payloads = [pathlib.Path(p).read_bytes() for p in sys.argv[3:]]
loaded = []
for step, arg in calls:
    if step == "load":
        try:
            loaded.append(loads_with_sources(payloads[arg])[0])
        except Exception as exc:
            print(repr((type(exc).__name__, str(exc))))
    elif step == "plain":
        loaded.append(pickle.loads(payloads[arg]))
    elif step == "file":
        print(repr(sys.modules[arg].__file__))
    else:
        try:
            print(repr(loaded[step](*arg)))
        except Exception as exc:
            print(repr(describe_exception(exc)[2]))
"""


def run_fresh(
    tmp_path: Path, payloads: list[bytes], calls: list[tuple[Any, Any]], **env: str
) -> list[Any]:
    """Load ``payloads`` in a fresh process whose ``sys.path`` lacks the project folder,
    do ``calls`` there (("load", i), ("plain", i), ("file", module), or (function index,
    args)), and return what each printed."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(exist_ok=True)
    paths = []
    for i, payload in enumerate(payloads):
        path = elsewhere / f"payload-{i}.bin"
        path.write_bytes(payload)
        paths.append(str(path))
    clean = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run(
        [sys.executable, "-c", LOADER, "-", repr(calls), *paths],
        cwd=elsewhere,
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    return [ast.literal_eval(line) for line in out.stdout.splitlines()]


def test_a_payload_installs_its_modules_in_a_fresh_process(folder: Path, tmp_path: Path) -> None:
    fn = script_function(
        "import mylib\ndef task(x):\n    return mylib.helper(x)\n"
        "def fail(x):\n    return mylib.boom(x)\n"
    )
    fail = fn.__globals__["fail"]
    payloads = [dumps_function(fn), dumps_function(fail)]
    folder.rename(folder.with_name("moved"))  # the endpoint has no such file
    results = run_fresh(
        tmp_path,
        payloads,
        [("load", 0), (0, (2,)), ("load", 1), (1, (7,)), ("file", "mylib")],
    )
    assert results[0] == 2 * 3 + 101
    tb = results[1]
    assert f'File "{folder / "mylib.py"}", line 10, in boom' in tb, tb
    assert 'raise ValueError(f"boom {x}")  # mylib\'s failing line' in tb, tb
    assert results[2] == str(folder / "mylib.py")  # tracebacks name the client's file


def test_loading_a_payload_where_it_was_made_keeps_the_modules_loaded(folder: Path) -> None:
    # A test's in-process fake agent, or an agent run from the script's own folder: the
    # modules there are the shipped ones, so nothing is installed over them.
    import mylib

    fn = script_function("import mylib\ndef task(x):\n    return mylib.helper(x)\n")
    loaded, _ = _serialize.loads_with_sources(dumps_function(fn))
    assert loaded(2) == 7 + 100 and sys.modules["mylib"] is mylib
    assert sys.modules["mypkg.sub"].__spec__.loader is not _shipped._finder


def test_plain_pickle_loads_still_returns_the_function(folder: Path, tmp_path: Path) -> None:
    from mylib2 import triple

    payload = dumps_function(triple)  # by reference: 'mylib2.triple'
    assert run_fresh(tmp_path, [payload], [("plain", 0), (0, (5,))]) == [15]
    fn = script_function("import nsx.leaf\ndef task():\n    return nsx.leaf.leaf()\n")
    assert run_fresh(tmp_path, [dumps_function(fn)], [("load", 0), (0, ())]) == ["leaf"]


def test_two_versions_of_a_module_in_one_process(folder: Path, tmp_path: Path) -> None:
    fn = script_function("import mylib2\ndef task(x):\n    return mylib2.triple(x)\n")
    first = dumps_function(fn)
    (folder / "mylib2.py").write_text(MYLIB2.replace("FACTOR = 3", "FACTOR = 300"))
    second = dumps_function(fn)
    results = run_fresh(
        tmp_path,
        [first, second],
        # Each function keeps the module it was loaded with; loading the first one
        # again brings its version back.
        [("load", 0), (0, (1,)), ("load", 1), (1, (1,)), (0, (1,)), ("load", 0), (2, (1,))],
    )
    assert results == [3, 300, 3, 3]


def test_without_shipping_the_error_names_the_module_and_the_endpoint(
    folder: Path, tmp_path: Path
) -> None:
    fn = script_function("import mylib\ndef task(x):\n    return mylib.helper(x)\n")
    payload = dumps_function(fn, ShipPolicy.of(False))
    [(kind, message)] = run_fresh(tmp_path, [payload], [("load", 0)])
    assert kind == "ModuleNotFoundError"
    assert message.startswith(
        "this task needs the module 'mylib', which is not installed where it ran; "
        "install it on the endpoint"
    ), message
    [(_, named)] = run_fresh(
        tmp_path, [payload], [("load", 0)], **{_defaults.ENV_ENDPOINT_NAME: "gpu-box"}
    )
    assert "which is not installed on the endpoint 'gpu-box' where it ran" in named, named


def test_a_shipped_module_that_fails_to_load_there_is_named(folder: Path, tmp_path: Path) -> None:
    (folder / "mylib3.py").write_text(
        "import pathlib\nDATA = pathlib.Path(__file__).with_name('data.txt').read_text()\n"
    )
    (folder / "data.txt").write_text("here")
    fn = script_function("import mylib3\ndef task():\n    return mylib3.DATA\n")
    payload = dumps_function(fn)
    (folder / "data.txt").unlink()  # data files do not travel, only Python source
    [(kind, message)] = run_fresh(tmp_path, [payload], [("load", 0)])
    assert kind == "ImportError"
    assert message.startswith(
        "the module 'mylib3' shipped with the function failed to load where this task ran: "
        "FileNotFoundError"
    ), message


def test_a_module_object_taking_a_dropped_ones_id_is_read_again(
    folder: Path, tmp_path: Path
) -> None:
    # Closures of one module are kept by the module's id; once a module leaves
    # sys.modules, another (here from another folder) may get its id. Simulated by
    # filing the first module's kept closure under the second's id.
    import mylib2 as first

    closures = _modules._Closures()
    closures.shipped((first,), ())  # the first call may import what discovery needs
    shipped = closures.shipped((first,), ())
    assert [m.source for m in shipped if m.name == "mylib2"] == [MYLIB2]
    other = tmp_path / "other"
    other.mkdir()
    (other / "mylib2.py").write_text(MYLIB2.replace("FACTOR = 3", "FACTOR = 30"))
    del sys.modules["mylib2"]
    sys.path.insert(0, str(other))
    try:
        import mylib2 as second
    finally:
        sys.path.remove(str(other))
    assert second is not first and second.__file__ == str(other / "mylib2.py")
    kept = closures._kept.get(((("mylib2", id(first)),), ()))
    assert kept is not None
    closures._kept.put(((("mylib2", id(second)),), ()), kept, 1)
    again = closures.shipped((second,), ())
    assert [m.source for m in again if m.name == "mylib2"] == [
        MYLIB2.replace("FACTOR = 3", "FACTOR = 30")
    ]
