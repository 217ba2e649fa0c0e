"""Revoked certificates, over real gRPC on 127.0.0.1 with certificates and revocation lists made here.

``hyperback certs revoke`` writes the CA's list; a running media service, operator API or optimizer
refuses a revoked certificate at the next call, without a restart, with a clear TlsError on the client
that nothing retries; a client whose own certificate is revoked says so before it connects.
"""
from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
from test_optimizer import BATCH, CONTEXT
from test_tls_operator import parts
from tls_helpers import QUICK, Pki, make_pki

from host_agent import errors
from host_agent._proto.hyperback.v1 import operator_pb2 as opb
from host_agent._proto.hyperback.v1 import operator_pb2_grpc as opb_grpc
from host_agent.agent.operator import start_operator_server
from host_agent.cli import agentapi
from host_agent.media import server as media
from host_agent.media.client import RemoteRepository
from host_agent.planning.chain import Planner, build_chain
from host_agent.planning.service import OptimizerClient, ServerConfig, start_server
from host_agent.storage.repository import Repository
from host_agent.tls import certs
from host_agent.tls.identity import Role
from host_agent.tls.transport import TlsConfig, channel


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return make_pki(tmp_path / "pki")


def crl_of(pki: Pki) -> Path:
    return pki.ca / certs.CRL_FILE


def revoke(pki: Pki, tls: TlsConfig) -> None:
    assert tls.cert is not None
    certs.revoke(pki.ca, tls.cert)


def hyperback(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "host_agent.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=60)


def test_a_revoked_agent_is_refused_by_the_running_media_service_at_once_without_a_restart(
        repo: Repository, pki: Pki, tmp_path: Path) -> None:
    served = replace(pki.tls(Role.AGENT, "hostm"), crl=crl_of(pki))  # no list yet: nothing revoked
    srv = media.start({"main": repo.path}, "127.0.0.1:0", "hostm", tls=served)
    hosta, hostb = pki.tls(Role.AGENT, "hosta"), pki.tls(Role.AGENT, "hostb")
    try:
        with RemoteRepository(srv.address, "main", timeout=10, spool_dir=tmp_path, tls=hosta) as connected:
            assert connected.snapshots() == []
            revoke(pki, hosta)
            started = time.monotonic()
            with pytest.raises(errors.TlsError, match=r"refused this end's certificate: the certificate of "
                                                      r"hyperback://role/agent/host/hosta .* was revoked"):
                connected.snapshots()  # the connection it already holds: refused at its next call
            assert time.monotonic() - started < QUICK
        started = time.monotonic()
        with pytest.raises(errors.TlsError, match="was revoked"):
            RemoteRepository(srv.address, "main", timeout=10, spool_dir=tmp_path, tls=hosta)
        assert time.monotonic() - started < QUICK
        with RemoteRepository(srv.address, "main", timeout=10, spool_dir=tmp_path, tls=hostb) as other:
            assert other.snapshots() == []  # only the revoked certificate is refused
    finally:
        srv.stop(grace=0)


def test_the_operator_api_refuses_a_revoked_monitor_and_the_cli_says_so_in_one_line(
        pki: Pki, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HYPERBACK_CONFIG", str(tmp_path / "none.toml"))
    monitor = pki.tls(Role.MONITOR, "grafana")

    async def run() -> None:
        agent = parts(tmp_path)
        served = replace(pki.tls(Role.AGENT, "hosta"), crl=crl_of(pki))
        server = await start_operator_server(agent, "127.0.0.1:0", served)

        def list_jobs() -> object:
            with channel(server.address, monitor) as chan:
                stub = opb_grpc.OperatorStub(chan)
                return agentapi.call(stub.ListJobs, opb.ListJobsRequest(), server.address)
        try:
            assert isinstance(await asyncio.to_thread(list_jobs), opb.ListJobsResponse)
            revoke(pki, monitor)
            started = time.monotonic()
            with pytest.raises(errors.TlsError, match=r"grafana \(serial [0-9a-f]+\) was revoked"):
                await asyncio.to_thread(list_jobs)
            assert time.monotonic() - started < QUICK
        finally:
            await server.stop(0)
            agent.domains.close()

    asyncio.run(run())


def test_a_client_with_the_list_refuses_its_own_revoked_certificate_before_connecting(
        pki: Pki, tmp_path: Path) -> None:
    hosta = replace(pki.tls(Role.AGENT, "hosta"), crl=crl_of(pki))
    revoke(pki, hosta)
    with pytest.raises(errors.TlsError, match=r"the certificate of .*agent-hosta.pem .* was revoked on .* "
                                              r"issue a new one"):
        RemoteRepository("127.0.0.1:9", "main", tls=hosta)


def test_the_optimizer_refuses_a_revoked_host_and_the_driver_is_told_not_to_retry(pki: Pki) -> None:
    hosta = pki.tls(Role.AGENT, "hosta")
    as_hosta = replace(CONTEXT, host_name="hosta")  # the host its certificate names

    async def go() -> None:
        config = ServerConfig("127.0.0.1:0", tls=replace(pki.tls(Role.AGENT, "hostm"), crl=crl_of(pki)))
        server = await start_server(config, Planner(build_chain(["merge"])))
        try:
            async with OptimizerClient(server.address, timeout=5, tls=hosta) as client:
                assert (await client.plan(BATCH, as_hosta)).plan.units
                revoke(pki, hosta)
                with pytest.raises(errors.OptimizerRejected, match="hosta .* was revoked"):
                    await client.plan(BATCH, as_hosta)
        finally:
            await server.stop(0)

    asyncio.run(go())


def test_a_list_not_signed_by_the_ca_stops_the_service_from_starting(
        repo: Repository, pki: Pki, tmp_path: Path) -> None:
    certs.revoke(pki.stranger, pki.tls(Role.AGENT, "x", ca=pki.stranger).cert or Path(), tmp_path / "crl.pem")
    served = replace(pki.tls(Role.AGENT, "hostm"), crl=tmp_path / "crl.pem")
    with pytest.raises(errors.TlsError, match="was not signed by the CA"):
        media.start({"main": repo.path}, "127.0.0.1:0", "hostm", tls=served)


def test_certs_revoke_writes_and_extends_the_list_and_refuses_another_cas_certificate(pki: Pki) -> None:
    first, second = pki.tls(Role.AGENT, "hosta"), pki.tls(Role.MONITOR, "grafana")
    done = hyperback("certs", "revoke", "--ca", pki.ca, first.cert or "")
    assert done.returncode == 0, done.stderr
    assert f"{crl_of(pki)}: 1 certificate(s) revoked" in done.stdout
    again = hyperback("certs", "revoke", "--ca", pki.ca, second.cert or "", first.cert or "")
    assert again.returncode == 0 and "2 certificate(s) revoked" in again.stdout, again.stderr
    stranger = pki.tls(Role.AGENT, "hosta", ca=pki.stranger)
    refused = hyperback("certs", "revoke", "--ca", pki.ca, stranger.cert or "")
    assert refused.returncode != 0 and "Traceback" not in refused.stderr
    assert refused.stderr.strip().count("\n") == 0 and "was not issued by the CA" in refused.stderr
