"""Wiring a domain in: the hyperback channel and a stable ``<serial>`` per disk, in libvirt's own XML.

::

    conn = hypervisor.connect("qemu:///system")
    report = enable(conn, "web1")     # persistent definition, and live where libvirt allows
    report.lines()                    # what changed, what waits for a restart, what was skipped
    disable(conn, "web1", remove_serials=False)
    [w.to_json() for w in status(conn, ["web1"])]

What ``enable`` adds to the **persistent** definition (``defineXML``), and nothing else:

* the channel ``<channel type='unix'><target type='virtio' name='org.hyperback.agent.0'/></channel>``;
  libvirt chooses the socket path. A running domain also gets it live (virtio-serial channels
  hot-plug with ``attachDeviceFlags(AFFECT_LIVE)``).
* a ``<serial>`` on every ``device='disk'`` disk that lacks one: ``hb-`` and 17 hex digits of
  SHA-256 over the domain UUID and the target dev, 20 characters, the most a virtio-blk serial
  carries (``VIRTIO_BLK_ID_BYTES``; QEMU silently cuts a longer one) and of libvirt's allowed
  ``[A-Za-z0-9_.+-]``. The same domain and disk always get the same serial, so running ``enable``
  again, or on a redefined domain, names the disk's snapshots as before. A serial cannot change
  under a running guest: it takes effect at the next restart (shutdown + start), and says so.
* a record of what it added, so that ``disable`` knows which serials are its own::

      <metadata>
        <hb:hyperback xmlns:hb="https://hyperback.dev/xmlns/wiring/1">
          <hb:channel added="yes"/>
          <hb:serial dev="vdb">hb-3f0c9d2e71a4b58c6</hb:serial>
          <hb:group>gold</hb:group>
        </hb:hyperback>

  and the groups ``enable --group`` tags it with: schedules select domains by group.
      </metadata>

Disks are sorted three ways: file and block disks in raw or qcow2 are backed up; cdrom, floppy and
lun devices are not disks to back up and are skipped (said so); a disk hyperback cannot read
(``type='network'`` such as rbd, iscsi, nbd; ``volume``, ``dir``, another image format) refuses the
whole ``enable``, naming it, and changes nothing. A transient domain is refused too: libvirt keeps
no definition to add to.

``disable`` removes the channel (persistent, and live if running) and the metadata. Serials stay:
they name the domain's snapshots, and removing them orphans its backup chain; with
``remove_serials`` it drops the serials the metadata says hyperback added, and only those.

Errors: :class:`~host_agent.errors.UsageError` for an unknown domain, :class:`NotWirable` for a
domain that cannot be wired as it is; libvirt's refusals arrive as
:class:`~host_agent.errors.HypervisorError` from the hypervisor door.
"""
from __future__ import annotations

import hashlib
import io
import logging
import re
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field
from typing import Any

import libvirt  # type: ignore[import-untyped]

from host_agent import errors
from host_agent.agent.domains import AGENT_CHANNEL, WIRING_NS
from host_agent.hypervisor import Guarded

log = logging.getLogger(__name__)

NS = WIRING_NS
PREFIX = "hb"
SERIAL_LENGTH = 20                      # virtio-blk: VIRTIO_BLK_ID_BYTES
NOT_DISKS = ("cdrom", "floppy", "lun")  # devices that are not disks to back up
READABLE_TYPES = ("file", "block")
READABLE_FORMATS = ("raw", "qcow2")
RESTART = "takes effect at the next restart (shutdown + start)"
GROUP = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,31}")


class NotWirable(errors.UsageError):
    """The domain cannot be wired in as it is (transient, or a disk hyperback cannot read)."""


def stable_serial(domain_uuid: str, dev: str) -> str:
    """The serial hyperback gives disk ``dev`` of domain ``domain_uuid``: the same every time."""
    digest = hashlib.sha256(f"{domain_uuid.lower()}/{dev}".encode()).hexdigest()
    return f"hb-{digest[:SERIAL_LENGTH - 3]}"


# ---------- the XML side (pure: strings in, strings out) ----------

def _parse(xml: str) -> ET.Element:
    """Parse, keeping the document's namespace prefixes (other tools' metadata) as they were."""
    for _event, (prefix, uri) in ET.iterparse(io.StringIO(xml), events=("start-ns",)):
        if prefix and not prefix.startswith("ns"):
            ET.register_namespace(prefix, uri)
    ET.register_namespace(PREFIX, NS)
    return ET.fromstring(xml)


def _channel(root: ET.Element) -> ET.Element | None:
    for channel in root.findall("./devices/channel"):
        target = channel.find("target")
        if target is not None and target.get("name") == AGENT_CHANNEL:
            return channel
    return None


def channel_xml() -> str:
    return (f"<channel type='unix'><source mode='bind'/>"
            f"<target type='virtio' name='{AGENT_CHANNEL}'/></channel>")


@dataclass(frozen=True)
class DiskState:
    dev: str
    device: str                  # disk, cdrom, floppy, lun
    type: str                    # file, block, network, volume, dir
    format: str
    source: str
    serial: str                  # "" without one
    added: bool                  # hyperback added this serial (its metadata says so)
    problem: str = ""            # why hyperback cannot back it up ("" if it can)
    skipped: str = ""            # why it is not a disk to back up ("" if it is)


def _record(root: ET.Element) -> ET.Element | None:
    meta = root.find("metadata")
    return meta.find(f"{{{NS}}}hyperback") if meta is not None else None


def groups_of(root: ET.Element) -> tuple[str, ...]:
    record = _record(root)
    return tuple(e.text or "" for e in record.findall(f"{{{NS}}}group")) if record is not None else ()


def _added_serials(root: ET.Element) -> dict[str, str]:
    record = _record(root)
    if record is None:
        return {}
    return {e.get("dev", ""): (e.text or "") for e in record.findall(f"{{{NS}}}serial")}


def disks_of(root: ET.Element) -> list[DiskState]:
    added = _added_serials(root)
    out = []
    for disk in root.findall("./devices/disk"):
        target, driver, source = disk.find("target"), disk.find("driver"), disk.find("source")
        dev = target.get("dev", "") if target is not None else ""
        device, kind = disk.get("device", "disk"), disk.get("type", "file")
        fmt = driver.get("type", "raw") if driver is not None else "raw"
        src = ""
        if source is not None:
            src = (source.get("file") or source.get("dev") or source.get("name") or source.get("volume")
                   or source.get("dir") or "")
            if kind == "network":
                src = f"{source.get('protocol', 'network')}:{src}"
        serial = disk.findtext("serial") or ""
        problem = skipped = ""
        if device in NOT_DISKS:
            skipped = f"a {device}, not a disk to back up"
        elif kind not in READABLE_TYPES:
            problem = (f"a {kind} disk ({src or 'no source'}): hyperback reads only image files and "
                       "block devices on this host")
        elif fmt not in READABLE_FORMATS:
            problem = f"a {fmt} image ({src}): hyperback reads only raw and qcow2"
        elif not src:
            skipped = "no medium"
        out.append(DiskState(dev, device, kind, fmt, src, serial, bool(serial) and added.get(dev) == serial,
                             problem, skipped))
    return out


@dataclass
class Change:
    """What enabling or disabling does to one definition."""

    xml: str | None = None                       # the new persistent XML; None: nothing to change
    channel_added: bool = False
    channel_removed: bool = False
    serials_added: dict[str, str] = field(default_factory=dict)
    serials_removed: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    groups_added: list[str] = field(default_factory=list)


def _set_record(root: ET.Element, channel: bool, serials: dict[str, str], groups: tuple[str, ...]) -> None:
    meta = root.find("metadata")
    record = _record(root)
    now = (record.find(f"{{{NS}}}channel") is not None, _added_serials(root), groups_of(root)) \
        if record is not None else None
    if now == (channel, serials, groups):
        return  # as it is: the XML stays byte for byte
    if record is not None and meta is not None:
        meta.remove(record)
    if not channel and not serials and not groups:
        if meta is not None and len(meta) == 0:
            root.remove(meta)
        return
    if meta is None:
        meta = ET.Element("metadata")
        # libvirt's schema wants <metadata> after the header elements: before <memory> is safe
        children = list(root)
        at = next((i for i, c in enumerate(children) if c.tag not in ("name", "uuid", "genid", "title",
                                                                      "description")), len(children))
        root.insert(at, meta)
    record = ET.SubElement(meta, f"{{{NS}}}hyperback")
    if channel:
        ET.SubElement(record, f"{{{NS}}}channel", added="yes")
    for dev, serial in sorted(serials.items()):
        ET.SubElement(record, f"{{{NS}}}serial", dev=dev).text = serial
    for group in groups:
        ET.SubElement(record, f"{{{NS}}}group").text = group


def _serialize(root: ET.Element) -> str:
    return ET.tostring(root, encoding="unicode")


def plan_enable(xml: str, domain_uuid: str, groups: tuple[str, ...] = ()) -> Change:
    """What ``enable`` changes in the persistent ``xml`` (``groups`` are added to those it has);
    NotWirable for a disk it cannot read."""
    root = _parse(xml)
    before = _serialize(root)
    name = root.findtext("name") or domain_uuid
    disks = disks_of(root)
    bad = [d for d in disks if d.problem]
    if bad:
        raise NotWirable(f"{name}: cannot back up disk {bad[0].dev}, {bad[0].problem}; "
                         "detach it or back it up by other means, then run 'hyperback vm enable' again")
    change = Change(skipped={d.dev: d.skipped for d in disks if d.skipped})
    record = _record(root)
    had_channel = record is not None and record.find(f"{{{NS}}}channel") is not None
    added = _added_serials(root)
    if _channel(root) is None:
        devices = root.find("devices")
        if devices is None:
            raise NotWirable(f"{name}: the domain XML has no <devices>")
        devices.append(ET.fromstring(channel_xml()))
        change.channel_added = had_channel = True
    by_dev = {d.dev: d for d in disks}
    for disk in root.findall("./devices/disk"):
        target = disk.find("target")
        state = by_dev.get(target.get("dev", "") if target is not None else "")
        if state is None or state.skipped or state.serial:
            continue
        serial = stable_serial(domain_uuid, state.dev)
        elem = ET.Element("serial")
        elem.text = serial
        # the schema orders <serial> after target/iotune/boot/readonly/shareable...: before <address>
        address = disk.find("address")
        disk.insert(list(disk).index(address) if address is not None else len(disk), elem)
        change.serials_added[state.dev] = serial
        added[state.dev] = serial
    tagged = groups_of(root)
    change.groups_added = [g for g in dict.fromkeys(groups) if g not in tagged]
    _set_record(root, had_channel, added, (*tagged, *change.groups_added))
    if _serialize(root) != before:
        change.xml = _serialize(root)
    return change


def plan_disable(xml: str, remove_serials: bool) -> Change:
    """What ``disable`` changes in the persistent ``xml``."""
    root = _parse(xml)
    before = _serialize(root)
    change = Change()
    channel = _channel(root)
    devices = root.find("devices")
    if channel is not None and devices is not None:
        devices.remove(channel)
        change.channel_removed = True
    added = _added_serials(root)
    if remove_serials:
        for disk in root.findall("./devices/disk"):
            target, serial = disk.find("target"), disk.find("serial")
            dev = target.get("dev", "") if target is not None else ""
            if serial is not None and dev in added and serial.text == added[dev]:
                disk.remove(serial)
                change.serials_removed[dev] = added.pop(dev)
    _set_record(root, False, added, ())
    if _serialize(root) != before:
        change.xml = _serialize(root)
    return change


# ---------- the libvirt side ----------

_INACTIVE = libvirt.VIR_DOMAIN_XML_INACTIVE | libvirt.VIR_DOMAIN_XML_SECURE


def lookup(conn: Guarded, name_or_uuid: str) -> Guarded:
    """The domain by name or UUID; UsageError if libvirt has none."""
    try:
        dom: Guarded = (conn.lookupByUUIDString(name_or_uuid) if _looks_like_uuid(name_or_uuid)
                        else conn.lookupByName(name_or_uuid))
    except errors.NoDomain as e:
        raise errors.UsageError(f"no domain {name_or_uuid!r} on this host (virsh list --all shows them)"
                                ) from e
    return dom


def _looks_like_uuid(value: str) -> bool:
    return len(value) == 36 and value.count("-") == 4


def _persistent(dom: Guarded, action: str) -> None:
    if not dom.isPersistent():
        raise NotWirable(f"{dom.name()} is a transient domain: libvirt keeps no definition to {action}; "
                         f"define it first (virsh dumpxml {dom.name()} > d.xml; virsh define d.xml)")


@dataclass
class Report:
    """What ``enable`` or ``disable`` did, for people (``lines``) and tools (``to_json``)."""

    domain: str
    uuid: str
    running: bool
    change: Change
    live: list[str] = field(default_factory=list)      # what was changed live
    pending: list[str] = field(default_factory=list)   # what waits for a restart

    @property
    def changed(self) -> bool:
        return self.change.xml is not None or bool(self.live)

    def to_json(self) -> dict[str, Any]:
        c = asdict(self.change)
        del c["xml"]
        return {"domain": self.domain, "uuid": self.uuid, "running": self.running, "changed": self.changed,
                **c, "live": self.live, "pending_restart": self.pending}


def enable(conn: Guarded, name_or_uuid: str, groups: tuple[str, ...] = ()) -> Report:
    """Wire ``name_or_uuid`` in, tagged with ``groups``; see the module docstring. Idempotent."""
    dom = lookup(conn, name_or_uuid)
    _persistent(dom, "add the channel to")
    uuid, name = str(dom.UUIDString()), str(dom.name())
    bad = [g for g in groups if not GROUP.fullmatch(g)]
    if bad:
        raise errors.UsageError(f"group {bad[0]!r}: use letters, digits, '-' and '_' (at most 32)")
    change = plan_enable(dom.XMLDesc(_INACTIVE), uuid, groups)
    if change.xml is not None:
        conn.defineXML(change.xml)
        log.info("%s: persistent definition wired in (channel added: %s, serials: %s)", name,
                 change.channel_added, change.serials_added)
    report = Report(name, uuid, bool(dom.isActive()), change)
    if report.running:
        live = _parse(dom.XMLDesc(0))
        if _channel(live) is None:
            try:
                dom.attachDeviceFlags(channel_xml(), libvirt.VIR_DOMAIN_AFFECT_LIVE)
                report.live.append("channel added live")
            except errors.HypervisorError as e:
                report.pending.append(f"the channel {RESTART} (libvirt could not add it live: {e})")
        live_serials = {d.dev: d.serial for d in disks_of(live)}
        for d in disks_of(_parse(dom.XMLDesc(_INACTIVE))):
            if d.serial and not d.skipped and live_serials.get(d.dev, "") != d.serial:
                report.pending.append(f"serial {d.serial} of {d.dev} {RESTART}")
    return report


def disable(conn: Guarded, name_or_uuid: str, remove_serials: bool = False) -> Report:
    """Unwire ``name_or_uuid``: the channel goes (persistent and live), serials stay unless asked."""
    dom = lookup(conn, name_or_uuid)
    _persistent(dom, "remove the channel from")
    uuid, name = str(dom.UUIDString()), str(dom.name())
    change = plan_disable(dom.XMLDesc(_INACTIVE), remove_serials)
    if change.xml is not None:
        conn.defineXML(change.xml)
    report = Report(name, uuid, bool(dom.isActive()), change)
    if report.running:
        live = _parse(dom.XMLDesc(0))
        channel = _channel(live)
        if channel is not None:
            try:
                dom.detachDeviceFlags(ET.tostring(channel, encoding="unicode"),
                                      libvirt.VIR_DOMAIN_AFFECT_LIVE)
                report.live.append("channel removed live")
            except errors.HypervisorError as e:
                report.pending.append(f"removing the channel {RESTART} (libvirt refused live: {e})")
        if change.serials_removed:
            report.pending.append(f"removing the serials of {', '.join(sorted(change.serials_removed))} "
                                  f"{RESTART}")
    return report


@dataclass(frozen=True)
class Wiring:
    """How one domain is wired, as libvirt defines and runs it (the agent's view is added by the CLI)."""

    domain: str
    uuid: str
    persistent: bool
    running: bool
    channel: bool                 # in the persistent definition (the live one for a transient domain)
    channel_live: bool | None     # None: not running
    channel_state: str | None     # libvirt's view of the guest side: connected / disconnected
    disks: tuple[DiskState, ...]
    live_serials: dict[str, str]  # running only: the serials the guest sees now

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def wiring_of(dom: Guarded) -> Wiring:
    persistent, running = bool(dom.isPersistent()), bool(dom.isActive())
    defined = _parse(dom.XMLDesc(_INACTIVE if persistent else 0))
    live = _parse(dom.XMLDesc(0)) if running else None
    live_channel = _channel(live) if live is not None else None
    state = None
    if live_channel is not None:
        target = live_channel.find("target")
        state = target.get("state") if target is not None else None
    return Wiring(str(dom.name()), str(dom.UUIDString()), persistent, running, _channel(defined) is not None,
                  (live_channel is not None) if running else None, state, tuple(disks_of(defined)),
                  {d.dev: d.serial for d in disks_of(live)} if live is not None else {})


def status(conn: Guarded, names: list[str] | None = None) -> list[Wiring]:
    """The wiring of the named domains, or of every domain libvirt knows, by name."""
    doms = [lookup(conn, n) for n in names] if names else list(conn.listAllDomains(0))
    out = []
    for dom in doms:
        try:
            out.append(wiring_of(dom))
        except errors.NoDomain:  # undefined while we looked
            continue
    return sorted(out, key=lambda w: w.domain)
