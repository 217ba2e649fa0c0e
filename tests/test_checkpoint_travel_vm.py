"""A domain backed up on another host (a co-location visit, a cold move) still gets dirty-bitmap
incrementals: its checkpoint records travel in its own <metadata> (checkpoint_metadata).

Each host keeps its own state folder, as two agents would: the host a domain comes to has no record
file of its checkpoints, and libvirt there never heard of them. Two libvirt hosts on one machine
(host_agent.lab.twohosts), one migratable busybox guest for the module (persistent, as production
domains are), its disk a 1 GiB qcow2 image filled with data on storage both hosts see, the guest
rewriting the same 10 MiB (about 1% of the disk) all along. Each test starts from a full backup
wherever the guest is, so the tests pass alone and in any order. Needs root, a host prepared by
host_agent/lab/setup_host.sh, and pyroute2.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import libvirt  # type: ignore[import-untyped]
import pytest
from conftest import lab_or_fail
from test_checkpoint_migration_vm import DISK_SIZE, REGION, SERIAL, backup
from test_views import run

from host_agent import hypervisor
from host_agent.agent import checkpoints, views
from host_agent.agent.checkpoint_record import CheckpointRecords
from host_agent.colocation.migration import cold_move, live_migrate
from host_agent.errors import HypervisorError
from host_agent.lab import Disk, Lab
from host_agent.lab.migratable import start_migratable_vm
from host_agent.lab.twohosts import TwoHosts
from host_agent.model import ChangeDetection, DiskRef
from host_agent.storage.repository import Repository

pytestmark = pytest.mark.vm

# "writing" appears once the first block reached QEMU (conv=fsync): from then on there are changes
WRITER = ("i=0; while :; do dd if=/dev/urandom of=/dev/vda bs=64k count=1 seek=$((640 + i % 160)) "
          "conv=fsync,notrunc 2>/dev/null; [ $i = 0 ] && echo writing; i=$((i+1)); sleep 0.05; done")


@dataclass
class Site:
    """One libvirt host as an agent there sees it: its connection, URI, LAN address and records."""

    name: str
    uri: str
    lan_ip: str
    conn: Any
    records: CheckpointRecords


class Guest:
    """The module's guest and the host it runs on now."""

    def __init__(self, lab: Lab, hosts: TwoHosts, root: Path) -> None:
        self.image = root / "disk.qcow2"  # outside B's private folders: both hosts see it
        run("qemu-img", "create", "-q", "-f", "qcow2", str(self.image), str(DISK_SIZE))
        run("qemu-io", "-f", "qcow2", "-c", f"write -P 0x5a 0 {DISK_SIZE}", str(self.image))
        self.vm = start_migratable_vm(lab, "cptravel", command=WRITER,
                                      disks=[Disk(self.image, "vda", "qcow2", SERIAL, cache="none")])
        self.vm.wait_for_console(r"^writing", timeout=60)
        dom = self.vm.domain
        lab.conn.defineXML(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE | libvirt.VIR_DOMAIN_XML_SECURE))
        self.sites = {
            "a": Site("a", hosts.uri_a, hosts.lan_ip_a, lab.conn, CheckpointRecords(root / "state-a")),
            "b": Site("b", hosts.uri_b, hosts.lan_ip_b, hypervisor.connect(hosts.uri_b),
                      CheckpointRecords(root / "state-b"))}
        self.here = self.sites["a"]
        self.ref = DiskRef(dom.UUIDString(), self.vm.name, SERIAL, "vda", str(self.image), "qcow2", DISK_SIZE)

    @property
    def there(self) -> Site:
        return self.sites["b" if self.here.name == "a" else "a"]

    @property
    def domain(self) -> Any:
        return self.here.conn.lookupByName(self.vm.name)

    def migrate(self) -> None:
        to = self.there
        live_migrate(self.vm.name, self.here.uri, to.uri, to.lan_ip, timeout=120)
        self.here = to

    def move_cold(self) -> None:
        """Stop, undefine here, define and boot there from this host's definition; wait until the
        rebooted guest has written again."""
        to = self.there
        self.vm.console_log.unlink(missing_ok=True)
        cold_move(self.vm.name, self.here.uri, to.uri, shutdown_timeout=0)
        self.here = to
        self.vm.wait_for_console(r"^writing", timeout=60)

    def back_up(self, repo: Repository, tmp: Path, records: CheckpointRecords | None = None,
                **kw: Any) -> tuple[views.Views, int, str, str]:
        return backup(self.domain, self.ref, repo, records or self.here.records, self.image, tmp, **kw)

    def full(self, repo: Repository, tmp: Path) -> str:
        """A full backup here; its checkpoint."""
        v, read, got, want = self.back_up(repo, tmp)
        assert got == want and read == DISK_SIZE and v.checkpoint is not None
        return v.checkpoint

    def close(self) -> None:
        """The guest is persistent: the lab and TwoHosts destroy it but leave a definition with
        checkpoints behind, which a later run of this module could not reuse."""
        for site in self.sites.values():
            with contextlib.suppress(HypervisorError):
                dom = hypervisor.guard(site.conn).lookupByName(self.vm.name)
                if dom.isActive():
                    dom.destroy()
                dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA)
        self.sites["b"].conn.close()


@pytest.fixture(scope="module")
def guest(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Guest]:
    root = tmp_path_factory.mktemp("travel")
    with lab_or_fail(root / "lab") as lab, TwoHosts(root / "hosts") as hosts:
        g = Guest(lab, hosts, root)
        try:
            yield g
        finally:
            g.close()


def assert_dirty_bitmap_incremental(v: views.Views, read: int, got: str, want: str) -> None:
    """Only extents the guest wrote were read, and the restore equals the disk at that moment."""
    d = v[SERIAL]
    assert (d.change_detection, d.reason) == (ChangeDetection.DIRTY_BITMAP, "")
    assert d.changes and all(REGION[0] <= off and off + n <= sum(REGION) for off, n in d.changes)
    assert 0 < read <= REGION[1] and got == want


def test_after_a_visit_the_backups_there_and_back_home_are_dirty_bitmap_incrementals(
        guest: Guest, tmp_path: Path, record_property: Callable[[str, object], None]) -> None:
    repo = Repository.init(tmp_path / "repo")    # the media host's destination
    local = Repository.init(tmp_path / "local")  # a destination only the home host backs up to
    home = guest.here
    cp1 = guest.full(repo, tmp_path)
    cp_local = guest.full(local, tmp_path)

    guest.migrate()  # the visit: to the media host, backed up there
    assert checkpoints.list_checkpoints(guest.domain) == []  # libvirt there never heard of cp1
    # before: records kept per host only, as they were: the whole disk is compared
    per_host = CheckpointRecords(tmp_path / "per-host-only", in_domain=False)
    v, before, got, want = guest.back_up(repo, tmp_path, per_host, since=cp1, checkpoint=False)
    assert v[SERIAL].change_detection == ChangeDetection.COMPARISON and got == want
    assert f"no checkpoint {cp1}" in v[SERIAL].reason and before == DISK_SIZE
    # after: redefined from the record the domain carries (this host has no file of cp1)
    assert guest.here.records.load(guest.ref.domain_uuid, cp1) is None
    v, during, got, want = guest.back_up(repo, tmp_path, since=cp1)
    assert_dirty_bitmap_incremental(v, during, got, want)
    cp2 = v.checkpoint
    assert cp2 is not None
    # the media host's agent prunes after its backup; its chains know only cp2, not home's cp_local
    checkpoints.prune_checkpoints(guest.domain, {cp2}, guest.here.records)

    guest.migrate()  # home again: cp2 was made on the media host, home has no file of it
    assert guest.here is home and home.records.load(guest.ref.domain_uuid, str(cp2)) is None
    v, after, got, want = guest.back_up(repo, tmp_path, since=cp2)
    assert_dirty_bitmap_incremental(v, after, got, want)
    v, read, got, want = guest.back_up(local, tmp_path, since=cp_local)
    assert_dirty_bitmap_incremental(v, read, got, want)
    print(f"bytes read by the backup during a visit, disk {DISK_SIZE}: records per host (before) {before}, "
          f"records in the domain (after) {during}; back home {after}")
    record_property("bytes_read_per_host_records", before)
    record_property("bytes_read_travelling_records", during)
    checkpoints.prune_checkpoints(guest.domain, set(), guest.here.records)


def test_after_a_cold_move_the_next_backup_is_a_dirty_bitmap_incremental(
        guest: Guest, tmp_path: Path) -> None:
    repo = Repository.init(tmp_path / "repo")
    cp = guest.full(repo, tmp_path)
    guest.move_cold()  # shut off, undefined here, defined there from this host's XML, booted
    dom = guest.domain
    assert dom.isPersistent() and checkpoints.list_checkpoints(dom) == []
    v, read, got, want = guest.back_up(repo, tmp_path, since=cp)
    assert_dirty_bitmap_incremental(v, read, got, want)
    assert checkpoints.list_checkpoints(dom) == [cp, v.checkpoint]
    checkpoints.prune_checkpoints(dom, set(), guest.here.records)
