"""Instant recovery of a real VM: it runs from a 1 GiB snapshot before the copy is done, and after
the pivot its disk is the snapshot, bit for bit; a copy that runs out of space leaves it running
on its overlay until the copy is retried somewhere with room.

The copy is held by its bandwidth (1 byte/s: QEMU's rate limit lets one buffer through, then
sleeps) until the guest's shim has answered: the ordering is made, not raced. Then the cap is
lifted and the copy runs to its end.
"""
from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import subprocess
import sys
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest
from agent_harness import agent_config_for, running_agent
from conftest import lab_or_fail, sha256_file

from guest_shim import protocol as p
from host_agent import errors, hypervisor
from host_agent._proto.hyperback.v1 import operator_pb2 as pb
from host_agent._proto.hyperback.v1 import operator_pb2_grpc as pb_grpc
from host_agent._proto.hyperback.v1 import optimizer_pb2 as opb
from host_agent.agent.instant import InstantRecovery, Phase, Request
from host_agent.lab import Channel, Disk, Lab, Vm, render_domain_xml
from host_agent.lab.domain import BASE_KERNEL_ARGS
from host_agent.lab.guest import command_cmdline_arg
from host_agent.storage.export import SnapshotExport
from host_agent.storage.repository import Repository

pytestmark = [pytest.mark.vm, pytest.mark.root]

REPO = Path(__file__).resolve().parents[1]
SHIM = f"PYTHONPATH={REPO} {sys.executable} -m guest_shim"
HYPERBACK = [sys.executable, "-m", "host_agent.cli"]
MIB = 1024 * 1024
GIB = 1024 * MIB
HEAD = b"HB-INSTANT-HEAD-"
TAIL = b"-HB-INSTANT-TAIL"

# The guest reads both ends of its recovered disk (through the overlay and NBD), then serves.
GUEST = f"""
echo "HEAD $(dd if=/dev/vda bs=16 count=1 2>/dev/null)"
echo "TAIL $(dd if=/dev/vda bs=16 skip={GIB // 16 - 1} count=1 2>/dev/null)"
{SHIM} serve
"""


@pytest.fixture
def workdir() -> Iterator[Path]:
    path = Path("/var/tmp") / f"hb-instant-{uuid.uuid4().hex[:8]}"
    path.mkdir(parents=True)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def write_ends(image: Path) -> None:
    """A 1 GiB disk, sparse but for 8 MiB of data at each end (markers at the first and last bytes)."""
    rng = random.Random(7)
    with open(image, "wb") as f:
        f.truncate(GIB)
        f.write(HEAD + rng.randbytes(8 * MIB - len(HEAD)))
        f.seek(GIB - 8 * MIB)
        f.write(rng.randbytes(8 * MIB - len(TAIL)) + TAIL)


def snapshot_of_a_gib(workdir: Path) -> tuple[Repository, str, Path]:
    """write_ends() backed up: the repository, the snapshot id and the image."""
    image = workdir / "source.img"
    write_ends(image)
    repo = Repository.init(workdir / "repo")
    return repo, repo.backup(image, "instant/disk").snapshot.id, image


def domain_xml(lab: Lab, name: str, disk: Path) -> str:
    """A lab guest's definition running GUEST, its vda to be replaced by the recovery."""
    args = [*BASE_KERNEL_ARGS, command_cmdline_arg(GUEST)]
    return render_domain_xml(lab.name_prefix + name, kernel=lab.boot_image, initrd=lab.initramfs,
                             cmdline=" ".join(args), console_log=lab.workdir / f"{name}.console.log",
                             disks=[Disk(disk, "vda", "raw", "hb-instant")], channels=[Channel()])


def adopt(lab: Lab, recovery: InstantRecovery, name: str) -> Vm:
    """The lab's handle on the domain the recovery started (the lab destroys it at the end)."""
    assert recovery.domain is not None
    vm = Vm(lab, lab.name_prefix + name, recovery.domain.raw, lab.workdir / f"{name}.console.log",
            True, recovery.started_at)
    lab.vms.append(vm)
    return vm


@contextmanager
def recovering(lab: Lab, name: str, export: SnapshotExport, target: Path,
               **options: Any) -> Iterator[tuple[InstantRecovery, Vm]]:
    """A lab guest recovered instantly from ``export`` to ``target``; at the end its domain is
    destroyed first, then the recovery closed (a domain still running keeps its export up)."""
    request = Request(domain_xml(lab, name, export.run_dir / "gone.img"), "vda", target, **options)
    recovery = InstantRecovery(hypervisor.connect(lab.uri), export, request, export.run_dir)
    try:
        recovery.start()
        yield recovery, adopt(lab, recovery, name)
    finally:
        try:
            for vm in lab.vms:
                vm.destroy()
        finally:
            recovery.close()


def shim_answers(vm: Vm, timeout: float = 180) -> None:
    """Wait for the guest's shim to sync on its channel, answer it, and read its hello."""
    sock = vm.connect_channel()
    sock.settimeout(timeout)
    reader = p.MessageReader(p.Direction.TO_HOST)
    try:
        while True:
            data = sock.recv(65536)
            assert data, f"the channel closed before the shim said hello; console:\n{vm.console_tail()}"
            for msg in reader.feed(data):
                if isinstance(msg, p.Sync):
                    sock.sendall(p.sync_ack_frame(msg.id))
                elif isinstance(msg, p.Hello):
                    return
    finally:
        sock.close()


def disk_sources(vm: Vm) -> list[str]:
    return [s.get("file") or s.get("protocol") or "" for s in vm.xml().iter("source")
            if s.get("file") or s.get("protocol")]


def test_a_vm_runs_from_a_snapshot_before_its_copy_is_done_and_then_from_a_bit_identical_target(
        workdir: Path) -> None:
    repo, snap, image = snapshot_of_a_gib(workdir)
    t0 = time.monotonic()
    repo.restore(snap, workdir / "full-restore.img")
    full_restore = time.monotonic() - t0
    export = SnapshotExport(repo, snap, workdir / "run")
    target = workdir / "target.img"
    with lab_or_fail(workdir / "lab") as lab, recovering(lab, "instant", export, target, bandwidth=1) as (
            recovery, vm):
        shim_answers(vm)
        first_answer = time.monotonic() - recovery.started_at
        held = recovery.status()
        assert held.phase is Phase.COPYING and held.bytes_done < held.bytes_total, held
        assert "HEAD " + HEAD.decode() in vm.console() and "TAIL " + TAIL.decode() in vm.console()
        recovery.set_bandwidth(0)
        done = recovery.finish(timeout=600)
        assert done.phase is Phase.PIVOTED, done
        assert vm.is_active()
        assert disk_sources(vm) == [str(target)]
        for flags in (0, 2):  # live, and VIR_DOMAIN_XML_INACTIVE: the definition kept
            disk = ET.fromstring(vm.domain.XMLDesc(flags)).find("./devices/disk")
            assert disk is not None and "nbd" not in ET.tostring(disk, encoding="unicode")
        assert not export.socket_path.exists() and not export.running
        assert recovery.overlay is not None and not recovery.overlay.exists()
    assert sha256_file(target) == sha256_file(image)
    print(f"\ninstant recovery of a 1 GiB snapshot: shim answered after {first_answer:.2f} s; "
          f"full restore {full_restore:.2f} s")


def test_a_copy_that_runs_out_of_space_leaves_the_vm_running_on_its_overlay_until_a_retry(
        workdir: Path) -> None:
    repo, snap, image = snapshot_of_a_gib(workdir)
    tiny = workdir / "tiny"
    tiny.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(tiny)], check=True)
    try:
        export = SnapshotExport(repo, snap, workdir / "run")
        with lab_or_fail(workdir / "lab") as lab, recovering(lab, "nospace", export, tiny / "target.img") as (
                recovery, vm):
            failed = recovery.finish(timeout=600)
            assert failed.phase is Phase.FAILED, failed
            assert "bytes free" in failed.message and "keeps running on the overlay" in failed.message
            assert vm.is_active()
            shim_answers(vm)  # still served, from the overlay over NBD
            assert str(recovery.overlay) in disk_sources(vm) and export.socket_path.exists()
            assert not (tiny / "target.img").exists()
            recovery.retry(workdir / "roomy.img")  # somewhere with room: the same VM, copied again
            assert recovery.finish(timeout=600).phase is Phase.PIVOTED
            assert disk_sources(vm) == [str(workdir / "roomy.img")] and not export.running
        assert sha256_file(workdir / "roomy.img") == sha256_file(image)
        assert not export.running, "the export outlived its domain"
    finally:
        subprocess.run(["umount", str(tiny)], check=True)
    assert not os.path.ismount(tiny)


def test_the_agent_runs_an_instant_restore_as_a_job_the_command_and_the_operator_api_follow(
        workdir: Path) -> None:
    config = agent_config_for(workdir / "agent")
    repo = Repository.open(workdir / "agent" / "repo")
    image = workdir / "source.img"
    write_ends(image)
    snap = repo.backup(image, "instant/disk").snapshot.id
    target = workdir / "target.qcow2"
    with lab_or_fail(workdir / "lab") as lab, running_agent(config):
        xml = workdir / "domain.xml"
        xml.write_text(domain_xml(lab, "byagent", workdir / "gone.img"))
        argv = [*HYPERBACK, "instant-restore", snap[:12], "--as", lab.name_prefix + "byagent", "--to", target,
                "--format", "qcow2", "--xml", xml, "--agent", config.operator_listen, "--json"]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr
        answer = json.loads(proc.stdout)
        assert answer["state"] == "JOB_STATE_SUCCEEDED", answer
        conn = hypervisor.connect(lab.uri)
        dom = conn.lookupByName(lab.name_prefix + "byagent")
        lab.vms.append(Vm(lab, dom.name(), dom.raw, lab.workdir / "byagent.console.log", True, 0.0))
        with grpc.insecure_channel(config.operator_listen) as channel:
            stub = pb_grpc.OperatorStub(channel)
            jobs = stub.ListJobs(pb.ListJobsRequest(), timeout=30).jobs
        (job,) = [j for j in jobs if j.id == answer["job"]]
        assert job.kind == opb.INSTRUCTION_KIND_INSTANT_RESTORE and job.state == pb.JOB_STATE_SUCCEEDED
        assert job.snapshot == snap and job.domain_uuid == dom.UUIDString()
        assert job.progress.bytes_done == job.progress.bytes_total == GIB
        assert dom.isActive() and [s.get("file") for s in ET.fromstring(dom.XMLDesc(0)).iter("source")
                                   if s.get("file")] == [str(target)]
    flat = workdir / "target.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(target), str(flat)], check=True)
    assert sha256_file(flat) == sha256_file(image)


def test_the_command_recovers_here_from_a_repository_and_returns_once_the_vm_runs_on_its_target(
        workdir: Path) -> None:
    repo, snap, image = snapshot_of_a_gib(workdir)
    target, run = workdir / "here.img", workdir / "run"
    with lab_or_fail(workdir / "lab") as lab:
        xml = workdir / "domain.xml"
        xml.write_text(domain_xml(lab, "here", workdir / "gone.img"))
        name = lab.name_prefix + "here"
        argv = [*HYPERBACK, "instant-restore", "instant/disk@latest", "--as", name, "--to", target,
                "--xml", xml, "--repo", repo.path, "--run-dir", run, "--json"]
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=600)
        finally:  # the lab destroys what the command started, whatever it said
            with contextlib.suppress(errors.NoDomain):
                dom = hypervisor.connect(lab.uri).lookupByName(name)
                lab.vms.append(Vm(lab, name, dom.raw, lab.workdir / "here.console.log", True, 0.0))
        assert proc.returncode == 0, proc.stderr
        answer = json.loads(proc.stdout)
        assert answer["phase"] == "pivoted" and answer["running_after_seconds"] < 60, answer
        assert dom.isActive() and [s.get("file") for s in ET.fromstring(dom.XMLDesc(0)).iter("source")
                                   if s.get("file")] == [str(target)]
        assert not list(run.rglob("*.sock")) and not list(run.rglob("*.qcow2"))
    assert sha256_file(target) == sha256_file(image)


def test_a_cancelled_instant_restore_stops_its_copy_and_leaves_the_vm_on_its_overlay(workdir: Path) -> None:
    config = agent_config_for(workdir / "agent")
    repo = Repository.open(workdir / "agent" / "repo")
    write_ends(workdir / "source.img")
    snap = repo.backup(workdir / "source.img", "instant/disk").snapshot.id
    target = workdir / "cancelled.img"
    with lab_or_fail(workdir / "lab") as lab, running_agent(config), \
            grpc.insecure_channel(config.operator_listen) as channel:
        stub = pb_grpc.OperatorStub(channel)
        xml = domain_xml(lab, "cancel", workdir / "gone.img")
        request = pb.InstantRestoreRequest(snapshot=snap, domain_xml=xml, disk="vda", target=str(target),
                                           bandwidth=1)  # the copy is held: see the module's docstring
        job = stub.InstantRestore(request, timeout=60).job
        try:
            events = stub.WatchJob(pb.WatchJobRequest(job_id=job.id), timeout=300)
            for event in events:  # the copy runs (held): its progress names the whole disk
                assert not event.final, event
                if event.progress.bytes_total == GIB:
                    break
            stub.CancelJob(pb.CancelJobRequest(job_id=job.id), timeout=30)
            last = list(events)[-1]
        finally:
            dom = hypervisor.connect(lab.uri).lookupByName(lab.name_prefix + "cancel")
            lab.vms.append(Vm(lab, dom.name(), dom.raw, lab.workdir / "cancel.console.log", True, 0.0))
        assert last.state == pb.JOB_STATE_CANCELLED and "keeps running on the overlay" in last.message, last
        assert dom.isActive() and not target.exists()
        disk = ET.fromstring(dom.XMLDesc(0)).find("./devices/disk")
        assert disk is not None and disk.find("mirror") is None
        assert "overlay.qcow2" in ET.tostring(disk, encoding="unicode")
        lab.vms[-1].destroy()  # before the agent stops: its export then goes with it
