"""Changed-block tracking under the real agent: block-device and raw-file disks (a bitmap for the
VM's lifetime), one checkpoint chain per destination, and what ends or breaks a chain (a disk
restored under the domain, the chain's snapshot forgotten, a backup while the domain is off)
(docs/changed-block-tracking.md).

One lab guest serves the whole module: a loop device (vda), a raw file (vdb) and a qcow2 image
(vdc). It writes only when the test asks -- a numbered script the test drops into a folder the
guest sees over 9p -- and says ``WROTE n`` once the writes are synced, so the disks are quiet
while the test compares a restore with ``qemu-img convert`` of the disk at that moment.
"""
from __future__ import annotations

import random
import shutil
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import grpc
import pytest
from agent_harness import RunningAgent, agent_config_for, running_agent
from conftest import lab_or_fail, sha256_file, write_image
from system_helpers import attach_loop, detach_loop

from host_agent._proto.hyperback.v1 import operator_pb2, operator_pb2_grpc, optimizer_pb2
from host_agent.agent.checkpoints import list_checkpoints
from host_agent.lab import Disk, Vm
from host_agent.model import ChangeDetection, DiskResult, Fallback, Outcome, Policy
from host_agent.storage import qcow2
from host_agent.storage.repository import Repository
from host_agent.storage.snapshot import Snapshot

pytestmark = [pytest.mark.vm, pytest.mark.root]

MIB = 1024 * 1024
BLOCK = 64 * 1024  # what the guest writes at a time: QEMU's dirty-bitmap granularity
SIZE = 64 * MIB

GUEST = """
n=1
while :; do
  if [ -f {ctl}/write.$n ]; then
    sh {ctl}/write.$n && echo "WROTE $n" || echo "WRITE-FAILED $n"
    n=$((n + 1))
  fi
  sleep 0.1
done
"""


@dataclass
class Guest:
    vm: Vm
    ctl: Path
    disks: dict[str, tuple[str, str, str]]  # serial -> (host path, format, guest device)
    writes: int = 0

    def restart(self, while_off: Callable[[], object] = lambda: None) -> None:
        """Power the guest off, call ``while_off``, and boot it again: a new QEMU process (its script
        starts over)."""
        self.vm.domain.destroy()
        while_off()
        for old in self.ctl.glob("write.*"):
            old.unlink()
        self.writes = 0
        self.vm.start_again()
        self.vm.wait_for_console(r"^HB-READY", timeout=120)

    def write(self, serial: str, offsets: list[int]) -> int:
        """Have the guest write random 64 KiB blocks at ``offsets`` of disk ``serial``, synced;
        the bytes written."""
        dev = self.disks[serial][2]
        self.writes += 1
        script = "".join(f"dd if=/dev/urandom of=/dev/{dev} bs={BLOCK} seek={off // BLOCK} count=1 "
                         "conv=fsync,notrunc 2>/dev/null || exit 1\n" for off in offsets)
        tmp = self.ctl / f".write.{self.writes}"
        tmp.write_text(script)
        tmp.rename(self.ctl / f"write.{self.writes}")
        self.vm.wait_for_console(rf"^WROTE {self.writes}\b", timeout=60)
        return len(offsets) * BLOCK


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    path = Path("/var/tmp") / f"hb-cbt-vm-{uuid.uuid4().hex[:8]}"  # the guest sees /var/tmp, not /tmp
    path.mkdir(parents=True)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def guest(workdir: Path) -> Iterator[Guest]:
    blk_file = write_image(workdir / "blk.img", SIZE, seed=1)
    raw = write_image(workdir / "raw.img", SIZE, seed=2)
    qcow_src = write_image(workdir / "qcow.src", SIZE, seed=3)
    qcow = workdir / "qcow.qcow2"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(qcow_src), str(qcow)], check=True)
    qcow_src.unlink()
    ctl = workdir / "ctl"
    ctl.mkdir()
    loop = attach_loop(blk_file)
    try:
        with lab_or_fail(workdir / "lab") as lab:
            disks = {"hb-blk": (loop, "raw", "vda"), "hb-raw": (str(raw), "raw", "vdb"),
                     "hb-qcow": (str(qcow), "qcow2", "vdc")}
            vm = lab.start_vm("cbt", command=GUEST.format(ctl=ctl), timeout=180, persistent=True,
                              disks=[Disk(p, dev, fmt, serial) for serial, (p, fmt, dev) in disks.items()])
            yield Guest(vm, ctl, disks)
    finally:
        detach_loop(loop)


@pytest.fixture(scope="module")
def agent(workdir: Path, guest: Guest) -> Iterator[RunningAgent]:
    root = workdir / "agent"
    root.mkdir()
    Repository.init(root / "second")
    config = agent_config_for(root, interval=0.2, repositories={"default": root / "repo",
                                                                 "second": root / "second"})
    with running_agent(config) as running:
        running.call(lambda: running.agent.guests.observers.append(OUTCOMES.append))
        yield running


OUTCOMES: list[Outcome] = []  # every answer the agent gave, by the guests' observer hook


class Backed(NamedTuple):
    snapshot: Snapshot
    result: DiskResult  # the agent's answer for the disk: how it found the changes, and why


def backup(workdir: Path, vm: Vm, serials: list[str], destination: str = "default") -> dict[str, Backed]:
    """Back ``serials`` up through the operator API (incremental); the new snapshot of each disk."""
    with grpc.insecure_channel(f"unix:{workdir}/agent/agent.sock") as channel:
        stub = operator_pb2_grpc.OperatorStub(channel)
        job = stub.TriggerBackup(operator_pb2.TriggerBackupRequest(
            domain=vm.name, serials=serials, destination=destination,
            policy=optimizer_pb2.POLICY_INCREMENTAL), timeout=30).job
        events = list(stub.WatchJob(operator_pb2.WatchJobRequest(job_id=job.id), timeout=120))
        assert events[-1].state == operator_pb2.JOB_STATE_SUCCEEDED, events[-1]
        done = next(j for j in stub.ListJobs(operator_pb2.ListJobsRequest(domain=vm.name), timeout=30).jobs
                    if j.id == job.id)
    repo = open_repo(workdir, destination)
    (outcome,) = [o for o in OUTCOMES if o.instruction.id == job.id]
    results = {r.snapshot: r for r in outcome.disks}
    return {s.name.rsplit("/", 1)[1]: Backed(s, results[s.id]) for s in map(repo.resolve, done.snapshot_ids)}


def open_repo(workdir: Path, destination: str) -> Repository:
    return Repository.open(workdir / "agent" / ("repo" if destination == "default" else destination))


def assert_restores_as_the_disk_is(workdir: Path, destination: str, snap: Snapshot, path: str,
                                   fmt: str) -> None:
    """The snapshot restores bit-identical to ``qemu-img convert`` of the (quiet) disk now."""
    repo = open_repo(workdir, destination)
    restored = workdir / "restored.img"
    expected = workdir / "expected.img"
    repo.restore(snap.id, restored, overwrite=True)
    subprocess.run(["qemu-img", "convert", "-U", "-f", fmt, "-O", "raw", path, str(expected)], check=True)
    try:
        assert sha256_file(restored) == sha256_file(expected), (snap.name, snap.id)
    finally:
        restored.unlink()
        expected.unlink()


def offsets(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(0, SIZE // BLOCK) * BLOCK for _ in range(n)]


def test_a_loop_device_and_a_raw_file_disk_are_backed_up_by_the_agent_then_read_only_their_changes(
        agent: RunningAgent, guest: Guest, workdir: Path) -> None:
    rng = random.Random(12)
    serials = ["hb-blk", "hb-raw"]
    snaps = backup(workdir, guest.vm, serials)
    assert sorted(snaps) == serials
    for serial in serials:
        path, fmt, _ = guest.disks[serial]
        assert_restores_as_the_disk_is(workdir, "default", snaps[serial].snapshot, path, fmt)
    for _ in range(2):  # the VM keeps running: its raw disks' bitmaps from the last view answer
        changed = {serial: guest.write(serial, sorted(set(offsets(rng, 3)))) for serial in serials}
        snaps = backup(workdir, guest.vm, serials)
        for serial in serials:
            snap, result = snaps[serial]
            assert result.change_detection is ChangeDetection.DIRTY_BITMAP, result
            assert snap.change_detection is ChangeDetection.CHANGE_LIST
            assert snap.stats.bytes_read == changed[serial], (serial, snap.stats)  # 64 KiB-aligned writes
            path, fmt, _ = guest.disks[serial]
            assert_restores_as_the_disk_is(workdir, "default", snap, path, fmt)
    # the VM runs on its own disks again: the loop device as a block device
    disks = guest.vm.xml().findall("./devices/disk")
    vda = next(d for d in disks if d.find("target[@dev='vda']") is not None)
    assert vda.get("type") == "block" and vda.find(f"source[@dev='{guest.disks['hb-blk'][0]}']") is not None
    assert not list((workdir / "agent" / "overlays").glob("*"))


def test_after_a_restart_raw_disks_are_compared_saying_why_then_tracked_again(
        agent: RunningAgent, guest: Guest, workdir: Path) -> None:
    rng = random.Random(56)
    serials = ["hb-blk", "hb-raw"]
    backup(workdir, guest.vm, serials)
    guest.restart()
    for serial in serials:
        guest.write(serial, offsets(rng, 2))
    snaps = backup(workdir, guest.vm, serials)
    for serial in serials:
        snap, result = snaps[serial]
        assert result.change_detection is ChangeDetection.COMPARISON, result
        assert "restarted" in result.note, result
        assert snap.stats.bytes_read >= SIZE // 2, snap.stats  # all of it (a raw file's holes are not read)
        path, fmt, _ = guest.disks[serial]
        assert_restores_as_the_disk_is(workdir, "default", snap, path, fmt)
    changed = {serial: guest.write(serial, sorted(set(offsets(rng, 2)))) for serial in serials}
    snaps = backup(workdir, guest.vm, serials)
    for serial in serials:
        snap, result = snaps[serial]
        assert result.change_detection is ChangeDetection.DIRTY_BITMAP, result
        assert snap.stats.bytes_read == changed[serial], (serial, snap.stats)
        path, fmt, _ = guest.disks[serial]
        assert_restores_as_the_disk_is(workdir, "default", snap, path, fmt)


def test_two_destinations_alternating_keep_each_other_s_chains(
        agent: RunningAgent, guest: Guest, workdir: Path) -> None:
    rng = random.Random(34)
    serial = "hb-qcow"
    path, fmt, _ = guest.disks[serial]
    written_since = {"default": set[int](), "second": set[int]()}
    seen: set[str] = set()
    for destination in ["default", "second"] * 3:
        snap, result = backup(workdir, guest.vm, [serial], destination)[serial]
        if destination in seen:
            changed = len(written_since[destination]) * BLOCK
            assert result.change_detection is ChangeDetection.DIRTY_BITMAP, (destination, result)
            assert snap.change_detection is ChangeDetection.CHANGE_LIST, (destination, snap)
            # the dirty bitmap's extents, at its 64 KiB granularity: the changes, not the disk
            assert changed <= snap.stats.bytes_read <= changed + 2 * BLOCK, (destination, snap.stats)
        seen.add(destination)
        written_since[destination] = set()
        assert_restores_as_the_disk_is(workdir, destination, snap, path, fmt)
        blocks = offsets(rng, 4)
        guest.write(serial, blocks)
        for d in written_since:
            written_since[d] |= set(blocks)
    # what the domain keeps: for each destination, the checkpoints of its latest snapshot and of
    # its latest full one (a differential's base), and nothing else
    needed = set()
    for destination in written_since:
        snaps = open_repo(workdir, destination).snapshots(f"{guest.vm.domain.UUIDString()}/{serial}")
        needed |= {snaps[-1].checkpoint, [s for s in snaps if s.policy is Policy.FULL][-1].checkpoint}
    assert set(list_checkpoints(guest.vm.domain)) == needed and len(needed) == 4


def test_a_disk_restored_under_the_shut_off_domain_is_compared_saying_so_then_tracked_again(
        agent: RunningAgent, guest: Guest, workdir: Path) -> None:
    rng = random.Random(78)
    serial = "hb-qcow"
    path, fmt, _ = guest.disks[serial]
    older = backup(workdir, guest.vm, [serial])[serial].snapshot
    guest.write(serial, offsets(rng, 3))
    backup(workdir, guest.vm, [serial])  # the checkpoint the next backup would start from
    repo = open_repo(workdir, "default").path
    restore = [sys.executable, "-m", "host_agent.cli", "restore", "--repo", str(repo), "--overwrite",
               "--format", "qcow2", older.id, path]
    guest.restart(while_off=lambda: subprocess.run(restore, check=True, capture_output=True))
    guest.write(serial, offsets(rng, 2))
    snap, result = backup(workdir, guest.vm, [serial])[serial]
    assert result.change_detection is ChangeDetection.COMPARISON, result
    assert result.fallback is Fallback.DISK_REPLACED and "another file" in result.note, result
    assert snap.fallback is not None and snap.fallback.reason is Fallback.DISK_REPLACED, snap
    assert_restores_as_the_disk_is(workdir, "default", snap, path, fmt)
    changed = guest.write(serial, sorted(set(offsets(rng, 2))))
    snap, result = backup(workdir, guest.vm, [serial])[serial]
    assert result.change_detection is ChangeDetection.DIRTY_BITMAP, result
    assert changed <= snap.stats.bytes_read <= changed + 2 * BLOCK, snap.stats
    assert_restores_as_the_disk_is(workdir, "default", snap, path, fmt)


def test_a_chain_whose_latest_snapshot_was_forgotten_goes_on_from_the_older_one_by_comparison_saying_so(
        agent: RunningAgent, guest: Guest, workdir: Path) -> None:
    rng = random.Random(90)
    serial = "hb-qcow"
    path, fmt, _ = guest.disks[serial]
    for _ in range(3):  # the middle snapshot's checkpoint is pruned once the third one is taken
        backup(workdir, guest.vm, [serial])
        guest.write(serial, offsets(rng, 2))
    repo = open_repo(workdir, "default")
    latest = repo.snapshots(f"{guest.vm.domain.UUIDString()}/{serial}")[-1]
    repo.forget([latest.id])
    snap, result = backup(workdir, guest.vm, [serial])[serial]
    assert result.change_detection is ChangeDetection.COMPARISON, result
    assert result.fallback is Fallback.BASE_PRUNED and "was forgotten" in result.note, result
    assert snap.fallback is not None and snap.fallback.reason is Fallback.BASE_PRUNED
    assert snap.parent != latest.id and snap.stats.bytes_read >= SIZE // 2, snap  # the whole disk, compared
    assert_restores_as_the_disk_is(workdir, "default", snap, path, fmt)


def test_a_chain_ended_by_a_backup_of_the_shut_off_domain_leaves_no_bitmap_in_the_image(
        agent: RunningAgent, guest: Guest, workdir: Path) -> None:
    serial = "hb-qcow"
    path, fmt, _ = guest.disks[serial]
    backup(workdir, guest.vm, [serial])
    guest.write(serial, offsets(random.Random(11), 2))
    backup(workdir, guest.vm, [serial])

    def bitmaps() -> set[str]:
        return {b.name for b in qcow2.image_info(path, "qcow2").bitmaps if b.name.startswith("hyperback-")}

    def back_up_offline() -> None:
        before, stored = set(list_checkpoints(guest.vm.domain)), bitmaps()
        snap, result = backup(workdir, guest.vm, [serial])[serial]
        assert result.offline and snap.checkpoint is None, result
        kept = set(list_checkpoints(guest.vm.domain))
        ended = before - kept  # the chain the offline snapshot ended (it records no checkpoint)
        assert ended & stored, (before, kept, stored)
        assert bitmaps() == stored & kept  # their bitmaps left the image with the checkpoints
        assert_restores_as_the_disk_is(workdir, "default", snap, path, fmt)

    guest.restart(while_off=back_up_offline)
