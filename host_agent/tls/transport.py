"""TLS for servers and clients: one config, server credentials that reload, client channels that
check their own certificate first, and TLS failures told apart from an unreachable service.

``TlsConfig`` is the ``[tls]`` table of the agent's config and the ``--tls-*`` flags of the media
service (docs/tls.md, "Configuration"). A server with it requires a client certificate signed by
``ca``; it rereads its three files on the next handshake after any of them changed, so renewed
certificates need no restart. Without it a server listens in plain TCP, which non-loopback addresses
get only with ``allow_plaintext``. ``unix:`` addresses are local: their file's permissions guard them,
and they stay plain.

Why clients check their own certificate: a server refuses a bad client certificate by closing the
connection during the handshake, and the client sees only "Socket closed", as from a passing network
fault, which gRPC and the callers would retry. Checking expiry and issuer locally first turns the
common mistakes into a clear error; a refusal the client cannot foresee (a revoked or replaced
certificate) still comes back as ``TlsError`` from :func:`tls_failure`.
"""
from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import logging
import threading
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509

from host_agent import errors
from host_agent.config import NO_TLS, TlsConfig
from host_agent.tls.certs import check_signed
from host_agent.tls.identity import Identity, from_certificate, from_pem
from host_agent.tls.revocation import FileStamp, load_crl, revoked_message

log = logging.getLogger(__name__)


def _read(path: Path | None, what: str) -> bytes:
    assert path is not None
    try:
        return path.read_bytes()
    except OSError as e:
        raise errors.TlsError(f"cannot read the TLS {what} {path}: {e.strerror or e}") from e


def is_local(address: str) -> bool:
    """Whether ``address`` (unix:..., HOST:PORT) can only be reached from this host."""
    if address.startswith("unix:") or address.startswith("unix-abstract:"):
        return True
    host = address.rpartition(":")[0].removeprefix("[").removesuffix("]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_plaintext(address: str, tls: TlsConfig, what: str) -> None:
    """UsageError if ``address`` would carry plain TCP off this host without ``allow_plaintext``."""
    if not tls.enabled and not tls.allow_plaintext and not is_local(address):
        raise errors.UsageError(f"{what} {address}: plain TCP is refused off loopback; configure TLS "
                                f"(ca, cert, key: docs/tls.md) or set allow_plaintext = true in [tls] "
                                f"(the services' flag: --allow-plaintext)")


# --------------------------------------------------------------------------- servers

class _Reloader:
    """The certificate configuration of a server, reread when a file's mtime or size changes."""

    def __init__(self, tls: TlsConfig) -> None:
        self._tls = tls
        self._lock = threading.Lock()
        self._stamp = FileStamp((tls.ca, tls.cert, tls.key))
        self.initial = self._load()

    def _load(self) -> Any:
        pair = (_read(self._tls.key, "key"), _read(self._tls.cert, "certificate"))
        return grpc.ssl_server_certificate_configuration([pair], root_certificates=_read(self._tls.ca, "CA"))

    def __call__(self) -> Any:
        """gRPC asks before each handshake: None keeps the current configuration."""
        with self._lock:
            stamp = self._stamp.now()
            if stamp == self._stamp.seen:
                return None
            try:
                loaded = self._load()
            except errors.TlsError as e:  # half-written files: keep serving with the last good ones
                log.warning("keeping the current TLS certificates: %s", e)
                return None
            self._stamp.seen = stamp
            log.info("TLS certificates reloaded from %s", self._tls.cert)
            return loaded


def server_credentials(tls: TlsConfig) -> grpc.ServerCredentials:
    """Credentials requiring a client certificate signed by ``tls.ca``, reloaded when the files change."""
    reloader = _Reloader(tls)
    return grpc.dynamic_ssl_server_credentials(reloader.initial, reloader, require_client_authentication=True)


def add_port(server: grpc.Server | grpc.aio.Server, address: str, tls: TlsConfig, what: str) -> int:
    """Bind ``server`` to ``address``, with mutual TLS if configured (never on unix: addresses);
    EnvironmentProblem if it cannot bind."""
    check_plaintext(address, tls, what)
    try:
        if tls.enabled and not is_local_socket(address):
            return server.add_secure_port(address, server_credentials(tls))
        return server.add_insecure_port(address)
    except RuntimeError as e:  # grpc raises RuntimeError when it cannot bind
        raise errors.EnvironmentProblem(f"{what}: cannot listen on {address}: {e}") from e


def is_local_socket(address: str) -> bool:
    return address.startswith("unix:") or address.startswith("unix-abstract:")


def peer_identity(context: grpc.ServicerContext | grpc.aio.ServicerContext[Any, Any]) -> Identity | None:
    """The identity in the client's certificate (gRPC verified it against the CA); None on a plain
    connection. A verified certificate without a hyperback identity raises UsageError."""
    pem = context.auth_context().get("x509_pem_cert")
    if not pem:
        return None
    return from_pem(pem if isinstance(pem, bytes) else next(iter(pem)))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``--tls-*`` flags of a service's command line: the [tls] settings of docs/tls.md."""
    parser.add_argument("--tls-ca", type=Path, metavar="FILE",
                        help="require client certificates signed by this CA (with --tls-cert, --tls-key)")
    parser.add_argument("--tls-cert", type=Path, metavar="FILE", help="this service's certificate (PEM)")
    parser.add_argument("--tls-key", type=Path, metavar="FILE", help="its private key (PEM)")
    parser.add_argument("--tls-crl", type=Path, metavar="FILE",
                        help="refuse the certificates this CA revocation list names (reread when it changes)")
    parser.add_argument("--allow-plaintext", action="store_true",
                        help="without TLS, listen on a non-loopback address anyway (plain TCP: no "
                             "authentication, no encryption)")


def from_arguments(args: argparse.Namespace) -> TlsConfig:
    """The TlsConfig the flags of :func:`add_arguments` give; UsageError if they do not go together."""
    return TlsConfig(args.tls_ca, args.tls_cert, args.tls_key, allow_plaintext=args.allow_plaintext,
                     crl=args.tls_crl).check("--tls-ca, --tls-cert, --tls-key, --tls-crl")


# --------------------------------------------------------------------------- clients

def check_own_certificate(tls: TlsConfig, now: dt.datetime | None = None) -> Identity:
    """This end's identity, once its certificate is known to be in force and signed by the CA;
    TlsError saying what to fix otherwise."""
    try:
        cert = x509.load_pem_x509_certificate(_read(tls.cert, "certificate"))
        ca = x509.load_pem_x509_certificate(_read(tls.ca, "CA"))
    except ValueError as e:
        raise errors.TlsError(f"{tls.cert} or {tls.ca} is not a PEM certificate: {e}") from e
    now = now or dt.datetime.now(dt.UTC)
    if now > cert.not_valid_after_utc:
        end = f"{cert.not_valid_after_utc:%Y-%m-%d %H:%M}"
        raise errors.TlsError(f"the certificate {tls.cert} expired on {end} UTC: issue a new one "
                              f"('hyperback certs issue')")
    if now < cert.not_valid_before_utc:
        start = f"{cert.not_valid_before_utc:%Y-%m-%d %H:%M}"
        raise errors.TlsError(f"the certificate {tls.cert} is valid only from {start} UTC: check this "
                              f"host's clock")
    if not check_signed(cert, ca):
        raise errors.TlsError(f"the certificate {tls.cert} was not issued by the CA {tls.ca} "
                              f"({ca.subject.rfc4514_string()}): issue it with that CA, or point ca at "
                              f"its issuer")
    try:
        identity = from_certificate(cert)
    except errors.UsageError as e:
        raise errors.TlsError(str(e)) from e
    revoked = tls.crl and tls.ca and revoked_message(load_crl(tls.crl, tls.ca), cert, f"{tls.cert}")
    if revoked:
        raise errors.TlsError(revoked)
    return identity


def channel_credentials(tls: TlsConfig) -> grpc.ChannelCredentials:
    check_own_certificate(tls)
    return grpc.ssl_channel_credentials(root_certificates=_read(tls.ca, "CA"),
                                        private_key=_read(tls.key, "key"),
                                        certificate_chain=_read(tls.cert, "certificate"))


def _options(tls: TlsConfig, options: tuple[tuple[str, Any], ...]) -> list[tuple[str, Any]]:
    return [*options, *([("grpc.ssl_target_name_override", tls.server_name)] if tls.server_name else [])]


def channel(address: str, tls: TlsConfig, options: tuple[tuple[str, Any], ...] = ()) -> grpc.Channel:
    """A channel to ``address``: mutual TLS if configured (except to unix: sockets), else plain
    where ``check_plaintext`` allows it."""
    if tls.enabled and not is_local_socket(address):
        return grpc.secure_channel(address, channel_credentials(tls), options=_options(tls, options))
    check_plaintext(address, tls, "connecting to")
    return grpc.insecure_channel(address, options=options)


def aio_channel(address: str, tls: TlsConfig, options: tuple[tuple[str, Any], ...] = ()) -> grpc.aio.Channel:
    """:func:`channel` for asyncio."""
    if tls.enabled and not is_local_socket(address):
        return grpc.aio.secure_channel(address, channel_credentials(tls), options=_options(tls, options))
    check_plaintext(address, tls, "connecting to")
    return grpc.aio.insecure_channel(address, options=options)


_HANDSHAKE = ("handshake", "ssl_error", "certificate", "tsi_")


def tls_failure(code: grpc.StatusCode, details: str, address: str,
                cert: Path | None) -> errors.TlsError | None:
    """The TlsError a failed call stands for, or None if it is not a TLS failure.

    A connection closed before any answer, on a TLS channel (``cert``: this end's certificate), is the
    server refusing the certificate; on a plain channel (None), a server that requires TLS. A failed
    handshake names itself.
    """
    if code is grpc.StatusCode.UNAUTHENTICATED:  # a TLS server's refusal of a revoked certificate
        return errors.TlsError(f"{address} refused this end's certificate: {details}")
    if code is not grpc.StatusCode.UNAVAILABLE:
        return None
    lowered = details.lower()
    if any(word in lowered for word in _HANDSHAKE):
        return errors.TlsError(f"TLS handshake with {address} failed: the server's certificate is not "
                               f"signed by this end's CA, or names another host: {details}")
    if "failed to connect to all addresses" in lowered and "socket closed" in lowered:
        if cert is not None:
            return errors.TlsError(f"{address} refused this end's certificate during the TLS handshake "
                                   f"(issued by another CA, expired, or revoked): check {cert}")
        return errors.TlsError(f"{address} closed the connection at once: it requires TLS with a client "
                               f"certificate; configure ca, cert and key (docs/tls.md)")
    return None


__all__ = ["NO_TLS", "TlsConfig", "add_arguments", "add_port", "aio_channel", "channel",
           "channel_credentials", "check_own_certificate", "check_plaintext", "from_arguments", "is_local",
           "peer_identity", "server_credentials", "tls_failure"]
