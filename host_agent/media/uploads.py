"""Packs arriving at the media service: checked as their bytes stream in, verified, then published
as a local writer would publish them (docs/media-protocol.md, UploadPack).
"""
from __future__ import annotations

import errno
import logging
import os
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Final

from host_agent import errors
from host_agent._proto.hyperback.v1 import media_pb2 as pb
from host_agent.media.sessions import Session
from host_agent.storage import copier
from host_agent.storage.copier import ID_LEN, NativeRepository
from host_agent.storage.packfile import INDEX_ENTRY, INDEX_HEADER, PACK_HEADER, PACK_MAGIC, RECORD_HEADER
from host_agent.storage.packfile import VERSION as PACK_VERSION
from host_agent.storage.repository import PACK_NAME, PACK_TARGET

log = logging.getLogger(__name__)

SEAL_OVERHEAD: Final = 12 + 16  # a sealed payload's nonce and tag (repository-format 11.3)
MAX_PACK: Final = 2 * PACK_TARGET  # an upload above this is refused: it bounds tmp/ and the check's memory
# The client names its packs and snapshots, so two calls may name one file. The check that the name is
# free and the publication (a rename, which would replace) happen under this lock, so the second call is
# refused and the media service never replaces a file (docs/media-protocol.md, "Nothing is replaced").
_PUBLISHING: Final = threading.Lock()


def refuse_taken(what: str, *paths: Path) -> None:
    """UsageError naming ``what`` if one of ``paths`` exists."""
    if any(p.exists() for p in paths):
        raise errors.UsageError(f"{what} exists in the repository already: the media service adds files "
                                "and never replaces one (choose a new name)")


@contextmanager
def publishing_new(what: str, *paths: Path) -> Iterator[None]:
    """Publish under the lock above, once none of ``paths`` exists (``refuse_taken``)."""
    with _PUBLISHING:
        refuse_taken(what, *paths)
        yield


class PackScanner:
    """Checks the structure of a pack file as its bytes stream in, and indexes its records.

    It checks the header (magic, version, the pack's name, the expected writer id) and every record
    header (type, compression flag, reserved field, lengths, no id twice); the records' contents
    (decompression, SHA-256) are for the native reader to check. ``sealed``: the records of an
    encrypted repository, whose payloads carry a nonce and a tag (repository-format 11.3). Memory:
    about 100 bytes per record.
    """

    def __init__(self, name: str, writer_id: bytes, chunk_size: int, sealed: bool = False) -> None:
        self.name, self._writer_id, self._chunk_size = name, writer_id, chunk_size
        self._overhead = SEAL_OVERHEAD if sealed else 0
        self.entries = bytearray()  # packed INDEX_ENTRY records
        self._ids: set[bytes] = set()
        self._pending = bytearray()  # the start of a header not yet complete
        self._payload_left = 0
        self._offset = 0  # of the next byte fed
        self._started = False  # pack header seen

    def feed(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            if self._payload_left:
                n = min(self._payload_left, len(view))
                self._payload_left -= n
            else:
                want = (RECORD_HEADER.size if self._started else PACK_HEADER.size) - len(self._pending)
                n = min(want, len(view))
                self._pending += view[:n]
                if n == want:
                    self._header(bytes(self._pending), self._offset + n - len(self._pending))
                    self._pending.clear()
            self._offset += n
            view = view[n:]

    def finish(self) -> bytes:
        """The index file the records give; raises if the pack ended inside a header or record."""
        if not self._started or self._pending or self._payload_left:
            raise errors.CorruptChunk(f"pack {self.name} is truncated at byte {self._offset}")
        if not self.entries:
            raise errors.CorruptChunk(f"pack {self.name} holds no record")
        return copier.encode_index(bytes.fromhex(self.name), bytes(self.entries))

    def _header(self, head: bytes, offset: int) -> None:
        if not self._started:
            magic, version, pack_id, writer = PACK_HEADER.unpack(head)
            if magic != PACK_MAGIC or version != PACK_VERSION or pack_id.hex() != self.name:
                raise errors.CorruptChunk(f"pack {self.name} has a bad header")
            if writer != self._writer_id:
                raise errors.CorruptChunk(f"pack {self.name} names writer {writer.hex()}, not the session's "
                                          f"{self._writer_id.hex()}")
            self._started = True
            return
        cid, btype, comp, reserved, raw_len, stored_len = RECORD_HEADER.unpack(head)
        where = f"pack {self.name}, record at {offset}"
        if btype not in (copier.BLOB_DATA, copier.BLOB_TREE) or comp not in (0, 1) or reserved:
            raise errors.CorruptChunk(f"{where}: bad type, compression or reserved field", cid.hex())
        if raw_len > self._chunk_size:
            raise errors.RepositoryError(f"{where}: {raw_len} bytes, more than the chunk size "
                                         f"{self._chunk_size} of this repository: another chunk size?")
        sealed = self._overhead
        if not raw_len or stored_len <= sealed or (not comp and stored_len != raw_len + sealed):
            raise errors.CorruptChunk(f"{where}: bad lengths", cid.hex())
        if cid in self._ids:
            raise errors.CorruptChunk(f"{where}: id {cid.hex()} twice in one pack", cid.hex())
        self._ids.add(cid)
        self.entries += INDEX_ENTRY.pack(cid, btype, comp, 0, offset, stored_len, raw_len)
        self._payload_left = stored_len


@contextmanager
def _writing(what: str) -> Iterator[None]:
    """ENOSPC/EDQUOT become RepositoryFull, other OSErrors RepositoryIOError, naming ``what``."""
    try:
        yield
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise errors.RepositoryFull(f"the backup media are full writing {what}: free space or prune, "
                                        "then run again; earlier snapshots are intact") from e
        raise errors.RepositoryIOError(f"cannot write {what}: {e.strerror}") from e


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


class Upload:
    """One pack arriving: written to ``tmp/NAME.pack`` while its structure is checked, then its
    records verified, then published by the native copier as a local writer's packs are (pack, then
    index)."""

    def __init__(self, session: Session, start: pb.UploadStart) -> None:
        self.session, self.name = session, start.pack_name
        self.pack_size, self.index_size = start.pack_size, start.index_size
        repo = session.repo
        if not PACK_NAME.fullmatch(self.name):
            raise errors.UsageError(f"pack name {self.name!r} is not 32 lowercase hex characters")
        if not PACK_HEADER.size < self.pack_size <= MAX_PACK:
            raise errors.UsageError(f"pack size {self.pack_size} is outside {PACK_HEADER.size}..{MAX_PACK}")
        records = (self.pack_size - PACK_HEADER.size) // (RECORD_HEADER.size + 1)  # at most: of one byte each
        if not 0 < self.index_size - INDEX_HEADER.size - ID_LEN <= records * INDEX_ENTRY.size:
            raise errors.UsageError(f"an index of {self.index_size} bytes cannot list a pack of "
                                    f"{self.pack_size} bytes")
        refuse_taken(f"pack {self.name}", *self._published())  # before any byte travels; again at the end
        self.scanner = PackScanner(self.name, session.writer_id, repo.config.chunk_size,
                                   sealed=bool(repo.config.encryption))
        self.tmp = repo.path / "tmp" / f"{self.name}.pack"
        self._received = 0
        self._index = bytearray()
        with _writing(f"tmp/{self.name}.pack"):
            self._fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)

    def pack_data(self, data: bytes) -> None:
        if self._received + len(data) > self.pack_size:
            raise errors.CorruptChunk(f"pack {self.name} runs past its announced {self.pack_size} bytes")
        self.scanner.feed(data)
        with _writing(f"tmp/{self.name}.pack"):
            _write_all(self._fd, data)
        self._received += len(data)

    def index_data(self, data: bytes) -> None:
        if self._received != self.pack_size or len(self._index) + len(data) > self.index_size:
            raise errors.CorruptChunk(f"pack {self.name}: index data out of place or too long")
        self._index += data

    def finish(self) -> int:
        """Check, verify and publish the pack; return its number of records."""
        if self._received != self.pack_size:
            raise errors.CorruptChunk(f"pack {self.name} ended after {self._received} of its "
                                      f"{self.pack_size} bytes")
        index = self.scanner.finish()
        if bytes(self._index) != index:
            raise errors.CorruptChunk(f"the index sent for pack {self.name} does not list its records")
        with _writing(f"tmp/{self.name}.pack"):
            os.fsync(self._fd)
        os.close(self._fd)
        self._fd = -1
        if not self.session.repo.config.encryption:  # sealed records are the key holder's to open
            self._verify(index)
        self._publish()
        return len(self.scanner.entries) // INDEX_ENTRY.size

    def _verify(self, index: bytes) -> None:
        """Decompress and hash every record with the native reader, through a scratch root that
        shows the pack in tmp/ as if published (the repository shows nothing before it passes)."""
        repo = self.session.repo
        with tempfile.TemporaryDirectory(prefix="hyperback-media-check-") as scratch:
            root = Path(scratch)
            try:
                (root / "index").mkdir()
                (root / "packs" / self.name[:2]).mkdir(parents=True)
                # absolute: a repository served by a relative path (--repo main=backups) has a relative tmp/
                (root / "packs" / self.name[:2] / self.name).symlink_to(self.tmp.absolute())
                (root / "index" / self.name).write_bytes(index)
            except OSError as e:
                raise errors.EnvironmentProblem(f"cannot check pack {self.name} in {root}: "
                                                f"{e.strerror}") from e
            with NativeRepository(str(root), self.session.writer_id, repo.config.chunk_size, PACK_TARGET,
                                  repo.config.compression_level) as native:
                native.load_index(self.name)
                bad, total = native.verify(10_000, os.cpu_count() or 1, copier.Progress(), max_report=1)
        if total:
            raise errors.CorruptChunk(
                f"pack {self.name}: {total} record(s) fail their check (decompression or SHA-256 against "
                f"the id), e.g. {bad[0].hex()}: damaged in transit or by the client", bad[0].hex())

    def _publish(self) -> None:
        """Pack first, then index, each durable before the next step (repository-format section 6),
        by the native copier; then the session's index counts the pack's blobs."""
        with self.session.use() as native, publishing_new(f"pack {self.name}", *self._published()):
            # a session ended meanwhile publishes nothing
            copier.publish_pack(self.session.repo.path, self.name, self.tmp, bytes(self.scanner.entries))
            native.load_index(self.name)

    def _published(self) -> tuple[Path, Path]:
        root = self.session.repo.path
        return root / "index" / self.name, root / "packs" / self.name[:2] / self.name

    def discard(self) -> None:
        """Remove what an unfinished upload wrote (a published pack stays: it is the session's; a
        publication that failed removed its own tmp/NAME.idx)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self.tmp.unlink(missing_ok=True)
