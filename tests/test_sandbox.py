"""The sandbox a boot verification boots in (host_agent.agent.sandbox): made from the VM's own
definition, with nothing that reaches the network, the host or the original VM, one disk on the
overlay over the export, the verifier's channel and a console file; and a running agent leaves it
alone."""
from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from host_agent import errors
from host_agent.agent.domains import AGENT_CHANNEL, parse_domain_xml
from host_agent.agent.sandbox import SandboxPaths, boot_disk_serial, nvram_of, sandbox_xml

VM = """<domain type='kvm'>
  <name>web1</name><uuid>4f1c3c5e-7a2b-4b8e-9a55-0123456789ab</uuid><genid>x</genid>
  <metadata><hb:hyperback xmlns:hb="https://hyperback.dev/xmlns/wiring/1"><hb:group>web</hb:group></hb:hyperback>
  </metadata>
  <memory unit='MiB'>512</memory>
  <os><type arch='x86_64' machine='q35'>hvm</type>
    <loader readonly='yes' type='pflash'>/usr/share/OVMF/OVMF_CODE.fd</loader>
    <nvram>/var/lib/libvirt/qemu/nvram/web1_VARS.fd</nvram></os>
  <on_reboot>restart</on_reboot>
  <devices>
    <disk type='block' device='disk'><driver name='qemu' type='raw' cache='none'/>
      <source dev='/dev/vg/web1-data'/><target dev='vdb' bus='virtio'/><serial>data</serial></disk>
    <disk type='file' device='disk'><driver name='qemu' type='qcow2'/>
      <source file='/var/lib/libvirt/images/web1.qcow2'/>
      <backingStore type='file'><format type='qcow2'/><source file='/base.qcow2'/></backingStore>
      <target dev='vda' bus='virtio'/><serial>root</serial><boot order='1'/></disk>
    <disk type='file' device='cdrom'><source file='/iso/install.iso'/><target dev='sda' bus='sata'/></disk>
    <interface type='network'><source network='default'/><model type='virtio'/></interface>
    <interface type='bridge'><source bridge='br0'/></interface>
    <hostdev mode='subsystem' type='pci'/>
    <filesystem type='mount'><source dir='/srv'/><target dir='srv'/></filesystem>
    <graphics type='vnc' port='-1' listen='0.0.0.0'/>
    <tpm model='tpm-crb'><backend type='emulator'/></tpm>
    <channel type='unix'><source mode='bind' path='/run/web1-agent.sock'/>
      <target type='virtio' name='org.hyperback.agent.0'/></channel>
    <channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>
    <serial type='pty'><log file='/var/log/web1.log'/><target port='0'/></serial>
    <console type='pty'><target type='serial' port='0'/></console>
    <rng model='virtio'><backend model='random'>/dev/urandom</backend></rng>
  </devices>
</domain>"""

PATHS = SandboxPaths(Path("/w/overlay.qcow2"), Path("/w/export.sock"), Path("/w/hb.sock"),
                     Path("/w/console.log"), Path("/w/nvram.fd"))


def sandbox(definition: str = VM, serial: str = "root") -> ET.Element:
    return ET.fromstring(sandbox_xml(definition, name="hb-verify-x", serial=serial,
                                     snapshot="0123456789abcdef", paths=PATHS))


def test_nothing_reaches_the_network_the_host_or_the_original_vm() -> None:
    devices = sandbox().find("devices")
    assert devices is not None
    kept = sorted({el.tag for el in devices})
    assert kept == ["channel", "console", "disk", "rng", "serial"]
    channels = devices.findall("channel")
    assert len(channels) == 1 and channels[0].find("target").get("name") == AGENT_CHANNEL  # type: ignore[union-attr]
    assert channels[0].find("source").get("path") == "/w/hb.sock"  # type: ignore[union-attr]
    for tag in ("serial", "console"):
        el = devices.find(tag)
        assert el is not None and el.get("type") == "file"
        assert el.find("source").get("path") == "/w/console.log"  # type: ignore[union-attr]


def test_one_disk_on_the_overlay_backed_by_the_export_keeping_target_serial_and_boot_order() -> None:
    (disk,) = sandbox().findall("./devices/disk")
    assert (disk.get("type"), disk.findtext("serial")) == ("file", "root")
    assert disk.find("target").attrib == {"dev": "vda", "bus": "virtio"}  # type: ignore[union-attr]
    assert disk.find("boot") is not None
    assert disk.find("driver").attrib == {"name": "qemu", "type": "qcow2"}  # type: ignore[union-attr]
    assert disk.find("source").attrib == {"file": "/w/overlay.qcow2"}  # type: ignore[union-attr]
    backing = disk.find("backingStore")
    assert backing is not None and backing.get("type") == "network"
    assert backing.find("format").get("type") == "raw"  # type: ignore[union-attr]
    host = backing.find("./source[@protocol='nbd']/host")
    assert host is not None and host.attrib == {"transport": "unix", "socket": "/w/export.sock"}


def test_a_new_identity_a_private_nvram_and_every_lifecycle_event_destroys() -> None:
    root = sandbox()
    assert root.find("uuid") is None and root.find("genid") is None and root.findtext("name") == "hb-verify-x"
    assert root.findtext("./os/nvram") == "/w/nvram.fd"
    assert root.findtext("./os/loader") == "/usr/share/OVMF/OVMF_CODE.fd"
    assert [root.findtext(e) for e in ("on_poweroff", "on_reboot", "on_crash")] == ["destroy"] * 3
    info = parse_domain_xml(ET.tostring(root, encoding="unicode"), "u", "hb-verify-x", True)
    assert info.sandbox and info.groups == () and info.channel_path == "/w/hb.sock"
    assert not parse_domain_xml(VM, "u", "web1", True).sandbox


def test_the_boot_disk_and_the_nvram_are_read_from_the_definition() -> None:
    assert boot_disk_serial(VM) == "root"
    assert boot_disk_serial(VM.replace("<boot order='1'/>", "")) == "data"  # the first with a serial
    assert nvram_of(VM) == Path("/var/lib/libvirt/qemu/nvram/web1_VARS.fd")


def test_a_serial_the_vm_does_not_have_or_a_foreign_document_is_a_usage_error() -> None:
    with pytest.raises(errors.UsageError, match="no disk with serial 'nope'"):
        sandbox(serial="nope")
    with pytest.raises(errors.UsageError, match="not a <domain>"):
        sandbox("<network/>")
    with pytest.raises(errors.UsageError, match="not XML"):
        sandbox("<domain")
