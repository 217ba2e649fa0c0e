"""The colocate policy: for a backup whose media sit on another host it predicts the LAN bytes of
streaming and of moving the VM there and back, picks the smaller, says why; operators can force
either; a VM that cannot move streams; cold moves only when allowed or forced. Also the inventory."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from test_policies import NOW, backup, build_chain, disk, parse_chain, restore

from host_agent import errors
from host_agent.config import load
from host_agent.errors import OptimizerConfigError
from host_agent.model import ApplianceFootprint, Placement, Policy, UnitKind, VmFootprint
from host_agent.planning.chain import HostContext, Planner
from host_agent.planning.colocate import Colocate, ColocateConfig, parse_rate
from host_agent.planning.service import request_from_pb, request_to_pb, result_from_pb, result_to_pb

MB = 10**6
GIB = 1 << 30


def footprint(uuid: str = "uuid-vm1", touched: int = 100 * MB, dirty: float = 0.0, live: bool = True,
              movable: bool = True, why: str = "") -> VmFootprint:
    return VmFootprint(uuid, GIB, touched, dirty, live, movable, why)


def context(*footprints: VmFootprint, held: dict[tuple[str, str], int] | None = None) -> HostContext:
    return HostContext("host-a", NOW, None, footprints={f.domain_uuid: f for f in footprints},
                       remote_destinations={"offsite": "host-b"}, held=held or {})


def data_disk(allocated: int) -> object:
    return replace(disk("vm1"), allocated=allocated)


def plan_units(batch: list, ctx: HostContext, chain: str = "merge,colocate,timing", **options: str) -> list:
    policies = build_chain(parse_chain(chain), {"colocate": options} if options else None)
    result = Planner(policies).plan(batch, ctx)
    return [u for u in result.plan.units if u.kind is UnitKind.BACKUP_DISK]


def test_big_data_and_a_small_vm_migrate_with_both_predictions_in_the_reason() -> None:
    [unit] = plan_units([backup("1", data_disk(1000 * MB), destination="offsite", policy=Policy.FULL)],
                        context(footprint(touched=100 * MB)))
    assert unit.placement is Placement.MIGRATE and unit.target_host == "host-b"
    assert unit.predicted_stream_bytes == round(1000 * MB * 1.03)
    assert unit.predicted_move_bytes == round(2 * 100 * MB * 1.02)
    assert "migrate to host-b" in unit.reason and "1.0 GB" in unit.reason and "204.0 MB" in unit.reason


def test_little_data_streams() -> None:
    [unit] = plan_units([backup("1", data_disk(50 * MB), destination="offsite", policy=Policy.FULL)],
                        context(footprint(touched=100 * MB)))
    assert unit.placement is Placement.STREAM and "streaming crosses the LAN less" in unit.reason


def test_an_incremental_is_priced_by_what_the_destination_last_stored() -> None:
    held = {("offsite", "uuid-vm1/s1"): 5 * MB}
    [unit] = plan_units([backup("1", data_disk(1000 * MB), destination="offsite")],
                        context(footprint(), held=held))
    assert unit.predicted_stream_bytes == round(5 * MB * 1.03) and unit.placement is Placement.STREAM


def test_the_dirty_rate_adds_what_the_guest_rewrites_during_the_copy() -> None:
    # 100 MB at 125 MB/s take 0.8 s, during which a 50 MB/s guest dirties 40 MB more, each way
    [unit] = plan_units([backup("1", data_disk(1000 * MB), destination="offsite", policy=Policy.FULL)],
                        context(footprint(touched=100 * MB, dirty=50 * MB)))
    assert unit.predicted_move_bytes == round(2 * 140 * MB * 1.02)


def test_operators_force_either_way() -> None:
    big = backup("1", data_disk(1000 * MB), destination="offsite", policy=Policy.FULL)
    [unit] = plan_units([replace(big, placement=Placement.STREAM)], context(footprint()))
    assert unit.placement is Placement.STREAM and "forced" in unit.reason
    small = backup("2", data_disk(1 * MB), destination="offsite", policy=Policy.FULL)
    [unit] = plan_units([small], context(footprint()), force="migrate")
    assert unit.placement is Placement.MIGRATE and "forced" in unit.reason


def test_a_vm_that_cannot_move_streams_even_when_forced() -> None:
    stuck = footprint(movable=False, why="disk /local/vm1.img is not on shared storage")
    [unit] = plan_units([replace(backup("1", data_disk(1000 * MB), destination="offsite"),
                                 placement=Placement.MIGRATE)], context(stuck))
    assert unit.placement is Placement.STREAM and "/local/vm1.img" in unit.reason


def test_a_vm_that_cannot_live_migrate_moves_cold_only_when_allowed_or_forced() -> None:
    pinned = footprint(live=False, why="1 host device(s) passed through")
    batch = [backup("1", data_disk(1000 * MB), destination="offsite", policy=Policy.FULL)]
    [unit] = plan_units(batch, context(pinned))
    assert unit.placement is Placement.STREAM and "allow_cold_moves is off" in unit.reason
    [unit] = plan_units(batch, context(pinned), allow_cold_moves="yes")
    assert unit.placement is Placement.COLD_MOVE and unit.predicted_move_bytes == 0
    [unit] = plan_units([replace(batch[0], placement=Placement.MIGRATE)], context(pinned))
    assert unit.placement is Placement.COLD_MOVE


def test_local_destinations_are_left_alone_and_remote_restores_stream() -> None:
    units = plan_units([backup("1", data_disk(1000 * MB)), restore("2", disk("vm2"), destination="offsite")],
                       context(footprint()))
    assert [u.placement for u in units] == [Placement.LOCAL]
    result = Planner(build_chain(["merge", "colocate"])).plan(
        [restore("2", disk("vm2"), destination="offsite")], context())
    assert [u.placement for u in result.plan.units] == [Placement.STREAM]


def test_a_vm_without_footprint_streams() -> None:
    [unit] = plan_units([backup("1", data_disk(1000 * MB), destination="offsite")], context())
    assert unit.placement is Placement.STREAM and "no footprint" in unit.reason


def test_placements_and_facts_survive_the_wire() -> None:
    batch = [replace(backup("1", data_disk(1000 * MB), destination="offsite"), placement=Placement.MIGRATE)]
    ctx = context(footprint(dirty=3.5), held={("offsite", "uuid-vm1/s1"): 7})
    again, ctx2 = request_from_pb(request_to_pb(batch, ctx), NOW)
    assert again == batch and ctx2.footprints == ctx.footprints and ctx2.held == ctx.held
    assert ctx2.remote_destinations == ctx.remote_destinations
    result = Planner([Colocate()]).plan(batch, ctx)
    assert result_from_pb(result_to_pb(result)) == result


@pytest.mark.parametrize(("options", "message"), [
    ({"margin": "1.5"}, "margin"), ({"force": "teleport"}, "force"), ({"lan_bandwidth": "fast"}, "rate"),
    ({"allow_cold_moves": "maybe"}, "yes or no"), ({"speed": "1"}, "no option 'speed'")])
def test_bad_options_are_refused_with_the_reason(options: dict[str, str], message: str) -> None:
    with pytest.raises(OptimizerConfigError, match=message):
        Colocate.from_options(options)


def test_rates_read_bytes_and_bits() -> None:
    assert parse_rate("125M") == 125e6 and parse_rate("1Gbit") == 125e6 and parse_rate("10") == 10
    assert Colocate.from_options({"lan_bandwidth": "10Gbit"}).config == ColocateConfig(lan_bandwidth=1.25e9)


# --------------------------------------------------------------------------- the inventory

INVENTORY = """
host_name = "hosta"
shared_storage = ["/srv/vms/"]
[repositories]
default = "/var/lib/hyperback/repo"
[hosts.hosta]
libvirt_uri = "qemu+ssh://hosta/system"
agent = "10.0.0.1:7411"
lan_ip = "10.0.0.1"
[hosts.hostb]
libvirt_uri = "qemu+ssh://hostb/system"
agent = "10.0.0.2:7411"
lan_ip = "10.0.0.2"
[media.offsite]
host = "hostb"
service = "10.0.0.100:7420"
path = "/srv/backup/offsite"
"""


def test_the_inventory_names_hosts_media_and_shared_storage(tmp_path: Path) -> None:
    (tmp_path / "agent.toml").write_text(INVENTORY)
    config = load(tmp_path / "agent.toml", env={})
    inv = config.inventory
    assert inv.this_host.lan_ip == "10.0.0.1" and inv.remote_destinations() == {"offsite": "hostb"}
    assert config.destinations == {"default", "offsite"}
    assert inv.shared("/srv/vms/a/vm1.img") and not inv.shared("/srv/vmsX/vm1.img")
    assert not inv.shared("/srv/vms/../etc/passwd")
    with pytest.raises(errors.UsageError, match="media service at 10.0.0.100:7420"):
        config.repository("offsite")
    on_b = load(tmp_path / "agent.toml", env={"HYPERBACK_HOST_NAME": "hostb"})
    assert on_b.repository("offsite") == Path("/srv/backup/offsite")
    assert not on_b.inventory.is_remote("offsite")


@pytest.mark.parametrize(("change", "message"), [
    (('lan_ip = "10.0.0.2"', 'lan_ip = "10.0.0.2"\nbogus = "1"'), "unknown setting"),
    (('host = "hostb"', 'host = "hostc"'), "not in \\[hosts\\]"),
    (('service = "10.0.0.100:7420"', 'service = "10.0.0.100"'), "IP:PORT"),
    (('host_name = "hosta"', 'host_name = "hostz"'), "host_name 'hostz' is not in"),
    (('shared_storage = ["/srv/vms/"]', 'shared_storage = ["srv"]'), "absolute"),
])
def test_a_broken_inventory_is_refused_with_what_to_fix(tmp_path: Path, change: tuple[str, str],
                                                          message: str) -> None:
    (tmp_path / "agent.toml").write_text(INVENTORY.replace(*change, 1))
    with pytest.raises(errors.UsageError, match=message):
        load(tmp_path / "agent.toml", env={})


# --------------------------------------------------------------------------- backup appliances

def vm_disk(name: str, allocated: int) -> object:
    return replace(disk(name), allocated=allocated)


def appliance_context(appliance: VmFootprint, *vms: VmFootprint) -> HostContext:
    """host-a's VMs back up to "vault", served by appliance "app1" that runs on host-b now."""
    return HostContext("host-a", NOW, None, footprints={f.domain_uuid: f for f in vms},
                       remote_destinations={"vault": "host-b"},
                       appliances={"vault": ApplianceFootprint("vault", "app1", appliance)})


def test_one_appliance_move_serves_every_vm_that_would_otherwise_stream_or_migrate() -> None:
    # three VMs stream 300 MB each (too little to move one), together 927 MB; the appliance's 150 MB
    # of touched memory costs 306 MB here and away: it comes
    batch = [backup(str(n), vm_disk(f"vm{n}", 300 * MB), destination="vault", policy=Policy.FULL)
             for n in (1, 2, 3)]
    vms = [footprint(f"uuid-vm{n}", touched=400 * MB) for n in (1, 2, 3)]
    units = plan_units(batch, appliance_context(footprint("uuid-app", touched=150 * MB), *vms))
    assert [u.placement for u in units] == [Placement.APPLIANCE] * 3
    assert {u.target_host for u in units} == {"host-a"}
    assert {u.predicted_move_bytes for u in units} == {round(2 * 150 * MB * 1.02)}
    assert "bring app1 from host-b to host-a" in units[0].reason and "927.0 MB" in units[0].reason


def test_an_appliance_stays_when_one_small_backup_needs_it() -> None:
    batch = [backup("1", vm_disk("vm1", 50 * MB), destination="vault", policy=Policy.FULL)]
    [unit] = plan_units(batch, appliance_context(footprint("uuid-app", touched=150 * MB),
                                                 footprint("uuid-vm1", touched=400 * MB)))
    assert unit.placement is Placement.STREAM and unit.target_host == "host-b"


def test_operators_bring_the_appliance_unless_it_cannot_live_migrate() -> None:
    wanted = replace(backup("1", vm_disk("vm1", 50 * MB), destination="vault", policy=Policy.FULL),
                     placement=Placement.APPLIANCE)
    vm = footprint("uuid-vm1", touched=400 * MB)
    [unit] = plan_units([wanted], appliance_context(footprint("uuid-app"), vm))
    assert unit.placement is Placement.APPLIANCE and "forced by the operator" in unit.reason
    pinned = footprint("uuid-app", live=False, why="1 host device(s) passed through")
    result = Planner(build_chain(parse_chain("merge,colocate"))).plan([wanted], appliance_context(pinned, vm))
    assert [u.placement for u in result.plan.units] == [Placement.STREAM]
    assert any("app1 cannot live-migrate (1 host device(s)" in n for n in result.plan.notes)
    forcing = plan_units([replace(wanted, placement=Placement.AUTO)],
                         appliance_context(footprint("uuid-app"), vm), force="appliance")
    assert [u.placement for u in forcing] == [Placement.APPLIANCE]


def test_appliance_facts_and_placements_survive_the_wire() -> None:
    batch = [backup("1", vm_disk("vm1", 300 * MB), destination="vault")]
    ctx = appliance_context(footprint("uuid-app", dirty=2.5), footprint("uuid-vm1"))
    again, ctx2 = request_from_pb(request_to_pb(batch, ctx), NOW)
    assert ctx2.appliances == ctx.appliances
    result = Planner([Colocate(ColocateConfig(force=Placement.APPLIANCE))]).plan(batch, ctx)
    assert result_from_pb(result_to_pb(result)) == result


APPLIANCE_INVENTORY = INVENTORY + """
[appliances.app1]
domain = "backup-appliance"
home = "hostb"
service = "10.0.0.200:7420"
tap = "hbapp0"
[media.vault]
appliance = "app1"
"""


def test_media_served_by_an_appliance_are_where_it_runs_and_always_reached_by_its_service(
        tmp_path: Path) -> None:
    (tmp_path / "agent.toml").write_text(APPLIANCE_INVENTORY)
    for host in ("hosta", "hostb"):
        config = load(tmp_path / "agent.toml", env={"HYPERBACK_HOST_NAME": host})
        app = config.inventory.appliance_of("vault")
        assert app is not None and (app.domain, app.ip, app.tap) == ("backup-appliance", "10.0.0.200",
                                                                     "hbapp0")
        assert "vault" not in config.inventory.remote_destinations()  # the agent locates it per batch
        with pytest.raises(errors.UsageError, match="appliance app1: reach it through its media service"):
            config.repository("vault")
    assert config.destinations == {"default", "offsite", "vault"}


@pytest.mark.parametrize(("change", "message"), [
    (('appliance = "app1"', 'appliance = "app2"'), "appliance 'app2' is not in \\[appliances\\]"),
    (('home = "hostb"', 'home = "hostc"'), "home 'hostc' is not in \\[hosts\\]"),
    (('tap = "hbapp0"', ''), "missing tap"),
])
def test_a_broken_appliance_entry_is_refused_with_what_to_fix(tmp_path: Path, change: tuple[str, str],
                                                                message: str) -> None:
    (tmp_path / "agent.toml").write_text(APPLIANCE_INVENTORY.replace(*change, 1))
    with pytest.raises(errors.UsageError, match=message):
        load(tmp_path / "agent.toml", env={})


def test_a_failed_move_tells_the_guest_what_happened_but_not_the_clusters_addresses() -> None:
    from host_agent.agent.guests import for_guest

    error = ("could not move vm1 to hostb: migrate vm1 qemu:///system -> qemu+tls://hostb/system via "
             "tcp://10.0.0.2:49152 failed: timed out after 2 s; it runs on hosta as before")
    assert for_guest(error) == ("could not move vm1 to hostb: migrate vm1 <uri> -> <uri> via <uri> failed: "
                                "timed out after 2 s; it runs on hosta as before")


def test_a_guest_dirtying_memory_near_the_lan_bandwidth_streams_for_migration_would_not_converge() -> None:
    big = backup("1", data_disk(1000 * MB), destination="offsite", policy=Policy.FULL)
    [unit] = plan_units([big], context(footprint(touched=100 * MB, dirty=70 * MB)))  # LAN: 125 MB/s
    assert unit.placement is Placement.STREAM and "would not converge" in unit.reason
    [forced] = plan_units([replace(big, placement=Placement.MIGRATE)],
                          context(footprint(touched=100 * MB, dirty=70 * MB)))
    assert forced.placement is Placement.MIGRATE


def qcow2_disk(allocated: int) -> object:
    return replace(disk("vm1"), format="qcow2", allocated=allocated)


def test_a_visits_incremental_of_a_qcow2_disk_is_predicted_to_read_the_dirty_extents() -> None:
    """The chain survives the visit (bitmaps in the image, checkpoint records in the domain's
    metadata): the backup there reads what changed, guessed like the stream from the last change."""
    held = {("offsite", "uuid-vm1/s1"): 5 * MB}
    [unit] = plan_units([backup("1", qcow2_disk(1000 * MB), destination="offsite")],
                        context(footprint(), held=held), force="migrate")
    assert unit.placement is Placement.MIGRATE and unit.predicted_read_bytes == 5 * MB
    assert "the backup reads 5.0 MB of the disks" in unit.reason


def test_a_visit_reads_a_raw_disk_whole_for_its_bitmap_stays_in_the_qemu_it_left() -> None:
    held = {("offsite", "uuid-vm1/s1"): 5 * MB}
    ctx = context(footprint(), held=held)
    [moved] = plan_units([backup("1", data_disk(1000 * MB), destination="offsite")], ctx, force="migrate")
    [streamed] = plan_units([backup("1", data_disk(1000 * MB), destination="offsite")], ctx, force="stream")
    assert (moved.predicted_read_bytes, streamed.predicted_read_bytes) == (1000 * MB, 5 * MB)


def test_a_full_backup_or_a_first_one_is_predicted_to_read_the_whole_disk() -> None:
    held = {("offsite", "uuid-vm1/s1"): 5 * MB}
    [full] = plan_units([backup("1", qcow2_disk(1000 * MB), destination="offsite", policy=Policy.FULL)],
                        context(footprint(), held=held), force="migrate")
    [first] = plan_units([backup("1", qcow2_disk(1000 * MB), destination="offsite")],
                         context(footprint()), force="migrate")
    assert full.predicted_read_bytes == first.predicted_read_bytes == 1000 * MB


def test_the_read_prediction_survives_the_wire() -> None:
    batch = [backup("1", qcow2_disk(1000 * MB), destination="offsite")]
    result = Planner([Colocate(ColocateConfig(force=Placement.MIGRATE))]).plan(
        batch, context(footprint(), held={("offsite", "uuid-vm1/s1"): 7 * MB}))
    assert result.plan.units[0].predicted_read_bytes == 7 * MB
    assert result_from_pb(result_to_pb(result)) == result
