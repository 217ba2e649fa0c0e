"""Visits: a backup on the host that holds the media, so the data stays off the LAN.

:class:`Colocator` carries out the units planned MIGRATE or COLD_MOVE.  The VM gets the visit
marker (one move per VM at a time), moves to the media host, that host's agent backs it up to its
local media (an operator ``TriggerBackup`` over gRPC, watched to the end), and the VM moves back,
whatever the backup's fate.  Every step is reported to the job; a failed move leaves the VM running
where it was and the job gets an error that says where it runs.  What a move would cost is
measured by :mod:`host_agent.colocation.footprint`.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import libvirt  # type: ignore[import-untyped]

from host_agent import errors, hypervisor
from host_agent._proto.hyperback.v1 import operator_pb2 as opb
from host_agent._proto.hyperback.v1 import operator_pb2_grpc as opb_grpc
from host_agent.colocation import migration
from host_agent.config import AgentConfig
from host_agent.errors import ColocationError, HypervisorError
from host_agent.model import STRENGTH, Placement, WorkUnit
from host_agent.protobuf import placement_to_pb, policy_to_pb
from host_agent.tls.transport import aio_channel, tls_failure

log = logging.getLogger(__name__)

_FINAL = {opb.JOB_STATE_SUCCEEDED, opb.JOB_STATE_FAILED, opb.JOB_STATE_REJECTED, opb.JOB_STATE_CANCELLED}



Report = Callable[[str, int, int], Awaitable[None]]   # (message, bytes done, bytes total)


@dataclass(frozen=True)
class VisitedDisk:
    serial: str
    snapshot: str
    bytes_read: int
    bytes_new: int


@dataclass(frozen=True)
class VisitResult:
    disks: tuple[VisitedDisk, ...]
    there: migration.MoveStats
    back: migration.MoveStats
    remote_job: str
    seconds: float


class Colocator:
    """Carries out co-located backups for this host's agent (one move per VM at a time)."""

    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self._moving: set[str] = set()

    async def visit(self, units: Sequence[WorkUnit], report: Report) -> VisitResult:
        """Move the VM of ``units`` (one domain, one destination, one target host) there, back it up
        there, move it back."""
        first = units[0]
        assert first.disk is not None
        uuid, name = first.disk.domain_uuid, first.disk.domain_name
        if uuid in self._moving:
            raise ColocationError(f"{name} is already being moved; one move per VM at a time")
        self._moving.add(uuid)
        try:
            return await self._visit(units, report)
        finally:
            self._moving.discard(uuid)

    async def _visit(self, units: Sequence[WorkUnit], report: Report) -> VisitResult:
        first = units[0]
        assert first.disk is not None
        name = first.disk.domain_name
        inventory = self.config.inventory
        here, there = inventory.this_host, inventory.host(first.target_host)
        job = first.satisfies[0]
        t0 = time.monotonic()
        await asyncio.to_thread(self._mark, name, job)
        try:
            verb = "live-migrating" if first.placement is Placement.MIGRATE else "moving (cold)"
            reads = sum(u.predicted_read_bytes for u in units)
            await report(f"{verb} {name} to {there.name} (predicted {first.predicted_move_bytes} LAN bytes "
                         f"there and back, against {first.predicted_stream_bytes} to stream; the backup "
                         f"there reads {reads} bytes of the disks)", 0, 0)
            # the guest reads that step before its channel drops, so it knows to wait for the move
            await asyncio.sleep(0.5)
            try:
                out = await asyncio.to_thread(self._move, first.placement, name, here, there)
            except errors.MoveError as e:
                raise ColocationError(f"could not move {name} to {there.name}: {e}; it runs on "
                                      f"{here.name} as before") from e
            try:
                await report(f"backing up {name} on {there.name}", 0, 0)
                remote_job, disks = await self._remote_backup(units, there.agent, report)
            except ColocationError as e:
                await report(f"moving {name} back to {here.name}", 0, 0)
                try:
                    await self._move_back(first.placement, name, here, there)
                except ColocationError as back_error:
                    raise ColocationError(f"{e}; and then: {back_error}") from e
                raise
            await report(f"moving {name} back to {here.name}", 0, 0)
            back = await self._move_back(first.placement, name, here, there)
        finally:
            # wherever it ended (home, or left on the media host after failed moves back), it must
            # not stay marked: the marker keeps its host's agent off its channel
            await asyncio.to_thread(self._unmark, name, (self.config.libvirt_uri, there.libvirt_uri))
        return VisitResult(disks, out, back, remote_job, time.monotonic() - t0)

    async def recover(self) -> list[str]:
        """At agent start: bring home the VMs this host sent on visits that its previous run did not
        finish (the agent died meanwhile).  Each waits for the media host's job on it to end, moves
        back and loses its marker.  Returns what was done, for the log."""
        done = []
        me = self.config.inventory.host_name
        for host in self.config.inventory.hosts.values():
            if host.name == me:
                continue
            for name, live in await asyncio.to_thread(self._stranded_on, host.libvirt_uri):
                placement = Placement.MIGRATE if live else Placement.COLD_MOVE
                log.warning("%s was left on %s by an unfinished visit; bringing it home", name, host.name)
                try:
                    await self._wait_for_jobs_on(host.agent, name)
                    await self._move_back(placement, name, self.config.inventory.this_host, host)
                    done.append(f"{name}: brought home from {host.name}")
                except ColocationError as e:
                    log.error("%s stays on %s: %s", name, host.name, e)
                    done.append(f"{name}: stays on {host.name} ({e})")
                finally:
                    await asyncio.to_thread(self._unmark, name, (self.config.libvirt_uri, host.libvirt_uri))
        return done

    def _stranded_on(self, uri: str) -> list[tuple[str, bool]]:
        """(name, live-migratable) of the running domains on ``uri`` that carry this host's marker."""
        try:
            conn = hypervisor.connect(uri)
        except HypervisorError as e:
            log.warning("cannot look for VMs left on %s: %s", uri, e)
            return []
        try:
            found = []
            for dom in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE):
                xml = dom.XMLDesc(0)
                marker = migration.visit_marker(xml)
                if marker is not None and marker.origin == self.config.inventory.host_name:
                    found.append((dom.name(), migration.live_migratable(xml)[0]))
            return found
        finally:
            conn.close()

    async def _wait_for_jobs_on(self, agent: str, name: str) -> None:
        """Until the media host's agent holds no unfinished job on domain ``name`` (its disk views
        must be gone before the VM moves), at most ``visit_timeout``."""
        deadline = time.monotonic() + self.config.visit_timeout
        async with aio_channel(agent, self.config.tls) as channel:
            stub = opb_grpc.OperatorStub(channel)
            while time.monotonic() < deadline:
                try:
                    jobs = await stub.ListJobs(opb.ListJobsRequest(domain=name), timeout=10)
                except grpc.aio.AioRpcError as e:
                    log.warning("cannot ask %s about jobs on %s (%s); moving it anyway", agent, name,
                                e.details())
                    return
                if all(j.state in _FINAL for j in jobs.jobs):
                    return
                await asyncio.sleep(1)
        raise ColocationError(f"the media host still backs {name} up after {self.config.visit_timeout:.0f} s")

    # -- libvirt steps (worker threads) --

    def _with_domain(self, uri: str, name: str, fn: Callable[[Any], None]) -> None:
        conn = hypervisor.connect(uri)
        try:
            fn(conn.lookupByName(name))
        finally:
            conn.close()

    def _mark(self, name: str, job: str) -> None:
        try:
            self._with_domain(self.config.libvirt_uri, name,
                              lambda dom: migration.mark_visit(dom, self.config.inventory.host_name, job))
        except HypervisorError as e:
            raise ColocationError(f"cannot prepare {name} for a move: {e}") from e

    def _unmark(self, name: str, uris: Sequence[str]) -> None:
        """Clear the marker on the first of ``uris`` that runs the domain."""
        for uri in uris:
            try:
                self._with_domain(uri, name, migration.clear_visit)
                return
            except HypervisorError as e:
                log.info("%s: no %s to unmark (%s)", uri, name, e)
        log.warning("could not clear the visit marker of %s on %s", name, ", ".join(uris))

    def _move(self, placement: Placement, name: str, src: Any, dst: Any) -> migration.MoveStats:
        src_uri = self.config.libvirt_uri if src.name == self.config.inventory.host_name else src.libvirt_uri
        if placement is Placement.COLD_MOVE:
            return migration.cold_move(name, src_uri, dst.libvirt_uri,
                                       shutdown_timeout=self.config.shutdown_timeout,
                                       rescue_dir=str(self.config.state_dir))
        return migration.live_migrate(name, src_uri, dst.libvirt_uri, dst.lan_ip, self.config.move_timeout,
                                      bandwidth_mib=self.config.move_bandwidth)

    async def _move_back(self, placement: Placement, name: str, here: Any, there: Any,
                         attempts: int = 4) -> migration.MoveStats:
        """Bring the VM home; it stays running where it is between attempts (5, 10, 20 s apart: the
        media host may still be letting go of the disk view)."""
        for attempt in range(1, attempts + 1):
            try:
                return await asyncio.to_thread(self._move, placement, name, there, here)
            except errors.MoveError as e:
                if attempt == attempts:
                    raise ColocationError(f"could not move {name} back to {here.name} ({e}); it stays on "
                                          f"{there.name}: move it with 'virsh migrate'") from e
                log.warning("moving %s back failed (attempt %d): %s", name, attempt, e)
                await asyncio.sleep(5 * 2 ** (attempt - 1))
        raise AssertionError("unreachable")

    # -- the media host's agent --

    async def _until_final(self, stub: Any, domain_uuid: str, job_id: str, wait: float = 120.0) -> Any:
        """The media host's job once it is final (or as it stands after ``wait`` seconds)."""
        deadline = time.monotonic() + wait
        job = None
        while time.monotonic() < deadline:
            try:
                jobs = await stub.ListJobs(opb.ListJobsRequest(domain=domain_uuid), timeout=10)
            except grpc.aio.AioRpcError as e:
                log.warning("cannot ask the media host about job %s: %s", job_id, e.details())
                return job
            job = next((j for j in jobs.jobs if j.id == job_id), None)
            if job is None or job.state in _FINAL:
                return job
            await asyncio.sleep(1)
        return job

    async def _remote_backup(self, units: Sequence[WorkUnit], agent: str,
                             report: Report) -> tuple[str, tuple[VisitedDisk, ...]]:
        first = units[0]
        assert first.disk is not None
        serials = [u.disk.serial for u in units if u.disk is not None]
        policy = max((u.policy for u in units), key=STRENGTH.__getitem__)
        request = opb.TriggerBackupRequest(domain=first.disk.domain_uuid, serials=serials,
                                           destination=first.destination, policy=policy_to_pb(policy),
                                           # a new key per visit: a requeued job must not get the
                                           # media host's answer to an earlier attempt
                                           request_id=f"visit-{first.satisfies[0]}-{time.time_ns()}",
                                           placement=placement_to_pb(Placement.LOCAL))
        try:
            async with aio_channel(agent, self.config.tls) as channel:
                stub = opb_grpc.OperatorStub(channel)
                started = await stub.TriggerBackup(request, timeout=60)
                job = started.job
                try:
                    async for event in stub.WatchJob(opb.WatchJobRequest(job_id=job.id),
                                                     timeout=self.config.visit_timeout):
                        if event.message:
                            await report(f"on the media host: {event.message}", event.progress.bytes_done,
                                         event.progress.bytes_total)
                        if event.final:
                            break
                finally:
                    # never move the VM away while the media host still holds a view of its disks
                    final = await self._until_final(stub, first.disk.domain_uuid, job.id)
                if final is None or final.state != opb.JOB_STATE_SUCCEEDED:
                    why = final.detail if final is not None else "the job vanished"
                    raise ColocationError(f"the backup on the media host failed: {why}")
                snaps = await stub.ListSnapshots(opb.ListSnapshotsRequest(
                    destination=first.destination, domain=first.disk.domain_uuid), timeout=60)
        except grpc.aio.AioRpcError as e:
            tls = self.config.tls
            handshake = tls_failure(e.code(), e.details() or "", f"the media host's agent at {agent}",
                                    tls.cert if tls.enabled else None)
            if handshake is not None:
                raise handshake from e
            raise ColocationError(f"the media host's agent at {agent}: {e.code().name}: {e.details()}") from e
        by_id = {s.id: s for s in snaps.snapshots}
        disks = tuple(VisitedDisk(s.serial, s.id, s.bytes_read, s.bytes_new)
                      for s in (by_id.get(sid) for sid in final.snapshot_ids) if s is not None)
        missing = set(serials) - {d.serial for d in disks}
        if missing:
            raise ColocationError(f"the media host reports no snapshot of disk(s) "
                                  f"{', '.join(sorted(missing))}")
        return job.id, disks
