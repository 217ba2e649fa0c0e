"""The agent's metrics are observed where jobs change state and where answers leave the guests' door:
the agent's own Jobs, Guests (with a real journal) and driver, walked through a job's life.
(The scrape over HTTP of a real backup: tests/test_metrics_vm.py.)"""
from __future__ import annotations

import asyncio
import time
from pathlib import Path

from host_agent.agent.driver import BackupDriver
from host_agent.agent.guests import Guests
from host_agent.agent.jobs import Jobs, JobState, Origin
from host_agent.agent.journal import Journal
from host_agent.agent.metrics import AgentMetrics
from host_agent.model import (
    ChangeDetection,
    DiskRef,
    DiskResult,
    Fallback,
    Instruction,
    InstructionKind,
    Outcome,
    Placement,
    Plan,
    Policy,
    UnitKind,
    WorkUnit,
)

DISK = DiskRef("uuid-web", "web", "hb-data", "vda", "/srv/vms/web.qcow2", "qcow2", 1 << 30)


class Executed:
    """The executor's record of co-located backups, as the metrics read it."""

    def __init__(self) -> None:
        self.visits: list[object] = []
        self.appliance_visits: list[object] = []


async def _nothing(*_: object) -> None:
    return None


async def _no_plan(*_: object) -> Plan:
    return Plan((), "none")


def parts(tmp_path: Path) -> tuple[Jobs, Guests, AgentMetrics, Executed]:
    jobs = Jobs()
    guests = Guests(jobs, Journal(tmp_path / "journal"), freeze_timeout=1.0, requests_per_minute=30)
    executed = Executed()
    driver = BackupDriver(_no_plan, _nothing, _nothing)
    return jobs, guests, AgentMetrics(jobs, guests, driver, executed), executed


def backup(job_id: str, policy: Policy) -> Instruction:
    return Instruction(job_id, DISK.domain_uuid, job_id, InstructionKind.BACKUP, (DISK,), "usb", policy,
                       received_at=time.time())


def value(metrics: AgentMetrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def test_a_deferred_streamed_incremental_read_in_full_is_counted_everywhere(tmp_path: Path) -> None:
    async def scenario() -> tuple[AgentMetrics, float]:
        jobs, guests, metrics, executed = parts(tmp_path)
        instruction = backup("0123456789abcdef", Policy.INCREMENTAL)
        job = jobs.add(instruction, Origin.GUEST, "web")
        job.plan = WorkUnit("u1", UnitKind.BACKUP_DISK, DISK.path, DISK.snapshot_name, "usb",
                            Policy.INCREMENTAL, (instruction.id,), DISK, placement=Placement.STREAM,
                            predicted_stream_bytes=5000, predicted_move_bytes=9000)
        await jobs.move(instruction.id, JobState.DEFERRED, "host busy", time.time() + 60)
        await jobs.move(instruction.id, JobState.RUNNING, "reading")
        executed.visits.append(object())
        await guests.answer(Outcome(instruction, [
            DiskResult("hb-data", "snap1", 4096, 1024, 0.5, ChangeDetection.COMPARISON,
                       "no checkpoint to compare with", bytes_stored=512, fallback=Fallback.BITMAP_MISSING)],
            moved_bytes=0))
        return metrics, job.updated_at

    metrics, finished_at = asyncio.run(scenario())
    assert value(metrics, "hyperback_jobs_accepted_total", origin="guest") == 1
    assert value(metrics, "hyperback_jobs_finished_total", state="succeeded", origin="guest") == 1
    assert value(metrics, "hyperback_jobs", state="succeeded", origin="guest") == 1
    assert value(metrics, "hyperback_jobs", state="running", origin="guest") == 0
    assert value(metrics, "hyperback_deferrals_total") == 1
    assert value(metrics, "hyperback_backup_read_bytes_total", destination="usb") == 4096
    assert value(metrics, "hyperback_backup_new_bytes_total", destination="usb") == 1024
    assert value(metrics, "hyperback_backup_stored_bytes_total", destination="usb") == 512
    assert value(metrics, "hyperback_checkpoint_fallbacks_total", domain="web", reason="bitmap-missing") == 1
    assert value(metrics, "hyperback_lan_predicted_bytes_total", placement="stream") == 5000
    assert value(metrics, "hyperback_last_success_timestamp_seconds", domain="web") == finished_at
    assert value(metrics, "hyperback_job_duration_seconds_count", kind="backup", state="succeeded") == 1
    assert value(metrics, "hyperback_visits_total") == 1
    assert value(metrics, "hyperback_queue_depth") == 0


def test_a_failed_or_full_backup_counts_no_fallback_and_no_success(tmp_path: Path) -> None:
    async def scenario() -> AgentMetrics:
        jobs, guests, metrics, _ = parts(tmp_path)
        failing = backup("1123456789abcdef", Policy.INCREMENTAL)
        jobs.add(failing, Origin.OPERATOR, "web")
        await guests.fail(failing, "the media are not mounted")
        full = backup("2123456789abcdef", Policy.FULL)
        jobs.add(full, Origin.SCHEDULE, "web")
        read = DiskResult("hb-data", "snap2", 100, 100, 0.1, ChangeDetection.NONE)  # no base: not a fallback
        await guests.answer(Outcome(full, [read], moved_bytes=3000))
        return metrics

    metrics = asyncio.run(scenario())
    assert value(metrics, "hyperback_jobs_finished_total", state="failed", origin="operator") == 1
    assert value(metrics, "hyperback_jobs_finished_total", state="succeeded", origin="schedule") == 1
    assert value(metrics, "hyperback_backup_read_bytes_total", destination="usb") == 100  # none of the failed
    assert not [m for m in metrics.registry.collect() if m.name == "hyperback_checkpoint_fallbacks"
                and any(sample.name.endswith("_total") for sample in m.samples)]
    assert value(metrics, "hyperback_migration_bytes_total") == 3000


def test_each_agent_has_a_registry_of_its_own(tmp_path: Path) -> None:
    async def scenario() -> tuple[AgentMetrics, AgentMetrics]:
        first = parts(tmp_path / "a")
        second = parts(tmp_path / "b")  # the same metric names, registered again: no clash
        first[0].add(backup("3123456789abcdef", Policy.FULL), Origin.GUEST, "web")
        return first[2], second[2]

    first, second = asyncio.run(scenario())
    assert value(first, "hyperback_jobs_accepted_total", origin="guest") == 1
    assert value(second, "hyperback_jobs_accepted_total", origin="guest") == 0


def test_an_observer_that_raises_stops_neither_the_job_nor_the_answer(tmp_path: Path) -> None:
    def broken(*_: object) -> None:
        raise RuntimeError("a bug in an observer")

    async def scenario() -> JobState:
        jobs, guests, _, _ = parts(tmp_path)
        jobs.observers.insert(0, broken)
        guests.observers.insert(0, broken)
        instruction = backup("4123456789abcdef", Policy.FULL)
        job = jobs.add(instruction, Origin.GUEST, "web")
        await guests.answer(Outcome(instruction, []))
        return job.state

    assert asyncio.run(scenario()) is JobState.SUCCEEDED
