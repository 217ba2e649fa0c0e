"""Intake: where requests enter the agent, a guest's from its channel or an operator's over gRPC.

A guest's message has been decoded and validated against the wire schema by its channel; here it
is checked against this host (the destination exists and the ``[[guests]]`` rules let this VM use
it, the disks are the guest's own, by serial, in its own live domain XML; its quotas:
``host_agent.agent.guestrules``), converted once into an
:class:`~host_agent.model.Instruction`, journaled before the guest hears "accepted", registered as
a job and queued in the driver. ``status`` and ``list`` are answered at once, from the jobs, the
journal and the repositories, through the guests' door (``host_agent.agent.guests``); ``see`` and
``release`` by the leases of snapshots guests see (``host_agent.agent.snapshot_disks``).
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict

from guest_shim import protocol as p
from host_agent.agent.channel import GuestChannel
from host_agent.agent.destinations import Destinations
from host_agent.agent.domains import DomainInfo, Domains
from host_agent.agent.driver import BackupDriver
from host_agent.agent.guestrules import GuestRules, Usage, over_quota, usage
from host_agent.agent.guests import Guests, for_guest, progress_message, snapshots_message, stored_result
from host_agent.agent.jobs import Job, Jobs, JobState, Origin
from host_agent.agent.journal import Journal, new_job_id
from host_agent.agent.snapshot_disks import SnapshotDisks
from host_agent.config import Limits
from host_agent.errors import (
    EnvironmentProblem,
    HyperbackError,
    JobFinished,
    SnapshotNotFound,
    UnknownDisk,
    UnknownJob,
    UsageError,
)
from host_agent.model import DiskRef, Instruction, InstructionKind, PathSelection, Policy, outermost

log = logging.getLogger(__name__)


def _of_disk(name: str, disk: DiskRef) -> bool:
    """A snapshot name of the disk: its disk snapshots' or one of its file-level snapshots'."""
    return name == disk.snapshot_name or (name.startswith(f"{disk.snapshot_name}/paths-")
                                          and name.removeprefix(f"{disk.snapshot_name}/paths-").isdigit())


class Intake:
    """Turns requests into queued instructions; implements the channels' ``Handler``."""

    def __init__(self, limits: Limits, domains: Domains, destinations: Destinations, jobs: Jobs,
                 journal: Journal, guests: Guests, driver: BackupDriver,
                 snapshot_disks: SnapshotDisks, rules: GuestRules | None = None) -> None:
        self.limits = limits
        self.rules = rules or GuestRules((), destinations.names)
        self.domains, self.destinations = domains, destinations
        self.jobs, self.journal, self.guests, self.driver = jobs, journal, guests, driver
        self.snapshot_disks = snapshot_disks
        self._admitting: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)  # per domain uuid

    def submit(self, instruction: Instruction, origin: Origin, domain_name: str, schedule: str = "") -> None:
        """Journal, register and queue an instruction (a guest's, an operator's or a schedule's)."""
        self.journal.add(instruction, origin, domain_name, schedule)
        self.jobs.add(instruction, origin, domain_name, schedule)
        self.driver.submit(instruction)

    async def cancel(self, job_id: str) -> Job:
        """Stop a job: one that waits is answered CANCELLED at once; a running one stops at the
        copier's next chunk and publishes nothing (its view merges back, its guest is thawed), unless
        its snapshot was committed already: then it succeeds."""
        job = self.jobs.get(job_id)
        if job is None:
            raise UnknownJob(f"no job {job_id!r} on this agent (finished jobs are kept only for a while)")
        if job.state.final:
            raise JobFinished(f"job {job_id} has finished ({job.state.name.lower()}): nothing to cancel")
        job.cancel.cancel()
        self.driver.drop(job_id)
        if job.state is JobState.RUNNING:
            await self.jobs.step(job_id, "cancelling: the copy stops at its next chunk")
        else:
            await self.guests.fail(job.instruction, "cancelled by the operator", JobState.CANCELLED)
        return job

    # ---------- channel.Handler ----------

    async def on_request(self, channel: GuestChannel, msg: p.Message) -> p.Message:
        uuid = channel.domain_uuid
        if isinstance(msg, p.Status):
            return self._status(uuid, msg)
        if isinstance(msg, p.ListSnapshots):
            return await asyncio.to_thread(self._list, channel, msg)
        if isinstance(msg, (p.Backup, p.Restore)):
            return await self._accept(channel, msg)
        if isinstance(msg, p.See):
            return await self._see(channel, msg)
        if isinstance(msg, p.Release):
            return await self._release(uuid, msg)
        return p.ErrorMessage(getattr(msg, "id", None), p.ErrorCode.UNSUPPORTED, "not a request")

    def on_thawed(self, channel: GuestChannel, msg: p.Thawed) -> None:
        self.guests.on_thawed(channel, msg)

    # ---------- requests ----------

    def _unknown_destination(self, channel: GuestChannel, msg: p.Backup | p.Restore | p.ListSnapshots | p.See
                             ) -> p.ErrorMessage | None:
        """A destination that does not exist, or that the ``[[guests]]`` rules do not let this VM
        use: answered alike, naming only the destinations it may use. Blocking (libvirt, when
        rules restrict destinations): call it from a thread."""
        destination = self.destinations.named(msg.destination)
        allowed = self.destinations.names
        if self.rules.restrict_destinations:
            allowed = self.rules.allowed(self.domains.get(channel.domain_uuid))
        if destination in allowed:
            return None
        why = "it may not use" if destination in self.destinations.names else "does not exist"
        log.warning("domain %s (%s) asked for destination %r, which %s: refused", channel.domain_name,
                    channel.domain_uuid, destination, why)
        asked = f"a destination named {destination!r}" if msg.destination else "the default destination"
        usable = ", ".join(sorted(allowed)) or "none"
        return p.ErrorMessage(msg.id, p.ErrorCode.UNKNOWN_DESTINATION,
                              f"this VM has no use of {asked}; it may use: {usable}")

    def _over_quota(self, channel: GuestChannel, msg: p.Backup, destination: str, disks: int,
                    waiting: int) -> p.ErrorMessage | None:
        """A backup refused before anything is written, because this VM keeps as much in the
        destination as its quota allows. Blocking (libvirt, the repository): call it from a thread."""
        if not any(r.max_bytes or r.max_snapshots for r in self.rules.rules):
            return None
        info: DomainInfo = self.domains.get(channel.domain_uuid)
        quota = self.rules.quota(info)
        if not (quota.max_bytes or quota.max_snapshots):
            return None
        try:
            used = usage(self.destinations.repository(destination).snapshots(), channel.domain_uuid)
        except HyperbackError as e:
            log.warning("cannot count what domain %s keeps in %s: %s", channel.domain_name, destination, e)
            # the error names host paths and addresses: the operator's log has it, not the guest
            return p.ErrorMessage(msg.id, p.ErrorCode.FAILED, "the host cannot count what this VM keeps in "
                                  "the destination now; ask again later", retry_after=60.0)
        why = over_quota(quota, Usage(used.bytes, used.snapshots + waiting), disks)
        if why is None:
            return None
        log.warning("domain %s (%s) is over its quota in %s: %s; backup refused", channel.domain_name,
                    channel.domain_uuid, destination, why)
        return p.ErrorMessage(msg.id, p.ErrorCode.QUOTA, why)

    def _waiting_snapshots(self, uuid: str, destination: str) -> int:
        """The snapshots this VM's unfinished backups to ``destination`` will make."""
        return sum(len(j.instruction.disks) for j in self.jobs.all()
                   if j.instruction.domain_uuid == uuid and not j.state.final
                   and j.instruction.kind is InstructionKind.BACKUP
                   and j.instruction.destination == destination)

    async def _accept(self, channel: GuestChannel, msg: p.Backup | p.Restore) -> p.Message:
        uuid = channel.domain_uuid
        refused = await asyncio.to_thread(self._unknown_destination, channel, msg) or self._unsupported(msg)
        if refused is not None:
            return refused
        serials = ([msg.target] if isinstance(msg, p.Restore) else
                   None if msg.targets == p.ALL else list(msg.targets))
        try:
            disks = await asyncio.to_thread(self.domains.disks_by_serial, uuid, serials)
        except UnknownDisk as e:
            return p.ErrorMessage(msg.id, p.ErrorCode.UNKNOWN_DISK, p.clean_text(str(e)))
        if not disks:
            return p.ErrorMessage(msg.id, p.ErrorCode.UNKNOWN_DISK, "this VM has no disk with a serial")
        if len(disks) > self.limits.max_disks_per_request:
            return p.ErrorMessage(msg.id, p.ErrorCode.QUOTA,
                                  f"at most {self.limits.max_disks_per_request} disks per request")
        if self.jobs.pending_for(uuid) >= self.limits.pending_per_vm:
            return p.ErrorMessage(msg.id, p.ErrorCode.QUOTA,
                                  f"this VM already has {self.limits.pending_per_vm} jobs waiting; "
                                  "ask again when one has finished", retry_after=30.0)
        destination = self.destinations.named(msg.destination)
        # one request of a VM at a time from its quota check to its job: requests sent together
        # must not each pass the check before any of them counts as waiting
        async with self._admitting[uuid]:
            if isinstance(msg, p.Backup):
                over = await asyncio.to_thread(self._over_quota, channel, msg, destination, len(disks),
                                               self._waiting_snapshots(uuid, destination))
                if over is not None:
                    return over
            instruction = self._instruction(uuid, msg, disks, destination)
            self.submit(instruction, Origin.GUEST, channel.domain_name)
        return p.Accepted(msg.id, instruction.id)

    def _instruction(self, uuid: str, msg: p.Backup | p.Restore, disks: tuple[DiskRef, ...],
                     destination: str) -> Instruction:
        if isinstance(msg, p.Restore):
            instruction = Instruction(new_job_id(), uuid, msg.id, InstructionKind.RESTORE, disks,
                                      destination, Policy.FULL, msg.snapshot, time.time())
        else:
            # a folder and a path inside it would store that path twice
            paths = None if msg.paths is None else PathSelection(msg.partition or 0, outermost(msg.paths))
            # a path-level snapshot is always whole files: unchanged ones cost only their dedup lookup
            policy = Policy.FULL if paths else Policy(msg.policy.value)
            instruction = Instruction(new_job_id(), uuid, msg.id, InstructionKind.BACKUP, disks,
                                      destination, policy, "", time.time(), paths=paths)
            if msg.quiesce:
                self.guests.expect_quiesce(instruction.id)
        return instruction

    def _unsupported(self, msg: p.Backup | p.Restore) -> p.ErrorMessage | None:
        if isinstance(msg, p.Restore) and msg.mode is p.RestoreMode.IN_PLACE:
            return p.ErrorMessage(msg.id, p.ErrorCode.UNSUPPORTED,
                                  "a running VM cannot restore over its own disk: restore with mode "
                                  "new-disk, or shut the VM down and run 'hyperback restore' on the host")
        destination = self.destinations.named(msg.destination)
        if isinstance(msg, p.Backup) and msg.paths and not self.destinations.is_local(destination):
            return p.ErrorMessage(msg.id, p.ErrorCode.UNSUPPORTED,
                                  f"destination {destination!r} is on another host; a backup of paths "
                                  "goes to a destination whose media are on this host")
        return None

    async def _see(self, channel: GuestChannel, msg: p.See) -> p.Message:
        uuid = channel.domain_uuid
        refused = await asyncio.to_thread(self._unknown_destination, channel, msg)
        if refused is not None:
            return refused
        try:
            lease = await self.snapshot_disks.see(uuid, msg.target, msg.snapshot,
                                                  self.destinations.named(msg.destination), msg.partition)
        except UnknownDisk as e:
            return p.ErrorMessage(msg.id, p.ErrorCode.UNKNOWN_DISK, p.clean_text(str(e)))
        except SnapshotNotFound as e:
            return p.ErrorMessage(msg.id, p.ErrorCode.UNKNOWN_SNAPSHOT, p.clean_text(str(e)))
        except UsageError as e:
            return p.ErrorMessage(msg.id, p.ErrorCode.QUOTA, p.clean_text(str(e)))
        except EnvironmentProblem as e:
            log.warning("domain %s cannot see snapshot %s: %s", uuid, msg.snapshot, e)
            return p.ErrorMessage(msg.id, p.ErrorCode.FAILED, for_guest(f"the host could not attach it: {e}"))
        return p.Seeing(msg.id, lease.disk, lease.snapshot, lease.serial, lease.size, round(lease.expires, 3))

    async def _release(self, uuid: str, msg: p.Release) -> p.Message:
        try:
            lease = await self.snapshot_disks.release(uuid, msg.serial)
        except UnknownDisk as e:
            return p.ErrorMessage(msg.id, p.ErrorCode.UNKNOWN_DISK, p.clean_text(str(e)))
        return p.Released(msg.id, lease.serial, p.ReleaseCause.GUEST)

    def _status(self, uuid: str, msg: p.Status) -> p.Message:
        job = self.jobs.get(msg.job)
        if job is not None and job.instruction.domain_uuid == uuid and not job.state.final:
            return progress_message(msg.id, msg.job, job.state is JobState.RUNNING)
        stored = self.journal.result(uuid, msg.job)
        if stored is not None and "wire" in stored:
            return stored_result(stored, msg.id)
        if self.journal.is_pending(uuid, msg.job):
            return progress_message(msg.id, msg.job, running=False)
        return p.ErrorMessage(msg.id, p.ErrorCode.UNKNOWN_JOB,
                              f"this VM has no job {p.clean_text(msg.job, 64)}")

    def _list(self, channel: GuestChannel, msg: p.ListSnapshots) -> p.Message:
        uuid = channel.domain_uuid
        refused = self._unknown_destination(channel, msg)
        if refused is not None:
            return refused
        destination = self.destinations.named(msg.destination)
        try:
            disks = self.domains.disks_by_serial(uuid, [msg.target] if msg.target else None)
        except UnknownDisk as e:
            return p.ErrorMessage(msg.id, p.ErrorCode.UNKNOWN_DISK, p.clean_text(str(e)))
        snaps = self.destinations.repository(destination).snapshots()
        return snapshots_message(msg.id, ((disk.serial, destination, snap) for disk in disks
                                          for snap in snaps if _of_disk(snap.name, disk)))
