"""Domains that carry the hyperback channel, found and followed through libvirt.

The host trusts only libvirt's live domain XML: a guest's disks are looked up
there by serial, in the guest's own domain, so a guest can name neither another
VM's disk nor a host path. The channel socket path is read back from the live
XML too (libvirt may choose it).
"""
from __future__ import annotations

import contextlib
import fnmatch
import logging
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Protocol

import libvirt  # type: ignore[import-untyped]

from host_agent import hypervisor
from host_agent.colocation.migration import visit_marker
from host_agent.errors import HypervisorError, NoDomain, UnknownDisk
from host_agent.hypervisor import Guarded
from host_agent.model import DiskRef

log = logging.getLogger(__name__)

AGENT_CHANNEL = "org.hyperback.agent.0"
# hyperback's element in a domain's <metadata>: what `hyperback vm enable` added, and the domain's
# groups (schedules select by them); host_agent.agent.wiring writes it
WIRING_NS = "https://hyperback.dev/xmlns/wiring/1"
DEFAULT_URI = "qemu:///system"
# hyperback's mark on a boot verification's sandbox domain (host_agent.agent.sandbox): its channel
# belongs to the verifier, so the agent neither serves nor schedules it
SANDBOX_NS = "https://hyperback.dev/xmlns/sandbox/1"


@dataclass(frozen=True)
class DomainInfo:
    uuid: str
    name: str
    running: bool
    channel_path: str | None      # host side of the hyperback channel, None without one
    channel_state: str | None     # "connected" / "disconnected" as libvirt sees the guest side
    disks: tuple[DiskRef, ...]
    visiting_from: str = ""       # the host it moved here from for a job (its visit marker), if any
    enabled: bool = False         # its definition has the hyperback channel (`hyperback vm enable`)
    groups: tuple[str, ...] = ()  # the groups hyperback's metadata tags it with (schedules select by them)
    sandbox: bool = False         # a boot verification's sandbox (its channel is the verifier's)


class Selector(Protocol):
    """Which domains a schedule or a ``[[guests]]`` rule covers (host_agent.config)."""

    @property
    def domains(self) -> tuple[str, ...]: ...      # names or UUIDs
    @property
    def match(self) -> str: ...                    # a shell-style pattern on names
    @property
    def group(self) -> str: ...                    # a group of `hyperback vm enable --group`


def covers(selector: Selector, info: DomainInfo) -> bool:
    """Whether the selector takes this domain (any of its three ways)."""
    return (info.name in selector.domains or info.uuid in selector.domains
            or bool(selector.match and fnmatch.fnmatchcase(info.name, selector.match))
            or bool(selector.group and selector.group in info.groups))


def _disk_refs(root: ET.Element, uuid: str, name: str) -> tuple[DiskRef, ...]:
    out = []
    for disk in root.findall("./devices/disk[@device='disk']"):
        serial = disk.findtext("serial")
        source = disk.find("source")
        target = disk.find("target")
        driver = disk.find("driver")
        if not serial or source is None or target is None:
            continue
        path = source.get("file") or source.get("dev")
        if not path:
            continue
        chain = []
        backing = disk.find("backingStore")
        while backing is not None and backing.find("source") is not None:
            src = backing.find("source")
            assert src is not None
            bpath = src.get("file") or src.get("dev")
            if bpath:
                chain.append(bpath)
            backing = backing.find("backingStore")
        out.append(DiskRef(uuid, name, serial, target.get("dev", ""), path,
                           driver.get("type", "raw") if driver is not None else "raw", 0, tuple(chain)))
    return tuple(out)


def parse_domain_xml(xml: str, uuid: str, name: str, running: bool) -> DomainInfo:
    """What hyperback needs from a live domain XML (sizes are filled in from libvirt separately)."""
    root = ET.fromstring(xml)
    path = state = None
    enabled = False
    for channel in root.findall("./devices/channel[@type='unix']"):
        target = channel.find("target")
        source = channel.find("source")
        if target is not None and target.get("name") == AGENT_CHANNEL:
            enabled = True
            if source is not None:
                path, state = source.get("path"), target.get("state")
    groups = tuple(g.text.strip() for g in root.findall(f"./metadata/{{{WIRING_NS}}}hyperback/"
                                                         f"{{{WIRING_NS}}}group") if g.text)
    marker = visit_marker(xml)
    sandbox = root.find(f"./metadata/{{{SANDBOX_NS}}}sandbox") is not None
    return DomainInfo(uuid, name, running, path, state, _disk_refs(root, uuid, name),
                      marker.origin if marker is not None else "", enabled, groups, sandbox)


class Domains:
    """A libvirt connection seen as the set of domains hyperback serves."""

    def __init__(self, uri: str = DEFAULT_URI) -> None:
        self.uri = uri
        self.conn = hypervisor.connect(uri)

    def close(self) -> None:
        with contextlib.suppress(HypervisorError):
            self.conn.close()

    def _info(self, dom: Guarded) -> DomainInfo:
        try:
            running = bool(dom.isActive())
            # a shut-off domain has its persistent definition only: its disks are read from there
            xml = dom.XMLDesc(0 if running else libvirt.VIR_DOMAIN_XML_INACTIVE)
            info = parse_domain_xml(xml, dom.UUIDString(), dom.name(), running)
            if not running:
                return info
            sized = tuple(replace(disk, size=dom.blockInfo(disk.target)[0]) for disk in info.disks)
            return replace(info, disks=sized)
        except HypervisorError as e:
            raise type(e)(f"cannot read domain {dom.name()}: {e}", e.code) from e

    def served(self) -> list[DomainInfo]:
        """Running domains that carry the hyperback channel (not boot verification sandboxes)."""
        try:
            doms = self.conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE)
        except HypervisorError as e:
            raise type(e)(f"cannot list domains: {e}", e.code) from e
        out = []
        for dom in doms:
            try:
                info = self._info(dom)
            except HypervisorError as e:  # it stopped while we looked
                log.info("skipping domain: %s", e)
                continue
            if info.channel_path and not info.sandbox:
                out.append(info)
        return out

    def enabled(self) -> list[DomainInfo]:
        """Every domain, running or shut off, whose definition has the hyperback channel."""
        try:
            doms = self.conn.listAllDomains(0)
        except HypervisorError as e:
            raise type(e)(f"cannot list domains: {e}", e.code) from e
        out = []
        for dom in doms:
            try:
                info = self._info(dom)
            except HypervisorError as e:  # undefined while we looked
                log.info("skipping domain: %s", e)
                continue
            if info.enabled and not info.sandbox:
                out.append(info)
        return out

    def shut_off(self) -> list[DomainInfo]:
        """Persistent domains that are shut off and carry the hyperback channel in their definition
        (wired in: ``hyperback vm enable``): a backup reads them offline (``agent.offline``)."""
        return [info for info in self.enabled() if not info.running]

    def get(self, uuid: str) -> DomainInfo:
        return self._info(self.domain(uuid))

    def domain(self, uuid: str) -> Guarded:
        try:
            dom: Guarded = self.conn.lookupByUUIDString(uuid)
        except NoDomain as e:
            raise NoDomain(f"domain {uuid} is gone: {e}", e.code) from e
        return dom

    def disks_by_serial(self, uuid: str, serials: list[str] | None) -> tuple[DiskRef, ...]:
        """The domain's disks with these serials (all disks with a serial if None).

        The lookup uses only this domain's live XML (its persistent one while it is shut off): a
        serial of another domain is unknown here.
        """
        disks = self.get(uuid).disks
        if serials is None:
            return disks
        by_serial = {d.serial: d for d in disks}
        missing = [s for s in serials if s not in by_serial]
        if missing:
            raise UnknownDisk(f"this VM has no disk with serial {', '.join(missing)}; "
                              f"it has: {', '.join(sorted(by_serial)) or 'no disk with a serial'}")
        return tuple(by_serial[s] for s in serials)

    def _free_target(self, dom: Guarded, uuid: str) -> str:
        """A virtio disk name the live domain does not use (network disks count too)."""
        root = ET.fromstring(dom.XMLDesc(0))
        used = {t.get("dev", "") for t in root.findall("./devices/disk/target")}
        target = next((f"vd{c}" for c in "bcdefghijklmnopqrstuvwxyz" if f"vd{c}" not in used), None)
        if target is None:
            raise HypervisorError(f"domain {uuid} has no free virtio disk name left")
        return target

    def _attach(self, uuid: str, disk: ET.Element, what: str) -> str:
        dom = self.domain(uuid)
        target = self._free_target(dom, uuid)
        ET.SubElement(disk, "target", dev=target, bus="virtio")
        try:
            dom.attachDeviceFlags(ET.tostring(disk, encoding="unicode"), libvirt.VIR_DOMAIN_AFFECT_LIVE)
        except HypervisorError as e:
            raise type(e)(f"cannot attach {what} to domain {uuid}: {e}", e.code) from e
        return target

    def attach_disk(self, uuid: str, path: str, serial: str) -> str:
        """Hot-plug a raw image into a running domain as a new virtio disk; return its target name."""
        disk = ET.Element("disk", type="file", device="disk")
        ET.SubElement(disk, "driver", name="qemu", type="raw")
        ET.SubElement(disk, "source", file=path)
        ET.SubElement(disk, "serial").text = serial
        return self._attach(uuid, disk, path)

    def attach_nbd_readonly(self, uuid: str, socket: str, serial: str) -> str:
        """Hot-plug an NBD export (a unix socket) into a running domain as a read-only virtio disk,
        live only (it never enters the persistent definition); return its target name."""
        disk = ET.Element("disk", type="network", device="disk")
        ET.SubElement(disk, "driver", name="qemu", type="raw")
        source = ET.SubElement(disk, "source", protocol="nbd")
        ET.SubElement(source, "host", transport="unix", socket=socket)
        ET.SubElement(disk, "readonly")
        ET.SubElement(disk, "serial").text = serial
        return self._attach(uuid, disk, f"the NBD export at {socket}")

    def live_disk(self, uuid: str, serial: str) -> str | None:
        """The live XML of the domain's disk with ``serial`` (any kind, network too), or None."""
        root = ET.fromstring(self.domain(uuid).XMLDesc(0))
        for disk in root.findall("./devices/disk"):
            if disk.findtext("serial") == serial:
                return ET.tostring(disk, encoding="unicode")
        return None

    def detach_live(self, uuid: str, serial: str) -> bool:
        """Ask the running domain to give back its disk with ``serial`` (an unplug the guest
        completes later: see :meth:`live_disk`); False if it has no such disk."""
        xml = self.live_disk(uuid, serial)
        if xml is None:
            return False
        try:
            self.domain(uuid).detachDeviceFlags(xml, libvirt.VIR_DOMAIN_AFFECT_LIVE)
        except HypervisorError as e:
            raise type(e)(f"cannot detach disk {serial} from domain {uuid}: {e}", e.code) from e
        return True

    def watch(self, on_event: Callable[[str, str], None]) -> int:
        """Call on_event(uuid, "started"|"stopped"|"migrated") on lifecycle events; returns a callback id.

        Needs libvirt's event loop registered first (hypervisor.register_event_loop).
        """
        return hypervisor.watch_lifecycle(self.conn, on_event)
