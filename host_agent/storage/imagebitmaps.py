"""Changed-block tracking for ``hyperback backup`` of a qcow2 image: persistent dirty bitmaps.

::

    since = dirty_since(path, base.checkpoint)      # the extents written since, or a Fallback
    name = start_tracking(path)                     # a new bitmap, before the image is read
    repo.backup(..., changes=since, checkpoint=name)
    keep_only(path, {checkpoints later backups can start from})

Without a VM there is no libvirt checkpoint, but QEMU keeps a qcow2 v3 image's persistent dirty
bitmaps itself: every program that writes the image through QEMU's block layer (a VM, qemu-io,
qemu-img, qemu-nbd) marks the clusters it writes in every enabled bitmap, zero writes included, and
stores the bitmaps on close. A full or incremental backup adds one, ``hyperback-cli-<UTC
time>-<random>``, and records its name as the snapshot's ``checkpoint`` (docs/repository-format.md,
5.1), exactly as the agent records a libvirt checkpoint (whose bitmaps carry its name). The next
incremental reads the extents that bitmap marks (``qemu-nbd -B`` with ``nbdinfo --map``, ~40 ms)
and only those. The ``hyperback-cli-`` prefix keeps these apart from the bitmaps of the agent's
libvirt checkpoints, which :func:`keep_only` never touches.

The bitmap cannot be trusted, and every chunk is compared instead (:class:`Fallback` says why),
when it is missing (another image, or removed), flagged ``in-use`` (a QEMU that had the image open
died before storing it), disabled, or when the image is a qcow2 v2 image (no bitmaps). Adding one
needs the image's write lock: an image in use by a running VM gets none, and says so.
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import time
from collections.abc import Iterable
from dataclasses import dataclass

from host_agent import errors
from host_agent.storage import qcow2
from host_agent.storage.extents import Extent

log = logging.getLogger(__name__)

PREFIX = "hyperback-cli-"
NBDINFO = "nbdinfo"
QEMU_NBD = "qemu-nbd"
TIMEOUT = 120.0


@dataclass(frozen=True)
class Fallback:
    """Why no bitmap can tell what changed: the backup compares every chunk instead."""

    reason: str


def new_name() -> str:
    return f"{PREFIX}{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{os.urandom(3).hex()}"


def _run(cmd: list[str], what: str) -> str:
    log.debug("running %s", " ".join(cmd))
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, check=False)
    except FileNotFoundError as e:
        raise errors.ImageError(f"cannot {what}: {cmd[0]} is not installed "
                                "(Debian: apt install qemu-utils libnbd-bin)") from e
    except subprocess.TimeoutExpired as e:
        raise errors.ImageError(f"cannot {what}: {cmd[0]} took more than {TIMEOUT:.0f} s") from e
    if out.returncode != 0:
        raise errors.ImageError(f"cannot {what}: {out.stderr.strip() or f'exit status {out.returncode}'}")
    return out.stdout


def dirty_since(path: str, name: str) -> list[Extent] | Fallback:
    """The guest extents written since bitmap ``name`` was added to the image at ``path``."""
    info = qcow2.image_info(path, "qcow2")
    bitmap = next((b for b in info.bitmaps if b.name == name), None)
    if bitmap is None:
        return Fallback(f"{path} has no bitmap {name} (another image, or removed)")
    if bitmap.in_use:
        return Fallback(f"bitmap {name} of {path} is in use or was not stored cleanly")
    if "auto" not in bitmap.flags:
        return Fallback(f"bitmap {name} of {path} is disabled")
    context = f"qemu:dirty-bitmap:{name}"
    # nbdinfo starts qemu-nbd itself on a socket of its own (systemd socket activation)
    doc = json.loads(_run([NBDINFO, "--json", f"--map={context}", "--",
                           "[", QEMU_NBD, "-r", "-f", "qcow2", "-B", name, path, "]"],
                          f"read bitmap {name} of {path}"))
    out: list[Extent] = []
    for e in doc:
        if not int(e["type"]) & 1:
            continue
        offset, length = int(e["offset"]), int(e["length"])
        if out and out[-1][0] + out[-1][1] == offset:
            out[-1] = (out[-1][0], out[-1][1] + length)
        else:
            out.append((offset, length))
    return out


def start_tracking(path: str) -> str | Fallback:
    """Add a new enabled bitmap to the image; its name, or why none could be added."""
    info = qcow2.image_info(path, "qcow2")
    if not info.can_carry_bitmaps:
        return Fallback(f"{path} is a qcow2 v2 image, which cannot carry a dirty bitmap "
                        "(qemu-img amend -o compat=1.1 upgrades it)")
    name = new_name()
    try:
        _run([qcow2.QEMU_IMG, "bitmap", "--add", "--enable", "-f", "qcow2", path, name],
             f"add a dirty bitmap to {path}")
    except errors.ImageError as e:
        return Fallback(f"no dirty bitmap could be added ({e}); is the image in use?")
    return name


def remove_one(path: str, name: str) -> None:
    """Remove one bitmap; ImageError if it cannot be (qemu-img needs the image's write lock: no QEMU
    may have it open)."""
    _run([qcow2.QEMU_IMG, "bitmap", "--remove", "-f", "qcow2", path, name], f"remove bitmap {name} of {path}")


def remove(path: str, names: Iterable[str]) -> None:
    """Remove bitmaps; a failure only costs the next backup its shortcut, so it is logged."""
    for name in names:
        try:
            remove_one(path, name)
        except errors.ImageError as e:
            log.warning("%s", e)


def keep_only(path: str, keep: set[str]) -> None:
    """Remove this image's ``hyperback-cli-`` bitmaps that no later backup can start from: each
    one costs QEMU a bitmap update on every write."""
    info = qcow2.image_info(path, "qcow2")
    remove(path, [b.name for b in info.bitmaps if b.name.startswith(PREFIX) and b.name not in keep])
