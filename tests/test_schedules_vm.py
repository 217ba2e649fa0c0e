"""Scheduled backups of real VMs: no guest asks; the agent's schedule fires on a clock the test
moves a night at a time (a compressed clock: nights pass in seconds), and each run goes through
the driver, the optimizer and the executor like a guest's request."""
from __future__ import annotations

import asyncio
import shutil
import sys
import uuid
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest
from agent_harness import RunningAgent, agent_config_for, running_agent
from clocks import ManualClock
from conftest import lab_or_fail

from host_agent.agent.jobs import JobState, Origin
from host_agent.agent.schedules import Firing
from host_agent.config import Schedule
from host_agent.lab import Disk, Lab, make_disk
from host_agent.model import ChangeDetection, Policy
from host_agent.storage.repository import Repository

pytestmark = pytest.mark.vm

REPO = Path(__file__).resolve().parents[1]  # the guest sees this checkout over 9p
SHIM = f"PYTHONPATH={REPO} {sys.executable} -m guest_shim"
MIB = 1024 * 1024

# The guest's application keeps writing; the shim's serve mode holds the port and answers the
# agent's freeze (a scheduled job asks for it when a shim is connected).
BUSY_GUEST = f"""
{SHIM} serve &
dd if=/dev/urandom of=/dev/vda bs=1M count=16 seek=16 conv=fsync 2>/dev/null
echo FILLED
i=0
while true; do
    dd if=/dev/urandom of=/dev/vda bs=64k count=4 seek=$((i * 4)) conv=fsync 2>/dev/null
    i=$(( (i + 1) % 64 ))
    sleep 0.5
done
"""


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    path = Path("/var/tmp") / f"hb-sched-vm-{uuid.uuid4().hex[:8]}"
    path.mkdir(parents=True)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def lab(workdir: Path) -> Iterator[Lab]:
    with lab_or_fail(workdir / "lab", max_running=2) as the_lab:
        yield the_lab


def local(*args: int) -> float:
    return datetime(*args).astimezone().timestamp()  # type: ignore[misc]


def next_night(agent: RunningAgent, clock: ManualClock, at: float) -> Firing:
    """Move the clock to ``at``; wait until the scheduler has fired what was due, its jobs have
    finished and retention has run; the firing."""
    before = agent.call(lambda: len(agent.agent.scheduler.firings))
    agent.call(lambda: clock.set(at))
    agent.run(asyncio.wait_for(clock.asleep.wait(), 60))
    agent.run(agent.agent.scheduler.drain())
    firings = agent.call(lambda: list(agent.agent.scheduler.firings))
    assert len(firings) == before + 1, firings
    return firings[-1]


def test_a_nightly_schedule_backs_up_a_running_vm_incrementally_and_keeps_what_retention_says(
        lab: Lab, workdir: Path) -> None:
    disk = make_disk(workdir / "nightly.qcow2", 64 * MIB, "qcow2")
    vm = lab.start_vm("nightly", command=BUSY_GUEST, persistent=True, wait_for="^FILLED",
                      disks=[Disk(disk, "vda", "qcow2", "nightly-data")], timeout=180)
    nightly = Schedule("nightly", "0 1 * * *", domains=(vm.name,), keep_last=2)
    clock = ManualClock(local(2026, 12, 7, 0, 30))
    config = agent_config_for(workdir / "agent", interval=1.0, schedules=(nightly,))
    repo = Repository.open(workdir / "agent" / "repo")
    with running_agent(config, clock) as agent:
        agent.run(asyncio.wait_for(clock.asleep.wait(), 60))  # armed: nothing to catch up on
        kept: list[list[str]] = []
        runs = []
        for night in range(3):
            firing = next_night(agent, clock, local(2026, 12, 7 + night, 1, 0))
            (job_id,) = firing.jobs
            job = agent.call(lambda job_id=job_id: agent.agent.jobs.get(job_id))
            assert job is not None and job.state is JobState.SUCCEEDED, job and job.detail
            assert (job.origin, job.schedule, job.domain_name) == (Origin.SCHEDULE, "nightly", vm.name)
            (snap_id,) = job.snapshot_ids
            runs.append(repo.resolve(snap_id))
            kept.append([s.id for s in repo.snapshots()])
            print(f"night {night + 1}: {runs[-1].policy.value} {runs[-1].stats} "
                  f"(detection {runs[-1].change_detection.value})")
    first, second, third = runs
    assert first.policy is Policy.FULL  # nothing to be incremental to yet
    assert second.policy is Policy.INCREMENTAL and second.parent == first.id
    assert second.change_detection is ChangeDetection.CHANGE_LIST  # the dirty bitmap since the first night
    assert second.stats.bytes_read < first.stats.bytes_read
    assert third.parent == second.id
    # keep_last = 2: one snapshot after the first night, two after the second, the newest two after
    # the third; and the job's retention ran before the firing was reported finished
    assert kept == [[first.id], [first.id, second.id], [second.id, third.id]]
    assert firing.pruned == [first.id]
    assert vm.is_active()
