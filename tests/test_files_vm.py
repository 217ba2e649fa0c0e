"""File-level restore on the host, end to end in a real VM: a guest writes files on an ext4 data
disk and asks for a backup through the shim; ``hyperback files`` lists, prints and extracts them
from the snapshot, bit-identical with their modes and nanosecond mtimes, through the snapshot's NBD
export and libguestfs's appliance, with no full restore. A second disk whose ext4 the guest damaged
before its backup is one clear error, and nothing is mounted on the host."""
from __future__ import annotations

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

from host_agent.lab import Disk, Lab, make_disk

pytestmark = [pytest.mark.vm, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]  # the guest sees this checkout over 9p
SHIM = f"PYTHONPATH={REPO} {sys.executable} -m guest_shim"
MIB = 1024 * 1024

# The guest's Python describes its tree the way the host's test will describe the extracted one.
MANIFEST = r"""
import hashlib, json, os, stat, sys
root = sys.argv[1]
out = {}
for d, dirs, files in os.walk(root):
    for n in dirs + files:
        p = os.path.join(d, n); st = os.lstat(p)
        body = (hashlib.sha256(open(p, 'rb').read()).hexdigest() if stat.S_ISREG(st.st_mode)
                else os.readlink(p) if stat.S_ISLNK(st.st_mode) else None)
        out[os.path.relpath(p, root)] = [st.st_mode, st.st_mtime_ns, body]
print(json.dumps(out, sort_keys=True))
"""

GUEST = f"""
set -e
cat > /tmp/manifest.py <<'EOF'
{MANIFEST}
EOF
mkfs.ext4 -q -F -L guestdata /dev/vda
mkdir -p /tmp/data && mount -t ext4 /dev/vda /tmp/data
mkdir -p /tmp/data/srv/app/conf.d /tmp/data/srv/app/empty-dir
echo "hello from the guest" > /tmp/data/srv/app/hello.txt
dd if=/dev/urandom of=/tmp/data/srv/app/blob.bin bs=1K count=1500 2>/dev/null
printf 'debug = false\\n' > /tmp/data/srv/app/conf.d/10-local.conf
ln -s hello.txt /tmp/data/srv/app/link
ln -s ../../../../etc/shadow /tmp/data/srv/app/escape
chmod 640 /tmp/data/srv/app/hello.txt
chmod 750 /tmp/data/srv/app/conf.d
chmod 755 /tmp/data/srv/app/blob.bin
touch -d '2024-02-29 12:34:56.123456789' /tmp/data/srv/app/hello.txt
sync
echo "MANIFEST $(python3 /tmp/manifest.py /tmp/data/srv)"
echo "BACKUP $({SHIM} backup --json --policy full hb-files)"

mkfs.ext4 -q -F -b 4096 /dev/vdb
mkdir -p /tmp/bad && mount -t ext4 /dev/vdb /tmp/bad && echo "lost soon" > /tmp/bad/file && umount /tmp/bad
block=$(dumpe2fs /dev/vdb 2>/dev/null | sed -n 's/.*Inode table at \\([0-9]*\\)-.*/\\1/p' | head -1)
dd if=/dev/urandom of=/dev/vdb bs=4096 seek=$block count=16 conv=fsync 2>/dev/null
echo "DAMAGED at block $block"
echo "BADBACKUP $({SHIM} backup --json --policy full hb-bad)"
"""


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    # Outside /tmp: the guest sees the host's root, but its own /tmp.
    path = Path("/var/tmp") / f"hb-files-vm-{uuid.uuid4().hex[:8]}"
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


@pytest.fixture(scope="module")
def guest_run(agent: RunningAgent, lab: Lab, workdir: Path) -> str:
    """The guest's console after it wrote its files and had both disks backed up."""
    disks = [Disk(make_disk(workdir / "files.qcow2", 64 * MIB, "qcow2"), "vda", "qcow2", "hb-files"),
             Disk(make_disk(workdir / "bad.qcow2", 32 * MIB, "qcow2"), "vdb", "qcow2", "hb-bad")]
    vm = lab.start_vm("files-vm", command=GUEST, disks=disks, timeout=180)
    assert vm.wait_for_exit(timeout=420) == 0, vm.console_tail()
    return vm.console()


def marked(console: str, marker: str) -> dict[str, object]:
    match = re.search(rf"{marker} (\{{.*\}})", console)
    assert match, f"no {marker} line on the console:\n{console[-3000:]}"
    doc: dict[str, object] = json.loads(match.group(1))
    return doc


def snapshot_id(console: str, marker: str) -> str:
    result = marked(console, marker)
    assert result["ok"] is True, result
    disks = result["disks"]
    assert isinstance(disks, list) and len(disks) == 1
    return str(disks[0]["snapshot"])


def files(workdir: Path, *args: object, check: bool = True) -> subprocess.CompletedProcess[str]:
    repo = workdir / "agent" / "repo"
    proc = subprocess.run([sys.executable, "-m", "host_agent.cli", "files", "--repo", str(repo), "--tcg",
                           *map(str, args)], capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"hyperback files {args} exited {proc.returncode}: {proc.stderr}")
    return proc


def host_manifest(root: Path) -> dict[str, list[object]]:
    out = subprocess.run([sys.executable, "-c", MANIFEST, str(root)], capture_output=True, text=True,
                         check=True).stdout
    doc: dict[str, list[object]] = json.loads(out)
    return doc


def test_files_written_in_a_guest_come_back_bit_identical_without_a_restore(
        guest_run: str, workdir: Path) -> None:
    snap = snapshot_id(guest_run, "BACKUP")
    manifest = marked(guest_run, "MANIFEST")
    listing = {e["name"]: e for e in json.loads(files(workdir, snap, "ls", "--json", "/srv/app").stdout)}
    assert sorted(listing) == ["blob.bin", "conf.d", "empty-dir", "escape", "hello.txt", "link"]
    for name, entry in listing.items():
        assert [entry["mode"], entry["mtime_ns"]] == manifest[f"app/{name}"][:2], name
    assert listing["hello.txt"]["mtime_ns"] % 1_000_000_000 == 123_456_789  # nanoseconds kept
    assert files(workdir, snap, "cat", "/srv/app/hello.txt").stdout == "hello from the guest\n"
    files(workdir, snap, "get", "/srv/app", "--to", workdir / "got")
    assert host_manifest(workdir / "got") == manifest
    assert not list(workdir.glob("**/*.restored")) and not list((workdir / "agent").glob("restores/*"))


def test_a_guest_file_system_damaged_before_its_backup_is_a_clear_error_and_no_host_mount(
        guest_run: str, workdir: Path) -> None:
    snap = snapshot_id(guest_run, "BADBACKUP")
    mounts = ours_mounted(workdir)
    proc = files(workdir, snap, "ls", "/", check=False)
    assert proc.returncode == 4, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "damaged" in lines[0] and "Traceback" not in proc.stderr
    assert ours_mounted(workdir) == mounts == []


def ours_mounted(workdir: Path) -> list[str]:
    """Host mounts of an NBD device or of anything under the test's folder (other tests on the
    machine mount their own things meanwhile)."""
    return [line for line in Path("/proc/mounts").read_text().splitlines()
            if line.startswith("/dev/nbd") or str(workdir) in line]
