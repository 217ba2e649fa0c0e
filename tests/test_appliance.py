"""Who holds a backup appliance, who waits for it, and where it goes next.

The hold lives in the appliance's libvirt metadata; these tests write and read it on a real domain of
libvirt's in-process test driver (``test:///default``).  Moving the appliance between two real hosts
is in test_appliance_vm.py.
"""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import libvirt  # type: ignore[import-untyped]
import pytest

from host_agent.colocation.appliance import Hold, Porter, next_stop, read_hold, write_hold
from host_agent.config import load

HOSTS = ("hosta", "hostb", "hostc")

INVENTORY = """
host_name = "{me}"
[hosts.hosta]
libvirt_uri = "test:///default"
agent = "10.0.0.1:7411"
lan_ip = "10.0.0.1"
[hosts.hostb]
libvirt_uri = "test:///default"
agent = "10.0.0.2:7411"
lan_ip = "10.0.0.2"
[hosts.hostc]
libvirt_uri = "test:///default"
agent = "10.0.0.3:7411"
lan_ip = "10.0.0.3"
[appliances.app1]
domain = "test"
home = "hostb"
service = "10.0.0.200:7420"
tap = "hbapp0"
[media.vault]
appliance = "app1"
"""


@pytest.fixture
def dom() -> Iterator[Any]:
    conn = libvirt.open("test:///default")
    try:
        yield conn.lookupByName("test")
    finally:
        conn.close()


def porter(tmp_path: Path, me: str) -> Porter:
    (tmp_path / f"{me}.toml").write_text(INVENTORY.format(me=me))
    return Porter(load(tmp_path / f"{me}.toml", env={}))


def test_the_hold_round_trips_through_the_domain_metadata(dom: Any) -> None:
    assert read_hold(dom.XMLDesc(0)) is None
    write_hold(dom, Hold("hosta", "job-1", ("hostc", "hostb")))
    assert read_hold(dom.XMLDesc(0)) == Hold("hosta", "job-1", ("hostc", "hostb"))
    write_hold(dom, None)
    assert read_hold(dom.XMLDesc(0)) is None


def test_a_free_appliance_is_taken_and_a_held_one_is_queued_for_once(dom: Any, tmp_path: Path) -> None:
    a, c = porter(tmp_path, "hosta"), porter(tmp_path, "hostc")
    assert a._take_or_queue(dom, "hostb", "job-a") is True
    assert read_hold(dom.XMLDesc(0)) == Hold("hosta", "job-a")
    assert c._take_or_queue(dom, "hosta", "job-c") is False
    assert c._take_or_queue(dom, "hosta", "job-c") is False
    assert read_hold(dom.XMLDesc(0)) == Hold("hosta", "job-a", ("hostc",))
    write_hold(dom, None)


def test_an_appliance_handed_over_and_arrived_is_taken_by_its_new_holder(dom: Any, tmp_path: Path) -> None:
    write_hold(dom, Hold("hostc", "", ("hosta",)))
    assert porter(tmp_path, "hostc")._take_or_queue(dom, "hostc", "job-c") is True
    assert read_hold(dom.XMLDesc(0)) == Hold("hostc", "job-c", ("hosta",))
    write_hold(dom, None)


def test_when_done_it_goes_to_the_next_host_in_the_queue() -> None:
    assert next_stop(Hold("hosta", "j", ("hostc", "hostb")), "hosta", "hostb", HOSTS) == \
        (Hold("hostc", "", ("hostb",)), "hostc")


def test_with_nobody_queued_it_goes_home_still_held_and_is_released_there() -> None:
    assert next_stop(Hold("hosta", "j"), "hosta", "hostb", HOSTS) == (Hold("hosta"), "hostb")
    assert next_stop(Hold("hosta"), "hostb", "hostb", HOSTS) == (None, "hostb")


def test_the_queue_skips_the_host_it_is_on_and_hosts_not_in_the_inventory() -> None:
    assert next_stop(Hold("hosta", "j", ("hosta", "hostz")), "hosta", "hostb", HOSTS) == \
        (Hold("hosta"), "hostb")
    assert next_stop(None, "hostb", "hostb", HOSTS) == (None, "hostb")
