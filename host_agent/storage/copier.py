"""Typed Python face of the native copier (``native/copier.c``).

This is the only module that touches cffi's ``lib``. Every native call
releases the GIL (cffi does so for every call), checks the returned status and
turns a failure into an exception of :mod:`host_agent.errors`.

The native side knows chunks, packs and index files; it knows nothing of
snapshots, names or policies. It is the one writer of index files and of the
order in which packs and indexes are published (``encode_index``,
``publish_pack``, ``publish_index``): Python code that has a pack or index to
publish hands it the packed entries.
"""
from __future__ import annotations

import errno
import hashlib
import hmac
import os
import random
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from host_agent import errors
from host_agent.storage import packfile
from host_agent.storage._copier import ffi, lib  # type: ignore[import-not-found]  # built by cffi
from host_agent.storage.keys import RepoKeys

# every hb_ call this module makes (the self-test checks the build has them all)
NATIVE_CALLS = (
    "hb_backup_segment", "hb_flush", "hb_hash", "hb_index_contains", "hb_index_count", "hb_index_encode",
    "hb_index_load", "hb_index_reserve", "hb_publish_index", "hb_publish_pack", "hb_read_blob",
    "hb_read_segment", "hb_repo_close", "hb_repo_open", "hb_repo_set_keys", "hb_restore_segment",
    "hb_store_blob", "hb_verify_index",
)

ID_LEN: int = lib.HB_ID_LEN
ZERO_ID = bytes(ID_LEN)
PACK_ID_LEN: int = lib.HB_PACK_ID_LEN
INDEX_ENTRY_LEN: int = lib.HB_INDEX_ENTRY_LEN

BLOB_DATA = lib.HB_BLOB_DATA
BLOB_TREE = lib.HB_BLOB_TREE

TODO_READ = lib.HB_TODO_READ
TODO_ZERO = lib.HB_TODO_ZERO
TODO_KEEP = lib.HB_TODO_KEEP

CHUNK_NEW = lib.HB_CHUNK_NEW
CHUNK_DUP = lib.HB_CHUNK_DUP
CHUNK_ZERO = lib.HB_CHUNK_ZERO
CHUNK_KEPT = lib.HB_CHUNK_KEPT

_T = TypeVar("_T")
_UNCLEARED = ffi.new_allocator(should_clear_after_alloc=False)

_WHERE = {
    lib.HB_AT_SOURCE: "reading the source",
    lib.HB_AT_REPO_WRITE: "writing the repository",
    lib.HB_AT_REPO_READ: "reading the repository",
    lib.HB_AT_TARGET: "writing the target",
}


@dataclass(frozen=True)
class Counters:
    """A consistent-enough reading of a running job's counters."""

    bytes_done: int
    bytes_read: int
    bytes_new: int
    bytes_stored: int
    bytes_changed: int
    chunks_new: int
    chunks_dup: int
    chunks_zero: int


class Progress:
    """Counters that native workers update while Python polls them from another thread."""

    def __init__(self) -> None:
        self._p: Any = ffi.new("hb_progress *")

    def read(self) -> Counters:
        p = self._p
        return Counters(p.bytes_done, p.bytes_read, p.bytes_new, p.bytes_stored, p.bytes_changed,
                        p.chunks_new, p.chunks_dup, p.chunks_zero)

    def add_done(self, n: int) -> None:
        """Count bytes dealt with outside the workers (only while no worker runs)."""
        self._p.bytes_done += n

    def cancel(self) -> None:
        """Ask the workers to stop at their next batch; the running call raises Cancelled."""
        self._p.cancel = 1


def _raise(err: Any, label: str) -> None:
    code, err_no, where = err.code, err.err_no, err.where
    chunk = bytes(ffi.buffer(err.id, ID_LEN)).hex()
    if code == lib.HB_ESYS:
        if err_no == errno.ECANCELED:
            raise errors.Cancelled("interrupted; nothing partial was published")
        reason = os.strerror(err_no)
        if where == lib.HB_AT_SOURCE:
            raise errors.SourceError(f"cannot read {label}: {reason}")
        if where == lib.HB_AT_TARGET:
            raise errors.TargetError(f"cannot write {label}: {reason}")
        if where == lib.HB_AT_REPO_WRITE and err_no in (errno.ENOSPC, errno.EDQUOT):
            raise errors.RepositoryFull(
                f"the backup media is full ({reason}) while writing {label}: free space or prune, "
                "then run again; earlier snapshots are intact")
        raise errors.RepositoryIOError(f"{_WHERE.get(where, 'I/O')} failed for {label}: {reason}")
    if code == lib.HB_ESHORT:
        raise errors.SourceError(f"{label} ended before its size: did it shrink while being read?")
    if code == lib.HB_ECORRUPT:
        raise errors.CorruptChunk(
            f"chunk {chunk} is damaged (failed its header, authentication, decompression or hash check); "
            "run 'hyperback verify' to list what uses it", chunk)
    if code == lib.HB_EMISSING:
        raise errors.MissingChunk(
            f"chunk {chunk} is missing from the repository; run 'hyperback check'", chunk)
    if code == lib.HB_EFORMAT:
        raise errors.RepositoryError(f"{label} is malformed (bad magic, version, length or checksum)")
    if code == lib.HB_ENOMEM:
        raise MemoryError(f"out of memory while {_WHERE.get(where, 'working')} on {label}")
    raise errors.HyperbackError(f"native copier refused the call on {label} (status {code})")


def _check(rc: int, err: Any, label: str) -> None:
    if rc != lib.HB_OK:
        _raise(err, label)


SHORT_CALL = 256  # chunks: a call this small ends before anyone could press Ctrl-C twice


def _interruptible(call: Callable[[], int], progress: Progress, units: int) -> int:
    """Run a long native call so that Ctrl-C stops it within one batch of chunks.

    Python runs signal handlers only between bytecodes of the main thread, never
    during a native call; so from the main thread the call runs in a worker
    while the main thread waits, and a KeyboardInterrupt cancels the workers.
    Short calls (incrementals run one per changed leaf) skip the worker thread.
    """
    if units <= SHORT_CALL or threading.current_thread() is not threading.main_thread():
        return call()
    result: list[int] = []
    # An Event, not Thread.join: a join interrupted by KeyboardInterrupt may mark a thread
    # that still runs as finished (CPython gh-90882).
    done = threading.Event()

    def work() -> None:
        try:
            result.append(call())
        finally:
            done.set()

    try:
        threading.Thread(target=work, name="copier", daemon=True).start()
        while not done.wait(0.1):
            pass
    except KeyboardInterrupt:
        progress.cancel()
        # The workers use buffers this frame owns: wait for them whatever else arrives.
        while not done.is_set():
            try:
                done.wait()
            except KeyboardInterrupt:
                continue
        raise
    return result[0]


def _entry_count(entries: bytes) -> int:
    if len(entries) % INDEX_ENTRY_LEN:
        raise ValueError(f"index entries are {INDEX_ENTRY_LEN} bytes each, not {len(entries)} bytes in all")
    return len(entries) // INDEX_ENTRY_LEN


def encode_index(pack_id: bytes, entries: bytes) -> bytes:
    """The index file (repository-format section 4) of pack ``pack_id``, listing ``entries``:
    index entries packed as ``packfile.INDEX_ENTRY``, in order."""
    if len(pack_id) != PACK_ID_LEN:
        raise ValueError(f"a pack id is {PACK_ID_LEN} bytes")
    count = _entry_count(entries)
    cap = lib.HB_INDEX_HEADER_LEN + len(entries) + ID_LEN
    out = ffi.new("uint8_t[]", cap)
    n = ffi.new("uint64_t *")
    err = ffi.new("hb_error *")
    _check(lib.hb_index_encode(pack_id, entries, count, out, cap, n, err), err,
           f"the index of pack {pack_id.hex()}")
    return bytes(ffi.buffer(out, n[0]))


def publish_index(root: str | os.PathLike[str], name: str, entries: bytes) -> None:
    """Make ``index/NAME`` of the repository at ``root`` list ``entries``, whole and durable
    (repository-format section 6, step 3)."""
    err = ffi.new("hb_error *")
    _check(lib.hb_publish_index(os.fsencode(root), name.encode(), entries, _entry_count(entries), err), err,
           f"index/{name}")


def publish_pack(root: str | os.PathLike[str], name: str, staged: str | os.PathLike[str],
                 entries: bytes) -> None:
    """Publish the pack file ``staged`` (in ``root``'s tmp/) as pack NAME, then its index listing
    ``entries``, each durable before the next step (repository-format section 6, steps 2 and 3)."""
    err = ffi.new("hb_error *")
    _check(lib.hb_publish_pack(os.fsencode(root), name.encode(), os.fsencode(staged), entries,
                               _entry_count(entries), err), err, f"pack {name}")


def sha256(data: bytes) -> bytes:
    """The chunk identity function, as the native side computes it."""
    out = ffi.new("uint8_t[32]")
    if lib.hb_hash(data, len(data), out) != lib.HB_OK:
        raise errors.HyperbackError("native SHA-256 failed")
    return bytes(out)


class NativeRepository:
    """The native half of an open repository: chunk index, pack writer, pack reader.

    After any failed write the handle refuses further writes (its index may name
    chunks that never became durable): close it and open a new one.
    """

    def __init__(self, root: str, writer_id: bytes, chunk_size: int, pack_target: int,
                 zstd_level: int, keys: RepoKeys | None = None) -> None:
        """``keys``: an encrypted repository's (docs/repository-format.md, section 11)."""
        self.chunk_size = chunk_size
        self.root = root
        err = ffi.new("hb_error *")
        out = ffi.new("hb_repo **")
        _check(lib.hb_repo_open(root.encode(), writer_id, chunk_size, pack_target, zstd_level, out, err),
               err, root)
        self._r: Any | None = out[0]
        if keys is not None:
            rc = lib.hb_repo_set_keys(self._r, keys.aead_key, keys.id_key, err)
            if rc != lib.HB_OK:
                self.close()
                _raise(err, f"the keys of {root}")

    def close(self) -> None:
        """Release memory; an unflushed pack is deleted (nothing refers to it)."""
        if self._r is not None:
            lib.hb_repo_close(self._r)
            self._r = None

    def __enter__(self) -> NativeRepository:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def _h(self) -> Any:
        if self._r is None:
            raise errors.HyperbackError("native repository handle used after close")
        return self._r

    def load_index(self, pack_name: str) -> None:
        err = ffi.new("hb_error *")
        _check(lib.hb_index_load(self._h, pack_name.encode(), err), err, f"index file {pack_name}")

    def reserve(self, more: int) -> None:
        err = ffi.new("hb_error *")
        _check(lib.hb_index_reserve(self._h, more, err), err, "the chunk index")

    def __len__(self) -> int:
        return int(lib.hb_index_count(self._h))

    def __contains__(self, chunk_id: bytes) -> bool:
        return bool(lib.hb_index_contains(self._h, chunk_id))

    def backup_segment(self, fd: int, first_chunk: int, src_size: int, todo: bytes,
                       base_ids: bytes | None, threads: int, progress: Progress,
                       label: str, located: tuple[Any, Any] | None = None) -> tuple[bytes, bytes]:
        """Back up ``len(todo)`` chunks; return (ids, outcomes), 32 bytes and 1 byte per chunk.

        ``located``: per-chunk (fds, offsets) arrays (``array('i')``, ``array('Q')``) where
        the chunks are not at their own offset in ``fd``.
        """
        n = len(todo)
        if base_ids is not None and len(base_ids) != n * ID_LEN:
            raise ValueError("base_ids must hold 32 bytes per chunk")
        ids = ffi.new("uint8_t[]", n * ID_LEN)
        states = ffi.new("uint8_t[]", n)
        err = ffi.new("hb_error *")
        base = base_ids if base_ids is not None else ffi.NULL
        fds = offsets = ffi.NULL
        if located is not None:
            fds = ffi.from_buffer("int32_t[]", located[0])
            offsets = ffi.from_buffer("uint64_t[]", located[1])
        rc = _interruptible(lambda: lib.hb_backup_segment(
            self._h, fd, first_chunk, src_size, n, todo, base, fds, offsets, ids, states,
            threads if n > SHORT_CALL else 1, progress._p, err), progress, n)
        _check(rc, err, label)
        return bytes(ffi.buffer(ids)), bytes(ffi.buffer(states))

    def store_blob(self, data: bytes, blob_type: int) -> tuple[bytes, bool]:
        """Store one blob (a tree page); return (id, whether it was new)."""
        out = ffi.new("uint8_t[32]")
        was_new = ffi.new("int *")
        err = ffi.new("hb_error *")
        _check(lib.hb_store_blob(self._h, data, len(data), blob_type, out, was_new, err), err,
               "a tree page")
        return bytes(out), bool(was_new[0])

    def read_blob(self, chunk_id: bytes) -> bytes:
        """Read, decompress and verify one blob."""
        buf = ffi.new("uint8_t[]", self.chunk_size)
        n = ffi.new("uint32_t *")
        err = ffi.new("hb_error *")
        _check(lib.hb_read_blob(self._h, chunk_id, buf, self.chunk_size, n, err), err,
               f"blob {chunk_id.hex()}")
        return bytes(ffi.buffer(buf, n[0]))

    def flush(self) -> None:
        """Make every chunk written so far durable and indexed."""
        err = ffi.new("hb_error *")
        _check(lib.hb_flush(self._h, err), err, "the current pack")

    def restore_segment(self, fd: int, first_chunk: int, size: int, ids: bytes, write_zeros: bool,
                        threads: int, progress: Progress, label: str) -> None:
        err = ffi.new("hb_error *")
        rc = _interruptible(lambda: lib.hb_restore_segment(
            self._h, fd, first_chunk, size, len(ids) // ID_LEN, ids, int(write_zeros), threads, progress._p,
            err), progress, len(ids) // ID_LEN)
        _check(rc, err, label)

    def read_segment(self, first_chunk: int, size: int, ids: bytes, threads: int) -> bytes:
        """Chunks ``first_chunk …`` (``ids``, 32 bytes each) of an image of ``size`` bytes, read and
        verified by ``threads`` workers: the image's bytes from ``first_chunk · chunk_size`` on,
        zero chunks as zeros, the image's last chunk as short as it is."""
        n = len(ids) // ID_LEN
        cs = self.chunk_size
        length = min(n * cs, size - first_chunk * cs)
        out = _UNCLEARED("uint8_t[]", max(length, 1))  # every byte is written or the call fails
        err = ffi.new("hb_error *")
        _check(lib.hb_read_segment(self._h, first_chunk, size, n, ids, out, length, threads, Progress()._p,
                                   err), err, f"chunks {first_chunk}-{first_chunk + n - 1}")
        return bytes(ffi.buffer(out, length))

    def verify(self, per_10000: int, threads: int, progress: Progress,
               max_report: int = 100_000) -> tuple[list[bytes], int]:
        """Re-read and re-hash a sample of the index; return (bad ids, up to max_report; total bad)."""
        bad = ffi.new("uint8_t[]", max_report * ID_LEN)
        nbad = ffi.new("uint32_t *")
        err = ffi.new("hb_error *")
        rc = _interruptible(lambda: lib.hb_verify_index(
            self._h, per_10000, threads, bad, max_report, nbad, progress._p, err), progress, 1 << 30)
        _check(rc, err, "the repository")
        total = int(nbad[0])
        raw = bytes(ffi.buffer(bad, min(total, max_report) * ID_LEN))
        return [raw[i:i + ID_LEN] for i in range(0, len(raw), ID_LEN)], total


# ---------- the start-up self-test ----------

SELFTEST_CHUNK = 4096  # the smallest chunk size: the round trip stays a few pages


def selftest() -> None:
    """Check the native module against plain Python; raise HyperbackError naming what disagreed.

    It runs before the native module is trusted with backups (the agent's start, .ci/setup, the
    appliance's build): a broken build or library must stop them, not corrupt them. SHA-256 is
    compared with hashlib; then a few chunks (random, zero, compressible text twice, a short last
    one) go through a throw-away repository: backed up with hb_backup_segment, flushed (a pack and
    its index, published as every pack is), reloaded in a new handle and restored. The ids must be
    hashlib's, the index must pass packfile.read_index and list the new chunks, the restored bytes
    must be the source's, and so must those hb_read_segment reads into memory. Then one random
    blob goes through an encrypted handle: its id must be Python's HMAC-SHA256, its record must open
    with cryptography's AES-256-GCM (docs/repository-format.md, 11.3) and read back through the
    native reader. It takes milliseconds; the scratch directory goes in every case.
    """
    _check_build_is_current()
    sample = bytes(range(256)) * 257
    if sha256(sample) != hashlib.sha256(sample).digest():
        raise errors.HyperbackError("native self-test failed: SHA-256 disagrees with hashlib")
    try:
        with tempfile.TemporaryDirectory(prefix="hyperback-selftest-") as scratch:
            _round_trip(Path(scratch))
            _sealed_round_trip(Path(scratch) / "sealed")
    except OSError as e:
        raise errors.EnvironmentProblem(f"the native self-test cannot use a scratch directory: {e}") from e


def _check_build_is_current() -> None:
    # a checkout updated without rebuilding: say so, not AttributeError from deep in a backup
    missing = [name for name in NATIVE_CALLS if not hasattr(lib, name)]
    if missing:
        raise errors.EnvironmentProblem(
            f"the native copier was built from older sources (it lacks {', '.join(missing)}): rebuild it "
            f"with 'pip install -e .' (or 'bash .ci/setup')")


def _disagree(what: str) -> errors.HyperbackError:
    return errors.HyperbackError(f"native self-test failed: {what}")


def _native_step(what: str, step: Callable[[], _T]) -> _T:
    """Run a step of the round trip; an error the native side reports is the self-test's failure."""
    try:
        return step()
    except errors.HyperbackError as e:
        raise _disagree(f"{what} raised {type(e).__name__}: {e}") from e


def _round_trip(scratch: Path) -> None:
    cs = SELFTEST_CHUNK
    rng = random.Random(1)  # the same bytes every run: a failure reproduces
    text = (b"hyperback native self-test: a line that compresses well\n" * (cs // 32))[:cs]
    chunks = [rng.randbytes(cs), bytes(cs), text, text, rng.randbytes(cs // 3)]
    data = b"".join(chunks)
    want_ids = b"".join(hashlib.sha256(c).digest() if any(c) else ZERO_ID for c in chunks)
    want_states = bytes([CHUNK_NEW, CHUNK_ZERO, CHUNK_NEW, CHUNK_DUP, CHUNK_NEW])
    root, source, target = scratch / "repo", scratch / "source", scratch / "target"
    for sub in ("packs", "index", "tmp"):
        (root / sub).mkdir(parents=True)
    source.write_bytes(data)
    with open(target, "wb") as f:
        f.truncate(len(data))  # holes where the zero chunk goes, as a restore to a file leaves it

    def open_repo() -> NativeRepository:
        return NativeRepository(str(root), os.urandom(16), cs, 1 << 20, 1)

    def back_up() -> tuple[bytes, bytes]:
        fd = os.open(source, os.O_RDONLY | os.O_CLOEXEC)
        try:
            with open_repo() as native:
                out = native.backup_segment(fd, 0, len(data), bytes([TODO_READ]) * len(chunks), None, 1,
                                            Progress(), "the self-test's source")
                native.flush()
                return out
        finally:
            os.close(fd)

    ids, states = _native_step("backing up", back_up)
    if ids != want_ids:
        raise _disagree("the chunk ids hb_backup_segment gave disagree with hashlib.sha256")
    if states != want_states:
        raise _disagree(f"hb_backup_segment classed the chunks {list(states)}, not {list(want_states)} "
                        "(new, zero, new, duplicate, new)")
    names, left = sorted(os.listdir(root / "index")), sorted(os.listdir(root / "tmp"))
    if len(names) != 1 or left or not (root / "packs" / names[0][:2] / names[0]).is_file():
        raise _disagree(f"the flush left index/ {names} and tmp/ {left}, not one index of a published pack "
                        "and nothing in tmp/")
    index = root / "index" / names[0]
    try:
        entries = packfile.read_index(index)
    except errors.RepositoryError as e:
        raise _disagree(f"the Python reader refuses the index file: {e}") from e
    new_ids = [want_ids[i:i + ID_LEN] for i in (0, 2 * ID_LEN, 4 * ID_LEN)]
    if sorted(e.id for e in entries) != sorted(new_ids):
        raise _disagree("the index file does not list the new chunks, each once")
    if [e.compressed for e in sorted(entries, key=lambda e: new_ids.index(e.id))] != [False, True, False]:
        raise _disagree("zstd: random chunks must be stored raw and the text compressed")
    packed = b"".join(packfile.INDEX_ENTRY.pack(e.id, e.type, int(e.compressed), 0, e.offset, e.stored_len,
                                                e.raw_len) for e in entries)
    encoded = _native_step("encoding the index", lambda: encode_index(bytes.fromhex(index.name), packed))
    if encoded != index.read_bytes():
        raise _disagree("hb_index_encode disagrees with the index file the flush wrote")

    def restore() -> None:
        fd = os.open(target, os.O_WRONLY | os.O_CLOEXEC)
        try:
            with open_repo() as native:
                native.load_index(index.name)
                native.restore_segment(fd, 0, len(data), ids, False, 1, Progress(), "the self-test's target")
        finally:
            os.close(fd)

    _native_step("restoring", restore)
    if target.read_bytes() != data:
        raise _disagree("the restored bytes differ from the source's")

    def read() -> bytes:
        with open_repo() as native:
            native.load_index(index.name)
            return native.read_segment(1, len(data), ids[ID_LEN:], 2)

    if _native_step("reading into memory", read) != data[cs:]:
        raise _disagree("hb_read_segment's bytes differ from the source's")


def _sealed_round_trip(root: Path) -> None:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM  # only the self-test needs it here

    keys = RepoKeys(bytes(range(32)), bytes(range(32, 64)))
    blob = random.Random(2).randbytes(SELFTEST_CHUNK)  # random: stored raw, so the record opens to it
    for sub in ("packs", "index", "tmp"):
        (root / sub).mkdir(parents=True)

    def open_repo() -> NativeRepository:
        return NativeRepository(str(root), os.urandom(16), SELFTEST_CHUNK, 1 << 20, 1, keys)

    def store() -> bytes:
        with open_repo() as native:
            cid = native.store_blob(blob, BLOB_DATA)[0]
            native.flush()
            return cid

    cid = _native_step("storing an encrypted blob", store)
    if cid != hmac.digest(keys.id_key, blob, "sha256"):
        raise _disagree("an encrypted repository's chunk id disagrees with Python's HMAC-SHA256")
    (name,) = os.listdir(root / "index")
    (entry,) = packfile.read_index(root / "index" / name)
    record = (root / "packs" / name[:2] / name).read_bytes()[entry.offset:entry.offset + entry.record_len]
    header, payload = record[:packfile.RECORD_HEADER.size], record[packfile.RECORD_HEADER.size:]
    try:
        clear = AESGCM(keys.aead_key).decrypt(payload[:lib.HB_NONCE_LEN], payload[lib.HB_NONCE_LEN:], header)
    except Exception as e:  # InvalidTag, or a malformed record: the native sealing is wrong either way
        raise _disagree(f"cryptography's AES-256-GCM cannot open the native record ({e!r})") from e
    if clear != blob:
        raise _disagree("the native record opens to other bytes than the blob's")

    def read() -> bytes:
        with open_repo() as native:
            native.load_index(name)
            return native.read_blob(cid)

    if _native_step("reading an encrypted blob", read) != blob:
        raise _disagree("the native reader opens an encrypted blob to other bytes")
