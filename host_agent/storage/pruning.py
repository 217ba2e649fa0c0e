"""Prune a repository: forget what a retention policy does not keep (protected snapshots are always
kept, docs/repository-format.md 5.5), then collect garbage. One implementation for ``hyperback
prune``, schedules' retention and the media service's ``Prune`` call (an operator's only)."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from host_agent.storage.annotations import Annotations
from host_agent.storage.gc import GcResult, collect_garbage
from host_agent.storage.repository import REPACK_THRESHOLD, Repository
from host_agent.storage.retention import KeepPolicy, select
from host_agent.storage.snapshot import Snapshot


@dataclass(frozen=True)
class Pruned:
    keep: list[Snapshot]
    remove: list[Snapshot]
    gc: GcResult | None  # None for a dry run, or when nothing was forgotten and collection was skipped


def prune(repo: Repository, policy: KeepPolicy, *, which: Callable[[Snapshot], bool] = lambda s: True,
          repack_threshold: float = REPACK_THRESHOLD, dry_run: bool = False,
          collect_always: bool = True) -> Pruned:
    """Forget the snapshots ``which`` selects that ``policy`` does not keep, then collect garbage
    (unless ``collect_always`` is off and nothing was forgotten)."""
    keep, remove = select((s for s in repo.snapshots() if which(s)), policy,
                          Annotations(repo.path).protected_ids())
    if dry_run or not (remove or collect_always):
        return Pruned(keep, remove, None)
    repo.forget([s.id for s in remove])  # reads each protection again, just before
    return Pruned(keep, remove, collect_garbage(repo, repack_threshold))


__all__ = ["Pruned", "prune"]
