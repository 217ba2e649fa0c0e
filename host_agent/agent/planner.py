"""The agent's side of the optimizer: each batch goes out with what this host knows, and the
optimizer's verdict comes back into the jobs.

With a batch the optimizer gets this host's context (name, clock, load if ``send_load``) and, for
instructions whose media sit on another host, what the ``colocate`` policy weighs: the VM's
footprint, its disks' data (measured into ``DiskRef.allocated``), what the media hold, and for
media in an appliance VM where it runs and what moving it would cost. Rejected instructions are
answered through the guests' door; deferred ones are marked so in their jobs.
"""
from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import replace

from host_agent import errors
from host_agent.agent.destinations import Destinations
from host_agent.agent.domains import Domains
from host_agent.agent.guests import Guests
from host_agent.agent.jobs import Jobs, JobState
from host_agent.colocation import appliance
from host_agent.colocation.footprint import allocated_bytes, footprint
from host_agent.config import AgentConfig
from host_agent.model import (
    ApplianceFootprint,
    DiskRef,
    Instruction,
    InstructionKind,
    Plan,
    VmFootprint,
    normalize_path,
)
from host_agent.planning.chain import HostContext, ImageIdentity
from host_agent.planning.hostload import HostLoadReader
from host_agent.planning.service import OptimizerClient, host_context

log = logging.getLogger(__name__)


def _measured(disk: DiskRef) -> DiskRef:
    return replace(disk, allocated=allocated_bytes(disk.path))


class BatchPlanner:
    """``plan(batch)`` for the driver: asks the optimizer (OptimizerUnavailable: retry later)."""

    def __init__(self, config: AgentConfig, domains: Domains, destinations: Destinations, jobs: Jobs,
                 guests: Guests, client: OptimizerClient) -> None:
        self.config, self.domains, self.destinations = config, domains, destinations
        self.jobs, self.guests, self.client = jobs, guests, client
        self.load_reader: HostLoadReader | None = HostLoadReader() if config.send_load else None

    async def plan(self, batch: Sequence[Instruction]) -> Plan:
        for instruction in batch:
            await self.jobs.move(instruction.id, JobState.PLANNED, "sent to the optimizer")
        context, measured = await asyncio.to_thread(self._context, batch)
        result = await self.client.plan(measured, context)
        for rejection in result.rejections:
            instruction = next(i for i in batch if i.id == rejection.instruction_id)
            await self.guests.fail(instruction, rejection.reason, JobState.REJECTED)
        for unit in result.plan.units:
            for job_id in unit.satisfies:
                job = self.jobs.get(job_id)
                if job is not None and job.plan is None and unit.disk is not None:
                    job.plan = unit
                if unit.not_before > time.time():
                    await self.jobs.move(job_id, JobState.DEFERRED, unit.reason, unit.not_before)
        return result.plan

    def _context(self, batch: Sequence[Instruction]) -> tuple[HostContext, list[Instruction]]:
        """This host's context for a batch, and the batch, measured where the colocate policy needs it."""
        inventory = self.config.inventory
        elsewhere = inventory.remote_destinations()
        appliances: dict[str, ApplianceFootprint] = {}
        for destination in sorted({i.destination for i in batch if inventory.appliance_of(i.destination)}):
            located = self._appliance_elsewhere(destination)
            if located is not None:
                elsewhere[destination] = located[0]
                appliances[destination] = located[1]
        images, repositories = self._shared(batch)
        context = replace(host_context(self.load_reader, host_name=inventory.host_name or None),
                          remote_destinations=elsewhere, appliances=appliances, shared_images=images,
                          repositories=repositories)
        remote = [i for i in batch if i.destination in elsewhere and i.kind is InstructionKind.BACKUP]
        if not remote:
            return context, list(batch)
        footprints: dict[str, VmFootprint] = {}
        held: dict[tuple[str, str], int] = {}
        for instruction in remote:
            if instruction.domain_uuid not in footprints:
                try:
                    dom = self.domains.domain(instruction.domain_uuid)
                    footprints[instruction.domain_uuid] = footprint(dom, inventory)
                except Exception as e:  # noqa: BLE001 - without a footprint the policy streams
                    log.warning("no footprint of %s: %s", instruction.domain_uuid, e)
            held.update(self.destinations.held(instruction.destination, instruction.disks))
        measured = [replace(i, disks=tuple(map(_measured, i.disks))) if i in remote else i for i in batch]
        return replace(context, footprints=footprints, held=held), measured

    def _shared(self, batch: Sequence[Instruction]) -> tuple[dict[str, ImageIdentity], dict[str, str]]:
        """The backing images of the batch's backups on shared storage and their destinations'
        repository ids, so the optimizer can merge with other hosts (host_agent.planning.fleet);
        an image or repository this host cannot identify now is left out, costing a merge only."""
        images: dict[str, ImageIdentity] = {}
        repositories: dict[str, str] = {}
        for instruction in (i for i in batch if i.kind is InstructionKind.BACKUP):
            chains = [p for d in instruction.disks for p in d.backing_chain
                      if self.config.inventory.shared(p)]
            try:
                if chains and instruction.destination not in repositories:
                    repo = self.destinations.repository(instruction.destination)
                    repositories[instruction.destination] = repo.config.repo_id
                for path in chains:
                    st = os.stat(path)
                    images[normalize_path(path)] = ImageIdentity(normalize_path(path), st.st_ino, st.st_size,
                                                                 st.st_mtime_ns)
            except (errors.HyperbackError, OSError) as e:
                log.warning("no merge across hosts for %s: %s", instruction.id, e)
        return images, repositories

    def _appliance_elsewhere(self, destination: str) -> tuple[str, ApplianceFootprint] | None:
        """(host, footprint) of the appliance serving ``destination`` if it runs on another host;
        None if it runs here (its backups stay inside this host) or nowhere (they fail, saying so)."""
        inventory = self.config.inventory
        found = inventory.appliance_of(destination)
        assert found is not None
        host = appliance.locate(inventory, self.config.libvirt_uri, found)
        if host is None or host == inventory.host_name:
            return None
        return host, ApplianceFootprint(destination, found.name, appliance.measure_at(inventory, host, found))
