"""Local modules travel, end to end: a script beside its own ``mylib.py`` (which imports
its own ``mylib2.py``) submits functions that use them, from its own folder, to a real
server and a real agent that runs in another folder and has never seen either file."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Stack
from tests.test_modules import MYLIB2  # the same helper module as the unit tests

TIMEOUT = 120.0  # bound of each script: a few tasks, each far quicker

MYLIB = """\
import mylib2


def helper(x):
    return mylib2.triple(x) + 1


def boom(x):
    raise ValueError(f"boom {x}")  # mylib's failing line
"""
SCRIPT = """\
import json
import sys

from heartline import Client, Executor, TaskFailedError

import mylib


def task(x):
    return mylib.helper(x)


def fail(x):
    return mylib.boom(x)


def outcome(hc, fn, *args):
    try:
        return {"value": hc.get_result(hc.submit(ENDPOINT, fn, *args), timeout=60)}
    except TaskFailedError as err:
        return {
            "error": type(err).__name__,
            "message": str(err),
            "traceback": getattr(err, "remote_traceback", ""),
        }


if __name__ == "__main__":
    address, ENDPOINT, ship = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    report = {}
    with Client(address, ship_modules=ship) as hc:
        report["function_id"] = hc.register_function(task)
        report["task"] = outcome(hc, task, 2)
        report["fail"] = outcome(hc, fail, 7)
    with Executor(ENDPOINT, address, ship_modules=ship) as ex:
        try:
            report["executor"] = ex.submit(task, 3).result(timeout=60)
        except TaskFailedError as err:
            report["executor"] = str(err)
    print(json.dumps(report))
"""


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """The script's folder: script.py, mylib.py, mylib2.py."""
    here = tmp_path / "project"
    here.mkdir()
    (here / "script.py").write_text(SCRIPT)
    (here / "mylib.py").write_text(MYLIB)
    (here / "mylib2.py").write_text(MYLIB2)
    return here


def run_script(stack: Stack, project: Path, endpoint: str = "local", ship: Any = True) -> Any:
    """``python script.py`` from the project's folder, as its user would run it."""
    out = subprocess.run(
        [sys.executable, "script.py", stack.address, endpoint, json.dumps(ship)],
        cwd=project,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.splitlines()[-1])


def test_a_scripts_own_modules_travel_with_its_function(stack: Stack, project: Path) -> None:
    assert not (Path.cwd() / "mylib.py").exists()  # the agent runs from another folder
    report = run_script(stack, project)
    assert report["task"] == {"value": 2 * 3 + 1}
    assert report["executor"] == 3 * 3 + 1
    fail = report["fail"]
    assert fail["error"] == "RemoteError" and "ValueError: boom 7" in fail["message"]
    tb = fail["traceback"]
    assert f'File "{project / "mylib.py"}", line 9, in boom' in tb, tb
    assert 'raise ValueError(f"boom {x}")  # mylib\'s failing line' in tb, tb


def test_an_edited_module_is_a_new_function_on_the_same_worker(stack: Stack, project: Path) -> None:
    # One worker: the second run's function installs its mylib2 over the first one's.
    endpoint = stack.solo_endpoint()
    first = run_script(stack, project, endpoint)
    (project / "mylib2.py").write_text(MYLIB2.replace("FACTOR = 3", "FACTOR = 30"))
    second = run_script(stack, project, endpoint)
    assert first["task"] == {"value": 7} and second["task"] == {"value": 61}
    assert second["function_id"] != first["function_id"]
    (project / "mylib2.py").write_text(MYLIB2)
    assert run_script(stack, project, endpoint)["task"] == {"value": 7}  # and back again


def test_a_module_the_endpoint_lacks_is_named_in_the_error(stack: Stack, project: Path) -> None:
    # ship_modules=False: mylib stays by reference, as an installed package would, and
    # the endpoint has no mylib. A fresh endpoint: the workers of "local" keep the mylib
    # the other tests shipped them (a worker keeps what it installed).
    endpoint = stack.solo_endpoint()
    report = run_script(stack, project, endpoint, ship=False)
    for message in (report["task"]["message"], report["executor"]):
        assert "this task needs the module 'mylib', which is not installed" in message, message
        assert "install it on the endpoint" in message, message
        assert f"on the endpoint {endpoint!r}" in message, message
    assert report["task"]["error"] == "TaskFailedError"  # never ran: not the function's error
