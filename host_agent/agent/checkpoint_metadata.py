"""hyperback's checkpoint records inside the domain's own ``<metadata>``: they travel with the domain.

The records under ``<state_dir>/checkpoints`` stay on the host that wrote them. A domain backed up
on another host (a co-location visit, a cold move: undefined on A, defined on B from A's XML) found
none there, and compared its whole disk although its bitmaps had arrived in the qcow2 images. libvirt
carries a domain's metadata in a live migration and in the XML a cold move defines, so each record
is also kept as one element of the namespace :data:`NS` (format: docs/changed-block-tracking.md).

Anyone who may define the domain can write this, so it is untrusted input (the guest cannot): the
text is bounded before it is parsed, names, times and counts are checked, a bad entry is skipped
with a warning, and the checkpoint XML handed to libvirt is rebuilt from the checked fields only,
never copied. libvirt still validates the bitmaps themselves (``REDEFINE_VALIDATE``). See
docs/changed-block-tracking.md, "Records that travel with the domain".
"""
from __future__ import annotations

import logging
import re
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import libvirt  # type: ignore[import-untyped]

from host_agent import hypervisor
from host_agent.errors import HypervisorError

log = logging.getLogger(__name__)

NS = "https://hyperback.dev/xmlns/checkpoints/1"
PREFIX = "hbcp"
MAX_TEXT = 256 * 1024   # bytes of metadata parsed at most (a record is ~300 bytes)
MAX_RECORDS = 64        # a chain keeps a few per destination; older ones are dropped past this
MAX_DISKS = 64
# a checkpoint, bitmap or domain name that may become a file name: no separators, no leading dot
SAFE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:-]{0,200}")
_TARGET = re.compile(r"[a-z]{1,8}[a-z0-9]{0,8}")
_DISK_MODES = ("bitmap", "no")


@dataclass(frozen=True)
class Record:
    """One checkpoint as hyperback needs it to redefine it: checked fields only."""

    name: str
    created: int
    parent: str
    disks: tuple[tuple[str, str, str], ...]   # (target, "bitmap"|"no", bitmap name or "")

    def checkpoint_xml(self) -> str:
        """The XML ``checkpointCreateXML(REDEFINE)`` takes, built from the checked fields."""
        root = ET.Element("domaincheckpoint")
        ET.SubElement(root, "name").text = self.name
        if self.parent:
            ET.SubElement(ET.SubElement(root, "parent"), "name").text = self.parent
        ET.SubElement(root, "creationTime").text = str(self.created)
        disks = ET.SubElement(root, "disks")
        for disk in self.disks:
            ET.SubElement(disks, "disk", _disk_attrs(*disk))
        return ET.tostring(root, encoding="unicode")


def _disk_attrs(target: str, mode: str, bitmap: str) -> dict[str, str]:
    return {"name": target, "checkpoint": mode} | ({"bitmap": bitmap} if bitmap else {})


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _disk(el: ET.Element) -> tuple[str, str, str]:
    target, mode, bitmap = el.get("name", ""), el.get("checkpoint", ""), el.get("bitmap", "")
    if not _TARGET.fullmatch(target) or mode not in _DISK_MODES:
        raise ValueError(f"disk {target!r} checkpoint {mode!r}")
    if mode == "bitmap" and not SAFE_NAME.fullmatch(bitmap):
        raise ValueError(f"bitmap {bitmap!r} of {target}")
    return target, mode, bitmap if mode == "bitmap" else ""


def _checked(name: str, created: str, parent: str, disks: list[ET.Element]) -> Record:
    """A Record from untrusted parts; ValueError names the first bad one."""
    if not SAFE_NAME.fullmatch(name):
        raise ValueError(f"checkpoint name {name!r}")
    if parent and not SAFE_NAME.fullmatch(parent):
        raise ValueError(f"parent {parent!r}")
    if not re.fullmatch(r"[0-9]{1,12}", created):
        raise ValueError(f"creation time {created!r}")
    if not 0 < len(disks) <= MAX_DISKS:
        raise ValueError(f"{len(disks)} disks")
    parsed = tuple(_disk(d) for d in disks)
    if len({t for t, _, _ in parsed}) != len(parsed):
        raise ValueError("a disk listed twice")
    return Record(name, int(created), parent, parsed)


def from_checkpoint_xml(xml: str) -> Record:
    """The Record of libvirt's checkpoint XML (``VIR_DOMAIN_CHECKPOINT_XML_NO_DOMAIN``)."""
    root = ET.fromstring(xml)
    return _checked(root.findtext("name") or "", (root.findtext("creationTime") or "").strip(),
                    root.findtext("parent/name") or "", root.findall("./disks/disk"))


def parse(text: str) -> dict[str, Record]:
    """The checked records of a metadata element's text, by name; bad entries are skipped (logged)."""
    if len(text) > MAX_TEXT:
        log.warning("checkpoint records in the domain metadata ignored: %d bytes, more than %d",
                    len(text), MAX_TEXT)
        return {}
    try:
        root = ET.fromstring(text)
    except ET.ParseError as e:
        log.warning("checkpoint records in the domain metadata ignored: %s", e)
        return {}
    out: dict[str, Record] = {}
    for el in [c for c in root if _local(c.tag) == "checkpoint"][:MAX_RECORDS]:
        try:
            record = _checked(el.get("name", ""), el.get("created", ""), el.get("parent", ""),
                              [d for d in el if _local(d.tag) == "disk"])
        except ValueError as e:
            log.warning("a checkpoint record in the domain metadata was skipped: bad %s", e)
            continue
        out[record.name] = record
    return out


def render(records: Mapping[str, Record]) -> str:
    """The metadata element of ``records``: the newest :data:`MAX_RECORDS` (by creation time)."""
    root = ET.Element("checkpoints")
    newest = sorted(records.values(), key=lambda r: (r.created, r.name))[-MAX_RECORDS:]
    for r in newest:
        attrs = {"name": r.name, "created": str(r.created)} | ({"parent": r.parent} if r.parent else {})
        el = ET.SubElement(root, "checkpoint", attrs)
        for disk in r.disks:
            ET.SubElement(el, "disk", _disk_attrs(*disk))
    return ET.tostring(root, encoding="unicode")


def read(domain: Any) -> dict[str, Record]:
    """The records the domain carries (its live definition if it runs), by name; {} if none."""
    domain = hypervisor.guard(domain)
    try:
        text = str(domain.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, NS, 0))
    except HypervisorError as e:
        if e.code == libvirt.VIR_ERR_NO_DOMAIN_METADATA:
            return {}
        raise
    return parse(text)


def _affect(domain: Any) -> int:
    """The live definition of a running domain and the persistent one of a defined domain: a cold
    move defines the domain on the other host from the persistent one."""
    flags = int(libvirt.VIR_DOMAIN_AFFECT_LIVE) if domain.isActive() else 0
    if domain.isPersistent():
        flags |= libvirt.VIR_DOMAIN_AFFECT_CONFIG
    return flags


def write(domain: Any, records: Mapping[str, Record]) -> None:
    domain = hypervisor.guard(domain)
    text = render(records) if records else None  # None removes the element
    domain.setMetadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, text, PREFIX, NS, _affect(domain))


def save(domain: Any, xml: str) -> None:
    """Add the checkpoint of libvirt's XML ``xml`` to the domain's records."""
    record = from_checkpoint_xml(xml)
    write(domain, read(domain) | {record.name: record})


def forget(domain: Any, names: set[str]) -> None:
    """Remove the records ``names`` (nothing is written if the domain carries none of them)."""
    held = read(domain)
    if names & held.keys():
        write(domain, {n: r for n, r in held.items() if n not in names})
