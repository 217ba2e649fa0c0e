"""The executor: carries out a plan and answers every instruction.

Units run one plan at a time (the data path already uses every core), in
dependency order: a shared base image first, then the disks that reference it.
Each backup unit takes a point-in-time view of its disk (the guest frozen for
that instant only), reads the view from shared storage with the native copier,
writes the repository and lets the view merge back. Each instruction is
answered once all the units serving it are done: with a snapshot id, bytes and
time per disk, or with a clear error naming what failed.

Blocking work (libvirt, the copier) runs in a worker thread so that the event
loop keeps serving every guest channel meanwhile.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import stat
import tempfile
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

from host_agent import errors
from host_agent.agent import paths, views, vmdefinition, volatile_bitmaps
from host_agent.agent.chains import ChainRecord
from host_agent.agent.checkpoint_record import CheckpointRecords
from host_agent.agent.checkpoints import prune_checkpoints
from host_agent.agent.destinations import AnyRepository, Destinations
from host_agent.agent.domains import Domains
from host_agent.agent.domainxml import is_active
from host_agent.agent.jobs import Jobs, JobState
from host_agent.agent.offline import offline_view
from host_agent.agent.snapshot_disks import own_snapshot
from host_agent.colocation.appliance import Porter
from host_agent.colocation.appliance import Visit as ApplianceVisit
from host_agent.colocation.visits import Colocator, VisitResult
from host_agent.guestfiles.reader import ReaderSettings
from host_agent.model import (
    ChangeDetection,
    DiskRef,
    DiskResult,
    Fallback,
    FallbackNote,
    Instruction,
    Outcome,
    Placement,
    Plan,
    Policy,
    UnitKind,
    WorkUnit,
    base_name,
    fallback_of,
)
from host_agent.storage import qcow2
from host_agent.storage.cancel import CancelToken
from host_agent.storage.extents import Extent, Layout
from host_agent.storage.repository import Repository
from host_agent.storage.snapshot import BackupResult, Snapshot, VmRef

log = logging.getLogger(__name__)


class GuestDoor(Protocol):
    """What the executor needs of the guests (``host_agent.agent.guests.Guests``)."""

    async def freeze(self, uuid: str, serials: tuple[str, ...], job: str) -> None: ...

    async def thaw(self, uuid: str, job: str) -> None: ...

    async def announce(self, job_ids: tuple[str, ...], message: str, done: int, total: int) -> None: ...

    async def answer(self, outcome: Outcome, state: JobState | None = None) -> None: ...


MOVES = (Placement.MIGRATE, Placement.COLD_MOVE)


def appliance_units(units: tuple[WorkUnit, ...]) -> dict[str, list[WorkUnit]]:
    """Units planned APPLIANCE, by destination: its appliance comes here once for all of them."""
    groups: dict[str, list[WorkUnit]] = {}
    for unit in units:
        if unit.placement is Placement.APPLIANCE:
            groups.setdefault(unit.destination, []).append(unit)
    return groups


def visits(units: tuple[WorkUnit, ...]) -> dict[str, list[WorkUnit]]:
    """Units to carry out on another host, grouped by the unit that opens the visit: one move there
    and back per domain, destination and target host."""
    groups: dict[tuple[str, str, str], list[WorkUnit]] = {}
    for unit in units:
        if unit.placement in MOVES and unit.disk is not None:
            key = (unit.disk.domain_uuid, unit.destination, unit.target_host)
            groups.setdefault(key, []).append(unit)
    return {group[0].id: group for group in groups.values()}


def ordered(units: tuple[WorkUnit, ...]) -> Iterator[WorkUnit]:
    """Units with every dependency before its dependents (plan order otherwise)."""
    in_plan = {u.id for u in units}
    done: set[str] = set()
    pending = list(units)
    while pending:
        ready = [u for u in pending if all(d in done or d not in in_plan for d in u.depends_on)]
        if not ready:
            raise errors.HyperbackError(f"plan has a dependency cycle among {[u.id for u in pending]}")
        for unit in ready:
            pending.remove(unit)
            done.add(unit.id)
            yield unit


class Executor:
    """Runs plans, one at a time; every instruction is answered through ``guests``."""

    def __init__(self, destinations: Destinations, domains: Domains, guests: GuestDoor, jobs: Jobs,
                 work_dir: Path, colocator: Colocator | None = None, porter: Porter | None = None,
                 reader: ReaderSettings | None = None, *, overlay_dir: Path, chains: ChainRecord,
                 records: CheckpointRecords | None = None) -> None:
        self._destinations = destinations
        self._domains = domains           # views of their disks; restored disks hot-plugged
        self._guests = guests
        self._jobs = jobs
        self._work_dir = work_dir         # restored images and fallback conversions
        self._colocator = colocator
        self._porter = porter
        self._records = records           # hyperback's copy of each view's checkpoint (checkpoint_record)
        self._reader = reader or ReaderSettings()  # the appliance reading paths of guests' file systems
        self._overlay_dir = overlay_dir   # overlays of block-device disks (AgentConfig.overlay_dir)
        self._chains = chains             # every destination's checkpoint needs, for pruning
        for stale in work_dir.glob("paths-*.spool"):  # a path backup's archive, left by a killed agent
            log.info("removing %s, left by an agent that stopped during a backup of paths", stale)
            stale.unlink(missing_ok=True)
        self._lock = asyncio.Lock()
        self.reads: dict[str, int] = {}  # source path -> times read, for operators and tests
        self.visits: list[VisitResult] = []  # co-located backups done, for operators and tests
        self.appliance_visits: list[ApplianceVisit] = []  # appliances brought here, likewise

    async def execute(self, plan: Plan, instructions: dict[str, Instruction]) -> None:
        for job_id in instructions:
            await self._jobs.move(job_id, JobState.RUNNING, "running")
        async with self._lock:
            outcomes = {i: Outcome(instructions[i])
                        for u in plan.units for i in u.satisfies if i in instructions}
            async with contextlib.AsyncExitStack() as appliances:
                for destination, units in appliance_units(plan.units).items():
                    await self._bring_appliance(appliances, destination, units, outcomes)
                await self._run_plan(plan, outcomes)

    async def _bring_appliance(self, stack: contextlib.AsyncExitStack, destination: str,
                               units: list[WorkUnit], outcomes: dict[str, Outcome]) -> None:
        """Have the destination's appliance run on this host until the plan is done (if it cannot
        come, the units stream to it over the LAN: the visit says why)."""
        appliance = self._porter.inventory.appliance_of(destination) if self._porter else None
        if self._porter is None or appliance is None:
            log.warning("destination %s has no appliance this agent can move; streaming", destination)
            return
        job_ids = tuple(dict.fromkeys(i for u in units for i in u.satisfies))

        async def report(message: str, done: int, total: int) -> None:
            await self._guests.announce(job_ids, message, done, total)

        visit = await stack.enter_async_context(self._porter.here(appliance, job_ids[0], report))
        self.appliance_visits.append(visit)
        for i in job_ids:
            if i in outcomes:
                outcomes[i].moved_bytes += visit.moved_bytes

    async def _run_plan(self, plan: Plan, outcomes: dict[str, Outcome]) -> None:
        remaining = {i: sum(i in u.satisfies for u in plan.units) for i in outcomes}
        bases: dict[str, Snapshot] = {}
        definitions: dict[tuple[str, str], VmRef | str] = {}
        failed_units: dict[str, str] = {}
        groups = visits(plan.units)
        visited = {u.id: opener for opener, group in groups.items() for u in group}
        done_visits: set[str] = set()
        for unit in ordered(plan.units):
            try:
                if all(self._cancelled(i) for i in unit.satisfies):
                    raise errors.Cancelled("cancelled by the operator")
                broken = [d for d in unit.depends_on if d in failed_units]
                if broken:
                    raise errors.HyperbackError(f"shared base failed: {failed_units[broken[0]]}")
                if unit.id in visited:
                    # the whole group runs when the first of its units comes up
                    opener = visited[unit.id]
                    if opener not in done_visits:
                        done_visits.add(opener)
                        try:
                            await self._visit(groups[opener], outcomes)
                        except Exception as e:
                            failed_units[opener] = str(e)
                            raise
                    if opener in failed_units:
                        raise errors.HyperbackError(failed_units[opener])
                else:
                    vm = await self._definition(plan, unit, definitions)
                    await self._run(unit, outcomes, bases, vm)
            except Exception as e:  # noqa: BLE001 - every instruction must get an answer
                if not isinstance(e, (errors.HyperbackError, OSError)):
                    log.exception("unit %s failed unexpectedly", unit.id)
                log.warning("unit %s failed: %s", unit.id, e)
                failed_units[unit.id] = str(e)
                for i in unit.satisfies:
                    if i in outcomes and outcomes[i].error is None:
                        outcomes[i].error = str(e)
            for i in unit.satisfies:
                if i in remaining:
                    remaining[i] -= 1
                    if remaining[i] == 0:
                        await self._answer(outcomes[i])

    def _cancelled(self, job_id: str) -> bool:
        job = self._jobs.get(job_id)
        return job is not None and job.cancel.cancelled

    def _cancel_token(self, unit: WorkUnit) -> CancelToken | None:
        """What stops the unit's copy: its job's cancel, when it serves one job only (a unit merged
        for several goes on for the others)."""
        job = self._jobs.get(unit.satisfies[0]) if len(unit.satisfies) == 1 else None
        return job.cancel if job is not None else None

    async def _answer(self, outcome: Outcome) -> None:
        job = self._jobs.get(outcome.instruction.id)
        if job is not None and job.state.final:
            return  # cancelled while it waited: answered then
        cancelled = outcome.error is not None and self._cancelled(outcome.instruction.id)
        await self._guests.answer(outcome, JobState.CANCELLED if cancelled else None)

    async def _visit(self, units: list[WorkUnit], outcomes: dict[str, Outcome]) -> None:
        """Back the units' disks up on another host, moving the VM there and back."""
        if self._colocator is None:
            raise errors.UsageError("this agent has no inventory of other hosts: it cannot move VMs")
        job_ids = tuple(dict.fromkeys(i for u in units for i in u.satisfies))

        async def report(message: str, done: int, total: int) -> None:
            await self._guests.announce(job_ids, message, done, total)

        result: VisitResult = await self._colocator.visit(units, report)
        there, back = result.there, result.back
        note = (f"backed up on {units[0].target_host}: moved there in {there.seconds:.1f} s "
                f"({there.bytes} bytes), back in {back.seconds:.1f} s ({back.bytes} bytes)")
        for disk in result.disks:
            mine = [u for u in units if u.disk is not None and u.disk.serial == disk.serial]
            # the optimizer's guess beside the truth: far more read than predicted says the chain broke
            read = f"; read {disk.bytes_read} bytes, predicted {mine[0].predicted_read_bytes}" if mine else ""
            disk_result = DiskResult(disk.serial, disk.snapshot, disk.bytes_read, disk.bytes_new,
                                     round(result.seconds, 3), ChangeDetection.NONE, note + read)
            for i in (i for unit in mine for i in unit.satisfies):
                if i in outcomes:
                    outcomes[i].disks.append(disk_result)
        for i in job_ids:
            if i in outcomes:
                outcomes[i].moved_bytes += there.bytes + back.bytes
        self.visits.append(result)

    async def _definition(self, plan: Plan, unit: WorkUnit,
                          stored: dict[tuple[str, str], VmRef | str]) -> VmRef | str | None:
        """The definition of the unit's domain stored at its destination, once per plan: a reference
        for its disk snapshots, or why it could not be stored (the disks are backed up anyway)."""
        if unit.kind is not UnitKind.BACKUP_DISK or unit.disk is None:
            return None
        key = (unit.disk.domain_uuid, unit.destination)
        if key not in stored:
            jobs = sorted({i for u in plan.units if u.disk is not None and u.destination == unit.destination
                           and u.disk.domain_uuid == key[0] for i in u.satisfies})
            try:
                stored[key] = await asyncio.to_thread(self._store_definition, key[0], unit.destination, jobs,
                                                      self._cancel_token(unit))
            except errors.Cancelled:
                raise  # the job is cancelled: nothing of it is published, its disks included
            except (errors.HyperbackError, OSError, ET.ParseError) as e:
                log.warning("could not store the definition of %s: %s", key[0], e)
                stored[key] = f"the domain's definition was not stored: {e}"
        return stored[key]

    def _store_definition(self, domain_uuid: str, destination: str, jobs: list[str],
                          cancel: CancelToken | None) -> VmRef:
        repo = self._destinations.repository(destination)
        definition = vmdefinition.capture(self._domains.domain(domain_uuid))
        return vmdefinition.store(repo, definition, jobs, self._work_dir, cancel)

    async def _run(self, unit: WorkUnit, outcomes: dict[str, Outcome], bases: dict[str, Snapshot],
                   vm: VmRef | str | None = None) -> None:
        # reaching another host's media service for the first time is a network call
        repo = await asyncio.to_thread(self._destinations.repository, unit.destination)
        if unit.kind is UnitKind.BACKUP_BASE:
            bases[unit.id] = await asyncio.to_thread(self._backup_base, repo, unit)
            return
        if unit.kind is UnitKind.BACKUP_DISK:
            assert unit.disk is not None
            # a disk unit depends on at most one base: the one its overlay sits on
            base = next((bases[d] for d in unit.depends_on if d in bases), None)
            shared = {unit.disk.serial: base} if base is not None else {}
            ref = vm if isinstance(vm, VmRef) else None
            result, view, detection = await self._backup_disk(repo, unit, shared, ref)
            snap = result.snapshot
            not_stored = vm if isinstance(vm, str) else None
            disk_result = DiskResult(unit.disk.serial, snap.id, snap.stats.bytes_read, snap.stats.bytes_new,
                                     snap.stats.seconds, detection,
                                     "; ".join(filter(None, [view.reason, *result.notes, not_stored])),
                                     offline=view.offline, bytes_stored=snap.stats.bytes_stored,
                                     fallback=snap.fallback.reason if snap.fallback else None)
            for i in unit.satisfies:
                if i in outcomes:
                    outcomes[i].disks.append(disk_result)
            return
        if unit.kind is UnitKind.BACKUP_PATHS:
            freeze, thaw = self._guest_hooks(unit)
            disk_result = await asyncio.to_thread(self._backup_paths, repo, unit, freeze, thaw)
            for i in unit.satisfies:
                if i in outcomes:
                    outcomes[i].disks.append(disk_result)
            return
        if unit.kind is UnitKind.RESTORE_DISK:
            assert unit.disk is not None
            disk_result = await asyncio.to_thread(self._restore_disk, repo, unit)
            for i in unit.satisfies:
                if i in outcomes:
                    outcomes[i].disks.append(disk_result)
            return
        raise errors.UsageError(f"unit kind {unit.kind.value} is not carried out by this executor")

    def _restore_disk(self, repo: AnyRepository, unit: WorkUnit) -> DiskResult:
        """Restore into a new image and hot-plug it as a new disk: the running disk is never touched.

        A guest may restore only snapshots of its own disk, looked up among them alone as ``see``
        does: an id of another VM's snapshot is not found, and a prefix is never "ambiguous"
        because another VM's snapshot shares it (which would tell the guest that one exists).
        """
        disk = unit.disk
        assert disk is not None
        snap = own_snapshot(repo, disk, unit.source)
        self._work_dir.mkdir(parents=True, exist_ok=True)
        target = self._work_dir / f"{disk.domain_uuid}-{disk.serial}-{snap.id}.img"
        result = repo.restore(snap.id, target, overwrite=True)
        new_serial = f"{disk.serial[:48]}-r{snap.id[:8]}"
        self._domains.attach_disk(disk.domain_uuid, str(target), new_serial)
        return DiskResult(disk.serial, snap.id, result.bytes_written, 0, result.seconds, None,
                          f"restored to a new disk with serial {new_serial}", new_serial)

    def _backup_base(self, repo: AnyRepository, unit: WorkUnit) -> Snapshot:
        """A shared backing image is immutable while overlays use it: back it up once, then reuse."""
        existing = repo.snapshots(unit.snapshot_name)
        info = qcow2.image_info(unit.source)
        if existing and existing[-1].source == info.path and existing[-1].size == info.virtual_size:
            log.info("base %s already backed up as %s", unit.source, existing[-1].id)
            return existing[-1]
        self.reads[unit.source] = self.reads.get(unit.source, 0) + 1
        log.info("backing up shared base %s (%d bytes)", unit.source, info.virtual_size)
        source: str | Layout = info.path
        if info.format == "qcow2":
            source = qcow2.chain_layout(info.path, repo.config.chunk_size, label=info.path)
        return repo.backup(source, unit.snapshot_name, Policy.FULL).snapshot

    def _guest_hooks(self, unit: WorkUnit) -> tuple[Callable[[], None], Callable[[], None]]:
        """Freeze and thaw the unit's guest, callable from a worker thread (the view's instant)."""
        disk = unit.disk
        assert disk is not None
        loop = asyncio.get_running_loop()
        job = unit.satisfies[0]

        def freeze() -> None:
            frozen = self._guests.freeze(disk.domain_uuid, (disk.serial,), job)
            asyncio.run_coroutine_threadsafe(frozen, loop).result()

        def thaw() -> None:
            asyncio.run_coroutine_threadsafe(self._guests.thaw(disk.domain_uuid, job), loop).result()

        return freeze, thaw

    async def _backup_disk(self, repo: AnyRepository, unit: WorkUnit,
                           shared: dict[str, Snapshot], vm: VmRef | None
                           ) -> tuple[BackupResult, views.DiskView, ChangeDetection]:
        assert unit.disk is not None
        freeze, thaw = self._guest_hooks(unit)
        return await asyncio.to_thread(self._backup_view, repo, unit, shared.get(unit.disk.serial), freeze,
                                       thaw, self._cancel_token(unit), vm)

    def _backup_paths(self, repo: AnyRepository, unit: WorkUnit, freeze: Callable[[], None],
                      thaw: Callable[[], None]) -> DiskResult:
        """Store the unit's paths from the disk's point-in-time view (no checkpoint: a file-level
        snapshot is no base for the disk's incrementals)."""
        disk, selection = unit.disk, unit.paths
        assert disk is not None and selection is not None
        if not isinstance(repo, Repository):
            raise errors.UsageError(f"destination {unit.destination!r} is on another host; a backup of paths "
                                    "goes to a destination whose media are on this host")
        self._work_dir.mkdir(parents=True, exist_ok=True)  # the archive is spooled there
        with self._view(disk, repo, freeze, thaw, checkpoint=False) as taken:
            view = taken[disk.serial]
            self.reads[view.image] = self.reads.get(view.image, 0) + 1
            result, skipped = paths.back_up_paths(repo, Path(view.image), view.format, selection.partition,
                                                  selection.paths, unit.snapshot_name, self._work_dir,
                                                  self._reader)
        snap = result.snapshot
        note = "; ".join(f"skipped {path}: {why}" for path, why in skipped[:8])
        return DiskResult(disk.serial, snap.id, snap.stats.bytes_read, snap.stats.bytes_new,
                          snap.stats.seconds, ChangeDetection.NONE, note,
                          bytes_stored=snap.stats.bytes_stored)

    def _backup_view(self, repo: AnyRepository, unit: WorkUnit, shared_base: Snapshot | None,
                     freeze: Callable[[], None], thaw: Callable[[], None],
                     cancel: CancelToken | None, vm: VmRef | None = None
                     ) -> tuple[BackupResult, views.DiskView, ChangeDetection]:
        """Take the disk's point-in-time view and back it up; the view merges back on exit.

        The repository's base (latest snapshot, or latest full for a differential) names the
        checkpoint it was taken at: the view reports what changed since then from the dirty
        bitmap, and the new snapshot records the view's own checkpoint for the next backup. A disk
        on a shared, already backed-up base reads only its overlay's own clusters.
        """
        disk = unit.disk
        assert disk is not None
        if not is_active(self._domains.domain(disk.domain_uuid)):
            try:
                return self._backup_offline(repo, unit, cancel, vm)
            except errors.DomainStarted as e:
                log.info("%s: taking an online view instead", e)
        base = repo.base_for(disk.snapshot_name, unit.policy)
        since = base.checkpoint if base is not None else None
        with self._view(disk, repo, freeze, thaw, since={disk.serial: since}, records=self._records) as taken:
            view = self._why_base_pruned(taken[disk.serial], unit.destination, since,
                                         repo.snapshots(disk.snapshot_name))
            checkpoint = view.checkpoint
            if shared_base is None and view.changes is None and disk.backing_chain:
                # no dirty bitmap to go by, but the backing image may be stored already: then
                # only the overlay's own clusters need reading
                stored = repo.snapshots(base_name(disk.backing_chain[0]))
                shared_base = stored[-1] if stored and stored[-1].size == view.size else None
            if shared_base is not None and view.format == "qcow2":
                top = qcow2.top_layout(view.image, repo.config.chunk_size)
                key = top.layout.label
                self.reads[key] = self.reads.get(key, 0) + 1
                result = repo.backup(top.layout, disk.snapshot_name, unit.policy, list(top.changes),
                                     base=shared_base, checkpoint=checkpoint, cancel=cancel, vm=vm)
                return result, view, ChangeDetection.ALLOCATION_MAP
            result = self._read(repo, unit, view, cancel, vm)
        self._prune_checkpoints(repo, unit.destination, disk.domain_uuid)
        return result, view, view.change_detection

    def _why_base_pruned(self, view: views.DiskView, destination: str, since: str | None,
                         snapshots: list[Snapshot]) -> views.DiskView:
        """The view, saying so if its ``since`` is gone because the chain's snapshot was forgotten."""
        if since is None or fallback_of(view.reason) is not Fallback.NO_RECORD:
            return view
        pruned = self._chains.forgotten_base(view.disk.domain_uuid, destination, view.disk.serial, since,
                                             {s.checkpoint for s in snapshots})
        return dataclasses.replace(view, reason=pruned) if pruned else view

    def _view(self, disk: DiskRef, repo: AnyRepository, freeze: Callable[[], None], thaw: Callable[[], None],
              **options: Any) -> views.PointInTime:
        """A point-in-time view of one disk; a block device's overlay goes into ``overlay_dir`` (there
        is no folder beside ``/dev/vg/lv``), an image file's beside it."""
        overlay_dir = None
        if _is_block_device(disk.path):
            try:
                self._overlay_dir.mkdir(mode=0o711, parents=True, exist_ok=True)  # QEMU's user may differ
            except OSError as e:
                raise errors.EnvironmentProblem(
                    f"cannot create overlay_dir {self._overlay_dir} for the overlay of block device "
                    f"{disk.path}: {e.strerror}; set overlay_dir to a writable local folder") from e
            overlay_dir = str(self._overlay_dir)
        return views.point_in_time(self._domains.conn, disk.domain_uuid, (disk,),
                                   chunk_size=repo.config.chunk_size, freeze=freeze, thaw=thaw,
                                   overlay_dir=overlay_dir, **options)

    def _backup_offline(self, repo: AnyRepository, unit: WorkUnit, cancel: CancelToken | None,
                        vm: VmRef | None = None) -> tuple[BackupResult, views.DiskView, ChangeDetection]:
        """A shut-off domain's disk, read from its image while the domain cannot start (no guest,
        no freeze, no checkpoint: every chunk is compared with the base)."""
        disk = unit.disk
        assert disk is not None
        dom = self._domains.domain(disk.domain_uuid)
        with offline_view(dom, (disk,), chunk_size=repo.config.chunk_size) as taken:
            view = taken[disk.serial]
            result = self._read(repo, unit, view, cancel, vm)
        # the new snapshot records no checkpoint: the chain it ended may leave bitmaps in the images
        self._prune_checkpoints(repo, unit.destination, disk.domain_uuid)
        return result, view, view.change_detection

    def _read(self, repo: AnyRepository, unit: WorkUnit, view: views.DiskView,
              cancel: CancelToken | None, vm: VmRef | None = None) -> BackupResult:
        """Back up what ``view`` shows: its changed extents, or all of it (converted to raw first if the
        copier cannot read the qcow2 chain in place)."""
        disk = unit.disk
        assert disk is not None
        changes: list[Extent] | None = list(view.changes) if view.changes is not None else None
        fallback = FallbackNote(fallback_of(view.reason), view.reason) if view.reason else None
        self.reads[view.image] = self.reads.get(view.image, 0) + 1
        try:
            return repo.backup(view.source, disk.snapshot_name, unit.policy, changes,
                               checkpoint=view.checkpoint, cancel=cancel, vm=vm, fallback=fallback)
        except errors.NotReadableInPlace as e:
            log.info("%s; converting to raw first", e)
            self._work_dir.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=self._work_dir, suffix=".raw") as tmp:
                qcow2.convert_to_raw(view.image, tmp.name)
                return repo.backup(tmp.name, disk.snapshot_name, unit.policy, changes,
                                   checkpoint=view.checkpoint, cancel=cancel, vm=vm, fallback=fallback)

    def _prune_checkpoints(self, repo: AnyRepository, destination: str, domain_uuid: str) -> None:
        """Each checkpoint costs a bitmap QEMU updates on every write: keep only those a future
        incremental or differential of this domain's disks can start from, in any configured
        destination's chain (host_agent.agent.chains)."""
        needs: dict[str, set[str]] = {}
        names = {s.name for s in repo.snapshots() if s.name.startswith(f"{domain_uuid}/")}
        for name in names:
            for policy in (Policy.INCREMENTAL, Policy.DIFFERENTIAL):
                base = repo.base_for(name, policy)
                if base is not None and base.checkpoint:
                    needs.setdefault(name.split("/", 1)[1], set()).add(base.checkpoint)
        try:
            keep = self._chains.update(domain_uuid, destination, needs, self._destinations.names)
            dom = self._domains.domain(domain_uuid)
            gone = prune_checkpoints(dom, keep, self._records)
            if is_active(dom):  # raw disks' bitmaps, gone anyway with a QEMU that stopped
                gone += volatile_bitmaps.prune(dom, keep)
        except Exception as e:  # pruning is housekeeping: a failure must not fail the backup
            log.warning("could not prune checkpoints of %s: %s", domain_uuid, e)
            return
        if gone:
            log.info("pruned checkpoints %s of %s", ", ".join(gone), domain_uuid)


def _is_block_device(path: str) -> bool:
    try:
        return stat.S_ISBLK(os.stat(path).st_mode)
    except OSError:
        return False  # the view says what is wrong with it
