"""Incrementals without a change list skip an image file whose identity matches the base's record
(host_agent/storage/sourcefile.py; docs/repository-format.md, 5.1 ``source_file``), and read it
whenever the record cannot vouch for it. Bytes read are shown twice: the snapshot's stats, and the
process's own read counter (/proc/self/io ``rchar``), which the copier's threads add to."""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import MIB, sha256_file, wait_until_settled, write_image
from system_helpers import attach_loop, detach_loop

from host_agent.media import server as media
from host_agent.media.client import RemoteRepository
from host_agent.model import ChangeDetection, Policy
from host_agent.storage.repository import Repository
from host_agent.storage.snapshot import Snapshot
from host_agent.storage.sourcefile import RACY_MARGIN_NS, SourceFile, unchanged_since

SIZE = 8 * MIB
IMAGES = ("unchanged", "rewritten", "replaced", "legacy", "remote", "device")


def rchar() -> int:
    """Bytes this process has read through read(2)-like calls so far, all threads."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar in /proc/self/io")


@pytest.fixture(scope="module")
def settled(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One image per test, written once and then left alone past the racy margin (one wait for all)."""
    folder = tmp_path_factory.mktemp("settled")
    images = {name: write_image(folder / f"{name}.img", SIZE, seed=i + 1) for i, name in enumerate(IMAGES)}
    wait_until_settled(list(images.values()))
    return images


def test_an_unchanged_file_is_not_read_and_its_snapshot_keeps_the_base_tree(
        settled: dict[str, Path], tmp_path: Path) -> None:
    repo = Repository.init(tmp_path / "repo")
    image = settled["unchanged"]
    base = repo.backup(image, "vm1/vda").snapshot
    assert base.stats.bytes_read > 0 and base.source_file is not None
    before = rchar()
    result = repo.backup(image, "vm1/vda", Policy.INCREMENTAL)
    read_by_process = rchar() - before
    snap = result.snapshot
    assert snap.stats.bytes_read == 0 and snap.stats.bytes_new == 0
    assert read_by_process < SIZE // 8, read_by_process  # the repository's own files only
    assert snap.tree == base.tree
    assert snap.change_detection is ChangeDetection.CHANGE_LIST
    assert snap.source_file is not None and snap.source_file.unchanged_since == base.id
    assert any(f"unchanged since snapshot {base.id}" in n for n in result.notes)
    # the record is in the committed document, and a reader gets it back
    doc = json.loads((repo.path / "snapshots" / snap.id).read_text())
    assert doc["source_file"]["unchanged_since"] == base.id and doc["stats"]["bytes_read"] == 0
    assert Snapshot.from_json(doc) == snap
    repo.restore(snap.id, tmp_path / "out.img")
    assert sha256_file(tmp_path / "out.img") == sha256_file(image)


def test_a_write_that_keeps_size_and_mtime_changes_ctime_and_is_read(
        settled: dict[str, Path], tmp_path: Path) -> None:
    repo = Repository.init(tmp_path / "repo")
    image = settled["rewritten"]
    repo.backup(image, "vm1/vda")
    st = image.stat()
    with open(image, "r+b") as f:
        f.seek(MIB)
        f.write(os.urandom(64 * 1024))
    os.utime(image, ns=(st.st_atime_ns, st.st_mtime_ns))
    after = image.stat()
    assert (after.st_size, after.st_mtime_ns, after.st_ino) == (st.st_size, st.st_mtime_ns, st.st_ino)
    snap = repo.backup(image, "vm1/vda", Policy.INCREMENTAL).snapshot
    assert snap.stats.bytes_read > SIZE // 2 and snap.stats.bytes_changed > 0
    assert snap.change_detection is ChangeDetection.COMPARISON
    assert snap.source_file is not None and snap.source_file.unchanged_since is None
    repo.restore(snap.id, tmp_path / "out.img")
    assert sha256_file(tmp_path / "out.img") == sha256_file(image)


def test_a_copy_put_in_the_files_place_is_read(settled: dict[str, Path], tmp_path: Path) -> None:
    repo = Repository.init(tmp_path / "repo")
    image = settled["replaced"]
    assert repo.backup(image, "vm1/vda").snapshot.source_file is not None
    copy = image.with_name("copy.img")
    shutil.copy2(image, copy)  # same bytes, size and mtime; another inode
    copy.replace(image)
    snap = repo.backup(image, "vm1/vda", Policy.INCREMENTAL).snapshot
    assert snap.stats.bytes_read > SIZE // 2
    assert snap.source_file is not None and snap.source_file.unchanged_since is None


def test_a_file_changed_just_before_the_base_is_read_racy_rule(tmp_path: Path) -> None:
    """Written right before the base's record was taken: a write in the same timestamp tick after
    the record could have left every stamp equal, so the record vouches for nothing."""
    repo = Repository.init(tmp_path / "repo")
    image = write_image(tmp_path / "fresh.img", SIZE, seed=9)
    base = repo.backup(image, "vm1/vda").snapshot
    assert base.source_file is not None
    assert base.source_file.ctime_ns >= base.source_file.seen_ns - RACY_MARGIN_NS  # the premise
    snap = repo.backup(image, "vm1/vda", Policy.INCREMENTAL).snapshot
    assert snap.stats.bytes_read > SIZE // 2
    assert snap.source_file is not None and snap.source_file.unchanged_since is None


RECORD = SourceFile(dev=2049, ino=77, size=SIZE, mtime_ns=10**18, ctime_ns=10**18,
                    seen_ns=10**18 + 3 * RACY_MARGIN_NS)


@dataclasses.dataclass(frozen=True)
class _Base:
    id: str
    size: int
    source_file: SourceFile | None


@pytest.mark.parametrize("field", ["dev", "ino", "size", "mtime_ns", "ctime_ns"])
def test_any_difference_in_the_identity_means_read(field: str) -> None:
    base = _Base("0123456789abcdef", SIZE, RECORD)
    now = dataclasses.replace(RECORD, seen_ns=RECORD.seen_ns + 10**9)
    assert unchanged_since(base, now) is not None
    assert unchanged_since(base, dataclasses.replace(now, **{field: getattr(now, field) + 1})) is None


def test_records_missing_or_racy_mean_read() -> None:
    now = dataclasses.replace(RECORD, seen_ns=RECORD.seen_ns + 10**9)
    assert unchanged_since(_Base("0123456789abcdef", SIZE, None), now) is None  # an older snapshot
    assert unchanged_since(None, now) is None
    racy = dataclasses.replace(RECORD, seen_ns=RECORD.ctime_ns + RACY_MARGIN_NS)
    assert unchanged_since(_Base("0123456789abcdef", SIZE, racy), now) is None


def test_a_document_without_the_record_still_reads(settled: dict[str, Path], tmp_path: Path) -> None:
    """Snapshots written before ``source_file`` existed: parsed without it, and the next backup reads."""
    repo = Repository.init(tmp_path / "repo")
    image = settled["legacy"]
    base = repo.backup(image, "vm1/vda").snapshot
    path = repo.path / "snapshots" / base.id
    doc = json.loads(path.read_text())
    del doc["source_file"]
    path.write_text(json.dumps(doc))
    assert repo.resolve(base.id).source_file is None
    snap = repo.backup(image, "vm1/vda", Policy.INCREMENTAL).snapshot
    assert snap.stats.bytes_read > SIZE // 2


def test_through_the_media_service_an_unchanged_file_is_neither_read_nor_sent(
        settled: dict[str, Path], tmp_path: Path) -> None:
    repo = Repository.init(tmp_path / "repo")
    spool = tmp_path / "spool"
    spool.mkdir()
    server = media.start({"main": repo.path}, "127.0.0.1:0", "hostb", lease=10.0)
    try:
        with RemoteRepository(server.address, "main", timeout=10, spool_dir=spool) as remote:
            base = remote.backup(settled["remote"], "vm1/vda").snapshot
            sent = remote.bytes_sent
            snap = remote.backup(settled["remote"], "vm1/vda", Policy.INCREMENTAL).snapshot
            assert remote.bytes_sent - sent < 64 * 1024  # the session's messages, no data
    finally:
        server.stop(grace=0)
    assert snap.stats.bytes_read == 0 and snap.tree == base.tree
    stored = repo.resolve(snap.id)
    assert stored.source_file is not None and stored.source_file.unchanged_since == base.id
    repo.restore(snap.id, tmp_path / "out.img")
    assert sha256_file(tmp_path / "out.img") == sha256_file(settled["remote"])


@pytest.fixture
def loop_device(settled: dict[str, Path]) -> Iterator[str]:
    device = attach_loop(settled["device"])
    yield device
    detach_loop(device)


@pytest.mark.root
def test_a_block_device_is_always_read(loop_device: str, tmp_path: Path) -> None:
    repo = Repository.init(tmp_path / "repo")
    base = repo.backup(loop_device, "vm1/vda").snapshot
    assert base.source_file is None
    snap = repo.backup(loop_device, "vm1/vda", Policy.INCREMENTAL).snapshot
    assert snap.stats.bytes_read > SIZE // 2
    assert snap.source_file is None and "source_file" not in snap.to_json()

