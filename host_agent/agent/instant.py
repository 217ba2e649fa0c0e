"""Instant recovery (live-restore): a VM runs from a snapshot within seconds, whatever the disk's
size, while QEMU copies the disk to its target storage behind it.

::

    repository ── export (NBD, read-only) ◀── backing ── overlay.qcow2 ◀── the running VM
                                                            │  QEMU block job (libvirt blockCopy:
                                                            ▼  blockdev-mirror of the whole chain)
                                                         target (raw|qcow2) ── pivot ──▶ the VM runs on it

1. :meth:`InstantRecovery.start` serves the snapshot over NBD (``storage.export``), creates a
   local qcow2 overlay whose backing file is that export, points the domain's disk at the
   overlay (an explicit ``<backingStore>`` of protocol nbd, so libvirt never probes the header)
   and starts the domain: nothing was copied yet, the guest reads what it touches through NBD
   and writes into the overlay.
2. It then starts a block copy of the disk (the overlay *and* its backing chain, flattened) into
   the target, which it creates itself (``REUSE_EXT``: the format and sparseness are ours, not
   libvirt's guess). Guest writes during the copy are mirrored to the target.
3. :meth:`InstantRecovery.finish` follows the job (``blockJobInfo``) until QEMU reports it ready,
   then pivots (``blockJobAbort`` with ``PIVOT``): the domain runs on the target alone. Only
   then is the export stopped and the overlay removed, and a persistent definition rewritten to
   the target.

If the copy fails (the target's file system full, an I/O error), QEMU ends the job and the VM
keeps running on the overlay, so the export must keep serving: the recovery says FAILED with the
reason and leaves both in place until :meth:`InstantRecovery.retry` copies again (to a target
with room) or the domain is gone (:meth:`InstantRecovery.close`).
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import logging
import os
import subprocess
import time
import uuid as uuid_module
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import libvirt  # type: ignore[import-untyped]

from host_agent import errors, hypervisor
from host_agent.agent.jobs import Job, Jobs, JobState, Origin
from host_agent.agent.journal import new_job_id
from host_agent.hypervisor import Guarded
from host_agent.model import Instruction, InstructionKind, Policy
from host_agent.storage.export import SnapshotExport

log = logging.getLogger(__name__)

FORMATS = ("raw", "qcow2")
POLL_SECONDS = 0.25


class Export(Protocol):
    """A snapshot served read-only over NBD (``host_agent.storage.export.SnapshotExport``)."""

    @property
    def socket_path(self) -> Path: ...
    @property
    def uri(self) -> str: ...
    @property
    def size(self) -> int: ...
    def start(self) -> None: ...
    def stop(self) -> None: ...


class Phase(enum.StrEnum):
    STARTING = "starting"      # export, overlay, domain
    COPYING = "copying"        # the block job runs: bytes_done of bytes_total
    READY = "ready"            # copied; guest writes mirrored; pivot next
    PIVOTED = "pivoted"        # the domain runs on the target; export and overlay gone
    FAILED = "failed"          # the copy failed: the domain runs on the overlay, the export serves it

    @property
    def final(self) -> bool:
        return self in (Phase.PIVOTED, Phase.FAILED)


@dataclass(frozen=True)
class Status:
    phase: Phase
    bytes_done: int = 0
    bytes_total: int = 0
    message: str = ""


ProgressFn = Callable[[Status], None]


@dataclass(frozen=True)
class Request:
    """What to recover and where: ``disk`` is the target device (``vda``) of the disk in
    ``domain_xml`` that the snapshot becomes; its source is replaced, the rest of the definition
    (serial, bus, address) kept. ``bandwidth`` caps the copy in bytes/s (0: as fast as it goes)."""

    domain_xml: str
    disk: str
    target: Path
    fmt: str = "raw"
    bandwidth: int = 0
    persistent: bool = True

    def __post_init__(self) -> None:
        if self.fmt not in FORMATS:
            raise errors.UsageError(f"target format must be raw or qcow2, not {self.fmt!r}")
        if self.bandwidth < 0:
            raise errors.UsageError("the copy's bandwidth is bytes per second, 0 or more")
        try:
            _disk_element(ET.fromstring(self.domain_xml), self.disk)
        except ET.ParseError as e:
            raise errors.UsageError(f"the domain definition is not XML: {e}") from e


def _qemu_img(*args: str) -> None:
    try:
        subprocess.run(["qemu-img", *args], check=True, capture_output=True, text=True)
    except FileNotFoundError as e:
        raise errors.ImageError("qemu-img not found: install qemu-utils") from e
    except subprocess.CalledProcessError as e:
        raise errors.ImageError(f"qemu-img {args[0]} failed: {e.stderr.strip()}") from e


def create_overlay(path: Path, export: Export) -> None:
    """A qcow2 overlay of the export's size backed by its NBD URI. ``-u``: qemu-img must not open
    the backing file (a connection the export need not serve); the size is given instead."""
    _qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", export.uri, "-F", "raw", str(path), str(export.size))


def create_target(path: Path, fmt: str, size: int) -> None:
    """The empty target the copy fills: a sparse raw file, or a qcow2 image without backing."""
    if path.exists():
        raise errors.TargetError(f"{path} exists: choose another target or remove it first")
    try:
        if fmt == "raw":
            with open(path, "xb") as f:
                f.truncate(size)
        else:
            _qemu_img("create", "-q", "-f", "qcow2", str(path), str(size))
    except OSError as e:
        raise errors.TargetError(f"cannot create {path}: {e.strerror}: check the folder and its space") from e


def _disk_element(root: ET.Element, dev: str) -> ET.Element:
    for disk in root.iterfind("./devices/disk"):
        target = disk.find("target")
        if target is not None and target.get("dev") == dev:
            return disk
    raise errors.UsageError(f"the domain has no disk {dev!r}: name its target device (vda, sdb, ...)")


def _set_source(disk: ET.Element, path: Path, fmt: str) -> ET.Element:
    """Point ``disk`` at the file ``path`` of format ``fmt``, its old source and chain dropped."""
    for child in list(disk):
        if child.tag in ("source", "backingStore", "mirror"):
            disk.remove(child)
    disk.set("type", "file")
    driver = disk.find("driver")
    if driver is None:
        driver = ET.Element("driver", {"name": "qemu"})
        disk.insert(0, driver)
    driver.set("type", fmt)
    source = ET.Element("source", {"file": str(path)})
    disk.insert(list(disk).index(driver) + 1, source)
    return source


def overlay_xml(domain_xml: str, dev: str, overlay: Path, socket_path: Path) -> str:
    """``domain_xml`` with disk ``dev`` on ``overlay``, backed by the NBD export at ``socket_path``."""
    root = ET.fromstring(domain_xml)
    disk = _disk_element(root, dev)
    source = _set_source(disk, overlay, "qcow2")
    backing = ET.Element("backingStore", {"type": "network", "index": "1"})
    ET.SubElement(backing, "format", {"type": "raw"})
    nbd = ET.SubElement(backing, "source", {"protocol": "nbd"})
    ET.SubElement(nbd, "host", {"transport": "unix", "socket": str(socket_path)})
    ET.SubElement(backing, "backingStore")
    disk.insert(list(disk).index(source) + 1, backing)
    return ET.tostring(root, encoding="unicode")


def target_xml(domain_xml: str, dev: str, target: Path, fmt: str) -> str:
    """``domain_xml`` with disk ``dev`` on ``target`` alone (what a persistent definition keeps)."""
    root = ET.fromstring(domain_xml)
    _set_source(_disk_element(root, dev), target, fmt)
    return ET.tostring(root, encoding="unicode")


def _destination_xml(target: Path, fmt: str) -> str:
    disk = ET.Element("disk", {"type": "file"})
    ET.SubElement(disk, "source", {"file": str(target)})
    ET.SubElement(disk, "driver", {"type": fmt})
    return ET.tostring(disk, encoding="unicode")


def _free_bytes(path: Path) -> int | None:
    with contextlib.suppress(OSError):
        st = os.statvfs(path.parent)
        return st.f_bavail * st.f_frsize
    return None


class InstantRecovery:
    """One disk of one domain recovered instantly. ``start()``, then ``finish()`` (or ``status()``
    now and then, then ``finish()``); ``close()`` always."""

    def __init__(self, conn: Guarded, export: Export, request: Request, run_dir: Path) -> None:
        self.conn = conn
        self.export = export
        self.request = request
        self.run_dir = run_dir
        self.domain: Guarded | None = None
        self.overlay: Path | None = None
        self.target = request.target
        self.fmt = request.fmt
        self.phase = Phase.STARTING
        self.detail = ""
        self.started_at = 0.0
        self._export_up = False

    # --- step 1: the domain on the overlay ------------------------------------------------------

    def start(self) -> Guarded:
        """Serve the snapshot, start the domain on an overlay of it, start the copy; return the
        running domain. Anything that fails before the domain runs is undone."""
        self.started_at = time.monotonic()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.target.exists():
            raise errors.TargetError(f"{self.target} exists: choose another target or remove it first")
        try:
            self.export.start()
            self._export_up = True
            name = ET.fromstring(self.request.domain_xml).findtext("name") or "domain"
            self.overlay = self.run_dir / f"{name}-{self.request.disk}.overlay.qcow2"
            self.overlay.unlink(missing_ok=True)
            create_overlay(self.overlay, self.export)
            xml = overlay_xml(self.request.domain_xml, self.request.disk, self.overlay,
                              self.export.socket_path)
            self.domain = self._launch(xml)
        except BaseException:
            self._undo_start()
            raise
        log.info("%s runs on %s over %s after %.2f s", self.domain.name(), self.overlay, self.export.uri,
                 time.monotonic() - self.started_at)
        self._start_copy()
        return self.domain

    def _launch(self, xml: str) -> Guarded:
        dom: Guarded
        if self.request.persistent:
            dom = self.conn.defineXML(xml)
            try:
                dom.create()
            except errors.HypervisorError:
                with contextlib.suppress(errors.HypervisorError):
                    dom.undefine()
                raise
            return dom
        dom = self.conn.createXML(xml, 0)
        return dom

    def _undo_start(self) -> None:
        if self.overlay is not None:
            self.overlay.unlink(missing_ok=True)
        if self._export_up:
            self.export.stop()
            self._export_up = False

    # --- step 2: the copy -----------------------------------------------------------------------

    def _start_copy(self) -> None:
        assert self.domain is not None
        try:
            create_target(self.target, self.fmt, self.export.size)
        except errors.HyperbackError as e:  # the domain runs already: it stays on the overlay
            self._fail(str(e), own_target=False)
            return
        bandwidth = self.request.bandwidth
        params = {libvirt.VIR_DOMAIN_BLOCK_COPY_BANDWIDTH: bandwidth} if bandwidth else {}
        # REUSE_EXT: the target is ours (created above), not libvirt's guess. TRANSIENT_JOB: libvirt
        # refuses a copy of a persistent domain otherwise ("domain is not transient"), since the job
        # would not survive a managed save; a recovery that is interrupted so is run again.
        flags = libvirt.VIR_DOMAIN_BLOCK_COPY_REUSE_EXT | libvirt.VIR_DOMAIN_BLOCK_COPY_TRANSIENT_JOB
        try:
            self.domain.blockCopy(self.request.disk, _destination_xml(self.target, self.fmt), params, flags)
        except errors.HypervisorError as e:
            self.target.unlink(missing_ok=True)
            self._fail(f"the copy to {self.target} could not start: {e}")
            return
        self.phase, self.detail = Phase.COPYING, f"copying to {self.target} ({self.fmt})"

    def set_bandwidth(self, bytes_per_second: int) -> None:
        """Change the running copy's cap (0: none)."""
        assert self.domain is not None
        self.domain.blockJobSetSpeed(self.request.disk, bytes_per_second,
                                     libvirt.VIR_DOMAIN_BLOCK_JOB_SPEED_BANDWIDTH_BYTES)

    def _mirror(self) -> ET.Element | None:
        assert self.domain is not None
        root = ET.fromstring(self.domain.XMLDesc(0))
        return _disk_element(root, self.request.disk).find("mirror")

    def status(self) -> Status:
        """Where the recovery is now; a copy that ended without a pivot has failed."""
        if self.phase.final or self.phase is Phase.STARTING:
            return Status(self.phase, message=self.detail)
        assert self.domain is not None
        info = self.domain.blockJobInfo(self.request.disk, 0)
        if not info:  # the job is gone before we pivoted: QEMU ended it with an error
            self._fail(self._failure_reason())
            return Status(self.phase, message=self.detail)
        done, total = int(info.get("cur", 0)), int(info.get("end", 0))
        mirror = self._mirror()
        if total and done == total and mirror is not None and mirror.get("ready") == "yes":
            self.phase, self.detail = Phase.READY, f"copied to {self.target}; pivoting"
        return Status(self.phase, done, total, self.detail)

    def _failure_reason(self) -> str:
        free = _free_bytes(self.target)
        # QEMU's error stays in its log; a file system all but full is the cause worth naming
        hint = (f"its file system has {free} bytes free: make room or choose another target"
                if free is not None and free < 16 << 20 else
                "see libvirt's log of the domain for QEMU's error")
        return f"the copy to {self.target} failed ({hint})"

    def _fail(self, reason: str, own_target: bool = True) -> None:
        self.phase = Phase.FAILED
        self.detail = (f"{reason}; the VM keeps running on the overlay {self.overlay}, "
                       f"served from {self.export.uri}: retry the copy to a target with room")
        log.error("%s", self.detail)
        if own_target:
            self.target.unlink(missing_ok=True)  # a partial copy is of no use to anyone

    # --- step 3: pivot --------------------------------------------------------------------------

    def finish(self, progress: ProgressFn | None = None, timeout: float | None = None) -> Status:
        """Follow the copy to its end: pivot once it is ready (PIVOTED), or report FAILED."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            st = self.status()
            if progress is not None:
                progress(st)
            if st.phase is Phase.READY:
                return self._pivot(progress)
            if st.phase.final:
                return st
            if deadline is not None and time.monotonic() > deadline:
                raise errors.Cancelled(f"the copy to {self.target} is still running after {timeout} s")
            time.sleep(POLL_SECONDS)

    def _pivot(self, progress: ProgressFn | None) -> Status:
        assert self.domain is not None
        try:
            self.domain.blockJobAbort(self.request.disk, libvirt.VIR_DOMAIN_BLOCK_JOB_ABORT_PIVOT)
        except errors.HypervisorError as e:
            self._fail(f"the pivot to {self.target} failed: {e}")
            return Status(self.phase, message=self.detail)
        if self.domain.isPersistent():
            inactive = self.domain.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
            self.conn.defineXML(target_xml(inactive, self.request.disk, self.target, self.fmt))
        self._release_export()
        self.phase = Phase.PIVOTED
        self.detail = f"runs on {self.target} after {time.monotonic() - self.started_at:.1f} s"
        st = Status(self.phase, self.export.size, self.export.size, self.detail)
        if progress is not None:
            progress(st)
        return st

    def _release_export(self) -> None:
        if self.overlay is not None:
            self.overlay.unlink(missing_ok=True)
        if self._export_up:
            self.export.stop()
            self._export_up = False

    def abort(self, reason: str) -> Status:
        """Stop the copy without a pivot (an operator's cancel): the VM stays on the overlay."""
        if self.phase in (Phase.COPYING, Phase.READY):
            assert self.domain is not None
            self.domain.blockJobAbort(self.request.disk, 0)
            self._fail(reason)
        return Status(self.phase, message=self.detail)

    # --- after a failure ------------------------------------------------------------------------

    def retry(self, target: Path | None = None, fmt: str | None = None) -> None:
        """Copy again (after a failure), to ``target`` if given; then ``finish()`` as before."""
        if self.phase is not Phase.FAILED:
            raise errors.UsageError(f"the recovery is {self.phase}: only a failed copy is retried")
        self.target = target or self.target
        self.fmt = fmt or self.fmt
        self._start_copy()

    def close(self) -> None:
        """Stop the export unless a running domain still reads it (a failed copy): then say so."""
        if not self._export_up:
            return
        if self.domain is not None and self.domain_running():
            log.warning("%s still runs on %s: its export stays up", self.domain.name(), self.overlay)
            return
        self._release_export()

    def domain_running(self) -> bool:
        """Whether the recovered domain still runs (on the overlay or the target)."""
        if self.domain is None:
            return False
        try:
            return bool(self.domain.isActive())
        except errors.NoDomain:
            return False


# --- the door other parts use -------------------------------------------------------------------

ExportFactory = Callable[[Any, str, Path], Export]
"""(repository, snapshot spec, run folder) -> an export not yet started."""


def snapshot_export(repository: Any, spec: str, run_dir: Path) -> Export:
    """The repository's own NBD export of a snapshot (nbdkit, ``storage/export.py``), its socket
    named short: a unix socket's path has at most 107 bytes, and a snapshot id is 64."""
    return SnapshotExport(repository, spec, run_dir, socket_path=run_dir / "export.sock")


def instant_restore(conn: Guarded, repository: Any, snapshot: str, request: Request, run_dir: Path,
                    export_factory: ExportFactory = snapshot_export) -> InstantRecovery:
    """Materialize a disk instantly: the domain of ``request`` runs on ``snapshot`` when this
    returns, and its copy to ``request.target`` runs; ``finish()`` follows it to the pivot."""
    snap = repository.resolve(snapshot)  # SnapshotNotFound before anything starts
    recovery = InstantRecovery(conn, export_factory(repository, snap.id, run_dir), request, run_dir)
    recovery.start()
    return recovery


def new_identity(domain_xml: str, name: str | None = None) -> str:
    """``domain_xml`` as a new domain: ``name`` if given, a fresh UUID, and no MAC addresses (libvirt
    makes new ones), so it may run beside the domain it was taken from."""
    root = ET.fromstring(domain_xml)
    if name:
        elem = root.find("name")
        if elem is None:
            elem = ET.SubElement(root, "name")
        elem.text = name
    uuid_elem = root.find("uuid")
    if uuid_elem is None:
        uuid_elem = ET.Element("uuid")
        root.insert(1, uuid_elem)
    uuid_elem.text = str(uuid_module.uuid4())
    for iface in root.iterfind("./devices/interface"):
        for mac in iface.findall("mac"):
            iface.remove(mac)
    return ET.tostring(root, encoding="unicode")


# --- the agent's instant recoveries, as jobs ----------------------------------------------------

class InstantJobs:
    """Runs instant recoveries for the operator API, each as a job (kind INSTANT_RESTORE) whose
    progress is the copy's; a failed one's recovery is kept, since its domain still reads the
    export, and closed with the agent."""

    def __init__(self, jobs: Jobs, destinations: Any, uri: str, run_dir: Path,
                 export_factory: ExportFactory = snapshot_export, poll: float = 0.5) -> None:
        self.jobs, self.destinations, self.uri = jobs, destinations, uri
        self.run_dir, self.export_factory, self.poll = run_dir, export_factory, poll
        self.recoveries: dict[str, InstantRecovery] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    async def submit(self, snapshot: str, destination: str, request: Request) -> Job:
        """Start one recovery in the background; its job at once (QUEUED)."""
        root = ET.fromstring(request.domain_xml)
        name = root.findtext("name") or ""
        if not name:
            raise errors.UsageError("the domain definition has no <name>")
        _disk_element(root, request.disk)
        xml = request.domain_xml if root.findtext("uuid") else new_identity(request.domain_xml)
        request = dataclasses.replace(request, domain_xml=xml)
        repository = await asyncio.to_thread(self.destinations.repository, destination)
        snap = await asyncio.to_thread(repository.resolve, snapshot)
        instruction = Instruction(new_job_id(), ET.fromstring(xml).findtext("uuid") or "", new_job_id(),
                                  InstructionKind.INSTANT_RESTORE, (), destination, Policy.FULL, snap.id,
                                  time.time())
        job = self.jobs.add(instruction, Origin.OPERATOR, name)
        recovery = InstantRecovery(hypervisor.connect(self.uri),
                                   self.export_factory(repository, snap.id, self.run_dir / job.id),
                                   request, self.run_dir / job.id)
        self.recoveries[job.id] = recovery
        task = asyncio.create_task(self._run(job, recovery))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return job

    async def _run(self, job: Job, recovery: InstantRecovery) -> None:
        await self.jobs.move(job.id, JobState.RUNNING, "serving the snapshot; starting the domain on it")
        try:
            await asyncio.to_thread(recovery.start)
            while True:
                if job.cancel.cancelled:
                    st = await asyncio.to_thread(recovery.abort, "the copy was cancelled")
                    await self.jobs.move(job.id, JobState.CANCELLED, st.message)
                    await self._linger(job.id, recovery)
                    return
                st = await asyncio.to_thread(recovery.status)
                if st.phase is Phase.READY:
                    st = await asyncio.to_thread(recovery.finish)
                if st.phase.final:
                    break
                await self.jobs.step(job.id, st.message, st.bytes_done, st.bytes_total)
                await asyncio.sleep(self.poll)
        except errors.HyperbackError as e:
            await self.jobs.move(job.id, JobState.FAILED, str(e))
            await self._linger(job.id, recovery)
            return
        if st.phase is Phase.PIVOTED:
            self.recoveries.pop(job.id, None)
            await self.jobs.step(job.id, st.message, st.bytes_done, st.bytes_total)  # all copied
            await self.jobs.move(job.id, JobState.SUCCEEDED, st.message)
            return
        await self.jobs.move(job.id, JobState.FAILED, st.message)
        await self._linger(job.id, recovery)

    async def _linger(self, job_id: str, recovery: InstantRecovery) -> None:
        """A failed recovery's domain reads its export until it stops: then the export goes too."""
        while await asyncio.to_thread(recovery.domain_running):
            await asyncio.sleep(self.poll * 10)
        await asyncio.to_thread(recovery.close)
        self.recoveries.pop(job_id, None)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for recovery in self.recoveries.values():
            await asyncio.to_thread(recovery.close)
