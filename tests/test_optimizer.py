"""The optimizer service over real gRPC: unix sockets in tmp, TLS with certificates made by openssl.

Async code runs under ``asyncio.run`` inside plain tests (no pytest-asyncio)."""
from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import replace
from pathlib import Path

import grpc
import grpc.aio
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from tls_helpers import QUICK, Pki, make_pki

from host_agent._proto.hyperback.v1 import operator_pb2, operator_pb2_grpc
from host_agent._proto.hyperback.v1 import optimizer_pb2 as pb
from host_agent._proto.hyperback.v1 import optimizer_pb2_grpc as pb_grpc
from host_agent.config import NO_TLS, TlsConfig
from host_agent.errors import OptimizerConfigError, OptimizerRejected, OptimizerUnavailable
from host_agent.model import DiskRef, Instruction, InstructionKind, PathSelection, Plan, Policy, UnitKind
from host_agent.planning.chain import HostContext, Planner, PlanningPolicy, PlanResult, build_chain
from host_agent.planning.hostload import HostLoad, HostLoadReader
from host_agent.planning.service import (
    SERVICE_NAME,
    OptimizerClient,
    OptimizerServer,
    ServerConfig,
    host_context,
    request_from_pb,
    request_to_pb,
    result_from_pb,
    result_to_pb,
    start_server,
)
from host_agent.tls.identity import Role

NOW = 1_700_000_000.0
BASE = "/var/lib/libvirt/images/debian-12.qcow2"
BUSY = HostLoad(4.0, 3.0, 2.0, 2, cpu_some_avg10=90.0, io_some_avg10=0.5, notes=("a note",))


def disk(domain: str, chain: tuple[str, ...] = (BASE,)) -> DiskRef:
    return DiskRef(f"uuid-{domain}", domain, "s1", "vda", f"/var/lib/libvirt/images/{domain}.qcow2", "qcow2",
                   20 << 30, chain)


def backup(id: str, *disks: DiskRef, policy: Policy = Policy.INCREMENTAL) -> Instruction:
    return Instruction(id, disks[0].domain_uuid if disks else "uuid-x", f"r-{id}", InstructionKind.BACKUP,
                       disks, "default", policy, received_at=NOW - 5)


BATCH = [backup("a", disk("web1")), backup("b", disk("web2"), policy=Policy.FULL), backup("c", disk("web2")),
         backup("empty")]
CONTEXT = HostContext("host-a.example", NOW, BUSY, frozenset({("offsite", "base/0123456789abcdef")}), 3600)


def unix(tmp_path: Path, name: str = "optimizer.sock") -> str:
    return f"unix:{tmp_path / name}"


@contextlib.asynccontextmanager
async def serving(config: ServerConfig, planner: Planner | None = None) -> AsyncIterator[OptimizerServer]:
    server = await start_server(config, planner or Planner(build_chain(["merge", "timing"])))
    try:
        yield server
    finally:
        await server.stop(0)


async def plan_once(target: str, batch: Sequence[Instruction] = BATCH, context: HostContext = CONTEXT,
                    timeout: float = 5.0, tls: TlsConfig = NO_TLS) -> PlanResult:
    async with OptimizerClient(target, timeout=timeout, tls=tls) as client:
        return await client.plan(batch, context)


# --------------------------------------------------------------------------- conversions

def test_a_request_survives_the_wire_unchanged() -> None:
    wire = pb.PlanRequest.FromString(request_to_pb(BATCH, CONTEXT).SerializeToString())
    assert request_from_pb(wire, default_now=0.0) == (BATCH, CONTEXT)


def test_a_path_level_backup_and_its_unit_survive_the_wire_unchanged() -> None:
    batch = [*BATCH, replace(backup("p", disk("db")), paths=PathSelection(2, ("/usr/lib", "/etc")))]
    wire = pb.PlanRequest.FromString(request_to_pb(batch, CONTEXT).SerializeToString())
    assert request_from_pb(wire, default_now=0.0) == (batch, CONTEXT)
    result = Planner(build_chain(["merge", "timing"])).plan(batch, CONTEXT)
    [unit] = [u for u in result.plan.units if u.kind is UnitKind.BACKUP_PATHS]
    assert unit.paths == PathSelection(2, ("/usr/lib", "/etc"))
    assert result_from_pb(pb.PlanResponse.FromString(result_to_pb(result).SerializeToString())) == result


def test_a_host_context_without_clock_or_load_gets_the_optimizers_clock() -> None:
    _, context = request_from_pb(pb.PlanRequest(host=pb.HostContext(host_name="h")), default_now=42.0)
    assert context == HostContext("h", 42.0)


def test_a_plan_survives_the_wire_unchanged() -> None:
    result = Planner(build_chain(["merge", "timing"])).plan(BATCH, CONTEXT)
    assert {u.kind for u in result.plan.units} == {UnitKind.BACKUP_BASE, UnitKind.BACKUP_DISK}
    assert result.rejections and all(u.not_before for u in result.plan.units)
    wire = pb.PlanResponse.FromString(result_to_pb(result).SerializeToString())
    assert result_from_pb(wire) == result


# --------------------------------------------------------------------------- serving on a unix socket

def test_a_batch_is_planned_over_a_unix_socket(tmp_path: Path) -> None:
    async def go() -> None:
        async with serving(ServerConfig(unix(tmp_path))) as server:
            assert server.address == unix(tmp_path)
            async with OptimizerClient(server.address, timeout=5) as client:
                result = await client.plan(BATCH, CONTEXT)
        assert result.plan.policy == "merge,timing"
        [base] = [u for u in result.plan.units if u.kind is UnitKind.BACKUP_BASE]
        assert set(base.satisfies) == {"a", "b", "c"}
        assert [(r.instruction_id, r.reason) for r in result.rejections] == [
            ("empty", "the backup request names no disk")]
        assert all("CPU pressure 90.0%" in u.reason for u in result.plan.units)

    asyncio.run(go())


def test_the_server_answers_health_checks_and_reflection_lists_its_services(tmp_path: Path) -> None:
    async def go() -> None:
        async with serving(ServerConfig(unix(tmp_path))) as server, \
                grpc.aio.insecure_channel(server.address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            for service in ("", SERVICE_NAME):
                answer = await health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
                assert answer.status == health_pb2.HealthCheckResponse.SERVING
            call = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5)
            services = [s.name async for answer in call for s in answer.list_services_response.service]
            assert {"hyperback.v1.Optimizer", "grpc.health.v1.Health",
                    "grpc.reflection.v1alpha.ServerReflection"} <= set(services)

    asyncio.run(go())


def test_a_malformed_request_gets_invalid_argument_saying_what_is_wrong(tmp_path: Path) -> None:
    request = request_to_pb(BATCH[:1], CONTEXT)
    request.instructions[0].kind = pb.INSTRUCTION_KIND_UNSPECIFIED

    async def go() -> None:
        async with serving(ServerConfig(unix(tmp_path))) as server, \
                grpc.aio.insecure_channel(server.address) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as raw:
                await pb_grpc.OptimizerStub(channel).PlanBatch(request, timeout=5)
            assert raw.value.code() is grpc.StatusCode.INVALID_ARGUMENT
            assert raw.value.details() == "instruction #0 (id 'a'): kind is unspecified"
            with pytest.raises(OptimizerRejected, match="INVALID_ARGUMENT: .*'b'.*the id appears twice") as e:
                await plan_once(server.address, [BATCH[0], BATCH[1], replace(BATCH[1], request_id="again")])
            assert e.value.code is grpc.StatusCode.INVALID_ARGUMENT and not e.value.retryable

    asyncio.run(go())


def test_a_policy_bug_is_internal_and_not_retryable(tmp_path: Path) -> None:
    class Forgetful(PlanningPolicy):
        name = "forgetful"

        def apply(self, plan: Plan, batch: Sequence[Instruction], context: HostContext) -> Plan:
            return replace(plan, units=())

    async def go() -> None:
        async with serving(ServerConfig(unix(tmp_path)), Planner([Forgetful()])) as server:
            with pytest.raises(OptimizerRejected, match="INTERNAL: policy chain 'forgetful'") as e:
                await plan_once(server.address)
            assert e.value.code is grpc.StatusCode.INTERNAL

    asyncio.run(go())


def test_an_unreachable_optimizer_is_unavailable_and_retryable(tmp_path: Path) -> None:
    started = time.monotonic()
    with pytest.raises(OptimizerUnavailable, match="UNAVAILABLE") as e:
        # A deadline no loaded machine comes near, so that failing before it means failing fast.
        asyncio.run(plan_once(unix(tmp_path, "nobody-listens.sock"), timeout=300))
    assert e.value.retryable and time.monotonic() - started < 150, "fails fast, not at the deadline"


def test_an_optimizer_that_does_not_answer_in_time_is_unavailable(tmp_path: Path) -> None:
    class Stuck(pb_grpc.OptimizerServicer):
        async def PlanBatch(self, request: pb.PlanRequest,
                            context: grpc.aio.ServicerContext[pb.PlanRequest, pb.PlanResponse]
                            ) -> pb.PlanResponse:
            await asyncio.sleep(10)
            return pb.PlanResponse()

    async def go() -> None:
        server = grpc.aio.server()
        pb_grpc.add_OptimizerServicer_to_server(Stuck(), server)
        server.add_insecure_port(unix(tmp_path))
        await server.start()
        try:
            with pytest.raises(OptimizerUnavailable, match="DEADLINE_EXCEEDED"):
                await plan_once(unix(tmp_path), timeout=0.3)
        finally:
            await server.stop(0)

    asyncio.run(go())


def test_plain_tcp_is_served_on_loopback_only_unless_allow_plaintext_is_set() -> None:
    with pytest.raises(OptimizerConfigError, match="plain TCP is refused off loopback.*allow_plaintext"):
        asyncio.run(start_server(ServerConfig("0.0.0.0:0"), Planner(build_chain(["passthrough"]))))

    async def go() -> None:
        async with serving(ServerConfig("127.0.0.1:0")) as server:
            assert (await plan_once(server.address)).plan.units

    asyncio.run(go())


# --------------------------------------------------------------------------- TLS

@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def test_the_clusters_certificates_secure_the_optimizer_over_tcp(pki: Pki) -> None:
    async def go() -> None:
        async with serving(ServerConfig("127.0.0.1:0", tls=pki.tls(Role.AGENT, "hostm"))) as server:
            assert server.address.startswith("127.0.0.1:") and not server.address.endswith(":0")
            as_hosta = replace(CONTEXT, host_name="hosta")  # the name its certificate gives
            assert (await plan_once(server.address, context=as_hosta,
                                    tls=pki.tls(Role.AGENT, "hosta"))).plan.units
            # TLS failures are not retried (the driver would retry OptimizerUnavailable forever)
            started = time.monotonic()
            stranger = pki.tls(Role.AGENT, "hosta", ca=pki.stranger)
            with pytest.raises(OptimizerRejected, match="TLS handshake with the optimizer .* failed"):
                await plan_once(server.address, tls=replace(stranger, ca=pki.stranger / "ca.pem"), timeout=5)
            assert time.monotonic() - started < QUICK

    asyncio.run(go())


def test_a_client_without_a_certificate_is_refused_without_retries(pki: Pki) -> None:
    async def go() -> None:
        async with serving(ServerConfig("127.0.0.1:0", tls=pki.tls(Role.AGENT, "hostm"))) as server:
            with pytest.raises(OptimizerRejected, match="requires TLS with a client certificate"):
                await plan_once(server.address, timeout=5)
            with pytest.raises(OptimizerRejected, match="not issued by the CA"):
                await plan_once(server.address, tls=pki.tls(Role.AGENT, "hosta", ca=pki.stranger), timeout=5)

    asyncio.run(go())


def test_an_unreadable_tls_file_is_a_configuration_error(pki: Pki, tmp_path: Path) -> None:
    with pytest.raises(OptimizerConfigError, match="cannot read the TLS key .*missing.key"):
        tls = replace(pki.tls(Role.AGENT, "hostm"), key=tmp_path / "missing.key")
        asyncio.run(start_server(ServerConfig("127.0.0.1:0", tls=tls), Planner(build_chain(["passthrough"]))))


# --------------------------------------------------------------------------- the command

def optimizer_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "host_agent.planning.service", *args]


def test_the_command_serves_until_sigterm_and_stops_cleanly(tmp_path: Path) -> None:
    socket = tmp_path / "run" / "optimizer.sock"
    proc = subprocess.Popen(optimizer_command("--listen", f"unix:{socket}", "--policies", "merge",
                                              "--grace", "1"),
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 20
        while not socket.exists():
            assert proc.poll() is None and time.monotonic() < deadline, "the optimizer did not start"
            time.sleep(0.05)
        result = asyncio.run(plan_once(f"unix:{socket}", timeout=5))
        assert result.plan.policy == "merge"
    finally:
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=20)
    assert proc.returncode == 0, stderr
    assert "optimizer serving on unix:" in stderr and "with policies merge" in stderr


def test_the_command_explains_itself_and_refuses_an_unknown_policy() -> None:
    helped = subprocess.run(optimizer_command("--help"), capture_output=True, text=True, timeout=30)
    assert helped.returncode == 0 and "--tls-crl" in helped.stdout and "--policies" in helped.stdout
    bad = subprocess.run(optimizer_command("--policies", "merge,quickest"), capture_output=True, text=True,
                         timeout=30)
    assert bad.returncode == 2
    assert bad.stderr.strip() == ("hyperback-optimizer: no policy named 'quickest' is installed (available: "
                                  "colocate, merge, passthrough, timing; "
                                  "entry point group hyperback.policies)")


# --------------------------------------------------------------------------- the host's side

def test_the_hosts_context_carries_its_name_clock_offset_and_load() -> None:
    context = host_context(HostLoadReader(), host_name="host-a")
    assert context.host_name == "host-a" and abs(context.now - time.time()) < 5
    assert context.load is not None and context.utc_offset == time.localtime().tm_gmtoff


def test_the_operator_stubs_generate_and_import() -> None:
    assert operator_pb2.DESCRIPTOR.services_by_name["Operator"].methods_by_name["WatchJob"].server_streaming
    assert hasattr(operator_pb2_grpc, "add_OperatorServicer_to_server")
    job = operator_pb2.Job(id="i1", kind=pb.INSTRUCTION_KIND_BACKUP, state=operator_pb2.JOB_STATE_DEFERRED)
    assert operator_pb2.Job.FromString(job.SerializeToString()) == job
    assert os.path.basename(operator_pb2.__file__) == "operator_pb2.py"
