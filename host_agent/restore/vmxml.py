"""A stored domain definition rewritten for a restore (pure: XML in, XML out; no I/O).

As a new domain (:func:`as_new_domain`) the definition gets a new name and UUID, its interfaces
lose their MAC addresses and host-side device names (libvirt then makes new ones), its restored
disks point at their new images, its NVRAM at its copy, its character devices at files of its
own, and its unix channels let libvirt place their sockets: nothing it uses is shared with the
domain it was copied from.
Disks the run did not back up that the guest could write are left out (two domains writing one
image would destroy it); read-only ones (CD-ROMs, shared read-only images) stay.
"""
from __future__ import annotations

import uuid as uuidlib
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from host_agent import errors


@dataclass(frozen=True)
class DiskTarget:
    """Where a restored disk's image goes and in which format."""

    path: Path
    format: str   # "raw" or "qcow2"


@dataclass(frozen=True)
class StoredDisk:
    """A disk of a stored definition: its target dev, serial, image and whether the guest writes it."""

    dev: str
    serial: str | None
    source: str | None
    format: str | None
    writable: bool


@dataclass(frozen=True)
class Rewritten:
    xml: str
    uuid: str
    dropped: tuple[str, ...]   # target devs of writable disks left out (no snapshot of them in the run)


def parse(xml: str) -> ET.Element:
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as e:
        raise errors.RepositoryError(f"the stored domain definition is not XML: {e}") from e
    if root.tag != "domain":
        raise errors.RepositoryError(f"the stored domain definition is a <{root.tag}>, not a <domain>")
    return root


def disks(root: ET.Element) -> list[StoredDisk]:
    """The definition's disks (``<disk device='disk|cdrom|lun|floppy'>``) in document order."""
    out = []
    for disk in root.findall("./devices/disk"):
        target = disk.find("target")
        source = disk.find("source")
        driver = disk.find("driver")
        writable = disk.get("device", "disk") in ("disk", "lun") and disk.find("readonly") is None
        serial = (disk.findtext("serial") or "").strip() or None
        out.append(StoredDisk(
            target.get("dev", "") if target is not None else "", serial,
            (source.get("file") or source.get("dev")) if source is not None else None,
            driver.get("type") if driver is not None else None, writable))
    return out


def as_new_domain(xml: str, name: str, targets: Mapping[str, DiskTarget], files_dir: Path,
                  nvram: Path | None = None, new_uuid: str | None = None) -> Rewritten:
    """The definition of a new domain ``name`` whose disks (by target dev, ``targets``) are restored
    images. ``files_dir`` takes its console/serial log files; ``nvram`` is its NVRAM copy."""
    root = parse(xml)
    new_uuid = new_uuid or str(uuidlib.uuid4())
    _set_text(root, "name", name)
    _set_text(root, "uuid", new_uuid)
    for element in root.findall("./devices/interface"):
        # no MAC: libvirt makes a new one; no host-side device name: the original's would clash
        for old in element.findall("mac") + element.findall("target"):
            element.remove(old)
    dropped = _point_disks(root, targets)
    _own_chardevs(root, name, files_dir)
    os_element = root.find("os")
    stored_nvram = os_element.find("nvram") if os_element is not None else None
    if stored_nvram is not None and os_element is not None:
        if nvram is None:
            os_element.remove(stored_nvram)  # libvirt makes a fresh one from the template
        else:
            stored_nvram.text = str(nvram)
    return Rewritten(ET.tostring(root, encoding="unicode"), new_uuid, tuple(dropped))


def _set_text(root: ET.Element, tag: str, value: str) -> None:
    element = root.find(tag)
    if element is None:
        element = ET.SubElement(root, tag)
    element.text = value


def _point_disks(root: ET.Element, targets: Mapping[str, DiskTarget]) -> list[str]:
    devices = root.find("devices")
    dropped: list[str] = []
    if devices is None:
        return dropped
    for stored, element in zip(disks(root), root.findall("./devices/disk"), strict=True):
        target = targets.get(stored.dev)
        if target is None:
            if stored.writable:
                devices.remove(element)
                dropped.append(stored.dev)
            continue
        element.set("type", "file")
        for old in element.findall("source") + element.findall("backingStore"):
            element.remove(old)
        source = ET.Element("source", {"file": str(target.path)})
        element.insert(_after_driver(element), source)
        driver = element.find("driver")
        if driver is None:
            driver = ET.Element("driver", {"name": "qemu"})
            element.insert(0, driver)
        driver.set("type", target.format)
    return dropped


def _after_driver(element: ET.Element) -> int:
    for i, child in enumerate(element):
        if child.tag == "driver":
            return i + 1
    return 0


def _own_chardevs(root: ET.Element, name: str, files_dir: Path) -> None:
    """Log and file-backed character devices get files of the new domain's own (one new path per old
    path, so a console and serial sharing a file still share it); unix channels lose their socket
    path, which libvirt then places itself."""
    renamed: dict[str, str] = {}

    def moved(old: str) -> str:
        if old not in renamed:
            renamed[old] = str(files_dir / f"{name}-{len(renamed)}-{Path(old).name}")
        return renamed[old]

    for tag in ("serial", "console", "channel", "parallel"):
        for element in root.findall(f"./devices/{tag}"):
            source = element.find("source")
            if element.get("type") == "file" and source is not None and source.get("path"):
                source.set("path", moved(source.get("path", "")))
            if element.get("type") == "unix" and source is not None and source.get("mode") == "bind":
                source.attrib.pop("path", None)
            log = element.find("log")
            if log is not None and log.get("file"):
                log.set("file", moved(log.get("file", "")))
