"""Co-location when things go wrong, on two real libvirt hosts: a migration that outlives its timeout,
and the target host's libvirtd stopped while the VM is on its way. Either way the VM ends running
where it started, nowhere else, and the job fails with an error that says so.  And the home agent
killed while its VM visits the media host: restarted, it brings the VM home and runs the job again.

Needs root and a host prepared by host_agent/lab/setup_host.sh; fails otherwise (-m 'not vm').
"""
from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from colocation_lab import Cluster, cluster
from conftest import lab_or_fail
from test_twohosts import TICKER, last_tick, state_on, wait_ticks, xml_on

from host_agent._proto.hyperback.v1 import operator_pb2 as opb
from host_agent._proto.hyperback.v1 import optimizer_pb2 as pb
from host_agent.colocation.migration import visit_marker
from host_agent.lab import Disk, Lab, Vm, make_disk
from host_agent.lab.migratable import start_migratable_vm
from host_agent.lab.twohosts import TwoHosts

pytestmark = pytest.mark.vm

MIB = 1 << 20
# 10 MiB/s makes the ~120 MB migration last about 12 s: long enough to time out or to lose its target
SLOW = "move_bandwidth = 10\n"


@pytest.fixture(scope="module")
def lab_and_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Lab, Cluster]]:
    root = tmp_path_factory.mktemp("colocation-faults")
    with lab_or_fail(root / "lab") as lab, TwoHosts(root / "hosts") as hosts, \
            cluster(hosts, root / "cluster", shared=root, agent_a_extra=SLOW + "move_timeout = 2\n") as c:
        yield lab, c


def boot(lab: Lab, c: Cluster, name: str) -> Vm:
    disk = make_disk(c.root / f"{name}.img", 16 * MIB)
    vm = start_migratable_vm(lab, name, command=TICKER, disks=[Disk(disk, serial="hb-f", cache="none")])
    wait_ticks(vm, 0, 1, timeout=60)
    return vm


def trigger_move(c: Cluster, vm: Vm) -> str:
    with c.operator() as stub:
        return str(stub.TriggerBackup(opb.TriggerBackupRequest(
            domain=vm.name, destination="media-b", policy=pb.POLICY_FULL, placement=pb.PLACEMENT_MIGRATE),
            timeout=30).job.id)


def assert_home_and_running(c: Cluster, vm: Vm) -> None:
    import libvirt  # type: ignore[import-untyped]

    assert state_on(c.hosts.uri_a, vm.name) == libvirt.VIR_DOMAIN_RUNNING
    wait_ticks(vm, last_tick(vm))  # and it keeps running


def memory_sent(uri: str, name: str) -> int:
    """Guest memory bytes the migration under way from ``uri`` has sent so far (0: none yet)."""
    import libvirt  # type: ignore[import-untyped]

    conn = libvirt.open(uri)
    try:
        stats = conn.lookupByName(name).jobStats()
    finally:
        conn.close()
    migrating = stats.get("type") == libvirt.VIR_DOMAIN_JOB_UNBOUNDED
    return int(stats.get("memory_processed", 0)) if migrating else 0


def test_a_migration_that_times_out_is_aborted_and_the_vm_keeps_running_at_home(
        lab_and_cluster: tuple[Lab, Cluster]) -> None:
    lab, c = lab_and_cluster
    vm = boot(lab, c, "slow")
    job = c.wait_job(trigger_move(c, vm))
    assert job.state == opb.JOB_STATE_FAILED
    assert "timed out after 2 s" in job.detail and "runs on hosta as before" in job.detail, job.detail
    assert_home_and_running(c, vm)
    assert state_on(c.hosts.uri_b, vm.name) is None
    vm.destroy()


def test_a_vm_stranded_by_its_agent_dying_mid_visit_comes_home_when_the_agent_restarts(
        lab_and_cluster: tuple[Lab, Cluster]) -> None:
    import libvirt  # type: ignore[import-untyped]

    lab, c = lab_and_cluster
    c.stop("agent-hosta")
    c.start_agent("hosta", SLOW)
    vm = boot(lab, c, "stray")
    job_id = trigger_move(c, vm)
    deadline = time.monotonic() + 120
    while state_on(c.hosts.uri_b, vm.name) != libvirt.VIR_DOMAIN_RUNNING:
        assert time.monotonic() < deadline, c.log("agent-hosta")
        time.sleep(0.2)
    c.kill("agent-hosta")  # the VM is on B, marked as visiting from A, and nobody will bring it back
    marker = visit_marker(xml_on(c.hosts.uri_b, vm.name))
    assert marker is not None and marker.origin == "hosta"

    c.start_agent("hosta", SLOW)
    # the VM comes home first, then the journal's unanswered job runs again (another visit) and ends
    job = c.wait_job(job_id, timeout=600)
    assert job.state == opb.JOB_STATE_SUCCEEDED, job.detail
    assert "brought home from hostb" in c.log("agent-hosta")
    assert state_on(c.hosts.uri_b, vm.name) is None
    assert visit_marker(xml_on(c.hosts.uri_a, vm.name)) is None
    assert_home_and_running(c, vm)
    vm.destroy()


def test_the_target_daemon_stopping_mid_migration_leaves_the_vm_running_at_home(
        lab_and_cluster: tuple[Lab, Cluster], tmp_path: Path) -> None:
    lab, c = lab_and_cluster
    c.stop("agent-hosta")
    c.start_agent("hosta", SLOW)  # no short timeout this time: the target must fail by itself
    vm = boot(lab, c, "orphan")
    job_id = trigger_move(c, vm)
    deadline = time.monotonic() + 60
    while "live-migrating" not in (detail := next(j.detail for j in c.jobs_of(vm.name) if j.id == job_id)):
        assert time.monotonic() < deadline, detail
        time.sleep(0.2)
    # mid-migration: the memory stream is flowing (at 10 MiB/s it flows for seconds after that)
    while memory_sent(c.hosts.uri_a, vm.name) == 0:
        assert time.monotonic() < deadline, "the migration sent no memory"
        time.sleep(0.1)
    c.hosts.stop_libvirtd_b()
    job = c.wait_job(job_id, timeout=180)
    assert job.state == opb.JOB_STATE_FAILED
    assert "could not move" in job.detail and "runs on hosta as before" in job.detail, job.detail
    assert_home_and_running(c, vm)
    vm.destroy()
