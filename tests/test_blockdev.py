"""Block devices as source and target, on real loop devices."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from system_helpers import (
    MIB,
    assert_one_line_error,
    attach_loop,
    detach_loop,
    fill_file,
    run_cli,
    sha256_file,
    write_random_image,
)

from host_agent import errors
from host_agent.storage.repository import Repository

pytestmark = pytest.mark.root

LoopFactory = Callable[[Path], str]


@pytest.fixture
def loop_device(request: pytest.FixtureRequest) -> LoopFactory:
    """Attach a backing file to a free loop device; detached when the test ends."""
    def attach(backing: Path) -> str:
        device = attach_loop(backing)
        request.addfinalizer(lambda: detach_loop(device))
        return device
    return attach


def read_range(device: str, offset: int, length: int) -> bytes:
    with open(device, "rb") as f:
        f.seek(offset)
        return f.read(length)


@pytest.fixture
def snapshot(tmp_path: Path, loop_device: LoopFactory) -> tuple[Repository, str, Path]:
    """A snapshot taken from a 16 MiB loop device of random data, zero pieces and holes."""
    backing = write_random_image(tmp_path / "source.img", 16 * MIB, seed=21, hole_every=4, zero_every=3)
    source = loop_device(backing)
    repo = Repository.init(tmp_path / "repo")
    snap = repo.backup(source, "vm1/vda").snapshot
    assert snap.size == 16 * MIB
    assert snap.source == source
    return repo, snap.id, backing


def test_backup_from_a_loop_device_restores_bit_identical_to_another_with_zero_chunks_written(
        snapshot: tuple[Repository, str, Path], tmp_path: Path, loop_device: LoopFactory) -> None:
    repo, sid, backing = snapshot
    target_file = tmp_path / "target.img"
    fill_file(target_file, 0xFF, 16 * MIB)
    target = loop_device(target_file)

    repo.restore(sid, target, overwrite=True)

    assert sha256_file(target) == sha256_file(backing)
    # piece 2 (MiB 2-3) was written as zeros and piece 3 (MiB 3-4) left a hole: both read zeros now
    assert read_range(target, 2 * MIB, 2 * MIB) == bytes(2 * MIB)


def test_restoring_to_a_device_smaller_than_the_snapshot_fails_with_target_error(
        snapshot: tuple[Repository, str, Path], tmp_path: Path, loop_device: LoopFactory) -> None:
    repo, sid, _ = snapshot
    target_file = tmp_path / "small-target.img"
    fill_file(target_file, 0xFF, 8 * MIB)
    target = loop_device(target_file)

    with pytest.raises(errors.TargetError) as exc:
        repo.restore(sid, target, overwrite=True)
    assert str(8 * MIB) in str(exc.value) and str(16 * MIB) in str(exc.value)
    assert read_range(target, 0, 8 * MIB) == b"\xff" * (8 * MIB), "the device was written to"


def test_restoring_to_a_device_without_overwrite_refuses(
        snapshot: tuple[Repository, str, Path], tmp_path: Path, loop_device: LoopFactory) -> None:
    repo, sid, _ = snapshot
    target_file = tmp_path / "target.img"
    fill_file(target_file, 0xFF, 16 * MIB)
    target = loop_device(target_file)

    with pytest.raises(errors.TargetError) as exc:
        repo.restore(sid, target)
    assert "overwrite" in str(exc.value)
    line = assert_one_line_error(run_cli("restore", "--repo", str(repo.path), sid, target), 3)
    assert "--overwrite" in line
    assert read_range(target, 0, 16 * MIB) == b"\xff" * (16 * MIB), "the device was written to"
