"""Offline views: a shut-off domain's disks, read straight from their images while it cannot start.

::

    with offline_view(dom, disks, chunk_size=repo.config.chunk_size) as views:
        for view in views:                  # DiskView, as a running domain's point-in-time view gives
            repo.backup(view.source, view.disk.snapshot_name, policy)
    # the images are released: the domain may start again

A shut-off domain needs no freeze, overlay or checkpoint: its images do not change while nothing
runs it. What must not happen is that it starts while they are read. The guard is QEMU's own image
locking (``block/file-posix.c``): every QEMU process that opens an image holds shared OFD locks on
byte ``RAW_LOCK_PERM_BASE + n`` (100 + n) for each permission n it holds and on
``RAW_LOCK_SHARED_BASE + n`` (200 + n) for each permission it does not share with others, and before
it commits to them it tests, with a write lock, that nobody holds the bytes that conflict. Holding
what a reader that refuses writers holds, byte 100 (``BLK_PERM_CONSISTENT_READ``) and byte 201
(``BLK_PERM_WRITE`` not shared), makes a starting QEMU fail with *Failed to get "write" lock* (seen
through libvirt: ``virDomainCreate`` fails with QEMU's message and the domain stays shut off); once
released, the domain starts. Locks are taken, then conflicts are tested, as QEMU does, so a QEMU
starting at the same instant and this guard cannot both miss each other; the domain is asked again
whether it runs *after* the locks are held (a start may slip in between the first look and the
locks): then :class:`~host_agent.errors.DomainStarted` tells the caller to take an online view.

OFD locks (``F_OFD_SETLK``) belong to the open file description, not the process: the copier
opening and closing the same image in this process does not drop them (POSIX record locks would
be dropped by any close). Only the top image of each disk is locked: that is what a start opens for
writing; backing images are opened read-only by everyone.

The result says how it was read: ``DiskView.offline``, and ``reason`` is
:data:`OFFLINE_NOTE`; the repository compares every chunk with the base (a full read; qcow2 holes
are not read, the chain's allocation map says where data is).
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import struct
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Sequence
from typing import Any

import libvirt  # type: ignore[import-untyped]

from host_agent import errors, hypervisor
from host_agent.agent.domainxml import is_active, same_file, source_of
from host_agent.agent.views import DiskView, Views
from host_agent.model import OFFLINE_NOTE, ChangeDetection, DiskRef
from host_agent.storage import qcow2

log = logging.getLogger(__name__)

RAW_LOCK_PERM_BASE = 100
RAW_LOCK_SHARED_BASE = 200
PERM_CONSISTENT_READ = 0                  # bit numbers of QEMU's BLK_PERM_*
PERM_WRITE = 1
_FLOCK = "@hhqqi4x"                       # struct flock: l_type, l_whence, l_start, l_len, l_pid


def _flock(fd: int, cmd: int, kind: int, byte: int) -> int:
    """One fcntl record-lock call on one byte; returns the l_type the kernel gives back."""
    answer = fcntl.fcntl(fd, cmd, struct.pack(_FLOCK, kind, os.SEEK_SET, byte, 1, 0))
    return int(struct.unpack(_FLOCK, answer)[0])


class ImageGuard:
    """Holds QEMU's lock bytes of a reader that does not share WRITE on each image, until closed."""

    def __init__(self, paths: Sequence[str]) -> None:
        self.paths = tuple(paths)
        self._fds: list[int] = []

    def __enter__(self) -> ImageGuard:
        try:
            for path in self.paths:
                self._lock(path)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _lock(self, path: str) -> None:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise errors.SourceError(f"cannot open {path} to guard it: {e.strerror}") from e
        self._fds.append(fd)
        try:
            for byte in (RAW_LOCK_PERM_BASE + PERM_CONSISTENT_READ, RAW_LOCK_SHARED_BASE + PERM_WRITE):
                _flock(fd, fcntl.F_OFD_SETLK, fcntl.F_RDLCK, byte)
            # then the test QEMU makes: is there a writer (someone holding the WRITE permission)?
            writer = _flock(fd, fcntl.F_OFD_GETLK, fcntl.F_WRLCK, RAW_LOCK_PERM_BASE + PERM_WRITE)
        except OSError as e:
            if e.errno in (errno.EACCES, errno.EAGAIN):
                raise errors.ViewError(f"{path} is locked by another process (a QEMU or qemu-img using "
                                       "it): it cannot be read offline now") from e
            raise errors.SourceError(f"cannot lock {path}: {e.strerror}") from e
        if writer != fcntl.F_UNLCK:
            raise errors.ViewError(f"{path} is open for writing by another process (a running QEMU): "
                                   "it cannot be read offline")

    def close(self) -> None:
        while self._fds:
            with contextlib.suppress(OSError):
                os.close(self._fds.pop())


def _defined_disks(dom: Any) -> dict[str, ET.Element]:
    try:
        root = ET.fromstring(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
    except errors.HypervisorError as e:
        raise errors.ViewError(f"cannot read the definition of {dom.name()}: {e}") from e
    out = {}
    for disk in root.findall("./devices/disk[@device='disk']"):
        target = disk.find("target")
        if target is not None and target.get("dev"):
            out[target.get("dev", "")] = disk
    return out


def _disk_view(name: str, ref: DiskRef, elem: ET.Element | None, chunk_size: int) -> DiskView:
    if elem is None:
        raise errors.ViewError(f"{name} has no disk {ref.target} (serial {ref.serial}) any more")
    path = source_of(elem)
    if path is None or elem.get("type") not in ("file", "block"):
        raise errors.ViewError(f"{name} {ref.target} is not a file or block device disk")
    if not same_file(path, ref.path):
        raise errors.ViewError(f"{name} {ref.target} now reads {path}, not {ref.path}")
    driver = elem.find("driver")
    fmt = driver.get("type", "raw") if driver is not None else "raw"
    if fmt not in ("raw", "qcow2"):
        raise errors.ViewError(f"{name} {ref.target} is a {fmt} image; only raw and qcow2 are supported")
    layout, not_readable = None, ""
    if fmt == "qcow2":
        try:
            layout = qcow2.chain_layout(path, chunk_size, "qcow2")
            size = layout.size
        except errors.NotReadableInPlace as e:
            not_readable = str(e)
            size = qcow2.image_info(path, "qcow2").virtual_size
    else:
        size = qcow2.image_info(path, "raw").virtual_size
    return DiskView(ref, path, fmt, size, layout, None, ChangeDetection.COMPARISON, OFFLINE_NOTE, None,
                    not_readable, offline=True)


@contextlib.contextmanager
def offline_view(dom: Any, disks: Sequence[DiskRef], *, chunk_size: int) -> Iterator[Views]:
    """The views of a shut-off ``dom``'s ``disks``, its images guarded against a start until exit.

    DomainStarted if it runs (or starts before the guard holds): take an online view instead.
    """
    dom = hypervisor.guard(dom)
    name = str(dom.name())
    if is_active(dom):
        raise errors.DomainStarted(f"{name} is running")
    defined = _defined_disks(dom)
    paths = []
    for ref in disks:
        elem = defined.get(ref.target)
        path = source_of(elem) if elem is not None else None
        paths.append(path or ref.path)
    guard = ImageGuard(paths)
    try:
        guard.__enter__()
    except errors.ViewError:
        if is_active(dom):
            raise errors.DomainStarted(f"{name} started before its images could be guarded") from None
        raise
    with contextlib.closing(guard):
        if is_active(dom):
            raise errors.DomainStarted(f"{name} started before its images were guarded")
        log.info("%s: %d image(s) guarded against a start; reading offline", name, len(paths))
        views = tuple(_disk_view(name, ref, defined.get(ref.target), chunk_size) for ref in disks)
        yield Views(str(dom.UUIDString()), name, views, None, 0.0, 0.0, (OFFLINE_NOTE,))
