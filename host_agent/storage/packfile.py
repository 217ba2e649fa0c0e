"""Readers for pack and index files in Python, following docs/repository-format.md.

The native copier writes these files and reads them on the hot path; this
module reads them where Python needs their contents (garbage collection,
checks) and doubles as a second, independent implementation of the format.
"""
from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from pathlib import Path

from host_agent import errors

PACK_MAGIC = b"HBPK"
INDEX_MAGIC = b"HBIX"
VERSION = 1
PACK_HEADER = struct.Struct("<4sI16s16s")
RECORD_HEADER = struct.Struct("<32sBBHII")
INDEX_HEADER = struct.Struct("<4sI16sII")
INDEX_ENTRY = struct.Struct("<32sBBHQII")


@dataclass(frozen=True)
class IndexEntry:
    id: bytes
    type: int
    compressed: bool
    offset: int
    stored_len: int
    raw_len: int

    @property
    def record_len(self) -> int:
        return RECORD_HEADER.size + self.stored_len


def read_index(path: Path) -> list[IndexEntry]:
    """Parse and check an index file; raise RepositoryError if it is malformed."""
    data = path.read_bytes()
    if len(data) < INDEX_HEADER.size + 32:
        raise errors.RepositoryError(f"index {path} is truncated")
    magic, version, pack_id, count, _ = INDEX_HEADER.unpack_from(data)
    if magic != INDEX_MAGIC or version != VERSION or pack_id.hex() != path.name:
        raise errors.RepositoryError(f"index {path} has a bad header")
    if len(data) != INDEX_HEADER.size + count * INDEX_ENTRY.size + 32:
        raise errors.RepositoryError(f"index {path} has the wrong length for {count} entries")
    if hashlib.sha256(data[:-32]).digest() != data[-32:]:
        raise errors.RepositoryError(f"index {path} fails its checksum")
    out = []
    for i in range(count):
        at = INDEX_HEADER.size + i * INDEX_ENTRY.size
        cid, btype, comp, _, offset, stored, raw = INDEX_ENTRY.unpack_from(data, at)
        out.append(IndexEntry(cid, btype, bool(comp), offset, stored, raw))
    return out


def pack_writer_id(path: Path) -> str:
    """The id of the writer that created a pack (its lock file's name), from the pack header."""
    with open(path, "rb") as f:
        head = f.read(PACK_HEADER.size)
    if len(head) < PACK_HEADER.size:
        return ""
    magic, version, _, writer = PACK_HEADER.unpack(head)
    return writer.hex() if magic == PACK_MAGIC and version == VERSION else ""
