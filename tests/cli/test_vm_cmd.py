"""hyperback vm: what enable and disable change in a domain's XML, and how status reads.

The XML side is pure (strings in, strings out) and is specified here; tests/test_wiring_vm.py runs
the same commands against a real libvirtd and a booted guest.
"""
from __future__ import annotations

import re
import xml.etree.ElementTree as ET

import pytest
from cli_helpers import assert_one_line_error, run

from host_agent.agent import wiring
from host_agent.agent.domains import parse_domain_xml
from host_agent.cli.vm_cmd import AgentView, _status_doc, _status_lines

UUID = "6f1c2b0e-4b7a-4c55-9d1e-0a2b3c4d5e6f"
NS = {"hb": wiring.NS}
DOMAIN = f"""<domain type='qemu' xmlns:lo='http://libosinfo.org/xmlns/libvirt/domain/1.0'>
  <name>web1</name>
  <uuid>{UUID}</uuid>
  <metadata><lo:libosinfo><lo:os id='http://debian.org/debian/12'/></lo:libosinfo></metadata>
  <memory unit='KiB'>131072</memory>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <devices>
    <disk type='file' device='disk'><driver name='qemu' type='qcow2'/>
      <source file='/var/lib/libvirt/images/web1.qcow2'/><target dev='vda' bus='virtio'/>
      <address type='pci' domain='0x0000' bus='0x00' slot='0x04' function='0x0'/></disk>
    <disk type='block' device='disk'><driver name='qemu' type='raw'/>
      <source dev='/dev/vg/web1-data'/><target dev='vdb' bus='virtio'/><serial>data-1</serial></disk>
    <disk type='file' device='cdrom'><driver name='qemu' type='raw'/><target dev='sda' bus='sata'/>
      <readonly/></disk>
  </devices>
</domain>"""


def serial_of(root: ET.Element, dev: str) -> str | None:
    for disk in root.findall("./devices/disk"):
        target = disk.find("target")
        if target is not None and target.get("dev") == dev:
            return disk.findtext("serial")
    raise KeyError(dev)


def channels(root: ET.Element) -> list[str]:
    return [t.get("name", "") for t in root.findall("./devices/channel/target")]


def test_a_serial_is_stable_short_and_of_the_characters_virtio_and_libvirt_allow() -> None:
    serial = wiring.stable_serial(UUID, "vda")
    assert serial == wiring.stable_serial(UUID.upper(), "vda")
    assert serial != wiring.stable_serial(UUID, "vdb")
    assert re.fullmatch(r"hb-[0-9a-f]{17}", serial) and len(serial) == 20


def test_enable_adds_the_channel_and_serials_where_missing_and_records_what_it_added() -> None:
    change = wiring.plan_enable(DOMAIN, UUID)
    assert change.xml is not None
    root = ET.fromstring(change.xml)
    assert channels(root) == ["org.hyperback.agent.0"]
    assert root.find("./devices/channel").get("type") == "unix"  # type: ignore[union-attr]
    assert root.find("./devices/channel/source") is not None  # no path: libvirt places the socket
    assert serial_of(root, "vda") == wiring.stable_serial(UUID, "vda")
    assert serial_of(root, "vdb") == "data-1"  # its own serial stays
    assert serial_of(root, "sda") is None
    assert change.serials_added == {"vda": wiring.stable_serial(UUID, "vda")}
    assert change.skipped == {"sda": "a cdrom, not a disk to back up"}
    record = root.find("./metadata/hb:hyperback", NS)
    assert record is not None and record.find("hb:channel", NS) is not None
    assert {e.get("dev"): e.text for e in record.findall("hb:serial", NS)} == change.serials_added
    # another tool's metadata keeps its prefix and content
    assert "lo:libosinfo" in change.xml and "<lo:os id=\"http://debian.org/debian/12\"" in change.xml
    # the serial sits before the disk's address, where libvirt's schema wants it
    vda = root.findall("./devices/disk")[0]
    assert [c.tag for c in vda][-2:] == ["serial", "address"]


def test_enabling_twice_changes_nothing() -> None:
    once = wiring.plan_enable(DOMAIN, UUID).xml
    assert once is not None
    again = wiring.plan_enable(once, UUID)
    assert again.xml is None and not again.channel_added and not again.serials_added


def test_groups_tag_the_domain_for_schedules_once_each_and_go_with_disable() -> None:
    tagged = wiring.plan_enable(DOMAIN, UUID, ("gold", "web")).xml
    assert tagged is not None
    assert parse_domain_xml(tagged, UUID, "web1", False).groups == ("gold", "web")
    again = wiring.plan_enable(tagged, UUID, ("gold",))
    assert again.xml is None and again.groups_added == []
    more = wiring.plan_enable(tagged, UUID, ("nightly",))
    assert more.xml is not None and more.groups_added == ["nightly"]
    assert parse_domain_xml(more.xml, UUID, "web1", False).groups == ("gold", "web", "nightly")
    gone = wiring.plan_disable(more.xml, remove_serials=True).xml
    assert gone is not None and parse_domain_xml(gone, UUID, "web1", False).groups == ()


@pytest.mark.parametrize("disk, words", [
    ("<disk type='network' device='disk'><driver name='qemu' type='raw'/><source protocol='rbd' "
     "name='pool/img'><host name='ceph1'/></source><target dev='vdc' bus='virtio'/></disk>",
     ["vdc", "network disk (rbd:pool/img)"]),
    ("<disk type='file' device='disk'><driver name='qemu' type='vmdk'/><source file='/x.vmdk'/>"
     "<target dev='vdc' bus='virtio'/></disk>", ["vdc", "vmdk image"]),
])
def test_a_disk_hyperback_cannot_read_refuses_enable_and_names_it(disk: str, words: list[str]) -> None:
    xml = DOMAIN.replace("</devices>", f"{disk}</devices>")
    with pytest.raises(wiring.NotWirable) as refused:
        wiring.plan_enable(xml, UUID)
    assert all(w in str(refused.value) for w in words) and "\n" not in str(refused.value)
    assert refused.value.exit_code == 2


def test_disable_removes_the_channel_and_keeps_serials_unless_asked() -> None:
    enabled = wiring.plan_enable(DOMAIN, UUID).xml
    assert enabled is not None
    kept = wiring.plan_disable(enabled, remove_serials=False)
    assert kept.xml is not None and kept.channel_removed and not kept.serials_removed
    root = ET.fromstring(kept.xml)
    assert channels(root) == [] and serial_of(root, "vda") == wiring.stable_serial(UUID, "vda")
    # the record still knows the serial it added, so a later --remove-serials can drop it
    dropped = wiring.plan_disable(kept.xml, remove_serials=True)
    assert dropped.xml is not None and dropped.serials_removed == {"vda": wiring.stable_serial(UUID, "vda")}
    root = ET.fromstring(dropped.xml)
    assert serial_of(root, "vda") is None and serial_of(root, "vdb") == "data-1"  # not ours: kept
    assert root.find("./metadata/hb:hyperback", NS) is None
    assert root.find("./metadata/{http://libosinfo.org/xmlns/libvirt/domain/1.0}libosinfo") is not None
    assert wiring.plan_disable(dropped.xml, remove_serials=True).xml is None


def test_a_serial_changed_by_hand_after_enable_is_not_removed_as_ours() -> None:
    enabled = wiring.plan_enable(DOMAIN, UUID).xml
    assert enabled is not None
    edited = enabled.replace(f"<serial>{wiring.stable_serial(UUID, 'vda')}</serial>", "<serial>boot</serial>")
    change = wiring.plan_disable(edited, remove_serials=True)
    assert change.serials_removed == {} and change.xml is not None
    assert serial_of(ET.fromstring(change.xml), "vda") == "boot"


def test_status_says_what_is_missing_and_when_the_agent_is_not_running() -> None:
    root = ET.fromstring(DOMAIN)
    w = wiring.Wiring("web1", UUID, True, False, False, None, None, tuple(wiring.disks_of(root)), {})
    text = "\n".join(_status_lines(_status_doc(w, None)))
    assert "web1" in text and "shut off" in text
    assert "channel: absent (hyperback vm enable adds it)" in text
    assert "disk vda: no serial" in text and "disk vdb: serial data-1" in text
    assert "disk sda: skipped, a cdrom" in text
    assert "agent: not running" in text
    served = {UUID: AgentView("connected", 1_700_000_000.0, ("nightly",), 1_700_086_400.0)}
    text = "\n".join(_status_lines(_status_doc(w, served)))
    assert "last backup 2023-11-14 22:13:20 UTC" in text
    assert "schedules: nightly; next backup 2023-11-15 22:13:20 UTC" in text


def test_vm_without_an_action_is_a_usage_error() -> None:
    assert_one_line_error(run("vm", check=False), 2, "vm")
