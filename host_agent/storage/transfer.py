"""Copying snapshots from one repository into another (``hyperback copy``; docs/repository-format.md,
section 6.2).

Each snapshot goes over with every blob its tree reaches that the target lacks, and nothing else:
the copier walks the tree in the source, asks the target which of the ids it lacks, reads those
(the native reader checks each one against its id: damage is never copied), and stores them in the
target through its native writer, which hashes them again. Then the snapshot's document, unchanged
(same id), is committed. The target's write order is the format's: packs, then their indexes, then
the document; so a copy killed at any moment leaves the target valid, and a rerun sends only what is
still missing (the packs published before the kill are indexed) and skips snapshots already there.

A target is anything with the small interface of :class:`CopyTarget`: a local repository
(:class:`LocalTarget`, here) or a media service (``host_agent.media.copies``), so this module knows
nothing of the network.
"""
from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from typing import Protocol

from host_agent import errors
from host_agent.storage.copier import BLOB_DATA, BLOB_TREE, ID_LEN, ZERO_ID, NativeRepository
from host_agent.storage.maptree import TreeReader
from host_agent.storage.repository import ProgressFn, RepoConfig, Repository
from host_agent.storage.snapshot import Snapshot

log = logging.getLogger(__name__)

LOOKUP_BATCH = 1024  # chunk ids the target is asked about at once (16 leaves)
READ_BATCH = 256  # chunks read from the source per native call (8 MiB of 32 KiB chunks), two in memory


class SnapshotWriter(Protocol):
    """Where one snapshot's blobs go, then its document."""

    def missing(self, ids: Sequence[bytes]) -> set[bytes]:
        """Those of ``ids`` the target lacks (or holds only in packs garbage collection will delete)."""

    def store(self, data: bytes, blob_type: int) -> bytes:
        """Store one blob; return its id (the SHA-256 of ``data``)."""

    def commit(self, snap: Snapshot, document: bytes) -> None:
        """Make every blob stored durable and indexed, then commit the document (the source's
        ``document`` of ``snap``, as it is): the snapshot exists."""


class CopyTarget(Protocol):
    """A repository snapshots are copied into."""

    config: RepoConfig

    def snapshots(self, name: str | None = None) -> list[Snapshot]: ...

    def holds(self, repo: Repository) -> bool:
        """Whether this target is ``repo`` itself (a copy into it would skip everything)."""

    def writer(self, snap: Snapshot) -> AbstractContextManager[SnapshotWriter]:
        """A writer for ``snap`` (under the target's writer lock): what it stored and did not
        commit is garbage once the context ends."""


class LocalTarget:
    """A repository on this host: one writer session (lock and index) for the whole copy."""

    def __init__(self, repo: Repository) -> None:
        self.repo = repo
        self.config = repo.config
        self._native: NativeRepository | None = None

    def __str__(self) -> str:
        return str(self.repo.path)

    def snapshots(self, name: str | None = None) -> list[Snapshot]:
        return self.repo.snapshots(name)

    def holds(self, repo: Repository) -> bool:
        return (self.repo.path / "config").samefile(repo.path / "config")

    @contextmanager
    def session(self) -> Iterator[LocalTarget]:
        """Hold the target's writer lock while copying (taken before its indexes are read)."""
        with self.repo.session("copy", writer=True) as native:
            self._native = native
            try:
                yield self
            finally:
                self._native = None

    @contextmanager
    def writer(self, snap: Snapshot) -> Iterator[SnapshotWriter]:
        if self._native is None:
            raise errors.HyperbackError("LocalTarget.writer outside its session")
        yield _LocalWriter(self.repo, self._native)


class _LocalWriter:
    def __init__(self, repo: Repository, native: NativeRepository) -> None:
        self._repo, self._native = repo, native

    def missing(self, ids: Sequence[bytes]) -> set[bytes]:
        return {cid for cid in ids if cid not in self._native}

    def store(self, data: bytes, blob_type: int) -> bytes:
        return self._native.store_blob(data, blob_type)[0]

    def commit(self, snap: Snapshot, document: bytes) -> None:
        self._native.flush()
        self._repo.commit_copy(snap, document)


# ---------- what to copy ----------

def select(source: Repository, specs: Sequence[str], name: str | None, latest: bool) -> list[Snapshot]:
    """The snapshots a selection names, with the snapshots their ``vm`` fields name (a domain's
    definition, NVRAM and TPM files) before them, each once, in the order to copy them."""
    if specs and (name or latest):
        raise errors.UsageError("give snapshots, or --name/--latest, not both")
    if specs:
        chosen = [source.resolve(spec) for spec in specs]
    else:
        chosen = source.snapshots(name)
        if name and not chosen:
            raise errors.SnapshotNotFound(f"no snapshot of {name!r} in {source.path}; "
                                          f"'hyperback list --repo {source.path}' shows them")
        if latest:
            newest = {s.name: s for s in chosen}  # oldest first: the last one of each name wins
            chosen = sorted(newest.values(), key=lambda s: (s.time, s.id))
    by_id = {s.id: s for s in source.snapshots()}
    named: dict[str, Snapshot] = {}
    for snap in chosen:
        for sid in _vm_snapshots(snap):
            if sid in by_id:
                named[sid] = by_id[sid]
    rest = [s for s in chosen if s.id not in named]
    ordered = sorted(named.values(), key=lambda s: (s.time, s.id)) + rest
    return list({s.id: s for s in ordered}.values())


def _vm_snapshots(snap: Snapshot) -> list[str]:
    return [] if snap.vm is None else [snap.vm.definition, *(f.snapshot for f in snap.vm.files)]


# ---------- the copy ----------

@dataclass
class CopySummary:
    """What a copy did. Bytes are raw (decompressed) blob bytes: data chunks and tree pages."""

    copied: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # snapshot id: why
    chunks_sent: int = 0
    bytes_sent: int = 0
    chunks_present: int = 0
    bytes_present: int = 0
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failed

    def to_json(self) -> dict[str, object]:
        return {"copied": self.copied, "skipped": self.skipped, "failed": self.failed,
                "chunks_sent": self.chunks_sent, "bytes_sent": self.bytes_sent,
                "chunks_present": self.chunks_present, "bytes_present": self.bytes_present,
                "seconds": self.seconds, "ok": self.ok}


Report = Callable[[str], None]
"""Called with one line per snapshot: copied, skipped or failed."""


def check_compatible(source: Repository, target: CopyTarget) -> None:
    """A copy keeps chunk ids and tree pages: both sides must cut images the same way. A repository
    copied by other means (same ``repo_id``) is a fine target: what it holds is skipped."""
    if target.holds(source):
        raise errors.UsageError("--from and --to are the same repository: nothing to copy")
    if source.config.chunk_size != target.config.chunk_size:
        raise errors.UsageError(
            f"the source's chunk size is {source.config.chunk_size} bytes, the target's "
            f"{target.config.chunk_size}: a copy keeps chunks as they are, so copy into a repository made "
            f"with 'hyperback init --chunk-size {source.config.chunk_size}'")
    keyed = source.config.encryption or target.config.encryption
    if keyed and source.config.repo_id != target.config.repo_id:
        # ids and blobs are keyed per repository: they would have to be re-made, which a copy does not do
        raise errors.UsageError("a copy keeps chunk ids and blobs as they are, and an encrypted repository's "
                                "are keyed by its own keys: copy only between unencrypted repositories")


def copy_snapshots(source: Repository, target: CopyTarget, snaps: Sequence[Snapshot],
                   report: Report, progress: ProgressFn | None = None,
                   threads: int | None = None) -> CopySummary:
    """Copy ``snaps`` (in order) from ``source`` into ``target``; the caller holds the target's
    session. A snapshot that cannot be copied whole (a damaged or missing blob in the source, a
    domain definition the target lacks) is reported, left out, and the others go on."""
    check_compatible(source, target)
    summary = CopySummary()
    present = {s.id: s for s in target.snapshots()}
    ticker = _Ticker(progress, sum(s.size for s in snaps))
    with source.session("copy-source", writer=False) as native:
        copier = _SnapshotCopier(native, summary, threads or os.cpu_count() or 1)
        for snap in snaps:
            if snap.id in present:
                _skip(snap, present[snap.id], summary, report)
            else:
                why = _copy_one(source, copier, target, snap, present, ticker)
                if why is None:
                    summary.copied.append(snap.id)
                    present[snap.id] = snap
                    report(f"copied {snap.id} {snap.name}")
                else:
                    summary.failed[snap.id] = why
                    report(f"FAILED {snap.id} {snap.name}: {why}")
            ticker.next_snapshot(snap.size)
    return summary


def _copy_one(source: Repository, copier: _SnapshotCopier, target: CopyTarget, snap: Snapshot,
              present: dict[str, Snapshot], ticker: _Ticker) -> str | None:
    """Copy one snapshot; None if it is committed, else why not (nothing of it is committed)."""
    lacking = [sid for sid in _vm_snapshots(snap) if sid not in present]
    if lacking:
        return (f"the domain definition it names ({', '.join(lacking)}) is neither in the source nor in "
                "the target")
    try:
        document = _document(source, snap)
        with target.writer(snap) as writer:
            copier.copy(snap, document, writer, ticker.within)
    except (errors.IntegrityError, errors.SnapshotNotFound) as e:
        log.info("snapshot %s not copied: %s", snap.id, e)  # the report says it to the user
        return f"{e}; the snapshot was not committed in the target"
    return None


def _document(source: Repository, snap: Snapshot) -> bytes:
    """The source's document of ``snap`` as it is on disk: a copy keeps every field, those this
    version does not know too (docs/repository-format.md, 5.1 and 6.2)."""
    path = source.path / "snapshots" / snap.id
    try:
        raw = path.read_bytes()
        same = Snapshot.from_json(json.loads(raw)) == snap
    except FileNotFoundError:
        raise errors.SnapshotNotFound(f"snapshot {snap.id} was forgotten in the source meanwhile") from None
    except OSError as e:
        raise errors.RepositoryIOError(f"cannot read {path}: {e.strerror}") from e
    if not same:
        raise errors.RepositoryError(f"{path} changed while it was being copied")
    return raw


class _Ticker:
    """Progress over every selected snapshot's image bytes, a few times a second."""

    EVERY = 0.2  # seconds

    def __init__(self, fn: ProgressFn | None, total: int) -> None:
        self._fn, self._total, self._done = fn, total, 0
        self._last = 0.0

    def within(self, done: int, force: bool = False) -> None:
        """``done`` bytes into the snapshot being copied."""
        now = time.monotonic()
        if self._fn is not None and (force or now - self._last >= self.EVERY):
            self._last = now
            self._fn(self._done + done, self._total)

    def next_snapshot(self, size: int) -> None:
        self._done += size
        self.within(0, force=True)


def _skip(snap: Snapshot, there: Snapshot, summary: CopySummary, report: Report) -> None:
    if (there.name, there.tree, there.size) != (snap.name, snap.tree, snap.size):
        summary.failed[snap.id] = "the target holds another snapshot under this id"
        report(f"FAILED {snap.id} {snap.name}: {summary.failed[snap.id]}")
        return
    summary.skipped.append(snap.id)
    report(f"skipped {snap.id} {snap.name}: already in the target")


class _SnapshotCopier:
    """Walks snapshots' trees in the source and stores what the target lacks. Ids seen in this run
    are remembered, so a blob shared by several snapshots crosses once; those of a snapshot that
    failed are forgotten, as a target may drop what it stored for it."""

    def __init__(self, native: NativeRepository, summary: CopySummary, threads: int) -> None:
        self._native, self._summary, self._threads = native, summary, threads
        self._seen: set[bytes] = set()  # of committed snapshots
        self._pending: set[bytes] = set()  # of the snapshot being copied

    def copy(self, snap: Snapshot, document: bytes, writer: SnapshotWriter,
             progress: Callable[[int], None]) -> None:
        """Store the snapshot's blobs the target lacks and commit its document."""
        self._pending = set()
        self._copy_blobs(snap, writer, progress)
        writer.commit(snap, document)
        self._seen |= self._pending

    def _copy_blobs(self, snap: Snapshot, writer: SnapshotWriter, progress: Callable[[int], None]) -> None:
        reader = TreeReader(self._native, snap.tree)
        cs = snap.chunk_size
        self._send_pages(list(reader.pages()), reader, writer)  # interior pages read and verified here
        chunk = 0
        group: list[bytes] = []  # chunk ids looked up in the target together (one call to a media service)
        with _Reads(self._native, self._threads, lambda data, cid: self._put(data, cid, BLOB_DATA, writer)) \
                as reads:
            for leaf in reader.chunk_ids():
                group += [leaf[i:i + ID_LEN] for i in range(0, len(leaf), ID_LEN)]
                chunk += len(leaf) // ID_LEN
                if len(group) >= LOOKUP_BATCH or chunk == snap.tree.entries:
                    self._send_chunks(group, chunk == snap.tree.entries and snap.size % cs, writer, reads)
                    group = []
                    progress(min(chunk * cs, snap.size))
        if chunk != snap.tree.entries:
            raise errors.CorruptChunk(f"snapshot {snap.id}'s tree holds {chunk} chunks, not "
                                      f"{snap.tree.entries}")

    def _send_chunks(self, ids: list[bytes], short: int, writer: SnapshotWriter, reads: _Reads) -> None:
        """Send those of consecutive chunks ``ids`` the target lacks; the last one is ``short``
        bytes long if that is not 0 (the image's last chunk), the others whole."""
        last = ids[-1] if short else None
        for cid in self._new(ids, writer, _lengths(self._native.chunk_size, last, short)):
            if cid == last:
                self._put(self._native.read_blob(cid), cid, BLOB_DATA, writer)
            else:
                reads.add(cid)

    def _new(self, ids: Sequence[bytes], writer: SnapshotWriter,
             length: Callable[[bytes], int]) -> list[bytes]:
        """Those of ``ids`` to send: not zero, not sent in this run, lacking in the target; the
        others count as present."""
        fresh = list(dict.fromkeys(cid for cid in ids if cid != ZERO_ID and cid not in self._seen
                                   and cid not in self._pending))
        lacking = writer.missing(fresh) if fresh else set()
        for cid in fresh:
            self._pending.add(cid)
            if cid not in lacking:
                self._summary.chunks_present += 1
                self._summary.bytes_present += length(cid)
        return [cid for cid in fresh if cid in lacking]

    def _send_pages(self, pages: list[bytes], reader: TreeReader, writer: SnapshotWriter) -> None:
        contents: dict[bytes, bytes] = {}

        def length(pid: bytes) -> int:
            contents.setdefault(pid, reader.leaf(pid))
            return len(contents[pid])

        for pid in self._new(pages, writer, length):
            self._put(contents.pop(pid) if pid in contents else reader.leaf(pid), pid, BLOB_TREE, writer)

    def _put(self, data: bytes, blob_id: bytes, blob_type: int, writer: SnapshotWriter) -> None:
        # the source's reader checked the bytes against the id; the target's writer hashes them again
        if writer.store(data, blob_type) != blob_id:
            raise errors.CorruptChunk(f"blob {blob_id.hex()} changed on its way to the target", blob_id.hex())
        self._summary.chunks_sent += 1
        self._summary.bytes_sent += len(data)


def _lengths(chunk_size: int, last: bytes | None, last_len: int) -> Callable[[bytes], int]:
    """The length of a chunk by its id: the chunk size, or ``last_len`` for the image's last one."""
    return lambda cid: last_len if cid == last else chunk_size


class _Reads:
    """Reads whole chunks from the source in batches, each batch by the native reader's threads
    (which check every chunk against its id) while the previous one is being stored: reading and
    storing overlap. ``store`` is called with each chunk's bytes and id, in order, in the caller's
    thread."""

    def __init__(self, native: NativeRepository, threads: int, store: Callable[[bytes, bytes], None]) -> None:
        self._native, self._threads, self._store = native, threads, store
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="copy-read")
        self._queue: list[bytes] = []
        self._ahead: tuple[list[bytes], Future[bytes]] | None = None

    def __enter__(self) -> _Reads:
        return self

    def __exit__(self, kind: type[BaseException] | None, *exc: object) -> None:
        try:
            if kind is None:
                self._submit()
                self._settle()
        finally:
            # a read in flight uses the source's native handle: it must end before the handle does
            self._pool.shutdown(wait=True)

    def add(self, chunk_id: bytes) -> None:
        self._queue.append(chunk_id)
        if len(self._queue) >= READ_BATCH:
            self._submit()

    def _submit(self) -> None:
        batch, self._queue = self._queue, []
        cs = self._native.chunk_size
        future = self._pool.submit(self._native.read_segment, 0, len(batch) * cs, b"".join(batch),
                                   self._threads) if batch else None
        self._settle()
        if future is not None:
            self._ahead = (batch, future)

    def _settle(self) -> None:
        if self._ahead is None:
            return
        (batch, future), self._ahead = self._ahead, None
        data = future.result()
        cs = self._native.chunk_size
        for i, cid in enumerate(batch):
            self._store(data[i * cs:(i + 1) * cs], cid)
