"""Boot verification records through the media service: a host that booted a snapshot of media on
another host records the verdict there, and reads every record back; the server checks what it is
sent."""
from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import grpc
import pytest
from conftest import MIB, write_image

from host_agent import errors
from host_agent._proto.hyperback.v1 import media_pb2 as pb
from host_agent._proto.hyperback.v1 import media_pb2_grpc as pb_grpc
from host_agent.media import server as media
from host_agent.media.client import RemoteRepository
from host_agent.media.servicer import MAX_CONSOLE_UPLOAD
from host_agent.storage.repository import Repository
from host_agent.storage.verification import MAX_CONSOLE, Verification


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Repository, RemoteRepository, str]]:
    repo = Repository.init(tmp_path / "repo")
    srv = media.start({"main": repo.path}, "127.0.0.1:0", "hostb")
    try:
        with RemoteRepository(srv.address, "main", timeout=10) as remote:
            sid = remote.backup(write_image(tmp_path / "d.img", MIB, 4), "vm/vda").snapshot.id
            yield repo, remote, sid
    finally:
        srv.stop(grace=0)


def test_a_verdict_recorded_through_the_service_is_kept_on_the_media(
        served: tuple[Repository, RemoteRepository, str]) -> None:
    repo, remote, sid = served
    console = b"x" * MAX_CONSOLE + b"login:\n"
    record = Verification(sid, datetime.now(UTC), False, "no answer", 61.0, "hosta")
    remote.record_verification(record, console)
    assert repo.verifications()[sid].reason == "no answer"
    assert repo.console_text(sid) == console[-MAX_CONSOLE:]
    assert remote.verifications()[sid].passed is False


def test_the_service_refuses_records_of_unknown_snapshots_and_malformed_ones(
        served: tuple[Repository, RemoteRepository, str]) -> None:
    _, remote, _ = served
    with pytest.raises(errors.SnapshotNotFound):
        remote.record_verification(Verification("0" * 16, datetime.now(UTC), True, "", 1.0, "hosta"), b"")
    with grpc.insecure_channel(remote.address) as channel:
        stub = pb_grpc.MediaStub(channel)
        for request in (pb.RecordVerificationRequest(destination="main", document="{}"),
                        pb.RecordVerificationRequest(destination="main", document="{}",
                                                     console=bytes(MAX_CONSOLE_UPLOAD + 1))):
            with pytest.raises(grpc.RpcError) as e:
                stub.RecordVerification(request)
            assert e.value.code() is grpc.StatusCode.INVALID_ARGUMENT
