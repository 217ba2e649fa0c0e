"""The operator API behind mutual TLS, over real gRPC on 127.0.0.1 with certificates made here: a
monitor lists but cannot trigger, an operator reaches every call, another host's agent only what a
co-located backup needs, and a client without a certificate gets a TlsError, not a retry loop."""
from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, cast

import grpc
import pytest
from tls_helpers import Pki, make_pki

from host_agent import errors
from host_agent._proto.hyperback.v1 import operator_pb2 as pb
from host_agent._proto.hyperback.v1 import operator_pb2_grpc as pb_grpc
from host_agent.agent.destinations import Destinations
from host_agent.agent.domains import Domains
from host_agent.agent.guests import Guests
from host_agent.agent.intake import Intake
from host_agent.agent.jobs import Jobs
from host_agent.agent.operator import AgentParts, OperatorServer, start_operator_server
from host_agent.agent.schedules import Scheduler
from host_agent.cli import agentapi
from host_agent.config import NO_TLS, TlsConfig, load
from host_agent.storage.repository import Repository
from host_agent.tls.identity import Role
from host_agent.tls.transport import channel_credentials

Call = Callable[[pb_grpc.OperatorStub], Awaitable[Any]]


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return make_pki(tmp_path / "pki")


def parts(tmp_path: Path) -> AgentParts:
    Repository.init(tmp_path / "repo")
    repo = tmp_path / "repo"
    (tmp_path / "agent.toml").write_text(f'host_name = "hosta"\n[repositories]\ndefault = "{repo}"\n')
    config = load(tmp_path / "agent.toml", env={})
    # libvirt's test driver: a real connection with no domain wired for hyperback
    return AgentParts(Domains("test:///default"), cast(Guests, None), Destinations(config),
                      cast(Intake, None), Jobs(), cast(Scheduler, None))


def answers(tmp_path: Path, server_tls: TlsConfig, client_tls: TlsConfig, *calls: Call) -> list[Any]:
    """Each call's answer, or its AioRpcError, through a real TLS operator server."""
    async def run() -> list[Any]:
        server: OperatorServer = await start_operator_server(parts(tmp_path), "127.0.0.1:0", server_tls)
        try:
            creds = channel_credentials(client_tls)
            async with grpc.aio.secure_channel(server.address, creds) as channel:
                stub = pb_grpc.OperatorStub(channel)
                out = []
                for call in calls:
                    try:
                        out.append(await call(stub))
                    except grpc.aio.AioRpcError as e:
                        out.append(e)
                return out
        finally:
            await server.stop(0)
    return asyncio.run(run())


def list_snapshots(stub: pb_grpc.OperatorStub) -> Awaitable[Any]:
    return stub.ListSnapshots(pb.ListSnapshotsRequest(destination="default"), timeout=30)


def trigger_backup(stub: pb_grpc.OperatorStub) -> Awaitable[Any]:
    return stub.TriggerBackup(pb.TriggerBackupRequest(domain="test"), timeout=30)


def trigger_restore(stub: pb_grpc.OperatorStub) -> Awaitable[Any]:
    return stub.TriggerRestore(pb.TriggerRestoreRequest(domain="test"), timeout=30)


def code(answer: Any) -> grpc.StatusCode | None:
    return answer.code() if isinstance(answer, grpc.aio.AioRpcError) else None


def test_a_monitor_lists_snapshots_but_cannot_trigger_a_backup_or_restore(tmp_path: Path, pki: Pki) -> None:
    monitor = pki.tls(Role.MONITOR, "grafana")
    listed, backup, restore = answers(tmp_path, pki.tls(Role.AGENT, "hosta"), monitor,
                                      list_snapshots, trigger_backup, trigger_restore)
    assert isinstance(listed, pb.ListSnapshotsResponse)
    assert code(backup) is grpc.StatusCode.PERMISSION_DENIED
    assert backup.details() == "role monitor (grafana) may not call TriggerBackup"
    assert code(restore) is grpc.StatusCode.PERMISSION_DENIED and "TriggerRestore" in restore.details()


def test_an_operator_reaches_every_call(tmp_path: Path, pki: Pki) -> None:
    listed, backup, restore = answers(tmp_path, pki.tls(Role.AGENT, "hosta"), pki.tls(Role.OPERATOR, "alice"),
                                      list_snapshots, trigger_backup, trigger_restore)
    assert isinstance(listed, pb.ListSnapshotsResponse)
    # past the role check: the servicer answers that the test driver's domain has no hyperback channel
    for answer in (backup, restore):
        assert code(answer) is grpc.StatusCode.NOT_FOUND and "no running" in answer.details()


def test_another_hosts_agent_may_only_ask_for_what_a_visit_needs(tmp_path: Path, pki: Pki) -> None:
    listed, backup, restore = answers(tmp_path, pki.tls(Role.AGENT, "hosta"), pki.tls(Role.AGENT, "hostb"),
                                      list_snapshots, trigger_backup, trigger_restore)
    assert isinstance(listed, pb.ListSnapshotsResponse)
    assert code(backup) is grpc.StatusCode.NOT_FOUND  # TriggerBackup is allowed; no such domain here
    assert code(restore) is grpc.StatusCode.PERMISSION_DENIED
    assert restore.details() == "role agent (hostb) may not call TriggerRestore"


def test_a_cli_without_a_certificate_gets_a_tls_error_at_once(tmp_path: Path, pki: Pki,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HYPERBACK_CONFIG", str(tmp_path / "none.toml"))  # no [tls]: a plain client

    async def run() -> tuple[BaseException, float]:
        server = await start_operator_server(parts(tmp_path), "127.0.0.1:0", pki.tls(Role.AGENT, "hosta"))
        try:
            def plain_call() -> None:
                with grpc.insecure_channel(server.address) as chan:
                    agentapi.call(pb_grpc.OperatorStub(chan).ListJobs, pb.ListJobsRequest(), server.address)
            started = time.monotonic()
            try:
                await asyncio.to_thread(plain_call)
            except errors.HyperbackError as e:
                return e, time.monotonic() - started
            raise AssertionError("the call went through")
        finally:
            await server.stop(0)
    error, seconds = asyncio.run(run())
    assert isinstance(error, errors.TlsError) and "requires TLS" in str(error)
    assert seconds < 1.0


def test_plain_tcp_off_loopback_is_refused_when_asked(tmp_path: Path) -> None:
    async def run() -> None:
        await start_operator_server(parts(tmp_path), "0.0.0.0:0", TlsConfig(allow_plaintext=False))
    with pytest.raises(errors.UsageError, match="plain TCP is refused off loopback"):
        asyncio.run(run())
    assert NO_TLS.allow_plaintext  # the default stays permissive until the lab's tests carry certificates
