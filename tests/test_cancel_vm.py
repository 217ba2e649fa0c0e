"""Cancelling a running backup of a real VM: nothing is published, the VM keeps running, thawed.

The agent is a real process; the test holds its copier, with fanotify (tests/checkpoints.py), at
the instant it opens its first pack: provably mid-copy, whatever the machine's speed. The cancel
arrives there; the copy is let go and must stop.
"""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from checkpoints import Checkpoints, opened
from conftest import lab_or_fail

from host_agent._proto.hyperback.v1 import operator_pb2 as pb
from host_agent._proto.hyperback.v1 import operator_pb2_grpc as pb_grpc
from host_agent.lab import Disk, make_disk
from host_agent.storage.repository import Repository

pytestmark = [pytest.mark.vm, pytest.mark.root]

REPO = Path(__file__).resolve().parents[1]
SHIM = f"PYTHONPATH={REPO} {sys.executable} -m guest_shim"
MIB = 1024 * 1024

# A file system the shim freezes for the view, 32 MiB to copy, and a heartbeat that writes and
# syncs into it: a guest left frozen would stop beating.
GUEST = f"""
mkfs.ext4 -q /dev/vda && mkdir -p /tmp/data && mount /dev/vda /tmp/data
dd if=/dev/urandom of=/tmp/data/big bs=1M count=32 conv=fsync 2>/dev/null
{SHIM} serve &
echo FILLED
n=0
while true; do echo $n > /tmp/data/beat; sync; echo "BEAT $n"; n=$((n + 1)); sleep 0.5; done
"""


@pytest.fixture
def workdir() -> Iterator[Path]:
    path = Path("/var/tmp") / f"hb-cancel-{uuid.uuid4().hex[:8]}"
    path.mkdir(parents=True)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def start_agent(workdir: Path, domain: str) -> subprocess.Popen[bytes]:
    Repository.init(workdir / "repo")
    (workdir / "agent.toml").write_text(f"""
state_dir = "{workdir}/state"
run_dir = "{workdir}/run"
interval = 0.5
optimizer = "unix:{workdir}/run/optimizer.sock"
operator_listen = "unix:{workdir}/run/agent.sock"
metrics_listen = "127.0.0.1:0"
send_load = false
[repositories]
default = "{workdir}/repo"
[[schedules]]
name = "yearly"
calendar = "0 0 1 1 *"
domains = ["{domain}"]
policy = "full"
""")
    argv = [sys.executable, "-m", "host_agent.agent.daemon", "--config", str(workdir / "agent.toml"),
            "--with-optimizer", "-v"]
    with open(workdir / "agent.log", "wb") as log:
        return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)


def final_state(stub: pb_grpc.OperatorStub, job_id: str) -> pb.JobEvent:
    """The job's last event: WatchJob streams until the job has finished."""
    events = list(stub.WatchJob(pb.WatchJobRequest(job_id=job_id), timeout=300))
    assert events[-1].final, events
    return events[-1]


def beats(console: str) -> int:
    return len(re.findall(r"^BEAT \d+", console, re.MULTILINE))


def test_a_cancelled_running_backup_publishes_nothing_and_leaves_the_vm_running_and_thawed(
        workdir: Path, checkpoints: Callable[[Path], Checkpoints]) -> None:
    disk = make_disk(workdir / "cancel.qcow2", 128 * MIB, "qcow2")
    with lab_or_fail(workdir / "lab") as lab:
        vm = lab.start_vm("cancel", command=GUEST, disks=[Disk(disk, "vda", "qcow2", "hb-cancel")],
                          wait_for="^FILLED", timeout=240)
        agent = start_agent(workdir, vm.name)
        try:
            cps = checkpoints(workdir / "repo")
            cps.watch_opens(workdir / "repo" / "tmp")
            cps.start(agent, opened("tmp/*.pack"))
            with grpc.insecure_channel(f"unix:{workdir}/run/agent.sock") as channel:
                stub = pb_grpc.OperatorStub(channel)
                grpc.channel_ready_future(channel).result(timeout=60)
                (job,) = stub.RunSchedule(pb.RunScheduleRequest(name="yearly"), timeout=60).jobs
                cps.wait_held(timeout=240)  # the copier opened its first pack: mid-copy
                cancelling = stub.CancelJob(pb.CancelJobRequest(job_id=job.id), timeout=30).job
                assert cancelling.state == pb.JOB_STATE_RUNNING and "cancelling" in cancelling.detail
                cps.release()
                last = final_state(stub, job.id)
            assert last.state == pb.JOB_STATE_CANCELLED, last
            assert Repository.open(workdir / "repo").snapshots() == []
            assert not list((workdir / "repo" / "tmp").glob("*.pack"))
            # the VM runs on its own disk again (the view merged back), and its file system takes writes
            assert vm.is_active()
            sources = [s.get("file") for s in vm.xml().findall("./devices/disk/source")]
            assert sources == [str(disk)]
            seen = beats(vm.console())
            vm.wait_for_console(rf"^BEAT {seen + 1}\b", timeout=60)
        finally:
            agent.terminate()
            agent.wait(30)
