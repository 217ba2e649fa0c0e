#!/usr/bin/env python3
"""Optimizer benchmark: time from flush to plan for a batch of instructions over real gRPC.

For each policy chain it starts ``python -m host_agent.planning.service`` on a unix socket in a temporary
directory (a separate process, as in production), waits until the health service says SERVING, then
times ``OptimizerClient.plan`` (convert the batch, call, plan, convert the answer back) ``--runs`` times
after ``--warmup`` untimed calls, and prints median and p95. ``plan only`` is the same planning in this
process without gRPC, for comparison.

    bench/bench_optimizer.py                      # 1,000 instructions, 30 runs per chain
    bench/bench_optimizer.py --instructions 5000 --runs 10 --chains merge,timing
    bench/bench_optimizer.py --fleet 100x100 --runs 5  # 100 hosts of 100 VMs flush at once, over TCP

``--fleet HOSTSxVMS`` is the fleet case: one optimizer process listening on TCP (loopback) with mutual
TLS (a throw-away CA and one certificate per host, as ``hyperback certs`` makes them), its state
in a ``--state-dir``, one gRPC channel per simulated host, each host's agent flushing one
instruction for each of its VMs. Their disks are clones of a few base images on shared storage,
which every host identifies alike (path, inode, size, mtime) for one repository id, so merge across
hosts is on: the first host to plan a base reads it, the others build on it. All hosts flush at the
same instant, ``--runs`` times (after one untimed round that connects and makes the first claims).
It prints the per-host plan latency (median, p95, p99, max), the wall time of a round, and how many
base reads the fleet's plans hold per round (``--no-merge-across``: what each host's plan alone holds). The
simulated hosts share this one client process, so the figures include their own conversion work,
serialized by its GIL: an upper bound for real, separate hosts.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import grpc.aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from host_agent.model import DiskRef, Instruction, InstructionKind, Policy, UnitKind
from host_agent.planning.chain import (
    DEFAULT_CHAIN,
    HostContext,
    ImageIdentity,
    Planner,
    build_chain,
    parse_chain,
)
from host_agent.planning.hostload import HostLoad
from host_agent.planning.service import OptimizerClient
from host_agent.tls import certs
from host_agent.tls.identity import Identity, Role
from host_agent.tls.transport import NO_TLS, TlsConfig, aio_channel

REPO_ROOT = Path(__file__).resolve().parents[1]
FLEET_REPO_ID = "b" * 32
DEFAULT_CHAINS = ("passthrough", "merge", "timing", "merge,timing")


def make_batch(n: int, seed: int = 1) -> list[Instruction]:
    """A flush's worth of work: domains of one or two disks, most of them clones of a few base images,
    some disks asked for twice (an application and a schedule), a few restores."""
    rng = random.Random(seed)
    now = time.time()
    bases = [f"/var/lib/libvirt/images/base-{k}.qcow2" for k in range(8)]
    domains = []
    for d in range(max(n // 3, 1)):
        uuid = f"00000000-0000-4000-8000-{d:012d}"
        chain = (rng.choice(bases),) if rng.random() < 0.8 else ()
        domains.append([DiskRef(uuid, f"vm{d}", f"disk{k}", f"vd{'ab'[k]}",
                                f"/var/lib/libvirt/images/vm{d}-{k}.qcow2", "qcow2" if chain else "raw",
                                20 << 30, chain if k == 0 else ())
                        for k in range(rng.choice((1, 2)))])
    batch = []
    for i in range(n):
        disks = rng.choice(domains)
        restore = rng.random() < 0.05
        batch.append(Instruction(
            id=f"i{i}", domain_uuid=disks[0].domain_uuid, request_id=f"req-{i}",
            kind=InstructionKind.RESTORE if restore else InstructionKind.BACKUP,
            disks=tuple(disks[:1]) if restore else tuple(disks), destination="default",
            policy=rng.choice((Policy.INCREMENTAL,) * 8 + (Policy.DIFFERENTIAL, Policy.FULL)),
            snapshot="latest" if restore else "", received_at=now - rng.uniform(0, 600)))
    return batch


def percentile(values: Sequence[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(p / 100 * len(ordered)) - 1))]


async def wait_serving(target: str, proc: subprocess.Popen[bytes], tls: TlsConfig = NO_TLS,
                       limit: float = 30.0) -> None:
    deadline = time.monotonic() + limit
    async with aio_channel(target, tls) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"the optimizer exited with {proc.returncode}")
            try:
                answer = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
                if answer.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit("the optimizer did not start")
            await asyncio.sleep(0.05)


async def time_chain(target: str, batch: list[Instruction], context: HostContext, runs: int,
                     warmup: int) -> tuple[list[float], int, int]:
    async with OptimizerClient(target, timeout=60) as client:
        for _ in range(warmup):
            await client.plan(batch, context)
        seconds = []
        for _ in range(runs):
            started = time.perf_counter()
            result = await client.plan(batch, context)
            seconds.append(time.perf_counter() - started)
    return seconds, len(result.plan.units), len(result.rejections)


def bench(chain: str, batch: list[Instruction], context: HostContext, runs: int, warmup: int,
          workdir: Path) -> list[str]:
    target = f"unix:{workdir / (chain.replace(',', '-') + '.sock')}"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "host_agent.planning.service", "--listen", target,
                             "--policies", chain, "--grace", "1"], env=env, stderr=subprocess.DEVNULL)
    try:
        asyncio.run(wait_serving(target, proc))
        seconds, units, rejected = asyncio.run(time_chain(target, batch, context, runs, warmup))
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    planner = Planner(build_chain(parse_chain(chain)))
    local = []
    for _ in range(max(runs // 3, 3)):
        started = time.perf_counter()
        planner.plan(batch, context)
        local.append(time.perf_counter() - started)
    ms = [s * 1000 for s in seconds]
    return [chain, f"{statistics.median(ms):.1f}", f"{percentile(ms, 95):.1f}", f"{min(ms):.1f}",
            f"{statistics.median(local) * 1000:.1f}", str(units), str(rejected)]


def fleet_batch(host: int, vms: int, seed: int) -> list[Instruction]:
    """One host's flush: one backup per VM, ids unique across the fleet."""
    def ours(uuid: str) -> str:
        return f"{host:08d}{uuid[8:]}"

    def disk(d: DiskRef) -> DiskRef:
        return replace(d, domain_uuid=ours(d.domain_uuid), path=d.path.replace("/vm", f"/h{host}-vm"))

    return [replace(i, id=f"h{host}-{i.id}", request_id=f"h{host}-{i.request_id}",
                    domain_uuid=ours(i.domain_uuid), disks=tuple(map(disk, i.disks)))
            for i in make_batch(vms, seed)]


def make_certificates(folder: Path, hosts: int) -> tuple[TlsConfig, list[TlsConfig]]:
    """A throw-away cluster CA, the optimizer's certificate for 127.0.0.1 and each host's (the
    optimizer plans a batch as the host its certificate names), as ``hyperback certs`` issues them."""
    certs.init_ca(folder / "ca", "bench CA")
    ca = folder / "ca" / certs.CA_CERT
    server = certs.issue(folder / "ca", Identity(Role.AGENT, "optimizer"), folder, ips=("127.0.0.1",))
    issued = [certs.issue(folder / "ca", Identity(Role.AGENT, f"host-{h}"), folder / f"host-{h}")
              for h in range(hosts)]
    return TlsConfig(ca, server.cert, server.key), [TlsConfig(ca, i.cert, i.key) for i in issued]


def fleet_context(host: int, batch: Sequence[Instruction], load: HostLoad) -> HostContext:
    """host-N's context: the base images its batch is built on, identified alike on every host (one
    file on shared storage), and one repository."""
    bases = sorted({p for i in batch for d in i.disks for p in d.backing_chain})
    images = {p: ImageIdentity(p, inode=1000 + int(p.rsplit("-", 1)[1].split(".")[0]), size=2 << 30,
                               mtime_ns=1_700_000_000_000_000_000) for p in bases}
    return HostContext(f"host-{host}", time.time(), load, shared_images=images,
                       repositories={"default": FLEET_REPO_ID})


async def fleet_rounds(target: str, tls: list[TlsConfig], hosts: int, vms: int, runs: int,
                       shared: bool) -> tuple[list[float], list[float], list[int]]:
    load = HostLoad(0.5, 0.5, 0.5, os.cpu_count() or 1, 2.0, 1.0)
    batches = [fleet_batch(h, vms, seed=h) for h in range(hosts)]
    clients = [OptimizerClient(target, timeout=120, tls=tls[h]) for h in range(hosts)]
    latencies: list[float] = []
    walls: list[float] = []
    base_reads: list[int] = []

    async def flush(client: OptimizerClient, host: int) -> None:
        started = time.perf_counter()
        context = fleet_context(host, batches[host], load)
        if not shared:
            context = replace(context, shared_images={}, repositories={})
        result = await client.plan(batches[host], context)
        latencies.append(time.perf_counter() - started)
        base_reads.append(sum(u.kind is UnitKind.BACKUP_BASE for u in result.plan.units))

    try:
        await asyncio.gather(*(flush(c, h) for h, c in enumerate(clients)))  # warm: connections up
        latencies.clear()
        base_reads.clear()
        for _ in range(runs):
            started = time.perf_counter()
            await asyncio.gather(*(flush(c, h) for h, c in enumerate(clients)))
            walls.append(time.perf_counter() - started)
    finally:
        for client in clients:
            await client.close()
    return latencies, walls, base_reads


def bench_fleet(spec: str, chain: str, runs: int, shared: bool) -> int:
    hosts, vms = (int(n) for n in spec.lower().split("x"))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    target = f"127.0.0.1:{port}"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    with tempfile.TemporaryDirectory(prefix="hyperback-bench-") as tmp:
        server_tls, client_tls = make_certificates(Path(tmp), hosts)
        proc = subprocess.Popen([sys.executable, "-m", "host_agent.planning.service", "--listen", target,
                                 "--policies", chain, "--grace", "1", "--max-batch", str(max(vms, 1000)),
                                 "--state-dir", str(Path(tmp) / "state"),
                                 "--tls-ca", str(server_tls.ca), "--tls-cert", str(server_tls.cert),
                                 "--tls-key", str(server_tls.key)],
                                env=env, stderr=subprocess.DEVNULL)
        try:
            asyncio.run(wait_serving(target, proc, client_tls[0]))
            latencies, walls, base_reads = asyncio.run(fleet_rounds(target, client_tls, hosts, vms, runs,
                                                                      shared))
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    ms = [s * 1000 for s in latencies]
    print(f"{hosts} hosts x {vms} VMs flushing at once, chain {chain}, {runs} rounds, gRPC over TCP "
          f"loopback, {os.cpu_count()} CPUs, Python {sys.version.split()[0]}")
    print(f"plan latency per host: median {statistics.median(ms):.0f} ms, p95 {percentile(ms, 95):.0f} ms, "
          f"p99 {percentile(ms, 99):.0f} ms, max {max(ms):.0f} ms")
    print(f"base reads in the plans of a round, merge across hosts {'on' if shared else 'off'}: "
          f"{sum(base_reads) / runs:.0f}")
    print(f"round (all hosts answered): median {statistics.median(walls):.2f} s, max {max(walls):.2f} s, "
          f"{hosts * vms / statistics.median(walls):.0f} instructions/s")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--instructions", type=int, default=1000, help="batch size (default %(default)s)")
    parser.add_argument("--runs", type=int, default=30, help="timed calls per chain (default %(default)s)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls first (default %(default)s)")
    parser.add_argument("--chains",
                        help=f"policy chains separated by ';' (default {';'.join(DEFAULT_CHAINS)}; "
                             f"--fleet: the optimizer's default, {','.join(DEFAULT_CHAIN)})")
    parser.add_argument("--busy", action="store_true", help="send a busy load reading (timing defers)")
    parser.add_argument("--no-merge-across", action="store_true",
                        help="fleet case: hosts send no shared images, so each batch merges on its own")
    parser.add_argument("--fleet", metavar="HOSTSxVMS",
                        help="the fleet case instead (e.g. 100x100): see above; uses the first chain given")
    args = parser.parse_args(argv)
    if args.fleet:
        chain = args.chains.split(";")[0].strip() if args.chains else ",".join(DEFAULT_CHAIN)
        return bench_fleet(args.fleet, chain, args.runs, not args.no_merge_across)
    batch = make_batch(args.instructions)
    load = HostLoad(0.5, 0.5, 0.5, os.cpu_count() or 1, 95.0 if args.busy else 2.0, 1.0)
    context = HostContext("bench-host", time.time(), load)
    header = ["chain", "median ms", "p95 ms", "min ms", "plan only ms", "units", "rejected"]
    rows = []
    with tempfile.TemporaryDirectory(prefix="hyperback-bench-") as tmp:
        for chain in (args.chains or ";".join(DEFAULT_CHAINS)).split(";"):
            rows.append(bench(chain.strip(), batch, context, args.runs, args.warmup, Path(tmp)))
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    print(f"{args.instructions} instructions per batch, {args.runs} runs per chain, gRPC over a unix socket, "
          f"{os.cpu_count()} CPUs, Python {sys.version.split()[0]}")
    for row in [header, ["-" * w for w in widths], *rows]:
        cells = zip(row, widths, strict=True)
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(cells)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
