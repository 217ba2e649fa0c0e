"""A repository on another host, reached through its media service (``host_agent.media.server``)::

    repo = RemoteRepository("10.77.0.100:7420", "main")
    result = repo.backup("/dev/vg/vm1", "vm1/vda", Policy.INCREMENTAL, changes)
    repo.restore("vm1/vda@latest", "/var/tmp/vm1.img")
    repo.bytes_sent, repo.bytes_received   # what crossed the network

It offers the part of :class:`~host_agent.storage.repository.Repository`'s API the host agent's executor
uses, with the same signatures and result types, and raises the same exceptions a local repository
would (the server names their class), plus ``RemoteError`` when the service cannot be reached.

A backup deduplicates at the source, so that only data the destination lacks crosses the LAN. It runs the
ordinary local backup (``Repository.backup``, the native copier) into a *spool*: a temporary local
repository with the destination's parameters, seeded with what the copier compares against, namely the base
snapshot's tree pages (in a pack that is never uploaded) and the base's chunk ids (as index entries of a
pack that does not exist: a backup looks chunks up and never reads them back). The packs the copier writes
carry the server session's writer id. As soon as one is published, an uploader thread asks the server which
of its blobs it lacks (this also catches data the destination holds under other names) and uploads a pack of
just those, then deletes it locally. The copier waits while more than ``SPOOL_BACKLOG`` bytes of packs wait
for upload, so the spool stays small whatever the image's size. Last, the snapshot document is committed:
the server checks that everything it names is there, and writes it. The spool is removed in every case.
"""
from __future__ import annotations

import logging
import os
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from types import TracebackType
from typing import Final, TypeVar

import grpc

from host_agent import errors
from host_agent._proto.hyperback.v1 import media_pb2 as pb
from host_agent._proto.hyperback.v1 import media_pb2_grpc as pb_grpc
from host_agent.media import unsealing
from host_agent.media.codec import (
    CHANNEL_OPTIONS,
    CLIENT_OPTIONS,
    MAX_IDS,
    PIECE,
    config_from_pb,
    parse_snapshot,
    pieces,
    remote_error,
    snapshot_document,
)
from host_agent.media.deletions import DeletionCalls
from host_agent.media.restores import ChunkSink
from host_agent.media.unsealing import ScratchRepository
from host_agent.media.verifications import VerificationCalls
from host_agent.model import FallbackNote, Policy
from host_agent.protobuf import policy_to_pb
from host_agent.storage import copier
from host_agent.storage.cancel import CancelToken
from host_agent.storage.copier import BLOB_DATA, BLOB_TREE, ID_LEN, ZERO_ID, NativeRepository
from host_agent.storage.extents import Extent, Layout, OpenSource, open_source, validate_changes
from host_agent.storage.files import RestoreTarget
from host_agent.storage.keys import RepoKeys, Secret
from host_agent.storage.maptree import FANOUT, BaseLeaves, TreeBuilder, leaves_for
from host_agent.storage.packfile import INDEX_ENTRY, PACK_HEADER, IndexEntry, read_index
from host_agent.storage.repository import (
    PACK_TARGET,
    ProgressFn,
    RepoConfig,
    Repository,
)
from host_agent.storage.snapshot import BackupResult, RestoreResult, Snapshot, VmRef
from host_agent.tls.transport import NO_TLS, TlsConfig, channel

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT: Final = 60.0  # seconds for each call that is not a stream
SPOOL_BACKLOG: Final = 4 * PACK_TARGET  # bytes of packs waiting for upload before the copier waits
RUN_BYTES: Final = PACK_TARGET  # image bytes per native copy call, so the wait above comes often
SEED_INDEX_ENTRIES: Final = 1 << 16  # base chunk ids per seed index file
UPLOADS_IN_FLIGHT: Final = 2  # so that the server checks one pack while the next one travels
POLL: Final = 0.05

_Req = TypeVar("_Req")
_Resp = TypeVar("_Resp")
_T = TypeVar("_T")


class RemoteRepository(VerificationCalls, DeletionCalls):
    """A destination of a media service, with the API of a local repository the executor uses.

    ``bytes_sent`` and ``bytes_received`` count the payload this object moved (packs, index files,
    blob ids, tree pages, snapshot documents, restored chunks), not gRPC's framing. ``spool_dir``
    is where backups keep their temporary spool (default: the system's temporary directory); it
    holds at most a few hundred MiB (``SPOOL_BACKLOG`` and one pack per copier thread). ``tls``:
    this end's certificate, for a service that requires one (docs/tls.md); a TLS failure raises
    TlsError at once. ``secret``: what unlocks an encrypted destination here (default: the
    environment's, repository-format 11.4); the service never sees it.
    """

    def __init__(self, address: str, destination: str, *, timeout: float = DEFAULT_TIMEOUT,
                 spool_dir: str | os.PathLike[str] | None = None, tls: TlsConfig = NO_TLS,
                 secret: Secret | None = None) -> None:
        self.address, self.destination, self.timeout, self.tls = address, destination, timeout, tls
        self._secret = secret
        self._keys: RepoKeys | None = None
        self.bytes_sent = 0
        self.bytes_received = 0
        self._spool_dir = spool_dir
        self._count_lock = threading.Lock()
        self._channel = channel(address, tls, CLIENT_OPTIONS)
        self.stub = pb_grpc.MediaStub(self._channel)
        try:
            described = self._describe()
            served = {d.name: d.config for d in described.destinations}
            if destination not in served:
                raise errors.UnknownDestination(
                    f"the media service at {address} ({described.host_name}) serves no destination "
                    f"{destination!r} (it serves: {', '.join(sorted(served)) or 'none'})")
        except BaseException:
            self._channel.close()
            raise
        self.host_name = described.host_name
        self.config: RepoConfig = config_from_pb(served[destination])

    def _describe(self) -> pb.DescribeResponse:
        """The service's answer to the first call. With TLS it goes over a channel without gRPC's
        retries, which would hide a refused certificate behind seconds of UNAVAILABLE."""
        if not self.tls.enabled:
            return self.unary(self.stub.Describe, pb.DescribeRequest())
        with channel(self.address, self.tls, CHANNEL_OPTIONS) as first:
            return self.unary(pb_grpc.MediaStub(first).Describe, pb.DescribeRequest())

    def close(self) -> None:
        self._channel.close()

    def keys(self) -> RepoKeys | None:
        """An encrypted destination's keys (None if not), unlocked here on first use."""
        if self.config.encryption is not None and self._keys is None:
            self._keys = unsealing.unlock(self, self._secret)
        return self._keys

    def __enter__(self) -> RemoteRepository:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __str__(self) -> str:
        return f"{self.destination} at {self.address}"

    def export_params(self) -> dict[str, str]:
        """How an export's plugin process reaches this destination (``host_agent.storage.export``)."""
        tls = {k: str(v) for k, v in (("tls_ca", self.tls.ca), ("tls_cert", self.tls.cert),
                                       ("tls_key", self.tls.key)) if v is not None}
        return {"opener": "host_agent.media.exports:open_remote", "address": self.address,
                "destination": self.destination, "timeout": str(self.timeout), **tls}

    # ---------- calls ----------

    def count(self, sent: int = 0, received: int = 0) -> None:
        """Add to ``bytes_sent`` and ``bytes_received`` (from any thread)."""
        with self._count_lock:
            self.bytes_sent += sent
            self.bytes_received += received

    def unary(self, method: grpc.UnaryUnaryMultiCallable[_Req, _Resp], request: _Req) -> _Resp:
        """Call, raising the exception a failure stands for (``remote_error``)."""
        try:
            return method(request, timeout=self.timeout)
        except grpc.RpcError as e:
            raise remote_error(e, self.address, self.tls) from None

    def stream(self, responses: Iterator[_T]) -> Iterator[_T]:
        """A response stream, raising the exception a failure stands for."""
        try:
            yield from responses
        except grpc.RpcError as e:
            raise remote_error(e, self.address, self.tls) from None

    # ---------- snapshots ----------

    def snapshots(self, name: str | None = None) -> list[Snapshot]:
        """Every snapshot (of one source name if given), oldest first."""
        out: list[Snapshot] = []
        request = pb.ListMediaSnapshotsRequest(destination=self.destination, name=name or "")
        for page in self.stream(self.stub.ListSnapshots(request, timeout=self.timeout)):
            self.count(received=sum(len(d) for d in page.documents))
            out.extend(parse_snapshot(d) for d in page.documents)
        return out

    def resolve(self, spec: str) -> Snapshot:
        """A snapshot by id, unique id prefix (4+ characters) or ``NAME@latest``."""
        found = self.unary(self.stub.ResolveSnapshot,
                           pb.ResolveSnapshotRequest(destination=self.destination, spec=spec))
        self.count(received=len(found.document))
        return parse_snapshot(found.document)

    def base_for(self, name: str, policy: Policy) -> Snapshot | None:
        """The snapshot a backup of ``name`` with ``policy`` starts from, as the server chooses it."""
        found = self.unary(self.stub.BaseFor, pb.BaseForRequest(
            destination=self.destination, name=name, policy=policy_to_pb(Policy(policy))))
        self.count(received=len(found.document))
        return parse_snapshot(found.document) if found.document else None

    # ---------- backup ----------

    def backup(self, source: str | os.PathLike[str] | Layout, name: str, policy: Policy = Policy.FULL,
               changes: Sequence[Extent] | None = None, progress: ProgressFn | None = None,
               threads: int | None = None, base: Snapshot | None = None,
               checkpoint: str | None = None, cancel: CancelToken | None = None,
               vm: VmRef | None = None, fallback: FallbackNote | None = None) -> BackupResult:
        """Back up as :meth:`Repository.backup` does, sending the destination only what it lacks.

        The snapshot's ``bytes_new`` and ``bytes_stored`` count what the destination stored (the
        raw bytes of the data chunks uploaded; the records uploaded, headers included), and its
        ``seconds`` the whole backup, uploads and commit included.
        """
        started = time.monotonic()
        policy = Policy(policy)
        size = _source_size(source)  # an unreadable source fails before the session opens
        repo_keys = self.keys()  # and a missing or wrong passphrase too
        with _BackupSession(self, name, policy, base) as session, \
                tempfile.TemporaryDirectory(prefix="hyperback-spool-", dir=self._spool_dir) as tmp:
            spool = _Spool.create(Path(tmp) / "spool", self.config, session.writer_id, repo_keys)
            if session.base is not None:
                wanted = _wanted_leaves(session.base, size, changes, self.config.chunk_size)
                # an encrypted base's pages are sealed: every one is fetched and opened here
                spool.seed(unsealing.tree_pages(self, session.base, spool) if repo_keys
                           else session.base_pages(wanted))
            with _Uploader(session, spool) as uploader:
                spool.throttle = uploader.wait_for_room
                local = spool.backup(source, name, policy, changes, progress, threads, base=session.base,
                                     checkpoint=checkpoint, cancel=cancel, vm=vm,
                                     fallback=fallback)
                uploader.finish()
            stats = replace(local.snapshot.stats, bytes_new=uploader.bytes_new,
                            bytes_stored=uploader.bytes_stored, seconds=round(time.monotonic() - started, 3))
            snap = replace(local.snapshot, stats=stats)
            session.commit(snap)
        log.info("backup %s of %s to %s done: %s", snap.id, name, self, stats)
        return BackupResult(snap, local.notes)

    # ---------- restore ----------

    def restore(self, spec: str, target: str | os.PathLike[str], overwrite: bool = False,
                progress: ProgressFn | None = None, sync: bool = True) -> RestoreResult:
        """Restore a snapshot as :meth:`Repository.restore` does; the server verifies every chunk before
        it sends it, this side again before it writes it. ``bytes_read`` counts the chunk bytes received."""
        started = time.monotonic()
        snap = self.resolve(spec)
        repo_keys = self.keys()
        if repo_keys is not None:
            return unsealing.restore(self, snap, repo_keys, target, overwrite, progress, sync,
                                     self._spool_dir)
        path = Path(target)
        with RestoreTarget(path, snap.size, overwrite) as out:  # a bad target fails before data flows
            call = self.stub.Restore(pb.RestoreRequest(destination=self.destination, spec=snap.id))
            try:
                messages = self.stream(call)
                first = next(messages, None)
                if first is None or first.WhichOneof("part") != "document" or \
                        parse_snapshot(first.document) != snap:
                    raise errors.RemoteError(f"the media service at {self.address} began the restore of "
                                             f"{snap.id} without its document")
                self.count(received=len(first.document))
                sink = ChunkSink(out.fd, snap, out.is_block_device, progress)
                for msg in messages:
                    self.count(received=len(msg.chunk_ids) + len(msg.data))
                    sink.feed(msg)
                sink.finish()
            finally:
                call.cancel()  # nothing if the stream ended; else the server stops sending
            out.commit(sync)
        return RestoreResult(snap, str(path), snap.size, sink.bytes_received,
                             round(time.monotonic() - started, 3))


def _source_size(source: str | os.PathLike[str] | Layout) -> int:
    src = open_source(source if isinstance(source, Layout) else Path(source))
    try:
        return src.size
    finally:
        src.close()


def _wanted_leaves(base: Snapshot, size: int, changes: Sequence[Extent] | None,
                   chunk_size: int) -> list[tuple[int, int]] | None:
    """The base leaves (ranges of leaf indexes) a backup reads; None for every one.

    Without a change list a backup compares every chunk with the base's. With one, it takes every
    leaf that no change touches whole, by its id from the interior pages, except past the part of
    the image whose size stayed the same, so it reads only those leaves.
    """
    if changes is None:
        return None
    leaves = leaves_for(base.tree.entries)
    entries = -(-size // chunk_size)
    keepable = entries if base.size == size else min(base.size, size) // chunk_size
    spans = sorted([(keepable // FANOUT, leaves)] + [
        (off // chunk_size // FANOUT, (off + length - 1) // chunk_size // FANOUT + 1)
        for off, length in validate_changes(changes, size)])
    merged: list[tuple[int, int]] = []
    for lo, hi in spans:
        hi = min(hi, leaves)
        if lo >= hi:
            continue
        if merged and lo <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(hi, merged[-1][1]))
        else:
            merged.append((lo, hi))
    return merged


class _BackupSession:
    """An open backup session, kept alive by a heartbeat until it is committed or aborted."""

    def __init__(self, remote: RemoteRepository, name: str, policy: Policy, base: Snapshot | None,
                 copy: bool = False) -> None:
        self.remote = remote
        opened = remote.unary(remote.stub.OpenBackup, pb.OpenBackupRequest(
            destination=remote.destination, name=name, policy=policy_to_pb(policy),
            base_id=base.id if base else "", copy=copy, sealed=remote.config.encryption is not None))
        remote.count(received=len(opened.base))
        self.id = opened.session_id
        self.writer_id = bytes.fromhex(opened.writer_id)
        self.base = parse_snapshot(opened.base) if opened.base else None
        self._lease = opened.lease_seconds
        self._committed = False
        self._stop = threading.Event()
        self._heart = threading.Thread(target=self._beat, name="media-heartbeat", daemon=True)

    def __enter__(self) -> _BackupSession:
        self._heart.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop.set()
        self._heart.join()
        if not self._committed:
            try:
                self.remote.unary(self.remote.stub.Abort, pb.SessionRequest(session_id=self.id))
            except errors.HyperbackError as e:  # it expires by itself; the first error matters more
                log.warning("could not abort backup session %s: %s", self.id, e)

    def _beat(self) -> None:
        while not self._stop.wait(self._lease / 3):
            try:
                self.remote.unary(self.remote.stub.Heartbeat, pb.SessionRequest(session_id=self.id))
            except errors.SessionExpired as e:  # the next call of the backup says so too
                log.warning("backup session %s: %s", self.id, e)
                return
            except errors.HyperbackError as e:  # perhaps a passing network problem: beat again
                log.warning("backup session %s: heartbeat failed: %s", self.id, e)

    def base_pages(self, leaves: list[tuple[int, int]] | None) -> Iterator[pb.TreePage]:
        """The base's interior pages and the leaves asked for (None: every one)."""
        request = pb.BaseTreeRequest(session_id=self.id, every_leaf=leaves is None, leaves=[
            pb.LeafRange(first=lo, count=hi - lo) for lo, hi in leaves or ()])
        for batch in self.remote.stream(self.remote.stub.BaseTree(request)):
            self.remote.count(received=sum(len(p.data) for p in batch.pages))
            yield from batch.pages

    def missing(self, ids: Sequence[bytes]) -> set[bytes]:
        """Those of ``ids`` the destination lacks (or holds only in packs about to be deleted)."""
        out: set[bytes] = set()
        for at in range(0, len(ids), MAX_IDS):
            request = pb.FilterMissingRequest(session_id=self.id, ids=b"".join(ids[at:at + MAX_IDS]))
            answer = self.remote.unary(self.remote.stub.FilterMissing, request)
            self.remote.count(sent=len(request.ids), received=len(answer.missing))
            out.update(answer.missing[i:i + ID_LEN] for i in range(0, len(answer.missing), ID_LEN))
        return out

    def upload(self, requests: Iterator[pb.UploadPackRequest]) -> grpc.Future[pb.UploadPackResponse]:
        """Start streaming one pack and its index."""
        return self.remote.stub.UploadPack.future(requests)

    def commit(self, snap: Snapshot) -> None:
        document = snapshot_document(snap)
        self.remote.unary(self.remote.stub.Commit, pb.CommitRequest(session_id=self.id, document=document))
        self.remote.count(sent=len(document))
        self._committed = True


class _Spool(ScratchRepository):
    """The local scratch repository a remote backup runs in (see the module's docstring).

    Its writer id is the server session's, and its backups copy in pieces of ``RUN_BYTES``, calling
    ``throttle`` before each, so that they wait for the uploads.
    """

    def __init__(self, path: Path, config: RepoConfig, writer_id: bytes, repo_keys: RepoKeys | None) -> None:
        super().__init__(path, config, repo_keys)
        self._writer_id = writer_id
        self.throttle: Callable[[], None] = lambda: None

    @classmethod
    def create(cls, path: Path, config: RepoConfig, writer_id: bytes,
               repo_keys: RepoKeys | None = None) -> _Spool:
        """A new spool with the destination's parameters (``config``: chunk size, compression, id,
        encryption, with the destination's keys)."""
        Repository.init(path, config.chunk_size, config.compression_level)
        return cls(path, config, writer_id, repo_keys)

    def check_vm(self, vm: VmRef | None) -> None:
        """The definition's snapshots are at the destination, not in the spool: the service checks
        them when it commits (media-protocol.md, 2.2)."""

    @contextmanager
    def session(self, kind: str, writer: bool, writer_id: bytes | None = None) -> Iterator[NativeRepository]:
        """Every session of the spool writes as the server's session: its packs go there as they are."""
        with super().session(kind, writer, self._writer_id) as native:
            yield native

    def seed(self, pages: Iterable[pb.TreePage]) -> None:
        """Store the base's tree pages in a pack of their own, and the chunk ids of its leaves as
        index entries of a pack that does not exist (a backup only looks them up)."""
        ids = _SeedIndex(self.path, self.config.chunk_size)
        with self.session("seed", writer=True) as native:
            for page in pages:
                native.store_blob(page.data, BLOB_TREE)
                if page.level == 0:
                    ids.add(page.data)
            native.flush()
        ids.close()

    def _copy_run(self, native: NativeRepository, src: OpenSource, first: int, plan: bytearray, lo: int,
                  hi: int, base_leaves: BaseLeaves, builder: TreeBuilder, threads: int,
                  progress: copier.Progress) -> None:
        """Copy as a local backup does, in pieces of ``RUN_BYTES``, each once uploads caught up."""
        step = max(FANOUT, RUN_BYTES // self.config.chunk_size // FANOUT * FANOUT)
        for at in range(lo, hi, step):
            self.throttle()
            super()._copy_run(native, src, first, plan, at, min(at + step, hi), base_leaves, builder, threads,
                              progress)


class _SeedIndex:
    """Index files of the base's chunk ids, for a pack that does not exist (see ``_Spool.seed``)."""

    def __init__(self, root: Path, chunk_size: int) -> None:
        self._root = root
        # Where a record would be, and its lengths: never used, as nothing reads these chunks.
        self._tail = INDEX_ENTRY.pack(ZERO_ID, BLOB_DATA, 0, 0, PACK_HEADER.size, chunk_size,
                                      chunk_size)[ID_LEN:]
        self._entries = bytearray()

    def add(self, leaf: bytes) -> None:
        ids = (leaf[at:at + ID_LEN] for at in range(0, len(leaf), ID_LEN))
        self._entries += b"".join(cid + self._tail for cid in ids if cid != ZERO_ID)
        if len(self._entries) >= SEED_INDEX_ENTRIES * INDEX_ENTRY.size:
            self._write()

    def close(self) -> None:
        if self._entries:
            self._write()

    def _write(self) -> None:
        copier.publish_index(self._root, os.urandom(copier.PACK_ID_LEN).hex(), bytes(self._entries))
        self._entries.clear()


@dataclass(frozen=True)
class _InFlight:
    """A spool pack being uploaded (``call`` None: the destination has every blob of it)."""

    name: str
    chosen: list[IndexEntry]
    call: grpc.Future[pb.UploadPackResponse] | None

    def done(self) -> bool:
        return self.call is None or self.call.done()

    def cancel(self) -> None:
        if self.call is not None:
            self.call.cancel()


class _Uploader:
    """Uploads the spool's packs as the copier publishes them, each cut down to the blobs the
    destination lacks, and deletes them locally. A failure stops the copier at its next wait."""

    def __init__(self, session: _BackupSession, spool: _Spool) -> None:
        self._session, self._spool = session, spool
        self._done = set(spool.pack_names())  # uploaded, or the seed (which the destination has)
        self._started = set(self._done)
        self._finishing = threading.Event()
        self._abandon = threading.Event()
        self._failed: BaseException | None = None
        self.bytes_new = 0
        self.bytes_stored = 0
        self._thread = threading.Thread(target=self._run, name="media-upload", daemon=True)

    def __enter__(self) -> _Uploader:
        self._thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 tb: TracebackType | None) -> None:
        if kind is not None:
            self._abandon.set()
        self._finishing.set()
        self._thread.join()

    def finish(self) -> None:
        """Upload what is left; raise what went wrong."""
        self._finishing.set()
        self._thread.join()
        if self._failed is not None:
            raise self._failed

    def wait_for_room(self) -> None:
        """Return once the packs waiting for upload are few enough; raise if uploading failed."""
        while True:
            if self._failed is not None:
                raise self._failed
            if self._backlog() <= SPOOL_BACKLOG:
                return
            time.sleep(POLL)

    def _pending(self) -> list[str]:
        return [n for n in self._spool.pack_names() if n not in self._done]

    def _pack(self, name: str) -> Path:
        return self._spool.path / "packs" / name[:2] / name

    def _backlog(self) -> int:
        total = 0
        for name in self._pending():
            try:
                total += self._pack(name).stat().st_size
            except FileNotFoundError:  # uploaded and deleted since the listing
                continue
        return total

    def _run(self) -> None:
        in_flight: deque[_InFlight] = deque()
        try:
            while not self._abandon.is_set():
                # read before the listing: a pack published before finish() is in this round's listing
                last_round = self._finishing.is_set()
                for name in self._pending():
                    if name in self._started:
                        continue
                    while len(in_flight) >= UPLOADS_IN_FLIGHT:
                        self._settle(in_flight.popleft())
                    in_flight.append(self._start(name))
                while in_flight and in_flight[0].done():
                    self._settle(in_flight.popleft())
                if last_round:
                    while in_flight:
                        self._settle(in_flight.popleft())
                    return
                self._finishing.wait(POLL)
        except BaseException as e:  # handed to the copier's thread by wait_for_room and finish
            self._failed = e
        finally:
            for upload in in_flight:
                upload.cancel()

    def _start(self, name: str) -> _InFlight:
        """Start uploading the blobs of a spool pack the destination lacks (if any)."""
        self._started.add(name)
        entries = read_index(self._spool.path / "index" / name)
        missing = self._session.missing([e.id for e in entries])
        chosen = sorted((e for e in entries if e.id in missing), key=lambda e: e.offset)
        log.debug("pack %s: uploading %d of %d records", name, len(chosen), len(entries))
        call = self._session.upload(self._requests(name, chosen)) if chosen else None
        return _InFlight(name, chosen, call)

    def _settle(self, upload: _InFlight) -> None:
        """Wait for an upload to end; then the spool's copy of the pack goes."""
        if upload.call is not None:
            try:
                upload.call.result()
            except grpc.RpcError as e:
                raise remote_error(e, self._session.remote.address, self._session.remote.tls) from None
            self.bytes_new += sum(e.raw_len for e in upload.chosen if e.type == BLOB_DATA)
            self.bytes_stored += sum(e.record_len for e in upload.chosen)
        self._pack(upload.name).unlink()
        self._done.add(upload.name)

    def _requests(self, name: str, chosen: list[IndexEntry]) -> Iterator[pb.UploadPackRequest]:
        """The pack of the chosen records (same name and header) and its index, in pieces."""
        entries = bytearray()
        size = PACK_HEADER.size
        for e in chosen:
            entries += INDEX_ENTRY.pack(e.id, e.type, int(e.compressed), 0, size, e.stored_len, e.raw_len)
            size += e.record_len
        index = copier.encode_index(bytes.fromhex(name), bytes(entries))
        yield pb.UploadPackRequest(start=pb.UploadStart(session_id=self._session.id, pack_name=name,
                                                        pack_size=size, index_size=len(index)))
        with open(self._pack(name), "rb") as f:
            out = bytearray(f.read(PACK_HEADER.size))
            for e in chosen:
                f.seek(e.offset)
                out += f.read(e.record_len)
                while len(out) >= PIECE:
                    if self._abandon.is_set():
                        return  # the server sees a short pack and publishes nothing
                    yield self._piece(pb.UploadPackRequest(pack_data=bytes(out[:PIECE])))
                    del out[:PIECE]
        if out:
            yield self._piece(pb.UploadPackRequest(pack_data=bytes(out)))
        for piece in pieces(index):
            yield self._piece(pb.UploadPackRequest(index_data=piece))

    def _piece(self, msg: pb.UploadPackRequest) -> pb.UploadPackRequest:
        self._session.remote.count(sent=len(msg.pack_data) + len(msg.index_data))
        return msg


__all__ = ["DEFAULT_TIMEOUT", "SPOOL_BACKLOG", "RemoteRepository", "remote_error"]
