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
import json
import logging
import re
import signal
import socket
import sys
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import Final, NoReturn

import grpc

from host_agent import errors
from host_agent._proto.hyperback.v1 import media_pb2 as pb
from host_agent._proto.hyperback.v1 import media_pb2_grpc as pb_grpc
from host_agent.colocation.serviceip import ServiceAddress
from host_agent.media.codec import (
    CHANNEL_OPTIONS,
    ERROR_KEY,
    MAX_IDS,
    PIECE,
    config_to_pb,
    parse_snapshot,
    refused,
    snapshot_document,
    status_for,
)
from host_agent.media.reads import SnapshotReaders, read_chunks
from host_agent.media.sessions import Session, Sessions
from host_agent.media.uploads import Upload
from host_agent.model import ChangeDetection, Policy
from host_agent.notify import Notifier
from host_agent.protobuf import policy_from_pb
from host_agent.storage.copier import ID_LEN, ZERO_ID, NativeRepository
from host_agent.storage.files import write_atomic
from host_agent.storage.maptree import TreeReader
from host_agent.storage.repository import Repository
from host_agent.storage.snapshot import NAME, SNAPSHOT_ID, Snapshot
from host_agent.storage.verification import Verification

log = logging.getLogger(__name__)

DEFAULT_PORT: Final = 7420
DEFAULT_LEASE: Final = 60.0
GRACE: Final = 5.0  # seconds calls in flight get to finish on stop
SNAPSHOTS_PER_PAGE: Final = 256
MAX_CONSOLE_UPLOAD: Final = 1 << 20  # bytes of console text a RecordVerification may carry
DESTINATION_NAME: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


# --------------------------------------------------------------------------- errors on the wire

class _Answering:
    """Turns what a call raises into its status code and error class, once, here.

    Anything else (a bug, grpc's own exceptions, a cancelled stream) goes on to grpc unchanged.
    """

    def __init__(self, context: grpc.ServicerContext, what: str) -> None:
        self._context, self._what = context, what

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 tb: TracebackType | None) -> None:
        if isinstance(error, errors.HyperbackError):
            self._abort(status_for(error), error)
        if isinstance(error, MemoryError):
            self._abort(grpc.StatusCode.RESOURCE_EXHAUSTED, errors.HyperbackError(f"out of memory: {error}"))

    def _abort(self, code: grpc.StatusCode, error: errors.HyperbackError) -> NoReturn:
        log.warning("%s from %s: %s: %s", self._what, self._context.peer(), code.name, error)
        self._context.set_trailing_metadata(((ERROR_KEY, type(error).__name__),))
        self._context.abort(code, str(error))


# --------------------------------------------------------------------------- the service

class MediaServicer(pb_grpc.MediaServicer):
    """The Media service over a fixed set of repositories; domain errors become status codes in
    ``_answering`` and only there."""

    def __init__(self, repos: Mapping[str, Repository], host_name: str, lease: float = DEFAULT_LEASE) -> None:
        self.repos, self.host_name = dict(repos), host_name
        self.sessions = Sessions(lease)
        self.readers = SnapshotReaders()

    def close(self) -> None:
        """End every session (their locks go); what they uploaded is garbage. Close every reader."""
        self.sessions.close()
        self.readers.close()

    def _repo(self, destination: str) -> Repository:
        repo = self.repos.get(destination)
        if repo is None:
            raise errors.UnknownDestination(
                f"the media service on {self.host_name} serves no destination {destination!r} "
                f"(it serves: {', '.join(sorted(self.repos)) or 'none'})")
        return repo

    # ---------- reading ----------

    def Describe(self, request: pb.DescribeRequest, context: grpc.ServicerContext) -> pb.DescribeResponse:
        return pb.DescribeResponse(host_name=self.host_name, destinations=[
            pb.MediaDestination(name=name, config=config_to_pb(repo.config))
            for name, repo in sorted(self.repos.items())])

    def ListSnapshots(self, request: pb.ListMediaSnapshotsRequest,
                      context: grpc.ServicerContext) -> Iterator[pb.MediaSnapshots]:
        with _Answering(context, "ListSnapshots"):
            snaps = self._repo(request.destination).snapshots(request.name or None)
            for at in range(0, len(snaps), SNAPSHOTS_PER_PAGE):
                yield pb.MediaSnapshots(documents=[snapshot_document(s)
                                                   for s in snaps[at:at + SNAPSHOTS_PER_PAGE]])

    def ResolveSnapshot(self, request: pb.ResolveSnapshotRequest,
                        context: grpc.ServicerContext) -> pb.SnapshotDocument:
        with _Answering(context, "ResolveSnapshot"):
            return pb.SnapshotDocument(document=snapshot_document(
                self._repo(request.destination).resolve(request.spec)))

    def BaseFor(self, request: pb.BaseForRequest, context: grpc.ServicerContext) -> pb.SnapshotDocument:
        with _Answering(context, "BaseFor"):
            policy = policy_from_pb(request.policy, "BaseForRequest")
            base = self._repo(request.destination).base_for(request.name, policy)
            return pb.SnapshotDocument(document=snapshot_document(base) if base else "")

    # ---------- boot verification records ----------

    def RecordVerification(self, request: pb.RecordVerificationRequest,
                           context: grpc.ServicerContext) -> pb.RecordVerificationResponse:
        with _Answering(context, "RecordVerification"):
            repo = self._repo(request.destination)
            if len(request.console) > MAX_CONSOLE_UPLOAD:
                raise errors.MalformedMessage(f"console text of {len(request.console)} bytes; at most "
                                              f"{MAX_CONSOLE_UPLOAD}")
            try:
                record = Verification.from_json(json.loads(request.document))
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                raise errors.MalformedMessage(f"not a verification record: {e}") from e
            repo.record_verification(record, request.console)
            return pb.RecordVerificationResponse()

    def ListVerifications(self, request: pb.ListVerificationsRequest,
                          context: grpc.ServicerContext) -> pb.Verifications:
        with _Answering(context, "ListVerifications"):
            records = self._repo(request.destination).verifications()
            return pb.Verifications(documents=[json.dumps(r.to_json()) for r in records.values()])

    # ---------- backup sessions ----------

    def OpenBackup(self, request: pb.OpenBackupRequest,
                   context: grpc.ServicerContext) -> pb.OpenBackupResponse:
        with _Answering(context, "OpenBackup"):
            repo = self._repo(request.destination)
            if not NAME.fullmatch(request.name):
                raise errors.UsageError(f"snapshot name {request.name!r} is malformed (e.g. vm1/vda)")
            policy = policy_from_pb(request.policy, "OpenBackupRequest")
            session = self.sessions.open(repo, request.name, policy, request.base_id, request.copy)
            log.info("%s session %s of %s (%s) to %s opened by %s", "copy" if request.copy else "backup",
                     session.id, session.name, session.policy.value, request.destination, context.peer())
            return pb.OpenBackupResponse(
                session_id=session.id, config=config_to_pb(repo.config), writer_id=session.writer_id.hex(),
                base=snapshot_document(session.base) if session.base else "",
                lease_seconds=self.sessions.lease)

    def BaseTree(self, request: pb.BaseTreeRequest, context: grpc.ServicerContext) -> Iterator[pb.TreePages]:
        with _Answering(context, "BaseTree"):
            session = self.sessions.get(request.session_id)
            if session.base is None:
                raise errors.RepositoryError(f"backup session {session.id} has no base snapshot")
            wanted = _LeafFilter(request.every_leaf, [(r.first, r.first + r.count) for r in request.leaves])
            batch: list[pb.TreePage] = []
            size = 0
            for data, level in _base_pages(session, session.base, wanted):
                batch.append(pb.TreePage(data=data, level=level))
                size += len(data)
                if size >= PIECE:
                    yield pb.TreePages(pages=batch)
                    batch, size = [], 0
            if batch:
                yield pb.TreePages(pages=batch)

    def Heartbeat(self, request: pb.SessionRequest, context: grpc.ServicerContext) -> pb.HeartbeatResponse:
        with _Answering(context, "Heartbeat"):
            self.sessions.get(request.session_id)
            return pb.HeartbeatResponse(lease_seconds=self.sessions.lease)

    def FilterMissing(self, request: pb.FilterMissingRequest,
                      context: grpc.ServicerContext) -> pb.FilterMissingResponse:
        with _Answering(context, "FilterMissing"):
            ids = request.ids
            if len(ids) % ID_LEN or len(ids) > MAX_IDS * ID_LEN:
                raise errors.UsageError(f"ids must be 32 bytes each, at most {MAX_IDS} of them")
            with self.sessions.get(request.session_id).use() as native:
                missing = b"".join(ids[i:i + ID_LEN] for i in range(0, len(ids), ID_LEN)
                                   if ids[i:i + ID_LEN] not in native)
            return pb.FilterMissingResponse(missing=missing)

    def UploadPack(self, request_iterator: Iterator[pb.UploadPackRequest],
                   context: grpc.ServicerContext) -> pb.UploadPackResponse:
        with _Answering(context, "UploadPack"):
            first = next(request_iterator, None)
            if first is None or first.WhichOneof("part") != "start":
                raise errors.UsageError("an upload starts with UploadStart")
            session = self.sessions.get(first.start.session_id)
            upload = Upload(session, first.start)
            try:
                for msg in request_iterator:
                    session.touch()
                    if msg.WhichOneof("part") == "pack_data":
                        upload.pack_data(msg.pack_data)
                    elif msg.WhichOneof("part") == "index_data":
                        upload.index_data(msg.index_data)
                    else:
                        raise errors.UsageError("UploadStart again in the middle of an upload")
                records = upload.finish()
            except errors.CorruptChunk as e:
                raise refused(grpc.StatusCode.INVALID_ARGUMENT, e) from e
            finally:
                upload.discard()
            log.info("backup session %s: pack %s published (%d records, %d bytes)", session.id, upload.name,
                     records, upload.pack_size)
            return pb.UploadPackResponse(records=records)

    def Commit(self, request: pb.CommitRequest, context: grpc.ServicerContext) -> pb.CommitResponse:
        with _Answering(context, "Commit"):
            session = self.sessions.get(request.session_id)
            snap = parse_snapshot(request.document)
            _check_document(session, snap)
            with session.use() as native:
                _check_references(native, session, snap)
                # The commit (repository-format section 6, step 4), under the session's lock.
                write_atomic(session.repo.path / "snapshots" / snap.id,
                             json.dumps(snap.to_json(), indent=1).encode(), session.repo.path / "tmp")
            self.sessions.end(session, f"committed snapshot {snap.id}")
            return pb.CommitResponse(snapshot_id=snap.id)

    def Abort(self, request: pb.SessionRequest, context: grpc.ServicerContext) -> pb.AbortResponse:
        with _Answering(context, "Abort"):
            self.sessions.end(self.sessions.get(request.session_id), "aborted by the client")
            return pb.AbortResponse()

    # ---------- restore ----------

    def Restore(self, request: pb.RestoreRequest, context: grpc.ServicerContext) -> Iterator[pb.RestoreData]:
        with _Answering(context, "Restore"):
            repo = self._repo(request.destination)
            snap = repo.resolve(request.spec)
            yield pb.RestoreData(document=snapshot_document(snap))
            with repo.session("media-restore", writer=False) as native:
                yield from _restore_stream(native, snap)


    def ReadChunks(self, request: pb.ReadChunksRequest,
                   context: grpc.ServicerContext) -> Iterator[pb.RestoreData]:
        with _Answering(context, "ReadChunks"):
            repo = self._repo(request.destination)
            with self.readers.reader(request.destination, repo, request.snapshot_id) as reader:
                yield from read_chunks(reader, request)


class _LeafFilter:
    """Which leaves (by index, asked in increasing order) a client wants."""

    def __init__(self, every: bool, ranges: Iterable[tuple[int, int]]) -> None:
        self._every = every
        self._ranges = sorted((lo, hi) for lo, hi in ranges if lo < hi)
        self._at = 0

    def __call__(self, leaf: int) -> bool:
        if self._every:
            return True
        while self._at < len(self._ranges) and self._ranges[self._at][1] <= leaf:
            self._at += 1
        return self._at < len(self._ranges) and self._ranges[self._at][0] <= leaf


def _base_pages(session: Session, base: Snapshot,
                wanted: Callable[[int], bool]) -> Iterator[tuple[bytes, int]]:
    """(page, level) of the base's tree, depth first, parents first; leaves only if wanted."""
    reader = TreeReader(session.native, base.tree)
    stack = [(base.tree.root, base.tree.height - 1)] if base.tree.root else []
    leaf_no = 0
    while stack:
        page_id, level = stack.pop()
        if level == 0:
            take = wanted(leaf_no)
            leaf_no += 1
            if not take:
                continue
        with session.use():
            page = reader.leaf(page_id)
        yield page, level
        if level:
            stack.extend((page[i:i + ID_LEN], level - 1) for i in range(len(page) - ID_LEN, -1, -ID_LEN))


def _check_document(session: Session, snap: Snapshot) -> None:
    """The document is one this session may commit: its name, base (not for a copy, which keeps the
    source's), chunk size and shape."""
    repo, base = session.repo, session.base
    if not SNAPSHOT_ID.fullmatch(snap.id) or (repo.path / "snapshots" / snap.id).exists():
        raise errors.UsageError(f"snapshot id {snap.id!r} is malformed or taken")
    if snap.name != session.name:
        raise errors.UsageError(f"the session backs up {session.name}, not {snap.name}")
    if snap.chunk_size != repo.config.chunk_size:
        raise errors.RepositoryError(f"the snapshot has chunk size {snap.chunk_size}, the repository "
                                     f"{repo.config.chunk_size}")
    expected_parent = base.id if base else None
    detection_ok = (snap.change_detection is ChangeDetection.NONE) == (base is None)
    policy_ok = base is not None or snap.policy is Policy.FULL
    if not session.copy and (snap.parent != expected_parent or not detection_ok or not policy_ok):
        raise errors.UsageError(f"the snapshot's parent, policy or change detection do not match the "
                                f"session's base ({expected_parent})")
    entries = -(-snap.size // snap.chunk_size)
    if snap.tree.entries != entries or (snap.tree.root is None) != (entries == 0):
        raise errors.UsageError(f"the snapshot's tree does not fit its size {snap.size}")
    repo.check_vm(snap.vm)


def _check_references(native: NativeRepository, session: Session, snap: Snapshot) -> None:
    """Every tree page and chunk the snapshot names is in the repository (the session's view: packs
    no tombstone names, and its own). Subtrees shared with the base are trusted whole."""
    reader = TreeReader(native, snap.tree)
    missing: list[bytes] = []
    stack = [(snap.tree.root, snap.tree.height - 1)] if snap.tree.root else []
    while stack:
        page_id, level = stack.pop()
        if page_id in session.base_pages:
            continue
        if page_id not in native:
            missing.append(page_id)
            continue
        page = reader.leaf(page_id)
        ids = [page[i:i + ID_LEN] for i in range(0, len(page), ID_LEN)]
        if level:
            stack.extend((child, level - 1) for child in ids)
        else:
            missing.extend(cid for cid in ids if cid != ZERO_ID and cid not in native)
    if missing:
        raise refused(grpc.StatusCode.FAILED_PRECONDITION, errors.MissingChunk(
            f"snapshot {snap.id} names {len(missing)} blob(s) the repository lacks, e.g. {missing[0].hex()}: "
            "upload them, then commit again", missing[0].hex()))


def _restore_stream(native: NativeRepository, snap: Snapshot) -> Iterator[pb.RestoreData]:
    """Each leaf's chunk ids, then the verified bytes of its non-zero chunks."""
    cs = snap.chunk_size
    chunk = 0
    for leaf in TreeReader(native, snap.tree).chunk_ids():
        yield pb.RestoreData(chunk_ids=leaf)
        out = bytearray()
        for i in range(0, len(leaf), ID_LEN):
            cid = leaf[i:i + ID_LEN]
            want = min(cs, snap.size - chunk * cs)
            chunk += 1
            if cid == ZERO_ID:
                continue
            data = native.read_blob(cid)
            if len(data) != want:
                raise errors.CorruptChunk(f"chunk {cid.hex()} holds {len(data)} bytes where snapshot "
                                          f"{snap.id} needs {want}", cid.hex())
            out += data
            while len(out) >= PIECE:
                yield pb.RestoreData(data=bytes(out[:PIECE]))
                del out[:PIECE]
        if out:
            yield pb.RestoreData(data=bytes(out))
    if chunk != snap.tree.entries:
        raise errors.CorruptChunk(f"snapshot {snap.id}'s tree holds {chunk} chunks, not {snap.tree.entries}")


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
        repos[name] = Repository.open(path)
    return repos


def start(destinations: Mapping[str, Path], address: str, host_name: str,
          lease: float = DEFAULT_LEASE) -> MediaServer:
    """Serve the repositories on ``address`` (HOST:PORT; port 0 picks one) until ``stop()``."""
    return _start(open_destinations(destinations), address, host_name, lease)


def _start(repos: Mapping[str, Repository], address: str, host_name: str, lease: float,
           workers: int = 32) -> MediaServer:
    if not lease > 0:
        raise errors.UsageError("the session timeout must be above 0 seconds")
    servicer = MediaServicer(repos, host_name, lease)
    server = grpc.server(ThreadPoolExecutor(max_workers=workers, thread_name_prefix="media"),
                         options=CHANNEL_OPTIONS)
    pb_grpc.add_MediaServicer_to_server(servicer, server)
    try:
        port = server.add_insecure_port(address)
    except RuntimeError as e:  # grpc raises RuntimeError when it cannot bind
        servicer.close()
        raise errors.EnvironmentProblem(f"cannot listen on {address}: {e}") from e
    server.start()
    bound = f"{address.rpartition(':')[0]}:{port}"
    log.info("media service of %s serving %s on %s", host_name, ", ".join(sorted(repos)), bound)
    return MediaServer(server, servicer, bound)


def serve(destinations: Mapping[str, Path], address: str, host_name: str, service_ip: ServiceAddress | None,
          lease: float = DEFAULT_LEASE, notifier: Notifier | None = None) -> None:
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
            server = _start(repos, address, host_name, lease)
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
        serve(dict(args.repo), args.listen, args.host_name, service_ip, args.session_timeout,
              Notifier.from_env())
        return 0
    except errors.HyperbackError as e:
        print(f"hyperback-media: error: {e}", file=sys.stderr)
        return e.exit_code


__all__ = ["DEFAULT_LEASE", "DEFAULT_PORT", "MediaServer", "MediaServicer", "main",
           "open_destinations", "serve", "start"]

if __name__ == "__main__":
    sys.exit(main())
