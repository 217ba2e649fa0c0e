"""Co-location on two real libvirt hosts: a VM on host A backs up to media on host B.

With co-location the VM moves to B, B's agent writes B's media, the VM comes back running, and the
LAN carries only the migration streams and control traffic; without it, host A streams about the
data's size over the LAN.  The optimizer's predictions for both are within 20 % of what the LAN
counters measure.  A VM marked not live-migratable moves cold.  The media service's predefined
address answers on whichever host serves it.

Needs root and a host prepared by host_agent/lab/setup_host.sh; fails otherwise (-m 'not vm').
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import grpc
import pytest
from colocation_lab import BIN, MEDIA_PORT, SERVICE_IP, Cluster, cluster
from conftest import lab_or_fail
from test_twohosts import state_on

from host_agent import errors
from host_agent._proto.hyperback.v1 import operator_pb2 as opb
from host_agent._proto.hyperback.v1 import operator_pb2_grpc as opb_grpc
from host_agent._proto.hyperback.v1 import optimizer_pb2 as pb
from host_agent.colocation.migration import METADATA_NS
from host_agent.colocation.serviceip import ServiceAddress
from host_agent.config import TlsConfig
from host_agent.lab import Disk, Lab, Vm, make_disk
from host_agent.lab.migratable import shim_command, start_migratable_vm
from host_agent.lab.twohosts import LAN_A_IF
from host_agent.media.client import RemoteRepository
from host_agent.tls.transport import channel

pytestmark = pytest.mark.vm

MIB = 1 << 20
DATA_MIB = 256   # random, so neither compression nor zero detection shrinks what must move
TICKS = "i=0; while :; do i=$((i+1)); echo tick $i; sleep 1; done"


def mark_not_live_migratable(uri: str, name: str) -> None:
    """What an operator does for a VM with host devices hyperback cannot see: ``virsh metadata``."""
    import libvirt

    conn = libvirt.open(uri)
    try:
        conn.lookupByName(name).setMetadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT,
                                            "<placement live-migratable='no'/>", "hb", METADATA_NS,
                                            libvirt.VIR_DOMAIN_AFFECT_LIVE)
    finally:
        conn.close()


@pytest.fixture(scope="module")
def lab_and_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Lab, Cluster]]:
    from host_agent.lab.twohosts import TwoHosts

    root = tmp_path_factory.mktemp("colocation")
    with lab_or_fail(root / "lab") as lab, TwoHosts(root / "hosts") as hosts, \
            cluster(hosts, root / "cluster", shared=root) as c:
        yield lab, c


def data_disk(path: Path, serial: str) -> Disk:
    make_disk(path, 2 * DATA_MIB * MIB)
    with open(path, "r+b") as f:
        for _ in range(DATA_MIB):
            f.write(os.urandom(MIB))
    return Disk(path, serial=serial, cache="none")


def within(predicted: int, measured: int, share: float = 0.2) -> bool:
    return abs(predicted - measured) <= share * measured


def wait_console(vm: Vm, pattern: str, timeout: float) -> None:
    """Like ``Vm.wait_for_console``, minus its "still running here?" check: the VM may be on the
    other host meanwhile, writing to the same console log."""
    deadline = time.monotonic() + timeout
    while not re.search(pattern, vm.console(), re.MULTILINE):
        assert time.monotonic() < deadline, f"no {pattern!r} on the console:\n{vm.console_tail()}"
        time.sleep(0.2)


def shim_result(vm: Vm, timeout: float = 600) -> dict[str, object]:
    wait_console(vm, r"^SHIM rc=\d+", timeout)
    console = vm.console()
    rc = int(re.findall(r"^SHIM rc=(\d+)", console, re.MULTILINE)[-1])
    line = next(ln for ln in reversed(console.splitlines()) if ln.startswith("{"))
    assert rc == 0, console[-3000:]
    return dict(json.loads(line))


def test_colocation_keeps_the_backup_off_the_lan_and_streaming_does_not(
        lab_and_cluster: tuple[Lab, Cluster], record_property: Callable[[str, object], None]) -> None:
    import libvirt  # type: ignore[import-untyped]

    lab, c = lab_and_cluster
    disk = data_disk(c.root / "vm1-data.img", "hb-data")
    backup = shim_command("--json", "backup", "-d", "media-b", "-p", "full", "hb-data")
    lan0 = c.lan_bytes()
    t0 = time.monotonic()
    # The guest asks at boot; the colocate policy weighs 256 MiB of data against its memory.
    vm = start_migratable_vm(lab, "colo", command=f'{backup}; echo "SHIM rc=$?"; {TICKS}', disks=[disk],
                             python=True)
    result = shim_result(vm)
    colocated_seconds = time.monotonic() - t0
    colocated_lan = c.lan_bytes() - lan0

    [job] = c.jobs_of(vm.name)
    assert job.state == opb.JOB_STATE_SUCCEEDED, job.detail
    assert job.placement == pb.PLACEMENT_MIGRATE and job.target_host == "hostb"
    assert result["ok"] and result["job"] == job.id
    # the VM ends on host A, running, and nowhere else
    assert state_on(c.hosts.uri_a, vm.name) == libvirt.VIR_DOMAIN_RUNNING
    assert state_on(c.hosts.uri_b, vm.name) is None
    wait_console(vm, r"^tick 2\s*$", 60)
    # the LAN carried the two migration streams and control traffic, no backup data
    control = colocated_lan - job.moved_bytes
    assert job.moved_bytes > 0 and control < 5 * MIB, (colocated_lan, job.moved_bytes)
    assert within(job.predicted_move_bytes, colocated_lan), (job.predicted_move_bytes, colocated_lan)

    # Without co-location (streaming forced by the operator, to a second repository on B's media):
    lan0 = c.lan_bytes()
    t0 = time.monotonic()
    with c.operator() as stub:
        started = stub.TriggerBackup(opb.TriggerBackupRequest(
            domain=vm.name, destination="media-b2", policy=pb.POLICY_FULL, placement=pb.PLACEMENT_STREAM),
            timeout=30).job
    streamed = c.wait_job(started.id)
    streamed_seconds = time.monotonic() - t0
    streamed_lan = c.lan_bytes() - lan0
    assert streamed.state == opb.JOB_STATE_SUCCEEDED, streamed.detail
    assert streamed.placement == pb.PLACEMENT_STREAM and streamed.moved_bytes == 0
    assert state_on(c.hosts.uri_a, vm.name) == libvirt.VIR_DOMAIN_RUNNING
    assert streamed_lan > DATA_MIB * MIB  # about the data's size crossed the LAN
    predicted = streamed.predicted_stream_bytes
    assert within(predicted, streamed_lan), (predicted, streamed_lan)

    # both repositories on B's media hold the disk
    with c.operator() as stub:
        for destination in ("media-b", "media-b2"):
            snaps = stub.ListSnapshots(opb.ListSnapshotsRequest(destination=destination, domain=vm.name),
                                       timeout=30).snapshots
            # and the domain's definition, stored with every run (a snapshot without a serial)
            assert [s.serial for s in snaps if s.serial] == ["hb-data"]

    print(f"\nco-located: LAN {colocated_lan} B in {colocated_seconds:.1f} s "
          f"(migrations {job.moved_bytes} B, control {control} B; predicted {job.predicted_move_bytes} B)"
          f"\nstreamed:   LAN {streamed_lan} B in {streamed_seconds:.1f} s "
          f"(predicted {streamed.predicted_stream_bytes} B); data {DATA_MIB * MIB} B")
    for key, value in {"colocated_lan_bytes": colocated_lan, "colocated_migration_bytes": job.moved_bytes,
                       "colocated_predicted_bytes": job.predicted_move_bytes,
                       "colocated_seconds": round(colocated_seconds, 1), "streamed_lan_bytes": streamed_lan,
                       "streamed_predicted_bytes": streamed.predicted_stream_bytes,
                       "streamed_seconds": round(streamed_seconds, 1)}.items():
        record_property(key, value)
    vm.destroy()


def test_a_vm_that_cannot_live_migrate_is_stopped_moved_and_booted(
        lab_and_cluster: tuple[Lab, Cluster], record_property: Callable[[str, object], None]) -> None:
    import libvirt

    lab, c = lab_and_cluster
    disk = data_disk(c.root / "vm2-data.img", "hb-cold")
    vm = start_migratable_vm(lab, "cold", command=TICKS, disks=[disk], python=True)
    mark_not_live_migratable(c.hosts.uri_a, vm.name)
    first_boot = lab.conn.lookupByName(vm.name).ID()
    since = datetime.now(UTC)
    lan0 = c.lan_bytes()
    with c.operator() as stub:
        started = stub.TriggerBackup(opb.TriggerBackupRequest(
            domain=vm.name, destination="media-b", policy=pb.POLICY_FULL, placement=pb.PLACEMENT_MIGRATE),
            timeout=30).job
    job = c.wait_job(started.id)
    lan = c.lan_bytes() - lan0
    assert job.state == opb.JOB_STATE_SUCCEEDED, job.detail
    assert job.placement == pb.PLACEMENT_COLD_MOVE
    assert state_on(c.hosts.uri_a, vm.name) == libvirt.VIR_DOMAIN_RUNNING
    assert state_on(c.hosts.uri_b, vm.name) is None
    assert lan < 5 * MIB  # a definition and control traffic; no memory, no data
    # it was booted again, on B and then at home: each host's libvirtd started it once more, to boot
    # (not to receive a migration), and what runs at home now is not the QEMU it first booted in.
    # Its console cannot tell: the guest on B may be stopped before it prints anything (the backup
    # there needs only its disk, and shutdown_timeout is 3 s), and B's lines would share the log.
    [on_b] = c.hosts.qemu_starts("b", vm.name, since)
    [at_home] = c.hosts.qemu_starts("a", vm.name, since)
    assert on_b.boot and at_home.boot and on_b.at < at_home.at, (on_b, at_home)
    assert lab.conn.lookupByName(vm.name).ID() != first_boot
    wait_console(vm, r"^HB-READY(.|\n)*^HB-READY", 60)  # the guest came up again at home
    print(f"\ncold move there and back: job done, LAN {lan} B")
    record_property("cold_move_lan_bytes", lan)
    vm.destroy()


def test_the_service_address_answers_on_whichever_host_serves_it(
        lab_and_cluster: tuple[Lab, Cluster]) -> None:
    _, c = lab_and_cluster
    assert c.describe().host_name == "hostb"
    # the traffic between the hosts is TLS: a plain client is refused by the media service and by
    # B's operator API (the server has no plain port), and by default it does not even try
    plain = TlsConfig(allow_plaintext=True)
    with pytest.raises(errors.TlsError, match="requires TLS with a client certificate"):
        RemoteRepository(f"{SERVICE_IP}:{MEDIA_PORT}", "media-b", timeout=5, tls=plain)
    with pytest.raises(grpc.RpcError), channel(c.operator_target("hostb"), plain) as chan:
        opb_grpc.OperatorStub(chan).ListDomains(opb.ListDomainsRequest(), timeout=5)
    with pytest.raises(errors.UsageError, match="plain TCP is refused off loopback"):
        RemoteRepository(f"{SERVICE_IP}:{MEDIA_PORT}", "media-b", timeout=5)
    on_a = ServiceAddress(SERVICE_IP, 24, LAN_A_IF)
    assert not on_a.held()
    # the appliance moves to A: B releases the address when it stops, A claims it when it starts
    c.stop("media-hostb")
    with pytest.raises(grpc.RpcError):
        c.describe(timeout=1)
    shared = c.root / "appliance-repo"
    subprocess.run([str(BIN / "hyperback"), "init", str(shared)], check=True, capture_output=True)
    c.start_media("hosta", {"media-b": shared})
    try:
        assert c.describe(timeout=30).host_name == "hosta"
        assert on_a.held()
    finally:
        c.stop("media-hosta")
    assert not on_a.held()
    # and back to B
    c.start_media("hostb", {"media-b": c.media_root / "media-b"})
    assert c.describe(timeout=30).host_name == "hostb"
