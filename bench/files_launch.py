#!/usr/bin/env python3
"""How long ``hyperback files`` takes, step by step: the export, the libguestfs appliance's launch,
the mount, a listing, and one file read; N runs on one snapshot of a generated ext4 disk.

    .venv/bin/python bench/files_launch.py [--runs 3] [--tcg] [--size-mib 256]

Prints one line per run and the median of each step (seconds). Docs: docs/restore.md.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from host_agent.guestfiles.reader import GuestFiles, ReaderSettings
from host_agent.storage.export import SnapshotExport
from host_agent.storage.repository import Repository

MIB = 1 << 20


def make_disk(base: Path, size_mib: int) -> Path:
    tree = base / "tree"
    for d in range(20):
        (tree / f"dir{d:02}").mkdir(parents=True)
        for f in range(50):
            (tree / f"dir{d:02}" / f"file{f:02}").write_bytes(os.urandom(4096 * (1 + f % 8)))
    (tree / "big.bin").write_bytes(os.urandom(16 * MIB))
    image = base / "disk.img"
    subprocess.run(["mke2fs", "-q", "-t", "ext4", "-F", "-d", str(tree), str(image), f"{size_mib}M"],
                   check=True)
    return image


def one_run(repo: Repository, run_dir: Path, settings: ReaderSettings) -> dict[str, float]:
    times: dict[str, float] = {}
    t = time.monotonic()
    with SnapshotExport(repo, "bench/vdb@latest", run_dir) as export:
        times["export"] = time.monotonic() - t
        t = time.monotonic()
        with GuestFiles(export.socket_path, settings) as guest:
            times["launch"] = time.monotonic() - t
            t = time.monotonic()
            guest.mount(None)
            times["mount"] = time.monotonic() - t
            t = time.monotonic()
            n = sum(1 for _ in guest.listdir("/dir07"))
            assert n == 50
            times["ls"] = time.monotonic() - t
            t = time.monotonic()
            with open(os.devnull, "wb") as sink:
                guest.download("/big.bin", sink.fileno())
            times["cat 16 MiB"] = time.monotonic() - t
            t = time.monotonic()
        times["close"] = time.monotonic() - t
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--tcg", action="store_true", help="run the appliance under TCG")
    parser.add_argument("--size-mib", type=int, default=256)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="hb-files-bench-", dir="/var/tmp") as tmp:
        base = Path(tmp)
        repo = Repository.init(base / "repo")
        repo.backup(str(make_disk(base, args.size_mib)), "bench/vdb")
        runs = []
        for i in range(args.runs):
            times = one_run(repo, base / "run", ReaderSettings(tcg=True if args.tcg else None))
            runs.append(times)
            print(f"run {i + 1}: " + "  ".join(f"{k} {v:.2f}" for k, v in times.items()), flush=True)
        print("median: " + "  ".join(f"{k} {statistics.median(r[k] for r in runs):.2f}" for k in runs[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
