"""Reads of snapshots in place for exports on other hosts (the ReadChunks call, docs/media-protocol.md).

An export asks for small ranges of a snapshot's chunks, thousands of times. Each call cannot load the
repository's index anew, so a reader (a reader lock, the native handle with the index loaded, the
snapshot's tree) stays open per snapshot while calls keep coming, shared by every client reading that
snapshot, and closes after ``IDLE`` seconds without one: its lock, which keeps garbage collection from
sweeping what the snapshot uses, goes with it. A reader opens only after its snapshot was committed,
so its index holds every chunk the snapshot names.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Final

from host_agent import errors
from host_agent._proto.hyperback.v1 import media_pb2 as pb
from host_agent.media.codec import read_limit, regrouped
from host_agent.storage.copier import ID_LEN, ZERO_ID, NativeRepository
from host_agent.storage.maptree import FANOUT, TreeReader
from host_agent.storage.repository import Repository
from host_agent.storage.snapshot import SNAPSHOT_ID, Snapshot

log = logging.getLogger(__name__)

IDLE: Final = 60.0  # seconds a snapshot's reader stays open without a call


class _Reader:
    """One snapshot, open for reading: lock, index and tree."""

    def __init__(self, repo: Repository, snapshot: Snapshot) -> None:
        self.snapshot = snapshot
        self._stack = ExitStack()
        self.native: NativeRepository = self._stack.enter_context(repo.session("media-export", writer=False))
        self.tree = TreeReader(self.native, snapshot.tree)
        self.users = 0
        self.last_used = time.monotonic()

    def close(self) -> None:
        self._stack.close()


class SnapshotReaders:
    """The open readers, by (destination, snapshot id); a janitor thread closes idle ones."""

    def __init__(self, idle: float = IDLE) -> None:
        self._idle = idle
        self._lock = threading.Lock()
        self._open: dict[tuple[str, str], _Reader] = {}
        self._stop = threading.Event()
        self._janitor = threading.Thread(target=self._sweep_loop, name="media-readers", daemon=True)
        self._janitor.start()

    @contextmanager
    def reader(self, destination: str, repo: Repository, snapshot_id: str) -> Iterator[_Reader]:
        if not SNAPSHOT_ID.fullmatch(snapshot_id):
            raise errors.UsageError(f"{snapshot_id!r} is not a whole snapshot id (16 hex characters)")
        key = (destination, snapshot_id)
        with self._lock:
            reader = self._open.get(key)
            if reader is not None:
                reader.users += 1
        if reader is None:
            reader = self._open_reader(key, repo, snapshot_id)
        try:
            yield reader
        finally:
            with self._lock:
                reader.users -= 1
                reader.last_used = time.monotonic()

    def _open_reader(self, key: tuple[str, str], repo: Repository, snapshot_id: str) -> _Reader:
        """Open outside the lock (loading an index takes a while); the first of two racing opens wins."""
        fresh = _Reader(repo, repo.resolve(snapshot_id))
        with self._lock:
            reader = self._open.setdefault(key, fresh)
            reader.users += 1
        if reader is not fresh:
            fresh.close()
        else:
            log.info("reading snapshot %s of %s in place", snapshot_id, key[0])
        return reader

    def _sweep_loop(self) -> None:
        while not self._stop.wait(self._idle / 4):
            self.sweep()

    def sweep(self, now: float | None = None) -> None:
        """Close the readers nobody used for ``idle`` seconds."""
        now = time.monotonic() if now is None else now
        with self._lock:
            idle = [k for k, r in self._open.items() if not r.users and now - r.last_used >= self._idle]
            closing = [self._open.pop(k) for k in idle]
        for reader in closing:
            reader.close()

    def close(self) -> None:
        self._stop.set()
        self._janitor.join()
        with self._lock:
            closing, self._open = list(self._open.values()), {}
        for reader in closing:
            reader.close()

    def __len__(self) -> int:
        return len(self._open)


def read_chunks(reader: _Reader, request: pb.ReadChunksRequest) -> Iterator[pb.RestoreData]:
    """The ids of the requested range in one message, then the verified bytes of its non-zero chunks."""
    snap = reader.snapshot
    first, count, entries = request.first, request.count, snap.tree.entries
    limit = read_limit(snap.chunk_size)
    if not 1 <= count <= limit or first + count > entries:
        raise errors.UsageError(f"chunks [{first}, {first + count}) are not 1 to {limit} chunks of snapshot "
                                f"{snap.id}'s {entries}")
    ids = bytearray()
    for leaf_index in range(first // FANOUT, (first + count - 1) // FANOUT + 1):
        leaf = reader.tree.leaf_at(leaf_index)
        lo = max(first, leaf_index * FANOUT) - leaf_index * FANOUT
        hi = min(first + count, (leaf_index + 1) * FANOUT) - leaf_index * FANOUT
        ids += leaf[lo * ID_LEN:hi * ID_LEN]
    yield pb.RestoreData(chunk_ids=bytes(ids))
    if request.ids_only:
        return
    # one native call, verified, lengths checked, outside the handle's single-call lock: concurrent
    # calls read on every core
    image = memoryview(reader.native.read_segment(first, snap.size, bytes(ids), 1))
    cs = snap.chunk_size
    stored = (image[n * cs:(n + 1) * cs] for n in range(count) if ids[n * ID_LEN:(n + 1) * ID_LEN] != ZERO_ID)
    for piece in regrouped(stored):
        yield pb.RestoreData(data=piece)
