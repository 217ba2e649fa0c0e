"""Freezing the guest's file systems for the host's point-in-time view (FIFREEZE / FITHAW).

The host sends ``freeze{id, job, disks, timeout}``; :class:`Freezer` maps each disk serial to
its block device (``/sys/block/X/serial``), that device's partitions and the devices stacked on
them (``holders``: LVM, dm-crypt, md), and those to mounted file systems
(``/proc/self/mountinfo``, by device number, or by source device for file systems such as
btrfs whose device number is anonymous).  It skips read-only and non-freezable file systems,
freezes each file system once (bind mounts share one) in ascending mount-point order, and
thaws in reverse order.

Guarantees:

* A watchdog thread thaws by itself ``min(timeout, max_seconds)`` after the freeze request
  arrived if no ``thaw`` came, and queues an unsolicited ``thawed`` (``by: watchdog``) that the
  owner of the port sends (``take_notices``; ``notify`` is called to wake it).
* A failure half-way thaws what was frozen and answers ``error`` ``freeze-failed``; any other
  exception (a signal, say) thaws and propagates.
* ``thaw_all`` thaws on shutdown and on host disconnect; owners call it in ``finally``.
* Only SIGKILL (or a kernel crash) can leave a file system frozen: ``fsfreeze -u MOUNTPOINT``.
* The fsfreeze hooks (``guest_shim.hooks``, ``hook_dir``) run with ``freeze`` before the first
  FIFREEZE and with ``thaw`` after the last FITHAW, within the same watchdog bound; a hook that
  fails, is refused or hangs is answered ``freeze-failed`` naming it, with nothing frozen.

Never log to a file on a file system that may be frozen: the write would block until thawed.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from . import hooks as hooks_mod
from .errors import FreezeError
from .protocol import (
    MAX_FILESYSTEMS,
    MAX_PATH,
    ErrorCode,
    ErrorMessage,
    Freeze,
    Frozen,
    MessageTooLarge,
    RequestId,
    Skipped,
    SkipReason,
    Thaw,
    ThawCause,
    Thawed,
    clean_text,
    encode,
)

log = logging.getLogger(__name__)

FIFREEZE = 0xC0045877  # _IOWR('X', 119, int)
FITHAW = 0xC0045878  # _IOWR('X', 120, int)
DEFAULT_MAX_SECONDS = 60.0
_NOT_FREEZABLE = (errno.EOPNOTSUPP, errno.ENOTTY, errno.ENOSYS)


# --- where the disks are mounted --------------------------------------------------------------


@dataclass(frozen=True)
class Mount:
    """One line of /proc/self/mountinfo (the parts that matter here)."""

    mount_id: int
    device: int  # st_dev of files in this mount (os.makedev of the major:minor field)
    mountpoint: str
    fstype: str
    source: str
    read_only: bool
    root: str = "/"  # the file system's folder mounted here (a bind mount's is not "/")


def _unescape(field: bytes) -> str:
    """mountinfo escapes space, tab, newline and backslash as \\ooo octal."""
    out = bytearray()
    i = 0
    while i < len(field):
        if field[i : i + 1] == b"\\" and len(field) >= i + 4 and field[i + 1 : i + 4].isdigit():
            try:
                out.append(int(field[i + 1 : i + 4], 8) & 0xFF)
                i += 4
                continue
            except ValueError:
                pass
        out += field[i : i + 1]
        i += 1
    return os.fsdecode(bytes(out))


def parse_mountinfo(data: bytes) -> list[Mount]:
    """The mounts in a /proc/<pid>/mountinfo text; malformed lines are skipped."""
    mounts = []
    for line in data.splitlines():
        parts = line.split(b" ")
        try:
            sep = parts.index(b"-", 6)
            major, minor = (int(x) for x in parts[2].split(b":"))
            mount_opts = parts[5].split(b",")
            fstype, source, super_opts = parts[sep + 1], parts[sep + 2], parts[sep + 3].split(b",")
            mounts.append(
                Mount(
                    mount_id=int(parts[0]),
                    device=os.makedev(major, minor),
                    mountpoint=_unescape(parts[4]),
                    fstype=_unescape(fstype),
                    source=_unescape(source),
                    read_only=b"ro" in mount_opts or b"ro" in super_opts,
                    root=_unescape(parts[3]),
                )
            )
        except (ValueError, IndexError):
            log.debug("skipping mountinfo line %r", line[:200])
    return mounts


def read_sysfs(path: str) -> str | None:
    """A sysfs attribute's text, stripped; None if it cannot be read."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read().strip()
    except OSError:
        return None


def disk_serial(disk: str, sys_root: str = "/sys") -> str | None:
    """The serial of block device ``disk`` (virtio-blk: ``serial``; SCSI: ``device/serial``)."""
    block = os.path.join(sys_root, "block", disk)
    return read_sysfs(os.path.join(block, "serial")) or read_sysfs(os.path.join(block, "device", "serial"))


def _parse_dev(text: str | None) -> int | None:
    if not text or ":" not in text:
        return None
    major, _, minor = text.partition(":")
    try:
        return os.makedev(int(major), int(minor))
    except ValueError:
        return None


@dataclass(frozen=True)
class DiskDevices:
    """The block devices that hold data of one disk: names (vda, vda1, dm-0) and numbers."""

    names: frozenset[str]
    devices: frozenset[int]


def disk_devices(serial: str, sys_root: str = "/sys") -> DiskDevices | None:
    """The disk with ``serial`` and everything on it, or None if no disk has that serial."""
    block = os.path.join(sys_root, "block")
    try:
        disks = sorted(os.listdir(block))
    except OSError:
        return None
    for disk in disks:
        if disk_serial(disk, sys_root) != serial:
            continue
        names: set[str] = set()
        devices: set[int] = set()
        _collect(block, os.path.join(block, disk), disk, names, devices)
        return DiskDevices(frozenset(names), frozenset(devices))
    return None


def _collect(block: str, sysdir: str, name: str, names: set[str], devices: set[int]) -> None:
    """Add ``name`` (at ``sysdir``), its partitions and, recursively, its holders."""
    if name in names or len(names) > 1024:
        return
    names.add(name)
    dev = _parse_dev(read_sysfs(os.path.join(sysdir, "dev")))
    if dev is not None:
        devices.add(dev)
    try:
        children = sorted(os.listdir(sysdir))
    except OSError:
        children = []
    for child in children:
        if os.path.exists(os.path.join(sysdir, child, "partition")):
            _collect(block, os.path.join(sysdir, child), child, names, devices)
    try:
        holders = sorted(os.listdir(os.path.join(sysdir, "holders")))
    except OSError:
        holders = []
    for holder in holders:
        _collect(block, os.path.join(block, holder), holder, names, devices)


@dataclass(frozen=True)
class FreezePlan:
    """What to freeze (in order) and what to leave alone, for a set of disk serials."""

    mounts: tuple[Mount, ...]
    skipped: tuple[Skipped, ...]


def plan_freeze(
    serials: Iterable[str], *, sys_root: str = "/sys", mountinfo: str = "/proc/self/mountinfo"
) -> FreezePlan:
    """The file systems on the disks ``serials``: one mount per file system, sorted by mount
    point; read-only ones and unknown serials in ``skipped``."""
    names: set[str] = set()
    devices: set[int] = set()
    skipped: list[Skipped] = []
    for serial in serials:
        found = disk_devices(serial, sys_root)
        if found is None:
            skipped.append(Skipped(serial, SkipReason.UNKNOWN_DISK))
            continue
        names |= found.names
        devices |= found.devices
    if not names:
        return FreezePlan((), tuple(skipped))
    try:
        with open(mountinfo, "rb") as f:
            mounts = parse_mountinfo(f.read())
    except OSError as e:
        raise FreezeError(f"cannot read {mountinfo}: {e.strerror}") from e

    chosen: dict[int, Mount] = {}
    for mount in sorted(mounts, key=lambda m: (m.mountpoint, m.mount_id)):
        on_disk = mount.device in devices
        if not on_disk and mount.source.startswith("/dev/"):
            on_disk = os.path.basename(os.path.realpath(mount.source)) in names
        if not on_disk or mount.device in chosen:
            continue
        if mount.read_only:
            skipped.append(Skipped(_wire_path(mount.mountpoint), SkipReason.READ_ONLY))
            continue
        chosen[mount.device] = mount
    return FreezePlan(tuple(chosen.values()), tuple(skipped))


def _wire_path(path: str) -> str:
    return clean_text(path, MAX_PATH) or "?"


# --- freezing ---------------------------------------------------------------------------------


@dataclass
class _Hold:
    """File systems frozen for one job: (mount point, open directory fd), in freeze order."""

    job: str
    frozen: list[tuple[str, int]]
    released: threading.Event
    hooks: list[str]  # the fsfreeze hooks that ran with freeze: they get thaw after the thaw
    bound: float  # seconds the thaw hooks may take
    watchdog: threading.Thread | None = None


class Freezer:
    """Answers the host's ``freeze`` and ``thaw`` (one freeze held at a time).

    Thread-safe: the watchdog thread and the owner's thread share one lock.  ``notify`` is
    called from the watchdog thread after it thawed, to wake the owner so it sends the queued
    ``thawed`` notice (:meth:`take_notices`).  ``ioctl`` is replaceable for tests.
    """

    def __init__(
        self,
        *,
        max_seconds: float = DEFAULT_MAX_SECONDS,
        sys_root: str = "/sys",
        mountinfo: str = "/proc/self/mountinfo",
        notify: Callable[[], None] | None = None,
        ioctl: Callable[[int, int, int], object] = fcntl.ioctl,
        hook_dir: str | None = None,
    ) -> None:
        self.max_seconds = max_seconds
        self.hook_dir = hook_dir
        self.sys_root = sys_root
        self.mountinfo = mountinfo
        self.notify = notify
        self._ioctl = ioctl
        self._lock = threading.RLock()
        self._hold: _Hold | None = None
        self._notices: list[Thawed] = []
        self._auto_thawed: OrderedDict[str, ThawCause] = OrderedDict()

    @property
    def holding(self) -> bool:
        """True while file systems are frozen."""
        return self._hold is not None

    def handle(self, msg: Freeze | Thaw) -> Frozen | Thawed | ErrorMessage:
        """The reply to a ``freeze`` or ``thaw``."""
        if isinstance(msg, Freeze):
            return self.freeze(msg)
        return self.thaw(msg)

    def freeze(self, msg: Freeze) -> Frozen | ErrorMessage:
        received = time.monotonic()
        limit = min(msg.timeout, self.max_seconds)
        with self._lock:
            if self._hold is not None:
                return ErrorMessage(
                    msg.id, ErrorCode.BUSY, f"file systems are frozen for job {self._hold.job}"
                )
            try:
                plan = plan_freeze(msg.disks, sys_root=self.sys_root, mountinfo=self.mountinfo)
                hooks = hooks_mod.run_freeze_hooks(
                    hooks_mod.find_hooks(self.hook_dir), received + limit, msg.job, limit
                )
            except FreezeError as e:
                log.error("freeze for job %s failed: %s", msg.job, e)
                return ErrorMessage(msg.id, ErrorCode.FREEZE_FAILED, clean_text(str(e)))
            skipped = list(plan.skipped)
            frozen: list[tuple[str, int]] = []
            try:
                for mount in plan.mounts:
                    reason = self._freeze_one(mount, frozen)
                    if reason is not None:
                        skipped.append(Skipped(_wire_path(mount.mountpoint), reason))
            except FreezeError as e:
                self._thaw_fds(frozen)
                hooks_mod.run_thaw_hooks(hooks, limit, msg.job)
                log.error("freeze for job %s failed, thawed again: %s", msg.job, e)
                return ErrorMessage(msg.id, ErrorCode.FREEZE_FAILED, clean_text(str(e)))
            except BaseException:
                self._thaw_fds(frozen)
                hooks_mod.run_thaw_hooks(hooks, limit, msg.job)
                raise
            if frozen:
                hold = _Hold(msg.job, frozen, threading.Event(), hooks, limit)
                self._hold = hold
                hold.watchdog = threading.Thread(
                    target=self._watch,
                    args=(hold, received + limit),
                    name=f"hyperback-freeze-watchdog-{msg.job}",
                    daemon=True,
                )
                hold.watchdog.start()
                log.info(
                    "froze %d file system(s) for job %s (watchdog %.0f s): %s",
                    len(frozen),
                    msg.job,
                    limit,
                    ", ".join(p for p, _ in frozen),
                )
            else:
                log.info("freeze for job %s: nothing to freeze", msg.job)
                hooks_mod.run_thaw_hooks(hooks, limit, msg.job)
            return _fit_frozen(msg.id, msg.job, [p for p, _ in frozen], skipped)

    def _freeze_one(self, mount: Mount, frozen: list[tuple[str, int]]) -> SkipReason | None:
        try:
            fd = os.open(mount.mountpoint, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError as e:
            log.warning("cannot open %s to freeze it: %s", mount.mountpoint, e.strerror)
            return SkipReason.UNREACHABLE
        try:
            if os.fstat(fd).st_dev != mount.device:
                log.warning("%s is hidden under another mount; not frozen", mount.mountpoint)
                os.close(fd)
                return SkipReason.UNREACHABLE
            self._ioctl(fd, FIFREEZE, 0)
        except OSError as e:
            os.close(fd)
            if e.errno in _NOT_FREEZABLE:
                return SkipReason.NOT_FREEZABLE
            if e.errno == errno.EBUSY:
                log.warning("%s was already frozen by someone else; leaving it to them", mount.mountpoint)
                return SkipReason.ALREADY_FROZEN
            if e.errno == errno.EPERM:
                raise FreezeError(
                    f"not permitted to freeze {mount.mountpoint} (the shim must run as root)"
                ) from e
            raise FreezeError(f"FIFREEZE {mount.mountpoint}: {e.strerror}") from e
        except BaseException:
            os.close(fd)
            raise
        frozen.append((_wire_path(mount.mountpoint), fd))
        log.debug("frozen %s (%s)", mount.mountpoint, mount.fstype)
        return None

    def _thaw_fds(self, frozen: list[tuple[str, int]]) -> list[str]:
        """Thaw in reverse order and close; never raises for a single file system."""
        thawed = []
        while frozen:
            path, fd = frozen.pop()
            try:
                self._ioctl(fd, FITHAW, 0)
                thawed.append(path)
                log.debug("thawed %s", path)
            except OSError as e:
                if e.errno == errno.EINVAL:  # not frozen (any more): someone thawed it
                    log.warning("%s was no longer frozen", path)
                else:
                    log.error("FITHAW %s failed: %s (thaw it with `fsfreeze -u %s`)", path, e.strerror, path)
            finally:
                with contextlib.suppress(OSError):
                    os.close(fd)
        return thawed

    def _release(self, hold: _Hold) -> tuple[str, ...]:
        """Thaw ``hold`` (the lock is held), then run its thaw hooks; it stops being the current
        hold."""
        hold.released.set()
        if self._hold is hold:
            self._hold = None
        thawed = tuple(self._thaw_fds(hold.frozen))
        ran, hold.hooks = hold.hooks, []
        hooks_mod.run_thaw_hooks(ran, hold.bound, hold.job)
        return thawed

    def _remember(self, job: str, cause: ThawCause) -> None:
        self._auto_thawed[job] = cause
        while len(self._auto_thawed) > 32:
            self._auto_thawed.popitem(last=False)

    def thaw(self, msg: Thaw) -> Thawed:
        """Thaw what the freeze of ``msg.job`` froze.  Thawing what is not frozen is no error:
        the reply says who thawed it (``by: watchdog`` if the watchdog was first)."""
        with self._lock:
            hold = self._hold
            if hold is None or hold.job != msg.job:
                cause = self._auto_thawed.pop(msg.job, ThawCause.HOST)
                return Thawed(msg.id, msg.job, (), cause)
            paths = self._release(hold)
            log.info("thawed %d file system(s) for job %s", len(paths), msg.job)
            return _fit_thawed(msg.id, msg.job, paths, ThawCause.HOST)

    def thaw_all(self, cause: ThawCause) -> Thawed | None:
        """Thaw whatever is frozen (shutdown, host gone); the ``thawed`` notice to send, if
        anything was frozen.  Safe to call at any time, from any thread, more than once."""
        with self._lock:
            hold = self._hold
            if hold is None:
                return None
            paths = self._release(hold)
            self._remember(hold.job, cause)
            log.warning("thawed %d file system(s) of job %s (%s)", len(paths), hold.job, cause.value)
            return _fit_thawed(None, hold.job, paths, cause)

    def take_notices(self) -> list[Thawed]:
        """The unsolicited ``thawed`` messages the watchdog queued since the last call."""
        with self._lock:
            notices, self._notices = self._notices, []
            return notices

    def _watch(self, hold: _Hold, deadline: float) -> None:
        if hold.released.wait(max(0.0, deadline - time.monotonic())):
            return
        with self._lock:
            if self._hold is not hold:
                return
            paths = self._release(hold)
            self._remember(hold.job, ThawCause.WATCHDOG)
            self._notices.append(_fit_thawed(None, hold.job, paths, ThawCause.WATCHDOG))
        log.warning(
            "watchdog: the host did not thaw job %s in time; thawed %d file system(s)", hold.job, len(paths)
        )
        if self.notify is not None:
            try:
                self.notify()
            except Exception:  # the notice waits in the queue anyway
                log.exception("freeze watchdog: notify failed")


def _fit_frozen(request_id: RequestId, job: str, paths: list[str], skipped: list[Skipped]) -> Frozen:
    paths, skipped = paths[:MAX_FILESYSTEMS], skipped[:MAX_FILESYSTEMS]
    while True:
        msg = Frozen(request_id, job, tuple(paths), tuple(skipped))
        try:
            encode(msg)
            return msg
        except MessageTooLarge:
            if skipped:
                skipped = skipped[: len(skipped) // 2]
            else:
                paths = paths[: len(paths) // 2]


def _fit_thawed(request_id: RequestId | None, job: str, paths: Iterable[str], by: ThawCause) -> Thawed:
    items = list(paths)[:MAX_FILESYSTEMS]
    while True:
        msg = Thawed(request_id, job, tuple(items), by)
        try:
            encode(msg)
            return msg
        except MessageTooLarge:
            items = items[: len(items) // 2]
