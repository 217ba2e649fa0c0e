"""The media service's servicer: the ``hyperback.v1.Media`` calls over a fixed set of repositories,
domain errors turned into status codes in one place (``_Answering``). ``host_agent.media.server``
serves it; ``host_agent.media.access`` narrows it to what a caller's role may do.
"""
from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from types import TracebackType
from typing import Final, NoReturn

import grpc

from host_agent import errors
from host_agent._proto.hyperback.v1 import media_pb2 as pb
from host_agent._proto.hyperback.v1 import media_pb2_grpc as pb_grpc
from host_agent.media.codec import (
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
from host_agent.media.sealed import RecordLocations, key_document, read_records, refuse_encrypted
from host_agent.media.sessions import Session, Sessions
from host_agent.media.uploads import Upload, publishing_new
from host_agent.model import ChangeDetection, Policy
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

    def refuse(self, error: errors.HyperbackError) -> NoReturn:
        """Answer with ``error`` now."""
        self._abort(status_for(error), error)

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
        self.locations = {name: RecordLocations(repo) for name, repo in self.repos.items()}

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
            _check_sealing(repo, request.destination, request.sealed)
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
            refuse_encrypted(session.repo, session.name, "send a base snapshot's tree pages")
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
            document = session.repo.path / "snapshots" / snap.id
            with session.use() as native:
                (_check_root if session.repo.config.encryption else _check_references)(native, session, snap)
                # The commit (repository-format section 6, step 4), under the session's lock.
                with publishing_new(f"snapshot {snap.id}", document):
                    write_atomic(document, json.dumps(snap.to_json(), indent=1).encode(),
                                 session.repo.path / "tmp")
            self.sessions.end(session, f"committed snapshot {snap.id}")
            return pb.CommitResponse(snapshot_id=snap.id)

    def Abort(self, request: pb.SessionRequest, context: grpc.ServicerContext) -> pb.AbortResponse:
        with _Answering(context, "Abort"):
            self.sessions.end(self.sessions.get(request.session_id), "aborted by the client")
            return pb.AbortResponse()

    # ---------- deletion: an operator's only, so never without TLS (host_agent.media.access) ----------

    def Forget(self, request: pb.ForgetRequest, context: grpc.ServicerContext) -> pb.ForgetResponse:
        _Answering(context, "Forget").refuse(self._no_roles("Forget"))

    def Prune(self, request: pb.PruneRequest, context: grpc.ServicerContext) -> pb.PruneResponse:
        _Answering(context, "Prune").refuse(self._no_roles("Prune"))

    def _no_roles(self, method: str) -> errors.AccessDenied:
        return errors.AccessDenied(
            f"{method} needs an operator's certificate, and the media service on {self.host_name} runs "
            f"without TLS: run 'hyperback {method.lower()} --repo ...' on that host, or serve with --tls-ca "
            "(docs/tls.md, \"Roles\")")

    # ---------- restore ----------

    def Restore(self, request: pb.RestoreRequest, context: grpc.ServicerContext) -> Iterator[pb.RestoreData]:
        with _Answering(context, "Restore"):
            repo = self._repo(request.destination)
            refuse_encrypted(repo, request.destination, "restore")
            snap = repo.resolve(request.spec)
            yield pb.RestoreData(document=snapshot_document(snap))
            with repo.session("media-restore", writer=False) as native:
                yield from _restore_stream(native, snap)


    def ReadChunks(self, request: pb.ReadChunksRequest,
                   context: grpc.ServicerContext) -> Iterator[pb.RestoreData]:
        with _Answering(context, "ReadChunks"):
            repo = self._repo(request.destination)
            refuse_encrypted(repo, request.destination, "read chunks in place for an export")
            with self.readers.reader(request.destination, repo, request.snapshot_id) as reader:
                yield from read_chunks(reader, request)

    # ---------- encrypted destinations: the client opens what it reads (docs/media-protocol.md, 6) ----------

    def KeyDocument(self, request: pb.KeyDocumentRequest,
                    context: grpc.ServicerContext) -> pb.KeyDocumentResponse:
        with _Answering(context, "KeyDocument"):
            return key_document(self._repo(request.destination), request.destination)

    def ReadRecords(self, request: pb.ReadRecordsRequest,
                    context: grpc.ServicerContext) -> Iterator[pb.RecordData]:
        with _Answering(context, "ReadRecords"):
            repo = self._repo(request.destination)
            if not repo.config.encryption:
                raise errors.RepositoryError(f"destination {request.destination} is not encrypted: "
                                             "restore it with Restore")
            repo.resolve(request.snapshot_id)  # NOT_FOUND for a snapshot that is not there
            yield from read_records(repo, self.locations[request.destination], request.ids)


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


def _check_sealing(repo: Repository, destination: str, sealed: bool) -> None:
    """A client seals its records exactly when the destination is encrypted."""
    if sealed != bool(repo.config.encryption):
        raise errors.RepositoryError(
            f"destination {destination} is {'' if repo.config.encryption else 'not '}encrypted and this "
            f"client {'seals' if sealed else 'does not seal'} its records: "
            + ("upgrade the client, which must encrypt at the source" if repo.config.encryption
               else "back up to an encrypted destination"))


def _check_root(native: NativeRepository, session: Session, snap: Snapshot) -> None:
    """An encrypted destination's commit: the tree's root is in the repository. The pages below it
    are sealed, so the rest of the walk is a key holder's (verify, restore)."""
    root = snap.tree.root
    if root is not None and root not in session.base_pages and root not in native:
        raise refused(grpc.StatusCode.FAILED_PRECONDITION, errors.MissingChunk(
            f"snapshot {snap.id} names tree page {root.hex()}, which the repository lacks: upload it, "
            "then commit again", root.hex()))


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


__all__ = ["DEFAULT_LEASE", "DEFAULT_PORT", "DESTINATION_NAME", "GRACE", "MediaServicer"]
