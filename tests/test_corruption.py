"""Damaged repositories: every kind of damage is found, named, and never written out as data."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import random
from pathlib import Path

import pytest
from system_helpers import (
    MIB,
    assert_one_line_error,
    files_in,
    overwrite,
    run_cli,
    write_random_image,
)

from host_agent import errors
from host_agent.storage.copier import BLOB_DATA
from host_agent.storage.packfile import RECORD_HEADER, IndexEntry, read_index
from host_agent.storage.repository import DEFAULT_CHUNK_SIZE, Repository
from host_agent.storage.snapshot import Snapshot


def pack_path(repo: Repository, name: str) -> Path:
    return repo.path / "packs" / name[:2] / name


def chunk_ids(image: Path, chunk_size: int = DEFAULT_CHUNK_SIZE) -> set[bytes]:
    """The ids of an image's non-zero chunks, computed independently of the product."""
    out = set()
    with open(image, "rb") as f:
        while chunk := f.read(chunk_size):
            if chunk.count(0) != len(chunk):
                out.add(hashlib.sha256(chunk).digest())
    return out


def flip_bit(path: Path, offset: int, bit: int = 3) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ (1 << bit)]))


@pytest.fixture
def two_snapshots(tmp_path: Path) -> tuple[Repository, Snapshot, Snapshot, Path]:
    """vm1/vda twice: the second after a small change, so most chunks are used by both."""
    repo = Repository.init(tmp_path / "repo")
    image = write_random_image(tmp_path / "vm1.img", 8 * MIB, seed=61, hole_every=4, block=256 * 1024)
    first = repo.backup(image, "vm1/vda").snapshot
    overwrite(image, 62, [(0, 64 * 1024)])
    second = repo.backup(image, "vm1/vda").snapshot
    return repo, first, second, image


def shared_data_record(repo: Repository, image: Path) -> tuple[str, IndexEntry]:
    """A data record that both snapshots of ``two_snapshots`` use (from the middle of the image)."""
    wanted = chunk_ids(image)
    for name in repo.pack_names():
        for entry in read_index(repo.path / "index" / name):
            if entry.type == BLOB_DATA and entry.id in wanted and entry.stored_len > 1000:
                with open(image, "rb") as f:
                    f.seek(4 * MIB)
                    if hashlib.sha256(f.read(DEFAULT_CHUNK_SIZE)).digest() == entry.id:
                        return name, entry
    raise AssertionError("no data record for the chunk at 4 MiB")


def test_a_flipped_bit_in_a_chunk_makes_restore_fail_naming_it_and_write_no_file(
        two_snapshots: tuple[Repository, Snapshot, Snapshot, Path], tmp_path: Path) -> None:
    repo, _, second, _ = two_snapshots
    name, entry = shared_data_record(repo, two_snapshots[3])
    flip_bit(pack_path(repo, name), entry.offset + RECORD_HEADER.size + entry.stored_len // 2)
    out = tmp_path / "out"
    out.mkdir()

    with pytest.raises(errors.CorruptChunk) as exc:
        repo.restore(second.id, out / "vm1.img")
    assert exc.value.chunk_id == entry.id.hex()
    assert entry.id.hex() in str(exc.value)
    assert files_in(out) == set(), "a restore that failed left a file"

    proc = run_cli("restore", "--repo", str(repo.path), second.id, str(out / "vm1.img"))
    line = assert_one_line_error(proc, 4)
    assert entry.id.hex() in line
    assert files_in(out) == set()


def test_verify_names_the_bad_chunk_and_every_snapshot_using_it(
        two_snapshots: tuple[Repository, Snapshot, Snapshot, Path]) -> None:
    repo, first, second, image = two_snapshots
    name, entry = shared_data_record(repo, image)
    flip_bit(pack_path(repo, name), entry.offset + RECORD_HEADER.size + entry.stored_len // 2)

    report = repo.verify()
    assert not report.ok
    assert report.bad_total == 1
    (bad,) = report.bad
    assert bad.id == entry.id.hex()
    assert sorted(bad.snapshots) == sorted([first.id, second.id])

    proc = run_cli("verify", "--repo", str(repo.path))
    assert proc.returncode == 4, proc.stderr
    assert f"BAD chunk {entry.id.hex()} used by" in proc.stdout
    bad_line = next(line for line in proc.stdout.splitlines() if line.startswith("BAD"))
    assert first.id in bad_line and second.id in bad_line
    assert "1 bad chunk" in proc.stdout


def test_verify_of_a_sample_checks_part_of_the_repository(
        two_snapshots: tuple[Repository, Snapshot, Snapshot, Path]) -> None:
    repo = two_snapshots[0]
    full = repo.verify()
    sample = repo.verify(sample_percent=10)
    assert full.ok and sample.ok
    assert 0 < sample.bytes_checked < full.bytes_checked / 2

    proc = run_cli("verify", "--repo", str(repo.path), "--sample", "10")
    assert proc.returncode == 0, proc.stderr
    assert "(10% sample)" in proc.stdout and "0 bad chunk" in proc.stdout


def test_a_truncated_pack_is_reported_by_restore_and_verify(
        two_snapshots: tuple[Repository, Snapshot, Snapshot, Path], tmp_path: Path) -> None:
    repo, first, second, _ = two_snapshots
    name = max(repo.pack_names(), key=lambda n: pack_path(repo, n).stat().st_size)
    entries = read_index(repo.path / "index" / name)
    cut = pack_path(repo, name).stat().st_size // 2
    os.truncate(pack_path(repo, name), cut)
    lost = {e.id.hex() for e in entries if e.offset + e.record_len > cut}
    assert lost

    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(errors.IntegrityError):
        repo.restore(first.id, out / "vm1.img")
    assert files_in(out) == set()

    report = repo.verify()
    assert {b.id for b in report.bad} == lost
    assert report.bad_total == len(lost)
    proc = run_cli("verify", "--repo", str(repo.path))
    assert proc.returncode == 4, proc.stderr
    assert f"{len(lost)} bad chunk" in proc.stdout


def test_verify_never_calls_a_damaged_chunk_unused_when_damaged_tree_pages_hide_its_users(
        two_snapshots: tuple[Repository, Snapshot, Snapshot, Path]) -> None:
    """Cut the second half off the biggest pack: data chunks and the tree pages listing them are lost.
    Every blob in this repository is used by a snapshot, so "used by no snapshot" would be false."""
    repo = two_snapshots[0]
    with_tree_pages = [n for n in repo.pack_names()
                       if any(e.type != BLOB_DATA for e in read_index(repo.path / "index" / n))]
    assert with_tree_pages, "no pack holds tree pages"
    name = max(with_tree_pages, key=lambda n: pack_path(repo, n).stat().st_size)
    os.truncate(pack_path(repo, name), pack_path(repo, name).stat().st_size // 2)

    report = repo.verify()
    assert not report.ok
    unattributed = [b.id for b in report.bad if not b.snapshots]
    assert not unattributed, (f"{len(unattributed)} of {len(report.bad)} bad chunks reported as used by "
                              "no snapshot, though snapshots use them")
    proc = run_cli("verify", "--repo", str(repo.path))
    assert "used by no snapshot" not in proc.stdout


def test_a_deleted_index_file_makes_check_report_the_missing_chunks_with_their_snapshot(
        tmp_path: Path) -> None:
    repo = Repository.init(tmp_path / "repo")
    image = write_random_image(tmp_path / "vm1.img", 8 * MIB, seed=71)
    first = repo.backup(image, "vm1/vda").snapshot
    first_packs = repo.pack_names()
    # Change one chunk in every 2 MiB (every tree leaf), so the second snapshot's tree is all new
    # and only its data is shared with the first backup's packs.
    rng = random.Random(72)
    overwrite(image, 73, [(off + rng.randrange(0, 64) * DEFAULT_CHUNK_SIZE, DEFAULT_CHUNK_SIZE)
                          for off in range(0, 8 * MIB, 2 * MIB)])
    second = repo.backup(image, "vm1/vda").snapshot
    expected = chunk_ids(image) & {e.id for name in first_packs
                                   for e in read_index(repo.path / "index" / name)}
    assert len(expected) > 200

    for name in first_packs:  # the first backup's index files
        (repo.path / "index" / name).unlink()
    report = repo.check()

    assert not report.ok
    missing = {bytes.fromhex(m.id): m.snapshots for m in report.missing}
    assert {cid for cid, users in missing.items() if second.id in users} == expected
    assert all(missing[cid] == (second.id,) for cid in expected)
    # the rest: the first snapshot's tree root, whose loss makes that snapshot unreadable
    assert all(users == (first.id,) for cid, users in missing.items() if cid not in expected)
    assert report.unreadable_snapshots == (first.id,)
    proc = run_cli("check", "--repo", str(repo.path))
    assert proc.returncode == 4, proc.stderr
    assert f"used by {second.id}" in proc.stdout and f"UNREADABLE snapshot {first.id}" in proc.stdout


@pytest.mark.parametrize("garbage", [b"\x00\xffnot json", b"[1, 2, 3]", b'{"id": "0123456789abcdef"}', b""],
                         ids=["binary", "a list", "fields missing", "empty"])
def test_a_garbage_snapshot_document_is_skipped_by_list_with_a_warning(
        garbage: bytes, two_snapshots: tuple[Repository, Snapshot, Snapshot, Path],
        caplog: pytest.LogCaptureFixture) -> None:
    repo, first, second, _ = two_snapshots
    (repo.path / "snapshots" / "0123456789abcdef").write_bytes(garbage)

    with caplog.at_level(logging.WARNING, logger="host_agent.storage.repository"):
        assert [s.id for s in repo.snapshots()] == [first.id, second.id]
    assert "0123456789abcdef" in caplog.text

    proc = run_cli("list", "--repo", str(repo.path))
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "WARNING" in proc.stderr and "0123456789abcdef" in proc.stderr
    assert first.id in proc.stdout and second.id in proc.stdout
    assert "0123456789abcdef" not in proc.stdout
    listed = json.loads(run_cli("list", "--repo", str(repo.path), "--json").stdout)
    assert [s["id"] for s in listed] == [first.id, second.id]


def test_a_repository_of_a_newer_format_is_refused_with_a_message_to_upgrade(tmp_path: Path) -> None:
    repo = Repository.init(tmp_path / "repo")
    config = json.loads((repo.path / "config").read_text())
    config["version"] = 99
    (repo.path / "config").write_text(json.dumps(config))

    with pytest.raises(errors.UnsupportedFormat) as exc:
        Repository.open(repo.path)
    assert "99" in str(exc.value) and "upgrade" in str(exc.value)
    line = assert_one_line_error(run_cli("list", "--repo", str(repo.path)), 2)
    assert "upgrade" in line
