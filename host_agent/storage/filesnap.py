"""The image of a file-level snapshot: a chunk-aligned POSIX pax archive of selected files, and its
catalog (docs/restore.md, "Path-level backups").

The archive is what GNU tar and bsdtar read: for each entry a pax extended header (path, link
target, times to the nanosecond, size), a ustar header, the data. Before a file of at least
``ALIGN_MIN`` bytes, a pax ``comment`` record pads the extended header so that the file's data
starts on a chunk boundary: an unchanged file then cuts into the same chunks in every snapshot,
wherever it lands in the archive, and fixed-size chunking deduplicates it (a changed file earlier in
the archive shifts nothing after the next aligned file).

The catalog is one JSON line per entry (path, type, mode, size, times, link target, and where the
data starts in the archive): what ``files`` lists without reading the archive.

This module knows no guest and no appliance: it walks any ``TreeSource`` (the guest reader of
``host_agent.guestfiles`` is one) and writes to a file descriptor.
"""
from __future__ import annotations

import json
import os
import posixpath
import stat
import tarfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Final, Protocol

from host_agent import errors
from host_agent.storage.snapshot import FilesRef, Snapshot

BLOCK: Final = 512
ALIGN_MIN: Final = 4096  # smaller files are not aligned: the padding would cost more than dedup saves


class SourceEntry(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def mode(self) -> int: ...
    @property
    def size(self) -> int: ...
    @property
    def mtime_ns(self) -> int: ...
    @property
    def atime_ns(self) -> int: ...
    @property
    def target(self) -> str | None: ...


class TreeSource(Protocol):
    """Where the files come from (``host_agent.guestfiles.reader.GuestFiles`` fits)."""

    def stat(self, path: str) -> SourceEntry: ...

    def listdir(self, path: str) -> Iterator[SourceEntry]: ...

    def download(self, path: str, fd: int) -> None: ...


@dataclass(frozen=True)
class CatalogEntry:
    path: str  # relative to the file system's root, without a leading "/"
    type: str  # file | dir | symlink
    mode: int  # permission bits
    size: int
    mtime_ns: int
    atime_ns: int
    target: str | None
    offset: int  # where the data starts in the archive (files), else where the entry's header starts


def _kind(mode: int) -> str | None:
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "dir"
    if stat.S_ISLNK(mode):
        return "symlink"
    return None  # devices, FIFOs, sockets: not archived


def _ns(value: int) -> str:
    return f"{value // 1_000_000_000}.{value % 1_000_000_000:09d}"


def _header(path: str, entry: SourceEntry, kind: str, padding: int) -> bytes:
    info = tarfile.TarInfo(path + ("/" if kind == "dir" else ""))
    info.type = {"file": tarfile.REGTYPE, "dir": tarfile.DIRTYPE, "symlink": tarfile.SYMTYPE}[kind]
    info.mode = stat.S_IMODE(entry.mode)
    info.size = entry.size if kind == "file" else 0
    info.linkname = entry.target or ""
    info.mtime = entry.mtime_ns // 1_000_000_000
    info.uname = info.gname = ""
    pax = {"mtime": _ns(entry.mtime_ns), "atime": _ns(entry.atime_ns)}
    if padding:
        pax["comment"] = "x" * padding
    info.pax_headers = pax
    return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


def aligned_header(path: str, entry: SourceEntry, kind: str, offset: int, chunk_size: int) -> bytes:
    """The entry's headers, padded (files of ALIGN_MIN bytes or more) so that the data after them
    starts on a multiple of ``chunk_size``."""
    plain = _header(path, entry, kind, 0)
    if kind != "file" or entry.size < ALIGN_MIN:
        return plain
    # the pax records round up to 512-byte blocks: aim at the first boundary the padded header can
    # reach, then correct the comment's length until the header is exactly that long
    want = (-(offset + len(plain) + BLOCK) % chunk_size) + len(plain) + BLOCK
    padding = want - len(plain) - 32
    for _ in range(8):
        header = _header(path, entry, kind, max(padding, 1))
        if len(header) == want:
            return header
        padding += want - len(header)
    raise errors.HyperbackError(f"cannot align the archive header of {path}: a bug")  # never: converges


class ArchiveWriter:
    """Writes the archive to ``fd`` (from its current offset 0) and collects the catalog."""

    def __init__(self, source: TreeSource, fd: int, chunk_size: int) -> None:
        self.source = source
        self.fd = fd
        self.chunk_size = chunk_size
        self.offset = 0
        self.catalog: list[CatalogEntry] = []
        self.skipped: list[tuple[str, str]] = []

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view):]
        self.offset += len(data)

    def add(self, path: str) -> None:
        """Archive ``path`` (absolute in the source) and, for a directory, everything under it."""
        path = posixpath.normpath("/" + path.lstrip("/"))
        self._add(path, self.source.stat(path))

    def _add(self, path: str, entry: SourceEntry) -> None:
        kind = _kind(entry.mode)
        if path == "/":  # the root itself has no name in the archive: its entries do
            for child in self.source.listdir(path):
                self._add(posixpath.join(path, child.name), child)
            return
        if kind is None:
            self.skipped.append((path, "not a file, directory or symlink"))
            return
        name = path.lstrip("/")
        header = aligned_header(name, entry, kind, self.offset, self.chunk_size)
        start = self.offset
        self.write(header)
        if kind == "file":
            start = self.offset
            self.source.download(path, self.fd)
            self.offset += entry.size
            if os.lseek(self.fd, 0, os.SEEK_CUR) != self.offset:
                raise errors.SourceError(f"{path} changed size while it was archived: its view is not "
                                         "stable")
            self.write(bytes(-entry.size % BLOCK))
        size = entry.size if kind == "file" else 0
        self.catalog.append(CatalogEntry(name, kind, stat.S_IMODE(entry.mode), size, entry.mtime_ns,
                                         entry.atime_ns, entry.target, start))
        if kind == "dir":
            for child in self.source.listdir(path):
                self._add(posixpath.join(path, child.name), child)

    def close(self) -> bytes:
        """End the archive; return the catalog's bytes (JSON lines)."""
        self.write(bytes(2 * BLOCK))
        return b"".join(json.dumps(asdict(e), sort_keys=True).encode() + b"\n" for e in self.catalog)


def read_catalog(data: bytes) -> list[CatalogEntry]:
    """The catalog's entries, from its bytes (a repository's: checked, since a guest named them)."""
    out = []
    for number, line in enumerate(data.splitlines(), 1):
        try:
            out.append(CatalogEntry(**json.loads(line)))
        except (ValueError, TypeError) as e:
            raise errors.IntegrityError(f"catalog line {number} is unreadable: {e}") from e
    return out


FORMAT: Final = "pax-aligned"


def spool(source: TreeSource, paths: tuple[str, ...], fd: int, chunk_size: int,
          partition: int = 0) -> tuple[FilesRef, list[tuple[str, str]]]:
    """Write a file-level snapshot's image to ``fd``: the archive of ``paths``, zeros to the next
    chunk boundary, the catalog. Returns the document's ``files`` field and what was skipped."""
    writer = ArchiveWriter(source, fd, chunk_size)
    for path in paths:
        writer.add(path)
    catalog = writer.close()
    writer.write(bytes(-writer.offset % chunk_size))
    ref = FilesRef(FORMAT, partition, paths, writer.offset, len(catalog))
    writer.write(catalog)
    return ref, writer.skipped


class Reads(Protocol):
    """Reads of a snapshot's image (``imagereader.ImageReader``)."""

    def read(self, offset: int, length: int) -> bytearray: ...


@dataclass(frozen=True)
class StoredEntry:
    """A catalog entry as the guest reader's entries look (``mode`` with its file type)."""

    name: str
    mode: int
    size: int
    mtime_ns: int
    atime_ns: int
    target: str | None
    offset: int

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def is_file(self) -> bool:
        return stat.S_ISREG(self.mode)

    @property
    def is_symlink(self) -> bool:
        return stat.S_ISLNK(self.mode)


_TYPE_BITS: Final = {"file": stat.S_IFREG, "dir": stat.S_IFDIR, "symlink": stat.S_IFLNK}
READ_BLOCK: Final = 1 << 20


class FileSnapshot:
    """Browse a file-level snapshot from its catalog; read files' bytes from the archive only."""

    def __init__(self, snapshot: Snapshot, image: Reads) -> None:
        if snapshot.files is None or snapshot.files.format != FORMAT:
            raise errors.UsageError(f"snapshot {snapshot.id} is not a file-level snapshot")
        self.snapshot, self.image = snapshot, image
        ref = snapshot.files
        entries = read_catalog(bytes(image.read(ref.catalog_offset, ref.catalog_size)))
        self._by_path: dict[str, CatalogEntry] = {}
        self._children: dict[str, list[str]] = {"": []}
        for e in entries:
            if e.type not in _TYPE_BITS or e.path in self._by_path or not e.path or e.path.startswith("/"):
                raise errors.IntegrityError(f"snapshot {snapshot.id}: catalog entry {e.path!r} is not valid")
            self._by_path[e.path] = e
            self._link(e.path)

    def _link(self, path: str) -> None:
        """List ``path`` in its parent, and the parent in its own, up to the root (the directories
        above the paths backed up have no entries of their own)."""
        while path:
            parent = posixpath.dirname(path)
            known = parent in self._children
            siblings = self._children.setdefault(parent, [])
            if path not in siblings:
                siblings.append(path)
            if known:
                return
            path = parent

    def _key(self, path: str) -> str:
        return posixpath.normpath("/" + path.lstrip("/")).lstrip("/")

    def _entry(self, key: str) -> StoredEntry:
        if key == "":
            return StoredEntry("/", stat.S_IFDIR | 0o755, 0, 0, 0, None, 0)
        e = self._by_path.get(key)
        if e is None:
            if key in self._children:  # a directory above the paths backed up
                return StoredEntry(posixpath.basename(key), stat.S_IFDIR | 0o755, 0, 0, 0, None, 0)
            held = ", ".join(self.snapshot.files.paths) if self.snapshot.files else ""
            raise errors.GuestPathError(f"/{key}: not in file-level snapshot {self.snapshot.id} "
                                        f"(it holds {held})")
        return StoredEntry(posixpath.basename(e.path), _TYPE_BITS[e.type] | e.mode, e.size, e.mtime_ns,
                           e.atime_ns, e.target, e.offset)

    def stat(self, path: str) -> StoredEntry:
        return self._entry(self._key(path))

    def listdir(self, path: str) -> Iterator[StoredEntry]:
        key = self._key(path)
        if not self._entry(key).is_dir:
            raise errors.GuestPathError(f"/{key} is not a directory in the snapshot")
        for child in sorted(self._children.get(key, [])):
            yield self._entry(child)

    def is_file(self, path: str) -> bool:
        return self.stat(path).is_file

    def download(self, path: str, fd: int) -> None:
        entry = self._entry(self._key(path))
        if not entry.is_file:
            raise errors.GuestPathError(f"{path} is not a regular file in the snapshot")
        for start in range(0, entry.size, READ_BLOCK):
            view = memoryview(self.image.read(entry.offset + start, min(READ_BLOCK, entry.size - start)))
            while view:
                view = view[os.write(fd, view):]


__all__ = ["ALIGN_MIN", "FORMAT", "ArchiveWriter", "CatalogEntry", "FileSnapshot", "StoredEntry",
           "TreeSource", "aligned_header", "read_catalog", "spool"]
