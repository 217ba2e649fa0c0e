"""Writing files so that they appear whole or not at all: the repository's documents, and the
targets of restores.
"""
from __future__ import annotations

import os
import stat
from pathlib import Path

from host_agent import errors


def fsync_dir(path: Path) -> None:
    """Make a rename or unlink in a directory durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes, tmp_dir: Path) -> None:
    """Write a file so that it appears whole or not at all, durably."""
    tmp = tmp_dir / f"{path.name}.{os.urandom(4).hex()}.tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, path)
        fsync_dir(path.parent)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if e.errno in (28, 122):  # ENOSPC, EDQUOT
            raise errors.RepositoryFull(f"the backup media is full writing {path.name}: "
                                        "free space or prune, then run again") from e
        raise errors.RepositoryIOError(f"cannot write {path}: {e.strerror}") from e


class RestoreTarget:
    """Opens a restore target; a file is written under a temporary name and renamed on commit."""

    def __init__(self, path: Path, size: int, overwrite: bool) -> None:
        self.path, self.size, self.overwrite = path, size, overwrite
        self.fd = -1
        self.is_block_device = False
        self._tmp: Path | None = None

    def __enter__(self) -> RestoreTarget:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            st = None
        except OSError as e:
            raise errors.TargetError(f"cannot use target {self.path}: {e.strerror}") from e
        if st is not None and stat.S_ISBLK(st.st_mode):
            self._open_device()
        elif st is not None and not stat.S_ISREG(st.st_mode):
            raise errors.TargetError(f"target {self.path} is neither a file nor a block device")
        else:
            if st is not None and not self.overwrite:
                raise errors.TargetError(f"target {self.path} exists; pass --overwrite to replace it")
            self._open_file()
        return self

    def _open_device(self) -> None:
        if not self.overwrite:
            raise errors.TargetError(f"target {self.path} is a block device; pass --overwrite to "
                                     "write the snapshot over its contents")
        try:
            self.fd = os.open(self.path, os.O_WRONLY | os.O_CLOEXEC | os.O_EXCL)
            dev_size = os.lseek(self.fd, 0, os.SEEK_END)
        except OSError as e:
            raise errors.TargetError(f"cannot open device {self.path}: {e.strerror}") from e
        if dev_size < self.size:
            os.close(self.fd)
            raise errors.TargetError(f"device {self.path} holds {dev_size} bytes, the snapshot {self.size}")
        self.is_block_device = True

    def _open_file(self) -> None:
        self._tmp = self.path.parent / f".{self.path.name}.hyperback-partial"
        try:
            self.fd = os.open(self._tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            os.ftruncate(self.fd, self.size)
        except OSError as e:
            self._discard()
            raise errors.TargetError(f"cannot create {self._tmp}: {e.strerror}") from e

    def commit(self, sync: bool) -> None:
        try:
            if sync:
                os.fsync(self.fd)
            if self._tmp is not None:
                os.rename(self._tmp, self.path)
                self._tmp = None
                if sync:
                    fsync_dir(self.path.parent)
        except OSError as e:
            raise errors.TargetError(f"cannot finish writing {self.path}: {e.strerror}") from e

    def _discard(self) -> None:
        if self._tmp is not None:
            self._tmp.unlink(missing_ok=True)
            self._tmp = None

    def __exit__(self, *exc: object) -> None:
        if self.fd >= 0:
            os.close(self.fd)
        self._discard()


def unmounted_mount_point(path: Path, fstab: Path = Path("/etc/fstab")) -> Path | None:
    """The mount point of ``/etc/fstab`` at or above ``path`` with nothing mounted on it, if any."""
    try:
        lines = fstab.read_text().splitlines()
    except OSError:
        return None
    points = [Path(fields[1]) for line in lines
              if (fields := line.split()) and not fields[0].startswith("#") and len(fields) > 1]
    for point in sorted(points, key=lambda p: len(p.parts), reverse=True):
        if point != Path("/") and path.is_relative_to(point) and not os.path.ismount(point):
            return point
    return None


def missing_repository(path: Path, fstab: Path = Path("/etc/fstab")) -> str:
    """Why there is no repository at ``path`` (no config file there), and what to do."""
    point = unmounted_mount_point(path, fstab)
    if point is not None:
        return (f"{path} is not a hyperback repository: its media is not mounted ({point} is a mount "
                f"point of /etc/fstab with nothing mounted on it); mount it, then try again")
    if path.is_dir() and any(path.iterdir()):
        return f"{path} is not a hyperback repository (no config file, and it is not empty): check the path"
    return (f"{path} is not a hyperback repository (no config file); create one with "
            f"'hyperback init {path}', or mount its media")
