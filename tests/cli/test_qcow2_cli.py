"""``hyperback backup`` of a qcow2 image stores the disk its guest sees, and ``hyperback restore`` writes
it back as raw or as a sparse qcow2, bit-identical to ``qemu-img convert -O raw`` of the chain: a
backing file, compressed clusters (``qemu-img convert -c``) and zero clusters (``qemu-io write -z``).
An incremental reads only what the image's dirty bitmap marks.

The real ``hyperback`` command, qemu-img, qemu-io, qemu-nbd, nbdcopy and nbdkit on real files; no VM.
"""
from __future__ import annotations

import json
import shutil
import signal
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from checkpoints import Checkpoints, opened
from cli_helpers import assert_one_line_error, run, run_json
from conftest import MIB, sha256_file, write_image
from system_helpers import cli_process

from host_agent.storage.guestview import detect_format, merge_slices, restrict

KIB = 1024
SIZE = 16 * MIB


@pytest.fixture(autouse=True)
def tools() -> None:
    """Never a silent skip: .ci/setup installs these."""
    missing = [t for t in ("qemu-img", "qemu-io", "qemu-nbd", "nbdcopy", "nbdinfo", "nbdkit")
               if shutil.which(t) is None]
    if missing:
        pytest.fail(f"needs {', '.join(missing)} (Debian: qemu-utils, libnbd-bin, nbdkit)")


def sh(*args: object) -> str:
    return subprocess.run([str(a) for a in args], check=True, capture_output=True, text=True).stdout


def qemu_io(image: Path, *commands: str) -> None:
    sh("qemu-io", "-f", "qcow2", *(x for c in commands for x in ("-c", c)), image)


def guest_digest(image: Path) -> str:
    """What the guest sees: the SHA-256 of ``qemu-img convert -O raw`` of the image."""
    raw = image.with_suffix(".want.raw")
    sh("qemu-img", "convert", "-O", "raw", image, raw)
    digest = sha256_file(raw)
    raw.unlink()
    return digest


def image_map(image: Path) -> list[dict[str, object]]:
    out: list[dict[str, object]] = json.loads(sh("qemu-img", "map", "--output=json", image))
    return out


def data_bytes(image: Path) -> int:
    """Guest bytes that hold data (not zero clusters, not unallocated), through the chain."""
    return sum(int(str(r["length"])) for r in image_map(image) if r["data"] and not r["zero"])


def bitmaps(image: Path) -> list[str]:
    info = json.loads(sh("qemu-img", "info", "--output=json", image))
    return [b["name"] for b in info["format-specific"]["data"].get("bitmaps", [])]


@dataclass
class Chain:
    top: Path
    base: Path


@pytest.fixture
def chain(tmp_path: Path) -> Chain:
    """A compressed base image under an overlay that writes data and zero clusters over it."""
    raw = write_image(tmp_path / "base.raw", SIZE, seed=7)
    base = tmp_path / "base.qcow2"
    sh("qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow2", raw, base)
    raw.unlink()
    top = tmp_path / "top.qcow2"
    sh("qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", top)
    qemu_io(top, "write -P 0x5a 1M 256k", "write -z 4M 1M", "write -z 9M 64k", "write -P 0x33 12M 64k")
    layers = image_map(top)
    assert any(r["data"] and "offset" not in r for r in layers), "no compressed cluster in the base"
    assert any(r["zero"] and not r["data"] and r["depth"] == 0 for r in layers), "no zero cluster on top"
    return Chain(top, base)


def backup(repo: Path, image: Path, *options: object) -> dict[str, object]:
    """A backup of an image the test trusts: ``--format qcow2`` given (a later ``--format`` wins)."""
    out: dict[str, object] = run_json("backup", "--repo", repo, "--name", "vm1/vda", "--format", "qcow2",
                                      *options, image)
    return out


def test_a_detected_qcow2_header_naming_another_file_is_not_followed(tmp_path: Path) -> None:
    # what a guest can write at the start of its raw disk: a qcow2 header whose backing file is a host file
    secret = tmp_path / "host-secret"
    secret.write_bytes(b"host only\n" * 100)
    disk = tmp_path / "guest-raw-disk.img"
    sh("qemu-img", "create", "-q", "-f", "qcow2", "-b", secret, "-F", "raw", disk, str(SIZE))
    run("init", tmp_path / "r")
    refused = run("backup", "--repo", tmp_path / "r", "--name", "vm1/vda", disk, check=False)
    assert_one_line_error(refused, 2, f"reads {secret}", "--format")
    assert bitmaps(disk) == []  # nothing written into what may be a guest's disk
    out = run_json("backup", "--repo", tmp_path / "r", "--name", "vm1/vda", "--format", "raw", disk)
    assert out["format"] == "raw" and out["size"] == disk.stat().st_size  # the disk's own bytes


def test_a_qcow2_chain_is_backed_up_as_its_guest_sees_it_and_restored_to_raw_and_qcow2(
        tmp_path: Path, chain: Chain) -> None:
    run("init", tmp_path / "r")
    out = backup(tmp_path / "r", chain.top)
    assert out["format"] == "qcow2" and out["size"] == SIZE
    assert out["bytes_read"] == data_bytes(chain.top)  # zero clusters and holes are never read
    assert 0 < int(str(out["bytes_through_qemu"])) < SIZE  # only the compressed clusters went through QEMU
    want = guest_digest(chain.top)

    run("restore", "--repo", tmp_path / "r", "vm1/vda@latest", tmp_path / "out.raw")
    assert sha256_file(tmp_path / "out.raw") == want

    run("restore", "--repo", tmp_path / "r", "vm1/vda@latest", tmp_path / "out.qcow2")
    assert detect_format(tmp_path / "out.qcow2") == "qcow2"
    assert (tmp_path / "out.qcow2").stat().st_mode & 0o777 == 0o600  # a disk's data: private, as a raw one
    assert guest_digest(tmp_path / "out.qcow2") == want
    assert "identical" in sh("qemu-img", "compare", tmp_path / "out.qcow2", chain.top)
    restored = json.loads(sh("qemu-img", "info", "--output=json", tmp_path / "out.qcow2"))
    # sparse (only data clusters, and some metadata) and standalone
    assert restored["actual-size"] <= data_bytes(chain.top) + MIB and "backing-filename" not in restored

    run("restore", "--repo", tmp_path / "r", "--format", "qcow2", "vm1/vda@latest", tmp_path / "out.img")
    assert detect_format(tmp_path / "out.img") == "qcow2"


def test_an_incremental_reads_only_what_the_dirty_bitmap_marks(tmp_path: Path, chain: Chain) -> None:
    run("init", tmp_path / "r")
    backup(tmp_path / "r", chain.top)
    # 128 KiB of data over a compressed range of the base, 64 KiB of written zeros over data
    qemu_io(chain.top, "write -P 0x71 6M 128k", "write -z 1M 64k")
    out = backup(tmp_path / "r", chain.top, "--policy", "incremental")
    assert out["change_detection"] == "dirty-bitmap"
    assert int(str(out["bytes_read"])) <= 256 * KIB
    assert out["bytes_through_qemu"] == 0  # unchanged compressed clusters are not decompressed
    run("restore", "--repo", tmp_path / "r", "vm1/vda@latest", tmp_path / "out.raw")
    assert sha256_file(tmp_path / "out.raw") == guest_digest(chain.top)
    assert len(bitmaps(chain.top)) == 2  # the full's (a differential's base) and the incremental's


def test_a_missing_bitmap_falls_back_to_comparison_and_says_so(tmp_path: Path, chain: Chain) -> None:
    run("init", tmp_path / "r")
    backup(tmp_path / "r", chain.top)
    for name in bitmaps(chain.top):
        sh("qemu-img", "bitmap", "--remove", chain.top, name)
    qemu_io(chain.top, "write -P 0x72 3M 64k")
    out = backup(tmp_path / "r", chain.top, "--policy", "incremental")
    assert out["change_detection"] == "comparison"
    assert any("has no bitmap" in str(n) for n in out["notes"])  # type: ignore[attr-defined]
    run("restore", "--repo", tmp_path / "r", "vm1/vda@latest", tmp_path / "out.raw")
    assert sha256_file(tmp_path / "out.raw") == guest_digest(chain.top)


def test_format_raw_stores_the_file_bytes_as_before(tmp_path: Path, chain: Chain) -> None:
    run("init", tmp_path / "r")
    out = backup(tmp_path / "r", chain.top, "--format", "raw")
    assert out["format"] == "raw"
    run("restore", "--repo", tmp_path / "r", "vm1/vda@latest", tmp_path / "out.raw")
    assert sha256_file(tmp_path / "out.raw") == sha256_file(chain.top)


def test_clusters_smaller_than_a_chunk_are_converted_whole_into_a_sparse_scratch_file(tmp_path: Path) -> None:
    raw = write_image(tmp_path / "d.raw", 4 * MIB, seed=3)
    image = tmp_path / "small.qcow2"
    sh("qemu-img", "convert", "-f", "raw", "-O", "qcow2", "-o", "cluster_size=4096", raw, image)
    run("init", tmp_path / "r")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    out = backup(tmp_path / "r", image, "--scratch", scratch)
    assert any("scratch file" in str(n) for n in out["notes"])  # type: ignore[attr-defined]
    assert not list(scratch.iterdir())  # the scratch file is gone
    run("restore", "--repo", tmp_path / "r", "vm1/vda@latest", tmp_path / "out.raw")
    assert sha256_file(tmp_path / "out.raw") == sha256_file(raw)


def test_restore_to_qcow2_mistakes_are_one_line(tmp_path: Path) -> None:
    run("init", tmp_path / "r")
    image = write_image(tmp_path / "d.img", MIB, 1)
    run("backup", "--repo", tmp_path / "r", "--name", "vm1/vda", image)
    (tmp_path / "there.qcow2").write_bytes(b"x")
    assert_one_line_error(run("restore", "--repo", tmp_path / "r", "vm1/vda@latest", tmp_path / "there.qcow2",
                              check=False), 3, "--overwrite")
    assert (tmp_path / "there.qcow2").read_bytes() == b"x"
    assert_one_line_error(run("restore", "--repo", tmp_path / "r", "--format", "vmdk", "vm1/vda@latest",
                              tmp_path / "o", check=False), 2, "--format")


def test_slices_bridge_the_smallest_gaps_first() -> None:
    extents = [(0, 10), (12, 5), (100, 5), (106, 4), (1000, 1)]
    assert merge_slices(extents, 5) == extents
    assert merge_slices(extents, 3) == [(0, 17), (100, 10), (1000, 1)]
    assert merge_slices(extents, 1) == [(0, 1001)]


def test_only_the_chunks_needed_are_decompressed() -> None:
    compressed = [(0, 256 * KIB), (512 * KIB, 64 * KIB)]
    assert restrict(compressed, [(70 * KIB, 1)], 32 * KIB) == [(64 * KIB, 32 * KIB)]
    assert restrict(compressed, [(250 * KIB, 300 * KIB)], 32 * KIB) == [(224 * KIB, 32 * KIB),
                                                                        (512 * KIB, 64 * KIB)]
    assert restrict(compressed, [(300 * KIB, 10)], 32 * KIB) == []


def test_a_damaged_chunk_fails_a_qcow2_restore_and_leaves_nothing_behind(tmp_path: Path) -> None:
    run("init", tmp_path / "r")
    image = write_image(tmp_path / "d.img", 4 * MIB, 5)
    run("backup", "--repo", tmp_path / "r", "--name", "vm1/vda", image)
    pack = next(p for p in (tmp_path / "r" / "packs").rglob("*") if p.is_file())
    with open(pack, "r+b") as f:  # flip a page in the middle of the pack: some chunk fails its checks
        f.seek(pack.stat().st_size // 2)
        page = f.read(4096)
        f.seek(pack.stat().st_size // 2)
        f.write(bytes(b ^ 0xFF for b in page))
    assert_one_line_error(run("restore", "--repo", tmp_path / "r", "vm1/vda@latest", tmp_path / "out.qcow2",
                              check=False), 4, "hyperback verify")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.img", "r"]


@pytest.mark.root
def test_a_backup_killed_before_its_commit_leaves_a_bitmap_the_next_backup_removes(
        tmp_path: Path, chain: Chain, checkpoints: Callable[[Path], Checkpoints]) -> None:
    run("init", tmp_path / "r")
    backup(tmp_path / "r", chain.top)
    (full,) = bitmaps(chain.top)
    qemu_io(chain.top, "write -P 0x73 2M 128k")
    cps = checkpoints(tmp_path / "r")
    cps.watch_opens(tmp_path / "r" / "tmp")
    with cli_process("backup", "--repo", str(tmp_path / "r"), "--name", "vm1/vda", "--format", "qcow2",
                     "--policy", "incremental", str(chain.top)) as proc:
        cps.hold_at(proc, opened("tmp/*.tmp"))  # every chunk stored, the snapshot document next
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=30)
    cps.release()
    assert proc.returncode == -signal.SIGKILL
    assert len(run_json("list", "--repo", tmp_path / "r")) == 1  # nothing published
    orphan = set(bitmaps(chain.top)) - {full}
    assert len(orphan) == 1

    out = backup(tmp_path / "r", chain.top, "--policy", "incremental")
    assert out["change_detection"] == "dirty-bitmap"  # the full's bitmap still marks the write
    assert int(str(out["bytes_read"])) <= 256 * KIB
    assert not orphan & set(bitmaps(chain.top)) and full in bitmaps(chain.top)
    run("restore", "--repo", tmp_path / "r", "vm1/vda@latest", tmp_path / "out.raw")
    assert sha256_file(tmp_path / "out.raw") == guest_digest(chain.top)
    run("check", "--repo", tmp_path / "r")
