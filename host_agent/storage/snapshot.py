"""A snapshot document (docs/repository-format.md, section 5.1), and what backup, restore, verify
and check report about snapshots.

The document is the commit record of a backup: a snapshot exists once its document is in
``snapshots/``. Documents written before the ``checkpoint`` field existed named the checkpoint at
the end of their ``source`` (`` [checkpoint NAME]``); they are read as if they had the field.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from host_agent.model import ChangeDetection, Fallback, FallbackNote, Policy
from host_agent.storage.sourcefile import SourceFile

FORMAT_VERSION = 1  # of the repository format; snapshot documents and the config carry it
SNAPSHOT_ID = re.compile(r"[0-9a-f]{16}")
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}(/[A-Za-z0-9][A-Za-z0-9._-]{0,63}){0,3}")
_LEGACY_CHECKPOINT = re.compile(r" \[checkpoint (hyperback-[0-9A-Za-z_.-]+)\]$")


@dataclass(frozen=True)
class TreeRef:
    """Where a snapshot's map lives (``host_agent.storage.maptree``): root page id (None for an
    empty image), height, chunk count."""

    root: bytes | None
    height: int
    entries: int


@dataclass(frozen=True)
class SnapshotStats:
    bytes_read: int
    bytes_new: int
    bytes_stored: int
    bytes_changed: int
    seconds: float


def vm_snapshot_name(domain_uuid: str, item: str) -> str:
    """The name of the snapshots holding one item of a domain's definition (section 5.3): three
    parts, so that it never meets a disk's ``UUID/SERIAL``."""
    return f"{domain_uuid}/vm/{item}"


@dataclass(frozen=True)
class VmFile:
    """A file of the domain beside its disks (NVRAM, a TPM state file), stored as a snapshot of its own."""

    role: str        # "nvram" or "tpm"
    path: str        # nvram: the absolute path in <os><nvram>; tpm: relative to the domain's swtpm state dir
    snapshot: str    # id of the snapshot holding the file's bytes
    mode: int = 0o600

    def to_json(self) -> dict[str, Any]:
        return {"role": self.role, "path": self.path, "snapshot": self.snapshot, "mode": self.mode}

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> VmFile:
        return cls(str(doc["role"]), str(doc["path"]), str(doc["snapshot"]), int(doc.get("mode", 0o600)))


@dataclass(frozen=True)
class VmRef:
    """The domain as it was when a disk snapshot was taken (docs/repository-format.md, 5.3): its
    definition and files, each stored as a snapshot of its own, and the run that ties the domain's
    disk snapshots together."""

    run: str                         # 16 hex: the same in every disk snapshot of one backup of the domain
    jobs: tuple[str, ...]            # instruction (job) ids the run served
    domain_uuid: str
    domain_name: str
    definition: str                  # id of the snapshot holding the persistent domain XML
    files: tuple[VmFile, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {"run": self.run, "jobs": list(self.jobs), "domain_uuid": self.domain_uuid,
                "domain_name": self.domain_name, "definition": self.definition,
                "files": [f.to_json() for f in self.files]}

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> VmRef:
        return cls(str(doc["run"]), tuple(str(j) for j in doc.get("jobs", ())), str(doc["domain_uuid"]),
                   str(doc["domain_name"]), str(doc["definition"]),
                   tuple(VmFile.from_json(f) for f in doc.get("files", ())))


@dataclass(frozen=True)
class FilesRef:
    """A file-level snapshot's ``files`` field (docs/restore.md, "Path-level backups"): its image is
    a chunk-aligned pax archive (``host_agent.storage.filesnap``) of ``paths`` of the file system
    on ``partition`` (0: the disk formatted whole), followed, from ``catalog_offset`` (a chunk
    boundary), by the catalog's ``catalog_size`` bytes."""

    format: str
    partition: int
    paths: tuple[str, ...]
    catalog_offset: int
    catalog_size: int

    def to_json(self) -> dict[str, Any]:
        return {"format": self.format, "partition": self.partition, "paths": list(self.paths),
                "catalog": {"offset": self.catalog_offset, "size": self.catalog_size}}

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> FilesRef:
        return cls(str(doc["format"]), int(doc["partition"]), tuple(map(str, doc["paths"])),
                   int(doc["catalog"]["offset"]), int(doc["catalog"]["size"]))


@dataclass(frozen=True)
class Snapshot:
    id: str
    name: str
    policy: Policy
    parent: str | None
    time: datetime
    source: str
    size: int
    chunk_size: int
    tree: TreeRef
    change_detection: ChangeDetection
    stats: SnapshotStats
    checkpoint: str | None = None   # the hypervisor checkpoint taken with it: where the next one starts
    files: FilesRef | None = None   # a file-level snapshot: what its image holds
    vm: VmRef | None = None         # a disk of a domain: the domain's definition stored with it
    labels: tuple[str, ...] = ()    # given at backup; an annotation record replaces them (format 5.5)
    source_file: SourceFile | None = None  # an image file's identity: the next backup may skip it
    fallback: FallbackNote | None = None   # why it compared instead of reading a dirty bitmap

    def to_json(self) -> dict[str, Any]:
        doc = {
            "version": FORMAT_VERSION, "id": self.id, "name": self.name, "policy": self.policy.value,
            "parent": self.parent, "time": self.time.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
            "source": self.source, "size": self.size, "chunk_size": self.chunk_size,
            "tree": {"root": self.tree.root.hex() if self.tree.root else None,
                     "height": self.tree.height, "entries": self.tree.entries},
            "change_detection": self.change_detection.value, "stats": asdict(self.stats),
            "checkpoint": self.checkpoint, "vm": self.vm.to_json() if self.vm else None,
        }
        if self.files is not None:  # only file-level snapshots carry it: image documents are as before
            doc["files"] = self.files.to_json()
        if self.labels:  # absent when none: documents without labels are as before
            doc["labels"] = list(self.labels)
        if self.source_file is not None:  # absent for block devices and layouts: documents as before
            doc["source_file"] = self.source_file.to_json()
        if self.fallback is not None:  # absent unless a dirty bitmap could not serve: documents as before
            doc["fallback"] = {"reason": self.fallback.reason.value, "text": str(self.fallback)}
        return doc

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> Snapshot:
        tree = doc["tree"]
        return cls(
            id=doc["id"], name=doc["name"], policy=Policy(doc["policy"]), parent=doc["parent"],
            time=datetime.strptime(doc["time"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC),
            source=doc["source"], size=int(doc["size"]), chunk_size=int(doc["chunk_size"]),
            tree=TreeRef(bytes.fromhex(tree["root"]) if tree["root"] else None, int(tree["height"]),
                         int(tree["entries"])),
            change_detection=ChangeDetection(doc["change_detection"]),
            stats=SnapshotStats(**doc["stats"]),
            checkpoint=doc["checkpoint"] if "checkpoint" in doc else _legacy_checkpoint(doc["source"]),
            files=FilesRef.from_json(doc["files"]) if doc.get("files") else None,
            vm=VmRef.from_json(doc["vm"]) if doc.get("vm") else None,
            labels=tuple(map(str, doc.get("labels", ()))),
            source_file=SourceFile.from_json(doc["source_file"]) if doc.get("source_file") else None,
            fallback=_fallback(doc.get("fallback")))


def _fallback(doc: Any) -> FallbackNote | None:
    """The ``fallback`` field (5.1); a reason this reader does not know (a newer writer's) is OTHER."""
    if not isinstance(doc, dict):
        return None
    value = str(doc.get("reason"))
    reason = Fallback(value) if value in {r.value for r in Fallback} else Fallback.OTHER
    return FallbackNote(reason, str(doc.get("text", "")))


def _legacy_checkpoint(source: str) -> str | None:
    """The checkpoint a snapshot written before the ``checkpoint`` field named at the end of its
    ``source`` (docs/repository-format.md, 5.1); None if it names none."""
    m = _LEGACY_CHECKPOINT.search(source)
    return m.group(1) if m else None


@dataclass(frozen=True)
class BackupResult:
    snapshot: Snapshot
    notes: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        s = self.snapshot
        return {"snapshot": s.id, "name": s.name, "policy": s.policy.value,
                "change_detection": s.change_detection.value, "size": s.size,
                **asdict(s.stats), "notes": list(self.notes),
                "unchanged_since": s.source_file.unchanged_since if s.source_file else None}


@dataclass(frozen=True)
class RestoreResult:
    snapshot: Snapshot
    target: str
    bytes_written: int
    bytes_read: int
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return {"snapshot": self.snapshot.id, "target": self.target, "size": self.snapshot.size,
                "bytes_written": self.bytes_written, "bytes_read": self.bytes_read,
                "seconds": self.seconds}


@dataclass(frozen=True)
class BadChunk:
    id: str
    snapshots: tuple[str, ...]
    # True when the users are not known for sure: snapshots whose damaged map may reach the chunk
    possibly: bool = False


@dataclass(frozen=True)
class VerifyReport:
    sample_percent: float
    bytes_checked: int
    bad: tuple[BadChunk, ...]
    bad_total: int
    seconds: float
    # snapshots whose tree could not be read whole: they may use bad chunks not attributed above
    unreadable_snapshots: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return self.bad_total == 0


@dataclass(frozen=True)
class CheckReport:
    snapshots: int
    chunks_referenced: int
    missing: tuple[BadChunk, ...]
    unreadable_snapshots: tuple[str, ...]
    packs_without_file: tuple[str, ...]
    problems: tuple[str, ...] = field(default=())

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unreadable_snapshots or self.packs_without_file or self.problems)
