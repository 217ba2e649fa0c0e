"""A cluster's certificates (docs/tls.md): one CA, and a certificate per agent, operator and monitor,
made with the ``cryptography`` package (ECDSA P-256, SHA-256).

A CA directory holds ``ca.pem`` (the certificate every server and client trusts) and ``ca.key``
(mode 0600: whoever reads it can mint identities), and ``crl.pem`` once a certificate was revoked
(``revoke``). An issued certificate is ``NAME.pem`` and its key
``NAME.key``; it is good for both ends of a connection (server and client authentication), so an
agent's one certificate serves its operator API and authenticates it to media services.
"""
from __future__ import annotations

import datetime as dt
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from host_agent import errors
from host_agent.tls.identity import Identity
from host_agent.tls.revocation import NEXT_UPDATE_DAYS, load_crl

CA_CERT: Final = "ca.pem"
CA_KEY: Final = "ca.key"
CRL_FILE: Final = "crl.pem"
CA_DAYS: Final = 3650
CERT_DAYS: Final = 365
_SKEW: Final = dt.timedelta(minutes=5)  # backdated, so that a host whose clock lags accepts it at once


@dataclass(frozen=True)
class Issued:
    cert: Path
    key: Path


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write(path: Path, data: bytes, mode: int) -> None:
    """Write a file with ``mode`` from its creation (a key is never readable by others, even briefly)."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except OSError as e:
        raise errors.EnvironmentProblem(f"cannot write {path}: {e.strerror or e}") from e


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def init_ca(directory: Path, name: str = "hyperback CA", days: int = CA_DAYS) -> Issued:
    """Create a CA in ``directory``; UsageError if one is there already (it would orphan every
    certificate it signed)."""
    cert_path, key_path = directory / CA_CERT, directory / CA_KEY
    if cert_path.exists() or key_path.exists():
        raise errors.UsageError(f"{directory} holds a CA already ({CA_CERT}, {CA_KEY}): choose another "
                                f"directory")
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise errors.EnvironmentProblem(f"cannot create {directory}: {e.strerror or e}") from e
    key = _new_key()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _SKEW).not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False, key_agreement=False,
                                         key_cert_sign=True, crl_sign=True, encipher_only=False,
                                         decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    _write(key_path, _key_pem(key), 0o600)
    _write(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return Issued(cert_path, key_path)


def load_ca(directory: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    try:
        cert = x509.load_pem_x509_certificate((directory / CA_CERT).read_bytes())
        key = serialization.load_pem_private_key((directory / CA_KEY).read_bytes(), password=None)
    except OSError as e:
        raise errors.UsageError(f"cannot read the CA in {directory}: {e.strerror or e} "
                                f"(create one with 'hyperback certs init-ca {directory}')") from e
    except (ValueError, TypeError, UnsupportedAlgorithm) as e:
        raise errors.UsageError(f"{directory} holds no usable CA: {e}") from e
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise errors.UsageError(f"{directory / CA_KEY} is not an EC key made by 'hyperback certs init-ca'")
    return cert, key


def _alt_names(identity: Identity, dns: Sequence[str], ips: Sequence[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(identity.uri())]
    names += [x509.DNSName(d) for d in dns]
    try:
        names += [x509.IPAddress(ipaddress.ip_address(a)) for a in ips]
    except ValueError as e:
        raise errors.UsageError(f"--ip: {e}") from e
    return names


def issue(ca_dir: Path, identity: Identity, out_dir: Path, *, dns: Sequence[str] = (),
          ips: Sequence[str] = (), days: int = CERT_DAYS, not_before: dt.datetime | None = None) -> Issued:
    """Issue ``identity``'s certificate and key into ``out_dir`` as NAME.pem and NAME.key (NAME: the
    role and name), valid ``days`` from ``not_before`` (default: now). ``dns`` and ``ips`` are the
    names clients reach it by when it serves (an agent's operator API, a media service)."""
    ca_cert, ca_key = load_ca(ca_dir)
    key = _new_key()
    start = not_before or dt.datetime.now(dt.UTC) - _SKEW
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, identity.name),
                                     x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME,
                                                        identity.role.value)]))
            .issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(start + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                  ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .add_extension(x509.SubjectAlternativeName(_alt_names(identity, dns, ips)), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise errors.EnvironmentProblem(f"cannot create {out_dir}: {e.strerror or e}") from e
    stem = f"{identity.role.value}-{identity.name}"
    issued = Issued(out_dir / f"{stem}.pem", out_dir / f"{stem}.key")
    _write(issued.key, _key_pem(key), 0o600)
    _write(issued.cert, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return issued


def revoke(ca_dir: Path, cert: Path, crl: Path | None = None) -> tuple[Path, int]:
    """Add ``cert`` to the CA's revocation list (``crl``, default CRL_FILE in ``ca_dir``; made if absent,
    signed again by the CA); returns the list's path and how many certificates it revokes."""
    ca_cert, ca_key = load_ca(ca_dir)
    crl = crl or ca_dir / CRL_FILE
    try:
        target = x509.load_pem_x509_certificate(cert.read_bytes())
    except (OSError, ValueError) as e:
        raise errors.UsageError(f"{cert} is not a readable PEM certificate: {e}") from e
    if not check_signed(target, ca_cert):
        raise errors.UsageError(f"{cert} was not issued by the CA in {ca_dir}: revoke it with its own CA")
    now = dt.datetime.now(dt.UTC)
    entries = list(load_crl(crl, ca_dir / CA_CERT)) if crl.exists() else []
    if all(e.serial_number != target.serial_number for e in entries):
        entries.append(x509.RevokedCertificateBuilder().serial_number(target.serial_number)
                       .revocation_date(now).build())
    builder = (x509.CertificateRevocationListBuilder().issuer_name(ca_cert.subject)
               .last_update(now).next_update(now + dt.timedelta(days=NEXT_UPDATE_DAYS)))
    for entry in entries:
        builder = builder.add_revoked_certificate(entry)
    _write(crl, builder.sign(ca_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM), 0o644)
    return crl, len(entries)


def check_signed(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    """Whether ``ca`` signed ``cert`` (its issuer and signature)."""
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


__all__ = ["CA_CERT", "CA_KEY", "CRL_FILE", "Issued", "check_signed", "init_ca", "issue", "load_ca", "revoke"]
