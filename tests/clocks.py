"""A clock the test moves: schedules fire when the test says, with no wait for wall time."""
from __future__ import annotations

import asyncio


class ManualClock:
    """Time moves only when the test says so; ``asleep`` is set while the scheduler waits for a
    time still ahead, i.e. once it has fired everything due."""

    def __init__(self, now: float) -> None:
        self.t = now
        self.moved = asyncio.Event()
        self.asleep = asyncio.Event()

    def now(self) -> float:
        return self.t

    async def sleep_until(self, when: float) -> None:
        while self.t < when:
            self.moved.clear()
            self.asleep.set()
            await self.moved.wait()
        self.asleep.clear()

    def set(self, t: float) -> None:
        self.t = t
        self.asleep.clear()
        self.moved.set()
