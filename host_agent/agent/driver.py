"""The backup driver: collects instructions and flushes them as batches.

A batch is flushed every ``interval`` seconds after its first instruction
arrived, or as soon as ``batch_size`` instructions wait, whichever comes first.
Each batch goes to the optimizer for a plan; while the optimizer is
unreachable the driver retries with backoff and keeps the instructions (they
are also in the journal, so an agent restart loses none of them). Units the
plan defers (``not_before`` in the future) go back to the queue at that time,
to be planned again: the optimizer re-evaluates, and its timing policy never
lets them starve. Ready units go to the executor.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any

from host_agent.errors import OptimizerUnavailable
from host_agent.model import Instruction, Plan, WorkUnit

log = logging.getLogger(__name__)

DEFAULT_INTERVAL = 10.0
DEFAULT_BATCH_SIZE = 10
MAX_BACKOFF = 30.0

PlanFn = Callable[[Sequence[Instruction]], Coroutine[Any, Any, Plan]]
ExecuteFn = Callable[[Plan, dict[str, Instruction]], Coroutine[Any, Any, None]]
FailFn = Callable[[Instruction, str], Coroutine[Any, Any, None]]


@dataclass
class Flush:
    """A record of one flush, for operators and tests."""

    reason: str                      # "size" or "interval"
    instructions: int
    planned_at: float = 0.0          # monotonic time the plan arrived
    flushed_at: float = field(default_factory=time.monotonic)
    attempts: int = 0


class BackupDriver:
    def __init__(self, plan: PlanFn, execute: ExecuteFn, fail: FailFn,
                 interval: float = DEFAULT_INTERVAL, batch_size: int = DEFAULT_BATCH_SIZE,
                 first_retry: float = 0.5) -> None:
        if interval <= 0 or batch_size < 1:
            raise ValueError("interval must be positive and batch_size at least 1")
        self._plan, self._execute, self._fail = plan, execute, fail
        self.interval, self.batch_size, self.first_retry = interval, batch_size, first_retry
        self._queue: list[tuple[float, Instruction]] = []   # (monotonic arrival, instruction)
        self._dropped: set[str] = set()                      # cancelled while deferred: not requeued
        self._wake = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self.flushes: list[Flush] = []

    def submit(self, instruction: Instruction) -> None:
        """Queue an instruction; a full batch is flushed at once."""
        self._queue.append((time.monotonic(), instruction))
        self._wake.set()

    def drop(self, instruction_id: str) -> None:
        """Forget a cancelled instruction: out of the queue now, and not requeued if deferred."""
        self._queue = [(t, i) for t, i in self._queue if i.id != instruction_id]
        self._dropped.add(instruction_id)

    @property
    def queued(self) -> int:
        return len(self._queue)

    async def run(self) -> None:
        """Flush batches forever (cancel to stop)."""
        while True:
            if not self._queue:
                self._wake.clear()
                await self._wake.wait()
                continue
            reason = await self._wait_for_flush()
            batch = [i for _, i in self._queue[:self.batch_size]]
            del self._queue[:self.batch_size]
            flush = Flush(reason, len(batch))
            self.flushes.append(flush)
            log.info("flushing %d instruction(s) by %s", len(batch), reason)
            await self._dispatch(batch, flush)

    async def _wait_for_flush(self) -> str:
        while len(self._queue) < self.batch_size:
            remaining = self._queue[0][0] + self.interval - time.monotonic()
            if remaining <= 0:
                return "interval"
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), remaining)
            except TimeoutError:
                return "interval"
        return "size"

    async def _dispatch(self, batch: list[Instruction], flush: Flush) -> None:
        delay = self.first_retry
        while True:
            flush.attempts += 1
            try:
                plan = await self._plan(batch)
                break
            except OptimizerUnavailable as e:
                log.warning("optimizer unavailable (%s); retrying %d instruction(s) in %.1fs",
                            e, len(batch), delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, MAX_BACKOFF)
            except Exception as e:  # the optimizer refused the batch: answer, never drop silently
                log.error("optimizer rejected a batch: %s", e)
                for instruction in batch:
                    await self._fail(instruction, f"the optimizer rejected the request: {e}")
                return
        flush.planned_at = time.monotonic()
        by_id = {i.id: i for i in batch}
        self._check_coverage(plan, by_id)
        ready, deferred = self._split(plan)
        for when, instruction_ids in deferred.items():
            self._requeue_at(when, [i for i in batch if i.id in instruction_ids])
        if ready.units:
            task = asyncio.create_task(self._execute(ready, by_id))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _check_coverage(self, plan: Plan, by_id: dict[str, Instruction]) -> None:
        covered = {i for u in plan.units for i in u.satisfies}
        for missing in set(by_id) - covered:
            log.error("plan left instruction %s unanswered; failing it", missing)
            task = asyncio.create_task(self._fail(by_id[missing], "the optimizer planned no work for it"))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    @staticmethod
    def _split(plan: Plan) -> tuple[Plan, dict[float, set[str]]]:
        """Units that may start now, and the instructions of deferred units by re-plan time.

        An instruction is deferred whole if any unit serving it is deferred, and so is
        every instruction sharing a unit with it (a shared base is read once, for all).
        """
        now = time.time()
        late = {i for u in plan.units if u.not_before > now for i in u.satisfies}
        grew = True
        while grew:
            touched = {i for u in plan.units if set(u.satisfies) & late for i in u.satisfies}
            grew = not touched <= late
            late |= touched
        when = max((u.not_before for u in plan.units if u.not_before > now), default=now)
        ready: list[WorkUnit] = [u for u in plan.units if not set(u.satisfies) & late]
        return Plan(tuple(ready), plan.policy, plan.notes), ({when: late} if late else {})

    def _requeue_at(self, when: float, instructions: list[Instruction]) -> None:
        loop = asyncio.get_running_loop()
        delay = max(when - time.time(), 0.0)
        log.info("%d instruction(s) deferred by the optimizer for %.0fs", len(instructions), delay)

        def requeue() -> None:
            for instruction in instructions:
                if instruction.id in self._dropped:
                    self._dropped.discard(instruction.id)
                else:
                    self.submit(instruction)

        loop.call_later(delay, requeue)

    async def drain(self) -> None:
        """Wait for running executions (for shutdown and tests)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
