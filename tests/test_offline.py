"""The offline guard speaks QEMU's image-locking protocol: real QEMU tools (qemu-io, qemu-img) are
refused writing while it holds an image and may still read it; it refuses an image someone writes.
tests/test_offline_vm.py shows the same against libvirt starting a domain."""
from __future__ import annotations

import fcntl
import os
import subprocess
from pathlib import Path

import pytest

from host_agent import errors
from host_agent.agent.offline import RAW_LOCK_PERM_BASE, ImageGuard, _flock


def qemu(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=60, check=False)


@pytest.fixture
def images(tmp_path: Path) -> tuple[Path, Path]:
    raw = tmp_path / "d.raw"
    raw.write_bytes(b"\1" * 65536)
    qcow = tmp_path / "d.qcow2"
    assert qemu("qemu-img", "create", "-q", "-f", "qcow2", str(qcow), "1M").returncode == 0
    return raw, qcow


def test_while_guarded_qemu_cannot_open_the_images_for_writing_but_can_read_them(
        images: tuple[Path, Path]) -> None:
    raw, qcow = images
    with ImageGuard([str(raw), str(qcow)]):
        for path, fmt in ((raw, "raw"), (qcow, "qcow2")):
            refused = qemu("qemu-io", "-f", fmt, "-c", "write 0 4k", str(path))
            assert refused.returncode != 0 and 'Failed to get "write" lock' in refused.stderr
            assert qemu("qemu-io", "-r", "-f", fmt, "-c", "read 0 4k", str(path)).returncode == 0
        assert qemu("qemu-img", "info", str(qcow)).returncode == 0  # the agent's own qemu-img calls work
        # the copier opening and closing the image in this process keeps the guard (OFD locks)
        os.close(os.open(raw, os.O_RDONLY))
        assert qemu("qemu-io", "-f", "raw", "-c", "write 0 4k", str(raw)).returncode != 0
    assert qemu("qemu-io", "-f", "raw", "-c", "write 0 4k", str(raw)).returncode == 0  # released


def test_an_image_someone_holds_for_writing_is_not_read_offline(images: tuple[Path, Path]) -> None:
    raw, _ = images
    fd = os.open(raw, os.O_RDONLY)  # another open file description, as a running QEMU's would be
    try:
        _flock(fd, fcntl.F_OFD_SETLK, fcntl.F_RDLCK, RAW_LOCK_PERM_BASE + 1)  # holds WRITE
        with pytest.raises(errors.ViewError, match="open for writing by another process"):
            ImageGuard([str(raw)]).__enter__()
    finally:
        os.close(fd)
    with ImageGuard([str(raw)]):
        pass


def test_a_missing_image_is_a_source_error(tmp_path: Path) -> None:
    with pytest.raises(errors.SourceError, match="cannot open"):
        ImageGuard([str(tmp_path / "gone.raw")]).__enter__()
