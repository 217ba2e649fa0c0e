"""The ``timing`` policy: defer backups while the host is busy.

Defers backup units while the sending host is busy or outside the backup window; restores are
never deferred (someone is waiting to recover). *Busy* means any of: CPU pressure ``some avg10``
above ``cpu_pressure`` (default 40 %), IO pressure above ``io_pressure`` (default 30 %), the
1-minute load average per CPU above ``load_per_core`` (default 1.5); a threshold of ``off``
disables it, and a host that sent no load reading is never busy. The window (``window=22:00-06:00``,
optional) is in the host's local time when the host sent its UTC offset, else the optimizer's. A
deferred unit gets ``not_before`` = ``now + recheck`` (default 60 s), at which time the driver asks
again, and a reason. It never starves: the clock starts at the oldest ``received_at`` among the
instructions a unit satisfies (0, unknown, counts as long ago), ``not_before`` is never set past
that time plus ``max_defer`` (default 30 min), and a unit that has waited ``max_defer`` is released
whatever the load, with a reason that says so. All times are the host's (``context.now``).
"""
from __future__ import annotations

import math
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Self

from host_agent.errors import OptimizerConfigError
from host_agent.model import Instruction, Plan, UnitKind, WorkUnit
from host_agent.planning.chain import HostContext, PlanningPolicy, add_reason, parse_options
from host_agent.planning.hostload import HostLoad


def _threshold(text: str) -> float:
    number = math.inf if text.strip() == "off" else float(text)
    if not number >= 0:
        raise ValueError(f"{text!r} is negative")
    return number


def parse_duration(text: str) -> float:
    """``90``, ``90s``, ``30m``, ``1.5h`` -> seconds."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([smh]?)\s*", text)
    if not m:
        raise ValueError(f"{text!r} is not a duration (e.g. 90s, 30m, 1h)")
    return float(m[1]) * {"": 1, "s": 1, "m": 60, "h": 3600}[m[2]]


def format_duration(seconds: float) -> str:
    seconds = round(seconds)
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


@dataclass(frozen=True)
class BackupWindow:
    """Minutes after local midnight; ``start > end`` wraps past midnight (22:00-06:00)."""

    start: int
    end: int

    @classmethod
    def parse(cls, text: str) -> BackupWindow:
        m = re.fullmatch(r"\s*(\d{1,2}):(\d{2})\s*-\s*(\d{1,2}):(\d{2})\s*", text)
        if not m or int(m[1]) > 23 or int(m[3]) > 24 or int(m[2]) > 59 or int(m[4]) > 59:
            raise ValueError(f"{text!r} is not a window like 22:00-06:00")
        start, end = int(m[1]) * 60 + int(m[2]), int(m[3]) * 60 + int(m[4])
        if start == end or end > 24 * 60:
            raise ValueError(f"{text!r} is not a window like 22:00-06:00")
        return cls(start, end)

    def contains(self, minute: int) -> bool:
        if self.start < self.end:
            return self.start <= minute < self.end
        return minute >= self.start or minute < self.end

    def __str__(self) -> str:
        return f"{self.start // 60:02d}:{self.start % 60:02d}-{self.end // 60:02d}:{self.end % 60:02d}"


@dataclass(frozen=True)
class TimingConfig:
    cpu_pressure: float = 40.0      # percent, some avg10 of /proc/pressure/cpu
    io_pressure: float = 30.0       # percent, some avg10 of /proc/pressure/io
    load_per_core: float = 1.5      # 1-minute load average / CPUs
    window: BackupWindow | None = None
    recheck: float = 60.0           # seconds until a deferred unit is planned again
    max_defer: float = 30 * 60.0    # seconds after which a unit is released whatever the load


class Timing(PlanningPolicy):
    """Defer backups while the host is busy or outside the backup window, never past ``max_defer``."""

    name = "timing"

    def __init__(self, config: TimingConfig = TimingConfig()) -> None:
        self.config = config

    @classmethod
    def from_options(cls, options: Mapping[str, str]) -> Self:
        config = TimingConfig(**parse_options("timing", options, {
            "cpu_pressure": _threshold, "io_pressure": _threshold, "load_per_core": _threshold,
            "window": lambda v: BackupWindow.parse(v) if v.strip() else None,
            "recheck": parse_duration, "max_defer": parse_duration}))
        if config.recheck <= 0:
            raise OptimizerConfigError("timing.recheck must be more than 0 seconds")
        return cls(config)

    def busy(self, load: HostLoad | None) -> list[str]:
        """Why the host counts as busy (empty: it does not)."""
        c, why = self.config, []
        if load is None:
            return []
        if load.cpu_some_avg10 is not None and load.cpu_some_avg10 > c.cpu_pressure:
            why.append(f"CPU pressure {load.cpu_some_avg10:.1f}% > {c.cpu_pressure:g}%")
        if load.io_some_avg10 is not None and load.io_some_avg10 > c.io_pressure:
            why.append(f"IO pressure {load.io_some_avg10:.1f}% > {c.io_pressure:g}%")
        if load.load_per_core > c.load_per_core:
            why.append(f"load {load.load_per_core:.2f} per CPU > {c.load_per_core:g}")
        return why

    def outside_window(self, context: HostContext) -> bool:
        window = self.config.window
        if window is None:
            return False
        if context.utc_offset is not None:
            local = time.gmtime(context.now + context.utc_offset)
        else:
            local = time.localtime(context.now)
        return not window.contains(local.tm_hour * 60 + local.tm_min)

    def apply(self, plan: Plan, batch: Sequence[Instruction], context: HostContext) -> Plan:
        c = self.config
        why = self.busy(context.load)
        if self.outside_window(context):
            why.append(f"outside the backup window {c.window}")
        if not why:
            return plan
        cause = "; ".join(why)
        received = {i.id: i.received_at for i in batch}
        units: list[WorkUnit] = []
        deferred = released = 0
        until = context.now
        for unit in plan.units:
            if unit.kind is UnitKind.RESTORE_DISK:
                units.append(unit)
                continue
            oldest = min((received.get(i, 0.0) for i in unit.satisfies), default=0.0)
            waited = context.now - oldest
            if waited >= c.max_defer:
                released += 1
                units.append(replace(unit, reason=add_reason(
                    unit, f"released although {cause}: waited {format_duration(waited)}, "
                          f"max_defer is {format_duration(c.max_defer)}")))
                continue
            not_before = max(min(context.now + c.recheck, oldest + c.max_defer), unit.not_before)
            until = max(until, not_before)
            deferred += 1
            units.append(replace(unit, not_before=not_before, reason=add_reason(
                unit, f"deferred {format_duration(not_before - context.now)} ({cause}); "
                      f"released at the latest after {format_duration(c.max_defer)} of waiting")))
        note = f"timing: {cause}: {deferred} unit(s) deferred"
        if deferred:
            note += f" up to {format_duration(until - context.now)}"
        if released:
            note += f", {released} released after waiting max_defer"
        return replace(plan, units=tuple(units), notes=(*plan.notes, note))
