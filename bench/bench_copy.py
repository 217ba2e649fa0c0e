#!/usr/bin/env python3
"""hyperback copy between two local repositories: seconds and bytes sent, first and after a change.

Run by hand with the project's virtualenv::

    .venv/bin/python bench/bench_copy.py                     # a 1 GiB image of random data, 5% change
    .venv/bin/python bench/bench_copy.py --size-mib 256 --change-pct 1 --runs 1

Each run starts from fresh repositories: the image is backed up into the source and copied into an
empty target (every chunk sent); then ``--change-pct`` of the image is rewritten in 64 KiB extents at
4 KiB-aligned offsets, backed up again (incremental) and copied again (the first snapshot skipped,
only the new chunks sent). The copies are the real command (``hyperback copy --json``), so the times
include starting Python; the page cache is as the backup left it.
"""
from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MiB = 1 << 20
EXTENT = 64 * 1024
HYPERBACK = Path(sys.executable).with_name("hyperback")


def hyperback(*args: object) -> dict[str, object]:
    out = subprocess.run([str(HYPERBACK), *map(str, args), "--json"], check=True, capture_output=True,
                         text=True)
    result: dict[str, object] = json.loads(out.stdout)
    return result


def random_image(path: Path, size: int, seed: int) -> None:
    rng = random.Random(seed)
    with open(path, "wb") as f:
        for _ in range(size // MiB):
            f.write(rng.randbytes(MiB))


def rewrite(path: Path, fraction: float, seed: int) -> int:
    rng = random.Random(seed)
    size = path.stat().st_size
    extents = int(size * fraction) // EXTENT
    with open(path, "r+b") as f:
        for _ in range(extents):
            f.seek(rng.randrange(0, size - EXTENT, 4096))
            f.write(rng.randbytes(EXTENT))
    return extents * EXTENT


def timed_copy(src: Path, dst: Path) -> tuple[float, dict[str, object]]:
    started = time.monotonic()
    summary = hyperback("copy", "--from", src, "--to", dst)
    return time.monotonic() - started, summary


def one_run(work: Path, size: int, change: float, seed: int) -> None:
    image = work / "image"
    random_image(image, size, seed)
    for repo in ("src", "dst"):
        shutil.rmtree(work / repo, ignore_errors=True)
        subprocess.run([str(HYPERBACK), "init", str(work / repo)], check=True, capture_output=True)
    hyperback("backup", "--repo", work / "src", "--name", "vm1/vda", image)
    seconds, first = timed_copy(work / "src", work / "dst")
    print(f"first copy: {seconds:.2f} s, sent {first['bytes_sent'] / MiB:.1f} MiB "
          f"({first['chunks_sent']} blobs), present {first['bytes_present'] / MiB:.1f} MiB")
    rewritten = rewrite(image, change, seed + 1)
    hyperback("backup", "--repo", work / "src", "--name", "vm1/vda", "--policy", "incremental", image)
    seconds, again = timed_copy(work / "src", work / "dst")
    print(f"after rewriting {rewritten / MiB:.1f} MiB: {seconds:.2f} s, "
          f"sent {again['bytes_sent'] / MiB:.1f} MiB "
          f"({again['chunks_sent']} blobs), present {again['bytes_present'] / MiB:.1f} MiB, "
          f"skipped {len(again['skipped'])}")  # type: ignore[arg-type]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--change-pct", type=float, default=5.0)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--dir", type=Path, default=None,
                        help="where to work (default: a temporary directory)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-copy-", dir=args.dir) as tmp:
        for run in range(args.runs):
            print(f"run {run + 1}: {args.size_mib} MiB of random data, {args.change_pct:g}% rewritten")
            one_run(Path(tmp), args.size_mib * MiB, args.change_pct / 100, seed=run)


if __name__ == "__main__":
    main()
