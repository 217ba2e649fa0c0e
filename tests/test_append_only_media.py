"""Append-only media (docs/tls.md, "Roles"; docs/threat-model.md): real certificates, real gRPC on
127.0.0.1, a real repository.

An agent's certificate adds snapshots and reads its own, but nothing it sends removes or replaces a
file of the repository: Forget and Prune are refused with PERMISSION_DENIED, a pack or snapshot with
a name that exists is refused, a verification record is never replaced. Only an operator forgets and
prunes, and a protected snapshot outlives prune, forget and the garbage collection after them.
"""
from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from system_helpers import MIB, sha256_file, write_random_image
from tls_helpers import Pki, make_pki, media_client, tls_media_service

from host_agent import errors
from host_agent._proto.hyperback.v1 import media_pb2 as pb
from host_agent.media import server as media
from host_agent.media.client import RemoteRepository
from host_agent.storage.annotations import Annotations, edit
from host_agent.storage.repository import Repository
from host_agent.storage.retention import KeepPolicy
from host_agent.storage.verification import Verification
from host_agent.tls.identity import Role
from host_agent.tls.transport import NO_TLS

SIZE = 2 * MIB
VM = "0a0a0a0a-0000-4000-8000-00000000000a"
DISK = f"{VM}/vda"


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return make_pki(tmp_path / "pki")


@pytest.fixture
def server(repo: Repository, pki: Pki) -> Iterator[media.MediaServer]:
    with tls_media_service(repo, pki) as srv:
        yield srv


def backed_up(remote: RemoteRepository, tmp_path: Path, seed: int) -> str:
    image = write_random_image(tmp_path / f"{seed}.img", SIZE, seed=seed)
    return remote.backup(image, DISK).snapshot.id


def stored(repo: Repository) -> dict[str, str]:
    """Every file of the repository but the transient ones (locks/, tmp/), with its SHA-256."""
    return {str(p.relative_to(repo.path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(repo.path.rglob("*"))
            if p.is_file() and p.relative_to(repo.path).parts[0] not in ("locks", "tmp")}


def unchanged(before: dict[str, str], after: dict[str, str]) -> bool:
    """Every file of ``before`` is still there, with the same content (files may have been added)."""
    return all(after.get(name) == digest for name, digest in before.items())


def verification(snapshot: str, passed: bool) -> Verification:
    return Verification(snapshot, datetime.now(UTC), passed, "login prompt" if passed else "no boot", 3.0,
                        "hosta")


def upload_start(remote: RemoteRepository, repo: Repository, session: str) -> pb.UploadPackResponse:
    """The start of an upload that names a pack the repository holds, with its true sizes."""
    pack = next((repo.path / "index").iterdir()).name
    start = pb.UploadStart(session_id=session, pack_name=pack,
                           index_size=(repo.path / "index" / pack).stat().st_size,
                           pack_size=(repo.path / "packs" / pack[:2] / pack).stat().st_size)
    return remote.unary(remote.stub.UploadPack, iter([pb.UploadPackRequest(start=start)]))  # type: ignore[arg-type]


def open_session(remote: RemoteRepository) -> str:
    request = pb.OpenBackupRequest(destination="main", name=DISK, policy=1)
    return remote.unary(remote.stub.OpenBackup, request).session_id


# ---------- an agent adds, and only adds ----------

def test_an_agent_backs_up_and_lists_but_its_forget_and_prune_are_refused_and_nothing_changes_on_disk(
        server: media.MediaServer, repo: Repository, pki: Pki, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    with media_client(server, pki.tls(Role.AGENT, "hosta"), tmp_path) as agent:
        ids = [backed_up(agent, tmp_path, seed) for seed in (1, 2)]
        assert [s.id for s in agent.snapshots()] == ids
        before = stored(repo)
        with pytest.raises(errors.AccessDenied, match=r"role agent \(hosta\) may not call Forget"):
            agent.forget([ids[0]])
        with pytest.raises(errors.AccessDenied, match=r"role agent \(hosta\) may not call Prune"):
            agent.prune(KeepPolicy(last=1))
        assert [s.id for s in agent.snapshots()] == ids
    assert stored(repo) == before
    # logged by the server, once: the client does not retry a refusal
    assert caplog.text.count("refused Prune") == 1 and "role agent (hosta) may not call Prune" in caplog.text


def test_an_agent_cannot_replace_a_pack_a_snapshot_or_a_verification_record(
        server: media.MediaServer, repo: Repository, pki: Pki, tmp_path: Path) -> None:
    with media_client(server, pki.tls(Role.AGENT, "hosta"), tmp_path) as agent:
        snap = backed_up(agent, tmp_path, 3)
        agent.record_verification(verification(snap, passed=False), b"kernel panic\n")
        before = stored(repo)
        session = open_session(agent)
        with pytest.raises(errors.UsageError, match="pack [0-9a-f]{32} exists in the repository already"):
            upload_start(agent, repo, session)
        document = (repo.path / "snapshots" / snap).read_text()
        with pytest.raises(errors.UsageError, match=f"snapshot id '{snap}' is malformed or taken"):
            agent.unary(agent.stub.Commit, pb.CommitRequest(session_id=session, document=document))
        refused = r"role agent \(hosta\) may not call RecordVerification.*has a record already"
        with pytest.raises(errors.AccessDenied, match=refused):
            agent.record_verification(verification(snap, passed=True), b"login:\n")
        assert agent.verifications()[snap].passed is False
    assert stored(repo) == before


# ---------- an operator deletes; protection holds ----------

def test_an_operator_prunes_and_a_protected_snapshot_outlives_prune_forget_and_garbage_collection(
        server: media.MediaServer, repo: Repository, pki: Pki, tmp_path: Path) -> None:
    with media_client(server, pki.tls(Role.AGENT, "hosta"), tmp_path) as agent:
        ids = [backed_up(agent, tmp_path, seed) for seed in (4, 5, 6)]
    notes = Annotations(repo.path)
    notes.write(edit(notes.get(repo.resolve(ids[0])), protected=True))  # hyperback protect, on the media host
    with media_client(server, pki.tls(Role.OPERATOR, "alice"), tmp_path) as ops:
        pruned = ops.prune(KeepPolicy(last=1))
        assert [s.id for s in pruned.remove] == [ids[1]] and [s.id for s in pruned.keep] == [ids[0], ids[2]]
        assert pruned.bytes_freed >= SIZE  # the forgotten snapshot's own data went with it
        with pytest.raises(errors.UsageError, match=f"snapshot {ids[0]} is protected"):
            ops.forget([ids[0], ids[2]])
        assert [s.id for s in ops.snapshots()] == [ids[0], ids[2]]  # nothing forgotten
        ops.restore(ids[0], tmp_path / "protected.img")
        assert sha256_file(tmp_path / "protected.img") == sha256_file(tmp_path / "4.img")
        ops.forget([ids[2]])
        with pytest.raises(errors.SnapshotNotFound, match=ids[2]):
            ops.forget([ids[2]])
    assert [s.id for s in repo.snapshots()] == [ids[0]]


def test_without_tls_nobody_may_forget_or_prune_through_the_media_service(
        repo: Repository, tmp_path: Path) -> None:
    srv = media.start({"main": repo.path}, "127.0.0.1:0", "hostm", tls=NO_TLS)
    try:
        with media_client(srv, NO_TLS, tmp_path) as anyone:
            snap = backed_up(anyone, tmp_path, 7)
            for call in (lambda: anyone.forget([snap]), lambda: anyone.prune(KeepPolicy(last=1))):
                with pytest.raises(errors.AccessDenied, match="needs an operator's certificate.*without TLS"):
                    call()
    finally:
        srv.stop(grace=0)
    assert [s.id for s in repo.snapshots()] == [snap]


# ---------- no sequence of an agent's calls takes anything away ----------

AGENT_CALLS = ("backup", "forget", "prune", "reupload", "recommit", "reverify", "abort")


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(calls=st.lists(st.sampled_from(AGENT_CALLS), min_size=1, max_size=6))
def test_no_sequence_of_an_agents_calls_removes_or_changes_a_file_of_the_repository(
        calls: list[str], server: media.MediaServer, repo: Repository, pki: Pki, tmp_path: Path) -> None:
    with media_client(server, pki.tls(Role.AGENT, "hosta"), tmp_path) as agent:
        if not repo.snapshots():
            first = backed_up(agent, tmp_path, 8)
            agent.record_verification(verification(first, passed=True), b"login:\n")
        for seed, call in enumerate(calls, start=10):
            before = stored(repo)
            snap = repo.snapshots()[-1].id
            with contextlib.suppress(errors.AccessDenied, errors.UsageError):  # refused: checked below
                _agent_call(agent, repo, tmp_path, call, snap, seed)
            assert unchanged(before, stored(repo)), call


def _agent_call(agent: RemoteRepository, repo: Repository, tmp_path: Path, call: str, snap: str,
                seed: int) -> None:
    if call == "backup":
        backed_up(agent, tmp_path, seed)
    elif call == "forget":
        agent.forget([snap])
    elif call == "prune":
        agent.prune(KeepPolicy(last=1))
    elif call == "reverify":
        agent.record_verification(verification(snap, passed=False), b"")
    else:
        session = open_session(agent)
        try:
            if call == "reupload":
                upload_start(agent, repo, session)
            elif call == "recommit":
                document = (repo.path / "snapshots" / snap).read_text()
                agent.unary(agent.stub.Commit, pb.CommitRequest(session_id=session, document=document))
        finally:
            agent.unary(agent.stub.Abort, pb.SessionRequest(session_id=session))
