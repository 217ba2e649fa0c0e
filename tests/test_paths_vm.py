"""Path-level backups in a real VM: a guest asks for a backup of a /usr/lib-like folder and one file
of a partition's file system; the agent takes the disk's point-in-time view and reads just those
paths through the isolated reader (the data never crosses the guest's network, nor the host's
kernel), stores them as a file-level snapshot, and they come back bit-identical with their modes
and times through `hyperback files` on the host and through the guest's own `restore-paths`."""
from __future__ import annotations

import inspect
import json
import re
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from agent_harness import RunningAgent, agent_config_for, running_agent
from conftest import lab_or_fail

from host_agent.cli import main as hyperback
from host_agent.lab import Disk, Lab
from host_agent.storage.repository import Repository

pytestmark = pytest.mark.vm

REPO = Path(__file__).resolve().parents[1]  # the guest sees this checkout over 9p
SHIM = f"PYTHONPATH={REPO} {sys.executable} -m guest_shim"
MIB = 1024 * 1024


def manifest(roots: list[str]) -> dict[str, list[object]]:
    """Every entry under each root, by path relative to that root's parent: mode, mtime in
    nanoseconds, and the SHA-256 of a file's bytes or a link's target. (Runs in the guest too.)"""
    import hashlib
    import os
    out: dict[str, list[object]] = {}
    for root in roots:
        parent = os.path.dirname(root.rstrip("/"))
        entries = [root] if not os.path.isdir(root) or os.path.islink(root) else []
        for folder, dirs, files in os.walk(root) if not entries else ():
            entries += [folder] + [os.path.join(folder, name) for name in dirs + files if
                                   not os.path.isdir(os.path.join(folder, name)) or
                                   os.path.islink(os.path.join(folder, name))]
        for path in entries:
            st = os.lstat(path)
            if os.path.islink(path):
                what = "-> " + os.readlink(path)
            elif os.path.isfile(path):
                with open(path, "rb") as f:
                    what = hashlib.sha256(f.read()).hexdigest()
            else:
                what = "dir"
            out[os.path.relpath(path, parent)] = [st.st_mode, st.st_mtime_ns, what]
    return out


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    # Outside /tmp: the guest sees the host's root (and so this folder), but its own /tmp.
    path = Path("/var/tmp") / f"hb-paths-vm-{uuid.uuid4().hex[:8]}"
    path.mkdir(parents=True)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def lab(workdir: Path) -> Iterator[Lab]:
    with lab_or_fail(workdir / "lab", max_running=1) as the_lab:
        yield the_lab


@pytest.fixture(scope="module")
def agent(workdir: Path, lab: Lab) -> Iterator[RunningAgent]:
    with running_agent(agent_config_for(workdir / "agent", interval=1.0)) as running:
        yield running


def partitioned_qcow2(path: Path) -> Path:
    """A 64 MiB qcow2 disk with a DOS label: partition 1 (16 MiB) and partition 2 (the rest)."""
    raw = path.with_suffix(".raw")
    with open(raw, "wb") as f:
        f.truncate(64 * MIB)
    subprocess.run(["sfdisk", "-q", str(raw)], input=b"label: dos\n,16M,L\n,,L\n", check=True)
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(path)], check=True)
    raw.unlink()
    return path


def line_json(console: str, marker: str) -> dict[str, object]:
    match = re.search(rf"^{marker} (\{{.*\}})$", console, re.MULTILINE)
    assert match, f"no {marker} line on the console:\n{console[-3000:]}"
    doc: dict[str, object] = json.loads(match.group(1))
    return doc


def test_a_guests_paths_come_back_bit_identical_through_files_and_through_the_guest(
        agent: RunningAgent, lab: Lab, workdir: Path) -> None:
    script_file = workdir / "manifest.py"
    script_file.write_text(inspect.getsource(manifest) + "\nimport json, sys\n"
                           "print(json.dumps(manifest(sys.argv[1:]), sort_keys=True))\n")
    show = f"{sys.executable} {script_file}"
    lib, conf = "/tmp/data/usr/lib", "/tmp/data/etc/app.conf"
    script = f"""
        mkfs.ext4 -q -F -I 256 /dev/vda2 && mkdir -p /tmp/data && mount /dev/vda2 /tmp/data || exit 9
        mkdir -p {lib}/app/plugins /tmp/data/etc /tmp/data/other
        head -c 3000001 /dev/urandom > {lib}/app/big.so
        echo hello > {lib}/app/small.txt && chmod 0640 {lib}/app/small.txt
        printf '#!/bin/sh\\necho hi\\n' > {lib}/app/tool && chmod 0755 {lib}/app/tool
        ln -s big.so {lib}/app/link.so
        : > {lib}/app/plugins/empty
        echo port=8080 > {conf} && chmod 0600 {conf}
        head -c 2000000 /dev/urandom > /tmp/data/other/not-asked-for
        touch -h -d '2021-02-03 04:05:06.123456789' {lib}/app/* {lib}/app/plugins/empty {conf}
        sync
        echo "BEFORE $({show} {lib} {conf})"
        t0=$(date +%s%N)
        out=$({SHIM} backup --json --paths {lib} {conf}); echo "BACKUP $out"
        echo "BACKUP-MS $(( ($(date +%s%N) - t0) / 1000000 ))"
        rm -rf {lib}/app {conf}  # restore brings back what no longer exists
        mkdir /tmp/r
        t0=$(date +%s%N)
        out=$({SHIM} restore-paths --json {lib} {conf} --to /tmp/r); echo "RESTORE $out"
        echo "RESTORE-MS $(( ($(date +%s%N) - t0) / 1000000 ))"
        echo "AFTER $({show} /tmp/r{lib} /tmp/r{conf})"
        {SHIM} backup --json --paths /proc/version > /dev/null; echo "PROC $?"
    """
    disk = partitioned_qcow2(workdir / "paths.qcow2")
    vm = lab.start_vm("paths", command=script, disks=[Disk(disk, "vda", "qcow2", "hb-paths")], timeout=180)
    assert vm.wait_for_exit(timeout=900) == 0, vm.console_tail()
    console = vm.console()

    before = line_json(console, "BEFORE")
    backup = line_json(console, "BACKUP")
    assert backup["ok"] is True, backup
    [disk_outcome] = backup["disks"]  # type: ignore[misc]
    snap = Repository.open(workdir / "agent" / "repo").resolve(disk_outcome["snapshot"])
    assert snap.files is not None and snap.files.partition == 2
    assert snap.files.paths == ("/usr/lib", "/etc/app.conf") and snap.name.endswith("/hb-paths/paths-2")
    assert snap.size < 4 * MIB  # the ~3 MiB asked for, not the 2 MiB beside them nor the 64 MiB disk

    host_out = workdir / "host-out"
    host_out.mkdir()
    assert hyperback(["files", "--repo", str(workdir / "agent" / "repo"), "--tcg", snap.id, "get",
                      "/usr/lib", "/etc/app.conf", "--to", str(host_out)]) == 0
    assert manifest([str(host_out / "lib"), str(host_out / "app.conf")]) == before

    restored = line_json(console, "RESTORE")
    assert restored["ok"] is True and restored["skipped"] == [], restored
    assert (restored["files"], restored["links"]) == (5, 1), restored
    assert line_json(console, "AFTER") == before
    assert re.search(r"^PROC 2$", console, re.M), console[-2000:]
    assert agent.call(lambda: list(agent.agent.snapshot_disks.leases)) == []
    timings = dict(re.findall(r"^(BACKUP|RESTORE)-MS (\d+)$", console, re.M))
    print(f"guest-timed: backup of paths {timings.get('BACKUP')} ms (view, appliance, archive, commit), "
          f"restore-paths {timings.get('RESTORE')} ms (see, hotplug, read, release); snapshot {snap.size} "
          f"bytes, {len(before)} entries")
