"""Repairing a repository's indexes from its packs (docs/repository-format.md, section 9.1).

Packs are never modified and each record names itself in its header, so an index holds nothing
its pack does not: a missing or damaged index is rebuilt from the pack's records, an index that
lists records its pack no longer holds (a truncated pack) is cut down to those it holds, and an
index of a missing pack goes. Only index files change, and only entries that could not be read
anyway are ever removed: a repair never makes things worse.

The new indexes are first written to a scratch directory beside the repository's own packs (a
symbolic link), where the native reader loads them: the records of a rebuilt index are checked
against their ids there, and the snapshots' trees are walked there to name what is lost, so a
dry run tells exactly what ``--yes`` would do and leave.
"""
from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from host_agent import errors
from host_agent.storage import copier
from host_agent.storage.copier import NativeRepository
from host_agent.storage.files import fsync_dir
from host_agent.storage.locks import GC_LOCK, Lock, read_locks
from host_agent.storage.packfile import (
    INDEX_ENTRY,
    PACK_HEADER,
    PACK_MAGIC,
    RECORD_HEADER,
    VERSION,
    IndexEntry,
    read_index,
)
from host_agent.storage.repository import PACK_NAME, PACK_TARGET, Repository
from host_agent.storage.snapshot import BadChunk, Snapshot


@dataclass(frozen=True)
class PackFix:
    """What a repair does to one pack's index."""

    pack: str
    action: str        # "rebuild" (from the pack's records), "trim" (to the records present), "drop"
    reason: str
    entries: int       # entries of the new index (0 for drop)
    removed: tuple[str, ...]  # ids the old index listed that the new one does not (unknown for a rebuild)


@dataclass(frozen=True)
class RepairReport:
    applied: bool
    fixes: tuple[PackFix, ...]
    lost: tuple[BadChunk, ...]              # chunks snapshots need that no index lists afterwards
    unreadable_snapshots: tuple[str, ...]   # snapshots whose tree cannot be read whole afterwards
    snapshots: int

    @property
    def damaged_snapshots(self) -> tuple[str, ...]:
        return tuple(sorted({s for bad in self.lost for s in bad.snapshots} | set(self.unreadable_snapshots)))


def scan_pack(path: Path) -> list[IndexEntry]:
    """The records of a pack, front to back, up to the first impossible or cut-off one."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(PACK_HEADER.size).ljust(PACK_HEADER.size, b"\0")
        magic, version, pack_id, _ = PACK_HEADER.unpack(head)
        if magic != PACK_MAGIC or version != VERSION or pack_id.hex() != path.name:
            return []
        out, offset = [], PACK_HEADER.size
        while offset + RECORD_HEADER.size <= size:
            f.seek(offset)
            cid, btype, comp, reserved, raw_len, stored = RECORD_HEADER.unpack(f.read(RECORD_HEADER.size))
            end = offset + RECORD_HEADER.size + stored
            if btype > 1 or comp > 1 or reserved or end > size:
                break
            out.append(IndexEntry(cid, btype, bool(comp), offset, stored, raw_len))
            offset = end
    return out


def _present(path: Path, entries: list[IndexEntry]) -> list[IndexEntry]:
    """The entries whose record header is in the pack as the index says."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        out = []
        for e in entries:
            if e.offset + e.record_len > size:
                continue
            f.seek(e.offset)
            if RECORD_HEADER.unpack(f.read(RECORD_HEADER.size)) == (
                    e.id, e.type, int(e.compressed), 0, e.raw_len, e.stored_len):
                out.append(e)
    return out


def _encode(entries: list[IndexEntry]) -> bytes:
    return b"".join(INDEX_ENTRY.pack(e.id, e.type, int(e.compressed), 0, e.offset, e.stored_len, e.raw_len)
                    for e in entries)


class _Repairer:
    def __init__(self, repo: Repository, scratch: Path, threads: int) -> None:
        self.repo, self.scratch, self.threads = repo, scratch, threads
        for sub in ("index", "tmp"):
            (scratch / sub).mkdir()
        (scratch / "packs").symlink_to((repo.path / "packs").absolute())
        self.new: dict[str, list[IndexEntry]] = {}   # every pack's index as it will be
        self.fixes: list[PackFix] = []

    def _native(self, names: list[str]) -> NativeRepository:
        native = NativeRepository(str(self.scratch), os.urandom(16), self.repo.config.chunk_size, PACK_TARGET,
                                  self.repo.config.compression_level, self.repo.keys())
        for name in names:
            native.load_index(name)
        return native

    def plan(self) -> None:
        packs = {p.name: p for sub in (self.repo.path / "packs").iterdir() if sub.is_dir()
                 for p in sub.iterdir() if PACK_NAME.fullmatch(p.name)}
        indexed = self.repo.pack_names()
        for name in indexed:
            if name not in packs:
                old = read_index(self.repo.path / "index" / name) if self._readable(name) else []
                self.fixes.append(PackFix(name, "drop", "its pack file is missing", 0,
                                          tuple(e.id.hex() for e in old)))
        rebuilt = []
        for name, path in sorted(packs.items()):
            if not self._readable(name):
                why = "it has no index" if name not in indexed else "its index is damaged"
                self.new[name] = scan_pack(path)
                rebuilt.append((name, why))
                continue
            old = read_index(self.repo.path / "index" / name)
            self.new[name] = _present(path, old)
            if len(self.new[name]) != len(old):
                kept = {e.offset for e in self.new[name]}
                self.fixes.append(PackFix(name, "trim", "records it lists are missing from the pack "
                                          "(truncated?)", len(self.new[name]),
                                          tuple(e.id.hex() for e in old if e.offset not in kept)))
        for name, entries in self.new.items():
            copier.publish_index(self.scratch, name, _encode(entries))
        self._check_rebuilt(rebuilt)

    def _readable(self, name: str) -> bool:
        try:
            read_index(self.repo.path / "index" / name)
        except (errors.RepositoryError, FileNotFoundError):
            return False
        return True

    def _check_rebuilt(self, rebuilt: list[tuple[str, str]]) -> None:
        """Keep of a rebuilt index only the records that read back as their id."""
        if not rebuilt:
            return
        with self._native([name for name, _ in rebuilt]) as native:
            bad, total = native.verify(10000, self.threads, copier.Progress(), max_report=1 << 20)
        if total > len(bad):
            raise errors.IntegrityError(f"{total} damaged records: too many to rebuild the indexes safely")
        damaged = set(bad)
        for name, why in rebuilt:
            entries = [e for e in self.new[name] if e.id not in damaged]
            if len(entries) != len(self.new[name]):
                self.new[name] = entries
                copier.publish_index(self.scratch, name, _encode(entries))
            self.fixes.append(PackFix(name, "rebuild", why, len(entries), ()))

    def losses(self, snaps: Sequence[Snapshot]) -> tuple[tuple[BadChunk, ...], tuple[str, ...]]:
        with self._native(sorted(self.new)) as native:
            users, unreadable = self.repo.referenced(native, snaps)
            lost = tuple(BadChunk(cid.hex(), tuple(s)) for cid, s in users.items() if cid not in native)
        return lost, tuple(unreadable)

    def apply(self) -> None:
        for fix in self.fixes:
            if fix.action == "drop":
                (self.repo.path / "index" / fix.pack).unlink(missing_ok=True)
            else:
                copier.publish_index(self.repo.path, fix.pack, _encode(self.new[fix.pack]))
        fsync_dir(self.repo.path / "index")


def _refuse_if_busy(repo: Repository, then: str) -> None:
    busy = [lk for lk in read_locks(repo.path / "locks") if lk.name != GC_LOCK and not lk.is_stale()]
    if busy:
        raise errors.RepositoryBusy(f"{len(busy)} other process(es) work on {repo.path} (e.g. a "
                                    f"{busy[0].kind}, pid {busy[0].pid} on {busy[0].host}); {then}")


def repair(repo: Repository, apply: bool = False, threads: int | None = None) -> RepairReport:
    """Plan (and with ``apply``, write) the index repairs; report what snapshots lose after them."""
    with Lock(repo.path / "locks", "repair", 0, GC_LOCK).acquire(exclusive=True):
        _refuse_if_busy(repo, "repair when they have finished")
        snaps = repo.snapshots()
        try:
            with tempfile.TemporaryDirectory(prefix="hyperback-repair-") as scratch:
                repairer = _Repairer(repo, Path(scratch), threads or os.cpu_count() or 1)
                repairer.plan()
                lost, unreadable = repairer.losses(snaps)
                # a writer that started during the plan may have loaded an index about to change
                _refuse_if_busy(repo, "nothing was changed: repair again when they have finished")
                if apply:
                    repairer.apply()
        except OSError as e:  # the medium fails: what repair is for; say where, never a traceback
            raise errors.RepositoryIOError(f"repair stopped at {e.filename or repo.path}: {e.strerror}; "
                                           "every index replaced so far is whole (each is written aside "
                                           "and renamed)") from e
    fixes = tuple(sorted(repairer.fixes, key=lambda f: f.pack))
    return RepairReport(apply, fixes, lost, unreadable, len(snaps))
