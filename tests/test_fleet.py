"""One optimizer for a fleet: hosts over real gRPC (mutual TLS on loopback TCP, each host with its own
certificate), merge across hosts of backing images on shared storage, and the optimizer's state kept
across a SIGKILL of its process.

Async code runs under ``asyncio.run`` inside plain tests (no pytest-asyncio)."""
from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import grpc
import grpc.aio
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tls_helpers import Pki, make_pki

from host_agent.agent.destinations import Destinations
from host_agent.agent.planner import BatchPlanner
from host_agent.config import load as load_config
from host_agent.errors import OptimizerRejected
from host_agent.model import (
    DiskRef,
    Instruction,
    InstructionKind,
    Plan,
    Policy,
    UnitKind,
    WorkUnit,
    base_name,
)
from host_agent.planning.chain import HostContext, ImageIdentity, PlanResult, build_chain
from host_agent.planning.fleet import STATE_FILE, FleetPlanner, FleetState
from host_agent.planning.hostload import HostLoad
from host_agent.planning.service import (
    OptimizerClient,
    ServerConfig,
    request_from_pb,
    request_to_pb,
    start_server,
)
from host_agent.storage.repository import Repository
from host_agent.tls.identity import Role

NOW = 1_700_000_000.0
BASE = "/srv/shared/images/debian-12.qcow2"
REPO = "0123456789abcdef0123456789abcdef"
IDENTITY = ImageIdentity(BASE, inode=4242, size=2 << 30, mtime_ns=1_690_000_000_000_000_000)
BUSY = HostLoad(8.0, 6.0, 4.0, 2, cpu_some_avg10=90.0, io_some_avg10=1.0)
REFERS = "host host-a reads that base on shared storage"


def batch(host: str, *vms: str, destination: str = "shared", chain: tuple[str, ...] = (BASE,)
          ) -> list[Instruction]:
    def disk(vm: str) -> DiskRef:
        return DiskRef(f"uuid-{host}-{vm}", vm, "s1", "vda", f"/srv/shared/images/{host}-{vm}.qcow2", "qcow2",
                       20 << 30, chain)

    return [Instruction(f"{host}-{vm}", f"uuid-{host}-{vm}", f"r-{vm}", InstructionKind.BACKUP, (disk(vm),),
                        destination, Policy.INCREMENTAL, received_at=NOW - 5) for vm in vms]


def context(host: str, destination: str = "shared", identity: ImageIdentity = IDENTITY, repo: str = REPO,
            now: float = NOW, load: HostLoad | None = None) -> HostContext:
    return HostContext(host, now, load, shared_images={identity.path: identity},
                       repositories={destination: repo})


def bases(plan: Plan) -> list[WorkUnit]:
    return [u for u in plan.units if u.kind is UnitKind.BACKUP_BASE]


def disks(plan: Plan) -> list[WorkUnit]:
    return [u for u in plan.units if u.kind is UnitKind.BACKUP_DISK]


@dataclass(frozen=True)
class Fleet:
    """An optimizer on loopback TCP with mutual TLS, and a certificate per host."""

    address: str
    pki: Pki

    async def plan(self, host: str, instructions: Sequence[Instruction], ctx: HostContext) -> PlanResult:
        async with OptimizerClient(self.address, timeout=10, tls=self.pki.tls(Role.AGENT, host)) as client:
            return await client.plan(instructions, ctx)


@contextlib.asynccontextmanager
async def fleet(root: Path, planner: FleetPlanner | None = None) -> AsyncIterator[Fleet]:
    pki = make_pki(root)
    config = ServerConfig("127.0.0.1:0", tls=pki.tls(Role.AGENT, "optimizer"))
    server = await start_server(config, planner or FleetPlanner(build_chain(["merge", "timing"])))
    try:
        yield Fleet(server.address, pki)
    finally:
        await server.stop(0)


# --------------------------------------------------------------------------- merge across hosts

def test_a_hosts_shared_images_and_repository_ids_survive_the_wire_unchanged() -> None:
    sent = replace(context("host-a"), shared_images={BASE: IDENTITY, "/srv/b.qcow2": replace(
        IDENTITY, path="/srv/b.qcow2", inode=7)}, repositories={"shared": REPO, "other": "e" * 32})
    _, received = request_from_pb(request_to_pb(batch("host-a", "web1"), sent), default_now=0)
    assert received == sent



def test_two_hosts_clones_of_one_base_on_shared_storage_have_it_read_once_by_the_first_host(
        tmp_path: Path) -> None:
    async def go() -> tuple[PlanResult, PlanResult]:
        async with fleet(tmp_path) as optimizer:
            first = await optimizer.plan("host-a", batch("host-a", "web1"), context("host-a"))
            # host-b calls the same repository "nfs": the repository's id says it is the same
            second = await optimizer.plan("host-b", batch("host-b", "db1", "db2", destination="nfs"),
                                          context("host-b", destination="nfs"))
            return first, second

    first, second = asyncio.run(go())
    [read] = bases(first.plan)
    assert read.source == BASE and read.snapshot_name == base_name(BASE)
    assert all(read.id in u.depends_on for u in disks(first.plan))
    assert bases(second.plan) == []
    assert [u.depends_on for u in disks(second.plan)] == [(), ()]
    for unit in disks(second.plan):
        assert f"builds on {base_name(BASE)}" in unit.reason
        assert f"{REFERS} (its unit {read.id})" in unit.reason
    assert "fleet: 2 disk(s) build on bases that other hosts read" in second.plan.notes


@pytest.mark.parametrize("other", [
    pytest.param(replace(IDENTITY, inode=4243), id="another-file-at-the-same-path"),
    pytest.param(replace(IDENTITY, mtime_ns=IDENTITY.mtime_ns + 1), id="rewritten-in-place"),
    pytest.param(replace(IDENTITY, size=IDENTITY.size + 512), id="grown"),
])
def test_an_image_at_the_same_path_that_differs_in_inode_mtime_or_size_is_other_data_and_read_again(
        tmp_path: Path, other: ImageIdentity) -> None:
    async def go() -> PlanResult:
        async with fleet(tmp_path) as optimizer:
            await optimizer.plan("host-a", batch("host-a", "web1"), context("host-a"))
            return await optimizer.plan("host-b", batch("host-b", "db1"), context("host-b", identity=other))

    second = asyncio.run(go())
    assert [u.source for u in bases(second.plan)] == [BASE]
    assert not any(REFERS in u.reason for u in second.plan.units)


def test_the_same_destination_name_on_another_repository_is_not_shared(tmp_path: Path) -> None:
    async def go() -> PlanResult:
        async with fleet(tmp_path) as optimizer:
            await optimizer.plan("host-a", batch("host-a", "web1"), context("host-a"))
            return await optimizer.plan("host-b", batch("host-b", "db1"), context("host-b", repo="f" * 32))

    assert [u.source for u in bases(asyncio.run(go()).plan)] == [BASE]


def test_a_host_resending_its_batch_after_a_lost_answer_reads_the_base_again(tmp_path: Path) -> None:
    async def go() -> list[PlanResult]:
        async with fleet(tmp_path) as optimizer:
            return [await optimizer.plan("host-a", batch("host-a", "web1"), context("host-a")) for _ in "12"]

    assert [[u.source for u in bases(r.plan)] for r in asyncio.run(go())] == [[BASE], [BASE]]


def test_a_claim_is_forgotten_after_the_fleet_window_of_the_optimizers_clock() -> None:
    clock = [1000.0]
    planner = FleetPlanner(build_chain(["merge"]), window=600, clock=lambda: clock[0])
    planner.plan(batch("host-a", "web1"), context("host-a"))
    clock[0] += 599
    assert bases(planner.plan(batch("host-b", "db1"), context("host-b")).plan) == []
    clock[0] += 2
    assert [u.source for u in bases(planner.plan(batch("host-c", "db1"), context("host-c")).plan)] == [BASE]


# --------------------------------------------------------------------------- host identity and trust

@pytest.mark.parametrize(("ctx", "complaint"), [
    pytest.param(replace(context("host-b"), shared_images={"/srv/shared/images/other.qcow2": replace(
        IDENTITY, path="/srv/shared/images/other.qcow2")}), "no disk of the batch is built on",
        id="an-image-none-of-its-disks-is-built-on"),
    pytest.param(context("host-b", repo="not-a-repository-id"), "is not 32 lowercase hex digits",
                 id="a-repository-id-that-is-not-one"),
])
def test_a_host_naming_data_that_is_not_its_own_is_refused_saying_why(
        tmp_path: Path, ctx: HostContext, complaint: str) -> None:
    async def go() -> None:
        async with fleet(tmp_path) as optimizer:
            with pytest.raises(OptimizerRejected, match=f"INVALID_ARGUMENT: .*{complaint}"):
                await optimizer.plan("host-b", batch("host-b", "db1"), ctx)

    asyncio.run(go())


def test_a_batch_naming_another_host_than_its_certificate_is_refused_and_claims_nothing(
        tmp_path: Path) -> None:
    async def go() -> PlanResult:
        async with fleet(tmp_path) as optimizer:
            with pytest.raises(OptimizerRejected, match="PERMISSION_DENIED: .*names host 'host-a' but comes "
                                                        "with the certificate of agent host-b"):
                await optimizer.plan("host-b", batch("host-b", "db1"), context("host-a"))
            return await optimizer.plan("host-c", batch("host-c", "db1"), context("host-c"))

    assert [u.source for u in bases(asyncio.run(go()).plan)] == [BASE]


def test_a_batch_without_a_host_name_plans_as_the_host_of_its_certificate(tmp_path: Path) -> None:
    async def go() -> PlanResult:
        async with fleet(tmp_path) as optimizer:
            await optimizer.plan("host-a", batch("host-a", "web1"), context(""))
            return await optimizer.plan("host-b", batch("host-b", "db1"), context("host-b"))

    assert all(REFERS in u.reason for u in disks(asyncio.run(go()).plan))


def test_each_hosts_load_clock_and_stored_bases_stay_its_own_when_they_flush_at_once(tmp_path: Path) -> None:
    later = NOW + 7 * 3600  # host-b's clock is hours ahead of host-a's
    busy_a = replace(context("host-a", load=BUSY), known_bases=frozenset({("shared", base_name(BASE))}))

    async def go() -> list[PlanResult]:
        async with fleet(tmp_path) as optimizer:
            return list(await asyncio.gather(
                optimizer.plan("host-a", batch("host-a", "web1"), busy_a),
                optimizer.plan("host-b", [replace(i, received_at=later - 5) for i in batch("host-b", "db1")],
                               context("host-b", now=later))))

    a, b = asyncio.run(go())
    assert bases(a.plan) == [] and [u.not_before for u in disks(a.plan)] == [NOW + 60]
    # host-a's stored base and its load are not host-b's: host-b reads the base, now
    assert [u.source for u in bases(b.plan)] == [BASE]
    assert {u.not_before for u in b.plan.units} == {0.0}


# --------------------------------------------------------------------------- state across a restart

def optimizer_process(socket: Path, state: Path) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "host_agent.planning.service",
                             "--listen", f"unix:{socket}", "--policies", "merge,timing", "--grace", "0",
                             "--state-dir", str(state)],
                            stderr=subprocess.PIPE, text=True)


async def wait_serving(target: str, proc: subprocess.Popen[str]) -> None:
    async with grpc.aio.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            assert proc.poll() is None, proc.communicate()[1]
            try:
                answer = await stub.Check(health_pb2.HealthCheckRequest(), timeout=5, wait_for_ready=True)
                if answer.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError as e:
                assert e.code() is grpc.StatusCode.DEADLINE_EXCEEDED, e


def plan_unix(target: str, host: str, instructions: Sequence[Instruction], ctx: HostContext) -> PlanResult:
    async def go() -> PlanResult:
        async with OptimizerClient(target, timeout=10) as client:
            return await client.plan(instructions, ctx)

    return asyncio.run(go())


def second_hosts_plan(tmp_path: Path, kill_between: bool) -> PlanResult:
    """host-a flushes, then host-b; with ``kill_between`` the optimizer is SIGKILLed and started again
    (same state dir) between the two."""
    socket, state = tmp_path / "optimizer.sock", tmp_path / "state"
    target = f"unix:{socket}"
    proc = optimizer_process(socket, state)
    try:
        asyncio.run(wait_serving(target, proc))
        plan_unix(target, "host-a", batch("host-a", "web1"), context("host-a"))
        if kill_between:
            proc.send_signal(signal.SIGKILL)
            assert proc.wait(timeout=30) == -signal.SIGKILL
            proc.communicate()
            proc = optimizer_process(socket, state)
            asyncio.run(wait_serving(target, proc))
        return plan_unix(target, "host-b", batch("host-b", "db1", "db2", destination="nfs"),
                         context("host-b", destination="nfs"))
    finally:
        proc.kill()
        proc.communicate()


def test_the_optimizers_claims_survive_a_sigkill_between_two_hosts_batches(tmp_path: Path) -> None:
    undisturbed = second_hosts_plan(tmp_path / "undisturbed", kill_between=False)
    restarted = second_hosts_plan(tmp_path / "restarted", kill_between=True)
    assert bases(restarted.plan) == [] and all(REFERS in u.reason for u in disks(restarted.plan))
    assert restarted == undisturbed


def _corrupt(path: Path) -> None:
    path.write_bytes(b"this is not an sqlite database, it is what a bad disk left\n" * 100)


def _newer(path: Path) -> None:
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.execute("CREATE TABLE claims (anything TEXT)")
        db.execute("PRAGMA user_version=99")
        db.commit()


@pytest.mark.parametrize(("spoil", "said"), [(_corrupt, "file is not a database"),
                                             (_newer, "state version 99, written by a newer optimizer")])
def test_an_unreadable_or_newer_state_file_is_set_aside_with_one_log_line_and_the_optimizer_starts_empty(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, spoil: object, said: str) -> None:
    assert callable(spoil)
    spoil(tmp_path / STATE_FILE)
    kept = (tmp_path / STATE_FILE).read_bytes()
    with caplog.at_level(logging.ERROR, logger="host_agent.planning.fleet"):
        state = FleetState.in_dir(tmp_path)
    [line] = [r.getMessage() for r in caplog.records]
    assert said in line and "starting with no claims" in line and f"{STATE_FILE}.unreadable" in line
    assert (tmp_path / f"{STATE_FILE}.unreadable").read_bytes() == kept
    planner = FleetPlanner(build_chain(["merge"]), state=state)
    assert [u.source for u in bases(planner.plan(batch("host-a", "web1"), context("host-a")).plan)] == [BASE]
    state.close()
    reopened = FleetPlanner(build_chain(["merge"]), state=FleetState.in_dir(tmp_path))
    assert bases(reopened.plan(batch("host-b", "db1"), context("host-b")).plan) == []


def test_the_command_refuses_a_state_dir_it_cannot_create(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    done = subprocess.run([sys.executable, "-m", "host_agent.planning.service", "--listen",
                           f"unix:{tmp_path / 's.sock'}", "--state-dir", str(tmp_path / "file" / "state")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and done.stderr.strip().startswith("hyperback-optimizer: --state-dir ")
    assert "Traceback" not in done.stderr


# --------------------------------------------------------------------------- the agent's side

def test_an_agent_identifies_the_backing_images_of_its_backups_on_shared_storage_and_its_repository(
        tmp_path: Path) -> None:
    shared, local = tmp_path / "shared", tmp_path / "local"
    shared.mkdir()
    local.mkdir()
    (shared / "base.qcow2").write_bytes(b"a base image")
    (local / "private.qcow2").write_bytes(b"a host's own image")
    repo = Repository.init(tmp_path / "repo")
    config_file = tmp_path / "agent.toml"
    config_file.write_text(f'host_name = "host-a"\nshared_storage = ["{shared}"]\n'
                           f'[repositories]\ndefault = "{tmp_path / "repo"}"\n')
    config = load_config(config_file, env={})
    planner = BatchPlanner(config, None, Destinations(config), None, None, None)  # type: ignore[arg-type]
    on_shared = batch("host-a", "web1", destination="default", chain=(f"{shared}//base.qcow2",))
    on_local = batch("host-a", "web2", destination="default", chain=(str(local / "private.qcow2"),))
    images, repositories = planner._shared([*on_shared, *on_local])
    st = (shared / "base.qcow2").stat()
    path = str(shared / "base.qcow2")
    assert images == {path: ImageIdentity(path, st.st_ino, st.st_size, st.st_mtime_ns)}
    assert repositories == {"default": repo.config.repo_id}
