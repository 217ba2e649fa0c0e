"""Backup sessions of the media service: a client's backup, held open across calls.

A session holds a writer lock on its repository, exactly as a local backup does, so garbage
collection on the media host treats the session's packs as work in progress. A session that goes
silent for longer than its lease expires: its lock goes, and what it uploaded is garbage for the
next collection (docs/media-protocol.md).
"""
from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import grpc

from host_agent import errors
from host_agent.media.codec import refused
from host_agent.model import Policy
from host_agent.storage.copier import NativeRepository
from host_agent.storage.maptree import TreeReader
from host_agent.storage.repository import Repository
from host_agent.storage.snapshot import SNAPSHOT_ID, Snapshot

log = logging.getLogger(__name__)


class Session:
    """One client's backup: a writer lock and native handle on a repository, held across calls.

    ``use()`` serializes the calls that touch the native handle with the session's end, so an
    expiry never closes the handle under a running call.
    """

    def __init__(self, session_id: str, repo: Repository, name: str, policy: Policy, base_id: str,
                 copy: bool = False) -> None:
        self.id, self.repo, self.name, self.policy = session_id, repo, name, policy
        self.copy = copy  # commits another repository's document unchanged (media-protocol.md, 2.3)
        self.writer_id = os.urandom(16)
        self.last_seen = time.monotonic()
        self.ended: str | None = None  # why, once ended
        self._busy = threading.Lock()
        self._stack = ExitStack()
        try:
            # The lock first, then the base: a base seen under the lock is one the sweep protects.
            self.native = self._stack.enter_context(
                repo.session("media-backup", writer=True, writer_id=self.writer_id))
            if copy and base_id:
                raise errors.UsageError("a copy session takes no base")
            self.base = (explicit_base(repo, base_id) if base_id else
                         None if copy else repo.base_for(name, policy))
            # The base's pages are in the repository (it is committed): the commit check trusts them.
            # An encrypted one's are sealed and its commit checks only the root (servicer._check_root).
            self.base_pages = set(TreeReader(self.native, self.base.tree).pages()) \
                if self.base and not repo.config.encryption else set()
        except BaseException:
            self._stack.close()
            raise

    def touch(self) -> None:
        """Note a sign of life; SessionExpired if the session ended."""
        if self.ended is not None:
            raise errors.SessionExpired(f"backup session {self.id} {self.ended}")
        self.last_seen = time.monotonic()

    @contextmanager
    def use(self) -> Iterator[NativeRepository]:
        """The native handle, which the session's end waits for."""
        with self._busy:
            self.touch()
            yield self.native

    def end(self, why: str) -> bool:
        """Release the lock and the handle; False if it had ended already."""
        with self._busy:
            if self.ended is not None:
                return False
            self.ended = why
            self._stack.close()
            return True


def explicit_base(repo: Repository, base_id: str) -> Snapshot:
    """The snapshot ``base_id`` names exactly, of this repository's chunk size."""
    found = repo.resolve(base_id) if SNAPSHOT_ID.fullmatch(base_id) else None
    if found is None or found.id != base_id:
        raise errors.SnapshotNotFound(f"no snapshot {base_id!r} to take as the base")
    if found.chunk_size != repo.config.chunk_size:
        raise errors.RepositoryError(f"base snapshot {found.id} has another chunk size")
    return found


class Sessions:
    """The live sessions, and a reaper that ends those silent for longer than the lease."""

    ENDED_KEPT = 3600.0  # seconds an ended session's id is remembered, to answer ABORTED and not NOT_FOUND

    def __init__(self, lease: float) -> None:
        self.lease = lease
        self._lock = threading.Lock()
        self._live: dict[str, Session] = {}
        self._ended: dict[str, tuple[float, str]] = {}
        self._stop = threading.Event()
        self._reaper = threading.Thread(target=self._reap_loop, name="media-reaper", daemon=True)
        self._reaper.start()

    def open(self, repo: Repository, name: str, policy: Policy, base_id: str, copy: bool = False) -> Session:
        session = Session(os.urandom(16).hex(), repo, name, policy, base_id, copy)
        with self._lock:
            self._live[session.id] = session
        return session

    def get(self, session_id: str) -> Session:
        with self._lock:
            session = self._live.get(session_id)
            ended = self._ended.get(session_id)
        if session is not None:
            session.touch()  # may have ended since the lookup
            return session
        if ended is not None:
            raise errors.SessionExpired(f"backup session {session_id} {ended[1]}")
        raise refused(grpc.StatusCode.NOT_FOUND, errors.SessionExpired(
            f"no backup session {session_id}: it never existed, or the media service restarted since"))

    def end(self, session: Session, why: str) -> None:
        with self._lock:
            self._live.pop(session.id, None)
            self._ended[session.id] = (time.monotonic(), why)
        if session.end(why):
            log.info("backup session %s of %s %s", session.id, session.name, why)

    def _reap_loop(self) -> None:
        while not self._stop.wait(min(self.lease / 4, 5.0)):
            self.reap()

    def reap(self) -> None:
        now = time.monotonic()
        with self._lock:
            idle = [s for s in self._live.values() if now - s.last_seen > self.lease]
            for sid in [sid for sid, (at, _) in self._ended.items() if now - at > self.ENDED_KEPT]:
                del self._ended[sid]
        for session in idle:
            self.end(session, f"expired: no call for more than {self.lease:g} s")

    def close(self) -> None:
        self._stop.set()
        self._reaper.join()
        with self._lock:
            live = list(self._live.values())
        for session in live:
            self.end(session, "ended: the media service stopped")
