"""The appliance route: a service VM's /32 address routed to its tap on whichever host runs it.

Network namespaces stand in for the hosts and for the VM (a veth pair for its NIC and tap); the
real VM moves in test_appliance_vm.py.  ServiceAddress is tested in test_migration.py.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator

import pytest

from host_agent.colocation.serviceip import APPLIANCE_GATEWAY, ApplianceRoute
from host_agent.errors import ServiceAddressError

APPLIANCE_IP = "10.99.0.200"
PORT = 7499


def sh(*args: str) -> str:
    return subprocess.run(args, check=True, capture_output=True, text=True).stdout


def in_netns(name: str, code: str, *, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run Python ``code`` in network namespace ``name`` (ApplianceRoute acts on the caller's)."""
    return subprocess.run(["ip", "netns", "exec", name, sys.executable, "-c", textwrap.dedent(code)],
                          capture_output=True, text=True, check=check, timeout=60)


def route_call(ns: str, call: str, tap: str = "hbapp0", lan: str = "lan0") -> str:
    code = f"""
    from host_agent.colocation.serviceip import ApplianceRoute
    r = ApplianceRoute({APPLIANCE_IP!r}, {tap!r}, {lan!r})
    {call}
    """
    return in_netns(ns, code).stdout.strip()


@pytest.fixture
def namespaces() -> Iterator[dict[str, str]]:
    """Namespaces "a" and "b" (hosts) joined by veth lan0 (10.99.0.1/24) - lan1 (10.99.0.2/24), and
    "g" (the appliance VM) with no interface yet."""
    if os.geteuid() != 0:
        pytest.fail("needs root (network namespaces); deselect with -m 'not root'")
    ns = {role: f"hbt{role}-{os.getpid()}" for role in ("a", "b", "g")}
    try:
        for name in ns.values():
            sh("ip", "netns", "add", name)
            sh("ip", "-n", name, "link", "set", "lo", "up")
        sh("ip", "-n", ns["a"], "link", "add", "lan0", "type", "veth",
           "peer", "name", "lan1", "netns", ns["b"])
        for role, ifname, ip in (("a", "lan0", "10.99.0.1"), ("b", "lan1", "10.99.0.2")):
            sh("ip", "-n", ns[role], "addr", "add", f"{ip}/24", "dev", ifname)
            sh("ip", "-n", ns[role], "link", "set", ifname, "up")
        yield ns
    finally:
        for name in ns.values():
            subprocess.run(["ip", "netns", "del", name], check=False)


def plug_vm_into(ns: dict[str, str], host: str) -> None:
    """The VM's NIC on ``host``: a veth pair hbapp0 (host) - eth0 (VM), configured as the appliance
    configures its NIC, the same on every host."""
    sh("ip", "-n", ns[host], "link", "add", "hbapp0", "type", "veth",
       "peer", "name", "eth0", "netns", ns["g"])
    g = ns["g"]
    sh("ip", "-n", g, "addr", "add", f"{APPLIANCE_IP}/32", "dev", "eth0")
    sh("ip", "-n", g, "link", "set", "eth0", "up")
    sh("ip", "-n", g, "route", "add", APPLIANCE_GATEWAY, "dev", "eth0")
    sh("ip", "-n", g, "route", "add", "default", "via", APPLIANCE_GATEWAY, "dev", "eth0")


def ask_appliance(ns: str) -> str:
    """Connect from namespace ``ns`` to the appliance's address; return what it answered."""
    code = f"""
    import socket
    with socket.create_connection(({APPLIANCE_IP!r}, {PORT}), timeout=10) as s:
        print(s.recv(100).decode())
    """
    return in_netns(ns, code).stdout.strip()


@pytest.mark.root
def test_claim_routes_forwards_and_proxies_and_release_undoes_it_idempotently(
        namespaces: dict[str, str]) -> None:
    a = namespaces["a"]
    sh("ip", "-n", a, "tuntap", "add", "dev", "hbapp0", "mode", "tap")  # as libvirt leaves it
    assert route_call(a, "print(r.held())") == "False"
    route_call(a, "r.claim(); r.claim()")
    assert route_call(a, "print(r.held())") == "True"
    assert f"inet {APPLIANCE_GATEWAY}/32" in sh("ip", "-n", a, "addr", "show", "dev", "hbapp0")
    assert sh("ip", "-n", a, "route", "show", f"{APPLIANCE_IP}/32").startswith(f"{APPLIANCE_IP} dev hbapp0")
    assert f"{APPLIANCE_IP} dev lan0 proxy" in sh("ip", "-n", a, "neigh", "show", "proxy")
    forwarding = in_netns(a, """
    for f in ("hbapp0", "lan0", "all", "default"):
        print(open(f"/proc/sys/net/ipv4/conf/{f}/forwarding").read().strip(), end=" ")
    """).stdout.split()
    assert forwarding == ["1", "1", "0", "0"]  # the two interfaces only, not the host-wide switch

    route_call(a, "r.release(); r.release()")
    assert route_call(a, "print(r.held())") == "False"
    assert APPLIANCE_GATEWAY not in sh("ip", "-n", a, "addr", "show", "dev", "hbapp0")
    assert sh("ip", "-n", a, "route", "show", f"{APPLIANCE_IP}/32") == ""
    assert sh("ip", "-n", a, "neigh", "show", "proxy") == ""


@pytest.mark.root
def test_release_after_the_vm_left_removes_the_proxy_entry_and_a_claim_without_the_tap_says_why(
        namespaces: dict[str, str]) -> None:
    a = namespaces["a"]
    sh("ip", "-n", a, "tuntap", "add", "dev", "hbapp0", "mode", "tap")
    route_call(a, "r.claim()")
    sh("ip", "-n", a, "link", "del", "hbapp0")  # the VM migrated away: libvirt deleted its tap
    route_call(a, "r.release()")
    assert sh("ip", "-n", a, "neigh", "show", "proxy") == ""
    failed = in_netns(a, f"""
    from host_agent.colocation.serviceip import ApplianceRoute
    from host_agent.errors import ServiceAddressError
    try:
        ApplianceRoute({APPLIANCE_IP!r}, "hbapp0", "lan0").claim()
    except ServiceAddressError as e:
        print(e)
    """).stdout
    assert "no interface 'hbapp0'" in failed and "does the VM run on this host?" in failed


def test_only_an_ipv4_address_is_accepted() -> None:
    with pytest.raises(ServiceAddressError, match="not an IP address"):
        ApplianceRoute("10.99.0.300", "hbapp0", "lan0")
    with pytest.raises(ServiceAddressError, match="only IPv4"):
        ApplianceRoute("fd00::1", "hbapp0", "lan0")


@pytest.mark.root
def test_the_address_answers_from_both_hosts_wherever_the_vm_runs(namespaces: dict[str, str]) -> None:
    a, b, g = namespaces["a"], namespaces["b"], namespaces["g"]
    server = subprocess.Popen(["ip", "netns", "exec", g, sys.executable, "-c", textwrap.dedent(f"""
        import socket
        s = socket.create_server(("0.0.0.0", {PORT}))
        print("listening", flush=True)
        while True:
            c, _ = s.accept()
            c.sendall(b"appliance")
            c.close()
        """)], stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "listening"
        # the VM runs on B: A reaches it over the LAN (B answers ARP for it and forwards), B directly
        plug_vm_into(namespaces, "b")
        route_call(b, "r.claim()", lan="lan1")
        assert ask_appliance(a) == "appliance"
        assert ask_appliance(b) == "appliance"
        # it moves to A: B's tap goes with it, B releases, A claims; the VM's configuration is unchanged
        sh("ip", "-n", b, "link", "del", "hbapp0")
        route_call(b, "r.release()", lan="lan1")
        plug_vm_into(namespaces, "a")
        route_call(a, "r.claim()")
        assert ask_appliance(a) == "appliance"
        assert ask_appliance(b) == "appliance"
    finally:
        server.kill()
        server.wait()
        if server.stdout is not None:
            server.stdout.close()
