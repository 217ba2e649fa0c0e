"""hyperback vm enable/disable/status against the real libvirtd, and a real guest that uses the channel.

A lab guest is defined with no hyperback XML at all (no channel, no serial), started, and wired in
while it runs: the channel arrives live and the guest opens it; the serial waits for the restart,
and after it the guest reads it from /sys/block/vda/serial.
"""
from __future__ import annotations

import re
import shutil
import socket
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from pathlib import Path

import libvirt  # type: ignore[import-untyped]
import pytest
from conftest import lab_or_fail

from host_agent.agent import wiring
from host_agent.cli import main
from host_agent.lab import Disk, Lab, Vm, make_disk

pytestmark = pytest.mark.vm
MIB = 1024 * 1024

# The guest: print the serial it sees, wait for the hyperback port (hot-plugged or there at boot),
# hold it open (libvirt then says state='connected') until the host sends a line or unplugs the port.
GUEST = r"""
echo "SERIAL <$(cat /sys/block/vda/serial 2>/dev/null)>"
port=""
while [ -z "$port" ]; do
  for n in /sys/class/virtio-ports/*/name; do
    [ "$(cat "$n" 2>/dev/null)" = org.hyperback.agent.0 ] && port=/dev/$(basename "$(dirname "$n")")
  done
  [ -z "$port" ] && sleep 0.2
done
echo "PORT $port"
exec 3<>"$port"
line=""
# read() gives EOF at once while no host client is connected: poll until a line or the port is unplugged
while [ -e "/sys/class/virtio-ports/${port#/dev/}" ]; do
  read -r line <&3 && break
  sleep 0.2
done
echo "GOT <$line>"
"""


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    path = Path("/var/tmp") / f"hb-wiring-vm-{uuid.uuid4().hex[:8]}"
    path.mkdir(parents=True)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def lab(workdir: Path) -> Iterator[Lab]:
    with lab_or_fail(workdir / "lab") as the_lab:
        yield the_lab


def wait_for(what: str, check: Callable[[], bool], timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def persistent_xml(dom: libvirt.virDomain) -> ET.Element:
    return ET.fromstring(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))


def hb(*args: str) -> int:
    return main(["vm", *args])


def send_line(vm: Vm, text: str) -> None:
    with vm.connect_channel() as sock:
        sock.sendall(text.encode() + b"\n")
        sock.shutdown(socket.SHUT_WR)


def test_a_vm_defined_without_hyperback_xml_is_wired_in_live_and_after_a_restart(
        lab: Lab, workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = make_disk(workdir / "wired.qcow2", 16 * MIB, "qcow2")
    vm = lab.start_vm("wired", command=GUEST, disks=[Disk(data, "vda", "qcow2")], channels=(),
                      persistent=True)
    dom = vm.domain
    before = persistent_xml(dom)
    assert before.find("./devices/channel") is None and before.find("./devices/disk/serial") is None

    t0 = time.monotonic()
    assert hb("enable", vm.name) == 0
    enable_seconds = time.monotonic() - t0
    out = capsys.readouterr().out
    serial = wiring.stable_serial(dom.UUIDString(), "vda")
    assert f"disk vda: serial {serial} added" in out and "channel added live" in out
    assert f"serial {serial} of vda takes effect at the next restart (shutdown + start)" in out
    defined = persistent_xml(dom)
    assert [t.get("name") for t in defined.findall("./devices/channel/target")] == ["org.hyperback.agent.0"]
    assert defined.findtext("./devices/disk/serial") == serial

    # the hot-plugged port reaches the guest, which opens it: libvirt reports the guest side connected
    vm.wait_for_console(r"PORT /dev/vport\d+p\d+", 60)
    wait_for("the channel to be connected", lambda: vm.channel_state() == "connected")
    assert hb("status", vm.name) == 0
    status = capsys.readouterr().out
    assert "channel: present, live, guest side connected" in status
    assert "the guest sees none until the next restart" in status

    # twice: nothing changes, byte for byte
    xml = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
    assert hb("enable", vm.name) == 0
    assert "already enabled" in capsys.readouterr().out
    assert dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE) == xml

    send_line(vm, "bye")
    assert vm.wait_for_exit(60) == 0 and "GOT <bye>" in vm.console()
    assert "SERIAL <>" in vm.console()

    # after the restart the guest sees its serial, and the channel is there from the start
    vm.start_again()
    vm.wait_for_console(rf"SERIAL <{serial}>\s+PORT /dev/vport", 120)
    wait_for("the channel to be connected", lambda: vm.channel_state() == "connected")

    # disable while it runs: the channel goes live (the guest's read ends) and from the definition;
    # the serial stays, until asked
    assert hb("disable", vm.name) == 0
    out = capsys.readouterr().out
    assert "channel removed live" in out and "disk serials kept" in out
    assert vm.wait_for_exit(60) == 0
    defined = persistent_xml(dom)
    assert defined.find("./devices/channel") is None and defined.findtext("./devices/disk/serial") == serial
    assert hb("disable", "--remove-serials", vm.name) == 0
    assert f"disk vda: serial {serial} removed" in capsys.readouterr().out
    after = persistent_xml(dom)
    assert after.find("./devices/disk/serial") is None
    assert after.find(f"./metadata/{{{wiring.NS}}}hyperback") is None
    print(f"vm enable of a running domain took {enable_seconds:.3f} s")


def test_a_transient_domain_is_refused_with_one_line(lab: Lab, workdir: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    vm = lab.start_vm("transient", command="read -r x < /dev/console", disks=(), channels=())
    assert hb("enable", vm.name) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert re.search(rf"{vm.name} is a transient domain: libvirt keeps no definition", err), err
    vm.destroy()


def test_a_network_disk_is_refused_a_cdrom_skipped_and_an_unknown_domain_named(
        lab: Lab, workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    image = make_disk(workdir / "net.raw", MIB)
    name = f"hbvl-net-{uuid.uuid4().hex[:6]}"
    xml = f"""<domain type='qemu'><name>{name}</name><memory unit='MiB'>64</memory>
      <os><type arch='x86_64' machine='pc'>hvm</type></os><devices>
      <disk type='file' device='disk'><driver name='qemu' type='raw'/><source file='{image}'/>
        <target dev='vda' bus='virtio'/></disk>
      <disk type='file' device='cdrom'><target dev='hdc' bus='ide'/><readonly/></disk>
      <disk type='network' device='disk'><driver name='qemu' type='raw'/>
        <source protocol='nbd' name='export'><host name='127.0.0.1' port='10809'/></source>
        <target dev='vdb' bus='virtio'/></disk></devices></domain>"""
    dom = lab.conn.defineXML(xml)
    try:
        before = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
        assert hb("enable", name) == 2
        err = capsys.readouterr().err
        assert "cannot back up disk vdb, a network disk (nbd:export)" in err
        assert dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE) == before  # nothing half-done
        dom.detachDeviceFlags("<disk type='network' device='disk'><source protocol='nbd' name='export'>"
                              "<host name='127.0.0.1' port='10809'/></source><target dev='vdb' bus='virtio'/>"
                              "</disk>", libvirt.VIR_DOMAIN_AFFECT_CONFIG)
        assert hb("enable", name) == 0
        assert "disk hdc: skipped, a cdrom, not a disk to back up" in capsys.readouterr().out
        assert hb("enable", "hbvl-no-such-domain") == 2
        assert "no domain 'hbvl-no-such-domain' on this host" in capsys.readouterr().err
    finally:
        dom.undefine()
