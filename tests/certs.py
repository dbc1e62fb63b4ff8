"""Certificates the TLS tests make for themselves: a CA, a server certificate for
127.0.0.1 and localhost signed by it, and a client certificate signed by it.

EC P-256 keys: quick to make, and every TLS stack in play (grpc's BoringSSL, grpcurl's Go
TLS) takes them.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class Pair:
    """A certificate and its key, as PEM files."""

    cert: Path
    key: Path


@dataclass(frozen=True)
class Certs:
    """What :func:`make_certs` wrote."""

    ca: Path
    """The CA certificate (PEM): what clients trust, and what a server that asks for
    client certificates trusts."""
    server: Pair
    """For 127.0.0.1, ::1 and localhost, signed by the CA."""
    client: Pair
    """A client certificate (CN ``heartline-test-client``), signed by the CA."""
    self_signed: Pair
    """A server certificate for 127.0.0.1 and localhost that is its own CA."""


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)


def _issue(
    common_name: str,
    issuer: tuple[x509.Name, ec.EllipticCurvePrivateKey] | None,
    *,
    ca: bool = False,
    server: bool = False,
    client: bool = False,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = _name(common_name)
    issuer_name, issuer_key = issuer if issuer is not None else (subject, key)
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    usages = []
    if server:
        usages.append(ExtendedKeyUsageOID.SERVER_AUTH)
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.DNSName("localhost"),
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                    x509.IPAddress(ipaddress.ip_address("::1")),
                ]
            ),
            critical=False,
        )
    if client:
        usages.append(ExtendedKeyUsageOID.CLIENT_AUTH)
    if usages:
        builder = builder.add_extension(x509.ExtendedKeyUsage(usages), critical=False)
    return builder.sign(issuer_key, hashes.SHA256()), key


def _save(cert: x509.Certificate, key: ec.EllipticCurvePrivateKey, folder: Path, stem: str) -> Pair:
    pair = Pair(folder / f"{stem}.pem", folder / f"{stem}.key")
    pair.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_key(key, pair.key)
    return pair


def make_certs(folder: Path) -> Certs:
    """Make a CA, a server and a client certificate signed by it, and a self-signed
    server certificate, as PEM files in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    ca_cert, ca_key = _issue("heartline test CA", None, ca=True)
    ca = _save(ca_cert, ca_key, folder, "ca")
    issuer = (ca_cert.subject, ca_key)
    server = _save(*_issue("localhost", issuer, server=True), folder, "server")
    client = _save(*_issue("heartline-test-client", issuer, client=True), folder, "client")
    # A self-signed server certificate (what `openssl req -x509` makes): its own CA.
    self_signed = _save(*_issue("localhost", None, ca=True, server=True), folder, "self-signed")
    return Certs(ca.cert, server, client, self_signed)
