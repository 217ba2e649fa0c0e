"""Sources and extents: which byte ranges of a source hold data, and which changed.

Extents are ``(offset, length)`` pairs in bytes. Chunk plans are one byte per
chunk, the native copier's ``TODO_*`` values.
"""
from __future__ import annotations

import bisect
import errno
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from host_agent import errors
from host_agent.copier import TODO_KEEP, TODO_READ, TODO_ZERO

Extent = tuple[int, int]


@dataclass(frozen=True)
class OpenSource:
    """A source opened for reading: its descriptor, size, and whether it is a block device."""

    fd: int
    size: int
    is_block_device: bool
    label: str


def open_source(path: Path) -> OpenSource:
    """Open a regular file or block device read-only; raise SourceError saying why not."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise errors.SourceError(f"cannot open source {path}: {e.strerror}") from e
    try:
        st = os.fstat(fd)
        if stat.S_ISREG(st.st_mode):
            return OpenSource(fd, st.st_size, False, str(path))
        if stat.S_ISBLK(st.st_mode):
            return OpenSource(fd, os.lseek(fd, 0, os.SEEK_END), True, str(path))
        raise errors.SourceError(f"source {path} is not a regular file or a block device")
    except BaseException:
        os.close(fd)
        raise


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
