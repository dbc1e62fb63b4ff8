"""Operator commands of the CLI: tasks, endpoints, groups, stats. Tables are rich tables; an
error is one line on stderr and a non-zero exit, never a traceback."""

from __future__ import annotations

import datetime
import functools
import sys
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from heartline import _defaults
from heartline._errors import HeartlineError, TaskFailedError
from heartline._states import CancelMode, GroupStatus, TaskState

if TYPE_CHECKING:
    from heartline._tls import TLS
    from heartline.client import GroupInfo, Task

SERVER_METAVAR = "HOST:PORT[,HOST:PORT...]"
SERVER_HELP = (
    "The server; several sharing one store, comma-separated, fail over to whichever is "
    f"active [default: ${_defaults.ENV_ADDRESS} or {_defaults.DEFAULT_ADDRESS}]."
)


def check_server(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """Check the form of a ``--server`` address list before anything connects (its host
    names are looked up when it does)."""
    if value is not None:
        from heartline._channel import split_servers

        try:
            split_servers(value)
        except ValueError as exc:
            raise click.BadParameter(str(exc)) from None
    return value


_server_address = click.option(
    "--server",
    "address",
    default=None,
    envvar=_defaults.ENV_ADDRESS,
    metavar=SERVER_METAVAR,
    callback=check_server,
    help=SERVER_HELP,
)


def keep_in_context(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """An option's callback that keeps its value in ``ctx.meta["heartline.<name>"]``."""
    ctx.meta[f"heartline.{param.name}"] = value
    return value


# How a command reaches the server over TLS. The values wait in the click context for
# cli_tls(), so the options join every command without changing its parameters.
_tls_client_options = [
    click.option("--tls-ca", envvar=_defaults.ENV_TLS_CA, expose_value=False, callback=keep_in_context, metavar="FILE", help=f"Trust the server's certificate by this CA (PEM); connects over TLS [env: {_defaults.ENV_TLS_CA}]."),
    click.option("--tls-cert", envvar=_defaults.ENV_TLS_CERT, expose_value=False, callback=keep_in_context, metavar="FILE", help=f"Client certificate (PEM) for a mutual-TLS server; with --tls-key [env: {_defaults.ENV_TLS_CERT}]."),
    click.option("--tls-key", envvar=_defaults.ENV_TLS_KEY, expose_value=False, callback=keep_in_context, metavar="FILE", help=f"Private key (PEM) of --tls-cert [env: {_defaults.ENV_TLS_KEY}]."),
]  # fmt: skip


def tls_client_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Add ``--tls-ca``, ``--tls-cert`` and ``--tls-key`` to a command (see :func:`cli_tls`)."""
    for option in reversed(_tls_client_options):
        fn = option(fn)
    return fn


def cli_tls() -> TLS | None:
    """The TLS the running command's ``--tls-*`` options (or their environment) ask for;
    None: plaintext."""
    meta = click.get_current_context().meta
    ca, cert, key = (meta.get(f"heartline.tls_{name}") for name in ("ca", "cert", "key"))
    if ca is None and cert is None and key is None:
        return None
    from heartline._tls import TLS

    try:
        return TLS(ca=ca, cert=cert, key=key)
    except ValueError:
        raise click.UsageError(
            "--tls-cert and --tls-key go together: give both or neither"
        ) from None


def _address(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``--server HOST:PORT[,HOST:PORT...]``, and the TLS options to reach it."""
    return _server_address(tls_client_options(fn))


_token = click.option("--token", default=None, envvar=_defaults.ENV_TOKEN, help="Bearer token.")


def _console() -> Console:
    return Console(soft_wrap=False, width=None if sys.stdout.isatty() else 160)


def _fail_cleanly(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Report heartline errors as one line and exit 1."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except HeartlineError as err:
            click.echo(f"error: {str(err).splitlines()[0]}", err=True)
            sys.exit(1)

    return wrapper


def _client(address: str | None, token: str | None):
    from heartline.client import Client

    return Client(address, token=token, tls=cli_tls() or False)


def _when(value: datetime.datetime | None) -> str:
    return value.astimezone().strftime("%Y-%m-%d %H:%M:%S") if value else "-"


def _state_style(state: TaskState) -> str:
    return {
        TaskState.SUCCEEDED: "green",
        TaskState.ERRORED: "red",
        TaskState.FAILED: "red",
        TaskState.CANCELLED: "yellow",
        TaskState.SKIPPED: "yellow",
        TaskState.RUNNING: "cyan",
    }.get(state, "")


def register_operator_commands(main: click.Group) -> None:
    """Attach the operator command groups to the top-level ``heartline`` group."""
    main.add_command(tasks)
    main.add_command(endpoints)
    main.add_command(groups)
    main.add_command(stats)


@click.group()
def tasks() -> None:
    """Inspect and control tasks."""


@tasks.command("list")
@click.option(
    "--state",
    "states",
    multiple=True,
    type=click.Choice([s.value for s in TaskState]),
    help="Only tasks in this state (repeatable).",
)
@click.option("--endpoint", default=None, help="Only tasks of this endpoint (name or id).")
@click.option("--limit", default=50, show_default=True, type=click.IntRange(1, 1000))
@_address
@_token
@_fail_cleanly
def tasks_list(states, endpoint, limit, address, token) -> None:
    """List tasks, newest first."""
    with _client(address, token) as hc:
        rows = hc.list_tasks(states=list(states) or None, endpoint=endpoint, limit=limit)
    table = Table("task", "state", "endpoint", "attempt", "submitted", "settled", "waiting / error")
    for t in rows:
        note = (
            t.waiting_reason
            if t.pending
            else (f"{t.error.type_name}: {t.error.message}" if t.error else "")
        )
        table.add_row(
            t.id,
            f"[{_state_style(t.state)}]{t.state.value}[/]"
            if _state_style(t.state)
            else t.state.value,
            t.endpoint,
            str(t.attempt),
            _when(t.submitted),
            _when(t.settled),
            note[:60],
        )
    _console().print(table)
    if not rows:
        click.echo("no tasks")


@tasks.command("show")
@click.argument("task_id")
@_address
@_token
@_fail_cleanly
def tasks_show(task_id, address, token) -> None:
    """Show one task with its history of transitions and the output of its latest attempt."""
    with _client(address, token) as hc:
        t = hc.get_task(task_id)
    console = _console()
    summary = Table(show_header=False, box=None)
    summary.add_row("task", t.id)
    summary.add_row(
        "state", t.state.value + (f"  ({t.waiting_reason})" if t.waiting_reason else "")
    )
    summary.add_row("endpoint", t.endpoint)
    summary.add_row("attempt", str(t.attempt))
    summary.add_row("submitted", _when(t.submitted))
    summary.add_row("started", _when(t.started))
    summary.add_row("settled", _when(t.settled))
    if t.state is TaskState.SUCCEEDED:
        try:
            summary.add_row("result", repr(t.result)[:200])
        except HeartlineError as err:
            summary.add_row("result", f"(cannot load here: {err})")
    if t.error is not None:
        summary.add_row("error", f"{t.error.type_name}: {t.error.message}")
    console.print(summary)
    history = Table("time", "from", "to", "attempt", "cause", title="history")
    for h in t.history:
        history.add_row(
            _when(h.time),
            h.from_state.value if h.from_state else "-",
            h.to_state.value,
            str(h.attempt),
            h.cause,
        )
    console.print(history)
    if t.error is not None and t.error.traceback:
        console.print(t.error.traceback.rstrip(), markup=False, highlight=False)
    # The latest attempt's output, as the task wrote it (never wrapped, nothing read as
    # markup); a long one was cut to its tail on the endpoint.
    for heading, text in (("stdout", t.stdout), ("stderr", t.stderr)):
        if text:
            console.rule(heading, align="left")
            console.print(
                text.rstrip("\n"), markup=False, highlight=False, emoji=False, soft_wrap=True
            )


def _command(name: str, method: str, help_text: str) -> None:
    @tasks.command(name, help=help_text)
    @click.argument("task_ids", nargs=-1, required=True)
    @_address
    @_token
    @_fail_cleanly
    def command(task_ids, address, token) -> None:
        with _client(address, token) as hc:
            updates = getattr(hc, method)(list(task_ids))
        if method == "resubmit":
            for old, new in zip(task_ids, updates, strict=True):
                click.echo(f"{old} -> {new}")
            return
        for u in updates:
            click.echo(f"{u.task_id} {u.state.value}")


_command("cancel", "cancel", "Cancel pending tasks (a running task's worker is ended).")
_command("hold", "hold", "Hold queued tasks: they are not dispatched until released.")
_command("release", "release", "Release held tasks.")
_command("retry", "retry", "Run errored tasks again (attempt + 1).")
_command("give-up", "give_up", "Mark errored tasks failed for good.")
_command("resubmit", "resubmit", "Submit failed or cancelled tasks again as new tasks.")


@tasks.command("wait")
@click.argument("task_ids", nargs=-1, required=True)
@click.option("--timeout", type=float, default=None, help="Give up after this many seconds.")
@_address
@_token
@_fail_cleanly
def tasks_wait(task_ids, timeout, address, token) -> None:
    """Wait until tasks settle, with a progress bar; exit 1 if any did not succeed."""
    failed = 0
    columns = (TextColumn("settled"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with _client(address, token) as hc, Progress(*columns, console=Console(stderr=True)) as bar:
        progress = bar.add_task("wait", total=len(task_ids))
        for tid in task_ids:
            try:
                hc.get_result(tid, timeout=timeout)
            except TaskFailedError:
                failed += 1
            bar.advance(progress)
    click.echo(f"{len(task_ids) - failed} succeeded, {failed} did not")
    sys.exit(1 if failed else 0)


@click.group()
def endpoints() -> None:
    """Inspect endpoints."""


@endpoints.command("list")
@_address
@_token
@_fail_cleanly
def endpoints_list(address, token) -> None:
    """List endpoints with their agents and queues."""
    with _client(address, token) as hc:
        rows = hc.list_endpoints()
    table = Table("endpoint", "id", "online", "agents", "python", "workers", "in flight", "queued")
    for ep in rows:
        # Each agent's Python: a function without a source form runs only on its own.
        pythons = sorted({a.python or "?" for a in ep.agents})
        table.add_row(
            ep.name,
            ep.id,
            "[green]yes[/]" if ep.online else "[red]no[/]",
            str(len(ep.agents)),
            ", ".join(pythons) or "-",
            str(sum(a.capacity for a in ep.agents)),
            str(sum(a.in_flight for a in ep.agents)),
            str(ep.queued),
        )
    _console().print(table)


@click.command()
@_address
@_token
@_fail_cleanly
def stats(address, token) -> None:
    """Task counts by state, endpoints online, transitions so far."""
    with _client(address, token) as hc:
        s = hc.stats()
    table = Table("state", "tasks")
    for state in TaskState:
        table.add_row(state.value, str(s.tasks_by_state.get(state.value, 0)))
    console = _console()
    console.print(table)
    console.print(
        f"endpoints online: {s.endpoints_online}   agents online: {s.agents_online}   "
        f"transitions since start: {s.transitions}"
    )


# --------------------------------------------------------------------------- groups

_COUNT_WORDS = (
    ("Succeeded", "succeeded"),
    ("Failed", "failed"),
    ("Skipped", "skipped"),
    ("Cancelled", "cancelled"),
    ("None", "pending"),
)


def group_counts_text(counts: Mapping[str, int]) -> str:
    """``"2 succeeded, 1 skipped"``: a group's DAG tasks by status, zeros left out."""
    words = dict(_COUNT_WORDS)
    parts = [f"{n} {words.get(status, status)}" for status, n in counts.items() if n]
    return ", ".join(parts) or "-"


def _group_status_style(status: GroupStatus) -> str:
    return {
        GroupStatus.SUCCEEDED: "green",
        GroupStatus.FAILED: "red",
        GroupStatus.COMPLETED: "yellow",
    }.get(status, "")


def _task_text(task: Task | None) -> str:
    """A group task's state with why it is so (skip reason, error type, wait), and its id."""
    if task is None:
        return "(no task)"
    text = task.state.value
    if task.skip_reason is not None:
        text += f" ({task.skip_reason.value})"
    elif task.error is not None and not task.pending:
        text += f" ({task.error.type_name or task.error.message})"
    elif task.pending and task.waiting_reason:
        text += f" ({task.waiting_reason})"
    return f"{text}  {task.id}"


def group_tree(info: GroupInfo) -> list[str]:
    """The lines that draw a group: its aggregate status on top, then each DAG task under
    the tasks it runs after or takes inputs from, then the finally tasks.

    Siblings come in submission order. A task with several parents is drawn in full the
    first time the walk meets it, and as ``name  (shown above)`` under its other parents.
    """
    dag = [m for m in info.group_tasks.values() if not m.is_finally]
    finals = [m for m in info.group_tasks.values() if m.is_finally]
    names = {m.name for m in dag}
    children: dict[str, list[str]] = {m.name: [] for m in dag}
    roots = []
    for member in dag:
        parents = [p for p in member.parents if p in names and p != member.name]
        for parent in parents:
            children[parent].append(member.name)
        if not parents:
            roots.append(member.name)
    # A task no root reaches (only in a cycle, which the server refuses) is a root too.
    reached: set[str] = set()
    for name in [*roots, *(m.name for m in dag)]:
        if name in reached:
            continue
        if name not in roots:
            roots.append(name)
        todo = [name]
        while todo:
            current = todo.pop()
            if current not in reached:
                reached.add(current)
                todo.extend(children[current])

    head = f"{info.name} ({info.id})  {info.status.value}"
    if info.pending:
        head += ", pending"
    if info.cancel_mode is not None:
        head += f", {info.cancel_mode.value}"
    if info.timed_out:
        head += ", timed out"
    lines = [head]
    drawn: set[str] = set()
    # (task name, the prefix its line starts with, whether it is the last of its siblings)
    stack = [(name, "", i == len(roots) - 1 and not finals) for i, name in enumerate(roots)]
    stack.reverse()
    while stack:
        name, prefix, last = stack.pop()
        branch = prefix + ("└── " if last else "├── ")
        if name in drawn:
            lines.append(f"{branch}{name}  (shown above)")
            continue
        drawn.add(name)
        lines.append(f"{branch}{name}  {_task_text(info.group_tasks[name].task)}")
        below = prefix + ("    " if last else "│   ")
        kids = children[name]
        stack.extend((kid, below, i == 0) for i, kid in enumerate(reversed(kids)))
    if finals:
        lines.append("└── finally")
        for i, member in enumerate(finals):
            branch = "    └── " if i == len(finals) - 1 else "    ├── "
            lines.append(f"{branch}{member.name}  {_task_text(member.task)}")
    return lines


@click.group()
def groups() -> None:
    """Inspect and cancel groups of tasks."""


@groups.command("list")
@click.option("--pending", is_flag=True, help="Only groups with a pending task.")
@click.option("--limit", default=50, show_default=True, type=click.IntRange(1, 1000))
@_address
@_token
@_fail_cleanly
def groups_list(pending: bool, limit: int, address: str | None, token: str | None) -> None:
    """List groups, newest first."""
    with _client(address, token) as hc:
        rows = hc.list_groups(pending_only=pending, limit=limit)
    table = Table("group", "name", "status", "tasks", "submitted")
    for g in rows:
        style = _group_status_style(g.status)
        status = g.status.value + (" (pending)" if g.pending else "")
        table.add_row(
            g.id,
            g.name,
            f"[{style}]{status}[/]" if style else status,
            group_counts_text(g.counts),
            _when(g.submit_time),
        )
    _console().print(table)
    if not rows:
        click.echo("no groups")


@groups.command("show")
@click.argument("group_id")
@_address
@_token
@_fail_cleanly
def groups_show(group_id: str, address: str | None, token: str | None) -> None:
    """Show a group: its DAG as a tree, with each task's state."""
    with _client(address, token) as hc:
        g = hc.get_group(group_id)
    summary = Table(show_header=False, box=None)
    summary.add_row("endpoint", g.endpoint_name or g.endpoint_id)
    summary.add_row("tasks", group_counts_text(g.counts) + f"; {g.finally_count} finally")
    summary.add_row("fail fast", "yes" if g.fail_fast else "no")
    summary.add_row("timeout", f"{g.timeout:g} s" if g.timeout else "-")
    summary.add_row("submitted", _when(g.submit_time))
    summary.add_row("settled", _when(g.settle_time))
    console = _console()
    for line in group_tree(g):  # the aggregate status on top
        console.print(line, markup=False, highlight=False)
    console.print(summary)


@groups.command("cancel")
@click.argument("group_id")
@click.option(
    "--mode",
    type=click.Choice([m.value for m in CancelMode]),
    default=CancelMode.CANCEL.value,
    show_default=True,
    help="cancel: cancel everything, no finally tasks; cancel_run_finally: cancel, then run "
    "the finally tasks; stop_run_finally: start nothing new, let running tasks finish, then "
    "run the finally tasks.",
)
@_address
@_token
@_fail_cleanly
def groups_cancel(group_id: str, mode: str, address: str | None, token: str | None) -> None:
    """Cancel or stop a group."""
    with _client(address, token) as hc:
        g = hc.cancel_group(group_id, mode)
    click.echo(f"{g.id} {mode}: {g.status.value}, {'pending' if g.pending else 'settled'}")
