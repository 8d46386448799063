"""Certificates and keys for a Flower federation, made with the `cryptography` package.

- ``make_tls_files``: a certificate authority (``ca.crt``) and a SuperLink certificate
  it signs (``server.pem`` / ``server.key``) for the SuperLink's host names and IP
  addresses. SuperNodes and `flwr` verify the SuperLink against ``ca.crt``.
- ``make_node_keys``: one key pair per SuperNode for SuperNode authentication
  (``client-K.key`` / ``client-K.pub``, EC P-384 in OpenSSH format, which Flower's
  ``--auth-supernode-private-key`` and ``flwr supernode register`` read).

Private keys are written with mode 0600.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_CERT, SERVER_CERT, SERVER_KEY = "ca.crt", "server.pem", "server.key"


def _write(path: Path, data: bytes, private: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def make_tls_files(folder: str | Path, hosts: tuple[str, ...] = ("127.0.0.1", "localhost"),
                   days: int = 365) -> dict[str, Path]:
    """Write ``ca.crt``, ``server.pem`` and ``server.key`` into ``folder``; the SuperLink
    certificate is valid for ``hosts`` (IP addresses or DNS names)."""
    folder = Path(folder)
    now = datetime.datetime.now(datetime.timezone.utc)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=days)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "lada federation CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(start).not_valid_after(end)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                       crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP384R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
            .issuer_name(ca.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(start).not_valid_after(end)
            .add_extension(x509.SubjectAlternativeName([_san(h) for h in hosts]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    _write(folder / CA_CERT, ca.public_bytes(pem))
    _write(folder / SERVER_CERT, cert.public_bytes(pem))
    _write(folder / SERVER_KEY, key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                                  serialization.NoEncryption()), private=True)
    return {"ca": folder / CA_CERT, "cert": folder / SERVER_CERT, "key": folder / SERVER_KEY}


def make_node_keys(folder: str | Path, name: str) -> tuple[Path, Path]:
    """Write ``<name>.key`` (private) and ``<name>.pub`` for SuperNode authentication."""
    folder = Path(folder)
    key = ec.generate_private_key(ec.SECP384R1())
    priv = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                             serialization.NoEncryption())
    pub = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    _write(folder / f"{name}.key", priv, private=True)
    _write(folder / f"{name}.pub", pub + b"\n")
    return folder / f"{name}.key", folder / f"{name}.pub"
