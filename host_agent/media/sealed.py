"""The media service's side of an encrypted destination (docs/media-protocol.md, section 6): it
serves sealed records as stored and never holds a key, so every step that opens a record (a tag, an
id, a tree page) is the client's. See ``host_agent.media.unsealing`` for that side.
"""
from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import ExitStack
from typing import BinaryIO, Final

from host_agent import errors
from host_agent._proto.hyperback.v1 import media_pb2 as pb
from host_agent.media.codec import MAX_IDS, regrouped
from host_agent.storage import keys
from host_agent.storage.copier import ID_LEN
from host_agent.storage.keys import RepoKeys
from host_agent.storage.packfile import IndexEntry, read_index
from host_agent.storage.repository import Repository


class KeylessRepository(Repository):
    """A served repository: never unlocked, so an encrypted one's native handles hold no key (they
    look ids up and publish packs, which needs none; the calls that would open a record refuse)."""

    def keys(self) -> RepoKeys | None:
        return None


_CLIENT_DOES_IT: Final = "a client with the key does it (docs/media-protocol.md, section 6)"


def refuse_encrypted(repo: Repository, destination: str, what: str, instead: str = _CLIENT_DOES_IT) -> None:
    """RepositoryError if ``repo`` is encrypted: ``what`` needs the key, which this service lacks."""
    if repo.config.encryption:
        raise errors.RepositoryError(f"destination {destination} is encrypted and the media service holds "
                                     f"no key, so it cannot {what}: {instead}")


def key_document(repo: Repository, destination: str) -> pb.KeyDocumentResponse:
    """The wrapped key (passphrase mode) or nothing (keyfile mode: the client has the key file)."""
    mode = repo.config.encryption
    if not mode:
        raise errors.RepositoryError(f"destination {destination} is not encrypted: it has no key document")
    path = repo.path / keys.KEY_FILE
    if mode != keys.PASSPHRASE:
        return pb.KeyDocumentResponse(mode=mode)
    try:
        return pb.KeyDocumentResponse(mode=mode, document=path.read_bytes())
    except OSError as e:
        raise errors.KeyMissing(f"destination {destination} has no readable key document {path} "
                                f"({e.strerror}): restore its exported copy (hyperback key export)") from e


class RecordLocations:
    """Where each blob of a repository is stored, from its index files; index files read once and
    forgotten when their pack goes (garbage collection)."""

    def __init__(self, repo: Repository) -> None:
        self._repo = repo
        self._lock = threading.Lock()
        self._packs: dict[str, list[bytes]] = {}  # the ids of each pack read
        self._where: dict[bytes, tuple[str, IndexEntry]] = {}

    def find(self, cid: bytes) -> tuple[str, IndexEntry]:
        with self._lock:
            if cid not in self._where:  # perhaps in a pack published since the last refresh
                self._refresh()
            found = self._where.get(cid)
        if found is None:
            raise errors.MissingChunk(f"the destination holds no blob {cid.hex()}", cid.hex())
        return found

    def _refresh(self) -> None:
        names = set(self._repo.pack_names())
        for gone in set(self._packs) - names:
            for cid in self._packs.pop(gone):
                if self._where.get(cid, ("",))[0] == gone:
                    del self._where[cid]
        for name in sorted(names - set(self._packs)):
            entries = read_index(self._repo.path / "index" / name)
            self._packs[name] = [e.id for e in entries]
            self._where.update((e.id, (name, e)) for e in entries)


def read_records(repo: Repository, locations: RecordLocations, ids: bytes) -> Iterator[pb.RecordData]:
    """The records of ``ids`` as stored, in order, in pieces."""
    if not ids or len(ids) % ID_LEN or len(ids) > MAX_IDS * ID_LEN:
        raise errors.UsageError(f"ids must be 32 bytes each, 1 to {MAX_IDS} of them")
    for piece in regrouped(_records(repo, locations, ids)):
        yield pb.RecordData(data=piece)


def _records(repo: Repository, locations: RecordLocations, ids: bytes) -> Iterator[bytes]:
    with ExitStack() as files:
        opened: dict[str, BinaryIO] = {}
        for at in range(0, len(ids), ID_LEN):
            name, entry = locations.find(ids[at:at + ID_LEN])
            try:
                if name not in opened:
                    opened[name] = files.enter_context(open(repo.path / "packs" / name[:2] / name, "rb"))
                opened[name].seek(entry.offset)
                record = opened[name].read(entry.record_len)
            except OSError as e:
                raise errors.RepositoryIOError(f"cannot read pack {name}: {e.strerror}") from e
            if len(record) != entry.record_len:
                raise errors.CorruptChunk(f"pack {name} is truncated at record {entry.id.hex()}",
                                          entry.id.hex())
            yield record
