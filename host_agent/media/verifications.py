"""The media client's calls for boot verification records (docs/media-protocol.md, section 1):
a host that booted a snapshot of media on another host keeps its verdict there."""
from __future__ import annotations

import json
from typing import Any, Protocol

from host_agent._proto.hyperback.v1 import media_pb2 as pb
from host_agent._proto.hyperback.v1 import media_pb2_grpc as pb_grpc
from host_agent.storage.verification import Verification, console_tail


class _Client(Protocol):
    destination: str
    stub: pb_grpc.MediaStub

    def unary(self, method: Any, request: Any) -> Any: ...

    def count(self, sent: int = 0, received: int = 0) -> None: ...


class VerificationCalls:
    """Mixed into ``RemoteRepository``: the same methods as ``Repository``'s."""

    def record_verification(self: _Client, record: Verification, console: bytes) -> None:
        """Keep a boot verification record on the snapshot (the console's end goes with it)."""
        tail = console_tail(console)
        self.unary(self.stub.RecordVerification, pb.RecordVerificationRequest(
            destination=self.destination, document=json.dumps(record.to_json()), console=tail))
        self.count(sent=len(tail))

    def verifications(self: _Client) -> dict[str, Verification]:
        """The latest verification of every snapshot that has one, by snapshot id."""
        request = pb.ListVerificationsRequest(destination=self.destination)
        found = self.unary(self.stub.ListVerifications, request)
        records = [Verification.from_json(json.loads(d)) for d in found.documents]
        self.count(received=sum(len(d) for d in found.documents))
        return {r.snapshot: r for r in records}
