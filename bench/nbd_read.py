#!/usr/bin/env python3
"""NBD read throughput of a snapshot export against ``hyperback restore`` of the same snapshot.

Run by hand with the project's virtualenv (needs nbdkit, nbdkit-plugin-python and libnbd-bin)::

    .venv/bin/python bench/nbd_read.py                    # a 1 GiB image
    .venv/bin/python bench/nbd_read.py --size-mib 256 --runs 1 --json-out /tmp/nbd.json

The image is built from 1 MiB regions in a seeded shuffle: 30% holes, 35% random data, 20% text-like
data (compressible), 10% copies of one random region (deduplicated: repeated blocks) and 5% written
zeros; it is backed up once into a fresh repository under WORKDIR. Then, each run with a fresh export
(an empty chunk cache) and the repository in the page cache:

- ``restore``: ``hyperback restore --no-sync`` to a file (the native restore, every core);
- ``nbdcopy-null``: ``nbdcopy URI null:`` from a local export (reads and discards);
- ``nbdcopy-file``: ``nbdcopy URI FILE`` (nbdcopy skips the holes the export reports);
- ``nbdcopy-null-1conn``: the same with one connection (``--connections 1``);
- ``nbdcopy-null-warm``: a second read of the same export: the cache's effect (64 MiB cache, so for
  a large image only the repeated blocks stay in it);
- ``remote-null``: ``nbdcopy URI null:`` from an export of the same repository behind a media
  service on 127.0.0.1 (``ReadChunks``; the protocol's cost, not a network's).

MB/s is the image's size (holes included, as a restore counts it) over the seconds. ``start-local``
and ``start-remote`` are the seconds from nothing to an export that answers NBD.
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
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from host_agent.media import server as media
from host_agent.media.client import RemoteRepository
from host_agent.storage.export import Exportable, SnapshotExport
from host_agent.storage.repository import Repository

MiB = 1 << 20
HYPERBACK = Path(sys.executable).with_name("hyperback")


@dataclass
class Result:
    mode: str
    seconds: float
    mb_per_s: float  # image bytes (10^6) per second


def make_image(path: Path, size_mib: int, seed: int) -> None:
    rng = random.Random(seed)
    kinds = ["hole"] * 30 + ["random"] * 35 + ["text"] * 20 + ["repeat"] * 10 + ["zeros"] * 5
    repeated = rng.randbytes(MiB)
    words = [rng.randbytes(rng.randrange(3, 9)).hex().encode() for _ in range(512)]
    with open(path, "wb") as f:
        f.truncate(size_mib * MiB)
        for region in range(size_mib):
            kind = rng.choice(kinds)
            if kind == "hole":
                continue
            f.seek(region * MiB)
            if kind == "random":
                f.write(rng.randbytes(MiB))
            elif kind == "text":
                f.write(b" ".join(rng.choice(words) for _ in range(MiB // 8))[:MiB].ljust(MiB, b"\n"))
            elif kind == "repeat":
                f.write(repeated)
            else:
                f.write(bytes(MiB))


def timed(mode: str, size: int, work: Callable[[], None]) -> Result:
    started = time.monotonic()
    work()
    seconds = time.monotonic() - started
    return Result(mode, round(seconds, 3), round(size / seconds / 1e6, 1))


def nbdcopy(uri: str, target: str, *options: str) -> Callable[[], None]:
    return lambda: subprocess.run(["nbdcopy", *options, uri, target], check=True)


@contextmanager
def exported(repo: Exportable, snap_id: str, run_dir: Path) -> Iterator[SnapshotExport]:
    with SnapshotExport(repo, snap_id, run_dir) as export:
        yield export


def start_seconds(repo: Exportable, snap_id: str, run_dir: Path) -> float:
    """From nothing to an export that answers NBD (nbdkit started, index and tree loaded)."""
    started = time.monotonic()
    with exported(repo, snap_id, run_dir):
        return round(time.monotonic() - started, 3)


def one_run(repo: Repository, remote: RemoteRepository, snap_id: str, size: int, work: Path) -> list[Result]:
    out: list[Result] = []
    for mode, source in (("start-local", repo), ("start-remote", remote)):
        seconds = start_seconds(source, snap_id, work / "run")
        out.append(Result(mode, seconds, 0.0))
    restored = work / "restored.img"
    restored.unlink(missing_ok=True)
    out.append(timed("restore", size, lambda: subprocess.run(
        [str(HYPERBACK), "restore", "--no-sync", "--repo", str(repo.path), snap_id, str(restored)],
        check=True, stdout=subprocess.DEVNULL)))
    with exported(repo, snap_id, work / "run") as export:
        out.append(timed("nbdcopy-null", size, nbdcopy(export.uri, "null:")))
        out.append(timed("nbdcopy-null-warm", size, nbdcopy(export.uri, "null:")))
    with exported(repo, snap_id, work / "run") as export:
        copy = work / "copy.img"
        copy.unlink(missing_ok=True)
        out.append(timed("nbdcopy-file", size, nbdcopy(export.uri, str(copy))))
        if copy.read_bytes() != restored.read_bytes():
            raise SystemExit("the export's bytes differ from the restore's")
    with exported(repo, snap_id, work / "run") as export:
        out.append(timed("nbdcopy-null-1conn", size, nbdcopy(export.uri, "null:", "--connections=1")))
    with exported(remote, snap_id, work / "run") as export:
        out.append(timed("remote-null", size, nbdcopy(export.uri, "null:")))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=None, help="default: a new temporary directory")
    parser.add_argument("--json-out", type=Path, default=None)
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="hyperback-nbd-bench-", dir="/var/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        image = work / "image.img"
        make_image(image, args.size_mib, args.seed)
        shutil.rmtree(work / "repo", ignore_errors=True)
        repo = Repository.init(work / "repo")
        snap = repo.backup(image, "bench/vda").snapshot
        image.unlink()
        print(f"image {args.size_mib} MiB, stored {snap.stats.bytes_stored / MiB:.0f} MiB", flush=True)
        server = media.start({"main": repo.path}, "127.0.0.1:0", "bench")
        results: list[Result] = []
        try:
            with RemoteRepository(server.address, "main") as remote:
                for _ in range(args.runs):
                    for r in one_run(repo, remote, snap.id, snap.size, work):
                        print(f"{r.mode:20} {r.seconds:8.3f} s {r.mb_per_s:8.1f} MB/s", flush=True)
                        results.append(r)
        finally:
            server.stop(grace=0)
        if args.json_out:
            args.json_out.write_text(json.dumps([asdict(r) for r in results], indent=1))
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
