"""The media service and its client: backups streamed over real gRPC on 127.0.0.1 into a repository that the
local API then reads, deduplicated at the source, and every way a session can fail.
"""
from __future__ import annotations

import hashlib
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from system_helpers import (
    MIB,
    files_in,
    free_bytes,
    index_files,
    mount_tmpfs,
    overwrite,
    pack_files,
    sha256_file,
    snapshot_ids,
    unmount,
    wait_for,
    write_random_image,
)

from host_agent import errors
from host_agent._proto.hyperback.v1 import media_pb2 as pb
from host_agent._proto.hyperback.v1 import media_pb2_grpc as pb_grpc
from host_agent._proto.hyperback.v1 import optimizer_pb2 as opb
from host_agent.media import codec, uploads
from host_agent.media import server as media
from host_agent.media.client import RemoteRepository
from host_agent.model import Policy
from host_agent.storage import copier
from host_agent.storage.copier import BLOB_DATA
from host_agent.storage.gc import collect_garbage
from host_agent.storage.packfile import INDEX_ENTRY, PACK_HEADER, PACK_MAGIC, RECORD_HEADER
from host_agent.storage.repository import Repository

MEDIA = Path(sys.executable).with_name("hyperback-media")
SIZE = 32 * MIB


# ---------- fixtures and helpers ----------

@pytest.fixture
def server(repo: Repository) -> Iterator[media.MediaServer]:
    """A media service serving ``repo`` as "main" on a free port of 127.0.0.1; sessions expire after 2 s."""
    srv = media.start({"main": repo.path}, "127.0.0.1:0", "hostb", lease=2.0)
    yield srv
    srv.stop(grace=0)


@pytest.fixture
def remote(server: media.MediaServer, tmp_path: Path) -> Iterator[RemoteRepository]:
    spool = tmp_path / "spool"
    spool.mkdir()
    with RemoteRepository(server.address, "main", timeout=10, spool_dir=spool) as client:
        yield client
    assert files_in(spool) == set(), "a backup left its spool behind"


@pytest.fixture
def stub(server: media.MediaServer) -> Iterator[pb_grpc.MediaStub]:
    with grpc.insecure_channel(server.address) as channel:
        yield pb_grpc.MediaStub(channel)


def scattered(count: int, seed: int, size: int = SIZE, length: int = 64 * 1024) -> list[tuple[int, int]]:
    """``count`` extents of ``length`` at 4 KiB-aligned offsets, the shape of guest writes."""
    rng = random.Random(seed)
    return [(rng.randrange(0, size - length, 4096), length) for _ in range(count)]


def restored(repo: Repository, spec: str, target: Path) -> str:
    repo.restore(spec, target)
    return sha256_file(target)


def assert_clean(repo: Repository) -> None:
    """No lock left, nothing unpublished, every snapshot whole and every blob intact."""
    assert files_in(repo.path / "locks") == set()
    report = repo.check()
    assert report.ok, report
    assert repo.verify().ok


def make_pack(writer_id: bytes, blobs: list[bytes], *, bad_id: bool = False) -> tuple[str, bytes, bytes]:
    """A pack of raw (uncompressed) data records and its index, as the format says; ``bad_id``
    gives the last record the id of other bytes."""
    pack_id = os.urandom(16)
    pack = bytearray(PACK_HEADER.pack(PACK_MAGIC, 1, pack_id, writer_id))
    entries = bytearray()
    for i, blob in enumerate(blobs):
        cid = hashlib.sha256(blob + (b"x" if bad_id and i == len(blobs) - 1 else b"")).digest()
        entries += INDEX_ENTRY.pack(cid, BLOB_DATA, 0, 0, len(pack), len(blob), len(blob))
        pack += RECORD_HEADER.pack(cid, BLOB_DATA, 0, 0, len(blob), len(blob)) + blob
    return pack_id.hex(), bytes(pack), copier.encode_index(pack_id, bytes(entries))


def upload_requests(session_id: str, name: str, pack: bytes, index: bytes,
                    pack_bytes: int | None = None) -> Iterator[pb.UploadPackRequest]:
    """An upload as the protocol says; ``pack_bytes`` cuts the pack short (and sends no index)."""
    yield pb.UploadPackRequest(start=pb.UploadStart(session_id=session_id, pack_name=name,
                                                    pack_size=len(pack), index_size=len(index)))
    sent = pack[:pack_bytes] if pack_bytes is not None else pack
    for at in range(0, len(sent), 100_000):
        yield pb.UploadPackRequest(pack_data=sent[at:at + 100_000])
    if pack_bytes is None:
        yield pb.UploadPackRequest(index_data=index)


def open_session(stub: pb_grpc.MediaStub, name: str = "vm9/vda") -> pb.OpenBackupResponse:
    return stub.OpenBackup(pb.OpenBackupRequest(destination="main", name=name, policy=opb.POLICY_FULL))


def error_class(e: grpc.RpcError) -> str:
    assert isinstance(e, grpc.Call)
    return dict(e.trailing_metadata() or ()).get(codec.ERROR_KEY, "")


# ---------- backups through the service ----------

def test_full_and_incrementals_through_the_service_restore_bit_identical_locally(
        repo: Repository, remote: RemoteRepository, tmp_path: Path) -> None:
    image = write_random_image(tmp_path / "a.img", SIZE, seed=1, hole_every=5, zero_every=7)
    digests = {}
    full = remote.backup(image, "vm1/vda").snapshot
    digests[full.id] = sha256_file(image)
    changes = scattered(8, seed=2)
    overwrite(image, 3, changes)
    compared = remote.backup(image, "vm1/vda", Policy.INCREMENTAL).snapshot
    digests[compared.id] = sha256_file(image)
    changes2 = scattered(8, seed=4)
    overwrite(image, 5, changes2)
    listed = remote.backup(image, "vm1/vda", Policy.INCREMENTAL, changes=changes2).snapshot
    digests[listed.id] = sha256_file(image)

    assert (full.change_detection.value, compared.change_detection.value, listed.change_detection.value) == \
        ("none", "comparison", "change-list")
    assert (compared.parent, listed.parent) == (full.id, compared.id)
    assert [s.id for s in repo.snapshots("vm1/vda")] == [full.id, compared.id, listed.id]
    assert listed.stats.bytes_read <= 8 * 3 * 32 * 1024  # only the chunks the changes touch
    for sid, digest in digests.items():
        assert restored(repo, sid, tmp_path / f"{sid}.img") == digest
    assert_clean(repo)
    assert [s.id for s in remote.snapshots()] == [full.id, compared.id, listed.id]
    assert remote.resolve("vm1/vda@latest").id == listed.id
    assert remote.resolve(full.id[:6]).id == full.id


def test_an_incremental_sends_about_the_changed_bytes_not_the_image(
        remote: RemoteRepository, tmp_path: Path) -> None:
    image = write_random_image(tmp_path / "a.img", SIZE, seed=1)
    remote.backup(image, "vm1/vda")
    assert remote.bytes_sent > SIZE  # random data: the whole image went over
    for seed, with_list in ((2, False), (3, True)):
        changes = scattered(8, seed=seed)
        changed = sum(n for _, n in changes)
        overwrite(image, seed, changes)
        before = remote.bytes_sent
        result = remote.backup(image, "vm1/vda", Policy.INCREMENTAL, changes=changes if with_list else None)
        sent = remote.bytes_sent - before
        # 64 KiB at a 4 KiB-aligned offset covers 2-3 chunks of 32 KiB; add tree pages, ids, indexes
        assert changed <= sent <= 1.6 * changed + 128 * 1024, (with_list, sent, changed)
        assert result.snapshot.stats.bytes_new <= 1.5 * changed


def test_a_change_list_fetches_only_the_base_leaves_it_touches(remote: RemoteRepository,
                                                                tmp_path: Path) -> None:
    image = write_random_image(tmp_path / "a.img", SIZE, seed=1)
    remote.backup(image, "vm1/vda")
    before = remote.bytes_received
    remote.backup(image, "vm1/vda", Policy.INCREMENTAL)
    every_leaf = remote.bytes_received - before
    before = remote.bytes_received
    remote.backup(image, "vm1/vda", Policy.INCREMENTAL, changes=[(5 * MIB, 4096)])
    one_leaf = remote.bytes_received - before
    assert every_leaf >= SIZE // (32 * 1024) * 32  # the ids of every chunk
    assert one_leaf < every_leaf / 4


def test_data_the_destination_holds_under_another_name_is_not_sent_again(
        repo: Repository, remote: RemoteRepository, tmp_path: Path) -> None:
    image = write_random_image(tmp_path / "a.img", SIZE, seed=1, hole_every=4)
    first = remote.backup(image, "vm1/vda").snapshot
    clone = tmp_path / "clone.img"
    shutil.copyfile(image, clone)
    overwrite(clone, 9, [(MIB, 4096)])
    before = remote.bytes_sent
    second = remote.backup(clone, "vm2/vda").snapshot
    assert remote.bytes_sent - before < SIZE // 50
    assert second.stats.bytes_new <= 2 * 32 * 1024
    assert restored(repo, second.id, tmp_path / "r2.img") == sha256_file(clone)
    assert restored(repo, first.id, tmp_path / "r1.img") == sha256_file(image)


def test_differential_and_resized_sources_with_change_lists(repo: Repository, remote: RemoteRepository,
                                                            tmp_path: Path) -> None:
    image = write_random_image(tmp_path / "a.img", SIZE + 100 * 1024, seed=1)
    full = remote.backup(image, "vm1/vda").snapshot
    overwrite(image, 2, [(MIB, 8192)])
    remote.backup(image, "vm1/vda", Policy.INCREMENTAL, changes=[(MIB, 8192)])
    overwrite(image, 3, [(3 * MIB, 8192)])
    diff = remote.backup(image, "vm1/vda", Policy.DIFFERENTIAL, changes=[(MIB, 8192), (3 * MIB, 8192)])
    assert diff.snapshot.parent == full.id
    assert remote.base_for("vm1/vda", Policy.DIFFERENTIAL).id == full.id  # type: ignore[union-attr]
    assert restored(repo, diff.snapshot.id, tmp_path / "d.img") == sha256_file(image)

    with open(image, "ab") as f:  # grown: the appended part is read whatever the list says
        f.write(os.urandom(MIB + 5000))
    grown = remote.backup(image, "vm1/vda", Policy.INCREMENTAL, changes=[(2 * MIB, 100)]).snapshot
    assert restored(repo, grown.id, tmp_path / "g.img") == sha256_file(image)
    os.truncate(image, SIZE - 3 * MIB - 77)
    shrunk = remote.backup(image, "vm1/vda", Policy.INCREMENTAL, changes=[]).snapshot
    assert restored(repo, shrunk.id, tmp_path / "s.img") == sha256_file(image)
    assert_clean(repo)


def test_an_explicit_base_of_another_name_is_built_on(repo: Repository, remote: RemoteRepository,
                                                     tmp_path: Path) -> None:
    backing = write_random_image(tmp_path / "base.img", SIZE, seed=1, hole_every=6)
    shared = remote.backup(backing, "base/0123456789abcdef").snapshot
    overlay = tmp_path / "vm1.img"
    shutil.copyfile(backing, overlay)
    changes = scattered(4, seed=5)
    overwrite(overlay, 6, changes)
    before = remote.bytes_sent
    snap = remote.backup(overlay, "vm1/vda", Policy.INCREMENTAL, changes, base=shared).snapshot
    assert snap.parent == shared.id and snap.change_detection.value == "change-list"
    assert remote.bytes_sent - before < 2 * sum(n for _, n in changes) + 128 * 1024
    assert restored(repo, snap.id, tmp_path / "r.img") == sha256_file(overlay)
    gone = repo.backup(backing, "base/fedcba9876543210").snapshot
    repo.forget([gone.id])
    with pytest.raises(errors.SnapshotNotFound):
        remote.backup(overlay, "vm1/vda", Policy.INCREMENTAL, changes, base=gone)
    assert_clean(repo)


def test_a_first_incremental_becomes_full_and_says_so(remote: RemoteRepository, tmp_path: Path) -> None:
    image = write_random_image(tmp_path / "a.img", 2 * MIB, seed=1)
    result = remote.backup(image, "vm1/vda", Policy.INCREMENTAL, changes=[(0, 10)])
    assert result.snapshot.policy is Policy.FULL
    assert any("full" in note for note in result.notes)


def test_restore_through_the_service_is_bit_identical_and_verified(
        repo: Repository, remote: RemoteRepository, tmp_path: Path) -> None:
    image = write_random_image(tmp_path / "a.img", SIZE + 1234, seed=1, hole_every=3, zero_every=5)
    snap = repo.backup(image, "vm1/vda").snapshot  # written locally, read remotely
    seen: list[tuple[int, int]] = []
    result = remote.restore("vm1/vda@latest", tmp_path / "out.img", progress=lambda d, t: seen.append((d, t)))
    assert sha256_file(tmp_path / "out.img") == sha256_file(image)
    assert result.snapshot.id == snap.id and result.bytes_written == snap.size
    assert seen[-1] == (snap.size, snap.size)
    assert remote.bytes_received >= result.bytes_read > SIZE // 2
    with pytest.raises(errors.TargetError):
        remote.restore(snap.id, tmp_path / "out.img")
    with pytest.raises(errors.SnapshotNotFound):
        remote.restore("nothing@latest", tmp_path / "other.img")
    assert not (tmp_path / "other.img").exists()
    assert files_in(repo.path / "locks") == set()


# ---------- refusals ----------

def test_an_unknown_destination_is_not_found(server: media.MediaServer, stub: pb_grpc.MediaStub) -> None:
    with pytest.raises(errors.UnknownDestination, match="serves: main"):
        RemoteRepository(server.address, "elsewhere")
    with pytest.raises(grpc.RpcError) as exc:
        stub.OpenBackup(pb.OpenBackupRequest(destination="elsewhere", name="vm/vda", policy=opb.POLICY_FULL))
    assert exc.value.code() is grpc.StatusCode.NOT_FOUND  # type: ignore[attr-defined]
    assert error_class(exc.value) == "UnknownDestination"
    with pytest.raises(grpc.RpcError) as exc:
        stub.Heartbeat(pb.SessionRequest(session_id="00" * 16))
    assert exc.value.code() is grpc.StatusCode.NOT_FOUND  # type: ignore[attr-defined]
    with pytest.raises(grpc.RpcError) as exc:
        stub.OpenBackup(pb.OpenBackupRequest(destination="main", name="../x", policy=opb.POLICY_FULL))
    assert exc.value.code() is grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]


def test_an_unreachable_service_is_a_remote_error(tmp_path: Path) -> None:
    with pytest.raises(errors.RemoteError, match="cannot reach"):
        RemoteRepository("127.0.0.1:1", "main", timeout=2)


def test_another_chunk_size_is_a_failed_precondition(repo: Repository, remote: RemoteRepository,
                                                     stub: pb_grpc.MediaStub, tmp_path: Path) -> None:
    image = write_random_image(tmp_path / "a.img", 2 * MIB, seed=1)
    other = Repository.init(tmp_path / "other", chunk_size=65536)
    doc = other.backup(image, "vm9/vda").snapshot
    opened = open_session(stub)
    with pytest.raises(grpc.RpcError) as exc:
        stub.Commit(pb.CommitRequest(session_id=opened.session_id, document=codec.snapshot_document(doc)))
    assert exc.value.code() is grpc.StatusCode.FAILED_PRECONDITION  # type: ignore[attr-defined]
    assert "chunk size" in exc.value.details()  # type: ignore[attr-defined]

    big = os.urandom(repo.config.chunk_size + 1)  # a record longer than a chunk
    name, pack, index = make_pack(bytes.fromhex(opened.writer_id), [big])
    with pytest.raises(grpc.RpcError) as exc:
        stub.UploadPack(upload_requests(opened.session_id, name, pack, index))
    assert exc.value.code() is grpc.StatusCode.FAILED_PRECONDITION  # type: ignore[attr-defined]
    stub.Abort(pb.SessionRequest(session_id=opened.session_id))
    assert snapshot_ids(repo.path) == set() and pack_files(repo.path) == set()
    assert files_in(repo.path / "tmp") == set()


def test_a_commit_naming_chunks_the_repository_lacks_is_refused(
        repo: Repository, stub: pb_grpc.MediaStub, tmp_path: Path) -> None:
    image = write_random_image(tmp_path / "a.img", 2 * MIB, seed=1)
    elsewhere = Repository.init(tmp_path / "other")
    snap = elsewhere.backup(image, "vm9/vda").snapshot
    opened = open_session(stub)
    with pytest.raises(grpc.RpcError) as exc:
        stub.Commit(pb.CommitRequest(session_id=opened.session_id, document=codec.snapshot_document(snap)))
    assert exc.value.code() is grpc.StatusCode.FAILED_PRECONDITION  # type: ignore[attr-defined]
    assert error_class(exc.value) == "MissingChunk"
    stub.Abort(pb.SessionRequest(session_id=opened.session_id))
    assert snapshot_ids(repo.path) == set()


def test_a_pack_with_a_wrong_id_is_refused_and_nothing_is_published(
        repo: Repository, stub: pb_grpc.MediaStub) -> None:
    opened = open_session(stub)
    writer = bytes.fromhex(opened.writer_id)
    for bad in (make_pack(writer, [os.urandom(5000), os.urandom(7000)], bad_id=True),
                make_pack(os.urandom(16), [os.urandom(5000)])):  # another writer's pack
        name, pack, index = bad
        with pytest.raises(grpc.RpcError) as exc:
            stub.UploadPack(upload_requests(opened.session_id, name, pack, index))
        assert exc.value.code() is grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
        assert error_class(exc.value) == "CorruptChunk"
    name, pack, index = make_pack(writer, [os.urandom(5000)])
    wrong_index = index[:-1] + bytes([index[-1] ^ 1])
    with pytest.raises(grpc.RpcError) as exc:
        stub.UploadPack(upload_requests(opened.session_id, name, pack, wrong_index))
    assert exc.value.code() is grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
    assert pack_files(repo.path) == set() and index_files(repo.path) == set()
    assert files_in(repo.path / "tmp") == set()
    # the session survives a refused upload
    assert stub.UploadPack(upload_requests(opened.session_id, name, pack, index)).records == 1
    assert pack_files(repo.path) == {name}


# ---------- sessions that fail ----------

def test_a_session_keeps_its_packs_from_gc_until_it_ends_then_they_are_garbage(
        repo: Repository, stub: pb_grpc.MediaStub) -> None:
    opened = open_session(stub)
    name, pack, index = make_pack(bytes.fromhex(opened.writer_id), [os.urandom(9000)])
    stub.UploadPack(upload_requests(opened.session_id, name, pack, index))
    lock = repo.locks()
    assert [(lk.name, lk.kind) for lk in lock] == [(opened.writer_id, "media-backup")]
    collect_garbage(repo)
    assert pack_files(repo.path) == {name}, "GC took the pack of a live session"
    stub.Abort(pb.SessionRequest(session_id=opened.session_id))
    with pytest.raises(grpc.RpcError) as exc:
        stub.Heartbeat(pb.SessionRequest(session_id=opened.session_id))
    assert exc.value.code() is grpc.StatusCode.ABORTED  # type: ignore[attr-defined]
    assert files_in(repo.path / "locks") == set()
    collect_garbage(repo)
    assert pack_files(repo.path) == set() and index_files(repo.path) == set()


def test_a_silent_session_expires_and_releases_its_lock(repo: Repository, stub: pb_grpc.MediaStub) -> None:
    opened = open_session(stub)
    assert opened.lease_seconds == 2.0
    assert wait_for(lambda: files_in(repo.path / "locks") == set(), timeout=10, interval=0.1)
    with pytest.raises(grpc.RpcError) as exc:
        stub.Commit(pb.CommitRequest(session_id=opened.session_id, document="{}"))
    assert exc.value.code() is grpc.StatusCode.ABORTED  # type: ignore[attr-defined]
    assert "expired" in exc.value.details()  # type: ignore[attr-defined]


_DYING_CLIENT = """
import os, signal, sys
sys.path.insert(0, sys.argv[2])
import grpc
from test_media import make_pack, open_session, upload_requests
from host_agent._proto.hyperback.v1 import media_pb2_grpc as pb_grpc

stub = pb_grpc.MediaStub(grpc.insecure_channel(sys.argv[1]))
opened = open_session(stub)
writer = bytes.fromhex(opened.writer_id)
name, pack, index = make_pack(writer, [os.urandom(20000) for _ in range(3)])
stub.UploadPack(upload_requests(opened.session_id, name, pack, index))
print(name, flush=True)
name, pack, index = make_pack(writer, [os.urandom(30000) for _ in range(40)])

def then_die():
    requests = upload_requests(opened.session_id, name, pack, index)
    for i, r in enumerate(requests):
        if i == 4:
            os.kill(os.getpid(), signal.SIGKILL)
        yield r

stub.UploadPack(then_die())
"""


def test_a_client_killed_mid_upload_leaves_nothing_committed_and_gc_removes_its_packs(
        repo: Repository, server: media.MediaServer, tmp_path: Path) -> None:
    image = write_random_image(tmp_path / "a.img", 2 * MIB, seed=1)
    kept = repo.backup(image, "vm1/vda").snapshot
    packs_before = pack_files(repo.path)
    proc = subprocess.run([sys.executable, "-c", _DYING_CLIENT, server.address, str(Path(__file__).parent)],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    uploaded = proc.stdout.split()[0]
    assert uploaded in pack_files(repo.path)
    assert wait_for(lambda: files_in(repo.path / "locks") == set(), timeout=10, interval=0.1), \
        "the dead client's session kept its lock"
    assert wait_for(lambda: files_in(repo.path / "tmp") == set(), timeout=5, interval=0.1)
    assert snapshot_ids(repo.path) == {kept.id}
    collect_garbage(repo)
    assert pack_files(repo.path) == packs_before
    assert_clean(repo)


def test_a_client_side_failure_aborts_the_session_and_removes_the_spool(
        repo: Repository, remote: RemoteRepository, tmp_path: Path) -> None:
    image = write_random_image(tmp_path / "a.img", SIZE, seed=1)
    first = remote.backup(image, "vm1/vda").snapshot
    with pytest.raises(errors.UsageError, match="outside the source"):
        remote.backup(image, "vm1/vda", Policy.INCREMENTAL, changes=[(SIZE, 10)])
    with pytest.raises(errors.SourceError):
        remote.backup(tmp_path / "missing.img", "vm1/vda")
    assert snapshot_ids(repo.path) == {first.id}
    assert files_in(repo.path / "locks") == set(), "the session was not aborted"


@pytest.mark.root
def test_full_media_is_resource_exhausted_and_harm_nothing(tmp_path: Path) -> None:
    mount = tmp_path / "media"
    mount_tmpfs(mount, 24)
    try:
        repo = Repository.init(mount / "repo")
        small = write_random_image(tmp_path / "small.img", 4 * MIB, seed=1)
        big = write_random_image(tmp_path / "big.img", 40 * MIB, seed=2)
        srv = media.start({"main": repo.path}, "127.0.0.1:0", "hostb", lease=2.0)
        try:
            with RemoteRepository(srv.address, "main") as client:
                first = client.backup(small, "vm1/vda").snapshot
                with pytest.raises(errors.RepositoryFull, match="full"):
                    client.backup(big, "vm2/vda")
        finally:
            srv.stop(grace=0)
        assert snapshot_ids(repo.path) == {first.id}
        assert_clean(repo)
        collect_garbage(repo)
        assert files_in(repo.path / "tmp") == set()
        assert free_bytes(mount) > 8 * MIB
        assert restored(repo, first.id, tmp_path / "r.img") == sha256_file(small)
    finally:
        unmount(mount)


# ---------- the hyperback-media command ----------

def test_hyperback_media_serves_until_sigterm(repo: Repository, tmp_path: Path) -> None:
    with subprocess.Popen([str(MEDIA), "--listen", "127.0.0.1:0", "--repo", f"main={repo.path}",
                           "--host-name", "hostb", "--session-timeout", "5"],
                          stderr=subprocess.PIPE, text=True) as proc:
        serve_and_stop(proc, repo, tmp_path)


def serve_and_stop(proc: subprocess.Popen[str], repo: Repository, tmp_path: Path) -> None:
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()
        assert "serving main on 127.0.0.1:" in line, line
        address = line.split(" on ")[-1].strip()
        image = write_random_image(tmp_path / "a.img", 2 * MIB, seed=1)
        with RemoteRepository(address, "main") as client:
            assert client.host_name == "hostb"
            assert client.config == repo.config
            snap = client.backup(image, "vm1/vda").snapshot
        assert restored(repo, snap.id, tmp_path / "r.img") == sha256_file(image)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
        assert "Traceback" not in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_hyperback_media_help_and_bad_arguments(repo: Repository, tmp_path: Path) -> None:
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(MEDIA), *args], capture_output=True, text=True, timeout=30, check=False)

    help_ = run("--help")
    assert help_.returncode == 0 and "--repo NAME=PATH" in help_.stdout
    for args in (["--listen", "127.0.0.1:0", "--repo", "no-equals-sign"],
                 ["--listen", "127.0.0.1:0", "--repo", f"main={tmp_path}"],  # not a repository
                 ["--listen", "127.0.0.1:0", "--repo", f"main={repo.path}", "--service-ip", "10.1.1.1/24"]):
        proc = run(*args)
        assert proc.returncode == 2, (args, proc.stderr)
        assert "Traceback" not in proc.stderr
        lines = proc.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("hyperback-media: error: "), proc.stderr


def test_the_pack_scanner_reads_what_the_native_writer_writes(repo: Repository, tmp_path: Path) -> None:
    image = write_random_image(tmp_path / "a.img", 4 * MIB, seed=1, zero_every=3)
    repo.backup(image, "vm1/vda")
    for name in index_files(repo.path):
        data = (repo.path / "packs" / name[:2] / name).read_bytes()
        writer = struct.unpack_from("<16s", data, 24)[0]
        scanner = uploads.PackScanner(name, writer, repo.config.chunk_size)
        for at in range(0, len(data), 7777):
            scanner.feed(data[at:at + 7777])
        assert scanner.finish() == (repo.path / "index" / name).read_bytes()


_IN_A_NETNS = """
set -e
ip link set lo up
ip link add lan1 type veth peer name lan1p
ip link set lan1 up
ip link set lan1p up
"$MEDIA" --listen 10.77.0.100:7420 --repo "main=$REPO" --service-ip 10.77.0.100/24 --service-dev lan1 \
    --allow-plaintext 2>"$LOG" &
pid=$!
for i in $(seq 100); do grep -q serving "$LOG" && break; sleep 0.1; done
echo "held: $(ip -4 -o addr show dev lan1 | grep -c 10.77.0.100)"
"$PYTHON" -c 'from host_agent.media.client import RemoteRepository as R
from host_agent.config import TlsConfig
r = R("10.77.0.100:7420", "main", tls=TlsConfig(allow_plaintext=True))  # plain TCP off loopback: explicit
print("host:", r.host_name); r.close()'
kill -TERM $pid
wait $pid && echo "exit: 0" || echo "exit: $?"
echo "after: $(ip -4 -o addr show dev lan1 | grep -c 10.77.0.100 || true)"
"""


@pytest.mark.root
def test_hyperback_media_claims_its_service_address_and_releases_it_on_exit(
        repo: Repository, tmp_path: Path) -> None:
    """In a network namespace of its own: the address is on the interface while the service runs
    (clients reach the service at it), and gone after SIGTERM."""
    env = {**os.environ, "MEDIA": str(MEDIA), "REPO": str(repo.path), "LOG": str(tmp_path / "log"),
           "PYTHON": sys.executable}
    proc = subprocess.run(["unshare", "--net", "sh", "-c", _IN_A_NETNS], env=env, capture_output=True,
                          text=True, timeout=60, check=False)
    log = (tmp_path / "log").read_text()
    assert proc.returncode == 0, (proc.stdout, proc.stderr, log)
    lines = proc.stdout.splitlines()
    assert lines == ["held: 1", f"host: {os.uname().nodename}", "exit: 0", "after: 0"], (lines, log)
    assert "claimed service address" in log and "released service address" in log


def test_a_damaged_chunk_fails_a_remote_restore_and_leaves_no_target(
        repo: Repository, remote: RemoteRepository, tmp_path: Path) -> None:
    image = write_random_image(tmp_path / "a.img", 4 * MIB, seed=1)
    snap = repo.backup(image, "vm1/vda").snapshot
    name = sorted(index_files(repo.path))[0]
    pack = repo.path / "packs" / name[:2] / name
    with open(pack, "r+b") as f:  # a byte of the payload of a record in the middle of the pack
        f.seek(pack.stat().st_size // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(errors.CorruptChunk):
        remote.restore(snap.id, tmp_path / "out.img")
    assert not (tmp_path / "out.img").exists()
    assert files_in(tmp_path) == {"a.img", "repo", "spool"}
    assert files_in(repo.path / "locks") == set()
