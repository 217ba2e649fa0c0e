"""What a guest may use and learn (host_agent.agent.guestrules, the guests' door): the ``[[guests]]``
rules of the agent's configuration (destination allow-lists, quotas), and the figures a guest is
told, which never depend on what other VMs stored. Real repositories, real files; the real-VM side
is tests/test_guest_isolation_vm.py."""
from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

import pytest

from guest_shim import protocol as p
from host_agent.agent.domains import DomainInfo
from host_agent.agent.guestrules import GuestRules, Quota, Usage, over_quota, own_snapshot, usage
from host_agent.agent.guests import result_message, snapshots_message
from host_agent.config import GuestRule, load, summary
from host_agent.errors import UsageError
from host_agent.model import ChangeDetection, DiskResult, Instruction, InstructionKind, Outcome, Policy
from host_agent.storage.repository import Repository
from host_agent.storage.snapshot import Snapshot

MIB = 1024 * 1024
ALL = frozenset({"default", "offsite", "vault"})


def domain(name: str, groups: tuple[str, ...] = ()) -> DomainInfo:
    return DomainInfo(str(uuid.uuid5(uuid.NAMESPACE_DNS, name)), name, True, "/run/x.sock", "connected", (),
                      groups=groups)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text('[repositories]\ndefault = "/srv/a"\noffsite = "/srv/b"\nvault = "/srv/c"\n' + text)
    return path


# --------------------------------------------------------------------------- configuration

def test_guests_tables_are_read_into_rules(tmp_path: Path) -> None:
    config = load(write(tmp_path, """
[[guests]]
match = "web-*"
destinations = ["default"]
max_bytes = 1073741824
[[guests]]
group = "gold"
domains = ["db1"]
destinations = ["offsite", "default"]
max_snapshots = 30
"""), env={})
    assert config.guests == (
        GuestRule(match="web-*", destinations=("default",), max_bytes=1 << 30),
        GuestRule(domains=("db1",), group="gold", destinations=("offsite", "default"), max_snapshots=30))


def test_check_config_counts_the_guest_rules(tmp_path: Path) -> None:
    config = load(write(tmp_path, '[[guests]]\nmatch = "*"\nmax_snapshots = 5\n'), env={})
    assert "1 guest rule(s)" in summary(config)


def test_no_guests_table_keeps_every_destination_open_to_every_guest(tmp_path: Path) -> None:
    config = load(write(tmp_path, ""), env={})
    rules = GuestRules(config.guests, config.destinations)
    assert config.guests == () and not rules.restrict_destinations
    assert rules.allowed(domain("anything")) == ALL
    assert rules.quota(domain("anything")) == Quota()


@pytest.mark.parametrize(("table", "says"), [
    ('match = "*"\ndestinations = ["nowhere"]',
     "no destination named 'nowhere'; known: default, offsite, vault"),
    ('destinations = ["default"]', "say which domains it covers"),
    ('match = "*"', "it limits nothing"),
    ('match = "*"\nmax_bytes = -1', "max_bytes must be 0 (no limit) or more"),
    ('match = "*"\nmax_snapshots = "ten"', "max_snapshots: expected an integer"),
    ('match = "*"\nquota = 3', "unknown setting 'quota'"),
    ('match = "*"\ndestinations = "default"', "destinations: expected a list of strings"),
])
def test_a_mistaken_guests_table_is_named_on_one_line(tmp_path: Path, table: str, says: str) -> None:
    with pytest.raises(UsageError) as raised:
        load(write(tmp_path, f"[[guests]]\n{table}\n"), env={})
    message = str(raised.value)
    assert message.startswith(f"config {tmp_path / 'agent.toml'}: guests[0]") and "\n" not in message
    assert says in message


# --------------------------------------------------------------------------- allow-lists and quotas

def test_a_domain_may_use_the_destinations_of_the_rules_covering_it() -> None:
    rules = GuestRules((GuestRule(match="web-*", destinations=("default",)),
                        GuestRule(domains=("web-2",), destinations=("offsite",)),
                        GuestRule(group="gold", destinations=("vault",)),
                        GuestRule(match="*", max_bytes=5)), ALL)
    assert rules.allowed(domain("web-1")) == {"default"}
    assert rules.allowed(domain("web-2")) == {"default", "offsite"}
    assert rules.allowed(domain("db", groups=("gold",))) == {"vault"}
    # covered only by a rule that names no destinations: every one, as without rules
    assert rules.allowed(domain("db")) == ALL
    by_uuid = GuestRules((GuestRule(domains=(domain("x").uuid,), destinations=("vault",)),), ALL)
    assert by_uuid.allowed(domain("x")) == {"vault"}


def test_the_smallest_quota_of_the_rules_covering_a_domain_holds() -> None:
    rules = GuestRules((GuestRule(match="*", max_bytes=100, max_snapshots=9),
                        GuestRule(domains=("tight",), max_bytes=10),
                        GuestRule(domains=("tight",), max_snapshots=20)), ALL)
    assert rules.quota(domain("tight")) == Quota(max_bytes=10, max_snapshots=9)
    assert rules.quota(domain("other")) == Quota(max_bytes=100, max_snapshots=9)
    assert GuestRules((GuestRule(match="x", destinations=("vault",)),), ALL).quota(domain("x")) == Quota()


def test_a_domains_own_snapshots_are_its_disks_and_their_paths_not_its_definition() -> None:
    me, other = str(uuid.uuid4()), str(uuid.uuid4())
    assert own_snapshot(f"{me}/hb-data", me)
    assert own_snapshot(f"{me}/hb-data/paths-2", me)
    assert own_snapshot(f"{me}/vm", me)  # a disk whose serial is "vm"
    assert not own_snapshot(f"{me}/vm/xml", me)  # its stored definition: the agent's
    assert not own_snapshot(f"{me}/hb-data/other", me)
    assert not own_snapshot(f"{other}/hb-data", me)
    assert not own_snapshot(f"{me}x/hb-data", me)


def test_over_the_snapshot_quota_says_what_it_keeps_and_what_to_do() -> None:
    assert over_quota(Quota(max_snapshots=3), Usage(0, 2), 1) is None
    why = over_quota(Quota(max_snapshots=3), Usage(0, 2), 2)
    assert why is not None and "keeps 2 snapshot(s)" in why and "may keep 3" in why and "2 more" in why
    assert over_quota(Quota(max_bytes=10), Usage(9, 50), 4) is None
    why = over_quota(Quota(max_bytes=10), Usage(10, 0), 1)
    assert why is not None and "hold 10 bytes" in why and "raise the quota" in why
    assert over_quota(Quota(), Usage(1 << 60, 1 << 20), 64) is None


# --------------------------------------------------------------------------- what a guest learns

@pytest.fixture
def shared(tmp_path: Path) -> dict[str, Any]:
    """One repository two domains share: A stored `known`; B then backs up `known` (A's data, all
    of it deduplicated) on one disk and `fresh` (nobody's) on another, of the same size."""
    repo = Repository.init(tmp_path / "repo")
    known, fresh = os.urandom(4 * MIB), os.urandom(4 * MIB)
    images = {}
    for name, data in (("a", known), ("known", known), ("fresh", fresh)):
        images[name] = tmp_path / f"{name}.img"
        images[name].write_bytes(data + bytes(4 * MIB))
    a, b = str(uuid.uuid4()), str(uuid.uuid4())
    repo.backup(images["a"], f"{a}/hb-a", Policy.FULL)
    snaps = {serial: repo.backup(images[serial], f"{b}/hb-{serial}", Policy.FULL).snapshot
             for serial in ("known", "fresh")}
    return {"repo": repo, "b": b, "snaps": snaps}


def _guest_fields(wire: dict[str, Any], *own_names: str) -> dict[str, Any]:
    """A guest's view of one snapshot or disk, without what names it (ids, serial, time)."""
    return {k: v for k, v in wire.items() if k not in own_names}


def test_the_setting_is_real_a_deduplicated_backup_stores_nothing_new(shared: dict[str, Any]) -> None:
    snaps: dict[str, Snapshot] = shared["snaps"]
    assert snaps["known"].stats.bytes_new == 0
    assert snaps["fresh"].stats.bytes_new == 4 * MIB
    assert snaps["known"].stats.bytes_stored < snaps["fresh"].stats.bytes_stored


def test_a_guests_list_is_the_same_whether_another_vm_stored_its_blocks_or_not(
        shared: dict[str, Any]) -> None:
    snaps: dict[str, Snapshot] = shared["snaps"]
    listed = {serial: snapshots_message(1, [(f"hb-{serial}", "default", snap)]).to_wire()["snapshots"][0]
              for serial, snap in snaps.items()}
    assert listed["known"]["bytes"] == 8 * MIB  # what its backup read of the disk (zeros too: a raw file)
    assert _guest_fields(listed["known"], "id", "serial", "created") == \
        _guest_fields(listed["fresh"], "id", "serial", "created")


def test_a_guests_result_is_the_same_whether_another_vm_stored_its_blocks_or_not(
        shared: dict[str, Any]) -> None:
    snaps: dict[str, Snapshot] = shared["snaps"]
    b: str = shared["b"]
    replies = {}
    for serial, snap in snaps.items():
        instruction = Instruction(f"job-{serial}", b, 7, InstructionKind.BACKUP, (), "default", Policy.FULL)
        # the figures the executor puts in a disk's result: the operator's job keeps them all
        st = snap.stats
        disk = DiskResult(f"hb-{serial}", snap.id, st.bytes_read, st.bytes_new, st.seconds,
                          ChangeDetection.ALLOCATION_MAP, bytes_stored=st.bytes_stored)
        wire = result_message(Outcome(instruction, [disk]), 7, quiesced=True).to_wire()
        replies[serial] = {**_guest_fields(wire, "job", "seconds"),
                           "disks": [_guest_fields(d, "serial", "snapshot") for d in wire["disks"]]}
    assert replies["known"] == replies["fresh"]
    assert replies["known"]["bytes"] == 8 * MIB
    assert isinstance(p.decode(p.encode(result_message(Outcome(instruction, [disk]), 7, True))), p.Result)


def test_a_domains_usage_counts_what_it_read_never_what_dedup_saved(shared: dict[str, Any]) -> None:
    repo: Repository = shared["repo"]
    used = usage(repo.snapshots(), shared["b"])
    assert used == Usage(16 * MIB, 2)  # `known` counts in full although it stored nothing new
