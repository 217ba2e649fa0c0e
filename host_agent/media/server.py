"""The media service: repositories on this host, served over gRPC to host agents on other hosts.

A host agent whose backup media sit on another host streams its backups to that host's media
service (``hyperback.v1.Media``, proto/hyperback/v1/media.proto; the protocol, what the server checks
and what a crash leaves behind: docs/media-protocol.md). The client (``host_agent.media.client``)
deduplicates at the source, so only packs of data the destination lacks cross the LAN; this server
checks every pack before it publishes it, and every snapshot's references before it commits it.

    hyperback-media --listen 10.77.0.100:7420 --repo main=/srv/backup/main \\
                    --service-ip 10.77.0.100/24 --service-dev lan1

A backup session holds a writer lock on its repository, exactly as a local backup does, so garbage
collection on this host treats the session's packs as work in progress. A session that goes silent
for longer than its lease expires: its lock goes, and what it uploaded is garbage for the next
collection. Nothing is committed before the snapshot document is written.
"""
from __future__ import annotations

import argparse
import logging
import signal
import socket
import sys
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NoReturn

import grpc

from host_agent import errors
from host_agent._proto.hyperback.v1 import media_pb2_grpc as pb_grpc
from host_agent.colocation.serviceip import ServiceAddress
from host_agent.media.access import MEDIA_ROLES, GuardedMediaServicer
from host_agent.media.codec import CHANNEL_OPTIONS
from host_agent.media.sealed import KeylessRepository
from host_agent.media.servicer import DEFAULT_LEASE, DEFAULT_PORT, DESTINATION_NAME, GRACE, MediaServicer
from host_agent.notify import Notifier
from host_agent.storage.repository import Repository
from host_agent.tls.roles import RoleInterceptor
from host_agent.tls.transport import NO_TLS, TlsConfig, add_arguments, add_port, from_arguments

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- the server

class MediaServer:
    """A started media service: its bound ``address`` (the port resolved) and a graceful stop."""

    def __init__(self, server: grpc.Server, servicer: MediaServicer, address: str) -> None:
        self.server, self.servicer, self.address = server, servicer, address

    def stop(self, grace: float = GRACE) -> None:
        """Stop taking calls, give those in flight ``grace`` seconds, then end every session."""
        self.server.stop(grace).wait()
        self.servicer.close()
        log.info("media service on %s stopped", self.address)


def open_destinations(destinations: Mapping[str, Path]) -> dict[str, Repository]:
    """Open every repository to serve; UsageError or a RepositoryError saying which is unusable."""
    if not destinations:
        raise errors.UsageError("give at least one destination (--repo NAME=PATH)")
    repos = {}
    for name, path in destinations.items():
        if not DESTINATION_NAME.fullmatch(name):
            raise errors.UsageError(f"destination name {name!r} must be letters, digits, '.', '_', '-'")
        # never unlocked, even with a passphrase in the environment: encryption happens at the source
        repos[name] = KeylessRepository.open(path)
    return repos


def start(destinations: Mapping[str, Path], address: str, host_name: str,
          lease: float = DEFAULT_LEASE, tls: TlsConfig = NO_TLS) -> MediaServer:
    """Serve the repositories on ``address`` (HOST:PORT; port 0 picks one) until ``stop()``; with
    ``tls``, to clients whose certificates the CA signed, each held to its role (docs/tls.md)."""
    return _start(open_destinations(destinations), address, host_name, lease, tls)


def _start(repos: Mapping[str, Repository], address: str, host_name: str, lease: float,
           tls: TlsConfig = NO_TLS, workers: int = 32) -> MediaServer:
    if not lease > 0:
        raise errors.UsageError("the session timeout must be above 0 seconds")
    # first: it reads the crl, and may refuse to start
    interceptors: list[grpc.ServerInterceptor] = [RoleInterceptor(MEDIA_ROLES, tls)] if tls.enabled else []
    servicer = (GuardedMediaServicer if tls.enabled else MediaServicer)(repos, host_name, lease)
    server = grpc.server(ThreadPoolExecutor(max_workers=workers, thread_name_prefix="media"),
                         options=CHANNEL_OPTIONS, interceptors=interceptors)
    pb_grpc.add_MediaServicer_to_server(servicer, server)
    try:
        port = add_port(server, address, tls, "media service")
    except errors.HyperbackError:
        servicer.close()
        raise
    server.start()
    bound = f"{address.rpartition(':')[0]}:{port}"
    log.info("media service of %s serving %s on %s%s", host_name, ", ".join(sorted(repos)), bound,
             " (mutual TLS)" if tls.enabled else "")
    return MediaServer(server, servicer, bound)


def serve(destinations: Mapping[str, Path], address: str, host_name: str, service_ip: ServiceAddress | None,
          lease: float = DEFAULT_LEASE, notifier: Notifier | None = None,
          tls: TlsConfig = NO_TLS) -> None:
    """Serve until SIGTERM or SIGINT, then stop gracefully.

    With ``service_ip``, the address is claimed before the server binds (it may be the address it
    listens on) and released after it stopped, whatever happened in between. ``notifier`` tells
    systemd once the server is started (its STATUS names the bound address), and this thread,
    which only waits for the signal, pings the watchdog meanwhile.
    """
    notifier = notifier or Notifier()
    repos = open_destinations(destinations)  # a bad --repo fails before the network is touched
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        if service_ip is not None:
            service_ip.claim()
        try:
            server = _start(repos, address, host_name, lease, tls)
            try:
                notifier.ready(f"serving {', '.join(sorted(repos))} on {server.address}")
                while not stop.wait(notifier.watchdog_interval or None):
                    notifier.watchdog()
                log.info("stopping: %.0f s for calls in flight", GRACE)
                notifier.stopping()
            finally:
                server.stop()
                notifier.close()
        finally:
            if service_ip is not None:
                service_ip.release()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


# --------------------------------------------------------------------------- command line

class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise errors.UsageError(f"{self.prog}: {message} (see '{self.prog} --help')")


def _repo_arg(value: str) -> tuple[str, Path]:
    name, sep, path = value.partition("=")
    if not sep or not DESTINATION_NAME.fullmatch(name) or not path:
        raise argparse.ArgumentTypeError(f"{value!r} is not NAME=PATH (NAME: letters, digits, '.', '_', '-')")
    return name, Path(path)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="hyperback-media",
        description="Serve repositories on this host to host agents on other hosts, which back up to "
                    "them (deduplicating at the source) and restore from them over gRPC.",
        epilog="Exit codes: 0 stopped by SIGTERM/SIGINT, 1 unexpected error, 2 bad arguments or an "
               "unusable repository, 3 the system refused (address in use, service address not claimed).")
    parser.add_argument("--listen", required=True, metavar="HOST:PORT",
                        help=f"address to serve on, e.g. 10.77.0.100:{DEFAULT_PORT}")
    parser.add_argument("--repo", required=True, action="append", type=_repo_arg, metavar="NAME=PATH",
                        help="a repository to serve as destination NAME (repeatable)")
    parser.add_argument("--host-name", default=socket.gethostname(), metavar="NAME",
                        help="this host's name, as clients see it (default: %(default)s)")
    parser.add_argument("--service-ip", metavar="ADDRESS/PREFIX",
                        help="claim this address on --service-dev while serving, release it on exit")
    parser.add_argument("--service-dev", metavar="INTERFACE", help="the interface for --service-ip")
    parser.add_argument("--session-timeout", type=float, default=DEFAULT_LEASE, metavar="SECONDS",
                        help="a backup session silent this long expires (default %(default)g)")
    add_arguments(parser)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level (default INFO)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                            format="hyperback-media: %(levelname)s %(name)s: %(message)s")
        if (args.service_ip is None) != (args.service_dev is None):
            raise errors.UsageError("--service-ip and --service-dev go together")
        names = [name for name, _ in args.repo]
        if len(set(names)) != len(names):
            raise errors.UsageError("a destination NAME is given twice in --repo")
        if not args.session_timeout > 0:
            raise errors.UsageError("--session-timeout must be above 0")
        service_ip = ServiceAddress.parse(args.service_ip, args.service_dev) if args.service_ip else None
        tls = from_arguments(args)
        serve(dict(args.repo), args.listen, args.host_name, service_ip, args.session_timeout,
              Notifier.from_env(), tls)
        return 0
    except errors.HyperbackError as e:
        print(f"hyperback-media: error: {e}", file=sys.stderr)
        return e.exit_code


__all__ = ["DEFAULT_LEASE", "DEFAULT_PORT", "MediaServer", "MediaServicer", "main",
           "open_destinations", "serve", "start"]

if __name__ == "__main__":
    sys.exit(main())
