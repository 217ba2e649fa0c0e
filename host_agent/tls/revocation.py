"""Revoked certificates: the CA's certificate revocation list (CRL), written by ``hyperback certs revoke``
and checked by servers on every call and by clients against their own certificate (docs/tls.md,
"Revoking a certificate").

Why a check per call and not in the handshake: gRPC's Python API takes no CRL, and a handshake refusal
reaches the client as a closed socket, which it cannot tell from a network fault. A server that sees a
revoked certificate answers UNAUTHENTICATED with a message saying so; the clients turn that into a
``TlsError``, which nothing retries. The list is reread when its file (or the CA's) changes, as the
certificates are (``FileStamp``), so a new revocation takes effect at the next call, without a restart.
"""
from __future__ import annotations

import logging
import os
import threading
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509

from host_agent import errors

log = logging.getLogger(__name__)

NEXT_UPDATE_DAYS = 30  # informative: nothing here refuses an old list, as revocations only accumulate


class FileStamp:
    """The mtime and size of some files, to tell when any of them changed (a missing file counts)."""

    def __init__(self, paths: Sequence[Path | None]) -> None:
        self._paths = paths
        self.seen = self.now()

    def now(self) -> tuple[tuple[int, int], ...]:
        out = []
        for path in self._paths:
            try:
                st = os.stat(path) if path is not None else None
            except OSError:
                st = None
            out.append((st.st_mtime_ns, st.st_size) if st is not None else (-1, -1))
        return tuple(out)


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise errors.TlsError(f"cannot read the {what} {path}: {e.strerror or e}") from e


def load_crl(crl: Path, ca: Path) -> x509.CertificateRevocationList:
    """The CRL in ``crl``, once its signature is known to be the CA's; TlsError otherwise."""
    try:
        revocations = x509.load_pem_x509_crl(_read(crl, "revocation list"))
        authority = x509.load_pem_x509_certificate(_read(ca, "CA"))
    except ValueError as e:
        raise errors.TlsError(f"{crl} or {ca} is not PEM (a CRL from 'hyperback certs revoke', the CA "
                              f"certificate): {e}") from e
    public = authority.public_key()
    if revocations.issuer != authority.subject or not revocations.is_signature_valid(public):  # type: ignore[arg-type]
        raise errors.TlsError(f"the revocation list {crl} was not signed by the CA {ca}: write it with "
                              f"'hyperback certs revoke --ca' of that CA")
    return revocations


def revoked_message(revocations: x509.CertificateRevocationList, cert: x509.Certificate,
                    whose: str) -> str | None:
    """Why ``cert`` may not be used, if the list revokes it; None otherwise."""
    entry = revocations.get_revoked_certificate_by_serial_number(cert.serial_number)
    if entry is None:
        return None
    return (f"the certificate of {whose} (serial {cert.serial_number:x}) was revoked on "
            f"{entry.revocation_date_utc:%Y-%m-%d %H:%M} UTC: issue a new one ('hyperback certs issue')")


class Revocations:
    """A server's view of the CRL: reread on the next call after the CRL or the CA file changed. No
    file yet means nothing is revoked yet (``hyperback certs revoke`` makes it); an unusable one
    refuses the start, and later keeps the last good list."""

    def __init__(self, crl: Path, ca: Path) -> None:
        self._crl, self._ca = crl, ca
        self._lock = threading.Lock()
        self._stamp = FileStamp((crl, ca))
        self._list = self._load()
        if self._list is None:
            log.warning("no revocation list at %s yet: no certificate is revoked", crl)

    def _load(self) -> x509.CertificateRevocationList | None:
        return load_crl(self._crl, self._ca) if self._crl.exists() else None

    def _current(self) -> x509.CertificateRevocationList | None:
        with self._lock:
            stamp = self._stamp.now()
            if stamp != self._stamp.seen:
                try:
                    self._list = self._load()
                except errors.TlsError as e:  # half-written: keep the last good list
                    log.warning("keeping the current revocation list: %s", e)
                else:
                    self._stamp.seen = stamp
                    log.info("revocation list reloaded from %s", self._crl)
            return self._list

    def refusal(self, pem: bytes, whose: str) -> str | None:
        """The message refusing the client certificate ``pem``, if it is revoked."""
        current = self._current()
        return revoked_message(current, x509.load_pem_x509_certificate(pem), whose) if current else None


__all__ = ["NEXT_UPDATE_DAYS", "FileStamp", "Revocations", "load_crl", "revoked_message"]
