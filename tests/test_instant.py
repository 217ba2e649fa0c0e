"""Instant recovery's definitions: the disk on an overlay of the export, then on the target alone
(the recovery itself runs real VMs: tests/test_instant_vm.py)."""
from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from host_agent import errors
from host_agent.agent.instant import Request, new_identity, overlay_xml, target_xml

DOMAIN = """<domain type='qemu'><name>web</name><uuid>8d4f1c9e-0000-4000-8000-000000000001</uuid>
<devices>
  <disk type='block' device='disk'><driver name='qemu' type='raw' cache='none'/>
    <source dev='/dev/vg/web'/><backingStore/><target dev='vda' bus='virtio'/><serial>web-root</serial>
  </disk>
  <disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='/vm/data.qcow2'/>
    <target dev='vdb' bus='virtio'/></disk>
  <interface type='network'><mac address='52:54:00:12:34:56'/><source network='default'/></interface>
</devices></domain>"""


def disk(xml: str, dev: str) -> ET.Element:
    (found,) = [d for d in ET.fromstring(xml).iterfind("./devices/disk")
                if d.find("target").get("dev") == dev]
    return found


def test_the_disk_runs_on_a_qcow2_overlay_backed_by_the_export_the_rest_kept() -> None:
    xml = overlay_xml(DOMAIN, "vda", Path("/run/x/web-vda.overlay.qcow2"), Path("/run/x/export.sock"))
    vda = disk(xml, "vda")
    assert vda.get("type") == "file"
    assert vda.find("driver").attrib == {"name": "qemu", "type": "qcow2", "cache": "none"}
    assert vda.find("source").attrib == {"file": "/run/x/web-vda.overlay.qcow2"}
    backing = vda.find("backingStore")
    assert backing.get("type") == "network" and backing.find("format").get("type") == "raw"
    assert backing.find("source").get("protocol") == "nbd"
    assert backing.find("source/host").attrib == {"transport": "unix", "socket": "/run/x/export.sock"}
    assert backing.find("backingStore") is not None  # the chain ends there: libvirt probes nothing
    assert vda.findtext("serial") == "web-root" and vda.find("target").get("bus") == "virtio"
    assert ET.tostring(disk(xml, "vdb")) == ET.tostring(disk(DOMAIN, "vdb"))


def test_after_the_pivot_the_definition_names_the_target_alone() -> None:
    over = overlay_xml(DOMAIN, "vda", Path("/run/x/o.qcow2"), Path("/run/x/export.sock"))
    vda = disk(target_xml(over, "vda", Path("/vm/web.img"), "raw"), "vda")
    assert vda.find("source").attrib == {"file": "/vm/web.img"} and vda.find("driver").get("type") == "raw"
    assert vda.find("backingStore") is None and "nbd" not in ET.tostring(vda, encoding="unicode")


def test_a_new_domain_has_a_new_name_uuid_and_no_mac() -> None:
    root = ET.fromstring(new_identity(DOMAIN, "web-restored"))
    assert root.findtext("name") == "web-restored"
    assert root.findtext("uuid") not in ("", None, "8d4f1c9e-0000-4000-8000-000000000001")
    assert root.find("./devices/interface/mac") is None
    assert root.find("./devices/interface/source").get("network") == "default"


def test_a_request_names_a_disk_the_domain_has_and_a_known_format() -> None:
    with pytest.raises(errors.UsageError, match="no disk 'vdc'"):
        Request(DOMAIN, "vdc", Path("/vm/t.img"))
    with pytest.raises(errors.UsageError, match="raw or qcow2"):
        Request(DOMAIN, "vda", Path("/vm/t.img"), "vmdk")
    with pytest.raises(errors.UsageError, match="not XML"):
        Request("<domain", "vda", Path("/vm/t.img"))
