"""The ``merge`` policy: read the same data once.

*Duplicates.* Backup units of the same disk (domain uuid and serial, same image path) for the same
destination collapse into one unit that satisfies all their instructions, with the strongest policy
asked for (full > differential > incremental) and the earliest ``not_before``. Restore units of the
same disk from the same snapshot spec and destination collapse likewise, and path-level backup units
of the same file system (disk and partition) and destination into one that stores the union of their
paths. A disk that the batch both backs up and restores is left alone, so its units keep the batch order.

*Shared bases.* Backing images are compared by path after lexical normalization
(``posixpath.normpath``): the optimizer may run on another machine and cannot resolve symlinks,
so the host sends chains resolved from the live domain XML. For one destination, an image counts as
*shared* when the backing chains of at least two distinct disks of the batch contain it, and as
*known* when ``context.known_bases`` holds ``(destination, base name)``, the base name being
``base/<first 16 hex digits of the SHA-256 of the normalized path>``. Each backup unit builds on
the nearest image of its chain that is shared or known:

- a known base gets no new unit: the disk unit's reason names the stored base;
- a shared base gets one ``BACKUP_BASE`` unit per destination (policy full, no ``disk``,
  ``source`` the image path, ``snapshot_name`` the base name), and the disk unit depends on it.
  The base unit in turn builds on the nearest shared or known image further down its own chain,
  so with chains ``[mid, root]`` and ``[root]`` the plan reads ``root``, then ``mid`` on top of it,
  then the disks. A base unit satisfies (in part) every instruction of the units that build on it,
  directly or through other bases, and starts no later than the earliest of them. Its reason names
  the image and the disks sharing it. Base units come first in the plan, parents before children.

An image in ``context.fleet_shared`` counts as shared with a single disk: another host of the fleet
may build on it (``host_agent.planning.fleet``).

Running ``merge`` again on its own output changes nothing.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from host_agent.model import (
    MAX_PATHS,
    STRENGTH,
    DiskRef,
    Instruction,
    Plan,
    Policy,
    UnitKind,
    WorkUnit,
    base_name,
    normalize_path,
    outermost,
)
from host_agent.planning.chain import (
    HostContext,
    PlanningPolicy,
    add_reason,
    describe_disk,
    disk_key,
    listing,
    ordered_union,
)


def _restored_and_more(kinds: set[UnitKind]) -> bool:
    """A disk the batch restores and also backs up: its units keep the batch order."""
    return UnitKind.RESTORE_DISK in kinds and len(kinds) > 1


def _fitting(units: list[WorkUnit]) -> list[list[WorkUnit]]:
    """Units to fold together, path units split so that none stores more than MAX_PATHS paths."""
    if units[0].kind is not UnitKind.BACKUP_PATHS:
        return [units]
    parts: list[list[WorkUnit]] = []
    for unit in units:
        fits = (part for part in parts
                if len(outermost(p for u in (*part, unit) if u.paths for p in u.paths.paths)) <= MAX_PATHS)
        part = next(fits, None)
        if part is None:
            parts.append([unit])
        else:
            part.append(unit)
    return parts


class Merge(PlanningPolicy):
    """Read the same data once: collapse duplicate requests, back up shared backing images once."""

    name = "merge"

    def apply(self, plan: Plan, batch: Sequence[Instruction], context: HostContext) -> Plan:
        units, collapsed = self._collapse_duplicates(plan.units)
        units, new_bases = self._shared_bases(units, context)
        notes = list(plan.notes)
        if collapsed:
            notes.append(f"merge: {collapsed} duplicate request(s) folded into the units of the same disk")
        if new_bases:
            notes.append(f"merge: {new_bases} shared backing image(s) read once as base units")
        return replace(plan, units=tuple(units), notes=tuple(notes))

    @staticmethod
    def _collapse_duplicates(units: Sequence[WorkUnit]) -> tuple[list[WorkUnit], int]:
        kinds: dict[tuple[str, str], set[UnitKind]] = {}
        for unit in units:
            if unit.disk is not None:
                kinds.setdefault(disk_key(unit.disk), set()).add(unit.kind)
        groups: dict[tuple[str, ...], list[WorkUnit]] = {}
        for unit in units:
            disk = unit.disk
            if disk is None or unit.kind is UnitKind.BACKUP_BASE or _restored_and_more(kinds[disk_key(disk)]):
                key: tuple[str, ...] = ("unit", unit.id)
            elif unit.kind is UnitKind.BACKUP_DISK:
                key = ("backup", unit.destination, *disk_key(disk), normalize_path(disk.path))
            elif unit.kind is UnitKind.BACKUP_PATHS:
                key = ("paths", unit.destination, *disk_key(disk), unit.snapshot_name)
            else:
                key = ("restore", unit.destination, *disk_key(disk), unit.source)
            groups.setdefault(key, []).append(unit)
        renamed: dict[str, str] = {}
        merged: list[WorkUnit] = []
        for members in (part for group in groups.values() for part in _fitting(group)):
            first = members[0]
            if len(members) == 1:
                merged.append(first)
                continue
            ids = {m.id for m in members}
            renamed.update((m.id, first.id) for m in members[1:])
            policy = max((m.policy for m in members), key=STRENGTH.__getitem__)
            satisfies = ordered_union(m.satisfies for m in members)
            assert first.disk is not None
            reason = (f"one unit for {len(satisfies)} requests ({listing(satisfies)}) of disk "
                      f"{describe_disk(first.disk)} to {first.destination!r}")
            if first.kind is UnitKind.BACKUP_DISK:
                reason += f"; the strongest policy asked for ({policy.value}) applies to all"
            paths = first.paths
            if paths is not None:
                paths = replace(paths, paths=outermost(p for m in members if m.paths for p in m.paths.paths))
                reason += f"; it stores every path asked for ({listing(paths.paths)})"
            earlier = [m.reason for m in members if m.reason]
            merged.append(replace(
                first, policy=policy, satisfies=satisfies,
                depends_on=tuple(d for d in ordered_union(m.depends_on for m in members) if d not in ids),
                not_before=min(m.not_before for m in members), paths=paths,
                reason="; ".join(dict.fromkeys([*earlier, reason]))))
        if renamed:
            merged = [replace(u, depends_on=tuple(dict.fromkeys(renamed.get(d, d) for d in u.depends_on)))
                      for u in merged]
        return merged, len(renamed)

    @staticmethod
    def _shared_bases(units: list[WorkUnit], context: HostContext) -> tuple[list[WorkUnit], int]:
        disks = [u for u in units if u.kind is UnitKind.BACKUP_DISK and u.disk and u.disk.backing_chain]
        sharers: dict[tuple[str, str], dict[tuple[str, str], DiskRef]] = {}
        tails: dict[str, tuple[str, ...]] = {}  # image -> the images under it, from the first chain naming it
        for unit in disks:
            assert unit.disk is not None
            chain = tuple(normalize_path(p) for p in unit.disk.backing_chain)
            for depth, image in enumerate(chain):
                sharers.setdefault((unit.destination, image), {})[disk_key(unit.disk)] = unit.disk
                tails.setdefault(image, chain[depth + 1:])

        def builds_on(destination: str, images: Sequence[str]) -> str | None:
            """The nearest image that is shared in this batch or already stored."""
            for image in images:
                shared = (len(sharers.get((destination, image), ())) >= 2
                          or (destination, image) in context.fleet_shared)
                if shared or (destination, base_name(image)) in known:
                    return image
            return None

        known = context.known_bases
        bases: dict[tuple[str, str], WorkUnit] = {
            (u.destination, normalize_path(u.source)): u for u in units if u.kind is UnitKind.BACKUP_BASE}
        created: list[tuple[str, str]] = []

        def base_unit(destination: str, image: str) -> str | None:
            """The id of the unit reading ``image`` for ``destination``, made if needed (None: stored)."""
            if (destination, base_name(image)) in known and (destination, image) not in bases:
                return None
            if (destination, image) not in bases:
                name = base_name(image)
                shared = list(sharers[(destination, image)].values())
                fleet = " and may be by other hosts" if (destination, image) in context.fleet_shared else ""
                reason = (f"backing image {image} is shared by {len(shared)} disk(s) "
                          f"({listing([describe_disk(d) for d in shared])}) backed up to {destination!r}"
                          f"{fleet}: read once as {name}")
                unit = WorkUnit(id=f"{name}@{destination}", kind=UnitKind.BACKUP_BASE, source=image,
                                snapshot_name=name, destination=destination, policy=Policy.FULL,
                                satisfies=(), reason=reason)
                bases[(destination, image)] = unit
                created.append((destination, image))
                parent = builds_on(destination, tails.get(image, ()))
                parent_id = base_unit(destination, parent) if parent else None
                if parent and parent_id is None:
                    unit = replace(unit, reason=f"{reason}, on top of the stored base {base_name(parent)}")
                elif parent_id:
                    unit = replace(unit, depends_on=(*unit.depends_on, parent_id))
                bases[(destination, image)] = unit
            return bases[(destination, image)].id

        out: list[WorkUnit] = []
        disk_ids = {u.id for u in disks}
        for unit in units:
            if unit.id in disk_ids and unit.disk is not None:
                nearest = builds_on(unit.destination, [normalize_path(p) for p in unit.disk.backing_chain])
                if nearest is not None:
                    base_id = base_unit(unit.destination, nearest)
                    if base_id is None:
                        stored = f"builds on {base_name(nearest)}, the stored base {nearest}"
                        if stored not in unit.reason:
                            unit = replace(unit, reason=add_reason(unit, stored))
                    elif base_id not in unit.depends_on:
                        unit = replace(unit, depends_on=(*unit.depends_on, base_id), reason=add_reason(
                            unit, f"builds on {base_name(nearest)}, the shared base {nearest}"))
            if unit.kind is not UnitKind.BACKUP_BASE:
                out.append(unit)

        # each base satisfies (in part) what everything built on it satisfies, and starts no later
        by_id = {u.id: u for u in bases.values()}
        satisfies: dict[str, list[str]] = {i: list(u.satisfies) for i, u in by_id.items()}
        not_before: dict[str, list[float]] = {i: [] for i in by_id}
        for unit in out:
            below = [d for d in unit.depends_on if d in by_id]
            reached: set[str] = set()
            while below:
                base_id = below.pop()
                if base_id not in reached:
                    reached.add(base_id)
                    satisfies[base_id].extend(unit.satisfies)
                    not_before[base_id].append(unit.not_before)
                    below.extend(d for d in by_id[base_id].depends_on if d in by_id)
        ordered: list[WorkUnit] = []
        placed: set[str] = set()

        def place(unit_id: str) -> None:
            if unit_id in placed:
                return
            placed.add(unit_id)
            for dep in by_id[unit_id].depends_on:
                if dep in by_id:
                    place(dep)
            unit = by_id[unit_id]
            ordered.append(replace(unit, satisfies=ordered_union([satisfies[unit_id]]),
                                   not_before=min(not_before[unit_id], default=unit.not_before)))

        for unit in bases.values():
            place(unit.id)
        return [*ordered, *out], len(created)
