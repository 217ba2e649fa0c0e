"""The guests' door: their channels, and everything the host tells a guest.

One object holds every running domain's :class:`~host_agent.agent.channel.GuestChannel` and is the
only way out to a guest: a job's answer (:meth:`Guests.answer`, which also records it in the
journal and the job), the steps of a move, and the freeze and thaw around a point-in-time view.
The model becomes wire messages here and nowhere else (:func:`result_message`,
:func:`snapshots_message`, :func:`progress_message`); requests come in through
``host_agent.agent.intake``.

A guest that asked to quiesce is frozen only while its job's view is taken; a guest that cannot
be frozen (gone, refusing, away on a visit) gets a crash-consistent view, and its answer says so.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
from collections.abc import Callable, Iterable

from guest_shim import protocol as p
from host_agent.agent.channel import GuestChannel, Handler, State
from host_agent.agent.domains import DomainInfo
from host_agent.agent.jobs import Jobs, JobState, Origin
from host_agent.agent.journal import Journal
from host_agent.errors import ChannelClosed
from host_agent.model import OFFLINE_NOTE, ChangeDetection, Instruction, InstructionKind, Outcome, RequestId
from host_agent.storage.snapshot import Snapshot

log = logging.getLogger(__name__)

_URI = re.compile(r"\b[a-z][a-z0-9+.-]*://[^\s,;'\"()]+")
_DETECTION = {ChangeDetection.DIRTY_BITMAP: p.ChangeDetection.DIRTY_BITMAP,
              ChangeDetection.ALLOCATION_MAP: p.ChangeDetection.ALLOCATION_MAP}


# --------------------------------------------------------------------------- model -> wire

def for_guest(error: str) -> str:
    """An error as a guest may read it: the operator's job keeps the whole text, but the cluster's
    addresses (libvirt and migration URIs) are not the guest's business."""
    return p.clean_text(_URI.sub("<uri>", error))


def _detection(detection: ChangeDetection | None) -> p.ChangeDetection:
    """What the guest is told: the dirty bitmap or the allocation map, else that everything was read."""
    if detection is None:
        return p.ChangeDetection.FULL_READ
    return _DETECTION.get(detection, p.ChangeDetection.FULL_READ)


def result_message(outcome: Outcome, request_id: RequestId | None, quiesced: bool) -> p.Result:
    """A finished job as its guest may see it: only figures of its own disks (bytes read or
    written, snapshot ids); what the repository stored depends on other VMs' data and stays with
    the operator's job."""
    instruction = outcome.instruction
    op = p.Op.RESTORE if instruction.kind is InstructionKind.RESTORE else p.Op.BACKUP
    disks = tuple(p.DiskOutcome(d.serial, d.bytes_read, d.snapshot,
                                None if op is p.Op.RESTORE else _detection(d.change_detection), d.new_serial)
                  for d in outcome.disks)
    error = None if outcome.error is None else p.ErrorInfo(p.ErrorCode.FAILED, for_guest(outcome.error))
    return p.Result(request_id, instruction.id, op, outcome.error is None, disks,
                    sum(d.bytes_read for d in outcome.disks), round(time.monotonic() - outcome.started, 3),
                    quiesced and outcome.error is None, error)


def snapshots_message(request_id: RequestId, snaps: Iterable[tuple[str, str, Snapshot]]) -> p.Message:
    """A snapshot list for a guest, newest first: (disk serial, destination, snapshot) each.

    Each snapshot's ``bytes`` is what its backup read from the guest's own disk. Never
    ``bytes_new`` or ``bytes_stored``: they count the chunks the repository lacked, so they would
    tell a guest whether another VM had stored a block (docs/threat-model.md)."""
    infos = [p.SnapshotInfo(snap.id, serial, snap.time.timestamp(), p.Policy(snap.policy.value),
                            snap.stats.bytes_read, destination, snap.files.partition if snap.files else None)
             for serial, destination, snap in snaps]
    infos.sort(key=lambda i: i.created, reverse=True)
    return p.fit_snapshots(request_id, infos)


def progress_message(request_id: RequestId | None, job: str, running: bool) -> p.Progress:
    return p.Progress(request_id, job, p.JobState.RUNNING if running else p.JobState.QUEUED, 0, 0)


def stored_result(stored: dict[str, object], request_id: RequestId) -> p.Message:
    """A result kept in the journal, answered again under the id of the guest's status request."""
    wire = stored["wire"]
    assert isinstance(wire, dict)
    return p.decode(json.dumps({**wire, "id": request_id}))


# --------------------------------------------------------------------------- the door

class Guests:
    """Every served domain's channel; the one door answers, progress, freeze and thaw leave through."""

    def __init__(self, jobs: Jobs, journal: Journal, *, freeze_timeout: float,
                 requests_per_minute: int) -> None:
        self.jobs, self.journal = jobs, journal
        self.freeze_timeout = freeze_timeout
        self.requests_per_minute = requests_per_minute
        self.channels: dict[str, GuestChannel] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._quiesced: dict[str, bool] = {}  # job -> the guest asked to quiesce, and may still be
        self.observers: list[Callable[[Outcome], None]] = []  # told of every answer (metrics)

    # ---------- channels ----------

    def serve(self, info: DomainInfo, handler: Handler) -> None:
        """Connect to the domain's channel and serve it (nothing if it is served already)."""
        if info.channel_path is None or info.uuid in self.channels:
            return
        channel = GuestChannel(info.uuid, info.name, info.channel_path, handler, self.requests_per_minute)
        self.channels[info.uuid] = channel
        self._tasks[info.uuid] = asyncio.create_task(channel.run(), name=f"channel-{info.name}")
        log.info("serving domain %s (%s)", info.name, info.uuid)

    def forget(self, uuid: str) -> None:
        channel = self.channels.pop(uuid, None)
        task = self._tasks.pop(uuid, None)
        if channel is not None:
            channel.close()
        if task is not None:
            task.cancel()

    def served(self) -> set[str]:
        return set(self.channels)

    def state(self, uuid: str) -> State | None:
        """The channel's connection state; None if this agent does not serve the domain."""
        channel = self.channels.get(uuid)
        return channel.state if channel is not None else None

    # ---------- quiescing ----------

    def expect_quiesce(self, job: str) -> None:
        """The guest asked for job ``job`` to be taken with its file systems frozen."""
        self._quiesced[job] = True

    def on_thawed(self, channel: GuestChannel, msg: p.Thawed) -> None:
        if msg.by is p.ThawCause.WATCHDOG and msg.job in self._quiesced:
            log.warning("guest %s thawed job %s by its watchdog", channel.domain_name, msg.job)
            self._quiesced[msg.job] = False

    async def freeze(self, uuid: str, serials: tuple[str, ...], job: str) -> None:
        """Freeze the guest's file systems on these disks if it asked; a guest that does not freeze
        is noted as not quiesced (its view is crash-consistent), never waited for."""
        channel = self.channels.get(uuid)
        if not self._quiesced.get(job) or channel is None:
            self._quiesced[job] = False
            return
        try:
            reply = await channel.freeze(job, serials, self.freeze_timeout)
        except (ChannelClosed, TimeoutError) as e:
            log.warning("no freeze for job %s (%s): crash-consistent view", job, e)
            self._quiesced[job] = False
            return
        if not isinstance(reply, p.Frozen):
            log.warning("guest refused to freeze for job %s: %s", job, reply)
            self._quiesced[job] = False

    async def thaw(self, uuid: str, job: str) -> None:
        channel = self.channels.get(uuid)
        if channel is None or not self._quiesced.get(job):
            return
        try:
            await channel.thaw(job)
        except (ChannelClosed, TimeoutError) as e:
            log.warning("thaw for job %s not confirmed (%s); the guest's watchdog thaws", job, e)

    # ---------- telling guests ----------

    async def announce(self, job_ids: tuple[str, ...], message: str, done: int, total: int) -> None:
        """A step of a co-located backup: to the operator's job, and to a waiting guest (its VM is
        about to move: the shim must wait for its host to come back instead of giving up)."""
        for job_id in job_ids:
            # this host cannot freeze a guest that is away; the media host does not serve its channel
            self._quiesced[job_id] = False
            await self.jobs.step(job_id, message, done, total)
            channel = self._guest_channel(job_id)
            if channel is not None:
                with contextlib.suppress(ChannelClosed, p.ProtocolError):
                    await channel.send(p.Progress(None, job_id, p.JobState.MOVING, min(done, total), total))

    async def tell(self, uuid: str, msg: p.Message) -> None:
        """An unsolicited message to a domain's guest, if it is there to read it."""
        channel = self.channels.get(uuid)
        if channel is not None:
            with contextlib.suppress(ChannelClosed):
                await channel.send(msg)

    async def fail(self, instruction: Instruction, why: str, state: JobState = JobState.FAILED) -> None:
        await self.answer(Outcome(instruction, error=why), state)

    async def answer(self, outcome: Outcome, state: JobState | None = None) -> None:
        """The one way a finished instruction is answered: journal, job, then the guest (if it asked,
        and is connected: if not, it asks with ``status`` and gets the journal's copy)."""
        instruction = outcome.instruction
        quiesced = self._quiesced.pop(instruction.id, False)
        self.journal.finish(instruction, {"ok": outcome.error is None,
                                          "wire": result_message(outcome, None, quiesced).to_wire()})
        final = state or (JobState.SUCCEEDED if outcome.error is None else JobState.FAILED)
        done = f"done; {OFFLINE_NOTE}" if outcome.offline else "done"
        await self.jobs.move(instruction.id, final, outcome.error or done,
                             snapshot_ids=[d.snapshot for d in outcome.disks],
                             moved_bytes=outcome.moved_bytes, offline=outcome.offline)
        for observe in self.observers:
            try:
                observe(outcome)
            except Exception:  # an observer's bug (metrics) must never keep an answer from the guest
                log.exception("observer %r failed on the answer to %s", observe, instruction.id)
        channel = self._guest_channel(instruction.id)
        if channel is None:
            return
        try:
            await channel.send(result_message(outcome, instruction.request_id, quiesced))
        except ChannelClosed:
            log.info("guest of job %s is gone; it can ask for the result with status", instruction.id)

    def _guest_channel(self, job_id: str) -> GuestChannel | None:
        """The channel of the guest that asked for ``job_id``; None for an operator's job."""
        job = self.jobs.get(job_id)
        if job is None or job.origin is not Origin.GUEST:
            return None
        return self.channels.get(job.instruction.domain_uuid)
