"""The host agent: the systemd service that serves every VM's backup requests.

Wiring, and nothing else: libvirt (``domains``) finds the running domains with the hyperback
channel and reports lifecycle events; the guests' door (``guests``) serves one channel per domain;
requests enter through ``intake``, are journaled and queued in the ``driver``; each batch is
planned by the optimizer over gRPC (``planner``) and carried out by the ``executor``, which answers
every instruction through the guests' door. Operators use the gRPC API in ``operator`` on the
agent's own socket. A request walks one way: channel -> intake -> driver -> planner -> executor ->
storage, and its answer leaves through one door (docs/architecture.md).

``python -m host_agent.agent.daemon`` runs it (``--help``); with ``--with-optimizer``
the agent also serves the optimizer, on its configured socket, in-process:
still a real gRPC hop, but one service to start.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from host_agent import errors, hypervisor
from host_agent.agent import overlays
from host_agent.agent.chains import ChainRecord
from host_agent.agent.checkpoint_record import CheckpointRecords
from host_agent.agent.destinations import Destinations
from host_agent.agent.domains import DomainInfo, Domains
from host_agent.agent.driver import BackupDriver
from host_agent.agent.executor import Executor
from host_agent.agent.guestrules import GuestRules
from host_agent.agent.guests import Guests
from host_agent.agent.instant import InstantJobs
from host_agent.agent.intake import Intake
from host_agent.agent.jobs import Jobs
from host_agent.agent.journal import Journal, Pending
from host_agent.agent.metrics import AgentMetrics
from host_agent.agent.operator import AgentParts, start_operator_server
from host_agent.agent.planner import BatchPlanner
from host_agent.agent.schedules import BootVerifying, Clock, Scheduler
from host_agent.agent.snapshot_disks import SnapshotDisks
from host_agent.colocation import appliance
from host_agent.colocation.appliance import Porter
from host_agent.colocation.migration import clear_visit
from host_agent.colocation.visits import Colocator
from host_agent.config import AgentConfig, load, source, summary
from host_agent.errors import HypervisorError
from host_agent.notify import Notifier
from host_agent.planning.chain import Planner, build_chain
from host_agent.planning.service import OptimizerClient, ServerConfig, start_server
from host_agent.storage import copier

log = logging.getLogger(__name__)

RESCAN_SECONDS = 30.0


class Agent:
    """The agent's parts, wired; follows the domains and runs the driver."""

    def __init__(self, config: AgentConfig, domains: Domains, optimizer: OptimizerClient,
                 clock: Clock | None = None) -> None:
        self.config = config
        self.domains = domains
        self.jobs = Jobs()
        self.journal = Journal(config.state_dir)
        self.destinations = Destinations(config)
        self.guests = Guests(self.jobs, self.journal, freeze_timeout=config.freeze_timeout,
                             requests_per_minute=config.limits.requests_per_minute)
        self.planner = BatchPlanner(config, domains, self.destinations, self.jobs, self.guests, optimizer)
        self.colocator = Colocator(config) if config.inventory.hosts else None
        self.porter = Porter(config) if config.inventory.appliances else None
        self.executor = Executor(self.destinations, domains, self.guests, self.jobs, config.restore_dir,
                                 self.colocator, self.porter, overlay_dir=config.overlay_dir,
                                 chains=ChainRecord(config.state_dir),
                                 records=CheckpointRecords(config.state_dir))
        self.driver = BackupDriver(self.planner.plan, self.executor.execute, self.guests.fail,
                                   config.interval, config.batch_size)
        self.snapshot_disks = SnapshotDisks(domains, self.destinations, config.run_dir,
                                            time_limit=config.see_time_limit,
                                            per_vm=config.limits.snapshot_disks_per_vm,
                                            tell=self.guests.tell)
        self.intake = Intake(config.limits, domains, self.destinations, self.jobs, self.journal, self.guests,
                             self.driver, self.snapshot_disks, GuestRules(config.guests, config.destinations))
        verifying = BootVerifying(config.verify_dir, config.boot_timeout, config.boot_checks)
        self.scheduler = Scheduler(config.schedules, config.default_destination, domains, self.intake,
                                   self.guests, self.jobs, self.destinations, config.state_dir, clock,
                                   verifying)
        self.instant = InstantJobs(self.jobs, self.destinations, config.libvirt_uri,
                                   config.run_dir / "instant")
        self.metrics = AgentMetrics(self.jobs, self.guests, self.driver, self.executor)
        self._background: set[asyncio.Task[None]] = set()  # referenced until done (asyncio keeps weak refs)
        self.serving = asyncio.Event()  # set once the first rescan served the running domains' channels

    @property
    def parts(self) -> AgentParts:
        """What the operator API sees of the agent."""
        return AgentParts(self.domains, self.guests, self.destinations, self.intake, self.jobs,
                          self.scheduler, self.instant)

    # ---------- following the domains ----------

    def serve_domain(self, info: DomainInfo) -> None:
        if info.visiting_from and info.visiting_from != self.config.inventory.host_name:
            # its guest waits for the job's answer from its own host: leave the channel alone
            log.info("domain %s is visiting from %s: not serving its channel", info.name, info.visiting_from)
            return
        self.guests.serve(info, self.intake)

    async def rescan(self) -> None:
        """Serve the channels of the running domains that have one, forget the others.  The listing
        runs in a worker thread: libvirt blocks calls on a domain while a migration job holds it
        (an incoming VM for the whole migration), and the loop must keep serving meanwhile."""
        try:
            served = await asyncio.to_thread(self.domains.served)
        except HypervisorError as e:
            log.warning("cannot list domains: %s", e)
            return
        alive = {d.uuid for d in served}
        for uuid in self.guests.served() - alive:
            self.guests.forget(uuid)
        for uuid in self.snapshot_disks.domains_seeing() - alive:  # a stop no event reported
            await self.snapshot_disks.domain_gone(uuid)
        for info in served:
            self.serve_domain(info)

    def on_domain_event(self, uuid: str, kind: str) -> None:
        log.info("domain %s %s", uuid, kind)
        self.reconcile_appliances()
        if kind == "started":
            task = asyncio.get_running_loop().create_task(self.rescan(), name="rescan-on-start")
            self._background.add(task)
            task.add_done_callback(self._background.discard)
        else:
            self.guests.forget(uuid)
            self._in_background(self.snapshot_disks.domain_gone(uuid), "snapshot-disks-gone")

    def _in_background(self, coro: Any, name: str) -> None:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def reconcile_appliances(self) -> None:
        """Serve each appliance's address from this host exactly while it runs here (in a worker
        thread: libvirt lookups and netlink calls)."""
        if self.config.inventory.appliances:
            asyncio.get_running_loop().run_in_executor(None, appliance.reconcile, self.domains.conn,
                                                       self.config.inventory)

    # ---------- running ----------

    async def run(self) -> None:
        pending = self.journal.pending()
        for entry in pending:
            log.info("re-queueing instruction %s from the journal", entry.instruction.id)
            self.jobs.add(entry.instruction, entry.origin, entry.domain_name or entry.instruction.domain_uuid,
                          entry.schedule)
        self.domains.watch(self.on_domain_event)
        self._clear_stale_visits()
        for line in await asyncio.to_thread(self.snapshot_disks.recover):
            log.warning("left by the previous run: %s", line)
        # before any view: a domain still on a dead view's overlay would refuse a new one
        await asyncio.to_thread(overlays.recover_all, self.domains.conn)
        recovery = asyncio.create_task(self._recover_visits(pending), name="recover-visits")
        if self.porter is not None:
            await asyncio.to_thread(self.porter.recover)
        self.reconcile_appliances()
        await self.rescan()
        self.serving.set()
        rescans = asyncio.create_task(self._rescan_every(RESCAN_SECONDS), name="rescan")
        schedules = asyncio.create_task(self.scheduler.run(), name="schedules")
        try:
            await self.driver.run()
        finally:
            schedules.cancel()
            rescans.cancel()
            recovery.cancel()
            await self.snapshot_disks.close()

    async def _recover_visits(self, pending: Sequence[Pending]) -> None:
        """VMs this host sent on visits its previous run did not finish come home, then the journal's
        unanswered instructions run again (in the background: the agent serves meanwhile).  In that
        order: an instruction whose visit was cut short would otherwise find its VM away."""
        if self.colocator is not None:
            for line in await self.colocator.recover():
                log.warning("recovered visit: %s", line)
        for entry in pending:
            self.driver.submit(entry.instruction)

    async def _rescan_every(self, seconds: float) -> None:
        """Catch what no lifecycle event reports, e.g. a visit marker cleared by the VM's home host."""
        while True:
            await asyncio.sleep(seconds)
            await self.rescan()
            self.reconcile_appliances()

    def _clear_stale_visits(self) -> None:
        """A VM this host marked for a visit, found here at start: the visit died with the agent."""
        for info in self.domains.served():
            if info.visiting_from and info.visiting_from == self.config.inventory.host_name:
                log.warning("clearing the visit marker %s kept from before this agent started", info.name)
                clear_visit(self.domains.domain(info.uuid))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hyperback-agent",
        description="Serve backup requests from every VM's hyperback channel on this host.",
        epilog="Exit codes: 0 stopped by SIGTERM/SIGINT, 1 unexpected error, 2 bad arguments or "
               "configuration, 3 the system refused (libvirtd not running, a socket in use); "
               "docs/exit-codes.md")
    parser.add_argument("--config", type=Path, default=None,
                        help="TOML config file (default /etc/hyperback/agent.toml; absent is fine)")
    parser.add_argument("--check-config", action="store_true",
                        help="check the configuration (every key and its type), print one line saying "
                             "what it sets up and exit: 0 if it is valid, 2 naming the file and the bad key")
    parser.add_argument("--with-optimizer", action="store_true",
                        help="also serve the optimizer, on the configured socket, in this process")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="log more (-vv for debug)")
    return parser


async def serve(config: AgentConfig, with_optimizer: bool, stop: asyncio.Event,
                started: Callable[[Agent], None] | None = None, clock: Clock | None = None,
                notifier: Notifier | None = None) -> None:
    """Run the agent (and, if asked, the optimizer) until ``stop`` is set.  ``notifier`` tells
    systemd: READY once the operator API listens and the first rescan served the running domains,
    watchdog pings from this loop meanwhile, STOPPING when ``stop`` is set."""
    notifier = notifier or Notifier()
    pings = asyncio.create_task(notifier.keep_alive(), name="watchdog")
    try:
        await _serve(config, with_optimizer, stop, started, clock, notifier)
    finally:
        pings.cancel()
        notifier.close()


async def _serve(config: AgentConfig, with_optimizer: bool, stop: asyncio.Event,
                 started: Callable[[Agent], None] | None, clock: Clock | None, notifier: Notifier) -> None:
    notifier.status("starting: native self-test, libvirt, sockets")
    copier.selftest()  # a broken native build must stop the service, not corrupt backups
    hypervisor.register_event_loop()
    config.run_dir.mkdir(parents=True, exist_ok=True)
    # Whatever started is stopped in reverse order, also when a later step fails (a taken port):
    # a gRPC server left to the garbage collector after the loop closed prints a traceback.
    async with contextlib.AsyncExitStack() as started_parts:
        if with_optimizer:
            planner = Planner(build_chain(config.policies, config.policy_options))
            opt_server = await start_server(ServerConfig(listen=config.optimizer, tls=config.tls),
                                            planner)
            started_parts.push_async_callback(opt_server.stop, 2.0)
        domains = Domains(config.libvirt_uri)
        started_parts.callback(domains.close)
        client = OptimizerClient(config.optimizer, timeout=config.optimizer_timeout, tls=config.tls)
        started_parts.push_async_callback(client.close)
        agent = Agent(config, domains, client, clock)
        if config.metrics_listen:
            agent.metrics.serve(config.metrics_listen)
            started_parts.callback(agent.metrics.close)
        started_parts.push_async_callback(agent.instant.close)
        op_server = await start_operator_server(agent.parts, config.operator_listen, config.tls)
        started_parts.push_async_callback(op_server.stop, 2.0)
        runner = asyncio.create_task(agent.run())
        if started is not None:
            started(agent)
        await _ready(agent, runner, stop, notifier)
        await stop.wait()
        log.info("stopping")
        notifier.stopping()
        runner.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await runner


async def _ready(agent: Agent, runner: asyncio.Task[None], stop: asyncio.Event, notifier: Notifier) -> None:
    """Tell systemd the agent serves once its first rescan is done (not if it stopped before)."""
    serving = asyncio.create_task(agent.serving.wait())
    stopped = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait((serving, stopped, runner), return_when=asyncio.FIRST_COMPLETED)
    finally:
        serving.cancel()
        stopped.cancel()
    if agent.serving.is_set() and not stop.is_set():
        served = len(agent.guests.served())
        log.info("serving %d domain(s) on %s", served, agent.config.operator_listen)
        metrics = f"; metrics on http://{agent.metrics.address}/metrics" if agent.metrics.address else ""
        notifier.ready(f"serving {served} domain(s); operator API on {agent.config.operator_listen}{metrics}")


@contextmanager
def agent_in_thread(config: AgentConfig,
                    clock: Clock | None = None) -> Iterator[tuple[Agent, asyncio.AbstractEventLoop]]:
    """The agent, with the optimizer, running on its own event loop in a thread (its schedules on
    ``clock``, the wall clock if None)."""
    loop = asyncio.new_event_loop()
    started = threading.Event()
    holder: dict[str, Any] = {}

    async def main() -> None:
        stop = asyncio.Event()
        holder["stop"] = stop

        def ready(agent: Agent) -> None:
            holder["agent"] = agent
            started.set()

        try:
            await serve(config, True, stop, ready, clock)
        except BaseException as e:
            holder["error"] = e
            started.set()
            raise

    thread = threading.Thread(target=lambda: loop.run_until_complete(main()), name="agent", daemon=True)
    thread.start()
    if not started.wait(60) or "error" in holder:
        raise errors.EnvironmentProblem(f"the agent did not start: {holder.get('error')}")
    try:
        yield holder["agent"], loop
    finally:
        loop.call_soon_threadsafe(holder["stop"].set)
        thread.join(30)


async def amain(config: AgentConfig, with_optimizer: bool) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await serve(config, with_optimizer, stop, notifier=Notifier.from_env())


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING - 10 * min(args.verbose, 2), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = load(args.config)
        if args.check_config:
            path = source(args.config)
            try:
                build_chain(config.policies, config.policy_options)  # the policies named are installed
            except errors.OptimizerConfigError as e:
                raise errors.UsageError(f"config {path}: policies: {e}") from e
            print(f"hyperback-agent: config {path if path.exists() else f'{path} (absent: defaults)'} "
                  f"is valid: {summary(config)}")
            return 0
        asyncio.run(amain(config, args.with_optimizer))
    except errors.HyperbackError as e:
        print(f"hyperback-agent: error: {e}", file=sys.stderr)
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
