"""The host side's typed model of work: disks, instructions, plans, outcomes, and the vocabulary
they share (policy, change detection, placement).

An :class:`Instruction` is one request (a guest's, or an operator's) after validation, bound to
the domain its channel belongs to. The driver batches instructions; the optimizer turns a batch
into a :class:`Plan` of :class:`WorkUnit` objects, each saying which instructions it satisfies; the
executor carries the units out and gives each instruction its :class:`Outcome`, which the agent's
guest door answers with. Each type has one conversion at each edge: the wire protocol
(``host_agent.agent.intake`` in, ``host_agent.agent.guests`` out), protobuf
(``host_agent.protobuf``), the journal (``host_agent.agent.journal``).
"""
from __future__ import annotations

import enum
import hashlib
import posixpath
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

__all__ = ["MAX_PATHS", "STRENGTH", "ApplianceFootprint", "ChangeDetection", "DiskRef", "DiskResult",
           "Fallback", "FallbackNote", "Instruction", "InstructionKind", "Outcome", "PathSelection",
           "Placement", "Plan", "Policy", "RequestId", "UnitKind", "VmFootprint", "WorkUnit", "base_name",
           "fallback_of", "normalize_path", "outermost"]

RequestId = int | str
"""A guest's request id, of the JSON type the guest chose: its answer carries it back unchanged."""


class Policy(enum.StrEnum):
    """How a backup is made: what it reads and compares against (every snapshot restores alone)."""

    FULL = "full"                  # everything read
    INCREMENTAL = "incremental"    # what changed since the latest snapshot of the disk
    DIFFERENTIAL = "differential"  # what changed since the latest full snapshot of the disk


class ChangeDetection(enum.StrEnum):
    """How a backup found what changed since its base: one vocabulary from the disk's view through
    the snapshot document to the guest's answer (which says ``full-read`` for the first three)."""

    NONE = "none"                      # no base: everything read (a full backup)
    CHANGE_LIST = "change-list"        # only the extents a caller listed were read
    COMPARISON = "comparison"          # everything read, each chunk compared with the base's
    DIRTY_BITMAP = "dirty-bitmap"      # only what QEMU's dirty bitmap marks since the base's checkpoint
    ALLOCATION_MAP = "allocation-map"  # only the overlay's own clusters, over a stored shared base


class Fallback(enum.StrEnum):
    """Why a backup with a base could not read a dirty bitmap and compared every chunk instead: the
    snapshot document's ``fallback.reason`` (docs/repository-format.md, 5.1) and the metrics' label."""

    NO_CHECKPOINT = "no-checkpoint"            # the base snapshot records no checkpoint to start from
    NO_RECORD = "no-record"                    # neither libvirt nor hyperback's record has the checkpoint
    NOT_TRACKED = "not-tracked"                # the checkpoint does not track the disk (raw, qcow2 v2, added)
    BITMAP_MISSING = "bitmap-missing"          # the bitmap is not on the disk (QEMU killed or restarted)
    BITMAP_INCONSISTENT = "bitmap-inconsistent"  # QEMU flagged the bitmap inconsistent (unclean exit)
    DISK_REPLACED = "disk-replaced"            # another image file than the one the checkpoint tracked
    BASE_PRUNED = "base-pruned"                # the snapshot the chain went on from was forgotten
    OFFLINE = "offline"                        # read from a shut-off domain's images: no checkpoint there
    OTHER = "other"                            # any other reason (the text says which)


class FallbackNote(str):
    """The text that says why a disk was compared, carrying its :class:`Fallback` reason: a ``str``, so
    it goes wherever a view's note goes, and the reason is set where the fault is found, never parsed
    back out of the text (:func:`fallback_of`)."""

    reason: Fallback

    def __new__(cls, reason: Fallback, text: str) -> FallbackNote:
        note = super().__new__(cls, text)
        note.reason = reason
        return note


def fallback_of(note: str) -> Fallback:
    """The reason a view's note carries (OTHER for a plain text)."""
    return note.reason if isinstance(note, FallbackNote) else Fallback.OTHER


STRENGTH = {Policy.INCREMENTAL: 1, Policy.DIFFERENTIAL: 2, Policy.FULL: 3}
"""A stronger policy serves a request for a weaker one (a full backup answers an incremental)."""


def normalize_path(path: str) -> str:
    """An image path compared lexically: the optimizer may run elsewhere and cannot resolve links."""
    return posixpath.normpath(path)


def base_name(image: str) -> str:
    """The repository name of a shared backing image: ``base/`` and 16 hex digits of its path's SHA-256."""
    return "base/" + hashlib.sha256(normalize_path(image).encode()).hexdigest()[:16]


class InstructionKind(enum.StrEnum):
    BACKUP = "backup"
    RESTORE = "restore"
    INSTANT_RESTORE = "instant-restore"  # never planned: the agent runs it itself (agent/instant.py)


class UnitKind(enum.StrEnum):
    BACKUP_DISK = "backup-disk"    # one disk of one domain, as the guest sees it
    BACKUP_BASE = "backup-base"    # a backing image shared by several disks, read once
    BACKUP_PATHS = "backup-paths"  # chosen paths of one file system of one disk (a file-level snapshot)
    RESTORE_DISK = "restore-disk"


class Placement(enum.StrEnum):
    """Where a backup's data path runs when its destination's media sit on another host."""

    AUTO = "auto"            # let the colocate policy choose (operators' default; never in a plan)
    LOCAL = "local"          # the media are on this host: nothing crosses the LAN
    STREAM = "stream"        # this host streams the new data to the media host's service
    MIGRATE = "migrate"      # live-migrate the VM to the media host, back it up there, move it back
    COLD_MOVE = "cold-move"  # stop the VM, define and boot it on the media host, and the same way back
    APPLIANCE = "appliance"  # bring the destination's backup appliance VM here, stream to it inside this
    #                          host, then send it on (the next host in its queue, or home)


@dataclass(frozen=True)
class VmFootprint:
    """What moving a running domain would cost, measured on its host (``host_agent.colocation.visits``)."""

    domain_uuid: str
    memory_bytes: int                # configured RAM
    touched_bytes: int               # estimated non-zero RAM: what one live migration sends
    dirty_bytes_per_second: float    # how fast the guest rewrites memory (resent during a migration)
    live_migratable: bool            # False with host devices or a 'no' in the domain's metadata
    movable: bool                    # every disk on storage the media host sees too
    why_not: str = ""                # why it cannot be live-migrated or moved, for people


@dataclass(frozen=True)
class ApplianceFootprint:
    """The backup appliance VM serving a destination, measured on the other host it runs on now
    (``host_agent.colocation.appliance``): what bringing it to the sending host would cost."""

    destination: str
    appliance: str                   # its name in the inventory
    footprint: VmFootprint


@dataclass(frozen=True)
class DiskRef:
    """A disk of a domain, resolved on the host from the live domain XML (never from the guest)."""

    domain_uuid: str
    domain_name: str
    serial: str
    target: str                      # e.g. "vda"
    path: str                        # the active image on shared storage
    format: str                      # "raw" or "qcow2"
    size: int                        # virtual size in bytes
    backing_chain: tuple[str, ...] = ()  # backing images, nearest first
    allocated: int = 0               # bytes of the image that hold data (0: not measured)

    @property
    def snapshot_name(self) -> str:
        """The repository name of this disk's snapshots: one per domain and serial."""
        return f"{self.domain_uuid}/{self.serial}"

    def paths_snapshot_name(self, partition: int) -> str:
        """The repository name of the file-level snapshots of one file system of this disk."""
        return f"{self.domain_uuid}/{self.serial}/paths-{partition}"


MAX_PATHS = 64
"""Paths one path-level backup stores at most (the wire protocol's bound, and a merged unit's)."""


def outermost(paths: Iterable[str]) -> tuple[str, ...]:
    """``paths`` without those inside another of them (``/usr`` covers ``/usr/lib``), in order."""
    unique = list(dict.fromkeys(paths))
    return tuple(p for p in unique if not any(q != p and (q == "/" or p.startswith(q + "/")) for q in unique))


@dataclass(frozen=True)
class PathSelection:
    """What a path-level backup stores: paths of the file system on one partition of a disk (0: the
    disk formatted whole). The paths are absolute in that file system, plain (no ``.``/``..``),
    distinct, checked once at intake (``host_agent.agent.paths.checked_paths``)."""

    partition: int
    paths: tuple[str, ...]

    def covers(self, other: PathSelection) -> bool:
        """It stores every path ``other`` asks for (each, or a folder above it)."""
        return self.partition == other.partition and all(
            any(mine == "/" or path == mine or path.startswith(mine + "/") for mine in self.paths)
            for path in other.paths)


@dataclass(frozen=True)
class Instruction:
    id: str                          # host-assigned, unique for the agent's lifetime
    domain_uuid: str
    request_id: RequestId            # the guest's id (an operator's idempotency key), echoed back
    kind: InstructionKind
    disks: tuple[DiskRef, ...]
    destination: str                 # a repository name from the agent's configuration
    policy: Policy = Policy.INCREMENTAL
    snapshot: str = ""               # restore: snapshot id or "latest"
    received_at: float = 0.0         # time.time() when the host accepted it
    placement: Placement = Placement.AUTO  # an operator's forced choice; guests cannot set it
    paths: PathSelection | None = None     # a path-level backup of the one disk's file system

    @property
    def unit_kind(self) -> UnitKind:
        """The kind of unit that serves each of its disks."""
        if self.kind is InstructionKind.RESTORE:
            return UnitKind.RESTORE_DISK
        return UnitKind.BACKUP_PATHS if self.paths is not None else UnitKind.BACKUP_DISK

    def snapshot_name(self, disk: DiskRef) -> str:
        """The repository name its unit for ``disk`` writes or reads."""
        return disk.snapshot_name if self.paths is None else disk.paths_snapshot_name(self.paths.partition)


@dataclass(frozen=True)
class WorkUnit:
    id: str
    kind: UnitKind
    source: str                      # image path to read (backup) or snapshot spec (restore)
    snapshot_name: str               # repository name written or read
    destination: str
    policy: Policy
    satisfies: tuple[str, ...]       # instruction ids this unit answers (in part)
    disk: DiskRef | None = None      # the disk, for per-disk units
    depends_on: tuple[str, ...] = ()  # units that must finish first (a shared base)
    not_before: float = 0.0          # time.time() before which the unit must not start
    reason: str = ""                 # why the optimizer planned it so, for people
    placement: Placement = Placement.LOCAL
    target_host: str = ""            # MIGRATE / COLD_MOVE: where the VM goes; STREAM: the media host
    predicted_stream_bytes: int = 0  # LAN bytes the colocate policy predicts for streaming...
    predicted_move_bytes: int = 0    # ... and for moving the VM there and back
    predicted_read_bytes: int = 0    # bytes its backup will read from the disk where it runs (colocate)
    paths: PathSelection | None = None  # BACKUP_PATHS: what it stores


@dataclass(frozen=True)
class Plan:
    units: tuple[WorkUnit, ...]
    policy: str                      # the policy chain that produced it, e.g. "merge,timing"
    notes: tuple[str, ...] = field(default=())


@dataclass(frozen=True)
class DiskResult:
    """What happened to one disk of an instruction."""

    serial: str
    snapshot: str
    bytes_read: int
    bytes_new: int
    seconds: float
    change_detection: ChangeDetection | None  # None for a restore
    note: str = ""
    new_serial: str | None = None   # restore: the disk the snapshot was restored to
    offline: bool = False           # backup: read while the domain was shut off, without a guest
    bytes_stored: int = 0           # backup: what its new chunks take in the repository (compressed)
    fallback: Fallback | None = None  # backup with a base: why it compared instead of a dirty bitmap


OFFLINE_NOTE = FallbackNote(Fallback.OFFLINE, "offline: read while the domain was shut off")
"""What an offline backup's result says."""


@dataclass
class Outcome:
    """What one instruction gets back, filled in as its units run."""

    instruction: Instruction
    disks: list[DiskResult] = field(default_factory=list)
    error: str | None = None
    started: float = field(default_factory=time.monotonic)
    moved_bytes: int = 0            # migration streams sent to back it up on another host

    @property
    def offline(self) -> bool:
        """Every disk was read while the domain was shut off (no guest took part)."""
        return bool(self.disks) and all(d.offline for d in self.disks)
