"""The guest shim's packages in a real Debian 12 guest with no network: the zipapp runs with
Debian's python3 alone, the wheel installs into a venv (Debian's pip wheel, nothing fetched),
``install-service`` writes the unit that udev starts when the port is there, backups requested
in the guest succeed against the real agent, and a freeze hook that hangs is cut off at the
freeze watchdog's bound with the guest thawed.

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
from collections.abc import Iterator
from pathlib import Path

import pytest
from agent_harness import RunningAgent, agent_config_for, running_agent
from conftest import lab_or_fail

from host_agent.cli import shim_cmd
from host_agent.lab import Disk, Lab, debian, make_disk
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
python3 -m venv --without-pip /opt/hyperback-shim \
  && /opt/hyperback-shim/bin/python /usr/share/python-wheels/pip-*.whl/pip install --no-index \
     --disable-pip-version-check -q ./hyperback_shim-*.whl
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
echo "HOOK-PROCESSES $(pgrep -c -f 'sleep 100000')"
journalctl -u hyperback-shim -o cat --no-pager | grep -i 'hook' | sed 's/^/JOURNAL /'
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


def line(console: str, marker: str) -> str:
    m = re.search(rf"^{marker} (.*)$", console, re.MULTILINE)
    assert m, f"no {marker} line on the console:\n{console[-4000:]}"
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
    assert vm.wait_for_exit(timeout=600) == 0, vm.console_tail(80)
    console = vm.console()

    pyz = result(console, "PYZ-BACKUP")
    assert pyz["ok"] is True and pyz["quiesced"] is True, pyz

    installed = line(console, "INSTALLED").split()
    assert installed[0] == "0", console[-4000:]
    assert line(console, "UNIT") == "active dev-virtio\\x2dports-org.hyperback.agent.0.device"
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

    repo = Repository.open(workdir / "agent" / "repo")
    assert len(repo.snapshots()) == 3
    log.warning("shim packages built in %.1f s; Debian image ready in %.1f s; guest booted in %.1f s; "
                "wheel installed in %s s (guest clock); backups: pyz %.1f s, wheel %.1f s, hooked %.1f s",
                built, image_seconds, vm.boot_seconds or -1, installed[1], pyz["seconds"], wheel["seconds"],
                hooked["seconds"])
