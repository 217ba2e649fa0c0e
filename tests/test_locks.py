"""Locks whose holder is gone are recognised and cleared by the next run, saying so; a live lock
never is. The holders are real ``hyperback backup`` processes, held by fanotify at the exact step
(checkpoints.py) and killed there with SIGKILL."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from checkpoints import Checkpoints, Moment, opened
from system_helpers import HYPERBACK, MIB, files_in, start_cli, write_random_image

from host_agent.storage.gc import collect_garbage
from host_agent.storage.locks import UNREADABLE_GRACE, Lock, read_locks
from host_agent.storage.repository import Repository


@pytest.fixture
def repo(tmp_path: Path) -> Repository:
    """A repository with one snapshot (so a backup opens index files after taking its lock)."""
    repo = Repository.init(tmp_path / "repo")
    repo.backup(write_random_image(tmp_path / "a.img", 2 * MIB, seed=1), "vm1/vda")
    return repo


def backup_held_at(repo: Repository, image: Path, moment: Moment,
                   checkpoints: Callable[[Path], Checkpoints]) -> tuple[subprocess.Popen[str], Checkpoints]:
    cps = checkpoints(repo.path)
    cps.watch_opens(repo.path / "locks", repo.path / "index")
    proc = start_cli("backup", "--repo", str(repo.path), "--name", "vm1/vda", str(image))
    cps.hold_at(proc, moment)
    return proc, cps


def kill(proc: subprocess.Popen[str], cps: Checkpoints) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)
    cps.release()
    assert proc.returncode == -signal.SIGKILL


def check(repo: Repository) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([str(HYPERBACK), "check", "--repo", str(repo.path)], capture_output=True, text=True,
                          timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    return proc


@pytest.mark.root
def test_a_process_killed_between_creating_and_writing_its_lock_is_cleared_with_a_message(
        repo: Repository, tmp_path: Path, checkpoints: Callable[[Path], Checkpoints]) -> None:
    image = write_random_image(tmp_path / "b.img", 2 * MIB, seed=2)
    # held in the open() that has just created its (empty) creation file, before a byte is written
    proc, cps = backup_held_at(repo, image, opened("locks/.*"), checkpoints)
    (left,) = files_in(repo.path / "locks")
    assert left.startswith(".") and f".{proc.pid}." in left
    assert (repo.path / "locks" / left).stat().st_size == 0
    kill(proc, cps)
    assert read_locks(repo.path / "locks") == [], "a half-made lock reads as a lock"

    said = check(repo).stderr
    assert f"removed unfinished lock {left}" in said and f"pid {proc.pid} on" in said, said
    assert files_in(repo.path / "locks") == set()


@pytest.mark.root
def test_a_whole_lock_of_a_killed_process_is_cleared_but_a_live_one_never(
        repo: Repository, tmp_path: Path, checkpoints: Callable[[Path], Checkpoints]) -> None:
    image = write_random_image(tmp_path / "b.img", 2 * MIB, seed=2)
    # held after its lock is published, loading the first index
    proc, cps = backup_held_at(repo, image, opened("index/*"), checkpoints)
    (lock,) = read_locks(repo.path / "locks")
    assert lock.pid == proc.pid and lock.kind == "backup"

    # alive (held), its lock is left alone by another run, which says nothing about it
    said = check(repo).stderr
    assert "removed" not in said, said
    assert [lk.name for lk in read_locks(repo.path / "locks")] == [lock.name]

    kill(proc, cps)
    said = check(repo).stderr
    assert f"removed stale lock {lock.name} of a backup: pid {proc.pid} on" in said, said
    assert files_in(repo.path / "locks") == set()


def test_an_unreadable_lock_counts_as_live_only_for_its_grace(repo: Repository,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    # as a hyperback from before creation files left it: created, then killed before writing it
    legacy = repo.path / "locks" / os.urandom(16).hex()
    legacy.touch()
    with Lock(repo.path / "locks", "check", 0).acquire():
        assert legacy.exists(), "an empty lock younger than its grace may be one being written now"
    assert not [r for r in caplog.records if "removed" in r.getMessage()]
    (info,) = read_locks(repo.path / "locks")
    assert not info.readable and info.saw_gen == -1 and not info.is_stale()

    # the same file, written UNREADABLE_GRACE + 60 s ago
    old = time.time() - UNREADABLE_GRACE - 60
    os.utime(legacy, (old, old))
    assert collect_garbage(repo).packs_waiting == 0
    assert not legacy.exists()
    assert any(f"removed stale lock {legacy.name}" in r.getMessage() and "cannot be read" in r.getMessage()
               for r in caplog.records), caplog.records


def test_a_lock_of_another_host_is_live_until_its_heartbeat_is_older_than_the_lifetime(
        repo: Repository, caplog: pytest.LogCaptureFixture) -> None:
    other = repo.path / "locks" / os.urandom(16).hex()
    other.write_text(json.dumps({"kind": "backup", "host": "elsewhere", "pid": 1, "start": "1",
                                 "saw_gen": 0, "time": time.time()}))
    with Lock(repo.path / "locks", "check", 0).acquire():
        assert other.exists()
    old = time.time() - 31 * 60
    os.utime(other, (old, old))
    with Lock(repo.path / "locks", "check", 0).acquire():
        assert not other.exists()
    assert any("no heartbeat from elsewhere for 31 minutes" in r.getMessage() for r in caplog.records)


def test_the_gc_lock_excludes_and_a_dead_collectors_is_taken_over(repo: Repository) -> None:
    from host_agent import errors
    from host_agent.storage.locks import GC_LOCK

    with Lock(repo.path / "locks", "gc", 0, GC_LOCK).acquire(exclusive=True):
        with pytest.raises(errors.RepositoryBusy, match="wait for it to finish"):
            Lock(repo.path / "locks", "gc", 0, GC_LOCK).acquire(exclusive=True)
        assert files_in(repo.path / "locks") == {GC_LOCK}, "a creation file was left behind"
    # a collector's lock whose pid is above the kernel's largest (pid_max is at most 2**22)
    (repo.path / "locks" / GC_LOCK).write_text(json.dumps(
        {"kind": "gc", "host": os.uname().nodename, "pid": 2 ** 22 + 1, "start": "1", "saw_gen": 0,
         "time": time.time()}))
    collect_garbage(repo)
    assert files_in(repo.path / "locks") == set()


@pytest.mark.root
def test_on_a_file_system_without_hard_links_the_gc_lock_still_excludes(tmp_path: Path) -> None:
    from system_helpers import attach_loop, detach_loop, unmount

    from host_agent import errors
    from host_agent.storage.locks import GC_LOCK

    backing = tmp_path / "exfat.img"  # a USB stick as it comes: exFAT (through FUSE), no hard links
    with open(backing, "wb") as f:
        f.truncate(64 * MIB)
    subprocess.run(["mkfs.exfat", str(backing)], check=True, capture_output=True)
    media = tmp_path / "usb"
    media.mkdir()
    device = attach_loop(backing)  # exfat-fuse mounts block devices only
    subprocess.run(["mount.exfat-fuse", device, str(media)], check=True, capture_output=True)
    try:
        (media / "a").touch()
        with pytest.raises(OSError):  # what the gc lock is otherwise claimed with
            os.link(media / "a", media / "b")
        repo = Repository.init(media / "repo")
        repo.backup(write_random_image(tmp_path / "a.img", 2 * MIB, seed=1), "vm1/vda")
        with Lock(repo.path / "locks", "gc", 0, GC_LOCK).acquire(exclusive=True):
            (info,) = read_locks(repo.path / "locks")
            assert info.readable and info.pid == os.getpid()
            with pytest.raises(errors.RepositoryBusy):
                Lock(repo.path / "locks", "gc", 0, GC_LOCK).acquire(exclusive=True)
        repo.forget([s.id for s in repo.snapshots()])
        assert collect_garbage(repo).packs_deleted == 1
        assert files_in(repo.path / "locks") == set()
    finally:
        unmount(media)
        detach_loop(device)


def test_a_collector_that_judged_the_gc_lock_stale_late_leaves_its_successors_lock_alone(
        repo: Repository) -> None:
    """Two collectors judge one dead collector's lock stale; the first takes it over; the second,
    acting on its old judgment, must not remove the first's live lock."""
    from host_agent import errors
    from host_agent.storage.locks import GC_LOCK

    locks = repo.path / "locks"
    (locks / GC_LOCK).write_text(json.dumps(
        {"kind": "gc", "host": os.uname().nodename, "pid": 2 ** 22 + 1, "start": "1", "saw_gen": 0,
         "time": time.time()}))
    (judged,) = read_locks(locks)
    assert judged.is_stale()
    with Lock(locks, "gc", 0, GC_LOCK).acquire(exclusive=True):
        successor = (locks / GC_LOCK).read_bytes()
        late = Lock(locks, "gc", 0, GC_LOCK)
        with pytest.raises(errors.RepositoryBusy, match="took over"):
            late.remove_stale(judged, "its pid is gone")
        assert (locks / GC_LOCK).read_bytes() == successor
        assert files_in(locks) == {GC_LOCK}
    assert files_in(locks) == set()


@pytest.mark.root
def test_a_backup_whose_lock_another_process_removed_commits_nothing_and_says_why(
        repo: Repository, tmp_path: Path, checkpoints: Callable[[Path], Checkpoints]) -> None:
    image = write_random_image(tmp_path / "b.img", 2 * MIB, seed=2)
    before = {s.id for s in repo.snapshots()}
    # held while it writes its first index, before it commits: its lock is removed, as another
    # host does with a lock that has had no heartbeat for STALE_AFTER
    cps = checkpoints(repo.path)
    cps.watch_opens(repo.path / "tmp")
    proc = start_cli("backup", "--repo", str(repo.path), "--name", "vm1/vda", str(image))
    cps.hold_at(proc, opened("tmp/*.idx"))
    (lock,) = read_locks(repo.path / "locks")
    (repo.path / "locks" / lock.name).unlink()
    cps.release()
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 3, stderr
    assert "was removed while this backup ran" in stderr and "nothing was committed" in stderr, stderr
    assert "Traceback" not in stderr
    assert {s.id for s in repo.snapshots()} == before
