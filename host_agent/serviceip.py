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
"""
from __future__ import annotations

import errno
import ipaddress
import logging
import socket
import struct
from dataclasses import dataclass
from typing import Any

from host_agent.errors import EnvironmentProblem

log = logging.getLogger(__name__)

__all__ = ["ServiceAddress", "ServiceAddressError"]

_ETH_P_ARP = 0x0806
_GRATUITOUS_ARPS = 3


class ServiceAddressError(EnvironmentProblem):
    """The service address could not be claimed or released (no such interface, no permission)."""


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
        self._announce()

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

    def _announce(self) -> None:
        """Gratuitous ARP (IPv4 only; IPv6 neighbours re-resolve through unsolicited NA, left to the
        kernel).  Best effort: a failure costs clients one neighbour-cache timeout, not the move."""
        if ipaddress.ip_address(self.ip).version != 4:
            return
        try:
            with socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(_ETH_P_ARP)) as s:
                s.bind((self.ifname, 0))
                mac = s.getsockname()[4]
                if len(mac) != 6:
                    return  # not an Ethernet interface
                frame = _gratuitous_arp(mac, socket.inet_aton(self.ip))
                for _ in range(_GRATUITOUS_ARPS):
                    s.send(frame)
        except OSError as e:
            log.warning("gratuitous ARP for %s failed: %s", self, e)


def _gratuitous_arp(mac: bytes, ip: bytes) -> bytes:
    broadcast = b"\xff" * 6
    ethernet = broadcast + mac + struct.pack("!H", _ETH_P_ARP)
    # htype Ethernet, ptype IPv4, hlen 6, plen 4, op 2 (reply); sender = target = the address
    arp = struct.pack("!HHBBH", 1, 0x0800, 6, 4, 2) + mac + ip + broadcast + ip
    return ethernet + arp
