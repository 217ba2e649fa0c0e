"""The shim in a real guest (host_agent/lab): the guest runs ``python -m guest_shim`` (the host's
Python and checkout over 9p) against the real virtio-serial port; the host side is a small peer
written with guest_shim.protocol on the channel's unix socket.

Needs root and a host prepared by host_agent/lab/setup_host.sh; fails otherwise (deselect with
-m 'not vm').

The channel is named ``org.hyperback.shimtest.0`` (set in a guest config file that the guest
reads through ``HYPERBACK_SHIM_CONFIG``), not ``org.hyperback.agent.0``: a real host agent
running on the same machine attaches to every domain with the production name and would answer
in place of the test's peer.  The shim finds the port by name in /sys exactly as in production.

One guest at a time: if another test's guest is running (max_running=1), the test waits for it
and retries.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import lab_or_fail
from shim_helpers import FakeHost

from guest_shim import protocol as p
from host_agent.lab import Channel, Disk, Lab, Vm, VmLabError, make_disk

pytestmark = [pytest.mark.vm, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
SHIM = f"cd {REPO} && PYTHONPATH={REPO} {sys.executable} -m guest_shim"
SERIAL = "hb-test-disk"
CHANNEL = "org.hyperback.shimtest.0"
GUEST_PYTHON_START = 180.0  # seconds for the guest's first Python start over 9p under TCG


@pytest.fixture
def guest_config() -> Iterator[str]:
    """A shim.conf the guest can read (/tmp is the guest's own tmpfs; /var/tmp is the host's)."""
    folder = Path(tempfile.mkdtemp(prefix="hyperback-shim-vm-", dir="/var/tmp"))
    conf = folder / "shim.conf"
    conf.write_text(f"[shim]\nport = {CHANNEL}\nconnect_timeout = 60\n")
    folder.chmod(0o755)
    yield str(conf)
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    with lab_or_fail(tmp_path / "lab") as the_lab:
        yield the_lab


def _start(lab: Lab, name: str, disk: Path, command: str, config: str, wait_minutes: float = 15) -> Vm:
    """Start a guest, waiting while another vmlab guest holds the one slot."""
    deadline = time.monotonic() + wait_minutes * 60
    while True:
        try:
            return lab.start_vm(
                name,
                disks=[Disk(disk, serial=SERIAL)],
                channels=[Channel(CHANNEL)],
                command=command,
                env={"HYPERBACK_SHIM_CONFIG": config},
                timeout=180,
            )
        except VmLabError as e:
            if "already running" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(15)


@contextlib.contextmanager
def _console_on_failure(vm: Vm) -> Iterator[None]:
    """Failures in the host's part of the conversation show what the guest printed."""
    try:
        yield
    except (AssertionError, EOFError, OSError) as e:
        raise AssertionError(f"{e}\n--- guest console (tail) ---\n{vm.console_tail(60)}") from e


def _json_lines(console: str) -> list[dict[str, object]]:
    return [json.loads(m.group(0)) for m in re.finditer(r"^\{\"ok\".*\}$", console, re.MULTILINE)]


def test_guest_backup_over_the_real_port_prints_the_result(
    lab: Lab, tmp_path: Path, guest_config: str
) -> None:
    disk = make_disk(tmp_path / "disk.raw", 64 << 20)
    vm = _start(lab, "shim-backup", disk, f"{SHIM} backup --json", guest_config)
    host = FakeHost.from_socket(vm.connect_channel(CHANNEL, timeout=10))
    with _console_on_failure(vm), contextlib.closing(host):
        host.answer_sync(timeout=GUEST_PYTHON_START)
        assert host.raw.startswith(p.RESET)
        hello = host.expect(p.Hello)
        assert hello.role is p.Role.CLIENT and hello.shim == "0.1.0"
        req = host.expect(p.Backup)
        assert (req.targets, req.policy, req.destination, req.quiesce) == ("all", "incremental", None, True)
        host.send(p.Accepted(req.id, "job-vm-1"))
        host.send(p.Freeze("fz-vm", "job-vm-1", (SERIAL,), 30))
        frozen = host.expect(p.Frozen, timeout=30)
        # The guest found the disk by its serial (no unknown-disk) and it has no mounted fs.
        assert frozen == p.Frozen("fz-vm", "job-vm-1", (), ())
        host.send(p.Thaw("th-vm", "job-vm-1"))
        assert host.expect(p.Thawed) == p.Thawed("th-vm", "job-vm-1", (), p.ThawCause.HOST)
        host.send(p.Progress(None, "job-vm-1", p.JobState.RUNNING, 1 << 20, 64 << 20))
        outcome = p.DiskOutcome(SERIAL, 64 << 20, "0123456789abcdef", p.ChangeDetection.FULL_READ)
        host.send(p.Result(req.id, "job-vm-1", p.Op.BACKUP, True, (outcome,), 64 << 20, 2.5, quiesced=True))
        assert vm.wait_for_exit(timeout=120) == 0
    disk_json = {
        "serial": SERIAL,
        "bytes": 64 << 20,
        "snapshot": "0123456789abcdef",
        "change_detection": "full-read",
    }
    assert _json_lines(vm.console()) == [
        {
            "ok": True,
            "job": "job-vm-1",
            "op": "backup",
            "disks": [disk_json],
            "bytes": 64 << 20,
            "seconds": 2.5,
            "quiesced": True,
        }
    ], vm.console_tail()


SERVE_SCRIPT = f"""
{SHIM} serve &
serve=$!
i=0; while [ ! -S /run/hyperback-shim.sock ] && [ $i -lt 600 ]; do sleep 0.2; i=$((i+1)); done
# serve answers not-connected until the host is there: retry, as an application would
for job in job-1 job-2; do
    i=0
    until {SHIM} status $job --json; do
        i=$((i+1)); [ $i -lt 60 ] || exit 12
        sleep 1
    done
done
kill -TERM $serve
wait $serve || exit 13
"""


def test_guest_serve_survives_a_host_reconnect_on_the_real_port(
    lab: Lab, tmp_path: Path, guest_config: str
) -> None:
    disk = make_disk(tmp_path / "disk.raw", 16 << 20)
    vm = _start(lab, "shim-serve", disk, SERVE_SCRIPT, guest_config)
    # Connect only once serve has the port open: it must cope with a host that comes later.
    deadline = time.monotonic() + GUEST_PYTHON_START
    while vm.channel_state(CHANNEL) != "connected":
        assert time.monotonic() < deadline, vm.console_tail()
        time.sleep(0.2)
    with _console_on_failure(vm):
        host = FakeHost.from_socket(vm.connect_channel(CHANNEL, timeout=10))
        with contextlib.closing(host):
            first = host.handshake(p.Role.SERVE, timeout=60)
            req = host.expect(p.Status, timeout=GUEST_PYTHON_START)
            host.send(p.Progress(req.id, "job-1", p.JobState.RUNNING, 1, 2))
        # the host agent went away; it comes back once serve has seen it go (else serve, which
        # never saw a hang-up, has no reason to resynchronise)
        vm.wait_for_console(r"host disconnected", timeout=60)
        host = FakeHost.from_socket(vm.connect_channel(CHANNEL, timeout=10))
        with contextlib.closing(host):
            second = host.expect(p.Sync, timeout=60)
            assert second.id != first.id
            host.send(p.Accepted("stale", "job-stale"))  # before the ack: discarded by serve
            host.send_raw(p.sync_ack_frame(second.id))
            host.expect(p.Hello)
            req = host.expect(p.Status, timeout=GUEST_PYTHON_START)
            assert req.job == "job-2"
            host.send(p.Progress(req.id, "job-2", p.JobState.QUEUED, 0, 0))
            assert vm.wait_for_exit(timeout=120) == 0
    printed = _json_lines(vm.console())
    assert {"ok": True, "job": "job-1", "state": "running", "done": 1, "total": 2} in printed
    assert {"ok": True, "job": "job-2", "state": "queued", "done": 0, "total": 0} in printed
