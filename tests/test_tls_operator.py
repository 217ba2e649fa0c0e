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
from tls_helpers import QUICK, Pki, make_pki

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
from host_agent.media.access import OWNERS
from host_agent.storage.repository import Repository
from host_agent.tls.identity import Role
from host_agent.tls.transport import channel_credentials

Call = Callable[[pb_grpc.OperatorStub], Awaitable[Any]]


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return make_pki(tmp_path / "pki")


VISITOR = "0c0c0c0c-0000-4000-8000-00000000000c"
HOME = "0d0d0d0d-0000-4000-8000-00000000000d"
# libvirt's test driver with two domains wired for hyperback: one visiting from host B (its marker, as
# a co-located backup leaves it while the VM is here), one at home
NODE = """<node>{domains}</node>"""
DOMAIN = """<domain type="test"><name>{name}</name><uuid>{uuid}</uuid><memory>65536</memory>
  {metadata}<os><type>hvm</type></os><devices>
  <disk type='file' device='disk'><source file='/var/tmp/{name}.img'/><target dev='vda' bus='virtio'/>
  <serial>data</serial></disk>
  <channel type='unix'><source mode='bind' path='/var/tmp/{name}.sock'/>
  <target type='virtio' name='org.hyperback.agent.0'/></channel>
  </devices></domain>"""
VISIT = ("<metadata><hbv:visit xmlns:hbv='https://hyperback.dev/xmlns/visit/1' origin='hostb' job='j1'/>"
         "</metadata>")


def parts(tmp_path: Path, uri: str = "test:///default") -> AgentParts:
    Repository.init(tmp_path / "repo")
    repo = tmp_path / "repo"
    (tmp_path / "agent.toml").write_text(f'host_name = "hosta"\n[repositories]\ndefault = "{repo}"\n')
    config = load(tmp_path / "agent.toml", env={})
    # libvirt's test driver: a real connection (its default node has no domain wired for hyperback)
    return AgentParts(Domains(uri), cast(Guests, None), Destinations(config),
                      cast(Intake, None), Jobs(), cast(Scheduler, None))


def answers(tmp_path: Path, server_tls: TlsConfig, client_tls: TlsConfig, *calls: Call,
            uri: str = "test:///default") -> list[Any]:
    """Each call's answer, or its AioRpcError, through a real TLS operator server."""
    async def run() -> list[Any]:
        agent = parts(tmp_path, uri)
        server: OperatorServer = await start_operator_server(agent, "127.0.0.1:0", server_tls)
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
            agent.domains.close()  # test:///default keeps its domains while any connection is open
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


def test_an_agent_may_trigger_the_backup_of_a_domain_visiting_from_its_host_only(tmp_path: Path,
                                                                                pki: Pki) -> None:
    domains = (DOMAIN.format(name="visitor", uuid=VISITOR, metadata=VISIT)
               + DOMAIN.format(name="home", uuid=HOME, metadata=""))
    (tmp_path / "node.xml").write_text(NODE.format(domains=domains))
    uri = f"test://{tmp_path}/node.xml"

    def trigger(domain: str) -> Call:
        return lambda stub: stub.TriggerBackup(pb.TriggerBackupRequest(domain=domain), timeout=30)

    server_tls = pki.tls(Role.AGENT, "hosta")
    [home] = answers(tmp_path / "1", server_tls, pki.tls(Role.AGENT, "hostb"), trigger("home"), uri=uri)
    assert code(home) is grpc.StatusCode.PERMISSION_DENIED
    assert home.details() == ("role agent (hostb) may not call TriggerBackup on domain home: it is not "
                              "visiting from hostb")
    hostc = pki.tls(Role.AGENT, "hostc")
    [stranger] = answers(tmp_path / "2", server_tls, hostc, trigger("visitor"), uri=uri)
    assert code(stranger) is grpc.StatusCode.PERMISSION_DENIED
    assert not (tmp_path / "2" / "repo" / OWNERS).exists()
    # the origin's agent gets past every check, and the destination's ledger now names its host
    # (the job itself goes nowhere: this test's agent has no intake)
    [origin] = answers(tmp_path / "3", server_tls, pki.tls(Role.AGENT, "hostb"), trigger("visitor"), uri=uri)
    assert code(origin) is not grpc.StatusCode.PERMISSION_DENIED
    assert (tmp_path / "3" / "repo" / OWNERS / VISITOR).read_text() == "hostb\n"


def test_a_cli_without_a_certificate_gets_a_tls_error_at_once(tmp_path: Path, pki: Pki,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HYPERBACK_CONFIG", str(tmp_path / "none.toml"))  # no [tls]: a plain client

    async def run() -> tuple[BaseException, float]:
        agent = parts(tmp_path)
        server = await start_operator_server(agent, "127.0.0.1:0", pki.tls(Role.AGENT, "hosta"))
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
            agent.domains.close()
    error, seconds = asyncio.run(run())
    assert isinstance(error, errors.TlsError) and "requires TLS" in str(error)
    assert seconds < QUICK


def test_plain_tcp_off_loopback_is_refused_by_default_naming_the_setting(tmp_path: Path) -> None:
    agent = parts(tmp_path)

    async def run() -> None:
        await start_operator_server(agent, "0.0.0.0:0", NO_TLS)
    with pytest.raises(errors.UsageError, match="plain TCP is refused off loopback.*allow_plaintext = true"):
        asyncio.run(run())
    agent.domains.close()
