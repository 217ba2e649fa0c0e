"""The host side's typed model of work: disks, instructions, plans.

An :class:`Instruction` is one guest request after validation, bound to the
domain its channel belongs to. The driver batches instructions; the optimizer
turns a batch into a :class:`Plan` of :class:`WorkUnit` objects, each saying
which instructions it satisfies; the executor carries the units out and answers
every instruction. These types cross the gRPC boundary as the messages of
``proto/hyperback/v1/optimizer.proto`` (``host_agent.optimizer`` converts).
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field

from host_agent.repository import Policy

__all__ = ["DiskRef", "Instruction", "InstructionKind", "Plan", "Policy", "UnitKind", "WorkUnit"]


class InstructionKind(enum.StrEnum):
    BACKUP = "backup"
    RESTORE = "restore"


class UnitKind(enum.StrEnum):
    BACKUP_DISK = "backup-disk"    # one disk of one domain, as the guest sees it
    BACKUP_BASE = "backup-base"    # a backing image shared by several disks, read once
    RESTORE_DISK = "restore-disk"


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

    @property
    def snapshot_name(self) -> str:
        """The repository name of this disk's snapshots: one per domain and serial."""
        return f"{self.domain_uuid}/{self.serial}"


@dataclass(frozen=True)
class Instruction:
    id: str                          # host-assigned, unique for the agent's lifetime
    domain_uuid: str
    request_id: str                  # the guest's id, echoed in the answer
    kind: InstructionKind
    disks: tuple[DiskRef, ...]
    destination: str                 # a repository name from the agent's configuration
    policy: Policy = Policy.INCREMENTAL
    snapshot: str = ""               # restore: snapshot id or "latest"
    received_at: float = 0.0         # time.time() when the host accepted it


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


@dataclass(frozen=True)
class Plan:
    units: tuple[WorkUnit, ...]
    policy: str                      # the policy chain that produced it, e.g. "merge,timing"
    notes: tuple[str, ...] = field(default=())
