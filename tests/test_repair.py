"""check --repair: indexes rebuilt from the packs' records, the loss named exactly, and a later
backup of the same source heals it (docs/repository-format.md, section 9.1)."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from conftest import MIB, write_image
from system_helpers import HYPERBACK

from host_agent import errors
from host_agent.storage.locks import Lock
from host_agent.storage.packfile import read_index
from host_agent.storage.repair import repair, scan_pack
from host_agent.storage.repository import Repository


def cli(*args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(HYPERBACK), *map(str, args)], capture_output=True, text=True, timeout=120,
                          check=False)


def pack_path(repo: Repository, name: str) -> Path:
    return repo.path / "packs" / name[:2] / name


@pytest.fixture
def two(tmp_path: Path) -> tuple[Repository, dict[str, Path]]:
    """A repository with two snapshots of different 2 MiB images, one pack each."""
    repo = Repository.init(tmp_path / "repo")
    images = {}
    for i in range(2):
        image = write_image(tmp_path / f"d{i}.img", 2 * MIB, 10 + i)
        images[repo.backup(image, f"vm{i}/vda").snapshot.id] = image
    return repo, images


def restores(repo: Repository, sid: str, image: Path, out: Path) -> bool:
    try:
        repo.restore(sid, out, overwrite=True)
    except errors.IntegrityError:
        return False
    return out.read_bytes() == image.read_bytes()


def test_a_deleted_index_is_rebuilt_from_its_pack(two: tuple[Repository, dict[str, Path]],
                                                  tmp_path: Path) -> None:
    repo, images = two
    name = repo.pack_names()[0]
    before = (repo.path / "index" / name).read_bytes()
    (repo.path / "index" / name).unlink()
    assert not repo.check().ok

    dry = cli("check", "--repo", repo.path, "--repair")
    assert dry.returncode == 0, dry.stderr
    assert f"would rebuild index {name} (it has no index)" in dry.stdout and "--yes" in dry.stdout
    assert not (repo.path / "index" / name).exists(), "a dry run wrote"

    done = json.loads(cli("check", "--repo", repo.path, "--repair", "--yes", "--json").stdout)
    assert [(f["pack"], f["action"]) for f in done["fixes"]] == [(name, "rebuild")]
    assert done["lost"] == [] and done["damaged_snapshots"] == []
    assert (repo.path / "index" / name).read_bytes() == before, "the rebuilt index differs from the lost one"
    assert repo.check().ok
    assert all(restores(repo, sid, image, tmp_path / "out.img") for sid, image in images.items())
    assert "every one of 2 snapshot(s) is whole" in cli("check", "--repo", repo.path, "--repair").stdout


def test_a_truncated_pack_loses_exactly_its_cut_records_and_a_new_backup_heals_them(
        two: tuple[Repository, dict[str, Path]], tmp_path: Path) -> None:
    repo, images = two
    (victim_id, victim_image), (other_id, other_image) = images.items()
    victim = next(p for p in repo.pack_names() if any(
        e.id == repo.snapshots()[0].tree.root for e in read_index(repo.path / "index" / p)))
    entries = read_index(repo.path / "index" / victim)
    data_entries = [e for e in entries if e.type == 0]
    cut = data_entries[len(data_entries) // 2]
    os.truncate(pack_path(repo, victim), cut.offset + 10)  # into the middle of that record's header
    expected_lost = {e.id.hex() for e in entries if e.offset >= cut.offset}

    done = json.loads(cli("check", "--repo", repo.path, "--repair", "--yes", "--json").stdout)
    (fix,) = done["fixes"]
    assert fix["pack"] == victim and fix["action"] == "trim" and set(fix["removed"]) == expected_lost
    lost_chunks = {bad["id"] for bad in done["lost"]}
    assert lost_chunks <= expected_lost and lost_chunks, done["lost"]
    assert all(bad["snapshots"] == [victim_id] for bad in done["lost"])
    assert done["damaged_snapshots"] == [victim_id]
    assert [e.id.hex() for e in read_index(repo.path / "index" / victim)] == \
        [e.id.hex() for e in entries if e.offset < cut.offset], "lost ids stayed in the index"
    human = cli("check", "--repo", repo.path, "--repair")
    assert human.returncode == 4
    assert f"LOST chunk {sorted(lost_chunks)[0]} used by {victim_id}" in human.stdout

    assert restores(repo, other_id, other_image, tmp_path / "out.img")
    assert not restores(repo, victim_id, victim_image, tmp_path / "out.img")
    repo.backup(victim_image, repo.resolve(victim_id).name)  # the same source again: dedup re-supplies
    assert repo.check().ok
    assert restores(repo, victim_id, victim_image, tmp_path / "out.img")


def test_an_index_without_its_pack_is_dropped_and_repair_refuses_while_others_work(
        two: tuple[Repository, dict[str, Path]]) -> None:
    repo, images = two
    name = repo.pack_names()[1]
    pack_path(repo, name).unlink()
    with Lock(repo.path / "locks", "backup", 0).acquire(), \
            pytest.raises(errors.RepositoryBusy, match="repair when they have finished"):
        repair(repo, apply=True)
    report = repair(repo, apply=True)
    assert [(f.pack, f.action) for f in report.fixes] == [(name, "drop")]
    assert name not in repo.pack_names() and len(report.damaged_snapshots) == 1


def test_scanning_a_pack_finds_what_its_index_lists(two: tuple[Repository, dict[str, Path]]) -> None:
    repo, _ = two
    for name in repo.pack_names():
        assert scan_pack(pack_path(repo, name)) == read_index(repo.path / "index" / name)
