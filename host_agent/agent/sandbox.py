"""The sandbox a boot verification boots a snapshot in: a domain definition made from the VM's own.

:func:`sandbox_xml` takes the VM's definition (the one stored with the backup, or the domain's
current one) and keeps what the guest needs to boot as it would (machine, firmware, CPU, memory,
controllers, the disk's target and serial, so that the guest finds its root where it looks for
it), and changes what must not reach the world or the original VM:

* no network: every ``<interface>`` goes, and devices that reach the host or other VMs
  (``hostdev``, ``redirdev``, ``smartcard``, ``filesystem`` shares, ``tpm`` state, ``vsock``,
  ``shmem``, ``graphics`` and ``audio`` listeners, every ``channel`` but hyperback's);
* one disk: the snapshot's, on the throwaway overlay over the NBD export; every other disk,
  CD-ROM and floppy goes (they would be the original VM's live images);
* the hyperback channel on a socket of the verifier's own, and the serial console into a file;
* a new name, no UUID (libvirt picks one), a private copy of the NVRAM, and every lifecycle
  event (power off, reboot, crash) destroys the domain: a verified guest boots once;
* hyperback's sandbox mark in ``<metadata>``, so that a running agent leaves its channel alone.
"""
from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

from host_agent import errors
from host_agent.agent.domains import AGENT_CHANNEL, SANDBOX_NS

# devices that reach the network, the host, other VMs or the original VM's state
DROPPED_DEVICES = ("interface", "hostdev", "redirdev", "smartcard", "filesystem", "tpm", "vsock", "shmem",
                   "graphics", "audio", "serial", "console", "parallel", "channel")
# disk children that describe the original image, its access or its caching
DROPPED_DISK_PARTS = ("source", "backingStore", "driver", "readonly", "shareable", "transient", "mirror",
                      "encryption", "auth", "iotune")


@dataclass(frozen=True)
class SandboxPaths:
    overlay: Path        # the qcow2 overlay the guest writes into
    export_socket: Path  # the NBD export of the snapshot, the overlay's backing
    channel: Path        # the hyperback channel's socket (QEMU listens)
    console: Path        # the serial console's log
    nvram: Path | None   # the private NVRAM copy, if the VM has NVRAM


def boot_disk_serial(definition: str) -> str | None:
    """The serial of the disk the VM boots from: the one with ``<boot order='1'>`` (or the lowest
    order), else the first disk with a serial; None if no disk has one."""
    disks = [d for d in _root(definition).findall("./devices/disk[@device='disk']") if d.findtext("serial")]
    ordered = [d for d in disks if d.find("boot") is not None]
    if ordered:
        first = min(ordered, key=lambda d: int(d.find("boot").get("order", "1")))  # type: ignore[union-attr]
        return first.findtext("serial")
    return disks[0].findtext("serial") if disks else None


def nvram_of(definition: str) -> Path | None:
    """The VM's NVRAM file (UEFI variables), if it has one."""
    nvram = _root(definition).find("./os/nvram")
    return Path(nvram.text.strip()) if nvram is not None and nvram.text and nvram.text.strip() else None


def sandbox_xml(definition: str, *, name: str, serial: str, snapshot: str, paths: SandboxPaths) -> str:
    """The sandbox's domain XML (see the module's docstring)."""
    root = _root(definition)
    _identity(root, name, snapshot)
    devices = root.find("devices")
    if devices is None:
        raise errors.SandboxError("the VM's definition has no <devices>")
    for tag in DROPPED_DEVICES:
        for device in devices.findall(tag):
            devices.remove(device)
    _keep_one_disk(devices, serial, paths)
    _nvram(root, paths.nvram)
    _add_console_and_channel(devices, paths)
    return ET.tostring(root, encoding="unicode")


def _root(definition: str) -> ET.Element:
    try:
        root = ET.fromstring(definition)
    except ET.ParseError as e:
        raise errors.UsageError(f"the VM's definition is not XML: {e}") from e
    if root.tag != "domain":
        raise errors.UsageError(f"the VM's definition is a <{root.tag}>, not a <domain>")
    return root


def _identity(root: ET.Element, name: str, snapshot: str) -> None:
    for tag in ("uuid", "genid"):
        for el in root.findall(tag):
            root.remove(el)
    name_el = root.find("name")
    if name_el is None:
        name_el = ET.SubElement(root, "name")
    name_el.text = name
    metadata = root.find("metadata")
    if metadata is None:
        metadata = ET.SubElement(root, "metadata")
    for child in list(metadata):
        metadata.remove(child)  # hyperback's wiring and others' tags belong to the original VM
    ET.SubElement(metadata, f"{{{SANDBOX_NS}}}sandbox", snapshot=snapshot)
    for event in ("on_poweroff", "on_reboot", "on_crash"):
        found = root.find(event)
        (found if found is not None else ET.SubElement(root, event)).text = "destroy"


def _keep_one_disk(devices: ET.Element, serial: str, paths: SandboxPaths) -> None:
    chosen = None
    for disk in devices.findall("disk"):
        if disk.get("device", "disk") == "disk" and disk.findtext("serial") == serial and chosen is None:
            chosen = disk
        else:
            devices.remove(disk)
    if chosen is None:
        raise errors.UsageError(f"the VM's definition has no disk with serial {serial!r}")
    for tag in DROPPED_DISK_PARTS:
        for part in chosen.findall(tag):
            chosen.remove(part)
    chosen.set("type", "file")
    chosen.insert(0, ET.Element("driver", name="qemu", type="qcow2"))
    chosen.insert(1, ET.Element("source", file=str(paths.overlay)))
    backing = ET.Element("backingStore", type="network")
    ET.SubElement(backing, "format", type="raw")
    source = ET.SubElement(backing, "source", protocol="nbd")
    ET.SubElement(source, "host", transport="unix", socket=str(paths.export_socket))
    ET.SubElement(backing, "backingStore")
    chosen.insert(2, backing)


def _nvram(root: ET.Element, copy: Path | None) -> None:
    nvram = root.find("./os/nvram")
    if nvram is None:
        return
    if copy is None:
        raise errors.SandboxError("the VM has NVRAM but the sandbox has no copy of it")
    nvram.text = str(copy)


def _add_console_and_channel(devices: ET.Element, paths: SandboxPaths) -> None:
    targets: tuple[tuple[str, dict[str, str]], ...] = (
        ("serial", {"port": "0"}), ("console", {"type": "serial", "port": "0"}))
    for tag, target in targets:
        el = ET.SubElement(devices, tag, type="file")
        ET.SubElement(el, "source", path=str(paths.console), append="off")
        ET.SubElement(el, "target", target)
    channel = ET.SubElement(devices, "channel", type="unix")
    ET.SubElement(channel, "source", mode="bind", path=str(paths.channel))
    ET.SubElement(channel, "target", type="virtio", name=AGENT_CHANNEL)
