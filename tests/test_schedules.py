"""Schedules: periodic backups without a guest's call, caught up once after downtime.

These run the agent's real parts (intake, journal, jobs, scheduler) against libvirt's own test
driver (``test:///default``, a real libvirt connection with in-memory domains); the clock is a
manual one, moved by the test, so nothing here waits for wall time. The scheduled backup of a
real VM, end to end, is in ``test_schedules_vm.py``.
"""
from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest
from agent_harness import agent_config_for
from clocks import ManualClock

from host_agent import errors
from host_agent.agent.daemon import Agent
from host_agent.agent.domains import Domains
from host_agent.agent.jobs import Origin
from host_agent.agent.schedules import Firing, missed_run, next_run
from host_agent.config import load
from host_agent.planning.service import OptimizerClient
from host_agent.storage.repository import Repository

NS = "https://hyperback.dev/xmlns/wiring/1"


def domain_xml(name: str, channel: bool = True, serial: str = "data", group: str = "") -> str:
    metadata = (f"<metadata><hyperback xmlns='{NS}'><group>{group}</group></hyperback></metadata>"
                if group else "")
    chan = ("<channel type='unix'><target type='virtio' name='org.hyperback.agent.0'/></channel>"
            if channel else "")
    return f"""<domain type='test'><name>{name}</name><memory>65536</memory>{metadata}
      <os><type>hvm</type></os><devices>
      <disk type='file' device='disk'><source file='/var/tmp/{name}.img'/><target dev='vda' bus='virtio'/>
      <serial>{serial}</serial></disk>{chan}</devices></domain>"""


def local(*args: int) -> float:
    return datetime(*args).astimezone().timestamp()  # type: ignore[misc]


def write_config(path: Path, body: str) -> Path:
    path.write_text(f'[repositories]\ndefault = "{path.parent}/repo"\n{body}')
    return path


NIGHTLY = """
[[schedules]]
name = "nightly"
calendar = "30 1 * * *"
match = "web-*"
keep_last = 2
"""


# ---------------------------------------------------------------- the calendar


def test_the_next_run_is_strictly_after_the_given_time_in_local_time() -> None:
    assert next_run("30 1 * * *", local(2026, 12, 7, 1, 0)) == local(2026, 12, 7, 1, 30)
    assert next_run("30 1 * * *", local(2026, 12, 7, 1, 30)) == local(2026, 12, 8, 1, 30)


def test_a_missed_run_is_the_latest_due_time_since_the_last_run_and_only_one() -> None:
    now = local(2026, 12, 10, 12, 0)
    assert missed_run("30 1 * * *", local(2026, 12, 7, 1, 30), now) == local(2026, 12, 10, 1, 30)
    assert missed_run("30 1 * * *", local(2026, 12, 10, 1, 30), now) is None


# ---------------------------------------------------------------- the config


def test_schedules_are_read_from_the_config_with_defaults(tmp_path: Path) -> None:
    config = load(write_config(tmp_path / "agent.toml", NIGHTLY), env={})
    (nightly,) = config.schedules
    assert (nightly.name, nightly.calendar, nightly.policy.value, nightly.keep_last) == \
        ("nightly", "30 1 * * *", "incremental", 2)
    assert nightly.selector == "match=web-*" and nightly.retention == "keep-last=2" and nightly.catch_up


@pytest.mark.parametrize(("body", "says"), [
    ('[[schedules]]\nname = "n"\ncalendar = "30 1 * * *"\nmatch = "*"\nkeep_lats = 2\n', "'keep_lats'"),
    ('[[schedules]]\nname = "n"\ncalendar = "at night"\nmatch = "*"\n', "not a cron expression"),
    ('[[schedules]]\nname = "n"\ncalendar = "@daily"\n', "which domains"),
    ('[[schedules]]\nname = "n"\ncalendar = "@daily"\nmatch = "*"\npolicy = "sometimes"\n', "policy"),
    ('[[schedules]]\nname = "n"\ncalendar = "@daily"\nmatch = "*"\ndestination = "usb"\n', "'usb'"),
    ('[[schedules]]\nname = "n"\ncalendar = "@daily"\nmatch = "*"\n'
     '[[schedules]]\nname = "n"\ncalendar = "@weekly"\nmatch = "*"\n', "defined twice"),
    ('[[schedules]]\nname = "n"\ncalendar = "@daily"\nmatch = "*"\nkind = "copy"\n', "needs it"),
    ('[[schedules]]\nname = "n"\ncalendar = "@daily"\nmatch = "*"\ncopy_to = "default"\n', "goes with"),
    ('[[schedules]]\nname = "n"\ncalendar = "@daily"\nmatch = "*"\nkind = "copy"\ncopy_to = "usb"\n',
     "copy_to 'usb' is not another destination"),
    ('[[schedules]]\nname = "n"\ncalendar = "@daily"\nmatch = "*"\nkind = "copy"\ncopy_to = "default"\n',
     "copy_to 'default' is not another destination"),
    ('[[schedules]]\nname = "n"\ncalendar = "@daily"\nmatch = "*"\nkind = "copy"\ncopy_to = "x"\n'
     'keep_last = 3\n', "keep_last is a backup schedule's setting"),
])
def test_a_bad_schedule_is_refused_naming_what_is_wrong(tmp_path: Path, body: str, says: str) -> None:
    with pytest.raises(errors.UsageError, match=says):
        load(write_config(tmp_path / "agent.toml", body), env={})


# ---------------------------------------------------------------- firing


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[tuple[Agent, ManualClock]]:
    domains = Domains("test:///default")
    for xml in (domain_xml("web-1"), domain_xml("web-2", channel=False), domain_xml("db-1", group="gold")):
        domains.conn.defineXML(xml)
    config = load(write_config(tmp_path / "agent.toml", NIGHTLY + """
[[schedules]]
name = "gold"
calendar = "0 3 * * 6"
group = "gold"
policy = "full"
catch_up = false
"""), env={})
    config = agent_config_for(tmp_path, repositories=config.repositories, schedules=config.schedules)
    clock = ManualClock(local(2026, 12, 7, 12, 0))  # a Monday
    yield Agent(config, domains, OptimizerClient(f"unix:{tmp_path}/no-optimizer.sock"), clock), clock
    domains.close()


def run_scheduler(agent: Agent, steps: list[float]) -> list[Firing]:
    """Start the scheduler (it catches up), then move the clock through ``steps``; after each, wait
    until the scheduler sleeps again, having fired all that was due."""
    clock = agent.scheduler.clock
    assert isinstance(clock, ManualClock)

    async def scenario() -> list[Firing]:
        task = asyncio.create_task(agent.scheduler.run())
        try:
            await asyncio.wait_for(clock.asleep.wait(), 60)
            for t in steps:
                clock.set(t)
                await asyncio.wait_for(clock.asleep.wait(), 60)
            return list(agent.scheduler.firings)
        finally:
            task.cancel()

    return asyncio.run(scenario())


def test_a_new_schedule_waits_for_its_time_then_backs_up_what_it_covers(
        agent: tuple[Agent, ManualClock], tmp_path: Path) -> None:
    a, clock = agent
    (firing,) = run_scheduler(a, [local(2026, 12, 8, 1, 30)])
    assert (firing.schedule, firing.due, firing.catch_up) == ("nightly", local(2026, 12, 8, 1, 30), False)
    (job,) = [a.jobs.get(j) for j in firing.jobs]
    assert job is not None
    assert (job.domain_name, job.origin, job.schedule) == ("web-1", Origin.SCHEDULE, "nightly")
    assert [d.serial for d in job.instruction.disks] == ["data"]
    # journaled like any request: an agent restart runs it again
    (pending,) = a.journal.pending()
    assert (pending.instruction.id, pending.origin, pending.schedule) == (job.id, Origin.SCHEDULE, "nightly")
    state = json.loads((tmp_path / "state" / "schedules.json").read_text())
    assert state["nightly"]["last_run"] == local(2026, 12, 8, 1, 30)


def test_runs_missed_while_the_agent_was_down_are_caught_up_once_at_start(
        agent: tuple[Agent, ManualClock], tmp_path: Path) -> None:
    a, clock = agent
    long_ago = local(2026, 11, 1, 0, 0)
    (tmp_path / "state").mkdir(exist_ok=True)
    (tmp_path / "state" / "schedules.json").write_text(json.dumps({
        "nightly": {"armed": long_ago, "last_run": local(2026, 12, 3, 1, 30)},
        "gold": {"armed": long_ago, "last_run": local(2026, 11, 28, 3, 0)}}))
    firings = run_scheduler(a, [])
    # four nights were missed: one run makes up for them; "gold" missed a Saturday but does not catch up
    caught_up = [(f.schedule, f.due, f.catch_up) for f in firings]
    assert caught_up == [("nightly", local(2026, 12, 7, 1, 30), True)]
    assert [a.jobs.get(j).domain_name for j in firings[0].jobs] == ["web-1"]  # type: ignore[union-attr]


def test_a_group_schedule_covers_the_domains_tagged_with_it(agent: tuple[Agent, ManualClock]) -> None:
    a, clock = agent
    firings = run_scheduler(a, [local(2026, 12, 12, 3, 0)])  # Saturday 03:00, after Tuesday's nightly...
    by_schedule = {f.schedule: f for f in firings}
    gold = by_schedule["gold"]
    (job,) = [a.jobs.get(j) for j in gold.jobs]
    assert job is not None and job.domain_name == "db-1" and job.instruction.policy.value == "full"


def test_a_copy_schedule_copies_the_covered_domains_snapshots_the_target_lacks(tmp_path: Path) -> None:
    domains = Domains("test:///default")
    try:
        for xml in (domain_xml("web-1"), domain_xml("db-1")):
            domains.conn.defineXML(xml)
        web, db = (domains.conn.lookupByName(n).UUIDString() for n in ("web-1", "db-1"))
        config = load(write_config(tmp_path / "agent.toml", f"""offsite = "{tmp_path}/offsite"

[[schedules]]
name = "offsite"
calendar = "0 4 * * *"
match = "web-*"
kind = "copy"
copy_to = "offsite"
"""), env={})
        config = agent_config_for(tmp_path, repositories=config.repositories, schedules=config.schedules)
        source, offsite = Repository.open(tmp_path / "repo"), Repository.init(tmp_path / "offsite")
        image = tmp_path / "disk.img"
        image.write_bytes(b"web data " * 100_000)
        ours = [source.backup(image, f"{web}/data").snapshot.id for _ in range(2)]
        source.backup(image, f"{db}/data")  # a domain the schedule does not cover
        clock = ManualClock(local(2026, 12, 7, 12, 0))
        agent = Agent(config, domains, OptimizerClient(f"unix:{tmp_path}/no-optimizer.sock"), clock)

        async def fire() -> Firing:
            firing = await agent.scheduler.run_now("offsite")
            await agent.scheduler.drain()
            return firing

        offsite_lines = [asyncio.run(fire()).copied for _ in range(2)]
        assert [line.split()[:2] for line in offsite_lines[0]] == [["copied", sid] for sid in ours]
        assert [line.split()[:2] for line in offsite_lines[1]] == [["skipped", sid] for sid in ours]
        assert {s.id for s in offsite.snapshots()} == set(ours)
        assert offsite.check().ok
    finally:
        domains.close()
