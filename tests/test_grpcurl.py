"""Operators inspect a live server with the real grpcurl binary."""

from __future__ import annotations

import json
import uuid

from heartline import Client
from tests.conftest import ServerProc
from tests.helpers import grpcurl

SERVICES = {
    "heartline.v1.TaskService",
    "heartline.v1.EndpointService",
    "heartline.v1.AdminService",
    "grpc.health.v1.Health",
    "grpc.reflection.v1alpha.ServerReflection",
}


def test_list_shows_every_service(server: ServerProc) -> None:
    out = grpcurl(server.address, "list")
    assert out.returncode == 0, out.stderr
    assert set(out.stdout.split()) == SERVICES


def test_describe_task_service_and_a_message(server: ServerProc) -> None:
    out = grpcurl(server.address, "describe", "heartline.v1.TaskService")
    assert out.returncode == 0, out.stderr
    for rpc in ("SubmitTasks", "GetTasks", "ListTasks", "WatchTasks", "ListEndpoints", "GetStats"):
        assert f"rpc {rpc}" in out.stdout
    out = grpcurl(server.address, "describe", "heartline.v1.Task")
    assert out.returncode == 0, out.stderr
    assert "waiting_reason" in out.stdout and "history" in out.stdout


def test_health_check_serves(server: ServerProc) -> None:
    out = grpcurl(server.address, "grpc.health.v1.Health/Check", data={})
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {"status": "SERVING"}


def test_read_rpcs_in_json_form(server: ServerProc, agent) -> None:
    with Client(server.address) as hc:
        tid = hc.submit("local", pow, 2, 5)
        assert hc.get_result(tid, timeout=30) == 32

    out = grpcurl(
        server.address,
        "heartline.v1.TaskService/GetTasks",
        data={"task_ids": [tid], "include_history": True},
    )
    assert out.returncode == 0, out.stderr
    task = json.loads(out.stdout)["tasks"][0]
    assert task["task_id"] == tid
    assert task["state"] == "TASK_STATE_SUCCEEDED"
    assert task["endpoint_name"] == "local"
    assert [h["to_state"] for h in task["history"]][-1] == "TASK_STATE_SUCCEEDED"

    out = grpcurl(server.address, "heartline.v1.TaskService/ListTasks", data={"states": ["TASK_STATE_SUCCEEDED"]})
    assert out.returncode == 0, out.stderr
    assert tid in [t["task_id"] for t in json.loads(out.stdout)["tasks"]]

    out = grpcurl(server.address, "heartline.v1.TaskService/ListEndpoints", data={})
    assert out.returncode == 0, out.stderr
    endpoints = json.loads(out.stdout)["endpoints"]
    assert [(e["name"], e.get("online", False)) for e in endpoints] == [("local", True)]

    out = grpcurl(server.address, "heartline.v1.TaskService/GetStats", data={})
    assert out.returncode == 0, out.stderr
    stats = json.loads(out.stdout)
    assert stats["tasks_by_state"]["success"] == "1"
    assert stats["agents_online"] == "1"


def test_watch_tasks_streams_current_state(server: ServerProc, agent) -> None:
    with Client(server.address) as hc:
        tid = hc.submit("local", abs, -3)
        assert hc.get_result(tid, timeout=30) == 3
    out = grpcurl(
        server.address,
        "heartline.v1.TaskService/WatchTasks",
        data={"task_ids": [tid]},
        options=("-max-time", "2"),
    )
    # The stream stays open until -max-time cuts it; the first message is complete JSON.
    first, _ = json.JSONDecoder().raw_decode(out.stdout.lstrip())
    assert first["updates"][0]["task_id"] == tid
    assert first["updates"][0]["state"] == "TASK_STATE_SUCCEEDED"


def test_get_tasks_unknown_id_is_not_found(server: ServerProc) -> None:
    unknown = str(uuid.uuid4())
    out = grpcurl(server.address, "heartline.v1.TaskService/GetTasks", data={"task_ids": [unknown]})
    assert out.returncode != 0
    assert "NotFound" in out.stderr and unknown in out.stderr


def test_get_tasks_malformed_id_is_invalid_argument(server: ServerProc) -> None:
    out = grpcurl(server.address, "heartline.v1.TaskService/GetTasks", data={"task_ids": ["not-a-task"]})
    assert out.returncode != 0
    assert "InvalidArgument" in out.stderr and "not-a-task" in out.stderr


def test_get_tasks_empty_is_invalid_argument(server: ServerProc) -> None:
    out = grpcurl(server.address, "heartline.v1.TaskService/GetTasks", data={})
    assert out.returncode != 0
    assert "InvalidArgument" in out.stderr
