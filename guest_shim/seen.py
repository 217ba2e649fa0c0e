"""A seen snapshot inside the guest: finding the read-only disk the host plugged in, mounting it
read-only, and unmounting it before it is given back.

The host answers ``see`` with the new disk's serial (docs/wire-protocol.md, section 5.6). A guest
need not run udev (/dev/disk/by-id may not exist), so the disk is found as the ports are: by the
``serial`` file of each block device in sysfs. The disk appears a moment after the answer (PCI
hotplug), so :func:`wait_for_disk` waits for it, up to a deadline.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Sequence

from .errors import MountError
from .freeze import disk_devices, disk_serial, parse_mountinfo, read_sysfs

# tried in order: a snapshot of a mounted journalling file system needs its journal replayed,
# which a read-only disk cannot take; "noload" (ext3/4) and "norecovery" (xfs) skip it
MOUNT_OPTIONS = ("ro", "ro,noload", "ro,norecovery")
_POLL = 0.1


def disk_name(serial: str, sys_root: str = "/sys") -> str | None:
    """The block device name (``vdc``) of the disk with ``serial``, or None."""
    block = os.path.join(sys_root, "block")
    try:
        names = sorted(os.listdir(block))
    except OSError:
        return None
    for name in names:
        if disk_serial(name, sys_root) == serial:
            return name
    return None


def wait_for_disk(serial: str, deadline: float, *, sys_root: str = "/sys", dev_root: str = "/dev") -> str:
    """The name of the disk with ``serial`` once it and its device node exist; MountError at
    ``deadline`` (time.monotonic())."""
    while True:
        name = disk_name(serial, sys_root)
        if name is not None and os.path.exists(os.path.join(dev_root, name)):
            return name
        if time.monotonic() >= deadline:
            raise MountError(
                f"the host attached the snapshot as disk {serial}, but no such disk appeared in this "
                "guest in time (does it take PCI hotplug?); release it with "
                f"`hyperback-shim release {serial}`"
            )
        time.sleep(_POLL)


def partitions(name: str, sys_root: str = "/sys") -> list[str]:
    """The partitions of disk ``name`` (``vdc1``, ...), in order."""
    disk = os.path.join(sys_root, "block", name)
    try:
        children = sorted(os.listdir(disk))
    except OSError:
        return []
    return [c for c in children if os.path.exists(os.path.join(disk, c, "partition"))]


def filesystem_device(
    name: str, partition: int | None, *, sys_root: str = "/sys", dev_root: str = "/dev"
) -> str:
    """The device to mount: the disk itself when it has no partitions, its one partition, or
    partition number ``partition``."""
    parts = partitions(name, sys_root)
    if partition is not None:
        disk = os.path.join(sys_root, "block", name)
        wanted = [p for p in parts if read_sysfs(os.path.join(disk, p, "partition")) == str(partition)]
        if not wanted:
            raise MountError(
                f"disk {name} has no partition {partition} (it has: {', '.join(parts) or 'none'})"
            )
        return os.path.join(dev_root, wanted[0])
    if not parts:
        return os.path.join(dev_root, name)
    if len(parts) == 1:
        return os.path.join(dev_root, parts[0])
    raise MountError(
        f"disk {name} has {len(parts)} partitions ({', '.join(parts)}): say which with --partition N"
    )


def mount_readonly(device: str, mountpoint: str, options: Sequence[str] = MOUNT_OPTIONS) -> str:
    """Mount ``device`` read-only on ``mountpoint`` (created if missing); the options that worked."""
    os.makedirs(mountpoint, exist_ok=True)
    errors = []
    for opts in options:
        done = subprocess.run(["mount", "-o", opts, device, mountpoint], capture_output=True, text=True)
        if done.returncode == 0:
            return opts
        errors.append(f"-o {opts}: {' '.join(done.stderr.split()) or f'exit {done.returncode}'}")
    raise MountError(f"cannot mount {device} read-only on {mountpoint}: {'; '.join(errors)}")


def unmount_disk(
    serial: str, *, sys_root: str = "/sys", mountinfo: str = "/proc/self/mountinfo"
) -> list[str]:
    """Unmount every file system on the disk with ``serial`` (its partitions too), deepest mount
    first; the mount points. MountError if one stays mounted (busy: a shell's working directory)."""
    found = disk_devices(serial, sys_root)
    if found is None:
        return []
    try:
        with open(mountinfo, "rb") as f:
            mounts = parse_mountinfo(f.read())
    except OSError as e:
        raise MountError(f"cannot read {mountinfo}: {e}") from e
    points = sorted({m.mountpoint for m in mounts if m.device in found.devices}, key=len, reverse=True)
    for point in points:
        done = subprocess.run(["umount", point], capture_output=True, text=True)
        if done.returncode != 0:
            raise MountError(
                f"cannot unmount {point}: {' '.join(done.stderr.split())}; "
                "close what uses it and release again"
            )
    return points
