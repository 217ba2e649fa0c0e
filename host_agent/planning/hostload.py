"""How busy this host is: a small typed reader of ``/proc/pressure/{cpu,io}`` and ``/proc/loadavg``.

The driver reads a :class:`HostLoad` at every flush and sends it with the batch, so an optimizer on
another machine can judge the busyness of the sending host (``host_agent.planning.chain.Timing``).

Pressure stall information (PSI, Linux 4.20+, ``CONFIG_PSI``) is the better signal: ``some avg10`` is
the share of the last 10 seconds in which at least one task waited for the CPU or for I/O. Where the
files are missing (an older kernel, a container) or switched off (``psi=0``: reading them fails with
EOPNOTSUPP), the reader degrades to the load average alone, leaves the pressure fields ``None`` and says
so in :attr:`HostLoad.notes` (logged once per reader). Content that cannot be parsed is not guessed at:

::

    HyperbackError                   (host_agent.errors)
    └── EnvironmentProblem
        └── HostLoadError            /proc/loadavg is unreadable, or a file's content is malformed
"""
from __future__ import annotations

import errno
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

from host_agent.errors import HostLoadError

log = logging.getLogger(__name__)

_DEGRADE_ERRNOS = {errno.ENOENT, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL}


@dataclass(frozen=True)
class Pressure:
    """One line of a pressure file: shares of wall time in percent, and the total stall in µs."""

    avg10: float
    avg60: float
    avg300: float
    total: int


@dataclass(frozen=True)
class PressureFile:
    some: Pressure
    full: Pressure | None = None  # absent from /proc/pressure/cpu before Linux 5.13


@dataclass(frozen=True)
class HostLoad:
    load1: float
    load5: float
    load15: float
    cpu_count: int
    cpu_some_avg10: float | None = None  # None: no pressure stall information on this host
    io_some_avg10: float | None = None
    notes: tuple[str, ...] = ()

    @property
    def load_per_core(self) -> float:
        return self.load1 / max(self.cpu_count, 1)


def parse_pressure(text: str, name: str = "pressure") -> PressureFile:
    """Parse ``some avg10=0.12 avg60=0.05 avg300=0.01 total=12345`` lines (``full`` optional)."""
    lines: dict[str, Pressure] = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        kind, *fields = line.split()
        if kind not in ("some", "full") or kind in lines:
            raise HostLoadError(f"{name} line {number}: expected one 'some' and one 'full' line, "
                                f"got {line!r}")
        values: dict[str, str] = {}
        for item in fields:
            key, sep, value = item.partition("=")
            if not sep:
                raise HostLoadError(f"{name} line {number}: {item!r} is not key=value")
            values[key] = value
        try:
            lines[kind] = Pressure(_percent(values, "avg10"), _percent(values, "avg60"),
                                   _percent(values, "avg300"), int(values["total"]))
        except (KeyError, ValueError) as e:
            raise HostLoadError(f"{name} line {number}: {line!r}: bad or missing field ({e})") from e
        if lines[kind].total < 0:
            raise HostLoadError(f"{name} line {number}: negative total in {line!r}")
    if "some" not in lines:
        raise HostLoadError(f"{name}: no 'some' line in {text[:200]!r}")
    return PressureFile(lines["some"], lines.get("full"))


def _percent(values: dict[str, str], key: str) -> float:
    value = float(values[key])
    if not 0.0 <= value <= 100.0:  # also refuses nan
        raise ValueError(f"{key}={value} is not a percentage")
    return value


def parse_loadavg(text: str) -> tuple[float, float, float]:
    """Parse ``/proc/loadavg`` (``0.70 0.88 0.67 3/94 21042``): the 1, 5 and 15 minute averages."""
    fields = text.split()
    try:
        loads = tuple(float(f) for f in fields[:3])
    except ValueError as e:
        raise HostLoadError(f"/proc/loadavg: {text.strip()[:100]!r}: {e}") from e
    if len(loads) != 3 or any(v < 0 or not math.isfinite(v) for v in loads):
        raise HostLoadError(f"/proc/loadavg: expected three non-negative numbers, got {text.strip()[:100]!r}")
    return loads[0], loads[1], loads[2]


class HostLoadReader:
    """Reads a :class:`HostLoad` from ``proc`` (default ``/proc``; tests point it at a directory)."""

    def __init__(self, proc: Path = Path("/proc"), cpu_count: int | None = None) -> None:
        self.proc = proc
        self.cpu_count = cpu_count or os.cpu_count() or 1
        self._warned = False

    def read(self) -> HostLoad:
        path = self.proc / "loadavg"
        try:
            load1, load5, load15 = parse_loadavg(path.read_text())
        except OSError as e:
            raise HostLoadError(f"cannot read {path}: {e.strerror or e}") from e
        pressure: dict[str, float] = {}
        notes: list[str] = []
        for resource in ("cpu", "io"):
            path = self.proc / "pressure" / resource
            try:
                text = path.read_text()
            except OSError as e:
                if e.errno not in _DEGRADE_ERRNOS:
                    raise HostLoadError(f"cannot read {path}: {e.strerror or e}") from e
                notes.append(f"no pressure stall information ({path}: {e.strerror or e}): "
                             f"judging by load average alone")
                break
            pressure[resource] = parse_pressure(text, str(path)).some.avg10
        if notes:
            pressure.clear()
            if not self._warned:
                log.warning("%s", notes[0])
                self._warned = True
        return HostLoad(load1, load5, load15, self.cpu_count, pressure.get("cpu"), pressure.get("io"),
                        tuple(notes))
