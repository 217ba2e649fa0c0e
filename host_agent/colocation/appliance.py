"""Backup appliances: media services that run in a VM, brought to the hosts whose VMs back up to them.

An appliance (``[appliances.NAME]`` in the inventory) is a live-migratable domain on shared storage
that runs ``hyperback-media`` on a predefined address.  Its NIC is *routed*: the guest holds the
address as a /32 behind the gateway 169.254.1.1, and the host that runs it puts that gateway on the
tap, routes the address to the tap and answers ARP for it on the LAN (:class:`ApplianceRoute`).
Every agent reconciles that route with what its own libvirt runs (:func:`reconcile`, on every
lifecycle event): the address is served by whichever host runs the appliance now, so clients never
learn that it moved, and a client on that host reaches it without touching the LAN.

Moving it (the ``colocate`` policy's APPLIANCE placement) is :class:`Porter`'s work:

* **hold**: the appliance carries ``<hba:hold holder='HOST' job='ID' queue='HOST HOST'/>`` (namespace
  :data:`HOLD_NS`) in its live metadata while a host uses it.  A host that wants it and finds it
  held appends itself to ``queue`` and waits for the appliance to arrive with itself as holder.
* **bring**: an unheld appliance is marked held by this host and live-migrated here.
* **send on**: when this host is done it hands the appliance to the first host of the queue (it
  becomes the holder, and the appliance migrates straight there) or, with nobody queued, sends it
  home and clears the hold there.  The holder of a moving appliance stays set, so hosts that ask
  meanwhile queue up instead of starting a second move.

The hold is read and written with libvirt's metadata calls, which do not compare-and-swap: a host
that queues itself in the instant the holder hands over may be missed.  It then waits out
``visit_timeout`` and streams over the LAN instead; no backup is lost, only the saving.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import libvirt  # type: ignore[import-untyped]

from host_agent import errors, hypervisor
from host_agent.colocation import migration
from host_agent.colocation.footprint import footprint
from host_agent.colocation.serviceip import ApplianceRoute
from host_agent.config import AgentConfig
from host_agent.errors import (
    ApplianceError,
    EnvironmentProblem,
    HypervisorError,
    NoDomain,
    ServiceAddressError,
)
from host_agent.inventory import Appliance, Inventory
from host_agent.model import VmFootprint

log = logging.getLogger(__name__)

HOLD_NS = "https://hyperback.dev/xmlns/appliance/1"
HOLD_PREFIX = "hba"
ARRIVAL_POLL = 1.0

Report = Callable[[str, int, int], Awaitable[None]]   # (message, bytes done, bytes total)
# what bringing or sending an appliance may fail with (a move, libvirt, netlink for its route): the
# plan's backups still run, and an agent starting up still starts
MOVE_FAILURES = (EnvironmentProblem, OSError)


@dataclass(frozen=True)
class Hold:
    holder: str
    job: str = ""
    queue: tuple[str, ...] = ()


@dataclass
class Visit:
    """What bringing an appliance here did: the moves this host made, and whether it came."""

    appliance: str
    here: bool = False
    came_from: str = ""
    moves: list[migration.MoveStats] = field(default_factory=list)
    why_not: str = ""

    @property
    def moved_bytes(self) -> int:
        return sum(m.bytes for m in self.moves)


# --------------------------------------------------------------------------- the hold

def read_hold(domain_xml: str) -> Hold | None:
    hold = ET.fromstring(domain_xml).find(f"./metadata/{{{HOLD_NS}}}hold")
    if hold is None or not hold.get("holder"):
        return None
    return Hold(hold.get("holder", ""), hold.get("job", ""), tuple(hold.get("queue", "").split()))


def write_hold(dom: Any, hold: Hold | None) -> None:
    dom = hypervisor.guard(dom)
    xml = None
    if hold is not None:
        xml = ET.tostring(ET.Element("hold", holder=hold.holder, job=hold.job, queue=" ".join(hold.queue)),
                          encoding="unicode")
    dom.setMetadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, xml, HOLD_PREFIX, HOLD_NS,
                    libvirt.VIR_DOMAIN_AFFECT_LIVE)


# --------------------------------------------------------------------------- where it runs

def uri_of(inventory: Inventory, host: str, local_uri: str) -> str:
    """The libvirt URI of ``host`` as this agent reaches it (its own daemon by the local URI)."""
    return local_uri if host == inventory.host_name else inventory.host(host).libvirt_uri


def locate(inventory: Inventory, local_uri: str, appliance: Appliance) -> str | None:
    """The host whose libvirt runs the appliance now (this host asked first), or None."""
    hosts = [inventory.host_name, *sorted(h for h in inventory.hosts if h != inventory.host_name)]
    for host in hosts:
        try:
            conn = hypervisor.connect(uri_of(inventory, host, local_uri))
        except HypervisorError as e:
            log.info("cannot ask %s for appliance %s: %s", host, appliance.name, e)
            continue
        try:
            if conn.lookupByName(appliance.domain).isActive():
                return host
        except HypervisorError:
            pass
        finally:
            conn.close()
    return None


def measure_at(inventory: Inventory, host: str, appliance: Appliance) -> VmFootprint:
    """The appliance's footprint on ``host``, through that host's libvirt (its guest RAM cannot be
    sampled from here); one that says it cannot move if it cannot be measured."""
    try:
        conn = hypervisor.connect(inventory.host(host).libvirt_uri)
        try:
            return footprint(conn.lookupByName(appliance.domain), inventory, sample=False)
        finally:
            conn.close()
    except HypervisorError as e:
        log.warning("cannot measure appliance %s on %s: %s", appliance.name, host, e)
        return VmFootprint("", 0, 0, 0.0, False, False, f"not measured on {host}: {e}")


# --------------------------------------------------------------------------- the route

def lan_device(lan_ip: str) -> str:
    """The interface that holds this host's LAN address (the one ARP for the appliance is answered on)."""
    from pyroute2 import IPRoute  # type: ignore[import-untyped]

    with IPRoute() as ipr:
        for addr in ipr.get_addr(address=lan_ip):
            return str(ipr.get_links(addr["index"])[0].get_attr("IFLA_IFNAME"))
    raise ApplianceError(f"no interface of this host holds its LAN address {lan_ip} "
                         "(inventory hosts.*.lan_ip)")


def route_for(inventory: Inventory, appliance: Appliance) -> ApplianceRoute:
    return ApplianceRoute(appliance.ip, appliance.tap, lan_device(inventory.this_host.lan_ip))


def reconcile(conn: Any, inventory: Inventory) -> None:
    """Serve each appliance's address from this host exactly while this host runs it."""
    conn = hypervisor.guard(conn)
    for appliance in inventory.appliances.values():
        try:
            running = bool(conn.lookupByName(appliance.domain).isActive())
        except HypervisorError:
            running = False
        try:
            route = route_for(inventory, appliance)
            if running and not route.held():
                route.claim()
            elif not running and route.held():
                route.release()
        except (ApplianceError, ServiceAddressError) as e:
            log.warning("appliance %s: %s", appliance.name, e)


# --------------------------------------------------------------------------- moving it

class Porter:
    """Brings appliances to this host for the length of a plan, then sends them on."""

    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.inventory = config.inventory

    @contextlib.asynccontextmanager
    async def here(self, appliance: Appliance, job: str, report: Report) -> AsyncIterator[Visit]:
        """The appliance runs on this host inside the block, if it could be brought (``Visit.here``);
        if not, the block runs anyway (its backups stream over the LAN) and ``why_not`` says why."""
        visit = Visit(appliance.name)
        try:
            await asyncio.to_thread(self._bring, appliance, job, visit)
            came = f" (from {visit.came_from}, {visit.moved_bytes} bytes)" if visit.moves else ""
            await report(f"appliance {appliance.name} is here{came}", 0, 0)
        except MOVE_FAILURES as e:
            visit.why_not = str(e)
            log.warning("appliance %s not brought here: %s", appliance.name, e)
            await report(f"appliance {appliance.name} stays where it is ({e}); streaming over the LAN", 0, 0)
        try:
            yield visit
        finally:
            if visit.here:
                try:
                    await asyncio.to_thread(self._send_on, appliance, visit)
                except NoDomain as e:
                    log.error("appliance %s was not there to send on (%s): it stopped or crashed; start it "
                              "again on its home host %s", appliance.name, e, appliance.home)
                except MOVE_FAILURES as e:
                    log.error("appliance %s stays on %s: %s", appliance.name, self.inventory.host_name, e)

    def recover(self) -> None:
        """At agent start: an appliance running here under this host's hold was left by an agent that
        died while using it; send it on as that agent would have."""
        for appliance in self.inventory.appliances.values():
            try:
                conn, dom = self._domain(self.inventory.host_name, appliance)
            except HypervisorError:
                continue
            try:
                hold = read_hold(dom.XMLDesc(0)) if dom.isActive() else None
            finally:
                conn.close()
            if hold is not None and hold.holder == self.inventory.host_name:
                log.warning("appliance %s was left here by a previous run; sending it on", appliance.name)
                try:
                    self._send_on(appliance, Visit(appliance.name, here=True))
                except MOVE_FAILURES as e:
                    log.error("appliance %s stays here: %s", appliance.name, e)

    # -- worker threads --

    def _uri(self, host: str) -> str:
        return uri_of(self.inventory, host, self.config.libvirt_uri)

    def _domain(self, host: str, appliance: Appliance) -> tuple[Any, Any]:
        conn = hypervisor.connect(self._uri(host))
        return conn, conn.lookupByName(appliance.domain)

    def _migrate(self, appliance: Appliance, src: str, dst: str) -> migration.MoveStats:
        # peer to peer: the *source* daemon dials the target, so the target needs its inventory URI
        target = self.inventory.host(dst)
        return migration.live_migrate(appliance.domain, self._uri(src), target.libvirt_uri,
                                      target.lan_ip, self.config.move_timeout,
                                      bandwidth_mib=self.config.move_bandwidth)

    def _bring(self, appliance: Appliance, job: str, visit: Visit) -> None:
        me = self.inventory.host_name
        deadline = time.monotonic() + self.config.visit_timeout
        while True:
            where = locate(self.inventory, self.config.libvirt_uri, appliance)
            if where is None:
                raise ApplianceError(f"appliance {appliance.name} ({appliance.domain}) runs on no host of "
                                     "the inventory: start it")
            conn, dom = self._domain(where, appliance)
            try:
                take = self._take_or_queue(dom, where, job)
            finally:
                conn.close()
            if take:
                break
            if time.monotonic() > deadline:
                wait = self.config.visit_timeout
                raise ApplianceError(f"appliance {appliance.name} did not come within {wait:.0f} s "
                                     "(visit_timeout): other hosts hold it")
            time.sleep(ARRIVAL_POLL)
        if where != me:
            visit.came_from = where
            try:
                visit.moves.append(self._migrate(appliance, where, me))
            except errors.MoveError:
                self._clear_hold(where, appliance)
                raise
        visit.here = True  # before the claim: if that fails, it must still be sent on afterwards
        route_for(self.inventory, appliance).claim()

    def _take_or_queue(self, dom: Any, where: str, job: str) -> bool:
        """Hold the appliance for this host if nobody else does (True), else be queued for it."""
        me = self.inventory.host_name
        hold = read_hold(dom.XMLDesc(0))
        if hold is not None and hold.holder != me:
            if me not in hold.queue:
                write_hold(dom, Hold(hold.holder, hold.job, (*hold.queue, me)))
                log.info("appliance %s is held by %s; queued for it", dom.name(), hold.holder)
            return False
        if hold is not None and where != me and dom.jobInfo()[0] != libvirt.VIR_DOMAIN_JOB_NONE:
            return False  # handed to this host and on its way here
        # free, handed over and arrived, or a hold of this host's that nobody acts on any more
        write_hold(dom, Hold(me, job, hold.queue if hold else ()))
        return True

    def _clear_hold(self, host: str, appliance: Appliance) -> None:
        with contextlib.suppress(HypervisorError):
            conn, dom = self._domain(host, appliance)
            try:
                write_hold(dom, None)
            finally:
                conn.close()

    def _send_on(self, appliance: Appliance, visit: Visit) -> None:
        """To the first host queued for it, else home (see :func:`next_stop`); a failed move clears
        the hold, so the appliance is not held by nobody forever."""
        me = self.inventory.host_name
        at = me
        while True:
            conn, dom = self._domain(at, appliance)
            try:
                hold, nxt = next_stop(read_hold(dom.XMLDesc(0)), at, appliance.home, self.inventory.hosts)
                write_hold(dom, hold)
            finally:
                conn.close()
            if nxt == at:
                break
            log.info("sending appliance %s from %s to %s", appliance.name, at, nxt)
            try:
                visit.moves.append(self._migrate(appliance, at, nxt))
            except errors.MoveError:
                self._clear_hold(at, appliance)
                raise
            if hold is not None and hold.holder == nxt:
                at = nxt
                break
            at = nxt
        if at != me:
            route_for(self.inventory, appliance).release()


def next_stop(hold: Hold | None, at: str, home: str, hosts: Iterable[str]) -> tuple[Hold | None, str]:
    """Where an appliance on ``at`` goes when its holder is done, and the hold it carries there.

    The first queued host (one of ``hosts``, not ``at``) becomes the holder and the rest stay queued.
    With nobody queued it goes home still held by its holder (hosts that ask meanwhile queue up),
    and at home the hold is cleared.  ``next == at``: it stays.
    """
    known = set(hosts)
    holder = hold.holder if hold is not None else ""
    queue = [h for h in (hold.queue if hold is not None else ()) if h != at and h in known]
    if queue:
        return Hold(queue[0], "", tuple(queue[1:])), queue[0]
    if at == home:
        return None, at
    return Hold(holder), home
