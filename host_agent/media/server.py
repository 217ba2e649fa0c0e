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
import errno
import json
import logging
import os
import re
import signal
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
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
    snapshot_document,
    status_for,
)
from host_agent.model import ChangeDetection, Policy
from host_agent.protobuf import policy_from_pb
from host_agent.storage import copier
from host_agent.storage.copier import ID_LEN, ZERO_ID, NativeRepository
from host_agent.storage.maptree import TreeReader
from host_agent.storage.packfile import (
    INDEX_ENTRY,
    INDEX_HEADER,
    PACK_HEADER,
    PACK_MAGIC,
    RECORD_HEADER,
)
from host_agent.storage.packfile import VERSION as PACK_VERSION
from host_agent.storage.repository import (
    NAME,
    PACK_NAME,
    PACK_TARGET,
    SNAPSHOT_ID,
    Repository,
    Snapshot,
    write_atomic,
)

log = logging.getLogger(__name__)

DEFAULT_PORT: Final = 7420
DEFAULT_LEASE: Final = 60.0
GRACE: Final = 5.0  # seconds calls in flight get to finish on stop
MAX_PACK: Final = 2 * PACK_TARGET  # an upload above this is refused: it bounds tmp/ and the check's memory
SNAPSHOTS_PER_PAGE: Final = 256
DESTINATION_NAME: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


class PackScanner:
    """Checks the structure of a pack file as its bytes stream in, and indexes its records.

    It checks the header (magic, version, the pack's name, the expected writer id) and every record
    header (type, compression flag, reserved field, lengths, no id twice); the records' contents
    (decompression, SHA-256) are for the native reader to check. Memory: about 100 bytes per record.
    """

    def __init__(self, name: str, writer_id: bytes, chunk_size: int) -> None:
        self.name, self._writer_id, self._chunk_size = name, writer_id, chunk_size
        self.entries = bytearray()  # packed INDEX_ENTRY records
        self._ids: set[bytes] = set()
        self._pending = bytearray()  # the start of a header not yet complete
        self._payload_left = 0
        self._offset = 0  # of the next byte fed
        self._started = False  # pack header seen

    def feed(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            if self._payload_left:
                n = min(self._payload_left, len(view))
                self._payload_left -= n
            else:
                want = (RECORD_HEADER.size if self._started else PACK_HEADER.size) - len(self._pending)
                n = min(want, len(view))
                self._pending += view[:n]
                if n == want:
                    self._header(bytes(self._pending), self._offset + n - len(self._pending))
                    self._pending.clear()
            self._offset += n
            view = view[n:]

    def finish(self) -> bytes:
        """The index file the records give; raises if the pack ended inside a header or record."""
        if not self._started or self._pending or self._payload_left:
            raise errors.CorruptChunk(f"pack {self.name} is truncated at byte {self._offset}")
        if not self.entries:
            raise errors.CorruptChunk(f"pack {self.name} holds no record")
        return copier.encode_index(bytes.fromhex(self.name), bytes(self.entries))

    def _header(self, head: bytes, offset: int) -> None:
        if not self._started:
            magic, version, pack_id, writer = PACK_HEADER.unpack(head)
            if magic != PACK_MAGIC or version != PACK_VERSION or pack_id.hex() != self.name:
                raise errors.CorruptChunk(f"pack {self.name} has a bad header")
            if writer != self._writer_id:
                raise errors.CorruptChunk(f"pack {self.name} names writer {writer.hex()}, not the session's "
                                          f"{self._writer_id.hex()}")
            self._started = True
            return
        cid, btype, comp, reserved, raw_len, stored_len = RECORD_HEADER.unpack(head)
        where = f"pack {self.name}, record at {offset}"
        if btype not in (copier.BLOB_DATA, copier.BLOB_TREE) or comp not in (0, 1) or reserved:
            raise errors.CorruptChunk(f"{where}: bad type, compression or reserved field", cid.hex())
        if raw_len > self._chunk_size:
            raise errors.RepositoryError(f"{where}: {raw_len} bytes, more than the chunk size "
                                         f"{self._chunk_size} of this repository: another chunk size?")
        if not raw_len or not stored_len or (not comp and stored_len != raw_len):
            raise errors.CorruptChunk(f"{where}: bad lengths", cid.hex())
        if cid in self._ids:
            raise errors.CorruptChunk(f"{where}: id {cid.hex()} twice in one pack", cid.hex())
        self._ids.add(cid)
        self.entries += INDEX_ENTRY.pack(cid, btype, comp, 0, offset, stored_len, raw_len)
        self._payload_left = stored_len


# --------------------------------------------------------------------------- errors on the wire

class _Refused(Exception):
    """A failure whose status code is not the one its class maps to (see ``status_for``)."""

    def __init__(self, code: grpc.StatusCode, error: errors.HyperbackError) -> None:
        super().__init__(str(error))
        self.code, self.error = code, error


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
        if isinstance(error, _Refused):
            self._abort(error.code, error.error)
        if isinstance(error, errors.HyperbackError):
            self._abort(status_for(error), error)
        if isinstance(error, MemoryError):
            self._abort(grpc.StatusCode.RESOURCE_EXHAUSTED, errors.HyperbackError(f"out of memory: {error}"))

    def _abort(self, code: grpc.StatusCode, error: errors.HyperbackError) -> NoReturn:
        log.warning("%s from %s: %s: %s", self._what, self._context.peer(), code.name, error)
        self._context.set_trailing_metadata(((ERROR_KEY, type(error).__name__),))
        self._context.abort(code, str(error))


# --------------------------------------------------------------------------- backup sessions

class _Session:
    """One client's backup: a writer lock and native handle on a repository, held across calls.

    ``use()`` serializes the calls that touch the native handle with the session's end, so an
    expiry never closes the handle under a running call.
    """

    def __init__(self, session_id: str, repo: Repository, name: str, policy: Policy, base_id: str) -> None:
        self.id, self.repo, self.name, self.policy = session_id, repo, name, policy
        self.writer_id = os.urandom(16)
        self.last_seen = time.monotonic()
        self.ended: str | None = None  # why, once ended
        self._busy = threading.Lock()
        self._stack = ExitStack()
        try:
            # The lock first, then the base: a base seen under the lock is one the sweep protects.
            self.native = self._stack.enter_context(
                repo.session("media-backup", writer=True, writer_id=self.writer_id))
            self.base = _explicit_base(repo, base_id) if base_id else repo.base_for(name, policy)
            # The base's pages are in the repository (it is committed): the commit check trusts them.
            self.base_pages = set(TreeReader(self.native, self.base.tree).pages()) if self.base else set()
        except BaseException:
            self._stack.close()
            raise

    def touch(self) -> None:
        """Note a sign of life; SessionExpired if the session ended."""
        if self.ended is not None:
            raise errors.SessionExpired(f"backup session {self.id} {self.ended}")
        self.last_seen = time.monotonic()

    @contextmanager
    def use(self) -> Iterator[NativeRepository]:
        """The native handle, which the session's end waits for."""
        with self._busy:
            self.touch()
            yield self.native

    def end(self, why: str) -> bool:
        """Release the lock and the handle; False if it had ended already."""
        with self._busy:
            if self.ended is not None:
                return False
            self.ended = why
            self._stack.close()
            return True


def _explicit_base(repo: Repository, base_id: str) -> Snapshot:
    """The snapshot ``base_id`` names exactly, of this repository's chunk size."""
    found = repo.resolve(base_id) if SNAPSHOT_ID.fullmatch(base_id) else None
    if found is None or found.id != base_id:
        raise errors.SnapshotNotFound(f"no snapshot {base_id!r} to take as the base")
    if found.chunk_size != repo.config.chunk_size:
        raise errors.RepositoryError(f"base snapshot {found.id} has another chunk size")
    return found


class _Sessions:
    """The live sessions, and a reaper that ends those silent for longer than the lease."""

    ENDED_KEPT = 3600.0  # seconds an ended session's id is remembered, to answer ABORTED and not NOT_FOUND

    def __init__(self, lease: float) -> None:
        self.lease = lease
        self._lock = threading.Lock()
        self._live: dict[str, _Session] = {}
        self._ended: dict[str, tuple[float, str]] = {}
        self._stop = threading.Event()
        self._reaper = threading.Thread(target=self._reap_loop, name="media-reaper", daemon=True)
        self._reaper.start()

    def open(self, repo: Repository, name: str, policy: Policy, base_id: str) -> _Session:
        session = _Session(os.urandom(16).hex(), repo, name, policy, base_id)
        with self._lock:
            self._live[session.id] = session
        return session

    def get(self, session_id: str) -> _Session:
        with self._lock:
            session = self._live.get(session_id)
            ended = self._ended.get(session_id)
        if session is not None:
            session.touch()  # may have ended since the lookup
            return session
        if ended is not None:
            raise errors.SessionExpired(f"backup session {session_id} {ended[1]}")
        raise _Refused(grpc.StatusCode.NOT_FOUND, errors.SessionExpired(
            f"no backup session {session_id}: it never existed, or the media service restarted since"))

    def end(self, session: _Session, why: str) -> None:
        with self._lock:
            self._live.pop(session.id, None)
            self._ended[session.id] = (time.monotonic(), why)
        if session.end(why):
            log.info("backup session %s of %s %s", session.id, session.name, why)

    def _reap_loop(self) -> None:
        while not self._stop.wait(min(self.lease / 4, 5.0)):
            self.reap()

    def reap(self) -> None:
        now = time.monotonic()
        with self._lock:
            idle = [s for s in self._live.values() if now - s.last_seen > self.lease]
            for sid in [sid for sid, (at, _) in self._ended.items() if now - at > self.ENDED_KEPT]:
                del self._ended[sid]
        for session in idle:
            self.end(session, f"expired: no call for more than {self.lease:g} s")

    def close(self) -> None:
        self._stop.set()
        self._reaper.join()
        with self._lock:
            live = list(self._live.values())
        for session in live:
            self.end(session, "ended: the media service stopped")


# --------------------------------------------------------------------------- uploads

@contextmanager
def _writing(what: str) -> Iterator[None]:
    """ENOSPC/EDQUOT become RepositoryFull, other OSErrors RepositoryIOError, naming ``what``."""
    try:
        yield
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise errors.RepositoryFull(f"the backup media are full writing {what}: free space or prune, "
                                        "then run again; earlier snapshots are intact") from e
        raise errors.RepositoryIOError(f"cannot write {what}: {e.strerror}") from e


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


class _Upload:
    """One pack arriving: written to ``tmp/NAME.pack`` while its structure is checked, then its
    records verified, then published by the native copier as a local writer's packs are (pack, then
    index)."""

    def __init__(self, session: _Session, start: pb.UploadStart) -> None:
        self.session, self.name = session, start.pack_name
        self.pack_size, self.index_size = start.pack_size, start.index_size
        repo = session.repo
        if not PACK_NAME.fullmatch(self.name):
            raise errors.UsageError(f"pack name {self.name!r} is not 32 lowercase hex characters")
        if not PACK_HEADER.size < self.pack_size <= MAX_PACK:
            raise errors.UsageError(f"pack size {self.pack_size} is outside {PACK_HEADER.size}..{MAX_PACK}")
        records = (self.pack_size - PACK_HEADER.size) // (RECORD_HEADER.size + 1)  # at most: of one byte each
        if not 0 < self.index_size - INDEX_HEADER.size - ID_LEN <= records * INDEX_ENTRY.size:
            raise errors.UsageError(f"an index of {self.index_size} bytes cannot list a pack of "
                                    f"{self.pack_size} bytes")
        if (repo.path / "index" / self.name).exists() or \
                (repo.path / "packs" / self.name[:2] / self.name).exists():
            raise errors.UsageError(f"pack {self.name} exists in the repository already")
        self.scanner = PackScanner(self.name, session.writer_id, repo.config.chunk_size)
        self.tmp = repo.path / "tmp" / f"{self.name}.pack"
        self._received = 0
        self._index = bytearray()
        with _writing(f"tmp/{self.name}.pack"):
            self._fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)

    def pack_data(self, data: bytes) -> None:
        if self._received + len(data) > self.pack_size:
            raise errors.CorruptChunk(f"pack {self.name} runs past its announced {self.pack_size} bytes")
        self.scanner.feed(data)
        with _writing(f"tmp/{self.name}.pack"):
            _write_all(self._fd, data)
        self._received += len(data)

    def index_data(self, data: bytes) -> None:
        if self._received != self.pack_size or len(self._index) + len(data) > self.index_size:
            raise errors.CorruptChunk(f"pack {self.name}: index data out of place or too long")
        self._index += data

    def finish(self) -> int:
        """Check, verify and publish the pack; return its number of records."""
        if self._received != self.pack_size:
            raise errors.CorruptChunk(f"pack {self.name} ended after {self._received} of its "
                                      f"{self.pack_size} bytes")
        index = self.scanner.finish()
        if bytes(self._index) != index:
            raise errors.CorruptChunk(f"the index sent for pack {self.name} does not list its records")
        with _writing(f"tmp/{self.name}.pack"):
            os.fsync(self._fd)
        os.close(self._fd)
        self._fd = -1
        self._verify(index)
        self._publish()
        return len(self.scanner.entries) // INDEX_ENTRY.size

    def _verify(self, index: bytes) -> None:
        """Decompress and hash every record with the native reader, through a scratch root that
        shows the pack in tmp/ as if published (the repository shows nothing before it passes)."""
        repo = self.session.repo
        with tempfile.TemporaryDirectory(prefix="hyperback-media-check-") as scratch:
            root = Path(scratch)
            try:
                (root / "index").mkdir()
                (root / "packs" / self.name[:2]).mkdir(parents=True)
                (root / "packs" / self.name[:2] / self.name).symlink_to(self.tmp)
                (root / "index" / self.name).write_bytes(index)
            except OSError as e:
                raise errors.EnvironmentProblem(f"cannot check pack {self.name} in {root}: "
                                                f"{e.strerror}") from e
            with NativeRepository(str(root), self.session.writer_id, repo.config.chunk_size, PACK_TARGET,
                                  repo.config.compression_level) as native:
                native.load_index(self.name)
                bad, total = native.verify(10_000, os.cpu_count() or 1, copier.Progress(), max_report=1)
        if total:
            raise errors.CorruptChunk(
                f"pack {self.name}: {total} record(s) fail their check (decompression or SHA-256 against "
                f"the id), e.g. {bad[0].hex()}: damaged in transit or by the client", bad[0].hex())

    def _publish(self) -> None:
        """Pack first, then index, each durable before the next step (repository-format section 6),
        by the native copier; then the session's index counts the pack's blobs."""
        with self.session.use() as native:  # a session ended meanwhile publishes nothing
            copier.publish_pack(self.session.repo.path, self.name, self.tmp, bytes(self.scanner.entries))
            native.load_index(self.name)

    def discard(self) -> None:
        """Remove what an unfinished upload wrote (a published pack stays: it is the session's; a
        publication that failed removed its own tmp/NAME.idx)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self.tmp.unlink(missing_ok=True)


# --------------------------------------------------------------------------- the service

class MediaServicer(pb_grpc.MediaServicer):
    """The Media service over a fixed set of repositories; domain errors become status codes in
    ``_answering`` and only there."""

    def __init__(self, repos: Mapping[str, Repository], host_name: str, lease: float = DEFAULT_LEASE) -> None:
        self.repos, self.host_name = dict(repos), host_name
        self.sessions = _Sessions(lease)

    def close(self) -> None:
        """End every session (their locks go); what they uploaded is garbage."""
        self.sessions.close()

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

    # ---------- backup sessions ----------

    def OpenBackup(self, request: pb.OpenBackupRequest,
                   context: grpc.ServicerContext) -> pb.OpenBackupResponse:
        with _Answering(context, "OpenBackup"):
            repo = self._repo(request.destination)
            if not NAME.fullmatch(request.name):
                raise errors.UsageError(f"snapshot name {request.name!r} is malformed (e.g. vm1/vda)")
            policy = policy_from_pb(request.policy, "OpenBackupRequest")
            session = self.sessions.open(repo, request.name, policy, request.base_id)
            log.info("backup session %s of %s (%s) to %s opened by %s", session.id, session.name,
                     session.policy.value, request.destination, context.peer())
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
            upload = _Upload(session, first.start)
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
                raise _Refused(grpc.StatusCode.INVALID_ARGUMENT, e) from e
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


def _base_pages(session: _Session, base: Snapshot,
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


def _check_document(session: _Session, snap: Snapshot) -> None:
    """The document is one this session may commit: its name, base, chunk size and shape."""
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
    if snap.parent != expected_parent or not detection_ok or not policy_ok:
        raise errors.UsageError(f"the snapshot's parent, policy or change detection do not match the "
                                f"session's base ({expected_parent})")
    entries = -(-snap.size // snap.chunk_size)
    if snap.tree.entries != entries or (snap.tree.root is None) != (entries == 0):
        raise errors.UsageError(f"the snapshot's tree does not fit its size {snap.size}")


def _check_references(native: NativeRepository, session: _Session, snap: Snapshot) -> None:
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
        raise _Refused(grpc.StatusCode.FAILED_PRECONDITION, errors.MissingChunk(
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
          lease: float = DEFAULT_LEASE) -> None:
    """Serve until SIGTERM or SIGINT, then stop gracefully.

    With ``service_ip``, the address is claimed before the server binds (it may be the address it
    listens on) and released after it stopped, whatever happened in between.
    """
    repos = open_destinations(destinations)  # a bad --repo fails before the network is touched
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        if service_ip is not None:
            service_ip.claim()
        try:
            server = _start(repos, address, host_name, lease)
            try:
                stop.wait()
                log.info("stopping: %.0f s for calls in flight", GRACE)
            finally:
                server.stop()
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
        serve(dict(args.repo), args.listen, args.host_name, service_ip, args.session_timeout)
        return 0
    except errors.HyperbackError as e:
        print(f"hyperback-media: error: {e}", file=sys.stderr)
        return e.exit_code


__all__ = ["DEFAULT_LEASE", "DEFAULT_PORT", "MediaServer", "MediaServicer", "PackScanner", "main",
           "open_destinations", "serve", "start"]

if __name__ == "__main__":
    sys.exit(main())
