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

import grpc
import pytest
from agent_harness import RunningAgent, agent_config_for, running_agent
from conftest import lab_or_fail
from grpc_health.v1 import health_pb2, health_pb2_grpc

from host_agent._proto.hyperback.v1 import operator_pb2, operator_pb2_grpc, optimizer_pb2
from host_agent.agent.jobs import JobState
from host_agent.config import Limits
from host_agent.lab import Disk, Lab, make_disk
from host_agent.planning.hostload import HostLoadReader
from host_agent.planning.service import OptimizerClient
from host_agent.planning.timing import Timing
from host_agent.storage.repository import Repository

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
    if REPO.is_relative_to("/tmp"):
        pytest.fail(f"the checkout {REPO} is under /tmp, which guests do not see: move it elsewhere")
    with lab_or_fail(workdir / "lab", max_running=2) as the_lab:
        yield the_lab


@pytest.fixture(scope="module")
def agent(workdir: Path, lab: Lab) -> Iterator[RunningAgent]:
    with running_agent(agent_config_for(workdir / "agent", interval=1.0)) as running:
        yield running


def tune(agent: RunningAgent, interval: float, batch_size: int) -> None:
    def change() -> None:
        agent.agent.driver.interval, agent.agent.driver.batch_size = interval, batch_size
    agent.call(change)


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
    # the domain's definition was stored with it, taken while the guest ran (repository-format 5.3)
    vm = repo.resolve(snapshot_id).vm
    assert vm is not None and repo.resolve(vm.definition).name == f"{vm.domain_uuid}/vm/definition"
    restored = workdir / f"{name}.restored"
    repo.restore(snapshot_id, restored)
    with open(restored, "rb") as f:
        f.seek(8 * MIB)
        assert hashlib.sha256(f.read(4 * MIB)).hexdigest() == pattern.group(1)
    restored.unlink()


def test_a_guest_backup_request_is_served_from_shared_storage(agent: RunningAgent, lab: Lab,
                                                               workdir: Path) -> None:
    backup_round_trip(lab, workdir, "e2e-backup")
    # the request crossed as a request: the driver flushed it by interval, the plan came over gRPC
    flushes = agent.call(lambda: list(agent.agent.driver.flushes))
    assert [(f.reason, f.instructions) for f in flushes] == [("interval", 1)] and flushes[0].planned_at > 0


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
    # two requests make a full batch: the driver must flush by size (an interval it never reaches,
    # however long the second guest takes to boot under TCG: only the size can flush)
    tune(agent, interval=3600.0, batch_size=2)
    flushed_before = agent.call(lambda: len(agent.agent.driver.flushes))
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
        tune(agent, interval=1.0, batch_size=10)
    assert all(r["ok"] for r in results), results
    flushes = agent.call(lambda: list(agent.agent.driver.flushes))[flushed_before:]
    assert [(f.reason, f.instructions) for f in flushes] == [("size", 2)]
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
send(b'{"v":1,"type":"frozen","id":99,"job":"x","filesystems":[],"skipped":[]}\n')  # out of order
send(b'{"v":1,"type":"sync-ack","id":5}\n')                                           # wrong direction
send(b'{"v":1,"type":"backup","id":7,"tar' + p.RESET)                                 # truncated
report["replayed"] = [ask(b'{"v":1,"type":"backup","id":8,"targets":["hb-other"],"policy":"full"}\n', 8)
                      for _ in range(2)]
report["quota"] = ask(b'{"v":1,"type":"backup","id":9,"targets":["hb-hostile"],"policy":"full"}\n', 9)
for i in range(40):                                        # a flood
    send(('{"v":1,"type":"status","id":%d,"job":"0000000000000000"}\n' % (100 + i)).encode())
def flood_answers(got):
    return [m for m in got if isinstance(getattr(m, "id", None), int) and m.id >= 100]
flood = flood_answers(replies(lambda g: len(flood_answers(g)) >= 40))
report["flood_codes"] = sorted({m.to_wire().get("code", m.to_wire()["type"]) for m in flood})
print("HOSTILE " + json.dumps(report), flush=True)
'''


ID_TYPES_GUEST = r'''
import glob, json, os, select, sys, time
sys.path.insert(0, {repo!r})
from guest_shim import protocol as p

name = next(path for path in glob.glob("/sys/class/virtio-ports/*/name")
            if open(path).read().strip() == "org.hyperback.agent.0")
fd = os.open("/dev/" + name.split("/")[-2], os.O_RDWR)
reader = p.MessageReader(p.Direction.TO_GUEST)
os.write(fd, p.sync_frame(p.new_sync_id()))
seen = []
def until(done):
    while not done():
        for m in reader.feed(os.read(fd, 65536)):
            if not isinstance(m, (p.ProtocolError, p.SyncAck, p.Progress)):
                seen.append(m.to_wire())
for rid in ('"42"', '42'):
    os.write(fd, b'{"v":1,"type":"backup","id":' + rid.encode() + b',"targets":["hb-ids"],"policy":"full",'
                 b'"quiesce":false}\n')
    until(lambda: any(m["type"] == "result" and json.dumps(m["id"]) == rid for m in seen))
print("IDS " + json.dumps({"replies": [[m["type"], m["id"]] for m in seen]}), flush=True)
'''


def test_a_request_id_comes_back_with_the_json_type_it_was_sent_with(agent: RunningAgent, lab: Lab,
                                                                      workdir: Path) -> None:
    """docs/wire-protocol.md: replies echo the request's id unchanged, "42" as a string, 42 as a number."""
    disk = make_disk(workdir / "ids.raw", 4 * MIB)
    script = f"{sys.executable} -c {shlex.quote(ID_TYPES_GUEST.replace('{repo!r}', repr(str(REPO))))}"
    vm = lab.start_vm("ids", command=script, disks=[Disk(disk, "vda", "raw", "hb-ids")], timeout=180)
    assert vm.wait_for_exit(timeout=300) == 0, vm.console_tail()
    replies = guest_json(vm.console(), "IDS")["replies"]
    assert replies == [["accepted", "42"], ["result", "42"], ["accepted", 42], ["result", 42]], replies


def test_a_hostile_guest_gets_clear_rejections_and_the_agent_keeps_serving(agent: RunningAgent, lab: Lab,
                                                                            workdir: Path) -> None:
    disk = make_disk(workdir / "hostile.raw", 16 * MIB)
    script = f"{sys.executable} -c {shlex.quote(HOSTILE_GUEST.replace('{repo!r}', repr(str(REPO))))}"
    normal = agent.call(lambda: agent.agent.intake.limits)
    agent.call(lambda: setattr(agent.agent.intake, "limits", Limits(pending_per_vm=0)))
    try:
        vm = lab.start_vm("hostile", command=script, disks=[Disk(disk, "vda", "raw", "hb-hostile")],
                          timeout=180)
        assert vm.wait_for_exit(timeout=300) == 0, vm.console_tail()
    finally:
        agent.call(lambda: setattr(agent.agent.intake, "limits", normal))
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
    assert [r["code"] for r in report["replayed"]] == ["unknown-disk", "unknown-disk"]  # type: ignore[index,union-attr]
    assert report["quota"]["code"] == "quota"  # type: ignore[index]
    # the agent keeps serving: another VM's backup goes through as before
    backup_round_trip(lab, workdir, "after-hostile")


def wait_for_load(timing: Timing, busy: bool, timeout: float) -> float:
    """Until ``timing`` judges this host's load reading busy (or calm, ``busy=False``), as the agent's
    optimizer will at its next plan; returns how long that took."""
    reader, t0 = HostLoadReader(), time.monotonic()
    while True:
        load = reader.read()
        if bool(timing.busy(load)) is busy:
            return time.monotonic() - t0
        assert time.monotonic() - t0 < timeout, (
            f"the host is still {'calm' if busy else 'busy'} after {timeout:.0f} s: {load} "
            f"(other processes on this machine count too)")
        time.sleep(0.5)


def test_work_waits_while_the_host_is_busy_and_runs_when_it_calms_down(agent: RunningAgent, lab: Lab,
                                                                       workdir: Path) -> None:
    disk = make_disk(workdir / "patient.qcow2", 32 * MIB, "qcow2")
    # the thresholds the agent's optimizer judges by
    timing = Timing.from_options(agent.call(lambda: agent.agent.config.policy_options).get("timing", {}))
    burners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(4)]
    vm = None
    try:
        # CPU pressure and the load average are averages: wait until they say busy, however long
        # they take to climb
        to_busy = wait_for_load(timing, busy=True, timeout=120)
        agent.call(lambda: setattr(agent.agent.planner, "load_reader", HostLoadReader()))
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
    assert vm is not None
    try:
        # the averages fall as slowly as they rose: the backup runs at the first plan after they
        # say calm (the agent rechecks every 2 s)
        to_calm = wait_for_load(timing, busy=False, timeout=600)
        assert vm.wait_for_exit(timeout=300) == 0, vm.console_tail()
    finally:
        agent.call(lambda: setattr(agent.agent.planner, "load_reader", None))
    assert guest_json(vm.console(), "BACKUP")["ok"] is True
    print(f"\nbusy {to_busy:.1f} s after the burners started, calm {to_calm:.1f} s after they stopped")


def operator(workdir: Path) -> tuple[grpc.Channel, operator_pb2_grpc.OperatorStub]:
    channel = grpc.insecure_channel(f"unix:{workdir}/agent/agent.sock")
    return channel, operator_pb2_grpc.OperatorStub(channel)


def wait_for_state(agent: RunningAgent, job_id: str, states: set[JobState], timeout: float = 120) -> JobState:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = agent.call(lambda: agent.agent.jobs.get(job_id))
        if job is not None and job.state in states:
            return job.state
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} never reached {states}")


def test_operators_list_trigger_and_watch_jobs_over_grpc(agent: RunningAgent, lab: Lab,
                                                         workdir: Path) -> None:
    disk = make_disk(workdir / "operated.qcow2", 32 * MIB, "qcow2")
    vm = lab.start_vm("operated", command="sleep 300", disks=[Disk(disk, "vda", "qcow2", "hb-op")])
    channel, stub = operator(workdir)
    try:
        health = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="hyperback.v1.Operator"), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        domains = {d.name: d for d in stub.ListDomains(operator_pb2.ListDomainsRequest(), timeout=30).domains}
        assert vm.name in domains and [d.serial for d in domains[vm.name].disks] == ["hb-op"]
        request = operator_pb2.TriggerBackupRequest(domain=vm.name, policy=optimizer_pb2.POLICY_FULL,
                                                    request_id="op-1")
        job = stub.TriggerBackup(request, timeout=30).job
        assert stub.TriggerBackup(request, timeout=30).job.id == job.id  # the idempotency key holds
        events = list(stub.WatchJob(operator_pb2.WatchJobRequest(job_id=job.id), timeout=180))
        assert events[-1].final and events[-1].state == operator_pb2.JOB_STATE_SUCCEEDED, events
        assert [e.sequence for e in events] == sorted({e.sequence for e in events})
        listed = stub.ListJobs(operator_pb2.ListJobsRequest(domain=vm.name), timeout=30).jobs
        snapshot_ids = next(j.snapshot_ids for j in listed if j.id == job.id)
        snaps = stub.ListSnapshots(operator_pb2.ListSnapshotsRequest(serial="hb-op"), timeout=30).snapshots
        assert list(snapshot_ids) and snapshot_ids[0] in {s.id for s in snaps}
        with pytest.raises(grpc.RpcError) as missing:
            stub.TriggerBackup(operator_pb2.TriggerBackupRequest(domain="no-such-vm"), timeout=30)
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        channel.close()
        vm.destroy()


def test_an_unreachable_optimizer_delays_the_work_but_loses_nothing(agent: RunningAgent, lab: Lab,
                                                                     workdir: Path) -> None:
    real = agent.call(lambda: agent.agent.planner.client)
    agent.call(lambda: setattr(agent.agent.planner, "client", OptimizerClient(f"unix:{workdir}/nobody.sock",
                                                                              timeout=2)))
    flushed_before = agent.call(lambda: len(agent.agent.driver.flushes))
    disk = make_disk(workdir / "patient2.qcow2", 32 * MIB, "qcow2")
    try:
        vm = lab.start_vm("no-optimizer", command=f"echo \"BACKUP $({SHIM} backup --json --policy full)\"",
                          disks=[Disk(disk, "vda", "qcow2", "hb-retry")], timeout=180)
        deadline = time.monotonic() + 120
        attempts = 0
        while time.monotonic() < deadline and attempts < 3:
            flushes = agent.call(lambda: list(agent.agent.driver.flushes))[flushed_before:]
            attempts = flushes[0].attempts if flushes else 0
            time.sleep(0.2)
        assert attempts >= 3, "the driver did not retry the unreachable optimizer"
    finally:
        agent.call(lambda: setattr(agent.agent.planner, "client", real))
    assert vm.wait_for_exit(timeout=300) == 0, vm.console_tail()
    assert guest_json(vm.console(), "BACKUP")["ok"] is True


DISCONNECTING_GUEST = r'''
import glob, json, os, select, sys, time
sys.path.insert(0, {repo!r})
from guest_shim import protocol as p

def port():
    name = next(n for n in glob.glob("/sys/class/virtio-ports/*/name")
                if open(n).read().strip() == "org.hyperback.agent.0")
    return os.open("/dev/" + name.split("/")[-2], os.O_RDWR)

def talk(fd, frame, pred, timeout=60):
    reader, deadline = p.MessageReader(p.Direction.TO_GUEST), time.monotonic() + timeout
    sid = p.new_sync_id()
    os.write(fd, p.sync_frame(sid))
    synced = False
    while time.monotonic() < deadline:
        if not select.select([fd], [], [], 1)[0]:
            continue
        for m in reader.feed(os.read(fd, 65536)):
            if not synced:
                if isinstance(m, p.SyncAck) and m.id == sid:
                    synced = True
                    os.write(fd, frame)
            elif pred(m):
                return m
    return None

fd = port()
accepted = talk(fd, p.encode(p.Backup(1, ("hb-gone",), p.Policy.FULL, None, False)),
                lambda m: getattr(m, "id", None) == 1)
os.close(fd)  # the application goes away before its result
time.sleep(8)
fd = port()
answer = None
for attempt in range(30):
    rid = attempt + 2
    answer = talk(fd, p.encode(p.Status(rid, accepted.job)), lambda m: getattr(m, "id", None) == rid)
    if isinstance(answer, p.Result):
        break
    time.sleep(2)
print("STATUS " + json.dumps({{"accepted": accepted.to_wire(), "answer": answer.to_wire()}}), flush=True)
'''


def test_a_guest_that_went_away_gets_its_result_from_status(agent: RunningAgent, lab: Lab,
                                                           workdir: Path) -> None:
    disk = make_disk(workdir / "gone.qcow2", 32 * MIB, "qcow2")
    script = f"{sys.executable} -c {shlex.quote(DISCONNECTING_GUEST.format(repo=str(REPO)))}"
    vm = lab.start_vm("disconnecting", command=script, disks=[Disk(disk, "vda", "qcow2", "hb-gone")])
    assert vm.wait_for_exit(timeout=300) == 0, vm.console_tail()
    report = guest_json(vm.console(), "STATUS")
    assert report["accepted"]["type"] == "accepted"  # type: ignore[index]
    answer = report["answer"]
    assert answer["type"] == "result" and answer["ok"] is True, answer  # type: ignore[index]
    assert answer["job"] == report["accepted"]["job"]  # type: ignore[index]


def test_a_vm_destroyed_mid_backup_leaves_its_image_whole_and_the_agent_serving(
        agent: RunningAgent, lab: Lab, workdir: Path) -> None:
    raw = workdir / "doomed.raw"
    raw.write_bytes(os.urandom(384 * MIB))
    image = workdir / "doomed.qcow2"
    qemu_img("convert", "-f", "raw", "-O", "qcow2", str(raw), str(image))
    raw.unlink()
    before = raw_of(image, workdir / "doomed-before.raw")
    vm = lab.start_vm("doomed", command="sleep 300", disks=[Disk(image, "vda", "qcow2", "hb-doomed")])
    channel, stub = operator(workdir)
    try:
        request = operator_pb2.TriggerBackupRequest(domain=vm.name, policy=optimizer_pb2.POLICY_FULL)
        job = stub.TriggerBackup(request, timeout=30).job
        wait_for_state(agent, job.id, {JobState.RUNNING})
        vm.destroy()
        final = wait_for_state(agent, job.id, {JobState.SUCCEEDED, JobState.FAILED}, timeout=180)
    finally:
        channel.close()
    detail = agent.call(lambda: agent.agent.jobs.get(job.id).detail)  # type: ignore[union-attr]
    assert final is JobState.SUCCEEDED or detail, "a failed job must say why"
    assert not list(workdir.glob("doomed.qcow2.hb-*")), "an overlay was left behind"
    qemu_img("check", str(image))
    assert raw_of(image, workdir / "doomed-after.raw") == before  # the guest wrote nothing: unchanged
    backup_round_trip(lab, workdir, "after-destroy")  # and the agent still serves


def test_a_guest_restores_its_disk_to_a_new_disk_it_can_read(agent: RunningAgent, lab: Lab,
                                                            workdir: Path) -> None:
    disk = make_disk(workdir / "restorable.qcow2", 32 * MIB, "qcow2")
    script = f"""
        dd if=/dev/urandom of=/dev/vda bs=1M count=6 conv=fsync 2>/dev/null
        echo "ORIGINAL $(head -c 6291456 /dev/vda | sha256sum | cut -d' ' -f1)"
        echo "BACKUP $({SHIM} backup --json --policy full hb-rest)"
        out=$({SHIM} restore --json hb-rest)
        echo "RESTORE $out"
        serial=$(echo "$out" | sed -n 's/.*"new_serial": *"\\([^"]*\\)".*/\\1/p')
        for i in $(seq 1 60); do
            dev=$(grep -lx "$serial" /sys/block/*/serial 2>/dev/null | head -1 | cut -d/ -f4)
            [ -n "$dev" ] && break
            sleep 0.5
        done
        echo "RESTORED /dev/$dev $(head -c 6291456 /dev/$dev | sha256sum | cut -d' ' -f1)"
    """
    vm = lab.start_vm("restorer", command=script, disks=[Disk(disk, "vda", "qcow2", "hb-rest")])
    assert vm.wait_for_exit(timeout=300) == 0, vm.console_tail()
    console = vm.console()
    restore = guest_json(console, "RESTORE")
    assert restore["ok"] is True, restore
    new_serial = restore["disks"][0]["new_serial"]  # type: ignore[index]
    assert new_serial and new_serial != "hb-rest"
    original = re.search(r"ORIGINAL ([0-9a-f]{64})", console)
    restored = re.search(r"RESTORED /dev/(vd[b-z]) ([0-9a-f]{64})", console)
    assert original and restored, console[-2000:]
    assert restored.group(2) == original.group(1)
