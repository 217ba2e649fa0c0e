"""A service's predefined IP address, kept on whichever host serves it now.

Clients of a service (the media service a backup streams to) know one address.  When the service
moves to another host, the host it leaves releases the address and the host that takes over claims
it, so clients never learn that it moved::

    addr = ServiceAddress("10.77.0.100", 24, "lan1")
    addr.claim()      # this host answers for 10.77.0.100 from now on
    ...
    addr.release()    # and no longer does

Both calls act on the network namespace of the calling process and are idempotent: a claim of an
address the interface already has, or a release of one it does not have, does nothing.  Release
before claim on the other host: two hosts holding one address answer ARP for it in turn.

On claim the host broadcasts gratuitous ARP replies, so neighbours that cached the address under the
previous holder's MAC learn the new one at once instead of after their cache times out.

A service that runs in a VM of its own (an *appliance*, live-migrated between hosts) does not put
its address on a host's interface: the VM owns it.  ``ApplianceRoute`` makes the host that runs the
VM route the address to the VM's NIC, and answer ARP for it on the LAN::

    route = ApplianceRoute("10.77.0.200", tap="hbapp0", lan_dev="lan1")
    route.claim()     # after the VM arrived: LAN -> lan1 -> (forwarded) -> hbapp0 -> the VM
    ...
    route.release()   # after the VM left (its tap may be gone already)

The VM holds ``ip``/32 and routes everything via ``APPLIANCE_GATEWAY`` (169.254.1.1), which every
host puts on the VM's tap: the VM's configuration does not change when it moves, and since the tap's
MAC is derived from the VM's (libvirt: first byte 0xfe) its neighbour cache stays right too.  Only
IPv4 (proxy ARP).
"""
from __future__ import annotations

import errno
import ipaddress
import logging
import socket
import struct
from dataclasses import dataclass
from typing import Any

from host_agent.errors import ServiceAddressError

log = logging.getLogger(__name__)

__all__ = ["APPLIANCE_GATEWAY", "ApplianceRoute", "ServiceAddress"]

_ETH_P_ARP = 0x0806
_GRATUITOUS_ARPS = 3
_NTF_PROXY = 0x08  # linux/neighbour.h: a proxy entry ("ip neigh add proxy IP dev IF")
APPLIANCE_GATEWAY = "169.254.1.1"  # on the appliance VM's tap, on every host


def _pyroute2() -> Any:
    import pyroute2  # type: ignore[import-untyped]

    return pyroute2


@dataclass(frozen=True)
class ServiceAddress:
    """``ip``/``prefixlen`` on interface ``ifname`` of the calling process's network namespace."""

    ip: str
    prefixlen: int
    ifname: str

    def __post_init__(self) -> None:
        try:
            addr = ipaddress.ip_address(self.ip)
        except ValueError as e:
            raise ServiceAddressError(f"service address {self.ip!r} is not an IP address") from e
        if not 0 < self.prefixlen <= addr.max_prefixlen:
            raise ServiceAddressError(f"prefix length {self.prefixlen} does not fit {self.ip}")

    @classmethod
    def parse(cls, cidr: str, ifname: str) -> ServiceAddress:
        """``"10.77.0.100/24"`` on ``ifname``; a bare address gets the full prefix (/32, /128)."""
        ip, _, prefix = cidr.partition("/")
        try:
            prefixlen = int(prefix) if prefix else ipaddress.ip_address(ip).max_prefixlen
        except ValueError as e:
            raise ServiceAddressError(f"{cidr!r} is not ADDRESS[/PREFIX]") from e
        return cls(ip, prefixlen, ifname)

    def __str__(self) -> str:
        return f"{self.ip}/{self.prefixlen} on {self.ifname}"

    def _index(self, ipr: Any) -> int:
        found = ipr.link_lookup(ifname=self.ifname)
        if not found:
            raise ServiceAddressError(f"no interface {self.ifname!r} on this host for service address "
                                      f"{self.ip}")
        return int(found[0])

    def held(self) -> bool:
        """True if the interface carries the address now."""
        pyroute2 = _pyroute2()
        with pyroute2.IPRoute() as ipr:
            index = self._index(ipr)
            return any(a.get_attr("IFA_ADDRESS") == self.ip for a in ipr.get_addr(index=index))

    def claim(self) -> None:
        """Put the address on the interface and announce it."""
        pyroute2 = _pyroute2()
        with pyroute2.IPRoute() as ipr:
            index = self._index(ipr)
            try:
                ipr.addr("add", index=index, address=self.ip, prefixlen=self.prefixlen)
            except pyroute2.NetlinkError as e:
                if e.code != errno.EEXIST:
                    raise ServiceAddressError(f"cannot add {self}: {e}") from e
        log.info("claimed service address %s", self)
        _announce(self.ip, self.ifname)

    def release(self) -> None:
        """Take the address off the interface (nothing happens if it is not there)."""
        pyroute2 = _pyroute2()
        with pyroute2.IPRoute() as ipr:
            index = self._index(ipr)
            try:
                ipr.addr("del", index=index, address=self.ip, prefixlen=self.prefixlen)
            except pyroute2.NetlinkError as e:
                if e.code not in (errno.EADDRNOTAVAIL, errno.ENOENT, errno.ESRCH):
                    raise ServiceAddressError(f"cannot remove {self}: {e}") from e
        log.info("released service address %s", self)


def _link_index(ipr: Any, ifname: str) -> int | None:
    found = ipr.link_lookup(ifname=ifname)
    return int(found[0]) if found else None


def _set_forwarding(ifname: str) -> None:
    """IPv4 forwarding on ``ifname`` alone (not the host-wide ip_forward)."""
    path = f"/proc/sys/net/ipv4/conf/{ifname}/forwarding"
    try:
        with open(path, "w") as f:
            f.write("1")
    except OSError as e:
        raise ServiceAddressError(f"cannot enable forwarding on {ifname} ({path}): {e}") from e


@dataclass(frozen=True)
class ApplianceRoute:
    """``ip``/32, held by the appliance VM whose NIC is ``tap`` on this host, routed there from
    ``lan_dev`` (see the module docstring).  Acts on the calling process's network namespace."""

    ip: str
    tap: str
    lan_dev: str

    def __post_init__(self) -> None:
        try:
            addr = ipaddress.ip_address(self.ip)
        except ValueError as e:
            raise ServiceAddressError(f"appliance address {self.ip!r} is not an IP address") from e
        if addr.version != 4:
            raise ServiceAddressError(f"appliance address {self.ip}: only IPv4 is supported (proxy ARP)")

    def __str__(self) -> str:
        return f"{self.ip} via {self.tap}, proxied on {self.lan_dev}"

    def _require(self, ipr: Any, ifname: str, what: str) -> int:
        index = _link_index(ipr, ifname)
        if index is None:
            raise ServiceAddressError(f"no interface {ifname!r} on this host for appliance address {self.ip} "
                                      f"({what})")
        return index

    def held(self) -> bool:
        """True if this host routes ``ip`` to the tap and answers ARP for it on the LAN."""
        pyroute2 = _pyroute2()
        with pyroute2.IPRoute() as ipr:
            tap, lan = _link_index(ipr, self.tap), _link_index(ipr, self.lan_dev)
            if tap is None or lan is None:
                return False
            routed = any(r["dst_len"] == 32 and r.get_attr("RTA_DST") == self.ip
                         and r.get_attr("RTA_OIF") == tap for r in ipr.get_routes(family=socket.AF_INET))
            try:  # a proxy entry is found by a get with NTF_PROXY (a dump lists the cache only)
                ipr.neigh("get", dst=self.ip, ifindex=lan, flags=_NTF_PROXY)
            except pyroute2.NetlinkError as e:
                if e.code == errno.ENOENT:
                    return False
                raise ServiceAddressError(f"cannot look up the proxy entry of {self}: {e}") from e
            return routed

    def claim(self) -> None:
        """Route ``ip`` to the tap (the gateway address on it, the tap up), forward between the tap
        and the LAN interface, answer ARP for ``ip`` on the LAN, and announce it there.  Raises
        ServiceAddressError if the tap does not exist here (the VM does not run on this host)."""
        pyroute2 = _pyroute2()
        with pyroute2.IPRoute() as ipr:
            tap = self._require(ipr, self.tap, "the appliance VM's tap: does the VM run on this host?")
            lan = self._require(ipr, self.lan_dev, "the LAN interface")
            try:
                ipr.link("set", index=tap, state="up")
                try:
                    ipr.addr("add", index=tap, address=APPLIANCE_GATEWAY, prefixlen=32)
                except pyroute2.NetlinkError as e:
                    if e.code != errno.EEXIST:
                        raise
                ipr.route("replace", dst=self.ip, dst_len=32, oif=tap)
                try:
                    ipr.neigh("add", dst=self.ip, ifindex=lan, flags=_NTF_PROXY)
                except pyroute2.NetlinkError as e:
                    if e.code != errno.EEXIST:
                        raise
            except pyroute2.NetlinkError as e:
                raise ServiceAddressError(f"cannot claim appliance address {self}: {e}") from e
        _set_forwarding(self.tap)
        _set_forwarding(self.lan_dev)
        log.info("claimed appliance address %s", self)
        _announce(self.ip, self.lan_dev)

    def release(self) -> None:
        """Remove the route, the gateway address and the proxy entry; whatever is already gone
        (the tap goes with the VM when it migrates away) is skipped."""
        pyroute2 = _pyroute2()
        gone = (errno.ENOENT, errno.ESRCH, errno.EADDRNOTAVAIL, errno.ENODEV)
        with pyroute2.IPRoute() as ipr:
            tap, lan = _link_index(ipr, self.tap), _link_index(ipr, self.lan_dev)
            steps: list[tuple[str, Any]] = []
            if tap is not None:
                steps.append(("route", lambda: ipr.route("del", dst=self.ip, dst_len=32, oif=tap)))
                steps.append(("gateway address", lambda: ipr.addr("del", index=tap, address=APPLIANCE_GATEWAY,
                                                                  prefixlen=32)))
            if lan is not None:
                steps.append(("proxy entry", lambda: ipr.neigh("del", dst=self.ip, ifindex=lan,
                                                               flags=_NTF_PROXY)))
            for what, step in steps:
                try:
                    step()
                except pyroute2.NetlinkError as e:
                    if e.code not in gone:
                        raise ServiceAddressError(f"cannot remove the {what} of appliance address {self}: "
                                                  f"{e}") from e
        log.info("released appliance address %s", self)


def _announce(ip: str, ifname: str) -> None:
    """Gratuitous ARP for ``ip`` from ``ifname``'s MAC (IPv4 only; IPv6 neighbours re-resolve
    through unsolicited NA, left to the kernel).  Best effort: a failure costs clients one
    neighbour-cache timeout, not the move."""
    if ipaddress.ip_address(ip).version != 4:
        return
    try:
        with socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(_ETH_P_ARP)) as s:
            s.bind((ifname, 0))
            mac = s.getsockname()[4]
            if len(mac) != 6:
                return  # not an Ethernet interface
            frame = _gratuitous_arp(mac, socket.inet_aton(ip))
            for _ in range(_GRATUITOUS_ARPS):
                s.send(frame)
    except OSError as e:
        log.warning("gratuitous ARP for %s on %s failed: %s", ip, ifname, e)


def _gratuitous_arp(mac: bytes, ip: bytes) -> bytes:
    broadcast = b"\xff" * 6
    ethernet = broadcast + mac + struct.pack("!H", _ETH_P_ARP)
    # htype Ethernet, ptype IPv4, hlen 6, plen 4, op 2 (reply); sender = target = the address
    arp = struct.pack("!HHBBH", 1, 0x0800, 6, 4, 2) + mac + ip + broadcast + ip
    return ethernet + arp
