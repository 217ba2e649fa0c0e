"""A real Debian 12 guest (systemd, udev, Debian's python3): for tests where the guest OS matters.

The busybox guest of ``guest.py`` runs the host's Python over 9p and has no init system; packaging,
units and udev rules need the real thing.  This module builds, once, a Debian bookworm root file
system (``debootstrap --variant=minbase`` from the mirror in apt's sources, about 70 s), with:

* the modules of the guest kernel (``guest.find_guest_kernel``) that a virtio guest needs
  (virtio_console is a module: without it there is no /dev/vport*), and ``depmod``;
* ``python3`` and ``python3-venv``, which brings Debian's pip as a wheel (python3-pip-whl, what
  ensurepip installs): a guest installs a wheel into a venv with no network.  Not python3-pip:
  Debian's python3 refuses ``pip install`` into the system anyway (PEP 668), a venv is the way;
  and not ensurepip in the test (``python3 -m venv`` takes a minute under TCG): pip runs from
  its wheel into a ``--without-pip`` venv, the same pip;
* no login prompts (agetty would hang up the console the runner writes to), and the lab's
  runner: a unit that waits for the boot to finish, mounts the read-only disk with serial
  ``hb-lab-cmd``, runs ``run.sh`` from it with the console (ttyS0) as its output, prints the lab's
  markers (``HB-READY uptime=…`` before, ``HB-EXIT <status>`` after) and powers off.

The image is a sparse raw file made by ``mke2fs -d`` (no loop mount), cached under
``/var/tmp/hyperback-vmlab`` by a key over everything that goes into it; a guest boots a qcow2
overlay of it (:func:`overlay`).  ``start_debian_vm`` boots one through a :class:`Lab`, with the
host's kernel and Debian's initrd, so ``Vm.wait_for_exit`` and ``Vm.console`` work as for the
busybox guest.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

from . import guest
from .domain import DESCRIPTION, EMULATOR, Channel, Disk, Lab, Vm, _libvirt, render_channel, render_disk
from .errors import GuestBuildError, HostNotReady, LibvirtFailure, VmLabError

log = logging.getLogger(__name__)

SUITE = "bookworm"
PACKAGES = ("systemd-sysv", "udev", "dbus", "kmod", "e2fsprogs", "util-linux", "python3", "python3-venv")
COMMAND_SERIAL = "hb-lab-cmd"
IMAGE_SIZE = "2G"
# kernel module folders a virtio guest needs (the rest of the 400 MB tree is left out)
MODULE_DIRS = ("arch", "block", "crypto", "lib", "mm", "virt", "fs", "drivers/virtio", "drivers/char",
               "drivers/block", "drivers/md")
_FORMAT_VERSION = "2"  # bump to invalidate cached images

RUNNER = """\
#!/bin/sh
# vmlab runner: run.sh from the disk with serial hb-lab-cmd, output on the console, then power off.
exec >/dev/ttyS0 2>&1
dev=/dev/disk/by-id/virtio-hb-lab-cmd
i=0
while [ ! -e "$dev" ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i + 1)); done
mkdir -p /run/hb-cmd
if ! mount -o ro,noload "$dev" /run/hb-cmd; then
    echo "HB-INIT-FAILED: no command disk"
    echo "HB-EXIT 255"
    systemctl poweroff
    exit 0
fi
echo "HB-BOOT $(systemctl is-system-running --wait)"
echo "HB-READY uptime=$(cut -d' ' -f1 /proc/uptime)"
cd /run/hb-cmd && sh ./run.sh
echo "HB-EXIT $?"
systemctl poweroff
"""

RUNNER_UNIT = """\
[Unit]
Description=vmlab runner (the test's commands from the disk with serial hb-lab-cmd)
After=basic.target

[Service]
Type=simple
ExecStart=/usr/local/sbin/hb-lab-run

[Install]
WantedBy=multi-user.target
"""

DOMAIN_XML = """\
<domain type='qemu'>
  <name>{name}</name>
  <description>{description}</description>
  <memory unit='MiB'>{memory_mib}</memory>
  <vcpu placement='static'>{vcpus}</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{kernel}</kernel>
    <initrd>{initrd}</initrd>
    <cmdline>root=/dev/vda rw console=ttyS0 panic=-1 8250.nr_uarts=1 no_timer_check</cmdline>
  </os>
  <features>
    <acpi/>
  </features>
  <cpu mode='maximum' check='none'/>
  <clock offset='utc'/>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>{emulator}</emulator>
    <controller type='usb' model='none'/>
    <controller type='virtio-serial' index='0'/>
{disks}
{channels}
    <serial type='file'>
      <source path='{console_log}' append='off'/>
      <target port='0'/>
    </serial>
    <console type='file'>
      <source path='{console_log}' append='off'/>
      <target type='serial' port='0'/>
    </console>
    <memballoon model='none'/>
  </devices>
</domain>
"""


def apt_mirror(sources: Iterable[Path] = (Path("/etc/apt/sources.list"),),
               sources_dir: Path = Path("/etc/apt/sources.list.d")) -> str:
    """The Debian mirror apt uses for bookworm (one-line or deb822 sources)."""
    files = [p for p in sources if p.exists()]
    if sources_dir.is_dir():
        files += sorted(p for p in sources_dir.iterdir() if p.suffix in (".list", ".sources"))
    for path in files:
        text = path.read_text(errors="replace")
        for m in re.finditer(r"^deb\s+(?:\[[^\]]*\]\s+)?(\S+)\s+(\S+)\s", text, re.MULTILINE):
            if m.group(2) == SUITE:
                return m.group(1)
        for stanza in re.split(r"\n\s*\n", text):
            fields = dict(re.findall(r"^([A-Za-z-]+):\s*(.*)$", stanza, re.MULTILINE))
            if SUITE in fields.get("Suites", "").split() and "deb" in fields.get("Types", "").split():
                return str(fields["URIs"].split()[0])
    raise HostNotReady(f"no Debian {SUITE} mirror in apt's sources ({', '.join(map(str, files))})")


def _run(cmd: Sequence[str], what: str, timeout: float = 600) -> None:
    try:
        subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError as e:
        raise HostNotReady(f"{cmd[0]} not found ({what}; .ci/setup installs it)") from e
    except subprocess.TimeoutExpired as e:
        raise GuestBuildError(f"{what}: no end after {timeout:.0f} s") from e
    except subprocess.CalledProcessError as e:
        tail = " ".join((e.stderr or e.stdout or "").strip().splitlines()[-4:])
        raise GuestBuildError(f"{what} failed (exit {e.returncode}): {tail}") from e


def image_key(kernel: guest.GuestKernel, mirror: str) -> str:
    parts = [_FORMAT_VERSION, SUITE, mirror, kernel.version, " ".join(PACKAGES), " ".join(MODULE_DIRS),
             RUNNER, RUNNER_UNIT, IMAGE_SIZE]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


def build_image(cache_dir: Path = guest.DEFAULT_CACHE_DIR, kernel: guest.GuestKernel | None = None) -> Path:
    """The cached Debian root image (sparse raw, ext4 on the whole disk), built when absent."""
    kernel = kernel or guest.find_guest_kernel()
    mirror = apt_mirror()
    image = Path(cache_dir) / f"debian-{SUITE}-{image_key(kernel, mirror)}.raw"
    if image.exists():
        return image
    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        raise HostNotReady("building the Debian guest image needs root (debootstrap)")
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="debian-", dir=cache_dir) as tmp:
        root = Path(tmp) / "root"
        log.info("debootstrap %s from %s (about a minute)", SUITE, mirror)
        include = f"--include={','.join(PACKAGES)}"
        _run(["debootstrap", "--variant=minbase", include, SUITE, str(root), mirror], "debootstrap")
        _customize(root, kernel)
        partial = Path(tmp) / "root.raw"
        _run(["mke2fs", "-q", "-t", "ext4", "-L", "hbroot", "-d", str(root), str(partial), IMAGE_SIZE],
             "mke2fs -d")
        os.replace(partial, image)
    log.info("built %s in %.0f s", image, time.monotonic() - t0)
    return image


def _customize(root: Path, kernel: guest.GuestKernel) -> None:
    modules = root / "lib" / "modules" / kernel.version
    for sub in MODULE_DIRS:
        src = kernel.modules_dir / "kernel" / sub
        if src.is_dir():
            shutil.copytree(src, modules / "kernel" / sub, symlinks=True)
    for meta in kernel.modules_dir.glob("modules.*"):
        if meta.name in ("modules.order", "modules.builtin", "modules.builtin.modinfo"):
            shutil.copy2(meta, modules / meta.name)
    _run(["depmod", "-b", str(root), kernel.version], "depmod")
    (root / "etc" / "machine-id").write_text("")  # systemd takes the VM's UUID
    (root / "etc" / "fstab").write_text("/dev/vda / ext4 rw,errors=remount-ro 0 1\n")
    (root / "etc" / "hostname").write_text("hbdebian\n")
    _run(["chroot", str(root), "passwd", "-d", "root"], "passwd -d root")
    runner = root / "usr" / "local" / "sbin" / "hb-lab-run"
    runner.write_text(RUNNER)
    runner.chmod(0o755)
    (root / "etc" / "systemd" / "system" / "hb-lab-run.service").write_text(RUNNER_UNIT)
    wants = root / "etc" / "systemd" / "system" / "multi-user.target.wants"
    wants.mkdir(parents=True, exist_ok=True)
    (wants / "hb-lab-run.service").symlink_to("/etc/systemd/system/hb-lab-run.service")
    # no login prompts: agetty's vhangup() on ttyS0 would cut the runner's output off the console
    for getty in ("serial-getty@ttyS0.service", "getty@tty1.service"):
        (root / "etc" / "systemd" / "system" / getty).symlink_to("/dev/null")
    shutil.rmtree(root / "var" / "cache" / "apt" / "archives", ignore_errors=True)


def overlay(base: Path, path: Path) -> Path:
    """A qcow2 overlay of the cached image, for one guest to write into."""
    _run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "raw", str(path)],
         "qemu-img create")
    return path


def command_disk(folder: Path, path: Path, size: str = "64M") -> Disk:
    """A small ext4 image holding ``folder`` (its ``run.sh`` is what the guest runs), as the
    read-only disk the runner looks for."""
    if not (folder / "run.sh").exists():
        raise VmLabError(f"{folder} has no run.sh")
    _run(["mke2fs", "-q", "-t", "ext4", "-d", str(folder), str(path), size], "mke2fs -d (command disk)")
    return Disk(path, "vdz", "raw", COMMAND_SERIAL, readonly=True)


def start_debian_vm(lab: Lab, name: str, *, root: Path, commands: Disk, disks: Sequence[Disk] = (),
                    channels: Sequence[Channel] = (Channel(),), memory_mib: int = 384, vcpus: int = 1,
                    timeout: float = 180.0) -> Vm:
    """Boot a Debian guest on ``root`` (an overlay of :func:`build_image`) with the command disk
    ``commands``; wait for the runner's ready marker (the boot finished, run.sh starts)."""
    from xml.sax.saxutils import escape

    libvirt = _libvirt()
    full_name = lab.name_prefix + name
    initrd = Path("/boot") / f"initrd.img-{lab.kernel.version}"
    if not initrd.exists():
        raise HostNotReady(f"{initrd} is missing (Debian's initrd of the guest kernel)")
    console_log = lab.workdir / f"{full_name}.console.log"
    console_log.unlink(missing_ok=True)
    all_disks = [Disk(root, "vda", "qcow2"), *disks, commands]
    xml = DOMAIN_XML.format(
        name=escape(full_name), description=escape(DESCRIPTION), memory_mib=int(memory_mib), vcpus=int(vcpus),
        kernel=escape(str(lab.kernel.image)), initrd=escape(str(initrd)), emulator=EMULATOR,
        disks="\n".join(render_disk(d) for d in all_disks),
        channels="\n".join(render_channel(c) for c in channels), console_log=escape(str(console_log)))
    (lab.workdir / f"{full_name}.xml").write_text(xml)
    t0 = time.monotonic()
    try:
        dom = lab.conn.createXML(xml, 0)
    except libvirt.libvirtError as e:
        raise LibvirtFailure(f"starting {full_name}: {e}") from e
    vm = Vm(lab, full_name, dom, console_log, False, t0)
    lab.vms.append(vm)
    vm.wait_for_console(r"^HB-READY uptime=([\d.]+)", timeout)
    vm.boot_seconds = time.monotonic() - t0
    up = re.search(r"^HB-READY uptime=([\d.]+)", vm.console(), re.MULTILINE)
    vm.guest_uptime_at_ready = float(up.group(1)) if up else None
    vm.log.info("Debian guest ready after %.1f s", vm.boot_seconds)
    return vm
