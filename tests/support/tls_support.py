"""A throwaway public-key infrastructure for tests: a CA, a server certificate for loopback,
a client certificate, and an unrelated CA with its own client (the negative case).

Made with ``cryptography`` (the ``dev`` extra) in a few milliseconds: EC P-256 keys, PEM files,
unencrypted keys (as gRPC reads them).
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

SERVER_NAMES = ("localhost",)
SERVER_IPS = ("127.0.0.1",)
CLIENT_NAME = "torchserve.gradprobe.test"  # the client's CN and SAN DNS name
OTHER_CLIENT_NAME = "intruder.example.test"


@dataclass(frozen=True)
class Pki:
    """PEM files under one folder. ``server_cert`` (SAN DNS localhost, IP 127.0.0.1) and
    ``client_cert`` are signed by ``ca_cert``; ``other_client_cert`` by ``other_ca_cert``,
    which nothing here trusts."""

    directory: Path
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca_cert: Path
    other_client_cert: Path
    other_client_key: Path
    client_name: str = CLIENT_NAME
    other_client_name: str = OTHER_CLIENT_NAME


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "GradProbe tests"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _builder(subject: str, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey):
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        # An hour back: clocks of CI machines drift.
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=30))
    )


_CA_USAGE = x509.KeyUsage(
    digital_signature=True,
    content_commitment=False,
    key_encipherment=False,
    data_encipherment=False,
    key_agreement=False,
    key_cert_sign=True,
    crl_sign=True,
    encipher_only=False,
    decipher_only=False,
)


def _ca(common_name: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = _key()
    cert = (
        _builder(common_name, _name(common_name), key.public_key())
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(_CA_USAGE, critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _leaf(
    common_name: str,
    ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey],
    names: list[x509.GeneralName],
    usage: x509.ObjectIdentifier,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    ca_cert, ca_key = ca
    key = _key()
    cert = (
        _builder(common_name, ca_cert.subject, key.public_key())
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    return cert, key


def _write(directory: Path, stem: str, cert: x509.Certificate, key=None) -> tuple[Path, Path]:
    cert_path = directory / f"{stem}.crt"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path = directory / f"{stem}.key"
    if key is not None:
        key_path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        key_path.chmod(0o600)
    return cert_path, key_path


def make_pki(directory: Path) -> Pki:
    """Write a fresh CA, server and client certificates (and an unrelated CA and client)
    under ``directory`` (created if absent)."""
    directory.mkdir(parents=True, exist_ok=True)
    ca = _ca("GradProbe test CA")
    server = _leaf(
        "localhost",
        ca,
        [x509.DNSName(n) for n in SERVER_NAMES]
        + [x509.IPAddress(ipaddress.ip_address(ip)) for ip in SERVER_IPS],
        ExtendedKeyUsageOID.SERVER_AUTH,
    )
    client = _leaf(CLIENT_NAME, ca, [x509.DNSName(CLIENT_NAME)], ExtendedKeyUsageOID.CLIENT_AUTH)
    other_ca = _ca("Unrelated test CA")
    other_client = _leaf(
        OTHER_CLIENT_NAME,
        other_ca,
        [x509.DNSName(OTHER_CLIENT_NAME)],
        ExtendedKeyUsageOID.CLIENT_AUTH,
    )
    ca_cert, ca_key = _write(directory, "ca", *ca)
    server_cert, server_key = _write(directory, "server", *server)
    client_cert, client_key = _write(directory, "client", *client)
    other_ca_cert, _ = _write(directory, "other-ca", other_ca[0])
    other_client_cert, other_client_key = _write(directory, "other-client", *other_client)
    return Pki(
        directory=directory,
        ca_cert=ca_cert,
        ca_key=ca_key,
        server_cert=server_cert,
        server_key=server_key,
        client_cert=client_cert,
        client_key=client_key,
        other_ca_cert=other_ca_cert,
        other_client_cert=other_client_cert,
        other_client_key=other_client_key,
    )


def client_with_names(pki: Pki, common_name: str, names: list[str], stem: str) -> tuple[Path, Path]:
    """A client certificate signed by ``pki``'s CA with ``common_name`` and ``names`` (SAN
    DNS names); returns its certificate and key files."""
    ca_cert = x509.load_pem_x509_certificate(pki.ca_cert.read_bytes())
    ca_key = serialization.load_pem_private_key(pki.ca_key.read_bytes(), password=None)
    cert, key = _leaf(
        common_name,
        (ca_cert, ca_key),
        [x509.DNSName(n) for n in names],
        ExtendedKeyUsageOID.CLIENT_AUTH,
    )
    return _write(pki.directory, stem, cert, key)


def write_tokens(path: Path, *tokens: str) -> Path:
    """A token file as ``--auth-token-file`` reads it: a comment, then one token a line."""
    path.write_text("# accepted bearer tokens\n" + "".join(f"{t}\n" for t in tokens))
    return path
