"""The channel that clients, agents and the CLI open to the server.

The address is one ``HOST:PORT`` or a comma-separated list of them (SPEC section 9:
several servers share one PostgreSQL store; one is active and says SERVING on the
standard health service, the others stand by, say NOT_SERVING and answer every other
call UNAVAILABLE until one takes over).

One address goes to gRPC as it is, as it always did (its own resolver, any target form
gRPC takes). A list is resolved here into one static ``ipv4:`` (or ``ipv6:``) target and
balanced ``round_robin`` with gRPC's client-side health checking: a server that is down
or NOT_SERVING is never picked, so every call goes to the active one, and when a standby
takes over its SERVING moves the calls there by itself. The callers' retries on
UNAVAILABLE ride out the seconds in between.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import grpc

_LIST_SERVICE_CONFIG = json.dumps(
    {"loadBalancingConfig": [{"round_robin": {}}], "healthCheckConfig": {"serviceName": ""}}
)
_FORM = "expected HOST:PORT, an IPv6 host in brackets as [::1]:PORT"

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class AddressError(ValueError):
    """A server address list that can't be used; the message names the bad item."""


@dataclass(frozen=True, slots=True)
class ServerTarget:
    """What a channel to the server dials, from an address as the user gave it."""

    address: str
    """The address as given: one ``HOST:PORT``, or a comma-separated list."""
    target: str
    """The gRPC target: ``address`` itself for one address, else ``ipv4:IP:PORT,...``."""
    options: tuple[tuple[str, Any], ...] = ()
    """Channel options the target needs (a list's balancing and authority)."""
    servers: tuple[tuple[str, int], ...] = ()
    """A list's resolved ``(ip, port)`` pairs; empty for one address (gRPC resolves it)."""


def several(address: str) -> bool:
    """Whether ``address`` is a list of servers rather than one (a comma makes it one)."""
    return "," in address


def split_servers(address: str) -> list[tuple[str, int]] | None:
    """The ``(host, port)`` items of an address list; None for one address.

    Checks the form only (no lookups); one address is not looked at: it goes to gRPC as
    it always did.

    Raises:
        AddressError: an item is empty, has no port or a bad one, or is an unbracketed
            IPv6 host; the message names it.
    """
    if not several(address):
        return None
    items = []
    for item in (part.strip() for part in address.split(",")):
        if not item:
            raise AddressError(f"server address list {address!r} has an empty item")
        items.append(_split_item(item, address))
    return items


def _split_item(item: str, address: str) -> tuple[str, int]:
    where = f"server address {item!r} in {address!r}"
    if item.startswith("["):
        host, bracket, rest = item[1:].partition("]")
        if not bracket:
            raise AddressError(f"{where}: no ']' after the IPv6 host")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise AddressError(f"{where}: {host!r} in brackets is not an IPv6 address") from None
        sep, port = rest[:1], rest[1:]
        if sep != ":":
            raise AddressError(f"{where}: no port; {_FORM}")
    else:
        host, sep, port = item.rpartition(":")
        if not sep:
            raise AddressError(f"{where}: no port; {_FORM}")
        if not host:
            raise AddressError(f"{where}: no host; {_FORM}")
        if ":" in host:
            raise AddressError(f"{where}: {_FORM}")
    if not port.isdigit() or not 0 < int(port) <= 65535:
        raise AddressError(f"{where}: the port must be a number from 1 to 65535, not {port!r}")
    return host, int(port)


def server_target(address: str) -> ServerTarget:
    """What a channel for ``address`` dials. A list's host names are looked up here
    (``socket.getaddrinfo``, which blocks: agents call this off their loop); one address
    and IP literals need no lookup.

    Raises:
        AddressError: a malformed list, or one of its hosts does not resolve; the message
            names the item.
    """
    items = split_servers(address)
    if items is None:
        return ServerTarget(address, address)
    resolved = [(_resolve(host, port, address), port) for host, port in items]
    # gRPC's ipv4:/ipv6: targets take one family. Each server is expected to be reachable
    # over IPv4 (what a name usually has, and what "localhost" is taken to mean here), so
    # IPv4 it is when every item has an IPv4 address; IPv6 only when every item has an
    # IPv6 one. Dropping an item's addresses to fit would drop a server from failover
    # without a word, so a list that fits neither is refused, naming the item.
    for family, version in (("ipv4", 4), ("ipv6", 6)):
        if all(any(ip.version == version for ip in ips) for ips, _ in resolved):
            break
    else:
        no_v4 = next(i for i, (ips, _) in enumerate(resolved) if all(ip.version == 6 for ip in ips))
        no_v6 = next(i for i, (ips, _) in enumerate(resolved) if all(ip.version == 4 for ip in ips))
        raise AddressError(
            f"server address {_join(*items[no_v4])!r} in {address!r} has only IPv6 "
            f"addresses and {_join(*items[no_v6])!r} only IPv4 ones: a list takes one "
            "family (give IP addresses of one family, or names that have them)"
        )
    servers: dict[tuple[str, int], None] = {}  # ordered, without repeats
    for ips, port in resolved:
        for ip in ips:
            if ip.version == version:
                servers[(str(ip), port)] = None
    target = f"{family}:" + ",".join(_join(ip, port) for ip, port in servers)
    first_host, first_port = items[0]
    options = (
        ("grpc.service_config", _LIST_SERVICE_CONFIG),
        # The :authority, and the name a TLS certificate is checked against: the first
        # item's host as the user wrote it (every server of the list is expected to have
        # a certificate for it), not the IP it resolved to, nor gRPC's default for a
        # list target (the whole list). grpc.ssl_target_name_override would fix only the
        # certificate check, and is meant for tests.
        ("grpc.default_authority", _join(first_host, first_port)),
    )
    return ServerTarget(address, target, options, tuple(servers))


def _resolve(host: str, port: int, address: str) -> list[IPAddress]:
    """``host``'s IP addresses, first-seen order, without repeats."""
    if host.lower() == "localhost":
        # What a server's default --listen binds; a lookup may put ::1 first.
        return [ipaddress.IPv4Address("127.0.0.1")]
    try:
        return [ipaddress.ip_address(host)]
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as err:
        why = getattr(err, "strerror", None) or str(err)
        raise AddressError(
            f"server address {_join(host, port)!r} in {address!r}: the host name does not "
            f"resolve ({why})"
        ) from None
    ips: dict[IPAddress, None] = {}
    for family, *_, sockaddr in infos:
        if family in (socket.AF_INET, socket.AF_INET6):
            ips[ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])] = None
    if not ips:
        raise AddressError(
            f"server address {_join(host, port)!r} in {address!r}: the host name has no IP address"
        )
    return list(ips)


def _join(host: str | IPAddress, port: int) -> str:
    text = str(host)
    return f"[{text}]:{port}" if ":" in text else f"{text}:{port}"


def open_channel(
    address: str | ServerTarget,
    credentials: grpc.ChannelCredentials | None = None,
    options: Sequence[tuple[str, Any]] = (),
) -> grpc.aio.Channel:
    """A ``grpc.aio`` channel to the server at ``address`` (one ``HOST:PORT`` or a
    comma-separated list, or what :func:`server_target` made of one): plaintext without
    ``credentials``, else TLS with them; ``options`` are the caller's channel options.

    Raises:
        AddressError: see :func:`server_target`.
    """
    target = address if isinstance(address, ServerTarget) else server_target(address)
    all_options = [*options, *target.options]
    if credentials is None:
        return grpc.aio.insecure_channel(target.target, options=all_options)
    return grpc.aio.secure_channel(target.target, credentials, options=all_options)


async def any_listening(target: ServerTarget, timeout: float = 2.0) -> bool:
    """Whether any server of a list accepts a TCP connection within ``timeout`` seconds:
    a server is there (the active one, or a standby that may take over), not only
    addresses where nothing listens."""
    if not target.servers:
        return False

    async def accepts(ip: str, port: int) -> bool:
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(ip, port), timeout)
        except (OSError, TimeoutError):
            return False
        writer.close()
        try:
            await writer.wait_closed()
        except OSError:
            pass
        return True

    return any(await asyncio.gather(*(accepts(ip, port) for ip, port in target.servers)))


def same_servers(a: str, b: str) -> bool:
    """Whether two addresses name the same servers: equal, or lists of the same items in
    any order (spaces aside)."""
    if not (several(a) or several(b)):
        return a == b
    return {i.strip() for i in a.split(",")} == {i.strip() for i in b.split(",")}
