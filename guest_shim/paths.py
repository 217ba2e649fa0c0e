"""Path-level backups seen from inside the guest: where a path's file system lives (disk serial,
partition, path inside that file system), and restoring paths from a file-level snapshot's archive.

The host reads a file system from the disk's point-in-time view, not through this guest's mounts,
so a guest path is sent as the disk that holds it (its serial), the partition (0: the disk
formatted whole) and the path from the file system's own root (a bind mount's root included).
Symbolic links in the guest path are resolved first: the host sees the file system, not this
guest's view of it.

A file-level snapshot's image is a POSIX pax archive (docs/repository-format.md, the ``files``
field). To restore, the host attaches it as a read-only disk (``see`` with ``partition``), and the
archive is read from that disk with :mod:`tarfile`: entries under the asked paths are written below
a target folder, at their guest paths, with their modes and times to the nanosecond (owners are not
kept by the archive: the restorer owns what it writes, so setuid and setgid bits are dropped). The
archive is the host's word about this guest's own data; it is still written out defensively: no
name with ``..`` escapes the target, no write goes through a symbolic link (every step is taken
from a folder's descriptor opened without following links, so swapping a folder for a link
meanwhile does not help), no device or FIFO is created, and each file replaces the old one by a
rename, so an interrupted restore leaves either version, never neither.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
import tarfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import BinaryIO

from .client import Client, JobResult, ProgressCallback
from .config import ShimConfig
from .errors import InvalidArgument, ProtocolError, RestoreError, ShimError
from .freeze import Mount, disk_serial, parse_mountinfo, read_sysfs
from .protocol import LATEST, MAX_PATH, MAX_PATHS, check_guest_path
from .seen import wait_for_disk

COPY_BUFFER = 1 << 20


@dataclass(frozen=True)
class FileSystemPaths:
    """Guest paths of one file system, as the host names them."""

    serial: str  # the disk's serial
    partition: int  # 0: the disk formatted whole
    mountpoint: str  # where the file system is mounted in this guest
    root: str  # the file system's folder mounted there ("/" unless a bind mount)
    paths: tuple[str, ...]  # inside the file system, from its own root

    def guest_path(self, fs_path: str) -> str | None:
        """Where ``fs_path`` of the file system is in this guest; None if outside the mount."""
        if self.root != "/" and fs_path != self.root and not fs_path.startswith(self.root + "/"):
            return None
        inside = fs_path[len(self.root):] if self.root != "/" else fs_path
        return _join(self.mountpoint, inside)


def _join(base: str, absolute: str) -> str:
    return base.rstrip("/") + absolute if absolute != "/" else (base or "/")


def _block_device(dev: int, sys_root: str) -> tuple[str, int]:
    """The disk (its sysfs name) and partition number of block device ``dev``."""
    link = os.path.join(sys_root, "dev", "block", f"{os.major(dev)}:{os.minor(dev)}")
    if not os.path.exists(link):
        raise InvalidArgument("the path is not on a block device (a network, memory or virtual file "
                              "system): back up the disk, or a path on a disk of this VM")
    if os.path.exists(os.path.join(link, "dm")) or os.path.isdir(os.path.join(link, "md")):
        raise InvalidArgument("the path is on a device-mapper or RAID volume: the host reads plain "
                              "partitions and disks only; back up the whole disks instead")
    real = os.path.realpath(link)
    partition = read_sysfs(os.path.join(real, "partition"))
    if partition is None:
        return os.path.basename(real), 0
    return os.path.basename(os.path.dirname(real)), int(partition)


def _mount_of(path: str, mounts: Iterable[Mount]) -> Mount:
    """The mount that ``path`` (resolved, absolute) is in: the last-mounted of the longest prefix."""
    best: Mount | None = None
    for m in mounts:
        inside = path == m.mountpoint or path.startswith(m.mountpoint.rstrip("/") + "/")
        if inside and (best is None or len(m.mountpoint) >= len(best.mountpoint)):
            best = m
    if best is None:
        raise InvalidArgument(f"{path} is in no mounted file system")
    return best


def locate(paths: Sequence[str], *, sys_root: str = "/sys", mountinfo: str = "/proc/self/mountinfo",
           existing: bool = True) -> FileSystemPaths:
    """Where guest ``paths`` are, as the host names them; InvalidArgument unless they are all on
    one file system of one disk with a serial, and (``existing``: for a backup) exist."""
    if not 1 <= len(paths) <= MAX_PATHS:
        raise InvalidArgument(f"give 1 to {MAX_PATHS} paths, not {len(paths)}")
    with open(mountinfo, "rb") as f:
        mounts = parse_mountinfo(f.read())
    found: FileSystemPaths | None = None
    inside: list[str] = []
    for asked in paths:
        if not asked.startswith("/"):
            raise InvalidArgument(f"{asked!r} is not an absolute path")
        path = os.path.realpath(asked)
        if existing and not os.path.lexists(path):
            raise InvalidArgument(f"{asked} does not exist in this guest")
        mount = _mount_of(path, mounts)
        disk, partition = _block_device(mount.device, sys_root)
        serial = disk_serial(disk, sys_root)
        if not serial:
            raise InvalidArgument(f"{asked} is on disk {disk}, which has no serial: the host backs up "
                                  "only disks it gave a serial (hyperback vm enable)")
        here = FileSystemPaths(serial, partition, mount.mountpoint, mount.root, ())
        if found is not None and (found.serial, found.partition) != (serial, partition):
            raise InvalidArgument(f"{paths[0]} and {asked} are on different file systems: back them up "
                                  "in one call each")
        found = here
        fs_path = _join(mount.root, path[len(mount.mountpoint.rstrip("/")):] or "/")
        if len(fs_path) > MAX_PATH:
            raise InvalidArgument(f"{asked}: longer than {MAX_PATH} characters in its file system")
        try:
            inside.append(check_guest_path(fs_path, "path"))
        except ProtocolError as e:
            raise InvalidArgument(f"{asked}: {e}") from e
    assert found is not None
    return FileSystemPaths(found.serial, found.partition, found.mountpoint, found.root,
                           tuple(dict.fromkeys(inside)))


# --- restoring from the archive --------------------------------------------------------------


@dataclass
class Restored:
    """What a restore of paths wrote."""

    files: int = 0
    directories: int = 0
    links: int = 0
    bytes: int = 0
    skipped: list[str] = field(default_factory=list)  # archive names not written, and why
    in_the_way: list[str] = field(default_factory=list)  # entries not written: something else is there

    def to_dict(self) -> dict[str, object]:
        return {"files": self.files, "directories": self.directories, "links": self.links,
                "bytes": self.bytes, "skipped": self.skipped, "in_the_way": self.in_the_way}


def _ns(member: tarfile.TarInfo, key: str) -> int | None:
    """A pax time (``seconds.fraction``) in nanoseconds, exactly."""
    text = member.pax_headers.get(key)
    if text is None:
        return None
    whole, _, fraction = text.partition(".")
    try:
        return int(whole) * 1_000_000_000 + int((fraction + "000000000")[:9])
    except ValueError:
        return None


class _InTheWay(Exception):
    """Something that is not a folder where one is needed, or a folder where a file goes."""


KEPT_MODE = 0o1777  # owners are not restored: a setuid or setgid bit would hand the restorer's rights on
_OPEN_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW


class _Writer:
    """Writes archive entries below ``to``. Every step goes through a folder's file descriptor
    opened without following links, so nothing can steer a write outside ``to`` by swapping a
    folder for a link meanwhile; each file or link is written under a temporary name and renamed
    over the old entry, so an interrupted restore leaves the old version or the new, never neither."""

    def __init__(self, to: str) -> None:
        self.to = os.path.realpath(to)
        self.done = Restored()
        self.dir_times: list[tuple[list[str], int, int, int]] = []

    def _parts(self, guest_path: str) -> list[str]:
        parts = [p for p in guest_path.split("/") if p]
        if any(p in (".", "..") for p in parts):
            raise RestoreError(f"archive entry {guest_path!r} is not a plain path")
        return parts

    def _open_dir(self, parts: list[str], create: bool) -> int:
        """A descriptor of folder ``to``/``parts``, made (mode 0700 until its own entry says
        otherwise) where missing if ``create``; RestoreError if a component is not a folder."""
        fd = os.open(self.to, _OPEN_DIR)
        try:
            for n, part in enumerate(parts):
                try:
                    if create:
                        with contextlib.suppress(FileExistsError):
                            os.mkdir(part, 0o700, dir_fd=fd)
                    child = os.open(part, _OPEN_DIR, dir_fd=fd)
                except OSError as e:  # ELOOP: a link; ENOTDIR: a file; ENOENT: gone meanwhile
                    where = os.path.join(self.to, *parts[: n + 1])
                    raise _InTheWay(f"{where} is in the way (not a folder to enter: {e.strerror})") from e
                os.close(fd)
                fd = child
        except BaseException:
            os.close(fd)
            raise
        return fd

    def write(self, archive: tarfile.TarFile, member: tarfile.TarInfo, guest_path: str) -> None:
        parts = self._parts(guest_path)
        exact_mtime, exact_atime = _ns(member, "mtime"), _ns(member, "atime")
        mtime = int(member.mtime * 1_000_000_000) if exact_mtime is None else exact_mtime
        atime = mtime if exact_atime is None else exact_atime
        mode = stat.S_IMODE(member.mode) & KEPT_MODE
        if member.isdir():
            os.close(self._open_dir(parts, create=True))
            self.dir_times.append((parts, mode, atime, mtime))
            self.done.directories += 1
            return
        if not (member.issym() or member.isfile()) or not parts:
            self.done.skipped.append(f"{guest_path}: not a file, folder or link")
            return
        parent = self._open_dir(parts[:-1], create=True)
        try:
            self._put(archive, member, parent, parts, mode, (atime, mtime))
        finally:
            os.close(parent)
        if member.issym():
            self.done.links += 1
        else:
            self.done.files += 1
            self.done.bytes += member.size

    def _put(self, archive: tarfile.TarFile, member: tarfile.TarInfo, parent: int, parts: list[str],
             mode: int, times: tuple[int, int]) -> None:
        name = parts[-1]
        temp = f".{name[:200]}.hyperback-{secrets.token_hex(4)}"
        try:
            if member.issym():
                os.symlink(member.linkname, temp, dir_fd=parent)
                os.utime(temp, ns=times, dir_fd=parent, follow_symlinks=False)
            else:
                self._copy(archive, member, parent, temp, mode, times)
            try:
                os.rename(temp, name, src_dir_fd=parent, dst_dir_fd=parent)
            except IsADirectoryError as e:
                where = os.path.join(self.to, *parts)
                raise _InTheWay(f"{where} is a folder where the snapshot has a file") from e
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temp, dir_fd=parent)
            raise

    @staticmethod
    def _copy(archive: tarfile.TarFile, member: tarfile.TarInfo, parent: int, temp: str, mode: int,
              times: tuple[int, int]) -> None:
        source = archive.extractfile(member)
        assert source is not None
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600, dir_fd=parent)
        with os.fdopen(fd, "wb") as out:
            while True:
                block = source.read(COPY_BUFFER)
                if not block:
                    break
                out.write(block)
            out.flush()
            os.fchmod(fd, mode)
            os.utime(fd, ns=times)

    def finish(self) -> None:
        # folders last, deepest first: writing their entries changed their times
        for parts, mode, atime, mtime in reversed(self.dir_times):
            try:
                fd = self._open_dir(parts, create=False)
            except _InTheWay as e:
                self.done.in_the_way.append(str(e))
                continue
            try:
                os.fchmod(fd, mode)
                os.utime(fd, ns=(atime, mtime))
            finally:
                os.close(fd)


def restore_archive(stream: BinaryIO, where: FileSystemPaths, to: str) -> Restored:
    """Write the entries of the archive in ``stream`` that are under ``where.paths`` below folder
    ``to``, each at its guest path (``to`` + mount point + path in the mount)."""
    if not os.path.isdir(to):
        raise InvalidArgument(f"--to {to}: no such folder")
    writer = _Writer(to)
    found: set[str] = set()
    try:
        with tarfile.open(fileobj=stream, mode="r|") as archive:
            for member in archive:
                name = "/" + member.name.strip("/")
                matching = [a for a in where.paths if a == "/" or name == a or name.startswith(a + "/")]
                if not matching:
                    continue
                found.update(matching)
                guest = where.guest_path(name)
                if guest is None:
                    writer.done.skipped.append(f"{name}: outside the mount at {where.mountpoint}")
                    continue
                try:
                    writer.write(archive, member, guest)
                except _InTheWay as e:
                    writer.done.in_the_way.append(str(e))
    except (tarfile.TarError, EOFError) as e:
        raise RestoreError(f"the snapshot's archive cannot be read ({e}): is it a backup of paths?") from e
    except OSError as e:
        raise RestoreError(f"writing below {to}: {e.strerror or e}") from e
    writer.finish()
    writer.done.skipped.extend(f"{a}: not in the snapshot" for a in where.paths if a not in found)
    return writer.done


# --- the calls ----------------------------------------------------------------------------------

DISK_WAIT = 60.0  # seconds for the hot-plugged archive disk to appear (PCI hotplug under emulation is slow)


def backup_paths(paths: Sequence[str], destination: str | None = None, *, quiesce: bool | None = None,
                 timeout: float | None = None, on_progress: ProgressCallback | None = None,
                 config: ShimConfig | None = None) -> JobResult:
    """Back up guest ``paths`` (all on one file system) as a file-level snapshot and wait for the
    result: the host reads them from the disk's point-in-time view, not through this guest."""
    with Client(config) as client:
        where = locate(paths, sys_root=client.config.sysfs)
        return client.backup((where.serial,), destination, quiesce=quiesce, timeout=timeout,
                             on_progress=on_progress, paths=where.paths, partition=where.partition)


def restore_paths(paths: Sequence[str], to: str, snapshot: str = LATEST, *, destination: str | None = None,
                  timeout: float | None = None, config: ShimConfig | None = None) -> Restored:
    """Restore guest ``paths`` from a file-level snapshot (an id, or the latest backup of paths of
    their file system) below folder ``to``, each at its guest path; the snapshot's archive is read
    from a read-only disk the host attaches for the call, and given back after."""
    with Client(config) as client:
        where = locate(paths, sys_root=client.config.sysfs, existing=False)  # deleted ones above all
        seen = client.see(where.serial, snapshot, destination=destination, timeout=timeout,
                          partition=where.partition)
        try:
            name = wait_for_disk(seen.serial, time.monotonic() + DISK_WAIT, sys_root=client.config.sysfs)
            with open(f"/dev/{name}", "rb") as stream:
                return restore_archive(stream, where, to)
        finally:
            with contextlib.suppress(ShimError):
                client.release(seen.serial)
