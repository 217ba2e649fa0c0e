"""Which snapshots a command means: filters by source name, time, label and policy (pure: no I/O).

``hyperback list`` filters with it. Times are UTC; a bare date as ``until`` means the whole of that
day, so ``--since 2026-12-01 --until 2026-12-01`` is the first of December.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, time, timedelta

from host_agent import errors
from host_agent.model import Policy
from host_agent.storage.annotations import Annotation
from host_agent.storage.snapshot import Snapshot

_FORMATS = ("%Y-%m-%d", "%Y-%m-%dT%H:%M", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%d %H:%M", "%Y-%m-%d %H:%M:%S")


def parse_time(text: str, end_of_day: bool = False) -> datetime:
    """A UTC date or date and time (``2026-12-01``, ``2026-12-01T13:30[:00]``, a trailing ``Z``
    allowed); a bare date is its first instant, or with ``end_of_day`` its last."""
    value = text.removesuffix("Z")
    for fmt in _FORMATS:
        try:
            parsed = datetime.strptime(value, fmt).replace(tzinfo=UTC)
        except ValueError:
            continue
        if fmt == "%Y-%m-%d" and end_of_day:
            next_day = datetime.combine(parsed.date() + timedelta(days=1), time(), UTC)
            return next_day - timedelta(microseconds=1)
        return parsed
    raise errors.UsageError(f"time {text!r} must be a UTC date or date and time, e.g. 2026-12-01 or "
                            "2026-12-01T13:30")


@dataclass(frozen=True)
class SnapshotFilter:
    """Every condition given must hold; ``labels``: the snapshot has each of them."""

    name: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    labels: tuple[str, ...] = ()
    policy: Policy | None = None

    def __post_init__(self) -> None:
        if self.since is not None and self.until is not None and self.since > self.until:
            raise errors.UsageError(f"--since {self.since:%Y-%m-%d %H:%M:%S} is after --until "
                                    f"{self.until:%Y-%m-%d %H:%M:%S}: nothing could match")

    def matches(self, snap: Snapshot, note: Annotation) -> bool:
        return ((self.name is None or snap.name == self.name)
                and (self.since is None or snap.time >= self.since)
                and (self.until is None or snap.time <= self.until)
                and set(self.labels) <= set(note.labels)
                and (self.policy is None or snap.policy is self.policy))
