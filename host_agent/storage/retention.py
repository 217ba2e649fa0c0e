"""Which snapshots a retention policy keeps (pure: no I/O).

Rules follow restic's and borg's: ``keep_last`` keeps the N newest snapshots;
``keep_daily`` the newest snapshot of each of the N newest days that have one,
likewise ``keep_weekly`` (ISO weeks) and ``keep_monthly``. A snapshot is kept
if any rule keeps it, or if it is protected (docs/repository-format.md, 5.5: the rules still
apply to all snapshots, so a protected one among the newest fills a ``keep_last`` place too). Rules
apply to each source name on its own; a kept disk snapshot also keeps the snapshots of its domain's
definition that its ``vm`` field names. Every
snapshot restores on its own (its map is complete), so removing any of them
never breaks another.
"""
from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime

from host_agent import errors
from host_agent.storage.snapshot import Snapshot


@dataclass(frozen=True)
class KeepPolicy:
    last: int = 0
    daily: int = 0
    weekly: int = 0
    monthly: int = 0

    def __post_init__(self) -> None:
        if min(self.last, self.daily, self.weekly, self.monthly) < 0:
            raise errors.UsageError("keep counts cannot be negative")
        if not (self.last or self.daily or self.weekly or self.monthly):
            raise errors.UsageError("give at least one of --keep-last, --keep-daily, --keep-weekly, "
                                    "--keep-monthly (prune never removes every snapshot)")


_PERIODS: dict[str, Callable[[datetime], object]] = {
    "daily": lambda t: t.date(),
    "weekly": lambda t: t.isocalendar()[:2],
    "monthly": lambda t: (t.year, t.month),
}


def _newest_per_period(snaps: Sequence[Snapshot], count: int,
                       period: Callable[[datetime], object]) -> set[str]:
    kept: set[str] = set()
    seen: set[object] = set()
    for snap in sorted(snaps, key=lambda s: s.time, reverse=True):
        key = period(snap.time)
        if key in seen:
            continue
        if len(seen) == count:
            break
        seen.add(key)
        kept.add(snap.id)
    return kept


def select(snapshots: Iterable[Snapshot], policy: KeepPolicy,
           protected: Collection[str] = ()) -> tuple[list[Snapshot], list[Snapshot]]:
    """Split snapshots into (keep, remove), each oldest first; the ``protected`` ids are kept."""
    by_name: dict[str, list[Snapshot]] = {}
    for snap in snapshots:
        by_name.setdefault(snap.name, []).append(snap)
    keep_ids = {s.id for snaps in by_name.values() for s in snaps if s.id in protected}
    for snaps in by_name.values():
        newest_first = sorted(snaps, key=lambda s: s.time, reverse=True)
        keep_ids.update(s.id for s in newest_first[:policy.last])
        for rule, fn in _PERIODS.items():
            keep_ids |= _newest_per_period(snaps, getattr(policy, rule), fn)
    # a kept disk snapshot keeps the domain definition it names (docs/repository-format.md, 5.3)
    for snaps in by_name.values():
        for snap in snaps:
            if snap.id in keep_ids and snap.vm is not None:
                keep_ids.add(snap.vm.definition)
                keep_ids.update(f.snapshot for f in snap.vm.files)
    every = sorted((s for snaps in by_name.values() for s in snaps), key=lambda s: (s.time, s.id))
    return [s for s in every if s.id in keep_ids], [s for s in every if s.id not in keep_ids]
