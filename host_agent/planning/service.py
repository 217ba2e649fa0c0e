"""The optimizer service: gRPC plumbing around :class:`host_agent.planning.chain.Planner`.

A host agent's driver sends each batch of instructions (``hyperback.v1.Optimizer/PlanBatch``, see
``proto/hyperback/v1/optimizer.proto``) with its host context: host name, clock, load reading, the base
images it already stores. The optimizer answers with a plan and the instructions it rejects. The
planning itself, the policies and their chain are plain Python in ``host_agent.planning.chain``; this module
converts between protobuf messages and ``host_agent.model``, serves, and is the client.

Serving
    ``python -m host_agent.planning.service`` (console script ``hyperback-optimizer``) listens on a unix
    socket, by default ``unix:/run/hyperback/optimizer.sock``, or on TCP (``HOST:PORT``) to serve many
    hosts, with mutual TLS (``--tls-ca``, ``--tls-cert``, ``--tls-key``, ``--tls-crl``: the [tls]
    settings of docs/tls.md, served by ``host_agent.tls.transport`` as every hyperback service); plain
    TCP only on loopback, or with ``--allow-plaintext``. The gRPC health service
    (``grpc.health.v1.Health``, for ``""`` and ``hyperback.v1.Optimizer``) and server reflection are
    registered. Over mutual TLS the sending host is the agent its certificate names (a batch naming
    another host: PERMISSION_DENIED). Merge across hosts and its state (``--state-dir``) are
    ``host_agent.planning.fleet``'s. SIGTERM or SIGINT stops it
    gracefully: health turns NOT_SERVING, calls in flight get ``--grace`` seconds to finish.

Status codes
    INVALID_ARGUMENT  the request breaks the contract (``MalformedBatch``, ``MalformedMessage``: the
                      message says which instruction and field); PERMISSION_DENIED  the batch names
                      another host than its client certificate (``ForeignHost``); INTERNAL  a policy
                      produced an inconsistent plan (``PolicyError``, a bug).

Client
    :class:`OptimizerClient` ``await client.plan(instructions, context) -> PlanResult`` with a
    deadline. UNAVAILABLE, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED, ABORTED and CANCELLED become
    :class:`OptimizerUnavailable` (retry later); every other status, and an answer that cannot be
    read, becomes :class:`OptimizerRejected` (retrying the same batch will not help).

The exception tree, shared with ``host_agent.planning.chain``, is drawn in that module's docstring.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import math
import re
import signal
import socket
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from types import TracebackType
from typing import Final

import grpc
import grpc.aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from host_agent import errors
from host_agent._proto.hyperback.v1 import optimizer_pb2 as pb
from host_agent._proto.hyperback.v1 import optimizer_pb2_grpc as pb_grpc
from host_agent.errors import (
    ForeignHost,
    HostLoadError,
    MalformedBatch,
    MalformedMessage,
    OptimizerConfigError,
    OptimizerRejected,
    OptimizerUnavailable,
    PolicyError,
)
from host_agent.model import (
    Instruction,
    Plan,
    normalize_path,
)
from host_agent.notify import Notifier
from host_agent.planning.chain import (
    DEFAULT_CHAIN,
    DEFAULT_MAX_BATCH,
    HostContext,
    ImageIdentity,
    Planner,
    PlanResult,
    Rejection,
    available_policies,
    build_chain,
    parse_chain,
    parse_policy_options,
)
from host_agent.planning.fleet import DEFAULT_WINDOW, FleetPlanner, FleetState
from host_agent.planning.hostload import HostLoad, HostLoadReader
from host_agent.protobuf import (
    appliance_from_pb,
    appliance_to_pb,
    footprint_from_pb,
    footprint_to_pb,
    instruction_from_pb,
    instruction_to_pb,
    time_from_pb,
    unit_from_pb,
    unit_to_pb,
)
from host_agent.tls.identity import Role
from host_agent.tls.roles import ALL, AioRoleInterceptor
from host_agent.tls.transport import (
    NO_TLS,
    TlsConfig,
    add_arguments,
    add_port,
    aio_channel,
    from_arguments,
    is_local_socket,
    peer_identity,
    tls_failure,
)

log = logging.getLogger(__name__)

SERVICE_NAME: Final = pb.DESCRIPTOR.services_by_name["Optimizer"].full_name
DEFAULT_LISTEN: Final = "unix:/run/hyperback/optimizer.sock"
DEFAULT_TIMEOUT: Final = 10.0
DEFAULT_GRACE: Final = 5.0
MAX_MESSAGE: Final = 64 * 1024 * 1024
_RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                        grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.ABORTED,
                        grpc.StatusCode.CANCELLED})
_REPO_ID: Final = re.compile(r"[0-9a-f]{32}")
_CHANNEL_OPTIONS: Final = [("grpc.max_receive_message_length", MAX_MESSAGE),
                           ("grpc.max_send_message_length", MAX_MESSAGE)]


# --------------------------------------------------------------------------- planning <-> protobuf

def load_to_pb(load: HostLoad) -> pb.HostLoad:
    return pb.HostLoad(cpu_some_avg10=load.cpu_some_avg10, io_some_avg10=load.io_some_avg10,
                       load1=load.load1, load5=load.load5, load15=load.load15, cpu_count=load.cpu_count,
                       notes=load.notes)


def load_from_pb(m: pb.HostLoad) -> HostLoad:
    values = [m.load1, m.load5, m.load15]
    if m.HasField("cpu_some_avg10"):
        values.append(m.cpu_some_avg10)
    if m.HasField("io_some_avg10"):
        values.append(m.io_some_avg10)
    if not all(math.isfinite(v) and v >= 0 for v in values) or m.cpu_count < 1:
        raise MalformedMessage(f"host load: needs finite non-negative readings and a CPU count, got {values} "
                             f"on {m.cpu_count} CPUs")
    return HostLoad(load1=m.load1, load5=m.load5, load15=m.load15, cpu_count=m.cpu_count,
                    cpu_some_avg10=m.cpu_some_avg10 if m.HasField("cpu_some_avg10") else None,
                    io_some_avg10=m.io_some_avg10 if m.HasField("io_some_avg10") else None,
                    notes=tuple(m.notes))


def context_to_pb(c: HostContext) -> pb.HostContext:
    return pb.HostContext(host_name=c.host_name, now=c.now, load=load_to_pb(c.load) if c.load else None,
                          known_bases=[pb.KnownBase(destination=d, snapshot_name=n)
                                       for d, n in sorted(c.known_bases)],
                          utc_offset_seconds=c.utc_offset,
                          footprints=[footprint_to_pb(f) for f in c.footprints.values()],
                          remote_destinations=[pb.RemoteDestination(destination=d, host=h)
                                               for d, h in sorted(c.remote_destinations.items())],
                          held=[pb.HeldDisk(destination=d, snapshot_name=n, last_stored_bytes=b)
                                for (d, n), b in sorted(c.held.items())],
                          appliances=[appliance_to_pb(a) for _, a in sorted(c.appliances.items())],
                          shared_images=[pb.SharedImage(path=i.path, inode=i.inode, size=i.size,
                                                        mtime_ns=i.mtime_ns)
                                         for _, i in sorted(c.shared_images.items())],
                          repositories=[pb.RepositoryRef(destination=d, repo_id=r)
                                        for d, r in sorted(c.repositories.items())])


def context_from_pb(m: pb.HostContext, default_now: float) -> HostContext:
    return HostContext(host_name=m.host_name, now=time_from_pb(m.now, "host", "now") or default_now,
                       load=load_from_pb(m.load) if m.HasField("load") else None,
                       known_bases=frozenset((b.destination, b.snapshot_name) for b in m.known_bases),
                       utc_offset=m.utc_offset_seconds if m.HasField("utc_offset_seconds") else None,
                       footprints={f.domain_uuid: footprint_from_pb(f) for f in m.footprints},
                       remote_destinations={r.destination: r.host for r in m.remote_destinations},
                       held={(h.destination, h.snapshot_name): h.last_stored_bytes for h in m.held},
                       appliances={a.destination: appliance_from_pb(a) for a in m.appliances},
                       shared_images={i.path: i for i in map(image_from_pb, m.shared_images)},
                       repositories={r.destination: repo_id_from_pb(r) for r in m.repositories})


def image_from_pb(m: pb.SharedImage) -> ImageIdentity:
    if not m.path.startswith("/"):
        raise MalformedMessage(f"shared image {m.path!r}: the path must be absolute")
    return ImageIdentity(normalize_path(m.path), m.inode, m.size, m.mtime_ns)


def repo_id_from_pb(m: pb.RepositoryRef) -> str:
    if not _REPO_ID.fullmatch(m.repo_id):
        raise MalformedMessage(f"destination {m.destination!r}: repo_id {m.repo_id!r} is not 32 lowercase "
                               f"hex digits (the repository's config names it)")
    return m.repo_id


def request_to_pb(batch: Sequence[Instruction], context: HostContext) -> pb.PlanRequest:
    return pb.PlanRequest(instructions=[instruction_to_pb(i) for i in batch], host=context_to_pb(context))


def request_from_pb(m: pb.PlanRequest, default_now: float) -> tuple[list[Instruction], HostContext]:
    batch = [instruction_from_pb(i, f"instruction #{n} (id {i.id!r})") for n, i in enumerate(m.instructions)]
    return batch, context_from_pb(m.host, default_now)


def result_to_pb(result: PlanResult) -> pb.PlanResponse:
    plan = result.plan
    return pb.PlanResponse(
        plan=pb.Plan(units=[unit_to_pb(u) for u in plan.units], policy=plan.policy, notes=plan.notes),
        rejections=[pb.Rejection(instruction_id=r.instruction_id, reason=r.reason)
                    for r in result.rejections])


def result_from_pb(m: pb.PlanResponse) -> PlanResult:
    units = tuple(unit_from_pb(u, f"unit #{n} (id {u.id!r})") for n, u in enumerate(m.plan.units))
    return PlanResult(Plan(units, m.plan.policy, tuple(m.plan.notes)),
                      tuple(Rejection(r.instruction_id, r.reason) for r in m.rejections))


# --------------------------------------------------------------------------- the service

_Context = grpc.aio.ServicerContext[pb.PlanRequest, pb.PlanResponse]


class OptimizerServicer(pb_grpc.OptimizerServicer):
    """``PlanBatch``: convert, plan, convert back; domain errors become status codes here and only here."""

    def __init__(self, planner: Planner) -> None:
        self.planner = planner

    async def PlanBatch(self, request: pb.PlanRequest, context: _Context) -> pb.PlanResponse:
        started = time.perf_counter()
        peer = log.getChild(f"host:{request.host.host_name.replace('.', '_') or '?'}")
        try:
            batch, host = request_from_pb(request, default_now=time.time())
            result = self.planner.plan(batch, replace(host, host_name=_host_name(host.host_name, context)))
        except ForeignHost as e:
            peer.warning("refused a batch from %s: %s", context.peer(), e)
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, str(e))
        except (MalformedBatch, MalformedMessage) as e:
            peer.warning("refused a batch of %d instruction(s) from %s: %s",
                         len(request.instructions), context.peer(), e)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except PolicyError as e:
            peer.error("%s", e)
            await context.abort(grpc.StatusCode.INTERNAL, str(e))
        peer.info("planned %d instruction(s) into %d unit(s), %d rejected, in %.1f ms",
                  len(batch), len(result.plan.units), len(result.rejections),
                  (time.perf_counter() - started) * 1000)
        peer.debug("plan %s", result)
        return result_to_pb(result)


# The optimizer has no roles: any certificate of the cluster's CA may ask for plans; which host an
# agent's batch may name is the servicer's check (_host_name), as it depends on the request.
ANY_ROLE: Final = {role: ALL for role in Role}


def _host_name(named: str, context: _Context) -> str:
    """The sending host: the agent identity of its client certificate, which the request may repeat
    but not contradict (claims of shared images are a host's own); the request's name without one.

    The identity is the one AioRoleInterceptor checked: a certificate without exactly one hyperback
    identity was refused (PERMISSION_DENIED) before the servicer ran."""
    identity = peer_identity(context)
    if identity is None or identity.role is not Role.AGENT:
        return named
    if named and named != identity.name:
        raise ForeignHost(f"the batch names host {named!r} but comes with the certificate of {identity}: "
                          f"an agent plans only as the host its certificate names")
    return identity.name


@dataclass(frozen=True)
class ServerConfig:
    listen: str = DEFAULT_LISTEN
    tls: TlsConfig = NO_TLS       # on TCP: mutual TLS, as every hyperback service (docs/tls.md)
    grace: float = DEFAULT_GRACE  # seconds calls in flight may take to finish on stop


class OptimizerServer:
    """A started optimizer: its bound ``address`` (the TCP port resolved), health, and a graceful stop."""

    def __init__(self, server: grpc.aio.Server, health_servicer: health.aio.HealthServicer,
                 address: str, grace: float) -> None:
        self.server, self.health, self.address, self.grace = server, health_servicer, address, grace

    async def stop(self, grace: float | None = None) -> None:
        await self.health.enter_graceful_shutdown()
        await self.server.stop(self.grace if grace is None else grace)
        log.info("optimizer on %s stopped", self.address)

    async def wait_for_termination(self) -> None:
        await self.server.wait_for_termination()


async def start_server(config: ServerConfig, planner: Planner) -> OptimizerServer:
    """Bind, register the optimizer, health and reflection services, and start serving."""
    listen = config.listen
    if listen.startswith("unix:"):
        path = Path(listen.removeprefix("unix:").removeprefix("//"))
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OptimizerConfigError(f"cannot create {path.parent} for {listen}: {e.strerror or e}") from e
    secure = config.tls.enabled and not is_local_socket(listen)
    try:
        server = grpc.aio.server(options=_CHANNEL_OPTIONS,
                                 interceptors=[AioRoleInterceptor(ANY_ROLE, config.tls)] if secure else [])
    except errors.TlsError as e:  # an unusable revocation list
        raise OptimizerConfigError(str(e)) from e
    pb_grpc.add_OptimizerServicer_to_server(OptimizerServicer(planner), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    try:
        port = add_port(server, listen, config.tls, "optimizer")
    except errors.HyperbackError as e:  # a bad address, an unreadable certificate, plain TCP refused
        raise OptimizerConfigError(str(e)) from e
    address = listen if listen.startswith("unix:") else f"{listen.rpartition(':')[0]}:{port}"
    await server.start()
    for service in ("", SERVICE_NAME):
        await health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
    log.info("optimizer serving on %s with policies %s%s", address, planner.name,
             " (mutual TLS)" if secure else "")
    return OptimizerServer(server, health_servicer, address, config.grace)


async def serve(config: ServerConfig, planner: Planner, notifier: Notifier | None = None) -> None:
    """Serve until SIGTERM or SIGINT, then stop gracefully; tell systemd (``notifier``) when it
    serves, ping its watchdog from this loop meanwhile, and say when it stops."""
    notifier = notifier or Notifier()
    server = await start_server(config, planner)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    notifier.ready(f"serving on {server.address} with policies {planner.name}")
    pings = asyncio.create_task(notifier.keep_alive(), name="watchdog")
    try:
        await stop.wait()
        log.info("stopping: %.1f s for calls in flight", config.grace)
        notifier.stopping()
    finally:
        pings.cancel()
        await server.stop()
        notifier.close()


# --------------------------------------------------------------------------- the client

def host_context(reader: HostLoadReader | None = None, known_bases: frozenset[tuple[str, str]] = frozenset(),
                 host_name: str | None = None) -> HostContext:
    """This host's context for a batch, now: name, clock, UTC offset and (if ``reader``) load."""
    load = None
    if reader is not None:
        try:
            load = reader.read()
        except HostLoadError as e:
            log.warning("sending the batch without a load reading: %s", e)
    return HostContext(host_name=host_name or socket.gethostname(), now=time.time(), load=load,
                       known_bases=known_bases, utc_offset=time.localtime().tm_gmtoff)


class OptimizerClient:
    """The driver's side of ``PlanBatch``: ``await client.plan(batch, context)`` with a deadline."""

    def __init__(self, target: str = DEFAULT_LISTEN, *, timeout: float = DEFAULT_TIMEOUT,
                 tls: TlsConfig = NO_TLS) -> None:
        """``tls``: this host's [tls] settings; a unix: target is always plain."""
        self.target, self.timeout, self._tls = target, timeout, tls
        self._cert = tls.cert if tls.enabled and not is_local_socket(target) else None
        self._channel: grpc.aio.Channel | None = None
        self._stub: pb_grpc.OptimizerAsyncStub | None = None

    def _connect(self) -> pb_grpc.OptimizerAsyncStub:
        if self._stub is None:
            try:
                self._channel = aio_channel(self.target, self._tls, tuple(_CHANNEL_OPTIONS))
            except errors.HyperbackError as e:  # this end's certificate, or plain TCP refused
                raise OptimizerRejected(f"optimizer at {self.target}: {e}") from e
            self._stub = pb_grpc.OptimizerStub(self._channel)
        return self._stub

    async def plan(self, instructions: Sequence[Instruction], context: HostContext) -> PlanResult:
        """Plan a batch. Raises OptimizerUnavailable (retry later) or OptimizerRejected (do not)."""
        request = request_to_pb(instructions, context)
        stub = self._connect()
        try:
            response = await stub.PlanBatch(request, timeout=self.timeout)
        except grpc.aio.AioRpcError as e:
            code, details = e.code(), e.details() or ""
            message = f"optimizer at {self.target}: {code.name}: {details}"
            handshake = tls_failure(code, details, f"the optimizer at {self.target}", self._cert)
            if handshake is not None:  # retrying cannot help: the driver fails the batch, saying why
                raise OptimizerRejected(str(handshake), code) from e
            if code in _RETRYABLE:
                raise OptimizerUnavailable(message, code) from e
            raise OptimizerRejected(message, code) from e
        try:
            result = result_from_pb(response)
        except MalformedMessage as e:
            raise OptimizerRejected(f"optimizer at {self.target} answered with a plan this agent "
                                    f"cannot read: {e}") from e
        return result

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
        self._channel, self._stub = None, None

    async def __aenter__(self) -> OptimizerClient:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()


# --------------------------------------------------------------------------- command line

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hyperback-optimizer",
        description="Serve the hyperback optimizer: host agents send batches of backup and restore "
                    "instructions over gRPC and get plans back.",
        epilog="Exit codes: 0 stopped by SIGTERM/SIGINT, 1 unexpected error, 2 bad arguments or "
               "configuration (unknown policy, unreadable TLS file, address in use).")
    parser.add_argument("--listen", default=DEFAULT_LISTEN, metavar="ADDRESS",
                        help=f"unix:/PATH, or HOST:PORT with TLS (default {DEFAULT_LISTEN})")
    parser.add_argument("--policies", default=",".join(DEFAULT_CHAIN), metavar="CHAIN",
                        help="policy chain, applied in order (default %(default)s; see --list-policies)")
    parser.add_argument("-o", "--policy-option", action="append", default=[], metavar="POLICY.KEY=VALUE",
                        help="a policy option, e.g. timing.window=22:00-06:00, timing.max_defer=1h, "
                             "timing.cpu_pressure=40, timing.io_pressure=30, timing.load_per_core=1.5, "
                             "timing.recheck=60s (repeatable)")
    add_arguments(parser)
    parser.add_argument("--grace", type=float, default=DEFAULT_GRACE, metavar="SECONDS",
                        help="on stop, time given to calls in flight (default %(default)s)")
    parser.add_argument("--max-batch", type=int, default=DEFAULT_MAX_BATCH, metavar="N",
                        help="refuse batches of more instructions (default %(default)s)")
    parser.add_argument("--state-dir", type=Path, metavar="DIR",
                        help="keep the claims of merge across hosts here, to survive a restart "
                             "(default: in memory; docs/architecture.md)")
    parser.add_argument("--fleet-window", type=float, default=DEFAULT_WINDOW, metavar="SECONDS",
                        help="how long another host may build on a base a host reads (default %(default)s)")
    parser.add_argument("--list-policies", action="store_true", help="list the installed policies and exit")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level (default INFO)")
    return parser


def parse_args(argv: Sequence[str] | None) -> tuple[ServerConfig, Planner] | None:
    """The command line, parsed once into configuration; None after --list-policies."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="hyperback-optimizer: %(levelname)s %(name)s: %(message)s")
    if args.list_policies:
        for name, ep in sorted(available_policies().items()):
            print(f"{name:16} {ep.value}")
        return None
    try:
        tls = from_arguments(args)
    except errors.UsageError as e:
        raise OptimizerConfigError(str(e)) from e
    if args.max_batch < 1 or not args.grace >= 0 or not args.fleet_window >= 0:
        raise OptimizerConfigError("--max-batch must be at least 1, --grace and --fleet-window not negative")
    chain = build_chain(parse_chain(args.policies), parse_policy_options(args.policy_option))
    planner = FleetPlanner(chain, args.max_batch, FleetState.in_dir(args.state_dir), args.fleet_window)
    return ServerConfig(listen=args.listen, tls=tls, grace=args.grace), planner


def main(argv: Sequence[str] | None = None) -> int:
    try:
        parsed = parse_args(argv)
        if parsed is None:
            return 0
        asyncio.run(serve(*parsed, Notifier.from_env()))
        return 0
    except errors.HyperbackError as e:
        print(f"hyperback-optimizer: {e}", file=sys.stderr)
        return e.exit_code


__all__ = [
    "DEFAULT_LISTEN", "SERVICE_NAME", "OptimizerClient", "OptimizerServer",
    "OptimizerServicer", "ServerConfig", "host_context", "main",
    "request_from_pb", "request_to_pb", "result_from_pb", "result_to_pb", "serve", "start_server",
]

if __name__ == "__main__":
    sys.exit(main())
