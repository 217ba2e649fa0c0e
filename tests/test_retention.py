"""Retention rules select snapshots like restic and borg do."""
from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from host_agent import errors
from host_agent.model import ChangeDetection, Policy
from host_agent.storage.retention import KeepPolicy, select
from host_agent.storage.snapshot import Snapshot, SnapshotStats, TreeRef

T0 = datetime(2026, 1, 1, 12, tzinfo=UTC)


def snap(i: int, when: datetime, name: str = "vm1/vda") -> Snapshot:
    return Snapshot(f"{i:016x}", name, Policy.FULL, None, when, "/x", 0, 4096, TreeRef(None, 0, 0),
                    ChangeDetection.NONE, SnapshotStats(0, 0, 0, 0, 0.0))


def ids(snaps: list[Snapshot]) -> list[int]:
    return [int(s.id, 16) for s in snaps]


def test_keep_last_keeps_the_newest_per_name() -> None:
    snaps = [snap(i, T0 + timedelta(hours=i)) for i in range(5)] + [snap(10, T0, "vm2/vda")]
    keep, remove = select(snaps, KeepPolicy(last=2))
    assert ids(keep) == [10, 3, 4]
    assert ids(remove) == [0, 1, 2]


def test_keep_daily_keeps_the_newest_of_each_day() -> None:
    snaps = [snap(i, T0 + timedelta(hours=8 * i)) for i in range(9)]  # noon Jan 1 to 4:00 Jan 4
    keep, _ = select(snaps, KeepPolicy(daily=2))
    assert ids(keep) == [7, 8]


def test_weekly_and_monthly_combine_with_last() -> None:
    snaps = [snap(i, T0 + timedelta(days=7 * i)) for i in range(10)]
    keep, _ = select(snaps, KeepPolicy(last=1, weekly=3, monthly=3))
    assert ids(keep) == [4, 7, 8, 9]  # months: Jan 29, Feb 26, Mar 5


def test_a_policy_that_keeps_nothing_is_refused() -> None:
    with pytest.raises(errors.UsageError, match="at least one"):
        KeepPolicy()
    with pytest.raises(errors.UsageError):
        KeepPolicy(last=-1)


def test_a_kept_disk_snapshot_keeps_the_definition_it_names_though_its_own_rule_would_drop_it() -> None:
    from dataclasses import replace

    from host_agent.storage.snapshot import VmFile, VmRef

    # the definition of the kept disk snapshot is the older of two: keep_last=1 alone would drop it
    definitions = [snap(20, T0, "u/vm/definition"), snap(21, T0 + timedelta(hours=2), "u/vm/definition")]
    nvram = snap(30, T0, "u/vm/nvram")
    ref = VmRef("r" * 16, ("job",), "u", "web", definitions[0].id, (VmFile("nvram", "/v", nvram.id),))
    disks = [snap(1, T0 + timedelta(hours=3), "u/root")]
    disks[0] = replace(disks[0], vm=ref)
    keep, remove = select([*definitions, nvram, *disks], KeepPolicy(last=1))
    assert ids(keep) == [20, 30, 21, 1]
    assert ids(remove) == []


def test_a_protected_snapshot_is_kept_and_the_rules_still_count_every_snapshot() -> None:
    snaps = [snap(i, T0 + timedelta(hours=i)) for i in range(5)]
    keep, remove = select(snaps, KeepPolicy(last=2), protected={snaps[0].id, snaps[4].id})
    assert ids(keep) == [0, 3, 4]  # the newest is protected and fills one of the two places too
    assert ids(remove) == [1, 2]
