"""Disk images as QEMU describes them: ``qemu-img info`` and ``qemu-img map``, typed.

::

    chain = image_chain("/srv/vm1/disk.qcow2")      # top first: (ImageInfo, ...), backing resolved
    layout = chain_layout("/srv/vm1/disk.qcow2", chunk_size=repo.config.chunk_size)
    repo.backup(layout, "vm1/vda")                 # the copier reads clusters where they lie

    top = top_layout("/srv/vm1/disk.qcow2", chunk_size)   # only the overlay's own clusters
    repo.backup(top.layout, "vm1/vda", Policy.INCREMENTAL, changes=top.changes, base=base_snapshot)

Both run ``qemu-img`` with ``-U`` (force-share), so they work on images a running QEMU holds
open. Only a *stable* image may be mapped for a backup: one that no one writes while the copier
reads, such as the read-only image below the overlay of a point-in-time view
(:mod:`host_agent.agent.views`); the map of an image a guest writes to is stale as soon as it is made.

How ``qemu-img map --output=json`` (QEMU 7.2) turns into a :class:`~host_agent.storage.extents.Layout`:

* ``files`` is the chain, top first, so that a range's ``depth`` indexes it (a qcow2 image with an
  external ``data-file`` contributes that data file instead: its offsets point there).
* ``"zero": true`` ranges, and ranges no image of the chain allocates, read as zeros: no mapping.
* ``"data": true`` with an ``"offset"``: read ``files[depth]`` at that offset.
* ``"data": true`` without an ``"offset"`` is a compressed cluster (QEMU 7.2's map has no
  ``compressed`` key; this is how it shows): not readable in place. :func:`split_layout` sets
  such clusters aside for QEMU to decompress (:mod:`host_agent.storage.guestview`).
* ``"data": true, "zero": true`` with an offset is an allocated cluster over a hole of the file
  (QEMU asks the file layer for sparse images, e.g. after ``preallocation=metadata`` or clusters
  QEMU zeroed with fallocate): no mapping of its own, but a chunk that is part data, part such
  zeros is read whole from the file, whose hole reads as zeros. A raw image's holes (``"zero":
  true`` with an offset) likewise. A qcow2 ``"zero": true`` *without* ``"data"`` is a zero flag
  on a cluster that may still hold stale bytes: never read.

The native copier reads whole repository chunks from one place, so every chunk must lie in one
mapping. A qcow2 image whose allocation unit (its cluster, or 1/32 of it with extended L2
entries) is smaller than the chunk size, a compressed cluster, an encrypted image, a corrupt one
or a non-file protocol (nbd, rbd, ...) raise :class:`NotReadableInPlace`: the caller falls back,
e.g. to ``qemu-img convert`` into a temporary raw file. Any other failure of ``qemu-img`` raises
:class:`ImageError`.

Errors::

    host_agent.errors.SourceError
    ├── ImageError            qemu-img failed or said something unexpected
    └── NotReadableInPlace    the image is fine, but the copier cannot read it from its files
"""
from __future__ import annotations

import json
import logging
import os
import stat
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from host_agent import errors
from host_agent.errors import ImageError, NotReadableInPlace
from host_agent.storage.extents import Extent, Layout, Mapping

log = logging.getLogger(__name__)

QEMU_IMG = "qemu-img"
TIMEOUT = 120.0  # seconds for one qemu-img run; a map of a large, fragmented image takes a while


@dataclass(frozen=True)
class Bitmap:
    """A persistent dirty bitmap stored in a qcow2 image."""

    name: str
    granularity: int
    flags: tuple[str, ...]  # "auto" (enabled), "in-use" (open in a QEMU or not stored cleanly)

    @property
    def in_use(self) -> bool:
        return "in-use" in self.flags


@dataclass(frozen=True)
class ImageInfo:
    """One image of a chain, from ``qemu-img info --output=json``."""

    path: str                          # absolute
    format: str                        # "qcow2", "raw", ...
    virtual_size: int
    actual_size: int                   # bytes allocated on the host
    cluster_size: int | None        # None for raw
    backing: str | None             # absolute path of the backing image, None at the bottom
    backing_format: str | None
    bitmaps: tuple[Bitmap, ...] = ()
    data_file: str | None = None    # qcow2 external data file, absolute
    encrypted: bool = False
    extended_l2: bool = False
    corrupt: bool = False
    compat: str | None = None       # qcow2 "0.10" (v2) or "1.1" (v3)

    @property
    def allocation_unit(self) -> int | None:
        """The smallest range a qcow2 image maps on its own (a subcluster with extended L2)."""
        if self.cluster_size is None or self.format != "qcow2":
            return None
        return self.cluster_size // 32 if self.extended_l2 else self.cluster_size

    @property
    def can_carry_bitmaps(self) -> bool:
        """Whether QEMU can store a persistent dirty bitmap in this image (qcow2 v3 only)."""
        return self.format == "qcow2" and self.compat != "0.10"

    @property
    def data_path(self) -> str:
        """The file that holds this image's guest data (offsets of its map point into it)."""
        return self.data_file or self.path


@dataclass(frozen=True)
class MapRange:
    """One entry of ``qemu-img map --output=json``."""

    start: int
    length: int
    depth: int
    present: bool
    zero: bool
    data: bool
    offset: int | None


@dataclass(frozen=True)
class TopLayout:
    """The clusters an overlay holds itself: read them, keep everything else from the base's snapshot.

    ``changes`` is every range the top image decides on its own (data *and* zeros written over the
    backing image), for ``Repository.backup(layout, ..., changes=changes, base=base_snapshot)``.
    """

    layout: Layout
    changes: tuple[Extent, ...]
    chain: tuple[ImageInfo, ...]


# ---------- running qemu-img ----------

def _run(args: Sequence[str], what: str) -> Any:
    cmd = [QEMU_IMG, *args]
    log.debug("running %s", " ".join(cmd))
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, check=False)
    except FileNotFoundError as e:
        raise ImageError(f"{QEMU_IMG} is not installed (Debian: apt install qemu-utils)") from e
    except subprocess.TimeoutExpired as e:
        raise ImageError(f"{QEMU_IMG} took more than {TIMEOUT:.0f} s to {what}") from e
    if out.returncode != 0:
        message = out.stderr.strip().replace("\n", "; ") or f"exit status {out.returncode}"
        raise ImageError(f"cannot {what}: {message}")
    try:
        return json.loads(out.stdout)
    except json.JSONDecodeError as e:
        raise ImageError(f"cannot {what}: {QEMU_IMG} printed no JSON ({e})") from e


def _absolute(path: str, relative_to: str) -> str:
    if path.startswith("json:") or "://" in path:
        return path
    if path.startswith("file:"):
        path = path[len("file:"):]
    return os.path.normpath(os.path.join(os.path.dirname(relative_to), path))


def _parse_info(doc: dict[str, Any], cwd: str) -> ImageInfo:
    try:
        path = doc["filename"]
        if not path.startswith("json:") and "://" not in path:
            path = os.path.normpath(os.path.join(cwd, path.removeprefix("file:")))
        specific = doc.get("format-specific", {}).get("data", {}) or {}
        backing = doc.get("full-backing-filename") or doc.get("backing-filename")
        data_file = specific.get("data-file")
        return ImageInfo(
            path=path,
            format=doc["format"],
            virtual_size=int(doc["virtual-size"]),
            actual_size=int(doc.get("actual-size", 0)),
            cluster_size=int(doc["cluster-size"]) if "cluster-size" in doc else None,
            backing=_absolute(backing, path) if backing else None,
            backing_format=doc.get("backing-filename-format"),
            bitmaps=tuple(Bitmap(b["name"], int(b["granularity"]), tuple(b.get("flags", ())))
                          for b in specific.get("bitmaps", ())),
            data_file=_absolute(data_file, path) if data_file else None,
            encrypted=bool(doc.get("encrypted", False)),
            extended_l2=bool(specific.get("extended-l2", False)),
            corrupt=bool(specific.get("corrupt", False)),
            compat=specific.get("compat"),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise ImageError(f"unexpected qemu-img info output for {doc.get('filename')!r}: {e!r}") from e


def _format_args(fmt: str | None) -> list[str]:
    return ["-f", fmt] if fmt else []


def image_info(path: str | os.PathLike[str], fmt: str | None = None) -> ImageInfo:
    """Describe one image (without its backing images). ``fmt`` avoids format probing: give it
    whenever it is known (libvirt's ``<driver type>``), as probing a raw image is unsafe."""
    path = os.path.abspath(path)
    doc = _run(["info", "--output=json", "-U", *_format_args(fmt), path], f"inspect {path}")
    if not isinstance(doc, dict):
        raise ImageError(f"unexpected qemu-img info output for {path}")
    return _parse_info(doc, os.getcwd())


def image_chain(path: str | os.PathLike[str], fmt: str | None = None) -> tuple[ImageInfo, ...]:
    """The image and its backing images, top first, every path absolute."""
    path = os.path.abspath(path)
    docs = _run(["info", "--output=json", "-U", "--backing-chain", *_format_args(fmt), path],
                f"inspect the backing chain of {path}")
    if not isinstance(docs, list) or not docs:
        raise ImageError(f"unexpected qemu-img info --backing-chain output for {path}")
    return tuple(_parse_info(d, os.getcwd()) for d in docs)


def image_map(path: str | os.PathLike[str], fmt: str | None = None) -> list[MapRange]:
    """``qemu-img map --output=json -U`` of the whole chain below ``path``."""
    path = os.path.abspath(path)
    docs = _run(["map", "--output=json", "-U", *_format_args(fmt), path], f"map {path}")
    if not isinstance(docs, list):
        raise ImageError(f"unexpected qemu-img map output for {path}")
    try:
        return [MapRange(int(d["start"]), int(d["length"]), int(d.get("depth", 0)),
                         bool(d.get("present", True)), bool(d["zero"]), bool(d["data"]),
                         int(d["offset"]) if "offset" in d else None)
                for d in docs]
    except (KeyError, TypeError, ValueError) as e:
        raise ImageError(f"unexpected qemu-img map output for {path}: {e!r}") from e


# ---------- layouts ----------

def _is_file_or_device(path: str) -> bool:
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return False
    return stat.S_ISREG(mode) or stat.S_ISBLK(mode)


def _check_chain(chain: Sequence[ImageInfo], chunk_size: int, depths: int) -> None:
    """Raise NotReadableInPlace for images of the chain (down to ``depths``) the copier cannot read."""
    for image in chain[:depths]:
        if image.path.startswith("json:") or "://" in image.path or not _is_file_or_device(image.data_path):
            raise NotReadableInPlace(
                f"{image.path} is not a file or block device on this host (a network protocol?); "
                "read it through QEMU instead", image.path)
        if image.encrypted:
            raise NotReadableInPlace(f"{image.path} is encrypted: its clusters hold ciphertext", image.path)
        if image.corrupt:
            raise NotReadableInPlace(f"{image.path} is marked corrupt: run 'qemu-img check -r all' on a "
                                     "copy first", image.path)
        if image.format not in ("qcow2", "raw"):
            raise NotReadableInPlace(f"{image.path} is a {image.format} image; only qcow2 and raw "
                                     "images are read in place", image.path)
        unit = image.allocation_unit
        if unit is not None and unit < chunk_size:
            kind = "subcluster" if image.extended_l2 else "cluster"
            raise NotReadableInPlace(
                f"{image.path} has a {kind} size of {unit} bytes, below the repository's chunk size of "
                f"{chunk_size}: a chunk may span clusters stored apart, so it cannot be read in place",
                image.path)


@dataclass
class _Run:
    """Consecutive pieces of one file at one offset delta (data, and raw holes that read zeros)."""

    start: int
    end: int
    file: int
    delta: int
    data: list[Extent]


def _runs(ranges: Sequence[MapRange], chain: Sequence[ImageInfo], max_depth: int | None,
          compressed: list[MapRange] | None = None) -> list[_Run]:
    """The in-place runs of ``ranges``; compressed clusters go to ``compressed`` if given, else raise."""
    runs: list[_Run] = []
    last: _Run | None = None
    for r in ranges:
        if not r.present or (max_depth is not None and r.depth > max_depth):
            last = None
            continue
        if r.depth >= len(chain):
            raise ImageError(f"qemu-img map reported depth {r.depth} of a chain of {len(chain)} images")
        image = chain[r.depth]
        if r.data and not r.zero and r.offset is None and compressed is not None:
            compressed.append(r)
            last = None
            continue
        if r.data and not r.zero and r.offset is None:
            raise NotReadableInPlace(
                f"{image.path}: the cluster at guest offset {r.start} has no file offset (a compressed "
                "cluster): it cannot be read in place", image.path)
        # Zeros that the file itself reads as zeros may be read along with data in the same chunk:
        # "data" with "zero" is an allocated cluster over a hole of the file (QEMU asked the file
        # layer); a raw image's "zero" is a hole. A qcow2 "zero" without "data" is a zero flag on
        # a cluster that may still hold stale bytes: never read.
        readable_zeros = r.zero and (r.data or image.format == "raw")
        if r.offset is None or (r.zero and not readable_zeros):
            last = None
            continue
        delta = r.offset - r.start
        if last is not None and last.file == r.depth and last.delta == delta and last.end == r.start:
            last.end = r.start + r.length
        else:
            last = _Run(r.start, r.start + r.length, r.depth, delta, [])
            runs.append(last)
        if r.data and not r.zero:
            last.data.append((r.start, r.length))
    return runs


def _mappings(runs: Sequence[_Run], chain: Sequence[ImageInfo], size: int, chunk_size: int) -> list[Mapping]:
    """The chunk-aligned mappings covering every data range; raise where a chunk would straddle files."""
    out: list[Mapping] = []
    for run in runs:
        covers: list[list[int]] = []
        for start, length in run.data:
            lo = max(run.start, start // chunk_size * chunk_size)
            hi = min(run.end, -(-(start + length) // chunk_size) * chunk_size)
            if covers and lo <= covers[-1][1]:
                covers[-1][1] = max(covers[-1][1], hi)
            else:
                covers.append([lo, hi])
        for lo, hi in covers:
            if lo % chunk_size or (hi % chunk_size and hi != size):
                at = lo if lo % chunk_size else hi
                raise NotReadableInPlace(
                    f"{chain[run.file].path}: data near guest offset {at} does not fill the chunk of "
                    f"{chunk_size} bytes it lies in (allocation below the chunk size?); it cannot be "
                    "read in place", chain[run.file].path)
            out.append(Mapping(lo, hi - lo, run.file, lo + run.delta))
    out.sort(key=lambda m: m.offset)
    return out


def _check_chunk_size(chunk_size: int) -> None:
    if chunk_size <= 0 or chunk_size & (chunk_size - 1):
        raise errors.UsageError(f"chunk size {chunk_size} is not a power of two")


def _chain_mappings(path: str | os.PathLike[str], chunk_size: int, fmt: str | None,
                    compressed: list[MapRange] | None) -> tuple[tuple[ImageInfo, ...], list[Mapping]]:
    _check_chunk_size(chunk_size)
    chain = image_chain(path, fmt)
    _check_chain(chain, chunk_size, len(chain))
    ranges = image_map(path, fmt)
    mappings = _mappings(_runs(ranges, chain, None, compressed), chain, chain[0].virtual_size, chunk_size)
    log.debug("%s: %d mappings over %d files", path, len(mappings), len(chain))
    return chain, mappings


def chain_layout(path: str | os.PathLike[str], chunk_size: int, fmt: str | None = None,
                 label: str | None = None) -> Layout:
    """The guest-visible content of ``path`` (through its backing chain) as a Layout over the chain's
    files, for ``Repository.backup``. Raises NotReadableInPlace where the copier cannot read it."""
    chain, mappings = _chain_mappings(path, chunk_size, fmt, None)
    return Layout(tuple(i.data_path for i in chain), tuple(mappings), chain[0].virtual_size,
                  label or chain[0].path)


@dataclass(frozen=True)
class SplitLayout:
    """A chain's guest-visible content split in two: what the copier reads in place (``layout``) and
    the compressed clusters it cannot (``compressed``, merged guest ranges), to be read through QEMU."""

    layout: Layout
    compressed: tuple[Extent, ...]


def split_layout(path: str | os.PathLike[str], chunk_size: int, fmt: str | None = None,
                 label: str | None = None) -> SplitLayout:
    """Like :func:`chain_layout`, but compressed clusters are set aside instead of refused. Raises
    NotReadableInPlace for anything else the copier cannot read (small clusters, encryption, ...)."""
    compressed: list[MapRange] = []
    chain, mappings = _chain_mappings(path, chunk_size, fmt, compressed)
    merged: list[Extent] = []
    for r in compressed:
        if merged and merged[-1][0] + merged[-1][1] == r.start:
            merged[-1] = (merged[-1][0], merged[-1][1] + r.length)
        else:
            merged.append((r.start, r.length))
    layout = Layout(tuple(i.data_path for i in chain), tuple(mappings), chain[0].virtual_size,
                    label or chain[0].path)
    return SplitLayout(layout, tuple(merged))


def top_layout(path: str | os.PathLike[str], chunk_size: int, fmt: str | None = None,
               label: str | None = None) -> TopLayout:
    """Only the clusters the top image holds itself (depth 0), and the ranges it decides.

    For a per-VM backup of an overlay whose shared backing image is already backed up: pass
    ``changes`` and the backing image's snapshot as ``base=``; whatever the overlay does not
    decide is kept from that snapshot unread. The snapshot must be of the very backing image
    content below this overlay, of the same virtual size.
    """
    _check_chunk_size(chunk_size)
    chain = image_chain(path, fmt)
    _check_chain(chain, chunk_size, 1)
    ranges = image_map(path, fmt)
    size = chain[0].virtual_size
    mappings = _mappings(_runs(ranges, chain, 0), chain, size, chunk_size)
    changes: list[Extent] = []
    for r in ranges:
        if r.depth != 0 or not r.present:
            continue
        if changes and changes[-1][0] + changes[-1][1] == r.start:
            changes[-1] = (changes[-1][0], changes[-1][1] + r.length)
        else:
            changes.append((r.start, r.length))
    for start, length in changes:
        if start % chunk_size or (length % chunk_size and start + length != size):
            raise NotReadableInPlace(
                f"{chain[0].path}: the range at guest offset {start}+{length} that the overlay "
                f"decides does not align with the chunk size {chunk_size}", chain[0].path)
    layout = Layout(tuple(i.data_path for i in chain), tuple(mappings), size,
                    label or f"{chain[0].path} (own clusters)")
    return TopLayout(layout, tuple(changes), chain)


def convert_to_raw(path: str | os.PathLike[str], target: str | os.PathLike[str],
                   fmt: str | None = None) -> Path:
    """``qemu-img convert -O raw`` (sparse): the fallback for images not readable in place."""
    path, target = os.path.abspath(path), os.path.abspath(target)
    cmd = [QEMU_IMG, "convert", "-U", *_format_args(fmt), "-O", "raw", path, target]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    except FileNotFoundError as e:
        raise ImageError(f"{QEMU_IMG} is not installed (Debian: apt install qemu-utils)") from e
    if out.returncode != 0:
        raise ImageError(f"cannot convert {path} to raw: {out.stderr.strip()}")
    return Path(target)


def convert_from_raw(path: str | os.PathLike[str], target: str | os.PathLike[str], out_fmt: str) -> Path:
    """``qemu-img convert -f raw -O out_fmt``: a restored raw image into the format a domain uses."""
    path, target = os.path.abspath(path), os.path.abspath(target)
    cmd = [QEMU_IMG, "convert", "-f", "raw", "-O", out_fmt, path, target]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    except FileNotFoundError as e:
        raise ImageError(f"{QEMU_IMG} is not installed (Debian: apt install qemu-utils)") from e
    if out.returncode != 0:
        raise ImageError(f"cannot convert {path} to {out_fmt}: {out.stderr.strip()}")
    return Path(target)
