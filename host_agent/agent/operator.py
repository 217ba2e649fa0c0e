"""The operator gRPC API (``proto/hyperback/v1/operator.proto``): a thin servicer over the agent's parts.

Operators and tools list domains and their channel state, list snapshots,
trigger backups and restores of any VM, list jobs and stream a job's events.
Health checking and reflection are registered on the same server. Failures map
to gRPC status codes at this boundary: NOT_FOUND for unknown domains, disks and jobs,
INVALID_ARGUMENT for bad names and values, UNAVAILABLE when libvirt or a destination's media do
not answer (``host_agent.protobuf.grpc_status``).

On TCP with ``[tls]`` it requires client certificates (docs/tls.md): an operator may call everything,
a monitor only the lists (``OPERATOR_ROLES``), and another host's agent only what a co-located
backup needs, on the domains visiting from its own host.

The servicer sees the agent through :class:`AgentParts`: the domains, the guests' channels, the
destinations, the intake (the one way a request enters) and the jobs, never the agent itself.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from host_agent import errors
from host_agent._proto.hyperback.v1 import operator_pb2 as pb
from host_agent._proto.hyperback.v1 import operator_pb2_grpc as pb_grpc
from host_agent.agent.channel import State
from host_agent.agent.destinations import Destinations
from host_agent.agent.domains import DomainInfo, Domains, covers
from host_agent.agent.guests import Guests
from host_agent.agent.instant import FORMATS, InstantJobs, Request
from host_agent.agent.intake import Intake
from host_agent.agent.jobs import Job, Jobs, JobState, Origin
from host_agent.agent.journal import new_job_id
from host_agent.agent.schedules import Scheduler
from host_agent.media.access import Owners
from host_agent.model import Instruction, InstructionKind, Placement, Policy, WorkUnit
from host_agent.protobuf import (
    disk_to_pb,
    grpc_status,
    kind_to_pb,
    placement_from_pb,
    placement_to_pb,
    policy_from_pb,
    policy_to_pb,
)
from host_agent.storage.repository import Repository
from host_agent.storage.verification import Verification
from host_agent.tls.identity import Role
from host_agent.tls.roles import ALL, AioRoleInterceptor, Table
from host_agent.tls.transport import NO_TLS, TlsConfig, add_port, peer_identity

log = logging.getLogger(__name__)

SERVICE_NAME = "hyperback.v1.Operator"
OPERATOR_ROLES: Table = {
    Role.OPERATOR: ALL,
    Role.MONITOR: frozenset({"ListDomains", "ListSnapshots", "ListJobs", "WatchJob", "ListSchedules"}),
    # what another host's agent asks of the media host's during a co-located backup (colocation.visits)
    Role.AGENT: frozenset({"ListJobs", "WatchJob", "ListSnapshots", "TriggerBackup"}),
}
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


@dataclass(frozen=True)
class AgentParts:
    """What the operator API works with."""

    domains: Domains
    guests: Guests
    destinations: Destinations
    intake: Intake
    jobs: Jobs
    scheduler: Scheduler
    instant: InstantJobs | None = None  # instant recoveries (None: this agent runs none)


def _state_pb(state: JobState) -> pb.JobState.ValueType:
    return pb.JobState.Value(f"JOB_STATE_{state.name}")


def verification_to_pb(record: Verification) -> pb.BootVerification:
    """A snapshot's boot verification record, as the operator API shows it."""
    return pb.BootVerification(passed=record.passed, reason=record.reason,
                               verified_at=record.time.timestamp(), seconds=record.seconds, host=record.host)


def _job_pb(job: Job) -> pb.Job:
    i = job.instruction
    return pb.Job(id=job.id, kind=kind_to_pb(i.kind),
                  origin=pb.JobOrigin.Value(f"JOB_ORIGIN_{job.origin.name}"),
                  domain_uuid=i.domain_uuid, domain_name=job.domain_name, request_id=str(i.request_id),
                  serials=[d.serial for d in i.disks], destination=i.destination,
                  policy=policy_to_pb(i.policy),
                  snapshot=i.snapshot, state=_state_pb(job.state), detail=job.detail,
                  created_at=job.created_at,
                  updated_at=job.updated_at, not_before=job.not_before, snapshot_ids=job.snapshot_ids,
                  progress=pb.Progress(bytes_done=job.bytes_done, bytes_total=job.bytes_total),
                  moved_bytes=job.moved_bytes, schedule=job.schedule, offline=job.offline,
                  **_placement_fields(job.plan))


def _placement_fields(unit: WorkUnit | None) -> dict[str, Any]:
    if unit is None:
        return {}
    return {"placement": placement_to_pb(unit.placement), "target_host": unit.target_host,
            "predicted_stream_bytes": unit.predicted_stream_bytes,
            "predicted_move_bytes": unit.predicted_move_bytes}


def _forced_placement(value: int) -> Placement:
    """An operator forces streaming, a migration (cold if the VM cannot live-migrate: the policy
    decides that), local work or the appliance; a cold move is not asked for by name."""
    placement = placement_from_pb(value, "TriggerBackupRequest", Placement.AUTO)
    return Placement.MIGRATE if placement is Placement.COLD_MOVE else placement


@contextlib.asynccontextmanager
async def _answering(context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[None]:
    """What a call raises of the error tree becomes its status code, here (protobuf.grpc_status)."""
    try:
        yield
    except errors.HyperbackError as e:
        await context.abort(grpc_status(e), str(e))


class OperatorServicer(pb_grpc.OperatorServicer):
    def __init__(self, parts: AgentParts) -> None:
        self.parts = parts

    async def _domain(self, name_or_uuid: str, context: grpc.aio.ServicerContext[Any, Any],
                      shut_off: bool = False) -> DomainInfo:
        """A running domain with the channel; with ``shut_off``, also a shut-off one wired in (its
        backup is read offline)."""
        served = await asyncio.to_thread(self.parts.domains.served)
        if shut_off:
            served += await asyncio.to_thread(self.parts.domains.shut_off)
        for info in served:
            if name_or_uuid in (info.uuid, info.name):
                return info
        where = "running or shut-off" if shut_off else "running"
        await context.abort(grpc.StatusCode.NOT_FOUND, f"no {where} domain {name_or_uuid!r} with a hyperback "
                                                        "channel ('hyperback vm enable' wires one in)")
        raise AssertionError("abort returns by raising")

    async def ListDomains(self, request: pb.ListDomainsRequest,
                          context: grpc.aio.ServicerContext[Any, Any]) -> pb.ListDomainsResponse:
        async with _answering(context):
            enabled = await asyncio.to_thread(self.parts.domains.enabled)
            last = await asyncio.to_thread(self._last_backups)
        scheduler = self.parts.scheduler
        out = []
        for info in sorted(enabled, key=lambda i: i.name):
            channel = self.parts.guests.state(info.uuid)
            if channel is None:
                state = pb.CHANNEL_STATE_DISCONNECTED
            elif channel is State.CONNECTED:
                state = pb.CHANNEL_STATE_CONNECTED
            else:
                state = pb.CHANNEL_STATE_CONNECTING
            schedules = scheduler.covering(info)
            out.append(pb.Domain(uuid=info.uuid, name=info.name,
                                 state=pb.DOMAIN_STATE_RUNNING if info.running else pb.DOMAIN_STATE_SHUT_OFF,
                                 channel_state=state, channel_detail=info.channel_state or "",
                                 disks=[disk_to_pb(d) for d in info.disks],
                                 last_backup_at=last.get(info.uuid, 0.0), schedules=schedules,
                                 next_backup_at=min((scheduler.next_run(s) for s in schedules), default=0.0)))
        return pb.ListDomainsResponse(domains=out)

    def _last_backups(self) -> dict[str, float]:
        """The newest snapshot's time per domain uuid, over the destinations this host can read."""
        last: dict[str, float] = {}
        for destination in sorted(self.parts.destinations.names):
            try:
                snapshots = self.parts.destinations.repository(destination).snapshots()
            except (errors.HyperbackError, OSError) as e:
                log.info("cannot list %s for last backups: %s", destination, e)
                continue
            for snap in snapshots:
                uuid = snap.name.partition("/")[0]
                if _UUID.fullmatch(uuid):
                    last[uuid] = max(last.get(uuid, 0.0), snap.time.timestamp())
        return last

    async def ListSnapshots(self, request: pb.ListSnapshotsRequest,
                            context: grpc.aio.ServicerContext[Any, Any]) -> pb.ListSnapshotsResponse:
        async with _answering(context):
            return await self._list_snapshots(request, context)

    async def _list_snapshots(self, request: pb.ListSnapshotsRequest,
                              context: grpc.aio.ServicerContext[Any, Any]) -> pb.ListSnapshotsResponse:
        known = self.parts.destinations.names
        destinations = [request.destination] if request.destination else sorted(known)
        if any(d not in known for d in destinations):
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no destination {request.destination!r}")
        # a uuid names a domain even after it is gone; a name only while this host knows it
        domain = request.domain
        if domain and not _UUID.fullmatch(domain):
            domain = (await self._domain(domain, context)).uuid
        out = []
        for dest in destinations:
            repo = await asyncio.to_thread(self.parts.destinations.repository, dest)
            verified = await asyncio.to_thread(repo.verifications)
            for snap in await asyncio.to_thread(repo.snapshots):
                uuid, _, serial = snap.name.partition("/")
                if domain and domain != uuid:
                    continue
                if request.serial and request.serial != serial:
                    continue
                out.append(pb.Snapshot(id=snap.id, name=snap.name, destination=dest,
                                       domain_uuid="" if uuid == "base" else uuid,
                                       # UUID/vm/ITEM: a domain's definition (repository-format 5.3)
                                       serial="" if uuid == "base" or "/" in serial else serial,
                                       policy=policy_to_pb(snap.policy),
                                       parent_id=snap.parent or "", created_at=snap.time.timestamp(),
                                       source=snap.source, size=snap.size, bytes_new=snap.stats.bytes_new,
                                       bytes_stored=snap.stats.bytes_stored,
                                       bytes_read=snap.stats.bytes_read,
                                       verification=verification_to_pb(verified[snap.id])
                                       if snap.id in verified else None))
        out.sort(key=lambda s: s.created_at, reverse=True)
        return pb.ListSnapshotsResponse(snapshots=out)

    async def _trigger(self, kind: InstructionKind, request: Any,
                       context: grpc.aio.ServicerContext[Any, Any]) -> Job:
        info = await self._domain(request.domain, context, shut_off=kind is InstructionKind.BACKUP)
        await _visitor_only(info, context, kind)
        if request.request_id:
            earlier = self.parts.jobs.by_request(info.uuid, request.request_id)
            if earlier is not None:
                return earlier
        destination = self.parts.destinations.named(request.destination)
        if destination not in self.parts.destinations.names:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no destination {destination!r}")
        await _record_visitor(self.parts.destinations, destination, info, context)
        disks = await asyncio.to_thread(self.parts.domains.disks_by_serial, info.uuid,
                                        list(request.serials) or None)
        policy = (policy_from_pb(request.policy, "TriggerBackupRequest", unspecified=Policy.INCREMENTAL)
                  if kind is InstructionKind.BACKUP else Policy.FULL)
        placement = (_forced_placement(request.placement)
                     if isinstance(request, pb.TriggerBackupRequest) else Placement.AUTO)
        instruction = Instruction(new_job_id(), info.uuid, request.request_id or new_job_id(), kind, disks,
                                  destination, policy, getattr(request, "snapshot", "") or "latest"
                                  if kind is InstructionKind.RESTORE else "", time.time(), placement)
        self.parts.intake.submit(instruction, Origin.OPERATOR, info.name)
        job = self.parts.jobs.get(instruction.id)
        assert job is not None
        return job

    async def TriggerBackup(self, request: pb.TriggerBackupRequest,
                            context: grpc.aio.ServicerContext[Any, Any]) -> pb.TriggerBackupResponse:
        async with _answering(context):
            job = await self._trigger(InstructionKind.BACKUP, request, context)
        return pb.TriggerBackupResponse(job=_job_pb(job))

    async def TriggerRestore(self, request: pb.TriggerRestoreRequest,
                             context: grpc.aio.ServicerContext[Any, Any]) -> pb.TriggerRestoreResponse:
        async with _answering(context):
            job = await self._trigger(InstructionKind.RESTORE, request, context)
        return pb.TriggerRestoreResponse(job=_job_pb(job))

    async def ListJobs(self, request: pb.ListJobsRequest,
                       context: grpc.aio.ServicerContext[Any, Any]) -> pb.ListJobsResponse:
        states = set(request.states)
        jobs = [j for j in self.parts.jobs.all()
                if (not request.domain or request.domain in (j.instruction.domain_uuid, j.domain_name))
                and (not states or j.state.value in states)]
        return pb.ListJobsResponse(jobs=[_job_pb(j) for j in jobs])

    async def CancelJob(self, request: pb.CancelJobRequest,
                        context: grpc.aio.ServicerContext[Any, Any]) -> pb.CancelJobResponse:
        async with _answering(context):
            job = await self.parts.intake.cancel(request.job_id)
        return pb.CancelJobResponse(job=_job_pb(job))

    async def ListSchedules(self, request: pb.ListSchedulesRequest,
                            context: grpc.aio.ServicerContext[Any, Any]) -> pb.ListSchedulesResponse:
        scheduler = self.parts.scheduler
        async with _answering(context):
            enabled = await asyncio.to_thread(self.parts.domains.enabled) if scheduler.schedules else []
        out = []
        for name, s in sorted(scheduler.schedules.items()):
            out.append(pb.Schedule(
                name=name, calendar=s.calendar, selector=s.selector,
                domains=sorted(i.name for i in enabled if covers(s, i)), policy=policy_to_pb(s.policy),
                destination=s.destination or scheduler.default_destination,
                last_run_at=scheduler.last_run(name), next_run_at=scheduler.next_run(name),
                retention=s.retention, kind=s.kind, copy_to=s.copy_to))
        return pb.ListSchedulesResponse(schedules=out)

    async def RunSchedule(self, request: pb.RunScheduleRequest,
                          context: grpc.aio.ServicerContext[Any, Any]) -> pb.RunScheduleResponse:
        async with _answering(context):
            firing = await self.parts.scheduler.run_now(request.name)
        jobs = [job for job in map(self.parts.jobs.get, firing.jobs) if job is not None]
        return pb.RunScheduleResponse(jobs=[_job_pb(job) for job in jobs], skipped=firing.skipped)

    async def InstantRestore(self, request: pb.InstantRestoreRequest,
                             context: grpc.aio.ServicerContext[Any, Any]) -> pb.InstantRestoreResponse:
        instant = self.parts.instant
        if instant is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "this agent runs no instant recoveries")
            raise AssertionError("abort returns by raising")
        destination = self.parts.destinations.named(request.destination)
        if destination not in self.parts.destinations.names:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no destination {destination!r}")
        if request.format and request.format not in FORMATS:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"format must be raw or qcow2, not {request.format!r}")
        target = Path(request.target)
        if not target.is_absolute():
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "target must be an absolute path")
        if target.exists():
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                f"{target} exists: choose another target or remove it first")
        async with _answering(context):
            req = Request(request.domain_xml, request.disk or "vda", target, request.format or "raw",
                          request.bandwidth, persistent=not request.transient)
            job = await instant.submit(request.snapshot, destination, req)
        return pb.InstantRestoreResponse(job=_job_pb(job))

    async def WatchJob(self, request: pb.WatchJobRequest,
                       context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[pb.JobEvent]:
        job = self.parts.jobs.get(request.job_id)
        if job is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no job {request.job_id!r}")
            return
        sent = request.after_sequence or max(len(job.events) - 1, 0)
        while True:
            for event in job.events[sent:]:
                sent = event.sequence
                yield pb.JobEvent(job_id=job.id, sequence=event.sequence, at=event.at,
                                  state=_state_pb(event.state), message=event.message, final=event.final,
                                  progress=pb.Progress(bytes_done=event.bytes_done,
                                                       bytes_total=event.bytes_total))
                if event.final:
                    return
            await _next_event(job, sent)


async def _visitor_only(info: DomainInfo, context: grpc.aio.ServicerContext[Any, Any],
                        kind: InstructionKind) -> None:
    """Refuse another host's agent a domain that is not visiting from that host."""
    identity = peer_identity(context)
    if identity is not None and identity.role is Role.AGENT and info.visiting_from != identity.name:
        await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                            f"role agent ({identity.name}) may not call Trigger{kind.value.capitalize()} on "
                            f"domain {info.name}: it is not visiting from {identity.name}")


async def _record_visitor(destinations: Destinations, destination: str, info: DomainInfo,
                          context: grpc.aio.ServicerContext[Any, Any]) -> None:
    """A domain visiting from another host's agent, backed up here into local media, is that host's:
    the media service's ledger says so, so that its agent may read it over the LAN (docs/tls.md)."""
    identity = peer_identity(context)
    if identity is None or identity.role is not Role.AGENT or not destinations.is_local(destination):
        return
    repo = await asyncio.to_thread(destinations.repository, destination)
    if isinstance(repo, Repository):
        await asyncio.to_thread(Owners(repo).adopt, info.uuid, identity.name)


async def _next_event(job: Job, seen: int) -> None:
    """Wait until the job has more than ``seen`` events."""
    async with job.changed:
        await job.changed.wait_for(lambda: len(job.events) > seen)


class OperatorServer:
    def __init__(self, server: grpc.aio.Server, address: str) -> None:
        self._server, self.address = server, address  # the address with the port resolved

    async def stop(self, grace: float | None = None) -> None:
        await self._server.stop(grace)


async def start_operator_server(parts: AgentParts, listen: str, tls: TlsConfig = NO_TLS) -> OperatorServer:
    """Serve the operator API, health and reflection on ``listen`` (``unix:/path`` or host:port;
    with ``tls``, a TCP address requires client certificates and roles apply)."""
    secure = tls.enabled and not listen.startswith("unix")
    server = grpc.aio.server(interceptors=[AioRoleInterceptor(OPERATOR_ROLES, tls)] if secure else [])
    pb_grpc.add_OperatorServicer_to_server(OperatorServicer(parts), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    port = add_port(server, listen, tls, "operator API")
    await server.start()
    await health_servicer.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    log.info("operator API listening on %s%s", listen, " (mutual TLS)" if secure else "")
    address = listen if listen.startswith("unix") else f"{listen.rpartition(':')[0]}:{port}"
    return OperatorServer(server, address)
