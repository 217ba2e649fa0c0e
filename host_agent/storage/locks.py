"""Repository locks: who is working on a repository, and what garbage they may still use.

Every process that reads or writes chunks holds a lock file ``locks/<id>``
(JSON: kind, host, pid, process start time, ``saw_gen``, time) for as long as
it works, refreshed by a heartbeat. Locks never exclude each other except the
``gc`` lock, which one garbage collector at a time holds. The garbage
collector uses ``saw_gen`` to decide when the packs named by a tombstone may be
deleted: only once no live lock has a ``saw_gen`` below the tombstone's
generation (see docs/repository-format.md, "Garbage collection").

A lock is stale when its process is gone (same host: no such pid, or a pid
with another start time) or, for another host, when its heartbeat is older
than ``STALE_AFTER`` seconds.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from host_agent import errors

log = logging.getLogger(__name__)

HEARTBEAT = 60.0
STALE_AFTER = 30 * 60.0
GC_LOCK = "gc"


def _process_start(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


@dataclass(frozen=True)
class LockInfo:
    name: str
    kind: str
    host: str
    pid: int
    start: str | None
    saw_gen: int
    mtime: float

    def is_stale(self, now: float | None = None) -> bool:
        if self.host == os.uname().nodename:
            return _process_start(self.pid) != self.start
        return (now or time.time()) - self.mtime > STALE_AFTER


def read_locks(locks_dir: Path) -> list[LockInfo]:
    """Every lock file, unreadable ones (being written) treated as live and old."""
    out = []
    for path in sorted(locks_dir.iterdir()):
        if path.name.startswith("."):
            continue
        try:
            doc = json.loads(path.read_text())
            mtime = path.stat().st_mtime
            out.append(LockInfo(path.name, str(doc["kind"]), str(doc["host"]), int(doc["pid"]),
                                doc.get("start"), int(doc["saw_gen"]), mtime))
        except FileNotFoundError:
            continue
        except (OSError, ValueError, KeyError, TypeError):
            out.append(LockInfo(path.name, "unknown", "", 0, None, -1, time.time()))
    return out


class Lock:
    """A held lock file; a context manager that refreshes it until released."""

    def __init__(self, locks_dir: Path, kind: str, saw_gen: int, name: str | None = None) -> None:
        self.path = locks_dir / (name or os.urandom(16).hex())
        self.kind = kind
        self.saw_gen = saw_gen
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _document(self) -> bytes:
        pid = os.getpid()
        return json.dumps({"kind": self.kind, "host": os.uname().nodename, "pid": pid,
                           "start": _process_start(pid), "saw_gen": self.saw_gen,
                           "time": time.time()}).encode()

    def acquire(self, exclusive: bool = False) -> Lock:
        """Create the lock file; with exclusive, fail if a live holder has it (a stale one is taken over)."""
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        try:
            fd = os.open(self.path, flags, 0o644)
        except FileExistsError:
            if not exclusive:
                raise
            holder = next((lk for lk in read_locks(self.path.parent) if lk.name == self.path.name), None)
            if holder is not None and not holder.is_stale():
                raise errors.RepositoryBusy(
                    f"another {holder.kind} (pid {holder.pid} on {holder.host}) holds {self.path}; "
                    "wait for it to finish") from None
            log.warning("taking over stale lock %s", self.path)
            self.path.unlink(missing_ok=True)
            fd = os.open(self.path, flags, 0o644)
        except OSError as e:
            raise errors.RepositoryIOError(f"cannot create lock {self.path}: {e.strerror}") from e
        try:
            doc = self._document()
            if os.write(fd, doc) != len(doc):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            os.fsync(fd)
        except OSError as e:
            # An empty or partial lock file would read as live forever and block every sweep.
            os.close(fd)
            self.path.unlink(missing_ok=True)
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise errors.RepositoryFull(f"the backup media is full writing lock {self.path.name}: "
                                            "free space or prune, then run again") from e
            raise errors.RepositoryIOError(f"cannot write lock {self.path}: {e.strerror}") from e
        os.close(fd)
        self._thread = threading.Thread(target=self._beat, name=f"lock-{self.kind}", daemon=True)
        self._thread.start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT):
            try:
                os.utime(self.path)
            except OSError as e:
                log.warning("cannot refresh lock %s: %s", self.path, e)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.path.unlink(missing_ok=True)

    def __enter__(self) -> Lock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
