"""Sources and extents: which byte ranges of a source hold data, and which changed.

Extents are ``(offset, length)`` pairs in bytes. Chunk plans are one byte per
chunk, the native copier's ``TODO_*`` values.
"""
from __future__ import annotations

import bisect
import errno
import os
import stat
from array import array
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from host_agent import errors
from host_agent.storage.copier import TODO_KEEP, TODO_READ, TODO_ZERO
from host_agent.storage.sourcefile import SourceFile

Extent = tuple[int, int]


@dataclass(frozen=True)
class Mapping:
    """Where bytes [offset, offset+length) of an image lie: in ``Layout.files[file]`` at
    ``file_offset``, or nowhere (``file`` None: they read as zeros)."""

    offset: int
    length: int
    file: int | None
    file_offset: int = 0


@dataclass(frozen=True)
class Layout:
    """An image spread over files, e.g. the clusters of a qcow2 chain as ``qemu-img map``
    describes them. Mappings are sorted and disjoint; gaps read as zeros."""

    files: tuple[str, ...]
    mappings: tuple[Mapping, ...]
    size: int
    label: str


@dataclass(frozen=True)
class OpenSource:
    """A source opened for reading: a plain file or block device, or a layout over files."""

    fd: int
    size: int
    is_block_device: bool
    label: str
    layout: Layout | None = None
    layout_fds: tuple[int, ...] = ()
    file: SourceFile | None = None  # a regular file's identity, taken before anything was read

    def data(self) -> list[Extent]:
        """The ranges that may hold data."""
        if self.layout is not None:
            return [(m.offset, m.length) for m in self.layout.mappings if m.file is not None]
        return [(0, self.size)] if self.is_block_device else data_extents(self.fd, self.size)

    def locate(self, first: int, count: int, chunk_size: int) -> tuple[array[int], array[int]] | None:
        """Per-chunk (fd, offset) of chunks [first, first+count) for a layout; None for a plain file.

        Every chunk must lie whole in one mapping: a qcow2 cluster size at least the chunk size.
        """
        if self.layout is None:
            return None
        fds = array("i", [-1]) * count
        offsets = array("Q", [0]) * count
        start, end = first * chunk_size, (first + count) * chunk_size
        for m in self.layout.mappings:
            if m.file is None or m.offset + m.length <= start or m.offset >= end:
                continue
            m_end = m.offset + m.length
            if m.offset % chunk_size or (m_end % chunk_size and m_end != self.size):
                raise errors.SourceError(
                    f"{self.label}: a mapping at {m.offset}+{m.length} does not align with the chunk "
                    f"size {chunk_size} (qcow2 cluster size below the chunk size?)")
            lo, hi = max(m.offset, start) // chunk_size, -(-min(m_end, end) // chunk_size)
            fds[lo - first:hi - first] = array("i", [self.layout_fds[m.file]]) * (hi - lo)
            base = m.file_offset - m.offset
            offsets[lo - first:hi - first] = array("Q", range(lo * chunk_size + base, hi * chunk_size + base,
                                                                chunk_size))
        return fds, offsets

    def close(self) -> None:
        for fd in {self.fd, *self.layout_fds} - {-1}:
            os.close(fd)


def open_source(source: Path | Layout) -> OpenSource:
    """Open a regular file, block device or layout read-only; raise SourceError saying why not."""
    if isinstance(source, Layout):
        return _open_layout(source)
    path = source
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise errors.SourceError(f"cannot open source {path}: {e.strerror}") from e
    try:
        st = os.fstat(fd)
        if stat.S_ISREG(st.st_mode):
            file = SourceFile.of(fd)
            return OpenSource(fd, file.size if file else st.st_size, False, str(path), file=file)
        if stat.S_ISBLK(st.st_mode):
            return OpenSource(fd, os.lseek(fd, 0, os.SEEK_END), True, str(path))
        raise errors.SourceError(f"source {path} is not a regular file or a block device")
    except BaseException:
        os.close(fd)
        raise


def _open_layout(layout: Layout) -> OpenSource:
    fds: list[int] = []
    try:
        for path in layout.files:
            fds.append(os.open(path, os.O_RDONLY | os.O_CLOEXEC))
    except OSError as e:
        for fd in fds:
            os.close(fd)
        raise errors.SourceError(f"cannot open {e.filename} of {layout.label}: {e.strerror}") from e
    return OpenSource(-1, layout.size, False, layout.label, layout, tuple(fds))


def data_extents(fd: int, size: int) -> list[Extent]:
    """The ranges that may hold data, by SEEK_DATA/SEEK_HOLE; the whole source where unsupported."""
    out: list[Extent] = []
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:  # no data after pos
                break
            if e.errno == errno.EINVAL:  # no hole support: everything is data
                return [(pos, size - pos)] if not out else out + [(pos, size - pos)]
            raise errors.SourceError(f"cannot map the data of the source: {e.strerror}") from e
        if start >= size:
            break
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        out.append((start, end - start))
        pos = end
    return out


def validate_changes(changes: Iterable[Extent], size: int) -> list[Extent]:
    """Check a change list against the source size; return it sorted, overlaps merged."""
    merged: list[Extent] = []
    for offset, length in sorted(changes):
        if offset < 0 or length < 0 or offset + length > size:
            raise errors.UsageError(
                f"changed extent ({offset}, {length}) lies outside the source (size {size})")
        if not length:
            continue
        if merged and offset <= merged[-1][0] + merged[-1][1]:
            last_off, last_len = merged[-1]
            merged[-1] = (last_off, max(last_len, offset + length - last_off))
        else:
            merged.append((offset, length))
    return merged


def parse_change_file(path: Path) -> list[Extent]:
    """Read a change list: one 'OFFSET LENGTH' pair of decimal byte counts per line, '#' comments."""
    try:
        text = path.read_text()
    except OSError as e:
        raise errors.UsageError(f"cannot read change list {path}: {e.strerror}") from e
    out = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2 or not all(p.isdigit() for p in parts):
            raise errors.UsageError(f"{path}:{number}: expected 'OFFSET LENGTH' in bytes, got {line!r}")
        out.append((int(parts[0]), int(parts[1])))
    return out


def _mark(plan: bytearray, extents: Sequence[Extent], first: int, chunk_size: int, value: int) -> None:
    """Set plan[i] = value for every chunk of [first, first+len(plan)) that an extent touches."""
    n = len(plan)
    for offset, length in extents:
        lo = max(offset // chunk_size - first, 0)
        hi = min(-(-(offset + length) // chunk_size) - first, n)
        if lo < hi:
            plan[lo:hi] = bytes([value]) * (hi - lo)


def overlapping(extents: Sequence[Extent], start: int, end: int) -> list[Extent]:
    """The extents that touch [start, end); extents must be sorted and disjoint."""
    i = max(bisect.bisect_right(extents, (start, -1)) - 1, 0)
    out = []
    while i < len(extents) and extents[i][0] < end:
        if extents[i][0] + extents[i][1] > start:
            out.append(extents[i])
        i += 1
    return out


def chunk_plan(first: int, count: int, chunk_size: int, data: Sequence[Extent],
               changes: Sequence[Extent] | None, keepable: int) -> bytearray:
    """Plan chunks [first, first+count): READ where data lies, ZERO in holes; with a change list,
    KEEP every chunk below ``keepable`` (the base's chunk count) that no change touches."""
    start, end = first * chunk_size, (first + count) * chunk_size
    plan = bytearray([TODO_ZERO]) * count
    _mark(plan, overlapping(data, start, end), first, chunk_size, TODO_READ)
    if changes is None:
        return plan
    changed = bytearray(count)
    _mark(changed, overlapping(changes, start, end), first, chunk_size, 1)
    keep_below = max(min(keepable - first, count), 0)
    for i in range(keep_below):
        if not changed[i]:
            plan[i] = TODO_KEEP
    return plan
