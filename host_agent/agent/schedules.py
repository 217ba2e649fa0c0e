"""Schedules: periodic backups that no guest asked for.

Each ``[[schedules]]`` table of the agent's config (:class:`host_agent.config.Schedule`) fires at
the times of its cron expression (croniter, in the host's local time). A firing becomes one backup
instruction per covered domain, running or shut off, submitted through the intake like a guest's
or an operator's request (journal, job, driver -> optimizer -> executor: merge and timing apply),
with origin SCHEDULE. A running guest whose channel is connected is asked to freeze its file
systems for the instant of the view (the shim's serve mode does; without one the view is
crash-consistent). Once every job of a firing has finished, the schedule's retention (the rules of
``hyperback prune``) is applied to the snapshots of the disks it backed up, in its destination, and
unreferenced data is collected.

A schedule of ``kind = "verify"`` backs nothing up: each firing boots the latest snapshot of each
covered domain's boot disk in the destination in a sandbox, one after another
(``host_agent.agent.bootverify``), and records the verdicts on the snapshots. One of ``kind =
"copy"`` copies the covered domains' snapshots in the destination (their disks' and their stored
definitions) that its ``copy_to`` destination lacks into it (``host_agent.storage.transfer``, as
``hyperback copy``): the offsite copy of the 3-2-1 rule.

When each schedule last fired is kept in ``<state_dir>/schedules.json``. At start, a schedule that
should have fired while the agent was down fires once (systemd's ``Persistent=``); one never seen
before counts from this start, so adding a schedule does not fire it at once.

Time comes from a :class:`Clock`: the wall clock in service, a compressed one in tests.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

from croniter import croniter

from host_agent import errors
from host_agent.agent import bootverify, sandbox
from host_agent.agent.destinations import Destinations
from host_agent.agent.domains import DomainInfo, Domains, covers
from host_agent.agent.guests import Guests
from host_agent.agent.intake import Intake
from host_agent.agent.jobs import Jobs, JobState, Origin
from host_agent.agent.journal import new_job_id
from host_agent.config import Schedule
from host_agent.errors import HypervisorError
from host_agent.media.copies import MediaTarget
from host_agent.model import Instruction, InstructionKind
from host_agent.storage import transfer
from host_agent.storage.files import write_atomic
from host_agent.storage.pruning import prune
from host_agent.storage.repository import Repository
from host_agent.storage.retention import KeepPolicy

log = logging.getLogger(__name__)

STATE_FILE = "schedules.json"


class Clock(Protocol):
    """Where a scheduler gets its time."""

    def now(self) -> float: ...

    async def sleep_until(self, when: float) -> None: ...


class WallClock:
    """The host's clock."""

    def now(self) -> float:
        return time.time()

    async def sleep_until(self, when: float) -> None:
        # look at the clock at least every minute: after a suspend or a clock step a long sleep
        # would fire hours late
        while (left := when - time.time()) > 0:
            await asyncio.sleep(min(left, 60.0))


def _local(t: float) -> datetime:
    return datetime.fromtimestamp(t).astimezone()


def next_run(calendar: str, after: float) -> float:
    """The first time strictly after ``after`` that ``calendar`` names."""
    return float(croniter(calendar, _local(after)).get_next(float))


def missed_run(calendar: str, last: float, now: float) -> float | None:
    """The latest time ``calendar`` named in (last, now], if any: the run to catch up on."""
    previous = float(croniter(calendar, _local(now)).get_prev(float))
    return previous if previous > last else None




@dataclass
class Firing:
    """One run of a schedule: when it was due and the jobs it started."""

    schedule: str
    due: float
    catch_up: bool
    started_at: float
    jobs: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)   # domains it could not back up, and why
    pruned: list[str] = field(default_factory=list)    # snapshot ids retention removed
    verified: list[str] = field(default_factory=list)  # a verify schedule's verdicts, one line each
    copied: list[str] = field(default_factory=list)    # a copy schedule's snapshots, one line each
    finished_at: float = 0.0


@dataclass
class Record:
    """What the scheduler remembers of a schedule across restarts."""

    armed: float            # when this agent first knew the schedule
    last_run: float = 0.0   # the due time of its latest firing


@dataclass(frozen=True)
class BootVerifying:
    """How verify schedules boot snapshots (the agent's config: verify_dir, boot_timeout, boot_checks)."""

    work_dir: Path
    boot_timeout: float = bootverify.DEFAULT_BOOT_TIMEOUT
    checks: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # by domain name or UUID


class Scheduler:
    """Fires the configured schedules; one task for all of them."""

    def __init__(self, schedules: Sequence[Schedule], default_destination: str, domains: Domains,
                 intake: Intake, guests: Guests, jobs: Jobs, destinations: Destinations, state_dir: Path,
                 clock: Clock | None = None, verifying: BootVerifying | None = None) -> None:
        self.schedules = {s.name: s for s in schedules}
        self.default_destination = default_destination
        self.domains, self.intake, self.guests = domains, intake, guests
        self.jobs, self.destinations = jobs, destinations
        self.state_path = state_dir / STATE_FILE
        self.clock = clock or WallClock()
        self.records: dict[str, Record] = {}
        self.firings: list[Firing] = []    # newest last, for operators and tests
        self._tasks: set[asyncio.Task[None]] = set()
        self.verifying = verifying or BootVerifying(state_dir / "verify")
        self._one_sandbox = asyncio.Lock()  # sandboxes boot one at a time: each is a whole VM

    # ---------- state ----------

    def _load(self) -> None:
        try:
            doc = json.loads(self.state_path.read_text())
            self.records = {name: Record(float(r["armed"]), float(r.get("last_run", 0.0)))
                            for name, r in doc.items()}
        except FileNotFoundError:
            self.records = {}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            # losing it costs at most one catch-up run; refusing to schedule would cost every backup
            log.error("unreadable schedule state %s (%s); starting afresh", self.state_path, e)
            self.records = {}
        now = self.clock.now()
        for name in self.schedules:
            self.records.setdefault(name, Record(armed=now))
        self._save()

    def _save(self) -> None:
        doc = {name: {"armed": r.armed, "last_run": r.last_run} for name, r in self.records.items()}
        self.state_path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(self.state_path, json.dumps(doc, indent=1).encode(), self.state_path.parent)

    def next_run(self, name: str) -> float:
        record = self.records.get(name)
        now = self.clock.now()
        after = max(now, record.last_run) if record is not None else now
        return next_run(self.schedules[name].calendar, after)

    def last_run(self, name: str) -> float:
        record = self.records.get(name)
        return record.last_run if record is not None else 0.0

    # ---------- running ----------

    async def run(self) -> None:
        """Catch up on missed runs, then fire every schedule at its times (cancel to stop)."""
        if not self.schedules:
            return
        self._load()
        now = self.clock.now()
        for schedule in self.schedules.values():
            record = self.records[schedule.name]
            missed = missed_run(schedule.calendar, max(record.last_run, record.armed), now)
            if missed is not None and schedule.catch_up:
                log.info("schedule %s missed its run of %s while the agent was down: running it now",
                         schedule.name, _local(missed).isoformat())
                await self.fire(schedule, missed, catch_up=True)
        while True:
            due = {name: self.next_run(name) for name in self.schedules}
            when = min(due.values())
            await self.clock.sleep_until(when)
            for name, at in sorted(due.items()):
                if at <= self.clock.now():
                    await self.fire(self.schedules[name], at, catch_up=False)

    async def run_now(self, name: str) -> Firing:
        """Fire a schedule now, as if its time had come (an operator's "run it now")."""
        schedule = self.schedules.get(name)
        if schedule is None:
            known = ", ".join(sorted(self.schedules)) or "none configured"
            raise errors.UnknownSchedule(f"no schedule named {name!r} (schedules: {known})")
        if name not in self.records:
            self.records[name] = Record(armed=self.clock.now())
        return await self.fire(schedule, self.clock.now(), catch_up=False)

    async def fire(self, schedule: Schedule, due: float, catch_up: bool) -> Firing:
        """Submit one backup per covered domain; retention follows once they have all finished."""
        firing = Firing(schedule.name, due, catch_up, self.clock.now())
        try:
            covered = [d for d in await asyncio.to_thread(self.domains.enabled) if covers(schedule, d)]
        except HypervisorError as e:
            covered = []
            firing.skipped.append(f"cannot list domains: {e}")
        destination = schedule.destination or self.default_destination
        if schedule.kind == "verify":
            return self._start(schedule, firing, self._verify(firing, covered, destination))
        if schedule.kind == "copy":
            return self._start(schedule, firing, self._copy(firing, covered, destination, schedule.copy_to))
        for info in covered:
            if not info.disks:
                firing.skipped.append(f"{info.name}: no disk with a serial (run `hyperback vm enable`, "
                                      "then restart it)")
                continue
            instruction = Instruction(new_job_id(), info.uuid, f"{schedule.name}@{_local(due).isoformat()}",
                                      InstructionKind.BACKUP, info.disks, destination, schedule.policy, "",
                                      time.time())
            if info.running and info.channel_state == "connected":  # a shim holds the guest's end
                self.guests.expect_quiesce(instruction.id)
            self.intake.submit(instruction, Origin.SCHEDULE, info.name, schedule=schedule.name)
            firing.jobs.append(instruction.id)
        for line in firing.skipped:
            log.warning("schedule %s: %s", schedule.name, line)
        log.info("schedule %s fired: %d job(s)", schedule.name, len(firing.jobs))
        return self._start(schedule, firing, self._finish(schedule, firing))

    def _start(self, schedule: Schedule, firing: Firing, work: Coroutine[Any, Any, None]) -> Firing:
        """Remember the firing and run what follows it (retention, or the verifications)."""
        self.records[schedule.name].last_run = firing.due
        self._save()
        self.firings.append(firing)
        task = asyncio.create_task(work, name=f"schedule-{schedule.name}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return firing

    async def _verify(self, firing: Firing, covered: Sequence[DomainInfo], destination: str) -> None:
        """Boot the latest snapshot of each covered domain's boot disk, one sandbox at a time."""
        log.info("schedule %s fired: boot verification of %d domain(s)", firing.schedule, len(covered))
        for info in covered:
            try:
                async with self._one_sandbox:
                    firing.verified.append(await self._verify_one(info, destination))
            except (errors.HyperbackError, OSError) as e:
                firing.skipped.append(f"{info.name}: not verified: {e}")
                log.warning("schedule %s: %s: not verified: %s", firing.schedule, info.name, e)
        firing.finished_at = self.clock.now()

    async def _verify_one(self, info: DomainInfo, destination: str) -> str:
        conn = self.domains.conn
        # the boot disk as the domain is now; the snapshot boots with the definition stored with it
        current = await asyncio.to_thread(bootverify.current_definition, conn, info.uuid)
        serial = sandbox.boot_disk_serial(current)
        if serial is None:
            raise errors.UsageError("it has no disk with a serial (run `hyperback vm enable`)")
        repo = await asyncio.to_thread(self.destinations.repository, destination)
        snapshots = await asyncio.to_thread(repo.snapshots, f"{info.uuid}/{serial}")
        if not snapshots:
            raise errors.SnapshotNotFound(f"no snapshot of its boot disk {serial} in {destination}")
        chosen = await asyncio.to_thread(bootverify.definition_for, conn, repo, snapshots[-1])
        check = self.verifying.checks.get(info.name) or self.verifying.checks.get(info.uuid)
        spec = bootverify.spec_for(snapshots[-1], chosen.xml, check, self.verifying.boot_timeout,
                                   chosen.source)
        record = await bootverify.verify_boot(repo, snapshots[-1].id, spec, conn, self.verifying.work_dir)
        return f"{info.name}: snapshot {record.snapshot} {record.result}: {record.reason}"

    async def _copy(self, firing: Firing, covered: Sequence[DomainInfo], source: str, target: str) -> None:
        """Copy the covered domains' snapshots that the target lacks; one line per snapshot."""
        log.info("schedule %s fired: copy of %d domain(s) from %s to %s", firing.schedule, len(covered),
                 source, target)
        try:
            summary = await asyncio.to_thread(self._copy_now, {d.uuid for d in covered}, source, target,
                                              firing.copied.append)
            log.info("schedule %s: %d snapshot(s) copied to %s, %d bytes sent", firing.schedule,
                     len(summary.copied), target, summary.bytes_sent)
        except (errors.HyperbackError, OSError) as e:
            firing.skipped.append(f"not copied to {target}: {e}")
            log.error("schedule %s: copy to %s failed: %s", firing.schedule, target, e)
        firing.finished_at = self.clock.now()

    def _copy_now(self, uuids: set[str], source: str, target: str,
                  report: transfer.Report) -> transfer.CopySummary:
        repo = self.destinations.repository(source)
        if not isinstance(repo, Repository):  # refused by the config already; kept for type safety
            raise errors.UsageError(f"a copy from {source} runs on its media host")
        snaps = [s for s in transfer.select(repo, [], None, False) if s.name.split("/", 1)[0] in uuids]
        into = self.destinations.repository(target)
        if isinstance(into, Repository):
            with transfer.LocalTarget(into).session() as local:
                return transfer.copy_snapshots(repo, local, snaps, report)
        return transfer.copy_snapshots(repo, MediaTarget(into), snaps, report)

    async def _finish(self, schedule: Schedule, firing: Firing) -> None:
        """Wait for the firing's jobs, then apply retention to what they backed up."""
        succeeded = []
        for job_id in firing.jobs:
            job = self.jobs.get(job_id)
            if job is None:
                continue
            async with job.changed:
                await job.changed.wait_for(lambda job=job: job.state.final)  # type: ignore[misc]
            if job.state is JobState.SUCCEEDED:
                succeeded.append(job)
        if schedule.retention and succeeded:
            names = {d.snapshot_name for job in succeeded for d in job.instruction.disks}
            destination = succeeded[0].instruction.destination
            try:
                firing.pruned = await asyncio.to_thread(self._apply_retention, schedule, destination, names)
            except (errors.HyperbackError, OSError) as e:
                log.error("schedule %s: retention on %s failed: %s", schedule.name, destination, e)
        firing.finished_at = self.clock.now()

    def _apply_retention(self, schedule: Schedule, destination: str, names: set[str]) -> list[str]:
        repo = self.destinations.repository(destination)
        if not isinstance(repo, Repository):  # refused by the config already; kept for type safety
            raise errors.UsageError(f"retention on {destination} runs on its media host")
        policy = KeepPolicy(schedule.keep_last, schedule.keep_daily, schedule.keep_weekly,
                            schedule.keep_monthly)
        pruned = prune(repo, policy, which=lambda s: s.name in names, collect_always=False)
        if pruned.gc is None:
            return []
        log.info("schedule %s: retention removed %d snapshot(s) from %s, freed %d bytes",
                 schedule.name, len(pruned.remove), destination, pruned.gc.bytes_freed)
        return [s.id for s in pruned.remove]

    async def drain(self) -> None:
        """Wait for the firings' retention (for shutdown and tests)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    def covering(self, info: DomainInfo) -> list[str]:
        """The names of the schedules that cover a domain."""
        return sorted(s.name for s in self.schedules.values() if covers(s, info))
