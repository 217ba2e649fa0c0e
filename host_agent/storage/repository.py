"""A hyperback repository: content-addressed, compressed, deduplicated snapshots of images.

The on-disk format is specified in docs/repository-format.md; this module
follows it. The public API::

    repo = Repository.init(path)            # or Repository.open(path)
    result = repo.backup("/dev/vg/vm1", "vm1/vda", policy=Policy.INCREMENTAL)
    repo.restore("vm1/vda@latest", "/var/tmp/vm1.img")
    repo.snapshots("vm1/vda"); repo.verify(); repo.check()

Write order (what makes kill -9 safe): chunks and tree pages go into packs, each pack is fsynced
and renamed into ``packs/`` before its index file is written into ``index/``; the snapshot document
is renamed into ``snapshots/`` only after every pack it needs is indexed. A snapshot file is
therefore the commit record, and anything without one is invisible garbage.
"""
from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from host_agent import errors
from host_agent.model import ChangeDetection, FallbackNote, Policy
from host_agent.storage import copier, keys
from host_agent.storage.annotations import Annotations, check_labels
from host_agent.storage.cancel import CancelToken
from host_agent.storage.copier import ID_LEN, ZERO_ID, NativeRepository
from host_agent.storage.extents import Extent, Layout, OpenSource, chunk_plan, open_source, validate_changes
from host_agent.storage.files import RestoreTarget, fsync_dir, missing_repository, write_atomic
from host_agent.storage.keys import RepoKeys, Secret
from host_agent.storage.locks import Lock, read_locks
from host_agent.storage.maptree import FANOUT, SEGMENT_LEAVES, BaseLeaves, TreeBuilder, TreeReader, leaves_for
from host_agent.storage.snapshot import (
    FORMAT_VERSION,
    NAME,
    SNAPSHOT_ID,
    BackupResult,
    BadChunk,
    CheckReport,
    FilesRef,
    RestoreResult,
    Snapshot,
    SnapshotStats,
    VerifyReport,
    VmRef,
)
from host_agent.storage.sourcefile import unchanged_since
from host_agent.storage.verification import Verification, console_tail

log = logging.getLogger(__name__)

FORMAT = "hyperback-repository"
DEFAULT_CHUNK_SIZE = 32 * 1024
# zstd's first "fast" level: measured on the benchmark's images, 6% faster full backups than
# level 1 for a 2.6% larger repository (docs/repository-format.md, section 2)
DEFAULT_COMPRESSION_LEVEL = -1
PACK_TARGET = 64 * 1024 * 1024
REPACK_THRESHOLD = 0.25  # garbage collection rewrites a pack once this fraction of it is garbage
PACK_NAME = re.compile(r"[0-9a-f]{32}")
VERIFICATIONS = "verifications"  # boot verification records (format section 5.4); absent in old repositories

ProgressFn = Callable[[int, int], None]
"""Called with (bytes done, bytes in all) a few times a second during long work."""


@dataclass(frozen=True)
class RepoConfig:
    repo_id: str
    chunk_size: int
    compression_level: int
    created: str
    version: int = FORMAT_VERSION
    encryption: str | None = None  # the mode of an encrypted repository (keys.MODES)


def _now() -> datetime:
    return datetime.now(UTC)


class _Ticker:
    """Calls a progress function from a side thread while native workers run."""

    def __init__(self, fn: ProgressFn | None, progress: copier.Progress, total: int,
                 every: float = 0.2) -> None:
        self._fn, self._progress, self._total, self._every = fn, progress, total, every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="progress", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self._every):
            assert self._fn is not None
            self._fn(self._progress.read().bytes_done, self._total)

    def __enter__(self) -> _Ticker:
        if self._fn is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fn is not None:
            self._stop.set()
            self._thread.join()
            if exc[0] is None:
                self._fn(self._progress.read().bytes_done, self._total)


class Repository:
    """An open repository. Cheap to open; every operation loads what it needs."""

    def __init__(self, path: Path, config: RepoConfig, secret: Secret | None = None) -> None:
        self.path = path
        self.config = config
        self._held = threading.local()  # this thread's writer lock, checked before each commit
        self._secret = secret
        self._keys: RepoKeys | None = None

    def keys(self) -> RepoKeys | None:
        """An encrypted repository's keys (None if not), unlocked on first use (format doc 11.4)."""
        if self.config.encryption is not None and self._keys is None:
            self._keys = keys.unlock(self.path, self.config.repo_id, self.config.encryption,
                                     self._secret or keys.secret_from_environment())
        return self._keys

    # ---------- creating and opening ----------

    @classmethod
    def init(cls, path: str | os.PathLike[str], chunk_size: int = DEFAULT_CHUNK_SIZE,
             compression_level: int = DEFAULT_COMPRESSION_LEVEL, encryption: str | None = None,
             secret: Secret | None = None, keyfile: Path | None = None) -> Repository:
        """Create a repository in an empty or missing directory; ``encryption`` a mode of keys.MODES
        (with the passphrase in ``secret``, or the new key file's path in ``keyfile``) or None."""
        root = Path(path)
        if chunk_size < 4096 or chunk_size > 4 * 1024 * 1024 or chunk_size & (chunk_size - 1):
            raise errors.UsageError(f"chunk size {chunk_size} must be a power of two from 4 KiB to 4 MiB")
        if not -7 <= compression_level <= 19 or compression_level == 0:
            raise errors.UsageError(f"compression level {compression_level} must be from -7 (fastest) "
                                    "to 19 (smallest), not 0")
        if (root / "config").exists():
            raise errors.RepositoryExists(f"{root} is already a hyperback repository")
        try:
            root.mkdir(parents=True, exist_ok=True)
            if any(root.iterdir()):
                raise errors.RepositoryExists(f"{root} is not empty: give an empty or new directory")
            repo_id = os.urandom(16).hex()
            if encryption is not None:
                keys.create(root, repo_id, encryption, secret, keyfile)
            for sub in ("packs", "index", "snapshots", "locks", "tombstones", "tmp"):
                (root / sub).mkdir()
        except OSError as e:
            raise errors.RepositoryIOError(f"cannot create repository {root}: {e.strerror}") from e
        config = RepoConfig(repo_id, chunk_size, compression_level, _now().strftime("%Y-%m-%dT%H:%M:%SZ"),
                            keys.ENCRYPTED_VERSION if encryption else FORMAT_VERSION, encryption)
        doc = keys.config_document({"format": FORMAT, **asdict(config), "hash": "sha256",
                                    "compression": "zstd", "tree_fanout": FANOUT})
        write_atomic(root / "config", json.dumps(doc, indent=2).encode() + b"\n", root / "tmp")
        return cls(root, config, secret)

    @classmethod
    def open(cls, path: str | os.PathLike[str], secret: Secret | None = None) -> Repository:
        """Open a repository; an encrypted one is unlocked (by ``secret``) when first read or written."""
        root = Path(path)
        try:
            doc = json.loads((root / "config").read_text())
        except (FileNotFoundError, NotADirectoryError):
            raise errors.NotARepository(missing_repository(root)) from None
        except (OSError, ValueError) as e:
            raise errors.NotARepository(f"{root}/config is unreadable: {e}") from e
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise errors.NotARepository(f"{root} is not a hyperback repository (foreign config file)")
        version = doc.get("version")
        if not isinstance(version, int) or version > keys.ENCRYPTED_VERSION:
            raise errors.UnsupportedFormat(
                f"{root} has repository format {version}, newer than this hyperback understands "
                f"({keys.ENCRYPTED_VERSION}); upgrade hyperback")
        try:
            config = RepoConfig(str(doc["repo_id"]), int(doc["chunk_size"]),
                                int(doc["compression_level"]), str(doc["created"]), version,
                                keys.mode_of(doc, f"{root}/config"))
        except (KeyError, ValueError, TypeError) as e:
            raise errors.NotARepository(f"{root}/config lacks a valid field: {e}") from e
        return cls(root, config, secret)

    # ---------- directory helpers ----------

    def _dir(self, name: str) -> Path:
        return self.path / name

    def tombstones(self) -> dict[int, list[str]]:
        """Pending pack deletions by generation (see gc)."""
        out = {}
        for path in self._dir("tombstones").iterdir():
            if path.name.isdigit():
                try:
                    out[int(path.name)] = list(json.loads(path.read_text())["packs"])
                except FileNotFoundError:  # swept since listed: its packs are gone too
                    continue
        return out

    def generation(self) -> int:
        """The last tombstone generation handed out (0 before the first)."""
        try:
            return int((self._dir("tombstones") / "generation").read_text())
        except FileNotFoundError:
            return 0

    def pack_names(self) -> list[str]:
        """Every indexed pack."""
        return sorted(p.name for p in self._dir("index").iterdir() if PACK_NAME.fullmatch(p.name))

    @contextmanager
    def session(self, kind: str, writer: bool, writer_id: bytes | None = None) -> Iterator[NativeRepository]:
        """Hold a lock and a native handle with the index loaded.

        Writers skip packs named by a tombstone (their chunks count as absent, so
        a writer never comes to depend on them); readers load those too, and
        hold the lock as if older than every tombstone, so none is swept under them.
        ``writer_id`` (16 bytes, the lock's name and the writer id of new packs) is
        random unless given: the media service gives its backup session's, so that
        packs a client writes for the session belong to the session's lock.
        """
        # The lock comes before the tombstones are read: see docs, "Garbage collection".
        writer_id = writer_id or os.urandom(16)
        lock = Lock(self._dir("locks"), kind, self.generation() if writer else 0, writer_id.hex()).acquire()
        native = None
        outer = getattr(self._held, "lock", None)
        if writer:
            self._held.lock = lock
        try:
            doomed = {p for packs in self.tombstones().values() for p in packs}
            native = NativeRepository(str(self.path), writer_id, self.config.chunk_size, PACK_TARGET,
                                      self.config.compression_level, self.keys())
            names = self.pack_names()
            live = [n for n in names if n not in doomed]
            for name in live + ([] if writer else [n for n in names if n in doomed]):
                try:
                    native.load_index(name)
                except errors.RepositoryIOError:
                    if (self._dir("index") / name).exists():
                        raise
                    # swept by a collector since we listed it: it was garbage
            yield native
        finally:
            if native is not None:
                native.close()
            self._held.lock = outer
            lock.release()

    # ---------- snapshots ----------

    def snapshots(self, name: str | None = None) -> list[Snapshot]:
        """Every snapshot (of one source name if given), oldest first."""
        out = []
        for path in self._dir("snapshots").iterdir():
            if not SNAPSHOT_ID.fullmatch(path.name):
                continue
            try:
                snap = Snapshot.from_json(json.loads(path.read_text()))
            except FileNotFoundError:  # forgotten since listed
                continue
            except (OSError, ValueError, KeyError, TypeError) as e:
                log.warning("ignoring unreadable snapshot %s: %s", path.name, e)
                continue
            if name is None or snap.name == name:
                out.append(snap)
        return sorted(out, key=lambda s: (s.time, s.id))

    def resolve(self, spec: str) -> Snapshot:
        """A snapshot by id, unique id prefix (4+ characters) or ``NAME@latest``."""
        if spec.endswith("@latest"):
            name = spec[: -len("@latest")]
            found = self.snapshots(name)
            if not found:
                raise errors.SnapshotNotFound(f"no snapshot of {name!r} in {self.path}; "
                                              f"'hyperback list --repo {self.path}' shows them")
            return found[-1]
        matches = [s for s in self.snapshots() if len(spec) >= 4 and s.id.startswith(spec)]
        if len(matches) == 1:
            return matches[0]
        if len(matches) > 1:
            raise errors.UsageError(f"snapshot id prefix {spec!r} is ambiguous; give more characters")
        raise errors.SnapshotNotFound(f"no snapshot {spec!r} in {self.path}; "
                                      f"'hyperback list --repo {self.path}' shows them")

    def base_for(self, name: str, policy: Policy) -> Snapshot | None:
        history = self.snapshots(name)
        if policy is Policy.DIFFERENTIAL:
            history = [s for s in history if s.policy is Policy.FULL]
        return history[-1] if history and policy is not Policy.FULL else None

    def check_vm(self, vm: VmRef | None) -> None:
        """The snapshots a ``vm`` field names exist (docs/repository-format.md, 5.3): they are
        committed before the disk snapshots that name them."""
        if vm is None:
            return
        for sid in (vm.definition, *(f.snapshot for f in vm.files)):
            if not SNAPSHOT_ID.fullmatch(sid) or not (self._dir("snapshots") / sid).exists():
                raise errors.UsageError(f"the domain definition names snapshot {sid!r}, which the repository "
                                        "lacks: commit the definition's snapshots first")

    def _commit(self, snap: Snapshot) -> None:
        self._ensure_lock_held()
        write_atomic(self._dir("snapshots") / snap.id, json.dumps(snap.to_json(), indent=1).encode(),
                     self._dir("tmp"))

    def commit_copy(self, snap: Snapshot, document: bytes) -> None:
        """Commit another repository's document of ``snap`` byte for byte, its blobs already indexed
        here (``transfer``; docs/repository-format.md, 6.2)."""
        if snap.chunk_size != self.config.chunk_size or (self._dir("snapshots") / snap.id).exists():
            raise errors.UsageError(f"snapshot {snap.id} has another chunk size or is already in {self.path}")
        self.check_vm(snap.vm)
        self._ensure_lock_held()
        write_atomic(self._dir("snapshots") / snap.id, document, self._dir("tmp"))

    def _ensure_lock_held(self) -> None:
        lock = getattr(self._held, "lock", None)
        if lock is not None:
            lock.ensure_held()

    def forget(self, snapshot_ids: Sequence[str]) -> None:
        """Delete snapshot documents (their data goes at the next garbage collection); a protected
        one is refused, its protection read just before (docs/repository-format.md, 5.5)."""
        notes = Annotations(self.path)
        for sid in snapshot_ids:
            if not SNAPSHOT_ID.fullmatch(sid):
                raise errors.UsageError(f"{sid!r} is not a snapshot id")
            if notes.protected(sid):
                raise errors.UsageError(f"snapshot {sid} is protected; 'hyperback unprotect --repo "
                                        f"{self.path} {sid}' first if it really must go")
        for sid in snapshot_ids:
            (self._dir("snapshots") / sid).unlink(missing_ok=True)
        fsync_dir(self._dir("snapshots"))
        self._forget_verifications(snapshot_ids)
        notes.remove(snapshot_ids)

    # ---------- boot verification records (docs/repository-format.md, 5.4) ----------

    def record_verification(self, record: Verification, console: bytes) -> None:
        """Keep ``record`` as the snapshot's latest verification, with the end of its console text:
        the console first, then the record (the record names how much of it there is)."""
        if not (self._dir("snapshots") / record.snapshot).exists():
            raise errors.SnapshotNotFound(f"no snapshot {record.snapshot} in {self.path} (forgotten since "
                                          "it was verified?)")
        folder = self._dir(VERIFICATIONS)
        if not folder.is_dir():  # repositories from before verification records lack it
            try:
                folder.mkdir(exist_ok=True)
                fsync_dir(self.path)
            except OSError as e:
                raise errors.RepositoryIOError(f"cannot create {folder}: {e.strerror}") from e
        tail = console_tail(console)
        write_atomic(folder / f"{record.snapshot}.console", tail, self._dir("tmp"))
        record = replace(record, console_bytes=len(console), console_kept=len(tail))
        doc = json.dumps(record.to_json(), indent=1).encode()
        write_atomic(folder / record.snapshot, doc, self._dir("tmp"))

    def verifications(self) -> dict[str, Verification]:
        """The latest verification of every snapshot that has one, by snapshot id."""
        folder = self._dir(VERIFICATIONS)
        out: dict[str, Verification] = {}
        if not folder.is_dir():
            return out
        for path in folder.iterdir():
            if not SNAPSHOT_ID.fullmatch(path.name):
                continue
            try:
                record = Verification.from_json(json.loads(path.read_text()))
            except FileNotFoundError:  # forgotten since listed
                continue
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
                log.warning("ignoring unreadable verification record %s: %s", path.name, e)
                continue
            if record.snapshot == path.name:
                out[path.name] = record
        return out

    def console_text(self, snapshot_id: str) -> bytes | None:
        """The console text kept with a snapshot's latest verification (its end), or None."""
        if not SNAPSHOT_ID.fullmatch(snapshot_id):
            raise errors.UsageError(f"{snapshot_id!r} is not a snapshot id")
        try:
            return (self._dir(VERIFICATIONS) / f"{snapshot_id}.console").read_bytes()
        except FileNotFoundError:
            return None

    def _forget_verifications(self, snapshot_ids: Sequence[str]) -> None:
        folder = self._dir(VERIFICATIONS)
        if not folder.is_dir():
            return
        for sid in snapshot_ids:
            (folder / sid).unlink(missing_ok=True)
            (folder / f"{sid}.console").unlink(missing_ok=True)
        fsync_dir(folder)

    # ---------- backup ----------

    def backup(self, source: str | os.PathLike[str] | Layout, name: str, policy: Policy = Policy.FULL,
               changes: Sequence[Extent] | None = None, progress: ProgressFn | None = None,
               threads: int | None = None, base: Snapshot | None = None,
               checkpoint: str | None = None, cancel: CancelToken | None = None,
               files: FilesRef | None = None, vm: VmRef | None = None,
               labels: Sequence[str] = (), fallback: FallbackNote | None = None) -> BackupResult:
        """Back up an image file, block device or :class:`Layout` as a new snapshot of ``name``.

        ``incremental`` compares with (or, given ``changes``, reads only what changed
        since) the latest snapshot of ``name``; ``differential`` the latest full one.
        Without such a base snapshot a full backup is taken, and a note says so.
        An explicit ``base`` (any snapshot of the same size, e.g. of a shared backing
        image) replaces that choice: with ``changes`` only they are read, the rest is
        taken from ``base``. ``checkpoint`` names the hypervisor checkpoint taken at the
        instant the source shows, which the snapshot records for the next backup to start from.
        ``cancel`` stops it: nothing is published unless it comes after the commit. ``vm`` ties
        the snapshot to its domain's stored definition (docs/repository-format.md, 5.3); ``labels``
        are committed with it (5.5); ``fallback``: why a base was compared, not a bitmap read (5.1).
        """
        if not NAME.fullmatch(name):
            raise errors.UsageError(
                f"snapshot name {name!r} must be 1-4 parts joined by '/', each of letters, digits, "
                "'.', '_', '-' (64 at most, not starting with a punctuation mark), e.g. vm1/vda")
        policy = Policy(policy)
        self.check_vm(vm)
        labels = check_labels(labels)
        threads = threads or os.cpu_count() or 1
        started = time.monotonic()
        notes: list[str] = []
        base = base if base is not None else self.base_for(name, policy)
        if policy is not Policy.FULL and base is None:
            notes.append(f"no earlier {'full ' if policy is Policy.DIFFERENTIAL else ''}snapshot "
                         f"of {name}: took a full backup")
            policy = Policy.FULL
        if base is not None and base.chunk_size != self.config.chunk_size:
            raise errors.RepositoryError(f"base snapshot {base.id} has another chunk size")
        src = open_source(source if isinstance(source, Layout) else Path(source))
        try:
            if changes is not None and base is None:
                notes.append("change list ignored: a full backup reads everything")
                changes = None
            checked = validate_changes(changes, src.size) if changes is not None else None
            # Without a change list, an image file whose identity matches the base's record has not
            # changed: an empty change list, and the base's tree kept whole (sourcefile's rule).
            unchanged = unchanged_since(base, src.file) if checked is None else None
            if unchanged is not None:
                notes.append(unchanged)
                checked = []
            detection = (ChangeDetection.NONE if base is None else
                         ChangeDetection.CHANGE_LIST if checked is not None else ChangeDetection.COMPARISON)
            with self.session("backup", writer=True) as native:
                if unchanged is not None and base is not None:
                    tree, counted = base.tree, (0, 0, 0, 0)
                    if progress is not None:
                        progress(src.size, src.size)
                else:
                    builder, c = self._copy_in(native, src, base, checked, threads, progress, cancel)
                    tree = builder.finish()
                    counted = (c.bytes_read, c.bytes_new, c.bytes_stored + builder.bytes_stored,
                               c.bytes_changed)
                native.flush()
                if cancel is not None:
                    cancel.check()
                stats = SnapshotStats(*counted, round(time.monotonic() - started, 3))
                file = replace(src.file, unchanged_since=base.id if unchanged and base else None) \
                    if src.file else None
                snap = Snapshot(os.urandom(8).hex(), name, policy, base.id if base else None, _now(),
                                src.label if isinstance(source, Layout) else str(Path(source).absolute()),
                                src.size, self.config.chunk_size, tree,
                                detection, stats, checkpoint, files, vm, labels, file,
                                fallback if detection is ChangeDetection.COMPARISON else None)
                # Still under the lock: a collector must not take our new chunks for garbage.
                self._commit(snap)
        finally:
            src.close()
        log.info("backup %s of %s done: %s", snap.id, name, stats)
        return BackupResult(snap, tuple(notes))

    def _copy_in(self, native: NativeRepository, src: OpenSource, base: Snapshot | None,
                 changes: list[Extent] | None, threads: int, progress_fn: ProgressFn | None,
                 cancel: CancelToken | None) -> tuple[TreeBuilder, copier.Counters]:
        cs = self.config.chunk_size
        entries = -(-src.size // cs)
        data = src.data()
        base_leaves = BaseLeaves(native, base)
        builder = TreeBuilder(native)
        # Only chunks whose byte range is the same in the base may be kept unread: not a
        # short last chunk of a source that has since grown or shrunk.
        keepable = 0 if base is None else (
            entries if base.size == src.size else min(base.size, src.size) // cs)
        progress = copier.Progress()
        if cancel is not None:
            cancel.watch(progress)
        with _Ticker(progress_fn, progress, src.size):
            for first_leaf in range(0, leaves_for(entries), SEGMENT_LEAVES):
                first = first_leaf * FANOUT
                count = min(SEGMENT_LEAVES * FANOUT, entries - first)
                plan = chunk_plan(first, count, cs, data, changes, keepable)
                self._copy_segment(native, src, first, plan, base_leaves, builder, threads, progress)
        return builder, progress.read()

    def _copy_segment(self, native: NativeRepository, src: OpenSource, first: int, plan: bytearray,
                      base_leaves: BaseLeaves, builder: TreeBuilder, threads: int,
                      progress: copier.Progress) -> None:
        """Back up one segment, reusing whole base leaves where nothing in them changed."""
        run_start = 0
        leaf = 0
        while leaf * FANOUT < len(plan):
            lo, hi = leaf * FANOUT, min((leaf + 1) * FANOUT, len(plan))
            reusable = base_leaves.reusable(first + lo, first + hi) and \
                plan[lo:hi] == bytes([copier.TODO_KEEP]) * (hi - lo)
            if reusable:
                self._copy_run(native, src, first, plan, run_start, lo, base_leaves, builder, threads,
                               progress)
                builder.add_leaf(base_leaves.leaf_id((first + lo) // FANOUT), hi - lo)
                cs = self.config.chunk_size
                skipped = min((first + hi) * cs, src.size) - (first + lo) * cs
                progress.add_done(skipped)
                run_start = hi
            leaf += 1
        self._copy_run(native, src, first, plan, run_start, len(plan), base_leaves, builder, threads,
                       progress)

    def _copy_run(self, native: NativeRepository, src: OpenSource, first: int, plan: bytearray, lo: int,
                  hi: int, base_leaves: BaseLeaves, builder: TreeBuilder, threads: int,
                  progress: copier.Progress) -> None:
        if lo >= hi:
            return
        base_ids = base_leaves.ids(first + lo, first + hi)
        located = src.locate(first + lo, hi - lo, self.config.chunk_size)
        ids, _ = native.backup_segment(src.fd, first + lo, src.size, bytes(plan[lo:hi]), base_ids,
                                       threads, progress, src.label, located)
        builder.add_ids(ids)

    # ---------- restore ----------

    def restore(self, spec: str, target: str | os.PathLike[str], overwrite: bool = False,
                progress: ProgressFn | None = None, threads: int | None = None,
                sync: bool = True) -> RestoreResult:
        """Restore a snapshot, bit-identical, to a file or block device; every chunk is verified first.

        A file target is written beside the target and renamed over it only when
        complete, so a failed restore never leaves a partial file under the target's name.
        With ``sync`` (the default) the data is on stable storage before this returns;
        without, it may still sit in the page cache (faster; a crash may lose it).
        """
        snap = self.resolve(spec)
        threads = threads or os.cpu_count() or 1
        started = time.monotonic()
        path = Path(target)
        with RestoreTarget(path, snap.size, overwrite) as out:
            with self.session("restore", writer=False) as native:
                counters = self._copy_out(native, snap, out.fd, out.is_block_device, threads, progress)
            out.commit(sync)
        return RestoreResult(snap, str(path), snap.size, counters.bytes_read,
                             round(time.monotonic() - started, 3))

    def _copy_out(self, native: NativeRepository, snap: Snapshot, fd: int, write_zeros: bool,
                  threads: int, progress_fn: ProgressFn | None) -> copier.Counters:
        progress = copier.Progress()
        reader = TreeReader(native, snap.tree)
        first = 0
        batch = bytearray()
        with _Ticker(progress_fn, progress, snap.size):
            for leaf in reader.chunk_ids():
                batch += leaf
                if len(batch) >= SEGMENT_LEAVES * FANOUT * ID_LEN:
                    native.restore_segment(fd, first, snap.size, bytes(batch), write_zeros, threads,
                                           progress, "the target")
                    first += len(batch) // ID_LEN
                    batch.clear()
            if batch:
                native.restore_segment(fd, first, snap.size, bytes(batch), write_zeros, threads, progress,
                                       "the target")
                first += len(batch) // ID_LEN
        if first != snap.tree.entries:
            raise errors.CorruptChunk(f"snapshot {snap.id}'s tree holds {first} chunks, "
                                      f"not {snap.tree.entries}")
        return progress.read()

    # ---------- verify and check ----------

    def referenced(self, native: NativeRepository, snaps: Sequence[Snapshot]) -> tuple[
            dict[bytes, list[str]], list[str]]:
        """Map every blob id reachable from the snapshots to the snapshots using it.

        Returns the map and the ids of snapshots whose tree could not be read whole.
        """
        users: dict[bytes, list[str]] = {}
        unreadable = []
        for snap in snaps:
            reader = TreeReader(native, snap.tree)
            try:
                for page_id in reader.pages():
                    users.setdefault(page_id, []).append(snap.id)
                for leaf in reader.chunk_ids():
                    for i in range(0, len(leaf), ID_LEN):
                        cid = leaf[i:i + ID_LEN]
                        if cid != ZERO_ID:
                            lst = users.setdefault(cid, [])
                            if not lst or lst[-1] != snap.id:
                                lst.append(snap.id)
            except errors.IntegrityError as e:
                log.warning("snapshot %s: %s", snap.id, e)
                unreadable.append(snap.id)
        return users, unreadable

    def verify(self, sample_percent: float = 100.0, progress: ProgressFn | None = None,
               threads: int | None = None) -> VerifyReport:
        """Re-read and re-hash every stored blob (or a sample chosen by id) and name the bad ones
        with the snapshots that use them."""
        if not 0 < sample_percent <= 100:
            raise errors.UsageError("sample must be a percentage above 0 and at most 100")
        started = time.monotonic()
        prog = copier.Progress()
        snaps = self.snapshots()  # before the indexes: each one listed is then indexed whole
        with self.session("verify", writer=False) as native:
            with _Ticker(progress, prog, 0):
                bad_ids, total = native.verify(round(sample_percent * 100), threads or os.cpu_count() or 1,
                                               prog)
            users: dict[bytes, list[str]] = {}
            unreadable: list[str] = []
            if bad_ids:
                users, unreadable = self.referenced(native, snaps)
        bad = tuple(BadChunk(b.hex(), tuple(users[b])) if b in users
                    else BadChunk(b.hex(), tuple(unreadable), possibly=bool(unreadable)) for b in bad_ids)
        return VerifyReport(sample_percent, prog.read().bytes_read, bad, total,
                            round(time.monotonic() - started, 3), tuple(unreadable))

    def check(self) -> CheckReport:
        """Check references: every blob a snapshot needs is indexed, every indexed pack exists."""
        snaps = self.snapshots()  # before the indexes: each one listed is then indexed whole
        with self.session("check", writer=False) as native:
            users, unreadable = self.referenced(native, snaps)
            missing = tuple(BadChunk(cid.hex(), tuple(s)) for cid, s in users.items() if cid not in native)
        no_file = tuple(n for n in self.pack_names()
                        if not (self._dir("packs") / n[:2] / n).exists())
        return CheckReport(len(snaps), len(users), missing, tuple(unreadable), no_file)

    def export_params(self) -> dict[str, str]:
        """How an export's plugin process opens this repository (``host_agent.storage.export``)."""
        return {"opener": "host_agent.storage.imagereader:open_local", "repo": str(self.path.absolute())}

    def locks(self) -> list[Any]:
        return read_locks(self._dir("locks"))

