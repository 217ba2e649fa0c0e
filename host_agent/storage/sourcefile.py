"""An image file's identity, recorded with its snapshot so that the next backup can tell, without
reading it, that the file has not changed (docs/repository-format.md, 5.1, ``source_file``).

::

    seen = SourceFile.of(fd)                     # before the first byte is read
    reason = unchanged_since(base, seen)         # None: read it; else why it need not be

The rule is borg's files cache with git's racy-timestamp guard. A file is taken as unchanged when
its device, inode, size, mtime and ctime (nanoseconds) all equal the base snapshot's record. ctime
is what makes this safe: the kernel sets it to the current time on every write, truncate, rename
into place or metadata change, and no system call sets it back (``utime`` restores an mtime, not a
ctime); a copy or a file re-created in place has another inode or a new ctime. What it cannot see
is a write in the same timestamp tick as the record was taken: the write would leave ctime equal.
So a record is trusted only if the file's ctime and mtime lie at least :data:`RACY_MARGIN_NS`
before the moment the record was taken (``seen_ns``, read from the clock before the ``fstat``).
Block devices never get a record: a device node's timestamps say nothing about its contents.
"""
from __future__ import annotations

import os
import stat
import time
from dataclasses import dataclass
from typing import Any, Protocol

# The coarsest timestamps a source may carry: ext4, xfs and btrfs stamp with a jiffy (at most
# 10 ms), FAT with 2 s; the rest covers a network file system whose server clock runs behind
# ours by that much. A file last changed within this of the record is read again.
RACY_MARGIN_NS = 2_000_000_000


@dataclass(frozen=True)
class SourceFile:
    """What ``fstat`` said of a regular image file just before it was read, and when."""

    dev: int
    ino: int
    size: int
    mtime_ns: int
    ctime_ns: int
    seen_ns: int                        # wall clock (ns since the epoch) read just before the fstat
    unchanged_since: str | None = None  # the base snapshot whose tree was kept unread, if any

    @classmethod
    def of(cls, fd: int) -> SourceFile | None:
        """The record of the file open at ``fd``; None for anything but a regular file."""
        seen = time.time_ns()
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return None
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, seen)

    def same_file_state(self, other: SourceFile) -> bool:
        return (self.dev, self.ino, self.size, self.mtime_ns, self.ctime_ns) == \
            (other.dev, other.ino, other.size, other.mtime_ns, other.ctime_ns)

    def to_json(self) -> dict[str, Any]:
        return {"dev": self.dev, "ino": self.ino, "size": self.size, "mtime_ns": self.mtime_ns,
                "ctime_ns": self.ctime_ns, "seen_ns": self.seen_ns, "unchanged_since": self.unchanged_since}

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> SourceFile:
        since = doc.get("unchanged_since")
        return cls(int(doc["dev"]), int(doc["ino"]), int(doc["size"]), int(doc["mtime_ns"]),
                   int(doc["ctime_ns"]), int(doc["seen_ns"]), str(since) if since else None)


class _Base(Protocol):
    """What the rule needs of the base snapshot."""

    @property
    def id(self) -> str: ...

    @property
    def size(self) -> int: ...

    @property
    def source_file(self) -> SourceFile | None: ...


def unchanged_since(base: _Base | None, now: SourceFile | None) -> str | None:
    """Why the file ``now`` describes needs no reading against ``base``, or None if it must be read."""
    if base is None or now is None or base.source_file is None:
        return None
    was = base.source_file
    if base.size != now.size or not was.same_file_state(now):
        return None
    if max(was.mtime_ns, was.ctime_ns) >= was.seen_ns - RACY_MARGIN_NS:
        return None  # changed so shortly before the record that a later write could keep its stamps
    return (f"source unchanged since snapshot {base.id} (same device, inode, size, mtime and ctime): "
            "its tree was kept, nothing read")
