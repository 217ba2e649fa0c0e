"""Port discovery by name (a fake /sys tree) and the Port's read/write rules over stand-ins
(socketpair, pty, unix socket).  The real virtio-serial port is exercised by the VM test."""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path

import pytest

from guest_shim.errors import HostNotConnected, PortNotFound, TimedOut
from guest_shim.port import MAX_WRITE, Port, find_port, open_port


def _fake_sys(tmp_path: Path, ports: dict[str, str]) -> Path:
    sys_root = tmp_path / "sys"
    for dev, name in ports.items():
        d = sys_root / "class" / "virtio-ports" / dev
        d.mkdir(parents=True)
        (d / "name").write_text(name + "\n")
    return sys_root


def test_find_port_by_name_in_sysfs_without_udev(tmp_path: Path) -> None:
    sys_root = _fake_sys(
        tmp_path, {"vport1p1": "org.qemu.guest_agent.0", "vport2p1": "org.hyperback.agent.0"}
    )
    assert find_port(sys_root=str(sys_root), dev_root="/dev") == "/dev/vport2p1"


def test_find_port_prefers_the_udev_link(tmp_path: Path) -> None:
    sys_root = _fake_sys(tmp_path, {"vport2p1": "org.hyperback.agent.0"})
    dev = tmp_path / "dev"
    (dev / "virtio-ports").mkdir(parents=True)
    (dev / "virtio-ports" / "org.hyperback.agent.0").touch()
    assert find_port(sys_root=str(sys_root), dev_root=str(dev)) == str(
        dev / "virtio-ports/org.hyperback.agent.0"
    )


def test_missing_port_names_the_ports_there_are(tmp_path: Path) -> None:
    sys_root = _fake_sys(tmp_path, {"vport1p1": "org.qemu.guest_agent.0"})
    with pytest.raises(PortNotFound, match=r"ports: org\.qemu\.guest_agent\.0"):
        find_port(sys_root=str(sys_root))
    with pytest.raises(PortNotFound, match="ports: none"):
        find_port(sys_root=str(tmp_path / "empty"))
    with pytest.raises(PortNotFound, match="does not exist"):
        open_port(str(tmp_path / "no-such-device"))


def test_socketpair_standin_reads_writes_and_reports_hangup() -> None:
    a, b = socket.socketpair()
    port = Port.from_fd(a.detach())
    try:
        assert port.host_connected()
        assert port.read(0.05) is None
        b.sendall(b"hello")
        assert port.read(1.0) == b"hello"
        port.write_all(b"x" * 10, time.monotonic() + 1)
        assert b.recv(100) == b"x" * 10
        b.close()
        assert not port.host_connected()
        assert not port.wait_connected(time.monotonic() + 5)  # a stand-in never comes back
        with pytest.raises(HostNotConnected, match="end of stream"):
            port.read(1.0)
        with pytest.raises(HostNotConnected):
            port.write_all(b"more", time.monotonic() + 1)
    finally:
        port.close()


def test_write_all_loops_over_short_writes_of_at_most_32k() -> None:
    a, b = socket.socketpair()
    port = Port.from_fd(a.detach())
    payload = os.urandom(5 * MAX_WRITE + 123)
    got = bytearray()

    def drain() -> None:
        while len(got) < len(payload):
            got.extend(b.recv(7000))
            time.sleep(0.001)

    t = threading.Thread(target=drain)
    t.start()
    try:
        port.write_all(payload, time.monotonic() + 10)
        t.join(10)
        assert bytes(got) == payload
    finally:
        port.close()
        b.close()


def test_write_all_times_out_when_the_host_does_not_read() -> None:
    a, b = socket.socketpair()
    port = Port.from_fd(a.detach())
    try:
        with pytest.raises(TimedOut):
            port.write_all(b"z" * (8 << 20), time.monotonic() + 0.3)
    finally:
        port.close()
        b.close()


def test_pty_standin_is_opened_raw_like_a_device() -> None:
    master, slave = os.openpty()
    path = os.ttyname(slave)
    port = Port.open_device(path)
    try:
        os.write(master, b"\xff{}\n")  # raw: 0xFF and newlines pass unchanged, no echo
        time.sleep(0.05)
        assert port.read(1.0) == b"\xff{}\n"
        port.write_all(b"\xffback\n", time.monotonic() + 1)
        assert os.read(master, 100) == b"\xffback\n"
        os.close(master)
        master = -1
        with pytest.raises(HostNotConnected):
            port.read(1.0)
    finally:
        port.close()
        os.close(slave)
        if master >= 0:
            os.close(master)


def test_unix_socket_port_and_missing_ok(tmp_path: Path) -> None:
    path = str(tmp_path / "host.sock")
    assert Port.connect_unix(path, missing_ok=True) is None
    with pytest.raises(HostNotConnected, match="nothing listens"):
        open_port(f"unix:{path}")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(1)
    port = open_port(f"unix:{path}")
    conn, _ = srv.accept()
    try:
        assert not port.persistent
        conn.sendall(b"hi")
        assert port.read(1.0) == b"hi"
    finally:
        port.close()
        conn.close()
        srv.close()
