"""Point-in-time views of a running domain's disks, and changed-block tracking between them.

::

    with point_in_time(conn, domain, disks, chunk_size=repo.config.chunk_size,
                       freeze=shim_freeze, thaw=shim_thaw, since={"disk-1": "hyperback-..."}) as views:
        for view in views:                       # one DiskView per DiskRef, in order
            base = ...                           # the snapshot taken at checkpoint ``since``
            repo.backup(view.source, view.disk.snapshot_name, policy,
                        changes=view.changes, base=base, checkpoint=view.checkpoint)
                                                 # the snapshot keeps it: ``since`` next time
    # the domain runs on its original images again; the overlays are gone

Taking a view (measured on libvirt 9.0 / QEMU 7.2, TCG, a 64 MiB qcow2 disk under write load):

1. ``checkpointCreateXML``: a libvirt checkpoint named ``hyperback-<time>-<random>``, one
   persistent QEMU dirty bitmap per qcow2 disk (0.04-0.10 s, 0.3 s once). Taken *before* the freeze: a
   checkpoint older than the image is safe (what is written between the two is read again next
   time); a younger one would lose writes.
2. ``freeze()`` (the guest shim's FIFREEZE; may be a no-op), ``snapshotCreateXML`` with
   ``DISK_ONLY | NO_METADATA | ATOMIC``: an external qcow2 overlay per disk beside its image
   (``<image>.hb-overlay-<token>``); the image below becomes read-only and stable while the guest
   writes into the overlay (0.03-0.33 s), then ``thaw()`` at once, in a ``finally``. The guest is
   frozen only for the snapshot.
3. With ``since`` (the checkpoint of the snapshot this backup builds on), a pull-mode backup job
   (``backupBegin``, ``<incremental>since</incremental>``, an NBD unix socket, a scratch file beside
   the overlay) only to read the dirty bitmap ``qemu:dirty-bitmap:backup-<disk>`` as NBD block
   status (``nbdinfo --map``, from libnbd-bin; else ``qemu-img map`` over NBD with
   ``x-dirty-bitmap``), then ``abortJob`` (0.06-0.40 s in all). libvirt merges the ``since`` bitmaps
   of the overlay and the image, so the extents cover every write from the checkpoint until the job
   started: a superset of what changed up to the snapshot, which is all a backup needs.
4. The copier reads the stable image itself: raw images by path, qcow2 chains through
   :func:`host_agent.storage.qcow2.chain_layout` (clusters at their file offsets).
5. On exit, whatever happened: ``blockCommit(ACTIVE | SHALLOW)`` of each overlay into the image
   right below it, ``blockJobAbort(PIVOT)`` once the job is ready, the overlay file deleted
   (0.04-0.21 s); a domain paused by an I/O error during the view is resumed. libvirt carries the
   checkpoint bitmaps through the snapshot and the commit: the writes the guest made into the
   overlay show up in every checkpoint's bitmap afterwards.

What does not work, or needs care, on libvirt 9.0 / QEMU 7.2 (raw and qcow2 v2 disks, commit
after ``abortJob``, ``SHALLOW``, QEMU's mount namespace, transient domains, migrations, QEMU
killed): docs/changed-block-tracking.md, "What does not work, or needs care", which this follows.

"Since the last checkpoint": each view creates one checkpoint (``Views.checkpoint``), recorded
with the snapshot it backs up (``Snapshot.checkpoint``); ``since`` is the checkpoint of the
snapshot the repository builds on (the latest for an incremental, the latest full one for a
differential). Every checkpoint's bitmap stays active, so either works without merging;
``checkpoints.prune_checkpoints`` deletes those no chain needs. A failed view deletes its own.

Errors (drawn with the rest in ``host_agent.errors``)::

    host_agent.errors.EnvironmentProblem
    └── ViewError               libvirt or QEMU refused (the domain is back on its images)
        ├── FreezeFailed        the guest could not freeze (thaw was attempted; nothing was taken)
        ├── DomainGone          the domain stopped during the view (what could be cleaned, was)
        └── CleanupFailed       the domain may still run on an overlay: the message says how to fix it
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import libvirt  # type: ignore[import-untyped]

from host_agent import errors, hypervisor
from host_agent.agent import volatile_bitmaps
from host_agent.agent.checkpoint_record import CheckpointRecords, record_new, vouch_all
from host_agent.agent.checkpoints import (
    checkpoint_disks,
    delete_checkpoint,
    new_checkpoint_name,
    read_dirty_extents,
    wait_no_backup_job,
)
from host_agent.agent.domainxml import is_active, live_disks, same_file, source_of, xml_attr, xml_text
from host_agent.agent.overlays import (
    OVERLAY_MARK,
    OVERLAY_RE,
    SCRATCH_MARK,
    Merger,
    merge_offline,
    restore_inactive_definition,
)
from host_agent.errors import (
    CleanupFailed,
    DomainGone,
    FreezeFailed,
    HypervisorError,
    ViewError,
)
from host_agent.model import ChangeDetection, DiskRef, Fallback, FallbackNote
from host_agent.storage import qcow2
from host_agent.storage.extents import Extent, Layout

log = logging.getLogger(__name__)


Hook = Callable[[], object]


@dataclass(frozen=True)
class DiskView:
    """What to read for one disk, as it was at the view's instant.

    ``changes`` are the extents written since the ``since`` checkpoint (a superset), or None:
    then ``change_detection`` is "comparison" and ``reason`` says why. ``checkpoint`` is the
    checkpoint (raw disks: volatile bitmap) this view created that tracks the disk from now on.
    """

    disk: DiskRef
    image: str                          # the disk's own image, read-only while the view lasts
    format: str                         # "raw" or "qcow2"
    size: int                           # virtual size in bytes
    layout: Layout | None               # qcow2: the chain's clusters at their file offsets
    changes: tuple[Extent, ...] | None
    change_detection: ChangeDetection   # DIRTY_BITMAP or COMPARISON
    reason: str = ""                    # why comparison
    checkpoint: str | None = None
    not_readable: str = ""              # qcow2 only: why the chain cannot be read in place
    offline: bool = False               # read from a shut-off domain's images (agent.offline)

    @property
    def source(self) -> str | Layout:
        """What ``Repository.backup`` reads: the raw image path, or the qcow2 chain's Layout.

        Raises errors.NotReadableInPlace for a qcow2 chain the copier cannot read (compressed
        clusters, clusters below the chunk size): convert ``image`` (qcow2.convert_to_raw) instead.
        """
        if self.layout is not None:
            return self.layout
        if self.format == "raw":
            return self.image
        raise errors.NotReadableInPlace(self.not_readable or f"{self.image} cannot be read in place",
                                       self.image)


@dataclass(frozen=True)
class Views:
    """The views of one domain's disks, taken at one instant."""

    domain_uuid: str
    domain_name: str
    disks: tuple[DiskView, ...]
    checkpoint: str | None              # created with this view, None if none could be
    frozen_seconds: float               # freeze() to thaw() returning
    seconds: float                      # taking the whole view
    notes: tuple[str, ...] = field(default=())

    def __iter__(self) -> Iterator[DiskView]:
        return iter(self.disks)

    def __len__(self) -> int:
        return len(self.disks)

    def __getitem__(self, serial: str) -> DiskView:
        for view in self.disks:
            if view.disk.serial == serial:
                return view
        raise KeyError(serial)


# ---------- the view ----------

_domain_locks: dict[str, threading.Lock] = {}
_domain_locks_guard = threading.Lock()


def _domain_lock(uuid: str) -> threading.Lock:
    with _domain_locks_guard:
        return _domain_locks.setdefault(uuid, threading.Lock())


@dataclass
class _Disk:
    ref: DiskRef
    target: str
    image: str
    format: str
    trackable: bool
    reason: str = ""                    # why not trackable
    since_problem: str = ""             # why the ``since`` checkpoint cannot serve (checkpoint_record.vouch)
    overlay: str = ""
    state: str = "original"             # original -> overlay -> merged (or "unknown" if a pivot was cut)
    changes: tuple[Extent, ...] | None = None
    change_reason: str = ""
    node: str = ""                      # raw: the QEMU node its non-persistent bitmaps are on
    checkpoint: str | None = None       # the checkpoint (or raw: bitmap) the view made for it


class PointInTime:
    """Context manager of one view; see :func:`point_in_time`."""

    def __init__(self, conn: Any, domain: Any, disks: Sequence[DiskRef], *, chunk_size: int,
                 freeze: Hook | None = None, thaw: Hook | None = None, checkpoint: bool = True,
                 since: str | Mapping[str, str | None] | None = None, timeout: float = 120.0,
                 overlay_dir: str | None = None, socket_dir: str | None = None,
                 records: CheckpointRecords | None = None) -> None:
        if not disks:
            raise errors.UsageError("a view needs at least one disk")
        self.dom = (hypervisor.guard(conn).lookupByUUIDString(domain) if isinstance(domain, str)
                    else hypervisor.guard(domain))
        self.name = str(self.dom.name())
        self.uuid = str(self.dom.UUIDString())
        self.refs = tuple(disks)
        self.chunk_size = chunk_size
        self.freeze, self.thaw = freeze, thaw
        self.want_checkpoint = checkpoint
        self.since = since
        self.timeout = timeout
        self.overlay_dir = overlay_dir
        self.socket_dir = socket_dir
        self.records = records
        self.log = log.getChild(self.name)
        self.disks: list[_Disk] = []
        self.checkpoint: str | None = None
        self.notes: list[str] = []
        self._lock = _domain_lock(self.uuid)
        self._locked = False
        self._was_running = False

    # --- entering ---

    def __enter__(self) -> Views:
        self._lock.acquire()
        self._locked = True
        started = time.monotonic()
        try:
            return self._take(started)
        except BaseException as e:
            try:
                self._end(failed=True)
            except ViewError as cleanup:
                raise cleanup from e
            if isinstance(e, HypervisorError):
                if not is_active(self.dom):
                    raise DomainGone(f"{self.name} stopped while its view was taken") from e
                raise ViewError(f"cannot take a view of {self.name}: {e}") from e
            raise

    def _since_for(self, ref: DiskRef) -> str | None:
        if self.since is None or isinstance(self.since, str):
            return self.since
        return self.since.get(ref.serial)

    def _take(self, started: float) -> Views:
        if not is_active(self.dom):
            raise DomainGone(f"{self.name} is not running")
        state = self.dom.state()
        self._was_running = state[0] == libvirt.VIR_DOMAIN_RUNNING
        live = live_disks(self.dom)
        for ref in self.refs:
            self.disks.append(self._inspect(ref, live.get(ref.target)))
        self._vouch_since()
        self._create_checkpoint(live)
        frozen = self._snapshot(live)
        self._read_changes()
        views = tuple(self._disk_view(d) for d in self.disks)
        seconds = time.monotonic() - started
        self.log.info("view taken in %.3f s (frozen %.3f s), checkpoint %s", seconds, frozen, self.checkpoint)
        return Views(self.uuid, self.name, views, self.checkpoint, frozen, seconds, tuple(self.notes))

    def _inspect(self, ref: DiskRef, elem: ET.Element | None) -> _Disk:
        if elem is None:
            raise ViewError(f"{self.name} has no disk {ref.target} (serial {ref.serial})")
        path = source_of(elem)
        if path is None or elem.get("type") not in ("file", "block"):
            raise ViewError(f"{self.name} {ref.target} is not a file or block device disk")
        if not same_file(path, ref.path):
            hint = " (an overlay of an earlier view: run overlays.recover)" if OVERLAY_RE.search(path) else ""
            raise ViewError(f"{self.name} {ref.target} now reads {path}, not {ref.path}{hint}")
        try:
            if self.dom.blockJobInfo(ref.target, 0):
                raise ViewError(f"{self.name} {ref.target} has a block job running; try again later")
        except HypervisorError as e:
            raise ViewError(f"cannot ask libvirt about block jobs of {self.name} {ref.target}: {e}") from e
        driver = elem.find("driver")
        fmt = driver.get("type", "raw") if driver is not None else "raw"
        if elem.get("type") == "block" and self.overlay_dir is None:
            raise ViewError(f"{self.name} {ref.target} is a block device: give overlay_dir, a directory on "
                            "storage QEMU can write, for its overlay")
        if fmt == "raw":
            return self._raw_disk(ref, path)
        if fmt != "qcow2":
            raise ViewError(f"{self.name} {ref.target} is a {fmt} image; only raw and qcow2 are supported")
        info = qcow2.image_info(path, fmt)
        if not info.can_carry_bitmaps:
            return _Disk(ref, ref.target, path, fmt, False,
                         "a qcow2 v2 (compat=0.10) image cannot carry a persistent dirty bitmap")
        return _Disk(ref, ref.target, path, fmt, True)

    def _raw_disk(self, ref: DiskRef, path: str) -> _Disk:
        """A raw disk: tracked by a bitmap that lives as long as its QEMU process (volatile_bitmaps)."""
        try:
            node = volatile_bitmaps.top_node(self.dom, ref.target)
        except ViewError as e:
            return _Disk(ref, ref.target, path, "raw", False, f"a raw image cannot carry a persistent dirty "
                         f"bitmap, and QEMU's block node for it was not found ({e})")
        return _Disk(ref, ref.target, path, "raw", False, "", node=node)

    def _create_checkpoint(self, live: Mapping[str, ET.Element]) -> None:
        tracked = {d.target for d in self.disks if d.trackable}
        if not self.want_checkpoint or not (tracked or any(d.node for d in self.disks)):
            return
        name = new_checkpoint_name()
        for d in self.disks:
            if d.node:
                try:
                    volatile_bitmaps.add(self.dom, d.node, name)
                    d.checkpoint = self.checkpoint = name
                except ViewError as e:
                    self.notes.append(f"no dirty bitmap for {d.target} ({e}): its next backup compares")
        if not tracked:
            return
        disks = "".join(f"<disk name='{t}' checkpoint='{'bitmap' if t in tracked else 'no'}'/>" for t in live)
        xml = (f"<domaincheckpoint><name>{name}</name><description>hyperback view of "
               f"{', '.join(sorted(tracked))}</description><disks>{disks}</disks></domaincheckpoint>")
        t0 = time.monotonic()
        try:
            self.dom.checkpointCreateXML(xml, 0)
        except HypervisorError as e:
            if not is_active(self.dom):
                raise DomainGone(f"{self.name} stopped while its view was taken") from e
            self.log.warning("no checkpoint: %s", e)
            self.notes.append(f"no checkpoint was created ({e}): the next backup compares everything")
            return
        self.checkpoint = name
        for d in self.disks:
            if d.trackable:
                d.checkpoint = name
        self.log.info("checkpoint %s created in %.3f s", name, time.monotonic() - t0)
        self._record_checkpoint(name)

    # --- hyperback's checkpoint records and bitmap checks (checkpoint_record) ---

    def _record_checkpoint(self, name: str) -> None:
        if self.records is not None and (note := record_new(self.records, self.dom, name)):
            self.notes.append(note)

    def _vouch_since(self) -> None:
        wanted = {d.target: (since, d.image) for d in self.disks
                  if d.trackable and (since := self._since_for(d.ref)) is not None}
        problems = vouch_all(self.dom, wanted, self.records)
        for d in self.disks:
            d.since_problem = problems.get(d.target, "")

    def _snapshot(self, live: Mapping[str, ET.Element]) -> float:
        token = os.urandom(6).hex()
        ours = {d.target: d for d in self.disks}
        parts = []
        for target in live:
            d = ours.get(target)
            if d is None:
                parts.append(f"<disk name='{target}' snapshot='no'/>")
                continue
            d.overlay = self._beside(d.image, OVERLAY_MARK, token)
            parts.append(f"<disk name='{target}' snapshot='external' type='file'><driver type='qcow2'/>"
                         f"<source file='{xml_attr(d.overlay)}'/></disk>")
        xml = f"<domainsnapshot><disks>{''.join(parts)}</disks></domainsnapshot>"
        flags = (libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_DISK_ONLY | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_NO_METADATA
                 | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_ATOMIC)
        t0 = time.monotonic()
        if self.freeze is not None:
            try:
                self.freeze()
            except Exception as e:
                self._call_thaw()
                raise FreezeFailed(f"cannot freeze the filesystems of {self.name}: {e}") from e
        try:
            self.dom.snapshotCreateXML(xml, flags)
        except HypervisorError as e:
            if not is_active(self.dom):
                raise DomainGone(f"{self.name} stopped while its view was taken") from e
            self._adopt_overlays()  # an error that is not what happened (a lost reply) must not strand them
            raise ViewError(f"libvirt refused the point-in-time snapshot of {self.name}: {e}") from e
        finally:
            self._call_thaw()
            frozen = time.monotonic() - t0
        for d in self.disks:
            d.state = "overlay"
        live_now = live_disks(self.dom)
        for d in self.disks:
            now = source_of(live_now[d.target]) if d.target in live_now else None
            if now is None or not same_file(now, d.overlay):
                raise ViewError(f"after the snapshot {self.name} {d.target} reads {now}, not the overlay")
        self.log.info("snapshot in %.3f s (freeze to thaw)", frozen)
        return frozen

    def _adopt_overlays(self) -> None:
        """Mark the disks that run on their overlay after all, so that the cleanup merges them."""
        with contextlib.suppress(ViewError):
            live = live_disks(self.dom)
            for d in self.disks:
                elem = live.get(d.target)
                if elem is not None and d.overlay and same_file(source_of(elem) or "", d.overlay):
                    d.state = "overlay"

    def _beside(self, image: str, mark: str, token: str) -> str:
        """A temporary file's path: beside the image on the same storage, or in ``overlay_dir``."""
        folder = self.overlay_dir or os.path.dirname(image)
        return os.path.join(folder, f"{os.path.basename(image)}{mark}{token}")

    def _call_thaw(self) -> None:
        if self.thaw is None:
            return
        try:
            self.thaw()
        except Exception as e:  # the shim's watchdog thaws by itself; the view stands
            self.log.error("thaw failed: %s", e)
            self.notes.append(f"thaw failed ({e}); the guest's watchdog thaws it")

    def _read_changes(self) -> None:
        groups: dict[str, list[_Disk]] = {}
        for d in self.disks:
            since = self._since_for(d.ref)
            if d.node and since is not None:
                changes, d.change_reason = volatile_bitmaps.changes_since(self.dom, d.node, since,
                                                                          self._socket_base(), self.timeout)
                d.changes = tuple(changes) if changes is not None else None
            elif not (d.trackable or d.node):
                d.change_reason = d.reason
            elif since is None:
                d.change_reason = FallbackNote(Fallback.NO_CHECKPOINT,
                                               "no earlier checkpoint to compare with")
            elif d.since_problem:
                d.change_reason = d.since_problem
            else:
                groups.setdefault(since, []).append(d)
        for since, disks in groups.items():
            try:
                tracked = checkpoint_disks(self.dom, since)
            except HypervisorError as e:
                if not is_active(self.dom):
                    raise DomainGone(f"{self.name} stopped while its view was taken") from e
                raise ViewError(f"cannot look up checkpoint {since} of {self.name}: {e}") from e
            usable = []
            for d in disks:
                if tracked is None:
                    d.change_reason = FallbackNote(Fallback.NO_RECORD, f"{self.name} has no checkpoint "
                                                   f"{since} (deleted, or restarted as a transient domain)")
                elif d.target not in tracked:
                    d.change_reason = FallbackNote(Fallback.NOT_TRACKED,
                                                   f"checkpoint {since} does not track {d.target}")
                else:
                    usable.append(d)
            if usable:
                self._pull_dirty_maps(since, usable)

    def _pull_dirty_maps(self, since: str, disks: list[_Disk]) -> None:
        t0 = time.monotonic()
        workdir = tempfile.mkdtemp(prefix="hb-view-", dir=self._socket_base())
        sock = os.path.join(workdir, "nbd.sock")
        token = os.urandom(6).hex()
        parts = []
        for d in disks:
            scratch = self._beside(d.image, SCRATCH_MARK, token)
            parts.append(f"<disk name='{d.target}' backup='yes' type='file' backupmode='incremental' "
                         f"incremental='{xml_attr(since)}'><scratch file='{xml_attr(scratch)}'/></disk>")
        ours = {d.target for d in disks}
        parts += [f"<disk name='{t}' backup='no'/>" for t in live_disks(self.dom) if t not in ours]
        xml = (f"<domainbackup mode='pull'><incremental>{xml_text(since)}</incremental>"
               f"<server transport='unix' socket='{xml_attr(sock)}'/><disks>{''.join(parts)}</disks>"
               "</domainbackup>")
        started = False
        try:
            try:
                self.dom.backupBegin(xml, None, 0)
                started = True
                exports = ET.fromstring(self.dom.backupGetXMLDesc(0))
            except HypervisorError as e:
                if not is_active(self.dom):
                    raise DomainGone(f"{self.name} stopped while its view was taken") from e
                for d in disks:
                    d.change_reason = f"libvirt could not export the dirty bitmap of checkpoint {since}: {e}"
                self.log.warning("pull-mode backup refused: %s", e)
                return
            for d in disks:
                elem = exports.find(f"./disks/disk[@name='{d.target}']")
                export = elem.get("exportname", d.target) if elem is not None else d.target
                bitmap = elem.get("exportbitmap", f"backup-{d.target}") if elem is not None else ""
                try:
                    d.changes = tuple(read_dirty_extents(sock, export, f"qemu:dirty-bitmap:{bitmap}",
                                                         self.timeout))
                except ViewError as e:
                    d.change_reason = str(e)
                    self.log.warning("%s: %s", d.target, e)
        finally:
            if started:
                try:
                    self.dom.abortJob()
                except HypervisorError as e:
                    if is_active(self.dom):
                        self.log.warning("abortJob: %s", e)
                wait_no_backup_job(self.dom, time.monotonic() + self.timeout)
            shutil.rmtree(workdir, ignore_errors=True)
        self.log.info("dirty bitmaps since %s read in %.3f s", since, time.monotonic() - t0)

    def _socket_base(self) -> str:
        return self.socket_dir or ("/run" if os.access("/run", os.W_OK) else tempfile.gettempdir())

    def _disk_view(self, d: _Disk) -> DiskView:
        layout, not_readable = None, ""
        checkpoint = d.checkpoint
        if d.format == "qcow2":
            try:
                layout = qcow2.chain_layout(d.image, self.chunk_size, "qcow2")
                size = layout.size
            except errors.NotReadableInPlace as e:
                not_readable = str(e)
                size = qcow2.image_info(d.image, "qcow2").virtual_size
        else:
            size = qcow2.image_info(d.image, "raw").virtual_size
        detection = ChangeDetection.DIRTY_BITMAP if d.changes is not None else ChangeDetection.COMPARISON
        return DiskView(d.ref, d.image, d.format, size, layout, d.changes, detection,
                        "" if d.changes is not None else d.change_reason, checkpoint, not_readable)

    # --- leaving ---

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._end(failed=exc_type is not None)

    def _end(self, failed: bool) -> None:
        try:
            try:
                self._merge_all()
            finally:
                if failed:
                    self._drop_checkpoint()
                self._resume_if_paused()
        finally:
            if self._locked:
                self._locked = False
                self._lock.release()

    def _merge_all(self) -> None:
        t0 = time.monotonic()
        pending = [d for d in self.disks if d.state == "overlay"]
        if not pending:
            return
        deadline = time.monotonic() + self.timeout
        problem: ViewError | None = None
        if is_active(self.dom):
            mergers = []
            for d in pending:
                m = Merger(self.dom, d.target, d.overlay, d.image, deadline)
                try:
                    m.start()
                    mergers.append((d, m))
                except ViewError as e:
                    problem = problem or e
            for d, m in mergers:
                try:
                    m.finish()
                    d.state = "merged"
                except DomainGone as e:
                    problem = problem or e
                    if m.pivot_attempted:
                        d.state = "unknown"
                except ViewError as e:
                    problem = problem or e
            if problem is None:
                self.log.info("overlays merged back in %.3f s", time.monotonic() - t0)
                return
            if is_active(self.dom):
                raise problem
        self._merge_after_stop()

    def _merge_after_stop(self) -> None:
        """The domain stopped during the view: merge what is left offline, then raise DomainGone."""
        left = {d.target: d.overlay for d in self.disks if d.state == "overlay"}
        done: list[str] = []
        failures = [f"{d.target} stopped in the middle of its pivot: compare {d.overlay} with {d.image} "
                    "before deleting or merging it" for d in self.disks if d.state == "unknown"]
        for d in self.disks:
            if d.state != "overlay":
                continue
            try:
                merge_offline(d.overlay)
                d.state = "merged"
                done.append(d.target)
            except CleanupFailed as e:
                failures.append(str(e))
        try:
            restore_inactive_definition(self.dom, left)
        except CleanupFailed as e:
            failures.append(str(e))
        what = f"merged the overlays of {', '.join(done)} offline" if done else "nothing to merge"
        if failures:
            raise CleanupFailed(f"{self.name} stopped during its view; {what}; but: {'; '.join(failures)}")
        raise DomainGone(f"{self.name} stopped during its view ({what}); back it up again when it runs")

    def _drop_checkpoint(self) -> None:
        if self.checkpoint is not None and self.records is not None:
            self.records.drop(self.dom, {self.checkpoint})
        if self.checkpoint is None or not is_active(self.dom):
            return
        for d in self.disks:
            if d.node and d.checkpoint:
                with contextlib.suppress(ViewError):
                    volatile_bitmaps.remove(self.dom, d.node, d.checkpoint)
        if not any(d.trackable and d.checkpoint for d in self.disks):
            return
        try:
            delete_checkpoint(self.dom, self.checkpoint)
        except ViewError as e:
            self.log.warning("%s (prune_checkpoints removes it later)", e)

    def _resume_if_paused(self) -> None:
        """Resume a domain the view's I/O paused (an overlay on a full filesystem); log failures."""
        try:
            state, reason = self.dom.state()
            if (self._was_running and state == libvirt.VIR_DOMAIN_PAUSED
                    and reason in (libvirt.VIR_DOMAIN_PAUSED_IOERROR, libvirt.VIR_DOMAIN_PAUSED_SNAPSHOT)):
                self.log.warning("paused during the view (reason %d): resuming", reason)
                self.dom.resume()
        except (HypervisorError, ViewError) as e:
            self.log.error("could not check or resume a paused domain: %s", e)


def point_in_time(conn: Any, domain: Any, disks: Sequence[DiskRef], *, chunk_size: int,
                  freeze: Hook | None = None, thaw: Hook | None = None, checkpoint: bool = True,
                  since: str | Mapping[str, str | None] | None = None, timeout: float = 120.0,
                  overlay_dir: str | None = None, socket_dir: str | None = None,
                  records: CheckpointRecords | None = None) -> PointInTime:
    """A point-in-time view of ``disks`` of a running ``domain`` (a libvirt domain or its UUID).

    ``freeze``/``thaw`` bracket the instant (only the snapshot call runs while frozen).
    ``checkpoint`` creates a new checkpoint for the qcow2 disks (``Views.checkpoint``);
    ``since`` (one name, or a name per disk serial) asks for the extents changed since that
    checkpoint. ``timeout`` bounds each wait for libvirt jobs. Overlays (and the backup job's
    scratch files) go beside each image, or into ``overlay_dir`` (needed for block devices);
    the NBD socket into a private directory under ``socket_dir`` (default /run). Only one view
    per domain runs at a time in this process; a second one waits. ``chunk_size`` is the
    repository's. ``records`` keeps each new checkpoint's XML, and redefines ``since`` from it if
    libvirt lost it (checkpoint_record); its bitmaps are checked either way.
    """
    return PointInTime(conn, domain, disks, chunk_size=chunk_size, freeze=freeze, thaw=thaw,
                       checkpoint=checkpoint, since=since, timeout=timeout, overlay_dir=overlay_dir,
                       socket_dir=socket_dir, records=records)
