"""After a live migration A -> B -> A the incremental still reads only what the guest changed.

libvirt leaves a domain's checkpoint metadata behind on every host it leaves; the bitmaps travel in
the qcow2 image (shared storage: QEMU stores them when the source lets go, the destination loads
them). hyperback's record of the checkpoint (checkpoint_record) lets the view redefine it on A.

Two libvirt hosts on one machine (host_agent.lab.twohosts), a migratable busybox guest (no 9p)
whose disk is a 1 GiB qcow2 image filled with data, writing all the time into the same 10 MiB
(about 1% of the disk). Needs root and a host prepared by host_agent/lab/setup_host.sh, plus pyroute2.
"""
from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import MIB, lab_or_fail
from test_views import converted_digest, restored, run

from host_agent.agent import checkpoints, views
from host_agent.agent.checkpoint_record import CheckpointRecords
from host_agent.colocation.migration import live_migrate
from host_agent.lab import Disk, Lab, Vm
from host_agent.lab.migratable import start_migratable_vm
from host_agent.lab.twohosts import TwoHosts
from host_agent.model import ChangeDetection, DiskRef, Policy
from host_agent.storage.repository import Repository

pytestmark = pytest.mark.vm

SERIAL = "hb-cpmig"
DISK_SIZE = 1024 * MIB
REGION = (40 * MIB, 160 * 64 * 1024)  # where the guest writes: 10 MiB, ~1% of the disk
# busybox dd: no oflag=direct; conv=fsync sends each block to QEMU before the next
WRITER = ("echo writing; i=0; while :; do dd if=/dev/urandom of=/dev/vda bs=64k count=1 "
          "seek=$((640 + i % 160)) conv=fsync,notrunc 2>/dev/null; i=$((i+1)); sleep 0.05; done")


@pytest.fixture
def hosts_and_lab(tmp_path: Path) -> Iterator[tuple[TwoHosts, Lab]]:
    with lab_or_fail(tmp_path / "lab") as lab, TwoHosts(tmp_path / "hosts") as hosts:
        yield hosts, lab


def writing_guest(lab: Lab, tmp_path: Path, name: str) -> tuple[Vm, Path]:
    """The migratable guest, writing all the time into REGION of its qcow2 disk full of data."""
    image = tmp_path / "disk.qcow2"  # outside B's private folders: both hosts see it
    run("qemu-img", "create", "-q", "-f", "qcow2", str(image), str(DISK_SIZE))
    run("qemu-io", "-f", "qcow2", "-c", f"write -P 0x5a 0 {DISK_SIZE}", str(image))
    vm = start_migratable_vm(lab, name, command=WRITER,
                             disks=[Disk(image, "vda", "qcow2", SERIAL, cache="none")])
    vm.wait_for_console(r"^writing", timeout=60)
    return vm, image


def backup(dom: Any, ref: DiskRef, repo: Repository, records: CheckpointRecords | None, image: Path,
           tmp: Path, **kw: Any) -> tuple[views.Views, int, str, str]:
    """A view and a backup of it: (the views, bytes read, digest of the restore, of qemu-img convert)."""
    with views.point_in_time(dom, dom, [ref], chunk_size=repo.config.chunk_size, timeout=60,
                             records=records, **kw) as v:
        d = v[SERIAL]
        policy = Policy.INCREMENTAL if "since" in kw else Policy.FULL
        snap = repo.backup(d.source, ref.snapshot_name, policy,
                           changes=list(d.changes) if d.changes is not None else None,
                           checkpoint=v.checkpoint).snapshot
        converted = converted_digest(image, tmp)
    return v, snap.stats.bytes_read, hashlib.sha256(restored(repo, snap.id, tmp)).hexdigest(), converted


def test_after_a_migration_there_and_back_the_incremental_reads_only_the_changes(
        hosts_and_lab: tuple[TwoHosts, Lab], tmp_path: Path,
        record_property: Callable[[str, object], None]) -> None:
    hosts, lab = hosts_and_lab
    vm, image = writing_guest(lab, tmp_path, "cpmig")
    dom = vm.domain
    ref = DiskRef(dom.UUIDString(), vm.name, SERIAL, "vda", str(image), "qcow2", DISK_SIZE)
    records = CheckpointRecords(tmp_path / "state")
    repo = Repository.init(tmp_path / "repo")
    v1, full_read, got, want = backup(dom, ref, repo, records, image, tmp_path)
    assert got == want and full_read == DISK_SIZE
    cp1 = v1.checkpoint
    assert cp1 is not None

    live_migrate(vm.name, hosts.uri_a, hosts.uri_b, hosts.lan_ip_b, timeout=120)
    live_migrate(vm.name, hosts.uri_b, hosts.uri_a, hosts.lan_ip_a, timeout=120)
    dom = lab.conn.lookupByName(vm.name)
    assert dom.isActive() and checkpoints.list_checkpoints(dom) == []  # libvirt left it behind

    # before: without hyperback's record, the whole disk is compared
    v2, before, got, want = backup(dom, ref, repo, None, image, tmp_path, since=cp1, checkpoint=False)
    assert v2[SERIAL].change_detection == ChangeDetection.COMPARISON
    assert f"no checkpoint {cp1}" in v2[SERIAL].reason and got == want
    # after: redefined from the record, only the dirty extents are read
    v3, after, got, want = backup(dom, ref, repo, records, image, tmp_path, since=cp1)
    d = v3[SERIAL]
    assert (d.change_detection, d.reason) == (ChangeDetection.DIRTY_BITMAP, "")
    assert d.changes and all(REGION[0] <= off and off + n <= sum(REGION) for off, n in d.changes)
    assert 0 < after <= REGION[1] and got == want
    assert checkpoints.list_checkpoints(dom) == [cp1, v3.checkpoint]
    print(f"bytes read after a migration round trip, disk {DISK_SIZE}: comparison {before}, "
          f"dirty bitmap {after}")
    record_property("bytes_read_comparison", before)
    record_property("bytes_read_dirty_bitmap", after)
    checkpoints.prune_checkpoints(dom, set(), records)
