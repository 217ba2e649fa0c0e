"""The model's protobuf form: the one conversion between ``host_agent.model`` and the messages of
``proto/hyperback/v1/optimizer.proto``, which the optimizer, operator and media APIs share.

Each enum has one table here, used both ways. Reading a message is strict: an enum value this
side does not know, or a time that is not a finite non-negative number, raises
:class:`~host_agent.errors.MalformedMessage` naming where it was (``where``) and which field;
each service answers it with INVALID_ARGUMENT. Where an API lets a field be left unspecified, the
caller says what that means (``unspecified=``): an operator who names no policy asks for an
incremental; a plan's unit that names no placement is local.

Errors cross gRPC the same way in every service: :func:`grpc_status` is the status code an error
of the tree (``host_agent.errors``) is answered with.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Final, TypeVar

import grpc

from host_agent import errors
from host_agent._proto.hyperback.v1 import optimizer_pb2 as pb
from host_agent.errors import MalformedMessage
from host_agent.model import (
    ApplianceFootprint,
    DiskRef,
    Instruction,
    InstructionKind,
    PathSelection,
    Placement,
    Policy,
    UnitKind,
    VmFootprint,
    WorkUnit,
)

_E = TypeVar("_E")

_POLICY: Final[Mapping[Policy, pb.Policy.ValueType]] = {
    Policy.FULL: pb.POLICY_FULL, Policy.INCREMENTAL: pb.POLICY_INCREMENTAL,
    Policy.DIFFERENTIAL: pb.POLICY_DIFFERENTIAL}
_KIND: Final[Mapping[InstructionKind, pb.InstructionKind.ValueType]] = {
    InstructionKind.BACKUP: pb.INSTRUCTION_KIND_BACKUP, InstructionKind.RESTORE: pb.INSTRUCTION_KIND_RESTORE,
    InstructionKind.INSTANT_RESTORE: pb.INSTRUCTION_KIND_INSTANT_RESTORE}
_UNIT_KIND: Final[Mapping[UnitKind, pb.UnitKind.ValueType]] = {
    UnitKind.BACKUP_DISK: pb.UNIT_KIND_BACKUP_DISK, UnitKind.BACKUP_BASE: pb.UNIT_KIND_BACKUP_BASE,
    UnitKind.RESTORE_DISK: pb.UNIT_KIND_RESTORE_DISK, UnitKind.BACKUP_PATHS: pb.UNIT_KIND_BACKUP_PATHS}
_PLACEMENT: Final[Mapping[Placement, pb.Placement.ValueType]] = {
    Placement.AUTO: pb.PLACEMENT_UNSPECIFIED, Placement.LOCAL: pb.PLACEMENT_LOCAL,
    Placement.STREAM: pb.PLACEMENT_STREAM, Placement.MIGRATE: pb.PLACEMENT_MIGRATE,
    Placement.COLD_MOVE: pb.PLACEMENT_COLD_MOVE, Placement.APPLIANCE: pb.PLACEMENT_APPLIANCE}


def _back(table: Mapping[_E, int]) -> dict[int, _E]:
    return {int(number): member for member, number in table.items()}


_POLICY_BACK: Final = _back(_POLICY)
_KIND_BACK: Final = _back(_KIND)
_UNIT_KIND_BACK: Final = _back(_UNIT_KIND)
_PLACEMENT_BACK: Final = _back(_PLACEMENT)


def _from_enum(members: Mapping[int, _E], value: int, where: str, field: str, unspecified: _E | None) -> _E:
    if value == 0 and unspecified is not None:
        return unspecified
    member = members.get(value)
    if member is None:
        what = "unspecified" if value == 0 else f"an unknown value ({value})"
        raise MalformedMessage(f"{where}: {field} is {what}")
    return member


def time_from_pb(value: float, where: str, field: str) -> float:
    """A ``time.time()`` value from a message: finite and not negative."""
    if not (math.isfinite(value) and value >= 0):
        raise MalformedMessage(f"{where}: {field} {value!r} is not a time")
    return value


# --------------------------------------------------------------------------- enums

def policy_to_pb(policy: Policy) -> pb.Policy.ValueType:
    return _POLICY[policy]


def policy_from_pb(value: int, where: str, unspecified: Policy | None = None) -> Policy:
    return _from_enum(_POLICY_BACK, value, where, "policy", unspecified)


def placement_to_pb(placement: Placement) -> pb.Placement.ValueType:
    return _PLACEMENT[placement]


def placement_from_pb(value: int, where: str, unspecified: Placement) -> Placement:
    return _from_enum(_PLACEMENT_BACK, value, where, "placement", unspecified)


def kind_to_pb(kind: InstructionKind) -> pb.InstructionKind.ValueType:
    return _KIND[kind]


# --------------------------------------------------------------------------- messages

def disk_to_pb(disk: DiskRef) -> pb.DiskRef:
    return pb.DiskRef(domain_uuid=disk.domain_uuid, domain_name=disk.domain_name, serial=disk.serial,
                      target=disk.target, path=disk.path, format=disk.format, size=disk.size,
                      backing_chain=disk.backing_chain, allocated=disk.allocated)


def disk_from_pb(m: pb.DiskRef) -> DiskRef:
    return DiskRef(domain_uuid=m.domain_uuid, domain_name=m.domain_name, serial=m.serial, target=m.target,
                   path=m.path, format=m.format, size=m.size, backing_chain=tuple(m.backing_chain),
                   allocated=m.allocated)


def paths_to_pb(selection: PathSelection | None) -> pb.PathSelection | None:
    if selection is None:
        return None
    return pb.PathSelection(partition=selection.partition, paths=selection.paths)


def paths_from_pb(m: pb.Instruction | pb.WorkUnit, where: str) -> PathSelection | None:
    if not m.HasField("paths"):
        return None
    if not m.paths.paths:
        raise MalformedMessage(f"{where}: paths names no path")
    return PathSelection(m.paths.partition, tuple(m.paths.paths))


def instruction_to_pb(i: Instruction) -> pb.Instruction:
    """The optimizer sees a guest's request id as text: it only names it in reasons."""
    return pb.Instruction(id=i.id, domain_uuid=i.domain_uuid, request_id=str(i.request_id),
                          kind=_KIND[i.kind], disks=[disk_to_pb(d) for d in i.disks],
                          destination=i.destination, policy=_POLICY[i.policy], snapshot=i.snapshot,
                          received_at=i.received_at, placement=_PLACEMENT[i.placement],
                          paths=paths_to_pb(i.paths))


def instruction_from_pb(m: pb.Instruction, where: str) -> Instruction:
    return Instruction(id=m.id, domain_uuid=m.domain_uuid, request_id=m.request_id,
                       kind=_from_enum(_KIND_BACK, m.kind, where, "kind", None),
                       disks=tuple(disk_from_pb(d) for d in m.disks), destination=m.destination,
                       policy=policy_from_pb(m.policy, where), snapshot=m.snapshot,
                       received_at=time_from_pb(m.received_at, where, "received_at"),
                       placement=placement_from_pb(m.placement, where, Placement.AUTO),
                       paths=paths_from_pb(m, where))


def unit_to_pb(u: WorkUnit) -> pb.WorkUnit:
    return pb.WorkUnit(id=u.id, kind=_UNIT_KIND[u.kind], source=u.source, snapshot_name=u.snapshot_name,
                       destination=u.destination, policy=_POLICY[u.policy], satisfies=u.satisfies,
                       disk=disk_to_pb(u.disk) if u.disk else None, depends_on=u.depends_on,
                       not_before=u.not_before, reason=u.reason, placement=_PLACEMENT[u.placement],
                       target_host=u.target_host, predicted_stream_bytes=u.predicted_stream_bytes,
                       predicted_move_bytes=u.predicted_move_bytes, paths=paths_to_pb(u.paths),
                       predicted_read_bytes=u.predicted_read_bytes)


def unit_from_pb(m: pb.WorkUnit, where: str) -> WorkUnit:
    return WorkUnit(id=m.id, kind=_from_enum(_UNIT_KIND_BACK, m.kind, where, "kind", None),
                    source=m.source,
                    snapshot_name=m.snapshot_name, destination=m.destination,
                    policy=policy_from_pb(m.policy, where), satisfies=tuple(m.satisfies),
                    disk=disk_from_pb(m.disk) if m.HasField("disk") else None,
                    depends_on=tuple(m.depends_on),
                    not_before=time_from_pb(m.not_before, where, "not_before"),
                    reason=m.reason, placement=placement_from_pb(m.placement, where, Placement.LOCAL),
                    target_host=m.target_host, predicted_stream_bytes=m.predicted_stream_bytes,
                    predicted_move_bytes=m.predicted_move_bytes, paths=paths_from_pb(m, where),
                    predicted_read_bytes=m.predicted_read_bytes)


def footprint_to_pb(f: VmFootprint) -> pb.VmFootprint:
    return pb.VmFootprint(domain_uuid=f.domain_uuid, memory_bytes=f.memory_bytes,
                          touched_bytes=f.touched_bytes, dirty_bytes_per_second=f.dirty_bytes_per_second,
                          live_migratable=f.live_migratable, movable=f.movable, why_not=f.why_not)


def footprint_from_pb(m: pb.VmFootprint) -> VmFootprint:
    if not (math.isfinite(m.dirty_bytes_per_second) and m.dirty_bytes_per_second >= 0):
        raise MalformedMessage(f"footprint of {m.domain_uuid}: dirty rate {m.dirty_bytes_per_second!r}")
    return VmFootprint(m.domain_uuid, m.memory_bytes, m.touched_bytes, m.dirty_bytes_per_second,
                       m.live_migratable, m.movable, m.why_not)


def appliance_to_pb(a: ApplianceFootprint) -> pb.ApplianceFootprint:
    return pb.ApplianceFootprint(destination=a.destination, appliance=a.appliance,
                                 footprint=footprint_to_pb(a.footprint))


def appliance_from_pb(m: pb.ApplianceFootprint) -> ApplianceFootprint:
    return ApplianceFootprint(m.destination, m.appliance, footprint_from_pb(m.footprint))


# --------------------------------------------------------------------------- errors

_STATUS: Final[tuple[tuple[type[errors.HyperbackError], grpc.StatusCode], ...]] = (
    (errors.UnknownDestination, grpc.StatusCode.NOT_FOUND),
    (errors.SnapshotNotFound, grpc.StatusCode.NOT_FOUND),
    (errors.SessionExpired, grpc.StatusCode.ABORTED),
    (errors.UnknownDisk, grpc.StatusCode.NOT_FOUND),
    (errors.UnknownJob, grpc.StatusCode.NOT_FOUND),
    (errors.UnknownSchedule, grpc.StatusCode.NOT_FOUND),
    (errors.JobFinished, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.AccessDenied, grpc.StatusCode.PERMISSION_DENIED),
    (errors.UsageError, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.RepositoryFull, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.IntegrityError, grpc.StatusCode.DATA_LOSS),
    (errors.RepositoryError, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.EnvironmentProblem, grpc.StatusCode.UNAVAILABLE),
)


def grpc_status(error: errors.HyperbackError) -> grpc.StatusCode:
    """The status code ``error`` is answered with (INTERNAL for a bug)."""
    return next((code for cls, code in _STATUS if isinstance(error, cls)), grpc.StatusCode.INTERNAL)
