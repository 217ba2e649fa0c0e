"""The hosts a host agent works with, and the backup media attached to them.

Every agent of a cluster reads the same inventory (the ``[hosts.*]``, ``[media.*]`` and
``shared_storage`` parts of its config file, see ``docs/agent.md``); only ``host_name`` says which
host it is.  A single host needs none of it: without an inventory every destination is a local
repository and no VM is ever moved.

* A **host** is a hypervisor: the libvirt URI its peers migrate to, the gRPC address of its agent's
  operator API, and the LAN address migration streams arrive on.
* A **media** entry is a destination served by a media service (``hyperback-media``) on one host:
  that host's agent writes the repository directly (``path``); every other host streams to the
  service's predefined address (``service``), or moves the VM there (the ``colocate`` policy).
* An **appliance** is a backup appliance VM: a domain (on shared storage, live-migratable) that runs
  the media service itself, on a predefined address that moves with it (its NIC is routed through a
  tap on whichever host runs it: ``host_agent.colocation.appliance``).  A media entry served by an appliance
  names it instead of a host, a service and a path; its host is wherever the appliance runs now, and
  the ``colocate`` policy may bring the appliance to the VMs instead of the VMs to it.
* **Shared storage** lists the directories every host sees in common: a VM whose disks all lie in
  them can run on any host, so it may be moved.
"""
from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from host_agent import errors

NAME = re.compile(r"[a-z0-9][a-z0-9_.-]{0,62}")


@dataclass(frozen=True)
class Host:
    name: str
    libvirt_uri: str      # as the other hosts' libvirt daemons reach this one (peer-to-peer migration)
    agent: str            # gRPC target of this host's agent operator API, e.g. "10.0.0.2:7411"
    lan_ip: str           # migration streams to this host arrive on this address


@dataclass(frozen=True)
class Appliance:
    name: str
    domain: str           # its libvirt domain name, the same on every host
    home: str             # the host it returns to when no other host is queued for it
    service: str          # its media service's predefined address, "IP:PORT" (IPv4)
    tap: str              # the host side of its NIC (the domain's <interface><target dev>)

    @property
    def ip(self) -> str:
        return self.service.rpartition(":")[0]


@dataclass(frozen=True)
class Media:
    name: str             # the destination name guests and operators use
    host: str             # the host whose backup media hold the repository ("" if an appliance serves it)
    service: str          # the media service's predefined address, "IP:PORT"
    path: Path | None     # the repository directory, as the media host sees it (None: inside the appliance)
    appliance: str = ""   # the appliance that serves it, if one does


@dataclass(frozen=True)
class Inventory:
    host_name: str = ""                                  # this host; "" = a single host
    hosts: Mapping[str, Host] = field(default_factory=dict)
    media: Mapping[str, Media] = field(default_factory=dict)
    shared_storage: tuple[Path, ...] = ()
    appliances: Mapping[str, Appliance] = field(default_factory=dict)

    def host(self, name: str) -> Host:
        try:
            return self.hosts[name]
        except KeyError:
            raise errors.UsageError(f"host {name!r} is not in the inventory (known: "
                                    f"{', '.join(sorted(self.hosts)) or 'none'})") from None

    @property
    def this_host(self) -> Host:
        return self.host(self.host_name)

    def is_remote(self, destination: str) -> bool:
        """True if ``destination`` is media attached to another host than this one (an appliance's
        media are where the appliance runs: ask ``host_agent.colocation.appliance``)."""
        media = self.media.get(destination)
        return media is not None and not media.appliance and media.host != self.host_name

    def remote_destinations(self) -> dict[str, str]:
        """Destination -> the host of its media, for every destination attached to another host."""
        return {name: m.host for name, m in self.media.items()
                if not m.appliance and m.host != self.host_name}

    def appliance_of(self, destination: str) -> Appliance | None:
        media = self.media.get(destination)
        return self.appliances[media.appliance] if media is not None and media.appliance else None

    def shared(self, path: str) -> bool:
        """True if ``path`` lies inside a shared storage directory once symlinks are resolved, so a
        link from shared storage to a host's local disk does not count as shared."""
        normal = os.path.realpath(path)
        return any(normal == str(root) or normal.startswith(str(root).rstrip("/") + "/")
                   for root in self.shared_storage)


def _table(doc: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = doc.get(key, {})
    if not isinstance(value, dict) or not all(isinstance(v, dict) for v in value.values()):
        raise errors.UsageError(f"config {key} must be a table of tables, e.g. [{key}.NAME]")
    for name in value:
        if not NAME.fullmatch(name):
            raise errors.UsageError(f"config {key}.{name}: names must match {NAME.pattern}")
    return value


def _fields(where: str, table: Mapping[str, Any], required: Iterable[str]) -> dict[str, str]:
    required = tuple(required)
    unknown = set(table) - set(required)
    if unknown:
        raise errors.UsageError(f"config {where}: unknown setting(s) {', '.join(sorted(unknown))} "
                                f"(settings: {', '.join(required)})")
    wrong = [k for k in required if k in table and not isinstance(table[k], str)]
    if wrong:
        raise errors.UsageError(f"config {where}.{wrong[0]}: expected a string, got {table[wrong[0]]!r}")
    missing = [k for k in required if not str(table.get(k, "")).strip()]
    if missing:
        raise errors.UsageError(f"config {where}: missing {', '.join(missing)}")
    return {k: str(table[k]) for k in required}


def _service(where: str, value: str) -> str:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise errors.UsageError(f"config {where}: service {value!r} is not IP:PORT")
    return value


def parse(doc: Mapping[str, Any], host_name: str) -> Inventory:
    """The inventory from a config document's ``hosts``, ``media``, ``appliances`` and ``shared_storage``."""
    hosts = {name: Host(name, **_fields(f"hosts.{name}", t, ("libvirt_uri", "agent", "lan_ip")))
             for name, t in _table(doc, "hosts").items()}
    appliances = {}
    for name, t in _table(doc, "appliances").items():
        f = _fields(f"appliances.{name}", t, ("domain", "home", "service", "tap"))
        if f["home"] not in hosts:
            raise errors.UsageError(f"config appliances.{name}: home {f['home']!r} is not in [hosts]")
        service = _service(f"appliances.{name}", f["service"])
        appliances[name] = Appliance(name, f["domain"], f["home"], service, f["tap"])
    media = {name: _media(name, t, hosts, appliances) for name, t in _table(doc, "media").items()}
    shared = doc.get("shared_storage", [])
    if not isinstance(shared, list) or not all(isinstance(p, str) and p.startswith("/") for p in shared):
        raise errors.UsageError("config shared_storage must be a list of absolute paths")
    if (hosts or media) and host_name not in hosts:
        raise errors.UsageError(f"config host_name {host_name!r} is not in [hosts] (known: "
                                f"{', '.join(sorted(hosts)) or 'none'}); set host_name to this host's entry")
    return Inventory(host_name, hosts, media, tuple(Path(os.path.realpath(p)) for p in shared), appliances)


def _media(name: str, table: Mapping[str, Any], hosts: Mapping[str, Host],
           appliances: Mapping[str, Appliance]) -> Media:
    if "appliance" in table:
        appliance = _fields(f"media.{name}", table, ("appliance",))["appliance"]
        if appliance not in appliances:
            raise errors.UsageError(f"config media.{name}: appliance {appliance!r} is not in [appliances]")
        return Media(name, "", appliances[appliance].service, None, appliance)
    f = _fields(f"media.{name}", table, ("host", "service", "path"))
    if f["host"] not in hosts:
        raise errors.UsageError(f"config media.{name}: host {f['host']!r} is not in [hosts]")
    return Media(name, f["host"], _service(f"media.{name}", f["service"]), Path(f["path"]))
