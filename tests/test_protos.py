"""The wire contract: committed code matches the protos, and the protos pass ``buf lint``.

``buf`` comes from the PyPI package ``buf-bin`` (in the ``dev`` extra), which installs the
binary next to the interpreter. A missing ``buf`` fails these tests rather than skipping
them: a lint check that quietly does not run is worse than none.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"


def buf_path() -> str:
    """The ``buf`` binary: on PATH, or next to this interpreter (a venv not activated)."""
    found = shutil.which("buf") or str(Path(sys.executable).parent / "buf")
    if not Path(found).is_file():
        pytest.fail(
            "the buf binary is missing: pip install buf-bin "
            "(or pip install -e '.[dev]', which includes it)",
            pytrace=False,
        )
    return found


def buf_lint(workspace: Path, cache: Path) -> tuple[int, list[dict[str, object]], str]:
    """Run ``buf lint`` in ``workspace``; returns the exit code, the findings, and stderr."""
    out = subprocess.run(
        [buf_path(), "lint", "--error-format=json"],
        cwd=workspace,
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
        # Keep buf's module cache out of $HOME: CI homes may be read-only or shared.
        env={**os.environ, "BUF_CACHE_DIR": str(cache)},
    )
    findings = [json.loads(line) for line in out.stdout.splitlines() if line.strip()]
    return out.returncode, findings, out.stderr


def test_generated_code_matches_protos() -> None:
    out = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_protos.py"), "--check"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_buf_config_uses_standard_rules() -> None:
    text = (ROOT / "buf.yaml").read_text()
    assert "STANDARD" in text
    # An ``except:`` or ``ignore:`` list would weaken STANDARD without failing the lint.
    assert "except:" not in text and "ignore:" not in text and "ignore_only:" not in text


def test_buf_lint_standard_passes(tmp_path: Path) -> None:
    rc, findings, stderr = buf_lint(ROOT, tmp_path / "buf-cache")
    problems = "\n".join(
        f"{f['path']}:{f['start_line']}: {f['type']}: {f['message']}" for f in findings
    )
    assert rc == 0, problems or stderr
    assert findings == []


def _copy_workspace(into: Path) -> Path:
    shutil.copy(ROOT / "buf.yaml", into / "buf.yaml")
    shutil.copytree(PROTOS, into / "protos")
    return into / "protos" / "heartline" / "v1"


def _append(path: Path, text: str) -> None:
    path.write_text(path.read_text() + text)


def _replace(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"{old!r} not in {path.name}; update this test's breakage"
    path.write_text(text.replace(old, new, 1))


BREAKAGES = {
    "message-not-pascal-case": (
        lambda v1: _append(
            v1 / "task.proto", "\nmessage bad_message {\n  string BadField = 1;\n}\n"
        ),
        "MESSAGE_PASCAL_CASE",
    ),
    "rpc-reuses-another-rpcs-request": (
        lambda v1: _replace(
            v1 / "task_service.proto",
            "rpc GetStats(GetStatsRequest)",
            "rpc GetStats(ListEndpointsRequest)",
        ),
        "RPC_REQUEST_RESPONSE_UNIQUE",
    ),
    "enum-zero-value-not-unspecified": (
        lambda v1: _append(v1 / "task.proto", "\nenum Colour {\n  COLOUR_RED = 0;\n}\n"),
        "ENUM_ZERO_VALUE_SUFFIX",
    ),
}


@pytest.mark.parametrize("breakage", sorted(BREAKAGES))
def test_buf_lint_fails_on_a_broken_copy(tmp_path: Path, breakage: str) -> None:
    """The lint check can fail: each deliberate breakage is caught by its rule."""
    workspace = tmp_path / "workspace"
    workspace.mkdir()
    v1 = _copy_workspace(workspace)
    rc, findings, _ = buf_lint(workspace, tmp_path / "buf-cache")
    assert rc == 0 and findings == [], "the unbroken copy must pass first"

    breaks, rule = BREAKAGES[breakage]
    breaks(v1)
    rc, findings, stderr = buf_lint(workspace, tmp_path / "buf-cache")
    assert rc != 0, f"buf lint passed a copy broken by {breakage}"
    assert rule in {f["type"] for f in findings}, findings or stderr


def _services():
    from heartline.v1 import admin_service_pb2, endpoint_service_pb2, task_service_pb2

    return {
        "heartline.v1.TaskService": task_service_pb2.DESCRIPTOR.services_by_name["TaskService"],
        "heartline.v1.EndpointService": endpoint_service_pb2.DESCRIPTOR.services_by_name[
            "EndpointService"
        ],
        "heartline.v1.AdminService": admin_service_pb2.DESCRIPTOR.services_by_name["AdminService"],
    }


@pytest.mark.parametrize(
    "service",
    ["heartline.v1.TaskService", "heartline.v1.EndpointService", "heartline.v1.AdminService"],
)
def test_every_rpc_has_its_own_request_and_response(service: str) -> None:
    descriptor = _services()[service]
    assert descriptor.full_name == service
    assert descriptor.methods, f"{service} has no RPCs"
    for method in descriptor.methods:
        request, response = method.input_type.full_name, method.output_type.full_name
        assert request == f"heartline.v1.{method.name}Request", method.full_name
        assert response == f"heartline.v1.{method.name}Response", method.full_name


def test_no_message_serves_two_rpcs() -> None:
    used: dict[str, str] = {}
    for descriptor in _services().values():
        for method in descriptor.methods:
            for message in (method.input_type, method.output_type):
                assert message.full_name not in used, (
                    f"{message.full_name} is used by {used.get(message.full_name)} "
                    f"and {method.full_name}"
                )
                used[message.full_name] = method.full_name
