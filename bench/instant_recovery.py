#!/usr/bin/env python3
"""Instant recovery against a full restore: how soon a VM answers from a snapshot.

Run by hand, as root, on a host prepared for the lab (host_agent/lab/setup_host.sh), under the
lab's lock::

    flock /tmp/hyperback-vm.lock .venv/bin/python bench/instant_recovery.py [--size-gib 1] [--kinds dense]

For two snapshots of ``--size-gib`` GiB (sparse: 8 MiB of data at each end; dense: random data
throughout) it times

* instant: ``InstantRecovery.start()`` (export up, overlay, domain running), the guest shim's first
  answer (the lab guest boots, reads both ends of its disk, runs ``guest_shim serve``), and the
  copy to its pivot;
* classic: ``hyperback restore`` of the same snapshot (the command, as a user runs it), then a
  lab guest booted on the restored disk until its shim answers.

Both guests run the same command, so the boot is the same in both columns; what differs is what
comes before it.
"""
from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

from guest_shim import protocol as p
from host_agent import hypervisor
from host_agent.agent.instant import InstantRecovery, Request
from host_agent.lab import Channel, Disk, Lab, Vm, render_domain_xml
from host_agent.lab.domain import BASE_KERNEL_ARGS
from host_agent.lab.guest import command_cmdline_arg
from host_agent.storage.export import SnapshotExport
from host_agent.storage.repository import Repository

MIB = 1 << 20
GIB = 1 << 30
REPO = Path(__file__).resolve().parents[1]


def guest(size: int) -> str:
    """The guest reads both ends of its disk, then serves."""
    return f"""
dd if=/dev/vda of=/dev/null bs=64k count=16 2>/dev/null
dd if=/dev/vda of=/dev/null bs=64k skip={size // (64 * 1024) - 16} 2>/dev/null
PYTHONPATH={REPO} {sys.executable} -m guest_shim serve
"""


def image(path: Path, size: int, dense: bool) -> Path:
    """``size`` bytes: random data throughout (dense), or 8 MiB of it at each end (sparse)."""
    rng = random.Random(7)
    with open(path, "wb") as f:
        f.truncate(size)
        if dense:
            for _ in range(size // MIB):
                f.write(rng.randbytes(MIB))
        else:
            f.write(rng.randbytes(8 * MIB))
            f.seek(size - 8 * MIB)
            f.write(rng.randbytes(8 * MIB))
    return path


def definition(lab: Lab, name: str, disk: Path, size: int) -> str:
    return render_domain_xml(lab.name_prefix + name, kernel=lab.boot_image, initrd=lab.initramfs,
                             cmdline=" ".join([*BASE_KERNEL_ARGS, command_cmdline_arg(guest(size))]),
                             console_log=lab.workdir / f"{name}.console.log",
                             disks=[Disk(disk, "vda", "raw", "hb-bench")], channels=[Channel()])


def shim_answers(vm: Vm) -> None:
    sock = vm.connect_channel()
    sock.settimeout(300)
    reader = p.MessageReader(p.Direction.TO_HOST)
    with sock:
        while data := sock.recv(65536):
            for msg in reader.feed(data):
                if isinstance(msg, p.Sync):
                    sock.sendall(p.sync_ack_frame(msg.id))
                elif isinstance(msg, p.Hello):
                    return
    raise SystemExit(f"{vm.name}: the channel closed before the shim answered:\n{vm.console_tail()}")


def instant(lab: Lab, repo: Repository, snap: str, work: Path, name: str) -> dict[str, float]:
    export = SnapshotExport(repo, snap, work / f"run-{name}")
    size = repo.resolve(snap).size
    request = Request(definition(lab, name, work / "gone.img", size), "vda", work / f"{name}.target.img")
    recovery = InstantRecovery(hypervisor.connect(lab.uri), export, request, export.run_dir)
    try:
        recovery.start()
        started = time.monotonic() - recovery.started_at
        assert recovery.domain is not None
        vm = Vm(lab, lab.name_prefix + name, recovery.domain.raw, lab.workdir / f"{name}.console.log", True,
                recovery.started_at)
        lab.vms.append(vm)
        shim_answers(vm)
        answered = time.monotonic() - recovery.started_at
        status = recovery.finish(timeout=3600)
        pivoted = time.monotonic() - recovery.started_at
        assert status.phase == "pivoted", status
        vm.destroy()
    finally:
        recovery.close()
    return {"running": started, "shim_answered": answered, "pivoted": pivoted}


def classic(lab: Lab, snap: str, repo_path: Path, work: Path, name: str, size: int) -> dict[str, float]:
    target = work / f"{name}.restored.img"
    t0 = time.monotonic()
    subprocess.run([sys.executable, "-m", "host_agent.cli", "restore", "--repo", str(repo_path), snap,
                    str(target)], check=True, capture_output=True)
    restored = time.monotonic() - t0
    conn = lab.conn
    dom = conn.defineXML(definition(lab, name, target, size))
    vm = Vm(lab, dom.name(), dom, lab.workdir / f"{name}.console.log", True, time.monotonic())
    lab.vms.append(vm)
    dom.create()
    shim_answers(vm)
    answered = time.monotonic() - t0
    vm.destroy()
    return {"restore": restored, "shim_answered": answered}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, default=Path("/var/tmp/hyperback-bench-instant"))
    ap.add_argument("--size-gib", type=int, default=1, help="the snapshots' size (default 1 GiB)")
    ap.add_argument("--kinds", default="sparse,dense", help="which snapshots: sparse, dense or both")
    args = ap.parse_args()
    shutil.rmtree(args.workdir, ignore_errors=True)
    args.workdir.mkdir(parents=True)
    repo = Repository.init(args.workdir / "repo")
    results = {}
    with Lab(args.workdir / "lab") as lab:
        size = args.size_gib * GIB
        for kind in args.kinds.split(","):
            source = image(args.workdir / f"{kind}.img", size, kind == "dense")
            snap = repo.backup(source, f"bench/{kind}").snapshot.id
            source.unlink()
            results[kind] = {
                "instant": instant(lab, repo, snap, args.workdir, f"i-{kind}"),
                "classic": classic(lab, snap, args.workdir / "repo", args.workdir, f"c-{kind}", size)}
            print(kind, json.dumps(results[kind]), flush=True)
    shutil.rmtree(args.workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
