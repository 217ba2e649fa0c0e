"""A qcow2 image as its guest sees it, for ``hyperback backup`` of an image file.

::

    if detect_format(path) == "qcow2":
        with guest_view(path, repo.config.chunk_size) as view:
            repo.backup(view.source, "vm1/vda")       # the guest's disk, not the file's bytes

What the guest sees is what ``qemu-img convert -O raw`` of the image gives: its backing chain
resolved, zero clusters and unallocated ranges reading as zeros (never read: they are holes of the
view), and compressed clusters decompressed. The copier reads every cluster it can where it lies
(:func:`host_agent.storage.qcow2.split_layout`, zero-copy). Compressed clusters have no place of
their own to read from: ``qemu-img convert`` decompresses them, once, into a scratch file the view
maps them to (slices of the image, concatenated; at most :data:`MAX_SLICES` of them, so gaps
between compressed ranges are merged, smallest first, because each slice costs qemu-img an open of
the chain, ~4 ms). An image the copier cannot read in place at all (clusters smaller than the chunk
size, encryption, a network backing file) is converted whole into a sparse scratch file instead.

A format is detected by its magic bytes only (``QFI\\xfb``): a raw disk whose guest wrote those
bytes at its start would be taken for qcow2, so ``--format raw`` overrides detection.
"""
from __future__ import annotations

import logging
import os
import re
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from host_agent import errors
from host_agent.storage import qcow2
from host_agent.storage.extents import Extent, Layout, Mapping, overlapping
from host_agent.storage.repository import ProgressFn

log = logging.getLogger(__name__)

QCOW2_MAGIC = b"QFI\xfb"
FORMATS = ("raw", "qcow2")
MAX_SLICES = 32
PERCENT = re.compile(r"\((\d+(?:\.\d+)?)/100%\)")


@dataclass(frozen=True)
class GuestView:
    """What ``Repository.backup`` reads: a layout over the chain's files (and the scratch file of
    decompressed clusters), or a whole converted scratch file."""

    source: Layout | Path
    through_qemu: int         # guest bytes qemu-img had to write to the scratch file first
    notes: tuple[str, ...]


def detect_format(path: str | os.PathLike[str]) -> str:
    """"qcow2" if the file or device starts with qcow2's magic, else "raw"."""
    try:
        with open(path, "rb") as f:
            head = f.read(len(QCOW2_MAGIC))
    except OSError as e:
        raise errors.SourceError(f"cannot open source {path}: {e.strerror}") from e
    return "qcow2" if head == QCOW2_MAGIC else "raw"


@contextmanager
def guest_view(path: str | os.PathLike[str], chunk_size: int,
               scratch_dir: str | os.PathLike[str] | None = None,
               needed: Sequence[Extent] | None = None,
               progress: ProgressFn | None = None) -> Iterator[GuestView]:
    """The guest-visible disk of the qcow2 image at ``path``; the scratch file goes on exit.

    ``needed`` (sorted, disjoint; None: all) are the only guest ranges the backup will read, e.g. an
    incremental's changes: compressed clusters outside them are not decompressed, nor mapped.
    ``progress`` hears how far qemu-img has got with them."""
    path = os.path.abspath(path)
    fd, scratch = tempfile.mkstemp(prefix=".hyperback-", suffix=".raw", dir=scratch_dir)
    os.close(fd)
    try:
        yield _view(path, chunk_size, Path(scratch), needed, progress)
    finally:
        Path(scratch).unlink(missing_ok=True)


def _view(path: str, chunk_size: int, scratch: Path, needed: Sequence[Extent] | None,
          progress: ProgressFn | None) -> GuestView:
    try:
        split = qcow2.split_layout(path, chunk_size, "qcow2", label=path)
    except errors.NotReadableInPlace as e:
        log.info("%s; converting the whole image", e)
        qcow2.convert_to_raw(path, scratch, "qcow2")
        return GuestView(scratch, os.stat(scratch).st_blocks * 512,
                         (f"read through qemu-img convert into a scratch file ({e})",))
    wanted = list(split.compressed) if needed is None else restrict(split.compressed, needed, chunk_size)
    if not wanted:
        return GuestView(split.layout, 0, ())
    slices = merge_slices(wanted, MAX_SLICES)
    _convert_slices(path, slices, scratch, progress)
    layout = split.layout
    mappings = [*layout.mappings, *_slice_mappings(wanted, slices, len(layout.files))]
    mappings.sort(key=lambda m: m.offset)
    compressed = sum(n for _, n in wanted)
    view = Layout((*layout.files, str(scratch)), tuple(mappings), layout.size, layout.label)
    return GuestView(view, sum(n for _, n in slices),
                     (f"{compressed} bytes of compressed clusters decompressed by qemu-img",))


def restrict(extents: Sequence[Extent], needed: Sequence[Extent], chunk_size: int) -> list[Extent]:
    """The parts of ``extents`` in the chunks ``needed`` touches (both sorted and disjoint)."""
    out: list[Extent] = []
    for start, length in extents:
        end = start + length
        for n_start, n_length in overlapping(needed, start, end):
            lo = max(start, n_start // chunk_size * chunk_size)
            hi = min(end, -(-(n_start + n_length) // chunk_size) * chunk_size)
            if out and lo <= out[-1][0] + out[-1][1]:
                out[-1] = (out[-1][0], max(out[-1][0] + out[-1][1], hi) - out[-1][0])
            elif lo < hi:
                out.append((lo, hi - lo))
    return out


def merge_slices(extents: Sequence[Extent], most: int) -> list[Extent]:
    """At most ``most`` ranges covering ``extents`` (sorted, disjoint): the smallest gaps are bridged."""
    if len(extents) <= most:
        return list(extents)
    gaps = sorted(range(1, len(extents)),
                  key=lambda i: extents[i][0] - (extents[i - 1][0] + extents[i - 1][1]))
    cut = set(gaps[len(extents) - most:])  # the largest gaps stay between slices
    out: list[Extent] = []
    for i, (start, length) in enumerate(extents):
        if out and i not in cut:
            out[-1] = (out[-1][0], start + length - out[-1][0])
        else:
            out.append((start, length))
    return out


def _slice_mappings(compressed: Sequence[Extent], slices: Sequence[Extent], file: int) -> Iterator[Mapping]:
    """Each compressed range, at its place in the scratch file (the slices, one after the other)."""
    at, i = 0, 0
    for start, length in slices:
        while i < len(compressed) and compressed[i][0] < start + length:
            c_start, c_length = compressed[i]
            yield Mapping(c_start, c_length, file, at + c_start - start)
            i += 1
        at += length


def _image_opts(path: str, start: int, length: int) -> str:
    """One guest range of the qcow2 chain at ``path`` as an image of its own (QEMU's raw ``offset``)."""
    escaped = path.replace(",", ",,")
    # no file.file.driver: QEMU picks "file" or "host_device" (a qcow2 image on an LV) by itself
    return f"driver=raw,offset={start},size={length},file.driver=qcow2,file.file.filename={escaped}"


def _convert_slices(path: str, slices: Sequence[Extent], scratch: Path, progress: ProgressFn | None) -> None:
    """qemu-img convert -p: its "(12.34/100%)" reports become progress calls, the rest is its error."""
    cmd = [qcow2.QEMU_IMG, "convert", "-p", "-U", "-O", "raw", "--image-opts",
           *(_image_opts(path, s, n) for s, n in slices), str(scratch)]
    total = sum(n for _, n in slices)
    log.debug("decompressing %d slices of %s into %s", len(slices), path, scratch)
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    except FileNotFoundError as e:
        raise errors.ImageError(f"{qcow2.QEMU_IMG} is not installed (Debian: apt install qemu-utils)") from e
    assert proc.stdout is not None
    said: list[str] = []

    def hear(piece: bytes) -> None:
        text = piece.decode(errors="replace").strip()
        percent = PERCENT.search(text)
        if percent and progress is not None:
            progress(int(total * float(percent.group(1)) / 100), total)
        elif not percent and text:
            said.append(text)

    with proc:
        pending = b""
        while chunk := proc.stdout.read1(4096):  # type: ignore[attr-defined]  # a BufferedReader's
            *pieces, pending = re.split(rb"[\r\n]", pending + chunk)
            for piece in pieces:
                hear(piece)
        hear(pending)
    if proc.returncode != 0:
        raise errors.ImageError(f"cannot decompress the compressed clusters of {path} into {scratch}: "
                                f"{'; '.join(said) or f'exit status {proc.returncode}'}")
