"""The backup driver flushes by interval or size, retries the optimizer, loses nothing."""
from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

from host_agent.agent.driver import BackupDriver
from host_agent.errors import OptimizerUnavailable
from host_agent.model import Instruction, InstructionKind, Plan, Policy, UnitKind, WorkUnit


def instruction(n: int) -> Instruction:
    return Instruction(f"i{n}", "dom", str(n), InstructionKind.BACKUP, (), "default", Policy.FULL,
                       received_at=time.time())


def passthrough(batch: Sequence[Instruction], not_before: float = 0.0) -> Plan:
    return Plan(tuple(WorkUnit(f"u-{i.id}", UnitKind.BACKUP_DISK, "", "", "default", Policy.FULL, (i.id,),
                               not_before=not_before) for i in batch), "test")


class Recorder:
    def __init__(self) -> None:
        self.batches: list[list[str]] = []
        self.executed: list[str] = []
        self.failed: list[tuple[str, str]] = []
        self.down = 0          # refuse this many plan calls as unreachable
        self.defer_first = 0.0

    async def plan(self, batch: Sequence[Instruction]) -> Plan:
        if self.down:
            self.down -= 1
            raise OptimizerUnavailable("connection refused")
        self.batches.append([i.id for i in batch])
        if self.defer_first:
            when, self.defer_first = time.time() + self.defer_first, 0.0
            return passthrough(batch, when)
        return passthrough(batch)

    async def execute(self, plan: Plan, by_id: dict[str, Instruction]) -> None:
        self.executed += [i for u in plan.units for i in u.satisfies]

    async def fail(self, instruction: Instruction, why: str) -> None:
        self.failed.append((instruction.id, why))


def run_driver(rec: Recorder, scenario, interval: float = 0.3, batch_size: int = 3) -> BackupDriver:  # type: ignore[no-untyped-def]
    async def main() -> BackupDriver:
        driver = BackupDriver(rec.plan, rec.execute, rec.fail, interval, batch_size, first_retry=0.02)
        task = asyncio.create_task(driver.run())
        await scenario(driver)
        await driver.drain()
        task.cancel()
        return driver
    return asyncio.run(main())


def test_a_full_batch_flushes_at_once() -> None:
    rec = Recorder()

    async def scenario(driver: BackupDriver) -> None:
        started = time.monotonic()
        for n in range(3):
            driver.submit(instruction(n))
        while not rec.executed:
            await asyncio.sleep(0.01)
        # An interval no loaded machine comes near: a flush that came at all came by size.
        assert time.monotonic() - started < driver.interval / 2

    driver = run_driver(rec, scenario, interval=600)
    assert [f.reason for f in driver.flushes] == ["size"]
    assert rec.batches == [["i0", "i1", "i2"]]


def test_a_partial_batch_flushes_after_the_interval() -> None:
    rec = Recorder()

    async def scenario(driver: BackupDriver) -> None:
        started = time.monotonic()
        driver.submit(instruction(0))
        driver.submit(instruction(1))
        while not rec.executed:
            await asyncio.sleep(0.01)
        assert 0.25 <= time.monotonic() - started < 1.0

    driver = run_driver(rec, scenario)
    assert [f.reason for f in driver.flushes] == ["interval"]


def test_more_than_a_batch_is_split_and_nothing_is_lost() -> None:
    rec = Recorder()

    async def scenario(driver: BackupDriver) -> None:
        for n in range(7):
            driver.submit(instruction(n))
        while len(rec.executed) < 7:
            await asyncio.sleep(0.01)

    run_driver(rec, scenario)
    assert [len(b) for b in rec.batches] == [3, 3, 1]
    assert sorted(rec.executed) == sorted(f"i{n}" for n in range(7))


def test_an_unreachable_optimizer_is_retried_without_losing_instructions() -> None:
    rec = Recorder()
    rec.down = 3

    async def scenario(driver: BackupDriver) -> None:
        for n in range(3):
            driver.submit(instruction(n))
        while not rec.executed:
            await asyncio.sleep(0.05)

    driver = run_driver(rec, scenario)
    assert driver.flushes[0].attempts == 4
    assert sorted(rec.executed) == ["i0", "i1", "i2"] and not rec.failed


def test_deferred_work_comes_back_to_be_planned_again() -> None:
    rec = Recorder()
    rec.defer_first = 0.4

    async def scenario(driver: BackupDriver) -> None:
        started = time.monotonic()
        for n in range(3):
            driver.submit(instruction(n))
        while len(rec.executed) < 3:
            await asyncio.sleep(0.02)
        assert time.monotonic() - started >= 0.4

    run_driver(rec, scenario)
    assert len(rec.batches) == 2 and rec.batches[0] == rec.batches[1]


def test_a_rejected_batch_answers_every_instruction() -> None:
    rec = Recorder()

    async def refuse(batch: Sequence[Instruction]) -> Plan:
        raise ValueError("bad batch")

    async def main() -> None:
        driver = BackupDriver(refuse, rec.execute, rec.fail, 0.1, 2)
        task = asyncio.create_task(driver.run())
        driver.submit(instruction(0))
        driver.submit(instruction(1))
        while len(rec.failed) < 2:
            await asyncio.sleep(0.01)
        task.cancel()

    asyncio.run(main())
    assert {i for i, _ in rec.failed} == {"i0", "i1"}
    assert all("rejected" in why for _, why in rec.failed)
