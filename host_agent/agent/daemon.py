"""The host agent: the systemd service that serves every VM's backup requests.

Wiring: libvirt (``domains``) finds running domains with the hyperback channel
and reports lifecycle events; one ``channel.GuestChannel`` per domain speaks
the wire protocol; guest requests become ``Instruction`` objects, journaled and
queued in the ``driver``; each batch is planned by the optimizer over gRPC
and carried out by the ``executor``, which answers the guest. Operators use the
gRPC API in ``host_agent.agent.operator`` on the agent's own socket.

``python -m host_agent.agent.daemon`` runs it (``--help``); with ``--with-optimizer``
the agent also serves the optimizer, on its configured socket, in-process:
still a real gRPC hop, but one service to start.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import re
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from guest_shim import protocol as p
from host_agent import errors
from host_agent.agent.channel import ChannelClosed, GuestChannel
from host_agent.agent.domains import DomainError, DomainInfo, Domains, UnknownDisk
from host_agent.agent.driver import BackupDriver, Retryable
from host_agent.agent.executor import Executor, Outcome
from host_agent.agent.jobs import Jobs, JobState, Origin
from host_agent.agent.journal import Journal, new_job_id
from host_agent.colocation import appliance
from host_agent.colocation.appliance import Porter
from host_agent.colocation.footprint import allocated_bytes, footprint
from host_agent.colocation.migration import clear_visit
from host_agent.colocation.visits import Colocator
from host_agent.config import AgentConfig, load
from host_agent.model import (
    ApplianceFootprint,
    DiskRef,
    Instruction,
    InstructionKind,
    Plan,
    Policy,
    VmFootprint,
)
from host_agent.planning.chain import HostContext
from host_agent.planning.hostload import HostLoadReader
from host_agent.planning.service import OptimizerClient, OptimizerUnavailable, host_context
from host_agent.storage.repository import Repository

if TYPE_CHECKING:
    from host_agent.media.client import RemoteRepository

log = logging.getLogger(__name__)

RESCAN_SECONDS = 30.0

_DETECTION = {"dirty-bitmap": p.ChangeDetection.DIRTY_BITMAP,
              "allocation-map": p.ChangeDetection.ALLOCATION_MAP}


def _measured(disk: DiskRef) -> DiskRef:
    return replace(disk, allocated=allocated_bytes(disk.path))


_URI = re.compile(r"\b[a-z][a-z0-9+.-]*://[^\s,;'\"()]+")


def for_guest(error: str) -> str:
    """An error as a guest may read it: the operator's job keeps the whole text, but the cluster's
    addresses (libvirt and migration URIs) are not the guest's business."""
    return p.clean_text(_URI.sub("<uri>", error))


def result_message(outcome: Outcome, request_id: p.RequestId | None, quiesced: bool) -> p.Result:
    instruction = outcome.instruction
    op = p.Op.RESTORE if instruction.kind is InstructionKind.RESTORE else p.Op.BACKUP
    disks = tuple(p.DiskOutcome(d.serial, d.bytes_read, d.snapshot,
                                None if op is p.Op.RESTORE else _DETECTION.get(d.change_detection,
                                                                                p.ChangeDetection.FULL_READ),
                                d.new_serial) for d in outcome.disks)
    error = None if outcome.error is None else p.ErrorInfo(p.ErrorCode.FAILED, for_guest(outcome.error))
    return p.Result(request_id, instruction.id, op, outcome.error is None, disks,
                    sum(d.bytes_read for d in outcome.disks), round(time.monotonic() - outcome.started, 3),
                    quiesced and outcome.error is None, error)


class Agent:
    """Owns the channels, the driver and the executor; implements the channel Handler."""

    def __init__(self, config: AgentConfig, domains: Domains, planner: OptimizerClient) -> None:
        self.config = config
        self.domains = domains
        self.jobs = Jobs()
        self.journal = Journal(config.state_dir)
        self.channels: dict[str, GuestChannel] = {}
        self._channel_tasks: dict[str, asyncio.Task[None]] = {}
        self._background: set[asyncio.Task[None]] = set()  # referenced until done (asyncio keeps weak refs)
        self._planner = planner
        self.load_reader: HostLoadReader | None = HostLoadReader() if config.send_load else None
        self._repos: dict[str, Repository | RemoteRepository] = {}
        self._quiesced: dict[str, bool] = {}
        self.driver = BackupDriver(self._plan, self._execute, self._fail, config.interval, config.batch_size)
        self.colocator = Colocator(config) if config.inventory.hosts else None
        self.porter = Porter(config) if config.inventory.appliances else None
        self.executor = Executor(self.repository, domains.conn, self._answer, self._freeze, self._thaw,
                                 domains.attach_disk, config.restore_dir, self.colocator, self._announce,
                                 self.porter)

    # ---------- repositories ----------

    def repository(self, destination: str) -> Repository | RemoteRepository:
        """The destination's repository: opened here, or reached through its media service when the
        media sit on another host."""
        media = self.config.media(destination)
        if media is not None and media.host != self.config.inventory.host_name:
            if destination not in self._repos:
                from host_agent.media.client import RemoteRepository

                remote = RemoteRepository(media.service, destination)
                known = (*self.config.inventory.hosts, media.appliance)
                if remote.host_name not in known:
                    remote.close()
                    # the service may move between the cluster's hosts, never outside it: a stranger
                    # answering at its address is a misconfiguration that must not get backups (this
                    # is a sanity check, not authentication: that needs TLS, not done yet)
                    raise errors.EnvironmentProblem(
                        f"the media service at {media.service} says it runs on {remote.host_name!r}, which "
                        f"is not a host of the inventory; refusing to send backups there")
                self._repos[destination] = remote
            return self._repos[destination]
        if destination not in self._repos:
            path = self.config.repository(destination)
            try:
                self._repos[destination] = Repository.open(path)
            except errors.NotARepository:
                log.info("creating repository %s for destination %s", path, destination)
                self._repos[destination] = Repository.init(path)
        return self._repos[destination]

    # ---------- channels ----------

    def serve_domain(self, info: DomainInfo) -> None:
        if info.channel_path is None or info.uuid in self.channels:
            return
        if info.visiting_from and info.visiting_from != self.config.inventory.host_name:
            # its guest waits for the job's answer from its own host: leave the channel alone
            log.info("domain %s is visiting from %s: not serving its channel", info.name, info.visiting_from)
            return
        channel = GuestChannel(info.uuid, info.name, info.channel_path, self,
                               self.config.limits.requests_per_minute)
        self.channels[info.uuid] = channel
        self._channel_tasks[info.uuid] = asyncio.create_task(channel.run(), name=f"channel-{info.name}")
        log.info("serving domain %s (%s)", info.name, info.uuid)

    def forget_domain(self, uuid: str) -> None:
        channel = self.channels.pop(uuid, None)
        task = self._channel_tasks.pop(uuid, None)
        if channel is not None:
            channel.close()
        if task is not None:
            task.cancel()

    async def rescan(self) -> None:
        """Serve the channels of the running domains that have one, forget the others.  The listing
        runs in a worker thread: libvirt blocks calls on a domain while a migration job holds it
        (an incoming VM for the whole migration), and the loop must keep serving meanwhile."""
        try:
            served = await asyncio.to_thread(self.domains.served)
        except DomainError as e:
            log.warning("cannot list domains: %s", e)
            return
        alive = {d.uuid for d in served}
        for uuid in list(self.channels):
            if uuid not in alive:
                self.forget_domain(uuid)
        for info in served:
            self.serve_domain(info)

    def on_domain_event(self, uuid: str, kind: str) -> None:
        log.info("domain %s %s", uuid, kind)
        self.reconcile_appliances()
        if kind == "started":
            task = asyncio.get_running_loop().create_task(self.rescan(), name="rescan-on-start")
            self._background.add(task)
            task.add_done_callback(self._background.discard)
        else:
            self.forget_domain(uuid)

    def reconcile_appliances(self) -> None:
        """Serve each appliance's address from this host exactly while it runs here (in a worker
        thread: libvirt lookups and netlink calls)."""
        if self.config.inventory.appliances:
            asyncio.get_running_loop().run_in_executor(None, appliance.reconcile, self.domains.conn,
                                                       self.config.inventory)

    # ---------- requests (channel.Handler) ----------

    async def on_request(self, channel: GuestChannel, msg: p.Message) -> p.Message:
        uuid = channel.domain_uuid
        if isinstance(msg, p.Status):
            return self._status(uuid, msg)
        if isinstance(msg, p.ListSnapshots):
            return await asyncio.to_thread(self._list, uuid, msg)
        if isinstance(msg, (p.Backup, p.Restore)):
            return await self._accept(channel, msg)
        return p.ErrorMessage(getattr(msg, "id", None), p.ErrorCode.UNSUPPORTED, "not a request")

    async def _accept(self, channel: GuestChannel, msg: p.Backup | p.Restore) -> p.Message:
        uuid = channel.domain_uuid
        destination = msg.destination or self.config.default_destination
        if destination not in self.config.destinations:
            return p.ErrorMessage(msg.id, p.ErrorCode.UNKNOWN_DESTINATION,
                                  f"this host has no destination named {destination!r}")
        if isinstance(msg, p.Restore) and msg.mode is p.RestoreMode.IN_PLACE:
            return p.ErrorMessage(msg.id, p.ErrorCode.UNSUPPORTED,
                                  "a running VM cannot restore over its own disk: restore with mode "
                                  "new-disk, or shut the VM down and run 'hyperback restore' on the host")
        serials = ([msg.target] if isinstance(msg, p.Restore) else
                   None if msg.targets == p.ALL else list(msg.targets))
        try:
            disks = await asyncio.to_thread(self.domains.disks_by_serial, uuid, serials)
        except UnknownDisk as e:
            return p.ErrorMessage(msg.id, p.ErrorCode.UNKNOWN_DISK, p.clean_text(str(e)))
        if not disks:
            return p.ErrorMessage(msg.id, p.ErrorCode.UNKNOWN_DISK, "this VM has no disk with a serial")
        if len(disks) > self.config.limits.max_disks_per_request:
            return p.ErrorMessage(msg.id, p.ErrorCode.QUOTA,
                                  f"at most {self.config.limits.max_disks_per_request} disks per request")
        if self.jobs.pending_for(uuid) >= self.config.limits.pending_per_vm:
            return p.ErrorMessage(msg.id, p.ErrorCode.QUOTA,
                                  f"this VM already has {self.config.limits.pending_per_vm} jobs waiting; "
                                  "ask again when one has finished", retry_after=30.0)
        if isinstance(msg, p.Backup):
            instruction = Instruction(new_job_id(), uuid, str(msg.id), InstructionKind.BACKUP, disks,
                                      destination, Policy(msg.policy.value), "", time.time())
            self._quiesced[instruction.id] = msg.quiesce
        else:
            instruction = Instruction(new_job_id(), uuid, str(msg.id), InstructionKind.RESTORE, disks,
                                      destination, Policy.FULL, msg.snapshot, time.time())
        self.submit(instruction, Origin.GUEST, channel.domain_name)
        return p.Accepted(msg.id, instruction.id)

    def submit(self, instruction: Instruction, origin: Origin, domain_name: str) -> None:
        """Journal, register and queue an instruction (guest or operator)."""
        self.journal.add(instruction)
        self.jobs.add(instruction, origin, domain_name)
        self.driver.submit(instruction)

    def _status(self, uuid: str, msg: p.Status) -> p.Message:
        job = self.jobs.get(msg.job)
        if job is not None and job.instruction.domain_uuid == uuid and not job.state.final:
            state = p.JobState.RUNNING if job.state is JobState.RUNNING else p.JobState.QUEUED
            return p.Progress(msg.id, msg.job, state, 0, 0)
        stored = self.journal.result(uuid, msg.job)
        if stored is not None and "wire" in stored:
            return p.decode(json.dumps({**stored["wire"], "id": msg.id}))
        if self.journal.is_pending(uuid, msg.job):
            return p.Progress(msg.id, msg.job, p.JobState.QUEUED, 0, 0)
        return p.ErrorMessage(msg.id, p.ErrorCode.UNKNOWN_JOB,
                              f"this VM has no job {p.clean_text(msg.job, 64)}")

    def _list(self, uuid: str, msg: p.ListSnapshots) -> p.Message:
        destination = msg.destination or self.config.default_destination
        if destination not in self.config.destinations:
            return p.ErrorMessage(msg.id, p.ErrorCode.UNKNOWN_DESTINATION,
                                  f"this host has no destination named {destination!r}")
        try:
            disks = self.domains.disks_by_serial(uuid, [msg.target] if msg.target else None)
        except UnknownDisk as e:
            return p.ErrorMessage(msg.id, p.ErrorCode.UNKNOWN_DISK, p.clean_text(str(e)))
        repo = self.repository(destination)
        infos = []
        for disk in disks:
            for snap in repo.snapshots(disk.snapshot_name):
                infos.append(p.SnapshotInfo(snap.id, disk.serial, snap.time.timestamp(),
                                            p.Policy(snap.policy.value), snap.stats.bytes_new, destination))
        infos.sort(key=lambda i: i.created, reverse=True)
        return p.fit_snapshots(msg.id, infos)

    def on_thawed(self, channel: GuestChannel, msg: p.Thawed) -> None:
        if msg.by is p.ThawCause.WATCHDOG and msg.job in self._quiesced:
            log.warning("guest %s thawed job %s by its watchdog", channel.domain_name, msg.job)
            self._quiesced[msg.job] = False

    # ---------- freeze and thaw for the executor ----------

    async def _freeze(self, uuid: str, serials: tuple[str, ...], job: str) -> None:
        channel = self.channels.get(uuid)
        if not self._quiesced.get(job) or channel is None:
            self._quiesced[job] = False
            return
        try:
            reply = await channel.freeze(job, serials, self.config.freeze_timeout)
        except (ChannelClosed, TimeoutError) as e:
            log.warning("no freeze for job %s (%s): crash-consistent view", job, e)
            self._quiesced[job] = False
            return
        if not isinstance(reply, p.Frozen):
            log.warning("guest refused to freeze for job %s: %s", job, reply)
            self._quiesced[job] = False

    async def _thaw(self, uuid: str, job: str) -> None:
        channel = self.channels.get(uuid)
        if channel is None or not self._quiesced.get(job):
            return
        try:
            await channel.thaw(job)
        except (ChannelClosed, TimeoutError) as e:
            log.warning("thaw for job %s not confirmed (%s); the guest's watchdog thaws", job, e)

    # ---------- driver and executor callbacks ----------

    async def _plan(self, batch: Sequence[Instruction]) -> Plan:
        for instruction in batch:
            await self.jobs.move(instruction.id, JobState.PLANNED, "sent to the optimizer")
        try:
            context, measured = await asyncio.to_thread(self._context, batch)
            result = await self._planner.plan(measured, context)
        except OptimizerUnavailable as e:
            raise Retryable(str(e)) from e
        for rejection in result.rejections:
            instruction = next(i for i in batch if i.id == rejection.instruction_id)
            await self._fail(instruction, rejection.reason, JobState.REJECTED)
        for unit in result.plan.units:
            for job_id in unit.satisfies:
                job = self.jobs.get(job_id)
                if job is not None and job.plan is None and unit.disk is not None:
                    job.plan = unit
                if unit.not_before > time.time():
                    await self.jobs.move(job_id, JobState.DEFERRED, unit.reason, unit.not_before)
        plan: Plan = result.plan
        return plan

    def _context(self, batch: Sequence[Instruction]) -> tuple[HostContext, list[Instruction]]:
        """This host's context for a batch, and the batch; for instructions whose media sit on another
        host, also what the colocate policy weighs: the VM's footprint, its disks' data (measured
        into ``DiskRef.allocated``), what the media hold, and for media in an appliance VM where it
        runs and what moving it would cost."""
        inventory = self.config.inventory
        elsewhere = inventory.remote_destinations()
        appliances: dict[str, ApplianceFootprint] = {}
        for destination in sorted({i.destination for i in batch if inventory.appliance_of(i.destination)}):
            located = self._appliance_elsewhere(destination)
            if located is not None:
                elsewhere[destination] = located[0]
                appliances[destination] = located[1]
        context = replace(host_context(self.load_reader, host_name=inventory.host_name or None),
                          remote_destinations=elsewhere, appliances=appliances)
        remote = [i for i in batch if i.destination in elsewhere and i.kind is InstructionKind.BACKUP]
        if not remote:
            return context, list(batch)
        footprints: dict[str, VmFootprint] = {}
        held: dict[tuple[str, str], int] = {}
        for instruction in remote:
            if instruction.domain_uuid not in footprints:
                try:
                    dom = self.domains.domain(instruction.domain_uuid)
                    footprints[instruction.domain_uuid] = footprint(dom, self.config.inventory)
                except Exception as e:  # noqa: BLE001 - without a footprint the policy streams
                    log.warning("no footprint of %s: %s", instruction.domain_uuid, e)
            held.update(self._held(instruction))
        measured = [replace(i, disks=tuple(map(_measured, i.disks))) if i in remote else i for i in batch]
        return replace(context, footprints=footprints, held=held), measured

    def _appliance_elsewhere(self, destination: str) -> tuple[str, ApplianceFootprint] | None:
        """(host, footprint) of the appliance serving ``destination`` if it runs on another host;
        None if it runs here (its backups stay inside this host) or nowhere (they fail, saying so)."""
        found = self.config.inventory.appliance_of(destination)
        assert found is not None
        host = appliance.locate(self.config.inventory, self.config.libvirt_uri, found)
        if host is None or host == self.config.inventory.host_name:
            return None
        return host, ApplianceFootprint(destination, found.name,
                                        appliance.measure_at(self.config.inventory, host, found))

    def _held(self, instruction: Instruction) -> dict[tuple[str, str], int]:
        """The stored size of the destination's latest snapshot of each disk (none if unreachable:
        the policy then prices a full copy)."""
        held = {}
        try:
            repo = self.repository(instruction.destination)
            for disk in instruction.disks:
                latest = repo.snapshots(disk.snapshot_name)
                if latest:
                    held[(instruction.destination, disk.snapshot_name)] = latest[-1].stats.bytes_stored
        except (errors.HyperbackError, OSError) as e:
            log.warning("cannot ask %s what it holds: %s", instruction.destination, e)
        return held

    async def _announce(self, job_ids: tuple[str, ...], message: str, done: int, total: int) -> None:
        """A step of a co-located backup: to the operator's job, and to a waiting guest (its VM is
        about to move: the shim must wait for its host to come back instead of giving up)."""
        for job_id in job_ids:
            # this host cannot freeze a guest that is away; the media host does not serve its channel
            self._quiesced[job_id] = False
            await self.jobs.step(job_id, message, done, total)
            job = self.jobs.get(job_id)
            channel = self.channels.get(job.instruction.domain_uuid) if job is not None else None
            if job is None or job.origin is not Origin.GUEST or channel is None:
                continue
            with contextlib.suppress(ChannelClosed, p.ProtocolError):
                await channel.send(p.Progress(None, job_id, p.JobState.MOVING, min(done, total), total))

    async def _execute(self, plan: Plan, by_id: dict[str, Instruction]) -> None:
        for job_id in by_id:
            await self.jobs.move(job_id, JobState.RUNNING, "running")
        await self.executor.execute(plan, by_id)

    async def _fail(self, instruction: Instruction, why: str, state: JobState = JobState.FAILED) -> None:
        outcome = Outcome(instruction, error=why)
        await self._answer(outcome, state)

    async def _answer(self, outcome: Outcome, state: JobState | None = None) -> None:
        instruction = outcome.instruction
        quiesced = self._quiesced.pop(instruction.id, False)
        result = result_message(outcome, None, quiesced)
        self.journal.finish(instruction, {"ok": outcome.error is None, "wire": result.to_wire()})
        final = state or (JobState.SUCCEEDED if outcome.error is None else JobState.FAILED)
        await self.jobs.move(instruction.id, final, outcome.error or "done",
                             snapshot_ids=[d.snapshot for d in outcome.disks],
                             moved_bytes=outcome.moved_bytes)
        job = self.jobs.get(instruction.id)
        channel = self.channels.get(instruction.domain_uuid)
        if channel is None or (job is not None and job.origin is not Origin.GUEST):
            return
        request_id: p.RequestId = int(instruction.request_id) if instruction.request_id.isdigit() \
            else instruction.request_id
        try:
            await channel.send(result_message(outcome, request_id, quiesced))
        except ChannelClosed:
            log.info("guest of job %s is gone; it can ask for the result with status", instruction.id)

    # ---------- running ----------

    async def run(self) -> None:
        pending = self.journal.pending()
        for instruction in pending:
            log.info("re-queueing instruction %s from the journal", instruction.id)
            self.jobs.add(instruction, Origin.GUEST, instruction.domain_uuid)
        self.domains.watch(self.on_domain_event)
        self._clear_stale_visits()
        recovery = asyncio.create_task(self._recover_visits(pending), name="recover-visits")
        if self.porter is not None:
            await asyncio.to_thread(self.porter.recover)
        self.reconcile_appliances()
        await self.rescan()
        rescans = asyncio.create_task(self._rescan_every(RESCAN_SECONDS), name="rescan")
        try:
            await self.driver.run()
        finally:
            rescans.cancel()
            recovery.cancel()

    async def _recover_visits(self, pending: Sequence[Instruction]) -> None:
        """VMs this host sent on visits its previous run did not finish come home, then the journal's
        unanswered instructions run again (in the background: the agent serves meanwhile).  In that
        order: an instruction whose visit was cut short would otherwise find its VM away."""
        if self.colocator is not None:
            for line in await self.colocator.recover():
                log.warning("recovered visit: %s", line)
        for instruction in pending:
            self.driver.submit(instruction)

    async def _rescan_every(self, seconds: float) -> None:
        """Catch what no lifecycle event reports, e.g. a visit marker cleared by the VM's home host."""
        while True:
            await asyncio.sleep(seconds)
            await self.rescan()
            self.reconcile_appliances()

    def _clear_stale_visits(self) -> None:
        """A VM this host marked for a visit, found here at start: the visit died with the agent."""
        for info in self.domains.served():
            if info.visiting_from and info.visiting_from == self.config.inventory.host_name:
                log.warning("clearing the visit marker %s kept from before this agent started", info.name)
                clear_visit(self.domains.domain(info.uuid))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hyperback-agent",
        description="Serve backup requests from every VM's hyperback channel on this host.")
    parser.add_argument("--config", type=Path, default=None,
                        help="TOML config file (default /etc/hyperback/agent.toml; absent is fine)")
    parser.add_argument("--with-optimizer", action="store_true",
                        help="also serve the optimizer, on the configured socket, in this process")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="log more (-vv for debug)")
    return parser


async def serve(config: AgentConfig, with_optimizer: bool, stop: asyncio.Event,
                started: Callable[[Agent], None] | None = None) -> None:
    """Run the agent (and, if asked, the optimizer) until ``stop`` is set."""
    import libvirt  # type: ignore[import-untyped]
    import libvirtaio  # type: ignore[import-untyped]

    from host_agent.agent.operator import start_operator_server
    from host_agent.planning import chain as policies
    from host_agent.planning import service as optimizer
    from host_agent.storage import copier

    copier.selftest()  # a broken native build must stop the service, not corrupt backups
    libvirtaio.virEventRegisterAsyncIOImpl()
    # every libvirt failure is raised as an exception and logged where it matters; libvirt's own
    # handler would also print each one (an expected "domain not found" too) to stderr
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    config.run_dir.mkdir(parents=True, exist_ok=True)
    opt_server = None
    if with_optimizer:
        planner = policies.Planner(policies.build_chain(config.policies, config.policy_options))
        opt_server = await optimizer.start_server(optimizer.ServerConfig(listen=config.optimizer), planner)
    domains = Domains(config.libvirt_uri)
    client = optimizer.OptimizerClient(config.optimizer, timeout=config.optimizer_timeout)
    agent = Agent(config, domains, client)
    op_server = await start_operator_server(agent, config.operator_listen)
    runner = asyncio.create_task(agent.run())
    if started is not None:
        started(agent)
    await stop.wait()
    log.info("stopping")
    runner.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await runner
    await op_server.stop(2.0)
    if opt_server is not None:
        await opt_server.stop(2.0)
    await client.close()
    domains.close()


@contextmanager
def agent_in_thread(config: AgentConfig) -> Iterator[tuple[Agent, asyncio.AbstractEventLoop]]:
    """The agent, with the optimizer, running on its own event loop in a thread."""
    loop = asyncio.new_event_loop()
    started = threading.Event()
    holder: dict[str, Any] = {}

    async def main() -> None:
        stop = asyncio.Event()
        holder["stop"] = stop

        def ready(agent: Agent) -> None:
            holder["agent"] = agent
            started.set()

        try:
            await serve(config, True, stop, ready)
        except BaseException as e:
            holder["error"] = e
            started.set()
            raise

    thread = threading.Thread(target=lambda: loop.run_until_complete(main()), name="agent", daemon=True)
    thread.start()
    if not started.wait(60) or "error" in holder:
        raise errors.EnvironmentProblem(f"the agent did not start: {holder.get('error')}")
    try:
        yield holder["agent"], loop
    finally:
        loop.call_soon_threadsafe(holder["stop"].set)
        thread.join(30)


async def amain(config: AgentConfig, with_optimizer: bool) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await serve(config, with_optimizer, stop)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING - 10 * min(args.verbose, 2), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        asyncio.run(amain(load(args.config), args.with_optimizer))
    except errors.HyperbackError as e:
        print(f"hyperback-agent: error: {e}", file=sys.stderr)
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
