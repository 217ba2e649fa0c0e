"""Repository locks: who is working on a repository, and what garbage they may still use.

Every process that reads or writes chunks holds a lock file ``locks/<id>``
(JSON: kind, host, pid, process start time, ``saw_gen``, time) for as long as
it works, refreshed by a heartbeat. Locks never exclude each other except the
``gc`` lock, which one garbage collector at a time holds. The garbage
collector uses ``saw_gen`` to decide when the packs named by a tombstone may be
deleted: only once no live lock has a ``saw_gen`` below the tombstone's
generation (see docs/repository-format.md, "Garbage collection").

A lock file appears whole: its document is written to a *creation file*
``locks/.<id>.<host>.<pid>.<start>`` first, then linked (``gc``) or renamed to
its name. So a process killed between creating and writing leaves a creation
file whose name says whose it was, never a lock that nobody can judge.

A lock is stale when its holder is gone (same host: no such pid, or a pid with
another start time; another host: no heartbeat for ``STALE_AFTER`` seconds).
A lock file that cannot be parsed was left half-written by a hyperback from
before creation files; it is stale once ``UNREADABLE_GRACE`` old. Whoever takes
a lock first clears the stale ones, saying so for each (format section 7).
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
# A process of an older hyperback creates its lock file, then writes it: an empty file younger
# than this may be one being written this instant.
UNREADABLE_GRACE = 60.0
GC_LOCK = "gc"


def _host() -> str:
    return os.uname().nodename


def _process_start(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _gone(host: str, pid: int, start: str | None, mtime: float, now: float) -> str | None:
    """Why the holder ``pid`` of ``host`` is gone, or None while it may live."""
    if host == _host():
        if _process_start(pid) != start:
            return f"pid {pid} on {host} is gone"
        return None
    if now - mtime > STALE_AFTER:
        return f"no heartbeat from {host} for {(now - mtime) / 60:.0f} minutes (the limit is " \
               f"{STALE_AFTER / 60:.0f})"
    return None


@dataclass(frozen=True)
class LockInfo:
    name: str
    kind: str
    host: str
    pid: int
    start: str | None
    saw_gen: int
    mtime: float
    readable: bool = True  # False: empty or cut short, left by a process killed while writing it
    document: bytes = b""  # what was judged: a takeover removes that lock, never a successor

    def stale_because(self, now: float | None = None) -> str | None:
        """Why the lock is stale, or None while its holder may be at work."""
        now = now or time.time()
        if not self.readable:
            age = now - self.mtime
            return None if age <= UNREADABLE_GRACE else (
                f"it cannot be read ({age:.0f} s old): its process was killed while writing it")
        return _gone(self.host, self.pid, self.start, self.mtime, now)

    def is_stale(self, now: float | None = None) -> bool:
        return self.stale_because(now) is not None


def read_locks(locks_dir: Path) -> list[LockInfo]:
    """Every lock file; unreadable ones live (saw_gen -1: older than any tombstone) until their
    grace has passed."""
    out = []
    for path in sorted(locks_dir.iterdir()):
        if path.name.startswith("."):  # a creation file: not a lock yet
            continue
        try:
            mtime = path.stat().st_mtime
        except FileNotFoundError:  # released since listed
            continue
        text = b""
        try:
            text = path.read_bytes()
            doc = json.loads(text)
            out.append(LockInfo(path.name, str(doc["kind"]), str(doc["host"]), int(doc["pid"]),
                                doc.get("start"), int(doc["saw_gen"]), mtime, document=text))
        except FileNotFoundError:
            continue
        except (OSError, ValueError, KeyError, TypeError):
            out.append(LockInfo(path.name, "unknown", "", 0, None, -1, mtime, readable=False,
                                document=text))
    return out


def _creation_file(locks_dir: Path, name: str, pid: int, start: str | None) -> Path:
    return locks_dir / f".{name}.{_host()}.{pid}.{start or 'none'}"


def _creation_file_gone(path: Path, now: float) -> str | None:
    """Why the process that was creating lock ``path`` (a creation file) is gone, or None."""
    try:
        host, pid, start = path.name[1:].split(".", 1)[1].rsplit(".", 2)
        return _gone(host, int(pid), None if start == "none" else start, path.stat().st_mtime, now)
    except (ValueError, IndexError, FileNotFoundError):
        return None  # not named as hyperback names them (not ours to judge), or gone meanwhile


def clear_stale(locks_dir: Path) -> None:
    """Delete stale locks and creation files (not ``gc``: a collector taking it over does), each
    with a warning: clearing is never silent."""
    now = time.time()
    stale = [(locks_dir / lk.name, f"stale lock {lk.name} of a {lk.kind}: {why}")
             for lk in read_locks(locks_dir) if lk.name != GC_LOCK and (why := lk.stale_because(now))]
    stale += [(path, f"unfinished lock {path.name} (killed while creating it): {why}")
              for path in sorted(locks_dir.glob(".*")) if (why := _creation_file_gone(path, now))]
    for path, message in stale:
        try:
            path.unlink(missing_ok=True)
        except OSError as e:
            log.warning("cannot remove %s: %s", message, e.strerror)
            continue
        log.warning("removed %s", message)


class Lock:
    """A held lock file; a context manager that refreshes it until released."""

    def __init__(self, locks_dir: Path, kind: str, saw_gen: int, name: str | None = None) -> None:
        self.path = locks_dir / (name or os.urandom(16).hex())
        self.kind = kind
        self.saw_gen = saw_gen
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._document_written = b""

    def _document(self) -> bytes:
        pid = os.getpid()
        return json.dumps({"kind": self.kind, "host": os.uname().nodename, "pid": pid,
                           "start": _process_start(pid), "saw_gen": self.saw_gen,
                           "time": time.time()}).encode()

    def acquire(self, exclusive: bool = False) -> Lock:
        """Create the lock file whole, after clearing stale ones; with exclusive, fail if a live
        holder has it (a stale one is taken over)."""
        clear_stale(self.path.parent)
        pending = self._write_creation_file()
        try:
            self._publish(pending, exclusive)
        except OSError as e:
            raise errors.RepositoryIOError(f"cannot create lock {self.path}: {e.strerror}") from e
        finally:
            pending.unlink(missing_ok=True)
        self._thread = threading.Thread(target=self._beat, name=f"lock-{self.kind}", daemon=True)
        self._thread.start()
        return self

    def _write_creation_file(self) -> Path:
        pid = os.getpid()
        path = _creation_file(self.path.parent, self.path.name, pid, _process_start(pid))
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            try:
                doc = self._document_written = self._document()
                if os.write(fd, doc) != len(doc):
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as e:
            path.unlink(missing_ok=True)
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise errors.RepositoryFull(f"the backup media is full writing lock {self.path.name}: "
                                            "free space or prune, then run again") from e
            raise errors.RepositoryIOError(f"cannot write lock {self.path}: {e.strerror}") from e
        return path

    def _publish(self, pending: Path, exclusive: bool) -> None:
        """Give the whole creation file the lock's name: a rename (names are random), or for the
        exclusive lock a claim that fails if a live holder has the name (a stale one is taken over)."""
        if not exclusive:
            os.rename(pending, self.path)
            return
        if self._claim(pending):
            return
        holder = next((lk for lk in read_locks(self.path.parent) if lk.name == self.path.name), None)
        if holder is not None:
            why = holder.stale_because()
            if why is None:
                raise errors.RepositoryBusy(
                    f"another {holder.kind} (pid {holder.pid} on {holder.host}) holds {self.path}; "
                    "wait for it to finish")
            self.remove_stale(holder, why)
        if not self._claim(pending):
            raise errors.RepositoryBusy(f"another process took {self.path} meanwhile; wait for it to finish")

    def remove_stale(self, judged: LockInfo, why: str) -> None:
        """Remove the lock file judged stale, and only that one. Another process may have taken
        it over since it was judged: so the name is renamed aside (atomic: whatever holds the name
        now moves) and the moved file's document is compared with the judged one (documents are
        unique: host, pid, start and time; inode numbers are not stable through FUSE); a
        successor's lock is put back and this process is told the lock is busy."""
        pid = os.getpid()  # named as a creation file: if this process dies, it is cleared as one
        aside = _creation_file(self.path.parent, f"{self.path.name}-aside-{os.urandom(8).hex()}", pid,
                               _process_start(pid))
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return  # someone removed it already; the claim that follows decides
        try:
            if aside.read_bytes() != judged.document:
                self._claim(aside)
                raise errors.RepositoryBusy(f"another process took over {self.path} meanwhile; "
                                            "wait for it to finish")
            log.warning("taking over stale lock %s: %s", self.path, why)
        finally:
            aside.unlink(missing_ok=True)

    def _claim(self, pending: Path) -> bool:
        """Give the lock's name to ``pending``'s document unless the name exists: a hard link; on file
        systems without hard links (FAT, exFAT), an exclusive create written in place, where a
        kill in between leaves an unreadable lock (stale after UNREADABLE_GRACE)."""
        try:
            os.link(pending, self.path)
            return True
        except FileExistsError:
            return False
        except OSError as e:
            if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOSYS):  # ENOSYS: through FUSE
                raise
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        except FileExistsError:
            return False
        try:
            os.write(fd, pending.read_bytes())
            os.fsync(fd)
        finally:
            os.close(fd)
        return True

    def ensure_held(self) -> None:
        """Raise LockLost unless this lock's own file still has its name: another process may
        have judged it stale (no heartbeat for STALE_AFTER) and removed it, and a collector may then
        have swept chunks this process relies on."""
        try:
            held = self.path.read_bytes() == self._document_written
        except FileNotFoundError:
            held = False
        if not held:
            raise errors.LockLost(
                f"lock {self.path} was removed while this {self.kind} ran (another process judged it "
                "stale), so a garbage collection may have deleted data it reuses; nothing was "
                "committed: run it again")

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
