"""After libvirtd restarts under a running domain, the next incremental still reads only what the
guest changed (docs/changed-block-tracking.md, "Checkpoints libvirt loses").

The lab's own libvirtd serves every other test, so the domain runs on host B of
host_agent.lab.twohosts, a libvirtd this test owns and restarts: the migratable busybox guest of
tests/test_checkpoint_migration_vm.py, moved there live, writing all the time into the same 10 MiB
of its 1 GiB qcow2 disk. QEMU goes on through the restart with its bitmaps; the checkpoint is
either still in libvirt's metadata or redefined from hyperback's record.
"""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import libvirt  # type: ignore[import-untyped]
import pytest
from conftest import lab_or_fail
from test_checkpoint_migration_vm import DISK_SIZE, REGION, SERIAL, backup, writing_guest

from host_agent.agent import checkpoints
from host_agent.agent.checkpoint_record import CheckpointRecords
from host_agent.colocation.migration import live_migrate
from host_agent.lab import Lab
from host_agent.lab.twohosts import TwoHosts
from host_agent.model import ChangeDetection, DiskRef
from host_agent.storage.repository import Repository

pytestmark = [pytest.mark.vm, pytest.mark.root]


@pytest.fixture
def hosts_and_lab(tmp_path: Path) -> Iterator[tuple[TwoHosts, Lab]]:
    with lab_or_fail(tmp_path / "lab") as lab, TwoHosts(tmp_path / "hosts") as hosts:
        yield hosts, lab


def test_after_libvirtd_restarts_under_the_running_domain_the_incremental_reads_only_the_changes(
        hosts_and_lab: tuple[TwoHosts, Lab], tmp_path: Path) -> None:
    hosts, lab = hosts_and_lab
    vm, image = writing_guest(lab, tmp_path, "cprestart")
    live_migrate(vm.name, hosts.uri_a, hosts.uri_b, hosts.lan_ip_b, timeout=120)
    conn = libvirt.open(hosts.uri_b)
    try:
        dom = conn.lookupByName(vm.name)
        ref = DiskRef(dom.UUIDString(), vm.name, SERIAL, "vda", str(image), "qcow2", DISK_SIZE)
        records = CheckpointRecords(tmp_path / "state")
        repo = Repository.init(tmp_path / "repo")
        v1, full_read, got, want = backup(dom, ref, repo, records, image, tmp_path)
        assert got == want and full_read == DISK_SIZE
        pid = hosts.libvirtd_pid_b
    finally:
        conn.close()

    hosts.restart_libvirtd_b()
    assert hosts.libvirtd_pid_b != pid
    conn = libvirt.open(hosts.uri_b)
    try:
        dom = conn.lookupByName(vm.name)
        assert dom.isActive()
        v2, read, got, want = backup(dom, ref, repo, records, image, tmp_path, since=v1.checkpoint)
        d = v2[SERIAL]
        assert (d.change_detection, d.reason) == (ChangeDetection.DIRTY_BITMAP, ""), d.reason
        assert d.changes and all(REGION[0] <= off and off + n <= sum(REGION) for off, n in d.changes)
        assert 0 < read <= REGION[1] and got == want
        print(f"bytes read after a libvirtd restart, disk {DISK_SIZE}: dirty bitmap {read}")
        checkpoints.prune_checkpoints(dom, set(), records)
    finally:
        conn.close()
