"""A backup appliance brought to the VMs, on two real libvirt hosts.

The appliance (host_agent/lab/appliance.py: a VM running the real media service on 10.77.0.200, over
mutual TLS with a certificate of the cluster's CA) lives on host B. Two VMs on host A back up to its
media in one batch: host A's agent brings the appliance over (one live migration serves both VMs),
their backups stream to it inside host A, and it goes home to B afterwards, where B's agent routes
its address again. The LAN carries the appliance's two migrations and control traffic, no backup
data. Left to the policy, one VM's small backup does not bring the appliance: it streams to it on B,
and about the data's size crosses the LAN.

Needs root and a host prepared by host_agent/lab/setup_host.sh; fails otherwise (-m 'not vm').
"""
from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import pytest
from colocation_lab import Cluster, cluster, lab_certificate
from conftest import lab_or_fail
from test_twohosts import TICKER, state_on, wait_ticks, xml_on

from host_agent import errors
from host_agent._proto.hyperback.v1 import operator_pb2 as opb
from host_agent._proto.hyperback.v1 import optimizer_pb2 as pb
from host_agent.colocation.appliance import read_hold
from host_agent.config import TlsConfig
from host_agent.lab import Disk, Lab, Vm, make_disk
from host_agent.lab.appliance import (
    APPLIANCE_IP,
    DESTINATION,
    HOST_NAME,
    MEDIA_PORT,
    TAP,
    Appliance,
    start_appliance,
)
from host_agent.lab.migratable import start_migratable_vm
from host_agent.lab.twohosts import TCG_MIGRATION_BUG, TwoHosts
from host_agent.media.client import RemoteRepository
from host_agent.tls.identity import Identity, Role

pytestmark = pytest.mark.vm

MIB = 1 << 20
DATA_MIB = 48   # random per VM: TCG makes the appliance ingest slowly


def appliance_inventory(domain: str) -> str:
    return f"""
[appliances.appliance]
domain = "{domain}"
home = "hostb"
service = "{APPLIANCE_IP}:{MEDIA_PORT}"
tap = "{TAP}"

[media.{DESTINATION}]
appliance = "appliance"
"""


@pytest.fixture(scope="module")
def lab_cluster_appliance(
        tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Lab, Cluster, Appliance]]:
    root = tmp_path_factory.mktemp("appliance-colocation")
    with lab_or_fail(root / "lab", max_running=3) as lab, TwoHosts(root / "hosts") as hosts, \
            Lab(root / "lab-b", uri=hosts.uri_b) as lab_b:
        # the appliance's media service speaks mutual TLS with a certificate of the cluster's CA
        served = lab_certificate(root / "cluster" / "pki", Identity(Role.AGENT, HOST_NAME), APPLIANCE_IP)
        app = start_appliance(lab_b, root, tls=served)
        try:
            # the appliance's system disk sits in the lab's cache, which both hosts see too
            with cluster(hosts, root / "cluster", shared=(root, lab_b.cache_dir),
                         inventory_extra=appliance_inventory(app.name)) as c:
                yield lab, c, app
        finally:
            app.destroy(hosts.uri_a, hosts.uri_b)


def vm_with_data(lab: Lab, c: Cluster, name: str) -> Vm:
    path = c.root / f"{name}-data.img"
    make_disk(path, 2 * DATA_MIB * MIB)
    with open(path, "r+b") as f:
        for _ in range(DATA_MIB):
            f.write(os.urandom(MIB))
    vm = start_migratable_vm(lab, name, command=TICKER, disks=[Disk(path, serial="hb-data", cache="none")])
    wait_ticks(vm, 0, 1, timeout=60)
    return vm


def trigger(c: Cluster, vm: Vm, placement: Any) -> str:
    with c.operator() as stub:
        return str(stub.TriggerBackup(opb.TriggerBackupRequest(
            domain=vm.name, destination=DESTINATION, policy=pb.POLICY_FULL, placement=placement),
            timeout=30).job.id)


def hold_on(uri: str, name: str) -> Any:
    return read_hold(xml_on(uri, name))


def last_migration_bytes(uri: str, name: str) -> int:
    import libvirt

    conn = libvirt.open(uri)
    try:
        return int(conn.lookupByName(name).jobStats(libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED)
                   .get("data_processed", 0))
    finally:
        conn.close()


def route_device_on_a() -> str:
    """The interface host A sends the appliance's address to (its tap while it runs here, else the LAN)."""
    out = subprocess.run(["ip", "-o", "route", "get", APPLIANCE_IP], check=True, capture_output=True,
                         text=True).stdout
    return out.split(" dev ")[1].split()[0]


def appliance_alive(app: Appliance) -> None:
    """Fail at once, saying why, if the appliance's guest kernel died (after a move: see
    TCG_MIGRATION_BUG): nothing the hosts do can bring it home then."""
    failure = app.kernel_failure()
    assert failure is None, (f"the appliance's guest kernel failed: {failure!r}; likely cause: "
                             f"{TCG_MIGRATION_BUG}\n{app.vm.console_tail(30)}")


def wait_until(what: str, check: Any, timeout: float = 120, app: Appliance | None = None) -> None:
    """Until ``check()``; a libvirt error counts as not yet (a domain vanishes mid-migration).
    With ``app``, a dead appliance guest ends the wait at once (``appliance_alive``)."""
    import libvirt

    deadline = time.monotonic() + timeout
    while True:
        try:
            if check():
                return
        except libvirt.libvirtError:
            pass
        if app is not None:
            appliance_alive(app)
        assert time.monotonic() < deadline, what
        time.sleep(0.5)


def test_the_appliance_comes_to_the_vms_so_their_backups_stay_off_the_lan(
        lab_cluster_appliance: tuple[Lab, Cluster, Appliance]) -> None:
    import libvirt

    lab, c, app = lab_cluster_appliance
    assert c.describe(target=f"{APPLIANCE_IP}:{MEDIA_PORT}", timeout=60).host_name == "appliance"
    # the appliance's media service speaks mutual TLS only: a plain client is refused
    with pytest.raises(errors.TlsError, match="requires TLS with a client certificate"):
        RemoteRepository(f"{APPLIANCE_IP}:{MEDIA_PORT}", DESTINATION, timeout=10,
                         tls=TlsConfig(allow_plaintext=True))
    assert route_device_on_a() != TAP
    vms = [vm_with_data(lab, c, name) for name in ("app-vm1", "app-vm2")]
    lan0 = c.lan_bytes()
    t0 = time.monotonic()
    # one forced, one left to the policy: both in one batch, so the forced choice serves both
    jobs = [trigger(c, vms[0], pb.PLACEMENT_APPLIANCE), trigger(c, vms[1], pb.PLACEMENT_UNSPECIFIED)]
    done = [c.wait_job(j, timeout=900) for j in jobs]
    seconds = time.monotonic() - t0
    for job in done:
        assert job.state == opb.JOB_STATE_SUCCEEDED, (job.detail, app.kernel_failure())
        assert job.placement == pb.PLACEMENT_APPLIANCE and job.target_host == "hosta"
    # the jobs are answered before their host sends the appliance on: wait for it to arrive
    wait_until("the appliance is home on B, unheld",
               lambda: state_on(c.hosts.uri_b, app.name) == libvirt.VIR_DOMAIN_RUNNING
               and state_on(c.hosts.uri_a, app.name) is None and hold_on(c.hosts.uri_b, app.name) is None,
               app=app)
    lan = c.lan_bytes() - lan0
    came = done[0].moved_bytes
    went = last_migration_bytes(c.hosts.uri_b, app.name)
    control = lan - came - went
    data = 2 * DATA_MIB * MIB
    print(f"\nappliance brought: LAN {lan} bytes = migrations {came} + {went}, control {control}; "
          f"data {data}; predicted move {done[0].predicted_move_bytes}; {seconds:.1f} s")
    assert came > 0 and went > 0
    assert control < 5 * MIB, (lan, came, went)
    # both VMs stayed home, running; the appliance's address is B's to route again
    for vm in vms:
        assert state_on(c.hosts.uri_a, vm.name) == libvirt.VIR_DOMAIN_RUNNING
    wait_until("host A routes the address to the LAN again", lambda: route_device_on_a() != TAP, 60)
    # and B answers for it there once its agent has seen the appliance arrive
    assert c.describe(target=f"{APPLIANCE_IP}:{MEDIA_PORT}", timeout=60).host_name == "appliance"
    # the appliance's media service speaks mutual TLS only: a plain client is refused
    with pytest.raises(errors.TlsError, match="requires TLS with a client certificate"):
        RemoteRepository(f"{APPLIANCE_IP}:{MEDIA_PORT}", DESTINATION, timeout=10,
                         tls=TlsConfig(allow_plaintext=True))
    with c.operator() as stub:
        for vm in vms:
            snaps = stub.ListSnapshots(opb.ListSnapshotsRequest(destination=DESTINATION, domain=vm.name),
                                       timeout=60).snapshots
            assert [s.bytes_read for s in snaps if s.serial] == [DATA_MIB * MIB]  # not the definition's

    # left to the policy, one VM's new data is too little to bring the appliance for: it streams to
    # the appliance where it is (B), and about the data's size crosses the LAN
    fresh = vm_with_data(lab, c, "app-vm3")
    lan0 = c.lan_bytes()
    t0 = time.monotonic()
    job = c.wait_job(trigger(c, fresh, pb.PLACEMENT_UNSPECIFIED), timeout=900)
    streamed = c.lan_bytes() - lan0
    print(f"streamed to the appliance on B: LAN {streamed} bytes for {DATA_MIB * MIB} of data; "
          f"predicted {job.predicted_stream_bytes}; {time.monotonic() - t0:.1f} s")
    assert job.state == opb.JOB_STATE_SUCCEEDED, (job.detail, app.kernel_failure())
    assert job.placement == pb.PLACEMENT_STREAM and job.target_host == "hostb"
    assert streamed > DATA_MIB * MIB
    assert state_on(c.hosts.uri_b, app.name) == libvirt.VIR_DOMAIN_RUNNING
    for vm in (*vms, fresh):
        vm.destroy()
