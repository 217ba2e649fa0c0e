"""A full disk: backups that run out of space fail cleanly and harm nothing; restores likewise.

The repository (or the restore target) lives on a small tmpfs, so "full"
is real ENOSPC from the kernel.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
from system_helpers import (
    MIB,
    assert_one_line_error,
    files_in,
    free_bytes,
    index_files,
    mount_tmpfs,
    pack_files,
    run_cli,
    sha256_file,
    snapshot_ids,
    unmount,
    write_random_image,
)

from host_agent import errors
from host_agent.storage.gc import collect_garbage
from host_agent.storage.repository import Repository

pytestmark = pytest.mark.root


@pytest.fixture
def media(tmp_path: Path, request: pytest.FixtureRequest) -> Path:
    """A 24 MiB tmpfs: the backup media."""
    path = tmp_path / "media"
    mount_tmpfs(path, 24)
    request.addfinalizer(lambda: unmount(path))
    return path


def fill(directory: Path) -> Path:
    """Take every free byte of a file system with one file."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while True:
            os.write(fd, bytes(64 * 1024))
    except OSError as e:
        assert e.errno == 28, e
    finally:
        os.close(fd)
    return filler


def test_backup_that_fills_the_media_fails_with_repository_full_and_harms_nothing(
        media: Path, tmp_path: Path) -> None:
    repo = Repository.init(media / "repo")
    small = write_random_image(tmp_path / "small.img", 4 * MIB, seed=1)
    big = write_random_image(tmp_path / "big.img", 40 * MIB, seed=2, hole_every=4)
    first = repo.backup(small, "vm1/vda").snapshot
    free_before = free_bytes(media)

    with pytest.raises(errors.RepositoryFull) as exc:
        repo.backup(big, "vm2/vda")
    assert "full" in str(exc.value)
    proc = run_cli("backup", "--repo", str(repo.path), "--name", "vm2/vda", str(big))
    line = assert_one_line_error(proc, 3)
    assert "full" in line

    assert snapshot_ids(repo.path) == {first.id}
    assert files_in(repo.path / "locks") == set(), "a failed backup left its lock"
    report = repo.check()
    assert report.ok, report
    repo.restore(first.id, tmp_path / "restored.img")
    assert sha256_file(tmp_path / "restored.img") == sha256_file(small)

    collect_garbage(repo)
    assert files_in(repo.path / "tmp") == set()
    assert pack_files(repo.path) == index_files(repo.path)
    assert free_bytes(media) >= free_before - 64 * 1024, "the failed backups' space did not come back"

    smaller = write_random_image(tmp_path / "smaller.img", 8 * MIB, seed=3, hole_every=3)
    second = repo.backup(smaller, "vm3/vda").snapshot
    repo.restore(second.id, tmp_path / "restored-2.img")
    assert sha256_file(tmp_path / "restored-2.img") == sha256_file(smaller)
    assert repo.check().ok


def test_backup_to_media_without_a_free_byte_fails_with_exit_3_and_leaves_no_lock(
        media: Path, tmp_path: Path) -> None:
    """Even the lock file cannot be written: still one line, and no empty lock that would read as
    a live process forever (and so block every garbage collection)."""
    repo = Repository.init(media / "repo")
    image = write_random_image(tmp_path / "small.img", 2 * MIB, seed=4)
    filler = fill(media)

    with pytest.raises(errors.RepositoryFull):
        repo.backup(image, "vm1/vda")
    assert_one_line_error(run_cli("backup", "--repo", str(repo.path), "--name", "vm1/vda", str(image)), 3)
    assert files_in(repo.path / "locks") == set()
    assert snapshot_ids(repo.path) == set()

    filler.unlink()
    snap = repo.backup(image, "vm1/vda").snapshot
    repo.restore(snap.id, tmp_path / "restored.img")
    assert sha256_file(tmp_path / "restored.img") == sha256_file(image)


def test_restore_to_a_full_target_fails_with_target_error_and_leaves_no_partial_file(
        tmp_path: Path, request: pytest.FixtureRequest) -> None:
    repo = Repository.init(tmp_path / "repo")
    image = write_random_image(tmp_path / "image.img", 16 * MIB, seed=5, hole_every=5)
    snap = repo.backup(image, "vm1/vda").snapshot
    target_fs = tmp_path / "target"
    mount_tmpfs(target_fs, 4)
    request.addfinalizer(lambda: unmount(target_fs))
    target = target_fs / "vm1.img"

    with pytest.raises(errors.TargetError) as exc:
        repo.restore(snap.id, target)
    assert "No space left" in str(exc.value)
    assert not target.exists()
    assert files_in(target_fs) == set(), "the partial restore was left behind"

    line = assert_one_line_error(run_cli("restore", "--repo", str(repo.path), snap.id, str(target)), 3)
    assert "No space left" in line
    assert files_in(target_fs) == set()
    assert free_bytes(target_fs) == 4 * MIB
