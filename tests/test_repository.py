"""The repository API: every policy round-trips bit-identical; holes, dedup and errors behave."""
from __future__ import annotations

import json
import os
import random
import tempfile
from pathlib import Path

import pytest
from conftest import MIB, ImageFactory, mutate, sha256_file, write_image
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from host_agent import errors
from host_agent.model import ChangeDetection, Fallback, FallbackNote, Policy
from host_agent.storage.extents import Layout, Mapping
from host_agent.storage.gc import collect_garbage
from host_agent.storage.repository import Repository
from host_agent.storage.snapshot import Snapshot


def restored_digest(repo: Repository, spec: str, tmp: Path) -> str:
    target = tmp / f"restored-{random.getrandbits(32)}.img"
    repo.restore(spec, target)
    digest = sha256_file(target)
    target.unlink()
    return digest


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(size=st.integers(1, 3 * MIB), seed=st.integers(0, 10_000), rounds=st.lists(
    st.tuples(st.sampled_from(list(Policy)), st.booleans(), st.integers(0, 20), st.integers(1, 70_000)),
    min_size=1, max_size=4))
def test_every_snapshot_restores_bit_identical(size: int, seed: int,
                                               rounds: list[tuple[Policy, bool, int, int]]) -> None:
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        repo = Repository.init(tmp / "repo", chunk_size=4096)
        image = write_image(tmp / "disk.img", size, seed, block=16 * 1024)
        expected = {repo.backup(image, "vm/vda", Policy.FULL).snapshot.id: sha256_file(image)}
        since_full: list[tuple[int, int]] = []  # a differential's change list reaches back to the full
        for i, (policy, with_list, extents, length) in enumerate(rounds):
            changes = mutate(image, seed + i, extents, min(length, size), align=1)
            since_full += changes
            given_list = since_full if policy is Policy.DIFFERENTIAL else changes
            result = repo.backup(image, "vm/vda", policy, given_list if with_list else None)
            if policy is Policy.FULL:
                since_full = []
            expected[result.snapshot.id] = sha256_file(image)
        for sid, digest in expected.items():
            assert restored_digest(repo, sid, tmp) == digest


def test_holes_cost_neither_reads_nor_space_and_restore_as_holes(repo: Repository, tmp_path: Path) -> None:
    image = tmp_path / "sparse.img"
    with open(image, "wb") as f:
        f.truncate(64 * MIB)
        f.seek(10 * MIB)
        f.write(os.urandom(MIB))
    result = repo.backup(image, "vm/vda")
    assert result.snapshot.stats.bytes_read == MIB
    assert result.snapshot.stats.bytes_new == MIB
    target = tmp_path / "restored.img"
    repo.restore("vm/vda@latest", target)
    assert target.stat().st_size == 64 * MIB
    assert target.stat().st_blocks * 512 < 2 * MIB
    assert sha256_file(target) == sha256_file(image)


def test_written_zeros_are_not_stored(repo: Repository, tmp_path: Path) -> None:
    image = tmp_path / "zeros.img"
    image.write_bytes(bytes(8 * MIB))
    result = repo.backup(image, "vm/vda")
    assert result.snapshot.stats.bytes_read == 8 * MIB
    assert result.snapshot.stats.bytes_new == 0


def test_clones_of_one_base_are_stored_once(repo: Repository, make_image: ImageFactory,
                                            tmp_path: Path) -> None:
    base = make_image(16 * MIB, seed=5)
    clone = tmp_path / "clone.img"
    clone.write_bytes(base.read_bytes())
    changed = sum(n for _, n in mutate(clone, 9, 4, 64 * 1024))
    first = repo.backup(base, "vm1/vda").snapshot
    second = repo.backup(clone, "vm2/vda").snapshot
    assert second.stats.bytes_new <= changed + 4 * 2 * repo.config.chunk_size
    assert second.stats.bytes_new < first.stats.bytes_new / 10


def test_incremental_with_change_list_reads_only_the_changes(repo: Repository,
                                                            make_image: ImageFactory) -> None:
    image = make_image(32 * MIB, seed=2)
    repo.backup(image, "vm/vda")
    changes = mutate(image, 3, 5)
    result = repo.backup(image, "vm/vda", Policy.INCREMENTAL, changes)
    assert result.snapshot.change_detection is ChangeDetection.CHANGE_LIST
    assert result.snapshot.stats.bytes_read <= 5 * (64 * 1024 + repo.config.chunk_size)


def test_incremental_without_change_list_compares_with_the_base(repo: Repository,
                                                                make_image: ImageFactory) -> None:
    image = make_image(16 * MIB, seed=2)
    repo.backup(image, "vm/vda")
    mutate(image, 3, 3)
    result = repo.backup(image, "vm/vda", Policy.INCREMENTAL)
    snap = result.snapshot
    assert snap.change_detection is ChangeDetection.COMPARISON
    assert 3 * 64 * 1024 <= snap.stats.bytes_changed <= 3 * (64 * 1024 + 2 * repo.config.chunk_size)


def test_differential_takes_the_last_full_as_base(repo: Repository, make_image: ImageFactory) -> None:
    image = make_image(4 * MIB, seed=2)
    full = repo.backup(image, "vm/vda").snapshot
    repo.backup(image, "vm/vda", Policy.INCREMENTAL)
    diff = repo.backup(image, "vm/vda", Policy.DIFFERENTIAL).snapshot
    assert diff.parent == full.id


def test_incremental_without_any_base_becomes_full_and_says_so(repo: Repository,
                                                               make_image: ImageFactory) -> None:
    result = repo.backup(make_image(MIB), "vm/vda", Policy.INCREMENTAL, [(0, 10)])
    assert result.snapshot.policy is Policy.FULL
    assert any("full backup" in n for n in result.notes)


def test_a_snapshot_restores_after_its_parents_are_pruned(repo: Repository, make_image: ImageFactory,
                                                          tmp_path: Path) -> None:
    image = make_image(8 * MIB, seed=4)
    full = repo.backup(image, "vm/vda").snapshot
    mutate(image, 1, 4)
    incr = repo.backup(image, "vm/vda", Policy.INCREMENTAL).snapshot
    repo.forget([full.id])
    collect_garbage(repo)
    assert restored_digest(repo, incr.id, tmp_path) == sha256_file(image)
    assert repo.check().ok


def test_grown_and_shrunk_sources_round_trip_with_change_lists(repo: Repository, tmp_path: Path) -> None:
    image = write_image(tmp_path / "d.img", 3 * MIB + 123, 1)
    repo.backup(image, "vm/vda")
    with open(image, "ab") as f:
        f.write(os.urandom(MIB))
    grown = repo.backup(image, "vm/vda", Policy.INCREMENTAL, [(0, 10)]).snapshot
    assert restored_digest(repo, grown.id, tmp_path) == sha256_file(image)
    os.truncate(image, MIB + 7)
    shrunk = repo.backup(image, "vm/vda", Policy.INCREMENTAL, []).snapshot
    assert restored_digest(repo, shrunk.id, tmp_path) == sha256_file(image)


def test_empty_source_round_trips(repo: Repository, tmp_path: Path) -> None:
    image = tmp_path / "empty.img"
    image.touch()
    snap = repo.backup(image, "vm/vda").snapshot
    assert snap.tree.root is None
    target = tmp_path / "out.img"
    repo.restore(snap.id, target)
    assert target.stat().st_size == 0


def test_snapshots_are_found_by_id_prefix_and_latest(repo: Repository, make_image: ImageFactory) -> None:
    image = make_image(MIB)
    first = repo.backup(image, "vm/vda").snapshot
    second = repo.backup(image, "vm/vda").snapshot
    assert repo.resolve("vm/vda@latest").id == second.id
    assert repo.resolve(first.id[:8]).id == first.id
    with pytest.raises(errors.SnapshotNotFound, match="hyperback list"):
        repo.resolve("vm/other@latest")
    with pytest.raises(errors.SnapshotNotFound):
        repo.resolve("abc")


@pytest.mark.parametrize("name", ["", "/abs", "a//b", "../x", "a/" * 5 + "b", "sp ace", "x" * 65, "-x"])
def test_bad_names_are_refused(repo: Repository, make_image: ImageFactory, name: str) -> None:
    with pytest.raises(errors.UsageError, match="snapshot name"):
        repo.backup(make_image(4096), name)


def test_missing_or_unreadable_sources_are_clear_errors(repo: Repository, tmp_path: Path) -> None:
    with pytest.raises(errors.SourceError, match="No such file"):
        repo.backup(tmp_path / "nope.img", "vm/vda")
    with pytest.raises(errors.SourceError, match="not a regular file or a block device"):
        repo.backup(tmp_path, "vm/vda")
    assert repo.snapshots() == []


def test_change_list_outside_the_source_is_refused(repo: Repository, make_image: ImageFactory) -> None:
    image = make_image(MIB)
    repo.backup(image, "vm/vda")
    with pytest.raises(errors.UsageError, match="outside the source"):
        repo.backup(image, "vm/vda", Policy.INCREMENTAL, [(MIB - 10, 20)])


def test_restore_never_overwrites_without_being_told(repo: Repository, make_image: ImageFactory,
                                                     tmp_path: Path) -> None:
    image = make_image(MIB)
    repo.backup(image, "vm/vda")
    target = tmp_path / "existing.img"
    target.write_bytes(b"precious")
    with pytest.raises(errors.TargetError, match="--overwrite"):
        repo.restore("vm/vda@latest", target)
    assert target.read_bytes() == b"precious"
    repo.restore("vm/vda@latest", target, overwrite=True)
    assert sha256_file(target) == sha256_file(image)


def test_opening_something_else_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(errors.NotARepository, match="hyperback init"):
        Repository.open(tmp_path)
    (tmp_path / "config").write_text("{}")
    with pytest.raises(errors.NotARepository, match="foreign"):
        Repository.open(tmp_path)


def test_a_newer_format_is_refused_with_upgrade_advice(repo: Repository) -> None:
    config = repo.path / "config"
    doc = json.loads(config.read_text())
    doc["version"] = 99
    config.write_text(json.dumps(doc))
    with pytest.raises(errors.UnsupportedFormat, match="upgrade hyperback"):
        Repository.open(repo.path)


def test_init_refuses_a_non_empty_directory_and_bad_parameters(tmp_path: Path) -> None:
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "file").touch()
    with pytest.raises(errors.RepositoryExists):
        Repository.init(tmp_path / "full")
    with pytest.raises(errors.UsageError, match="power of two"):
        Repository.init(tmp_path / "r", chunk_size=5000)


def test_progress_reaches_the_source_size(repo: Repository, make_image: ImageFactory) -> None:
    seen: list[tuple[int, int]] = []
    repo.backup(make_image(8 * MIB), "vm/vda", progress=lambda done, total: seen.append((done, total)))
    assert seen and seen[-1] == (8 * MIB, 8 * MIB)


def test_prune_frees_the_space_of_forgotten_snapshots(repo: Repository, make_image: ImageFactory) -> None:
    first = repo.backup(make_image(8 * MIB, seed=1), "vm/vda").snapshot
    repo.backup(make_image(8 * MIB, seed=2), "vm/vda")
    size_before = sum(f.stat().st_size for f in (repo.path / "packs").rglob("*") if f.is_file())
    repo.forget([first.id])
    result = collect_garbage(repo)
    size_after = sum(f.stat().st_size for f in (repo.path / "packs").rglob("*") if f.is_file())
    assert result.packs_deleted >= 1 and size_after < size_before * 0.75
    assert repo.check().ok


def test_a_layout_over_scattered_clusters_backs_up_the_logical_image(repo: Repository,
                                                                     tmp_path: Path) -> None:
    """As a qcow2 chain stores an image: 64 KiB clusters in any order in two files, gaps as zeros."""
    cluster, count = 64 * 1024, 40
    rng = random.Random(7)
    logical = bytearray(cluster * count)
    files = [tmp_path / "top.bin", tmp_path / "base.bin"]
    placed: list[list[int]] = [[], []]
    mappings = []
    for i in rng.sample(range(count), 30):
        data = rng.randbytes(cluster)
        logical[i * cluster:(i + 1) * cluster] = data
        f = i % 2
        mappings.append(Mapping(i * cluster, cluster, f, len(placed[f]) * cluster + 4096))
        placed[f].append(i)
    for f, path in enumerate(files):
        with open(path, "wb") as out:
            out.write(bytes(4096))
            for i in placed[f]:
                out.write(logical[i * cluster:(i + 1) * cluster])
    layout = Layout(tuple(map(str, files)), tuple(sorted(mappings, key=lambda m: m.offset)), len(logical),
                    "test layout")
    snap = repo.backup(layout, "vm/vda").snapshot
    assert snap.stats.bytes_read == 30 * cluster
    target = tmp_path / "out.img"
    repo.restore(snap.id, target)
    assert target.read_bytes() == bytes(logical)


def test_a_layout_finer_than_a_chunk_is_refused(repo: Repository, tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(bytes(8192))
    layout = Layout((str(tmp_path / "f"),), (Mapping(4096, 4096, 0, 0),), 65536, "fine layout")
    with pytest.raises(errors.SourceError, match="cluster size below the chunk size"):
        repo.backup(layout, "vm/vda")


def test_a_snapshot_records_its_checkpoint_in_a_field_and_older_snapshots_still_name_theirs(
        repo: Repository, make_image: ImageFactory) -> None:
    image = make_image()
    name = "hyperback-20261207T020000Z-0a1b2c"
    snap = repo.backup(image, "vm1/vda", checkpoint=name).snapshot
    assert snap.checkpoint == name and snap.source == str(image)
    assert repo.resolve(snap.id).checkpoint == name
    assert repo.backup(image, "vm1/vda", Policy.INCREMENTAL).snapshot.checkpoint is None
    # written before the field existed: the checkpoint was the end of the source label
    doc = snap.to_json()
    del doc["checkpoint"]
    doc["source"] = f"{image} [checkpoint {name}]"
    assert Snapshot.from_json(doc).checkpoint == name
    doc["source"] = str(image)
    assert Snapshot.from_json(doc).checkpoint is None


def test_a_snapshot_that_compared_records_why_and_documents_without_the_field_still_read(
        repo: Repository, make_image: ImageFactory) -> None:
    image = make_image()
    why = FallbackNote(Fallback.DISK_REPLACED, "the image of vda is another file")
    full = repo.backup(image, "vm1/vda", fallback=why).snapshot
    assert full.fallback is None  # no base: nothing fell back, whatever the caller said
    mutate(image, 1, 3)
    snap = repo.backup(image, "vm1/vda", Policy.INCREMENTAL, fallback=why).snapshot
    assert snap.change_detection is ChangeDetection.COMPARISON
    stored = repo.resolve(snap.id).fallback
    assert stored == why and stored is not None and stored.reason is Fallback.DISK_REPLACED
    assert snap.to_json()["fallback"] == {"reason": "disk-replaced", "text": str(why)}
    assert "fallback" not in full.to_json()  # documents as before when nothing fell back
    doc = snap.to_json()
    doc["fallback"]["reason"] = "a-reason-of-a-newer-writer"
    newer = Snapshot.from_json(doc).fallback
    assert newer is not None and newer.reason is Fallback.OTHER and newer == why
    del doc["fallback"]
    assert Snapshot.from_json(doc).fallback is None
