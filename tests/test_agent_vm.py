"""End to end in real VMs: a guest application asks for a backup through the shim, over
virtio-serial; the agent's driver batches it, the optimizer plans it over gRPC, the executor
reads the disk from shared storage and answers the guest."""
from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from agent_harness import RunningAgent, agent_config_for, running_agent

from host_agent.hostload import HostLoadReader
from host_agent.jobs import JobState
from host_agent.lab import Disk, HostNotReady, Lab, make_disk
from host_agent.repository import Repository

pytestmark = pytest.mark.vm

REPO = Path(__file__).resolve().parents[1]  # the guest sees this checkout over 9p
SHIM = f"PYTHONPATH={REPO} {sys.executable} -m guest_shim"
MIB = 1024 * 1024


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    # Outside /tmp: the guest sees the host's root, but its own /tmp.
    path = Path("/var/tmp") / f"hb-agent-vm-{uuid.uuid4().hex[:8]}"
    path.mkdir(parents=True)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def lab(workdir: Path) -> Iterator[Lab]:
    if os.geteuid() != 0:
        pytest.fail("real-VM tests need root (deselect them with -m 'not vm')")
    if REPO.is_relative_to("/tmp"):
        pytest.fail(f"the checkout {REPO} is under /tmp, which guests do not see: move it elsewhere")
    the_lab = Lab(workdir / "lab", max_running=2)
    try:
        the_lab.__enter__()
    except HostNotReady as e:
        pytest.fail(f"host not prepared: run host_agent/lab/setup_host.sh ({e})")
    try:
        yield the_lab
    finally:
        the_lab.close()


@pytest.fixture(scope="module")
def agent(workdir: Path, lab: Lab) -> Iterator[RunningAgent]:
    with running_agent(agent_config_for(workdir / "agent", interval=1.0)) as running:
        yield running


def guest_json(console: str, marker: str) -> dict[str, object]:
    match = re.search(rf"{marker} (\{{.*\}})", console)
    assert match, f"no {marker} line on the console:\n{console[-3000:]}"
    doc: dict[str, object] = json.loads(match.group(1))
    return doc


def backup_round_trip(lab: Lab, workdir: Path, name: str) -> None:
    """A guest writes a pattern and asks for a backup; the host restores it and finds the pattern."""
    disk = make_disk(workdir / f"{name}.qcow2", 64 * MIB, "qcow2")
    script = f"""
        dd if=/dev/urandom of=/tmp/pattern bs=1M count=4 2>/dev/null
        dd if=/tmp/pattern of=/dev/vda bs=1M seek=8 conv=fsync 2>/dev/null
        echo "PATTERN $(sha256sum /tmp/pattern | cut -d' ' -f1)"
        out=$({SHIM} backup --json --policy full hb-data)
        echo "BACKUP $out"
    """
    vm = lab.start_vm(name, command=script, disks=[Disk(disk, "vda", "qcow2", "hb-data")], timeout=180)
    assert vm.wait_for_exit(timeout=240) == 0, vm.console_tail()
    console = vm.console()
    result = guest_json(console, "BACKUP")
    assert result["ok"] is True, result
    pattern = re.search(r"PATTERN ([0-9a-f]{64})", console)
    assert pattern
    disks = result["disks"]
    assert isinstance(disks, list) and len(disks) == 1
    snapshot_id = disks[0]["snapshot"]

    repo = Repository.open(workdir / "agent" / "repo")
    restored = workdir / f"{name}.restored"
    repo.restore(snapshot_id, restored)
    with open(restored, "rb") as f:
        f.seek(8 * MIB)
        assert hashlib.sha256(f.read(4 * MIB)).hexdigest() == pattern.group(1)
    restored.unlink()


def test_a_guest_backup_request_is_served_from_shared_storage(agent: RunningAgent, lab: Lab,
                                                               workdir: Path) -> None:
    backup_round_trip(lab, workdir, "e2e-backup")
    # the request crossed as a request: the driver flushed it and the plan came from gRPC
    flushes = agent.call(lambda: list(agent.agent.driver.flushes))
    assert flushes and flushes[0].planned_at > 0


def qemu_img(*args: str) -> None:
    subprocess.run(["qemu-img", *args], check=True, capture_output=True)


def raw_of(image: Path, out: Path) -> str:
    qemu_img("convert", "-O", "raw", str(image), str(out))
    digest = hashlib.sha256(out.read_bytes()).hexdigest()
    out.unlink()
    return digest


def test_two_vms_on_clones_of_one_base_read_the_base_once(agent: RunningAgent, lab: Lab,
                                                          workdir: Path) -> None:
    base_raw = workdir / "base.raw"
    base_raw.write_bytes(os.urandom(24 * MIB) + bytes(8 * MIB))
    base = workdir / "base.qcow2"
    qemu_img("convert", "-f", "raw", "-O", "qcow2", str(base_raw), str(base))
    base_raw.unlink()
    clones = []
    for name in ("clone-a", "clone-b"):
        clone = workdir / f"{name}.qcow2"
        qemu_img("create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(clone))
        clones.append(clone)
    agent.call(lambda: setattr(agent.agent.driver, "interval", 30.0))
    script = f"""
        dd if=/dev/urandom of=/dev/vda bs=64K seek=3 count=2 conv=fsync 2>/dev/null
        echo "BACKUP $({SHIM} backup --json --policy full hb-data)"
    """
    try:
        vms = [lab.start_vm(f"clone{i}", command=script, disks=[Disk(clone, "vda", "qcow2", "hb-data")],
                            timeout=180) for i, clone in enumerate(clones)]
        results = []
        for vm in vms:
            assert vm.wait_for_exit(timeout=300) == 0, vm.console_tail()
            results.append(guest_json(vm.console(), "BACKUP"))
    finally:
        agent.call(lambda: setattr(agent.agent.driver, "interval", 1.0))
    assert all(r["ok"] for r in results), results
    reads = agent.call(lambda: dict(agent.agent.executor.reads))
    assert reads.get(str(base)) == 1, reads  # the shared base was read once, for both
    repo = Repository.open(workdir / "agent" / "repo")
    bases = [s for s in repo.snapshots() if s.name.startswith("base/")]
    assert len(bases) == 1
    for result, clone in zip(results, clones, strict=True):
        snapshot_id = result["disks"][0]["snapshot"]  # type: ignore[index]
        snap = repo.resolve(snapshot_id)
        assert snap.parent == bases[0].id
        assert snap.stats.bytes_read <= 2 * MIB  # only the clone's own clusters
        restored = workdir / f"{clone.stem}.restored"
        repo.restore(snapshot_id, restored)
        assert hashlib.sha256(restored.read_bytes()).hexdigest() == raw_of(clone, workdir / "expect.raw")
        restored.unlink()


def test_a_busy_filesystem_is_frozen_for_the_view_and_restores_clean(agent: RunningAgent, lab: Lab,
                                                                      workdir: Path) -> None:
    disk = make_disk(workdir / "busy.qcow2", 64 * MIB, "qcow2")
    script = f"""
        mkfs.ext4 -q -F /dev/vda && mkdir -p /tmp/data && mount /dev/vda /tmp/data || exit 9
        ( i=0; while :; do dd if=/dev/urandom of=/tmp/data/f$((i % 40)) bs=64k count=8 conv=fsync 2>/dev/null;
          i=$((i + 1)); done ) &
        writer=$!
        sleep 2
        echo "BACKUP $({SHIM} backup --json --policy full hb-busy)"
        kill $writer; wait $writer 2>/dev/null
        umount /tmp/data
    """
    vm = lab.start_vm("busy", command=script, disks=[Disk(disk, "vda", "qcow2", "hb-busy")], timeout=180)
    assert vm.wait_for_exit(timeout=300) == 0, vm.console_tail()
    result = guest_json(vm.console(), "BACKUP")
    assert result["ok"] is True and result["quiesced"] is True, result
    repo = Repository.open(workdir / "agent" / "repo")
    restored = workdir / "busy.restored"
    repo.restore(result["disks"][0]["snapshot"], restored)  # type: ignore[index]
    fsck = subprocess.run(["e2fsck", "-n", "-f", str(restored)], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    restored.unlink()


HOSTILE_GUEST = r'''
import glob, json, os, select, sys, time
sys.path.insert(0, {repo!r})
from guest_shim import protocol as p

name = next(path for path in glob.glob("/sys/class/virtio-ports/*/name")
            if open(path).read().strip() == "org.hyperback.agent.0")
fd = os.open("/dev/" + name.split("/")[-2], os.O_RDWR | os.O_NONBLOCK)
reader = p.MessageReader(p.Direction.TO_GUEST)

def send(data):
    while data:
        select.select([], [fd], [], 10)
        try:
            data = data[os.write(fd, data[:32768]):]
        except BlockingIOError:
            pass

def replies(until, timeout=20):
    got, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline and not until(got):
        if select.select([fd], [], [], 0.5)[0]:
            try:
                data = os.read(fd, 65536)
            except BlockingIOError:
                continue
            got += [m for m in reader.feed(data) if not isinstance(m, p.ProtocolError)]
    return got

def sync():
    sid = p.new_sync_id()
    send(p.sync_frame(sid))
    got = replies(lambda g: any(isinstance(m, p.SyncAck) and m.id == sid for m in g))
    return any(isinstance(m, p.SyncAck) and m.id == sid for m in got)

def ask(line, rid):
    send(line)
    got = replies(lambda g: any(getattr(m, "id", None) == rid for m in g), 30)
    found = [m for m in got if getattr(m, "id", None) == rid]
    return found[0].to_wire() if found else None

report = {}
send(os.urandom(5000))                                     # garbage
report["sync_after_garbage"] = sync()
send(b"x" * 200000 + b"\n")                                # oversized line
report["sync_after_oversize"] = sync()
report["other_vms_disk"] = ask(b'{"v":1,"type":"backup","id":1,"targets":["hb-data"],"policy":"full"}\n', 1)
report["host_path"] = ask(b'{"v":1,"type":"backup","id":2,"targets":["hb-hostile"],"policy":"full",'
                          b'"destination":"../../etc"}\n', 2)
report["unknown_member"] = ask(b'{"v":1,"type":"list","id":3,"path":"/etc/shadow"}\n', 3)
report["newer_version"] = ask(b'{"v":9,"type":"list","id":4}\n', 4)
report["in_place_restore"] = ask(b'{"v":1,"type":"restore","id":5,"target":"hb-hostile","snapshot":"latest",'
                                 b'"mode":"in-place"}\n', 5)
report["list"] = ask(b'{"v":1,"type":"list","id":6}\n', 6)
for i in range(40):                                        # a flood
    send(('{"v":1,"type":"status","id":%d,"job":"0000000000000000"}\n' % (100 + i)).encode())
def flood_answers(got):
    return [m for m in got if isinstance(getattr(m, "id", None), int) and m.id >= 100]
flood = flood_answers(replies(lambda g: len(flood_answers(g)) >= 40))
report["flood_codes"] = sorted({m.to_wire().get("code", m.to_wire()["type"]) for m in flood})
print("HOSTILE " + json.dumps(report), flush=True)
'''


def test_a_hostile_guest_gets_clear_rejections_and_the_agent_keeps_serving(agent: RunningAgent, lab: Lab,
                                                                            workdir: Path) -> None:
    disk = make_disk(workdir / "hostile.raw", 16 * MIB)
    script = f"{sys.executable} -c {shlex.quote(HOSTILE_GUEST.replace('{repo!r}', repr(str(REPO))))}"
    vm = lab.start_vm("hostile", command=script, disks=[Disk(disk, "vda", "raw", "hb-hostile")], timeout=180)
    assert vm.wait_for_exit(timeout=300) == 0, vm.console_tail()
    report = guest_json(vm.console(), "HOSTILE")
    assert report["sync_after_garbage"] is True and report["sync_after_oversize"] is True
    assert report["other_vms_disk"]["code"] == "unknown-disk"  # type: ignore[index]
    assert report["host_path"]["code"] == "bad-request"  # type: ignore[index]
    assert report["unknown_member"]["code"] == "bad-request"  # type: ignore[index]
    assert report["newer_version"]["code"] == "unsupported-version"  # type: ignore[index]
    assert report["in_place_restore"]["code"] == "unsupported"  # type: ignore[index]
    assert "new-disk" in report["in_place_restore"]["message"]  # type: ignore[index]
    assert report["list"]["type"] == "snapshots"  # type: ignore[index]
    assert "rate-limited" in report["flood_codes"]  # type: ignore[operator]
    # the agent keeps serving: another VM's backup goes through as before
    backup_round_trip(lab, workdir, "after-hostile")


def test_work_waits_while_the_host_is_busy_and_runs_when_it_calms_down(agent: RunningAgent, lab: Lab,
                                                                       workdir: Path) -> None:
    disk = make_disk(workdir / "patient.qcow2", 32 * MIB, "qcow2")
    burners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(4)]
    try:
        time.sleep(12)  # CPU pressure is a 10 s average
        agent.call(lambda: setattr(agent.agent, "load_reader", HostLoadReader()))
        vm = lab.start_vm("patient", command=f"echo \"BACKUP $({SHIM} backup --json --policy full)\"",
                          disks=[Disk(disk, "vda", "qcow2", "hb-patient")], timeout=180)
        deadline = time.monotonic() + 120
        deferred = []
        while time.monotonic() < deadline and not deferred:
            jobs = agent.call(lambda: [j for j in agent.agent.jobs.all()
                                       if j.domain_name.endswith("patient")])
            deferred = [e.message for j in jobs for e in j.events if e.state is JobState.DEFERRED]
            time.sleep(0.5)
        assert deferred, "the busy host did not defer the backup"
        assert "busy" in deferred[0] or "pressure" in deferred[0] or "load" in deferred[0], deferred[0]
    finally:
        for burner in burners:
            burner.kill()
            burner.wait()
    try:
        assert vm.wait_for_exit(timeout=300) == 0, vm.console_tail()
    finally:
        agent.call(lambda: setattr(agent.agent, "load_reader", None))
    assert guest_json(vm.console(), "BACKUP")["ok"] is True
