"""The ``colocate`` policy: keep backup data off the LAN.

For backup units whose destination's media sit on another host (``context.remote_destinations``),
predicts the LAN bytes of the two ways to get the data there and picks the smaller:

- *stream*: the sending host sends the new data to the media host's service. Per disk: the stored
  size of the destination's latest snapshot of that disk (``context.held``) for an incremental or
  differential (the data a deduplicating stream sends is what changed, and the last change is the
  best guess of the next), else the disk's allocated bytes (``DiskRef.allocated``, its size if
  unmeasured); times ``stream_overhead`` (default 1.03: TCP/IP and framing).
- *read*: what each disk's backup will read where it runs (``WorkUnit.predicted_read_bytes``, in
  the reason too): the dirty extents where the chain holds, guessed like the stream from what the
  destination last stored, else the disk's allocated bytes. A qcow2 disk's chain survives a move
  (its bitmaps are in the image, its checkpoint records in the domain's metadata); a raw disk's
  bitmap lives in its QEMU process and stays behind, so a moved raw disk is read whole. This does
  not cross the LAN (shared storage is read where the VM runs either way) and does not decide.
- *migrate*: the VM goes to the media host and back, each way sending its touched memory plus what
  the guest dirties meanwhile: ``2 * (touched + dirty_rate * touched / lan_bandwidth) *
  migration_overhead`` (defaults: ``lan_bandwidth=125000000`` bytes/s, ``migration_overhead=1.02``).

A guest that dirties memory at half the LAN bandwidth or more streams: pre-copy would not
converge (the migration would run into the agent's ``move_timeout`` and fail the job).
Migrating wins when it costs less than ``1 - margin`` (default ``margin=0.1``) of streaming. A
domain that cannot be moved (a disk not on shared storage, ``VmFootprint.movable``) streams. One
that cannot live-migrate (host devices, or metadata that says so) is moved cold (stopped, defined
and booted on the media host) only with ``allow_cold_moves=yes``: a cold move sends almost nothing
but stops the guest. Operators force a choice per instruction (``Instruction.placement``) or for
every instruction with ``force=stream|migrate``; a forced migration of a domain that cannot live-
migrate is a cold move. Restores from remote media always stream. Each unit gets the choice, the
target host, both predictions and a reason that states them.

A destination served by a backup *appliance* VM (``context.appliances``, measured where it runs
now) has a third way: bring the appliance here, stream to it inside this host, and send it away
again (to the next host in its queue, or home). One move serves every VM of the batch that backs
up there, so it is priced once, like a VM's migration there and back, against the sum of what the
batch's VMs would cost as decided above (per VM: its stream or its migration). It wins by the
same ``margin``; an operator forces it with ``placement=appliance`` (or ``force=appliance``), and
then every backup unit of that destination gets APPLIANCE with the appliance's prediction. An
appliance that cannot live-migrate never moves.
"""
from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Self

from host_agent.model import (
    ApplianceFootprint,
    Instruction,
    Placement,
    Plan,
    Policy,
    UnitKind,
    VmFootprint,
    WorkUnit,
)
from host_agent.planning.chain import HostContext, PlanningPolicy, add_reason, parse_options

_SIZE_SUFFIXES = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}


def parse_rate(text: str) -> float:
    """Bytes per second from ``125000000``, ``125M`` (bytes) or ``1Gbit`` (bits)."""
    match = re.fullmatch(r"\s*([0-9.]+)\s*([kmgt]?)(bit|b)?(?:/s)?\s*", text.lower())
    if not match:
        raise ValueError(f"{text!r} is not a rate (e.g. 125M, 1Gbit)")
    number, prefix, unit = match.groups()
    rate = float(number) * _SIZE_SUFFIXES[prefix] / (8 if unit == "bit" else 1)
    if not rate > 0:
        raise ValueError(f"{text!r} is not a positive rate")
    return rate


def format_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


CONVERGENCE_SHARE = 0.5  # a guest dirtying more than this share of the LAN bandwidth is not live-migrated


@dataclass(frozen=True)
class ColocateConfig:
    lan_bandwidth: float = 125e6       # bytes/s between hosts, to price the guest's dirtying
    stream_overhead: float = 1.03      # LAN bytes per byte of streamed data (TCP/IP, framing)
    migration_overhead: float = 1.02   # LAN bytes per byte of migrated memory
    margin: float = 0.1                # migrate only if it saves more than this share of the stream
    allow_cold_moves: bool = False     # may a domain that cannot live-migrate be stopped and moved?
    force: Placement = Placement.AUTO  # stream, migrate or appliance for every instruction


class Colocate(PlanningPolicy):
    """Stream backups to another host's media, or move the VM there: whichever crosses the LAN less."""

    name = "colocate"

    def __init__(self, config: ColocateConfig = ColocateConfig()) -> None:
        self.config = config

    @classmethod
    def from_options(cls, options: Mapping[str, str]) -> Self:
        return cls(ColocateConfig(**parse_options("colocate", options, {
            "lan_bandwidth": parse_rate, "stream_overhead": _overhead, "migration_overhead": _overhead,
            "margin": _margin, "allow_cold_moves": _parse_bool, "force": _forced})))

    def stream_bytes(self, units: Sequence[WorkUnit], context: HostContext) -> int:
        return round(sum(read_bytes(u, context, moved=False) for u in units) * self.config.stream_overhead)

    def move_bytes(self, footprint: VmFootprint) -> int:
        c = self.config
        touched = footprint.touched_bytes
        one_way = touched + footprint.dirty_bytes_per_second * touched / c.lan_bandwidth
        return round(2 * one_way * c.migration_overhead)

    def converges(self, footprint: VmFootprint) -> bool:
        """Whether pre-copy can catch up with the guest: it must dirty memory well below the LAN's
        bandwidth (half: past that, each round resends most of the last and the copy drags on)."""
        return footprint.dirty_bytes_per_second < CONVERGENCE_SHARE * self.config.lan_bandwidth

    def choose(self, forced: Placement, footprint: VmFootprint | None, stream: int,
               move: int) -> tuple[Placement, str]:
        """The placement for one domain's units and why."""
        if footprint is None:
            return Placement.STREAM, "the host sent no footprint of the VM: it cannot be moved"
        if forced is Placement.STREAM:
            return Placement.STREAM, "streaming forced by the operator"
        if not footprint.movable:
            return Placement.STREAM, f"the VM cannot be moved ({footprint.why_not})"
        if forced is Placement.MIGRATE:
            if footprint.live_migratable:
                return Placement.MIGRATE, "migration forced by the operator"
            return Placement.COLD_MOVE, f"migration forced by the operator; cold move ({footprint.why_not})"
        if footprint.live_migratable and not self.converges(footprint):
            rate = format_bytes(round(footprint.dirty_bytes_per_second))
            return Placement.STREAM, (f"the guest dirties {rate}/s of memory, too close to the LAN's "
                                      "bandwidth: a live migration would not converge")
        if not footprint.live_migratable:
            if self.config.allow_cold_moves:
                return Placement.COLD_MOVE, f"cold move: the VM cannot live-migrate ({footprint.why_not})"
            return Placement.STREAM, (f"the VM cannot live-migrate ({footprint.why_not}) and "
                                      "allow_cold_moves is off")
        if move < stream * (1 - self.config.margin):
            return Placement.MIGRATE, "migrating there and back crosses the LAN less than streaming"
        return Placement.STREAM, "streaming crosses the LAN less than migrating there and back"

    def apply(self, plan: Plan, batch: Sequence[Instruction], context: HostContext) -> Plan:
        forced = {i.id: i.placement for i in batch}
        groups: dict[tuple[str, str], list[WorkUnit]] = {}
        for unit in plan.units:
            host = context.remote_destinations.get(unit.destination, "")
            if host and host != context.host_name and unit.kind is UnitKind.BACKUP_DISK and unit.disk:
                groups.setdefault((unit.disk.domain_uuid, unit.destination), []).append(unit)
        decided: dict[str, WorkUnit] = {}
        notes = []
        for (uuid, destination), units in groups.items():
            host = context.remote_destinations[destination]
            footprint = context.footprints.get(uuid)
            stream = self.stream_bytes(units, context)
            move = 0 if footprint is None else self.move_bytes(footprint)
            wish = self._wish(units, forced)
            placement, why = self.choose(Placement.AUTO if wish is Placement.APPLIANCE else wish,
                                         footprint, stream, move)
            if placement is Placement.COLD_MOVE:
                move = 0
            moved = placement in (Placement.MIGRATE, Placement.COLD_MOVE)
            reads = {u.id: read_bytes(u, context, moved) for u in units}
            reason = (f"{placement.value} to {host}: {why} (predicted LAN bytes: stream "
                      f"{format_bytes(stream)}, migrate there and back {format_bytes(move)}; "
                      f"the backup reads {format_bytes(sum(reads.values()))} of the disks)")
            notes.append(f"colocate: {units[0].disk.domain_name if units[0].disk else uuid} -> {reason}")
            for unit in units:
                decided[unit.id] = replace(unit, placement=placement, target_host=host,
                                           predicted_stream_bytes=stream, predicted_move_bytes=move,
                                           predicted_read_bytes=reads[unit.id],
                                           reason=add_reason(unit, reason))
        out = []
        for unit in plan.units:
            if unit.id in decided:
                out.append(decided[unit.id])
            elif context.remote_destinations.get(unit.destination, context.host_name) != context.host_name:
                host = context.remote_destinations[unit.destination]
                out.append(replace(unit, placement=Placement.STREAM, target_host=host))
            else:
                out.append(unit)
        for destination, appliance in sorted(context.appliances.items()):
            out, note = self._bring_appliance(out, destination, appliance, forced, context)
            if note:
                notes.append(note)
        return replace(plan, units=tuple(out), notes=(*plan.notes, *notes))

    def _wish(self, units: Sequence[WorkUnit], forced: Mapping[str, Placement]) -> Placement:
        """The operator's choice for these units (the first instruction that forces one), else the
        configured ``force``."""
        return next((forced[i] for u in units for i in u.satisfies
                     if forced.get(i, Placement.AUTO) is not Placement.AUTO), self.config.force)

    def _bring_appliance(self, units: list[WorkUnit], destination: str, appliance: ApplianceFootprint,
                         forced: Mapping[str, Placement], context: HostContext) -> tuple[list[WorkUnit], str]:
        """Every backup unit of ``destination`` gets APPLIANCE if moving its appliance here (and away
        again) crosses the LAN less than what the units would cost otherwise, or if an operator asks."""
        mine = [u for u in units if u.destination == destination
                and u.kind in (UnitKind.BACKUP_DISK, UnitKind.BACKUP_BASE)]
        if not mine:
            return units, ""
        host = context.remote_destinations.get(destination, "")
        wish = self._wish(mine, forced)
        otherwise = self._otherwise(mine)
        bring = self.move_bytes(appliance.footprint)
        f = appliance.footprint
        if wish not in (Placement.AUTO, Placement.APPLIANCE):
            return units, ""
        if not (f.movable and f.live_migratable):
            why = f"appliance {appliance.appliance} cannot live-migrate ({f.why_not})"
            return units, f"colocate: {destination} -> no appliance move: {why}"
        if wish is Placement.AUTO and not self.converges(f):
            why = f"appliance {appliance.appliance} dirties memory too fast to live-migrate"
            return units, f"colocate: {destination} -> no appliance move: {why}"
        if wish is Placement.APPLIANCE:
            why = "forced by the operator"
        elif bring < otherwise * (1 - self.config.margin):
            why = "moving it here and away crosses the LAN less than the backups would"
        else:
            return units, (f"colocate: {destination} -> appliance {appliance.appliance} stays on {host}: "
                           f"moving it here and away ({format_bytes(bring)}) saves too little against "
                           f"{format_bytes(otherwise)}")
        reason = (f"appliance: bring {appliance.appliance} from {host} to {context.host_name}: {why} "
                  f"(predicted LAN bytes: appliance here and away {format_bytes(bring)}, otherwise "
                  f"{format_bytes(otherwise)} for {len(mine)} unit(s))")
        chosen = {u.id for u in mine}
        return [replace(u, placement=Placement.APPLIANCE, target_host=context.host_name,
                        predicted_move_bytes=bring, reason=add_reason(u, reason))
                if u.id in chosen else u for u in units], f"colocate: {destination} -> {reason}"

    @staticmethod
    def _otherwise(units: Sequence[WorkUnit]) -> int:
        """What the units cross the LAN with as decided, counted once per VM (each of its units carries
        the VM's whole prediction): its migration, its stream, or almost nothing for a cold move."""
        per_vm: dict[str, int] = {}
        for unit in units:
            if unit.disk is None:
                continue
            if unit.placement is Placement.MIGRATE:
                per_vm[unit.disk.domain_uuid] = unit.predicted_move_bytes
            elif unit.placement is Placement.STREAM:
                per_vm[unit.disk.domain_uuid] = unit.predicted_stream_bytes
        return sum(per_vm.values())


def read_bytes(unit: WorkUnit, context: HostContext, moved: bool) -> int:
    """What the backup of ``unit`` will read from its disk, on the VM's host or (``moved``) where a
    visit takes it: the dirty extents if its chain holds there, else the disk's data."""
    assert unit.disk is not None
    held = context.held.get((unit.destination, unit.snapshot_name))
    chain_holds = unit.policy is not Policy.FULL and held is not None
    if held is not None and chain_holds and not (moved and unit.disk.format != "qcow2"):
        return held
    return unit.disk.allocated or unit.disk.size


def _overhead(text: str) -> float:
    value = float(text)
    if not value >= 1:
        raise ValueError("must be at least 1")
    return value


def _margin(text: str) -> float:
    value = float(text)
    if not 0 <= value < 1:
        raise ValueError("must be from 0 to below 1")
    return value


def _forced(text: str) -> Placement:
    value = Placement(text.strip())
    if value not in (Placement.AUTO, Placement.STREAM, Placement.MIGRATE, Placement.APPLIANCE):
        raise ValueError("must be auto, stream, migrate or appliance")
    return value


def _parse_bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "yes", "true", "on"):
        return True
    if value in ("0", "no", "false", "off"):
        return False
    raise ValueError(f"{text!r} is not yes or no")
