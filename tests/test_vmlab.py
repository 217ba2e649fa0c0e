"""The vmlab harness boots a real guest that runs the host's Python and talks over virtio-serial.

Needs root and a host prepared by host_agent/lab/setup_host.sh; fails otherwise (deselect with -m 'not vm').
"""

from __future__ import annotations

import secrets
import shlex
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import lab_or_fail

from host_agent.lab import AGENT_CHANNEL, Disk, Lab, Vm, make_disk, render_domain_xml
from host_agent.lab.guest import kernel_failure
from host_agent.lab.twohosts import qemu_starts

# Runs in the guest (the host's own interpreter, over 9p).  The guest speaks first: its write()
# blocks until the host has connected, so nothing the host sends can arrive stale.  It then
# answers one line and waits for the host to hang up before exiting, so the answer is not lost
# in the power-off.
GUEST_ECHO = f"""
import glob, os, signal
signal.alarm(120)
port = next(os.path.basename(os.path.dirname(p))
            for p in glob.glob("/sys/class/virtio-ports/*/name")
            if open(p).read().strip() == {AGENT_CHANNEL!r})
fd = os.open("/dev/" + port, os.O_RDWR)
print("guest: channel is /dev/" + port, flush=True)
os.write(fd, b"HB-HELLO\\n")
buf = b""
while not buf.endswith(b"\\n"):
    chunk = os.read(fd, 4096)
    if not chunk:
        raise SystemExit("guest: host hung up before sending a line")
    buf += chunk
serial = open("/sys/block/vda/serial").read().strip()
os.write(fd, buf.decode().strip().upper().encode() + b" " + serial.encode() + b"\\n")
while os.read(fd, 4096):
    pass
print("guest: done", flush=True)
"""


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    with lab_or_fail(tmp_path / "lab") as the_lab:
        yield the_lab


def _wait_channel_state(vm: Vm, want: str, timeout: float = 10.0) -> str | None:
    deadline = time.monotonic() + timeout
    state = vm.channel_state()
    while state != want and time.monotonic() < deadline:
        time.sleep(0.1)
        state = vm.channel_state()
    return state


def test_domain_xml_has_no_network_and_carries_disk_serials() -> None:
    xml = render_domain_xml(
        "t",
        kernel="/boot/vmlinuz",
        initrd="/i.cpio.gz",
        cmdline="console=ttyS0 hb.cmd=ZXhpdA==",
        console_log="/w/t.log",
        disks=[Disk("/w/a.img", serial="hb-disk-1"), Disk("/w/b.qcow2", "vdb", "qcow2", "hb-disk-2")],
    )
    root = ET.fromstring(xml)
    assert root.get("type") == "qemu"
    assert root.find("./devices/interface") is None
    assert [d.findtext("serial") for d in root.iterfind("./devices/disk")] == ["hb-disk-1", "hb-disk-2"]
    assert [d.get("type") for d in root.iterfind("./devices/disk/driver")] == ["raw", "qcow2"]
    assert [t.get("name") for t in root.iterfind("./devices/channel/target")] == [AGENT_CHANNEL]
    assert root.find("./devices/filesystem/readonly") is not None


@pytest.mark.vm
def test_guest_answers_over_virtio_serial_with_its_disk_serial(lab: Lab, tmp_path: Path) -> None:
    disk = make_disk(tmp_path / "disk1.raw", 64 << 20)
    vm = lab.start_vm(
        "echo",
        disks=[Disk(disk, serial="hb-disk-1")],
        command=f"exec {sys.executable} -c {shlex.quote(GUEST_ECHO)}",
        timeout=180,
    )
    print(f"boot-to-ready {vm.boot_seconds:.2f} s (guest uptime {vm.guest_uptime_at_ready} s)")

    sock = vm.connect_channel(timeout=10)
    sock.settimeout(120)  # the guest's Python starts over 9p under TCG: seconds
    with sock, sock.makefile("rwb") as chan:
        t0 = time.monotonic()
        assert chan.readline() == b"HB-HELLO\n"
        first_line = time.monotonic() - t0
        assert _wait_channel_state(vm, "connected") == "connected"
        nonce = secrets.token_hex(4)
        chan.write(f"hello vmlab {nonce}\n".encode())
        chan.flush()
        assert chan.readline().decode() == f"HELLO VMLAB {nonce.upper()} hb-disk-1\n"
    print(f"ready-to-guest-hello {first_line:.2f} s")

    assert vm.wait_for_exit(timeout=120) == 0
    assert "guest: done" in vm.console()


@pytest.mark.vm
def test_long_command_travels_in_the_initramfs(lab: Lab) -> None:
    filler = "x" * 3000  # past the 2048-byte kernel command line
    vm = lab.start_vm("longcmd", command=f": {filler}\necho long-command-ran", channels=())
    assert vm.wait_for_exit(timeout=120) == 0
    assert "long-command-ran" in vm.console()


def test_a_guest_kernel_failure_is_found_on_the_console() -> None:
    console = ("HB-READY uptime=4.79\nhyperback-media: INFO committed snapshot 76a9e1f5f082bce4\n"
               "[   69.092901] general protection fault: 0000 [#1] PREEMPT SMP NOPTI\n"
               "[   69.142558] Kernel panic - not syncing: Fatal exception in interrupt\n")
    assert kernel_failure(console) == "general protection fault: 0000 [#1] PREEMPT SMP NOPTI"
    assert kernel_failure("HB-READY uptime=4.79\ntick 1\nBUG: not a kernel line\n") is None


def test_qemu_starts_are_read_from_a_domains_libvirt_log(tmp_path: Path) -> None:
    head = "{}: starting up libvirt version: 9.0.0, qemu version: 7.2.22, hostname: vm\nLC_ALL=C \\\n"
    log = tmp_path / "hbvl-g.log"
    (tmp_path / "hbvl-g.log.0").write_text(head.format("2026-12-07 03:14:25.361+0000") + "-name guest=g \\\n"
                                           "2026-12-07 03:14:38.743+0000: shutting down, reason=migrated\n")
    log.write_text(head.format("2026-12-07 03:14:46.706+0000") + "-incoming defer \\\n-msg timestamp=on\n"
                   + head.format("2026-12-07 03:15:53.724+0000") + "-sandbox on \\\n")
    starts = qemu_starts(log)
    assert [(s.at.strftime("%H:%M:%S"), s.boot) for s in starts] == [
        ("03:14:25", True), ("03:14:46", False), ("03:15:53", True)]
    assert [s.boot for s in qemu_starts(log, since=starts[1].at)] == [False, True]
