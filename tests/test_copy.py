"""hyperback copy: snapshots copied into another repository send only the blobs it lacks, are
verified on the way, survive a SIGKILL at an exact step of the target's write order and resume,
and reach a media service's repository through copy sessions.

What "only the blobs it lacks" means is computed here independently of the copier: the blobs each
snapshot's tree reaches (``Repository.referenced``) and their raw lengths from the source's index
files (``packfile.read_index``), against the blobs the target's index files list.
"""
from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import grpc
import pytest
from checkpoints import Checkpoints, Moment, opened
from conftest import MIB, mutate, sha256_file, write_image
from system_helpers import cli_process, index_files, snapshot_ids

from host_agent import errors
from host_agent._proto.hyperback.v1 import media_pb2 as pb
from host_agent._proto.hyperback.v1 import media_pb2_grpc as pb_grpc
from host_agent.media.copies import MediaTarget
from host_agent.protobuf import policy_to_pb
from host_agent.storage.packfile import RECORD_HEADER, IndexEntry, read_index
from host_agent.storage.repository import Repository
from host_agent.storage.snapshot import Snapshot, VmRef
from host_agent.storage.transfer import CopySummary, LocalTarget, copy_snapshots, select

MEDIA = Path(sys.executable).with_name("hyperback-media")


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Three versions of one disk and a clone of it (another VM's disk sharing most chunks)."""
    d = tmp_path_factory.mktemp("images")
    v1 = write_image(d / "v1.img", 6 * MIB + 5000, seed=1)  # a short last chunk
    v2, v3, clone = d / "v2.img", d / "v3.img", d / "clone.img"
    shutil.copy(v1, v2)
    mutate(v2, seed=2, extents=12)
    shutil.copy(v2, v3)
    mutate(v3, seed=3, extents=12)
    shutil.copy(v1, clone)
    mutate(clone, seed=4, extents=6)
    return {"v1": v1, "v2": v2, "v3": v3, "clone": clone}


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory, images: dict[str, Path]) -> Path:
    path = tmp_path_factory.mktemp("template") / "source"
    repo = Repository.init(path)
    for name, image in (("vm1/vda", "v1"), ("vm1/vda", "v2"), ("vm2/vda", "clone"), ("vm1/vda", "v3")):
        repo.backup(images[image], name, "incremental")
    return path


@pytest.fixture
def source(template: Path, tmp_path: Path) -> Repository:
    shutil.copytree(template, tmp_path / "source")
    return Repository.open(tmp_path / "source")


def digests(repo: Repository, images: dict[str, Path]) -> dict[str, str]:
    """The SHA-256 each snapshot must restore to."""
    by_path = {str(p): sha256_file(p) for p in images.values()}
    return {s.id: by_path[s.source] for s in repo.snapshots()}


def copy(source: Repository, target: Repository, specs: Sequence[str] = ()) -> tuple[CopySummary, list[str]]:
    lines: list[str] = []
    with LocalTarget(target).session() as local:
        summary = copy_snapshots(source, local, select(source, specs, None, False), lines.append)
    return summary, lines


def source_entries(repo: Repository) -> dict[bytes, IndexEntry]:
    return {e.id: e for name in index_files(repo.path) for e in read_index(repo.path / "index" / name)}


def indexed_ids(repo: Repository) -> set[bytes]:
    return set(source_entries(repo))


def reached(repo: Repository, snaps: Sequence[Snapshot]) -> set[bytes]:
    with repo.session("test", writer=False) as native:
        users, unreadable = repo.referenced(native, snaps)
    assert not unreadable
    return set(users)


def expected_transfer(source: Repository, snaps: Sequence[Snapshot],
                      in_target: set[bytes]) -> tuple[int, int]:
    """(blobs, raw bytes) the snapshots reach that the target lacks: what a copy must send."""
    entries = source_entries(source)
    lacking = reached(source, snaps) - in_target
    return len(lacking), sum(entries[b].raw_len for b in lacking)


def assert_restores(repo: Repository, expected: dict[str, str], out: Path) -> None:
    out.mkdir(exist_ok=True)
    for sid, digest in expected.items():
        repo.restore(sid, out / sid, overwrite=True)
        assert sha256_file(out / sid) == digest, f"snapshot {sid} restored other bytes"
        (out / sid).unlink()


def assert_valid(repo: Repository) -> None:
    report = repo.check()
    assert report.ok, report
    assert repo.verify().ok


# ---------- local targets ----------

def test_a_copy_sends_only_the_blobs_the_target_lacks_and_restores_bit_identical(
        source: Repository, images: dict[str, Path], tmp_path: Path) -> None:
    target = Repository.init(tmp_path / "target")
    snaps = source.snapshots()
    first = snaps[0]
    summary, _ = copy(source, target, [first.id])
    assert summary.copied == [first.id]
    assert (summary.chunks_sent, summary.bytes_sent) == expected_transfer(source, [first], set())

    before = indexed_ids(target)
    rest = snaps[1:]
    summary, lines = copy(source, target)
    assert summary.skipped == [first.id] and summary.copied == [s.id for s in rest], lines
    assert f"skipped {first.id} vm1/vda: already in the target" in lines
    # only the blobs the other snapshots reach that the first one's did not bring
    assert (summary.chunks_sent, summary.bytes_sent) == expected_transfer(source, rest, before)
    shared = reached(source, rest) & before
    entries = source_entries(source)
    assert summary.chunks_present == len(shared) > 0
    assert summary.bytes_present == sum(entries[b].raw_len for b in shared)
    # each blob once: far less than the snapshots' images
    assert summary.bytes_sent < sum(s.size for s in rest) / 2

    assert_valid(target)
    for snap in snaps:  # documents unchanged, byte for byte
        assert (target.path / "snapshots" / snap.id).read_bytes() == \
            (source.path / "snapshots" / snap.id).read_bytes()
    assert_restores(target, digests(source, images), tmp_path / "out")

    again, _ = copy(source, target)
    assert again.copied == [] and again.skipped == [s.id for s in snaps] and again.bytes_sent == 0


def test_a_damaged_chunk_in_the_source_is_reported_and_not_copied(
        source: Repository, images: dict[str, Path], tmp_path: Path) -> None:
    snaps = source.snapshots()
    victim = snaps[-1]  # v3: its own mutated chunks are used by no other snapshot
    with source.session("test", writer=False) as native:
        users, _ = source.referenced(native, snaps)
    entries = source_entries(source)
    bad = next(b for b, used in users.items() if used == [victim.id] and entries[b].type == 0)
    entry = entries[bad]
    pack = next(p for p in (source.path / "packs").rglob("*")
                if p.is_file() and any(e.id == bad for e in read_index(source.path / "index" / p.name)))
    with open(pack, "r+b") as f:
        f.seek(entry.offset + RECORD_HEADER.size + entry.stored_len // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))

    target = Repository.init(tmp_path / "target")
    summary, lines = copy(source, target)
    assert list(summary.failed) == [victim.id] and not summary.ok
    assert bad.hex() in summary.failed[victim.id]
    assert any(line.startswith(f"FAILED {victim.id}") for line in lines)
    assert summary.copied == [s.id for s in snaps if s is not victim]
    assert bad not in indexed_ids(target)  # damage is never copied
    assert victim.id not in snapshot_ids(target.path)
    assert_valid(target)
    expected = digests(source, images)
    del expected[victim.id]
    assert_restores(target, expected, tmp_path / "out")


def test_different_chunk_sizes_or_the_same_repository_are_refused(source: Repository, tmp_path: Path) -> None:
    other = Repository.init(tmp_path / "small", chunk_size=4096)
    with pytest.raises(errors.UsageError, match="chunk size is 32768 bytes, the target's 4096"):
        copy(source, other)
    with pytest.raises(errors.UsageError, match="same repository"):
        copy(source, Repository.open(source.path))
    assert not snapshot_ids(other.path)


def test_a_domain_definition_goes_with_the_disk_snapshots_that_name_it(source: Repository,
                                                                          tmp_path: Path) -> None:
    xml = tmp_path / "domain.xml"
    xml.write_text("<domain><name>vm1</name></domain>\n")
    uuid = "0f0e0d0c-0b0a-0908-0706-050403020100"
    definition = source.backup(xml, f"{uuid}/vm/definition").snapshot
    disk = source.backup(tmp_path / "domain.xml", f"{uuid}/disk0",
                         vm=VmRef("ab" * 8, ("1",), uuid, "vm1", definition.id, ())).snapshot
    chosen = select(source, [disk.id], None, False)
    assert [s.id for s in chosen] == [definition.id, disk.id]
    target = Repository.init(tmp_path / "target")
    summary, _ = copy(source, target, [disk.id])
    assert summary.copied == [definition.id, disk.id]
    assert_valid(target)


# ---------- a copy killed half way, and resumed ----------

# Steps of the target's write order at which to kill a copy of four snapshots, and whether the
# second snapshot's blobs are durable in the target by then.
MOMENTS: dict[str, tuple[Callable[[], Moment], bool]] = {
    # the second snapshot's pack has just been created in tmp/: the first one is committed
    "second-pack-being-written": (lambda: opened("tmp/*.pack", nth=2), False),
    # the second snapshot's blobs are published (pack, then index: index/ opened to fsync it), its
    # document not yet written
    "second-snapshot-indexed": (lambda: opened("index", nth=2, after=opened("tmp/*.idx")), True),
}


@pytest.mark.root
@pytest.mark.parametrize("moment", list(MOMENTS))
def test_a_copy_killed_half_way_leaves_the_target_valid_and_a_rerun_sends_only_what_is_missing(
        moment: str, source: Repository, images: dict[str, Path],
        checkpoints: Callable[[Path], Checkpoints], tmp_path: Path) -> None:
    step, published = MOMENTS[moment]
    target = Repository.init(tmp_path / "target")
    snaps = source.snapshots()
    cps = checkpoints(target.path)
    cps.watch_opens(*(target.path / d for d in ("tmp", "packs", "index", "snapshots")))
    with cli_process("copy", "--from", str(source.path), "--to", str(target.path)) as proc:
        cps.hold_at(proc, step())
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=30)
    cps.release()
    assert proc.returncode == -signal.SIGKILL
    assert snapshot_ids(target.path) == {snaps[0].id}
    assert_valid(target)
    assert_restores(target, {snaps[0].id: digests(source, images)[snaps[0].id]}, tmp_path / "out")
    in_target = indexed_ids(target)
    # what the killed copy published stays, and is not sent again
    assert (reached(source, [snaps[1]]) <= in_target) == published

    again = subprocess.run([*proc.args[:1], "copy", "--from", str(source.path), "--to", str(target.path),
                            "--json"], capture_output=True, text=True, timeout=120, check=False)
    assert again.returncode == 0, again.stderr
    summary = json.loads(again.stdout)
    assert summary["skipped"] == [snaps[0].id]
    assert summary["copied"] == [s.id for s in snaps[1:]]
    assert (summary["chunks_sent"], summary["bytes_sent"]) == expected_transfer(source, snaps[1:], in_target)
    if published:
        assert summary["bytes_sent"] < expected_transfer(source, snaps[1:], reached(source, snaps[:1]))[1]
    assert_valid(target)
    assert_restores(target, digests(source, images), tmp_path / "out")


@pytest.fixture
def ctrl_c_reaches_the_cli() -> Iterator[None]:
    """SIGINT at its default in the CLI, as a terminal starts it (a background test run ignores it,
    and a child would inherit that: see test_crash.py)."""
    old = signal.getsignal(signal.SIGINT)
    if old is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, old)


@pytest.mark.root
@pytest.mark.usefixtures("ctrl_c_reaches_the_cli")
def test_ctrl_c_stops_a_copy_with_one_line_leaving_what_it_committed(
        source: Repository, images: dict[str, Path], checkpoints: Callable[[Path], Checkpoints],
        tmp_path: Path) -> None:
    target = Repository.init(tmp_path / "target")
    snaps = source.snapshots()
    cps = checkpoints(target.path)
    cps.watch_opens(target.path / "tmp")
    with cli_process("copy", "--from", str(source.path), "--to", str(target.path)) as proc:
        cps.hold_at(proc, opened("tmp/*.pack", nth=2))  # the second snapshot's first blob
        # The held thread is the main one, asleep in open() until released: the signal is pending
        # (kill() makes it so at once) and is taken when a thread of it next leaves the kernel, the
        # released open() at the latest; Python raises KeyboardInterrupt in the main thread at its
        # next instruction, with the second snapshot's blobs still ahead.
        proc.send_signal(signal.SIGINT)
        cps.release()
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert err.splitlines()[-1].startswith("hyperback: interrupted") and "Traceback" not in err
    assert snapshot_ids(target.path) == {snaps[0].id}
    assert not list((target.path / "locks").iterdir()), "the interrupted copy left its lock"
    assert not list((target.path / "tmp").iterdir()), "the interrupted copy left files in tmp/"
    assert_valid(target)
    summary, _ = copy(source, target)
    assert summary.skipped == [snaps[0].id] and summary.copied == [s.id for s in snaps[1:]]
    assert_restores(target, digests(source, images), tmp_path / "out")


# ---------- a media service's repository ----------

@pytest.fixture
def media_process(tmp_path: Path) -> Iterator[tuple[str, Repository]]:
    """A real hyperback-media process serving a new repository as "offsite" on a loopback port."""
    repo = Repository.init(tmp_path / "offsite")
    with subprocess.Popen([str(MEDIA), "--listen", "127.0.0.1:0", "--repo", f"offsite={repo.path}",
                           "--host-name", "hostc"], stderr=subprocess.PIPE, text=True) as proc:
        assert proc.stderr is not None
        log: list[str] = []
        try:
            line = proc.stderr.readline()  # the service says where it listens once it does
            assert "serving offsite on 127.0.0.1:" in line, line
            # its log goes on being read, so that a full pipe never stops it
            drain = threading.Thread(target=lambda: log.extend(proc.stderr or ()), daemon=True)
            drain.start()
            yield line.split(" on ")[-1].strip(), repo
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=20) == 0
            drain.join()
            assert not any("Traceback" in line for line in log), log
        finally:
            if proc.poll() is None:
                proc.kill()


def test_a_copy_to_a_media_service_sends_only_what_it_lacks(
        source: Repository, images: dict[str, Path], media_process: tuple[str, Repository],
        tmp_path: Path) -> None:
    address, offsite = media_process
    snaps = source.snapshots()
    with MediaTarget.connect(f"media://{address}/offsite") as remote:
        first = copy_snapshots(source, remote, select(source, [snaps[0].id], None, False), lambda line: None)
        before = indexed_ids(offsite)
        sent_before = remote.remote.bytes_sent
        rest = copy_snapshots(source, remote, select(source, [], None, False), lambda line: None)
        sent = remote.remote.bytes_sent - sent_before
    assert first.copied == [snaps[0].id]
    assert rest.skipped == [snaps[0].id] and rest.copied == [s.id for s in snaps[1:]]
    assert (rest.chunks_sent, rest.bytes_sent) == expected_transfer(source, snaps[1:], before)
    # what crossed the network: the records sent (compressed, with headers) and little else
    assert sent < rest.bytes_sent + 2 * MIB
    assert_valid(offsite)
    assert_restores(offsite, digests(source, images), tmp_path / "out")


def test_a_media_copy_session_takes_no_base_and_still_checks_the_references_of_what_it_commits(
        source: Repository, media_process: tuple[str, Repository]) -> None:
    address, offsite = media_process
    snap = source.snapshots()[1]  # an incremental: its parent is not in the target
    with grpc.insecure_channel(address) as channel:
        with pytest.raises(grpc.RpcError) as refused:
            pb_grpc.MediaStub(channel).OpenBackup(pb.OpenBackupRequest(
                destination="offsite", name=snap.name, policy=policy_to_pb(snap.policy), base_id=snap.id,
                copy=True), timeout=30)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with MediaTarget.connect(f"media://{address}/offsite") as remote, remote.writer(snap) as writer, \
            pytest.raises(errors.MissingChunk):
        writer.commit(snap, b"")  # nothing uploaded: the server refuses a document naming what it lacks
    assert not snapshot_ids(offsite.path)
