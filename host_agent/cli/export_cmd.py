"""hyperback export: serve a snapshot read-only as an NBD block device until SIGINT or SIGTERM."""
from __future__ import annotations

import argparse
import json
import signal
import sys
import tempfile
from pathlib import Path

from host_agent import config, errors
from host_agent.agent.destinations import Destinations
from host_agent.cli.progress import human
from host_agent.storage.export import Exportable, SnapshotExport
from host_agent.storage.repository import Repository

MIB = 1 << 20
DEFAULT_CACHE_MIB = 64
WATCH_EVERY = 1.0  # seconds between checks that nbdkit still runs while waiting for a signal


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "export", help="serve a snapshot as a read-only NBD block device",
        description="Serve SNAPSHOT (an id, a unique id prefix, or NAME@latest) read-only over NBD on a "
                    "unix socket, straight from the repository: nothing is restored first. Prints the "
                    "NBD URI and the size, then serves until SIGINT or SIGTERM (exit 0). Read it with "
                    "nbdcopy, qemu-img, qemu (a read-only disk) or guestfish.")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--repo", metavar="REPO", help="repository directory")
    where.add_argument("--destination", metavar="NAME",
                       help="a destination of the agent config (a local repository, or media behind a "
                            "media service on another host)")
    p.add_argument("--config", metavar="PATH", type=Path, default=None,
                   help="agent config for --destination (default /etc/hyperback/agent.toml or "
                        "$HYPERBACK_CONFIG)")
    p.add_argument("--socket", metavar="PATH", type=Path, default=None,
                   help="unix socket to listen on (default: one in a new temporary directory)")
    p.add_argument("--cache", metavar="MIB", type=int, default=DEFAULT_CACHE_MIB,
                   help=f"chunk cache size in MiB (default {DEFAULT_CACHE_MIB})")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object (uri, size, snapshot, name, socket) for scripts")
    p.add_argument("snapshot", metavar="SNAPSHOT", help="snapshot id, prefix, or NAME@latest")
    p.set_defaults(run=run)


def _repository(args: argparse.Namespace) -> Exportable:
    if args.repo is not None:
        return Repository.open(args.repo)
    destinations = Destinations(config.load(args.config))
    if args.destination not in destinations.names:
        raise errors.UsageError(f"no destination named {args.destination!r}; known: "
                                f"{', '.join(sorted(destinations.names))}")
    return destinations.repository(args.destination)


def run(args: argparse.Namespace) -> int:
    if args.cache < 1:
        raise errors.UsageError(f"--cache {args.cache}: give at least 1 MiB")
    repo = _repository(args)
    with tempfile.TemporaryDirectory(prefix="hyperback-export-") as run_dir:
        export = SnapshotExport(repo, args.snapshot, Path(run_dir), args.cache * MIB,
                                socket_path=args.socket.absolute() if args.socket else None,
                                exit_with_parent=True)
        with export:
            _announce(export, args.json)
            got = _serve(export)
    if got is None:
        raise errors.EnvironmentProblem(f"the NBD server of snapshot {export.snapshot.id} stopped by itself")
    print(f"stopped on {signal.Signals(got).name}; the export is gone", file=sys.stderr)
    return 0


def _announce(export: SnapshotExport, as_json: bool) -> None:
    snap = export.snapshot
    if as_json:
        print(json.dumps({"uri": export.uri, "size": export.size, "snapshot": snap.id, "name": snap.name,
                          "socket": str(export.socket_path)}), flush=True)
    else:
        print(export.uri)
        print(f"size {export.size} ({human(export.size)}): snapshot {snap.id} of {snap.name}, read-only; "
              "Ctrl-C or SIGTERM stops it", flush=True)


def _serve(export: SnapshotExport) -> int | None:
    """Wait for SIGINT or SIGTERM (returned) or for nbdkit to end by itself (None)."""
    wanted = {signal.SIGINT, signal.SIGTERM}
    # blocked only now: nbdkit, started before, must not inherit a mask that ignores SIGTERM
    signal.pthread_sigmask(signal.SIG_BLOCK, wanted)
    try:
        while export.running:
            info = signal.sigtimedwait(wanted, WATCH_EVERY)
            if info is not None:
                return info.si_signo
        return None
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, wanted)
