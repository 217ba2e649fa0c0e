"""The agent killed mid-batch loses nothing: its successor takes the journal and answers the guest.

The agents here are real `hyperback-agent` processes (with the optimizer in-process), killed
with SIGKILL between accepting a guest's request and flushing it.
"""
from __future__ import annotations

import json
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import lab_or_fail

from host_agent.lab import Disk, make_disk
from host_agent.storage.repository import Repository

pytestmark = pytest.mark.vm

REPO = Path(__file__).resolve().parents[1]
MIB = 1024 * 1024

GUEST = r'''
import glob, json, os, select, sys, time
sys.path.insert(0, {repo!r})
from guest_shim import protocol as p

name = next(n for n in glob.glob("/sys/class/virtio-ports/*/name")
            if open(n).read().strip() == "org.hyperback.agent.0")
fd = os.open("/dev/" + name.split("/")[-2], os.O_RDWR | os.O_NONBLOCK)

def talk(msg, rid, timeout=20):
    """Resync, send, and wait for the reply with id rid; None if the host does not answer."""
    reader, deadline, sid = p.MessageReader(p.Direction.TO_GUEST), time.monotonic() + timeout, p.new_sync_id()
    sent = synced = False
    while time.monotonic() < deadline:
        try:
            if not sent:
                os.write(fd, p.sync_frame(sid))
                sent = True
            if select.select([fd], [], [], 0.5)[0]:
                for m in reader.feed(os.read(fd, 65536)):
                    if not synced and isinstance(m, p.SyncAck) and m.id == sid:
                        synced = True
                        os.write(fd, p.encode(msg))
                    elif synced and getattr(m, "id", None) == rid:
                        return m
        except (BlockingIOError, OSError):
            time.sleep(0.2)
    return None

accepted = None
while accepted is None:
    accepted = talk(p.Backup(1, ("hb-journal",), p.Policy.FULL, None, False), 1)
print("ACCEPTED " + accepted.job, flush=True)
answer, rid = None, 2
while not isinstance(answer, p.Result):
    answer = talk(p.Status(rid, accepted.job), rid)
    rid += 1
    time.sleep(1)
print("RESULT " + json.dumps(answer.to_wire()), flush=True)
'''


@pytest.fixture
def workdir() -> Iterator[Path]:
    path = Path("/var/tmp") / f"hb-agent-restart-{uuid.uuid4().hex[:8]}"
    path.mkdir(parents=True)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def start_agent(workdir: Path, interval: float) -> subprocess.Popen[bytes]:
    if not (workdir / "repo").exists():
        Repository.init(workdir / "repo")
    config = workdir / "agent.toml"
    config.write_text(f"""
state_dir = "{workdir}/state"
run_dir = "{workdir}/run"
interval = {interval}
optimizer = "unix:{workdir}/run/optimizer.sock"
operator_listen = "unix:{workdir}/run/agent.sock"
metrics_listen = "127.0.0.1:0"
restore_dir = "{workdir}/restores"
send_load = false
[repositories]
default = "{workdir}/repo"
""")
    argv = [sys.executable, "-m", "host_agent.agent.daemon", "--config", str(config), "--with-optimizer",
            "-v"]
    with open(workdir / f"agent-{time.monotonic_ns()}.log", "wb") as log:  # the child keeps its own copy
        return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)


def test_an_agent_killed_mid_batch_loses_no_instruction(workdir: Path) -> None:
    first = start_agent(workdir, interval=3600)  # it will never flush: it dies first
    disk = make_disk(workdir / "journaled.qcow2", 32 * MIB, "qcow2")
    script = f"{sys.executable} -c {shlex.quote(GUEST.format(repo=str(REPO)))}"
    second = None
    try:
        with lab_or_fail(workdir / "lab") as lab:
            vm = lab.start_vm("journaled", command=script, disks=[Disk(disk, "vda", "qcow2", "hb-journal")])
            vm.wait_for_console(r"ACCEPTED [0-9a-f]{16}", timeout=180)
            job = re.search(r"ACCEPTED ([0-9a-f]{16})", vm.console())
            assert job and (workdir / "state" / "pending" / f"{job.group(1)}.json").exists()
            first.send_signal(signal.SIGKILL)
            first.wait()
            second = start_agent(workdir, interval=1)
            assert vm.wait_for_exit(timeout=300) == 0, vm.console_tail()
            console = vm.console()
    finally:
        for agent in (first, second):
            if agent is not None and agent.poll() is None:
                agent.terminate()
                agent.wait(30)
    result = json.loads(re.search(r"RESULT (\{.*\})", console).group(1))  # type: ignore[union-attr]
    assert result["job"] == job.group(1) and result["ok"] is True, result
    assert not list((workdir / "state" / "pending").glob("*.json"))
