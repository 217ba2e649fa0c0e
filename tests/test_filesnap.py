"""The image of a file-level snapshot: a pax archive GNU tar extracts bit-identically with modes and
nanosecond mtimes, whose large files start on chunk boundaries, so that a change early in the
archive leaves the later files' chunks as they were (deduplicated)."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

from guestfs_images import HostTree, guest_tree, snapshot_of_tree

from host_agent.storage.filesnap import ALIGN_MIN, ArchiveWriter, read_catalog
from host_agent.storage.repository import Repository

CHUNK = 32768


def archive(tree: Path, out: Path, *paths: str) -> ArchiveWriter:
    with open(out, "wb") as f:
        writer = ArchiveWriter(HostTree(tree), f.fileno(), CHUNK)
        for path in paths:
            writer.add(path)
        (out.with_suffix(".catalog")).write_bytes(writer.close())
    return writer


def test_gnu_tar_extracts_the_archive_bit_identical_with_modes_and_times(tmp_path: Path) -> None:
    tree = guest_tree(tmp_path / "tree")
    os.utime(tree / "etc" / "app" / "app.conf", ns=(1_700_000_000_987_654_321, 1_700_000_000_123_456_789))
    writer = archive(tree, tmp_path / "a.tar", "/etc", "/data")
    assert writer.skipped == [("/data/pipe", "not a file, directory or symlink")]
    (tmp_path / "out").mkdir()
    subprocess.run(["tar", "-xpf", str(tmp_path / "a.tar"), "-C", str(tmp_path / "out")], check=True)
    want = {k: v for k, v in snapshot_of_tree(tree).items() if k != "data/pipe"}
    assert snapshot_of_tree(tmp_path / "out") == want
    assert (tmp_path / "out" / "etc/app/app.conf").stat().st_mtime_ns == 1_700_000_000_123_456_789


def test_large_files_start_on_chunk_boundaries_and_the_catalog_says_where(tmp_path: Path) -> None:
    tree = guest_tree(tmp_path / "tree")
    for n in range(5):  # sizes that put the next header at every kind of offset
        (tree / "etc" / f"f{n}").write_bytes(os.urandom(ALIGN_MIN + 777 * n))
    writer = archive(tree, tmp_path / "a.tar", "/")
    data = (tmp_path / "a.tar").read_bytes()
    files = [e for e in read_catalog((tmp_path / "a.catalog").read_bytes()) if e.type == "file"]
    assert len(files) == 11 and writer.catalog[0].path == "data"
    for e in files:
        assert data[e.offset:e.offset + e.size] == (tree / e.path).read_bytes()
        assert e.size < ALIGN_MIN or e.offset % CHUNK == 0, e


def test_a_change_early_in_the_archive_leaves_later_files_deduplicated(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "a.txt").write_text("small\n")
    for name in ("big1.bin", "big2.bin"):
        (tree / name).write_bytes(os.urandom(1 << 20))
    repo = Repository.init(tmp_path / "repo", chunk_size=CHUNK)
    archive(tree, tmp_path / "1.tar", "/")
    repo.backup(str(tmp_path / "1.tar"), "vm1/files")
    (tree / "a.txt").write_text("small, and now 700 bytes longer\n" + "x" * 700)
    archive(tree, tmp_path / "2.tar", "/")
    second = repo.backup(str(tmp_path / "2.tar"), "vm1/files")
    assert second.snapshot.stats.bytes_new <= 2 * CHUNK  # the headers' chunk(s), not 2 MiB of shifted data

