"""fsfreeze hooks: real processes (shell scripts run directly, never through a shell) around a
freeze whose ioctls are recorded in the same log as the hooks' markers, so that one file shows
the order: hooks with freeze, FIFREEZE, FITHAW, hooks with thaw in reverse."""

from __future__ import annotations

import os
import stat
import threading
from pathlib import Path

import pytest
from shim_helpers import wait_until

from guest_shim import protocol as p
from guest_shim.config import DEFAULT_HOOK_DIR, parse_config
from guest_shim.freeze import FIFREEZE, Freezer
from guest_shim.hooks import find_hooks

SERIAL = "hb-disk-1"


class Guest:
    """A fake /sys with one disk (serial hb-disk-1) mounted at a real folder, a hook folder, and
    one log the hooks and the (recorded) ioctls append to."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.mnt = root / "mnt"
        self.mnt.mkdir()
        disk = root / "sys" / "block" / "vda"
        disk.mkdir(parents=True)
        (disk / "serial").write_text(SERIAL + "\n")
        dev = os.stat(self.mnt).st_dev
        (disk / "dev").write_text(f"{os.major(dev)}:{os.minor(dev)}\n")
        self.mountinfo = root / "mountinfo"
        self.mountinfo.write_text(
            f"36 1 {os.major(dev)}:{os.minor(dev)} / {self.mnt} rw,relatime - ext4 /dev/vda rw\n")
        self.hooks = root / "hooks"
        self.hooks.mkdir(mode=0o755)
        self.log = root / "log"
        self.log.write_text("")

    def ioctl(self, fd: int, op: int, arg: int) -> int:
        with open(self.log, "a") as f:
            f.write(f"{'FIFREEZE' if op == FIFREEZE else 'FITHAW'}\n")
        return 0

    def hook(self, name: str, body: str, mode: int = 0o755) -> Path:
        path = self.hooks / name
        path.write_text(f"#!/bin/sh\necho \"{name} $1 job=$HYPERBACK_JOB\" >> {self.log}\n{body}\n")
        path.chmod(mode)
        return path

    def freezer(self, max_seconds: float = 60.0) -> Freezer:
        return Freezer(sys_root=str(self.root / "sys"), mountinfo=str(self.mountinfo), ioctl=self.ioctl,
                       hook_dir=str(self.hooks), max_seconds=max_seconds)

    def lines(self) -> list[str]:
        return self.log.read_text().splitlines()


@pytest.fixture
def guest(tmp_path: Path) -> Guest:
    return Guest(tmp_path)


def test_hooks_run_in_name_order_before_the_freeze_and_in_reverse_after_the_thaw(guest: Guest) -> None:
    guest.hook("20-second", "")
    guest.hook("10-first", "")
    guest.hook(".disabled", "exit 1")
    guest.hook("backup~", "exit 1")
    freezer = guest.freezer()
    frozen = freezer.freeze(p.Freeze("f1", "job-1", (SERIAL,), 30))
    assert isinstance(frozen, p.Frozen) and frozen.filesystems == (str(guest.mnt),)
    assert freezer.thaw(p.Thaw("t1", "job-1")) == p.Thawed("t1", "job-1", (str(guest.mnt),), p.ThawCause.HOST)
    assert guest.lines() == ["10-first freeze job=job-1", "20-second freeze job=job-1", "FIFREEZE", "FITHAW",
                             "20-second thaw job=job-1", "10-first thaw job=job-1"]


def test_a_hook_is_run_directly_not_by_a_shell(guest: Guest) -> None:
    guest.hook("10-x;touch pwned", "")
    freezer = guest.freezer()
    assert isinstance(freezer.freeze(p.Freeze("f1", "job-1", (SERIAL,), 30)), p.Frozen)
    freezer.thaw(p.Thaw("t1", "job-1"))
    assert guest.lines()[0] == "10-x;touch pwned freeze job=job-1"
    assert not (Path("/") / "pwned").exists() and not (guest.hooks / "pwned").exists()


def test_a_failing_freeze_hook_fails_the_freeze_names_itself_and_freezes_nothing(guest: Guest) -> None:
    guest.hook("10-flush", "")
    guest.hook("20-db", "echo 'database refused to flush'; exit 1")
    guest.hook("30-never", "")
    freezer = guest.freezer()
    reply = freezer.freeze(p.Freeze("f1", "job-1", (SERIAL,), 30))
    assert isinstance(reply, p.ErrorMessage) and reply.code is p.ErrorCode.FREEZE_FAILED
    assert "20-db" in reply.message and "exited 1" in reply.message and "database refused" in reply.message
    assert not freezer.holding
    # the hook that had run is told to thaw; the one after the failure never ran; nothing froze
    assert guest.lines() == ["10-flush freeze job=job-1", "20-db freeze job=job-1", "10-flush thaw job=job-1"]


def test_a_hanging_freeze_hook_is_cut_off_with_its_process_group_at_the_watchdog_bound(guest: Guest) -> None:
    pids = guest.root / "pids"
    # the hook starts a child that would outlive it, then hangs itself
    guest.hook("10-hang", f"sleep 1000 & echo $! >> {pids}\necho $$ >> {pids}\nwait")
    freezer = guest.freezer(max_seconds=1.0)  # the guest's own cap is the bound here
    reply = freezer.freeze(p.Freeze("f1", "job-1", (SERIAL,), 600))
    assert isinstance(reply, p.ErrorMessage) and reply.code is p.ErrorCode.FREEZE_FAILED
    assert "10-hang" in reply.message and "cut off" in reply.message
    assert not freezer.holding and "FIFREEZE" not in guest.lines()

    def gone(pid: int) -> bool:
        try:
            return Path(f"/proc/{pid}/stat").read_text().split(") ")[1].startswith("Z")
        except FileNotFoundError:
            return True

    hook_pids = [int(x) for x in pids.read_text().split()]
    assert len(hook_pids) == 2
    wait_until(lambda: all(gone(pid) for pid in hook_pids), what="the hook and its child are gone")


def test_a_hook_that_hangs_on_thaw_is_cut_off_after_the_file_systems_were_thawed(guest: Guest) -> None:
    guest.hook("10-ok", "")
    guest.hook("20-stuck", '[ "$1" = thaw ] && exec sleep 1000\ntrue')
    freezer = guest.freezer(max_seconds=1.0)
    assert isinstance(freezer.freeze(p.Freeze("f1", "job-1", (SERIAL,), 600)), p.Frozen)
    thawed = freezer.thaw(p.Thaw("t1", "job-1"))
    assert thawed.filesystems == (str(guest.mnt),) and thawed.by is p.ThawCause.HOST
    # FITHAW came first; the stuck hook was cut off and the next one still ran
    assert guest.lines()[-4:] == ["FIFREEZE", "FITHAW", "20-stuck thaw job=job-1", "10-ok thaw job=job-1"]


def test_the_watchdog_thaw_runs_the_thaw_hooks(guest: Guest) -> None:
    guest.hook("10-db", "")
    woken = threading.Event()
    freezer = guest.freezer(max_seconds=0.5)
    freezer.notify = woken.set
    assert isinstance(freezer.freeze(p.Freeze("f1", "job-1", (SERIAL,), 600)), p.Frozen)
    assert woken.wait(10)
    assert freezer.take_notices()[0].by is p.ThawCause.WATCHDOG
    assert guest.lines() == ["10-db freeze job=job-1", "FIFREEZE", "FITHAW", "10-db thaw job=job-1"]


@pytest.mark.parametrize(("mode", "why"), [(0o644, "not executable"), (0o757, "world-writable"),
                                           (0o775, "group-writable")])
def test_an_unsafe_or_non_executable_hook_is_refused_and_nothing_runs(
        guest: Guest, mode: int, why: str) -> None:
    guest.hook("10-fine", "")
    guest.hook("20-bad", "", mode=mode)
    freezer = guest.freezer()
    reply = freezer.freeze(p.Freeze("f1", "job-1", (SERIAL,), 30))
    assert isinstance(reply, p.ErrorMessage) and reply.code is p.ErrorCode.FREEZE_FAILED
    assert "refused" in reply.message and f"20-bad ({why})" in reply.message
    assert guest.lines() == []


def test_a_hook_folder_others_may_write_to_is_refused(guest: Guest) -> None:
    guest.hook("10-fine", "")
    guest.hooks.chmod(0o777 | stat.S_ISVTX)
    with pytest.raises(Exception, match="others may write"):
        find_hooks(str(guest.hooks))


def test_no_hook_folder_means_no_hooks(tmp_path: Path) -> None:
    assert find_hooks(str(tmp_path / "none")) == [] and find_hooks(None) == []


def test_the_hook_folder_is_configurable_and_may_be_turned_off() -> None:
    assert parse_config("").fsfreeze_hook_dir == DEFAULT_HOOK_DIR == "/etc/hyperback/fsfreeze-hook.d"
    assert parse_config("[shim]\nfsfreeze_hook_dir = /srv/hooks\n").fsfreeze_hook_dir == "/srv/hooks"
    assert parse_config("[shim]\nfsfreeze_hook_dir =\n").fsfreeze_hook_dir is None
