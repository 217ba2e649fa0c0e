"""A running domain's disks as its live XML describes them, read through the hypervisor door.

Small helpers the views, their checkpoints and their overlays share.
"""
from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from typing import Any

from host_agent.errors import HypervisorError, NoDomain, ViewError


def is_active(dom: Any) -> bool:
    try:
        return bool(dom.isActive())
    except HypervisorError as e:
        if isinstance(e, NoDomain):
            return False
        raise ViewError(f"cannot ask libvirt whether {dom.name()} runs: {e}") from e


def live_disks(dom: Any, flags: int = 0) -> dict[str, ET.Element]:
    """The ``<disk>`` elements of the domain XML by target dev."""
    try:
        root = ET.fromstring(dom.XMLDesc(flags))
    except HypervisorError as e:
        raise ViewError(f"cannot read the domain XML of {dom.name()}: {e}") from e
    out = {}
    for disk in root.findall("./devices/disk"):
        target = disk.find("target")
        if target is not None and target.get("dev"):
            out[target.get("dev", "")] = disk
    return out


def source_of(disk: ET.Element) -> str | None:
    src = disk.find("source")
    if src is None:
        return None
    return src.get("file") or src.get("dev")


def same_file(a: str, b: str) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


def xml_attr(value: str) -> str:
    return (value.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
            .replace("'", "&apos;").replace('"', "&quot;"))


def xml_text(value: str) -> str:
    return value.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
