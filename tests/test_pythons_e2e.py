"""Client and agents on different Python minor versions (issue 14), with real processes.

A second Python (3.12 or 3.13, found on PATH or under pyenv) gets a venv with heartline
installed, built once per machine and kept under the user's cache folder, keyed by the
interpreter's version and a hash of this checkout's path and pyproject.toml (a first
build takes about 35 s here: grpcio ships wheels for both). Without a second Python these
tests are skipped, loudly (``-rs`` shows why in CI).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from heartline import Client
from heartline._forms import PYTHON
from tests.conftest import ServerProc, relaunch_server
from tests.helpers import Proc, assert_eventually, endpoint_online, start_process, tail

ROOT = Path(__file__).resolve().parent.parent
BUILD_TIMEOUT = 110.0  # below the per-test timeout (120 s); a first build took 34 s


def _candidates() -> Iterator[str]:
    for version in ("3.13", "3.12"):
        found = shutil.which(f"python{version}")
        if found:
            yield found
        pyenv = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "versions"
        yield from (str(p) for p in sorted(pyenv.glob(f"{version}*/bin/python{version}")))


def _version_of(python: str) -> str | None:
    """The interpreter's ``major.minor``, or None if it does not run (a pyenv shim of a
    version not selected fails)."""
    try:
        done = subprocess.run(
            [python, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
            capture_output=True,
            text=True,
            timeout=20,
            check=False,
        )
    except OSError:
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def _find_other_python() -> tuple[str, str] | None:
    for python in _candidates():
        version = _version_of(python)
        if version and version != PYTHON:
            return python, version
    return None


@pytest.fixture(scope="session")
def other_python() -> tuple[Path, str]:
    """(the python of a venv with heartline on another minor version, that version)."""
    found = _find_other_python()
    if found is None:
        pytest.skip(
            f"NO SECOND PYTHON: cross-version tests need python3.12 or python3.13 besides "
            f"this {PYTHON} (on PATH or under pyenv); they did not run"
        )
    python, version = found
    # The venv holds an editable install of this checkout: keyed by its path too, so two
    # checkouts on one machine never test each other's code.
    key = (ROOT / "pyproject.toml").read_bytes() + str(ROOT.resolve()).encode()
    digest = hashlib.sha256(key).hexdigest()[:12]
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    venv = cache / "heartline-tests" / f"venv-{version}-{digest}"
    done = venv / ".heartline-built"
    if not done.exists():
        shutil.rmtree(venv, ignore_errors=True)
        venv.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [python, "-m", "venv", str(venv)],
            check=True,
            timeout=BUILD_TIMEOUT,
            capture_output=True,
        )
        build = subprocess.run(
            [str(venv / "bin" / "pip"), "install", "-q", "-e", str(ROOT)],
            timeout=BUILD_TIMEOUT,
            capture_output=True,
            text=True,
            check=False,
        )
        assert build.returncode == 0, build.stderr[-4000:]
        done.write_text(version)
    return venv / "bin" / "python", version


def _start_agent(python: Path | str, server: ServerProc, name: str) -> Proc:
    return start_process(
        [str(python), "-m", "heartline", "endpoint", "start", "--name", name,
         "--server", server.address, "--workers", "1"],
        env={"HEARTLINE_HOME": str(server.home)},
    )  # fmt: skip


def _run_client(python: Path, script: str, address: str, home: Path, *args: str) -> dict:
    """Run a client script on ``python``; return the JSON it prints last."""
    path = home / "client_script.py"
    path.write_text(textwrap.dedent(script))
    done = subprocess.run(
        [str(python), str(path), address, *args],
        capture_output=True,
        text=True,
        timeout=90,
        env={**os.environ, "HEARTLINE_HOME": str(home)},
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


CLIENT = """
import json, sys, threading
from heartline import Client, RemoteError
from heartline._errors import HeartlineError

K = 7

def square_plus(x):
    return x * x + K

def make_scaler(n):
    def scale(x):
        return [x * n, sys.version_info[:2]]
    return scale

def fails(x):
    return {}["missing " + str(x)]

class Box:  # defined in this script: only this Python's bytecode can rebuild it
    def __init__(self):
        self.lock = threading.Lock()

def refused_case():
    box = Box.__new__(Box)
    return lambda x: (box, x)

def locked():
    lock = threading.Lock()
    return lambda x: (lock, x)

def where(x):
    return [x, list(sys.version_info[:2])]

address, endpoint, mode = sys.argv[1], sys.argv[2], sys.argv[3]
out = {"client": "%d.%d" % sys.version_info[:2]}
with Client(address) as hc:
    if mode == "run":
        out["square"] = hc.get_result(hc.submit(endpoint, square_plus, 5), timeout=60)
        out["scaled"] = hc.get_result(hc.submit(endpoint, make_scaler(3), 4), timeout=60)
        tid = hc.submit(endpoint, fails, 9)
        try:
            hc.get_result(tid, timeout=60)
        except RemoteError as err:
            out["error"] = [err.remote_type, err.message, err.remote_traceback]
        task = hc.get_task(tid)
        out["failed"] = [task.state.value, task.attempt]
        try:
            hc.submit(endpoint, refused_case())
        except HeartlineError as err:
            out["refused"] = [type(err).__name__, str(err)]
        try:
            hc.submit(endpoint, locked(), 1)
        except HeartlineError as err:
            out["lock"] = [type(err).__name__, str(err)]
        out["causes"] = [h.cause for t in hc.list_tasks() for h in hc.get_task(t.id).history]
    elif mode == "where":
        ids = [hc.submit(endpoint, where, i, serializer="bytecode") for i in range(4)]
        out["bytecode"] = [hc.get_result(t, timeout=60) for t in ids]
        ids = [hc.submit(endpoint, where, i) for i in range(4)]
        out["auto"] = [hc.get_result(t, timeout=60) for t in ids]
    elif mode == "park":  # queued only: another process waits for them
        out["ids"] = [hc.submit(endpoint, where, i, serializer="bytecode") for i in range(3)]
print(json.dumps(out))
"""


def test_functions_from_another_python_run_on_this_one_and_unrunnable_ones_are_refused(
    other_python: tuple[Path, str],
    server: ServerProc,
    start_agent: Callable[..., Proc],
) -> None:
    python, version = other_python
    start_agent("here", 1)

    out = _run_client(python, CLIENT, server.address, server.home, "here", "run")

    assert out["client"] == version
    assert out["square"] == 32  # a module-level function of the client's script
    assert out["scaled"] == [12, list(sys.version_info[:2])]  # nested, closure: ran here
    type_name, message, traceback = out["error"]
    assert type_name == "KeyError" and "missing 9" in message
    # The traceback points at the client's script line, rebuilt on this Python.
    assert 'return {}["missing " + str(x)]' in traceback and "client_script.py" in traceback
    assert out["failed"] == ["errored", 1]  # the function's error, not a system failure
    kind, refusal = out["refused"]
    assert kind == "FailedPreconditionError", refusal
    assert f"Python {version}" in refusal and f"Python {PYTHON}" in refusal
    assert "serializer='source'" in refusal
    # A lock can't be pickled in any form: refused on the client, before anything is sent.
    assert out["lock"][0] == "SerializationError"
    with Client(server.address) as hc:
        (endpoint,) = [e for e in hc.list_endpoints() if e.name == "here"]
        assert [a.python for a in endpoint.agents] == [PYTHON]
    # No attempt ended by a crashed worker: nothing counted as a system failure.
    assert "worker-died" not in out["causes"] and out["causes"]


def test_one_endpoint_with_agents_on_two_pythons_runs_each_task_where_it_can(
    other_python: tuple[Path, str],
    server: ServerProc,
    start_agent: Callable[..., Proc],
) -> None:
    python, version = other_python
    start_agent("mixed", 1)
    other = _start_agent(python, server, "mixed")
    try:
        assert_eventually(
            lambda: endpoint_online(server.address, "mixed", 2),
            timeout=30,
            message=f"both agents online\n{tail(other)}",
        )
        with Client(server.address) as hc:
            (endpoint,) = [e for e in hc.list_endpoints() if e.name == "mixed"]
            assert sorted(a.python for a in endpoint.agents) == sorted([PYTHON, version])

        out = _run_client(python, CLIENT, server.address, server.home, "mixed", "where")
    finally:
        other.stop()

    mine = [int(p) for p in version.split(".")]
    # Bytecode only: every task ran on the agent of the client's Python.
    assert out["bytecode"] == [[i, mine] for i in range(4)]
    # With a source form, the tasks may run on either agent, each correctly.
    assert [x for x, _ in out["auto"]] == list(range(4))
    here = list(sys.version_info[:2])
    assert all(v in (mine, here) for _, v in out["auto"])


def test_a_restarted_server_still_knows_which_python_its_queued_tasks_need(
    other_python: tuple[Path, str], server: ServerProc
) -> None:
    # The Python a queued bytecode-only task needs is not stored with the task: a restart
    # reads it back from the trailers of the stored functions.
    python, version = other_python
    here = _start_agent(sys.executable, server, "parked")  # registers the endpoint
    assert_eventually(lambda: endpoint_online(server.address, "parked"), timeout=30)
    here.stop()  # no agent connected: a bytecode-only task of another Python is taken
    assert_eventually(lambda: not endpoint_online(server.address, "parked"), timeout=30)
    ids = _run_client(python, CLIENT, server.address, server.home, "parked", "park")["ids"]
    server.proc.kill()
    again = relaunch_server(server)
    agents: list[Proc] = []
    try:
        agents.append(_start_agent(sys.executable, again, "parked"))
        assert_eventually(lambda: endpoint_online(again.address, "parked"), timeout=30)
        with Client(again.address) as hc:
            reasons = {hc.get_task(t).waiting_reason for t in ids}
            assert reasons == {
                f"no agent runs Python {version} (this function's bytecode); agents: {PYTHON}"
            }, reasons
            agents.append(_start_agent(python, again, "parked"))
            mine = [int(p) for p in version.split(".")]
            assert [hc.get_result(t, timeout=60) for t in ids] == [[i, mine] for i in range(3)]
    finally:
        for agent in agents:
            agent.stop()
        again.proc.stop()
