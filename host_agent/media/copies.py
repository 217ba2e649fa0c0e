"""A media service's destination as the target of ``hyperback copy`` (``storage.transfer``).

Each snapshot is copied in a *copy session* of the media protocol (docs/media-protocol.md, 2.3): a
backup session that resolves no base and commits the source's document unchanged. The blobs go the
way a remote backup's do (``host_agent.media.client``): asked for with ``FilterMissing`` before they
are read from the source, stored in a local spool repository whose packs carry the session's writer
id, and uploaded pack by pack (each cut down to what the destination still lacks) as the spool
publishes them; then the document is committed, and the server checks that everything it names is
there. The session's lock protects what it uploaded until the commit; a copy killed before it
leaves packs that a rerun finds present and does not send again.
"""
from __future__ import annotations

import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Final

from host_agent import errors
from host_agent.media.client import RemoteRepository
from host_agent.media.client import _BackupSession as BackupSession  # the client's own session and spool
from host_agent.media.client import _Spool as Spool
from host_agent.media.client import _Uploader as Uploader
from host_agent.storage.copier import NativeRepository
from host_agent.storage.repository import RepoConfig, Repository
from host_agent.storage.snapshot import Snapshot
from host_agent.storage.transfer import SnapshotWriter
from host_agent.tls.transport import NO_TLS, TlsConfig

MEDIA_SCHEME: Final = "media://"
THROTTLE_EVERY: Final = 256  # blobs stored between looks at the spool's upload backlog


class MediaTarget:
    """A destination of a media service, as a copy target."""

    def __init__(self, remote: RemoteRepository) -> None:
        self.remote = remote
        self.config: RepoConfig = remote.config

    @classmethod
    @contextmanager
    def connect(cls, spec: str, tls: TlsConfig = NO_TLS) -> Iterator[MediaTarget]:
        """``media://HOST:PORT/DESTINATION``, reached with ``tls`` (UsageError if malformed)."""
        address, _, destination = spec.removeprefix(MEDIA_SCHEME).partition("/")
        if not address or ":" not in address or not destination:
            raise errors.UsageError(f"{spec!r} is not {MEDIA_SCHEME}HOST:PORT/DESTINATION")
        with RemoteRepository(address, destination, tls=tls) as remote:
            yield cls(remote)

    def __str__(self) -> str:
        return str(self.remote)

    def snapshots(self, name: str | None = None) -> list[Snapshot]:
        return self.remote.snapshots(name)

    def holds(self, repo: Repository) -> bool:
        """Not known from here; a copy into the source itself would find every snapshot present."""
        return False

    @contextmanager
    def writer(self, snap: Snapshot) -> Iterator[SnapshotWriter]:
        with BackupSession(self.remote, snap.name, snap.policy, None, copy=True) as session, \
                tempfile.TemporaryDirectory(prefix="hyperback-copy-spool-") as tmp:
            spool = Spool.create(Path(tmp) / "spool", self.config, session.writer_id)
            with Uploader(session, spool) as uploader, spool.session("copy", writer=True) as native:
                yield _MediaWriter(session, uploader, native)


class _MediaWriter:
    def __init__(self, session: BackupSession, uploader: Uploader, native: NativeRepository) -> None:
        self._session, self._uploader, self._native = session, uploader, native
        self._stored = 0

    def missing(self, ids: Sequence[bytes]) -> set[bytes]:
        return self._session.missing(ids)

    def store(self, data: bytes, blob_type: int) -> bytes:
        self._stored += 1
        if self._stored % THROTTLE_EVERY == 0:
            self._uploader.wait_for_room()  # the spool stays small whatever the snapshot's size
        return self._native.store_blob(data, blob_type)[0]

    def commit(self, snap: Snapshot, document: bytes) -> None:
        """The server parses and writes the document itself: it keeps the fields it knows."""
        self._native.flush()
        self._uploader.finish()
        self._session.commit(snap)
