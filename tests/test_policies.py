"""Planning policies: every instruction is served or rejected; merge reads shared data once; timing defers
while the host is busy, never past max_defer; policies load by name from entry points."""
from __future__ import annotations

import graphlib
import posixpath
from collections.abc import Sequence
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from host_agent.errors import MalformedBatch, OptimizerConfigError, PolicyError, UnknownPolicy
from host_agent.model import (
    STRENGTH,
    DiskRef,
    Instruction,
    InstructionKind,
    PathSelection,
    Plan,
    Policy,
    UnitKind,
    WorkUnit,
    base_name,
)
from host_agent.planning.chain import (
    HostContext,
    Planner,
    PlanningPolicy,
    PlanResult,
    available_policies,
    build_chain,
    load_policy,
    parse_chain,
    parse_policy_options,
)
from host_agent.planning.hostload import HostLoad
from host_agent.planning.merge import Merge
from host_agent.planning.passthrough import Passthrough
from host_agent.planning.timing import Timing, TimingConfig

NOW = 1_700_000_000.0  # 2023-11-14 22:13:20 UTC
IDLE = HostLoad(load1=0.1, load5=0.1, load15=0.1, cpu_count=4, cpu_some_avg10=1.0, io_some_avg10=1.0)
BUSY = HostLoad(load1=0.1, load5=0.1, load15=0.1, cpu_count=4, cpu_some_avg10=85.0, io_some_avg10=1.0)
BASE = "/var/lib/libvirt/images/debian-12.qcow2"


def disk(domain: str, serial: str = "s1", target: str = "vda", chain: tuple[str, ...] = (),
         path: str | None = None) -> DiskRef:
    return DiskRef(domain_uuid=f"uuid-{domain}", domain_name=domain, serial=serial, target=target,
                   path=path or f"/var/lib/libvirt/images/{domain}-{serial}.qcow2",
                   format="qcow2" if chain else "raw", size=1 << 30, backing_chain=chain)


def backup(id: str, *disks: DiskRef, policy: Policy = Policy.INCREMENTAL, destination: str = "default",
           received_at: float = NOW - 10) -> Instruction:
    return Instruction(id=id, domain_uuid=disks[0].domain_uuid if disks else "uuid-x", request_id=f"r-{id}",
                       kind=InstructionKind.BACKUP, disks=disks, destination=destination, policy=policy,
                       received_at=received_at)


def restore(id: str, *disks: DiskRef, snapshot: str = "latest", destination: str = "default") -> Instruction:
    return replace(backup(id, *disks, destination=destination), kind=InstructionKind.RESTORE,
                   snapshot=snapshot)


def plan(batch: Sequence[Instruction], chain: Sequence[PlanningPolicy] | str = "merge,timing",
         context: HostContext | None = None) -> PlanResult:
    policies = build_chain(parse_chain(chain)) if isinstance(chain, str) else chain
    return Planner(policies).plan(batch, context or HostContext("host-a", NOW, IDLE))


def units_of(result: PlanResult, kind: UnitKind) -> list[WorkUnit]:
    return [u for u in result.plan.units if u.kind is kind]


# --------------------------------------------------------------------------- the invariant

def assert_every_instruction_served_or_rejected(batch: Sequence[Instruction], result: PlanResult) -> None:
    ids = {i.id for i in batch}
    rejected = {r.instruction_id for r in result.rejections}
    assert rejected <= ids and all(r.reason for r in result.rejections)
    units = result.plan.units
    unit_ids = [u.id for u in units]
    assert len(set(unit_ids)) == len(unit_ids), "unit ids repeat"
    for u in units:
        assert set(u.depends_on) <= set(unit_ids)
        assert u.satisfies and set(u.satisfies) <= ids - rejected
    tuple(graphlib.TopologicalSorter({u.id: u.depends_on for u in units}).static_order())  # no cycle
    for instruction in batch:
        served = [u for u in units if instruction.id in u.satisfies]
        assert bool(served) != (instruction.id in rejected), instruction
        wanted = instruction.unit_kind
        for d in instruction.disks if served else ():
            mine = [u for u in served if u.kind is wanted and u.disk is not None and u.destination ==
                    instruction.destination and u.snapshot_name == instruction.snapshot_name(d)]
            assert mine, f"{instruction.id}: no unit for disk {d.serial}"
            if wanted is UnitKind.BACKUP_DISK:
                assert max(STRENGTH[u.policy] for u in mine) >= STRENGTH[instruction.policy]
            if instruction.paths is not None:
                assert any(u.paths is not None and u.paths.covers(instruction.paths) for u in mine)


DOMAINS = ("web1", "web2", "db")
CHAINS = [(), ("/img/base-a.qcow2",), ("/img/mid.qcow2", "/img/base-a.qcow2"), ("/img/./base-a.qcow2",),
          ("/img/base-b.qcow2",), ("/img/other/../base-b.qcow2", "/img/root.qcow2")]
MAX_DEFER = 1800.0


@st.composite
def batches(draw: st.DrawFn) -> list[Instruction]:
    chain_of = {(d, s): draw(st.sampled_from(CHAINS)) for d in DOMAINS for s in ("s1", "s2")}
    batch = []
    for n in range(draw(st.integers(0, 12))):
        domain = draw(st.sampled_from(DOMAINS))
        serials = draw(st.lists(st.sampled_from(["s1", "s2"]), max_size=2, unique=True))
        kind = draw(st.sampled_from(InstructionKind))
        snapshot = draw(st.sampled_from(["", "latest", "snap-1"])) if kind is InstructionKind.RESTORE else ""
        paths = None
        if kind is InstructionKind.BACKUP and draw(st.booleans()):
            asked = draw(st.lists(st.sampled_from(["/usr/lib", "/etc", "/srv"]), min_size=1, unique=True))
            paths = PathSelection(draw(st.sampled_from([0, 2])), tuple(asked))
        batch.append(Instruction(
            id=f"i{n}", domain_uuid=f"uuid-{domain}", request_id=f"r{n}", kind=kind,
            disks=tuple(disk(domain, s, f"vd{s[-1]}", chain_of[(domain, s)]) for s in serials),
            destination=draw(st.sampled_from(["default", "offsite"])), policy=draw(st.sampled_from(Policy)),
            snapshot=snapshot, paths=paths,
            received_at=draw(st.sampled_from([0.0, NOW - 7200, NOW - MAX_DEFER, NOW - 60, NOW]))))
    return batch


@st.composite
def contexts(draw: st.DrawFn) -> HostContext:
    load = draw(st.none() | st.builds(
        HostLoad, st.floats(0, 16), st.floats(0, 16), st.floats(0, 16), st.integers(1, 8),
        st.none() | st.floats(0, 100), st.none() | st.floats(0, 100)))
    known = draw(st.frozensets(st.tuples(st.sampled_from(["default", "offsite"]),
                                         st.sampled_from([base_name(p) for c in CHAINS for p in c]))))
    return HostContext("host-a", NOW, load, known, draw(st.none() | st.integers(-12 * 3600, 14 * 3600)))


POLICY_CHAINS = ["passthrough", "merge", "timing", "merge,timing", "timing,merge", "merge,merge",
                 "passthrough,merge,timing,merge"]


@pytest.mark.parametrize("chain", POLICY_CHAINS)
def test_every_instruction_is_served_or_rejected_by_every_chain(chain: str) -> None:
    options = {"timing": {"window": "01:00-05:00", "max_defer": "30m"}} if "timing" in chain else {}
    policies = build_chain(parse_chain(chain), options)

    @settings(max_examples=100, deadline=None)
    @given(batch=batches(), context=contexts())
    def check(batch: list[Instruction], context: HostContext) -> None:
        result = Planner(policies).plan(batch, context)
        assert result.plan.policy == chain
        assert_every_instruction_served_or_rejected(batch, result)
        received = {i.id: i.received_at for i in batch}
        for u in result.plan.units:  # never starved: nothing waits past max_defer
            assert u.not_before <= max(NOW, min(received[i] for i in u.satisfies) + MAX_DEFER)

    check()


# --------------------------------------------------------------------------- checking and rejecting

def test_instructions_that_cannot_be_done_are_rejected_with_a_reason() -> None:
    web = disk("web1")
    batch = [backup("no-disk"), restore("no-snapshot", web, snapshot=""), restore("first", web),
             restore("conflict", web, snapshot="snap-7"), restore("same-again", web),
             backup("fine", disk("db"))]
    result = plan(batch)
    reasons = {r.instruction_id: r.reason for r in result.rejections}
    assert set(reasons) == {"no-disk", "no-snapshot", "conflict"}
    assert "names no disk" in reasons["no-disk"]
    assert "names no snapshot" in reasons["no-snapshot"]
    assert "already being restored from 'latest'" in reasons["conflict"] and "r-first" in reasons["conflict"]
    assert_every_instruction_served_or_rejected(batch, result)


@pytest.mark.parametrize("batch, message", [
    ([backup("a", disk("web1")), backup("a", disk("web2"))], "the id appears twice"),
    ([backup("", disk("web1"))], "the id is empty"),
    ([replace(backup("a", disk("web1")), domain_uuid="uuid-web2")], "belongs to domain 'uuid-web1'"),
    ([backup("a", disk("web1"), disk("web1", target="vdb"))], "serial 's1' appears twice"),
    ([backup("a", disk("web1"), destination="")], "destination is empty"),
    ([backup("a", disk("web1", chain=("/b.qcow2", "/b.qcow2")))], "names an image twice"),
    ([backup("a", replace(disk("web1"), path=""))], "empty serial or path"),
    ([backup("a", disk("web1"), received_at=float("nan"))], "is not a time"),
])
def test_a_malformed_batch_is_refused_whole_saying_what_is_wrong(batch: list[Instruction],
                                                                  message: str) -> None:
    with pytest.raises(MalformedBatch, match=message):
        plan(batch)


def test_a_batch_over_the_limit_is_malformed() -> None:
    batch = [backup(f"i{n}", disk(f"vm{n}")) for n in range(3)]
    with pytest.raises(MalformedBatch, match="at most 2"):
        Planner([Merge()], max_batch=2).plan(batch, HostContext("h", NOW))


def test_a_policy_that_loses_an_instruction_is_caught() -> None:
    class Forgetful(PlanningPolicy):
        name = "forgetful"

        def apply(self, plan: Plan, batch: Sequence[Instruction], context: HostContext) -> Plan:
            return replace(plan, units=plan.units[1:])

    with pytest.raises(PolicyError, match="no backup-disk unit serves disk vda of web1 of instruction a"):
        plan([backup("a", disk("web1")), backup("b", disk("web2"))], [Forgetful()])


# --------------------------------------------------------------------------- passthrough

def test_passthrough_is_one_unit_per_disk_per_instruction_in_order() -> None:
    batch = [backup("a", disk("web1"), disk("web1", "s2", "vdb")), backup("b", disk("web1")),
             restore("c", disk("db"))]
    result = plan(batch, "passthrough")
    assert [(u.satisfies, u.disk and u.disk.target, u.kind) for u in result.plan.units] == [
        (("a",), "vda", UnitKind.BACKUP_DISK), (("a",), "vdb", UnitKind.BACKUP_DISK),
        (("b",), "vda", UnitKind.BACKUP_DISK), (("c",), "vda", UnitKind.RESTORE_DISK)]
    some_plan = result.plan
    assert Passthrough().apply(some_plan, batch, HostContext("h", NOW)) is some_plan


# --------------------------------------------------------------------------- merge

def test_merge_collapses_duplicate_requests_and_the_strongest_policy_wins() -> None:
    web = disk("web1")
    batch = [backup("a", web), backup("b", web, policy=Policy.FULL),
             backup("c", web, policy=Policy.DIFFERENTIAL), backup("d", web, destination="offsite")]
    result = plan(batch, "merge")
    default, offsite = units_of(result, UnitKind.BACKUP_DISK)
    assert default.satisfies == ("a", "b", "c") and default.policy is Policy.FULL
    assert "one unit for 3 requests (a, b, c)" in default.reason
    assert offsite.satisfies == ("d",) and offsite.policy is Policy.INCREMENTAL


def test_merge_folds_path_requests_of_one_file_system_into_one_unit_storing_every_path() -> None:
    web = disk("web1")
    lib, etc = PathSelection(2, ("/usr/lib",)), PathSelection(2, ("/etc", "/usr/lib"))
    batch = [replace(backup("a", web), paths=lib), replace(backup("b", web), paths=etc),
             replace(backup("c", web), paths=PathSelection(1, ("/boot",))), backup("d", web)]
    result = plan(batch, "merge")
    second, first = units_of(result, UnitKind.BACKUP_PATHS)
    assert second.satisfies == ("a", "b") and second.paths == PathSelection(2, ("/usr/lib", "/etc"))
    assert second.snapshot_name == "uuid-web1/s1/paths-2" and "/usr/lib, /etc" in second.reason
    assert first.satisfies == ("c",) and first.snapshot_name == "uuid-web1/s1/paths-1"
    [whole] = units_of(result, UnitKind.BACKUP_DISK)
    assert whole.satisfies == ("d",) and whole.snapshot_name == "uuid-web1/s1"


def test_merged_path_units_store_each_path_once_and_never_more_than_the_limit() -> None:
    web = disk("web1")
    nested = [replace(backup("a", web), paths=PathSelection(0, ("/usr/lib", "/etc"))),
              replace(backup("b", web), paths=PathSelection(0, ("/usr",)))]
    [unit] = units_of(plan(nested, "merge"), UnitKind.BACKUP_PATHS)
    assert unit.paths == PathSelection(0, ("/etc", "/usr")) and unit.satisfies == ("a", "b")

    many = [replace(backup(f"m{n}", web), paths=PathSelection(0, tuple(f"/d{n}/{i}" for i in range(40))))
            for n in range(3)]
    units = units_of(plan(many, "merge"), UnitKind.BACKUP_PATHS)
    assert [u.satisfies for u in units] == [("m0",), ("m1",), ("m2",)]  # 80 paths would pass the limit


def test_a_plan_that_drops_a_path_asked_for_is_caught() -> None:
    class DropsPaths(Passthrough):
        def apply(self, plan: Plan, batch: Sequence[Instruction], context: HostContext) -> Plan:
            return replace(plan, units=tuple(replace(u, paths=replace(u.paths, paths=u.paths.paths[:1]))
                                             if u.paths else u for u in plan.units))

    asked = replace(backup("a", disk("web1")), paths=PathSelection(0, ("/usr/lib", "/etc")))
    with pytest.raises(PolicyError, match="asked for paths /usr/lib, /etc"):
        plan([asked], [DropsPaths()])


def test_a_path_request_for_several_disks_is_rejected() -> None:
    asked = replace(backup("a", disk("web1"), disk("web1", "s2")), paths=PathSelection(0, ("/etc",)))
    assert [r.reason for r in plan([asked]).rejections] == [
        "a path-level backup names one disk and at least one path"]


def test_merge_reads_a_base_shared_by_two_clones_once() -> None:
    web1, web2 = disk("web1", chain=(BASE,)), disk("web2", chain=(BASE,))
    result = plan([backup("a", web1), backup("b", web2)], "merge")
    [base] = units_of(result, UnitKind.BACKUP_BASE)
    disks = units_of(result, UnitKind.BACKUP_DISK)
    assert base.source == BASE and base.snapshot_name == base_name(BASE) and base.policy is Policy.FULL
    assert base.snapshot_name.startswith("base/") and len(base.snapshot_name) == len("base/") + 16
    assert base.disk is None and set(base.satisfies) == {"a", "b"}
    assert BASE in base.reason and "vda of web1" in base.reason and "vda of web2" in base.reason
    assert [u.depends_on for u in disks] == [(base.id,), (base.id,)]
    assert result.plan.units[0] == base  # dependencies come first


def test_merge_compares_backing_paths_after_normalizing_them() -> None:
    web1 = disk("web1", chain=("/images/./base.qcow2",))
    web2 = disk("web2", chain=("/images/x/../base.qcow2",))
    [base] = units_of(plan([backup("a", web1), backup("b", web2)], "merge"), UnitKind.BACKUP_BASE)
    assert base.source == "/images/base.qcow2"


def test_merge_does_not_make_a_base_of_an_image_only_one_disk_uses() -> None:
    web = disk("web1", chain=(BASE,))
    result = plan([backup("a", web), backup("b", web)], "merge")
    assert units_of(result, UnitKind.BACKUP_BASE) == []
    assert [u.satisfies for u in result.plan.units] == [("a", "b")]


def test_merge_builds_on_a_stored_base_without_reading_it_again() -> None:
    context = HostContext("h", NOW, known_bases=frozenset({("default", base_name(BASE))}))
    result = plan([backup("a", disk("web1", chain=(BASE,)))], "merge", context)
    [unit] = result.plan.units
    assert unit.kind is UnitKind.BACKUP_DISK and unit.depends_on == ()
    assert f"builds on {base_name(BASE)}, the stored base {BASE}" in unit.reason


def test_merge_makes_a_base_per_destination() -> None:
    batch = [backup("a", disk("web1", chain=(BASE,))), backup("b", disk("web2", chain=(BASE,))),
             backup("c", disk("web1", chain=(BASE,)), destination="offsite")]
    bases = units_of(plan(batch, "merge"), UnitKind.BACKUP_BASE)
    assert [(b.destination, b.satisfies) for b in bases] == [("default", ("a", "b"))]


def test_merge_stacks_nested_bases_root_first() -> None:
    mid, root = "/img/mid.qcow2", "/img/root.qcow2"
    batch = [backup("a", disk("web1", chain=(mid, root))), backup("b", disk("web2", chain=(mid, root))),
             backup("c", disk("db", chain=(root,)))]
    result = plan(batch, "merge")
    root_unit, mid_unit = units_of(result, UnitKind.BACKUP_BASE)
    assert (root_unit.source, mid_unit.source) == (root, mid)
    assert mid_unit.depends_on == (root_unit.id,) and set(root_unit.satisfies) == {"a", "b", "c"}
    web1, web2, db = units_of(result, UnitKind.BACKUP_DISK)
    assert web1.depends_on == web2.depends_on == (mid_unit.id,) and db.depends_on == (root_unit.id,)


def test_merge_twice_is_merge_once() -> None:
    batch = [backup("a", disk("web1", chain=(BASE,))), backup("b", disk("web2", chain=(BASE,))),
             backup("c", disk("web2", chain=(BASE,)))]
    assert plan(batch, "merge,merge").plan.units == plan(batch, "merge").plan.units


def test_merge_keeps_the_order_of_a_disk_both_restored_and_backed_up() -> None:
    web = disk("web1")
    result = plan([backup("a", web), restore("b", web), backup("c", web)], "merge")
    first, restored, last = result.plan.units
    assert [u.satisfies for u in result.plan.units] == [("a",), ("b",), ("c",)]
    assert restored.depends_on == (first.id,) and last.depends_on == (restored.id,)


# --------------------------------------------------------------------------- timing

def busy_context() -> HostContext:
    return HostContext("host-a", NOW, BUSY)


def test_timing_defers_backups_while_the_host_is_busy() -> None:
    result = plan([backup("a", disk("web1")), restore("b", disk("db"))], "timing", busy_context())
    deferred, restored = result.plan.units
    assert deferred.not_before == NOW + 60
    assert "CPU pressure 85.0% > 40%" in deferred.reason and "deferred 60s" in deferred.reason
    assert restored.not_before == 0.0, "restores are never deferred"
    assert any("1 unit(s) deferred" in n for n in result.plan.notes)


@pytest.mark.parametrize("load, why", [
    (replace(IDLE, io_some_avg10=55.0), "IO pressure 55.0% > 30%"),
    (replace(IDLE, load1=9.0, cpu_some_avg10=None, io_some_avg10=None), "load 2.25 per CPU > 1.5"),
])
def test_timing_judges_io_pressure_and_load_per_cpu(load: HostLoad, why: str) -> None:
    [unit] = plan([backup("a", disk("web1"))], "timing", HostContext("h", NOW, load)).plan.units
    assert unit.not_before == NOW + 60 and why in unit.reason


def test_timing_does_not_defer_an_idle_host_or_one_that_sent_no_reading() -> None:
    for load in (IDLE, None):
        [unit] = plan([backup("a", disk("web1"))], "timing", HostContext("h", NOW, load)).plan.units
        assert unit.not_before == 0.0 and unit.reason == ""


def test_timing_releases_a_unit_that_waited_max_defer_whatever_the_load() -> None:
    batch = [backup("old", disk("web1"), received_at=NOW - 31 * 60), backup("new", disk("web2"))]
    old, new = plan(batch, "timing", busy_context()).plan.units
    assert old.not_before == 0.0
    assert "released although CPU pressure 85.0% > 40%: waited 31m00s, max_defer is 30m00s" in old.reason
    assert new.not_before == NOW + 60


def test_timing_never_defers_past_max_defer() -> None:
    [unit] = plan([backup("a", disk("web1"), received_at=NOW - 1790)], "timing", busy_context()).plan.units
    assert unit.not_before == NOW + 10  # the re-evaluation at which it will be released


def test_timing_honours_the_backup_window_in_the_hosts_local_time() -> None:
    timing = Timing.from_options({"window": "22:00-06:00", "recheck": "2m"})
    batch = [backup("a", disk("web1"))]
    inside = HostContext("h", NOW, IDLE, utc_offset=0)          # 22:13 at the host
    outside = HostContext("h", NOW, IDLE, utc_offset=-6 * 3600)  # 16:13 at the host
    assert plan(batch, [timing], inside).plan.units[0].not_before == 0.0
    [unit] = plan(batch, [timing], outside).plan.units
    assert unit.not_before == NOW + 120 and "outside the backup window 22:00-06:00" in unit.reason


def test_timing_options_are_parsed_once_into_its_configuration() -> None:
    timing = Timing.from_options({"cpu_pressure": "off", "io_pressure": "12.5", "max_defer": "1.5h",
                                  "window": "08:30-17:00"})
    assert timing.config.cpu_pressure == float("inf") and timing.config.io_pressure == 12.5
    assert timing.config.max_defer == 5400 and str(timing.config.window) == "08:30-17:00"
    assert Timing().config == TimingConfig()


@pytest.mark.parametrize("options, message", [
    ({"window": "25:00-06:00"}, "not a window"),
    ({"max_defer": "soon"}, "not a duration"),
    ({"cpu_pressure": "-1"}, "negative"),
    ({"recheck": "0"}, "recheck must be more than 0"),
    ({"colour": "blue"}, "no option 'colour'"),
])
def test_bad_timing_options_are_configuration_errors(options: dict[str, str], message: str) -> None:
    with pytest.raises(OptimizerConfigError, match=message):
        Timing.from_options(options)


# --------------------------------------------------------------------------- loading by name

def test_the_built_in_policies_are_found_through_entry_points() -> None:
    assert {"passthrough", "merge", "timing"} <= set(available_policies())
    assert [load_policy(n) for n in ("passthrough", "merge", "timing")] == [Passthrough, Merge, Timing]
    chain = build_chain(parse_chain("merge, timing"), parse_policy_options(["timing.max_defer=1h"]))
    assert [type(p) for p in chain] == [Merge, Timing]
    assert isinstance(chain[1], Timing) and chain[1].config.max_defer == 3600


def test_an_unknown_policy_name_is_a_clear_error() -> None:
    with pytest.raises(UnknownPolicy, match=r"no policy named 'fastest' is installed \(available: .*merge"):
        build_chain(["merge", "fastest"])


@pytest.mark.parametrize("call, message", [
    (lambda: parse_chain("merge,,timing"), "expected names separated by commas"),
    (lambda: parse_policy_options(["max_defer=1h"]), "expected POLICY.KEY=VALUE"),
    (lambda: build_chain(["merge"], {"timing": {"max_defer": "1h"}}), "not in the chain: timing"),
    (lambda: build_chain(["merge"], {"merge": {"x": "1"}}), "'merge' takes no options"),
    (lambda: Planner([]), "chain is empty"),
])
def test_bad_chains_and_options_are_configuration_errors(call: object, message: str) -> None:
    assert callable(call)
    with pytest.raises(OptimizerConfigError, match=message):
        call()


def test_posix_normalization_is_what_merge_compares() -> None:
    assert base_name("/a/./b/../c.qcow2") == base_name(posixpath.normpath("/a/c.qcow2"))
