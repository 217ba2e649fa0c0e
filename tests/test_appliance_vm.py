"""The backup appliance: a VM running the media service, live-migrated between two real libvirt hosts.

The appliance (host_agent/lab/appliance.py) starts on host B and serves 10.77.0.200:7420; host B
routes that address to the VM (ApplianceRoute).  Host A backs up to it over the LAN.  Then the VM
migrates to A: the same address answers there, a backup from A no longer crosses the LAN, and the
first snapshot is still in the repository, which travelled with the VM (its disk is shared storage,
its page cache in the migrated RAM).  The VM migrates back to B and answers again, from both hosts.

Needs root and a host prepared by host_agent/lab/setup_host.sh; fails otherwise (-m 'not vm').
"""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from conftest import lab_or_fail
from test_twohosts import state_on

from host_agent._proto.hyperback.v1 import media_pb2, media_pb2_grpc
from host_agent.colocation.migration import live_migrate
from host_agent.lab.appliance import (
    HOST_NAME,
    READY_MARKER,
    Appliance,
    claim_route,
    release_route,
    start_appliance,
)
from host_agent.lab.twohosts import TCG_MIGRATION_BUG, TwoHosts
from host_agent.media.client import RemoteRepository
from host_agent.tls.transport import TlsConfig

pytestmark = pytest.mark.vm

log = logging.getLogger(__name__)

MIB = 1 << 20
DATA_MIB = 32  # random: neither compression nor deduplication shrinks it
QUIET_LAN = 1 * MIB  # what may cross the LAN while client and appliance share a host (ARP, nothing else)
# This appliance has no certificates (test_appliance_colocation_vm.py runs one on mutual TLS): its
# clients must allow plain TCP off loopback explicitly, as its service does (--allow-plaintext).
PLAIN = TlsConfig(allow_plaintext=True)


@pytest.fixture(scope="module")
def appliance_on_b(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TwoHosts, Appliance, Path]]:
    """Two hosts, and the appliance started on host B with B routing its address."""
    root = tmp_path_factory.mktemp("appliance")
    if os.geteuid() != 0:
        pytest.fail("real-VM tests need root (deselect them with -m 'not vm')")
    with TwoHosts(root / "hosts") as hosts, lab_or_fail(root / "lab-b", uri=hosts.uri_b) as lab_b:
        app: Appliance | None = None
        try:
            app = start_appliance(lab_b, root)
            claim_route(hosts, "b")
            yield hosts, app, root
        finally:
            for host in ("a", "b"):
                try:
                    release_route(hosts, host)
                except Exception as e:  # noqa: BLE001 - teardown goes on; TwoHosts deletes the LAN anyway
                    log.warning("releasing the appliance route on host %s: %s", host, e)
            if app is not None:
                app.destroy(hosts.uri_a, hosts.uri_b)


def describe(app: Appliance, timeout: float = 30.0) -> media_pb2.DescribeResponse:
    """The media service's answer at the appliance's address, from this process (host A), once it
    answers.  A guest whose kernel died (after a move: see TCG_MIGRATION_BUG) never will: that ends
    the wait at once, saying so, instead of a "No route to host" when the wait runs out (a dead
    guest's tap is gone, and with it the route the host claimed)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with grpc.insecure_channel(app.service) as channel:
                answer: media_pb2.DescribeResponse = media_pb2_grpc.MediaStub(channel).Describe(
                    media_pb2.DescribeRequest(), timeout=5)
                return answer
        except grpc.RpcError:
            failure = app.kernel_failure()
            assert failure is None, (f"the appliance's guest kernel failed: {failure!r}; likely cause: "
                                     f"{TCG_MIGRATION_BUG}\n{app.vm.console_tail(30)}")
            if time.monotonic() > deadline:
                raise
            time.sleep(0.3)


def describe_from_b(hosts: TwoHosts, service: str) -> str:
    """The host name the media service at ``service`` gives, asked from host B's namespace."""
    code = ("import grpc, sys\n"
            "from host_agent._proto.hyperback.v1 import media_pb2, media_pb2_grpc\n"
            "with grpc.insecure_channel(sys.argv[1]) as c:\n"
            "    stub = media_pb2_grpc.MediaStub(c)\n"
            "    print(stub.Describe(media_pb2.DescribeRequest(), timeout=30).host_name)\n")
    r = subprocess.run(["nsenter", f"--target={hosts.libvirtd_pid_b}", "--net", "--", sys.executable, "-c",
                        code, service], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout.strip()


def random_image(path: Path) -> Path:
    with open(path, "wb") as f:
        for _ in range(DATA_MIB):
            f.write(os.urandom(MIB))
    return path


def lan_bytes(hosts: TwoHosts) -> int:
    """Bytes that crossed the LAN in either direction so far (lan0's counters)."""
    return hosts.lan_tx_bytes() + hosts.lan_rx_bytes()


def test_the_appliance_serves_one_address_from_whichever_host_runs_it(
        appliance_on_b: tuple[TwoHosts, Appliance, Path],
        record_property: Callable[[str, object], None]) -> None:
    import libvirt  # type: ignore[import-untyped]

    hosts, app, root = appliance_on_b
    numbers: dict[str, object] = {
        "guest_ram_mib": app.memory_mib, "ready_seconds": round(app.ready_seconds, 1),
        "system_image_bytes": app.system_image.stat().st_size,
        "system_image_allocated_bytes": app.system_image.stat().st_blocks * 512}
    data = DATA_MIB * MIB
    assert describe(app).host_name == HOST_NAME
    assert describe_from_b(hosts, app.service) == HOST_NAME

    # 1. the appliance runs on B: a backup from A crosses the LAN
    first = random_image(root / "disk1.img")
    lan0, t0 = lan_bytes(hosts), time.monotonic()
    with RemoteRepository(app.service, app.destination, timeout=120, spool_dir=root, tls=PLAIN) as remote:
        snap1 = remote.backup(first, "disk1").snapshot
    numbers["backup_over_lan_seconds"] = round(time.monotonic() - t0, 1)
    numbers["backup_over_lan_bytes"] = lan_over = lan_bytes(hosts) - lan0
    assert snap1.stats.bytes_new == data
    assert lan_over > data, lan_over

    # 2. it moves to A: B's tap goes with it; B stops routing the address, A starts
    lan0 = lan_bytes(hosts)
    there = live_migrate(app.name, hosts.uri_b, hosts.uri_a, hosts.lan_ip_a, timeout=180)
    numbers["migration_to_a_bytes"] = there.bytes
    numbers["migration_to_a_seconds"] = round(there.seconds, 1)
    release_route(hosts, "b")
    claim_route(hosts, "a")
    numbers["migration_to_a_lan_bytes"] = lan_bytes(hosts) - lan0
    assert state_on(hosts.uri_a, app.name) == libvirt.VIR_DOMAIN_RUNNING
    assert state_on(hosts.uri_b, app.name) is None

    # 3. the same address answers on A; a backup from A stays off the LAN; the first snapshot is there
    lan0, t0 = lan_bytes(hosts), time.monotonic()
    assert describe(app).host_name == HOST_NAME
    second = random_image(root / "disk2.img")
    with RemoteRepository(app.service, app.destination, timeout=120, spool_dir=root, tls=PLAIN) as remote:
        snap2 = remote.backup(second, "disk2").snapshot
        numbers["backup_local_seconds"] = round(time.monotonic() - t0, 1)
        restored = root / "disk1.restored"
        remote.restore(snap1.id, restored)
        assert [s.id for s in remote.snapshots()] == [snap1.id, snap2.id]
    numbers["backup_and_restore_local_lan_bytes"] = lan_local = lan_bytes(hosts) - lan0
    assert snap2.stats.bytes_new == data
    assert lan_local < QUIET_LAN, lan_local
    assert restored.read_bytes() == first.read_bytes()
    assert describe_from_b(hosts, app.service) == HOST_NAME  # B reaches it over the LAN, through A

    # 4. and back to B
    back = live_migrate(app.name, hosts.uri_a, hosts.uri_b, hosts.lan_ip_b, timeout=180)
    numbers["migration_to_b_bytes"] = back.bytes
    numbers["migration_to_b_seconds"] = round(back.seconds, 1)
    release_route(hosts, "a")
    claim_route(hosts, "b")
    assert state_on(hosts.uri_b, app.name) == libvirt.VIR_DOMAIN_RUNNING
    assert state_on(hosts.uri_a, app.name) is None
    assert describe(app).host_name == HOST_NAME
    assert describe_from_b(hosts, app.service) == HOST_NAME
    with RemoteRepository(app.service, app.destination, timeout=120, tls=PLAIN) as remote:
        assert [s.id for s in remote.snapshots()] == [snap1.id, snap2.id]
    # one boot: the service kept running through both moves
    assert app.console().count(READY_MARKER) == 1, app.vm.console_tail()

    print("\nappliance: " + ", ".join(f"{k}={v}" for k, v in numbers.items()))
    for key, value in numbers.items():
        record_property(key, value)
