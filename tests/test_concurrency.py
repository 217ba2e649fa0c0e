"""Several processes on one repository: writers beside writers, and garbage collection beside writers."""
from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from checkpoints import Checkpoints, opened
from system_helpers import (
    MIB,
    files_in,
    index_files,
    overwrite,
    pack_files,
    sha256_file,
    snapshot_ids,
    start_cli,
    write_random_image,
)

from host_agent.storage.gc import collect_garbage
from host_agent.storage.packfile import read_index
from host_agent.storage.repository import Repository
from host_agent.storage.snapshot import BackupResult


def assert_restores(repo: Repository, expected: dict[str, str], target_dir: Path) -> None:
    target_dir.mkdir(exist_ok=True)
    for sid, digest in expected.items():
        target = target_dir / f"{sid}.img"
        repo.restore(sid, target, overwrite=True)
        assert sha256_file(target) == digest, f"snapshot {sid} restored different bytes"
        target.unlink()


def packs_of(repo: Repository, snapshot_id: str) -> set[str]:
    """The packs holding blobs that a snapshot uses."""
    with repo.session("check", writer=False) as native:
        users, _ = repo.referenced(native, [repo.resolve(snapshot_id)])
    return {name for name in repo.pack_names()
            if any(e.id in users for e in read_index(repo.path / "index" / name))}


@pytest.mark.root
def test_two_backup_processes_write_to_one_repository_at_the_same_time(
        tmp_path: Path, checkpoints: Callable[[Path], Checkpoints]) -> None:
    repo = Repository.init(tmp_path / "repo")
    a = write_random_image(tmp_path / "a.img", 96 * MIB, seed=31, hole_every=6)
    b = write_random_image(tmp_path / "b.img", 96 * MIB, seed=32, hole_every=5)
    with open(a, "rb") as f:  # b shares its first 16 MiB with a: both writers store those chunks
        shared = f.read(16 * MIB)
    with open(b, "r+b") as f:
        f.write(shared)

    # Each backup waits at its first pack until the other has reached its own: then both hold
    # their locks and copy at the same time, however fast one of them could have finished alone.
    holds = [checkpoints(repo.path), checkpoints(repo.path)]
    for cps in holds:
        cps.watch_opens(repo.path / "tmp")
    procs = [start_cli("backup", "--repo", str(repo.path), "--name", name, str(image))
             for name, image in (("vm1/vda", a), ("vm2/vda", b))]
    try:
        for cps, proc in zip(holds, procs, strict=True):
            cps.start(proc, opened("tmp/*.pack"))
        for cps in holds:
            cps.wait_held()
        most_locks = len(files_in(repo.path / "locks"))
    finally:
        for cps in holds:
            cps.release()
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    assert most_locks == 2, "the two backups did not overlap"

    snaps = {s.name: s.id for s in repo.snapshots()}
    assert set(snaps) == {"vm1/vda", "vm2/vda"}
    report = repo.check()
    assert report.ok, report
    assert pack_files(repo.path) == index_files(repo.path)
    assert_restores(repo, {snaps["vm1/vda"]: sha256_file(a), snaps["vm2/vda"]: sha256_file(b)},
                    tmp_path / "out")


def test_garbage_a_running_writer_might_use_waits_until_the_writer_ends(tmp_path: Path) -> None:
    repo = Repository.init(tmp_path / "repo")
    old = write_random_image(tmp_path / "old.img", 8 * MIB, seed=41)
    keep = write_random_image(tmp_path / "keep.img", 8 * MIB, seed=42, hole_every=3)
    gone = repo.backup(old, "vm1/vda").snapshot
    kept = repo.backup(keep, "vm2/vda").snapshot
    doomed = packs_of(repo, gone.id) - packs_of(repo, kept.id)
    assert doomed

    with repo.session("backup", writer=True):  # a long-running writer that loaded the index
        repo.forget([gone.id])
        result = collect_garbage(repo)
        assert result.packs_deleted == 0, result
        assert result.packs_waiting > 0, result
        assert doomed <= {p for packs in repo.tombstones().values() for p in packs}
        assert doomed <= pack_files(repo.path) and doomed <= index_files(repo.path)

    result = collect_garbage(repo)
    assert result.packs_deleted >= len(doomed), result
    assert result.packs_waiting == 0
    assert not doomed & (pack_files(repo.path) | index_files(repo.path))
    assert repo.tombstones() == {}
    assert repo.check().ok
    assert_restores(repo, {kept.id: sha256_file(keep)}, tmp_path / "out")


def test_a_snapshot_an_old_writer_commits_against_collected_chunks_survives_the_sweep(tmp_path: Path) -> None:
    """The dangerous interleaving: a writer loads the index; the only snapshot using chunk set X is
    forgotten; gc marks X's packs; the writer commits a snapshot that deduplicated against X; the
    next gc sweeps X's packs, and must first rescue the blobs the new snapshot uses."""
    repo = Repository.init(tmp_path / "repo")
    image = write_random_image(tmp_path / "vm1.img", 16 * MIB, seed=51, hole_every=7)
    first = repo.backup(image, "vm1/vda").snapshot
    x_packs = packs_of(repo, first.id)
    overwrite(image, 52, [(3 * MIB, 64 * 1024), (9 * MIB, 200_000)])  # mostly X, some new chunks
    digest = sha256_file(image)

    # Run a backup and hold it after its copy (dedup decisions made against X, snapshot not yet
    # committed): its progress callback blocks when the copy reports done on the backup's own thread.
    copied, resume = threading.Event(), threading.Event()
    outcome: dict[str, object] = {}

    def progress(done: int, total: int) -> None:
        if threading.current_thread().name == "old-writer" and done == total:
            copied.set()
            assert resume.wait(60)

    def run() -> None:
        try:
            outcome["result"] = repo.backup(image, "vm1/vda", progress=progress)
        except BaseException as e:  # reported by the main thread
            outcome["error"] = e

    writer = threading.Thread(target=run, name="old-writer")
    writer.start()
    try:
        while not copied.wait(0.05):
            assert writer.is_alive(), f"the backup ended without pausing after its copy: {outcome}"
        repo.forget([first.id])
        marked = collect_garbage(repo)
        assert marked.packs_waiting >= len(x_packs), marked
        assert marked.packs_deleted == 0, marked
        assert x_packs <= {p for packs in repo.tombstones().values() for p in packs}
    finally:
        resume.set()
        writer.join(60)
    assert "error" not in outcome, outcome.get("error")
    result = outcome["result"]
    assert isinstance(result, BackupResult)
    snap = result.snapshot
    assert snap.stats.bytes_new < snap.stats.bytes_read / 2, "the old writer did not deduplicate against X"

    swept = collect_garbage(repo)
    assert swept.packs_deleted >= len(x_packs), swept
    assert swept.blobs_copied > 0, swept
    assert not x_packs & pack_files(repo.path), "X's packs were not swept"
    report = repo.check()
    assert report.ok, report
    assert repo.verify().ok
    assert_restores(repo, {snap.id: digest}, tmp_path / "out")


@pytest.mark.slow
def test_backups_and_prunes_in_two_processes_for_ten_seconds_leave_a_sound_repository(tmp_path: Path) -> None:
    repo = Repository.init(tmp_path / "repo")
    work = tmp_path / "work"
    work.mkdir()
    script = str(Path(__file__).with_name("system_helpers.py"))
    backups = subprocess.Popen([sys.executable, script, "backup-loop", str(repo.path), str(work), "10"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(0.5)  # let a few snapshots appear first
    prunes = subprocess.Popen([sys.executable, script, "prune-loop", str(repo.path), "9.5"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    outputs: dict[str, str | None] = {}
    for label, proc in (("backup loop", backups), ("prune loop", prunes)):
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, f"{label} failed: {err}"
        outputs[label] = out
    print(outputs["prune loop"])

    taken = [json.loads(line) for line in (work / "snapshots.jsonl").read_text().splitlines()]
    gc = json.loads(outputs["prune loop"] or "{}")
    assert len(taken) >= 10 and gc["gc_runs"] >= 10, (len(taken), gc)
    assert gc["packs_deleted"] > 0, f"the prunes never deleted a pack while backups ran: {gc}"
    remaining = snapshot_ids(repo.path)
    assert 2 <= len(remaining) < len(taken), "prune removed nothing, or everything"
    report = repo.check()
    assert report.ok, report
    assert repo.verify().ok
    digests = {t["id"]: t["sha256"] for t in taken}
    assert_restores(repo, {sid: digests[sid] for sid in remaining}, tmp_path / "out")

    # With nothing running any more, one last collection leaves no garbage behind.
    collect_garbage(repo)
    assert files_in(repo.path / "tmp") == set()
    assert pack_files(repo.path) == index_files(repo.path)
    assert repo.tombstones() == {}
    assert repo.check().ok
