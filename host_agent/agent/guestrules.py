"""What a guest may use: the destinations its domain may name, and what it may keep in each.

The ``[[guests]]`` tables of the configuration (:class:`~host_agent.config.GuestRule`) are read
here, for a guest's own requests only: operators and schedules are trusted and not limited.

* **Destinations.** A domain covered by rules that name destinations may use those (every such
  rule's together); a domain no such rule covers may use every destination, as before the setting
  existed. A destination a guest may not use is answered exactly as one that does not exist, so a
  guest learns neither the names nor the existence of destinations it may not use.
* **Quotas.** Per destination, a domain may keep at most ``max_bytes`` and ``max_snapshots``
  (the smallest limit of the rules covering it). Bytes are the sum of what its snapshots read
  from its own disks (``bytes_read``): never what dedup stored, which depends on what other VMs
  stored and would tell a guest so (docs/threat-model.md). Jobs it has waiting count as the
  snapshots they will make; their bytes are not known before they run, so one backup that starts
  under the byte quota may end over it, and the next is refused.
"""
from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from host_agent.agent.domains import DomainInfo, covers
from host_agent.config import GuestRule
from host_agent.storage.snapshot import Snapshot

_PATHS = re.compile(r"paths-\d+")


@dataclass(frozen=True)
class Quota:
    max_bytes: int = 0       # 0: no limit
    max_snapshots: int = 0   # 0: no limit


@dataclass(frozen=True)
class Usage:
    """What one domain keeps in one destination, by its own logical figures."""

    bytes: int
    snapshots: int


def own_snapshot(name: str, domain_uuid: str) -> bool:
    """A snapshot of one of the domain's disks (``UUID/SERIAL``) or of paths of one
    (``UUID/SERIAL/paths-N``); not its stored definition (``UUID/vm/ITEM``: the agent's, not the
    guest's), whatever disks it has now."""
    parts = name.split("/")
    if parts[0] != domain_uuid:
        return False
    return len(parts) == 2 or (len(parts) == 3 and bool(_PATHS.fullmatch(parts[2])))


def usage(snapshots: Iterable[Snapshot], domain_uuid: str) -> Usage:
    mine = [s for s in snapshots if own_snapshot(s.name, domain_uuid)]
    return Usage(sum(s.stats.bytes_read for s in mine), len(mine))


def over_quota(quota: Quota, used: Usage, new_snapshots: int) -> str | None:
    """Why a backup making ``new_snapshots`` more snapshots is refused, or None. The message says
    what the guest keeps and what it may do, nothing about other VMs or the repository."""
    if quota.max_snapshots and used.snapshots + new_snapshots > quota.max_snapshots:
        return (f"this VM keeps {used.snapshots} snapshot(s) in this destination (waiting jobs "
                f"included) and may keep {quota.max_snapshots}; this backup makes {new_snapshots} "
                "more: ask the operator to remove old ones or raise the quota")
    if quota.max_bytes and used.bytes >= quota.max_bytes:
        return (f"this VM's snapshots in this destination hold {used.bytes} bytes of its disks and "
                f"it may keep {quota.max_bytes}: ask the operator to remove old ones or raise the quota")
    return None


class GuestRules:
    """The ``[[guests]]`` rules, asked about one domain at a time."""

    def __init__(self, rules: tuple[GuestRule, ...], destinations: frozenset[str]) -> None:
        self.rules = rules
        self.destinations = destinations

    @property
    def restrict_destinations(self) -> bool:
        """Some rule names destinations (else every guest may use every one)."""
        return any(r.destinations for r in self.rules)

    def allowed(self, info: DomainInfo) -> frozenset[str]:
        """The destinations this domain's guest may use."""
        named = [r.destinations for r in self.rules if r.destinations and covers(r, info)]
        if not named:
            return self.destinations
        return frozenset(d for names in named for d in names) & self.destinations

    def quota(self, info: DomainInfo) -> Quota:
        covering = [r for r in self.rules if covers(r, info)]
        return Quota(_smallest(r.max_bytes for r in covering), _smallest(r.max_snapshots for r in covering))


def _smallest(limits: Iterable[int]) -> int:
    """The smallest limit set (0 means none set)."""
    return min((n for n in limits if n > 0), default=0)
