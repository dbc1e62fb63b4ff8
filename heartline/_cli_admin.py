"""Admin commands of the CLI: ``heartline token create|list|revoke`` and ``heartline
endpoints share``. Same style as :mod:`heartline._cli_ops`: tables are rich tables; an
error is one line on stderr and a non-zero exit."""

from __future__ import annotations

import click
from rich.table import Table

from heartline._cli_ops import _address, _client, _console, _fail_cleanly, _token, _when, endpoints


def register_admin_commands(main: click.Group) -> None:
    """Attach ``token`` to the top-level group and ``share`` to ``endpoints``."""
    main.add_command(token)
    endpoints.add_command(endpoints_share)


@click.group()
def token() -> None:
    """Create, list and revoke tokens."""


@token.command("create")
@click.option("--user", required=True, help="The user the token acts as (created if new).")
@click.option(
    "--endpoint", default=None, help="Make an agent token that can only serve this endpoint."
)
@_address
@_token
@_fail_cleanly
def token_create(user: str, endpoint: str | None, address: str | None, token: str | None) -> None:
    """Print a new token for USER on stdout, and nothing else (admins only).

    The server keeps only a hash: the token is shown this once.
    """
    with _client(address, token) as hc:
        new, _ = hc.create_token(user, endpoint=endpoint)
    click.echo(new)


@token.command("list")
@_address
@_token
@_fail_cleanly
def token_list(address: str | None, token: str | None) -> None:
    """List tokens (everyone's for an admin, else yours), revoked ones included."""
    with _client(address, token) as hc:
        rows = hc.list_tokens()
    table = Table("id", "user", "endpoint", "created", "revoked")
    for t in rows:
        table.add_row(
            t.id,
            t.user,
            t.endpoint or "-",
            _when(t.created),
            f"[red]{_when(t.revoked)}[/]" if t.revoked else "-",
        )
    _console().print(table)


@token.command("revoke")
@click.argument("token_id")
@_address
@_token
@_fail_cleanly
def token_revoke(token_id: str, address: str | None, token: str | None) -> None:
    """Revoke the token TOKEN_ID: its calls fail from now on, its open streams end."""
    with _client(address, token) as hc:
        info = hc.revoke_token(token_id)
    click.echo(f"revoked token {info.id} of {info.user}")


@click.command("share")
@click.argument("name")
@click.option("--user", required=True, help="The user who may submit to the endpoint.")
@_address
@_token
@_fail_cleanly
def endpoints_share(name: str, user: str, address: str | None, token: str | None) -> None:
    """Let USER submit to your endpoint NAME (a name or an id)."""
    with _client(address, token) as hc:
        users = hc.share_endpoint(name, user)
    click.echo(f"endpoint {name} is shared with {', '.join(users)}")
