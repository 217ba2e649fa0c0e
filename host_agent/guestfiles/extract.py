"""Writing guest files into a host directory, never outside it, whatever the guest's names say.

Everything is created relative to an open descriptor of its parent directory (``dir_fd``), with
``O_EXCL``/``O_NOFOLLOW`` for files and ``mkdir`` for directories, so nothing is ever written through
a symlink, neither one the guest stored nor one already in the target. A name is one path
component: ``""``, ``.``, ``..``, anything with ``/`` or NUL is refused (a healthy file system never
holds one; a crafted one may). Symlinks are recreated verbatim and never followed, so a link to
``../../../etc/passwd`` is extracted as a link and nothing is written where it points. A name met
twice in one directory (only a crafted file system has that) is kept once.

Kept: contents, permission bits (less setuid/setgid: a hostile guest's setuid-root program must not
appear on the host), mtime and atime to the nanosecond, symlinks. Not kept: owners (a guest's uids
mean nothing on the host; the files belong to whoever runs ``get``), hard links (each name gets its
own copy), device nodes, FIFOs and sockets (skipped and reported, never created on the host).
"""
from __future__ import annotations

import contextlib
import errno
import logging
import os
import posixpath
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, Protocol

from host_agent import errors
from host_agent.guestfiles.reader import guest_path

log = logging.getLogger(__name__)

MAX_DEPTH: Final = 128  # directory levels below a requested path; deeper ones are skipped, reported
KEPT_MODE: Final = 0o1777  # permission bits and sticky: never setuid/setgid from a guest


class Entry(Protocol):
    """An entry as a tree states it (``reader.Entry``; a file-level snapshot's ``StoredEntry``)."""

    @property
    def name(self) -> str: ...
    @property
    def mode(self) -> int: ...
    @property
    def mtime_ns(self) -> int: ...
    @property
    def atime_ns(self) -> int: ...
    @property
    def target(self) -> str | None: ...
    @property
    def is_dir(self) -> bool: ...
    @property
    def is_file(self) -> bool: ...
    @property
    def is_symlink(self) -> bool: ...


class Tree(Protocol):
    """What is extracted from: the guest reader (``GuestFiles``), or a file-level snapshot
    (``storage.filesnap.FileSnapshot``)."""

    def stat(self, path: str) -> Entry: ...

    def listdir(self, path: str) -> Iterator[Entry]: ...

    def download(self, path: str, fd: int) -> None: ...


@dataclass
class Extracted:
    """What ``extract`` wrote, and what it refused (guest path, why)."""

    files: int = 0
    directories: int = 0
    symlinks: int = 0
    bytes: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def skip(self, path: str, why: str) -> None:
        log.warning("skipped %s: %s", path, why)
        self.skipped.append((path, why))


def safe_name(name: str) -> bool:
    """Whether a guest's name is one harmless path component."""
    return name not in ("", ".", "..") and "/" not in name and "\0" not in name


def extract(guest: Tree, path: str, to: Path, done: Extracted | None = None) -> Extracted:
    """Copy the guest's ``path`` (a file, symlink or whole directory) into ``to`` as
    ``to/basename(path)``; the guest root ``/`` fills ``to`` itself. ``to`` is created if missing."""
    done = done if done is not None else Extracted()
    source = guest_path(path)
    entry = guest.stat(source)
    root = _open_target(to)
    try:
        if source == "/":
            for child in guest.listdir("/"):
                _write(guest, posixpath.join("/", child.name), child, root, done, depth=1)
        else:
            _refuse_existing(root, entry.name, to)
            _write(guest, source, entry, root, done, depth=0)
    finally:
        os.close(root)
    return done


def _open_target(to: Path) -> int:
    try:
        to.mkdir(parents=True, exist_ok=True)
        return os.open(to, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        raise errors.TargetError(f"cannot use {to} as the target directory: {e.strerror}") from e


def _refuse_existing(root: int, name: str, to: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.lstat(name, dir_fd=root)
        raise errors.TargetError(f"{to / name} exists already: remove it or choose another --to")


def _write(guest: Tree, source: str, entry: Entry, parent: int, done: Extracted, depth: int) -> None:
    if not safe_name(entry.name):
        done.skip(source, f"unsafe name {entry.name!r}")
        return
    try:
        if entry.is_dir:
            _write_dir(guest, source, entry, parent, done, depth)
        elif entry.is_file:
            _write_file(guest, source, entry, parent, done)
        elif entry.is_symlink:
            _write_symlink(source, entry, parent, done)
        else:
            done.skip(source, f"{_kind(entry.mode)}: not created on the host")
    except FileExistsError:
        done.skip(source, "a second entry of the same name in its directory")
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM):
            raise errors.TargetError(f"cannot write {source} into the target: {e.strerror}") from e
        raise errors.TargetError(f"writing {source} into the target failed: {e}") from e


def _write_dir(guest: Tree, source: str, entry: Entry, parent: int, done: Extracted,
               depth: int) -> None:
    if depth > MAX_DEPTH:
        done.skip(source, f"deeper than {MAX_DEPTH} directories below the requested path")
        return
    os.mkdir(entry.name, 0o700, dir_fd=parent)  # owner-only until its own mode is set, last
    fd = os.open(entry.name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent)
    try:
        for child in guest.listdir(source):
            _write(guest, posixpath.join(source, child.name), child, fd, done, depth + 1)
        _finish(fd, entry)  # after the children: creating them changed the directory's times
    finally:
        os.close(fd)
    done.directories += 1


def _write_file(guest: Tree, source: str, entry: Entry, parent: int, done: Extracted) -> None:
    fd = os.open(entry.name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                 dir_fd=parent)
    try:
        guest.download(source, fd)
        _finish(fd, entry)
        done.bytes += os.fstat(fd).st_size
    finally:
        os.close(fd)
    done.files += 1


def _write_symlink(source: str, entry: Entry, parent: int, done: Extracted) -> None:
    if not entry.target or "\0" in entry.target:
        done.skip(source, "a symlink without a usable target")
        return
    os.symlink(entry.target, entry.name, dir_fd=parent)
    os.utime(entry.name, ns=(entry.atime_ns, entry.mtime_ns), dir_fd=parent, follow_symlinks=False)
    done.symlinks += 1


def _finish(fd: int, entry: Entry) -> None:
    os.fchmod(fd, stat.S_IMODE(entry.mode) & KEPT_MODE)
    os.utime(fd, ns=(entry.atime_ns, entry.mtime_ns))


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"),
                       (stat.S_ISFIFO, "FIFO"), (stat.S_ISSOCK, "socket")):
        if test(mode):
            return name
    return f"file of unknown type (mode {mode:o})"


__all__ = ["Extracted", "extract", "safe_name"]
