"""Helpers for the system tests (crash, full disk, block devices, concurrency, corruption).

Everything here works on real things: image files, ``hyperback`` subprocesses,
tmpfs mounts and loop devices. Run as a script it drives the long-running loops
of the concurrency stress test in a process of its own::

    python tests/system_helpers.py backup-loop REPO WORKDIR SECONDS
    python tests/system_helpers.py prune-loop REPO SECONDS
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

MIB = 1024 * 1024
HYPERBACK = Path(sys.executable).with_name("hyperback")
"""The console script of the venv running the tests: what a user runs."""


# ---------- images ----------

def write_random_image(path: Path, size: int, seed: int, hole_every: int = 0, block: int = MIB,
                       zero_every: int = 0) -> Path:
    """An image of random ``block``-sized pieces; every ``hole_every``-th piece is left a hole and
    every ``zero_every``-th one is written as zeros (0 turns either off). Same seed, same bytes."""
    rng = random.Random(seed)
    with open(path, "wb") as f:
        f.truncate(size)
        for i, off in enumerate(range(0, size, block)):
            n = min(block, size - off)
            data = rng.randbytes(n)  # drawn even for holes, so pieces do not depend on the pattern
            if hole_every and i % hole_every == hole_every - 1:
                continue
            f.seek(off)
            f.write(bytes(n) if zero_every and i % zero_every == zero_every - 1 else data)
    return path


def overwrite(path: Path, seed: int, extents: Iterable[tuple[int, int]]) -> None:
    """Write random bytes over each (offset, length) of an image."""
    rng = random.Random(seed)
    with open(path, "r+b") as f:
        for off, n in extents:
            f.seek(off)
            f.write(rng.randbytes(n))


def sha256_file(path: Path | str) -> str:
    """SHA-256 of a file or block device, read through its page cache."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(4 * MIB):
            h.update(block)
    return h.hexdigest()


def fill_file(path: Path | str, byte: int, size: int) -> None:
    """Write ``size`` bytes of one value over the start of a file or device, durably."""
    with open(path, "r+b" if Path(path).exists() else "wb") as f:
        block = bytes([byte]) * MIB
        for off in range(0, size, MIB):
            f.write(block[:min(MIB, size - off)])
        f.flush()
        os.fsync(f.fileno())


# ---------- the CLI ----------

def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run ``hyperback ARGS`` to completion, capturing its output."""
    return subprocess.run([str(HYPERBACK), *args], capture_output=True, text=True, timeout=timeout,
                          check=False)


def start_cli(*args: str) -> subprocess.Popen[str]:
    """Start ``hyperback ARGS`` in a session of its own (so a signal can go to its process group)."""
    return subprocess.Popen([str(HYPERBACK), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


@contextlib.contextmanager
def cli_process(*args: str) -> Iterator[subprocess.Popen[str]]:
    """``start_cli``, ended on leaving whatever happened: killed if it still runs, reaped, its pipes
    closed (an unclosed pipe's ResourceWarning fails whichever later test the collector runs in)."""
    with start_cli(*args) as proc:  # Popen's own exit closes the pipes and waits
        try:
            yield proc
        finally:
            if proc.poll() is None:
                proc.kill()


def assert_one_line_error(proc: subprocess.CompletedProcess[str], exit_code: int) -> str:
    """The CLI failed with ``exit_code`` and said why in exactly one line, without a traceback."""
    assert proc.returncode == exit_code, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("hyperback: "), lines[0]
    return lines[0]


# ---------- the repository on disk ----------

def files_in(directory: Path) -> set[str]:
    return {p.name for p in directory.iterdir()} if directory.exists() else set()


def pack_files(repo_path: Path) -> set[str]:
    """Names of the pack files published in packs/."""
    return {p.name for sub in (repo_path / "packs").iterdir() for p in sub.iterdir()}


def index_files(repo_path: Path) -> set[str]:
    return files_in(repo_path / "index")


def snapshot_ids(repo_path: Path) -> set[str]:
    return files_in(repo_path / "snapshots")


def wait_for(condition: Callable[[], bool], timeout: float, proc: subprocess.Popen[str] | None = None,
             interval: float = 0.0) -> bool:
    """Poll ``condition`` until it holds (True), the timeout passes or ``proc`` ends (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        if proc is not None and proc.poll() is not None:
            return condition()
        if interval:
            time.sleep(interval)
    return condition()


# ---------- mounts and devices (root) ----------

def mount_tmpfs(path: Path, size_mib: int) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mib}m", "tmpfs", str(path)], check=True)
    return path


def unmount(path: Path) -> None:
    if subprocess.run(["umount", str(path)], check=False).returncode != 0:
        subprocess.run(["umount", "-l", str(path)], check=False)


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def attach_loop(backing: Path) -> str:
    out = subprocess.run(["losetup", "--find", "--show", str(backing)], check=True, capture_output=True,
                         text=True)
    return out.stdout.strip()


def detach_loop(device: str) -> None:
    subprocess.run(["losetup", "--detach", device], check=False)


# ---------- the stress loops (run as separate processes) ----------

def backup_loop(repo_path: str, workdir: str, seconds: float) -> None:
    """Change two images a little and back them up, alternately, until time is up.

    Appends one JSON line per committed snapshot to WORKDIR/snapshots.jsonl:
    its id and the SHA-256 of the image it was taken of.
    """
    from host_agent.model import Policy
    from host_agent.storage.repository import Repository

    repo = Repository.open(repo_path)
    work = Path(workdir)
    images = [write_random_image(work / f"{n}.img", 8 * MIB, seed=i, hole_every=5)
              for i, n in enumerate(("a", "b"))]
    rng = random.Random(7)
    deadline = time.monotonic() + seconds
    turn = 0
    with open(work / "snapshots.jsonl", "a") as log:
        while time.monotonic() < deadline:
            image = images[turn % 2]
            overwrite(image, rng.randrange(1 << 30),
                      [(rng.randrange(0, 8 * MIB - 256 * 1024, 4096), 256 * 1024) for _ in range(3)])
            digest = sha256_file(image)
            policy = Policy.FULL if turn % 5 == 0 else Policy.INCREMENTAL
            result = repo.backup(image, f"vm/{image.stem}", policy)
            log.write(json.dumps({"id": result.snapshot.id, "sha256": digest}) + "\n")
            log.flush()
            turn += 1


def prune_loop(repo_path: str, seconds: float) -> None:
    """Keep the 2 newest snapshots of each name, forget the rest and collect garbage, until time is up."""
    from host_agent.storage.gc import collect_garbage
    from host_agent.storage.repository import Repository
    from host_agent.storage.retention import KeepPolicy, select

    repo = Repository.open(repo_path)
    deadline = time.monotonic() + seconds
    totals = {"gc_runs": 0, "forgotten": 0, "packs_deleted": 0, "packs_repacked": 0, "blobs_copied": 0}
    while time.monotonic() < deadline:
        _, remove = select(repo.snapshots(), KeepPolicy(last=2))
        repo.forget([s.id for s in remove])
        result = collect_garbage(repo, repack_threshold=0.2)
        totals["gc_runs"] += 1
        totals["forgotten"] += len(remove)
        for key in ("packs_deleted", "packs_repacked", "blobs_copied"):
            totals[key] += getattr(result, key)
        time.sleep(0.05)
    print(json.dumps(totals))


if __name__ == "__main__":
    if sys.argv[1] == "backup-loop":
        backup_loop(sys.argv[2], sys.argv[3], float(sys.argv[4]))
    elif sys.argv[1] == "prune-loop":
        prune_loop(sys.argv[2], float(sys.argv[3]))
    else:
        sys.exit(f"unknown loop {sys.argv[1]!r}")
