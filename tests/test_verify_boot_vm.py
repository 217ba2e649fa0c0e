"""Every backup proven by booting it: ``hyperback verify-boot`` boots a snapshot of a real Debian
guest in a sandbox (no NIC, a throwaway overlay over the snapshot's NBD export, the verifier's own
channel) and records the verdict on the snapshot.

The guest (host_agent/lab/debian.py) boots once to install the shim's zipapp and its unit, with a
check command it allows, and powers off; its disk is backed up as ``<domain uuid>/hb-root``. The
domain is defined in libvirt (shut off), and verify-boot takes its definition from there (the
repository keeps none yet). A copy of the disk whose root file system's first 4 MiB are zeroed
(superblock and group descriptors) is backed up as a second snapshot of the same disk: it must
fail, with the reason and the console text kept. Nothing may be left: no sandbox domain, no
overlay, no export.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import pytest
from agent_harness import agent_config_for, running_agent
from conftest import lab_or_fail

from host_agent.agent.bootverify import SANDBOX_PREFIX
from host_agent.cli import shim_cmd
from host_agent.config import Schedule
from host_agent.lab import Lab, debian
from host_agent.storage.repository import Repository

pytestmark = [pytest.mark.vm, pytest.mark.slow]

SERIAL = "hb-root"
HEALTH = "cat /etc/hb-health"

INSTALL = f"""
set -eu
install -m 0755 hyperback-shim.pyz /usr/local/lib/hyperback-shim.pyz
python3 -I /usr/local/lib/hyperback-shim.pyz install-service
mkdir -p /etc/hyperback
printf '[shim]\\ncheck_commands = {HEALTH}\\n' > /etc/hyperback/shim.conf
echo healthy > /etc/hb-health
# the lab's runner would power the sandbox off for want of its command disk
rm /etc/systemd/system/multi-user.target.wants/hb-lab-run.service
sync
echo INSTALLED
"""


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    path = Path("/var/tmp") / f"hb-verify-boot-{uuid.uuid4().hex[:8]}"
    path.mkdir(parents=True)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def lab(workdir: Path) -> Iterator[Lab]:
    with lab_or_fail(workdir / "lab") as the_lab:
        yield the_lab


@pytest.fixture(scope="module")
def guest(lab: Lab, workdir: Path) -> Iterator[tuple[str, Path]]:
    """The domain's UUID (defined, shut off) and a raw copy of its disk with the shim installed."""
    commands = workdir / "commands"
    commands.mkdir()
    shim_cmd.build_zipapp(commands)
    (commands / "run.sh").write_text(INSTALL)
    root = debian.overlay(debian.build_image(), workdir / "root.qcow2")
    vm = debian.start_debian_vm(lab, "verify-src", root=root,
                                commands=debian.command_disk(commands, workdir / "commands.img"))
    assert vm.wait_for_exit(timeout=300) == 0, vm.console_tail()
    disk = workdir / "root.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(root), str(disk)], check=True)
    domain_uuid = str(uuid.uuid4())
    definition = ET.parse(lab.workdir / f"{vm.name}.xml").getroot()
    ET.SubElement(definition, "uuid").text = domain_uuid
    definition.find("name").text = f"{lab.name_prefix}verify-{domain_uuid[:8]}"  # type: ignore[union-attr]
    vda = definition.find("./devices/disk/target[@dev='vda']/..")
    assert vda is not None
    ET.SubElement(vda, "serial").text = SERIAL
    dom = lab.conn.defineXML(ET.tostring(definition, encoding="unicode"))
    try:
        yield domain_uuid, disk
    finally:
        dom.undefine()


def run(*args: object, check: bool = True) -> subprocess.CompletedProcess[str]:
    """The real ``hyperback`` command, as a user runs it."""
    proc = subprocess.run([sys.executable, "-m", "host_agent.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=900)
    assert not check or proc.returncode == 0, proc.stderr
    return proc


def leftovers(lab: Lab, work: Path) -> list[str]:
    """Sandbox domains, files in the work folder, nbdkit processes serving from it."""
    found = [d.name() for d in lab.conn.listAllDomains(0) if d.name().startswith(SANDBOX_PREFIX)]
    found += [str(p) for p in work.rglob("*")] if work.exists() else []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "nbdkit" in text.split(" ")[0] and str(work) in text:
            found.append(text)
    return found


def verify_boot(repo: Path, work: Path, snapshot: str, *extra: str) -> tuple[int, dict[str, object]]:
    proc = run("verify-boot", "--repo", repo, "--work-dir", work, "--json", *extra, snapshot, check=False)
    assert proc.returncode in (0, 4), proc.stderr
    doc: dict[str, object] = json.loads(proc.stdout)
    return proc.returncode, doc


def test_a_good_snapshot_boots_and_is_marked_passed_with_its_console_kept(
        lab: Lab, guest: tuple[str, Path], workdir: Path) -> None:
    domain_uuid, disk = guest
    repo = Repository.init(workdir / "repo-good")
    snap = repo.backup(disk, f"{domain_uuid}/{SERIAL}").snapshot
    work = workdir / "work-good"
    code, record = verify_boot(repo.path, work, snap.id, "--check", HEALTH, "--timeout", "240")
    assert code == 0 and record["result"] == "passed", record
    assert record["check"] == {"command": ["cat", "/etc/hb-health"], "exit": 0, "output": "healthy"}
    assert "the shim answered" in str(record["reason"])
    console = (repo.console_text(snap.id) or b"").decode(errors="replace")
    assert "Linux version" in console and "hyperback" in console.lower(), console[-2000:]
    listed = json.loads(run("list", "--repo", repo.path, "--json").stdout)
    assert listed[0]["verification"]["result"] == "passed"
    assert leftovers(lab, work) == []
    print(f"\nverify-boot passed in {record['seconds']} s: {record['reason']}")


def test_a_snapshot_whose_root_file_system_was_damaged_is_marked_failed_with_reason_and_console(
        lab: Lab, guest: tuple[str, Path], workdir: Path) -> None:
    domain_uuid, disk = guest
    damaged = workdir / "damaged.raw"
    shutil.copyfile(disk, damaged)
    with open(damaged, "r+b") as f:
        f.write(bytes(4 << 20))
        os.fsync(f.fileno())
    repo = Repository.init(workdir / "repo-damaged")
    snap = repo.backup(damaged, f"{domain_uuid}/{SERIAL}").snapshot
    work = workdir / "work-damaged"
    code, record = verify_boot(repo.path, work, snap.id, "--timeout", "240")
    assert code == 4 and record["result"] == "failed", record
    reason = str(record["reason"])
    assert "/dev/vda does not exist" in reason, reason  # the initramfs's own words, quoted
    console = (repo.console_text(snap.id) or b"").decode(errors="replace")
    assert "Linux version" in console, console[-2000:]
    assert repo.verifications()[snap.id].console_kept == len(repo.console_text(snap.id) or b"")
    listed = run("list", "--repo", repo.path).stdout.splitlines()
    assert listed[1].split()[-2] == "failed"
    assert leftovers(lab, work) == []
    print(f"\nverify-boot failed in {record['seconds']} s: {reason}")



def test_a_verify_schedule_boots_the_latest_snapshot_while_the_agent_serves_its_domains(
        lab: Lab, guest: tuple[str, Path], workdir: Path) -> None:
    """The agent fires a verify schedule: the sandbox's channel is the verifier's, not the agent's
    (else the shim's answer would never reach the verifier), and the domain's boot check runs."""
    domain_uuid, disk = guest
    work = workdir / "work-scheduled"
    schedule = Schedule("proof", "0 5 * * 0", domains=(domain_uuid,), kind="verify")
    config = agent_config_for(workdir / "agent", schedules=(schedule,), verify_dir=work, boot_timeout=240.0,
                              boot_checks={domain_uuid: tuple(HEALTH.split())})
    repo = Repository.open(config.repositories["default"])
    older = repo.backup(disk, f"{domain_uuid}/{SERIAL}").snapshot
    latest = repo.backup(disk, f"{domain_uuid}/{SERIAL}").snapshot
    with running_agent(config) as running:
        scheduler = running.agent.scheduler
        firing = running.run(scheduler.run_now("proof"))
        running.run(scheduler.drain())
    assert firing.skipped == [] and len(firing.verified) == 1, firing
    assert f"snapshot {latest.id} passed" in firing.verified[0], firing.verified
    records = repo.verifications()
    assert older.id not in records and records[latest.id].check is not None
    assert leftovers(lab, work) == []
