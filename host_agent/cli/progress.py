"""A progress line on a terminal's stderr; silent elsewhere."""
from __future__ import annotations

import sys
import time
from typing import TextIO

from host_agent.storage.repository import ProgressFn

MIB = 1024 * 1024


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


class Bar:
    def __init__(self, label: str, stream: TextIO) -> None:
        self.label, self.stream = label, stream
        self.started = time.monotonic()

    def __call__(self, done: int, total: int) -> None:
        elapsed = max(time.monotonic() - self.started, 1e-6)
        rate = done / elapsed
        if total:
            pct = min(done / total, 1.0)
            bar = "#" * int(pct * 30)
            eta = (total - done) / rate if rate else 0
            line = (f"\r{self.label} [{bar:<30}] {pct * 100:5.1f}% {human(done)}/{human(total)} "
                    f"{human(rate)}/s ETA {eta:4.0f}s")
        else:
            line = f"\r{self.label} {human(done)} {human(rate)}/s"
        self.stream.write(line)
        self.stream.flush()

    def close(self) -> None:
        self.stream.write("\n")
        self.stream.flush()


def bar_for(label: str, quiet: bool) -> Bar | None:
    """A bar when stderr is a terminal and the output is for a person."""
    return None if quiet or not sys.stderr.isatty() else Bar(label, sys.stderr)


def callback(bar: Bar | None) -> ProgressFn | None:
    return bar if bar is not None else None
