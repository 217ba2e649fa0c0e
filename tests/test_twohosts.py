"""Two libvirt hosts on one machine (host B in its own network + mount namespaces, a veth LAN)
and live migration of vmlab guests between them (busybox only, and one running the guest shim on a
Python in its initramfs).

Needs root and a host prepared by host_agent/lab/setup_host.sh, plus pyroute2; fails otherwise
(deselect with -m 'not vm').
"""

from __future__ import annotations

import re
import shlex
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import lab_or_fail

from host_agent.colocation.migration import live_migrate
from host_agent.errors import MigrationFailed
from host_agent.lab import Disk, Lab, Vm, make_disk
from host_agent.lab.migratable import (
    migratable_python_initramfs,
    python_segment,
    segment_sizes,
    shim_command,
    start_migratable_vm,
)
from host_agent.lab.twohosts import TwoHosts

pytestmark = pytest.mark.vm

MIB = 1024 * 1024
MEMORY_MIB = 256
# Runs on the guest initramfs's busybox (no 9p).  The 48 MiB of random bytes in the initramfs's
# RAM file system make the guest's memory non-zero, so the migration stream must carry them.
TICKER = (
    "head -c 50331648 /dev/urandom > /fill; echo filled; "
    "i=0; while :; do i=$((i+1)); echo tick $i; sleep 1; done"
)
TICK_RE = re.compile(r"^tick (\d+)\s*$", re.MULTILINE)

# A python guest (no 9p either): the guest shim's --help, timed with the guest's clock, then the
# hyperback port looked up by name and opened the way the shim does, then TICKER.
PORT_PROBE = (
    "from guest_shim.port import Port, find_port; d = find_port(); p = Port.open_device(d); "
    "print('HB-PORT', d, p.host_connected()); p.close()"
)
PYTHON_TICKER = (
    "read -r t0 _ < /proc/uptime; "
    f"{shim_command('--help')}; echo \"HB-HELP rc=$?\"; "
    'read -r t1 _ < /proc/uptime; echo "HB-HELP-TIME $t0 $t1"; '
    f"python3 -c {shlex.quote(PORT_PROBE)}; echo \"HB-PROBE rc=$?\"; " + TICKER
)


def last_tick(vm: Vm) -> int:
    ticks = TICK_RE.findall(vm.console())
    return int(ticks[-1]) if ticks else 0


def wait_ticks(vm: Vm, after: int, more: int = 2, timeout: float = 20.0) -> int:
    """Wait until the console shows tick ``after + more``; return the last tick."""
    deadline = time.monotonic() + timeout
    while (n := last_tick(vm)) < after + more:
        if time.monotonic() > deadline:
            pytest.fail(f"console stopped ticking at {n} (wanted {after + more}):\n{vm.console_tail()}")
        time.sleep(0.1)
    return n


def state_on(uri: str, name: str) -> int | None:
    """The libvirt state of domain ``name`` on ``uri``, None if it is not there."""
    import libvirt  # type: ignore[import-untyped]

    conn = libvirt.open(uri)
    try:
        try:
            return int(conn.lookupByName(name).state()[0])
        except libvirt.libvirtError as e:
            if e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:  # also: gone between lookup and state
                return None
            raise
    finally:
        conn.close()


def xml_on(uri: str, name: str) -> str:
    """The live XML of domain ``name`` on ``uri``."""
    import libvirt

    conn = libvirt.open(uri)
    try:
        return str(conn.lookupByName(name).XMLDesc(0))
    finally:
        conn.close()


@pytest.fixture
def hosts_and_lab(tmp_path: Path) -> Iterator[tuple[TwoHosts, Lab]]:
    with lab_or_fail(tmp_path / "lab") as lab, TwoHosts(tmp_path / "hosts") as hosts:
        yield hosts, lab


def boot_ticker(lab: Lab, tmp_path: Path) -> Vm:
    # tmp_path is outside host B's private folders, so both daemons see the disk ("shared storage").
    disk = make_disk(tmp_path / "mig.img", 64 * MIB)
    vm = start_migratable_vm(
        lab, "mig", command=TICKER, disks=[Disk(disk, serial="hb-mig", cache="none")], memory_mib=MEMORY_MIB
    )
    wait_ticks(vm, 0, 1, timeout=60)
    return vm


def test_live_migration_there_and_back(
    hosts_and_lab: tuple[TwoHosts, Lab], tmp_path: Path, record_property: Callable[[str, object], None]
) -> None:
    import libvirt

    hosts, lab = hosts_and_lab
    vm = boot_ticker(lab, tmp_path)
    assert state_on(hosts.uri_a, vm.name) == libvirt.VIR_DOMAIN_RUNNING
    n = last_tick(vm)

    tx0, rx0 = hosts.lan_tx_bytes(), hosts.lan_rx_bytes()
    stats = live_migrate(vm.name, hosts.uri_a, hosts.uri_b, hosts.lan_ip_b, timeout=60)
    there = stats.seconds
    tx = hosts.lan_tx_bytes() - tx0
    # libvirt's own count of the stream agrees with the LAN's (TCP/IP adds a few percent)
    assert stats.bytes <= tx < stats.bytes * 1.1
    assert state_on(hosts.uri_b, vm.name) == libvirt.VIR_DOMAIN_RUNNING
    assert state_on(hosts.uri_a, vm.name) is None  # transient: it moved
    n = wait_ticks(vm, n)  # the console log is shared: B's QEMU appends to it

    rx1 = hosts.lan_rx_bytes()
    back = live_migrate(vm.name, hosts.uri_b, hosts.uri_a, hosts.lan_ip_a, timeout=60).seconds
    rx = hosts.lan_rx_bytes() - rx1
    assert state_on(hosts.uri_a, vm.name) == libvirt.VIR_DOMAIN_RUNNING
    assert state_on(hosts.uri_b, vm.name) is None
    assert vm.is_active()
    wait_ticks(vm, n)

    print(f"A->B {there:.2f} s, lan0 tx {tx} B; B->A {back:.2f} s, lan0 rx {rx} B (rx before: {rx1 - rx0})")
    record_property("migrate_a_to_b_s", round(there, 2))
    record_property("migrate_b_to_a_s", round(back, 2))
    record_property("lan0_tx_bytes_a_to_b", tx)
    record_property("lan0_rx_bytes_b_to_a", rx)
    # The stream carries the guest's non-zero pages (kernel, initramfs, the 48 MiB fill), not its
    # zero pages: more than the fill, less than the whole memory plus protocol overhead.
    for moved in (tx, rx):
        assert 48 * MIB < moved < (MEMORY_MIB + 32) * MIB


def test_migration_to_stopped_host_fails(hosts_and_lab: tuple[TwoHosts, Lab], tmp_path: Path) -> None:
    import libvirt

    hosts, lab = hosts_and_lab
    vm = boot_ticker(lab, tmp_path)
    hosts.stop_libvirtd_b()
    with pytest.raises(MigrationFailed, match="still running on the source"):
        live_migrate(vm.name, hosts.uri_a, hosts.uri_b, hosts.lan_ip_b, timeout=30)
    assert state_on(hosts.uri_a, vm.name) == libvirt.VIR_DOMAIN_RUNNING
    wait_ticks(vm, last_tick(vm))


def test_python_guest_runs_the_shim_and_migrates(
    hosts_and_lab: tuple[TwoHosts, Lab], tmp_path: Path, record_property: Callable[[str, object], None]
) -> None:
    import libvirt

    hosts, lab = hosts_and_lab
    seg_packed, seg_unpacked = segment_sizes(python_segment(lab.cache_dir))
    initrd_bytes = migratable_python_initramfs(lab.initramfs, lab.cache_dir).stat().st_size
    disk = make_disk(tmp_path / "py.img", 64 * MIB)
    vm = start_migratable_vm(
        lab, "py", command=PYTHON_TICKER, disks=[Disk(disk, serial="hb-py", cache="none")],
        memory_mib=MEMORY_MIB, python=True,
    )
    vm.wait_for_console(r"^HB-PROBE rc=\d+", timeout=180)
    console = vm.console()
    assert "usage: hyperback-shim" in console, vm.console_tail()
    assert "HB-HELP rc=0" in console, vm.console_tail()
    assert "HB-PROBE rc=0" in console, vm.console_tail()
    # the lab's default channel is the hyperback port; nobody on the host side is connected to it
    port = re.search(r"^HB-PORT (/dev/vport\d+p\d+) False\s*$", console, re.MULTILINE)
    assert port, vm.console_tail()
    t0, t1 = map(float, re.findall(r"^HB-HELP-TIME ([\d.]+) ([\d.]+)", console, re.MULTILINE)[0])
    wait_ticks(vm, 0, 1, timeout=120)
    n = last_tick(vm)

    tx0 = hosts.lan_tx_bytes()
    there = live_migrate(vm.name, hosts.uri_a, hosts.uri_b, hosts.lan_ip_b, timeout=60).seconds
    tx = hosts.lan_tx_bytes() - tx0
    assert state_on(hosts.uri_b, vm.name) == libvirt.VIR_DOMAIN_RUNNING
    assert state_on(hosts.uri_a, vm.name) is None
    wait_ticks(vm, n)

    print(
        f"python segment {seg_packed} B gzip'd ({seg_unpacked} B unpacked), initramfs {initrd_bytes} B; "
        f"HB-READY after {vm.boot_seconds:.2f} s (guest uptime {vm.guest_uptime_at_ready} s); "
        f"hyperback-shim --help {t1 - t0:.2f} s in the guest; port {port.group(1)}; "
        f"A->B {there:.2f} s, lan0 tx {tx} B"
    )
    record_property("python_segment_bytes", seg_packed)
    record_property("python_segment_unpacked_bytes", seg_unpacked)
    record_property("python_initramfs_bytes", initrd_bytes)
    record_property("python_boot_s", round(vm.boot_seconds or 0, 2))
    record_property("python_shim_help_s", round(t1 - t0, 2))
    record_property("python_migrate_a_to_b_s", round(there, 2))
    record_property("python_lan0_tx_bytes_a_to_b", tx)
    assert 48 * MIB < tx < (MEMORY_MIB + 32) * MIB
