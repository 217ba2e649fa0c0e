"""The native copier against plain Python references."""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import struct
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from host_agent import errors
from host_agent.storage import copier
from host_agent.storage.copier import BLOB_DATA, BLOB_TREE, NativeRepository, Progress
from host_agent.storage.packfile import INDEX_ENTRY, RECORD_HEADER, read_index

CHUNK = 4096
REAL_LIB = copier.lib


def repo_dirs(root: Path) -> Path:
    """The directories the native side writes in."""
    for sub in ("packs", "index", "tmp"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    return root


def native(root: Path) -> NativeRepository:
    return NativeRepository(str(repo_dirs(root)), os.urandom(16), CHUNK, 1 << 20, 1)


def test_selftest_passes_and_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    copier.selftest()
    assert os.listdir(tmp_path) == []


class LibWith:
    """The native library as the copier module sees it, with some functions replaced."""

    def __init__(self, real: Any, **fakes: Callable[..., int]) -> None:
        self._real, self._fakes = real, fakes

    def __getattr__(self, name: str) -> Any:
        return self._fakes[name] if name in self._fakes else getattr(self._real, name)


def wrong_hash(data: Any, length: int, out: Any) -> int:
    out[0:32] = bytes(32)
    return 0


def backup_with_a_wrong_id(*args: Any) -> int:
    rc = int(REAL_LIB.hb_backup_segment(*args))
    args[9][5] ^= 1  # out_ids: a bit of the first chunk's id
    return rc


def restore_writing_a_wrong_byte(*args: Any) -> int:
    rc = int(REAL_LIB.hb_restore_segment(*args))
    os.pwrite(args[1], b"?", 7)  # the target, past every check of the real kernel
    return rc


def index_load_refusing(*args: Any) -> int:
    args[-1].code = REAL_LIB.HB_EFORMAT
    return int(REAL_LIB.HB_EFORMAT)


def keys_swapped(r: Any, aead_key: Any, id_key: Any, err: Any) -> int:
    return int(REAL_LIB.hb_repo_set_keys(r, id_key, aead_key, err))


def sealing_under_another_key(r: Any, aead_key: Any, id_key: Any, err: Any) -> int:
    return int(REAL_LIB.hb_repo_set_keys(r, bytes(32), id_key, err))


# A kernel that computes wrong results cannot be made real in a test: these fakes stand in for one.
@pytest.mark.parametrize(("function", "fake", "named"), [
    ("hb_hash", wrong_hash, "SHA-256 disagrees with hashlib"),
    ("hb_backup_segment", backup_with_a_wrong_id, "chunk ids hb_backup_segment gave disagree with hashlib"),
    ("hb_restore_segment", restore_writing_a_wrong_byte, "restored bytes differ"),
    ("hb_index_load", index_load_refusing, "restoring raised RepositoryError"),
    ("hb_repo_set_keys", keys_swapped, "chunk id disagrees with Python's HMAC-SHA256"),
    ("hb_repo_set_keys", sealing_under_another_key, "AES-256-GCM cannot open the native record"),
])
def test_selftest_names_what_a_fake_broken_kernel_got_wrong_and_leaves_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, function: str, fake: Callable[..., int],
        named: str) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(copier, "lib", LibWith(REAL_LIB, **{function: fake}))
    with pytest.raises(errors.HyperbackError, match=f"native self-test failed: .*{named}"):
        copier.selftest()
    assert os.listdir(tmp_path) == []


@given(st.binary(max_size=70_000))
def test_native_hash_equals_hashlib_sha256(data: bytes) -> None:
    assert copier.sha256(data) == hashlib.sha256(data).digest()


def reference_backup(data: bytes) -> tuple[bytes, bytes]:
    """What hb_backup_segment must produce, computed in plain Python."""
    ids, states = b"", b""
    for off in range(0, len(data), CHUNK):
        chunk = data[off:off + CHUNK]
        if chunk.count(0) == len(chunk):
            ids += bytes(32)
            states += bytes([copier.CHUNK_ZERO])
        else:
            ids += hashlib.sha256(chunk).digest()
            states += bytes([copier.CHUNK_NEW])
    return ids, states


chunks = st.one_of(st.just(bytes(CHUNK)), st.binary(min_size=CHUNK, max_size=CHUNK),
                   st.just(b"A" * CHUNK),
                   st.binary(min_size=1, max_size=CHUNK).map(lambda b: b * (CHUNK // len(b) + 1)))


@settings(max_examples=40, deadline=None)
@given(st.lists(chunks, min_size=1, max_size=24), st.integers(0, CHUNK - 1), st.integers(1, 4))
def test_backup_segment_matches_reference_and_round_trips(
        tmp_path_factory: pytest.TempPathFactory, blocks: list[bytes], tail: int, threads: int) -> None:
    root = tmp_path_factory.mktemp("native")
    data = b"".join(blocks) + os.urandom(tail)
    src = root / "src"
    src.write_bytes(data)
    n = -(-len(data) // CHUNK)
    fd = os.open(src, os.O_RDONLY)
    with native(root) as nat:
        ids, states = nat.backup_segment(fd, 0, len(data), bytes(n), None, threads, Progress(), "src")
        nat.flush()
        want_ids, want_states = reference_backup(data)
        assert ids == want_ids
        # a repeated chunk is new once, a duplicate after that
        assert [s == copier.CHUNK_ZERO for s in states] == [s == copier.CHUNK_ZERO for s in want_states]
        distinct = {ids[i:i + 32] for i in range(0, len(ids), 32)} - {bytes(32)}
        assert states.count(copier.CHUNK_NEW) == len(distinct)
        out = root / "out"
        ofd = os.open(out, os.O_RDWR | os.O_CREAT)
        os.ftruncate(ofd, len(data))
        nat.restore_segment(ofd, 0, len(data), ids, False, threads, Progress(), "out")
        os.close(ofd)
    os.close(fd)
    assert out.read_bytes() == data


@settings(max_examples=30, deadline=None)
@given(st.lists(chunks, min_size=1, max_size=24), st.integers(0, CHUNK - 1), st.data())
def test_read_segment_gives_the_image_bytes_of_any_range(
        tmp_path_factory: pytest.TempPathFactory, blocks: list[bytes], tail: int,
        data: st.DataObject) -> None:
    root = tmp_path_factory.mktemp("native")
    image = b"".join(blocks) + os.urandom(tail)
    n = -(-len(image) // CHUNK)
    first = data.draw(st.integers(0, n - 1))
    count = data.draw(st.integers(1, n - first))
    threads = data.draw(st.integers(1, 4))
    (root / "src").write_bytes(image)
    fd = os.open(root / "src", os.O_RDONLY)
    with native(root) as nat:
        ids, _ = nat.backup_segment(fd, 0, len(image), bytes(n), None, 1, Progress(), "src")
        nat.flush()
        got = nat.read_segment(first, len(image), ids[first * 32:(first + count) * 32], threads)
    os.close(fd)
    assert got == image[first * CHUNK:(first + count) * CHUNK]


def test_read_segment_names_a_damaged_chunk_and_refuses_a_range_past_the_image(tmp_path: Path) -> None:
    with native(tmp_path) as nat:
        cid, _ = nat.store_blob(os.urandom(CHUNK), BLOB_DATA)
        nat.flush()
    name = os.listdir(tmp_path / "index")[0]
    entry = read_index(tmp_path / "index" / name)[0]
    pack = tmp_path / "packs" / name[:2] / name
    raw = bytearray(pack.read_bytes())
    raw[entry.offset + RECORD_HEADER.size + 10] ^= 0x01
    pack.write_bytes(bytes(raw))
    with native(tmp_path) as nat:
        nat.load_index(name)
        with pytest.raises(errors.CorruptChunk) as caught:
            nat.read_segment(0, 3 * CHUNK, bytes(32) + cid + bytes(32), 2)
        assert caught.value.chunk_id == cid.hex()
        assert nat.read_segment(0, 3 * CHUNK, bytes(32), 1) == bytes(CHUNK)
        with pytest.raises(errors.HyperbackError):
            nat.read_segment(3, 3 * CHUNK, bytes(32), 1)


def test_holes_planned_as_zero_are_not_read(tmp_path: Path) -> None:
    data = os.urandom(CHUNK * 4)
    (tmp_path / "src").write_bytes(data)
    fd = os.open(tmp_path / "src", os.O_RDONLY)
    progress = Progress()
    with native(tmp_path) as nat:
        todo = bytes([copier.TODO_READ, copier.TODO_ZERO, copier.TODO_ZERO, copier.TODO_READ])
        ids, _ = nat.backup_segment(fd, 0, len(data), todo, None, 2, progress, "src")
    os.close(fd)
    assert progress.read().bytes_read == 2 * CHUNK
    assert ids[32:96] == bytes(64)


def test_keep_copies_base_ids_without_reading(tmp_path: Path) -> None:
    (tmp_path / "src").write_bytes(os.urandom(CHUNK * 2))
    base = os.urandom(64)
    fd = os.open(tmp_path / "src", os.O_RDONLY)
    progress = Progress()
    with native(tmp_path) as nat:
        ids, states = nat.backup_segment(fd, 0, 2 * CHUNK, bytes([copier.TODO_KEEP, copier.TODO_READ]), base,
                                         1, progress, "src")
    os.close(fd)
    assert ids[:32] == base[:32] and states[0] == copier.CHUNK_KEPT
    assert progress.read().bytes_read == CHUNK


def test_index_written_by_c_reads_back_in_python_and_native(tmp_path: Path) -> None:
    blobs = [os.urandom(1000), b"x" * 3000, os.urandom(CHUNK)]
    with native(tmp_path) as nat:
        ids = [nat.store_blob(b, BLOB_TREE)[0] for b in blobs]
        nat.flush()
    names = os.listdir(tmp_path / "index")
    assert len(names) == 1
    entries = read_index(tmp_path / "index" / names[0])
    assert [e.id for e in entries] == ids
    assert entries[1].compressed and not entries[0].compressed
    with native(tmp_path) as nat:
        nat.load_index(names[0])
        assert [nat.read_blob(i) for i in ids] == blobs


def test_flipped_bit_in_a_pack_is_reported_with_the_chunk_id(tmp_path: Path) -> None:
    with native(tmp_path) as nat:
        cid, _ = nat.store_blob(os.urandom(2000), BLOB_DATA)
        nat.flush()
    name = os.listdir(tmp_path / "index")[0]
    entry = read_index(tmp_path / "index" / name)[0]
    pack = tmp_path / "packs" / name[:2] / name
    raw = bytearray(pack.read_bytes())
    raw[entry.offset + RECORD_HEADER.size + 10] ^= 0x01
    pack.write_bytes(bytes(raw))
    with native(tmp_path) as nat:
        nat.load_index(name)
        with pytest.raises(errors.CorruptChunk) as caught:
            nat.read_blob(cid)
        assert caught.value.chunk_id == cid.hex()
        bad, total = nat.verify(10000, 2, Progress())
        assert bad == [cid] and total == 1


def test_tampered_index_file_is_refused(tmp_path: Path) -> None:
    with native(tmp_path) as nat:
        nat.store_blob(b"abc" * 100, BLOB_DATA)
        nat.flush()
    name = os.listdir(tmp_path / "index")[0]
    path = tmp_path / "index" / name
    raw = bytearray(path.read_bytes())
    raw[40] ^= 0xFF
    path.write_bytes(bytes(raw))
    with native(tmp_path) as nat, pytest.raises(errors.RepositoryError, match="malformed"):
        nat.load_index(name)


def test_short_source_is_a_source_error(tmp_path: Path) -> None:
    (tmp_path / "src").write_bytes(os.urandom(CHUNK))
    fd = os.open(tmp_path / "src", os.O_RDONLY)
    with native(tmp_path) as nat, pytest.raises(errors.SourceError, match="ended before its size"):
        nat.backup_segment(fd, 0, 2 * CHUNK, bytes(2), None, 1, Progress(), "src")
    os.close(fd)


def test_unflushed_pack_is_deleted_on_close(tmp_path: Path) -> None:
    with native(tmp_path) as nat:
        nat.store_blob(os.urandom(100), BLOB_DATA)
        assert list((tmp_path / "tmp").iterdir())
    assert not list((tmp_path / "tmp").iterdir())
    assert not list((tmp_path / "index").iterdir())


# ---------- index files and publication, for packs written elsewhere ----------

def reference_index(pack_id: bytes, entries: list[tuple[bytes, int, int, int, int, int]]) -> bytes:
    """An index file as repository-format section 4 spells it, in plain Python."""
    body = struct.pack("<4sI16sII", b"HBIX", 1, pack_id, len(entries), 0)
    body += b"".join(struct.pack("<32sBBHQII", cid, btype, comp, 0, offset, stored, raw)
                     for cid, btype, comp, offset, stored, raw in entries)
    return body + hashlib.sha256(body).digest()


index_entries = st.lists(st.tuples(st.binary(min_size=32, max_size=32), st.integers(0, 1), st.integers(0, 1),
                                   st.integers(0, 2**64 - 1), st.integers(0, 2**32 - 1),
                                   st.integers(0, 2**32 - 1)), max_size=40)


@given(st.binary(min_size=16, max_size=16), index_entries)
def test_native_index_encoding_equals_the_format_in_plain_python(
        pack_id: bytes, entries: list[tuple[bytes, int, int, int, int, int]]) -> None:
    packed = b"".join(INDEX_ENTRY.pack(cid, t, c, 0, o, s, r) for cid, t, c, o, s, r in entries)
    assert copier.encode_index(pack_id, packed) == reference_index(pack_id, entries)


def test_python_reader_and_native_writer_agree_on_the_entry_layout() -> None:
    assert INDEX_ENTRY.size == copier.INDEX_ENTRY_LEN


def test_a_pack_published_from_outside_reads_as_one_the_writer_published(tmp_path: Path) -> None:
    """A pack staged in tmp/ (as the media service receives one) and published through the native
    publication is in place, indexed byte for byte as the pack writer indexes it, and readable."""
    blobs = [os.urandom(1500), b"text " * 600, os.urandom(CHUNK)]
    source, target = tmp_path / "source", tmp_path / "target"
    with native(source) as nat:
        ids = [nat.store_blob(b, BLOB_DATA)[0] for b in blobs]
        nat.flush()
    name = os.listdir(source / "index")[0]
    entries = b"".join(INDEX_ENTRY.pack(e.id, e.type, int(e.compressed), 0, e.offset, e.stored_len, e.raw_len)
                       for e in read_index(source / "index" / name))
    repo_dirs(target)
    staged = target / "tmp" / f"{name}.pack"
    shutil.copyfile(source / "packs" / name[:2] / name, staged)

    copier.publish_pack(target, name, staged, entries)

    assert os.listdir(target / "tmp") == []
    pack = Path("packs") / name[:2] / name
    assert (target / pack).read_bytes() == (source / pack).read_bytes()
    assert (target / "index" / name).read_bytes() == (source / "index" / name).read_bytes()
    with native(target) as nat:
        nat.load_index(name)
        assert [nat.read_blob(i) for i in ids] == blobs


def test_an_index_published_alone_is_listed_and_loads(tmp_path: Path) -> None:
    cid = os.urandom(32)
    name = os.urandom(16).hex()
    with native(tmp_path) as nat:
        copier.publish_index(tmp_path, name, INDEX_ENTRY.pack(cid, BLOB_DATA, 0, 0, 40, 100, 100))
        assert [e.id for e in read_index(tmp_path / "index" / name)] == [cid]
        nat.load_index(name)
        assert cid in nat
    assert os.listdir(tmp_path / "tmp") == []


def test_a_publication_that_fails_leaves_nothing_behind(tmp_path: Path) -> None:
    repo_dirs(tmp_path)
    name = os.urandom(16).hex()
    with pytest.raises(errors.RepositoryIOError, match="No such file"):
        copier.publish_pack(tmp_path, name, tmp_path / "tmp" / "absent.pack", b"")
    (tmp_path / "index").rmdir()  # the rename into index/ fails
    with pytest.raises(errors.RepositoryIOError, match=f"index/{name}"):
        copier.publish_index(tmp_path, name, b"")
    assert os.listdir(tmp_path / "tmp") == [] and not (tmp_path / "index").exists()


def test_publication_refuses_a_malformed_pack_name_or_entries(tmp_path: Path) -> None:
    repo_dirs(tmp_path)
    with pytest.raises(errors.HyperbackError, match="refused"):
        copier.publish_index(tmp_path, "NOT-A-PACK-NAME", b"")
    with pytest.raises(ValueError, match="52 bytes each"):
        copier.publish_index(tmp_path, os.urandom(16).hex(), bytes(51))
    assert os.listdir(tmp_path / "index") == [] and os.listdir(tmp_path / "tmp") == []


def test_the_self_test_knows_every_native_call_this_module_makes() -> None:
    # so a stale build is named as such at the agent's start instead of failing mid-backup
    source = Path(copier.__file__).read_text()
    assert set(re.findall(r"lib\.(hb_[a-z_]+)", source)) == set(copier.NATIVE_CALLS)
