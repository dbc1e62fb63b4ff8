"""The ``heartline`` distribution: one top-level package, working entry points.

``server/``, ``endpoint/`` and ``client/`` sit at the top of the repository but must
install as ``heartline.server``, ``heartline.endpoint`` and ``heartline.client``; nothing
generic may land at the top of site-packages. The checks run in subprocesses from a
neutral folder so the repository on ``sys.path`` cannot hide a packaging mistake.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

import heartline

ROOT = Path(__file__).resolve().parent.parent
VERSION = "0.1.0"
COMMANDS = {"server", "up", "endpoint", "tasks", "endpoints", "stats"}


def run_python(code: str, cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter from ``cwd``, with no PYTHONPATH help."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def console_script(name: str) -> str:
    found = shutil.which(name) or str(Path(sys.executable).parent / name)
    if not Path(found).is_file():
        pytest.fail(f"the {name!r} console script is missing: pip install -e .", pytrace=False)
    return found


@pytest.mark.parametrize("name", ["server", "client", "endpoint", "v1"])
def test_no_generic_top_level_module(tmp_path: Path, name: str) -> None:
    out = run_python(
        f"""
        try:
            import {name}
        except ModuleNotFoundError:
            print("absent")
        else:
            print("present at", getattr({name}, "__file__", None) or list({name}.__path__))
        """,
        tmp_path,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "absent", f"import {name} works outside the repo: {out.stdout}"


def test_heartline_packages_import(tmp_path: Path) -> None:
    out = run_python(
        """
        import importlib, json
        names = ["heartline", "heartline.server", "heartline.endpoint", "heartline.client",
                 "heartline.v1", "heartline.v1.task_pb2", "heartline.v1.task_service_pb2_grpc",
                 "heartline.v1.endpoint_service_pb2_grpc"]
        print(json.dumps({n: importlib.import_module(n).__name__ for n in names}))
        """,
        tmp_path,
    )
    assert out.returncode == 0, out.stderr
    loaded = json.loads(out.stdout)
    assert loaded == {name: name for name in loaded} and len(loaded) == 8


def test_installed_distribution_has_one_top_level_package(tmp_path: Path) -> None:
    out = run_python(
        """
        import importlib.metadata as md, json
        dist = md.distribution("heartline")
        print(json.dumps({
            "version": dist.version,
            "top_level": (dist.read_text("top_level.txt") or "").split(),
            "files": [str(f) for f in dist.files or []],
        }))
        """,
        tmp_path,
    )
    assert out.returncode == 0, out.stderr
    meta = json.loads(out.stdout)
    assert meta["version"] == VERSION
    assert meta["top_level"] in ([], ["heartline"])
    # Editable installs list a .pth and a finder; regular ones list the package itself.
    allowed = re.compile(
        r"^(heartline/|heartline-[^/]+\.dist-info/|__editable__[._]heartline[^/]*$"
        r"|__pycache__/__editable__[._]heartline[^/]*$|(\.\./)+bin/heartline(\.exe)?$)"
    )
    stray = [f for f in meta["files"] if not allowed.match(f)]
    assert not stray, f"files outside heartline/ at the top of site-packages: {stray}"


def test_built_wheel_has_one_top_level_package(tmp_path: Path) -> None:
    """What a non-editable ``pip install`` would put in site-packages."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for name in ("heartline", "server", "endpoint", "client"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    cmd = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path / "dist")]
    if _has_setuptools(77):
        cmd.append("--no-build-isolation")  # build offline when the venv can
    out = subprocess.run(
        [*cmd, str(src)], capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL
    )
    assert out.returncode == 0, out.stdout + out.stderr
    (wheel,) = (tmp_path / "dist").glob("heartline-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/", 1)[0] for n in names} == {"heartline", f"heartline-{VERSION}.dist-info"}
    for expected in (
        "heartline/server/__init__.py",
        "heartline/endpoint/__init__.py",
        "heartline/client/__init__.py",
        "heartline/v1/task_pb2.py",
        "heartline/v1/task_pb2.pyi",
        "heartline/v1/task_service_pb2_grpc.py",
    ):
        assert expected in names, f"{expected} missing from the wheel"


def _has_setuptools(major: int) -> bool:
    try:
        import setuptools
    except ImportError:
        return False
    return int(setuptools.__version__.split(".")[0]) >= major


def test_version_everywhere(tmp_path: Path) -> None:
    assert heartline.__version__ == VERSION
    out = subprocess.run(
        [console_script("heartline"), "--version"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["heartline,", "version", VERSION]


def test_module_help_lists_commands(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "heartline", "--help"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert out.returncode == 0, out.stderr
    listed = out.stdout.split("Commands:", 1)[1]
    commands = {line.split()[0] for line in listed.splitlines() if line.strip()}
    assert COMMANDS <= commands, f"missing: {sorted(COMMANDS - commands)}"
