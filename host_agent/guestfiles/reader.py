"""Reading a guest's file systems from a block device served over NBD, inside libguestfs's appliance.

A guest's file system is hostile input: a crafted superblock or directory is an attack on whatever
parses it. The host's kernel never parses it here. libguestfs boots a small VM of its own (the
appliance: its own kernel, no network), attaches the NBD export to it as a read-only drive (writes,
such as an ext4 journal replay, go to a throwaway overlay) and mounts the file system in *that*
kernel; this module only exchanges requests with the appliance's daemon. What comes back (names,
link targets, sizes) is still the guest's word: ``extract`` writes it out without trusting it.

The only module that imports libguestfs's binding, and where its errors (``RuntimeError``, whose
message ends with the appliance's errno as text) become ours:

* ENOENT, ENOTDIR, EISDIR, EINVAL: ``GuestPathError`` (the user named something the guest lacks);
* EIO, EUCLEAN (``EFSCORRUPTED``), EBADMSG, or a mount that fails: ``DamagedFileSystem``;
* anything else, and an appliance that does not start: ``ReaderError``.

Measured (libguestfs 1.48, QEMU 7.2, TCG on 2 busy cores): the appliance launches in 20–31 s, about
all of a ``hyperback files`` call; under KVM libguestfs documents 3–5 s.
"""
from __future__ import annotations

import errno
import logging
import os
import posixpath
import stat as stat_mod
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Final

from host_agent import errors

log = logging.getLogger(__name__)

BATCH: Final = 512  # names per lstatnslist/readlinklist call: far below the 4 MiB message limit
NOT_MOUNTABLE: Final = frozenset({"unknown", "swap"})
PATH_ERRNOS: Final = frozenset({errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.EINVAL, errno.ENAMETOOLONG})
DAMAGE_ERRNOS: Final = frozenset({errno.EIO, errno.EUCLEAN, errno.EBADMSG})


@dataclass(frozen=True)
class ReaderSettings:
    """How the appliance runs. ``tcg``: True emulates instead of using KVM; None (auto) tries KVM
    and falls back to emulation if the appliance does not start (a nested host's KVM may abort);
    ``memory_mib``: the appliance's RAM (reading needs little; the libguestfs default of 1280 MiB
    crowds a small host)."""

    tcg: bool | None = None
    memory_mib: int = 512


@dataclass(frozen=True)
class FileSystem:
    device: str  # as the appliance names it: /dev/sda (bare), /dev/sda1 (partition), /dev/vg/lv
    kind: str  # ext4, xfs, vfat, … ; "unknown" or "swap" cannot be browsed
    label: str
    size: int

    @property
    def mountable(self) -> bool:
        return self.kind not in NOT_MOUNTABLE


@dataclass(frozen=True)
class Entry:
    """One directory entry as the guest's file system states it (lstat: a symlink is itself)."""

    name: str
    mode: int
    size: int
    mtime_ns: int
    atime_ns: int
    target: str | None = None  # a symlink's target, verbatim

    @property
    def is_dir(self) -> bool:
        return stat_mod.S_ISDIR(self.mode)

    @property
    def is_file(self) -> bool:
        return stat_mod.S_ISREG(self.mode)

    @property
    def is_symlink(self) -> bool:
        return stat_mod.S_ISLNK(self.mode)


def guest_path(path: str) -> str:
    """A user's guest path as the appliance wants it: absolute and normalized (``..`` cannot climb
    above the guest's root, which is all the appliance would let it reach anyway)."""
    if "\0" in path:
        raise errors.GuestPathError(f"guest path {path!r} contains a NUL byte")
    return posixpath.normpath("/" + path.lstrip("/")) if path.strip("/") else "/"


def _ends_with_strerror(message: str, codes: frozenset[int]) -> bool:
    """Whether the appliance's message reports one of these errno values. The Python binding
    raises a bare RuntimeError without ``guestfs_last_errno``; the daemon ends each message with
    the C library's text of the errno, which is the host's too (both are glibc)."""
    return any(message.endswith(os.strerror(code)) for code in codes)


def _one_line(e: RuntimeError) -> str:
    """The appliance's message without the call's name, on one line (mount's spans several)."""
    return " ".join(str(e).split(": ", 1)[-1].split())


def _statable(name: str) -> bool:
    """Whether a name read from a directory names one entry in it. Only a crafted file system
    returns others (``y/y``); they are listed with mode 0 and never looked up."""
    return bool(name) and "/" not in name and "\0" not in name


def _entry(name: str, st: dict[str, int], target: str | None = None) -> Entry:
    return Entry(name=name, mode=st["st_mode"], size=st["st_size"],
                 mtime_ns=st["st_mtime_sec"] * 1_000_000_000 + st["st_mtime_nsec"],
                 atime_ns=st["st_atime_sec"] * 1_000_000_000 + st["st_atime_nsec"], target=target)


class GuestFiles:
    """The file systems of one block device, read in a libguestfs appliance::

        with GuestFiles(export.socket_path, ReaderSettings(tcg=True)) as guest:
            guest.mount(None)                 # the only file system, or name one: "/dev/sda1"
            for entry in guest.listdir("/etc"): ...
    """

    def __init__(self, nbd_socket: Path, settings: ReaderSettings = ReaderSettings(),
                 image_format: str | None = None) -> None:
        """``nbd_socket``: an NBD export's unix socket; or, with ``image_format`` (raw, qcow2), an
        image file, such as a point-in-time view's (path-level backups)."""
        self.nbd_socket = Path(nbd_socket)
        self.settings = settings
        self.image_format = image_format
        self._g: Any = None
        self.mounted: FileSystem | None = None

    def __enter__(self) -> GuestFiles:
        self.launch()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def launch(self) -> None:
        """Boot the appliance with the NBD export as its only drive, read-only: under KVM, else
        (``tcg`` None) under TCG; a start that fails is tried once more before giving up (a QEMU
        helper that dies at start must not fail a whole backup)."""
        modes = [False, True, True] if self.settings.tcg is None else [self.settings.tcg] * 2
        for attempt, tcg in enumerate(modes, 1):
            try:
                self._launch(tcg)
                return
            except errors.ReaderError as e:
                if attempt == len(modes):
                    raise
                then = "trying TCG emulation (--tcg skips KVM)" if tcg != modes[attempt] else "trying again"
                log.warning("the reader's appliance did not start under %s; %s: %s",
                            "TCG" if tcg else "KVM", then, " ".join(str(e).split())[:400])

    def _launch(self, tcg: bool) -> None:
        try:
            import guestfs
        except ImportError as e:
            raise errors.ReaderError("libguestfs's Python binding is missing: install libguestfs-tools and "
                                     "python3-guestfs (.ci/setup links the binding into the venv)") from e
        g = guestfs.GuestFS(python_return_dict=True, close_on_exit=True)
        self._g = g
        try:
            g.set_backend("direct")  # no libvirtd between us and the appliance: nothing left behind
            if tcg:
                g.set_backend_settings(["force_tcg"])
            g.set_memsize(self.settings.memory_mib)
            g.set_network(False)
            g.set_program("hyperback")
            if self.image_format is not None:
                g.add_drive_opts(str(self.nbd_socket), readonly=True, format=self.image_format)
            else:
                g.add_drive_opts("", protocol="nbd", server=[f"unix:{self.nbd_socket}"], readonly=True,
                                 format="raw")
            g.launch()
        except RuntimeError as e:
            self.close()
            hint = "" if tcg else "; where KVM is absent or broken (a nested guest), pass --tcg"
            raise errors.ReaderError(f"libguestfs could not start its appliance: {e} (run "
                                     f"libguestfs-test-tool to see why{hint})") from e

    def close(self) -> None:
        """Stop the appliance; idempotent."""
        g, self._g = self._g, None
        if g is not None:
            try:
                g.shutdown()
            except RuntimeError as e:
                log.warning("the libguestfs appliance did not shut down cleanly: %s", e)
            g.close()

    def _call(self, what: str, fn: Callable[..., Any], *args: Any) -> Any:
        if self._g is None:
            raise errors.ReaderError("the guest reader is closed")
        try:
            return fn(*args)
        except RuntimeError as e:
            raise self._error(what, e) from e
        except UnicodeDecodeError as e:
            raise errors.GuestPathError(f"{what}: the guest's names are not UTF-8 ({e.reason}); "
                                       "restore the whole disk to reach them") from e

    def _error(self, what: str, e: RuntimeError) -> errors.HyperbackError:
        message = _one_line(e)
        if _ends_with_strerror(message, PATH_ERRNOS):
            return errors.GuestPathError(f"{what}: {message}")
        if _ends_with_strerror(message, DAMAGE_ERRNOS):
            return errors.DamagedFileSystem(f"{what}: the guest's file system is damaged ({message}); the "
                                            "snapshot holds it as the guest wrote it: restore the whole disk "
                                            "and repair a copy (e2fsck, xfs_repair)")
        return errors.ReaderError(f"{what}: {message}")

    def filesystems(self) -> list[FileSystem]:
        """Every file system libguestfs finds on the drive (partitions, LVM, the bare device)."""
        found = self._call("listing file systems", self._g.list_filesystems)
        return [self._describe(device, kind) for device, kind in sorted(found.items())]

    def _describe(self, device: str, kind: str) -> FileSystem:
        label = ""
        if kind not in NOT_MOUNTABLE:
            try:
                label = self._g.vfs_label(device)
            except RuntimeError:
                label = ""  # a file system without labels (or a damaged one): only a description
        size = self._call(f"size of {device}", self._g.blockdev_getsize64, device)
        return FileSystem(device=device, kind=kind, label=label, size=size)

    def choose(self, device: str | None) -> FileSystem:
        """The file system to browse: the named one, or the only mountable one."""
        found = self.filesystems()
        if device is not None:
            for fs in found:
                if fs.device == device:
                    return fs
            names = ", ".join(f.device for f in found) or "none"
            raise errors.GuestPathError(f"the snapshot has no file system {device} (it has: {names})")
        usable = [fs for fs in found if fs.mountable]
        if len(usable) == 1:
            return usable[0]
        if not usable:
            raise errors.DamagedFileSystem(
                "the snapshot's disk holds no file system the reader recognizes: it is damaged, encrypted "
                "or not formatted" + (f" (found: {', '.join(f'{f.device} {f.kind}' for f in found)})"
                                      if found else ""))
        raise errors.GuestPathError("the snapshot's disk has several file systems ("
                                    + ", ".join(f"{f.device} {f.kind}" for f in usable)
                                    + "): pick one with --fs")

    def mount(self, device: str | None) -> FileSystem:
        """Mount the chosen file system read-only at the guest root, in the appliance."""
        fs = self.choose(device)
        if not fs.mountable:
            raise errors.GuestPathError(f"{fs.device} holds {fs.kind}, not a file system that can be browsed")
        try:
            self._g.mount_ro(fs.device, "/")
        except RuntimeError as e:
            why = _one_line(e)
            raise errors.DamagedFileSystem(
                f"the {fs.kind} file system on {fs.device} cannot be mounted, even read-only, in the "
                f"isolated reader: it is damaged ({why}); the snapshot holds it as the guest wrote it: "
                "restore the whole disk and repair a copy") from e
        self.mounted = fs
        return fs

    def stat(self, path: str) -> Entry:
        """The entry at ``path`` itself (a symlink is not followed)."""
        path = guest_path(path)
        st = self._call(f"{path}", self._g.lstatns, path)
        target = self._call(f"{path}", self._g.readlink, path) if stat_mod.S_ISLNK(st["st_mode"]) else None
        return _entry(posixpath.basename(path) or "/", st, target)

    def is_file(self, path: str) -> bool:
        """Whether ``path`` is a regular file once the guest's symlinks are followed (inside the
        guest's root: the appliance resolves them there)."""
        path = guest_path(path)
        return stat_mod.S_ISREG(self._call(path, self._g.statns, path)["st_mode"])

    def listdir(self, path: str) -> Iterator[Entry]:
        """The entries of a directory, by name, without ``.`` and ``..``."""
        path = guest_path(path)
        if not self.stat(path).is_dir:
            raise errors.GuestPathError(f"{path} is not a directory in the guest")
        names = sorted(d["name"] for d in self._call(path, self._g.readdir, path)
                       if d["name"] not in (".", ".."))
        for name in names:
            if not _statable(name):
                yield Entry(name=name, mode=0, size=0, mtime_ns=0, atime_ns=0)  # no such name is stat-able
        names = [n for n in names if _statable(n)]
        for start in range(0, len(names), BATCH):
            batch = names[start:start + BATCH]
            stats = self._call(path, self._g.lstatnslist, path, batch)
            links = [n for n, st in zip(batch, stats, strict=True) if stat_mod.S_ISLNK(st["st_mode"])]
            read = self._call(path, self._g.readlinklist, path, links) if links else []
            targets = dict(zip(links, read, strict=True))
            for name, st in zip(batch, stats, strict=True):
                yield _entry(name, st, targets.get(name))

    def download(self, path: str, fd: int) -> None:
        """Write the contents of the guest's file ``path`` to the open descriptor ``fd``, from its
        current offset.

        libguestfs opens the file name it is given with O_TRUNC, and ``/dev/fd/N`` reopens N's file:
        handed stdout redirected to a file (``>> log``) it would truncate that file. So it gets a
        pipe, and a thread pumps the pipe into ``fd`` (the binding releases the GIL meanwhile)."""
        path = guest_path(path)
        pump = _Pump(fd)
        try:
            self._call(path, self._g.download, path, f"/dev/fd/{pump.inlet}")
        except errors.HyperbackError:
            pump.finish()
            if pump.failure is not None:
                raise pump.failure from None  # the destination failed first: that is the news
            raise
        pump.finish()
        if pump.failure is not None:
            raise pump.failure


class _Pump:
    """A pipe whose contents a thread writes to ``fd``; on a write error it closes the pipe's read
    end, so that the writer fails at once rather than filling a pipe nobody drains."""

    def __init__(self, fd: int) -> None:
        self._out, self.inlet = os.pipe2(os.O_CLOEXEC)
        self._fd = fd
        self.failure: errors.HyperbackError | None = None
        self._thread = threading.Thread(target=self._run, name="guestfiles-pump", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while block := os.read(self._out, 1 << 20):
                view = memoryview(block)
                while view:
                    view = view[os.write(self._fd, view):]
        except OSError as e:
            self.failure = errors.TargetError(f"cannot write the file's contents out: {e.strerror}")
        finally:
            os.close(self._out)

    def finish(self) -> None:
        os.close(self.inlet)
        self._thread.join()


__all__ = ["Entry", "FileSystem", "GuestFiles", "ReaderSettings", "guest_path"]
