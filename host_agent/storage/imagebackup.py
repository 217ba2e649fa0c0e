"""``hyperback backup SOURCE``: an image file or block device, raw as it is, qcow2 as its guest sees it.

::

    done = backup_image(repo, "/srv/vm1.qcow2", "vm1/vda", Policy.INCREMENTAL)
    done.result.snapshot; done.detection   # e.g. ChangeDetection.DIRTY_BITMAP

The format is detected from the magic bytes unless given (:mod:`host_agent.storage.guestview`).
A qcow2 image is read through its guest view, and tracked by a dirty bitmap of its own between
backups (:mod:`host_agent.storage.imagebitmaps`): an incremental reads only what the base's bitmap
marks. What found the changes is reported as the agent reports it: ``dirty-bitmap`` here, while the
snapshot document says ``change-list`` (only the listed extents were read), as the agent's do.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass

from host_agent import errors
from host_agent.model import ChangeDetection, Policy
from host_agent.storage import imagebitmaps, qcow2
from host_agent.storage.extents import Extent, validate_changes
from host_agent.storage.guestview import FORMATS, detect_format, guest_view
from host_agent.storage.repository import ProgressFn, Repository
from host_agent.storage.snapshot import BackupResult, Snapshot

log = logging.getLogger(__name__)

MAX_SIZE = 1 << 62  # beyond any image: "to the end"


@dataclass(frozen=True)
class ImageBackup:
    result: BackupResult
    format: str                     # what was backed up: "raw" (the bytes) or "qcow2" (the guest's disk)
    detection: ChangeDetection      # what told the changes (the snapshot's own, or dirty-bitmap)
    through_qemu: int               # bytes qemu-img decompressed or converted into a scratch file
    notes: tuple[str, ...]

    def to_json(self) -> dict[str, object]:
        return {**self.result.to_json(), "format": self.format, "change_detection": self.detection.value,
                "bytes_through_qemu": self.through_qemu, "notes": list(self.notes)}


def backup_image(repo: Repository, source: str | os.PathLike[str], name: str, policy: Policy,
                 changes: Sequence[Extent] | None = None, fmt: str | None = None,
                 progress: ProgressFn | None = None, threads: int | None = None,
                 scratch_dir: str | os.PathLike[str] | None = None,
                 labels: Sequence[str] = ()) -> ImageBackup:
    """Back up ``source`` as a snapshot of ``name`` labelled ``labels``; ``fmt`` (raw|qcow2)
    overrides detection."""
    if fmt is not None and fmt not in FORMATS:
        raise errors.UsageError(f"format must be raw or qcow2, not {fmt!r}")
    guessed = fmt is None
    fmt = fmt or detect_format(source)
    if guessed and fmt == "qcow2":
        _refuse_references(source)
    if fmt == "raw":
        result = repo.backup(source, name, policy, changes, progress, threads, labels=labels)
        return ImageBackup(result, "raw", result.snapshot.change_detection, 0, result.notes)
    return _backup_qcow2(repo, os.path.abspath(source), name, policy, changes, progress, threads,
                         scratch_dir, labels, track=not guessed)


def _refuse_references(source: str | os.PathLike[str]) -> None:
    """A qcow2 header that was only detected may have been written by a guest into its raw disk:
    followed, its backing or data file would make hyperback store a host file as that disk."""
    info = qcow2.image_info(source, "qcow2")
    named = info.backing or info.data_file
    if named:
        raise errors.UsageError(f"{source} looks like a qcow2 image that reads {named}; a guest can write "
                                "such a header into its raw disk, so hyperback follows it only when told: "
                                "pass --format qcow2 for an image you trust, or --format raw for its bytes")


def _backup_qcow2(repo: Repository, path: str, name: str, policy: Policy, changes: Sequence[Extent] | None,
                  progress: ProgressFn | None, threads: int | None,
                  scratch_dir: str | os.PathLike[str] | None, labels: Sequence[str],
                  track: bool) -> ImageBackup:
    notes: list[str] = []
    base = repo.base_for(name, policy)
    # The new bitmap first, the base's after: a write in between is in both (read twice), never in
    # neither (docs/changed-block-tracking.md, "Why this order is correct"). A format only detected
    # gets no bitmap: writing into what may be a guest's raw disk would corrupt it.
    tracking = imagebitmaps.start_tracking(path) if track else imagebitmaps.Fallback(
        "the format was detected, not given (--format qcow2 lets hyperback add a dirty bitmap)")
    if isinstance(tracking, imagebitmaps.Fallback):
        notes.append(f"{tracking.reason}: the next incremental compares every chunk")
    checkpoint = tracking if isinstance(tracking, str) else None
    try:
        marked = _marked_since(path, base, notes) if changes is None else None
        changes = marked if marked is not None else changes
        needed = _needed(changes, base, repo.config.chunk_size)
        # one progress line for both stages: qemu-img's decompression, then the copy
        with guest_view(path, repo.config.chunk_size, scratch_dir, needed, progress) as view:
            result = repo.backup(view.source, name, policy, changes, progress, threads, checkpoint=checkpoint,
                                 labels=labels)
    except BaseException:
        if checkpoint:
            imagebitmaps.remove(path, [checkpoint])
        raise
    starts = (repo.base_for(name, p) for p in (Policy.INCREMENTAL, Policy.DIFFERENTIAL))
    imagebitmaps.keep_only(path, {s.checkpoint for s in starts if s is not None and s.checkpoint})
    detection = result.snapshot.change_detection
    if marked is not None and detection is ChangeDetection.CHANGE_LIST:
        detection = ChangeDetection.DIRTY_BITMAP
    return ImageBackup(result, "qcow2", detection, view.through_qemu, (*view.notes, *notes, *result.notes))


def _marked_since(path: str, base: Snapshot | None, notes: list[str]) -> list[Extent] | None:
    """What the base's bitmap marks as written since; None (and a note why) if it cannot tell."""
    if base is None or not base.checkpoint:
        return None
    since = imagebitmaps.dirty_since(path, base.checkpoint)
    if isinstance(since, imagebitmaps.Fallback):
        notes.append(f"{since.reason}: every chunk compared with the base")
        return None
    return since


def _needed(changes: Sequence[Extent] | None, base: Snapshot | None, chunk_size: int) -> list[Extent] | None:
    """The guest ranges an incremental will read: its changes, and whatever lies past the base's
    last whole chunk (a grown image reads that all); None: everything."""
    if changes is None or base is None:
        return None
    return validate_changes([*changes, (base.size // chunk_size * chunk_size, MAX_SIZE)], 2 * MAX_SIZE)
