"""Path-level backups: chosen paths of a guest's file system, read from a stable image (a
point-in-time view's) through the isolated reader, stored as a file-level snapshot (docs/restore.md,
"Path-level backups").

The paths come from a guest and are hostile: each must be absolute, without ``.`` or ``..``
components, control characters or NUL, at most 256 characters (the wire protocol's path grammar),
and must exist in the file system, or nothing is stored. The image is read only inside the
appliance; the archive is spooled to ``spool_dir`` (the agent's run directory), backed up as an
ordinary image with the document's ``files`` field, and removed.
"""
from __future__ import annotations

import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Final

from host_agent import errors
from host_agent.guestfiles.reader import GuestFiles, ReaderSettings
from host_agent.model import MAX_PATHS, Policy, outermost
from host_agent.storage.filesnap import spool
from host_agent.storage.repository import Repository
from host_agent.storage.snapshot import BackupResult

log = logging.getLogger(__name__)

MAX_PATH_LEN: Final = 256


def checked_paths(paths: Sequence[str]) -> tuple[str, ...]:
    """A guest's paths, refused rather than normalized if they are not plain absolute paths."""
    if not 1 <= len(paths) <= MAX_PATHS:
        raise errors.UsageError(f"a path backup names 1 to {MAX_PATHS} paths, not {len(paths)}")
    out = []
    for path in paths:
        parts = path.split("/")[1:]
        if (not path.startswith("/") or len(path) > MAX_PATH_LEN or any(not c.isprintable() for c in path)
                or any(p in (".", "..") for p in parts)):
            raise errors.UsageError(f"path {path!r} is not a plain absolute path of at most {MAX_PATH_LEN} "
                                    "printable characters without '.' or '..'")
        out.append("/" + "/".join(p for p in parts if p))
    return outermost(out)  # a folder and a path inside it would store that path twice


def partition_device(partition: int) -> str:
    """The appliance's name for a partition of its only drive (0: the disk formatted whole)."""
    if not 0 <= partition <= 128:
        raise errors.UsageError(f"partition {partition} is not 0 (the whole disk) to 128")
    return "/dev/sda" if partition == 0 else f"/dev/sda{partition}"


def back_up_paths(repository: Repository, image: Path, image_format: str, partition: int,
                  paths: Sequence[str], name: str, spool_dir: Path,
                  settings: ReaderSettings | None = None) -> tuple[BackupResult, list[tuple[str, str]]]:
    """Store ``paths`` of the file system on ``partition`` of ``image`` as a file-level snapshot
    ``name``. Returns the backup's result and the entries skipped (devices, FIFOs, sockets)."""
    wanted = checked_paths(paths)
    device = partition_device(partition)
    with GuestFiles(image, settings or ReaderSettings(), image_format=image_format) as guest:
        guest.mount(device)
        for path in wanted:
            guest.stat(path)  # a path the guest does not have fails the request before anything is written
        with tempfile.NamedTemporaryFile(dir=spool_dir, prefix="paths-", suffix=".spool") as spooled:
            ref, skipped = spool(guest, wanted, spooled.fileno(), repository.config.chunk_size, partition)
            spooled.flush()
            result = repository.backup(spooled.name, name, Policy.FULL, files=ref)
    log.info("path backup %s of %s on %s: %d bytes of archive and catalog", result.snapshot.id,
             ", ".join(wanted), device, result.snapshot.size)
    return result, skipped


__all__ = ["back_up_paths", "checked_paths", "partition_device"]
