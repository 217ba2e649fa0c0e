"""Scheduled backups of real VMs: no guest asks; the agent's schedule fires on a clock the test
moves a night at a time (a compressed clock: nights pass in seconds), and each run goes through
the driver, the optimizer and the executor like a guest's request."""
from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import subprocess
import sys
import time
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
from host_agent.cli import main
from host_agent.config import Schedule
from host_agent.lab import Disk, Lab
from host_agent.model import ChangeDetection, Policy
from host_agent.storage.repository import Repository

pytestmark = pytest.mark.vm

REPO = Path(__file__).resolve().parents[1]  # the guest sees this checkout over 9p
SHIM = f"PYTHONPATH={REPO} {sys.executable} -m guest_shim"
MIB = 1024 * 1024

# Before `hyperback vm enable` its disk has no serial and the guest has nothing to do. Wired in,
# its application keeps writing, and the shim's serve mode holds the port and answers the agent's
# freeze (a scheduled job asks for it when a shim is connected).
GUEST = f"""
[ -n "$(cat /sys/block/vda/serial 2>/dev/null)" ] || exit 0
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


def disk_with_data(path: Path) -> Path:
    """A qcow2 image holding 8 MiB of random data at 4 MiB, as an existing VM's disk would."""
    raw = path.with_suffix(".raw")
    with open(raw, "wb") as f:
        f.truncate(64 * MIB)
        f.seek(4 * MIB)
        f.write(os.urandom(8 * MIB))
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(path)], check=True)
    raw.unlink()
    return path


def sha256_of_image(image: Path, fmt: str, scratch: Path) -> str:
    subprocess.run(["qemu-img", "convert", "-f", fmt, "-O", "raw", str(image), str(scratch)], check=True)
    try:
        return hashlib.sha256(scratch.read_bytes()).hexdigest()
    finally:
        scratch.unlink()


def test_a_vm_wired_in_by_one_command_is_backed_up_nightly_offline_then_running_with_retention(
        lab: Lab, workdir: Path) -> None:
    disk = disk_with_data(workdir / "nightly.qcow2")
    # an existing VM: no hyperback XML at all, shut off when its first boot's work is done
    vm = lab.start_vm("nightly", command=GUEST, persistent=True, channels=(),
                      disks=[Disk(disk, "vda", "qcow2")], timeout=180)
    assert vm.wait_for_exit(timeout=120) == 0, vm.console_tail()
    assert main(["vm", "enable", vm.name]) == 0

    nightly = Schedule("nightly", "0 1 * * *", domains=(vm.name,), keep_last=2)
    clock = ManualClock(local(2026, 12, 7, 0, 30))
    config = agent_config_for(workdir / "agent", interval=1.0, schedules=(nightly,))
    repo = Repository.open(workdir / "agent" / "repo")
    with running_agent(config, clock) as agent:
        agent.run(asyncio.wait_for(clock.asleep.wait(), 60))  # armed: nothing to catch up on
        kept: list[list[str]] = []
        runs = []
        for night in range(3):
            if night == 1:  # the VM is started after its first, offline, night
                vm.start_again()
                vm.wait_for_console("^FILLED", timeout=180)
            started = time.monotonic()
            firing = next_night(agent, clock, local(2026, 12, 7 + night, 1, 0))
            took = time.monotonic() - started
            (job_id,) = firing.jobs
            job = agent.call(lambda job_id=job_id: agent.agent.jobs.get(job_id))
            assert job is not None and job.state is JobState.SUCCEEDED, job and job.detail
            assert (job.origin, job.schedule, job.domain_name) == (Origin.SCHEDULE, "nightly", vm.name)
            assert job.offline is (night == 0)
            (snap_id,) = job.snapshot_ids
            runs.append(repo.resolve(snap_id))
            kept.append([s.id for s in repo.snapshots(runs[0].name)])  # the disk's, not the definition's
            if night == 0:  # shut off: what it read is the image, bit for bit
                restored = workdir / "night1.raw"
                repo.restore(snap_id, restored)
                assert sha256_of_image(restored, "raw", workdir / "a.raw") == \
                    sha256_of_image(disk, "qcow2", workdir / "b.raw")
            print(f"night {night + 1}: {'offline' if job.offline else 'running'}, {runs[-1].policy.value}, "
                  f"fired to retention done in {took:.2f} s, {runs[-1].stats}, "
                  f"detection {runs[-1].change_detection.value}")
    first, second, third = runs
    assert first.policy is Policy.FULL  # nothing to be incremental to yet
    assert second.policy is Policy.INCREMENTAL and second.parent == first.id
    assert third.policy is Policy.INCREMENTAL and third.parent == second.id
    assert third.change_detection is ChangeDetection.CHANGE_LIST  # the dirty bitmap since the second night
    assert third.stats.bytes_read < second.stats.bytes_read
    # keep_last = 2: one snapshot after the first night, two after the second, the newest two after
    # the third; the firing's retention ran before it was reported finished
    assert kept == [[first.id], [first.id, second.id], [second.id, third.id]]
    assert firing.pruned == [first.id]
    assert vm.is_active()
