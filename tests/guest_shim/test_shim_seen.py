"""Finding and mounting a seen snapshot's disk inside the guest, on a stand-in sysfs tree: the disk
by its serial (no udev), the device to mount (whole disk, its one partition, or the one asked
for), and the mounts to undo before it is given back."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from guest_shim import seen
from guest_shim.errors import MountError


def block_device(sys_root: Path, name: str, dev: str, serial: str | None = None, parts: int = 0) -> None:
    disk = sys_root / "block" / name
    disk.mkdir(parents=True)
    (disk / "dev").write_text(f"{dev}\n")
    if serial is not None:
        (disk / "serial").write_text(f"{serial}\n")
    major, minor = dev.split(":")
    for i in range(1, parts + 1):
        part = disk / f"{name}{i}"
        part.mkdir()
        (part / "partition").write_text(f"{i}\n")
        (part / "dev").write_text(f"{major}:{int(minor) + i}\n")


@pytest.fixture
def tree(tmp_path: Path) -> tuple[Path, Path]:
    sys_root, dev_root = tmp_path / "sys", tmp_path / "dev"
    dev_root.mkdir()
    block_device(sys_root, "vda", "252:0", "hb-data", parts=1)
    block_device(sys_root, "vdb", "252:16", "hbsee-0a1b2c3d")
    block_device(sys_root, "vdc", "252:32", "hbsee-11111111", parts=2)
    for name in ("vda", "vda1", "vdb", "vdc", "vdc1", "vdc2"):
        (dev_root / name).touch()
    return sys_root, dev_root


def test_the_disk_is_found_by_its_serial(tree: tuple[Path, Path]) -> None:
    sys_root, dev_root = tree
    assert seen.disk_name("hbsee-0a1b2c3d", str(sys_root)) == "vdb"
    assert seen.disk_name("hbsee-ffffffff", str(sys_root)) is None
    deadline = time.monotonic() + 5
    found = seen.wait_for_disk("hbsee-0a1b2c3d", deadline, sys_root=str(sys_root), dev_root=str(dev_root))
    assert found == "vdb"


def test_a_disk_that_never_appears_says_how_to_give_it_back(tree: tuple[Path, Path]) -> None:
    sys_root, dev_root = tree
    with pytest.raises(MountError, match="hyperback-shim release hbsee-99999999"):
        seen.wait_for_disk("hbsee-99999999", time.monotonic(), sys_root=str(sys_root), dev_root=str(dev_root))


def test_the_device_to_mount_is_the_disk_its_one_partition_or_the_one_asked_for(
    tree: tuple[Path, Path],
) -> None:
    sys_root, dev_root = tree
    where = {"sys_root": str(sys_root), "dev_root": str(dev_root)}
    assert seen.filesystem_device("vdb", None, **where) == os.path.join(dev_root, "vdb")
    assert seen.filesystem_device("vda", None, **where) == os.path.join(dev_root, "vda1")
    assert seen.filesystem_device("vdc", 2, **where) == os.path.join(dev_root, "vdc2")
    with pytest.raises(MountError, match="--partition N"):
        seen.filesystem_device("vdc", None, **where)
    with pytest.raises(MountError, match="no partition 3"):
        seen.filesystem_device("vdc", 3, **where)


def test_nothing_is_unmounted_for_a_disk_that_is_not_there(tree: tuple[Path, Path], tmp_path: Path) -> None:
    sys_root, _ = tree
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text("22 1 252:1 / / rw,relatime shared:1 - ext4 /dev/vda1 rw\n")
    assert seen.unmount_disk("hbsee-99999999", sys_root=str(sys_root), mountinfo=str(mountinfo)) == []
    # vdb is not mounted: nothing to do (the root file system on vda1 is left alone)
    assert seen.unmount_disk("hbsee-0a1b2c3d", sys_root=str(sys_root), mountinfo=str(mountinfo)) == []
