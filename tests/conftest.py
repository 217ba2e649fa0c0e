"""Shared fixtures: repositories and generated disk images on real files."""
from __future__ import annotations

import fcntl
import hashlib
import os
import platform
import random
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from checkpoints import Checkpoints, Unavailable

from host_agent.lab import HostNotReady, Lab
from host_agent.lab.ceph import CephLab, S3Endpoint
from host_agent.storage.repository import Repository
from host_agent.storage.sourcefile import RACY_MARGIN_NS

MIB = 1024 * 1024
WORDS = b"disk guest host chunk pack tree index snapshot restore backup volume ext4 inode".split()


def pytest_report_header(config: pytest.Config) -> list[str]:
    tools = {t: bool(shutil.which(t)) for t in ("qemu-system-x86_64", "libvirtd", "losetup", "mkfs.ext4")}
    return [f"kernel {platform.release()}, uid {os.geteuid()}, cores {os.cpu_count()}",
            "tools: " + ", ".join(f"{t}={'yes' if ok else 'NO'}" for t, ok in tools.items())]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests never see the caller's HYPERBACK_* settings."""
    for key in list(os.environ):
        if key.startswith("HYPERBACK_"):
            monkeypatch.delenv(key)


def text_block(rng: random.Random, size: int) -> bytes:
    line = b" ".join(rng.choice(WORDS) for _ in range(10)) + b"\n"
    return (line * (size // len(line) + 1))[:size]


def write_image(path: Path, size: int, seed: int, block: int = 64 * 1024) -> Path:
    """A sparse image of holes, random data, compressible text and written zeros, by seed."""
    rng = random.Random(seed)
    with open(path, "wb") as f:
        f.truncate(size)
        for off in range(0, size, block):
            kind = rng.random()
            n = min(block, size - off)
            if kind < 0.3:
                continue
            data = rng.randbytes(n) if kind < 0.65 else text_block(rng, n) if kind < 0.95 else bytes(n)
            f.seek(off)
            f.write(data)
    return path


def mutate(path: Path, seed: int, extents: int, length: int = 64 * 1024,
           align: int = 4096) -> list[tuple[int, int]]:
    """Overwrite scattered extents with random bytes; return the change list."""
    rng = random.Random(seed)
    size = path.stat().st_size
    changes = []
    with open(path, "r+b") as f:
        for _ in range(extents):
            off = rng.randrange(0, max(size - length, 1), align)
            n = min(length, size - off)
            f.seek(off)
            f.write(rng.randbytes(n))
            changes.append((off, n))
    return changes


def wait_until_settled(paths: list[Path]) -> None:
    """Wait until every file's last change lies more than the racy margin in the past: only then
    may a backup's record of it vouch for it later (host_agent/storage/sourcefile.py)."""
    newest = max(max(p.stat().st_mtime_ns, p.stat().st_ctime_ns) for p in paths)
    tick = threading.Event()
    while time.time_ns() - RACY_MARGIN_NS <= newest:
        tick.wait(0.05)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(MIB):
            h.update(block)
    return h.hexdigest()


@pytest.fixture
def repo(tmp_path: Path) -> Repository:
    return Repository.init(tmp_path / "repo")


@pytest.fixture
def small_repo(tmp_path: Path) -> Repository:
    """4 KiB chunks: many chunks from small images."""
    return Repository.init(tmp_path / "small-repo", chunk_size=4096)


ImageFactory = Callable[..., Path]


@pytest.fixture
def make_image(tmp_path: Path) -> ImageFactory:
    counter = iter(range(1_000_000))

    def make(size: int = 4 * MIB, seed: int = 1, name: str | None = None) -> Path:
        return write_image(tmp_path / (name or f"image-{next(counter)}.img"), size, seed)

    return make


@pytest.fixture
def checkpoints() -> Iterator[Callable[[Path], Checkpoints]]:
    """Make listeners that hold a process at an exact step (tests/checkpoints.py), paths relative to
    a root; all are released after the test. Needs root: never a silent skip."""
    made: list[Checkpoints] = []

    def make(root: Path) -> Checkpoints:
        try:
            made.append(Checkpoints(root))
        except Unavailable as e:
            pytest.fail(f"{e}: this test holds a process at exact steps (deselect with -m 'not root')")
        return made[-1]

    yield make
    for cps in made:
        cps.release()


@contextmanager
def lab_or_fail(workdir: Path, **options: Any) -> Iterator[Lab]:
    """A guest lab for a real-VM test. Never a silent skip: a host that cannot run guests fails
    the test, saying what to do; deselect real-VM tests with -m "not vm"."""
    if os.geteuid() != 0:
        pytest.fail("real-VM tests need root (deselect them with -m 'not vm')")
    the_lab = Lab(workdir, **options)
    try:
        the_lab.__enter__()
    except HostNotReady as e:
        pytest.fail(f"host not prepared: run host_agent/lab/setup_host.sh ({e})")
    try:
        yield the_lab
    finally:
        the_lab.close()


@pytest.fixture(scope="session")
def ceph_s3() -> Iterator[S3Endpoint]:
    """The lab's Ceph cluster with radosgw, started once per run and removed at its end (tests marked
    ``ceph``). Never a silent skip: a host without Ceph fails the test, saying what to install. Two
    runs on one machine take turns: the cluster's folder is one for the machine."""
    with open("/tmp/hyperback-ceph.lock", "w") as turn:
        fcntl.flock(turn, fcntl.LOCK_EX)
        lab = CephLab()
        try:
            endpoint = lab.start()
        except HostNotReady as e:
            pytest.fail(f"host not prepared for the ceph tests (deselect them with -m 'not ceph'): {e}")
        try:
            yield endpoint
        finally:
            lab.stop()
