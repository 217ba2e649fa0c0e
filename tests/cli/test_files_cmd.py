"""hyperback files, as a user runs it: a snapshot's guest files listed, printed and extracted through
the isolated reader, without restoring the disk; a damaged guest file system is one clear line and
touches nothing on the host. Every call boots libguestfs's appliance (20–30 s under TCG)."""
from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from cli_helpers import HYPERBACK, assert_one_line_error, run, run_json
from guestfs_images import MIB, MTIME_NS, HostTree, guest_tree, mke2fs, snapshot_of_tree

from host_agent.storage.filesnap import spool
from host_agent.storage.repository import Repository

pytestmark = pytest.mark.slow


def files(repo: Path, *args: object, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([*HYPERBACK, "files", "--repo", str(repo), "--tcg", *map(str, args)],
                          capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"hyperback files {args} exited {proc.returncode}: {proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def backed_up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path]]:
    """A bare ext4 disk (no partition table) of a guest tree, backed up: (tree, repository)."""
    base = tmp_path_factory.mktemp("files-cmd")
    tree = guest_tree(base / "tree")
    image = base / "vdb.img"
    with open(image, "wb") as f:
        f.truncate(48 * MIB)
    mke2fs(image, tree, 0, 48 * MIB, "-L", "data")
    Repository.init(base / "repo").backup(str(image), "vm1/vdb")
    yield tree, base / "repo"


def test_ls_lists_the_file_systems_then_a_directory(backed_up: tuple[Path, Path]) -> None:
    _, repo = backed_up
    fss = json.loads(files(repo, "vm1/vdb@latest", "ls", "--json").stdout)
    assert fss == [{"device": "/dev/sda", "type": "ext4", "label": "data", "size": 48 * MIB}]
    lines = files(repo, "vm1/vdb@latest", "ls", "/data").stdout.splitlines()
    assert len(lines) == 6
    assert re.fullmatch(r"-rwsr-xr-x\s+\d+\s+2023-11-14 22:13:20\s+tool", lines[-1]), lines
    assert any(line.endswith("escape -> ../../../../../../../../tmp/hyperback-escaped") for line in lines)


def test_cat_prints_a_file_and_get_extracts_a_directory(backed_up: tuple[Path, Path], tmp_path: Path) -> None:
    tree, repo = backed_up
    assert files(repo, "vm1/vdb@latest", "cat", "/etc/app/app.conf").stdout == "port = 8080\n"
    out = files(repo, "vm1/vdb@latest", "get", "/etc/app", "/data/blob.bin", "--to", tmp_path / "got").stdout
    assert "extracted 5 files" in out and "2 directories" in out
    source = snapshot_of_tree(tree)
    want = {k.removeprefix("etc/"): v for k, v in source.items() if k.startswith("etc/app")}
    assert snapshot_of_tree(tmp_path / "got") == {**want, "blob.bin": source["data/blob.bin"]}
    assert os.stat(tmp_path / "got" / "blob.bin").st_mtime_ns == MTIME_NS


def test_mistakes_are_one_line(backed_up: tuple[Path, Path], tmp_path: Path) -> None:
    _, repo = backed_up
    assert_one_line_error(files(repo, "vm1/vdb@latest", "cat", "/etc/app", check=False), 2,
                          "not a regular file")
    assert_one_line_error(files(repo, "nope@latest", "ls", check=False), 2, "no snapshot")
    assert_one_line_error(files(tmp_path, "vm1/vdb@latest", "ls", check=False), 2)


def damage(image: Path, offset: int, length: int) -> None:
    with open(image, "r+b") as f:
        f.seek(offset)
        f.write(os.urandom(length))


def inode_table_offset(image: Path) -> int:
    """Where group 0's inode table starts, in bytes (dumpe2fs reads the image as a file)."""
    out = subprocess.run(["dumpe2fs", str(image)], capture_output=True, text=True, check=True).stdout
    block_size = int(re.search(r"Block size:\s+(\d+)", out).group(1))  # type: ignore[union-attr]
    first = int(re.search(r"Inode table at (\d+)-", out).group(1))  # type: ignore[union-attr]
    return first * block_size


@pytest.mark.parametrize("where", ["superblock", "inode table"])
def test_a_damaged_file_system_is_one_clear_line_and_mounts_nothing_on_the_host(
        tmp_path: Path, where: str) -> None:
    tree = guest_tree(tmp_path / "tree")
    image = tmp_path / "bad.img"
    with open(image, "wb") as f:
        f.truncate(32 * MIB)
    mke2fs(image, tree, 0, 32 * MIB)
    if where == "superblock":
        damage(image, 1024, 1024)
    else:
        damage(image, inode_table_offset(image), 64 * 1024)
    Repository.init(tmp_path / "repo").backup(str(image), "vm1/vdb")
    before = mounts_and_loops()
    proc = files(tmp_path / "repo", "vm1/vdb@latest", "ls", "/etc", check=False)
    assert_one_line_error(proc, 4, "damaged")
    # nothing of ours was mounted or attached on the host (other tests on the machine may mount
    # their own things meanwhile: only new nbd/loop mounts and loop devices count)
    assert mounts_and_loops() <= before


def mounts_and_loops() -> set[str]:
    """The host's mounts of network or loop block devices, and its loop devices."""
    mounts = {line for line in Path("/proc/mounts").read_text().splitlines()
              if line.startswith(("/dev/nbd", "/dev/loop"))}
    loops = subprocess.run(["losetup", "--list", "--noheadings", "--output", "NAME,BACK-FILE"],
                           capture_output=True, text=True, check=True).stdout.splitlines()
    return mounts | set(loops)


def test_a_file_level_snapshot_is_browsed_from_its_catalog_without_an_appliance(tmp_path: Path) -> None:
    """No export, no appliance: the files left the guest's file system when they were backed up."""
    tree = guest_tree(tmp_path / "tree")
    repo = Repository.init(tmp_path / "repo")
    with open(tmp_path / "spool", "wb") as f:
        ref, skipped = spool(HostTree(tree), ("/etc/app", "/data"), f.fileno(), repo.config.chunk_size,
                             partition=1)
    assert skipped == [("/data/pipe", "not a file, directory or symlink")]
    snap = repo.backup(str(tmp_path / "spool"), "vm1/vda1-files", files=ref).snapshot
    assert Repository.open(tmp_path / "repo").resolve(snap.id).files == ref  # the document keeps it
    r = str(tmp_path / "repo")
    assert run("files", "--repo", r, snap.id, "ls").stdout == \
        "file-level snapshot of /etc/app, /data on partition 1\n"
    listing = {e["name"]: e for e in run_json("files", "--repo", r, snap.id, "ls", "/data")}
    assert sorted(listing) == ["abs", "blob.bin", "escape", "latest", "tool"]
    assert run("files", "--repo", r, snap.id, "ls", "/").stdout.split()[-1] == "etc"  # above the paths
    assert run("files", "--repo", r, snap.id, "cat", "/etc/app/app.conf").stdout == "port = 8080\n"
    run("files", "--repo", r, snap.id, "get", "/etc/app", "/data", "--to", tmp_path / "out")
    want = {k.removeprefix("etc/"): v for k, v in snapshot_of_tree(tree).items()
            if k.startswith(("etc/app", "data")) and k != "data/pipe"}
    want["data/tool"] = replace(want["data/tool"], mode=0o100755)  # never setuid from a guest
    assert snapshot_of_tree(tmp_path / "out") == want
    assert_one_line_error(run("files", "--repo", r, snap.id, "cat", "/etc/passwd", check=False), 2,
                          "not in file-level snapshot")
