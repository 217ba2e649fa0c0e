"""The client's side of an encrypted destination of a media service (docs/media-protocol.md, section 6).

The media host holds neither key nor passphrase. The client unlocks the destination's wrapped key
document (``KeyDocument``) with its own passphrase, or uses its key file; its native copier seals what
a backup uploads. To read, it fetches sealed records as stored (``ReadRecords``) into a local scratch
repository that holds the destination's keys, so they are opened by the native copier's one verified
read path (header against index, tag, then id; repository-format 11.3), exactly as a local reader's.
"""
from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Final, Protocol

from host_agent import errors
from host_agent._proto.hyperback.v1 import media_pb2 as pb
from host_agent._proto.hyperback.v1 import media_pb2_grpc as pb_grpc
from host_agent.storage import copier, keys
from host_agent.storage.copier import ID_LEN, ZERO_ID, NativeRepository
from host_agent.storage.files import write_atomic
from host_agent.storage.keys import RepoKeys, Secret
from host_agent.storage.packfile import INDEX_ENTRY, PACK_HEADER, PACK_MAGIC, RECORD_HEADER
from host_agent.storage.packfile import VERSION as PACK_VERSION
from host_agent.storage.repository import ProgressFn, RepoConfig, Repository
from host_agent.storage.snapshot import RestoreResult, Snapshot

FETCH_BYTES: Final = 32 << 20  # raw bytes of records per ReadRecords call: bounds the client's memory


class _Remote(Protocol):
    destination: str
    config: RepoConfig
    stub: pb_grpc.MediaStub
    timeout: float

    def unary(self, method: Any, request: Any) -> Any: ...

    def stream(self, responses: Iterator[Any]) -> Iterator[Any]: ...

    def count(self, sent: int = 0, received: int = 0) -> None: ...


def unlock(remote: _Remote, secret: Secret | None) -> RepoKeys:
    """The destination's keys, opened here: with ``secret`` or the environment's (format 11.4)."""
    mode = remote.config.encryption
    if mode is None:
        raise errors.UsageError(f"destination {remote} is not encrypted")

    def key_document() -> tuple[bytes, str]:
        answer = remote.unary(remote.stub.KeyDocument, pb.KeyDocumentRequest(destination=remote.destination))
        remote.count(received=len(answer.document))
        return answer.document, f"the key document of destination {remote}"

    return keys.unlock_with(f"destination {remote}", remote.config.repo_id, mode,
                            secret or keys.secret_from_environment(), key_document)


class ScratchRepository(Repository):
    """A local repository that seals and opens with the keys of a remote destination (a spool, or
    where a restore opens the records it fetched); its own config file is never read."""

    def __init__(self, path: Path, config: RepoConfig, repo_keys: RepoKeys | None) -> None:
        super().__init__(path, config)
        self._keys = repo_keys

    @classmethod
    def make(cls, path: Path, config: RepoConfig, repo_keys: RepoKeys | None) -> Repository:
        Repository.init(path, config.chunk_size, config.compression_level)
        return cls(path, config, repo_keys)


def fetch(remote: _Remote, snapshot_id: str, repo: Repository, native: NativeRepository,
          ids: Sequence[bytes]) -> None:
    """Fetch the records of ``ids`` that ``native`` lacks into new packs of ``repo``, indexed by
    ``native``: a record is opened (and checked) only when read."""
    wanted = [cid for cid in dict.fromkeys(ids) if cid != ZERO_ID and cid not in native]
    per_call = max(1, min(FETCH_BYTES // repo.config.chunk_size, 32768))
    for at in range(0, len(wanted), per_call):
        batch = wanted[at:at + per_call]
        request = pb.ReadRecordsRequest(destination=remote.destination, snapshot_id=snapshot_id,
                                        ids=b"".join(batch))
        records = bytearray()
        for msg in remote.stream(remote.stub.ReadRecords(request, timeout=remote.timeout)):
            records += msg.data
        remote.count(sent=len(request.ids), received=len(records))
        native.load_index(_publish(repo, batch, bytes(records)))


def _publish(repo: Repository, ids: Sequence[bytes], records: bytes) -> str:
    """Publish ``records`` (as the service sent them, in the order of ``ids``) as a new pack of ``repo``."""
    name = os.urandom(copier.PACK_ID_LEN).hex()
    entries = bytearray()
    at = 0
    for cid in ids:
        if at + RECORD_HEADER.size > len(records):
            raise errors.CorruptChunk(f"the media service sent too few records: {cid.hex()} is missing",
                                      cid.hex())
        got, btype, comp, _, raw_len, stored_len = RECORD_HEADER.unpack_from(records, at)
        if got != cid:
            raise errors.CorruptChunk(f"the media service sent record {got.hex()} for {cid.hex()}", cid.hex())
        entries += INDEX_ENTRY.pack(cid, btype, comp, 0, PACK_HEADER.size + at, stored_len, raw_len)
        at += RECORD_HEADER.size + stored_len
    if at != len(records):
        raise errors.CorruptChunk(f"the media service's records end at byte {len(records)}, not {at}")
    pack = repo.path / "packs" / name[:2] / name
    header = PACK_HEADER.pack(PACK_MAGIC, PACK_VERSION, bytes.fromhex(name), bytes(16))
    # Written without fsync (unlike a published pack): the scratch repository goes with the call, and
    # syncing what is read back at once would double a restore's cost.
    try:
        pack.parent.mkdir(exist_ok=True)
        with open(pack, "xb") as f:
            f.write(header)
            f.write(records)
        (repo.path / "index" / name).write_bytes(copier.encode_index(bytes.fromhex(name), bytes(entries)))
    except OSError as e:
        raise errors.RepositoryIOError(f"cannot write {pack}: {e.strerror}") from e
    return name


def tree_pages(remote: _Remote, snap: Snapshot, repo: Repository) -> list[pb.TreePage]:
    """Every page of ``snap``'s tree, fetched into ``repo`` and opened there (tag and id checked),
    level by level from the root."""
    out: list[pb.TreePage] = []
    level_ids = [snap.tree.root] if snap.tree.root else []
    level = snap.tree.height - 1
    with repo.session("fetch", writer=False) as native:
        while level_ids:
            fetch(remote, snap.id, repo, native, level_ids)
            pages = [native.read_blob(pid) for pid in level_ids]
            out.extend(pb.TreePage(data=page, level=level) for page in pages)
            level_ids = [p[i:i + ID_LEN] for p in pages for i in range(0, len(p), ID_LEN)] if level else []
            level -= 1
    return out


def restore(remote: _Remote, snap: Snapshot, repo_keys: RepoKeys, target: str | os.PathLike[str],
            overwrite: bool, progress: ProgressFn | None, sync: bool,
            spool_dir: str | os.PathLike[str] | None) -> RestoreResult:
    """Restore ``snap`` of an encrypted destination: its records are fetched into a scratch
    repository (under ``spool_dir``, as large as the snapshot's stored data), then restored from
    there by the native copier, which opens and checks every one."""
    with tempfile.TemporaryDirectory(prefix="hyperback-unseal-", dir=spool_dir) as tmp:
        scratch = ScratchRepository.make(Path(tmp) / "scratch", remote.config, repo_keys)
        leaves = [p.data for p in tree_pages(remote, snap, scratch) if p.level == 0]
        with scratch.session("fetch", writer=False) as native:
            fetch(remote, snap.id, scratch, native,
                  [leaf[i:i + ID_LEN] for leaf in leaves for i in range(0, len(leaf), ID_LEN)])
        write_atomic(scratch.path / "snapshots" / snap.id, json.dumps(snap.to_json()).encode(),
                     scratch.path / "tmp")
        return scratch.restore(snap.id, target, overwrite, progress, sync=sync)


__all__ = ["ScratchRepository", "fetch", "restore", "tree_pages", "unlock"]
