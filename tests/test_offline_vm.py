"""Offline VMs, against the real libvirtd and QEMU: a shut-off domain is backed up without a guest,
its images guarded by QEMU's own image locks so that it cannot start while they are read.

The domains here boot nothing (no kernel, no boot disk: QEMU sits in its firmware), which is all
a start needs to open, and lock, its images.
"""
from __future__ import annotations

import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import libvirt  # type: ignore[import-untyped]
import pytest
from agent_harness import RunningAgent, agent_config_for, running_agent
from conftest import mutate, sha256_file, wait_until_settled, write_image

from host_agent import errors
from host_agent._proto.hyperback.v1 import operator_pb2, operator_pb2_grpc, optimizer_pb2
from host_agent.agent.offline import OFFLINE_NOTE, ImageGuard, offline_view
from host_agent.agent.wiring import stable_serial
from host_agent.cli import main
from host_agent.model import DiskRef
from host_agent.storage.repository import Repository

pytestmark = pytest.mark.vm
MIB = 1024 * 1024


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    path = Path("/var/tmp") / f"hb-offline-vm-{uuid.uuid4().hex[:8]}"
    path.mkdir(parents=True)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def conn() -> Iterator[libvirt.virConnect]:
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    c = libvirt.open("qemu:///system")
    yield c
    c.close()


def qcow2_with_data(path: Path, size: int, seed: int) -> Path:
    raw = write_image(path.with_suffix(".src"), size, seed)
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(path)], check=True)
    raw.unlink()
    return path


def raw_content(image: Path, fmt: str, out: Path) -> Path:
    subprocess.run(["qemu-img", "convert", "-f", fmt, "-O", "raw", str(image), str(out)], check=True)
    return out


def domain_xml(name: str, disks: list[tuple[Path, str, str]]) -> str:
    devices = "".join(f"<disk type='file' device='disk'><driver name='qemu' type='{fmt}'/>"
                      f"<source file='{path}'/><target dev='{dev}' bus='virtio'/></disk>"
                      for path, fmt, dev in disks)
    return (f"<domain type='qemu'><name>{name}</name><memory unit='MiB'>64</memory>"
            "<os><type arch='x86_64' machine='pc'>hvm</type></os>"
            f"<devices>{devices}<memballoon model='none'/></devices></domain>")


@pytest.fixture
def shut_off(conn: libvirt.virConnect, workdir: Path) -> Iterator[tuple[libvirt.virDomain, Path, Path]]:
    """A persistent, shut-off domain with a qcow2 and a raw disk full of data; no hyperback XML."""
    tag = uuid.uuid4().hex[:6]
    qcow = qcow2_with_data(workdir / f"{tag}-a.qcow2", 24 * MIB, 1)
    raw = write_image(workdir / f"{tag}-b.raw", 16 * MIB, 2)
    dom = conn.defineXML(domain_xml(f"hbvl-offline-{tag}", [(qcow, "qcow2", "vda"), (raw, "raw", "vdb")]))
    try:
        yield dom, qcow, raw
    finally:
        if dom.isActive():
            dom.destroy()
        dom.undefine()


def test_the_guard_keeps_a_shut_off_domain_from_starting_until_it_is_released(
        shut_off: tuple[libvirt.virDomain, Path, Path]) -> None:
    dom, qcow, raw = shut_off
    with ImageGuard([str(qcow), str(raw)]):
        with pytest.raises(libvirt.libvirtError) as refused:
            dom.create()
        assert 'Failed to get "write" lock' in str(refused.value), refused.value
        assert not dom.isActive()
    dom.create()  # released: it starts
    assert dom.isActive()
    # a running domain's image is not read offline: the guard sees QEMU's write permission
    with pytest.raises(errors.ViewError, match="open for writing by another process"):
        ImageGuard([str(raw)]).__enter__()
    ref = DiskRef(dom.UUIDString(), dom.name(), "x", "vdb", str(raw), "raw", 0)
    with pytest.raises(errors.DomainStarted), offline_view(dom, (ref,), chunk_size=32768):
        pass
    dom.destroy()


@pytest.fixture(scope="module")
def agent(workdir: Path) -> Iterator[RunningAgent]:
    with running_agent(agent_config_for(workdir / "agent", interval=0.5)) as running:
        yield running


def test_a_shut_off_domain_is_backed_up_offline_through_the_operator_api_and_restores_bit_identical(
        agent: RunningAgent, shut_off: tuple[libvirt.virDomain, Path, Path], workdir: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    dom, qcow, raw = shut_off
    assert main(["vm", "enable", dom.name()]) == 0  # wired in: the channel and the serials it names
    capsys.readouterr()
    channel = grpc.insecure_channel(f"unix:{workdir}/agent/agent.sock")
    stub = operator_pb2_grpc.OperatorStub(channel)
    try:
        t0 = time.monotonic()
        job = stub.TriggerBackup(operator_pb2.TriggerBackupRequest(domain=dom.name(),
                                                                   policy=optimizer_pb2.POLICY_FULL),
                                 timeout=30).job
        events = list(stub.WatchJob(operator_pb2.WatchJobRequest(job_id=job.id), timeout=300))
        seconds = time.monotonic() - t0
        assert events[-1].state == operator_pb2.JOB_STATE_SUCCEEDED, events
        done = next(j for j in stub.ListJobs(operator_pb2.ListJobsRequest(domain=dom.name()), timeout=30).jobs
                    if j.id == job.id)
        assert done.offline and OFFLINE_NOTE in done.detail, done
        assert not dom.isActive()
    finally:
        channel.close()
    repo = Repository.open(workdir / "agent" / "repo")
    snaps = {s.name: s for s in repo.snapshots() if s.id in done.snapshot_ids}
    total_read = total_new = 0
    for image, fmt, dev in ((qcow, "qcow2", "vda"), (raw, "raw", "vdb")):
        snap = snaps[f"{dom.UUIDString()}/{stable_serial(dom.UUIDString(), dev)}"]
        restored = repo.restore(snap.id, workdir / f"{image.name}.restored").target
        expected = raw_content(image, fmt, workdir / f"{image.name}.expected")
        assert sha256_file(Path(restored)) == sha256_file(expected), image
        total_read += snap.stats.bytes_read
        total_new += snap.stats.bytes_new
    # vm status asks the agent: it knows the shut-off domain and its last backup
    config = workdir / "agent.toml"
    config.write_text(f'operator_listen = "unix:{workdir}/agent/agent.sock"\n')
    assert main(["vm", "--config", str(config), "status", dom.name()]) == 0
    status = capsys.readouterr().out
    assert "shut off" in status, status
    assert "agent: backs it up offline while shut off; last backup 20" in status, status
    # the start was guarded only while the images were read: now it starts
    dom.create()
    assert dom.isActive()
    dom.destroy()
    print(f"offline backup of {qcow.name} (24 MiB qcow2) + {raw.name} (16 MiB raw): {seconds:.2f} s "
          f"trigger-to-final, {total_read} bytes read, {total_new} bytes new")


def back_up(stub: operator_pb2_grpc.OperatorStub, domain: str, serial: str,
            policy: int) -> operator_pb2.Job:
    """Trigger a backup of one disk through the operator API, wait for it to succeed: its job."""
    job = stub.TriggerBackup(operator_pb2.TriggerBackupRequest(domain=domain, serials=[serial],
                                                               policy=policy), timeout=30).job
    events = list(stub.WatchJob(operator_pb2.WatchJobRequest(job_id=job.id), timeout=300))
    assert events[-1].state == operator_pb2.JOB_STATE_SUCCEEDED, events
    return next(j for j in stub.ListJobs(operator_pb2.ListJobsRequest(domain=domain), timeout=30).jobs
                if j.id == job.id)


def test_a_second_offline_backup_builds_on_the_first_and_stores_only_what_changed(
        agent: RunningAgent, shut_off: tuple[libvirt.virDomain, Path, Path], workdir: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    dom, _qcow, raw = shut_off
    assert main(["vm", "enable", dom.name()]) == 0
    capsys.readouterr()
    serial = stable_serial(dom.UUIDString(), "vdb")
    channel = grpc.insecure_channel(f"unix:{workdir}/agent/agent.sock")
    stub = operator_pb2_grpc.OperatorStub(channel)

    try:
        first = back_up(stub, dom.name(), serial, optimizer_pb2.POLICY_FULL)
        mutate(raw, 7, extents=4)  # 256 KiB of 16 MiB changed while it was shut off
        second = back_up(stub, dom.name(), serial, optimizer_pb2.POLICY_INCREMENTAL)
    finally:
        channel.close()
    assert first.offline and second.offline
    repo = Repository.open(workdir / "agent" / "repo")
    snap = repo.resolve(second.snapshot_ids[0])
    assert snap.parent == first.snapshot_ids[0] and snap.stats.bytes_new <= 4 * 64 * 1024 + 4 * 32768
    restored = repo.restore(snap.id, workdir / "second.restored").target
    assert sha256_file(Path(restored)) == sha256_file(raw)


def test_an_offline_disk_image_left_unchanged_is_not_read_again(
        agent: RunningAgent, shut_off: tuple[libvirt.virDomain, Path, Path], workdir: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    """The agent's executor backs a shut-off domain's raw image up as a file: an incremental of an
    image whose identity matches the base's record reads nothing (repository-format.md, 5.1.1)."""
    dom, _qcow, raw = shut_off
    wait_until_settled([raw])  # written long enough before the base for its record to vouch for it
    assert main(["vm", "enable", dom.name()]) == 0
    capsys.readouterr()
    serial = stable_serial(dom.UUIDString(), "vdb")
    channel = grpc.insecure_channel(f"unix:{workdir}/agent/agent.sock")
    stub = operator_pb2_grpc.OperatorStub(channel)

    try:
        first = back_up(stub, dom.name(), serial, optimizer_pb2.POLICY_FULL)
        second = back_up(stub, dom.name(), serial, optimizer_pb2.POLICY_INCREMENTAL)
    finally:
        channel.close()
    assert first.offline and second.offline
    repo = Repository.open(workdir / "agent" / "repo")
    base, snap = repo.resolve(first.snapshot_ids[0]), repo.resolve(second.snapshot_ids[0])
    assert base.stats.bytes_read > 0 and snap.stats.bytes_read == 0 and snap.tree == base.tree
    assert snap.source_file is not None and snap.source_file.unchanged_since == base.id
    restored = repo.restore(snap.id, workdir / "unchanged.restored").target
    assert sha256_file(Path(restored)) == sha256_file(raw)
