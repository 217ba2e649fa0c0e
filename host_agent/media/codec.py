"""What the media service and its client share: message sizes, snapshot documents, index files
and the errors that cross the wire (docs/media-protocol.md).

A failure travels as a gRPC status code and, in the trailing metadata ``hyperback-error``, the name of
its :mod:`host_agent.errors` class: :func:`status_for` picks the code on the server,
:func:`remote_error` rebuilds the exception on the client, so a client raises what a local
repository would have raised.
"""
from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from typing import Final, TypeVar

import grpc

from host_agent import errors
from host_agent._proto.hyperback.v1 import media_pb2 as pb
from host_agent.protobuf import grpc_status
from host_agent.storage.copier import ID_LEN
from host_agent.storage.repository import RepoConfig
from host_agent.storage.snapshot import Snapshot
from host_agent.tls.transport import TlsConfig, tls_failure

_E = TypeVar("_E", bound=errors.HyperbackError)

PIECE: Final = 1 << 20  # bulk bytes per message, both ways
MAX_IDS: Final = PIECE // ID_LEN  # ids per FilterMissing request
READ_BYTES: Final = 8 * PIECE  # chunk bytes a ReadChunks call may ask for (at least 64 chunks)
ERROR_KEY: Final = "hyperback-error"  # trailing metadata: the host_agent.errors class of a failure
CHANNEL_OPTIONS: Final = (
    # Pings find a client or server that vanished without closing its connections (a host that
    # went down): its streams fail instead of hanging, and its session's lease runs out.
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.max_ping_strikes", 0),
    ("grpc.max_receive_message_length", 4 * PIECE),
    ("grpc.max_send_message_length", 4 * PIECE),
)
# The service's address moves with it (a media service that moves hosts, an appliance VM that
# migrates): a connection made before a move breaks at the next call. Calls that only read, or can
# be made twice, are retried by gRPC itself while the address comes back; a session's writes are not.
_IDEMPOTENT = ("Describe", "ListSnapshots", "ResolveSnapshot", "BaseFor", "BaseTree", "Heartbeat",
               "FilterMissing", "Restore", "ReadChunks")
CLIENT_OPTIONS: Final = (*CHANNEL_OPTIONS, ("grpc.enable_retries", 1), ("grpc.service_config", json.dumps({
    "methodConfig": [{
        "name": [{"service": "hyperback.v1.Media", "method": m} for m in _IDEMPOTENT],
        "retryPolicy": {"maxAttempts": 5, "initialBackoff": "0.2s", "maxBackoff": "2s",
                        "backoffMultiplier": 2, "retryableStatusCodes": ["UNAVAILABLE"]},
    }]})))



def read_limit(chunk_size: int) -> int:
    """The most chunks one ReadChunks call may ask for."""
    return max(64, READ_BYTES // chunk_size)


def config_to_pb(config: RepoConfig) -> pb.RepositoryConfig:
    return pb.RepositoryConfig(repo_id=config.repo_id, chunk_size=config.chunk_size,
                               compression_level=config.compression_level, created=config.created,
                               version=config.version, encryption=config.encryption or "")


def config_from_pb(msg: pb.RepositoryConfig) -> RepoConfig:
    return RepoConfig(msg.repo_id, msg.chunk_size, msg.compression_level, msg.created, msg.version,
                      msg.encryption or None)


def snapshot_document(snap: Snapshot) -> str:
    return json.dumps(snap.to_json())


def parse_snapshot(document: str) -> Snapshot:
    """A snapshot from its document; UsageError if it is not one."""
    try:
        return Snapshot.from_json(json.loads(document))
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise errors.UsageError(f"malformed snapshot document: {e!r}") from e


def pieces(data: bytes) -> Iterator[bytes]:
    """``data`` cut into message-sized pieces."""
    for at in range(0, len(data), PIECE):
        yield data[at:at + PIECE]


def regrouped(blocks: Iterable[bytes | memoryview]) -> Iterator[bytes]:
    """The bytes of ``blocks``, in order, in message-sized pieces (the last one shorter)."""
    out = bytearray()
    for block in blocks:
        out += block
        while len(out) >= PIECE:
            yield bytes(out[:PIECE])
            del out[:PIECE]
    if out:
        yield bytes(out)




_STATUS_OVERRIDE = "hyperback_grpc_status"


def refused(code: grpc.StatusCode, error: _E) -> _E:
    """``error``, to be answered with ``code`` rather than the status its class maps to (a session
    that never existed is NOT_FOUND, though an expired one is ABORTED)."""
    setattr(error, _STATUS_OVERRIDE, code)
    return error


def status_for(error: errors.HyperbackError) -> grpc.StatusCode:
    override: grpc.StatusCode | None = getattr(error, _STATUS_OVERRIDE, None)
    return override if override is not None else grpc_status(error)


def remote_error(e: grpc.RpcError, address: str, tls: TlsConfig | None = None) -> errors.HyperbackError:
    """The exception a failed call stands for: the class the server named, TlsError for a failed
    handshake (never retried), AccessDenied for a refused role, else RemoteError."""
    if not isinstance(e, grpc.Call):
        return errors.RemoteError(f"the media service at {address} failed: {e}")
    details = e.details() or ""
    cert = tls.cert if tls is not None and tls.enabled else None
    handshake = tls_failure(e.code(), details, f"the media service at {address}", cert)
    if handshake is not None:
        return handshake
    name = next((str(v) for k, v in e.trailing_metadata() or () if k == ERROR_KEY), "")
    cls = getattr(errors, name, None) if name else None
    if isinstance(cls, type) and issubclass(cls, errors.HyperbackError):
        return cls(details)
    if e.code() is grpc.StatusCode.PERMISSION_DENIED:
        return errors.AccessDenied(f"the media service at {address} refused: {details}")
    if e.code() is grpc.StatusCode.ABORTED:
        return errors.SessionExpired(f"the media service at {address} ended the session: {details}")
    if e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return errors.RemoteError(f"cannot reach the media service at {address}: {details}")
    return errors.RemoteError(f"the media service at {address} failed ({e.code().name}): {details}")
