"""What hyperback reads from a domain before moving it, and the service address kept on the serving host.

The moves themselves run against two real libvirt hosts in test_twohosts.py and test_colocation*_vm.py.
"""
from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator

import libvirt  # type: ignore[import-untyped]
import pytest

from host_agent.colocation.migration import (
    METADATA_NS,
    VISIT_NS,
    VisitMarker,
    clear_visit,
    live_migratable,
    live_migration_is_safe,
    mark_visit,
    needs_unsafe,
    visit_marker,
)
from host_agent.colocation.serviceip import ServiceAddress, _gratuitous_arp
from host_agent.errors import ServiceAddressError


def domain(devices: str = "", metadata: str = "") -> str:
    return (f"<domain type='qemu'><name>vm1</name><metadata>{metadata}</metadata>"
            f"<devices>{devices}</devices></domain>")


def test_host_devices_or_a_metadata_mark_make_a_domain_not_live_migratable() -> None:
    assert live_migratable(domain()) == (True, "")
    hostdev = "<hostdev mode='subsystem' type='pci'><source><address bus='0x3'/></source></hostdev>"
    assert live_migratable(domain(hostdev)) == (False, "1 host device(s) passed through")
    marked = f"<hb:placement xmlns:hb='{METADATA_NS}' live-migratable='no'/>"
    ok, why = live_migratable(domain(metadata=marked))
    assert not ok and "metadata" in why
    foreign = "<x:placement xmlns:x='https://example.com/other' live-migratable='no'/>"
    assert live_migratable(domain(metadata=foreign))[0]


def test_a_tcg_guest_on_qemu_before_9_is_migrated_paused_a_kvm_guest_always_live() -> None:
    tcg, kvm = domain(), domain().replace("type='qemu'", "type='kvm'")
    assert live_migration_is_safe(tcg, 7_002_022) is False     # Debian 12's QEMU 7.2.22
    assert live_migration_is_safe(tcg, 9_000_000) is True
    assert live_migration_is_safe(kvm, 7_002_022) is True


def test_the_visit_marker_names_the_origin_and_the_job() -> None:
    assert visit_marker(domain()) is None
    marker = visit_marker(domain(metadata=f"<hbv:visit xmlns:hbv='{VISIT_NS}' origin='hosta' job='j1'/>"))
    assert marker is not None and (marker.origin, marker.job) == ("hosta", "j1")


def test_a_visit_marker_comes_and_goes_without_touching_the_operators_placement_setting() -> None:
    """libvirt keeps one metadata element per namespace: the marker must not share the operator's."""
    conn = libvirt.open("test:///default")  # libvirt's own in-process test driver: a real domain API
    try:
        dom = conn.lookupByName("test")
        dom.setMetadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, "<placement live-migratable='no'/>", "hb",
                        METADATA_NS, libvirt.VIR_DOMAIN_AFFECT_LIVE)
        mark_visit(dom, "hosta", "j1")
        assert visit_marker(dom.XMLDesc(0)) == VisitMarker("hosta", "j1")
        assert live_migratable(dom.XMLDesc(0))[0] is False
        clear_visit(dom)
        assert visit_marker(dom.XMLDesc(0)) is None
        assert live_migratable(dom.XMLDesc(0))[0] is False
    finally:
        conn.close()


def test_a_writable_disk_on_a_local_file_system_needs_unsafe() -> None:
    disk = "<disk type='file' device='disk'><driver cache='{}'/><source file='{}'/></disk>"
    assert needs_unsafe(domain(disk.format("writeback", "/var/tmp/x.img")))
    assert needs_unsafe(domain(disk.format("none", "/var/tmp/x.img")))  # ext4/overlay: not shared
    readonly = "<disk type='file' device='disk'><source file='/var/tmp/x.img'/><readonly/></disk>"
    assert not needs_unsafe(domain(readonly))


def test_gratuitous_arp_announces_the_address_as_its_own_sender_and_target() -> None:
    frame = _gratuitous_arp(b"\x02\x00\x00\x00\x00\x01", bytes([10, 77, 0, 100]))
    assert len(frame) == 42 and frame[:6] == b"\xff" * 6 and frame[12:14] == b"\x08\x06"
    assert frame[28:32] == frame[38:42] == bytes([10, 77, 0, 100])


@pytest.fixture
def netns_with_svc0() -> Iterator[str]:
    """An interface (one end of a veth pair) in a network namespace of its own; yields its name."""
    if os.geteuid() != 0:
        pytest.fail("needs root (network namespaces); deselect with -m 'not root'")
    name = f"hbtest-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "add", "svc0", "type", "veth", "peer", "name", "svc1"],
                       check=True)
        subprocess.run(["ip", "-n", name, "link", "set", "svc0", "up"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def in_netns(name: str, code: str) -> str:
    """Run Python ``code`` in network namespace ``name`` (ServiceAddress acts on the caller's)."""
    run = subprocess.run(["ip", "netns", "exec", name, sys.executable, "-c", code],
                         capture_output=True, text=True, check=True)
    return run.stdout.strip()


@pytest.mark.root
def test_claim_and_release_are_idempotent_and_held_tells(netns_with_svc0: str) -> None:
    code = """
from host_agent.colocation.serviceip import ServiceAddress
a = ServiceAddress.parse("10.99.0.5/24", "svc0")
out = [a.held()]
a.claim(); a.claim(); out.append(a.held())
a.release(); a.release(); out.append(a.held())
print(out)
"""
    assert in_netns(netns_with_svc0, code) == "[False, True, False]"


def test_a_bad_address_or_interface_is_refused_with_what_is_wrong() -> None:
    with pytest.raises(ServiceAddressError, match="not an IP address"):
        ServiceAddress.parse("10.99.0.500/24", "lo")
    with pytest.raises(ServiceAddressError, match="does not fit"):
        ServiceAddress("10.99.0.5", 33, "lo")
    with pytest.raises(ServiceAddressError, match="no interface 'nope0'"):
        ServiceAddress.parse("10.99.0.5", "nope0").held()
