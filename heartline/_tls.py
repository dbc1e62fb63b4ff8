"""TLS and mutual TLS: the one configuration that clients, agents and the CLI connect
with (:class:`TLS`), and the credentials that gRPC takes, built from PEM files.

A server serves TLS with ``--tls-cert F --tls-key F`` and asks every client for a
certificate signed by a CA it trusts with ``--tls-client-ca F`` (mutual TLS); see
:func:`server_credentials`. A client trusts the server's certificate through
``TLS(ca=...)`` (``--tls-ca``, ``$HEARTLINE_TLS_CA``), and presents its own with
``TLS(cert=..., key=...)`` (``--tls-cert``/``--tls-key``).
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

import grpc

from heartline._errors import HeartlineError

_PEM_CERT = b"-----BEGIN CERTIFICATE-----"
_PEM_KEY = b"PRIVATE KEY-----"


@dataclass(frozen=True, slots=True)
class TLS:
    """How a client, an agent or the CLI connects to a server over TLS.

    ``TLS()`` trusts the system's CAs; ``TLS(ca="ca.pem")`` trusts the CA that signed the
    server's certificate; ``cert`` and ``key`` together add a client certificate, for a
    server started with ``--tls-client-ca`` (mutual TLS). Paths are read when a client or
    agent is created; a missing or unreadable file is an error that names it.
    """

    ca: str | Path | None = None
    """PEM file of the CA certificate(s) that the server's certificate must chain to; for a
    self-signed server certificate, that certificate. None trusts the system's CAs."""

    cert: str | Path | None = None
    """PEM file of this client's certificate (chain), sent to a server that asks for one
    (mutual TLS). Given with ``key``, or not at all."""

    key: str | Path | None = None
    """PEM file of the private key of ``cert`` (unencrypted)."""

    def __post_init__(self) -> None:
        for name in ("ca", "cert", "key"):
            value = getattr(self, name)
            if value is None:
                continue
            if not isinstance(value, (str, Path)) or not str(value):
                raise ValueError(f"TLS {name} must be a file path, not {value!r}")
            object.__setattr__(self, name, Path(value).expanduser())
        if (self.cert is None) != (self.key is None):
            raise ValueError(
                "TLS cert and key go together: give both (mutual TLS) or neither, "
                f"not cert={self.cert} and key={self.key}"
            )

    def _channel_credentials(self) -> grpc.ChannelCredentials:
        """gRPC credentials of a channel with this configuration (reads the files).

        Raises:
            HeartlineError: a file is missing, unreadable or not PEM; the message names it.
        """
        ca = _read(self.ca, "CA certificate", "--tls-ca", _PEM_CERT)
        cert = _read(self.cert, "client certificate", "--tls-cert", _PEM_CERT)
        key = _read(self.key, "client key", "--tls-key", _PEM_KEY)
        if self.cert is not None and self.key is not None:
            _check_pair(self.cert, self.key, "client")
        return grpc.ssl_channel_credentials(
            root_certificates=ca, private_key=key, certificate_chain=cert
        )


def channel_credentials(tls: TLS | None) -> grpc.ChannelCredentials | None:
    """Credentials for ``grpc.aio.secure_channel``; None means a plaintext channel."""
    return None if tls is None else tls._channel_credentials()


def server_credentials(
    cert: str | Path | None, key: str | Path | None, client_ca: str | Path | None = None
) -> grpc.ServerCredentials | None:
    """Credentials for ``add_secure_port`` from the server's PEM files; None (plaintext)
    without a certificate. With ``client_ca`` every client must present a certificate
    signed by it (mutual TLS).

    Raises:
        HeartlineError: a certificate without a key (or the reverse), a client CA without
            a certificate, or a file missing, unreadable or not PEM (the message names it).
    """
    if cert is None and key is None:
        if client_ca is not None:
            raise HeartlineError(
                "--tls-client-ca needs --tls-cert and --tls-key: mutual TLS is TLS"
            )
        return None
    if cert is None or key is None:
        raise HeartlineError("--tls-cert and --tls-key go together: give both or neither")
    chain = _read(cert, "server certificate", "--tls-cert", _PEM_CERT)
    private_key = _read(key, "server key", "--tls-key", _PEM_KEY)
    roots = _read(client_ca, "client CA certificate", "--tls-client-ca", _PEM_CERT)
    assert chain is not None and private_key is not None
    _check_pair(Path(cert), Path(key), "server")
    return grpc.ssl_server_credentials(
        [(private_key, chain)], root_certificates=roots, require_client_auth=roots is not None
    )


def describe(tls: TLS | None) -> str:
    """How a connection is secured, in words: ``plaintext``, ``TLS`` or ``mutual TLS``."""
    if tls is None:
        return "plaintext"
    return "TLS" if tls.cert is None else "mutual TLS"


def _read(path: str | Path | None, what: str, flag: str, marker: bytes) -> bytes | None:
    if path is None:
        return None
    try:
        data = Path(path).expanduser().read_bytes()
    except OSError as err:
        raise HeartlineError(
            f"cannot read the TLS {what} {path} ({flag}): {err.strerror}"
        ) from None
    if marker not in data:
        raise HeartlineError(
            f"the TLS {what} {path} ({flag}) is not PEM: no line with {marker.decode()!r}"
        )
    return data


def _check_pair(cert: Path, key: Path, whose: str) -> None:
    """Fail now, naming both files, if the key is not the certificate's own (or can't be
    loaded): gRPC would fail later, naming neither."""
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_cert_chain(cert, key, password=_no_password)
    except ssl.SSLError as err:
        if err.reason == "KEY_VALUES_MISMATCH":
            why = "is not the key of"
        else:
            why = "can't be used (an encrypted key? give an unencrypted one) with"
        raise HeartlineError(
            f"the TLS {whose} key {key} (--tls-key) {why} the certificate {cert} (--tls-cert)"
        ) from None


def _no_password() -> bytes:
    return b""  # an encrypted key fails to load instead of asking on the terminal
