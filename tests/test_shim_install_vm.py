"""The guest shim's packages in a real Debian 12 guest with no network: the zipapp runs with
Debian's python3 alone, the wheel installs into a venv (Debian's pip wheel, nothing fetched),
``install-service`` writes the unit that udev starts when the port is there, backups requested
in the guest succeed against the real agent, a freeze hook that hangs is cut off at the
freeze watchdog's bound with the guest thawed, and the unit follows the port when the host
unplugs the channel and plugs it back.

The Debian image (host_agent/lab/debian.py) is built once, by debootstrap from apt's mirror, and
cached under /var/tmp/hyperback-vmlab; the packages reach the guest on a small read-only disk.
"""
from __future__ import annotations

import json
import logging
import re
import shutil
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import libvirt  # type: ignore[import-untyped]
import pytest
from agent_harness import RunningAgent, agent_config_for, running_agent
from conftest import lab_or_fail

from host_agent.cli import shim_cmd
from host_agent.lab import AGENT_CHANNEL, Disk, Lab, Vm, debian, make_disk
from host_agent.storage.repository import Repository

pytestmark = [pytest.mark.vm, pytest.mark.slow]
log = logging.getLogger(__name__)

FREEZE_TIMEOUT = 8.0  # the agent's freeze timeout: the guest's watchdog bound, and the hooks'
MIB = 1024 * 1024

GUEST_SCRIPT = r"""
set -u
data=/dev/disk/by-id/virtio-hb-data
mkfs.ext4 -q -F "$data" && mkdir -p /data && mount "$data" /data || exit 10
dd if=/dev/urandom of=/data/pattern bs=1M count=4 status=none && sync
echo "PATTERN $(sha256sum /data/pattern | cut -d' ' -f1)"

# 1. No pip: the zipapp with python3 alone, talking to the port itself (nothing serves it yet).
install -m 0755 hyperback-shim.pyz /usr/local/lib/hyperback-shim.pyz
echo "PYZ-BACKUP $(python3 -I /usr/local/lib/hyperback-shim.pyz backup --json --policy full hb-data)"

# 2. The wheel, into a venv, by Debian's own pip wheel (python3-venv's python3-pip-whl, what
#    ensurepip would copy: run from the wheel it skips ensurepip's minute under TCG), --no-index.
start=$(cut -d' ' -f1 /proc/uptime)
pip_wheel=$(echo /usr/share/python-wheels/pip-*.whl)
python3 -m venv --without-pip /opt/hyperback-shim \
  && /opt/hyperback-shim/bin/python "$pip_wheel/pip" install --no-index --disable-pip-version-check -q \
     ./hyperback_shim-*.whl
echo "INSTALLED $? $(awk -v s=$start '{print $1 - s}' /proc/uptime)"
/opt/hyperback-shim/bin/hyperback-shim install-service || exit 11
# install-service never starts the unit: udev does, for the port's replayed add event
u=hyperback-shim
i=0
while [ ! -S /run/hyperback-shim.sock ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i + 1)); done
echo "UNIT $(systemctl show $u -p ActiveState --value) $(systemctl show $u -p BindsTo --value)"
echo "EXEC $(grep '^ExecStart=' /etc/systemd/system/hyperback-shim.service)"
echo "WHEEL-BACKUP $(/opt/hyperback-shim/bin/hyperback-shim backup --json hb-data)"

# 3. A freeze hook that hangs: cut off at the watchdog's bound, nothing stays frozen.
printf '#!/bin/sh\n[ "$1" = freeze ] && exec sleep 100000\nexit 0\n' > /etc/hyperback/fsfreeze-hook.d/10-hang
chmod 0755 /etc/hyperback/fsfreeze-hook.d/10-hang
echo "HOOK-BACKUP $(/opt/hyperback-shim/bin/hyperback-shim backup --json hb-data)"
timeout 20 sh -c 'echo after > /data/after && sync /data/after'
echo "WRITE-AFTER $?"
# (minbase has no procps: count the hook's processes in /proc)
echo "HOOK-PROCESSES $(cat /proc/[0-9]*/cmdline 2>/dev/null | tr '\0' ' ' | grep -o 'sleep 10000[0]' | wc -l)"
journalctl -u hyperback-shim -o cat --no-pager | grep -i 'hook' | sed 's/^/JOURNAL /'

# 4. The host unplugs the channel and plugs it again: BindsTo stops the unit, udev starts it.
state() { systemctl show $u -p ActiveState --value; }
echo "READY-FOR-UNPLUG"
i=0
while [ "$(state)" = active ] && [ $i -lt 1200 ]; do sleep 0.1; i=$((i + 1)); done
echo "UNPLUGGED $(state)"
i=0
while [ "$(state)" != active ] && [ $i -lt 1200 ]; do sleep 0.1; i=$((i + 1)); done
echo "REPLUGGED $(state)"
exit 0
"""


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    path = Path("/var/tmp") / f"hb-shim-install-{uuid.uuid4().hex[:8]}"
    path.mkdir(parents=True)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def lab(workdir: Path) -> Iterator[Lab]:
    with lab_or_fail(workdir / "lab", max_running=2) as the_lab:
        yield the_lab


@pytest.fixture(scope="module")
def agent(workdir: Path, lab: Lab) -> Iterator[RunningAgent]:
    config = agent_config_for(workdir / "agent", interval=1.0, freeze_timeout=FREEZE_TIMEOUT)
    with running_agent(config) as running:
        yield running


def replug(vm: Vm) -> None:
    """When the guest says so, unplug its hyperback channel and plug the same channel back."""
    vm.wait_for_console(r"^READY-FOR-UNPLUG", timeout=600)
    channel = next(ch for ch in vm.xml().iterfind("./devices/channel")
                   if ch.find("target") is not None and ch.find("target").get("name") == AGENT_CHANNEL)
    detach = ET.tostring(channel, encoding="unicode")
    target = channel.find("target")
    assert target is not None
    target.attrib.pop("state", None)
    for alias in channel.findall("alias"):
        channel.remove(alias)
    attach = ET.tostring(channel, encoding="unicode")
    vm.domain.detachDeviceFlags(detach, libvirt.VIR_DOMAIN_AFFECT_LIVE)
    vm.wait_for_console(r"^UNPLUGGED ", timeout=120)
    vm.domain.attachDeviceFlags(attach, libvirt.VIR_DOMAIN_AFFECT_LIVE)


def runner_output(console: str) -> str:
    """What run.sh printed (the console without the kernel's and systemd's lines)."""
    after = console[console.find("HB-READY"):]
    return "\n".join(x for x in after.splitlines() if not x.startswith(("[", " ")) and "\x1b" not in x)


def line(console: str, marker: str) -> str:
    m = re.search(rf"^{marker} (.*)$", console, re.MULTILINE)
    assert m, f"no {marker} line on the console:\n{runner_output(console)}"
    return m.group(1).strip()


def result(console: str, marker: str) -> dict[str, object]:
    doc: dict[str, object] = json.loads(line(console, marker))
    return doc


def test_the_wheel_and_the_zipapp_install_in_a_debian_guest_without_network_and_back_it_up(
        agent: RunningAgent, lab: Lab, workdir: Path) -> None:
    commands = workdir / "commands"
    commands.mkdir()
    t0 = time.monotonic()
    shim_cmd.build_wheel(commands)
    shim_cmd.build_zipapp(commands)
    built = time.monotonic() - t0
    (commands / "run.sh").write_text(GUEST_SCRIPT)

    t0 = time.monotonic()
    image = debian.build_image(lab.cache_dir, lab.kernel)
    image_seconds = time.monotonic() - t0
    root = debian.overlay(image, workdir / "root.qcow2")
    data = make_disk(workdir / "data.qcow2", 64 * MIB, "qcow2")
    vm = debian.start_debian_vm(lab, "shim-install", root=root,
                                commands=debian.command_disk(commands, workdir / "commands.img"),
                                disks=[Disk(data, "vdb", "qcow2", "hb-data")], timeout=300)
    replug(vm)
    status = vm.wait_for_exit(timeout=600)
    console = vm.console()
    assert status == 0, runner_output(console)

    pyz = result(console, "PYZ-BACKUP")
    assert pyz["ok"] is True and pyz["quiesced"] is True, pyz

    installed = line(console, "INSTALLED").split()
    assert installed[0] == "0", console[-4000:]
    # systemctl show quotes a unit name that has a backslash
    device = "dev-virtio\\x2dports-org.hyperback.agent.0.device"
    assert line(console, "UNIT").replace('"', "") == f"active {device}"
    assert line(console, "EXEC") == "ExecStart=/opt/hyperback-shim/bin/hyperback-shim serve"
    wheel = result(console, "WHEEL-BACKUP")
    assert wheel["ok"] is True and wheel["quiesced"] is True, wheel

    # the hanging hook: the backup still succeeds, crash-consistent, and the guest is thawed
    hooked = result(console, "HOOK-BACKUP")
    assert hooked["ok"] is True and hooked["quiesced"] is False, hooked
    assert line(console, "WRITE-AFTER") == "0"
    assert line(console, "HOOK-PROCESSES") == "0"
    journal = "\n".join(re.findall(r"^JOURNAL (.*)$", console, re.MULTILINE))
    assert "10-hang freeze cut off" in journal, journal

    # the port went away and came back: the unit followed it both ways
    assert line(console, "UNPLUGGED") in ("inactive", "failed"), runner_output(console)
    assert line(console, "REPLUGGED") == "active", runner_output(console)

    repo = Repository.open(workdir / "agent" / "repo")
    assert len([s for s in repo.snapshots() if "/vm/" not in s.name]) == 3  # the disk's; not definitions
    log.warning("shim packages built in %.1f s; Debian image ready in %.1f s; guest booted in %.1f s; "
                "wheel installed in %s s (guest clock); backups: pyz %.1f s, wheel %.1f s, hooked %.1f s",
                built, image_seconds, vm.boot_seconds or -1, installed[1], pyz["seconds"], wheel["seconds"],
                hooked["seconds"])
