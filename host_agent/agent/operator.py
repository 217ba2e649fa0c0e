"""The operator gRPC API (``proto/hyperback/v1/operator.proto``): a thin servicer over the agent.

Operators and tools list domains and their channel state, list snapshots,
trigger backups and restores of any VM, list jobs and stream a job's events.
Health checking and reflection are registered on the same server. Failures map
to gRPC status codes at this boundary: NOT_FOUND for unknown domains and jobs,
INVALID_ARGUMENT for bad names, UNAVAILABLE when libvirt does not answer.
"""
from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from host_agent import errors
from host_agent._proto.hyperback.v1 import operator_pb2 as pb
from host_agent._proto.hyperback.v1 import operator_pb2_grpc as pb_grpc
from host_agent._proto.hyperback.v1 import optimizer_pb2 as opb
from host_agent.agent.channel import State
from host_agent.agent.domains import DomainError, DomainInfo, UnknownDisk
from host_agent.agent.jobs import Job, JobState, Origin
from host_agent.agent.journal import new_job_id
from host_agent.model import Instruction, InstructionKind, Placement, Policy, WorkUnit

if TYPE_CHECKING:
    from host_agent.agent.daemon import Agent

log = logging.getLogger(__name__)

SERVICE_NAME = "hyperback.v1.Operator"
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_POLICY = {opb.POLICY_FULL: Policy.FULL, opb.POLICY_INCREMENTAL: Policy.INCREMENTAL,
           opb.POLICY_DIFFERENTIAL: Policy.DIFFERENTIAL, opb.POLICY_UNSPECIFIED: Policy.INCREMENTAL}
_POLICY_PB = {v: k for k, v in _POLICY.items() if k != opb.POLICY_UNSPECIFIED}
_PLACEMENT_BACK = {opb.PLACEMENT_STREAM: Placement.STREAM, opb.PLACEMENT_MIGRATE: Placement.MIGRATE,
                   opb.PLACEMENT_LOCAL: Placement.LOCAL, opb.PLACEMENT_COLD_MOVE: Placement.MIGRATE,
                   opb.PLACEMENT_APPLIANCE: Placement.APPLIANCE}
_PLACEMENT_PB = {Placement.AUTO: opb.PLACEMENT_UNSPECIFIED, Placement.LOCAL: opb.PLACEMENT_LOCAL,
                 Placement.STREAM: opb.PLACEMENT_STREAM, Placement.MIGRATE: opb.PLACEMENT_MIGRATE,
                 Placement.COLD_MOVE: opb.PLACEMENT_COLD_MOVE, Placement.APPLIANCE: opb.PLACEMENT_APPLIANCE}


def _disk_pb(d: Any) -> opb.DiskRef:
    return opb.DiskRef(domain_uuid=d.domain_uuid, domain_name=d.domain_name, serial=d.serial, target=d.target,
                       path=d.path, format=d.format, size=d.size, backing_chain=list(d.backing_chain))


def _state_pb(state: JobState) -> pb.JobState.ValueType:
    return pb.JobState.Value(f"JOB_STATE_{state.name}")


def _job_pb(job: Job) -> pb.Job:
    i = job.instruction
    return pb.Job(id=job.id, kind=(opb.INSTRUCTION_KIND_RESTORE if i.kind is InstructionKind.RESTORE
                                   else opb.INSTRUCTION_KIND_BACKUP),
                  origin=pb.JOB_ORIGIN_GUEST if job.origin is Origin.GUEST else pb.JOB_ORIGIN_OPERATOR,
                  domain_uuid=i.domain_uuid, domain_name=job.domain_name, request_id=i.request_id,
                  serials=[d.serial for d in i.disks], destination=i.destination,
                  policy=_POLICY_PB[i.policy],
                  snapshot=i.snapshot, state=_state_pb(job.state), detail=job.detail,
                  created_at=job.created_at,
                  updated_at=job.updated_at, not_before=job.not_before, snapshot_ids=job.snapshot_ids,
                  progress=pb.Progress(bytes_done=job.bytes_done, bytes_total=job.bytes_total),
                  moved_bytes=job.moved_bytes,
                  **_placement_fields(job.plan))


def _placement_fields(unit: WorkUnit | None) -> dict[str, Any]:
    if unit is None:
        return {}
    return {"placement": _PLACEMENT_PB[unit.placement], "target_host": unit.target_host,
            "predicted_stream_bytes": unit.predicted_stream_bytes,
            "predicted_move_bytes": unit.predicted_move_bytes}


class OperatorServicer(pb_grpc.OperatorServicer):
    def __init__(self, agent: Agent) -> None:
        self.agent = agent

    async def _domain(self, name_or_uuid: str, context: grpc.aio.ServicerContext[Any, Any]) -> DomainInfo:
        try:
            served = await asyncio.to_thread(self.agent.domains.served)
        except DomainError as e:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
        for info in served:
            if name_or_uuid in (info.uuid, info.name):
                return info
        await context.abort(grpc.StatusCode.NOT_FOUND, f"no running domain {name_or_uuid!r} with a hyperback "
                                                        "channel")
        raise AssertionError("abort returns by raising")

    async def ListDomains(self, request: pb.ListDomainsRequest,
                          context: grpc.aio.ServicerContext[Any, Any]) -> pb.ListDomainsResponse:
        try:
            served = await asyncio.to_thread(self.agent.domains.served)
        except DomainError as e:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
        out = []
        for info in sorted(served, key=lambda i: i.name):
            channel = self.agent.channels.get(info.uuid)
            if channel is None:
                state = pb.CHANNEL_STATE_DISCONNECTED
            elif channel.state is State.CONNECTED:
                state = pb.CHANNEL_STATE_CONNECTED
            else:
                state = pb.CHANNEL_STATE_CONNECTING
            out.append(pb.Domain(uuid=info.uuid, name=info.name, state=pb.DOMAIN_STATE_RUNNING,
                                 channel_state=state, channel_detail=info.channel_state or "",
                                 disks=[_disk_pb(d) for d in info.disks]))
        return pb.ListDomainsResponse(domains=out)

    async def ListSnapshots(self, request: pb.ListSnapshotsRequest,
                            context: grpc.aio.ServicerContext[Any, Any]) -> pb.ListSnapshotsResponse:
        config = self.agent.config
        destinations = [request.destination] if request.destination else sorted(config.destinations)
        if any(d not in config.destinations for d in destinations):
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no destination {request.destination!r}")
        # a uuid names a domain even after it is gone; a name only while this host knows it
        domain = request.domain
        if domain and not _UUID.fullmatch(domain):
            domain = (await self._domain(domain, context)).uuid
        out = []
        for dest in destinations:
            repo = await asyncio.to_thread(self.agent.repository, dest)
            for snap in await asyncio.to_thread(repo.snapshots):
                uuid, _, serial = snap.name.partition("/")
                if domain and domain != uuid:
                    continue
                if request.serial and request.serial != serial:
                    continue
                out.append(pb.Snapshot(id=snap.id, name=snap.name, destination=dest,
                                       domain_uuid="" if uuid == "base" else uuid,
                                       serial="" if uuid == "base" else serial,
                                       policy=_POLICY_PB[snap.policy],
                                       parent_id=snap.parent or "", created_at=snap.time.timestamp(),
                                       source=snap.source, size=snap.size, bytes_new=snap.stats.bytes_new,
                                       bytes_stored=snap.stats.bytes_stored,
                                       bytes_read=snap.stats.bytes_read))
        out.sort(key=lambda s: s.created_at, reverse=True)
        return pb.ListSnapshotsResponse(snapshots=out)

    async def _trigger(self, kind: InstructionKind, request: Any,
                       context: grpc.aio.ServicerContext[Any, Any]) -> Job:
        info = await self._domain(request.domain, context)
        if request.request_id:
            earlier = self.agent.jobs.by_request(info.uuid, request.request_id)
            if earlier is not None:
                return earlier
        destination = request.destination or self.agent.config.default_destination
        if destination not in self.agent.config.destinations:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no destination {destination!r}")
        try:
            disks = await asyncio.to_thread(self.agent.domains.disks_by_serial, info.uuid,
                                            list(request.serials) or None)
        except UnknownDisk as e:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(e))
        policy = _POLICY[request.policy] if kind is InstructionKind.BACKUP else Policy.FULL
        placement = (_PLACEMENT_BACK.get(request.placement, Placement.AUTO)
                     if isinstance(request, pb.TriggerBackupRequest) else Placement.AUTO)
        instruction = Instruction(new_job_id(), info.uuid, request.request_id or new_job_id(), kind, disks,
                                  destination, policy, getattr(request, "snapshot", "") or "latest"
                                  if kind is InstructionKind.RESTORE else "", time.time(), placement)
        self.agent.submit(instruction, Origin.OPERATOR, info.name)
        job = self.agent.jobs.get(instruction.id)
        assert job is not None
        return job

    async def TriggerBackup(self, request: pb.TriggerBackupRequest,
                            context: grpc.aio.ServicerContext[Any, Any]) -> pb.TriggerBackupResponse:
        job = await self._trigger(InstructionKind.BACKUP, request, context)
        return pb.TriggerBackupResponse(job=_job_pb(job))

    async def TriggerRestore(self, request: pb.TriggerRestoreRequest,
                             context: grpc.aio.ServicerContext[Any, Any]) -> pb.TriggerRestoreResponse:
        job = await self._trigger(InstructionKind.RESTORE, request, context)
        return pb.TriggerRestoreResponse(job=_job_pb(job))

    async def ListJobs(self, request: pb.ListJobsRequest,
                       context: grpc.aio.ServicerContext[Any, Any]) -> pb.ListJobsResponse:
        states = set(request.states)
        jobs = [j for j in self.agent.jobs.all()
                if (not request.domain or request.domain in (j.instruction.domain_uuid, j.domain_name))
                and (not states or j.state.value in states)]
        return pb.ListJobsResponse(jobs=[_job_pb(j) for j in jobs])

    async def WatchJob(self, request: pb.WatchJobRequest,
                       context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[pb.JobEvent]:
        job = self.agent.jobs.get(request.job_id)
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


async def _next_event(job: Job, seen: int) -> None:
    """Wait until the job has more than ``seen`` events."""
    async with job.changed:
        await job.changed.wait_for(lambda: len(job.events) > seen)


class OperatorServer:
    def __init__(self, server: grpc.aio.Server) -> None:
        self._server = server

    async def stop(self, grace: float | None = None) -> None:
        await self._server.stop(grace)


async def start_operator_server(agent: Agent, listen: str) -> OperatorServer:
    """Serve the operator API, health and reflection on ``listen`` (``unix:/path`` or host:port)."""
    server = grpc.aio.server()
    pb_grpc.add_OperatorServicer_to_server(OperatorServicer(agent), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    try:
        server.add_insecure_port(listen)
    except RuntimeError as e:
        raise errors.EnvironmentProblem(f"cannot listen on {listen}: {e}") from e
    await server.start()
    await health_servicer.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    log.info("operator API listening on %s", listen)
    return OperatorServer(server)
