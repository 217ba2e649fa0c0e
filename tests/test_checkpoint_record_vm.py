"""Checkpoints that survive libvirt losing them, and bitmaps QEMU cannot vouch for, on one host.

One persistent busybox guest (tests/vmlab, TCG) with a 64 MiB qcow2 disk serves the module; it
writes to its disk only when told (no noise) unless a test starts its writer. Each test ends with
an incremental (or a comparison) whose restore is bit-identical to ``qemu-img convert`` of the
view's image, and checks which path was taken by the bytes read and the view's reason.
"""
from __future__ import annotations

import hashlib
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import libvirt  # type: ignore[import-untyped]
import pytest
from conftest import MIB, lab_or_fail
from test_views import Guest, converted_digest, disk_ref, restored, run

from host_agent.agent import checkpoints, views
from host_agent.agent.checkpoint_record import CheckpointRecords, record_checkpoint
from host_agent.lab import Disk
from host_agent.model import ChangeDetection, DiskRef, Policy
from host_agent.storage.repository import Repository
from host_agent.storage.snapshot import Snapshot

pytestmark = pytest.mark.vm

SERIAL = "hb-cprec"


class RestartableGuest(Guest):
    """A Guest whose numbered scripts start again at 1 after the domain is booted again."""

    def booted_again(self) -> None:
        for old in self.ctl.glob("go-*"):
            old.unlink()
        self.n = 0
        self.vm.wait_for_console(r"HB-READY", timeout=180)


@pytest.fixture(scope="module")
def guest(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RestartableGuest, Path, DiskRef]]:
    folder = tmp_path_factory.mktemp("cprec")
    image = folder / "disk.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", str(image), "64M")
    with lab_or_fail(folder / "lab") as lab:
        disks = [Disk(image, "vda", "qcow2", SERIAL)]
        g = RestartableGuest(lab, "cprec", disks, noise=False, persistent=True)
        try:
            yield g, image, disk_ref(g.vm, image, "qcow2", SERIAL)
        finally:
            g.close()


def running(g: RestartableGuest) -> None:
    """Boot the guest again if an earlier test left it stopped."""
    if not g.vm.domain.isActive():
        g.vm.start_again()
        g.booted_again()


def view(dom: Any, ref: DiskRef, cs: int, records: CheckpointRecords | None, **kw: Any) -> views.PointInTime:
    return views.point_in_time(dom, dom, [ref], chunk_size=cs, timeout=60, records=records, **kw)


def full_backup(dom: Any, ref: DiskRef, repo: Repository, records: CheckpointRecords) -> tuple[Snapshot, str]:
    """A first backup: its snapshot and its view's checkpoint."""
    with view(dom, ref, repo.config.chunk_size, records) as v:
        snap = repo.backup(v[SERIAL].source, ref.snapshot_name, checkpoint=v.checkpoint).snapshot
    assert v.checkpoint is not None
    return snap, v.checkpoint


def wait_stopped(dom: Any, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while dom.isActive():
        assert time.monotonic() < deadline, "the domain did not stop"
        time.sleep(0.05)


def qemu_pid(name: str) -> int:
    return int(Path(f"/run/libvirt/qemu/{name}.pid").read_text().strip())


def test_a_checkpoint_libvirt_lost_is_redefined_and_the_next_backup_reads_only_the_changes(
        guest: tuple[RestartableGuest, Path, DiskRef], repo: Repository, tmp_path: Path) -> None:
    g, image, ref = guest
    running(g)
    dom, cs = g.vm.domain, repo.config.chunk_size
    records = CheckpointRecords(tmp_path / "state")
    snap1, cp1 = full_backup(dom, ref, repo, records)
    assert records.names(dom.UUIDString()) == [cp1]
    change = os.urandom(MIB)
    g.write(40 * MIB, change)
    # what a migration, a restarted transient domain or a redefined domain leaves: no metadata,
    # the bitmap still in QEMU
    dom.checkpointLookupByName(cp1).delete(libvirt.VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY)
    assert checkpoints.list_checkpoints(dom) == []

    with view(dom, ref, cs, records, since=cp1) as v2:
        d = v2[SERIAL]
        assert (d.change_detection, d.reason) == (ChangeDetection.DIRTY_BITMAP, "")
        assert d.changes == ((40 * MIB, MIB),)
        result = repo.backup(d.source, ref.snapshot_name, Policy.INCREMENTAL, changes=list(d.changes),
                             base=snap1, checkpoint=v2.checkpoint)
        assert result.snapshot.stats.bytes_read == MIB  # the guest's change, not the 64 MiB disk
        data = restored(repo, result.snapshot.id, tmp_path)
        assert hashlib.sha256(data).hexdigest() == converted_digest(image, tmp_path)
        assert data[40 * MIB:41 * MIB] == change
    assert checkpoints.list_checkpoints(dom) == [cp1, v2.checkpoint]
    assert sorted(records.names(dom.UUIDString())) == sorted([cp1, v2.checkpoint])

    # pruning forgets the records of what it deletes
    assert checkpoints.prune_checkpoints(dom, {v2.checkpoint}, records) == [cp1]
    assert records.names(dom.UUIDString()) == [v2.checkpoint]

    # no record, no redefine: comparison, saying so
    dom.checkpointLookupByName(v2.checkpoint).delete(libvirt.VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY)
    with view(dom, ref, cs, None, since=v2.checkpoint, checkpoint=False) as v3:
        assert v3[SERIAL].change_detection == ChangeDetection.COMPARISON
        assert f"no checkpoint {v2.checkpoint}" in v3[SERIAL].reason
    # a lost checkpoint no chain keeps: redefined only to delete it with its bitmap, record forgotten
    assert checkpoints.prune_checkpoints(dom, set(), records) == [v2.checkpoint]
    assert records.names(dom.UUIDString()) == [] and checkpoints.list_checkpoints(dom) == []


def test_bitmaps_of_a_killed_qemu_are_not_trusted_and_the_backup_compares_saying_why(
        guest: tuple[RestartableGuest, Path, DiskRef], repo: Repository, tmp_path: Path) -> None:
    g, image, ref = guest
    running(g)
    dom, cs = g.vm.domain, repo.config.chunk_size
    records = CheckpointRecords(tmp_path / "state")
    snap1, cp1 = full_backup(dom, ref, repo, records)
    # QEMU stores cp1's bitmap when it exits cleanly (SIGTERM); the next QEMU loads it and flags it
    # in-use in the image until it exits
    dom.destroyFlags(libvirt.VIR_DOMAIN_DESTROY_GRACEFUL)
    g.vm.start_again()
    g.booted_again()
    dom = g.vm.domain
    with view(dom, ref, cs, records, since=cp1) as v2:  # a clean restart keeps the chain
        d = v2[SERIAL]
        assert d.change_detection == ChangeDetection.DIRTY_BITMAP and d.changes is not None
        assert sum(n for _, n in d.changes) < MIB  # the boot barely writes (the guest has no file system)
        snap2 = repo.backup(d.source, ref.snapshot_name, Policy.INCREMENTAL, changes=list(d.changes),
                            base=snap1, checkpoint=v2.checkpoint).snapshot
    assert v2.checkpoint is not None

    # A checkpoint made outside a view: QEMU keeps its bitmap in memory only, until it lets go of
    # the image. (A view's snapshot and commit reopen the image, which stores the bitmaps: cp2's is
    # in the file, flagged in-use, like cp1's.)
    bare = f"hyperback-bare-{os.urandom(3).hex()}"
    dom.checkpointCreateXML(f"<domaincheckpoint><name>{bare}</name><disks><disk name='vda' "
                            "checkpoint='bitmap'/></disks></domaincheckpoint>", 0)
    record_checkpoint(records, dom, bare)
    # the guest writes all over its disk while QEMU is killed; each write is flushed (without a
    # flush QEMU may not have written the qcow2 metadata yet, and a kill loses the write: seen)
    g.start("i=0; while true; do dd if=/dev/urandom of=/dev/vda bs=64k count=1 "
            "seek=$((i % 1024)) oflag=direct conv=fsync 2>/dev/null; i=$((i+1)); done")
    grown = os.stat(image).st_size + 4 * MIB
    deadline = time.monotonic() + 60
    while os.stat(image).st_size < grown:
        assert time.monotonic() < deadline, "the guest did not write"
        time.sleep(0.1)
    os.kill(qemu_pid(g.vm.name), signal.SIGKILL)
    wait_stopped(dom)
    g.vm.start_again()
    g.booted_again()
    dom = g.vm.domain

    with view(dom, ref, cs, records, since=cp1, checkpoint=False) as v3:
        assert v3[SERIAL].change_detection == ChangeDetection.COMPARISON
        assert f"bitmap {cp1} on vda is inconsistent" in v3[SERIAL].reason
    with view(dom, ref, cs, records, since=bare, checkpoint=False) as v3:
        assert v3[SERIAL].change_detection == ChangeDetection.COMPARISON
        assert f"bitmap {bare} is missing on vda" in v3[SERIAL].reason
    with view(dom, ref, cs, records, since=v2.checkpoint) as v4:
        d = v4[SERIAL]
        assert d.change_detection == ChangeDetection.COMPARISON and d.changes is None
        assert f"bitmap {v2.checkpoint} on vda is inconsistent" in d.reason
        result = repo.backup(d.source, ref.snapshot_name, Policy.INCREMENTAL, changes=None, base=snap2,
                             checkpoint=v4.checkpoint)
        assert result.snapshot.stats.bytes_read >= 4 * MIB  # every allocated byte compared
        data = restored(repo, result.snapshot.id, tmp_path)
        assert hashlib.sha256(data).hexdigest() == converted_digest(image, tmp_path)
    # the next backup builds on v4's fresh checkpoint again
    with view(dom, ref, cs, records, since=v4.checkpoint, checkpoint=False) as v5:
        assert v5[SERIAL].change_detection == ChangeDetection.DIRTY_BITMAP
