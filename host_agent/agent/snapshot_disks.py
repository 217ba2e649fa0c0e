"""Snapshots a guest sees: a snapshot of one of its own disks, hot-plugged into it read-only.

A guest asks with ``see`` (docs/wire-protocol.md, section 5.6). The agent looks the snapshot up
among *that disk's* snapshots only: their repository name is the domain's UUID and the disk's
serial, both taken from the live domain XML of the channel the request came on, so a guest can
name neither another VM's snapshot nor a host path; the socket is the agent's choice. The
snapshot is served over NBD straight from the repository (an :class:`Export`) and attached live
(never to the persistent definition), read-only, under a fresh serial: the guest's handle for it.

A *lease* ends -- the disk is unplugged, then the export stopped -- when the guest releases it,
when its time limit passes (``see_time_limit``), when the VM stops or leaves this host, and when
the agent stops. Each lease is written to ``run_dir/snapshot-disks/`` before its export starts:
an agent that died leaves nothing behind once it has started again (:meth:`SnapshotDisks.recover`).
A guest that refuses the unplug keeps a dead disk until it stops; its export is stopped anyway.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import shutil
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

from guest_shim import protocol as p
from host_agent import errors
from host_agent.agent.destinations import AnyRepository, Destinations
from host_agent.agent.domains import Domains
from host_agent.model import DiskRef
from host_agent.storage.export import SnapshotExport
from host_agent.storage.snapshot import Snapshot

log = logging.getLogger(__name__)

SERIAL_PREFIX = "hbsee-"  # + 8 hex digits: 14 characters, within virtio-blk's 20-byte serial
UNPLUG_TIMEOUT = 30.0     # seconds a guest gets to give an unplugged disk back


class Export(Protocol):
    """A snapshot served read-only over NBD on a unix socket (host_agent.storage.export)."""

    socket_path: Path
    size: int

    def start(self) -> None: ...

    def stop(self) -> None: ...


ExportFactory = Callable[[AnyRepository, str, Path], Export]


def nbd_export(repository: AnyRepository, snapshot_id: str, work_dir: Path) -> SnapshotExport:
    """The repository's snapshot served by nbdkit, its socket in ``work_dir`` (a short path: unix
    sockets allow 107 bytes)."""
    return SnapshotExport(repository, snapshot_id, work_dir, socket_path=work_dir / "nbd.sock")
Tell = Callable[[str, p.Message], Awaitable[None]]


@dataclass(frozen=True)
class Lease:
    """One snapshot a guest sees, as written down in the run directory."""

    domain_uuid: str
    serial: str          # the read-only disk's serial: the guest's handle
    disk: str            # serial of the disk whose snapshot it shows
    snapshot: str
    destination: str
    work_dir: str        # the export's own directory (its socket); removed when the lease ends
    size: int = 0
    expires: float = 0.0  # time.time()


def own_snapshot(repo: AnyRepository, disk: DiskRef, asked: str, partition: int | None = None) -> Snapshot:
    """The snapshot ``asked`` (an id, a unique prefix of one, or ``latest``) among this disk's own
    snapshots (with ``partition``: its file-level snapshots of that partition's file system);
    SnapshotNotFound naming the disk otherwise. Another VM's snapshot is never found: it is not
    among them, whatever its id."""
    name = disk.snapshot_name if partition is None else disk.paths_snapshot_name(partition)
    own = repo.snapshots(name)
    if asked == p.LATEST:
        if own:
            return own[-1]
        what = "snapshot" if partition is None else f"backup of paths on partition {partition}"
        raise errors.SnapshotNotFound(f"disk {disk.serial} has no {what} yet: back it up first")
    found = [s for s in own if s.id == asked] or [s for s in own if len(asked) >= 8
                                                  and s.id.startswith(asked)]
    if len(found) != 1:
        raise errors.SnapshotNotFound(f"disk {disk.serial} of this VM has no snapshot {asked!r}; "
                                      f"'hyperback-shim list {disk.serial}' shows its snapshots")
    return found[0]


class SnapshotDisks:
    """Every lease of this agent; see, release and the ends that come without asking."""

    def __init__(self, domains: Domains, destinations: Destinations, run_dir: Path, *, time_limit: float,
                 per_vm: int, export: ExportFactory = nbd_export, tell: Tell | None = None) -> None:
        self.domains, self.destinations = domains, destinations
        self.dir = run_dir / "snapshot-disks"
        self.time_limit = time_limit  # read when a lease starts (tests shorten it)
        self.per_vm = per_vm
        self.unplug_timeout = UNPLUG_TIMEOUT
        self._export = export
        self._tell = tell
        self.leases: dict[str, Lease] = {}
        self._exports: dict[str, Export] = {}
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def of(self, uuid: str) -> list[Lease]:
        return [lease for lease in self.leases.values() if lease.domain_uuid == uuid]

    # ---------- asked by the guest ----------

    async def see(self, uuid: str, disk: str, snapshot: str, destination: str,
                  partition: int | None = None) -> Lease:
        """Attach snapshot ``snapshot`` of the domain's disk ``disk`` read-only; the lease.  Raises
        UnknownDisk, SnapshotNotFound, UsageError (too many), or an EnvironmentProblem."""
        started = time.monotonic()
        async with self._lock(uuid):
            if len(self.of(uuid)) >= self.per_vm:
                raise errors.UsageError(f"this VM already sees {self.per_vm} snapshot(s), the most it may: "
                                        "release one first ('hyperback-shim release SERIAL')")
            lease, export = await asyncio.to_thread(self._open, uuid, disk, snapshot, destination, partition)
        self.leases[lease.serial] = lease
        self._exports[lease.serial] = export
        delay = max(0.0, lease.expires - time.time())
        self._timers[lease.serial] = asyncio.get_running_loop().call_later(delay, self._expire, lease.serial)
        log.info("domain %s sees snapshot %s of disk %s as %s until %s (exported and attached in %.2f s)",
                 uuid, lease.snapshot, disk, lease.serial,
                 time.strftime("%H:%M:%S", time.localtime(lease.expires)), time.monotonic() - started)
        return lease

    async def release(self, uuid: str, serial: str) -> Lease:
        """The guest gives disk ``serial`` back. UnknownDisk unless it is a lease of this domain."""
        lease = self.leases.get(serial)
        if lease is None or lease.domain_uuid != uuid:
            raise errors.UnknownDisk(f"this VM sees no snapshot as disk {serial}")
        await self._end(serial, p.ReleaseCause.GUEST)
        return lease

    # ---------- ends that come without asking ----------

    def domains_seeing(self) -> set[str]:
        return {lease.domain_uuid for lease in self.leases.values()}

    async def domain_gone(self, uuid: str) -> None:
        """The VM stopped or left: its live disks went with it; stop their exports."""
        for lease in self.of(uuid):
            await self._end(lease.serial, p.ReleaseCause.HOST, detach=False)

    async def close(self) -> None:
        """The agent stops: every lease ends (nothing may serve a VM without the agent)."""
        for serial in list(self.leases):
            await self._end(serial, p.ReleaseCause.HOST)

    def recover(self) -> list[str]:
        """At start: end the leases a previous run left (unplug, stop the export, forget); what it
        did, one line each.  Blocking: call before serving, or from a thread."""
        done = []
        for state in sorted(self.dir.glob("*.json")) if self.dir.is_dir() else []:
            try:
                lease = Lease(**json.loads(state.read_text()))
            except (OSError, ValueError, TypeError) as e:
                log.warning("unreadable lease %s (%s): removing it", state, e)
                state.unlink(missing_ok=True)
                continue
            self._unplug(lease)
            _stop_leftover(Path(lease.work_dir))
            state.unlink(missing_ok=True)
            done.append(f"ended lease {lease.serial} (snapshot {lease.snapshot} in domain "
                        f"{lease.domain_uuid})")
        return done

    # ---------- the steps ----------

    def _lock(self, uuid: str) -> asyncio.Lock:
        return self._locks.setdefault(uuid, asyncio.Lock())

    def _expire(self, serial: str) -> None:
        task = asyncio.get_running_loop().create_task(self._end(serial, p.ReleaseCause.TIME_LIMIT),
                                                      name=f"expire-{serial}")
        self._tasks.add(task)  # referenced until done (asyncio keeps weak references)
        task.add_done_callback(self._tasks.discard)

    def _state(self, serial: str) -> Path:
        return self.dir / f"{serial}.json"

    def _write(self, lease: Lease) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self._state(lease.serial).with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(lease)))
        tmp.replace(self._state(lease.serial))

    def _open(self, uuid: str, disk_serial: str, asked: str, destination: str,
              partition: int | None) -> tuple[Lease, Export]:
        (disk,) = self.domains.disks_by_serial(uuid, [disk_serial])
        repo = self.destinations.repository(destination)
        snap = own_snapshot(repo, disk, asked, partition)
        serial = f"{SERIAL_PREFIX}{secrets.token_hex(4)}"
        lease = Lease(uuid, serial, disk.serial, snap.id, destination, str(self.dir / serial))
        self._write(lease)  # before anything runs: a crash from here on is cleaned up by recover()
        export = self._export(repo, snap.id, Path(lease.work_dir))
        try:
            export.start()
            lease = Lease(**{**asdict(lease), "size": export.size,
                             "expires": time.time() + self.time_limit})
            self._write(lease)
            self.domains.attach_nbd_readonly(uuid, str(export.socket_path), serial)
        except BaseException:
            export.stop()
            shutil.rmtree(lease.work_dir, ignore_errors=True)
            self._state(serial).unlink(missing_ok=True)
            raise
        return lease, export

    async def _end(self, serial: str, by: p.ReleaseCause, detach: bool = True) -> None:
        lease = self.leases.pop(serial, None)
        if lease is None:
            return  # ended already (released while its time limit fired)
        timer = self._timers.pop(serial, None)
        if timer is not None:
            timer.cancel()
        export = self._exports.pop(serial)
        async with self._lock(lease.domain_uuid):
            await asyncio.to_thread(self._close, lease, export, detach)
        log.info("domain %s no longer sees %s (%s)", lease.domain_uuid, serial, by.value)
        if by is not p.ReleaseCause.GUEST and detach and self._tell is not None:
            await self._tell(lease.domain_uuid, p.Released(None, serial, by))

    def _close(self, lease: Lease, export: Export, detach: bool) -> None:
        if detach:
            self._unplug(lease)
        export.stop()
        shutil.rmtree(lease.work_dir, ignore_errors=True)
        self._state(lease.serial).unlink(missing_ok=True)

    def _unplug(self, lease: Lease) -> None:
        """Unplug the disk and wait (a while) for the guest to give it back; a domain that is gone
        took its live disks with it."""
        try:
            if not self.domains.detach_live(lease.domain_uuid, lease.serial):
                return
            deadline = time.monotonic() + self.unplug_timeout
            pause = 0.05
            while self.domains.live_disk(lease.domain_uuid, lease.serial) is not None:
                if time.monotonic() >= deadline:
                    log.warning("domain %s did not give disk %s back within %g s; stopping its export "
                                "anyway (the guest sees a dead disk until it stops)",
                                lease.domain_uuid, lease.serial, self.unplug_timeout)
                    return
                time.sleep(pause)  # the unplug completes in the guest: libvirt polls it the same way
                pause = min(pause * 2, 0.5)
        except (errors.NoDomain, errors.OperationInvalid):
            return


def _stop_leftover(work_dir: Path) -> None:
    """Stop the NBD server a dead agent left serving from ``work_dir`` (found by that directory in
    its command line: nothing else names it), then remove the directory."""
    needle = os.fsencode(str(work_dir))
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if needle in cmdline:
            _terminate(int(proc.name))
    shutil.rmtree(work_dir, ignore_errors=True)


def _running(pid: int) -> bool:
    """The process exists and is not a zombie waiting for its parent."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[:1] != ["Z"]


def _terminate(pid: int, timeout: float = 5.0) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while _running(pid):
            if time.monotonic() >= deadline:
                os.kill(pid, signal.SIGKILL)
                return
            time.sleep(0.05)
