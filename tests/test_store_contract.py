"""The rest of the store contract, against each store (tests/store_kit.py): users, tokens,
shares and allow-lists, request ids, function sizes, endpoints, figures, the bound of a
group, and values of every type a column may be given."""

from __future__ import annotations

import asyncio
from bisect import bisect_left

from heartline._states import GroupStatus, TaskState
from heartline.server._model import (
    EndpointRow,
    ErrorInfo,
    FunctionRow,
    GroupMember,
    GroupRow,
    GroupStateRow,
    OutputRow,
    RequestRow,
    TokenRow,
    TransitionRow,
    WriteBatch,
)
from heartline.server._store import MAX_GROUP, Store
from tests import store_kit
from tests.store_kit import count_commits, is_sqlite, writer_paused
from tests.test_store import submitted, task

# The fixtures: each test that takes `store` runs against every store.
new_store = store_kit.new_store
store = store_kit.store

S = TaskState
WAIT = 10.0


async def test_tokens_users_and_revocation(store: Store) -> None:
    alice1 = TokenRow("tok-a1", "alice", None, 10.0)
    alice2 = TokenRow("tok-a2", "alice", "gpu", 10.0)  # same time: ordered by id
    bob = TokenRow("tok-b", "bob", None, 5.0)
    for row, secret in ((alice2, "h-a2"), (alice1, "h-a1"), (bob, "h-b")):
        await store.create_token(row, secret)
    assert await store.list_tokens() == [bob, alice1, alice2]
    assert await store.list_tokens("alice") == [alice1, alice2]
    assert await store.list_tokens("carol") == []

    revoked = await store.revoke_token("tok-a1", 20.0)
    assert revoked == TokenRow("tok-a1", "alice", None, 10.0, 20.0)
    # Once: a second revocation keeps the first time.
    assert await store.revoke_token("tok-a1", 30.0) == revoked
    assert await store.revoke_token("nope", 30.0) is None
    assert (await store.list_tokens("alice"))[0].revoked == 20.0

    users, live = await store.load_tokens()
    assert users == ["alice", "bob"]  # each user once, sorted
    assert sorted(live, key=lambda t: t[0].token_id) == [(alice2, "h-a2"), (bob, "h-b")]
    assert type(live[0][0].created) is float


async def test_shares_and_allow_lists(store: Store) -> None:
    await store.share_endpoint("ep-2", "carol")
    await store.share_endpoint("ep-1", "bob")
    await store.share_endpoint("ep-1", "bob")  # twice is once
    await store.share_endpoint("ep-1", "alice")
    assert await store.load_shares() == [("ep-1", "alice"), ("ep-1", "bob"), ("ep-2", "carol")]

    await store.set_allowed_functions("ep-1", ["f2", "f1"])
    await store.set_allowed_functions("ep-2", [])  # allows none
    await store.set_allowed_functions("ep-3", ["f9"])
    await store.set_allowed_functions("ep-3", None)  # none: every function runs
    await store.set_allowed_functions("ep-1", ["f3"])  # replaced
    assert await store.load_allowed_functions() == {
        "ep-1": frozenset({"f3"}),
        "ep-2": frozenset(),
    }


async def test_request_ids_are_read_without_waiting_behind_writes(store: Store) -> None:
    old = RequestRow("old", "alice", "SubmitTasks", "a" * 64, ("t1", "t2"), 100.0)
    none = RequestRow("none", "alice", "command:hold", "b" * 64, (), 100.0)
    await store.write(WriteBatch(requests=(old, none)))
    assert await store.get_request("old") == old
    assert await store.get_request("none") == none
    assert await store.get_request("nope") is None

    new = RequestRow("new", "alice", "SubmitTasks", "c" * 64, ("t3",), 300.0)
    async with writer_paused(store):
        queued = store.write(WriteBatch(requests=(new,)))
        # The writer is held: a read through the queue would wait; this one does not.
        assert await asyncio.wait_for(store.get_request("old"), WAIT) == old
        assert await asyncio.wait_for(store.get_request("new"), WAIT) is None
        assert not queued.done()
    await queued
    assert await store.get_request("new") == new

    # Kept as long as payloads are.
    await store.purge_results(200.0)
    assert await store.get_request("old") is None
    assert await store.get_request("new") == new


async def test_function_sizes(store: Store) -> None:
    await store.write(
        WriteBatch(
            functions=(
                FunctionRow("f1", b"x" * 100, "alice", 1.0),
                FunctionRow("f2", b"\x00" * 28, "alice", 2.0),
                FunctionRow("f3", b"y" * 7, "bob", 3.0),
            )
        )
    )
    assert await store.function_size("f2") == 28
    assert await store.function_size("nope") is None
    assert await store.function_bytes_by_owner() == {"alice": 128, "bob": 7}
    assert await store.function_bytes_by_owner("bob") == {"bob": 7}
    assert await store.function_bytes_by_owner("carol") == {}
    assert await store.function_tails(["f2", "f3"], 5) == {"f2": b"\x00" * 5, "f3": b"y" * 5}
    assert await store.function_tails([], 5) == {}


async def test_an_endpoint_replaces_the_one_of_its_id_or_of_its_name(store: Store) -> None:
    await store.write(
        WriteBatch(
            endpoints=(
                EndpointRow("ep-1", "local", "alice", 1.0),
                EndpointRow("ep-2", "gpu", "alice", 2.0),
            )
        )
    )
    # A new id under a taken (owner, name) takes that name's place.
    await store.write(WriteBatch(endpoints=(EndpointRow("ep-9", "local", "alice", 9.0),)))
    assert await store.list_endpoints("alice") == [
        EndpointRow("ep-2", "gpu", "alice", 2.0),
        EndpointRow("ep-9", "local", "alice", 9.0),
    ]
    assert await store.get_endpoint("ep-1") is None
    # The same id under a new name: renamed.
    await store.write(WriteBatch(endpoints=(EndpointRow("ep-2", "tpu", "alice", 3.0),)))
    assert await store.get_endpoint_by_name("tpu", "alice") == EndpointRow(
        "ep-2", "tpu", "alice", 3.0
    )
    assert await store.get_endpoint_by_name("gpu", "alice") is None


async def test_values_come_back_as_their_columns_type(store: Store) -> None:
    # ints where floats are stored, bools where integers are: what a caller may pass.
    row = task(
        "t1", submit_time=100, walltime=60, start_time=101, settle_time=102, attempt=2,
        payload_purged=True, interrupted=True, state=S.ERRORED,
        error=ErrorInfo("E", "m", "tb", 2),
    )  # fmt: skip
    g = GroupRow("g-1", "nightly", "alice", "ep-1", 7, True, 30, (GroupMember("a", "t-a"),))
    state = GroupStateRow("g-1", GroupStatus.FAILED, False, (1, 0, 0, 0, 0), None, True, 9)
    await store.write(
        WriteBatch(
            new_tasks=(row,),
            new_groups=(g,),
            group_states=(state,),
            functions=(FunctionRow("f1", b"p", "alice", 5),),
            endpoints=(EndpointRow("ep-1", "local", "alice", 6),),
        )
    )
    await store.create_token(TokenRow("tok", "alice", None, 3, 4), "h")
    (got, _) = (await store.get_tasks(["t1"]))["t1"]
    assert got == row
    floats = (got.submit_time, got.walltime, got.start_time, got.settle_time)
    assert [type(v) for v in floats] == [float] * 4
    assert type(got.attempt) is int and type(got.error.failure_kind) is int  # type: ignore[union-attr]
    assert got.payload_purged is True and got.interrupted is True
    (record,) = await store.load_unsettled()
    assert type(record.submit_time) is float and type(record.walltime) is float
    stored_group, stored_state = await store.get_group("g-1")  # type: ignore[misc]
    assert stored_group == g and stored_state == state
    assert type(stored_group.submit_time) is float and type(stored_group.timeout) is float
    assert stored_group.fail_fast is True and type(stored_state.settle_time) is float
    assert type((await store.get_function("f1")).register_time) is float  # type: ignore[union-attr]
    assert type((await store.get_endpoint("ep-1")).register_time) is float  # type: ignore[union-attr]
    (token,) = await store.list_tokens()
    assert (type(token.created), type(token.revoked)) == (float, float)


async def test_free_text_with_nul_is_stored(store: Store) -> None:
    def kept(text: str) -> str:
        # PostgreSQL's text holds no NUL: it keeps U+FFFD in its place.
        return text if is_sqlite(store) else text.replace("\x00", "\ufffd")

    error = ErrorInfo("Bad\x00Error", "message\x00", "trace\x00back", 0)
    failed = task("t1", state=S.ERRORED, error=error)
    g = GroupRow("g-1", "name\x00", "alice", "ep-1", 1.0, False, 0.0, (GroupMember("a", "t-a"),))
    request = RequestRow("req\x00", "alice", "SubmitTasks", "d" * 64, ("t1",), 1.0)
    await store.write(
        WriteBatch(
            new_tasks=(failed, task("t2", error=error)),
            transitions=(TransitionRow("t1", None, S.ERRORED, "raised\x00", 1.0, 1),),
            new_groups=(g,),
            requests=(request,),
        )
    )
    await store.write(
        WriteBatch(
            task_updates=(task("t2", state=S.ERRORED, error=error),),
            transitions=(TransitionRow("t2", S.WAITING_FOR_EP, S.ERRORED, "x\x00y", 2.0, 1),),
            outputs=(OutputRow("t1", "out\x00", "err\x00"),),
        )
    )
    got = await store.get_tasks(["t1", "t2"], include_history=True)
    row, history = got["t1"]
    assert row.error == ErrorInfo(kept("Bad\x00Error"), kept("message\x00"), kept("trace\x00back"))
    assert (row.stdout, row.stderr) == (kept("out\x00"), kept("err\x00"))
    assert history[0].cause == kept("raised\x00")
    assert got["t2"][0].error == row.error
    assert got["t2"][1][-1].cause == kept("x\x00y")
    assert (await store.get_group("g-1"))[0].name == kept("name\x00")  # type: ignore[index]
    assert await store.get_request("req\x00") == request._replace(request_id=kept("req\x00"))


async def test_figures_count_each_group_and_what_is_queued(store: Store) -> None:
    await store.write(submitted(task("t1")))
    before = store.figures()
    assert before is not None and before.queued == 0
    bucket = bisect_left(before.batch_items.bounds, 3)
    async with writer_paused(store):
        futures = [store.write(submitted(task(f"t{i}"))) for i in (2, 3, 4)]
        assert store.figures().queued == 3  # type: ignore[union-attr]
    await asyncio.gather(*futures)
    after = store.figures()
    assert after is not None and after.queued == 0
    # The blocker's group of one, then ONE group of three.
    assert after.batch_items.counts[bucket] == before.batch_items.counts[bucket] + 1
    assert after.commit_seconds.count == before.commit_seconds.count + 2
    assert after.commit_seconds.total > before.commit_seconds.total


async def test_a_group_holds_at_most_max_group_items(store: Store) -> None:
    commits = count_commits(store)
    async with writer_paused(store):
        futures = [store.write(WriteBatch()) for _ in range(MAX_GROUP + 5)]
    await asyncio.gather(*futures)
    assert commits[0] == 3  # the blocker's group, a full one, and the last five
    assert store.figures().batch_items.counts[-1] == 0  # type: ignore[union-attr] - none over


async def test_describe_names_the_store(store: Store) -> None:
    where = store.describe()
    assert where.endswith("heartline.db") if is_sqlite(store) else where.startswith("postgres")


async def test_reads_of_an_empty_store(store: Store) -> None:
    assert await store.get_tasks(["t1"]) == {}
    assert await store.load_results(["t1"]) == {}
    assert await store.load_unsettled() == []
    assert await store.load_pending_groups() == []
    assert await store.list_groups() == []
    assert await store.list_endpoints() == []
    assert await store.load_tokens() == ([], [])
    assert await store.load_shares() == []
    assert await store.load_allowed_functions() == {}
    assert await store.purge_results(1e12) == 0
