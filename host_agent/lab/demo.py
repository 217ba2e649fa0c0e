"""The main job on an embedded default: a real VM backs itself up through hyperback.

A test guest (the host's kernel, a busybox initramfs, the host's Python over 9p; see
``host_agent.lab``) boots under libvirtd with a qcow2 data disk and the hyperback channel,
and no network device. Its application writes files on an ext4 file system and asks for a
full, then an incremental backup with the guest shim library, as a local call. The agent,
driver, optimizer (over gRPC) and copier do their work; then the host restores the latest
snapshot, checks its file system, and says where everything is.
"""
from __future__ import annotations

import asyncio
import json
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from host_agent.agent.daemon import Agent, agent_in_thread
from host_agent.config import AgentConfig
from host_agent.storage.repository import Repository

GUEST_APP = r'''
import json, os, subprocess, sys
sys.path.insert(0, {checkout!r})
from guest_shim import client

def say(what, **facts):
    print("DEMO " + json.dumps(dict(step=what, **facts)), flush=True)

subprocess.run(["mkfs.ext4", "-q", "-F", "/dev/vda"], check=True)
os.makedirs("/tmp/data", exist_ok=True)
subprocess.run(["mount", "/dev/vda", "/tmp/data"], check=True)
for i in range(20):
    with open(f"/tmp/data/report-{{i}}.txt", "w") as f:
        f.write(f"quarterly report {{i}}\n" * 20000)
os.sync()
say("wrote 20 files on /dev/vda (ext4), asking for a full backup")
full = client.backup(["demo-data"], policy="full")
say("full backup done", result=full.to_dict())
with open("/tmp/data/report-3.txt", "a") as f:
    f.write("a late correction\n" * 1000)
os.sync()
say("changed one file, asking for an incremental backup")
incr = client.backup(["demo-data"], policy="incremental")
say("incremental backup done", result=incr.to_dict())
subprocess.run(["umount", "/tmp/data"], check=True)
'''


def demo_config(work: Path) -> AgentConfig:
    return replace(AgentConfig(), state_dir=work / "state", run_dir=work / "run", interval=2.0,
                   optimizer=f"unix:{work}/run/optimizer.sock", operator_listen=f"unix:{work}/run/agent.sock",
                   repositories={"default": work / "repo"}, restore_dir=work / "restores", send_load=False,
                   metrics_listen="127.0.0.1:0")


def run(work: Path, say: Callable[[str], None]) -> int:
    from host_agent import lab

    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    disk = work / "vm-data.qcow2"
    lab.make_disk(disk, 256 << 20, "qcow2")
    config = demo_config(work)
    Repository.init(config.repositories["default"])
    say(f"1. starting the host agent and the optimizer (gRPC on {config.optimizer})")
    with agent_in_thread(config) as (agent, loop), lab.Lab(work / "lab") as the_lab:
        say("2. booting a VM (QEMU/TCG under libvirtd, no network device) with a 256 MiB qcow2 disk, "
            "serial demo-data, and the hyperback virtio-serial channel")
        app = GUEST_APP.format(checkout=str(Path(__file__).resolve().parents[1]))
        vm = the_lab.start_vm("demo", command=f"exec {sys.executable} -c {shlex.quote(app)}",
                              disks=[lab.Disk(disk, "vda", "qcow2", "demo-data")], timeout=300)
        say(f"   booted in {vm.boot_seconds:.1f}s; the guest application runs")
        status = vm.wait_for_exit(timeout=600)
        for line in vm.console().splitlines():
            if line.startswith("DEMO "):
                event = json.loads(line[5:])
                say(f"   guest: {event['step']}")
                if "result" in event:
                    say(f"          {json.dumps(event['result'])[:400]}")
        if status != 0:
            say(f"the guest application failed (exit {status}); its console:\n{vm.console_tail(30)}")
            return 1
        flushes = asyncio.run_coroutine_threadsafe(_flushes(agent), loop).result(10)
    say(f"3. the driver flushed {len(flushes)} batch(es): " +
        ", ".join(f"{f.instructions} instruction(s) by {f.reason}" for f in flushes))
    repo = Repository.open(config.repositories["default"])
    snaps = repo.snapshots()
    say(f"4. the repository {repo.path} holds {len(snaps)} snapshot(s):")
    for snap in snaps:
        say(f"   {snap.id} {snap.policy.value:12} {snap.change_detection.value:12} read "
            f"{snap.stats.bytes_read >> 20} MiB, stored {snap.stats.bytes_stored >> 10} KiB  ({snap.name})")
    restored = work / "restored.img"
    repo.restore(snaps[-1].id, restored)
    fsck = subprocess.run(["e2fsck", "-n", "-f", str(restored)], capture_output=True, text=True)
    say(f"5. restored the latest snapshot to {restored}: e2fsck -n says "
        f"{'clean' if fsck.returncode == 0 else 'PROBLEMS'} ({_summary(fsck.stdout)})")
    say(f"\nThe backups are in {repo.path}; try: hyperback list --repo {repo.path}")
    return 0 if fsck.returncode == 0 else 4


async def _flushes(agent: Agent) -> list[Any]:
    return list(agent.driver.flushes)


def _summary(fsck_output: str) -> str:
    match = re.search(r"(\d+/\d+ files, \d+/\d+ blocks)", fsck_output)
    return match.group(1) if match else fsck_output.strip().splitlines()[-1] if fsck_output.strip() else ""
