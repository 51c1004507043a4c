"""Keys and certificates of a federation, written with ``cryptography`` (no ssh-keygen).

Who makes what, so that no private key ever travels:

- each **hospital** makes its own SuperNode key pair (:func:`make_key_pair`, ``fedlsc
  keys``) and sends only the public key to the coordinator, who registers it
  (``flwr supernode register KEY.pub ...``);
- the **coordinator** makes the CA and the SuperLink's TLS certificate
  (:func:`make_certificates`, ``fedlsc certs``) and sends only ``ca.crt`` out. The CA's
  key stays in its folder (0600), so the certificate can later be re-signed for a new
  host name while every hospital keeps the ``ca.crt`` it has.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec

CA_COMMON_NAME = "fedlsc federation CA"


class CertificateError(ValueError):
    """Key or certificate files that cannot be used; the message names the file."""


def _write(path: Path, data: bytes, mode: int) -> Path:
    """Atomic write with ``mode`` set before any byte is written."""
    from fedlsc_common.storage import atomic_write

    return atomic_write(path, lambda f: f.write(data), mode=mode)


def _check_name(name: str) -> str:
    if not name or name in (".", "..") or "/" in name or os.sep in name or name.startswith("-"):
        raise CertificateError(f"key name {name!r}: must be a plain file name such as "
                               "'hospital-1'")
    return name


# ----------------------------------------------------------------------- hospitals
def make_key_pair(folder: str | Path, name: str) -> Path:
    """At a hospital: its SuperNode key pair ``folder/name`` (private, 0600) and
    ``folder/name.pub`` (public: the only file that leaves the hospital).

    ECDSA P-384 in OpenSSH format, what ``flower-supernode --auth-supernode-private-key``
    and ``flwr supernode register`` read. An existing private key is kept (it is the
    hospital's identity in the federation); its ``.pub`` is rewritten from it.
    Returns the private key's path.
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    private = Path(folder) / _check_name(name)
    if private.exists():
        try:
            key = serialization.load_ssh_private_key(private.read_bytes(), password=None)
        except (ValueError, TypeError) as err:
            raise CertificateError(f"{private} exists but is not an unencrypted OpenSSH "
                                   f"private key ({err}); move it away to make a new one"
                                   ) from None
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise CertificateError(f"{private} exists but is not an ECDSA key; Flower needs "
                                   "one (move it away to make a new one)")
    else:
        key = ec.generate_private_key(ec.SECP384R1())
        _write(private, key.private_bytes(serialization.Encoding.PEM,
                                          serialization.PrivateFormat.OpenSSH,
                                          serialization.NoEncryption()), 0o600)
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                           serialization.PublicFormat.OpenSSH)
    _write(private.with_name(private.name + ".pub"), public + f" {name}\n".encode(), 0o644)
    return private


# ----------------------------------------------------------------------- coordinator
def _load_ca(folder: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None:
    """The CA kept in ``folder`` (ca.crt + ca.key), or None when there is none yet."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    cert_path, key_path = folder / "ca.crt", folder / "ca.key"
    if not cert_path.exists() and not key_path.exists():
        return None
    if not (cert_path.exists() and key_path.exists()):
        have, lack = (cert_path, key_path) if cert_path.exists() else (key_path, cert_path)
        raise CertificateError(f"{have} exists but {lack} does not: the CA needs both "
                               "(restore the missing one, or move both away for a new CA)")
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except ValueError as err:
        raise CertificateError(f"cannot read the CA in {folder}: {err}") from None
    if cert.public_key() != key.public_key():
        raise CertificateError(f"{key_path} is not the key of {cert_path}")
    return cert, key  # type: ignore[return-value]


def make_certificates(folder: str | Path, names: Sequence[str] = ("localhost", "superlink"),
                      ips: Sequence[str] = ("127.0.0.1",), *, days: int = 365
                      ) -> dict[str, Path]:
    """At the coordinator: a CA and the SuperLink's TLS certificate, signed by it, valid
    for every host name and IP address in ``names`` and ``ips``.

    Writes ``ca.crt`` (send it to every hospital), ``ca.key`` (0600, stays here),
    ``server.pem`` and ``server.key`` (0600) and nothing else: no hospital key. A CA
    already in ``folder`` is reused, so running it again with another name re-signs the
    server certificate and the hospitals' ``ca.crt`` stays valid.
    Returns the paths under the keys ``ca``, ``ca_key``, ``cert``, ``key``.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    folder = Path(folder)
    if not names and not ips:
        raise CertificateError("the SuperLink certificate needs at least one host name or IP")
    try:
        addresses = [ipaddress.ip_address(i) for i in ips]
    except ValueError as err:
        raise CertificateError(f"--ip: {err}") from None
    if days < 1:
        raise CertificateError(f"validity of {days} days: must be at least 1")
    now = dt.datetime.now(dt.UTC)
    paths = {"ca": folder / "ca.crt", "ca_key": folder / "ca.key",
             "cert": folder / "server.pem", "key": folder / "server.key"}
    pem = serialization.Encoding.PEM
    private_format = (serialization.PrivateFormat.PKCS8, serialization.NoEncryption())

    kept = _load_ca(folder)
    if kept is None:
        ca_key = ec.generate_private_key(ec.SECP384R1())
        ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, CA_COMMON_NAME)])
        ca_cert = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
                   .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - dt.timedelta(minutes=5))
                   .not_valid_after(now + dt.timedelta(days=10 * days))
                   .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                   .sign(ca_key, hashes.SHA256()))
        _write(paths["ca_key"], ca_key.private_bytes(pem, *private_format), 0o600)
        _write(paths["ca"], ca_cert.public_bytes(pem), 0o644)
    else:
        ca_cert, ca_key = kept
        if ca_cert.not_valid_after_utc < now + dt.timedelta(days=days):
            raise CertificateError(
                f"the CA in {paths['ca']} expires on {ca_cert.not_valid_after_utc:%Y-%m-%d}, "
                f"before a {days}-day server certificate would: pass a shorter --days, or "
                "move ca.crt and ca.key away to make a new CA (and send it to every hospital)")
    key = ec.generate_private_key(ec.SECP384R1())
    san = [x509.DNSName(n) for n in names] + [x509.IPAddress(a) for a in addresses]
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME,
                                                        (list(names) or list(ips))[0])]))
            .issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName(san), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(ca_key, hashes.SHA256()))
    _write(paths["key"], key.private_bytes(pem, *private_format), 0o600)
    _write(paths["cert"], cert.public_bytes(pem), 0o644)
    return paths


def certificate_names(path: str | Path) -> list[str]:
    """The host names and IP addresses (SANs) a certificate is valid for."""
    from cryptography import x509

    cert = x509.load_pem_x509_certificate(Path(path).read_bytes())
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [*san.get_values_for_type(x509.DNSName),
            *(str(a) for a in san.get_values_for_type(x509.IPAddress))]
