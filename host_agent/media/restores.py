"""A restore from a media service, on the client's side: the stream's chunks, checked, to the target."""
from __future__ import annotations

import os
import time
from collections import deque
from typing import Final

from host_agent import errors
from host_agent._proto.hyperback.v1 import media_pb2 as pb
from host_agent.storage import copier
from host_agent.storage.copier import ID_LEN, ZERO_ID
from host_agent.storage.repository import ProgressFn
from host_agent.storage.snapshot import Snapshot

PROGRESS_EVERY: Final = 0.2  # seconds between progress reports
class ChunkSink:
    """Writes a restore stream's chunks to the target, each checked against its id first."""

    def __init__(self, fd: int, snap: Snapshot, write_zeros: bool, progress: ProgressFn | None) -> None:
        self._fd, self._snap, self._write_zeros, self._progress = fd, snap, write_zeros, progress
        self._next = 0  # the chunk whose id comes next
        self._queue: deque[tuple[int, bytes]] = deque()  # (chunk, id) whose bytes come next
        self._buf = bytearray()
        self._done = 0
        self._reported = time.monotonic()
        self.bytes_received = 0

    def feed(self, msg: pb.RestoreData) -> None:
        part = msg.WhichOneof("part")
        if part == "chunk_ids":
            self._ids(msg.chunk_ids)
        elif part == "data":
            self.bytes_received += len(msg.data)
            self._data(msg.data)
        else:
            raise errors.RemoteError(f"unexpected {part} in the middle of a restore stream")

    def finish(self) -> None:
        if self._next != self._snap.tree.entries or self._queue or self._buf:
            raise errors.CorruptChunk(f"the restore stream of snapshot {self._snap.id} ended after "
                                      f"{self._next} of {self._snap.tree.entries} chunks")
        if self._progress:
            self._progress(self._done, self._snap.size)

    def _len(self, chunk: int) -> int:
        cs = self._snap.chunk_size
        return min(cs, self._snap.size - chunk * cs)

    def _ids(self, ids: bytes) -> None:
        if self._queue or self._buf or len(ids) % ID_LEN or \
                self._next + len(ids) // ID_LEN > self._snap.tree.entries:
            raise errors.CorruptChunk(f"the restore stream of snapshot {self._snap.id} is out of order")
        for at in range(0, len(ids), ID_LEN):
            cid = ids[at:at + ID_LEN]
            if cid != ZERO_ID:
                self._queue.append((self._next, cid))
            elif self._write_zeros:
                self._write(self._next, bytes(self._len(self._next)))
            else:
                self._done += self._len(self._next)  # a hole in the file
            self._next += 1

    def _data(self, data: bytes) -> None:
        self._buf += data
        while self._queue and len(self._buf) >= self._len(self._queue[0][0]):
            chunk, cid = self._queue.popleft()
            n = self._len(chunk)
            content = bytes(self._buf[:n])
            del self._buf[:n]
            if copier.sha256(content) != cid:
                raise errors.CorruptChunk(f"chunk {cid.hex()} arrived damaged (it fails its SHA-256)",
                                          cid.hex())
            self._write(chunk, content)
        if self._buf and not self._queue:
            raise errors.CorruptChunk(f"the restore stream of snapshot {self._snap.id} sent more bytes "
                                      "than its chunks hold")
        if self._progress and time.monotonic() - self._reported >= PROGRESS_EVERY:
            self._reported = time.monotonic()
            self._progress(self._done, self._snap.size)

    def _write(self, chunk: int, content: bytes) -> None:
        view, offset = memoryview(content), chunk * self._snap.chunk_size
        try:
            while view:
                n = os.pwrite(self._fd, view, offset)
                view, offset = view[n:], offset + n
        except OSError as e:
            raise errors.TargetError(f"cannot write the target: {e.strerror}") from e
        self._done += len(content)
