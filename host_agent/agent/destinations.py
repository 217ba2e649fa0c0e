"""Destinations: the names guests and operators back up to, and the repository behind each name.

A destination is a repository on this host's backup media, or media on another host reached
through its media service (``host_agent.media.client``). Guests and operators only ever name
destinations; they never see a path. A destination whose repository is not there is an error that
names it: only ``hyperback init`` creates repositories, so a backup never lands in a fresh, empty
repository on the root file system because the disk that should hold it is not mounted.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence

from host_agent import errors
from host_agent.config import AgentConfig
from host_agent.media.client import RemoteRepository
from host_agent.model import DiskRef
from host_agent.storage.keys import Secret, read_passphrase_file
from host_agent.storage.repository import Repository

log = logging.getLogger(__name__)

AnyRepository = Repository | RemoteRepository
"""A destination on this host, or on another host's media reached through its media service."""


class Destinations:
    """The configured destinations, each opened once, on first use."""

    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self._open: dict[str, AnyRepository] = {}

    @property
    def names(self) -> frozenset[str]:
        return self.config.destinations

    def named(self, asked: str | None) -> str:
        """The destination a request names: the default one when it names none."""
        return asked or self.config.default_destination

    def is_local(self, destination: str) -> bool:
        """Its media are on this host (its repository is opened here, not through a media service)."""
        media = self.config.media(destination)
        return media is None or media.host == self.config.inventory.host_name

    def repository(self, destination: str) -> AnyRepository:
        """The destination's repository: opened here, or reached through its media service when the
        media sit on another host. Blocking (it may reach another host): call it from a thread."""
        if destination not in self._open:
            media = self.config.media(destination)
            if media is not None and not self.is_local(destination):
                self._open[destination] = self._remote(destination, media.service, media.appliance)
            else:
                self._open[destination] = self._local(destination)
        return self._open[destination]

    def _local(self, destination: str) -> Repository:
        path = self.config.repository(destination)
        try:
            return Repository.open(path, self._secret(destination))
        except errors.NotARepository as e:
            raise errors.NotARepository(f"destination {destination!r}: {e}") from e

    def _secret(self, destination: str) -> Secret | None:
        """What unlocks an encrypted destination, local or through media: the file [passphrase_files]
        names, else (None) the environment's."""
        passphrase = self.config.passphrase_files.get(destination)
        return Secret(passphrase=read_passphrase_file(passphrase)) if passphrase else None

    def _remote(self, destination: str, service: str, appliance: str) -> RemoteRepository:
        remote = RemoteRepository(service, destination, tls=self.config.tls, secret=self._secret(destination))
        if remote.host_name not in (*self.config.inventory.hosts, appliance):
            remote.close()
            # the service may move between the cluster's hosts, never outside it: a stranger
            # answering at its address is a misconfiguration that must not get backups (this
            # is a sanity check; with [tls] the service's certificate authenticates it)
            raise errors.EnvironmentProblem(
                f"the media service at {service} says it runs on {remote.host_name!r}, which "
                f"is not a host of the inventory; refusing to send backups there")
        return remote

    def held(self, destination: str, disks: Sequence[DiskRef]) -> dict[tuple[str, str], int]:
        """The stored size of the destination's latest snapshot of each disk (none if unreachable:
        the colocate policy then prices a full copy)."""
        held = {}
        try:
            repo = self.repository(destination)
            for disk in disks:
                latest = repo.snapshots(disk.snapshot_name)
                if latest:
                    held[(destination, disk.snapshot_name)] = latest[-1].stats.bytes_stored
        except (errors.HyperbackError, OSError) as e:
            log.warning("cannot ask %s what it holds: %s", destination, e)
        return held

