"""The operator API answers every failure of the error tree with its status code, over real gRPC."""
from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from pathlib import Path
from typing import cast

import grpc

from host_agent._proto.hyperback.v1 import operator_pb2 as pb
from host_agent._proto.hyperback.v1 import operator_pb2_grpc as pb_grpc
from host_agent.agent.destinations import Destinations
from host_agent.agent.domains import Domains
from host_agent.agent.guests import Guests
from host_agent.agent.instant import InstantJobs
from host_agent.agent.intake import Intake
from host_agent.agent.jobs import Jobs
from host_agent.agent.operator import AgentParts, start_operator_server
from host_agent.agent.schedules import Scheduler
from host_agent.config import load
from host_agent.storage.files import missing_repository, unmounted_mount_point
from host_agent.storage.repository import Repository
from host_agent.storage.verification import Verification

# host B's media service is nowhere to be found: nothing listens on that port
CLUSTER = """
host_name = "hosta"
[repositories]
default = "{repo}"
[hosts.hosta]
libvirt_uri = "qemu:///system"
agent = "127.0.0.1:7411"
lan_ip = "127.0.0.1"
[hosts.hostb]
libvirt_uri = "qemu+tcp://127.0.0.1/system"
agent = "127.0.0.1:7412"
lan_ip = "127.0.0.1"
[media.offsite]
host = "hostb"
service = "127.0.0.1:9"
path = "/srv/backup/offsite"
"""


def list_snapshots(tmp_path: Path, destination: str) -> grpc.aio.AioRpcError | pb.ListSnapshotsResponse:
    """ListSnapshots through a real operator server on a unix socket; its answer or its error."""
    (tmp_path / "agent.toml").write_text(CLUSTER.format(repo=tmp_path / "repo"))
    config = load(tmp_path / "agent.toml", env={})
    # listing snapshots of every domain needs neither libvirt, the guests nor the intake
    parts = AgentParts(cast(Domains, None), cast(Guests, None), Destinations(config), cast(Intake, None),
                       Jobs(), cast(Scheduler, None))

    async def call() -> grpc.aio.AioRpcError | pb.ListSnapshotsResponse:
        server = await start_operator_server(parts, f"unix:{tmp_path}/operator.sock")
        try:
            async with grpc.aio.insecure_channel(f"unix:{tmp_path}/operator.sock") as channel:
                stub = pb_grpc.OperatorStub(channel)
                try:
                    answer: pb.ListSnapshotsResponse = await stub.ListSnapshots(
                        pb.ListSnapshotsRequest(destination=destination), timeout=60)
                    return answer
                except grpc.aio.AioRpcError as e:
                    return e
        finally:
            await server.stop(1)

    return asyncio.run(call())


def test_media_that_cannot_be_reached_are_unavailable_not_an_unknown_error(tmp_path: Path) -> None:
    answer = list_snapshots(tmp_path, "offsite")
    assert isinstance(answer, grpc.aio.AioRpcError)
    assert answer.code() is grpc.StatusCode.UNAVAILABLE
    assert "cannot reach the media service at 127.0.0.1:9" in (answer.details() or "")


def test_an_unknown_destination_is_not_found(tmp_path: Path) -> None:
    answer = list_snapshots(tmp_path, "nowhere")
    assert isinstance(answer, grpc.aio.AioRpcError) and answer.code() is grpc.StatusCode.NOT_FOUND


def test_a_local_destination_lists_its_snapshots(tmp_path: Path) -> None:
    Repository.init(tmp_path / "repo")
    answer = list_snapshots(tmp_path, "default")
    assert isinstance(answer, pb.ListSnapshotsResponse) and list(answer.snapshots) == []


def test_a_destination_whose_repository_is_missing_is_named_and_nothing_is_created(tmp_path: Path) -> None:
    answer = list_snapshots(tmp_path, "default")
    assert isinstance(answer, grpc.aio.AioRpcError)
    assert answer.code() is grpc.StatusCode.FAILED_PRECONDITION
    details = answer.details() or ""
    assert f"destination 'default': {tmp_path / 'repo'} is not a hyperback repository" in details
    assert "hyperback init" in details
    assert not (tmp_path / "repo").exists()


def test_media_that_is_not_mounted_is_called_so(tmp_path: Path) -> None:
    usb = tmp_path / "usb"
    usb.mkdir()  # a mount point, as an operator made it, with nothing mounted on it
    fstab = tmp_path / "fstab"
    fstab.write_text(f"# media\nUUID=1234 {usb} ext4 noauto,nofail 0 2\n")
    assert unmounted_mount_point(usb / "hyperback", fstab) == usb
    assert unmounted_mount_point(tmp_path / "elsewhere", fstab) is None
    assert unmounted_mount_point(usb / "hyperback") is None  # not a mount point of this host's fstab
    assert f"its media is not mounted ({usb} is a mount point" in missing_repository(usb / "hyperback", fstab)


def test_listed_snapshots_carry_their_latest_boot_verification(tmp_path: Path) -> None:
    repo = Repository.init(tmp_path / "repo")
    image = tmp_path / "d.img"
    image.write_bytes(b"\1" * 65536)
    name = "4f1c3c5e-7a2b-4b8e-9a55-0123456789ab/root"
    verified, never = (repo.backup(image, name).snapshot.id for _ in range(2))
    repo.record_verification(Verification(verified, datetime.now(UTC), False, "Kernel panic - not syncing",
                                          12.5, "hosta"), b"panic\n")
    answer = list_snapshots(tmp_path, "default")
    assert isinstance(answer, pb.ListSnapshotsResponse)
    by_id = {s.id: s for s in answer.snapshots}
    assert by_id[verified].HasField("verification") and not by_id[never].HasField("verification")
    got = by_id[verified].verification
    assert (got.passed, got.reason, got.seconds, got.host) == (False, "Kernel panic - not syncing", 12.5,
                                                               "hosta")


def instant_restore(tmp_path: Path, request: pb.InstantRestoreRequest,
                    with_instant: bool = True) -> grpc.aio.AioRpcError | pb.InstantRestoreResponse:
    """InstantRestore through a real operator server; its answer or its error. The requests here
    all fail before anything starts, so libvirt is never reached."""
    (tmp_path / "agent.toml").write_text(CLUSTER.format(repo=tmp_path / "repo"))
    config = load(tmp_path / "agent.toml", env={})
    jobs = Jobs()
    instant = (InstantJobs(jobs, Destinations(config), "qemu:///system", tmp_path / "run")
               if with_instant else None)
    parts = AgentParts(cast(Domains, None), cast(Guests, None), Destinations(config), cast(Intake, None),
                       jobs, cast(Scheduler, None), instant)

    async def call() -> grpc.aio.AioRpcError | pb.InstantRestoreResponse:
        server = await start_operator_server(parts, f"unix:{tmp_path}/operator.sock")
        try:
            async with grpc.aio.insecure_channel(f"unix:{tmp_path}/operator.sock") as channel:
                try:
                    answer: pb.InstantRestoreResponse = await pb_grpc.OperatorStub(channel).InstantRestore(
                        request, timeout=60)
                    return answer
                except grpc.aio.AioRpcError as e:
                    return e
        finally:
            await server.stop(1)

    return asyncio.run(call())


def test_an_instant_restore_that_cannot_start_says_why_with_its_status_code(tmp_path: Path) -> None:
    repo = Repository.init(tmp_path / "repo")
    (tmp_path / "d.img").write_bytes(b"x" * 4096)
    snap = repo.backup(tmp_path / "d.img", "vm/vda").snapshot.id
    xml = "<domain><name>n</name><devices><disk><target dev='vda'/></disk></devices></domain>"
    target = str(tmp_path / "t.img")
    ok = pb.InstantRestoreRequest(snapshot=snap, domain_xml=xml, disk="vda", target=target)
    cases = [
        (pb.InstantRestoreRequest(snapshot=snap, domain_xml=xml, target="t.img"), "INVALID_ARGUMENT",
         "absolute"),
        (pb.InstantRestoreRequest(snapshot=snap, domain_xml=xml, target=str(tmp_path / "d.img")),
         "FAILED_PRECONDITION", "exists"),
        (pb.InstantRestoreRequest(snapshot=snap, domain_xml=xml, target=target, format="vmdk"),
         "INVALID_ARGUMENT", "raw or qcow2"),
        (pb.InstantRestoreRequest(snapshot=snap, domain_xml=xml, disk="vdz", target=target),
         "INVALID_ARGUMENT", "no disk 'vdz'"),
        (pb.InstantRestoreRequest(snapshot="nope@latest", domain_xml=xml, target=target),
         "NOT_FOUND", "nope"),
        (pb.InstantRestoreRequest(snapshot=snap, domain_xml=xml, target=target, destination="nowhere"),
         "NOT_FOUND", "nowhere"),
    ]
    for request, code, words in cases:
        answer = instant_restore(tmp_path, request)
        assert isinstance(answer, grpc.aio.AioRpcError), request
        assert answer.code().name == code and words in (answer.details() or ""), (request, answer)
    answer = instant_restore(tmp_path, ok, with_instant=False)
    assert isinstance(answer, grpc.aio.AioRpcError) and answer.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert not (tmp_path / "t.img").exists()
