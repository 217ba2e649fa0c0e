"""Whole-VM restore with real VMs: a backed-up domain comes back as a new domain that boots and
whose guest reaches the agent, and in place over the disks of the stopped original.

The guest's command runs at every boot of the domain (it is on the kernel command line its stored
definition keeps): on a blank disk it writes a mark and powers off; on a disk with the mark it says
what the disk holds and asks the agent for ``status`` and ``list`` through the shim.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from agent_harness import RunningAgent, agent_config_for, running_agent
from conftest import lab_or_fail

from host_agent._proto.hyperback.v1 import operator_pb2, operator_pb2_grpc, optimizer_pb2
from host_agent.cli import main
from host_agent.lab import Disk, Lab, Vm, make_disk
from host_agent.storage.repository import Repository

pytestmark = pytest.mark.vm

REPO = Path(__file__).resolve().parents[1]  # the guest sees this checkout over 9p
SHIM = f"PYTHONPATH={REPO} {sys.executable} -m guest_shim"
MIB = 1024 * 1024
MAC = "52:54:00:5e:00:42"
SCRIPT = f"""
    if dd if=/dev/vda bs=16 count=1 2>/dev/null | grep -q HB-MARK; then
        echo "DISK mark=$(dd if=/dev/vda bs=16 count=1 2>/dev/null) after=$(dd if=/dev/vda bs=1M skip=1 \
count=1 2>/dev/null | head -c 8 | tr -cd 'A-Z')"
        echo "STATUS $({SHIM} status --json 0000000000000000)"
        echo "LIST $({SHIM} list --json)"
    else
        printf 'HB-MARK-original' | dd of=/dev/vda conv=fsync 2>/dev/null
        echo "MARKED"
    fi
"""


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    path = Path("/var/tmp") / f"hb-restorevm-{uuid.uuid4().hex[:8]}"
    path.mkdir(parents=True)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def lab(workdir: Path) -> Iterator[Lab]:
    with lab_or_fail(workdir / "lab", max_running=2) as the_lab:
        yield the_lab


@pytest.fixture(scope="module")
def agent(workdir: Path, lab: Lab) -> Iterator[RunningAgent]:
    with running_agent(agent_config_for(workdir / "agent", interval=0.5)) as running:
        yield running


def guest_line(console: str, marker: str) -> str:
    match = re.search(rf"^{marker} (.*)$", console, re.MULTILINE)
    assert match, f"no {marker} line on the console:\n{console[-3000:]}"
    return match.group(1)


def with_nic(vm: Vm) -> None:
    """Give the shut-off original a NIC with a known MAC (the lab's guests have none)."""
    root = ET.fromstring(vm.domain.XMLDesc(2))  # VIR_DOMAIN_XML_INACTIVE
    devices = root.find("devices")
    assert devices is not None
    devices.append(ET.fromstring(f"<interface type='user'><mac address='{MAC}'/><model type='virtio'/>"
                                 "</interface>"))
    vm.domain.connect().defineXML(ET.tostring(root, encoding="unicode"))


def offline_backup(workdir: Path, domain: str) -> operator_pb2.Job:
    channel = grpc.insecure_channel(f"unix:{workdir}/agent/agent.sock")
    try:
        stub = operator_pb2_grpc.OperatorStub(channel)
        request = operator_pb2.TriggerBackupRequest(domain=domain, policy=optimizer_pb2.POLICY_FULL)
        job = stub.TriggerBackup(request, timeout=30).job
        events = list(stub.WatchJob(operator_pb2.WatchJobRequest(job_id=job.id), timeout=300))
        assert events[-1].state == operator_pb2.JOB_STATE_SUCCEEDED, events
        jobs = stub.ListJobs(operator_pb2.ListJobsRequest(domain=domain), timeout=30).jobs
        done: operator_pb2.Job = next(j for j in jobs if j.id == job.id)
        return done
    finally:
        channel.close()


def assert_agent_answered(status: dict[str, object]) -> None:
    """The shim's status request reached the agent, which knows no such job: its answer, not a
    failure to reach it."""
    error = status.get("error")
    assert isinstance(error, dict) and "no job" in str(error.get("message")), status


def booted_answers(vm: Vm) -> tuple[str, dict[str, object], dict[str, object]]:
    """What the guest says of its disk, and the agent's answers to its status and list requests."""
    assert vm.wait_for_exit(timeout=240) == 0, vm.console_tail()
    console = vm.console()
    status = json.loads(guest_line(console, "STATUS"))
    listed = json.loads(guest_line(console, "LIST"))
    return guest_line(console, "DISK"), status, listed


def test_a_backed_up_vm_comes_back_as_a_new_domain_that_boots_and_in_place_over_its_disks(
        agent: RunningAgent, lab: Lab, workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    disk = make_disk(workdir / "orig.qcow2", 32 * MIB, "qcow2")
    original = lab.start_vm("rvm-orig", command=SCRIPT, disks=[Disk(disk, "vda", "qcow2", "hb-rvm")],
                            persistent=True)
    assert original.wait_for_exit(timeout=240) == 0, original.console_tail()
    assert "MARKED" in original.console()
    with_nic(original)
    job = offline_backup(workdir, original.name)
    repo = Repository.open(workdir / "agent" / "repo")
    (snap,) = [repo.resolve(s) for s in job.snapshot_ids]
    assert snap.vm is not None and job.id in snap.vm.jobs
    # written after the backup: a restore must take it away
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"write -P 0x41 {MIB} 64k", str(disk)], check=True,
                   capture_output=True)

    # as a new domain, from the job's id, to qcow2 images, started
    out = workdir / "copy"
    t0 = time.monotonic()
    assert main(["restore-vm", "--repo", str(workdir / "agent" / "repo"), "--connect", "qemu:///system",
                 "--as", "hbvl-rvm-copy", "--to", str(out), "--format", "qcow2", "--start", "--json",
                 job.id]) == 0
    restored = json.loads(capsys.readouterr().out)
    seconds = time.monotonic() - t0
    conn = original.domain.connect()
    copy_dom = conn.lookupByName("hbvl-rvm-copy")
    console_log = next(out.glob("hbvl-rvm-copy-*console.log"))
    copy = Vm(lab, "hbvl-rvm-copy", copy_dom, console_log, True, time.monotonic())
    lab.vms.append(copy)  # the lab destroys and undefines it with its own
    said, status, listed = booted_answers(copy)
    assert said == "mark=HB-MARK-original after=", said       # the disk as backed up
    assert_agent_answered(status)
    assert listed.get("snapshots") == [], listed               # a new VM to the agent: none of its own
    assert copy_dom.UUIDString() == restored["uuid"] != original.domain.UUIDString()
    copy_xml = ET.fromstring(copy_dom.XMLDesc(2))
    macs = [m.get("address") for m in copy_xml.findall("./devices/interface/mac")]
    assert macs and MAC not in macs
    source = copy_xml.find("./devices/disk/source")
    assert source is not None and source.get("file") == str(out / "hbvl-rvm-copy-vda.qcow2")
    as_new_seconds = seconds

    # in place, over the stopped original's disks: what it wrote after the backup is gone
    uuid_before = original.domain.UUIDString()
    t0 = time.monotonic()
    assert main(["restore-vm", "--repo", str(workdir / "agent" / "repo"), "--connect", "qemu:///system",
                 "--in-place", "--yes-i-want-to-replace-the-disks", "--start", snap.id]) == 0
    seconds = time.monotonic() - t0
    assert "replaced the disks of" in capsys.readouterr().out
    original._console, original._console_bytes = "", 0  # a fresh boot's console
    said, status, listed = booted_answers(original)
    assert said == "mark=HB-MARK-original after=", said
    assert_agent_answered(status)
    assert original.domain.UUIDString() == uuid_before
    kept = ET.fromstring(original.domain.XMLDesc(2))
    assert kept.find(f"./devices/interface/mac[@address='{MAC}']") is not None
    assert [s["id"] for s in listed["snapshots"]] == [snap.id], listed  # type: ignore[index]
    print(f"restore-vm --as (32 MiB qcow2 disk, definition): {as_new_seconds:.2f} s to a started domain; "
          f"--in-place: {seconds:.2f} s")


DEBIAN_SCRIPT = """\
echo "ROOT $(findmnt -no SOURCE /) $(cat /etc/hostname)"
echo "STATUS $(python3 /run/hb-cmd/hyperback-shim.pyz status --json 0000000000000000)"
"""


def test_a_debian_vm_restored_as_a_new_domain_boots_from_its_restored_disk_and_reaches_the_agent(
        agent: RunningAgent, lab: Lab, workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The boot disk matters here: a real Debian guest (systemd, udev) whose root file system is the
    restored image, its original overlay deleted before the copy starts."""
    from xml.sax.saxutils import escape

    from host_agent.cli import shim_cmd
    from host_agent.lab import debian
    from host_agent.lab.domain import DESCRIPTION, EMULATOR, Channel, render_channel, render_disk

    commands = workdir / "deb-commands"
    commands.mkdir()
    shim_cmd.build_zipapp(commands)
    (commands / "run.sh").write_text(DEBIAN_SCRIPT)
    root = debian.overlay(debian.build_image(lab.cache_dir, lab.kernel), workdir / "deb-root.qcow2")
    name = lab.name_prefix + "rvm-debian"
    disks = [Disk(root, "vda", "qcow2", "hb-deb-root"),
             debian.command_disk(commands, workdir / "deb-commands.img")]
    xml = debian.DOMAIN_XML.format(
        name=name, description=escape(DESCRIPTION), memory_mib=384, vcpus=1,
        kernel=escape(str(lab.kernel.image)), initrd=escape(f"/boot/initrd.img-{lab.kernel.version}"),
        emulator=EMULATOR, disks="\n".join(render_disk(d) for d in disks),
        channels=render_channel(Channel()), console_log=escape(str(lab.workdir / f"{name}.console.log")))
    original = Vm(lab, name, lab.conn.defineXML(xml), lab.workdir / f"{name}.console.log", True, 0.0)
    lab.vms.append(original)

    job = offline_backup(workdir, name)  # never booted: read offline, the Debian image through the overlay
    root.unlink()  # the copy must boot from what the repository gave back, nothing else
    t0 = time.monotonic()
    assert main(["restore-vm", "--repo", str(workdir / "agent" / "repo"), "--connect", "qemu:///system",
                 "--as", "hbvl-rvm-debian-copy", "--to", str(workdir / "deb-copy"), "--start", job.id]) == 0
    restore_seconds = time.monotonic() - t0
    capsys.readouterr()
    copy_dom = lab.conn.lookupByName("hbvl-rvm-debian-copy")
    copy = Vm(lab, "hbvl-rvm-debian-copy", copy_dom, next((workdir / "deb-copy").glob("*console.log")), True,
              t0)
    lab.vms.append(copy)
    assert copy.wait_for_exit(timeout=600) == 0, copy.console_tail()
    booted = time.monotonic() - t0
    console = copy.console()
    assert guest_line(console, "ROOT").startswith("/dev/vda"), console[-3000:]
    assert_agent_answered(json.loads(guest_line(console, "STATUS")))
    vda = ET.fromstring(copy_dom.XMLDesc(2)).find("./devices/disk/source")
    assert vda is not None and vda.get("file") == str(workdir / "deb-copy" / "hbvl-rvm-debian-copy-vda.img")
    print(f"Debian VM (2 GiB root): restore-vm --as {restore_seconds:.1f} s, to its shim's answer "
          f"{booted:.1f} s")
