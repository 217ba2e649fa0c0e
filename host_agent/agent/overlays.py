"""Overlays: where a running domain writes while its images are read, and merging them back.

A view puts an external qcow2 overlay on each disk (``<image>.hb-overlay-<token>``) and, when the
backup is done, commits it back into the image below (:class:`Merger`: ``blockCommit(ACTIVE |
SHALLOW)``, then a pivot). A domain that stopped meanwhile has its overlays merged offline
(:func:`merge_offline`) and its definition pointed back at its images. What a view left behind
when its process died is undone by :func:`recover`.
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import subprocess
import time
import xml.etree.ElementTree as ET
from collections.abc import Mapping, Sequence
from typing import Any

import libvirt  # type: ignore[import-untyped]

from host_agent import hypervisor
from host_agent.agent.checkpoints import wait_no_backup_job
from host_agent.agent.domainxml import is_active, live_disks, same_file, source_of
from host_agent.errors import (
    CleanupFailed,
    DomainGone,
    HypervisorError,
    NoBackupJob,
    NoDomain,
    OperationInvalid,
    ViewError,
)
from host_agent.storage import qcow2

log = logging.getLogger(__name__)

OVERLAY_MARK = ".hb-overlay-"
SCRATCH_MARK = ".hb-scratch-"
OVERLAY_RE = re.compile(re.escape(OVERLAY_MARK) + r"[0-9a-f]{12}$")
TOOL_TIMEOUT = 120.0


def run_tool(cmd: Sequence[str], what: str, timeout: float = TOOL_TIMEOUT) -> None:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise CleanupFailed(f"cannot {what}: {e}") from e
    if out.returncode != 0:
        raise CleanupFailed(f"cannot {what}: {out.stderr.strip()}")


def pop_top_layer(disk: ET.Element, overlay: str) -> bool:
    """Rewrite a ``<disk>`` whose source is ``overlay`` to the image below it; True if changed."""
    src = disk.find("source")
    if src is None or not same_file(src.get("file") or "", overlay):
        return False
    below = disk.find("backingStore")
    below_src = below.find("source") if below is not None else None
    if below is None or below_src is None:
        return False
    disk.set("type", below.get("type", disk.get("type", "file")))  # a block device is type='block'
    src.attrib.clear()
    src.attrib.update(below_src.attrib)
    for child in list(src):
        src.remove(child)
    for child in below_src:
        src.append(child)
    fmt = below.find("format")
    driver = disk.find("driver")
    if fmt is not None and driver is not None and fmt.get("type"):
        driver.set("type", fmt.get("type", ""))
    deeper = below.find("backingStore")
    disk.remove(below)
    if deeper is not None:
        disk.insert(list(disk).index(src) + 1, deeper)
    return True


def restore_inactive_definition(dom: Any, overlays: Mapping[str, str]) -> bool:
    """Point a persistent domain's inactive definition back at the images below ``overlays``."""
    dom = hypervisor.guard(dom)
    try:
        if not dom.isPersistent():


            return False
        root = ET.fromstring(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE | libvirt.VIR_DOMAIN_XML_SECURE))
    except HypervisorError as e:
        if isinstance(e, NoDomain):
            return False
        raise CleanupFailed(f"cannot read the definition of {dom.name()}: {e}") from e
    changed = False
    for disk in root.findall("./devices/disk"):
        target = disk.find("target")
        dev = target.get("dev", "") if target is not None else ""
        if dev in overlays and pop_top_layer(disk, overlays[dev]):
            changed = True
    if changed:
        try:
            dom.connect().defineXML(ET.tostring(root, encoding="unicode"))
        except HypervisorError as e:
            raise CleanupFailed(f"cannot point the definition of {dom.name()} back at its images: {e}") from e
        log.warning("%s: the inactive definition pointed at the view's overlays; rewritten", dom.name())
    return changed


def merge_offline(overlay: str) -> None:
    """Merge an overlay of a stopped domain into the image below it, then delete it.

    ``qemu-img commit`` takes the write lock (so it fails while any QEMU still uses the image),
    and the image's enabled persistent bitmaps record what it writes: checkpoints stay valid.
    """
    if not os.path.exists(overlay):
        return
    run_tool([qcow2.QEMU_IMG, "commit", "-q", "-f", "qcow2", overlay],
              f"merge {overlay} into its backing image")
    os.unlink(overlay)
    log.warning("merged the overlay %s offline and deleted it", overlay)


class Merger:
    """Commits one overlay back into the image below it while the domain runs."""

    def __init__(self, dom: Any, target: str, overlay: str, image: str, deadline: float) -> None:
        self.dom = hypervisor.guard(dom)
        self.target, self.overlay, self.image, self.deadline = target, overlay, image, deadline
        self.pivot_attempted = False  # once True, a domain that stops leaves it unclear where it ended

    def _on_overlay(self) -> bool:
        disk = live_disks(self.dom).get(self.target)
        return disk is not None and same_file(source_of(disk) or "", self.overlay)

    def _job(self) -> dict[str, int]:
        info = self.dom.blockJobInfo(self.target, 0)
        return dict(info) if info else {}

    def _fail(self, why: str) -> CleanupFailed:
        return CleanupFailed(
            f"{self.dom.name()} {self.target} still writes into the overlay {self.overlay} ({why}); "
            f"merge it with 'virsh blockcommit {self.dom.name()} {self.target} --active --shallow --pivot' "
            f"and delete the file")

    def start(self) -> None:
        """Start the active commit, waiting out a job that still holds the disk."""
        flags = libvirt.VIR_DOMAIN_BLOCK_COMMIT_ACTIVE | libvirt.VIR_DOMAIN_BLOCK_COMMIT_SHALLOW
        while True:
            try:
                self.dom.blockCommit(self.target, None, None, 0, flags)
                return
            except HypervisorError as e:
                if not is_active(self.dom):
                    raise DomainGone(f"{self.dom.name()} stopped while its view ended") from e
                job = self._job()
                if job.get("type") == libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_ACTIVE_COMMIT:
                    return  # already committing (a retry, or recovery after a crash)
                if time.monotonic() > self.deadline:
                    raise self._fail(f"blockCommit refused: {e}") from e
                log.debug("%s: blockCommit refused (%s), retrying", self.target, e)
                time.sleep(0.05)

    def finish(self) -> None:
        """Pivot once the commit is ready; verify; delete the overlay."""
        restarted = False
        while True:
            try:
                job = self._job()
                if job and job.get("cur") == job.get("end"):
                    self.pivot_attempted = True
                    self.dom.blockJobAbort(self.target, libvirt.VIR_DOMAIN_BLOCK_JOB_ABORT_PIVOT)
                    break
                if not job:
                    if not self._on_overlay():
                        break  # pivoted already
                    if restarted:
                        raise self._fail("the commit job vanished twice")
                    restarted = True
                    self.start()
                    continue
            except HypervisorError as e:
                if not is_active(self.dom):
                    raise DomainGone(f"{self.dom.name()} stopped while its view ended") from e
                log.debug("%s: pivot not possible yet (%s)", self.target, e)
            if time.monotonic() > self.deadline:
                with contextlib.suppress(HypervisorError):
                    self.dom.blockJobAbort(self.target, 0)
                raise self._fail("the commit did not become ready in time")
            time.sleep(0.02)
        if self._on_overlay():
            raise self._fail("the pivot did not take")
        try:
            os.unlink(self.overlay)
        except FileNotFoundError:
            pass
        except OSError as e:
            raise CleanupFailed(f"{self.dom.name()} {self.target} is back on {self.image}, but the overlay "
                                f"{self.overlay} could not be deleted: {e.strerror}") from e


def image_below(disk: ET.Element, overlay: str) -> str:
    """The image an overlay was put on: the disk's backing store in the live XML (an overlay in
    ``overlay_dir`` is not named after its image's path), else the overlay's name without its mark."""
    below = disk.find("backingStore/source")
    found = below.get("file") or below.get("dev") if below is not None else None
    return found or OVERLAY_RE.sub("", overlay)


def recover_all(conn: Any) -> list[str]:
    """:func:`recover` for every domain whose definition names a hyperback overlay: what a view
    of an agent that died left behind. A domain that cannot be recovered is logged and skipped:
    the others still are. Returns what was done, each line naming its domain."""
    done: list[str] = []
    for domain in hypervisor.guard(conn).listAllDomains(0):
        try:
            xml = domain.XMLDesc(0)
            if domain.isPersistent():
                xml += domain.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
            if OVERLAY_MARK in xml:
                done += [f"{domain.name()}: {line}" for line in recover(domain)]
        except (HypervisorError, ViewError, CleanupFailed) as e:
            log.error("cannot undo what a view left on %s: %s; merge its hyperback overlays by hand "
                      "(docs/changed-block-tracking.md, Cleaning up)", domain.name(), e)
    return done


def recover(domain: Any, timeout: float = 120.0) -> list[str]:
    """Undo what a view left behind when its process died: a running backup job, disks still on a
    hyperback overlay (merged back and deleted), a definition pointing at an overlay. Returns what
    was done, for the log. Run it for every domain when the agent starts, before any view."""
    domain = hypervisor.guard(domain)
    done: list[str] = []
    name = domain.name()
    if is_active(domain):
        try:
            backup = ET.fromstring(domain.backupGetXMLDesc(0)).find("server")
            if backup is not None and "/hb-view-" in backup.get("socket", ""):  # ours, not someone else's
                domain.abortJob()
                wait_no_backup_job(domain, time.monotonic() + timeout)
                done.append("aborted a backup job")
        except HypervisorError as e:
            if not isinstance(e, (NoBackupJob, OperationInvalid)):
                raise ViewError(f"cannot inspect the jobs of {name}: {e}") from e
        for target, disk in live_disks(domain).items():
            overlay = source_of(disk) or ""
            if not OVERLAY_RE.search(overlay):
                continue
            m = Merger(domain, target, overlay, image_below(disk, overlay), time.monotonic() + timeout)
            m.start()
            m.finish()
            done.append(f"merged {overlay} back into {m.image}")
    else:
        overlays = {}
        try:
            disks = live_disks(domain, libvirt.VIR_DOMAIN_XML_INACTIVE)
        except ViewError:
            disks = {}
        for target, disk in disks.items():
            overlay = source_of(disk) or ""
            if OVERLAY_RE.search(overlay):
                merge_offline(overlay)
                overlays[target] = overlay
                done.append(f"merged {overlay} offline")
        if overlays and restore_inactive_definition(domain, overlays):
            done.append("pointed the definition back at the images")
    for what in done:
        log.warning("%s: recovered: %s", name, what)
    return done
