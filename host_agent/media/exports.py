"""Exports of snapshots behind a media service: the ``ChunkSource`` an export's plugin reads them from.

``RemoteRepository.export_params()`` names :func:`open_remote`; the export's plugin process
(``host_agent.storage.nbd_plugin``) calls it to reach the media service itself. Every range comes from
the ReadChunks call (docs/media-protocol.md), which the server answers from a reader it keeps open for
the snapshot. The server verifies each chunk before it sends it; this side checks again that the ids
are those it asked for and that each chunk's bytes hash to its id, so a damaged network or server
fails a read instead of serving wrong bytes.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from host_agent import errors
from host_agent._proto.hyperback.v1 import media_pb2 as pb
from host_agent.media.client import DEFAULT_TIMEOUT, RemoteRepository
from host_agent.media.codec import read_limit
from host_agent.storage import copier
from host_agent.storage.copier import ID_LEN, ZERO_ID
from host_agent.storage.maptree import FANOUT
from host_agent.storage.snapshot import Snapshot
from host_agent.tls.transport import NO_TLS, TlsConfig

WINDOW_BYTES = 1 << 20


class RemoteChunks:
    """A snapshot of a media service's destination, read range by range. Thread-safe (gRPC is)."""

    # A call costs about as much as 1 MiB of data (measured: 9 CPU s/GB per side at 64 KiB per call,
    # 3 s/GB at 2 MiB), so an export reads at least this much per call, aligned, into its cache.
    window_bytes = WINDOW_BYTES

    def __init__(self, address: str, destination: str, snapshot_id: str,
                 timeout: float = DEFAULT_TIMEOUT, tls: TlsConfig = NO_TLS) -> None:
        self.remote = RemoteRepository(address, destination, timeout=timeout, tls=tls)
        try:
            self.snapshot: Snapshot = self.remote.resolve(snapshot_id)
        except BaseException:
            self.remote.close()
            raise
        self._limit = read_limit(self.snapshot.chunk_size)

    def close(self) -> None:
        self.remote.close()

    def _call(self, first: int, count: int, ids_only: bool) -> tuple[bytes, bytes]:
        """(ids, data) of chunks [first, first + count)."""
        remote = self.remote
        request = pb.ReadChunksRequest(destination=remote.destination, snapshot_id=self.snapshot.id,
                                       first=first, count=count, ids_only=ids_only)
        ids, data = b"", bytearray()
        for msg in remote.stream(remote.stub.ReadChunks(request, timeout=remote.timeout)):
            part = msg.WhichOneof("part")
            if part == "chunk_ids" and not ids:
                ids = msg.chunk_ids
            elif part == "data" and ids and not ids_only:
                data += msg.data
            else:
                raise errors.RemoteError(f"the media service at {remote.address} sent {part} out of order")
        remote.count(received=len(ids) + len(data))
        if len(ids) != count * ID_LEN:
            raise errors.RemoteError(f"the media service at {remote.address} sent {len(ids) // ID_LEN} ids "
                                     f"for {count} chunks")
        return ids, bytes(data)

    def leaf(self, index: int) -> bytes:
        first = index * FANOUT
        return self._call(first, min(FANOUT, self.snapshot.tree.entries - first), ids_only=True)[0]

    def chunks(self, first: int, ids: Sequence[bytes]) -> list[bytes]:
        out: list[bytes] = []
        for at in range(0, len(ids), self._limit):
            out += self._range(first + at, ids[at:at + self._limit])
        return out

    def _range(self, first: int, ids: Sequence[bytes]) -> list[bytes]:
        got_ids, data = self._call(first, len(ids), ids_only=False)
        cs, size = self.snapshot.chunk_size, self.snapshot.size
        out: list[bytes] = []
        at = 0
        for n, want in enumerate(ids):
            cid = got_ids[n * ID_LEN:(n + 1) * ID_LEN]
            if want != ZERO_ID and cid != want:
                raise errors.CorruptChunk(f"the media service names chunk {cid.hex()} where the snapshot's "
                                          f"map has {want.hex()}", want.hex())
            if cid == ZERO_ID:
                out.append(b"")
                continue
            length = min(cs, size - (first + n) * cs)
            content = data[at:at + length]
            at += length
            if len(content) != length or copier.sha256(content) != cid:
                raise errors.CorruptChunk(f"chunk {cid.hex()} arrived damaged (it fails its SHA-256)",
                                          cid.hex())
            out.append(content)
        if at != len(data):
            raise errors.RemoteError(f"the media service at {self.remote.address} sent more bytes than "
                                     "the chunks hold")
        return out


def open_remote(params: Mapping[str, str], snapshot_id: str) -> RemoteChunks:
    """The plugin's opener for ``RemoteRepository.export_params()``."""
    ca, cert, key = (Path(params[k]) if k in params else None for k in ("tls_ca", "tls_cert", "tls_key"))
    tls = TlsConfig(ca, cert, key)
    return RemoteChunks(params["address"], params["destination"], snapshot_id,
                        float(params.get("timeout", DEFAULT_TIMEOUT)), tls)
