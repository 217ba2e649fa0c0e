"""Which snapshot a guest's ``see`` or ``restore`` finds (host_agent.agent.snapshot_disks.own_snapshot,
which the executor's restore of a disk uses too), on a real repository holding two VMs' disks with
the same serial: only the asking VM's own, ever."""
from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

from host_agent import errors
from host_agent.agent.snapshot_disks import own_snapshot
from host_agent.model import DiskRef, Policy
from host_agent.storage.repository import Repository
from host_agent.storage.snapshot import Snapshot

MIB = 1024 * 1024


def disk_of(domain: str, serial: str = "hb-data") -> DiskRef:
    return DiskRef(domain, "vm", serial, "vda", "/nowhere.img", "raw", MIB)


TwoVms = tuple[Repository, str, str, list[Snapshot], list[Snapshot]]  # repo, mine, theirs, snapshots of each


@pytest.fixture
def repo_with_two_vms(tmp_path: Path) -> TwoVms:
    repo = Repository.init(tmp_path / "repo")
    image = tmp_path / "disk.img"
    mine, theirs = str(uuid.uuid4()), str(uuid.uuid4())
    snaps: dict[str, list[Snapshot]] = {mine: [], theirs: []}
    for domain in (mine, theirs, mine):
        image.write_bytes(os.urandom(MIB))
        snaps[domain].append(repo.backup(image, disk_of(domain).snapshot_name, Policy.FULL).snapshot)
    return repo, mine, theirs, snaps[mine], snaps[theirs]


def test_a_guest_finds_its_own_snapshots_by_id_prefix_or_latest(repo_with_two_vms: TwoVms) -> None:
    repo, mine, _, my_snaps, _ = repo_with_two_vms
    disk = disk_of(mine)
    assert own_snapshot(repo, disk, my_snaps[0].id).id == my_snaps[0].id
    assert own_snapshot(repo, disk, my_snaps[0].id[:8]).id == my_snaps[0].id
    assert own_snapshot(repo, disk, "latest").id == my_snaps[-1].id


def test_another_vms_snapshot_is_not_found_whatever_its_serial(repo_with_two_vms: TwoVms) -> None:
    repo, mine, _, _, their_snaps = repo_with_two_vms
    for asked in (their_snaps[0].id, their_snaps[0].id[:8]):
        with pytest.raises(errors.SnapshotNotFound, match="list hb-data"):
            own_snapshot(repo, disk_of(mine), asked)


def test_a_short_prefix_and_a_disk_without_snapshots_are_not_found(repo_with_two_vms: TwoVms) -> None:
    repo, mine, _, my_snaps, _ = repo_with_two_vms
    with pytest.raises(errors.SnapshotNotFound):
        own_snapshot(repo, disk_of(mine), my_snaps[0].id[:4])
    with pytest.raises(errors.SnapshotNotFound, match="back it up first"):
        own_snapshot(repo, disk_of(mine, "hb-empty"), "latest")
