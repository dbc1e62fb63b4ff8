"""A fuzz test of every RPC against one real server, a real agent and stored canary tasks
(issue 8, SPEC section 6): Hypothesis over the protobuf messages, raw random bodies per
method, random watches, and random ``Connect`` streams (hellos with random ids and the live
agent's own, heartbeats, status batches with random task ids, attempts, states and
results, garbage frames, streams that then hang).

Every answer is OK or a status a person can act on, never ``UNKNOWN``, ``INTERNAL`` or a
hang; afterwards the server is healthy, no canary changed, a real task still runs, the
server logged no traceback, and it never unpickled a payload (a payload that creates a
file when unpickled, sent as a function, as arguments, as a result and as an input, never
creates it).

The request strategies are derived from each message's descriptor, so a new field is
fuzzed as soon as it is in the generated code. The field's name only picks a pool of
values worth trying besides random ones (known task ids for ``task_ids``, and so on).
Bounded: a fixed number of examples per method, a timeout on every call.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import pickle
import queue
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cloudpickle
import grpc
import pytest
from google.protobuf import descriptor as pb_descriptor
from google.protobuf import message_factory
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from heartline import Client, TaskState, _defaults
from heartline.v1 import admin_service_pb2, task_pb2, task_service_pb2
from heartline.v1 import endpoint_service_pb2 as ep_pb
from tests.conftest import ProcessGroup, Stack, _loopback_only, launch_server
from tests.helpers import block, tail, wait_state

cloudpickle.register_pickle_by_value(sys.modules[__name__])

Code = grpc.StatusCode
TIMEOUT = 10.0  # every unary call; a call that takes longer is a hang
STREAM_BOUND = 6.0  # a stream answers (first message, or a status) within this
HANG = 0.3  # how long a welcomed stream is held open before the client cancels it
EXAMPLES = 30  # per unary method, in each of the two unary tests
STREAM_EXAMPLES = 50  # WatchTasks and Connect
MAX_DETAILS = 1000  # an error message quotes a cut of the input, never all of it
ALLOWED = frozenset(
    {
        Code.OK,
        Code.INVALID_ARGUMENT,
        Code.NOT_FOUND,
        Code.FAILED_PRECONDITION,
        Code.RESOURCE_EXHAUSTED,
        Code.PERMISSION_DENIED,
        Code.ALREADY_EXISTS,
        Code.UNAUTHENTICATED,
        Code.OUT_OF_RANGE,
    }
)
UNDECODABLE = "the request body is not a valid "
CONNECT = "/heartline.v1.EndpointService/Connect"
CHANNEL_OPTIONS = [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]
FUZZ_SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,  # nothing written into the repository; --hypothesis-seed replays a run
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.large_base_example,
    ],
)

SERVICES = (
    task_service_pb2.DESCRIPTOR.services_by_name["TaskService"],
    ep_pb.DESCRIPTOR.services_by_name["EndpointService"],
    admin_service_pb2.DESCRIPTOR.services_by_name["AdminService"],
)
METHODS: dict[str, pb_descriptor.MethodDescriptor] = {
    f"/{s.full_name}/{m.name}": m for s in SERVICES for m in s.methods
}
UNARY = [p for p, m in METHODS.items() if not m.client_streaming and not m.server_streaming]
WATCHES = [p for p, m in METHODS.items() if not m.client_streaming and m.server_streaming]
# Commands that would legitimately change a canary named in them: canary ids are swapped
# for fresh ones in their requests. Reads keep them.
COMMANDS = {
    "CancelTasks",
    "HoldTasks",
    "ReleaseTasks",
    "RetryTasks",
    "GiveUpTasks",
    "ResubmitTasks",
    "CancelGroup",
}
# Submits go to an endpoint without a real agent (the agent would unpickle the random
# functions it runs, and the file check is about the server).
SUBMITS = {"SubmitTasks", "SubmitGroup"}


def short(path: str) -> str:
    return path.rsplit(".", 1)[-1].replace("/", ".")


# --------------------------------------------------------------------------- payloads


class _CreatesFile:
    """Unpickled, this opens (creates) ``path``: nothing but the pickle runs it."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.path, "a"))


def payload_creating(path: Path) -> bytes:
    return pickle.dumps(_CreatesFile(str(path)))


# --------------------------------------------------------------------------- strategies


@dataclass
class Pools:
    """Values worth trying besides random ones, by what a field names."""

    task_ids: list[str]
    group_ids: list[str]
    endpoints: list[str]
    function_ids: list[str]
    token_ids: list[str]
    users: list[str]
    agent_ids: list[str]
    sessions: list[str]
    names: list[str]
    payloads: list[bytes]

    def for_field(self, name: str) -> list[str]:
        n = name.lower()
        if "task_id" in n or n == "inputs":
            return self.task_ids
        if "group_id" in n:
            return self.group_ids
        if "function_id" in n:
            return self.function_ids
        if "token_id" in n:
            return self.token_ids
        if "agent_id" in n:
            return self.agent_ids
        if "endpoint" in n:
            return self.endpoints
        if n in ("user", "users", "owner"):
            return self.users
        if n.endswith(("request_id", "session_id")):
            return self.sessions
        if n == "page_token":
            return [
                base64.urlsafe_b64encode(f"{time.time()!r}|{self.task_ids[0]}".encode()).decode(),
                base64.urlsafe_b64encode(b"nan|x").decode(),
                "!!!",
            ]
        if n == "input":
            return ["$(tasks.a.status)", "$(tasks.status)", "$(tasks.zz.status)", "$("]
        if n == "operator":
            return ["in", "notin", "IN"]
        if n == "values":
            return ["Succeeded", "Failed", "Skipped", "Cancelled", "None", "Completed"]
        if "name" in n or n == "run_after":
            return self.names
        return []

    @property
    def strings(self) -> list[str]:
        return sorted(
            {
                *self.task_ids,
                *self.group_ids,
                *self.endpoints,
                *self.function_ids,
                *self.token_ids,
                *self.users,
                *self.agent_ids,
                *self.sessions,
                *self.names,
            }
        )


def _huge() -> st.SearchStrategy[str]:
    return st.builds(
        lambda c, n: c * n,
        st.sampled_from(["x", "é", "\u2028", "😀", "\x00", "%s{}", "a\n"]),
        st.sampled_from([81, 300, 10_000, 200_000]),
    )


def _ints(bits: int, signed: bool) -> st.SearchStrategy[int]:
    low, high = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    edges = [v for v in (low, high, -1, 0, 1, 2, 10_001, 100_001) if low <= v <= high]
    return st.one_of(st.integers(max(low, -2), 5), st.sampled_from(edges), st.integers(low, high))


_INTS = {
    pb_descriptor.FieldDescriptor.TYPE_INT32: (32, True),
    pb_descriptor.FieldDescriptor.TYPE_SINT32: (32, True),
    pb_descriptor.FieldDescriptor.TYPE_SFIXED32: (32, True),
    pb_descriptor.FieldDescriptor.TYPE_INT64: (64, True),
    pb_descriptor.FieldDescriptor.TYPE_SINT64: (64, True),
    pb_descriptor.FieldDescriptor.TYPE_SFIXED64: (64, True),
    pb_descriptor.FieldDescriptor.TYPE_UINT32: (32, False),
    pb_descriptor.FieldDescriptor.TYPE_FIXED32: (32, False),
    pb_descriptor.FieldDescriptor.TYPE_UINT64: (64, False),
    pb_descriptor.FieldDescriptor.TYPE_FIXED64: (64, False),
}
MANY = (_defaults.MAX_IDS + 1, 3000)  # repeated fields this long, now and then


def _synthetic(oneof: Any) -> bool:
    """The oneof protoc makes for a proto3 ``optional`` field (not a real choice)."""
    return len(oneof.fields) == 1 and oneof.name.startswith("_")


def _repeated(f: pb_descriptor.FieldDescriptor) -> bool:
    return f.is_repeated if hasattr(f, "is_repeated") else f.label == f.LABEL_REPEATED


def _is_map(f: pb_descriptor.FieldDescriptor) -> bool:
    return f.type == f.TYPE_MESSAGE and f.message_type.GetOptions().map_entry


class Strategies:
    """Request strategies built from message descriptors, with values from :class:`Pools`."""

    def __init__(self, pools: Pools, seeds: dict[str, Message] | None = None) -> None:
        self.pools = pools
        self.seeds = seeds or {}
        self._cache: dict[tuple[str, int], st.SearchStrategy[Message]] = {}
        self.payloads = st.one_of(
            st.binary(max_size=64),
            st.binary(max_size=64),
            st.sampled_from(pools.payloads),
            st.sampled_from(pools.payloads),
            st.just(b""),
            st.just(b"\x80" * (_defaults.MAX_PAYLOAD + 1)),  # over the payload limit
        )

    def text(self, name: str) -> st.SearchStrategy[str]:
        known = self.pools.for_field(name)
        choices = [
            st.sampled_from(self.pools.strings),
            st.text(max_size=30),
            st.text(alphabet=st.characters(min_codepoint=0x80, codec="utf-8"), max_size=20),
            st.uuids().map(str),
            st.uuids().map(lambda u: str(u).upper()),
            _huge(),
        ]
        if known:
            choices = [st.sampled_from(known)] * 4 + choices
        return st.one_of(choices)

    def scalar(self, f: pb_descriptor.FieldDescriptor, depth: int) -> st.SearchStrategy[Any]:
        t = f.type
        if t == f.TYPE_STRING:
            return self.text(f.name)
        if t == f.TYPE_BYTES:
            return self.payloads
        if t == f.TYPE_BOOL:
            return st.booleans()
        if t in (f.TYPE_DOUBLE, f.TYPE_FLOAT):
            width = 64 if t == f.TYPE_DOUBLE else 32
            return st.one_of(st.sampled_from([0.0, 0.5, 1.0, -1.0]), st.floats(width=width))
        if t == f.TYPE_ENUM:
            numbers = [v.number for v in f.enum_type.values]
            return st.one_of(st.sampled_from(numbers), _ints(32, True))
        if t in _INTS:
            return _ints(*_INTS[t])
        if t == f.TYPE_MESSAGE:
            return self.message(f.message_type, depth + 1)
        raise AssertionError(f"no strategy for field {f.full_name} of type {t}")

    def value(self, f: pb_descriptor.FieldDescriptor, depth: int) -> st.SearchStrategy[Any]:
        if _is_map(f):
            key, val = f.message_type.fields_by_name["key"], f.message_type.fields_by_name["value"]
            return st.dictionaries(self.scalar(key, depth), self.scalar(val, depth), max_size=3)
        single = self.scalar(f, depth)
        if not _repeated(f):
            return single
        few = st.lists(single, max_size=4)
        known = self.pools.for_field(f.name) if f.type == f.TYPE_STRING else []
        if known:
            few = st.one_of(few, st.lists(st.sampled_from(known), min_size=1, max_size=4))
        if f.type == f.TYPE_MESSAGE:
            cls = message_factory.GetMessageClass(f.message_type)
            many = st.sampled_from(MANY).map(lambda n: [cls()] * n)
        elif f.type == f.TYPE_STRING:
            known = self.pools.for_field(f.name) or self.pools.strings
            many = st.builds(lambda v, n: [v] * n, st.sampled_from(known), st.sampled_from(MANY))
        else:
            many = st.builds(lambda v, n: [v] * n, single, st.sampled_from(MANY))
        return st.one_of(few, few, few, many)

    def request(self, method: pb_descriptor.MethodDescriptor) -> st.SearchStrategy[Message]:
        """Requests of the method: random ones, and its seed (a valid request; an empty
        one for a method without a seed) with a few fields changed at random, so that
        the fuzz also gets past the first check."""
        cls = message_factory.GetMessageClass(method.input_type)
        seed = self.seeds.get(method.name) or cls()
        return st.one_of(self.message(method.input_type), self.near(seed))

    def near(self, seed: Message) -> st.SearchStrategy[Message]:
        """``seed`` with 0-3 fields, at any depth, set to random values or cleared."""

        @st.composite
        def build(draw: Callable[..., Any]) -> Message:
            message = type(seed)()
            message.CopyFrom(seed)
            for _ in range(draw(st.integers(0, 3))):
                self._mutate(draw, message, 0)
            return message

        return build()

    def _mutate(self, draw: Callable[..., Any], message: Message, depth: int) -> None:
        fields = list(message.DESCRIPTOR.fields)
        if not fields:
            return
        f = draw(st.sampled_from(fields))
        if f.type == f.TYPE_MESSAGE and not _is_map(f) and depth < 3 and draw(st.booleans()):
            if _repeated(f):
                items = getattr(message, f.name)
                if len(items):
                    self._mutate(draw, items[draw(st.integers(0, len(items) - 1))], depth + 1)
                    return
            elif message.HasField(f.name):
                self._mutate(draw, getattr(message, f.name), depth + 1)
                return
        message.ClearField(f.name)
        if draw(st.integers(0, 4)):
            _set(message, f, draw(self.value(f, depth)))

    def message(
        self, descriptor: pb_descriptor.Descriptor, depth: int = 0
    ) -> st.SearchStrategy[Message]:
        """Messages of this type: each field set or not, real oneofs set to at most one
        member, unknown enum values, nested messages to a small depth."""
        key = (descriptor.full_name, depth)
        if key in self._cache:
            return self._cache[key]
        cls = message_factory.GetMessageClass(descriptor)
        fields = [
            (f, self.value(f, depth))
            for f in descriptor.fields
            if f.type != f.TYPE_MESSAGE or _is_map(f) or depth < 3
        ]
        oneofs = [o for o in descriptor.oneofs if not _synthetic(o)]

        @st.composite
        def build(draw: Callable[..., Any]) -> Message:
            message = cls()
            chosen = {
                o.full_name: draw(st.sampled_from([None, *(f.name for f in o.fields)]))
                for o in oneofs
            }
            for f, strategy in fields:
                oneof = f.containing_oneof
                if oneof is not None and not _synthetic(oneof):
                    if chosen[oneof.full_name] != f.name:
                        continue
                elif not draw(st.booleans()):
                    continue
                _set(message, f, draw(strategy))
            return message

        strategy = build()
        self._cache[key] = strategy
        return strategy


def _set(message: Message, f: pb_descriptor.FieldDescriptor, value: Any) -> None:
    if _is_map(f):
        target = getattr(message, f.name)
        for k, v in value.items():
            if isinstance(v, Message):
                target[k].CopyFrom(v)
            else:
                target[k] = v
    elif _repeated(f):
        getattr(message, f.name).extend(value)
    elif f.type == f.TYPE_MESSAGE:
        getattr(message, f.name).CopyFrom(value)
    else:
        setattr(message, f.name, value)


def _strings_in(
    message: Message,
) -> Iterator[tuple[Message, pb_descriptor.FieldDescriptor, int | None]]:
    """Every set string field of ``message`` and its submessages: (owner, field, index)."""
    for f, value in message.ListFields():
        if f.type == f.TYPE_STRING:
            if _repeated(f):
                for i in range(len(value)):
                    yield message, f, i
            else:
                yield message, f, None
        elif f.type == f.TYPE_MESSAGE and not _is_map(f):
            for sub in value if _repeated(f) else [value]:
                yield from _strings_in(sub)


# --------------------------------------------------------------------------- the world


@dataclass(repr=False)
class World:
    """The one server of this module, its real agent, and what was stored before."""

    stack: Stack
    client: Client
    channel: grpc.Channel
    metadata: tuple[tuple[str, str], ...]
    token_id: str  # the test's own (admin) token: never revoked
    live_agent: str  # the real agent's id
    local: set[str]  # the real agent's endpoint: its name and id
    endpoint_ids: dict[str, str]  # name -> id of the endpoints the test registered
    canaries: dict[str, task_pb2.Task]  # as stored before the fuzz, history included
    running: str  # the canary running on the real agent
    payload_file: Path  # created if a payload is ever unpickled
    bomb: bytes  # the payload that creates it
    bomb_function_id: str
    pools: Pools
    strategies: Strategies
    _callables: dict[str, Any] = field(default_factory=dict)

    def __repr__(self) -> str:
        return f"World({self.address})"

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        printer.text(repr(self))  # how Hypothesis shows it in a failing example

    @property
    def address(self) -> str:
        return self.stack.address

    @property
    def server(self) -> Any:
        return self.stack.server.proc

    def unary(self, path: str, body: bytes) -> tuple[Code, str, bytes | None]:
        """Send ``body`` raw with the admin token: (status, details, reply)."""
        call = self._callables.get(path)
        if call is None:
            call = self._callables[path] = self.channel.unary_unary(path)
        try:
            reply = call(body, metadata=self.metadata, timeout=TIMEOUT)
        except grpc.RpcError as err:
            return err.code(), err.details() or "", None
        return Code.OK, "", reply

    def first_of_watch(self, path: str, body: bytes) -> tuple[Code, str]:
        """Open a server stream, take its first message (or its status), close it."""
        call = self.channel.unary_stream(path)(body, metadata=self.metadata, timeout=STREAM_BOUND)
        try:
            next(call)
        except StopIteration:
            return Code.OK, ""
        except grpc.RpcError as err:
            return err.code(), err.details() or ""
        finally:
            call.cancel()
        return Code.OK, ""

    def neuter(self, method: str, request: Message) -> Message:
        """Keep the request from legitimately changing what the test checks: no command
        names a canary, no submit reaches the real agent, no revoke of the test's token,
        no allow-list on the real agent's endpoint from another agent's hello."""
        if method in COMMANDS:
            for owner, f, i in list(_strings_in(request)):
                values = getattr(owner, f.name)
                if i is None and values in self.canaries:
                    setattr(owner, f.name, str(uuid.uuid4()))
                elif i is not None and values[i] in self.canaries:
                    values[i] = str(uuid.uuid4())
        if method in SUBMITS and request.endpoint in self.local:
            request.endpoint = "ghost"
        if method == "RevokeToken" and request.token_id == self.token_id:
            request.token_id = uuid.uuid4().hex[:12]
        if method == "Connect" and request.WhichOneof("message") == "hello":
            # A hello let in sets its endpoint's allow-list (the last hello's holds): none
            # on the real agent's endpoint, or the final real task could be refused. A
            # hello with the live agent's id keeps its list: it is refused, and must
            # change nothing (test_a_refused_hello_leaves_its_endpoint_as_it_was).
            hello = request.hello
            if (
                hello.endpoint_id in self.local
                and hello.agent_id != self.live_agent
                and "allowed_functions" in hello.DESCRIPTOR.fields_by_name
            ):
                hello.ClearField("allowed_functions")
        return request

    def stored(self) -> dict[str, task_pb2.Task]:
        code, details, reply = self.unary(
            "/heartline.v1.TaskService/GetTasks",
            task_service_pb2.GetTasksRequest(
                task_ids=list(self.canaries), include_history=True
            ).SerializeToString(),
        )
        assert code is Code.OK, (code, details)
        tasks = task_service_pb2.GetTasksResponse.FromString(reply).tasks
        return {t.task_id: t for t in tasks}

    def assert_intact(self) -> None:
        """No canary changed, the server runs, no payload was unpickled, no traceback."""
        assert self.server.popen.poll() is None, tail(self.server)
        now = self.stored()
        changed = [
            f"{tid}:\nbefore {before}\nnow {now.get(tid)}"
            for tid, before in self.canaries.items()
            if now.get(tid) != before
        ]
        assert not changed, "canaries changed:\n" + "\n".join(changed)
        assert not self.payload_file.exists(), "a payload was unpickled"
        assert "Traceback" not in self.server.text(), tail(self.server)


def _answer_problem(code: Code, details: str) -> str | None:
    if code not in ALLOWED:
        return f"status {code.name}"
    if len(details) > MAX_DETAILS:
        return f"a message of {len(details)} characters (input echoed whole?)"
    if "metadata" in details and "exceeds" in details:
        return "the answer overflowed the client's metadata limit"
    return None


def _show(message: Message | bytes) -> str:
    text = repr(message) if isinstance(message, bytes) else str(message)
    return text if len(text) < 600 else text[:600] + f"... ({len(text)} characters)"


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    base = tmp_path_factory.mktemp("fuzz")
    home = base / "home"
    home.mkdir()
    group = ProcessGroup("the stack of test_fuzz")
    with pytest.MonkeyPatch.context() as mp:
        _loopback_only(mp)
        mp.setenv("HEARTLINE_HOME", str(home))
        mp.delenv("HEARTLINE_TOKEN", raising=False)
        try:
            # Heartbeats of 1s: the live agent is never silent for the 2s after which a
            # hello with its id may take over its stream (as a reconnect may), however
            # loaded the machine; so such a hello must always be refused.
            srv = launch_server(
                home, base / "heartline.db", "127.0.0.1:0", "--heartbeat-interval", "1"
            )
            group.adopt(srv.proc)
            stack = Stack(srv, owner=group)
            stack.start_agent("local", 2)
            with (
                Client(srv.address) as client,
                grpc.insecure_channel(srv.address, options=CHANNEL_OPTIONS) as channel,
            ):
                yield _populate(base, stack, client, channel)
        finally:
            group.close_and_check()


def _populate(base: Path, stack: Stack, client: Client, channel: grpc.Channel) -> World:
    token = _defaults.token()
    assert token, "the server wrote no token"
    metadata = _defaults.bearer_metadata(token)
    assert metadata is not None

    def call(path: str, request: Message, reply_type: Any) -> Any:
        return reply_type.FromString(
            channel.unary_unary(path)(
                request.SerializeToString(), metadata=metadata, timeout=TIMEOUT
            )
        )

    # Canaries: settled with known results, one errored, one held, one running.
    canary_ids = client.submit_batch("local", [(pow, (3, i), {}) for i in range(3)])
    for i, tid in enumerate(canary_ids):
        assert client.get_result(tid, timeout=30) == 3**i
    errored = client.submit("local", int, "not a number")
    wait_state(client, errored, TaskState.ERRORED)
    held = client.submit("local", pow, 3, 9, held=True)
    running = client.submit("local", block, 3600)
    wait_state(client, running, TaskState.RUNNING)
    (local,) = [e for e in client.list_endpoints() if e.name == "local"]
    (live,) = local.agents

    # Endpoints without a real agent: "ghost" (submits go there), "forge" (for the
    # payload test's fake agent), "fuzz-ep" (for the Connect fuzz's fake agents).
    endpoint_ids = {}
    for name in ("ghost", "forge", "fuzz-ep"):
        reply = call(
            "/heartline.v1.EndpointService/RegisterEndpoint",
            ep_pb.RegisterEndpointRequest(name=name),
            ep_pb.RegisterEndpointResponse,
        )
        endpoint_ids[name] = reply.endpoint_id

    payload_file = base / "a-payload-was-unpickled"
    bomb = payload_creating(payload_file)
    # The payload does what it says when unpickled (elsewhere).
    sample = base / "sample"
    pickle.loads(payload_creating(sample)).close()
    assert sample.exists()
    sample.unlink()

    register = "/heartline.v1.TaskService/RegisterFunction"
    bomb_fid = call(
        register,
        task_service_pb2.RegisterFunctionRequest(function=bomb),
        task_service_pb2.RegisterFunctionResponse,
    ).function_id
    junk_fid = call(
        register,
        task_service_pb2.RegisterFunctionRequest(function=b"not a pickle"),
        task_service_pb2.RegisterFunctionResponse,
    ).function_id
    assert bomb_fid == hashlib.sha256(bomb).hexdigest()
    # Stored tasks whose function and arguments are the payload, on "ghost".
    ghost = call(
        "/heartline.v1.TaskService/SubmitTasks",
        task_service_pb2.SubmitTasksRequest(
            endpoint="ghost",
            tasks=[
                task_pb2.TaskSpec(function_id=bomb_fid, args=bomb),
                task_pb2.TaskSpec(function_id=junk_fid, args=bomb, held=True),
            ],
        ),
        task_service_pb2.SubmitTasksResponse,
    ).task_ids
    grouped = call(
        "/heartline.v1.TaskService/SubmitGroup",
        task_service_pb2.SubmitGroupRequest(
            name="g",
            endpoint="ghost",
            tasks=[
                task_pb2.TaskSpec(name="a", function_id=bomb_fid, args=bomb),
                task_pb2.TaskSpec(name="b", function_id=bomb_fid, args=bomb, run_after=["a"]),
            ],
            finally_tasks=[task_pb2.TaskSpec(name="f", function_id=junk_fid, args=bomb)],
        ),
        task_service_pb2.SubmitGroupResponse,
    )
    # Work for the Connect fuzz's agents of "fuzz-ep": requeued each time one leaves.
    call(
        "/heartline.v1.TaskService/SubmitTasks",
        task_service_pb2.SubmitTasksRequest(
            endpoint="fuzz-ep",
            tasks=[
                task_pb2.TaskSpec(function_id=bomb_fid, args=bomb, max_system_retries=1_000_000)
                for _ in range(12)
            ],
        ),
        task_service_pb2.SubmitTasksResponse,
    )
    users = []
    token_ids = [token.split("_")[1]]
    for user, endpoint in (("fuzz-user", ""), ("fuzz-agent", "fuzz-ep")):
        made = call(
            "/heartline.v1.AdminService/CreateToken",
            admin_service_pb2.CreateTokenRequest(user=user, endpoint=endpoint),
            admin_service_pb2.CreateTokenResponse,
        )
        users.append(user)
        token_ids.append(made.info.token_id)

    canaries = [*canary_ids, errored, held, running]
    pools = Pools(
        task_ids=[*canaries, *ghost, *grouped.task_ids, str(uuid.uuid4()), "not-a-task"],
        group_ids=[grouped.group_id, str(uuid.uuid4())],
        endpoints=[  # not "forge": the payload test's alone
            "local",
            local.id,
            "ghost",
            endpoint_ids["ghost"],
            "fuzz-ep",
            endpoint_ids["fuzz-ep"],
            "nope",
            "Local",
            "../etc",
        ],
        function_ids=[bomb_fid, junk_fid, "0" * 64, "F" * 64],
        token_ids=token_ids,
        users=["admin", *users, "nobody", "a" * 64, "a" * 65],
        agent_ids=[live.agent_id, "fuzz-a", "fuzz-b", str(uuid.uuid4())],
        sessions=["s-1", "s-2", str(uuid.uuid4())],
        names=["a", "b", "f", "g", "local", "x.y-z"],
        payloads=[bomb, b"not a pickle", cloudpickle.dumps(((), {})), cloudpickle.dumps(pow)],
    )
    world = World(
        stack=stack,
        client=client,
        channel=channel,
        metadata=metadata,
        token_id=token_ids[0],
        live_agent=live.agent_id,
        local={"local", local.id},
        endpoint_ids=endpoint_ids,
        canaries={},
        running=running,
        payload_file=payload_file,
        bomb=bomb,
        bomb_function_id=bomb_fid,
        pools=pools,
        strategies=Strategies(pools, _seeds(pools, ghost, grouped.group_id, bomb_fid, junk_fid)),
    )
    world.canaries = dict.fromkeys(canaries, task_pb2.Task())
    world.canaries = world.stored()
    assert list(world.canaries) == canaries
    return world


def _seeds(
    pools: Pools, ghost: list[str], group_id: str, bomb_fid: str, junk_fid: str
) -> dict[str, Message]:
    """A valid request per method (by name), for the fuzz to start from. Submits go to
    "fuzz-ep", whose only agents are the Connect fuzz's; commands name "ghost"'s tasks."""
    ts, a = task_service_pb2, admin_service_pb2
    when = task_pb2.WhenExpression(input="$(tasks.a.status)", operator="in", values=["Succeeded"])
    spec = task_pb2.TaskSpec(function_id=junk_fid, args=pools.payloads[0], max_retries=1)
    group = [
        task_pb2.TaskSpec(name="a", function_id=bomb_fid, args=b"x"),
        task_pb2.TaskSpec(name="b", function_id=junk_fid, args=b"y", run_after=["a"], when=[when]),
        task_pb2.TaskSpec(name="c", function_id=junk_fid, args=b"z", inputs=["a"]),
    ]
    commanded = [ghost[0]]
    return {
        "RegisterFunction": ts.RegisterFunctionRequest(function=b"fuzz"),
        "SubmitTasks": ts.SubmitTasksRequest(endpoint="fuzz-ep", tasks=[spec], session_id="s-1"),
        "GetTasks": ts.GetTasksRequest(task_ids=pools.task_ids[:3], include_history=True),
        "ListTasks": ts.ListTasksRequest(states=[task_pb2.TASK_STATE_WAITING_FOR_EP], page_size=2),
        "WatchTasks": ts.WatchTasksRequest(task_ids=pools.task_ids[:2], group_ids=[group_id]),
        "CancelTasks": ts.CancelTasksRequest(task_ids=commanded, request_id="s-2"),
        "HoldTasks": ts.HoldTasksRequest(task_ids=commanded),
        "ReleaseTasks": ts.ReleaseTasksRequest(task_ids=commanded),
        "RetryTasks": ts.RetryTasksRequest(task_ids=commanded),
        "GiveUpTasks": ts.GiveUpTasksRequest(task_ids=commanded),
        "ResubmitTasks": ts.ResubmitTasksRequest(task_ids=commanded, session_id="s-1"),
        "SubmitGroup": ts.SubmitGroupRequest(
            name="fuzz",
            endpoint="fuzz-ep",
            tasks=group,
            finally_tasks=[task_pb2.TaskSpec(name="f", function_id=junk_fid, args=b"f")],
            timeout_seconds=60,
        ),
        "GetGroup": ts.GetGroupRequest(group_id=group_id, include_history=True),
        "ListGroups": ts.ListGroupsRequest(page_size=1),
        "CancelGroup": ts.CancelGroupRequest(
            group_id=group_id, mode=task_pb2.CANCEL_MODE_STOP_RUN_FINALLY
        ),
        "RegisterEndpoint": ep_pb.RegisterEndpointRequest(name="fuzz-ep"),
        "CreateToken": a.CreateTokenRequest(user="fuzz-user"),
        "RevokeToken": a.RevokeTokenRequest(token_id=pools.token_ids[-1]),
        "ShareEndpoint": a.ShareEndpointRequest(endpoint="fuzz-ep", user="fuzz-user"),
    }


def test_every_method_of_the_services_is_fuzzed() -> None:
    streams = [p for p, m in METHODS.items() if m.client_streaming]
    assert streams == [CONNECT], "a new client-streaming method: fuzz it like Connect"
    assert WATCHES == ["/heartline.v1.TaskService/WatchTasks"], WATCHES
    assert len(UNARY) >= 21, UNARY


# --------------------------------------------------------------------------- 1. messages


@pytest.mark.parametrize("path", UNARY, ids=short)
@FUZZ_SETTINGS
@given(data=st.data())
def test_random_requests_answer_a_status(world: World, path: str, data: st.DataObject) -> None:
    method = METHODS[path]
    request = data.draw(world.strategies.request(method), label="request")
    world.neuter(method.name, request)
    code, details, reply = world.unary(path, request.SerializeToString())
    event(code.name)  # --hypothesis-show-statistics shows how deep the requests went
    problem = _answer_problem(code, details)
    assert problem is None, f"{short(path)} answered {problem}: {details[:300]!r}\n{_show(request)}"
    if reply is not None:
        message_factory.GetMessageClass(method.output_type).FromString(reply)


# --------------------------------------------------------------------------- 2. bodies


def _bodies(world: World, method: pb_descriptor.MethodDescriptor) -> st.SearchStrategy[bytes]:
    """Random bytes, and valid (neutered) requests cut short."""

    def cut(request: Message, where: float) -> bytes:
        body = world.neuter(method.name, request).SerializeToString()
        return body[: int(len(body) * where)]

    truncated = st.builds(
        cut, world.strategies.request(method), st.floats(0.0, 1.0, exclude_max=True)
    )
    return st.one_of(st.binary(min_size=1, max_size=200), truncated)


@pytest.mark.parametrize("path", UNARY + WATCHES, ids=short)
@FUZZ_SETTINGS
@given(data=st.data())
def test_random_bodies_answer_invalid_argument_or_ok(
    world: World, path: str, data: st.DataObject
) -> None:
    method = METHODS[path]
    body = data.draw(_bodies(world, method), label="body")
    cls = message_factory.GetMessageClass(method.input_type)
    try:
        decoded = cls.FromString(body)
    except Exception:  # noqa: BLE001 - any parse failure
        decoded = None
    else:
        body = world.neuter(method.name, decoded).SerializeToString()
    if method.server_streaming:
        code, details = world.first_of_watch(path, body)
    else:
        code, details, _ = world.unary(path, body)
    event(f"{'decodes' if decoded is not None else 'undecodable'}: {code.name}")
    if decoded is None:
        assert code is Code.INVALID_ARGUMENT and details.startswith(UNDECODABLE), (
            f"{short(path)} answered an undecodable body {body[:100]!r} with {code.name}: {details[:300]!r}"
        )
        assert len(details) < 300, details
    else:
        problem = _answer_problem(code, details)
        assert problem is None, (
            f"{short(path)} answered {problem}: {details[:300]!r}\n{_show(decoded)}"
        )


def test_nothing_changed_after_the_unary_fuzz(world: World) -> None:
    world.assert_intact()


# --------------------------------------------------------------------------- 3. watches


@settings(FUZZ_SETTINGS, max_examples=STREAM_EXAMPLES)
@given(data=st.data())
def test_random_watches_answer_a_first_message_or_a_status(
    world: World, data: st.DataObject
) -> None:
    (path,) = WATCHES
    request = data.draw(world.strategies.request(METHODS[path]), label="request")
    started = time.monotonic()
    code, details = world.first_of_watch(path, request.SerializeToString())
    took = time.monotonic() - started
    event(code.name)
    problem = _answer_problem(code, details)
    assert problem is None, (
        f"WatchTasks answered {problem} after {took:.1f}s: {details[:300]!r}\n{_show(request)}"
    )


# --------------------------------------------------------------------------- 4. Connect


@dataclass
class StreamPlan:
    frames: list[bytes]
    hang: bool  # after the frames: say nothing more (True), or close the sending side
    reply_state: int  # how to answer a dispatch: this state, attempt + offset, result
    reply_offset: int
    reply_result: bytes

    @property
    def first_hello(self) -> ep_pb.Hello | None:
        try:
            first = ep_pb.ConnectRequest.FromString(self.frames[0])
        except Exception:  # noqa: BLE001 - a garbage frame
            return None
        return first.hello if first.WhichOneof("message") == "hello" else None


def _plans(world: World) -> st.SearchStrategy[StreamPlan]:
    s = world.strategies
    agent_ids = ["fuzz-a", "fuzz-b", world.live_agent]

    def hello(base: ep_pb.Hello, endpoint: str, agent: str, capacity: int, prefetch: int) -> bytes:
        base.endpoint_id, base.agent_id, base.capacity, base.prefetch = (
            endpoint,
            agent,
            capacity,
            prefetch,
        )
        return world.neuter("Connect", ep_pb.ConnectRequest(hello=base)).SerializeToString()

    # A hello the server may welcome, with random other fields (held tasks, new fields).
    claims = [ep_pb.HeldTask(task_id=world.running, attempt=1, state=task_pb2.TASK_STATE_RUNNING)]
    good_hello = st.builds(
        hello,
        st.one_of(s.message(ep_pb.Hello.DESCRIPTOR, 1), s.near(ep_pb.Hello(held_tasks=claims))),
        st.sampled_from(
            [next(i for i in world.local if i != "local"), *[world.endpoint_ids["fuzz-ep"]] * 2]
        ),
        st.one_of(st.sampled_from(agent_ids), st.uuids().map(str)),
        st.integers(1, 3),
        st.integers(0, 2),
    )
    any_request = s.message(ep_pb.ConnectRequest.DESCRIPTOR).map(
        lambda r: world.neuter("Connect", r).SerializeToString()
    )
    # A report (of another agent's running task, a settled one...) changed at random.
    report = ep_pb.StatusUpdate(
        task_id=world.running, attempt=1, state=task_pb2.TASK_STATE_SUCCEEDED, result=world.bomb
    )
    forged = s.near(ep_pb.ConnectRequest(status=ep_pb.StatusBatch(updates=[report]))).map(
        lambda r: world.neuter("Connect", r).SerializeToString()
    )
    heartbeat = st.just(ep_pb.ConnectRequest(heartbeat=ep_pb.Heartbeat()).SerializeToString())
    garbage = st.binary(min_size=1, max_size=64)
    first = st.one_of(*[good_hello] * 6, any_request, garbage)
    later = st.one_of(
        any_request, forged, forged, forged, heartbeat, heartbeat, garbage, good_hello
    )
    states = [v.number for v in task_pb2.TaskState.DESCRIPTOR.values]
    return st.builds(
        lambda a, rest, hang, state, offset, result: StreamPlan(
            [a, *rest], hang, state, offset, result
        ),
        first,
        st.lists(later, max_size=4),
        st.sampled_from([True, True, False]),
        st.one_of(st.sampled_from(states), _ints(32, True)),
        st.sampled_from([0, 0, 1, -1, 2**31 - 1]),
        s.payloads,
    )


@dataclass
class StreamOutcome:
    code: Code
    details: str
    welcomed: bool
    cancelled_by_us: bool
    took: float
    received: list[str]
    reported: int = 0  # dispatched tasks it reported on


def _run_stream(
    world: World, plan: StreamPlan, hold: float = HANG, bound: float = STREAM_BOUND
) -> StreamOutcome:
    """Send the plan's frames on a new Connect stream, then close the sending side or
    hang: the server's status, or (a stream it welcomed, which hangs) the client's cancel
    after ``hold`` seconds. A welcomed hanging stream answers what it was dispatched.

    The blocking API, whose request iterator runs on its own thread: a write that races
    the server's close is dropped, so the status is the server's (grpc.aio's ``write``
    would turn it into a client-side ``INTERNAL: Internal error from Core``).
    """
    started = time.monotonic()
    later: queue.Queue[bytes | None] = queue.Queue()
    done = threading.Event()
    welcomed = threading.Event()
    received: list[ep_pb.ConnectResponse] = []

    def requests() -> Iterator[bytes]:
        yield from plan.frames
        if plan.hang:
            while (frame := later.get()) is not None:
                yield frame

    call = world.channel.stream_stream(CONNECT)(
        requests(), metadata=world.metadata, timeout=bound + hold + 2
    )
    call.add_done_callback(lambda _: done.set())

    def read() -> None:
        try:
            for raw in call:
                message = ep_pb.ConnectResponse.FromString(raw)
                received.append(message)
                if message.WhichOneof("message") == "welcome":
                    welcomed.set()
        except grpc.RpcError:
            pass  # its status is the call's
        finally:
            done.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    cancelled = False
    reported = 0
    try:
        # The server answers every stream within the bound: a welcome or a status.
        deadline = time.monotonic() + bound
        while not (done.is_set() or welcomed.is_set()) and time.monotonic() < deadline:
            done.wait(0.01)
        if welcomed.is_set() and not done.is_set():
            if plan.hang:
                done.wait(hold)
                dispatches = [
                    d
                    for m in list(received)
                    if m.WhichOneof("message") == "dispatch"
                    for d in m.dispatch.dispatches
                ]
                if dispatches and not done.is_set():
                    # Report on what it was sent: random states, attempts and results.
                    updates = [
                        ep_pb.StatusUpdate(
                            task_id=d.task_id,
                            attempt=(d.attempt + plan.reply_offset) % 2**31,
                            state=plan.reply_state,
                            result=plan.reply_result,
                        )
                        for d in dispatches
                    ]
                    later.put(
                        ep_pb.ConnectRequest(
                            status=ep_pb.StatusBatch(updates=updates)
                        ).SerializeToString()
                    )
                    reported = len(updates)
                    done.wait(0.1)
            else:
                done.wait(bound)  # the server ends the stream after the agent's end
        if not done.is_set():
            cancelled = True
            call.cancel()
    finally:
        later.put(None)
        reader.join(bound)
    assert not reader.is_alive(), "the stream's reader did not end"
    kinds = [m.WhichOneof("message") or "?" for m in received]
    return StreamOutcome(
        call.code(),
        call.details() or "",
        welcomed.is_set(),
        cancelled,
        time.monotonic() - started,
        kinds,
        reported,
    )


@settings(FUZZ_SETTINGS, max_examples=STREAM_EXAMPLES)
@given(data=st.data())
def test_random_connect_streams_answer_a_status(world: World, data: st.DataObject) -> None:
    plan = data.draw(_plans(world), label="plan")
    outcome = _run_stream(world, plan)
    event("welcomed" if outcome.welcomed else "refused")
    event(f"{outcome.code.name} ({'client cancel' if outcome.cancelled_by_us else 'server'})")
    if outcome.reported:
        event("reported on tasks dispatched to it")
    shown = f"{outcome}\nframes: {[_show(f) for f in plan.frames]}"
    first = plan.first_hello
    if first is not None and first.agent_id == world.live_agent:
        assert not outcome.welcomed, "a hello with the live agent's id was welcomed\n" + shown
    if outcome.cancelled_by_us:
        # Only a stream the server welcomed is held open: an agent, until it leaves.
        assert outcome.welcomed and plan.hang, "the server neither answered nor welcomed\n" + shown
    else:
        problem = _answer_problem(outcome.code, outcome.details)
        assert problem is None, f"Connect answered {problem}\n" + shown
    if outcome.welcomed:
        assert outcome.received[0] == "welcome", shown


def test_streams_that_hang_are_closed_by_the_hello_timeout(world: World) -> None:
    """Silent streams, and streams that send garbage (or a hello, then garbage) and hang,
    all at once: each ends with a status, the silent ones by the hello timeout."""
    hello = ep_pb.ConnectRequest(
        hello=ep_pb.Hello(endpoint_id=world.endpoint_ids["fuzz-ep"], agent_id="hang-1", capacity=1)
    ).SerializeToString()
    local_id = next(i for i in world.local if i != "local")
    live = ep_pb.ConnectRequest(
        hello=ep_pb.Hello(endpoint_id=local_id, agent_id=world.live_agent, capacity=1)
    ).SerializeToString()
    cases = {
        "silent 1": [],
        "silent 2": [],
        "garbage": [b"\xff\xfe\xfd garbage"],
        "empty then garbage": [b"", b"\x12"],
        "hello then garbage": [hello, b"\x0a\xff\xff\xff\xff\x0f"],
        "hello with the live agent's id": [live],
    }
    bound = _defaults.HELLO_TIMEOUT + 3
    with ThreadPoolExecutor(len(cases)) as pool:
        futures = {
            case: pool.submit(_run_stream, world, StreamPlan(frames, True, 0, 0, b""), bound, bound)
            for case, frames in cases.items()
        }
        outcomes = {case: future.result() for case, future in futures.items()}
    for case, outcome in outcomes.items():
        assert not outcome.cancelled_by_us, (case, outcome)
        assert outcome.welcomed == case.startswith("hello then"), (case, outcome)
        if case.startswith("silent"):
            assert outcome.code is Code.DEADLINE_EXCEEDED, (case, outcome)
            assert outcome.details.startswith("no hello within"), (case, outcome)
            assert _defaults.HELLO_TIMEOUT - 0.5 <= outcome.took <= bound, (case, outcome)
        elif "live" in case:
            assert outcome.code is Code.ALREADY_EXISTS, (case, outcome)
        else:
            assert outcome.code is Code.INVALID_ARGUMENT, (case, outcome)
            assert outcome.took < _defaults.HELLO_TIMEOUT, (case, outcome)
    world.assert_intact()


def test_a_refused_hello_leaves_its_endpoint_as_it_was(world: World) -> None:
    """A hello with the live agent's id is refused and changes nothing: not the agent's
    tasks (test_streams_that_hang...), and not its endpoint's allow-list."""
    local_id = next(i for i in world.local if i != "local")
    refused = ep_pb.ConnectRequest(
        hello=ep_pb.Hello(
            endpoint_id=local_id,
            agent_id=world.live_agent,
            capacity=1,
            allowed_functions=ep_pb.AllowedFunctions(function_ids=[world.bomb_function_id]),
        )
    ).SerializeToString()
    try:
        outcome = _run_stream(world, StreamPlan([refused], True, 0, 0, b""))
        assert outcome.code is Code.ALREADY_EXISTS and not outcome.welcomed, outcome
        hc = world.client
        assert hc.get_result(hc.submit("local", pow, 2, 5), timeout=30) == 32
    finally:
        # Put the endpoint's allow-list back as the real agent's hello left it (none): a
        # welcomed hello of a passing agent without one, which leaves at once.
        passing = ep_pb.ConnectRequest(
            hello=ep_pb.Hello(endpoint_id=local_id, agent_id=str(uuid.uuid4()), capacity=1)
        ).SerializeToString()
        _run_stream(world, StreamPlan([passing], False, 0, 0, b""))
    world.assert_intact()


# --------------------------------------------------------------------------- 5. payloads


async def _next(
    call: Any, kind: str, task_id: str = "", timeout: float = TIMEOUT
) -> ep_pb.ConnectResponse:
    """The next message of this kind on a Connect stream (others are skipped); with
    ``task_id``, the next dispatch or ack that names that task."""

    def names(message: ep_pb.ConnectResponse) -> bool:
        if kind == "dispatch":
            return any(d.task_id == task_id for d in message.dispatch.dispatches)
        if kind == "ack":
            return any(a.task_id == task_id for a in message.ack.acks)
        return True

    async def find() -> ep_pb.ConnectResponse:
        while True:
            raw = await call.read()
            assert raw is not grpc.aio.EOF, f"the stream ended before a {kind}"
            message = ep_pb.ConnectResponse.FromString(raw)
            if message.WhichOneof("message") == kind and (not task_id or names(message)):
                return message

    return await asyncio.wait_for(find(), timeout)


def _dispatch(message: ep_pb.ConnectResponse, task_id: str) -> ep_pb.Dispatch:
    (found,) = [d for d in message.dispatch.dispatches if d.task_id == task_id]
    return found


def test_payloads_are_stored_and_sent_but_never_unpickled_by_the_server(world: World) -> None:
    """The payload that creates a file goes in as a function, as arguments (stored on
    "ghost" before the fuzz), as a result reported over Connect by the agent a task was
    dispatched to, and out again as another task's input: the file never appears."""
    bomb, fid = world.bomb, world.bomb_function_id

    async def scenario() -> tuple[str, str, ep_pb.Dispatch, ep_pb.Dispatch]:
        async with grpc.aio.insecure_channel(world.address, options=CHANNEL_OPTIONS) as channel:

            async def submit(spec: task_pb2.TaskSpec) -> str:
                reply = await channel.unary_unary("/heartline.v1.TaskService/SubmitTasks")(
                    task_service_pb2.SubmitTasksRequest(
                        endpoint="forge", tasks=[spec]
                    ).SerializeToString(),
                    metadata=world.metadata,
                    timeout=TIMEOUT,
                )
                return task_service_pb2.SubmitTasksResponse.FromString(reply).task_ids[0]

            call = channel.stream_stream(CONNECT)(metadata=world.metadata, timeout=30)
            hello = ep_pb.Hello(
                endpoint_id=world.endpoint_ids["forge"], agent_id=str(uuid.uuid4()), capacity=2
            )
            await call.write(ep_pb.ConnectRequest(hello=hello).SerializeToString())
            welcome = (await _next(call, "welcome")).welcome
            # The server runs with 1s heartbeats (see the ``world`` fixture).
            assert welcome.heartbeat_interval_seconds == 1.0, welcome

            def report(d: ep_pb.Dispatch, state: int, **extra: Any) -> bytes:
                update = ep_pb.StatusUpdate(
                    task_id=d.task_id, attempt=d.attempt, state=state, **extra
                )
                return ep_pb.ConnectRequest(
                    status=ep_pb.StatusBatch(updates=[update])
                ).SerializeToString()

            first_id = await submit(task_pb2.TaskSpec(function_id=fid, args=bomb))
            first = _dispatch(await _next(call, "dispatch", first_id), first_id)
            await call.write(report(first, task_pb2.TASK_STATE_RUNNING))
            await call.write(report(first, task_pb2.TASK_STATE_SUCCEEDED, result=bomb))
            await _next(call, "ack", first_id)
            second_id = await submit(
                task_pb2.TaskSpec(function_id=fid, args=bomb, inputs=[first_id])
            )
            second = _dispatch(await _next(call, "dispatch", second_id), second_id)
            error = task_pb2.RemoteError(
                type_name="X" * 10_000, message="é" * 100_000, traceback="\x00"
            )
            await call.write(report(second, task_pb2.TASK_STATE_ERRORED, error=error))
            await _next(call, "ack", second_id)
            call.cancel()
            return first_id, second_id, first, second

    first_id, second_id, first, second = asyncio.run(scenario())
    assert (first.task_id, first.function, first.args) == (first_id, bomb, bomb)
    assert (second.task_id, list(second.inputs), second.args) == (second_id, [bomb], bomb)
    code, details, reply = world.unary(
        "/heartline.v1.TaskService/GetTasks",
        task_service_pb2.GetTasksRequest(task_ids=[first_id, second_id]).SerializeToString(),
    )
    assert code is Code.OK, (code, details)
    got = task_service_pb2.GetTasksResponse.FromString(reply).tasks
    assert got[0].state == task_pb2.TASK_STATE_SUCCEEDED and got[0].result == bomb, got[0]
    assert got[1].state == task_pb2.TASK_STATE_ERRORED, got[1]
    # A watch with results sends the stored bytes as they are.
    call = world.channel.unary_stream("/heartline.v1.TaskService/WatchTasks")(
        task_service_pb2.WatchTasksRequest(
            task_ids=[first_id], include_results=True
        ).SerializeToString(),
        metadata=world.metadata,
        timeout=TIMEOUT,
    )
    try:
        (update,) = task_service_pb2.WatchTasksResponse.FromString(next(call)).updates
    finally:
        call.cancel()
    assert update.result == bomb
    world.assert_intact()


# --------------------------------------------------------------------------- 6. after all


def test_after_all_of_it_the_server_is_healthy_and_nothing_stored_changed(world: World) -> None:
    with grpc.insecure_channel(world.address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=TIMEOUT
        )
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    assert all(agent.popen.poll() is None for agent in world.stack.agents), tail(
        *world.stack.agents
    )
    world.assert_intact()
    running = world.canaries[world.running]
    assert running.state == task_pb2.TASK_STATE_RUNNING and running.attempt == 1, running
    assert [h.cause for h in running.history].count("dispatch") == 1, running.history
    # The real agent is the only one of its endpoint, and still runs tasks.
    hc = world.client
    (local,) = [e for e in hc.list_endpoints() if e.name == "local"]
    assert [a.agent_id for a in local.agents] == [world.live_agent], local
    assert hc.get_result(hc.submit("local", pow, 2, 10), timeout=30) == 1024
    hc.cancel([world.running])
    assert not world.payload_file.exists()
    text = world.server.text()
    assert "Traceback" not in text and "level=ERROR" not in text, tail(world.server)
