"""Garbage collection that is safe while other processes back up to the same repository.

Two phases, specified in docs/repository-format.md ("Garbage collection"):

*Mark* finds the packs that hold only unreferenced blobs, or at least
``repack_threshold`` of unreferenced bytes; it copies the referenced blobs of
the latter into new packs, then names all of them in a tombstone with a new
generation number. From then on writers ignore those packs (their chunks count
as absent, so no new snapshot comes to depend on them).

*Sweep* deletes a tombstone's packs once no live lock is older than it (no
writer that might still use them, no reader that might read them). Just before
deleting, it copies out any blob that a snapshot committed meanwhile by such an
older writer still references. Then it deletes the index files, the packs and
the tombstone, in that order.

With no other process at work both phases run in one call; otherwise the packs
wait for the next run.
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from host_agent import errors
from host_agent.storage.copier import NativeRepository
from host_agent.storage.files import fsync_dir, write_atomic
from host_agent.storage.locks import GC_LOCK, Lock, read_locks
from host_agent.storage.packfile import IndexEntry, pack_writer_id, read_index
from host_agent.storage.repository import PACK_NAME, PACK_TARGET, REPACK_THRESHOLD, Repository
from host_agent.storage.snapshot import Snapshot

log = logging.getLogger(__name__)

TMP_MAX_AGE = 24 * 3600.0


@dataclass
class GcResult:
    packs_deleted: int = 0
    packs_repacked: int = 0
    blobs_copied: int = 0
    bytes_freed: int = 0
    packs_waiting: int = 0
    orphans_deleted: int = 0


class _Collector:
    def __init__(self, repo: Repository, repack_threshold: float) -> None:
        self.repo = repo
        self.threshold = repack_threshold
        self.result = GcResult()

    # ---------- helpers ----------

    def _native(self, packs: list[str]) -> NativeRepository:
        native = NativeRepository(str(self.repo.path), os.urandom(16), self.repo.config.chunk_size,
                                  PACK_TARGET, self.repo.config.compression_level, self.repo.keys())
        for name in packs:
            native.load_index(name)
        return native

    def _live_locks(self) -> list[str]:
        return [lk.name for lk in read_locks(self.repo.path / "locks")
                if lk.name != GC_LOCK and not lk.is_stale()]

    def _oldest_live_gen(self) -> int:
        gens = [lk.saw_gen for lk in read_locks(self.repo.path / "locks")
                if lk.name != GC_LOCK and not lk.is_stale()]
        return min(gens, default=1 << 62)

    def _referenced(self, reader: NativeRepository, snaps: list[Snapshot]) -> set[bytes]:
        """Every blob the snapshots reach. ``snaps`` must be listed before ``reader`` loaded its
        indexes: a snapshot is committed only after its packs are indexed, so every one listed
        then is readable whole through them."""
        users, unreadable = self.repo.referenced(reader, snaps)
        if unreadable:
            raise errors.IntegrityError(
                f"snapshots {', '.join(unreadable)} cannot be read whole, so what is garbage is unknown; "
                "nothing was deleted. Run 'hyperback check' and remove or repair them first")
        return set(users)

    def _copy_out(self, reader: NativeRepository, entries: list[IndexEntry]) -> None:
        """Rewrite blobs into new packs through a writer that knows no other copy of them."""
        if not entries:
            return
        with self._native([]) as writer:
            for e in entries:
                writer.store_blob(reader.read_blob(e.id), e.type)
            writer.flush()
        self.result.blobs_copied += len(entries)

    def _pack_size(self, name: str) -> int:
        try:
            return (self.repo.path / "packs" / name[:2] / name).stat().st_size
        except FileNotFoundError:
            return 0

    # ---------- phases ----------

    def sweep(self) -> None:
        tombs = self.repo.tombstones()
        if not tombs:
            return
        oldest = self._oldest_live_gen()
        ready = sorted(g for g in tombs if g <= oldest)
        for g in sorted(set(tombs) - set(ready)):
            self.result.packs_waiting += len(tombs[g])
        if not ready:
            return
        doomed = {p for g in ready for p in tombs[g]}
        snaps = self.repo.snapshots()
        every = self.repo.pack_names()
        waiting = {p for g, packs in tombs.items() if g not in ready for p in packs}
        live = [p for p in every if p not in doomed and p not in waiting]
        with self._native(live + [p for p in every if p in doomed or p in waiting]) as reader:
            referenced = self._referenced(reader, snaps)
            present = {e.id for p in live + sorted(waiting) for e in read_index(self.repo.path / "index" / p)}
            rescue = [e for p in sorted(doomed) if p in every
                      for e in read_index(self.repo.path / "index" / p)
                      if e.id in referenced and e.id not in present]
            # one copy per id, whatever the number of doomed packs holding it
            unique = list({e.id: e for e in rescue}.values())
            self._copy_out(reader, unique)
        for name in sorted(doomed):
            self.result.bytes_freed += self._pack_size(name)
            (self.repo.path / "index" / name).unlink(missing_ok=True)
        fsync_dir(self.repo.path / "index")
        for name in sorted(doomed):
            (self.repo.path / "packs" / name[:2] / name).unlink(missing_ok=True)
            self.result.packs_deleted += 1
        for g in ready:
            (self.repo.path / "tombstones" / str(g)).unlink(missing_ok=True)

    def mark(self) -> None:
        tombs = self.repo.tombstones()
        already = {p for packs in tombs.values() for p in packs}
        busy_writers = set(self._live_locks())
        candidates = [p for p in self.repo.pack_names() if p not in already
                      and pack_writer_id(self.repo.path / "packs" / p[:2] / p) not in busy_writers]
        snaps = self.repo.snapshots()
        every = self.repo.pack_names()
        with self._native(every) as reader:
            referenced = self._referenced(reader, snaps)
            doomed: list[str] = []
            repack: list[IndexEntry] = []
            for name in candidates:
                entries = read_index(self.repo.path / "index" / name)
                dead = sum(e.record_len for e in entries if e.id not in referenced)
                total = sum(e.record_len for e in entries) or 1
                if dead == total:
                    doomed.append(name)
                elif dead / total >= self.threshold:
                    doomed.append(name)
                    repack.extend(e for e in entries if e.id in referenced)
                    self.result.packs_repacked += 1
            self._copy_out(reader, list({e.id: e for e in repack}.values()))
        if not doomed:
            return
        gen = max([self.repo.generation(), *tombs]) + 1
        tomb_dir = self.repo.path / "tombstones"
        # The tombstone must be durable before the generation counter names it.
        write_atomic(tomb_dir / str(gen), json.dumps({"packs": sorted(doomed), "time": time.time()}).encode(),
                     self.repo.path / "tmp")
        write_atomic(tomb_dir / "generation", str(gen).encode(), self.repo.path / "tmp")

    def _tmp_owner(self, path: Path) -> str | None:
        """The writer that made a file in tmp/ if known ("" if nobody can finish it any more).

        A pack names its writer in its header; an index being written belongs to
        the writer of its pack, which is already in packs/ (or, gone, makes it garbage).
        """
        if path.suffix == ".pack":
            # no header yet: a writer may be just creating it, so only its age can tell
            return pack_writer_id(path) or None
        if path.suffix == ".idx" and PACK_NAME.fullmatch(path.stem):
            for pack in (path.with_suffix(".pack"), self.repo.path / "packs" / path.stem[:2] / path.stem):
                try:
                    return pack_writer_id(pack)
                except FileNotFoundError:
                    continue
            return ""
        return None

    def clean_tmp(self) -> None:
        """Delete what dead writers left: unpublished packs and indexes, and packs that never got their index.

        Files are listed before the locks are read, and the index after: a writer
        creates its lock before its files and writes a pack's index before it lets
        go of its lock, so a file listed belongs to a writer that the lock reading
        sees if it still runs, and a pack of a writer that has ended is indexed.
        With no live lock at all, nobody but this collector works on the
        repository, and whatever is in tmp/ is garbage.
        """
        tmp_files = list((self.repo.path / "tmp").iterdir())
        pack_files = [path for sub in (self.repo.path / "packs").iterdir() for path in sub.iterdir()]
        live = set(self._live_locks())
        indexed = set(self.repo.pack_names())
        now = time.time()
        for path in tmp_files:
            try:
                owner = self._tmp_owner(path) if live else ""
                stale = (owner is not None and owner not in live) or (
                    owner is None and now - path.stat().st_mtime > TMP_MAX_AGE)
            except FileNotFoundError:  # published or removed by its writer meanwhile
                continue
            if stale:
                path.unlink(missing_ok=True)
                self.result.orphans_deleted += 1
        for path in pack_files:
            if path.name not in indexed and pack_writer_id(path) not in live:
                path.unlink(missing_ok=True)
                self.result.orphans_deleted += 1


def collect_garbage(repo: Repository, repack_threshold: float = REPACK_THRESHOLD) -> GcResult:
    """Delete what no snapshot references, without harming backups that run meanwhile."""
    if not 0 < repack_threshold <= 1:
        raise errors.UsageError("repack threshold must be above 0 and at most 1")
    with Lock(repo.path / "locks", "gc", 0, GC_LOCK).acquire(exclusive=True):
        collector = _Collector(repo, repack_threshold)
        collector.sweep()
        collector.mark()
        collector.result.packs_waiting = 0
        collector.sweep()
        collector.clean_tmp()
        return collector.result
