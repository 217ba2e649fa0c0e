"""A snapshot served as a read-only NBD block device by real nbdkit, read by real NBD clients (nbdcopy,
nbdinfo, qemu-img, libnbd's nbdsh): the bytes are those of a restore, zero chunks are holes, a damaged
chunk fails only the reads that touch it, and a stopped export leaves nothing behind.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from system_helpers import MIB, files_in, sha256_file, write_random_image
from test_corruption import flip_bit, pack_path

from host_agent import errors
from host_agent._proto.hyperback.v1 import media_pb2 as pb
from host_agent.media import codec, reads
from host_agent.media import server as media
from host_agent.media.client import RemoteRepository
from host_agent.storage.copier import BLOB_DATA, BLOB_TREE
from host_agent.storage.export import SnapshotExport
from host_agent.storage.maptree import FANOUT, TreeReader
from host_agent.storage.packfile import RECORD_HEADER, read_index
from host_agent.storage.repository import DEFAULT_CHUNK_SIZE, Repository
from host_agent.storage.snapshot import Snapshot

SIZE = 24 * MIB
SYSTEM_PYTHON = "/usr/bin/python3"  # Debian's, which python3-libnbd's module is for


def mixed_image(path: Path, size: int = SIZE, seed: int = 7) -> Path:
    """Random pieces, holes, written zeros and a block repeated many times: what a disk holds."""
    write_random_image(path, size, seed, hole_every=3, zero_every=5, block=256 * 1024)
    repeated = hashlib.sha256(b"repeated").digest() * (DEFAULT_CHUNK_SIZE // 32)
    with open(path, "r+b") as f:
        for off in range(size // 2, size // 2 + 2 * MIB, DEFAULT_CHUNK_SIZE):
            f.seek(off)
            f.write(repeated)
    return path


def zero_chunks(image: Path, chunk_size: int = DEFAULT_CHUNK_SIZE) -> set[int]:
    """Indexes of the image's all-zero chunks, found without the product."""
    out = set()
    with open(image, "rb") as f:
        n = 0
        while chunk := f.read(chunk_size):
            if chunk.count(0) == len(chunk):
                out.add(n)
            n += 1
    return out


def nbd_map(uri: str) -> list[dict[str, int | str | bool]]:
    out = subprocess.run(["nbdinfo", "--map", "--json", uri], capture_output=True, text=True, check=True)
    found: list[dict[str, int | str | bool]] = json.loads(out.stdout)
    return found


def nbd_read(uri: str, offset: int, length: int) -> subprocess.CompletedProcess[str]:
    """Read one range through libnbd; stdout: its SHA-256."""
    script = ("import hashlib, nbd, sys\n"
              "h = nbd.NBD()\n"
              f"h.connect_uri({uri!r})\n"
              f"sys.stdout.write(hashlib.sha256(h.pread({length}, {offset})).hexdigest())\n")
    return subprocess.run([SYSTEM_PYTHON, "-c", script], capture_output=True, text=True, timeout=60,
                          check=False)


def sha256_range(path: Path, offset: int, length: int) -> str:
    with open(path, "rb") as f:
        f.seek(offset)
        return hashlib.sha256(f.read(length)).hexdigest()


def process_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # a zombie still answers: our child is reaped by stop(), so this is someone else's pid
    return Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[0] == "Z"


@pytest.fixture
def image(tmp_path: Path) -> Path:
    return mixed_image(tmp_path / "vm1.img")


@pytest.fixture
def snapshot(repo: Repository, image: Path) -> Snapshot:
    return repo.backup(image, "vm1/vda").snapshot


@pytest.fixture
def export(repo: Repository, snapshot: Snapshot, tmp_path: Path) -> Iterator[SnapshotExport]:
    with SnapshotExport(repo, snapshot.id, tmp_path / "run") as ex:
        yield ex


def test_nbdcopy_and_qemu_img_read_the_bytes_a_restore_writes(
        repo: Repository, snapshot: Snapshot, export: SnapshotExport, image: Path, tmp_path: Path) -> None:
    restored = tmp_path / "restored.img"
    repo.restore(snapshot.id, restored)
    assert export.size == SIZE == snapshot.size
    assert export.uri == f"nbd+unix:///?socket={export.socket_path}"

    subprocess.run(["nbdcopy", export.uri, str(tmp_path / "nbdcopy.img")], check=True, timeout=120)
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "raw", export.uri, str(tmp_path / "qemu.img")],
                   check=True, timeout=120)

    want = sha256_file(restored)
    assert sha256_file(image) == want
    assert sha256_file(tmp_path / "nbdcopy.img") == want
    assert sha256_file(tmp_path / "qemu.img") == want


def test_an_odd_sized_image_in_a_three_level_tree_reads_as_its_restore(
        small_repo: Repository, tmp_path: Path) -> None:
    # 4 KiB chunks: 17 MiB is 4352 chunks, 68 leaves, so the map has three levels; the last chunk is short
    image = mixed_image(tmp_path / "odd.img", size=17 * MIB + 1234, seed=9)
    snap = small_repo.backup(image, "vm2/vda").snapshot
    assert snap.tree.height == 3
    with SnapshotExport(small_repo, snap.id, tmp_path / "run") as export:
        assert export.size == 17 * MIB + 1234
        subprocess.run(["nbdcopy", export.uri, str(tmp_path / "copy.img")], check=True, timeout=120)
        tail = nbd_read(export.uri, export.size - 5000, 5000)
    assert sha256_file(tmp_path / "copy.img") == sha256_file(image)
    assert tail.stdout == sha256_range(image, 17 * MIB + 1234 - 5000, 5000)


def test_zero_chunks_are_reported_as_holes_and_the_rest_as_data(export: SnapshotExport, image: Path) -> None:
    zeros = zero_chunks(image)
    assert 0 < len(zeros) < SIZE // DEFAULT_CHUNK_SIZE
    seen_holes: set[int] = set()
    seen_data: set[int] = set()
    for extent in nbd_map(export.uri):
        offset, length, kind = int(extent["offset"]), int(extent["length"]), int(extent["type"])
        assert offset % DEFAULT_CHUNK_SIZE == 0 and length % DEFAULT_CHUNK_SIZE == 0
        chunks = set(range(offset // DEFAULT_CHUNK_SIZE, (offset + length) // DEFAULT_CHUNK_SIZE))
        (seen_holes if kind == 3 else seen_data).update(chunks)
        assert kind in (0, 3)  # data, or hole+zero
    assert seen_holes == zeros
    assert seen_data == set(range(SIZE // DEFAULT_CHUNK_SIZE)) - zeros


def test_several_connections_read_at_once(export: SnapshotExport, image: Path, tmp_path: Path) -> None:
    copies = [subprocess.Popen(["nbdcopy", "--connections=4", export.uri, str(tmp_path / f"copy{i}.img")])
              for i in range(3)]
    assert [c.wait(timeout=120) for c in copies] == [0, 0, 0]
    want = sha256_file(image)
    assert [sha256_file(tmp_path / f"copy{i}.img") for i in range(3)] == [want] * 3


def test_a_damaged_chunk_fails_only_the_reads_that_touch_it(
        repo: Repository, snapshot: Snapshot, image: Path, tmp_path: Path) -> None:
    # the chunk at 4 MiB + 32 KiB: random data, stored in exactly one record
    at = 4 * MIB + DEFAULT_CHUNK_SIZE
    with open(image, "rb") as f:
        f.seek(at)
        damaged_id = hashlib.sha256(f.read(DEFAULT_CHUNK_SIZE)).digest()
    (name, entry), = [(n, e) for n in repo.pack_names() for e in read_index(repo.path / "index" / n)
                      if e.id == damaged_id and e.type == BLOB_DATA]
    flip_bit(pack_path(repo, name), entry.offset + RECORD_HEADER.size + entry.stored_len // 2)

    with SnapshotExport(repo, snapshot.id, tmp_path / "run") as export:
        touching = nbd_read(export.uri, at - 4096, 8192)
        assert touching.returncode != 0
        assert "Input/output error" in touching.stderr, touching.stderr
        for offset, length in [(0, 4 * MIB), (at + DEFAULT_CHUNK_SIZE, 4 * MIB), (at - 4096, 4096)]:
            read = nbd_read(export.uri, offset, length)
            assert read.returncode == 0, read.stderr
            assert read.stdout == sha256_range(image, offset, length)
        assert export.running, "the damaged chunk stopped the export"
        whole = subprocess.run(["nbdcopy", export.uri, str(tmp_path / "copy.img")], capture_output=True,
                               text=True, timeout=120, check=False)
        assert whole.returncode != 0


def test_stop_leaves_no_process_no_socket_and_no_lock(
        repo: Repository, snapshot: Snapshot, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    export = SnapshotExport(repo, f"{snapshot.name}@latest", run_dir)
    assert export.snapshot == snapshot
    export.start()
    pid = export.pid
    assert pid is not None and export.socket_path.is_socket()
    assert [lk.kind for lk in repo.locks()] == ["export"]
    assert nbd_read(export.uri, 0, 4096).returncode == 0

    export.stop()
    assert process_gone(pid)
    assert not export.socket_path.exists()
    assert files_in(run_dir) == set()
    assert repo.locks() == []
    export.stop()  # idempotent


def test_an_unknown_snapshot_fails_before_any_process(repo: Repository, snapshot: Snapshot,
                                                      tmp_path: Path) -> None:
    with pytest.raises(errors.SnapshotNotFound):
        SnapshotExport(repo, "vm9/vda@latest", tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_a_repository_that_cannot_be_opened_fails_start_with_its_error(
        repo: Repository, snapshot: Snapshot, tmp_path: Path) -> None:
    export = SnapshotExport(repo, snapshot.id, tmp_path / "run")
    (repo.path / "snapshots" / snapshot.id).unlink()  # forgotten between resolve and start
    with pytest.raises(errors.SnapshotNotFound):
        export.start()
    assert not export.running
    assert not export.socket_path.exists()


# ---------- repositories behind a media service ----------

@pytest.fixture
def server(repo: Repository) -> Iterator[media.MediaServer]:
    """A media service on a free port of 127.0.0.1 serving ``repo`` as "main"."""
    srv = media.start({"main": repo.path}, "127.0.0.1:0", "hostb")
    yield srv
    srv.stop(grace=0)


@pytest.fixture
def remote(server: media.MediaServer) -> Iterator[RemoteRepository]:
    with RemoteRepository(server.address, "main", timeout=30) as client:
        yield client


def test_a_snapshot_behind_a_media_service_reads_as_its_restore(
        repo: Repository, snapshot: Snapshot, remote: RemoteRepository, image: Path, tmp_path: Path) -> None:
    restored = tmp_path / "restored.img"
    remote.restore(snapshot.id, restored)
    with SnapshotExport(remote, "vm1/vda@latest", tmp_path / "run") as export:
        assert export.snapshot == snapshot
        subprocess.run(["nbdcopy", "--connections=2", export.uri, str(tmp_path / "copy.img")], check=True,
                       timeout=120)
        holes = {int(e["offset"]) // DEFAULT_CHUNK_SIZE + i for e in nbd_map(export.uri) if e["type"] == 3
                 for i in range(int(e["length"]) // DEFAULT_CHUNK_SIZE)}
    assert sha256_file(tmp_path / "copy.img") == sha256_file(restored) == sha256_file(image)
    assert holes == zero_chunks(image)
    assert files_in(tmp_path / "run") == set()


def test_a_damaged_chunk_behind_a_media_service_fails_only_its_reads(
        repo: Repository, snapshot: Snapshot, remote: RemoteRepository, image: Path, tmp_path: Path) -> None:
    at = 4 * MIB + DEFAULT_CHUNK_SIZE
    with open(image, "rb") as f:
        f.seek(at)
        damaged_id = hashlib.sha256(f.read(DEFAULT_CHUNK_SIZE)).digest()
    (name, entry), = [(n, e) for n in repo.pack_names() for e in read_index(repo.path / "index" / n)
                      if e.id == damaged_id and e.type == BLOB_DATA]
    flip_bit(pack_path(repo, name), entry.offset + RECORD_HEADER.size + entry.stored_len // 2)

    with SnapshotExport(remote, snapshot.id, tmp_path / "run") as export:
        assert nbd_read(export.uri, at, 4096).returncode != 0
        for offset, length in [(0, 4 * MIB), (at + DEFAULT_CHUNK_SIZE, 4 * MIB)]:
            read = nbd_read(export.uri, offset, length)
            assert read.returncode == 0, read.stderr
            assert read.stdout == sha256_range(image, offset, length)


def read_request(snapshot: Snapshot, first: int, count: int, ids_only: bool = False) -> pb.ReadChunksRequest:
    return pb.ReadChunksRequest(destination="main", snapshot_id=snapshot.id, first=first, count=count,
                                ids_only=ids_only)


def test_read_chunks_answers_only_whole_ids_of_the_destination_and_bounded_ranges(
        snapshot: Snapshot, server: media.MediaServer, remote: RemoteRepository) -> None:
    limit = codec.read_limit(snapshot.chunk_size)
    entries = snapshot.tree.entries
    bad = {
        "a range past the end": read_request(snapshot, entries - 1, 2),
        "an empty range": read_request(snapshot, 0, 0),
        "a range above the limit": read_request(snapshot, 0, limit + 1),
        "an id prefix": pb.ReadChunksRequest(destination="main", snapshot_id=snapshot.id[:8], first=0,
                                             count=1),
    }
    for what, request in bad.items():
        with pytest.raises(grpc.RpcError) as exc:
            list(remote.stub.ReadChunks(request))
        assert exc.value.code() is grpc.StatusCode.INVALID_ARGUMENT, what
    for request in (pb.ReadChunksRequest(destination="main", snapshot_id="0" * 16, first=0, count=1),
                    pb.ReadChunksRequest(destination="other", snapshot_id=snapshot.id, first=0, count=1)):
        with pytest.raises(grpc.RpcError) as exc:
            list(remote.stub.ReadChunks(request))
        assert exc.value.code() is grpc.StatusCode.NOT_FOUND
    messages = list(remote.stub.ReadChunks(read_request(snapshot, entries - limit, limit)))
    assert len(messages[0].chunk_ids) == limit * 32
    assert sum(len(m.data) for m in messages[1:]) <= limit * snapshot.chunk_size


def test_the_servers_reader_of_a_snapshot_closes_when_idle_and_its_lock_goes(
        repo: Repository, snapshot: Snapshot, server: media.MediaServer, remote: RemoteRepository) -> None:
    list(remote.stub.ReadChunks(read_request(snapshot, 0, 64, ids_only=True)))
    readers = server.servicer.readers
    assert len(readers) == 1
    assert [lk.kind for lk in repo.locks()] == ["media-export"]
    readers.sweep(now=time.monotonic() + reads.IDLE)
    assert len(readers) == 0
    assert repo.locks() == []


def test_block_status_of_a_large_disk_answers_in_parts_that_cover_it(
        repo: Repository, tmp_path: Path) -> None:
    # 8 GiB, nearly all holes: nbdinfo asks about the whole disk and gets it in parts
    image = tmp_path / "big.img"
    with open(image, "wb") as f:
        f.truncate(8 << 30)
        f.seek(5 << 30)
        f.write(os.urandom(MIB))
    snap = repo.backup(image, "vm3/vda").snapshot
    with SnapshotExport(repo, snap.id, tmp_path / "run") as export:
        extents = nbd_map(export.uri)
    data = [(int(e["offset"]), int(e["length"])) for e in extents if e["type"] == 0]
    assert data == [(5 << 30, MIB)]
    assert sum(int(e["length"]) for e in extents) == 8 << 30


def test_a_damaged_leaf_of_the_map_fails_only_the_reads_it_maps(
        repo: Repository, snapshot: Snapshot, image: Path, tmp_path: Path) -> None:
    with repo.session("test", writer=False) as native:
        leaf_ids = list(TreeReader(native, snapshot.tree).leaf_ids())
    (name, entry), = [(n, e) for n in repo.pack_names() for e in read_index(repo.path / "index" / n)
                      if e.id == leaf_ids[3] and e.type == BLOB_TREE]
    flip_bit(pack_path(repo, name), entry.offset + RECORD_HEADER.size + entry.stored_len // 2)
    leaf_bytes = FANOUT * DEFAULT_CHUNK_SIZE  # 2 MiB of image per leaf

    with SnapshotExport(repo, snapshot.id, tmp_path / "run") as export:
        assert nbd_read(export.uri, 3 * leaf_bytes + 4096, 4096).returncode != 0
        for offset in (2 * leaf_bytes, 4 * leaf_bytes):
            read = nbd_read(export.uri, offset, leaf_bytes)
            assert read.returncode == 0, read.stderr
            assert read.stdout == sha256_range(image, offset, leaf_bytes)
