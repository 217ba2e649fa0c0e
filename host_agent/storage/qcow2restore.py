"""``hyperback restore --format qcow2``: a snapshot written as a sparse qcow2 image, streamed.

::

    result = restore_qcow2(repo, "vm1/vda@latest", Path("/srv/vm1-restored.qcow2"))

The snapshot is served read-only over NBD (:class:`~host_agent.storage.export.SnapshotExport`, every
chunk verified as it is read, all-zero chunks reported as holes) and ``nbdcopy`` copies it into a
new qcow2 image that ``qemu-nbd`` serves on a socket of its own (socket activation): holes are
skipped (``--destination-is-zero``: the image is new), so only data clusters are allocated; no raw
copy is made first. Measured on a 1 GiB image with 512 MiB of data: 2.8 s, against 3.3 s for a raw
restore followed by ``qemu-img convert -O qcow2`` (and 1 GiB of scratch space), and 34 s for
``qemu-img convert`` straight from the NBD export (small serial requests).

As with a raw file, the image is written under a temporary name beside the target and renamed over
it only once complete (and flushed, unless ``sync`` is off), so a failure never leaves a partial
image under the target's name.
"""
from __future__ import annotations

import logging
import os
import stat
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from host_agent import errors
from host_agent.storage import qcow2
from host_agent.storage.export import SnapshotExport
from host_agent.storage.files import fsync_dir
from host_agent.storage.repository import ProgressFn, Repository
from host_agent.storage.snapshot import RestoreResult, Snapshot

log = logging.getLogger(__name__)

NBDCOPY = "nbdcopy"
QEMU_NBD = "qemu-nbd"
REQUEST_SIZE = 1 << 20  # nbdcopy's default 256 KiB took 4.2 s where 1 MiB took 3.0 s (1 GiB, 512 MiB data)


def target_format(target: str | os.PathLike[str], fmt: str | None) -> str:
    """The format to restore to: ``fmt`` if given, else qcow2 for a path ending in .qcow2, else raw."""
    if fmt is not None:
        if fmt not in ("raw", "qcow2"):
            raise errors.UsageError(f"format must be raw or qcow2, not {fmt!r}")
        return fmt
    return "qcow2" if str(target).lower().endswith(".qcow2") else "raw"


def restore_qcow2(repo: Repository, spec: str, target: str | os.PathLike[str], overwrite: bool = False,
                  progress: ProgressFn | None = None, threads: int | None = None,
                  sync: bool = True) -> RestoreResult:
    """Restore a snapshot into a new sparse qcow2 image at ``target`` (a file)."""
    snap = repo.resolve(spec)
    path = Path(target)
    _check_target(path, overwrite)
    started = time.monotonic()
    try:
        # a name of our own, made 0600 before qemu-img writes into it (it keeps the mode): a restored
        # disk is as private as a raw restore's, and nothing planted at a fixed name is followed
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".hyperback-partial", dir=path.parent)
        os.close(fd)
    except OSError as e:
        raise errors.TargetError(f"cannot write into {path.parent}: {e.strerror}") from e
    partial = Path(name)
    try:
        _create(partial, snap.size)
        with tempfile.TemporaryDirectory(prefix="hyperback-restore-") as run_dir:
            # nbdkit may end with the thread that started it only if that thread outlives the copy
            on_main = threading.current_thread() is threading.main_thread()
            with SnapshotExport(repo, snap.id, Path(run_dir), exit_with_parent=on_main) as export:
                _copy(export.uri, partial, snap, progress, threads, sync)
        os.rename(partial, path)
        if sync:
            fsync_dir(path.parent)
    except OSError as e:
        raise errors.TargetError(f"cannot write {path}: {e.strerror}") from e
    finally:
        partial.unlink(missing_ok=True)
    allocated = os.stat(path).st_blocks * 512
    return RestoreResult(snap, str(path), allocated, allocated, round(time.monotonic() - started, 3))


def _check_target(path: Path, overwrite: bool) -> None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return
    except OSError as e:
        raise errors.TargetError(f"cannot use target {path}: {e.strerror}") from e
    if stat.S_ISBLK(st.st_mode):
        raise errors.UsageError(f"target {path} is a block device: restore it with --format raw "
                                "(a qcow2 image is written as a file)")
    if not stat.S_ISREG(st.st_mode):
        raise errors.TargetError(f"target {path} is not a file")
    if not overwrite:
        raise errors.TargetError(f"target {path} exists; pass --overwrite to replace it")


def _create(path: Path, size: int) -> None:
    out = _run([qcow2.QEMU_IMG, "create", "-q", "-f", "qcow2", str(path), str(size)], None)
    if out.returncode != 0:
        raise errors.TargetError(f"cannot create {path}: {out.stderr.strip()}")


def _copy(uri: str, image: Path, snap: Snapshot, progress: ProgressFn | None, threads: int | None,
          sync: bool) -> None:
    """nbdcopy from the export into the image, served by a qemu-nbd that nbdcopy starts itself."""
    read_end, write_end = os.pipe()
    cmd = [NBDCOPY, "--destination-is-zero", f"--request-size={REQUEST_SIZE}", f"--progress={write_end}",
           *(["--flush"] if sync else []), *([f"--threads={threads}"] if threads else []),
           uri, "--", "[", QEMU_NBD, "-f", "qcow2", str(image), "]"]
    ticker = threading.Thread(target=_tick, args=(read_end, snap.size, progress), daemon=True)
    ticker.start()
    try:
        out = _run(cmd, write_end)
    finally:
        os.close(write_end)
        ticker.join()
    if out.returncode != 0:
        message = out.stderr.strip().replace("\n", "; ")
        if "Input/output error" in message:
            raise errors.CorruptChunk(f"snapshot {snap.id} could not be read whole ({message}): run "
                                      "'hyperback check' and 'hyperback verify'")
        raise errors.TargetError(f"cannot copy snapshot {snap.id} into {image}: {message}")


def _tick(fd: int, size: int, progress: ProgressFn | None) -> None:
    """Turn nbdcopy's "N/100" lines into progress calls until it closes its end."""
    with os.fdopen(fd, "r") as lines:
        for line in lines:
            percent, _, _ = line.partition("/")
            if progress is not None and percent.strip().isdigit():
                progress(size * int(percent) // 100, size)


def _run(cmd: list[str], keep_fd: int | None) -> subprocess.CompletedProcess[str]:
    log.debug("running %s", " ".join(cmd))
    try:
        return subprocess.run(cmd, capture_output=True, text=True, check=False,
                              pass_fds=(keep_fd,) if keep_fd is not None else ())
    except FileNotFoundError as e:
        raise errors.EnvironmentProblem(f"cannot run {cmd[0]}: install qemu-utils and libnbd-bin") from e
