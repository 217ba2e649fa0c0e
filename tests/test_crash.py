"""Crash safety: a backup killed at any moment harms nothing, and its leftovers are collected.

The repository's write order (packs, then their index, then the snapshot
document) makes the snapshot file the commit record; these tests kill a real
``hyperback backup`` process at several moments of that order and then check
the promises that rest on it.

The moments are steps, not times: fanotify holds the process's thread at the
step (checkpoints.py), so the kill lands there on a fast machine and a loaded
one alike. That needs root.
"""
from __future__ import annotations

import functools
import shutil
import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from checkpoints import Checkpoints, Moment, opened, reads, signal_handled
from system_helpers import (
    MIB,
    assert_one_line_error,
    cli_process,
    files_in,
    index_files,
    overwrite,
    pack_files,
    sha256_file,
    snapshot_ids,
    wait_for,
    write_random_image,
)

from host_agent.storage.gc import collect_garbage
from host_agent.storage.locks import read_locks
from host_agent.storage.repository import Repository

pytestmark = pytest.mark.root

BIG = 256 * MIB
image_digest = functools.cache(sha256_file)
"""SHA-256 of an image these tests never change."""


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A 256 MiB sparse image of random data, an older 32 MiB version of it, and an unrelated one."""
    d = tmp_path_factory.mktemp("images")
    big = write_random_image(d / "big.img", BIG, seed=11, hole_every=8)
    old = d / "old-big.img"
    with open(big, "rb") as src, open(old, "wb") as dst:
        dst.write(src.read(32 * MIB))
    overwrite(old, 12, [(5 * MIB, 64 * 1024), (20 * MIB + 4096, 100_000)])
    other = write_random_image(d / "other.img", 8 * MIB, seed=13, hole_every=3)
    return {"big": big, "old": old, "other": other}


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory, images: dict[str, Path]) -> Path:
    """A repository holding the earlier snapshots: vm1/vda of the old image, vm2/vda of another."""
    path = tmp_path_factory.mktemp("template") / "repo"
    repo = Repository.init(path)
    repo.backup(images["old"], "vm1/vda")
    repo.backup(images["other"], "vm2/vda")
    return path


@pytest.fixture
def earlier(template: Path, images: dict[str, Path], tmp_path: Path) -> tuple[Repository, dict[str, str]]:
    """A fresh copy of the template repository and the SHA-256 each of its snapshots must restore to."""
    shutil.copytree(template, tmp_path / "repo")
    repo = Repository.open(tmp_path / "repo")
    digests = {images["old"]: image_digest(images["old"]), images["other"]: image_digest(images["other"])}
    expected = {s.id: digests[Path(s.source)] for s in repo.snapshots()}
    assert len(expected) == 2
    return repo, expected


def assert_restores(repo: Repository, expected: dict[str, str], target_dir: Path) -> None:
    """Each snapshot restores bit-identical to the image it was taken of."""
    target_dir.mkdir(exist_ok=True)
    for sid, digest in expected.items():
        target = target_dir / f"{sid}.img"
        repo.restore(sid, target, overwrite=True)
        assert sha256_file(target) == digest, f"snapshot {sid} restored different bytes"
        target.unlink()


State = Callable[[Path, set[str]], bool]
"""Whether a repository shows a moment was reached, given the files published before it."""


def tmp_has(suffix: str) -> State:
    return lambda repo, before: any(n.endswith(suffix) for n in files_in(repo / "tmp"))


def new_indexes(count: int) -> State:
    return lambda repo, before: len(index_files(repo) - before) >= count


def no_new_pack(repo: Path, before: set[str]) -> bool:
    return not pack_files(repo) - before


def unindexed_pack(repo: Path, before: set[str]) -> bool:
    return bool(pack_files(repo) - index_files(repo) - before)


MID_COPY_READS = 1024
"""Chunk reads into the copy for "mid-copy": 32 MiB, less than one pack, so nothing is published yet."""

# Moments in the backup's write order at which to kill it: the step its thread is held at, each
# step built afresh for a new process, and what the repository shows once it is killed there.
MOMENTS: dict[str, tuple[Callable[[], Moment], list[State]]] = {
    # The first pack file has just been created in tmp/ (empty: its header comes next).
    "first-pack-opened": (lambda: opened("tmp/*.pack"), [tmp_has(".pack"), no_new_pack]),
    # Copying: packs being written in tmp/, none published (was "after-250ms", a duration that
    # under load ran out before the process had even taken its lock).
    "mid-copy": (lambda: reads(MID_COPY_READS), [tmp_has(".pack"), no_new_pack]),
    # A pack renamed into packs/XX (and XX opened to fsync it); its index not yet begun.
    "first-pack-published": (lambda: opened("packs/??"), [unindexed_pack]),
    # The first index file has just been created in tmp/.
    "first-index-being-written": (lambda: opened("tmp/*.idx"), [tmp_has(".idx"), unindexed_pack]),
    # An index renamed into index/ (and index/ opened to fsync it).
    "first-index-published": (lambda: opened("index", after=opened("tmp/*.idx")), [new_indexes(1)]),
    "second-index-published": (lambda: opened("index", nth=2, after=opened("tmp/*.idx")),
                               [new_indexes(2)]),
    # Every pack indexed; the snapshot document has just been created in tmp/.
    "snapshot-being-committed": (lambda: opened("tmp/*.tmp"), [tmp_has(".tmp")]),
    # The snapshot renamed into snapshots/ (the commit; and snapshots/ opened to fsync it), the
    # lock not yet removed.
    "snapshot-committed": (lambda: opened("snapshots", after=opened("tmp/*.tmp")), []),
}


@pytest.mark.slow
@pytest.mark.parametrize("moment", list(MOMENTS))
def test_backup_killed_at_any_moment_leaves_earlier_snapshots_intact_and_is_collected_afterwards(
        moment: str, earlier: tuple[Repository, dict[str, str]], images: dict[str, Path],
        checkpoints: Callable[[Path], Checkpoints], tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    repo, expected = earlier
    step, reached = MOMENTS[moment]
    before = pack_files(repo.path) | index_files(repo.path)
    args = ("backup", "--repo", str(repo.path), "--name", "vm1/vda", "--policy", "incremental",
            str(images["big"]))

    cps = checkpoints(repo.path)
    cps.watch_opens(*(repo.path / d for d in ("tmp", "packs", "index", "snapshots")))
    cps.watch_reads(images["big"])
    with cli_process(*args) as proc:
        cps.hold_at(proc, step())
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=30)
    cps.release()
    assert proc.returncode == -signal.SIGKILL
    for state in reached:
        assert state(repo.path, before), (
            f"killed elsewhere than at {moment}: tmp/ {files_in(repo.path / 'tmp')}, new packs "
            f"{pack_files(repo.path) - before}, new indexes {index_files(repo.path) - before}")

    # A snapshot document appears whole or not at all: killed right after committing, the backup
    # has published its snapshot, and then it restores bit-identical like any other.
    appeared = snapshot_ids(repo.path) - set(expected)
    assert len(appeared) == (1 if moment == "snapshot-committed" else 0), appeared
    expected.update(dict.fromkeys(appeared, image_digest(images["big"])))
    assert_restores(repo, expected, tmp_path / "out")
    report = repo.check()
    assert report.ok, report
    assert report.snapshots == len(expected)

    # The dead writer's lock (every moment is before it ends its session) was stale by its pid, and
    # the restores above, the next runs, cleared it, saying so.
    assert not [lk for lk in read_locks(repo.path / "locks") if lk.pid == proc.pid]
    assert any(f"pid {proc.pid} on" in r.getMessage() and "removed stale lock" in r.getMessage()
               for r in caplog.records), caplog.records

    # Running the same backup again completes and restores bit-identical.
    again = subprocess.run(proc.args, capture_output=True, text=True, timeout=120, check=False)
    assert again.returncode == 0, again.stderr
    (new_id,) = snapshot_ids(repo.path) - set(expected)
    expected[new_id] = image_digest(images["big"])
    assert_restores(repo, {new_id: expected[new_id]}, tmp_path / "out")

    # Garbage collection takes away what the dead writer left, and nothing any snapshot needs; the
    # dead writer's lock holds back neither its own leftovers nor the packs of a forgotten snapshot.
    (unrelated,) = (s.id for s in repo.snapshots("vm2/vda"))
    repo.forget([unrelated])
    del expected[unrelated]
    result = collect_garbage(repo)
    assert result.packs_deleted > 0 and result.packs_waiting == 0, result
    leftovers = files_in(repo.path / "tmp")
    assert not leftovers, f"files left in tmp/ after gc: {leftovers}"
    packs, indexes = pack_files(repo.path), index_files(repo.path)
    assert packs == indexes, f"packs without index: {packs - indexes}; index without pack: {indexes - packs}"
    report = repo.check()
    assert report.ok, report
    assert report.snapshots == len(expected)
    assert_restores(repo, expected, tmp_path / "out")


@pytest.fixture
def ctrl_c_reaches_the_cli() -> Iterator[None]:
    """Start the CLI as a terminal would, with SIGINT at its default. A test run started in the
    background by a non-interactive shell (``pytest &``, CI) has SIGINT ignored, a child inherits
    that across exec, and Python then never raises KeyboardInterrupt; a handler is not inherited."""
    old = signal.getsignal(signal.SIGINT)
    if old is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, old)


def press_ctrl_c(proc: subprocess.Popen[str], checkpoints: Checkpoints) -> None:
    """Ctrl-C to a backup held at a checkpoint; the hold ends only once the process has handled the
    signal, so the interrupt arrives while the copy provably has its work ahead, however fast the
    machine (and the rest of the copy cannot outrun the handler on a loaded one)."""
    proc.send_signal(signal.SIGINT)
    assert wait_for(lambda: signal_handled(proc.pid, signal.SIGINT), 60, proc, interval=0.001), \
        f"the backup did not handle SIGINT (status {proc.poll()})"
    checkpoints.release()


@pytest.mark.usefixtures("ctrl_c_reaches_the_cli")
def test_ctrl_c_exits_130_with_one_line_and_publishes_no_snapshot(
        earlier: tuple[Repository, dict[str, str]], images: dict[str, Path],
        checkpoints: Callable[[Path], Checkpoints], tmp_path: Path) -> None:
    repo, expected = earlier
    cps = checkpoints(repo.path)
    cps.watch_opens(repo.path / "tmp")
    cps.watch_reads(images["big"])
    with cli_process("backup", "--repo", str(repo.path), "--name", "vm1/vda", str(images["big"])) as proc:
        steps = cps.hold_at(proc, reads(MID_COPY_READS))
        press_ctrl_c(proc, cps)
        out, err = proc.communicate(timeout=60)
    assert any(s.kind == "open" and s.path.endswith(".pack") for s in steps), "no pack was opened"

    line = assert_one_line_error(subprocess.CompletedProcess(proc.args, proc.returncode, out, err), 130)
    assert "interrupted" in line
    assert out == ""
    assert snapshot_ids(repo.path) == set(expected)
    assert files_in(repo.path / "locks") == set(), "the interrupted backup left its lock file"
    assert not [n for n in files_in(repo.path / "tmp") if n.endswith(".pack")], "unflushed pack left in tmp/"
    assert repo.check().ok
    assert_restores(repo, expected, tmp_path / "out")


@pytest.mark.usefixtures("ctrl_c_reaches_the_cli")
def test_ctrl_c_stops_the_copy_at_once_instead_of_finishing_it(
        earlier: tuple[Repository, dict[str, str]], images: dict[str, Path],
        checkpoints: Callable[[Path], Checkpoints]) -> None:
    """Ctrl-C during the copy stops the workers at their next batch: at most the pack being closed
    at that instant gets published, not the rest of the image."""
    repo, _ = earlier
    before = index_files(repo.path)
    cps = checkpoints(repo.path)
    cps.watch_reads(images["big"])
    with cli_process("backup", "--repo", str(repo.path), "--name", "vm1/vda", str(images["big"])) as proc:
        cps.hold_at(proc, reads(MID_COPY_READS))
        assert not index_files(repo.path) - before, "too slow to catch the first pack"
        press_ctrl_c(proc, cps)
        proc.communicate(timeout=60)
    assert proc.returncode == 130
    published = index_files(repo.path) - before
    assert len(published) <= 1, (
        f"{len(published)} packs ({len(published) * 64} MiB) were published after Ctrl-C: the copy "
        "ran on to the end of its segment")
