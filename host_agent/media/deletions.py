"""The media client's deleting calls (docs/media-protocol.md, 2.5): ``Forget`` and ``Prune`` of a
destination, which the service grants an operator's certificate only (docs/tls.md, "Roles")."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from host_agent._proto.hyperback.v1 import media_pb2 as pb
from host_agent.media.codec import parse_snapshot
from host_agent.media.verifications import _Client
from host_agent.storage.retention import KeepPolicy
from host_agent.storage.snapshot import Snapshot


@dataclass(frozen=True)
class RemotePruned:
    keep: list[Snapshot]
    remove: list[Snapshot]
    bytes_freed: int


class DeletionCalls:
    """Mixed into ``RemoteRepository``."""

    def forget(self: _Client, snapshot_ids: Sequence[str]) -> None:
        """Forget the snapshots (full ids); a protected one is refused, and then nothing is forgotten."""
        request = pb.ForgetRequest(destination=self.destination, snapshot_ids=snapshot_ids)
        self.unary(self.stub.Forget, request)

    def prune(self: _Client, policy: KeepPolicy, dry_run: bool = False) -> RemotePruned:
        """Forget what ``policy`` does not keep (never a protected snapshot), then collect garbage."""
        answer = self.unary(self.stub.Prune, pb.PruneRequest(
            destination=self.destination, keep_last=policy.last, keep_daily=policy.daily,
            keep_weekly=policy.weekly, keep_monthly=policy.monthly, dry_run=dry_run))
        return RemotePruned([parse_snapshot(d) for d in answer.kept],
                            [parse_snapshot(d) for d in answer.removed], answer.bytes_freed)


__all__ = ["DeletionCalls", "RemotePruned"]
