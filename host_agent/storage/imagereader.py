"""Random reads of a snapshot's image, chunk by chunk, without restoring it (what an export serves).

An :class:`ImageReader` answers "the bytes at [offset, offset + length)" and "which of them are holes"
from a :class:`ChunkSource`: the snapshot's chunk ids one leaf at a time, and the verified bytes of
chunks. Two sources exist: :class:`LocalChunks` reads a repository on this host through the native
reader (``NativeRepository.read_blob``: decompressed and hash-checked), and the media client's reads
a repository behind a media service. The all-zero id stands for an all-zero chunk, never stored
(docs/repository-format.md, "Trees"): it is answered with zeros without a read and reported as a hole.

Chunk bytes go through a bounded LRU cache keyed by chunk id, so repeated blocks of an image (and
one block read by several clients) are read and verified once. A chunk that fails its checks fails
only the reads that touch it.
"""
from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from host_agent import errors
from host_agent.storage.copier import ID_LEN, ZERO_ID, NativeRepository
from host_agent.storage.maptree import FANOUT, TreeReader
from host_agent.storage.snapshot import Snapshot

EXTENT_CHUNKS = 64 * 64  # most chunks one block-status answer covers (64 leaves)
LEAVES_CACHED = 4096  # leaf pages kept (2 KiB each): the ids of 8 GiB of image at 32 KiB chunks


class ChunkSource(Protocol):
    """Where an :class:`ImageReader` gets a snapshot's chunk ids and chunks. Called from many threads."""

    snapshot: Snapshot
    window_bytes: int  # the least a read fetches (aligned); 0: just what the request needs

    def leaf(self, index: int) -> bytes:
        """The ids of chunks ``FANOUT·index …`` (FANOUT of them, fewer in the last leaf)."""
        ...

    def chunks(self, first: int, ids: Sequence[bytes]) -> list[bytes]:
        """The verified bytes of chunks ``first, first + 1, …`` whose ids are ``ids`` (none all-zero
        is asked for; a zero id in ``ids`` may be answered with anything). Raises IntegrityError for
        a damaged or missing chunk."""
        ...

    def close(self) -> None:
        ...


class LocalChunks:
    """A snapshot of a repository on this host, read through the native reader under a reader lock
    (garbage collection sweeps nothing the export may still read)."""

    window_bytes = 0  # a native call costs little: a request reads what it needs

    def __init__(self, repo_path: Path, snapshot_id: str) -> None:
        # imported here: the repository module is big, and this module is also the plugin's
        from host_agent.storage.repository import Repository
        self._stack = ExitStack()
        try:
            repo = Repository.open(repo_path)
            self.snapshot = repo.resolve(snapshot_id)
            self._native: NativeRepository = self._stack.enter_context(repo.session("export", writer=False))
        except BaseException:
            self._stack.close()
            raise
        self._tree = TreeReader(self._native, self.snapshot.tree)
        self._cores = os.cpu_count() or 1

    def leaf(self, index: int) -> bytes:
        return self._tree.leaf_at(index)

    def chunks(self, first: int, ids: Sequence[bytes]) -> list[bytes]:
        # One native call for the lot, outside the handle's single-call lock (read_blob's), so that
        # concurrent requests read on every core. A chunk costs ~100 µs to check (SHA-256); a big
        # request gets more workers, one per 8 chunks: fewer would not pay for starting a thread.
        threads = max(1, min(self._cores, len(ids) // 8))
        data = self._native.read_segment(first, self.snapshot.size, b"".join(ids), threads)
        cs = self.snapshot.chunk_size
        return [data[n * cs:(n + 1) * cs] if cid != ZERO_ID else b"" for n, cid in enumerate(ids)]

    def close(self) -> None:
        self._stack.close()


def open_local(params: Mapping[str, str], snapshot_id: str) -> LocalChunks:
    """The plugin's opener for ``Repository.export_params()``."""
    return LocalChunks(Path(params["repo"]), snapshot_id)


class ChunkCache:
    """Chunk bytes by id, least recently used out first, at most ``capacity`` bytes. Thread-safe."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._items: OrderedDict[bytes, bytes] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, chunk_id: bytes) -> bytes | None:
        with self._lock:
            data = self._items.get(chunk_id)
            if data is None:
                self.misses += 1
                return None
            self._items.move_to_end(chunk_id)
            self.hits += 1
            return data

    def put(self, chunk_id: bytes, data: bytes) -> None:
        if len(data) > self.capacity:
            return
        with self._lock:
            if chunk_id in self._items:
                return
            self._items[chunk_id] = data
            self._bytes += len(data)
            while self._bytes > self.capacity:
                _, old = self._items.popitem(last=False)
                self._bytes -= len(old)


class _LeafCache:
    """Leaf pages by leaf index (LRU, a fixed count). Thread-safe."""

    def __init__(self, source: ChunkSource, capacity: int = LEAVES_CACHED) -> None:
        self._source, self._capacity = source, capacity
        self._items: OrderedDict[int, bytes] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, index: int) -> bytes:
        with self._lock:
            leaf = self._items.get(index)
            if leaf is not None:
                self._items.move_to_end(index)
                return leaf
        leaf = self._source.leaf(index)  # outside the lock: other readers go on meanwhile
        with self._lock:
            self._items[index] = leaf
            while len(self._items) > self._capacity:
                self._items.popitem(last=False)
        return leaf


@dataclass(frozen=True)
class Extent:
    """A run of the image that is data, or a hole that reads as zeros."""

    offset: int
    length: int
    hole: bool


class ImageReader:
    """Reads a snapshot's image at any offset, from a :class:`ChunkSource`, through a chunk cache."""

    def __init__(self, source: ChunkSource, cache_bytes: int) -> None:
        self.source = source
        self.snapshot = source.snapshot
        self.size = self.snapshot.size
        self.chunk_size = self.snapshot.chunk_size
        self.cache = ChunkCache(cache_bytes)
        self._leaves = _LeafCache(source)
        self._zeros = memoryview(bytes(self.chunk_size))  # what a zero chunk reads as
        # A source whose every call costs (a round trip to a media service) is read in aligned
        # windows of this many chunks, whatever the request; the rest of a window goes to the cache.
        self._window = max(1, source.window_bytes // self.chunk_size)
        self._inflight: dict[int, threading.Event] = {}
        self._inflight_lock = threading.Lock()

    def close(self) -> None:
        self.source.close()

    def ids(self, first: int, count: int) -> list[bytes]:
        """The ids of chunks [first, first + count)."""
        out: list[bytes] = []
        for leaf_index in range(first // FANOUT, (first + count - 1) // FANOUT + 1):
            leaf = self._leaves.get(leaf_index)
            lo = max(first, leaf_index * FANOUT) - leaf_index * FANOUT
            hi = min(first + count, (leaf_index + 1) * FANOUT) - leaf_index * FANOUT
            out.extend(leaf[i * ID_LEN:(i + 1) * ID_LEN] for i in range(lo, hi))
        return out

    def _span(self, offset: int, length: int) -> tuple[int, int]:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise errors.UsageError(f"read of {length} bytes at {offset} is outside the image "
                                    f"({self.size} bytes)")
        first = offset // self.chunk_size
        last = (offset + length - 1) // self.chunk_size if length else first - 1
        return first, last - first + 1

    def _chunk_len(self, index: int) -> int:
        return min(self.chunk_size, self.size - index * self.chunk_size)

    def read(self, offset: int, length: int) -> bytearray:
        """The image's bytes [offset, offset + length)."""
        out = bytearray(length)
        self.read_into(out, offset)
        return out

    def read_into(self, buf: bytearray | memoryview, offset: int) -> None:
        """Fill ``buf`` with the image's bytes from ``offset`` on (nbdkit's buffer: no copy between).
        Raises IntegrityError (or the source's error) if a chunk in the range cannot be read; chunks
        outside it are never touched."""
        length = len(buf)
        first, count = self._span(offset, length)
        if not count:
            return
        ids = self.ids(first, count)
        found: dict[int, bytes] = {}
        missing: list[int] = []
        for n, cid in enumerate(ids):
            if cid == ZERO_ID:
                continue
            data = self.cache.get(cid)
            if data is None:
                missing.append(n)
            else:
                found[n] = data
        if missing and self._window > 1:
            missing = self._fetch_windows(first, ids, missing, found)
        if missing:
            self._fetch(first, ids, missing, found)
        view = memoryview(buf)
        for n in range(count):
            start = (first + n) * self.chunk_size
            lo, hi = max(offset, start), min(offset + length, start + self.chunk_size, self.size)
            data = found.get(n)
            view[lo - offset:hi - offset] = self._zeros[:hi - lo] if data is None else \
                memoryview(data)[lo - start:hi - start]

    def _fetch_windows(self, first: int, ids: list[bytes], missing: list[int],
                       found: dict[int, bytes]) -> list[int]:
        """Fetch the aligned windows the missing chunks lie in, each once however many requests want
        it at the same time; return the chunks still missing (a window that failed, or was evicted
        before this request took its chunks: the caller reads just those, so a damaged chunk fails
        only the requests that touch it)."""
        got: dict[bytes, bytes] = {}
        for window in sorted({(first + n) // self._window for n in missing}):
            got.update(self._fetch_window(window))
        still = []
        for n in missing:
            data = got.get(ids[n]) or self.cache.get(ids[n])
            if data is None:
                still.append(n)
            else:
                found[n] = data
        return still

    def _fetch_window(self, window: int) -> dict[bytes, bytes]:
        with self._inflight_lock:
            wait = self._inflight.get(window)
            if wait is None:
                self._inflight[window] = threading.Event()
        if wait is not None:
            wait.wait()  # its chunks are in the cache now, unless that fetch failed
            return {}
        try:
            lo = window * self._window
            try:
                ids = self.ids(lo, min(self._window, self.snapshot.tree.entries - lo))
                chunks = self.source.chunks(lo, ids)
            except errors.HyperbackError:
                return {}  # each request then reads its own chunks, and only a damaged one fails
            out = {}
            for n, (cid, data) in enumerate(zip(ids, chunks, strict=True)):
                if cid != ZERO_ID and len(data) == self._chunk_len(lo + n):
                    self.cache.put(cid, data)
                    out[cid] = data
            return out
        finally:
            with self._inflight_lock:
                self._inflight.pop(window).set()

    def _fetch(self, first: int, ids: list[bytes], missing: list[int], found: dict[int, bytes]) -> None:
        """Read the missing chunks, one span from the first to the last (a remote source answers a
        span in one call), and check each one's length."""
        lo, hi = missing[0], missing[-1] + 1
        want = set(missing)
        span = [cid if n in want else ZERO_ID for n, cid in enumerate(ids[lo:hi], lo)]
        for n, data in enumerate(self.source.chunks(first + lo, span), lo):
            if n not in want:
                continue
            if len(data) != self._chunk_len(first + n):
                raise errors.CorruptChunk(f"chunk {ids[n].hex()} holds {len(data)} bytes where snapshot "
                                          f"{self.snapshot.id} needs {self._chunk_len(first + n)}",
                                          ids[n].hex())
            self.cache.put(ids[n], data)
            found[n] = data

    def extents(self, offset: int, length: int) -> list[Extent]:
        """Data and holes from ``offset`` on, adjacent runs of one kind merged: up to ``length`` bytes,
        or ``EXTENT_CHUNKS`` chunks if fewer (a client asking about a whole large disk gets the start
        and asks again from where the answer ends, as NBD allows)."""
        self._span(offset, length)
        length = min(length, (offset // self.chunk_size + EXTENT_CHUNKS) * self.chunk_size - offset)
        first, count = self._span(offset, length)
        out: list[Extent] = []
        end = offset + length
        for n, cid in enumerate(self.ids(first, count) if count else []):
            start = max(offset, (first + n) * self.chunk_size)
            stop = min(end, (first + n + 1) * self.chunk_size)
            hole = cid == ZERO_ID
            if out and out[-1].hole == hole:
                out[-1] = Extent(out[-1].offset, stop - out[-1].offset, hole)
            else:
                out.append(Extent(start, stop - start, hole))
        return out
