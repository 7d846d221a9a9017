"""A test PKI for the TLS agent's tests: ``make_pki(folder)`` writes PEM files of two CAs and certificates they sign.

Made with ``cryptography`` (a test dependency, imported only here and only when called). EC P-256 keys (fast);
certificates valid from an hour ago to a day from now, except the expired one. Every certificate has the
extensions a strict verifier (``VERIFY_X509_STRICT``) wants: basic constraints, key usage, subject and authority
key identifiers; leaves have their extended key usage (``serverAuth`` / ``clientAuth``) and a subject alternative
name. Private keys are unencrypted PKCS#8, mode 0600.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec

__all__ = ["SERVER_NAMES", "Pki", "issue", "make_ca", "make_pki"]

Usage = Literal["server", "client"]
SERVER_NAMES = ("127.0.0.1", "::1", "localhost")  # the agent's certificate is good for these


@dataclass(frozen=True, slots=True)
class Pki:
    """The files ``make_pki`` wrote (all PEM)."""

    ca: Path  # the CA both sides trust
    server_cert: Path  # the agent's certificate from ``ca``: 127.0.0.1, ::1, localhost; serverAuth
    server_key: Path
    client_cert: Path  # a client's certificate from ``ca``: clientAuth
    client_key: Path
    other_ca: Path  # another CA, trusted by no one
    wrong_client_cert: Path  # a client certificate from ``other_ca``
    wrong_client_key: Path
    expired_client_cert: Path  # a client certificate from ``ca`` that expired yesterday
    expired_client_key: Path
    wrong_server_cert: Path  # a server certificate from ``other_ca`` (same names as ``server_cert``)
    wrong_server_key: Path
    ca_key: Path  # to issue more (``issue``)
    other_ca_key: Path


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC).replace(microsecond=0)


def _key() -> ec.EllipticCurvePrivateKey:
    from cryptography.hazmat.primitives.asymmetric import ec
    return ec.generate_private_key(ec.SECP256R1())


def _write(folder: Path, name: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> tuple[Path, Path]:
    from cryptography.hazmat.primitives import serialization
    cert_path, key_path = folder / f"{name}.pem", folder / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption()))
    return cert_path, key_path


def make_ca(folder: str | Path, name: str, common_name: str) -> tuple[Path, Path]:
    """A self-signed CA ``<folder>/<name>.pem`` with its key ``<name>.key``; return both paths."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID

    key = _key()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = _now()
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(ski, critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
            .sign(key, hashes.SHA256()))
    return _write(Path(folder), name, cert, key)


def issue(folder: str | Path, name: str, *, ca: Path, ca_key: Path, usage: Usage, common_name: str,
          names: Sequence[str] = (), not_before: datetime.datetime | None = None,
          not_after: datetime.datetime | None = None) -> tuple[Path, Path]:
    """A leaf certificate ``<folder>/<name>.pem`` (key ``<name>.key``) signed by the CA in ``ca``/``ca_key``, for
    a TLS server or client, with ``names`` (IP addresses or DNS names) as its subject alternative names (default:
    ``common_name``); valid from an hour ago to a day from now unless told. Return both paths."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    issuer = x509.load_pem_x509_certificate(ca.read_bytes())
    signer = serialization.load_pem_private_key(ca_key.read_bytes(), password=None)
    if not isinstance(signer, ec.EllipticCurvePrivateKey):
        raise TypeError(f"{ca_key}: not an EC key")
    key = _key()
    now = _now()
    sans: list[x509.GeneralName] = []
    for entry in names or (common_name,):
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(entry)))
        except ValueError:
            sans.append(x509.DNSName(entry))
    eku = ExtendedKeyUsageOID.SERVER_AUTH if usage == "server" else ExtendedKeyUsageOID.CLIENT_AUTH
    issuer_ski = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(issuer.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before or now - datetime.timedelta(hours=1))
            .not_valid_after(not_after or now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                         crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(issuer_ski),
                           critical=False)
            .sign(signer, hashes.SHA256()))
    return _write(Path(folder), name, cert, key)


def make_pki(folder: str | Path) -> Pki:
    """Write the test PKI into ``folder`` (made if missing): ``ca``, ``server``, ``client``, ``other-ca``,
    ``wrong-client``, ``expired-client``, ``wrong-server`` (``.pem`` certificates, ``.key`` keys)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    ca, ca_key = make_ca(folder, "ca", "qoh-lab test CA")
    other_ca, other_ca_key = make_ca(folder, "other-ca", "qoh-lab other CA")
    server = issue(folder, "server", ca=ca, ca_key=ca_key, usage="server", common_name="localhost",
                   names=SERVER_NAMES)
    client = issue(folder, "client", ca=ca, ca_key=ca_key, usage="client", common_name="qoh-lab-client")
    wrong_client = issue(folder, "wrong-client", ca=other_ca, ca_key=other_ca_key, usage="client",
                         common_name="qoh-lab-client")
    now = _now()
    expired_client = issue(folder, "expired-client", ca=ca, ca_key=ca_key, usage="client",
                           common_name="qoh-lab-client", not_before=now - datetime.timedelta(days=2),
                           not_after=now - datetime.timedelta(days=1))
    wrong_server = issue(folder, "wrong-server", ca=other_ca, ca_key=other_ca_key, usage="server",
                         common_name="localhost", names=SERVER_NAMES)
    return Pki(ca, *server, *client, other_ca, *wrong_client, *expired_client, *wrong_server, ca_key, other_ca_key)
