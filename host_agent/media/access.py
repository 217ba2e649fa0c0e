"""Who may do what through the media service, once TLS names the caller (docs/tls.md, "Roles").

* operator: everything, and only it deletes (``Forget``, ``Prune``);
* monitor: ``Describe``, ``ListSnapshots``, ``ResolveSnapshot`` and ``ListVerifications``: documents,
  never data (enforced by the interceptor);
* agent of host H: append-only, so that a compromised hypervisor cannot erase its history: it backs up,
  reads and records verifications, on the domains H owns in that destination only; it never deletes
  (the interceptor refuses ``Forget`` and ``Prune``) and never replaces a file (no call replaces a pack,
  index or snapshot; a verification record it would replace is refused below).

A snapshot's name starts with its domain's key (``UUID/serial`` for a VM's disk, so the key is the
domain UUID). The media service cannot ask another host which domains it runs, so each destination
keeps a ledger, ``owners/KEY`` in the repository, holding the name of the host that owns the domain:
the first agent to back a domain up claims it, if the destination holds no snapshot of it yet; any
other agent is refused, for reading as for writing, and so is every agent on a domain with snapshots
but no owner (written before TLS, or by a local ``hyperback backup``). An operator moves a domain to
another host (it migrated for good) by writing that host's name into the file. When the media
host's own agent backs up a domain visiting from another host (co-location), it writes the
repository directly and records the visitor's host as the owner (``Owners.adopt``), so that host's
agent reads those snapshots over the LAN later.
"""
from __future__ import annotations

import itertools
import json
import logging
import os
import re
from collections.abc import Iterator
from typing import Final

import grpc

from host_agent import errors
from host_agent._proto.hyperback.v1 import media_pb2 as pb
from host_agent.media.codec import snapshot_document
from host_agent.media.sealed import refuse_encrypted
from host_agent.media.servicer import MediaServicer, _Answering
from host_agent.media.uploads import publishing_new
from host_agent.storage.pruning import prune
from host_agent.storage.repository import VERIFICATIONS, Repository
from host_agent.storage.retention import KeepPolicy
from host_agent.tls.identity import Role
from host_agent.tls.roles import ALL, Table
from host_agent.tls.transport import peer_identity

log = logging.getLogger(__name__)

OWNERS: Final = "owners"
KEY: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # a snapshot name's first component
# Listed, not "all but deletion": a call added to the protocol stays an operator's until added here.
APPEND_ONLY: Final = frozenset({
    "Describe", "ListSnapshots", "ResolveSnapshot", "BaseFor", "OpenBackup", "BaseTree", "Heartbeat",
    "FilterMissing", "UploadPack", "Commit", "Abort", "Restore", "ReadChunks", "RecordVerification",
    "ListVerifications", "KeyDocument", "ReadRecords"})
MEDIA_ROLES: Final[Table] = {
    Role.OPERATOR: ALL,
    Role.AGENT: APPEND_ONLY,  # narrowed to the agent's own domains below
    Role.MONITOR: frozenset({"Describe", "ListSnapshots", "ResolveSnapshot", "ListVerifications"}),
}


def domain_key(name: str) -> str:
    """The domain a snapshot name belongs to: its first component (a VM's UUID)."""
    return name.partition("/")[0]


class Owners:
    """The ledger of one destination: which host owns each domain."""

    def __init__(self, repo: Repository) -> None:
        self._repo = repo
        self._dir = repo.path / OWNERS

    def owner(self, key: str) -> str | None:
        if not KEY.fullmatch(key):  # names no file of the ledger: "", "..", a path
            return None
        try:
            return (self._dir / key).read_text().strip() or None
        except FileNotFoundError:
            return None
        except OSError as e:
            raise errors.RepositoryIOError(f"cannot read {self._dir / key}: {e.strerror or e}") from e

    def claim(self, key: str, host: str) -> str | None:
        """Make ``host`` the owner of ``key`` if nobody owns it and no snapshot of it exists; return
        the owner after."""
        owner = self.owner(key)
        if owner is not None or any(domain_key(s.name) == key for s in self._repo.snapshots()):
            return owner
        return self.adopt(key, host)

    def adopt(self, key: str, host: str) -> str | None:
        """Make ``host`` the owner of ``key`` if nobody owns it, whatever is stored (the media host's
        agent backing up a domain visiting from ``host``); return the owner after."""
        if not KEY.fullmatch(key):
            return None
        try:
            self._dir.mkdir(exist_ok=True)
            fd = os.open(self._dir / key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:  # another session claimed it a moment ago
            return self.owner(key)
        except OSError as e:
            raise errors.RepositoryIOError(f"cannot write {self._dir / key}: {e.strerror or e}") from e
        with os.fdopen(fd, "w") as f:
            f.write(host + "\n")
        return host


class GuardedMediaServicer(MediaServicer):
    """The media service with an agent held to its own host's domains (the module's docstring)."""

    def _agent(self, context: grpc.ServicerContext) -> str | None:
        identity = peer_identity(context)
        return identity.name if identity is not None and identity.role is Role.AGENT else None

    def _check(self, repo: Repository, host: str, name: str, method: str, claim: bool = False) -> None:
        key = domain_key(name)
        if not KEY.fullmatch(key):
            raise errors.UsageError(f"snapshot name {name[:80]!r} is malformed (e.g. UUID/vda)")
        owners = Owners(repo)
        owner = owners.claim(key, host) if claim else owners.owner(key)
        if owner != host:
            whose = f"host {owner}'s" if owner else "no host's (an operator assigns it)"
            raise errors.AccessDenied(f"role agent ({host}) may not call {method} on domain {key}: it is "
                                      f"{whose} in this destination (docs/tls.md, \"Roles\")")

    def _owned(self, repo: Repository, host: str, name: str) -> bool:
        return Owners(repo).owner(domain_key(name)) == host

    def _session(self, context: grpc.ServicerContext, session_id: str, method: str) -> None:
        host = self._agent(context)
        if host is not None:
            with _Answering(context, method):
                session = self.sessions.get(session_id)
                self._check(session.repo, host, session.name, method)

    # ---------- reading ----------

    def ListSnapshots(self, request: pb.ListMediaSnapshotsRequest,
                      context: grpc.ServicerContext) -> Iterator[pb.MediaSnapshots]:
        host = self._agent(context)
        if host is None:
            yield from super().ListSnapshots(request, context)
            return
        with _Answering(context, "ListSnapshots"):
            repo = self._repo(request.destination)
        for page in super().ListSnapshots(request, context):
            kept = [d for d in page.documents if self._owned(repo, host, json.loads(d)["name"])]
            if kept:
                yield pb.MediaSnapshots(documents=kept)

    def _resolved(self, context: grpc.ServicerContext, destination: str, spec: str, method: str) -> str:
        """``spec`` as a snapshot id, once the caller may read it."""
        host = self._agent(context)
        if host is None:
            return spec
        with _Answering(context, method):
            repo = self._repo(destination)
            snap = repo.resolve(spec)
            self._check(repo, host, snap.name, method)
            return snap.id

    def ResolveSnapshot(self, request: pb.ResolveSnapshotRequest,
                        context: grpc.ServicerContext) -> pb.SnapshotDocument:
        spec = self._resolved(context, request.destination, request.spec, "ResolveSnapshot")
        return super().ResolveSnapshot(pb.ResolveSnapshotRequest(destination=request.destination, spec=spec),
                                       context)

    def BaseFor(self, request: pb.BaseForRequest, context: grpc.ServicerContext) -> pb.SnapshotDocument:
        host = self._agent(context)
        if host is not None:
            with _Answering(context, "BaseFor"):
                self._check(self._repo(request.destination), host, request.name, "BaseFor")
        return super().BaseFor(request, context)

    def Restore(self, request: pb.RestoreRequest, context: grpc.ServicerContext) -> Iterator[pb.RestoreData]:
        checked = pb.RestoreRequest()
        checked.CopyFrom(request)
        checked.spec = self._resolved(context, request.destination, request.spec, "Restore")
        yield from super().Restore(checked, context)

    def ReadChunks(self, request: pb.ReadChunksRequest,
                   context: grpc.ServicerContext) -> Iterator[pb.RestoreData]:
        self._resolved(context, request.destination, request.snapshot_id, "ReadChunks")
        yield from super().ReadChunks(request, context)

    def ReadRecords(self, request: pb.ReadRecordsRequest,
                    context: grpc.ServicerContext) -> Iterator[pb.RecordData]:
        self._resolved(context, request.destination, request.snapshot_id, "ReadRecords")
        yield from super().ReadRecords(request, context)

    # ---------- verification records ----------

    def RecordVerification(self, request: pb.RecordVerificationRequest,
                           context: grpc.ServicerContext) -> pb.RecordVerificationResponse:
        try:
            snapshot = str(json.loads(request.document)["snapshot"])
        except (ValueError, KeyError, TypeError):
            snapshot = ""  # malformed: the service says so
        host = self._agent(context)
        if not snapshot or host is None:
            return super().RecordVerification(request, context)
        snapshot = self._resolved(context, request.destination, snapshot, "RecordVerification")
        with _Answering(context, "RecordVerification"):
            record = self._repo(request.destination).path / VERIFICATIONS / snapshot
            if record.exists():
                raise errors.AccessDenied(f"role agent ({host}) may not call RecordVerification on snapshot "
                                          f"{snapshot}: it has a record already, and an agent only adds "
                                          "(docs/tls.md, \"Roles\")")
            with publishing_new(f"the verification record of snapshot {snapshot}", record):
                return super().RecordVerification(request, context)

    def ListVerifications(self, request: pb.ListVerificationsRequest,
                          context: grpc.ServicerContext) -> pb.Verifications:
        answer = super().ListVerifications(request, context)
        host = self._agent(context)
        if host is None:
            return answer
        with _Answering(context, "ListVerifications"):
            repo = self._repo(request.destination)
            mine = {s.id for s in repo.snapshots() if self._owned(repo, host, s.name)}
        return pb.Verifications(documents=[d for d in answer.documents if json.loads(d)["snapshot"] in mine])

    # ---------- deletion (an operator's: the interceptor refuses every other role) ----------

    def Forget(self, request: pb.ForgetRequest, context: grpc.ServicerContext) -> pb.ForgetResponse:
        with _Answering(context, "Forget"):
            repo = self._repo(request.destination)
            ids = list(request.snapshot_ids)
            stored = {s.id for s in repo.snapshots()}
            unknown = [sid for sid in ids if sid not in stored]
            if unknown:
                raise errors.SnapshotNotFound(f"no snapshot {', '.join(unknown)} in destination "
                                              f"{request.destination}; nothing forgotten")
            repo.forget(ids)  # refuses them all if one is protected
            log.info("%s forgot snapshot(s) %s of %s", peer_identity(context), ", ".join(ids),
                     request.destination)
            return pb.ForgetResponse(forgotten=ids)

    def Prune(self, request: pb.PruneRequest, context: grpc.ServicerContext) -> pb.PruneResponse:
        with _Answering(context, "Prune"):
            repo = self._repo(request.destination)
            refuse_encrypted(repo, request.destination,
                             "prune (collecting garbage opens the records it keeps)",
                             "run 'hyperback prune --repo PATH' with the key on the media host")
            policy = KeepPolicy(request.keep_last, request.keep_daily, request.keep_weekly,
                                request.keep_monthly)
            pruned = prune(repo, policy, dry_run=request.dry_run)
            freed = pruned.gc.bytes_freed if pruned.gc else 0
            log.info("%s pruned %s%s: %d snapshot(s) forgotten, %d bytes freed", peer_identity(context),
                     request.destination, " (dry run)" if request.dry_run else "", len(pruned.remove), freed)
            return pb.PruneResponse(kept=[snapshot_document(s) for s in pruned.keep],
                                    removed=[snapshot_document(s) for s in pruned.remove], bytes_freed=freed)

    # ---------- backup sessions ----------

    def OpenBackup(self, request: pb.OpenBackupRequest,
                   context: grpc.ServicerContext) -> pb.OpenBackupResponse:
        host = self._agent(context)
        if host is not None:
            with _Answering(context, "OpenBackup"):
                self._check(self._repo(request.destination), host, request.name, "OpenBackup", claim=True)
        return super().OpenBackup(request, context)

    def BaseTree(self, request: pb.BaseTreeRequest, context: grpc.ServicerContext) -> Iterator[pb.TreePages]:
        self._session(context, request.session_id, "BaseTree")
        yield from super().BaseTree(request, context)

    def Heartbeat(self, request: pb.SessionRequest, context: grpc.ServicerContext) -> pb.HeartbeatResponse:
        self._session(context, request.session_id, "Heartbeat")
        return super().Heartbeat(request, context)

    def FilterMissing(self, request: pb.FilterMissingRequest,
                      context: grpc.ServicerContext) -> pb.FilterMissingResponse:
        self._session(context, request.session_id, "FilterMissing")
        return super().FilterMissing(request, context)

    def UploadPack(self, request_iterator: Iterator[pb.UploadPackRequest],
                   context: grpc.ServicerContext) -> pb.UploadPackResponse:
        first = next(request_iterator, None)
        if first is not None and first.WhichOneof("part") == "start":
            self._session(context, first.start.session_id, "UploadPack")
        return super().UploadPack(itertools.chain([first] if first else [], request_iterator), context)

    def Commit(self, request: pb.CommitRequest, context: grpc.ServicerContext) -> pb.CommitResponse:
        self._session(context, request.session_id, "Commit")
        return super().Commit(request, context)

    def Abort(self, request: pb.SessionRequest, context: grpc.ServicerContext) -> pb.AbortResponse:
        self._session(context, request.session_id, "Abort")
        return super().Abort(request, context)


__all__ = ["APPEND_ONLY", "MEDIA_ROLES", "OWNERS", "GuardedMediaServicer", "Owners", "domain_key"]
