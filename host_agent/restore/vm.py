"""Whole-VM restore: a run of a domain's backup (its disk snapshots and stored definition, tied by
the ``vm`` field of each disk snapshot, docs/repository-format.md 5.3) brought back as a new domain
or over the disks of the domain it came from. See docs/restore.md.

Each disk becomes an image through a :data:`Materialize` function (a full restore). Instant
recovery (:func:`restore_instant`, one disk) does not fit that step, since it needs the domain
defined to start it on an overlay of the snapshot: it shares the new domain's definition and files
with :func:`restore_as` and hands the start and the copy to ``agent.instant``.

A new domain is defined only once every image and file is in place, so a failure leaves no domain
behind; in place, each disk is restored beside its image and renamed over it, so a disk is either
the old one or the restored one.
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import stat
import time
import uuid as uuidlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import libvirt  # type: ignore[import-untyped]

from host_agent import errors, hypervisor
from host_agent.agent import instant
from host_agent.agent.checkpoints import delete_checkpoint, list_checkpoints
from host_agent.agent.destinations import AnyRepository
from host_agent.agent.offline import ImageGuard
from host_agent.agent.vmdefinition import SWTPM_STATE, read_stored
from host_agent.restore import vmxml
from host_agent.storage import qcow2
from host_agent.storage.files import fsync_dir
from host_agent.storage.repository import ProgressFn
from host_agent.storage.snapshot import Snapshot, VmFile, VmRef

log = logging.getLogger(__name__)

FORMATS = ("raw", "qcow2")
STOP_POLL = 0.5                     # seconds between looks at a domain asked to shut down

Materialize = Callable[[AnyRepository, Snapshot, Path, str, "ProgressFn | None"], None]
"""Make ``path`` (absent) an image of the snapshot in a format of :data:`FORMATS`, atomically."""

ProgressFor = Callable[[str], "ProgressFn | None"]
"""A progress function for one long step, by label (e.g. ``restore vda``); None for none."""


def _no_progress(_label: str) -> ProgressFn | None:
    return None


@dataclass(frozen=True)
class Run:
    """One backup of a domain at one destination: its definition and the disk snapshots taken."""

    vm: VmRef
    disks: tuple[Snapshot, ...]

    def serial(self, snap: Snapshot) -> str:
        return snap.name.split("/", 1)[1]


@dataclass
class RestoredVm:
    name: str
    uuid: str
    run: str
    disks: list[dict[str, str]] = field(default_factory=list)   # dev, path, format, snapshot
    files: list[str] = field(default_factory=list)              # NVRAM and TPM files written
    dropped: tuple[str, ...] = ()                                # writable disks the run lacks
    checkpoints_dropped: list[str] = field(default_factory=list)
    started: bool = False
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "uuid": self.uuid, "run": self.run, "disks": self.disks,
                "files": self.files, "dropped": list(self.dropped),
                "checkpoints_dropped": self.checkpoints_dropped, "started": self.started,
                "seconds": self.seconds}


# ---------- finding what to restore ----------

def find_run(repo: AnyRepository, spec: str) -> Run:
    """The run a snapshot id (prefix, NAME@latest) or a backup job id names."""
    with_vm = [s for s in repo.snapshots() if s.vm is not None]
    by_job = [s for s in with_vm if s.vm is not None and spec in s.vm.jobs]
    if by_job:
        return _run_of(with_vm, by_job[-1])
    try:
        snap = repo.resolve(spec)
    except errors.SnapshotNotFound:
        raise errors.SnapshotNotFound(
            f"no snapshot or backup job {spec!r} in {repo}: 'hyperback list' shows the snapshots, "
            "'hyperback job list' the jobs") from None
    if snap.vm is not None:
        return _run_of(with_vm, snap)
    users = [s for s in with_vm if s.vm is not None and s.vm.definition == snap.id]
    if users:
        return _run_of(with_vm, users[-1])
    raise errors.UsageError(
        f"snapshot {snap.id} ({snap.name}) carries no domain definition (taken before hyperback "
        "stored them, or not by the agent): restore its disks one by one with 'hyperback restore'")


def _run_of(with_vm: Sequence[Snapshot], snap: Snapshot) -> Run:
    assert snap.vm is not None
    run = snap.vm.run
    return Run(snap.vm, tuple(s for s in with_vm if s.vm is not None and s.vm.run == run))


# ---------- materializing disks and files ----------

def materialize_disk(repo: AnyRepository, snap: Snapshot, path: Path, fmt: str,
                     progress: ProgressFn | None) -> None:
    """A full restore of the snapshot to ``path``; for qcow2, to raw beside it, then converted."""
    if fmt not in FORMATS:
        raise errors.UsageError(f"image format {fmt!r} is not one of {', '.join(FORMATS)}")
    if fmt == "raw":
        repo.restore(snap.id, path, overwrite=False, progress=progress)
        return
    raw = path.with_name(f".{path.name}.hyperback-raw")
    partial = path.with_name(f".{path.name}.hyperback-partial")
    try:
        repo.restore(snap.id, raw, overwrite=True, progress=progress, sync=False)
        qcow2.convert_from_raw(raw, partial, fmt)
        with open(partial, "rb+") as f:
            os.fsync(f.fileno())
        if path.exists():
            raise errors.TargetError(f"{path} appeared while it was restored; not replacing it")
        os.rename(partial, path)
        fsync_dir(path.parent)
    finally:
        raw.unlink(missing_ok=True)
        partial.unlink(missing_ok=True)


def restore_file(repo: AnyRepository, stored: VmFile, path: Path) -> None:
    """A stored NVRAM or TPM file to ``path`` (replaced atomically), with its mode."""
    path.parent.mkdir(parents=True, exist_ok=True)
    repo.restore(stored.snapshot, path, overwrite=True)
    os.chmod(path, stored.mode & 0o7777)


def tpm_path(state_dir: Path, stored: VmFile) -> Path:
    """Where a stored TPM file goes under a swtpm state directory; its recorded path is relative."""
    rel = PurePosixPath(stored.path)
    if rel.is_absolute() or ".." in rel.parts or not rel.parts:
        raise errors.RepositoryError(f"stored TPM file path {stored.path!r} is not inside its state "
                                     "directory")
    return state_dir / rel


# ---------- as a new domain ----------

@dataclass(frozen=True)
class _NewDomain:
    """A run planned as a new domain: its rewritten definition, its disks' targets and files."""

    rewritten: vmxml.Rewritten
    pairs: list[tuple[vmxml.StoredDisk, Snapshot]]
    targets: dict[str, vmxml.DiskTarget]
    nvram: VmFile | None
    nvram_path: Path | None


def _plan_as(conn: Any, repo: AnyRepository, run: Run, name: str, to_dir: Path, fmt: str) -> _NewDomain:
    if fmt not in FORMATS:
        raise errors.UsageError(f"--format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    _refuse_taken(conn, name)
    xml = read_stored(repo, run.vm)
    pairs = _disks_of(run, xml)
    targets = {disk.dev: vmxml.DiskTarget(to_dir / f"{name}-{disk.dev}.{'img' if fmt == 'raw' else fmt}", fmt)
               for disk, _ in pairs}
    taken = [str(t.path) for t in targets.values() if t.path.exists()]
    if taken:
        raise errors.TargetError(f"{', '.join(taken)} exist(s): give another --to directory or --as name")
    nvram = next((f for f in run.vm.files if f.role == "nvram"), None)
    nvram_path = to_dir / f"{name}_VARS.fd" if nvram is not None else None
    rewritten = vmxml.as_new_domain(xml, name, targets, to_dir, nvram_path, str(uuidlib.uuid4()))
    return _NewDomain(rewritten, pairs, targets, nvram, nvram_path)


def _restore_files_as(repo: AnyRepository, run: Run, plan: _NewDomain, made: list[Path],
                      result: RestoredVm) -> None:
    """The run's NVRAM and TPM state, copied for the new domain."""
    if plan.nvram is not None and plan.nvram_path is not None:
        made.append(plan.nvram_path)
        restore_file(repo, plan.nvram, plan.nvram_path)
        result.files.append(str(plan.nvram_path))
    tpm = [f for f in run.vm.files if f.role == "tpm"]
    if tpm:
        state_dir = SWTPM_STATE / plan.rewritten.uuid
        made.append(state_dir)
        for stored in tpm:
            path = tpm_path(state_dir, stored)
            restore_file(repo, stored, path)
            result.files.append(str(path))


def restore_as(conn: Any, repo: AnyRepository, run: Run, name: str, to_dir: Path, fmt: str = "raw",
               progress_for: ProgressFor = _no_progress, materialize: Materialize = materialize_disk,
               start: bool = False) -> RestoredVm:
    """Define a new domain ``name`` from the run: new UUID and MACs, its disks restored into
    ``to_dir``, its NVRAM and TPM state copied. Refuses a name libvirt already knows."""
    started = time.monotonic()
    conn = hypervisor.guard(conn)
    plan = _plan_as(conn, repo, run, name, to_dir, fmt)
    result = RestoredVm(name, plan.rewritten.uuid, run.vm.run, dropped=plan.rewritten.dropped)
    with _undo_on_failure() as made:
        to_dir.mkdir(parents=True, exist_ok=True)
        for disk, snap in plan.pairs:
            target = plan.targets[disk.dev]
            made.append(target.path)
            materialize(repo, snap, target.path, fmt, progress_for(f"restore {disk.dev}"))
            result.disks.append({"dev": disk.dev, "path": str(target.path), "format": fmt,
                                 "snapshot": snap.id})
        _restore_files_as(repo, run, plan, made, result)
        dom = _define(conn, plan.rewritten.xml, name)
    if start:
        _start(dom, name)
        result.started = True
    result.seconds = round(time.monotonic() - started, 3)
    return result


def restore_instant(conn: Any, repo: AnyRepository, run: Run, name: str, to_dir: Path, run_dir: Path,
                    fmt: str = "raw", bandwidth: int = 0) -> tuple[instant.InstantRecovery, RestoredVm]:
    """A one-disk run as a new domain ``name`` (as :func:`restore_as` defines it), started at once on
    its snapshot (instant recovery: an overlay over the snapshot's export) while the disk is copied
    to ``to_dir``. Returns the recovery, its copy started: ``finish()`` follows it to the pivot and
    ``close()`` always. Its NVRAM and TPM files are in place before it starts."""
    started = time.monotonic()
    conn = hypervisor.guard(conn)
    if len(run.disks) != 1:
        raise errors.UsageError(
            f"--instant recovers a VM with one disk; run {run.vm.run} backed up {len(run.disks)} "
            f"({', '.join(run.serial(s) for s in run.disks)}): restore it without --instant")
    plan = _plan_as(conn, repo, run, name, to_dir, fmt)
    ((disk, snap),) = plan.pairs
    target = plan.targets[disk.dev].path
    request = instant.Request(plan.rewritten.xml, disk.dev, target, fmt, bandwidth, persistent=True)
    result = RestoredVm(name, plan.rewritten.uuid, run.vm.run, dropped=plan.rewritten.dropped)
    with _undo_on_failure() as made:
        to_dir.mkdir(parents=True, exist_ok=True)
        _restore_files_as(repo, run, plan, made, result)
        # the domain is defined and started by the recovery (undefined again if it cannot start)
        recovery = instant.instant_restore(conn, repo, snap.id, request, run_dir)
    result.disks.append({"dev": disk.dev, "path": str(target), "format": fmt, "snapshot": snap.id})
    result.started = True
    result.seconds = round(time.monotonic() - started, 3)
    return recovery, result


def _refuse_taken(conn: Any, name: str) -> None:
    try:
        conn.lookupByName(name)
    except errors.NoDomain:
        return
    raise errors.UsageError(f"a domain named {name!r} exists: give --as another name, or --in-place")


def _disks_of(run: Run, xml: str) -> list[tuple[vmxml.StoredDisk, Snapshot]]:
    """Each disk snapshot of the run with the disk of the definition that has its serial."""
    by_serial = {d.serial: d for d in vmxml.disks(vmxml.parse(xml)) if d.serial}
    pairs = []
    for snap in run.disks:
        disk = by_serial.get(run.serial(snap))
        if disk is None:
            raise errors.RepositoryError(f"snapshot {snap.id} is of disk serial {run.serial(snap)}, which "
                                         f"the domain's definition (snapshot {run.vm.definition}) lacks")
        pairs.append((disk, snap))
    return pairs


@contextlib.contextmanager
def _undo_on_failure() -> Iterator[list[Path]]:
    """Paths created inside are removed if the block fails: a failed restore leaves nothing."""
    made: list[Path] = []
    try:
        yield made
    except BaseException:
        for path in reversed(made):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        raise


def _define(conn: Any, xml: str, name: str) -> Any:
    try:
        return conn.defineXML(xml)
    except errors.HypervisorError as e:
        raise errors.HypervisorError(f"libvirt refused the restored definition of {name}: {e}", e.code) from e


def _start(dom: Any, name: str) -> None:
    try:
        dom.create()
    except errors.HypervisorError as e:
        raise errors.HypervisorError(f"{name} is restored but did not start: {e}", e.code) from e


# ---------- in place ----------

def restore_in_place(conn: Any, repo: AnyRepository, run: Run, stop: bool = False, start: bool = False,
                     stop_timeout: float = 120.0, progress_for: ProgressFor = _no_progress,
                     materialize: Materialize = materialize_disk) -> RestoredVm:
    """Replace the disks (and NVRAM/TPM files) of the run's own domain with the run's; the domain's
    identity (name, UUID, MACs, definition) stays. It must be shut off, or ``stop`` shuts it down."""
    started = time.monotonic()
    conn = hypervisor.guard(conn)
    try:
        dom = conn.lookupByUUIDString(run.vm.domain_uuid)
    except errors.NoDomain:
        raise errors.UsageError(f"domain {run.vm.domain_name} ({run.vm.domain_uuid}) is not defined here: "
                                "restore it as a new domain with --as NAME") from None
    name = dom.name()
    if dom.isActive():
        if not stop:
            raise errors.UsageError(f"domain {name} is running: shut it down first, or give --stop")
        _shut_down(dom, name, stop_timeout)
    xml = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
    pairs = _disks_of(run, xml)
    for disk, _ in pairs:
        if disk.source is None:
            raise errors.UsageError(f"disk {disk.dev} of {name} has no source image to restore over")
    result = RestoredVm(name, run.vm.domain_uuid, run.vm.run)
    files = [d.source for d, _ in pairs if d.source is not None and _is_file(d.source)]
    # QEMU's own image locks keep the domain from starting until the last image is replaced
    with ImageGuard(files):
        for disk, snap in pairs:
            assert disk.source is not None
            fmt = disk.format if disk.format in FORMATS else "raw"
            _replace(repo, snap, Path(disk.source), fmt, progress_for(f"restore {disk.dev}"), materialize)
            result.disks.append({"dev": disk.dev, "path": disk.source, "format": fmt, "snapshot": snap.id})
        _replace_files(repo, run, xml, result)
    # their bitmaps were in the replaced images: the next backup reads by comparison
    for checkpoint in list_checkpoints(dom):
        delete_checkpoint(dom, checkpoint)
        result.checkpoints_dropped.append(checkpoint)
    if start:
        _start(dom, name)
        result.started = True
    result.seconds = round(time.monotonic() - started, 3)
    return result


def _is_file(path: str) -> bool:
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError as e:
        raise errors.TargetError(f"cannot use disk image {path}: {e.strerror}") from e


def _replace(repo: AnyRepository, snap: Snapshot, path: Path, fmt: str, progress: ProgressFn | None,
             materialize: Materialize) -> None:
    """Restore beside ``path`` and rename over it (a block device is written in place)."""
    if not _is_file(str(path)):
        repo.restore(snap.id, path, overwrite=True, progress=progress)
        return
    beside = path.with_name(f".{path.name}.hyperback-restore")
    beside.unlink(missing_ok=True)  # left by an interrupted restore
    try:
        materialize(repo, snap, beside, fmt, progress)
        old = os.stat(path)
        with contextlib.suppress(OSError):  # keep the owner libvirt or the operator gave the image
            os.chown(beside, old.st_uid, old.st_gid)
        os.chmod(beside, stat.S_IMODE(old.st_mode))
        os.rename(beside, path)
        fsync_dir(path.parent)
    finally:
        beside.unlink(missing_ok=True)


def _replace_files(repo: AnyRepository, run: Run, xml: str, result: RestoredVm) -> None:
    """The NVRAM file the definition names now, and the TPM state, as the run stored them."""
    root = vmxml.parse(xml)
    current_nvram = (root.findtext("./os/nvram") or "").strip()
    for stored in run.vm.files:
        if stored.role == "nvram" and current_nvram:
            path = Path(current_nvram)
        elif stored.role == "tpm":
            path = tpm_path(SWTPM_STATE / run.vm.domain_uuid, stored)
        else:
            continue
        restore_file(repo, stored, path)
        result.files.append(str(path))


def _shut_down(dom: Any, name: str, timeout: float) -> None:
    """Ask the guest to shut down (ACPI) and wait until it has."""
    try:
        dom.shutdown()
    except errors.OperationInvalid:
        return  # stopped meanwhile
    deadline = time.monotonic() + timeout
    while dom.isActive():
        if time.monotonic() > deadline:
            raise errors.EnvironmentProblem(
                f"domain {name} did not shut down within {timeout:.0f} s: stop it ('virsh destroy "
                f"{name}' if it must) and run again")
        time.sleep(STOP_POLL)
