"""Path-level backups on the host: chosen paths of a partition of a qcow2 image (as a point-in-time
view gives it) read in the appliance and stored as a file-level snapshot that comes back
bit-identical with modes and times; a guest's bad or missing paths store nothing."""
from __future__ import annotations

import subprocess
from dataclasses import replace
from pathlib import Path

import pytest
from guestfs_images import READER, guest_tree, partitioned_disk, snapshot_of_tree

from host_agent import errors
from host_agent.agent.paths import back_up_paths, checked_paths
from host_agent.guestfiles.extract import extract
from host_agent.storage.filesnap import FileSnapshot
from host_agent.storage.imagereader import ImageReader, LocalChunks
from host_agent.storage.repository import Repository

pytestmark = pytest.mark.slow


def qcow2_disk(tmp_path: Path) -> tuple[Path, Path]:
    tree = guest_tree(tmp_path / "tree")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "unrelated.txt").write_text("not asked for\n")
    raw = partitioned_disk(tmp_path / "disk.img", tmp_path / "other", tree)  # the tree on partition 2
    image = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(image)], check=True)
    raw.unlink()
    return tree, image


def test_only_the_paths_asked_for_are_stored_and_come_back_bit_identical(tmp_path: Path) -> None:
    tree, image = qcow2_disk(tmp_path)
    repo = Repository.init(tmp_path / "repo")
    result, skipped = back_up_paths(repo, image, "qcow2", 2, ["/etc/app", "/data/"], "vm1/vda2-paths",
                                    tmp_path, READER)
    assert skipped == [("/data/pipe", "not a file, directory or symlink")]
    snap = Repository.open(tmp_path / "repo").resolve(result.snapshot.id)
    assert snap.files is not None and snap.files.paths == ("/etc/app", "/data") and snap.files.partition == 2
    assert snap.size < 4 * 1024 * 1024  # the archive of those files, not the 80 MiB disk
    image_reader = ImageReader(LocalChunks(tmp_path / "repo", snap.id), 16 << 20)
    try:
        stored = FileSnapshot(snap, image_reader)
        extract(stored, "/etc/app", tmp_path / "out")
        extract(stored, "/data", tmp_path / "out")
    finally:
        image_reader.close()
    source = snapshot_of_tree(tree)
    want = {k.removeprefix("etc/"): v for k, v in source.items()
            if k.startswith(("etc/app", "data")) and k != "data/pipe"}
    want["data/tool"] = replace(want["data/tool"], mode=0o100755)  # never setuid from a guest
    assert snapshot_of_tree(tmp_path / "out") == want
    assert list(tmp_path.glob("paths-*.spool")) == []


def test_a_missing_path_stores_nothing(tmp_path: Path) -> None:
    _, image = qcow2_disk(tmp_path)
    repo = Repository.init(tmp_path / "repo")
    with pytest.raises(errors.GuestPathError, match="No such file"):
        back_up_paths(repo, image, "qcow2", 2, ["/etc/app", "/usr/lib"], "vm1/vda2-paths", tmp_path, READER)
    assert repo.snapshots() == []


def test_a_guests_paths_are_refused_unless_plain() -> None:
    assert checked_paths(["/usr/lib/", "//srv//data", "/usr/lib"]) == ("/usr/lib", "/srv/data")
    for bad in (["usr/lib"], ["/usr/../etc"], ["/srv/./x"], ["/a\nb"], ["/" + "a" * 256], [], ["/x"] * 65):
        with pytest.raises(errors.UsageError):
            checked_paths(bad)
