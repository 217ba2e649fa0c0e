"""hyperback's own record of its checkpoints, and the checks that a checkpoint's bitmaps can be trusted.

libvirt keeps a domain's checkpoints in metadata of its own, which does not follow the domain: a
live migration arrives without it (seen: A -> B -> A, both hosts list no checkpoint), a transient
domain loses it when it stops or libvirtd restarts, a redefined domain never had it. The dirty
bitmaps themselves live in the qcow2 images and travel with them (QEMU stores them when it lets go
of the image, at a migration's end or a clean exit). So each view's checkpoint XML is also saved
here, ``<state_dir>/checkpoints/<domain uuid>/<checkpoint>.xml``, in the form
``checkpointCreateXML(xml, REDEFINE)`` takes, and :func:`vouch` redefines a lost checkpoint from it.
A copy travels in the domain's own ``<metadata>`` (``checkpoint_metadata``), for the host the domain
visits or moves to; this host's file is preferred (written here, trusted), the copy is the fallback.

A bitmap is used only if the running QEMU says it is present, persistent, recording and not
``inconsistent`` on every disk the checkpoint tracks (QMP ``query-named-block-nodes``, through
libvirt-qemu's monitor passthrough). ``qemu-img info -U`` cannot tell this for a running domain: a
bitmap created during the QEMU process's life is not in the file before QEMU closes it, and one
loaded at start is flagged ``in-use`` in the file until then, healthy or not. After a SIGKILL the
first kind is simply missing and the second is loaded as inconsistent by the next QEMU: both are
refused here with the reason, and the view compares instead. See docs/changed-block-tracking.md.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import libvirt  # type: ignore[import-untyped]

from host_agent import errors, hypervisor
from host_agent.agent import checkpoint_metadata
from host_agent.agent.checkpoint_metadata import SAFE_NAME as _SAFE_NAME
from host_agent.agent.domainxml import is_active, live_disks, source_of
from host_agent.errors import DomainGone, HypervisorError, NoCheckpoint, ViewError
from host_agent.model import Fallback, FallbackNote
from host_agent.storage import imagebitmaps, qcow2

log = logging.getLogger(__name__)

RECORD_DIR = "checkpoints"


def _safe(name: str, what: str) -> str:
    if not _SAFE_NAME.fullmatch(name):
        raise ViewError(f"{what} {name!r} cannot name a checkpoint record (letters, digits, '_.:-' only)")
    return name


class CheckpointRecords:
    """The checkpoint XML of each view, by domain UUID, under ``<state_dir>/checkpoints``; with
    ``in_domain`` (the default) also in the domain's ``<metadata>``, which travels with it."""

    def __init__(self, state_dir: Path | str, *, in_domain: bool = True) -> None:
        self.root = Path(state_dir) / RECORD_DIR
        self.in_domain = in_domain

    def _path(self, domain_uuid: str, name: str) -> Path:
        return self.root / _safe(domain_uuid, "domain UUID") / f"{_safe(name, 'checkpoint')}.xml"

    def save(self, domain_uuid: str, name: str, xml: str) -> None:
        """Write the record atomically (a crash leaves the old state or the new, never half)."""
        path = self._path(domain_uuid, name)
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_atomically(path, xml)

    def load(self, domain_uuid: str, name: str) -> str | None:
        """The record, or None (also for a name no record can have: a foreign snapshot's checkpoint)."""
        if not (_SAFE_NAME.fullmatch(domain_uuid) and _SAFE_NAME.fullmatch(name)):
            return None
        try:
            return self._path(domain_uuid, name).read_text(encoding="utf-8")
        except FileNotFoundError:
            return None

    def names(self, domain_uuid: str) -> list[str]:
        folder = self.root / _safe(domain_uuid, "domain UUID")
        with contextlib.suppress(FileNotFoundError):
            return sorted(p.stem for p in folder.iterdir()
                          if p.suffix == ".xml" and not p.name.startswith("."))
        return []

    def forget(self, domain_uuid: str, name: str) -> None:
        self._path(domain_uuid, name).unlink(missing_ok=True)
        self._images_path(domain_uuid, name).unlink(missing_ok=True)

    def _images_path(self, domain_uuid: str, name: str) -> Path:
        return self._path(domain_uuid, name).with_suffix(".images.json")

    def save_images(self, domain_uuid: str, name: str, images: Mapping[str, int]) -> None:
        """Which file (inode, :func:`file_id`) each disk's image was when the checkpoint was made."""
        _write_atomically(self._images_path(domain_uuid, name), json.dumps(dict(images)))

    def images(self, domain_uuid: str, name: str) -> dict[str, int]:
        """What :meth:`save_images` saved; empty if nothing (a record older than this, or unreadable)."""
        try:
            doc = json.loads(self._images_path(domain_uuid, name).read_text(encoding="utf-8"))
            return {str(t): int(fid) for t, fid in dict(doc).items()}
        except (OSError, ValueError, TypeError, ViewError):
            return {}

    def find(self, domain: Any, name: str) -> str | None:
        """Checkpoint ``name``'s XML: this host's record, else the checked copy the domain carries."""
        xml = self.load(str(domain.UUIDString()), name)
        if xml is None and self.in_domain:
            carried = checkpoint_metadata.read(domain).get(name)
            xml = carried.checkpoint_xml() if carried is not None else None
        return xml

    def drop(self, domain: Any, names: set[str]) -> None:
        """Forget ``names`` here and in the domain (a domain that refuses is logged: a stale copy
        names a checkpoint that no longer exists, which :func:`vouch` reports as missing)."""
        for name in names:
            self.forget(str(domain.UUIDString()), name)
        if self.in_domain and names:
            try:
                checkpoint_metadata.forget(domain, names)
            except HypervisorError as e:
                log.warning("checkpoint records %s stay in the metadata of %s: %s",
                            ", ".join(sorted(names)), domain.name(), e)



def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)

def file_id(path: str) -> int | None:
    """The image file's inode: a restore or copy renamed onto its path is another one. (Not the
    device number: the same NFS file has another on each host, and a device-mapper volume's may
    change at a reboot.)"""
    try:
        return os.stat(path).st_ino
    except OSError:
        return None


def record_checkpoint(records: CheckpointRecords, domain: Any, name: str) -> None:
    """Save checkpoint ``name`` of ``domain`` as libvirt describes it now."""
    domain = hypervisor.guard(domain)
    xml = domain.checkpointLookupByName(name).getXMLDesc(libvirt.VIR_DOMAIN_CHECKPOINT_XML_NO_DOMAIN)
    uuid = str(domain.UUIDString())
    records.save(uuid, name, xml)
    if records.in_domain:
        checkpoint_metadata.save(domain, xml)
    disks = live_disks(domain)
    images = {t: fid for t in tracked_bitmaps(xml) if t in disks
              and (src := source_of(disks[t])) and (fid := file_id(src)) is not None}
    records.save_images(uuid, name, images)


def record_new(records: CheckpointRecords, domain: Any, name: str) -> str:
    """Record a view's new checkpoint; a failure is a note ("" if none), not a failed backup."""
    try:
        record_checkpoint(records, domain, name)
    except (OSError, HypervisorError, ViewError, ValueError) as e:
        log.warning("checkpoint %s not recorded: %s", name, e)
        return (f"checkpoint {name} was not recorded ({e}): if libvirt loses it, the next backup "
                "compares everything")
    return ""


def tracked_bitmaps(checkpoint_xml: str) -> dict[str, str]:
    """Disk target -> bitmap name, for the disks a checkpoint XML tracks with a bitmap."""
    root = ET.fromstring(checkpoint_xml)
    name = root.findtext("name") or ""
    return {d.get("name", ""): d.get("bitmap") or name for d in root.findall("./disks/disk")
            if d.get("checkpoint") == "bitmap"}


@dataclass(frozen=True)
class Bitmap:
    """One dirty bitmap of a block node, as the running QEMU reports it."""

    name: str
    recording: bool
    persistent: bool
    inconsistent: bool


def running_bitmaps(domain: Any) -> dict[str, dict[str, Bitmap]]:
    """The bitmaps of every qcow2 node of a running domain, by the node's image file (real path).

    QMP ``query-named-block-nodes`` (flat) through libvirt's monitor passthrough
    (``hypervisor.qemu_monitor``): libvirt has no
    public call for bitmap state, and libvirt marks the domain tainted ("custom-monitor") in its
    log the first time. Read-only; the image below a view's overlay is a node of its own too.
    """
    cmd = json.dumps({"execute": "query-named-block-nodes", "arguments": {"flat": True}})
    try:
        reply = json.loads(hypervisor.qemu_monitor(domain, cmd))
    except ValueError as e:
        raise HypervisorError(f"QEMU answered query-named-block-nodes with no JSON: {e}", 0) from e
    nodes = reply.get("return") if isinstance(reply, dict) else None
    out: dict[str, dict[str, Bitmap]] = {}
    for node in nodes if isinstance(nodes, list) else []:
        if node.get("drv") != "qcow2" or not isinstance(node.get("file"), str):
            continue
        found = out.setdefault(os.path.realpath(node["file"]), {})
        for b in node.get("dirty-bitmaps") or []:
            found[str(b.get("name"))] = Bitmap(str(b.get("name")), bool(b.get("recording")),
                                               bool(b.get("persistent")), bool(b.get("inconsistent")))
    return out


def bitmap_problem(bitmaps: Mapping[str, Bitmap] | None, bitmap: str, target: str, checkpoint: str) -> str:
    """Why bitmap ``bitmap`` of ``target`` cannot say what changed since ``checkpoint`` ("" if it can)."""
    found = (bitmaps or {}).get(bitmap)
    if found is None:
        return FallbackNote(Fallback.BITMAP_MISSING, (
            f"checkpoint {checkpoint}: bitmap {bitmap} is missing on {target} (QEMU ended without "
            "storing it, e.g. killed, or the image was replaced)"))
    if found.inconsistent:
        return FallbackNote(Fallback.BITMAP_INCONSISTENT, f"checkpoint {checkpoint}: bitmap {bitmap} on "
                            f"{target} is inconsistent (QEMU exited uncleanly while it was in use): it "
                            "cannot be trusted")
    if not found.persistent or not found.recording:
        return (f"checkpoint {checkpoint}: bitmap {bitmap} on {target} is not a persistent, "
                "recording bitmap")
    return ""


def _libvirt_xml(domain: Any, name: str) -> str | None:
    try:
        cp = domain.checkpointLookupByName(name)
        return str(cp.getXMLDesc(libvirt.VIR_DOMAIN_CHECKPOINT_XML_NO_DOMAIN))
    except NoCheckpoint:
        return None


def _without_lost_parent(domain: Any, xml: str) -> str:
    """The record's XML without its <parent> if libvirt has no such checkpoint (pruned, or lost too)."""
    root = ET.fromstring(xml)
    parent = root.find("parent")
    if parent is not None and _libvirt_xml(domain, parent.findtext("name") or "") is None:
        root.remove(parent)
        return ET.tostring(root, encoding="unicode")
    return xml


def redefine(domain: Any, xml: str) -> None:
    """Give libvirt back a checkpoint it lost; libvirt checks its bitmaps again (REDEFINE_VALIDATE)."""
    domain = hypervisor.guard(domain)
    flags = (libvirt.VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE
             | libvirt.VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE_VALIDATE)
    domain.checkpointCreateXML(_without_lost_parent(domain, xml), flags)


def vouch(domain: Any, since: str, images: Mapping[str, str],
          records: CheckpointRecords | None) -> dict[str, str]:
    """Make checkpoint ``since`` usable for the disks ``images`` (target -> image path) of a running
    domain, or say why it is not: returns target -> reason for each disk that must be compared.

    The checkpoint's XML comes from libvirt or, if libvirt lost it, from ``records``; every disk's
    bitmap is checked in the running QEMU; a lost checkpoint whose bitmaps are all sound is
    redefined. Nothing is redefined, and nothing used, on a doubt.
    """
    domain = hypervisor.guard(domain)
    name = str(domain.name())
    xml = _libvirt_xml(domain, since)
    lost = xml is None
    if lost and records is not None:
        xml = records.find(domain, since)
    if xml is None:
        why = ("and hyperback has no record of it, on this host or in the domain's metadata"
               if records is not None else "(no checkpoint records kept)")
        return dict.fromkeys(images, FallbackNote(Fallback.NO_RECORD, f"{name} has no checkpoint {since} "
                                                  f"{why}"))
    try:
        tracked = tracked_bitmaps(xml)
    except ET.ParseError as e:
        return dict.fromkeys(images, f"hyperback's record of checkpoint {since} is damaged ({e})")
    state = running_bitmaps(domain)
    reasons: dict[str, str] = {}
    recorded = records.images(str(domain.UUIDString()), since) if records is not None else {}
    for target, image in images.items():
        if target not in tracked:
            reasons[target] = FallbackNote(Fallback.NOT_TRACKED,
                                           f"checkpoint {since} does not track {target}")
        elif target in recorded and file_id(image) != recorded[target]:
            reasons[target] = FallbackNote(Fallback.DISK_REPLACED, (
                f"the image of {target}, {image}, is another file than when checkpoint {since} was made "
                "(restored or replaced under the domain): its bitmaps say nothing of this content"))
        else:
            problem = bitmap_problem(state.get(os.path.realpath(image)), tracked[target], target, since)
            if problem:
                reasons[target] = problem
    if lost and len(reasons) < len(images):
        try:
            redefine(domain, xml)
        except HypervisorError as e:
            refused = f"libvirt refused to redefine checkpoint {since} from hyperback's record: {e}"
            return {target: reasons.get(target, refused) for target in images}
        log.info("redefined checkpoint %s of %s from hyperback's record", since, name)
    return reasons


def vouch_all(domain: Any, wanted: Mapping[str, tuple[str, str]],
              records: CheckpointRecords | None) -> dict[str, str]:
    """:func:`vouch` for a view's disks, ``wanted`` target -> (since, image): target -> reason for
    each disk whose ``since`` cannot serve. A failed check is a reason too; a stopped domain is
    DomainGone."""
    groups: dict[str, dict[str, str]] = {}
    for target, (since, image) in wanted.items():
        groups.setdefault(since, {})[target] = image
    problems: dict[str, str] = {}
    for since, images in groups.items():
        try:
            problems.update(vouch(domain, since, images, records))
        except HypervisorError as e:
            if not is_active(domain):
                raise DomainGone(f"{hypervisor.guard(domain).name()} stopped while its view was taken") from e
            problems.update(dict.fromkeys(images, f"cannot check the bitmaps of checkpoint {since}: {e}"))
    return problems


def bitmaps_gone(domain: Any, checkpoint_xml: str) -> bool:
    """Whether none of a running domain's disks has the checkpoint's bitmap any more."""
    disks, state = live_disks(domain), running_bitmaps(domain)
    for target, bitmap in tracked_bitmaps(checkpoint_xml).items():
        image = source_of(disks[target]) if target in disks else None
        if image is not None and bitmap in state.get(os.path.realpath(image), {}):
            return False
    return True


def remove_bitmaps_offline(domain: Any, checkpoint_xml: str) -> list[str]:
    """Remove a checkpoint's bitmaps from the qcow2 images of a shut-off domain (libvirt deletes only
    the metadata then, and the bitmaps would stay in the images for good). ``qemu-img bitmap
    --remove`` takes the image's write lock, so it fails, raising ImageError, if a QEMU has the
    image open (the domain started meanwhile): the caller keeps the checkpoint and tries again
    next time. Returns the images a bitmap was removed from."""
    disks = live_disks(domain)
    done = []
    for target, bitmap in tracked_bitmaps(checkpoint_xml).items():
        disk = disks.get(target)
        image = source_of(disk) if disk is not None else None
        if disk is None or image is None or disk.find("driver[@type='qcow2']") is None:
            continue  # a disk removed from the domain, or a raw one: no bitmap in it
        if any(b.name == bitmap for b in qcow2.image_info(image, "qcow2").bitmaps):
            imagebitmaps.remove_one(image, bitmap)
            done.append(image)
    return done


def drop_lost(domain: Any, records: CheckpointRecords, keep: set[str] | frozenset[str],
              defined: set[str]) -> list[str]:
    """Records of checkpoints libvirt lost and no chain keeps: their bitmaps are still in the images
    (QEMU updates them on every write), so redefine each and delete it with its bitmaps where
    libvirt accepts it; forget the record in any case. Returns the names whose bitmaps went.

    Only this host's records: ``keep`` holds this host's chains, and a checkpoint the domain carries
    from another host may serve that host's chains (a destination only it backs up to); deleting it
    during a visit would break them."""
    domain = hypervisor.guard(domain)
    uuid = str(domain.UUIDString())
    gone = []
    for cp in records.names(uuid):
        if cp in keep or cp in defined:
            continue
        xml = records.load(uuid, cp)
        if xml is not None and domain.isActive():
            try:
                redefine(domain, xml)
                domain.checkpointLookupByName(cp).delete(0)
                gone.append(cp)
            except HypervisorError as e:
                log.info("checkpoint %s of %s stays lost (%s); forgetting its record", cp, domain.name(), e)
        elif xml is not None:
            try:
                if remove_bitmaps_offline(domain, xml):
                    gone.append(cp)
            except (errors.ImageError, ET.ParseError) as e:
                log.info("bitmaps of lost checkpoint %s of %s stay (%s); keeping its record", cp,
                         domain.name(), e)
                continue
        records.drop(domain, {cp})
    return gone
