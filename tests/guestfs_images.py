"""Guest disks for the file-level restore tests, built without a kernel mount: ``mke2fs -d`` copies
a host directory into a new ext4 (e2fsprogs), at an offset for a partitioned disk.

The appliance runs under TCG in the tests: on these machines /dev/kvm exists but a nested KVM guest
aborts (docs/restore.md), and TCG works everywhere.
"""
from __future__ import annotations

import hashlib
import os
import stat
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from host_agent.guestfiles.reader import ReaderSettings

MIB = 1024 * 1024
READER = ReaderSettings(tcg=True)
# A guest file's times
MTIME_NS = 1_700_000_000 * 10**9  # whole seconds: mke2fs -d drops nanoseconds (the VM test has them)
ATIME_NS = 1_700_000_100 * 10**9


def mke2fs(image: Path, source: Path, offset: int, size: int, *options: str) -> None:
    subprocess.run(["mke2fs", "-q", "-t", "ext4", "-F", "-I", "256", *options, "-E", f"offset={offset}",
                    "-d", str(source), str(image), f"{size // 1024}k"], check=True, capture_output=True)


def guest_tree(root: Path) -> Path:
    """Files a guest might hold: modes, nanosecond times, a nested directory, an empty file, a
    binary file larger than a read buffer, symlinks inside and pointing out, setuid, a FIFO."""
    (root / "etc" / "app" / "conf.d").mkdir(parents=True)
    (root / "etc" / "app" / "app.conf").write_text("port = 8080\n")
    (root / "etc" / "app" / "conf.d" / "10-local.conf").write_text("debug = false\n")
    (root / "etc" / "app" / "secret.key").write_bytes(os.urandom(64))
    (root / "etc" / "app" / "empty").write_bytes(b"")
    (root / "data").mkdir()
    (root / "data" / "blob.bin").write_bytes(os.urandom(3 * MIB + 17))
    (root / "data" / "tool").write_text("#!/bin/sh\necho hi\n")
    (root / "data" / "latest").symlink_to("blob.bin")
    (root / "data" / "escape").symlink_to("../../../../../../../../tmp/hyperback-escaped")
    (root / "data" / "abs").symlink_to("/etc/shadow")
    os.mkfifo(root / "data" / "pipe")
    os.chmod(root / "etc" / "app" / "secret.key", 0o600)
    os.chmod(root / "etc" / "app" / "conf.d", 0o750)
    os.chmod(root / "data" / "tool", 0o4755)
    for path in sorted(root.rglob("*"), key=lambda p: -len(p.parts)):  # children before parents
        os.utime(path, ns=(ATIME_NS, MTIME_NS), follow_symlinks=False)
    return root


def partitioned_disk(image: Path, first: Path, second: Path) -> Path:
    """A DOS-labelled disk: ext4 of ``first`` in partition 1 (40 MiB at 1 MiB), ext4 labelled
    'second' of ``second`` in partition 2, without metadata checksums so that a test can craft its
    directory entries (``craft_names``)."""
    with open(image, "wb") as f:
        f.truncate(80 * MIB)
    subprocess.run(["sfdisk", "-q", str(image)], input=b"label: dos\n,40M,L\n,,L\n", check=True)
    mke2fs(image, first, MIB, 40 * MIB)
    mke2fs(image, second, 41 * MIB, 38 * MIB, "-L", "second", "-O", "^metadata_csum")
    return image


def craft_names(image: Path, renames: dict[bytes, bytes]) -> None:
    """Rename directory entries in place, bytes for bytes (same length), as a hostile guest could:
    names no healthy file system holds (``..`` twice, a ``/`` inside a name)."""
    data = bytearray(image.read_bytes())
    for old, new in renames.items():
        assert len(old) == len(new)
        marker = bytes([len(old), 1]) + old  # name_len, file type (regular), name
        at = data.find(marker)
        assert at > 0 and data.find(marker, at + 1) < 0, f"entry {old!r} not found once"
        data[at + 2:at + 2 + len(old)] = new
    image.write_bytes(bytes(data))


@dataclass(frozen=True)
class Seen:
    mode: int
    mtime_ns: int
    digest: str | None
    target: str | None


def snapshot_of_tree(root: Path) -> dict[str, Seen]:
    """What a tree holds, by relative path: modes, mtimes, contents' digests, link targets."""
    out = {}
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        digest = hashlib.sha256(path.read_bytes()).hexdigest() if stat.S_ISREG(st.st_mode) else None
        target = os.readlink(path) if stat.S_ISLNK(st.st_mode) else None
        out[str(path.relative_to(root))] = Seen(st.st_mode, st.st_mtime_ns, digest, target)
    return out


@dataclass(frozen=True)
class HostEntry:
    name: str
    mode: int
    size: int
    mtime_ns: int
    atime_ns: int
    target: str | None


class HostTree:
    """A TreeSource over a host directory: the same walk the guest reader serves, on real files."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def _entry(self, path: Path) -> HostEntry:
        st = path.lstat()
        target = os.readlink(path) if path.is_symlink() else None
        return HostEntry(path.name or "/", st.st_mode, st.st_size, st.st_mtime_ns, st.st_atime_ns, target)

    def stat(self, path: str) -> HostEntry:
        return self._entry(self.root / path.lstrip("/"))

    def listdir(self, path: str) -> Iterator[HostEntry]:
        for child in sorted((self.root / path.lstrip("/")).iterdir()):
            yield self._entry(child)

    def download(self, path: str, fd: int) -> None:
        with open(self.root / path.lstrip("/"), "rb") as f:
            while block := f.read(1 << 20):
                os.write(fd, block)
