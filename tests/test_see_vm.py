"""A guest sees a snapshot of its own disk, in real VMs: the agent hot-plugs the snapshot's NBD
export read-only, the shim mounts it read-only, and every end of it -- release, the time limit,
the VM stopping, an agent that died -- leaves nothing attached, running or on disk."""
from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from agent_harness import RunningAgent, agent_config_for, running_agent
from conftest import lab_or_fail

from host_agent.agent.snapshot_disks import SnapshotDisks
from host_agent.lab import Disk, Lab, Vm, make_disk
from host_agent.model import Policy
from host_agent.storage.repository import Repository

pytestmark = pytest.mark.vm

REPO = Path(__file__).resolve().parents[1]  # the guest sees this checkout over 9p
SHIM = f"PYTHONPATH={REPO} {sys.executable} -m guest_shim"
MIB = 1024 * 1024
SNAPSHOT_OF = r's/.*"snapshot": *"\([^"]*\)".*/\1/p'
SERIAL_OF = r's/.*"serial": *"\(hbsee-[^"]*\)".*/\1/p'


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    # Outside /tmp: the guest sees the host's root (and so this folder), but its own /tmp.
    path = Path("/var/tmp") / f"hb-see-vm-{uuid.uuid4().hex[:8]}"
    path.mkdir(parents=True)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def lab(workdir: Path) -> Iterator[Lab]:
    with lab_or_fail(workdir / "lab", max_running=2) as the_lab:
        yield the_lab


@pytest.fixture(scope="module")
def agent(workdir: Path, lab: Lab) -> Iterator[RunningAgent]:
    with running_agent(agent_config_for(workdir / "agent", interval=1.0)) as running:
        yield running


def line_json(console: str, marker: str) -> dict[str, object]:
    match = re.search(rf"^{marker} (\{{.*\}})$", console, re.MULTILINE)
    assert match, f"no {marker} line on the console:\n{console[-3000:]}"
    doc: dict[str, object] = json.loads(match.group(1))
    return doc


def wait_until(condition: object, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"not within {timeout:g} s: {what}"
        time.sleep(0.1)


def servers_of(run_dir: Path) -> list[int]:
    """Processes serving anything from the agent's snapshot-disk folder (their command line names it)."""
    needle = os.fsencode(str(run_dir / "snapshot-disks"))
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and needle in (proc / "cmdline").read_bytes():
                found.append(int(proc.name))
        except OSError:
            continue
    return found


def leftovers(agent: RunningAgent, workdir: Path) -> list[str]:
    """Everything a lease could leave behind: the agent's record, files, NBD servers."""
    run_dir = workdir / "agent" / "run"
    left = [f"lease {s}" for s in agent.call(lambda: list(agent.agent.snapshot_disks.leases))]
    folder = run_dir / "snapshot-disks"
    left += [f"file {p}" for p in folder.iterdir()] if folder.exists() else []
    left += [f"process {pid}" for pid in servers_of(run_dir)]
    return left


def nbd_disks(vm: Vm) -> list[str]:
    """The serials of the network disks in the domain's live XML (none once every lease ended)."""
    if not vm.is_active():
        return []
    return [d.findtext("serial") or "?" for d in vm.xml().findall("./devices/disk[@type='network']")]


def go(workdir: Path, name: str) -> str:
    """A guest line that waits for the test to say go (a file the guest sees over 9p)."""
    return f"while [ ! -e {workdir}/go-{name} ]; do sleep 0.2; done"


def test_a_guest_sees_its_old_file_read_only_and_releases_it(agent: RunningAgent, lab: Lab,
                                                            workdir: Path) -> None:
    disk = make_disk(workdir / "seer.qcow2", 64 * MIB, "qcow2")
    script = f"""
        mkfs.ext4 -q -F /dev/vda && mkdir -p /tmp/data && mount /dev/vda /tmp/data || exit 9
        head -c 3145728 /dev/urandom > /tmp/data/old && sync
        echo "OLD $(sha256sum < /tmp/data/old | cut -d' ' -f1)"
        out=$({SHIM} backup --json --policy full hb-seer); echo "BACKUP $out"
        snap=$(echo "$out" | sed -n '{SNAPSHOT_OF}')
        head -c 3145728 /dev/urandom > /tmp/data/old; echo later > /tmp/data/later; sync
        t0=$(date +%s%N)
        {SHIM} list hb-seer > /dev/null
        echo "LIST-MS $(( ($(date +%s%N) - t0) / 1000000 ))"
        t0=$(date +%s%N)
        out=$({SHIM} see --json "$snap" --disk hb-seer --mount /tmp/seen); echo "SEE $out"
        echo "SEE-MS $(( ($(date +%s%N) - t0) / 1000000 ))"
        serial=$(echo "$out" | sed -n '{SERIAL_OF}')
        echo "SEEN $(sha256sum < /tmp/seen/old | cut -d' ' -f1)"
        [ -e /tmp/seen/later ] && echo "LATER present" || echo "LATER absent"
        touch /tmp/seen/new 2>/dev/null && echo "FILE-WRITE ok" || echo "FILE-WRITE refused"
        dev=$(grep -lx "$serial" /sys/block/*/serial | cut -d/ -f4)
        echo "RO $(cat /sys/block/$dev/ro)"
        dd if=/dev/zero of=/dev/$dev bs=4096 count=1 oflag=direct 2>/dev/null \\
            && echo "DISK-WRITE ok" || echo "DISK-WRITE refused"
        t0=$(date +%s%N)
        echo "RELEASE $({SHIM} release --json "$serial")"
        echo "RELEASE-MS $(( ($(date +%s%N) - t0) / 1000000 ))"
        echo "GONE $(grep -lx "$serial" /sys/block/*/serial 2>/dev/null | wc -l)"
        {go(workdir, "seer")}
    """
    vm = lab.start_vm("seer", command=script, disks=[Disk(disk, "vda", "qcow2", "hb-seer")], timeout=180)
    try:
        vm.wait_for_console(r"^GONE \d+$", timeout=300)
        console = vm.console()
        seen = line_json(console, "SEE")
        assert seen["ok"] is True and seen["mount"] == "/tmp/seen", seen
        assert re.search(r"^OLD (\w+)$", console, re.M).group(1) == re.search(  # type: ignore[union-attr]
            r"^SEEN (\w+)$", console, re.M).group(1), "the seen file differs from the backed-up one"
        for line in ("LATER absent", "FILE-WRITE refused", "RO 1", "DISK-WRITE refused", "GONE 0"):
            assert re.search(rf"^{line}$", console, re.M), f"no {line!r}:\n{console[-2500:]}"
        assert line_json(console, "RELEASE")["ok"] is True
        timings = dict(re.findall(r"^(LIST|SEE|RELEASE)-MS (\d+)$", console, re.M))
        print(f"guest-timed: list (the shim's round trip alone) {timings.get('LIST')} ms, see (+ export, "
              f"attach, hotplug, mount) {timings.get('SEE')} ms, release (+ unmount, unplug) "
              f"{timings.get('RELEASE')} ms")
        # while the VM still runs: no such disk in its live XML, nothing left on the host
        assert nbd_disks(vm) == []
        assert leftovers(agent, workdir) == []
    finally:
        (workdir / "go-seer").touch()
    assert vm.wait_for_exit(timeout=120) == 0, vm.console_tail()


def test_a_guest_cannot_see_another_vms_snapshot(agent: RunningAgent, lab: Lab, workdir: Path) -> None:
    # another VM's disk, with the same serial as this guest's own: only the domain UUID differs
    other = make_disk(workdir / "other.raw", 4 * MIB)
    repo = Repository.open(workdir / "agent" / "repo")
    theirs = repo.backup(other, f"{uuid.uuid4()}/hb-nosy", Policy.FULL).snapshot.id
    disk = make_disk(workdir / "nosy.qcow2", 16 * MIB, "qcow2")
    script = f"""
        {SHIM} see --json {theirs} --disk hb-nosy; echo "THEIRS $?"
        {SHIM} see --json latest --disk hb-nosy; echo "NONE-YET $?"
        {SHIM} see --json latest --disk hb-someone-else; echo "NOT-MINE $?"
        {SHIM} see --json ../../etc/shadow --disk hb-nosy; echo "PATH $?"
        {SHIM} release --json hbsee-00000000; echo "RELEASE-OTHER $?"
    """
    vm = lab.start_vm("nosy", command=script, disks=[Disk(disk, "vda", "qcow2", "hb-nosy")], timeout=180)
    assert vm.wait_for_exit(timeout=240) == 0, vm.console_tail()
    console = vm.console()
    answers = [json.loads(line) for line in re.findall(r'^(\{"ok": false.*\})$', console, re.M)]
    assert [a["error"].get("code") for a in answers] == [
        "unknown-snapshot", "unknown-snapshot", "unknown-disk", None, "unknown-disk"], answers
    assert f"no snapshot {theirs!r}" in answers[0]["error"]["message"]
    assert "back it up first" in answers[1]["error"]["message"]
    for marker, code in (("THEIRS", 3), ("NONE-YET", 3), ("NOT-MINE", 3), ("PATH", 2), ("RELEASE-OTHER", 3)):
        assert re.search(rf"^{marker} {code}$", console, re.M), f"{marker}: exit {code}?\n{console[-2500:]}"
    assert leftovers(agent, workdir) == []


def start_seeing(lab: Lab, workdir: Path, name: str) -> Vm:
    """A guest that backs its disk up, sees the snapshot, says SEEING and waits (for ever)."""
    disk = make_disk(workdir / f"{name}.qcow2", 16 * MIB, "qcow2")
    script = f"""
        head -c 1048576 /dev/urandom > /dev/vda && sync
        {SHIM} backup --json --policy full hb-{name} > /dev/null || exit 8
        echo "SEE $({SHIM} see --json latest --disk hb-{name})"
        echo SEEING
        {go(workdir, name)}
    """
    vm = lab.start_vm(name, command=script, disks=[Disk(disk, "vda", "qcow2", f"hb-{name}")], timeout=180)
    vm.wait_for_console(r"^SEEING$", timeout=300)
    assert line_json(vm.console(), "SEE")["ok"] is True, vm.console_tail()
    return vm


def test_a_vm_stopped_while_seeing_leaves_nothing_behind(agent: RunningAgent, lab: Lab,
                                                         workdir: Path) -> None:
    vm = start_seeing(lab, workdir, "stopped")
    try:
        assert len(nbd_disks(vm)) == 1 and servers_of(workdir / "agent" / "run")
    finally:
        vm.destroy()
    wait_until(lambda: leftovers(agent, workdir) == [], "the export of a stopped VM's seen snapshot stops")


def test_the_time_limit_takes_a_seen_snapshot_back(agent: RunningAgent, lab: Lab, workdir: Path) -> None:
    disks = agent.agent.snapshot_disks
    agent.call(lambda: setattr(disks, "time_limit", 5.0))
    try:
        vm = start_seeing(lab, workdir, "expiring")
    finally:
        agent.call(lambda: setattr(disks, "time_limit", 3600.0))
    try:
        expires = line_json(vm.console(), "SEE")["expires"]
        assert isinstance(expires, float) and expires <= time.time() + 5.0
        wait_until(lambda: nbd_disks(vm) == [] and leftovers(agent, workdir) == [],
                   "the seen snapshot is unplugged and its export stopped at its time limit", 120)
    finally:
        (workdir / "go-expiring").touch()
    assert vm.wait_for_exit(timeout=120) == 0, vm.console_tail()


def test_an_agent_that_died_leaves_nothing_once_it_starts_again(agent: RunningAgent, lab: Lab,
                                                                workdir: Path) -> None:
    vm = start_seeing(lab, workdir, "orphan")
    disks = agent.agent.snapshot_disks
    # the process objects a killed agent would have lost with it; kept here only to reap the
    # processes in the end (this test process started them)
    orphans = agent.call(lambda: list(disks._exports.values()))

    def die() -> None:  # what a killed agent leaves: its lease files, the export, the plugged disk
        disks.leases.clear()
        disks._exports.clear()
        for timer in disks._timers.values():
            timer.cancel()
        disks._timers.clear()

    try:
        agent.call(die)
        assert len(nbd_disks(vm)) == 1 and servers_of(workdir / "agent" / "run")
        config = agent.agent.config
        again = SnapshotDisks(agent.agent.domains, agent.agent.destinations, config.run_dir,
                              time_limit=60, per_vm=2)
        ended = again.recover()
        assert len(ended) == 1 and "ended lease hbsee-" in ended[0], ended
        assert nbd_disks(vm) == [] and leftovers(agent, workdir) == []
    finally:
        (workdir / "go-orphan").touch()
        for export in orphans:
            export.stop()
    assert vm.wait_for_exit(timeout=120) == 0, vm.console_tail()
