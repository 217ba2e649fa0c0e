"""Freezing: serial -> block devices -> mounts, freeze order, thaw in reverse, the watchdog, and
(as root) a real ext4 on a loop device frozen through the shim and thawed by the watchdog or by
SIGTERM to serve."""

from __future__ import annotations

import dataclasses
import errno
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from shim_helpers import FAST, Background, FakeHost, socketpair_port, wait_until

from guest_shim import protocol as p
from guest_shim.freeze import FIFREEZE, FITHAW, Freezer, parse_mountinfo, plan_freeze
from guest_shim.serve import PortState, Server

REPO = Path(__file__).resolve().parents[2]


def _dev(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return os.major(st.st_dev), os.minor(st.st_dev)


def _block(
    sys_root: Path, name: str, dev: tuple[int, int], *, serial: str | None = None, parent: Path | None = None
) -> Path:
    d = (parent or sys_root / "block") / name
    d.mkdir(parents=True)
    (d / "dev").write_text(f"{dev[0]}:{dev[1]}\n")
    if serial is not None:
        (d / "serial").write_text(serial + "\n")
    if parent is not None:
        (d / "partition").write_text("1\n")
    return d


@pytest.fixture
def fake_disk(tmp_path: Path) -> tuple[Path, Path, dict[str, str]]:
    """A fake /sys where disk vda (serial hb-disk-1) has vda1 (mounted at "/") and vda2, which
    holds dm-0 (mounted at /proc, and read-only at /sys); /dev comes from another disk.
    Device numbers are those of the real directories, so the freezer's fstat check passes."""
    sys_root = tmp_path / "sys"
    vda = _block(sys_root, "vda", (254, 0), serial="hb-disk-1")
    _block(sys_root, "vda1", _dev("/"), parent=vda)
    vda2 = _block(sys_root, "vda2", (254, 2), parent=vda)
    (vda2 / "holders").mkdir()
    (vda2 / "holders" / "dm-0").mkdir()
    _block(sys_root, "dm-0", _dev("/proc"))
    _block(sys_root, "vdb", _dev("/dev"), serial="hb-disk-2")
    (sys_root / "block" / "vdc").mkdir()  # no serial at all
    lines = [
        f"21 1 {':'.join(map(str, _dev('/')))} / / rw,relatime shared:1 - ext4 /dev/vda1 rw",
        f"22 21 {':'.join(map(str, _dev('/proc')))} / /proc rw - xfs /dev/dm-0 rw",
        f"23 21 {':'.join(map(str, _dev('/proc')))} /sub /srv/bind\\040mount rw - xfs /dev/dm-0 rw",
        f"24 21 {':'.join(map(str, _dev('/sys')))} / /sys ro,nosuid - xfs /dev/dm-0 ro",
        f"25 21 {':'.join(map(str, _dev('/dev')))} / /dev rw - ext4 /dev/vdb rw",
        "garbage line",
    ]
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text("\n".join(lines) + "\n")
    return sys_root, mountinfo, {"/": "/", "/proc": "/proc"}


class RecordingIoctl:
    def __init__(self, fail_on: tuple[str, int] | None = None) -> None:
        self.calls: list[tuple[str, str]] = []
        self.fail_on = fail_on

    def __call__(self, fd: int, op: int, arg: int) -> int:
        path = os.readlink(f"/proc/self/fd/{fd}")
        name = {FIFREEZE: "freeze", FITHAW: "thaw"}[op]
        if self.fail_on is not None and (path, op) == self.fail_on:
            raise OSError(errno.EIO, "Input/output error")
        self.calls.append((name, path))
        return 0


def test_parse_mountinfo_unescapes_and_reads_flags() -> None:
    data = (
        b"36 35 98:0 /mnt1 /mnt\\040two rw,noatime master:1 - ext3 /dev/root rw,errors=continue\n"
        b"37 35 8:1 / /ro ro - xfs /dev/sda1 rw\n"
        b"38 35 8:2 / /ro-super rw - xfs /dev/sda2 ro\n"
        b"short\n"
    )
    mounts = parse_mountinfo(data)
    assert [m.mountpoint for m in mounts] == ["/mnt two", "/ro", "/ro-super"]
    assert mounts[0].device == os.makedev(98, 0) and mounts[0].source == "/dev/root"
    assert [m.read_only for m in mounts] == [False, True, True]


def test_plan_maps_a_serial_to_partitions_holders_and_mounts(
    fake_disk: tuple[Path, Path, dict[str, str]],
) -> None:
    sys_root, mountinfo, _ = fake_disk
    plan = plan_freeze(["hb-disk-1", "no-such-disk"], sys_root=str(sys_root), mountinfo=str(mountinfo))
    assert [m.mountpoint for m in plan.mounts] == ["/", "/proc"]  # sorted; the bind mount deduplicated
    assert p.Skipped("no-such-disk", p.SkipReason.UNKNOWN_DISK) in plan.skipped
    assert p.Skipped("/sys", p.SkipReason.READ_ONLY) in plan.skipped
    other = plan_freeze(["hb-disk-2"], sys_root=str(sys_root), mountinfo=str(mountinfo))
    assert [m.mountpoint for m in other.mounts] == ["/dev"]


def test_freeze_in_order_and_thaw_in_reverse(fake_disk: tuple[Path, Path, dict[str, str]]) -> None:
    sys_root, mountinfo, _ = fake_disk
    ioctl = RecordingIoctl()
    freezer = Freezer(sys_root=str(sys_root), mountinfo=str(mountinfo), ioctl=ioctl)
    frozen = freezer.freeze(p.Freeze("f1", "job-1", ("hb-disk-1",), 30))
    assert isinstance(frozen, p.Frozen)
    assert frozen.filesystems == ("/", "/proc")
    assert p.Skipped("/sys", p.SkipReason.READ_ONLY) in frozen.skipped
    assert freezer.holding
    busy = freezer.freeze(p.Freeze("f2", "job-2", ("hb-disk-2",), 30))
    assert isinstance(busy, p.ErrorMessage) and busy.code is p.ErrorCode.BUSY
    thawed = freezer.thaw(p.Thaw("t1", "job-1"))
    assert thawed == p.Thawed("t1", "job-1", ("/proc", "/"), p.ThawCause.HOST)
    assert ioctl.calls == [("freeze", "/"), ("freeze", "/proc"), ("thaw", "/proc"), ("thaw", "/")]
    assert not freezer.holding


def test_a_failed_freeze_thaws_what_was_frozen(fake_disk: tuple[Path, Path, dict[str, str]]) -> None:
    sys_root, mountinfo, _ = fake_disk
    ioctl = RecordingIoctl(fail_on=("/proc", FIFREEZE))
    freezer = Freezer(sys_root=str(sys_root), mountinfo=str(mountinfo), ioctl=ioctl)
    reply = freezer.freeze(p.Freeze("f1", "job-1", ("hb-disk-1",), 30))
    assert isinstance(reply, p.ErrorMessage) and reply.code is p.ErrorCode.FREEZE_FAILED
    assert "/proc" in reply.message
    assert ioctl.calls == [("freeze", "/"), ("thaw", "/")]
    assert not freezer.holding


def test_not_freezable_and_already_frozen_are_skipped(fake_disk: tuple[Path, Path, dict[str, str]]) -> None:
    sys_root, mountinfo, _ = fake_disk

    def ioctl(fd: int, op: int, arg: int) -> int:
        path = os.readlink(f"/proc/self/fd/{fd}")
        raise OSError(errno.EOPNOTSUPP if path == "/" else errno.EBUSY, "no")

    freezer = Freezer(sys_root=str(sys_root), mountinfo=str(mountinfo), ioctl=ioctl)
    reply = freezer.freeze(p.Freeze("f1", "job-1", ("hb-disk-1",), 30))
    assert isinstance(reply, p.Frozen) and reply.filesystems == ()
    assert p.Skipped("/", p.SkipReason.NOT_FREEZABLE) in reply.skipped
    assert p.Skipped("/proc", p.SkipReason.ALREADY_FROZEN) in reply.skipped
    assert not freezer.holding  # nothing of ours to thaw: the other freezer's fs stays theirs


def test_watchdog_thaws_by_itself_and_queues_a_notice(fake_disk: tuple[Path, Path, dict[str, str]]) -> None:
    sys_root, mountinfo, _ = fake_disk
    ioctl = RecordingIoctl()
    woken = threading.Event()
    freezer = Freezer(
        sys_root=str(sys_root), mountinfo=str(mountinfo), ioctl=ioctl, notify=woken.set, max_seconds=0.3
    )
    freezer.freeze(p.Freeze("f1", "job-1", ("hb-disk-1",), 600))  # the guest's own cap wins
    assert woken.wait(5)
    assert not freezer.holding
    assert freezer.take_notices() == [p.Thawed(None, "job-1", ("/proc", "/"), p.ThawCause.WATCHDOG)]
    assert freezer.take_notices() == []
    assert freezer.thaw(p.Thaw("t1", "job-1")) == p.Thawed("t1", "job-1", (), p.ThawCause.WATCHDOG)


def test_thaw_all_on_shutdown_is_idempotent(fake_disk: tuple[Path, Path, dict[str, str]]) -> None:
    sys_root, mountinfo, _ = fake_disk
    ioctl = RecordingIoctl()
    freezer = Freezer(sys_root=str(sys_root), mountinfo=str(mountinfo), ioctl=ioctl)
    freezer.freeze(p.Freeze("f1", "job-1", ("hb-disk-1",), 30))
    notice = freezer.thaw_all(p.ThawCause.SHUTDOWN)
    assert notice == p.Thawed(None, "job-1", ("/proc", "/"), p.ThawCause.SHUTDOWN)
    assert freezer.thaw_all(p.ThawCause.SHUTDOWN) is None
    assert [c[0] for c in ioctl.calls].count("thaw") == 2


# --- real file systems (root) -----------------------------------------------------------------


class Ext4:
    """A 32 MiB ext4 image on a loop device, mounted; a fake /sys names it by serial."""

    def __init__(self, tmp_path: Path, serial: str) -> None:
        self.image = tmp_path / "fs.img"
        self.mnt = tmp_path / "mnt"
        self.mnt.mkdir()
        with open(self.image, "wb") as f:
            f.truncate(32 << 20)
        subprocess.run(["mkfs.ext4", "-q", "-F", str(self.image)], check=True, capture_output=True)
        self.loop = subprocess.run(
            ["losetup", "--find", "--show", str(self.image)], check=True, capture_output=True, text=True
        ).stdout.strip()
        self.mounted = False
        try:
            subprocess.run(["mount", "-t", "ext4", self.loop, str(self.mnt)], check=True, capture_output=True)
            self.mounted = True
            name = os.path.basename(self.loop)
            self.sys_root = tmp_path / "sys"
            d = self.sys_root / "block" / name
            d.mkdir(parents=True)
            (d / "serial").write_text(serial + "\n")
            (d / "dev").write_text(Path(f"/sys/block/{name}/dev").read_text())
        except BaseException:
            self.cleanup()
            raise

    def cleanup(self) -> None:
        subprocess.run(["fsfreeze", "-u", str(self.mnt)], capture_output=True)  # whatever happened
        if self.mounted:
            subprocess.run(["umount", str(self.mnt)], capture_output=True)
        subprocess.run(["losetup", "--detach", self.loop], capture_output=True)

    def write_in_background(self, name: str) -> Background:
        def write() -> float:
            with open(self.mnt / name, "w") as f:
                f.write("written after the thaw\n")
                f.flush()
                os.fsync(f.fileno())
            return time.monotonic()

        return Background(write)


@pytest.fixture
def ext4(tmp_path: Path) -> Iterator[Ext4]:
    if os.geteuid() != 0:
        pytest.fail("needs root (loop devices, mount, FIFREEZE); deselect with -m 'not root'")
    fs = Ext4(tmp_path, "hb-freeze-1")
    yield fs
    fs.cleanup()


@pytest.mark.root
def test_watchdog_thaws_a_real_ext4_when_the_host_never_sends_thaw(ext4: Ext4, tmp_path: Path) -> None:
    port, host = socketpair_port()
    cfg = dataclasses.replace(FAST, socket=str(tmp_path / "shim.sock"), sysfs=str(ext4.sys_root))
    ports = [port]
    server = Server(cfg, opener=lambda: ports.pop())
    runner = Background(server.serve_forever)
    try:
        host.handshake(p.Role.SERVE)
        wait_until(lambda: server.state is PortState.READY)
        host.send(p.Freeze("fz-1", "job-w", ("hb-freeze-1",), 1.5))
        frozen = host.expect(p.Frozen)
        assert frozen.filesystems == (str(ext4.mnt),)
        t_frozen = time.monotonic()
        writer = ext4.write_in_background("after.txt")
        time.sleep(0.4)
        assert not writer.done(), "a write went through while the file system was frozen"
        # The host stays silent: the watchdog thaws and says so.
        notice = host.expect(p.Thawed, timeout=10)
        assert notice == p.Thawed(None, "job-w", (str(ext4.mnt),), p.ThawCause.WATCHDOG)
        written_at = writer.result(timeout=10)
        assert 1.0 < written_at - t_frozen < 8
        assert (ext4.mnt / "after.txt").read_text() == "written after the thaw\n"
        host.send(p.Thaw("th-1", "job-w"))  # too late: the reply says the watchdog was first
        assert host.expect(p.Thawed) == p.Thawed("th-1", "job-w", (), p.ThawCause.WATCHDOG)
    finally:
        server.stop()
        runner.result()
        host.close()


@pytest.mark.root
@pytest.mark.slow
def test_sigterm_to_serve_thaws_a_real_ext4(ext4: Ext4, tmp_path: Path) -> None:
    host_path = tmp_path / "host.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(host_path))
    listener.listen(1)
    listener.settimeout(30)
    conf = tmp_path / "shim.conf"
    conf.write_text(
        "[shim]\n"
        f"port = unix:{host_path}\n"
        f"socket = {tmp_path / 'shim.sock'}\n"
        f"sysfs = {ext4.sys_root}\n"
        "max_freeze_seconds = 600\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("HYPERBACK_")}
    env.update(HYPERBACK_SHIM_CONFIG=str(conf), PYTHONPATH=str(REPO))
    proc = subprocess.Popen(
        [sys.executable, "-m", "guest_shim", "serve"],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    host = None
    try:
        conn, _ = listener.accept()
        host = FakeHost.from_socket(conn)
        host.handshake(p.Role.SERVE, timeout=20)
        host.send(p.Freeze("fz", "job-s", ("hb-freeze-1",), 600))
        assert host.expect(p.Frozen).filesystems == (str(ext4.mnt),)
        writer = ext4.write_in_background("after-sigterm.txt")
        time.sleep(0.3)
        assert not writer.done()
        proc.send_signal(signal.SIGTERM)
        assert host.expect(p.Thawed, timeout=10).by is p.ThawCause.SHUTDOWN
        writer.result(timeout=10)
        out, err = proc.communicate(timeout=20)
        assert proc.returncode == 0, err
        assert "Traceback" not in err
        assert not (tmp_path / "shim.sock").exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if host is not None:
            host.close()
        listener.close()
